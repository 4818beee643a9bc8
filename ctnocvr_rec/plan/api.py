"""Python API of the planning tool (used by ``ctnocvr plan``, the tests and the trainer).

* :func:`what_if_plan` – plan the model's tables for any topology without a process group or GPU;
* :func:`parse_constraint` – ``t_101=table_wise,column_wise[:fused]`` -> a ``PlanConfig.constraints`` entry;
* :func:`load_enforced_plan` – ``ctnocvr train --plan plan.json``: load a saved plan and refuse it,
  with a clear message, when it was made for another world size, device, table set, table sizes or
  assignment of tables to embedding modules (the unweighted and the weighted EBC).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torchrec.distributed.types import ShardingPlan

from ctnocvr_rec.config import RunConfig
from ctnocvr_rec.data.schema import DEFAULT_SCHEMA, load_schema
from ctnocvr_rec.plan import saved, sharding, tables
from ctnocvr_rec.plan.report import PlanReport, run_plan


@dataclass
class Cluster:
    """The cluster to plan for; capacities per rank in GiB (0 = TorchRec's defaults)."""

    world_size: int
    local_world_size: int | None = None
    device: str = "cuda"
    hbm_gb: float = 0.0
    ddr_gb: float = 0.0
    #: per-rank batch (TorchRec's planner sizes inputs/outputs per rank)
    batch_size: int = 4096


def parse_constraint(text: str) -> tuple[str, dict[str, Any]]:
    """``TABLE=TYPE[,TYPE...][:KERNEL[,KERNEL...]]`` -> ``(table, {"sharding_types": [...], ...})``."""
    if "=" not in text:
        raise ValueError(
            f"--constraint {text!r}: expected TABLE=SHARDING_TYPE[,...][:KERNEL[,...]], e.g. t_101=table_wise"
        )
    table, rest = (part.strip() for part in text.split("=", 1))
    types, _, kernels = rest.partition(":")
    entry: dict[str, Any] = {}
    if types.strip():
        entry["sharding_types"] = [t.strip() for t in types.split(",") if t.strip()]
    if kernels.strip():
        entry["compute_kernels"] = [k.strip() for k in kernels.split(",") if k.strip()]
    if not table or not entry:
        raise ValueError(
            f"--constraint {text!r}: needs a table name and at least one sharding type or kernel"
        )
    return table, entry


def what_if_plan(
    cfg: RunConfig,
    cluster: Cluster,
    prepared_dir: str | Path | None = None,
    preset: str | None = None,
    extra_constraints: dict[str, dict[str, Any]] | None = None,
) -> PlanReport:
    """Build the model's tables on ``meta`` and plan them for ``cluster`` with the trainer's planner.

    Table sizes: ``preset`` if given, else ``prepared_dir`` (default ``cfg.data.prepared_dir``).
    Schema: the prepared set's (or ``cfg.data.schema``'s selection of it); with a preset,
    ``cfg.data.schema`` or the packaged default. Raises ``PlanInfeasibleError`` (a ValueError) with
    figures when nothing fits.
    """
    if preset:
        schema = load_schema(cfg.data.schema or DEFAULT_SCHEMA)
        sizes = tables.resolve_num_embeddings(schema, preset=preset)
    else:
        prepared = tables.open_prepared(prepared_dir or cfg.data.prepared_dir, cfg.data.schema)
        schema = prepared.schema
        sizes = tables.resolve_num_embeddings(schema, prepared_dir=prepared)
    model, kind = tables.build_plannable_model(cfg.model, schema, sizes.num_embeddings)
    shapes = sharding.table_shapes(model)

    plan_cfg = copy.deepcopy(cfg.plan)
    for table, entry in (extra_constraints or {}).items():
        plan_cfg.constraints[table] = {**plan_cfg.constraints.get(table, {}), **entry}
    default_pooling = pooling_by_table(schema, sizes.pooling_factors)

    topology = sharding.make_topology(
        cluster.world_size,
        cluster.local_world_size,
        cluster.device,
        hbm_gb=cluster.hbm_gb or plan_cfg.hbm_gb,
        ddr_gb=cluster.ddr_gb or plan_cfg.ddr_gb,
    )
    sharders = sharding.make_sharders(
        cfg.train.optim, cluster.device, plan_cfg, ids=sharding.id_dtype(sizes.num_embeddings.values())
    )
    constraints = sharding.make_constraints(
        plan_cfg, cluster.device, table_names=shapes, default_pooling_factors=default_pooling
    )
    planner = sharding.build_planner(
        topology, cluster.batch_size, plan_cfg, constraints=constraints, module=model
    )
    meta = saved.plan_meta(model, topology, cluster.batch_size, plan_cfg, cfg.train.optim)
    meta.update({"sizes_source": sizes.source, "module_kind": kind})
    return run_plan(planner, topology, model, sharders, meta)


def pooling_by_table(schema: Any, pooling: dict[str, float]) -> dict[str, list[float]]:
    """Field pooling factors -> per table, one factor per feature (schema order)."""
    out: dict[str, list[float]] = {}
    if not pooling:
        return out
    for spec in schema:
        out.setdefault(spec.table_name, []).append(float(pooling.get(spec.name, 1.0)))
    return out


def load_enforced_plan(path: str | Path, model: nn.Module, world_size: int, device_type: str) -> ShardingPlan:
    """The saved plan at ``path`` for ``model`` on ``world_size`` ranks of ``device_type``.

    Raises ``PlanCompatibilityError`` (a ValueError) naming what differs: world size, device, table set
    or table shapes. ``model`` may be on ``meta``.
    """
    plan, meta = saved.plan_from_json(path)
    meta.setdefault("source", str(path))
    shapes = sharding.table_shapes(model)
    saved.check_plan_compatible(meta, world_size, shapes, plan=plan, device_type=device_type)
    saved.check_plan_shapes(meta, model)
    known_paths = {name for name, _ in model.named_modules()}
    unknown = sorted(set(plan.plan) - known_paths)
    if unknown:
        raise saved.PlanCompatibilityError(
            f"{path}: plan shards module(s) {unknown} that this model does not have "
            "(was it made for another model structure?)"
        )
    check_plan_modules(plan, model, str(path))
    return plan


def check_plan_modules(plan: ShardingPlan, model: nn.Module, source: str) -> None:
    """Refuse a plan that files a table under another EBC than the model's (e.g. a plan saved before
    the unweighted/weighted EBC split, with every table under ``sparse_arch.embedding_bag_collection``):
    DMP would otherwise leave tables unplanned or look for tables a module does not have."""
    wanted = {fqn: sorted(cfg.name for cfg in ebc.embedding_bag_configs())
              for fqn, ebc in tables.find_ebcs(model).items()}
    planned = {fqn: sorted(module_plan) for fqn, module_plan in plan.plan.items()}  # type: ignore[arg-type]
    if planned != wanted:
        diffs = [
            f"{fqn}: plan {planned.get(fqn, [])} vs model {wanted.get(fqn, [])}"
            for fqn in sorted(set(planned) | set(wanted))
            if planned.get(fqn, []) != wanted.get(fqn, [])
        ]
        raise saved.PlanCompatibilityError(
            f"{source} assigns tables to other embedding modules than this model has ({'; '.join(diffs)}); "
            "plans saved before the split into an unweighted and a weighted EBC do not apply: make a new "
            "plan with `ctnocvr plan ... --save`"
        )
