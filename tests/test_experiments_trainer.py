"""`table3`, `sweep` and `report ranking` end to end with the real trainer on a tiny synthetic set.

Synth -> prepare -> 2 seeds of MMoE Base/+CTnoCVR -> a 2-value sweep -> ranking report, all through
the command-line handlers; the tables are checked against the per-run ``metrics.json`` files and the
``metrics.json`` AUCs against the saved predictions (the run-folder contract the reports rely on).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from ctnocvr_rec.experiments.stats import paired_t_test
from ctnocvr_rec.train.metrics import roc_auc

pytestmark = pytest.mark.slow


def _ctnocvr(argv: list[str]) -> int:
    from ctnocvr_rec.cli import build_parser

    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _auc_cvr(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["metrics"]["auc_cvr"]


@pytest.fixture()
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_table3_sweep_ranking_with_real_trainer(tmp_path, one_thread):
    raw, prepared, out = tmp_path / "raw", tmp_path / "prepared", tmp_path / "exp"
    config = {
        "name": "tiny-real",
        "out_dir": str(out),
        "ground_truth": str(raw),
        "data_setup": [
            [
                "data",
                "synth",
                "--out",
                str(raw),
                "--rows-train",
                "3000",
                "--rows-test",
                "1200",
                "--users",
                "150",
                "--items",
                "80",
                "--seed",
                "3",
            ],
            [
                "data",
                "prepare",
                "--raw-dir",
                str(raw),
                "--out",
                str(prepared),
                "--workers",
                "1",
                "--no-progress",
            ],
        ],  # fmt: skip
        "run": {
            "data": {"prepared_dir": str(prepared), "batch_size": 256, "eval_batch_size": 2048},
            "model": {"embedding_dim": 4, "num_experts": 2, "expert_hidden": [8], "tower_hidden": [8]},
            "train": {"epochs": 1, "device": "cpu", "progress_bar": False, "log_every_steps": 1000},
            "eval": {"gauc": False},
        },
        "table3": {"archs": ["mmoe"], "seeds": [0, 1]},
        "sweep": {"archs": ["mmoe"], "seeds": [0, 1], "grids": {"model.score_weight": [0.001, 0.02]}},
        "ranking": {"arch": "mmoe", "seed": 1, "top_k": 2},
    }
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(config))

    assert _ctnocvr(["experiment", "table3", "--config", str(cfg_path)]) == 0
    row = {r["variant"]: r for r in _read_csv(out / "table3.csv")}
    values = {}
    for variant in ("base", "ctnocvr"):
        values[variant] = [_auc_cvr(out / "table3" / "mmoe" / variant / f"seed{s}") for s in (0, 1)]
    assert float(row["Base"]["auc_cvr_mean"]) == pytest.approx(np.mean(values["base"]), abs=1e-12)
    assert float(row["+CTnoCVR"]["auc_cvr_std"]) == pytest.approx(
        np.std(values["ctnocvr"], ddof=1), abs=1e-12
    )
    assert float(row["+CTnoCVR"]["p_paired_t"]) == pytest.approx(
        paired_t_test(values["base"], values["ctnocvr"])[2], abs=1e-12
    )
    # the metrics.json CVR AUC is the AUC of the saved predictions on clicked rows
    run_dir = out / "table3" / "mmoe" / "ctnocvr" / "seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    preds = pq.read_table(run_dir / "predictions" / f"{metrics['split']}.parquet").to_pydict()
    click = np.array(preds["click"]).astype(bool)
    assert metrics["metrics"]["auc_cvr"] == pytest.approx(
        roc_auc(np.array(preds["conversion"])[click], np.array(preds["p_cvr"])[click]), abs=1e-9
    )
    assert 0.5 < float(row["Base"]["oracle_auc_cvr_mean"]) <= 1.0

    assert _ctnocvr(["experiment", "sweep", "--config", str(cfg_path)]) == 0
    for r in _read_csv(out / "sweep.csv"):
        runs = out / "sweep" / "model.score_weight" / "mmoe" / f"{float(r['value']):g}"
        assert float(r["auc_cvr_mean"]) == pytest.approx(
            np.mean([_auc_cvr(runs / f"seed{s}") for s in (0, 1)]), abs=1e-12
        )
    assert (out / "sweep_model.score_weight.png").is_file()

    assert _ctnocvr(["report", "ranking", "--config", str(cfg_path)]) == 0
    summary = json.loads((out / "ranking" / "ranking_summary.json").read_text())
    request = np.array(preds["request_id"])
    _, sizes = np.unique(request, return_counts=True)
    assert summary["before"]["exposures"] == summary["after"]["exposures"] == int(np.minimum(sizes, 2).sum())
    assert summary["requests"] == sizes.size
    assert (out / "ranking" / "ranking_fig2.png").is_file()
