"""A checkpoint saved on 2 gloo ranks (real table-wise and column-wise shards) exports and scores like
the sharded model itself, and exactly like the same weights saved as a 1-rank checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

from ctnocvr_rec.serving import Scorer
from ctnocvr_rec.serving.export import export_run, load_run_model
from ctnocvr_rec.serving.predict import predict
from ctnocvr_rec.train.testing import write_tiny_prepared

REPO = Path(__file__).resolve().parents[1]
PROBS = ("p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr")
pytestmark = pytest.mark.slow


def read_sorted(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    cols = {n: table.column(n).to_numpy() for n in table.column_names}
    order = np.argsort(cols["sample_id"])
    return {k: v[order] for k, v in cols.items()}


def test_two_rank_checkpoint_exports_and_scores_like_the_sharded_model_and_a_one_rank_copy(tmp_path):
    prepared = write_tiny_prepared(tmp_path / "prepared", {"train": 1200, "valid": 100, "test": 301})
    run2 = tmp_path / "run2"
    cfg = {
        "data": {"prepared_dir": str(prepared), "batch_size": 150, "eval_batch_size": 128},
        "model": {"arch": "cgc", "embedding_dim": 6, "num_task_experts": 1, "num_shared_experts": 1,
                  "expert_hidden": [16], "tower_hidden": [16]},
        "train": {"epochs": 1, "checkpoint_every_steps": 2, "eval_every_steps": 1000, "run_dir": str(run2),
                  "device": "cpu", "progress_bar": False},
        "eval": {"save_predictions": True},
        "plan": {"constraints": {"t_205": {"sharding_types": ["table_wise"]},
                                 "t_101": {"sharding_types": ["table_wise"]},
                                 "t_206": {"sharding_types": ["column_wise"]}}},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "ctnocvr_rec.cli", "train", "-c", str(tmp_path / "cfg.yaml"),
                           "--nproc", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    plan = json.loads((run2 / "plan.json").read_text())
    tables = plan["modules"]["sparse_arch.embedding_bag_collection"]
    placed = {t: p["ranks"] for t, p in tables.items() if p["sharding_type"] != "data_parallel"}
    # real shards: whole tables on one rank each, and both ranks hold some
    assert len(placed["t_205"]) == 1 and {r for ranks in placed.values() for r in ranks} == {0, 1}

    # the same weights as a 1-rank checkpoint (DCP in one process, no process group)
    torch.set_num_threads(1)
    model, info = load_run_model(run2)
    assert info["saved_world_size"] == 2 and info["step"] == 4
    run1 = tmp_path / "run1"
    step_dir = run1 / "checkpoints" / "step-4"
    step_dir.mkdir(parents=True)
    shutil.copyfile(run2 / "config.yaml", run1 / "config.yaml")
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(step_dir))
    torch.save({}, step_dir / "rank-0.pt")  # a complete layout (no checksums: loads as "unverified")
    (step_dir / "meta.json").write_text(json.dumps({"step": 4, "world_size": 1}))

    sharded = read_sorted(run2 / "predictions" / "test.parquet")  # the 2-rank sharded model's own scores
    scored = {}
    for name, run in (("2-rank", run2), ("1-rank", run1)):
        export_run(run, tmp_path / f"model-{name}", int8=False, log=lambda _: None)
        contract = json.loads((tmp_path / f"model-{name}" / "serving.json").read_text())
        assert contract["run"]["saved_world_size"] == (2 if name == "2-rank" else 1)
        out = tmp_path / f"{name}.parquet"
        scorer = Scorer.load(tmp_path / f"model-{name}")
        predict(tmp_path / f"model-{name}", out, prepared=prepared, progress=False, scorer=scorer)
        scored[name] = read_sorted(out)
        assert np.array_equal(scored[name]["sample_id"], sharded["sample_id"])
        for p in PROBS:
            assert np.abs(scored[name][p] - sharded[p]).max() <= 1e-5, (name, p)
    for p in PROBS:
        assert np.array_equal(scored["2-rank"][p], scored["1-rank"][p]), p
