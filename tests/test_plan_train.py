"""A plan saved by `ctnocvr plan --save` is enforced by a real 2-rank `ctnocvr train --plan` run, and a
plan for another world size is refused (integration of ctnocvr_rec/plan with ctnocvr_rec/train)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctnocvr_rec.config import RunConfig, load_config
from ctnocvr_rec.data.prepared import PreparedSet
from ctnocvr_rec.plan import api, saved


def tiny_config(tmp_path: Path, run_name: str) -> RunConfig:
    from ctnocvr_rec.train.testing import write_tiny_prepared

    prepared = tmp_path / "prepared"
    if not PreparedSet.exists(prepared):
        write_tiny_prepared(prepared, splits={"train": 512, "valid": 128, "test": 128}, rows_per_file=256)
    return load_config(
        "mmoe",  # the packaged run config
        [
            f"data.prepared_dir={prepared}",
            "data.batch_size=64",
            "data.eval_batch_size=128",
            "train.steps=3",
            "train.device=cpu",
            "train.checkpoint_every_steps=0",
            "train.progress_bar=false",
            f"train.run_dir={tmp_path / run_name}",
            "eval.gauc=false",
        ],
    )


def placement(tree: dict) -> dict[str, tuple[str, str, list[int]]]:
    return {
        table: (entry["sharding_type"], entry["compute_kernel"], entry["ranks"])
        for params in tree["modules"].values()
        for table, entry in params.items()
    }


@pytest.mark.slow
def test_saved_two_rank_cpu_plan_is_enforced_by_training(tmp_path: Path) -> None:
    from ctnocvr_rec.train.api import train_and_evaluate

    cfg = tiny_config(tmp_path, "run")
    # pin tables to placements the planner would not choose for such small tables on its own
    forced = {"t_101": {"sharding_types": ["table_wise"]}, "t_205": {"sharding_types": ["table_wise"]}}
    cluster = api.Cluster(world_size=2, device="cpu", batch_size=cfg.data.batch_size)
    report = api.what_if_plan(cfg, cluster, extra_constraints=forced)
    saved_path = tmp_path / "plan.json"
    saved.plan_to_json(report.plan, report.meta, path=saved_path)
    wanted = placement(json.loads(saved_path.read_text()))
    assert wanted["t_101"][0] == "table_wise" and wanted["t_205"][0] == "table_wise"

    metrics = train_and_evaluate(cfg, nproc=2, plan_file=str(saved_path))
    assert metrics["steps"] == 3
    used = placement(json.loads((tmp_path / "run" / "plan.json").read_text()))
    assert used == wanted


@pytest.mark.slow
def test_plan_for_another_world_size_is_refused(tmp_path: Path) -> None:
    from ctnocvr_rec.train.api import train_and_evaluate

    cfg = tiny_config(tmp_path, "refused")
    report = api.what_if_plan(cfg, api.Cluster(world_size=2, device="cpu", batch_size=64))
    saved_path = tmp_path / "plan2.json"
    saved.plan_to_json(report.plan, report.meta, path=saved_path)
    with pytest.raises(saved.PlanCompatibilityError, match="world size 2, but this run has 1 ranks"):
        train_and_evaluate(cfg, nproc=1, plan_file=str(saved_path))
