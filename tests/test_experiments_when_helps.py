"""`ctnocvr experiment when-helps`: regimes, data made by the library, paired deltas with CIs, resume."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctnocvr_rec.config import ConfigError, RunConfig
from ctnocvr_rec.experiments.spec import load_experiment
from ctnocvr_rec.experiments.stats import mean_ci, t_critical
from ctnocvr_rec.experiments.when_helps import plan_regimes, plan_when_helps, run_when_helps
from ctnocvr_rec.train.metrics import roc_auc

TINY_SYNTH = {"rows_train": 1200, "rows_test": 1500, "users": 80, "items": 50, "seed": 5, "ctr": 0.2}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _experiment(tmp_path: Path, when_helps: dict, run: dict | None = None):
    import yaml

    cfg = {"name": "wh", "out_dir": str(tmp_path / "exp"),
           "run": run or {"data": {"eval_split": "test"}},
           "when_helps": {"synth": TINY_SYNTH, "prepare": {"workers": 1}, **when_helps}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_experiment(path)


def test_regimes_share_the_default_and_the_plan_is_seed_major(tmp_path):
    exp = _experiment(tmp_path, {"knobs": {"clickbait_share": [0.0, 0.1, 0.3], "cvr": [0.3, 0.05]},
                                 "archs": ["esmm"], "seeds": [0, 1]})
    regimes, level_regime = plan_regimes(exp)
    # clickbait_share 0.1 and cvr 0.3 are SynthConfig's defaults: one shared "default" regime
    assert [r.name for r in regimes] == ["default", "clickbait_share-0", "clickbait_share-0.3", "cvr-0.05"]
    assert level_regime[("clickbait_share", 0.1)] == level_regime[("cvr", 0.3)] == "default"
    assert regimes[3].synth == {**TINY_SYNTH, "cvr": 0.05}
    specs = plan_when_helps(exp, regimes)
    assert len(specs) == 2 * 4 * 1 * 2
    assert [s.labels["seed"] for s in specs[:8]] == [0] * 8
    assert specs[2].rel_dir == "when_helps/clickbait_share-0/esmm/base/seed0"
    assert specs[2].settings["data.prepared_dir"].endswith("data/clickbait_share-0/prepared")
    # no level at the default: no default regime is made
    exp = _experiment(tmp_path, {"knobs": {"cvr": [0.05, 0.5]}})
    assert [r.name for r in plan_regimes(exp)[0]] == ["cvr-0.05", "cvr-0.5"]


def test_bad_knobs_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['clickbait'\] at .*when_helps.knobs.clickbait"):
        plan_regimes(_experiment(tmp_path, {"knobs": {"clickbait": [0.1]}}))
    with pytest.raises(ConfigError, match="rows_train: expected an integer, got 'many'"):
        plan_regimes(_experiment(tmp_path, {"knobs": {"rows_train": ["many"]}}))
    with pytest.raises(ConfigError, match="unknown arch 'dcn'"):
        _experiment(tmp_path, {"archs": ["dcn"]})
    with pytest.raises(ConfigError, match=r"\['out_dir'\] are set by the study"):
        run_when_helps(_experiment(tmp_path, {"prepare": {"out_dir": "x"}}), run_fn=_fake_run_fn([]),
                       log=lambda _: None)


def test_t_quantiles_and_confidence_interval():
    # two-sided 95% quantiles of Student's t (any table): df 1, 2, 4, 30
    for df, want in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (30, 2.0423)):
        assert t_critical(df) == pytest.approx(want, abs=1e-4)
    low, high = mean_ci([0.01, 0.02, 0.03])
    assert (low + high) / 2 == pytest.approx(0.02) and high - low == pytest.approx(2 * 4.3027 * 0.01 / math.sqrt(3), rel=1e-4)
    assert all(math.isnan(v) for v in mean_ci([0.5]))


def _fake_run_fn(calls: list[str]):
    """Predictions on the regime's real test rows: the true pCVR plus noise, sharper with CTnoCVR only
    when the regime has no clickbait (so the study must find 'helps' there and 'no effect' elsewhere)."""

    def run_fn(cfg: RunConfig, nproc: int = 1) -> dict:
        calls.append(cfg.train.run_dir)
        raw = Path(cfg.data.prepared_dir).parent / "raw"
        truth = pq.read_table(raw / "ground_truth_test.parquet").to_pydict()
        n = len(truth["sample_id"])
        labels = np.random.default_rng(1)  # the same test labels for every run of a regime
        p_ctr, p_cvr = np.array(truth["p_ctr"]), np.array(truth["p_cvr"])
        click = labels.random(n) < p_ctr
        conversion = click & (labels.random(n) < p_cvr)
        no_bait = "clickbait_share-0/" in cfg.train.run_dir
        noise_sd = 3.0 - (2.0 if (cfg.model.use_ctnocvr and no_bait) else 0.0)
        noise = np.random.default_rng([cfg.train.seed, 7]).normal(0.0, noise_sd, n)
        pred_cvr = 1 / (1 + np.exp(-(np.log(p_cvr / (1 - p_cvr)) + noise)))
        run_dir = Path(cfg.train.run_dir)
        preds = {"sample_id": np.array(truth["sample_id"]), "request_id": np.arange(n) // 10,
                 "click": click.astype(np.int8), "conversion": conversion.astype(np.int8), "p_ctr": p_ctr,
                 "p_cvr": pred_cvr, "p_ctcvr": p_ctr * pred_cvr}
        (run_dir / "predictions").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(preds), run_dir / "predictions" / "test.parquet")
        metrics = {"auc_cvr": roc_auc(conversion[click], pred_cvr[click]), "auc_ctr": roc_auc(click, p_ctr),
                   "auc_ctcvr": 0.5, "auc_ctnocvr": 0.5}
        result = {"metrics": metrics, "split": "test", "seed": cfg.train.seed}
        (run_dir / "metrics.json").write_text(json.dumps(result))
        return result

    return run_fn


def test_study_with_a_fake_trainer_real_data_and_resume(tmp_path):
    exp = _experiment(tmp_path, {"knobs": {"clickbait_share": [0.0, 0.1]}, "archs": ["esmm", "mmoe"],
                                 "seeds": [0, 1, 2]})
    calls: list[str] = []
    md = run_when_helps(exp, run_fn=_fake_run_fn(calls), log=lambda _: None)
    assert len(calls) == 2 * 2 * 2 * 3
    data = exp.output_dir / "data"
    for regime in ("default", "clickbait_share-0"):  # made by the library: raw files, truth, prepared set
        assert (data / regime / "prepared" / "manifest.json").is_file()
        assert (data / regime / "raw" / "ground_truth_test.parquet").is_file()
    config = json.loads((data / "clickbait_share-0" / "raw" / "synth_config.json").read_text())
    assert config["clickbait_share"] == 0.0 and config["rows_train"] == TINY_SYNTH["rows_train"]
    rows = {(r["level"], r["arch"]): r for r in _read_csv(md.with_suffix(".csv"))}
    assert set(rows) == {("0.0", "esmm"), ("0.0", "mmoe"), ("0.1", "esmm"), ("0.1", "mmoe")}
    # recompute one row from the run folders
    root = exp.output_dir / "when_helps" / "clickbait_share-0" / "mmoe"
    auc = {v: [json.loads((root / v / f"seed{s}" / "metrics.json").read_text())["metrics"]["auc_cvr"]
               for s in (0, 1, 2)] for v in ("base", "ctnocvr")}
    diffs = np.subtract(auc["ctnocvr"], auc["base"])
    row = rows[("0.0", "mmoe")]
    assert float(row["diff"]) == pytest.approx(diffs.mean(), abs=1e-12)
    assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx(mean_ci(diffs), abs=1e-12)
    assert int(row["wins"]) == int((diffs > 0).sum()) and row["pairs"] == "3"
    oracle = float(row["base_oracle_auc_cvr_mean"])
    assert 0.5 < oracle <= 1.0
    assert float(row["gap_closed"]) == pytest.approx(diffs.mean() / (oracle - np.mean(auc["base"])), rel=1e-9)
    text = md.read_text()
    # the planted effect is found where it is planted, and only there
    assert "| 0.0 | MMoE |" in text and "helps" in text.split("| 0.0 | MMoE |")[1].split("\n")[0]
    assert "helps" not in text.split("| 0.1 (default) | MMoE |")[1].split("\n")[0]
    assert (exp.output_dir / "when_helps.png").stat().st_size > 1000
    # resumable: nothing retrained, no data remade; a new seed trains only its runs
    stamp = (data / "default" / "prepared" / "manifest.json").stat().st_mtime_ns
    run_when_helps(exp, run_fn=_fake_run_fn(calls), log=lambda _: None)
    assert len(calls) == 24 and (data / "default" / "prepared" / "manifest.json").stat().st_mtime_ns == stamp
    exp.when_helps.seeds = [0, 1, 2, 3]
    run_when_helps(exp, run_fn=_fake_run_fn(calls), log=lambda _: None)
    assert len(calls) == 32 and all("seed3" in c for c in calls[24:])


def test_when_helps_command_applies_its_options(tmp_path, monkeypatch, capsys):
    import argparse

    from ctnocvr_rec.experiments import commands, runs

    calls: list[str] = []
    monkeypatch.setattr(runs, "default_run_fn", _fake_run_fn(calls))
    exp = _experiment(tmp_path, {"knobs": {"clickbait_share": [0.0, 0.1], "cvr": [0.3, 0.5]}})
    parser = argparse.ArgumentParser(prog="ctnocvr")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["experiment", "when-helps", "--config", exp.source, "--knobs", "cvr",
                              "--archs", "esmm", "--seeds", "0", "1"])
    assert args.func(args) == 0
    assert len(calls) == 2 * 1 * 2 * 2 and not any("clickbait" in c for c in calls)
    assert "| 0.5 | ESMM |" in capsys.readouterr().out
    args = parser.parse_args(["experiment", "when-helps", "--config", exp.source, "--knobs", "rows"])
    with pytest.raises(ValueError, match=r"--knobs \['rows'\]"):
        args.func(args)


def test_packaged_preset_loads_and_plans_13_regimes():
    exp = load_experiment("synth_when_helps")
    regimes, level_regime = plan_regimes(exp)
    assert len(regimes) == 13 and set(exp.when_helps.knobs) == {
        "clickbait_share", "cvr", "selection_strength", "rows_train"}
    assert len(plan_when_helps(exp, regimes)) == 13 * 2 * 2 * 3


@pytest.mark.slow
def test_study_end_to_end_with_the_real_trainer(tmp_path):
    """Two tiny regimes, ESMM x {Base, +CTnoCVR} x 1 seed through train_and_evaluate: each run trains on
    its own regime's prepared set and its CVR AUC is the one of its predictions."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = {"data": {"batch_size": 256, "eval_batch_size": 2048},
           "model": {"embedding_dim": 4, "num_experts": 2, "expert_hidden": [8], "tower_hidden": [8]},
           "train": {"epochs": 1, "device": "cpu", "progress_bar": False, "log_every_steps": 1000},
           "eval": {"gauc": False}}
    exp = _experiment(tmp_path, {"knobs": {"clickbait_share": [0.1, 0.3]}, "archs": ["esmm"], "seeds": [0]},
                      run=run)
    try:
        md = run_when_helps(exp, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    rows = {(r["level"], r["arch"]): r for r in _read_csv(md.with_suffix(".csv"))}
    assert set(rows) == {("0.1", "esmm"), ("0.3", "esmm")} and all(r["pairs"] == "1" for r in rows.values())
    run_dir = exp.output_dir / "when_helps" / "clickbait_share-0.3" / "esmm" / "ctnocvr" / "seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["data"]["prepared_dir"].endswith("data/clickbait_share-0.3/prepared")
    assert metrics["config"]["model"]["use_ctnocvr"] is True
    preds = pq.read_table(run_dir / "predictions" / f"{metrics['split']}.parquet").to_pydict()
    click = np.array(preds["click"]).astype(bool)
    assert metrics["metrics"]["auc_cvr"] == pytest.approx(
        roc_auc(np.array(preds["conversion"])[click], np.array(preds["p_cvr"])[click]), abs=1e-9)
    assert 0.5 < float(rows[("0.3", "esmm")]["base_oracle_auc_cvr_mean"]) <= 1.0
