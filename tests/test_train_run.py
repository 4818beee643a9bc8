"""In-process (one rank, gloo) training runs: resume equivalence, crash-safe checkpoints,
non-finite loss, enforced plans, N-to-1 loading. The multi-process runs are in
test_train_distributed.py."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from ctnocvr_rec.config import load_config
from ctnocvr_rec.train import checkpoint as ckpt
from ctnocvr_rec.train.api import evaluate_checkpoint, run_in_process
from ctnocvr_rec.train.loop import NonFiniteLossError
from ctnocvr_rec.train.setup import build_unsharded_model
from ctnocvr_rec.train.testing import write_tiny_prepared

#: tables forced onto the fused (table/column-wise) kernels so their shards, fused optimiser state and
#: resharding on load are exercised; the planner would make every tiny table data-parallel on 1 rank
CONSTRAINTS = "plan.constraints={t_205: {sharding_types: [table_wise]}, t_101: {sharding_types: [column_wise]}}"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_tiny_prepared(tmp_path_factory.mktemp("prepared"), {"train": 2000, "valid": 300, "test": 701})


def make_cfg(prepared, run_dir, *extra: str):
    return load_config(None, [
        f"data.prepared_dir={prepared}", f"train.run_dir={run_dir}", "data.batch_size=200",
        "data.eval_batch_size=256", "train.epochs=2", "train.checkpoint_every_steps=4",
        "train.keep_checkpoints=3", "train.log_every_steps=5", "train.progress_bar=false",
        "model.embedding_dim=6", "model.num_experts=2", "model.expert_hidden=[16]",
        "model.tower_hidden=[16]", "train.optim.dense_lr=0.01", "train.optim.warmup_steps=3",
        "train.optim.decay=cosine", "train.eval_every_steps=6", "eval.periodic_max_batches=1",
        "train.device=cpu", CONSTRAINTS, *extra,
    ])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a
    )


def test_interrupted_run_resumes_to_identical_metrics(prepared, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    reference = run_in_process(make_cfg(prepared, tmp_path / "a"))
    assert reference["steps"] == 20  # 2 epochs x 2000 rows / 200
    assert reference["metrics"]["auc_ctr"] > 0.65  # it learns the planted click signal

    # interruption 1: a crash while writing the step-8 checkpoint leaves step-4 as the newest
    monkeypatch.setenv("CTNOCVR_FAULT_IN_SAVE_AT_STEP", "8")
    with pytest.raises(RuntimeError, match="injected fault while saving"):
        run_in_process(make_cfg(prepared, tmp_path / "b"))
    monkeypatch.delenv("CTNOCVR_FAULT_IN_SAVE_AT_STEP")
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "b")] == [4]
    assert (tmp_path / "b" / "checkpoints" / ".step-8.tmp").is_dir()

    # interruption 2: the resumed run dies after step 13 (mid second epoch)
    monkeypatch.setenv("CTNOCVR_FAULT_AT_STEP", "13")
    with pytest.raises(RuntimeError, match="injected fault after step 13"):
        run_in_process(make_cfg(prepared, tmp_path / "b"), resume=True)
    monkeypatch.delenv("CTNOCVR_FAULT_AT_STEP")
    assert ckpt.latest_checkpoint(tmp_path / "b").step == 12

    resumed = run_in_process(make_cfg(prepared, tmp_path / "b"), resume=True)
    assert resumed["steps"] == 20
    assert _same(resumed["metrics"], reference["metrics"]), (resumed["metrics"], reference["metrics"])
    assert not list((tmp_path / "b" / "checkpoints").glob(".step-*.tmp"))  # cleaned by the next save
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert {"train", "eval", "final"} <= {e["kind"] for e in log}
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["config"]["train"]["run_dir"] == str(tmp_path / "b") and saved["samples_per_s"] > 0
    assert (tmp_path / "b" / "config.yaml").is_file() and (tmp_path / "b" / "plan.json").is_file()

    # the last checkpoint loads into an unsharded model in this process and gives the same metrics
    again = evaluate_checkpoint(tmp_path / "b", split="test", overrides=["train.device=cpu"])
    for key in ("auc_ctr", "auc_cvr", "auc_ctcvr", "auc_ctnocvr", "gauc_ctr"):
        assert abs(again["metrics"][key] - reference["metrics"][key]) < 1e-6


def test_non_finite_loss_names_step_and_term_and_keeps_last_checkpoint(prepared, tmp_path):
    torch.set_num_threads(1)
    cfg = make_cfg(prepared, tmp_path / "nan", "train.optim.dense=sgd", "train.optim.dense_lr=1e18",
                   "train.optim.warmup_steps=0", "train.checkpoint_every_steps=1", "train.eval_every_steps=0")
    with pytest.raises(NonFiniteLossError) as info:
        run_in_process(cfg)
    message = str(info.value)
    step = int(re.search(r"non-finite loss at step (\d+)", message).group(1))
    assert re.search(r"loss_(ctr|cvr|ctnocvr|score)=(nan|inf)", message)
    last = ckpt.latest_checkpoint(tmp_path / "nan")
    assert last is not None and last.step == step - 1 and str(last.path) in message
    model = build_unsharded_model(cfg, torch.device("cpu"))
    ckpt.load_model_weights(last.path, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_enforced_plan_for_another_world_size_is_refused(prepared, tmp_path):
    torch.set_num_threads(1)
    cfg = make_cfg(prepared, tmp_path / "p", "train.steps=2", "train.epochs=1", "train.eval_every_steps=0")
    run_in_process(cfg)
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    plan["meta"]["world_size"] = 4
    wrong = tmp_path / "plan_ws4.json"
    wrong.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="world size 4"):
        run_in_process(make_cfg(prepared, tmp_path / "q", "train.steps=2"), plan_file=str(wrong))
    # the run's own plan is accepted and reproduces the same sharding
    run_in_process(make_cfg(prepared, tmp_path / "r", "train.steps=2", "train.eval_every_steps=0"),
                   plan_file=str(tmp_path / "p" / "plan.json"))
    assert json.loads((tmp_path / "r" / "plan.json").read_text())["modules"] == plan["modules"]


def test_trainer_pipelines_the_sharded_embeddings(prepared, tmp_path, capfd):
    """The trainer's model must be traceable by TrainPipelineSparseDist: the sharded EBC's input
    distribution is pipelined, not silently run inline."""
    torch.set_num_threads(1)
    run_in_process(make_cfg(prepared, tmp_path / "p", "train.steps=3", "train.eval_every_steps=0"))
    err = capfd.readouterr().err
    assert "did not pipeline" not in err
    assert "Sharded modules were not pipelined" not in err
