"""Two CPU ranks (gloo): a TorchX job that trains, evaluates and checkpoints; its checkpoint loaded on
one rank; and SIGKILL of a rank under ``torchrun --max-restarts 1`` resuming to the same metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from ctnocvr_rec.train import checkpoint as ckpt
from ctnocvr_rec.train.runlock import read_lock_record
from ctnocvr_rec.train.testing import write_tiny_prepared

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    # 701 test rows over 2 ranks with batch 128: ranks get 351 / 350 rows -> 3 batches each, the
    # last ones short; valid has 301 rows -> 2 vs 2 batches of unequal size. The user fields are
    # stored per request (prepare's default layout), so the 2-rank runs, the SIGKILL resume and
    # the 1-rank load below also cover the request tables memory-mapped by every rank and worker.
    return write_tiny_prepared(tmp_path_factory.mktemp("prepared"), {"train": 3000, "valid": 301, "test": 701},
                               per_request=True)


def write_config(path: Path, prepared: Path, run_dir: Path) -> Path:
    cfg = {
        "data": {"prepared_dir": str(prepared), "batch_size": 150, "eval_batch_size": 128},
        "model": {"arch": "mmoe", "embedding_dim": 6, "num_experts": 2, "expert_hidden": [16],
                  "tower_hidden": [16]},
        "train": {"epochs": 2, "checkpoint_every_steps": 4, "keep_checkpoints": 2, "log_every_steps": 5,
                  "eval_every_steps": 7, "run_dir": str(run_dir), "device": "cpu", "progress_bar": False,
                  "optim": {"dense_lr": 0.01}},
        "eval": {"save_predictions": True},
        # tables on the fused kernels, placed on one rank each: real shards, not only replicas
        "plan": {"constraints": {"t_205": {"sharding_types": ["table_wise"]},
                                 "t_101": {"sharding_types": ["table_wise"]},
                                 "t_206": {"sharding_types": ["column_wise"]}}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update({"OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}{os.pathsep}{out.get('PATH', '')}", **extra})
    return out


def run(cmd: list[str], timeout: int = 240, **env_extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def torchx_run(prepared, tmp_path_factory) -> Path:
    """One uninterrupted 2-rank TorchX job (also the reference of the kill-and-restart test)."""
    tmp_path = tmp_path_factory.mktemp("torchx")
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", prepared, run_dir)
    run([str(VENV_BIN / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'torchx'}",
         "launchers/ctnocvr.py:train", "--config", str(config), "--j", "1x2"])
    return run_dir


def test_torchx_two_ranks_train_evaluate_checkpoint_and_load_on_one_rank(torchx_run):
    run_dir = torchx_run
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 20  # 2 epochs x floor(3000 / (2 x 150))
    metrics = result["metrics"]
    assert metrics["rows"] == 701 and metrics["auc_ctr"] > 0.65
    plan = json.loads((run_dir / "plan.json").read_text())
    ranks = {t: p["ranks"] for t, p in plan["modules"]["sparse_arch.embedding_bag_collection"].items()}
    assert len(ranks["t_205"]) == 1 and len(ranks["t_101"]) == 1
    assert [c.step for c in ckpt.list_checkpoints(run_dir)] == [16, 20]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step-20").glob("rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]
    # both ranks' files are in the checksum manifest (each rank hashed its own) and verify
    newest = ckpt.newest_intact_checkpoint(run_dir)
    assert newest.step == 20 and {"rank-1.pt", "__1_0.distcp", "__0_0.distcp", ".metadata"} <= set(newest.meta["files"])

    # predictions of every row exactly once, and the AUCs equal sklearn's on them
    table = pq.read_table(run_dir / "predictions" / "test.parquet")
    pred = {name: table.column(name).to_numpy() for name in table.column_names}
    assert len(pred["sample_id"]) == 701 and len(np.unique(pred["sample_id"])) == 701
    clicked = pred["click"] == 1
    assert abs(metrics["auc_ctr"] - roc_auc_score(pred["click"], pred["p_ctr"])) < 1e-6
    assert abs(metrics["auc_cvr"] - roc_auc_score(pred["conversion"][clicked], pred["p_cvr"][clicked])) < 1e-6
    assert abs(metrics["auc_ctnocvr"] - roc_auc_score(pred["ctnocvr"], pred["p_ctnocvr"])) < 1e-6
    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["kind"] == "eval"] == [7, 14]

    # the 2-rank checkpoint on one process, unsharded: same predictions up to float noise
    run([sys.executable, "-m", "ctnocvr_rec.cli", "eval", "--run-dir", str(run_dir), "--split", "test",
         "-o", "train.device=cpu"])
    one = json.loads((run_dir / "eval_test.json").read_text())
    assert one["saved_world_size"] == 2 and one["steps"] == 20
    for key in ("auc_ctr", "auc_cvr", "auc_ctcvr", "auc_ctnocvr", "logloss_ctr"):
        assert abs(one["metrics"][key] - metrics[key]) < 1e-5, key


def test_sigkill_of_a_rank_restarts_and_resumes_to_the_same_metrics(prepared, torchx_run, tmp_path):
    straight = torchx_run  # same config, uninterrupted (predictions do not change the training)
    killed = tmp_path / "killed"
    proc = run([sys.executable, "-m", "ctnocvr_rec.cli", "train", "-c",
                str(write_config(tmp_path / "b.yaml", prepared, killed)), "--nproc", "2", "--max-restarts", "1",
                "-o", "eval.save_predictions=false"], CTNOCVR_FAULT_AT_STEP="10")
    assert "SIGKILL" in proc.stderr or "Signals.SIGKILL" in proc.stderr or "exitcode: -9" in proc.stderr
    assert f"resumed from {killed / 'checkpoints' / 'step-8'} (step 8)" in proc.stderr
    # the launcher held the run folder's lock across the restart; the workers borrowed it
    assert read_lock_record(killed)["role"] == "launcher" and "took over the lock" not in proc.stderr
    a = json.loads((straight / "metrics.json").read_text())["metrics"]
    b = json.loads((killed / "metrics.json").read_text())["metrics"]
    for key in ("auc_ctr", "auc_cvr", "auc_ctcvr", "auc_ctnocvr", "gauc_ctr", "logloss_ctr", "logloss_cvr"):
        assert abs(a[key] - b[key]) < 1e-6, (key, a[key], b[key])
    assert not np.isnan(a["auc_ctr"])


def test_non_finite_loss_under_nproc_exits_3_and_a_restart_does_not_train_again(prepared, tmp_path):
    """A diverged model is not an infrastructure failure: exit 3 (not torchrun's 1), and the attempt
    torchrun restarts (--max-restarts 1) stops at once on ``diverged.json`` instead of training again."""
    run_dir = tmp_path / "nan"
    cmd = [sys.executable, "-m", "ctnocvr_rec.cli", "train", "-c", str(write_config(tmp_path / "n.yaml", prepared, run_dir)),
           "--nproc", "2", "--max-restarts", "1",
           "-o", "train.optim.dense=sgd", "train.optim.dense_lr=1e18", "train.eval_every_steps=0",
           "train.checkpoint_every_steps=1", "eval.save_predictions=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 3, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    found = re.match(r"ctnocvr train: error: non-finite loss at step (\d+) on rank \d: loss(_\w+)?=(nan|inf)", last)
    assert found, last
    step = int(found.group(1))
    assert proc.stderr.count("[train] 2 rank(s)") == 1  # the model was built and trained in attempt 0 only
    assert proc.stderr.count("this restarted attempt does not train again") == 2  # both ranks of attempt 1
    assert "resumed from" not in proc.stderr
    record = json.loads((run_dir / "diverged.json").read_text())
    assert record["step"] == step and record["attempt"] == 0
    assert [c.step for c in ckpt.list_checkpoints(run_dir)][-1] == step - 1  # nothing saved after it
