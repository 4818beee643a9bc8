"""`experiment compare`: plan, resumability, aggregation against hand-made runs, and a real tiny run.

The aggregation test uses a fake trainer (metrics.json + predictions from known numbers) so every
figure of compare.csv can be checked by hand; the end-to-end test trains real tiny models through the
library functions (synth -> prepare -> run_compare), no CLI.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctnocvr_rec.config import ConfigError, RunConfig
from ctnocvr_rec.experiments.compare import plan_compare, run_compare
from ctnocvr_rec.experiments.spec import load_experiment
from ctnocvr_rec.experiments.stats import paired_comparison
from ctnocvr_rec.train.metrics import roc_auc


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _experiment(tmp_path: Path, compare: dict, run: dict | None = None, ground_truth: str = ""):
    import yaml

    cfg = {"name": "cmp", "out_dir": str(tmp_path / "exp"), "ground_truth": ground_truth,
           "run": run or {"data": {"prepared_dir": str(tmp_path / "prepared"), "eval_split": "test"}},
           "compare": compare}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_experiment(path)


def test_plan_is_seed_major_and_names_variants(tmp_path):
    exp = _experiment(tmp_path, {"methods": ["base", "dcmt"], "archs": ["esmm", "cgc"], "seeds": [3, 4]})
    specs = plan_compare(exp)
    assert len(specs) == 2 * 2 * 2 * 2
    assert [s.labels["seed"] for s in specs[:8]] == [3] * 8
    assert [s.rel_dir for s in specs[:4]] == [
        "compare/esmm/base/seed3", "compare/esmm/ctnocvr/seed3", "compare/esmm/dcmt/seed3",
        "compare/esmm/dcmt+ctnocvr/seed3"]
    assert specs[3].settings["model.method"] == "dcmt" and specs[3].settings["model.use_ctnocvr"] is True


def test_unknown_method_or_arch_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'nise'"):
        _experiment(tmp_path, {"methods": ["base", "nise"]})
    with pytest.raises(ConfigError, match="unknown arch 'dcn'"):
        _experiment(tmp_path, {"archs": ["dcn"]})


N = 400


def _fake_run_fn(calls: list[str]):
    """Writes metrics.json + predictions whose CVR AUC is a known function of (method, flag, seed)."""
    rng = np.random.default_rng(0)
    click = rng.random(N) < 0.5
    conversion = click & (rng.random(N) < 0.4)
    truth = rng.random(N)

    def run_fn(cfg: RunConfig, nproc: int = 1) -> dict:
        calls.append(cfg.train.run_dir)
        m = cfg.model
        quality = {"base": 0.5, "escm2_ips": 0.8, "dcmt": 1.1}[m.method] + 0.3 * m.use_ctnocvr
        noise = np.random.default_rng([cfg.train.seed, len(m.method), int(m.use_ctnocvr)]).normal(0, 1, N)
        p_cvr = 1 / (1 + np.exp(-(quality * (conversion * 2.0 - 1.0) + noise)))
        p_ctr = 0.5 + 0.1 * truth
        run_dir = Path(cfg.train.run_dir)
        preds = {"sample_id": np.arange(N), "request_id": np.arange(N) // 10, "click": click.astype(np.int8),
                 "conversion": conversion.astype(np.int8), "p_ctr": p_ctr, "p_cvr": p_cvr,
                 "p_ctcvr": p_ctr * p_cvr}
        (run_dir / "predictions").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(preds), run_dir / "predictions" / "test.parquet")
        metrics = {"auc_cvr": roc_auc(conversion[click], p_cvr[click]), "auc_ctr": roc_auc(click, p_ctr),
                   "auc_ctcvr": roc_auc(conversion, p_ctr * p_cvr), "auc_ctnocvr": 0.5}
        result = {"metrics": metrics, "split": "test", "seed": cfg.train.seed}
        (run_dir / "metrics.json").write_text(json.dumps(result))
        return result

    return run_fn


def test_aggregation_paired_tests_and_resume_with_a_fake_trainer(tmp_path):
    exp = _experiment(tmp_path, {"methods": ["base", "escm2_ips", "dcmt"], "archs": ["mmoe"], "seeds": [0, 1, 2]})
    calls: list[str] = []
    md = run_compare(exp, run_fn=_fake_run_fn(calls), log=lambda _: None)
    assert len(calls) == 3 * 2 * 3
    rows = {r["variant"]: r for r in _read_csv(md.with_suffix(".csv"))}
    assert set(rows) == {"base", "ctnocvr", "escm2_ips", "escm2_ips+ctnocvr", "dcmt", "dcmt+ctnocvr"}
    root = exp.output_dir / "compare" / "mmoe"
    auc = {v: [json.loads((root / v / f"seed{s}" / "metrics.json").read_text())["metrics"]["auc_cvr"]
               for s in (0, 1, 2)] for v in rows}
    row = rows["dcmt+ctnocvr"]
    assert float(row["auc_cvr_mean"]) == pytest.approx(np.mean(auc["dcmt+ctnocvr"]), abs=1e-12)
    assert float(row["auc_cvr_std"]) == pytest.approx(np.std(auc["dcmt+ctnocvr"], ddof=1), abs=1e-12)
    for key, ref in (("base", "base"), ("ctnocvr", "ctnocvr"), ("plain", "dcmt")):
        test = paired_comparison(auc[ref], auc["dcmt+ctnocvr"])
        assert float(row[f"vs_{key}_diff"]) == pytest.approx(test.mean_diff, abs=1e-12), key
        assert float(row[f"vs_{key}_p_t"]) == pytest.approx(test.p_t, abs=1e-12), key
        assert int(row[f"vs_{key}_wins"]) == test.wins
    # no self-comparison, no "on top" comparison for a variant without the flag or for base
    assert rows["base"]["vs_base_diff"] == "" and rows["ctnocvr"]["vs_ctnocvr_diff"] == ""
    assert rows["escm2_ips"]["vs_plain_diff"] == "" and rows["ctnocvr"]["vs_plain_diff"] == ""
    text = md.read_text()
    assert "| MMoE | Base (n=3)" in text and "DCMT +CTnoCVR (n=3)" in text
    assert "too few paired seeds" not in text
    assert (exp.output_dir / "compare.png").stat().st_size > 1000
    # resumable: a second call trains nothing, a new seed trains only its runs
    run_compare(exp, run_fn=_fake_run_fn(calls), log=lambda _: None)
    assert len(calls) == 18
    exp.compare.seeds = [0, 1, 2, 3]
    run_compare(exp, run_fn=_fake_run_fn(calls), log=lambda _: None)
    assert len(calls) == 24 and all("seed3" in c for c in calls[18:])


@pytest.fixture()
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_compare_end_to_end_with_the_real_trainer(tmp_path, one_thread):
    from ctnocvr_rec.data.prepare import PrepareOptions, prepare
    from ctnocvr_rec.data.synth import SynthConfig, generate

    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    generate(SynthConfig(rows_train=2000, rows_test=800, users=120, items=60, seed=3), raw)
    prepare(PrepareOptions(raw_dir=str(raw), out_dir=str(prepared), workers=1, progress=False))
    run = {"data": {"prepared_dir": str(prepared), "batch_size": 256, "eval_batch_size": 2048},
           "model": {"embedding_dim": 4, "num_experts": 2, "expert_hidden": [8], "tower_hidden": [8]},
           "train": {"epochs": 1, "device": "cpu", "progress_bar": False, "log_every_steps": 1000},
           "eval": {"gauc": False}}
    exp = _experiment(tmp_path, {"methods": ["base", "escm2_dr", "dcmt"], "archs": ["esmm"], "ctnocvr": [False, True],
                                 "seeds": [0, 1]}, run=run, ground_truth=str(raw))
    md = run_compare(exp, log=lambda _: None)
    rows = {r["variant"]: r for r in _read_csv(md.with_suffix(".csv"))}
    assert len(rows) == 6 and all(r["n_seeds"] == "2" for r in rows.values())
    # the run really trained the method it is labelled with, and its CVR AUC is that of its predictions
    run_dir = exp.output_dir / "compare" / "esmm" / "escm2_dr+ctnocvr" / "seed1"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["model"]["method"] == "escm2_dr" and metrics["config"]["model"]["use_ctnocvr"]
    log = (run_dir / "log.jsonl").read_text()
    assert "loss_imputation" in log and "loss_cvr_dr" in log and "loss_ctnocvr" in log
    preds = pq.read_table(run_dir / "predictions" / f"{metrics['split']}.parquet").to_pydict()
    click = np.array(preds["click"]).astype(bool)
    assert metrics["metrics"]["auc_cvr"] == pytest.approx(
        roc_auc(np.array(preds["conversion"])[click], np.array(preds["p_cvr"])[click]), abs=1e-9)
    assert 0.5 < float(rows["dcmt"]["oracle_auc_cvr_mean"]) <= 1.0
    assert "gap_auc_cvr_mean" in rows["dcmt"] and rows["dcmt"]["gap_auc_cvr_mean"] != ""
    assert (exp.output_dir / "compare.png").is_file()
    # ranking shift of one run, recomputed by brute force from its predictions and the ground truth
    from ctnocvr_rec.experiments import oracle

    truth = oracle.join_ground_truth(np.array(preds["sample_id"]), oracle.load_ground_truth(
        oracle.ground_truth_file(raw, metrics["split"])))
    exposed = []
    for request in np.unique(preds["request_id"]):
        rows = [i for i, r in enumerate(preds["request_id"]) if r == request]
        rows.sort(key=lambda i: (-preds["p_ctcvr"][i], preds["sample_id"][i]))
        exposed += rows[:exp.compare.top_k]
    run = next(r for r in _read_csv(exp.output_dir / "compare_runs.csv") if r["run_dir"] == str(run_dir))
    assert float(run["topk_clickbait_share"]) == pytest.approx(np.mean(truth["segment"][exposed] == "clickbait"))
    assert float(run["topk_true_ctcvr"]) == pytest.approx(np.mean(truth["p_ctr"][exposed] * truth["p_cvr"][exposed]))
    assert "clickbait in top-3" in md.read_text()


def test_exposure_metrics_hand_case():
    from ctnocvr_rec.experiments.exposure import exposure_metrics

    # request 0: scores 0.9 (clickbait), 0.5 (gem), 0.1 (normal); request 1: 0.2 (gem), 0.3 (normal)
    preds = {"sample_id": np.array([1, 2, 3, 4, 5]), "request_id": np.array([0, 0, 0, 1, 1]),
             "p_ctcvr": np.array([0.9, 0.5, 0.1, 0.2, 0.3])}
    truth = {"segment": np.array(["clickbait", "gem", "normal", "gem", "normal"]),
             "p_ctr": np.array([0.5, 0.1, 0.2, 0.1, 0.2]), "p_cvr": np.array([0.1, 0.8, 0.3, 0.9, 0.5])}
    top1 = exposure_metrics(preds, truth, top_k=1)  # exposes samples 1 and 5
    assert top1 == pytest.approx({"topk_clickbait_share": 0.5, "topk_gem_share": 0.0,
                                  "topk_true_ctcvr": (0.05 + 0.1) / 2})
    top2 = exposure_metrics(preds, truth, top_k=2)  # 1, 2, 5, 4
    assert top2 == pytest.approx({"topk_clickbait_share": 0.25, "topk_gem_share": 0.5,
                                  "topk_true_ctcvr": (0.05 + 0.08 + 0.1 + 0.09) / 4})


def test_compare_command_applies_its_options(tmp_path, monkeypatch, capsys):
    import argparse

    from ctnocvr_rec.experiments import commands, runs

    calls: list[str] = []
    monkeypatch.setattr(runs, "default_run_fn", _fake_run_fn(calls))
    exp = _experiment(tmp_path, {"methods": ["base", "escm2_ips", "escm2_dr", "dcmt"], "archs": ["mmoe", "cgc"]})
    parser = argparse.ArgumentParser(prog="ctnocvr")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["experiment", "compare", "--config", exp.source, "--methods", "base", "dcmt",
                              "--archs", "esmm", "--seeds", "0", "1"])
    assert args.func(args) == 0
    assert len(calls) == 2 * 2 * 2 and all("/compare/esmm/" in c for c in calls)
    assert "| ESMM | Base (n=2)" in capsys.readouterr().out
    args = parser.parse_args(["experiment", "compare", "--config", exp.source, "--methods", "nise"])
    with pytest.raises(ConfigError, match="unknown method 'nise'"):
        args.func(args)


def test_summary_says_when_one_seed_cannot_be_tested():
    from ctnocvr_rec.experiments.compare_report import summary_lines

    row = {"arch": "esmm", "arch_title": "ESMM", "method": "dcmt", "ctnocvr": True, "title": "DCMT +CTnoCVR",
           "auc_cvr_mean": 0.7, "vs_plain_diff": -0.1, "vs_plain_p_t": float("nan"), "vs_plain_pairs": 1,
           "vs_plain_wins": 0}
    assert "too few paired seeds" in summary_lines([row])[0]
    row.update(vs_plain_pairs=3, vs_plain_p_t=0.5)
    assert "no significant effect" in summary_lines([row])[0]
    row.update(vs_plain_p_t=0.01)
    assert "CTnoCVR HURT DCMT (-10.00)" in summary_lines([row])[0]
