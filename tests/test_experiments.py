"""Experiments (Table 3, sweeps, ranking report) against hand-made run folders and hand-made cases.

The end-to-end test here replaces the trainer by a fake ``train_and_evaluate`` that writes the
documented run-folder contract (metrics.json + predictions Parquet) from a fixed synthetic
evaluation set with a ground-truth sidecar; the real-trainer version is in
``test_experiments_trainer.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ctnocvr_rec.config import RunConfig
from ctnocvr_rec.experiments import oracle, runs
from ctnocvr_rec.experiments.ranking import rank_within_requests
from ctnocvr_rec.experiments.stats import mean_std, paired_t_test, sign_flip_test, student_t_two_sided_p
from ctnocvr_rec.train.metrics import roc_auc

# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def test_paired_t_test_hand_computed():
    before = [0.70, 0.71, 0.69]
    after = [0.71, 0.73, 0.70]
    # diffs 0.01, 0.02, 0.01: mean 0.04/3, sd = sqrt(((-1/3)^2 + (2/3)^2 + (-1/3)^2) / 2) * 0.01 = 0.01/sqrt(3)
    # t = (0.04/3) / (0.01/sqrt(3) / sqrt(3)) = 4; df = 2: p = 1 - t/sqrt(2 + t^2) = 1 - 4/sqrt(18)
    t, df, p = paired_t_test(before, after)
    assert df == 2
    assert t == pytest.approx(4.0, rel=1e-9)
    assert p == pytest.approx(1 - 4 / math.sqrt(18), rel=1e-9)


def test_t_distribution_closed_forms():
    # df=1 is Cauchy: P(|T| >= 1) = 1/2; df=2: P(|T| >= t) = 1 - t / sqrt(2 + t^2)
    assert student_t_two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-12)
    assert student_t_two_sided_p(3.0, 2) == pytest.approx(1 - 3 / math.sqrt(11), abs=1e-12)
    # df=3 at t = sqrt(3): theta = atan(1) = pi/4, p = 1 - (2/pi)(pi/4 + sin cos) = 1/2 - 1/pi
    assert student_t_two_sided_p(math.sqrt(3), 3) == pytest.approx(0.5 - 1 / math.pi, abs=1e-12)
    assert student_t_two_sided_p(0.0, 7) == pytest.approx(1.0)


def test_t_distribution_matches_scipy_when_available():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 9, 10, 29):
        for t in (0.2, 1.0, 2.5, 6.0):
            assert student_t_two_sided_p(t, df) == pytest.approx(2 * scipy_stats.t.sf(t, df), abs=1e-12)


def test_sign_flip_exact_hand_case():
    # diffs 1, 2, 3 (all positive): of the 8 sign patterns only +++ and --- reach |mean| = 2
    assert sign_flip_test([0, 0, 0], [1, 2, 3]) == pytest.approx(2 / 8)
    # diffs 1, -1, 2: |mean| = 2/3; patterns with |sum| >= 2: (+,-,+) (-,+,+) (+,+,+) and mirrors -> 6/8
    assert sign_flip_test([0, 0, 0], [1, -1, 2]) == pytest.approx(6 / 8)


def test_mean_std_sample():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([5.0]) == (5.0, 0.0)


# --------------------------------------------------------------------------------------------
# oracle
# --------------------------------------------------------------------------------------------


def test_oracle_aucs_hand_case():
    click = np.array([1, 1, 1, 1, 0, 0])
    conversion = np.array([1, 0, 1, 0, 0, 0])
    p_ctr = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.75])
    p_cvr = np.array([0.6, 0.5, 0.2, 0.1, 0.9, 0.4])
    got = oracle.oracle_aucs(click, conversion, p_ctr, p_cvr)
    # CVR on clicked rows: positives p_cvr {0.6, 0.2}, negatives {0.5, 0.1}: pairs won 0.6>0.5, 0.6>0.1, 0.2>0.1 -> 3/4
    assert got["auc_cvr"] == pytest.approx(0.75)
    # CTR on all rows: positives {0.9, 0.8, 0.3, 0.7} vs negatives {0.2, 0.75}: wins 2 + 2 + 1 + 1 = 6 of 8
    assert got["auc_ctr"] == pytest.approx(6 / 8)
    # CTCVR = p_ctr*p_cvr: positives {0.54, 0.06}; negatives {0.40, 0.07, 0.18, 0.30}: 4 + 0 wins of 8
    assert got["auc_ctcvr"] == pytest.approx(4 / 8)
    # CTnoCVR = p_ctr*(1-p_cvr): positives rows 1, 3 {0.40, 0.63}; negatives {0.36, 0.24, 0.02, 0.45}: 3 + 4 of 8
    assert got["auc_ctnocvr"] == pytest.approx(7 / 8)


def test_join_ground_truth_order_and_missing(tmp_path):
    truth = {"sample_id": np.array([5, 3, 9]), "p_ctr": np.array([0.5, 0.3, 0.9])}
    joined = oracle.join_ground_truth(np.array([9, 5]), truth)
    assert joined["p_ctr"].tolist() == [0.9, 0.5]
    with pytest.raises(ValueError, match="not in the ground truth"):
        oracle.join_ground_truth(np.array([9, 4]), truth, source="gt.parquet")


def test_rank_within_requests():
    request = np.array([7, 7, 7, 2, 2])
    score = np.array([0.1, 0.9, 0.5, 0.3, 0.3])
    ranks = rank_within_requests(request, score, np.arange(5))
    assert ranks.tolist() == [2, 0, 1, 0, 1]  # tie in request 2 broken by the smaller tie key


# --------------------------------------------------------------------------------------------
# end to end with a fake trainer
# --------------------------------------------------------------------------------------------

N_ROWS, REQUEST_SIZE, N_ITEMS = 4000, 10, 120


def _make_eval_set(gt_dir: Path) -> dict[str, np.ndarray]:
    """A fixed evaluation set + sidecar: items with segments; clickbait items click more, convert less."""
    rng = np.random.default_rng(123)
    segment_of_item = rng.choice(["normal", "clickbait", "gem"], size=N_ITEMS, p=[0.7, 0.15, 0.15])
    item = rng.integers(0, N_ITEMS, N_ROWS)
    seg = segment_of_item[item]
    logit_ctr = (
        rng.normal(-2.5, 0.6, N_ROWS) + np.where(seg == "clickbait", 1.2, 0) - np.where(seg == "gem", 1.0, 0)
    )
    logit_cvr = (
        rng.normal(-1.0, 0.8, N_ROWS) - np.where(seg == "clickbait", 1.5, 0) + np.where(seg == "gem", 1.5, 0)
    )
    p_ctr, p_cvr = 1 / (1 + np.exp(-logit_ctr)), 1 / (1 + np.exp(-logit_cvr))
    click = rng.random(N_ROWS) < p_ctr
    conversion = click & (rng.random(N_ROWS) < p_cvr)
    sample_id = rng.permutation(np.arange(1000, 1000 + N_ROWS))
    gt_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "sample_id": sample_id,
                "item_id": item.astype(np.int64),
                "segment": seg,
                "p_ctr": p_ctr,
                "p_cvr": p_cvr,
            }
        ),  # fmt: skip
        gt_dir / "ground_truth_test.parquet",
    )
    return {"sample_id": sample_id, "request_id": np.arange(N_ROWS) // REQUEST_SIZE, "click": click,
            "conversion": conversion, "p_ctr": p_ctr, "p_cvr": p_cvr}  # fmt: skip


def _fake_trainer(eval_set: dict[str, np.ndarray]):
    calls: list[str] = []

    def train_and_evaluate(cfg: RunConfig, nproc: int = 1) -> dict:
        """Noisy copies of the truth; +CTnoCVR and a loss weight near 0.5 get less noise."""
        calls.append(cfg.train.run_dir)
        run_dir = Path(cfg.train.run_dir)
        m = cfg.model
        rng = np.random.default_rng(
            [cfg.train.seed, int(m.use_ctnocvr), int(m.loss_weight_cvr * 1000), len(m.arch)]
        )
        noise = 1.2 - 0.3 * m.use_ctnocvr + 0.2 * abs(m.loss_weight_cvr - 0.5)
        logit = lambda p: np.log(p / (1 - p))  # noqa: E731
        p_ctr = 1 / (1 + np.exp(-(logit(eval_set["p_ctr"]) + rng.normal(0, 0.5, N_ROWS))))
        p_cvr = 1 / (1 + np.exp(-(logit(eval_set["p_cvr"]) + rng.normal(0, noise, N_ROWS))))
        click, conv = eval_set["click"], eval_set["conversion"]
        ctnocvr = click & ~conv
        preds = {"sample_id": eval_set["sample_id"], "request_id": eval_set["request_id"],
                 "user_id": eval_set["request_id"], "click": click.astype(np.int8),
                 "conversion": conv.astype(np.int8), "ctnocvr": ctnocvr.astype(np.int8), "p_ctr": p_ctr,
                 "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr, "p_ctnocvr": p_ctr * (1 - p_cvr)}  # fmt: skip
        (run_dir / "predictions").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(preds), run_dir / "predictions" / "test.parquet")
        metrics = {
            "auc_ctr": roc_auc(click, p_ctr),
            "auc_cvr": roc_auc(conv[click], p_cvr[click]),
            "auc_ctcvr": roc_auc(conv, p_ctr * p_cvr),
            "auc_ctnocvr": roc_auc(ctnocvr, p_ctr * (1 - p_cvr)),
        }
        result = {"metrics": metrics, "split": "test", "seed": cfg.train.seed, "config": {}}
        (run_dir / "metrics.json").write_text(json.dumps(result))
        return result

    return train_and_evaluate, calls


def _ctnocvr(argv: list[str]) -> int:
    """Run one of our sub-commands through argparse (only this area's commands are registered)."""
    from ctnocvr_rec.experiments import commands

    parser = argparse.ArgumentParser(prog="ctnocvr")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_end_to_end_fake_trainer(tmp_path, monkeypatch):
    gt_dir = tmp_path / "raw"
    eval_set = _make_eval_set(gt_dir)
    fake, calls = _fake_trainer(eval_set)
    monkeypatch.setattr(runs, "default_run_fn", fake)
    out = tmp_path / "exp"
    config = {
        "name": "tiny", "out_dir": str(out), "ground_truth": str(gt_dir),
        "run": {"data": {"prepared_dir": str(tmp_path / "prepared"), "eval_split": "test"}, "train": {"steps": 1}},
        "table3": {"archs": ["esmm", "cgc"], "seeds": [0, 1]},
        "sweep": {"archs": ["mmoe"], "seeds": [0, 1], "grids": {"model.loss_weight_cvr": [0.5, 4.0]}},
        "ranking": {"arch": "cgc", "seed": 1, "top_k": 3},
    }  # fmt: skip
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(config))

    assert _ctnocvr(["experiment", "table3", "--config", str(cfg_path)]) == 0
    assert len(calls) == 2 * 2 * 2
    # resumable: a second call trains nothing
    assert _ctnocvr(["experiment", "table3", "--config", str(cfg_path)]) == 0
    assert len(calls) == 8

    rows = {(r["arch"], r["variant"]): r for r in _read_csv(out / "table3.csv")}
    truth = pq.read_table(gt_dir / "ground_truth_test.parquet").to_pydict()
    truth_by_id = dict(zip(truth["sample_id"], zip(truth["p_ctr"], truth["p_cvr"])))
    for arch in ("esmm", "cgc"):
        per_variant = {}
        for variant, title in (("base", "Base"), ("ctnocvr", "+CTnoCVR")):
            values = []
            for seed in (0, 1):
                run_dir = out / "table3" / arch / variant / f"seed{seed}"
                values.append(json.loads((run_dir / "metrics.json").read_text())["metrics"]["auc_cvr"])
                assert (run_dir / "config.yaml").is_file()
            row = rows[(arch, title)]
            assert float(row["auc_cvr_mean"]) == pytest.approx(np.mean(values), abs=1e-12)
            assert float(row["auc_cvr_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
            per_variant[variant] = values
        improved = rows[(arch, "+CTnoCVR")]
        diff = np.mean(np.subtract(per_variant["ctnocvr"], per_variant["base"]))
        assert float(improved["abs_improvement"]) == pytest.approx(diff, abs=1e-12)
        assert float(improved["rel_improvement"]) == pytest.approx(
            diff / np.mean(per_variant["base"]), abs=1e-12
        )
        assert float(improved["p_paired_t"]) == pytest.approx(
            paired_t_test(per_variant["base"], per_variant["ctnocvr"])[2]
        )
        ctr = {
            v: [
                json.loads((out / "table3" / arch / v / f"seed{s}" / "metrics.json").read_text())["metrics"][
                    "auc_ctr"
                ]
                for s in (0, 1)
            ]
            for v in ("base", "ctnocvr")
        }
        assert float(improved["diff_auc_ctr"]) == pytest.approx(
            np.mean(ctr["ctnocvr"]) - np.mean(ctr["base"]), abs=1e-12
        )
        assert float(improved["p_sign_flip"]) == pytest.approx(0.5)  # 2 seeds: 2 of 4 patterns always tie
        # oracle from the sidecar, recomputed independently of the report's join
        preds = pq.read_table(
            out / "table3" / arch / "base" / "seed0" / "predictions" / "test.parquet"
        ).to_pydict()
        clicked = [i for i, c in enumerate(preds["click"]) if c]
        true_cvr = [truth_by_id[preds["sample_id"][i]][1] for i in clicked]
        expected_oracle = roc_auc(np.array(preds["conversion"])[clicked], np.array(true_cvr))
        assert float(rows[(arch, "Base")]["oracle_auc_cvr_mean"]) == pytest.approx(expected_oracle, abs=1e-12)
        assert float(rows[(arch, "Base")]["gap_auc_cvr_mean"]) == pytest.approx(
            np.mean(per_variant["base"]) - expected_oracle, abs=1e-12
        )
    md = (out / "table3.md").read_text()
    assert "| ESMM |" in md and "Oracle" in md and "## Summary" in md
    assert md.count("+CTnoCVR") >= 4

    # sweep
    assert _ctnocvr(["experiment", "sweep", "--config", str(cfg_path)]) == 0
    sweep_rows = _read_csv(out / "sweep.csv")
    assert {(r["arch"], float(r["value"])) for r in sweep_rows} == {("mmoe", 0.5), ("mmoe", 4.0)}
    for r in sweep_rows:
        values = [
            json.loads((out / "sweep" / "model.loss_weight_cvr" / "mmoe" / f"{float(r['value']):g}" / f"seed{s}" / "metrics.json").read_text())["metrics"]["auc_cvr"]
            for s in (0, 1)
        ]  # fmt: skip
        assert float(r["auc_cvr_mean"]) == pytest.approx(np.mean(values), abs=1e-12)
        assert int(r["n_seeds"]) == 2
    assert (out / "sweep_model.loss_weight_cvr.png").stat().st_size > 1000

    # ranking report from the config's table3 runs
    assert _ctnocvr(["report", "ranking", "--config", str(cfg_path)]) == 0
    summary = json.loads((out / "ranking" / "ranking_summary.json").read_text())
    n_requests = N_ROWS // REQUEST_SIZE
    assert summary["before"]["exposures"] == summary["after"]["exposures"] == 3 * n_requests
    items = _read_csv(out / "ranking" / "ranking_items.csv")
    assert sum(float(r["before_exposures"]) for r in items) == 3 * n_requests
    # the summary's share of planted clickbait equals the item table's, recomputed here
    cb = sum(float(r["after_exposures"]) for r in items if r["segment"] == "clickbait") / (3 * n_requests)
    assert summary["after"]["clickbait_exposure_share"] == pytest.approx(cb)
    conv = sum(float(r["before_conversions"]) for r in items)
    assert summary["before"]["conversions_per_1000"] == pytest.approx(1000 * conv / (3 * n_requests))
    assert (out / "ranking" / "ranking_fig2.png").stat().st_size > 1000
    assert "exposure share of high-CTR-low-CVR items" in (out / "ranking" / "ranking.md").read_text()

    # over all seeds: one report per seed plus the aggregate, whose means match the per-seed summaries
    assert (
        _ctnocvr(
            ["report", "ranking", "--config", str(cfg_path), "--all-seeds", "--out", str(tmp_path / "rs")]
        )
        == 0
    )
    per_seed = [
        json.loads((tmp_path / "rs" / f"seed{s}" / "ranking_summary.json").read_text()) for s in (0, 1)
    ]
    md_lines = (tmp_path / "rs" / "ranking_seeds.md").read_text().splitlines()
    clickbait_line = next(line for line in md_lines if "planted clickbait" in line)
    mean_before = 100 * np.mean([p["before"]["clickbait_exposure_share"] for p in per_seed])
    assert clickbait_line.split("|")[2].strip().startswith(f"{mean_before:.2f}%")


def test_bad_experiment_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"table3": {"seedz": [1]}}))
    from ctnocvr_rec.experiments.spec import load_experiment

    with pytest.raises(ValueError, match="seedz"):
        load_experiment(path)
    path.write_text(yaml.safe_dump({"run": {"model": {"archh": "x"}}}))
    with pytest.raises(ValueError, match="archh"):
        load_experiment(path)


def test_sweep_rejects_unknown_grid_key(tmp_path):
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "o")}))
    with pytest.raises(ValueError, match="score_wieght"):
        _ctnocvr(["experiment", "sweep", "--config", str(cfg_path), "--grid", "model.score_wieght=1"])
