"""End to end per community CSV format: prepare -> stats -> plan -> train a few steps -> eval (CLI).

Dense features: the rechub set carries 8 ``__d`` columns; the trained model must have taken them in
through its dense arch (8 inputs) and stayed finite; the AITM set has none (no dense arch).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_data_formats_csv import AITM_HEADER, RECHUB_HEADER, make_rows, write_csv

from ctnocvr_rec.cli import main as cli_main
from ctnocvr_rec.data.prepared import PreparedSet


@pytest.mark.slow
@pytest.mark.parametrize("fmt,header", [("aliccp-rechub-csv", RECHUB_HEADER), ("aliccp-aitm-csv", AITM_HEADER)])
def test_prepare_train_eval(tmp_path, monkeypatch, capfd, fmt, header):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "train.csv", header, make_rows(900, 11, header))
    write_csv(tmp_path / "test.csv", header, make_rows(300, 12, header))
    run = [
        ["data", "prepare", "--format", fmt, "--train", "train.csv", "--test", "test.csv", "--out", "prepared",
         "--no-progress", "--rows-per-shard", "400"],
        ["data", "stats", "--prepared", "prepared", "--split", "train", "test"],
        ["plan", "-c", "mmoe", "--prepared", "prepared", "--world-size", "2", "--device", "cpu"],
        ["train", "-c", "mmoe", "-o", "data.prepared_dir=prepared", "train.run_dir=run", "train.steps=4",
         "train.device=cpu", "train.progress_bar=false", "train.checkpoint_every_steps=0",
         "data.batch_size=64", "data.eval_batch_size=256"],
        ["eval", "--run-dir", "run", "--split", "test", "--json"],
    ]
    for argv in run:
        assert cli_main(argv) == 0, argv
    out = capfd.readouterr().out
    assert "Table 2" in out and "Imbalance across ranks" in out  # stats and the plan from the manifest
    prepared = PreparedSet.open("prepared")
    assert prepared.rows("test") == 300 and prepared.rows("train") + prepared.rows("valid") == 900
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    evaluated = json.loads(out[out.rindex("\n{") + 1:])
    assert trained["steps"] == 4
    assert evaluated["metrics"]["auc_ctr"] == trained["metrics"]["auc_ctr"]  # same checkpoint, same split
    assert 0.0 < evaluated["metrics"]["auc_ctr"] < 1.0
    from ctnocvr_rec.modules.dense_arch import DenseFeatureArch
    from ctnocvr_rec.train.api import open_run_checkpoint
    from ctnocvr_rec.train.setup import build_unsharded_model

    cfg, _ = open_run_checkpoint(tmp_path / "run")
    archs = [m for m in build_unsharded_model(cfg, torch.device("cpu")).modules() if isinstance(m, DenseFeatureArch)]
    assert [a.in_features for a in archs] == ([8] if fmt == "aliccp-rechub-csv" else [])
    assert len(prepared.schema.dense) == (8 if fmt == "aliccp-rechub-csv" else 0)
