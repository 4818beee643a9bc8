"""Dense features end to end on a prepared set with 8 dense columns (``write_tiny_prepared(num_dense=8)``):
train on 2 gloo ranks (DMP, fused tables, TrainPipelineSparseDist), evaluate the 2-rank checkpoint
unsharded in one process, resume its middle checkpoint on 1 rank (elastic reshard), export and
``predict``, and score raw dense values through the exported transform."""

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
from torch.distributed.checkpoint import FileSystemReader

from ctnocvr_rec.config import load_config
from ctnocvr_rec.data.dataset import ParquetBatchDataset
from ctnocvr_rec.serving import Scorer
from ctnocvr_rec.serving.export import export_run
from ctnocvr_rec.serving.predict import predict
from ctnocvr_rec.train import checkpoint as ckpt
from ctnocvr_rec.train.api import evaluate_checkpoint, run_in_process
from ctnocvr_rec.train.testing import DENSE_NAMES, raw_dense_values, write_tiny_prepared

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
SPLITS = {"train": 1600, "valid": 200, "test": 400}
PROBS = ("p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_tiny_prepared(tmp_path_factory.mktemp("prepared"), SPLITS, rows_per_file=400, num_dense=8)


def write_config(path: Path, prepared: Path, run_dir: Path) -> Path:
    cfg = {
        "data": {"prepared_dir": str(prepared), "batch_size": 100, "eval_batch_size": 128},
        "model": {"arch": "mmoe", "embedding_dim": 6, "num_experts": 2, "expert_hidden": [16],
                  "tower_hidden": [16], "dense_hidden": [16]},
        "train": {"epochs": 1, "checkpoint_every_steps": 4, "keep_checkpoints": 10, "log_every_steps": 4,
                  "eval_every_steps": 0, "run_dir": str(run_dir), "device": "cpu", "progress_bar": False,
                  "optim": {"dense_lr": 0.02}},
        "eval": {"save_predictions": True},
        # real shards (table- and column-wise) next to the data-parallel dense part
        "plan": {"constraints": {"t_205": {"sharding_types": ["table_wise"]},
                                 "t_101": {"sharding_types": ["column_wise"]}}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def two_rank_run(prepared, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("two")
    run_dir = tmp / "run"
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"})
    cmd = [sys.executable, "-m", "ctnocvr_rec.cli", "train", "-c", str(write_config(tmp / "cfg.yaml", prepared, run_dir)),
           "--nproc", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}: rc {proc.returncode}\n{proc.stderr[-6000:]}"
    return run_dir


def dense_keys(checkpoint: Path) -> set[str]:
    meta = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return {k for k in meta if k.startswith("model.dense_arch.")}


def test_two_ranks_train_and_checkpoint_the_dense_arch(two_rank_run):
    result = json.loads((two_rank_run / "metrics.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 8  # 1600 / (2 x 100)
    assert result["metrics"]["rows"] == 400
    assert result["metrics"]["auc_ctr"] > 0.6, result["metrics"]  # the planted dense + sparse click signal
    # the planner places the tables only: the dense arch is data-parallel (replicated, DDP)
    plan = json.loads((two_rank_run / "plan.json").read_text())
    assert not any("dense_arch" in module for module in plan["modules"])
    keys = dense_keys(two_rank_run / "checkpoints" / "step-8")
    assert keys == {"model.dense_arch.mlp._mlp.0._linear.weight", "model.dense_arch.mlp._mlp.0._linear.bias",
                    "model.dense_arch.mlp._mlp.1._linear.weight", "model.dense_arch.mlp._mlp.1._linear.bias"}

    # the 2-rank checkpoint evaluated in one unsharded process: the same metrics
    one = evaluate_checkpoint(two_rank_run, split="test", overrides=["train.device=cpu"])
    assert one["saved_world_size"] == 2
    for key in ("auc_ctr", "auc_cvr", "auc_ctnocvr", "logloss_ctr"):
        assert abs(one["metrics"][key] - result["metrics"][key]) < 1e-5, key


def test_two_rank_checkpoint_resumes_on_one_rank(prepared, two_rank_run, tmp_path, capfd, monkeypatch):
    run_dir = tmp_path / "resumed"
    shutil.copytree(two_rank_run, run_dir, ignore=shutil.ignore_patterns("metrics.json", "predictions"))
    for info in ckpt.list_checkpoints(run_dir):
        if info.step > 4:
            shutil.rmtree(info.path)
    cfg = load_config(two_rank_run / "config.yaml", [f"train.run_dir={run_dir}"])
    torch.set_num_threads(1)
    monkeypatch.setenv("CTNOCVR_DUMP_AFTER_LOAD", str(tmp_path / "dump"))
    resumed = run_in_process(cfg, resume=True)
    assert "resharded resume: world size 2 -> 1" in capfd.readouterr().err
    # the untrained 4 global batches of 2 x 100 rows become 8 batches of 100 on one rank: 4 + 8 steps
    assert resumed["world_size"] == 1 and resumed["steps"] == 12
    reference = json.loads((two_rank_run / "metrics.json").read_text())["metrics"]
    # same rows, other global batches after the resume (docs/train.md): close, not equal
    assert abs(resumed["metrics"]["auc_ctr"] - reference["auc_ctr"]) < 0.03
    # right after the load, the dense arch holds exactly the 2-rank checkpoint's weights
    saved_path = two_rank_run / "checkpoints" / "step-4"
    meta = FileSystemReader(str(saved_path)).read_metadata().state_dict_metadata
    saved = {k: torch.zeros(tuple(meta[k].size)) for k in dense_keys(saved_path)}
    dcp.load(saved, checkpoint_id=str(saved_path), no_dist=True)
    loaded = torch.load(tmp_path / "dump" / "rank-0.pt", weights_only=False)["dense"]
    assert len(loaded) == 4 and {f"model.{k}" for k in loaded} == set(saved)
    for key, value in loaded.items():
        assert torch.equal(value, saved[f"model.{key}"]), key
    assert dense_keys(run_dir / "checkpoints" / "step-12") == dense_keys(saved_path)


def test_export_and_predict_with_dense_inputs(prepared, two_rank_run, tmp_path):
    model_dir = tmp_path / "model"
    contract = export_run(two_rank_run, model_dir, log=lambda _: None)
    assert contract["program_inputs"][-1] == "dense" and len(contract["program_inputs"]) == 6
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert [d["name"] for d in contract["dense_features"]] == list(DENSE_NAMES)
    for d in contract["dense_features"]:
        assert (d["transform"], d["standardize"]) == ("log1p", True)
        assert (d["mean"], d["std"]) == (manifest["dense_stats"][d["name"]]["mean"],
                                         manifest["dense_stats"][d["name"]]["std"])
    assert contract["programs"]["fp32"]["max_abs_diff_vs_ranker"] <= 1e-5
    assert contract["programs"]["int8"]["max_abs_diff_vs_ranker"] < 2e-3

    # predict on the prepared test split reproduces the trainer's own predictions
    out = tmp_path / "pred.parquet"
    summary = predict(model_dir, out, prepared=prepared, split="test", batch_size=64, progress=False)
    assert summary["rows"] == 400
    got = pq.read_table(out).to_pydict()
    trained = pq.read_table(two_rank_run / "predictions" / "test.parquet").to_pydict()
    order_got, order_trained = np.argsort(got["sample_id"]), np.argsort(trained["sample_id"])
    for p in PROBS:
        np.testing.assert_allclose(np.asarray(got[p])[order_got], np.asarray(trained[p])[order_trained],
                                   rtol=0, atol=1e-5, err_msg=p)

    # a prepared set whose dense values were transformed with other stats is refused
    other = tmp_path / "other"
    shutil.copytree(prepared, other)
    changed = json.loads((other / "manifest.json").read_text())
    changed["dense_stats"]["D702"]["std"] *= 2
    (other / "manifest.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="dense feature D702 has stats.*transformed otherwise"):
        predict(model_dir, tmp_path / "other.parquet", prepared=other, split="test", progress=False)

    # raw dense values (as the source data has them) through the exported transform score exactly as
    # the prepared, already transformed ones
    scorer = Scorer.load(model_dir)
    batch = next(iter(ParquetBatchDataset(prepared, "test", 50)))
    raw = raw_dense_values(SPLITS["test"], 0 + 101 * 2, 8)  # the test split's raw values (seed + 101 k)
    rows = (batch.sample_id.numpy() - (SPLITS["train"] + SPLITS["valid"] + 1)).astype(np.int64)
    raw_matrix = np.stack([raw[name][rows] for name in DENSE_NAMES], axis=1)
    from_raw = scorer.score(batch.sparse_features, batch.weighted_features, ids="mapped", dense=raw_matrix,
                            dense_values="raw")
    from_prepared = scorer.score(batch.sparse_features, batch.weighted_features, ids="mapped", dense=batch.dense)
    for p in PROBS:
        torch.testing.assert_close(from_raw[p], from_prepared[p], rtol=0, atol=1e-6)
    # the same rows as a plain dict: {field: id lists, dense name: raw values}
    as_dict: dict[str, list] = {}
    for kjt in (batch.sparse_features, batch.weighted_features):
        for key, jt in kjt.to_dict().items():
            as_dict[key.removeprefix("f_")] = [ids.tolist() for ids in jt.to_dense()]
            if jt.weights_or_none() is not None and scorer.contract.feature(key.removeprefix("f_")).weights_from_input:
                as_dict[key.removeprefix("f_") + "__w"] = [w.tolist() for w in jt.to_dense_weights()]
    as_dict.update({name: raw_matrix[:, k].tolist() for k, name in enumerate(DENSE_NAMES)})
    from_dict = scorer.score(as_dict, ids="mapped", dense_values="raw")
    for p in PROBS:
        torch.testing.assert_close(from_dict[p], from_prepared[p], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"dense inputs: missing \['D853'\]"):
        scorer.score({k: v for k, v in as_dict.items() if k != "D853"}, ids="mapped")
    with pytest.raises(ValueError, match=r"missing dense feature\(s\) \['D109_14'"):
        scorer.score(batch.sparse_features, batch.weighted_features, ids="mapped")
    with pytest.raises(ValueError, match="dense feature 'D508'.*not finite"):
        bad = raw_matrix.copy()
        bad[3, 4] = np.nan
        scorer.score(batch.sparse_features, batch.weighted_features, ids="mapped", dense=bad, dense_values="raw")
