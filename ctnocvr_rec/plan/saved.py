"""Saved sharding plans: JSON (de)serialisation, the ``meta`` block describing what a plan was made
for, and the compatibility checks behind ``ctnocvr train --plan plan.json``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec.distributed.planner import Topology
from torchrec.distributed.types import (
    EnumerableShardingSpec,
    ParameterSharding,
    ShardingPlan,
    ShardMetadata,
)

from ctnocvr_rec.config import OptimConfig, PlanConfig
from ctnocvr_rec.plan.sharding import GIB, PLAN_FORMAT_VERSION, table_shapes


class PlanCompatibilityError(ValueError):
    """A saved plan that does not fit the model/world it is being applied to."""


# ---------------------------------------------------------------------------------------------
# Saved plans
# ---------------------------------------------------------------------------------------------


def _shard_to_dict(shard: ShardMetadata) -> dict[str, Any]:
    return {
        "offsets": list(shard.shard_offsets),
        "sizes": list(shard.shard_sizes),
        "placement": str(shard.placement) if shard.placement is not None else None,
    }


def plan_to_dict(plan: ShardingPlan, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """JSON-able form of ``plan``: ``{"format", "meta", "modules": {fqn: {param: sharding}}}``."""
    modules: dict[str, Any] = {}
    for module_path, module_plan in plan.plan.items():
        params: dict[str, Any] = {}
        for param_name, ps in module_plan.items():  # type: ignore[union-attr]
            spec = ps.sharding_spec
            params[param_name] = {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks) if ps.ranks is not None else None,
                "shards": [_shard_to_dict(s) for s in spec.shards]
                if isinstance(spec, EnumerableShardingSpec)
                else None,
            }
        modules[module_path] = params
    return {"format": PLAN_FORMAT_VERSION, "meta": dict(meta or {}), "modules": modules}


def plan_to_json(
    plan: ShardingPlan, meta: Mapping[str, Any] | None = None, path: str | Path | None = None
) -> str:
    """Serialise ``plan`` (+ ``meta``: world_size, tables, ...) to JSON; also write ``path`` if given."""
    text = json.dumps(plan_to_dict(plan, meta), indent=2, sort_keys=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n", encoding="utf-8")
    return text


def _shard_from_dict(entry: Mapping[str, Any], where: str) -> ShardMetadata:
    try:
        return ShardMetadata(
            shard_offsets=[int(v) for v in entry["offsets"]],
            shard_sizes=[int(v) for v in entry["sizes"]],
            placement=entry.get("placement"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad shard entry {entry!r} ({e})") from None


def plan_from_dict(tree: Mapping[str, Any], source: str = "<plan>") -> tuple[ShardingPlan, dict[str, Any]]:
    """Inverse of :func:`plan_to_dict`; returns ``(ShardingPlan, meta)``."""
    # local import: the module-plan class lives with the EBC sharder
    from torchrec.distributed.types import EmbeddingModuleShardingPlan

    if not isinstance(tree, Mapping) or "modules" not in tree:
        raise ValueError(f"{source}: not a ctnocvr plan file (no 'modules' key)")
    if tree.get("format") != PLAN_FORMAT_VERSION:
        raise ValueError(
            f"{source}: plan format {tree.get('format')!r} is not the supported {PLAN_FORMAT_VERSION}"
        )
    plan: dict[str, Any] = {}
    for module_path, params in tree["modules"].items():
        module_plan = EmbeddingModuleShardingPlan()
        for param_name, entry in params.items():
            where = f"{source}: modules.{module_path}.{param_name}"
            for key in ("sharding_type", "compute_kernel"):
                if key not in entry:
                    raise ValueError(f"{where}: missing {key!r}")
            shards = entry.get("shards")
            spec = (
                EnumerableShardingSpec(
                    [_shard_from_dict(s, f"{where}.shards[{i}]") for i, s in enumerate(shards)]
                )
                if shards is not None
                else None
            )
            module_plan[param_name] = ParameterSharding(
                sharding_type=str(entry["sharding_type"]),
                compute_kernel=str(entry["compute_kernel"]),
                ranks=[int(r) for r in entry["ranks"]] if entry.get("ranks") is not None else None,
                sharding_spec=spec,
            )
        plan[module_path] = module_plan
    return ShardingPlan(plan), dict(tree.get("meta") or {})


def plan_from_json(source: str | Path) -> tuple[ShardingPlan, dict[str, Any]]:
    """Load a plan written by :func:`plan_to_json` (a path, or the JSON text itself)."""
    text: str
    name: str
    if isinstance(source, Path) or not str(source).lstrip().startswith("{"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"plan file {path} does not exist")
        text, name = path.read_text(encoding="utf-8"), str(path)
    else:
        text, name = str(source), "<plan json>"
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return plan_from_dict(tree, name)


def plan_table_names(plan: ShardingPlan) -> list[str]:
    """Table names in ``plan`` (over all modules), sorted."""
    return sorted({name for module_plan in plan.plan.values() for name in module_plan})  # type: ignore[union-attr]


def check_plan_compatible(
    plan_meta: Mapping[str, Any],
    world_size: int,
    table_names: Iterable[str],
    plan: ShardingPlan | None = None,
    device_type: str | None = None,
) -> None:
    """Refuse a saved plan made for another world size, table set (or device) with a clear message."""
    source = plan_meta.get("source", "the plan")
    planned_world = plan_meta.get("world_size")
    if planned_world is not None and int(planned_world) != int(world_size):
        raise PlanCompatibilityError(
            f"{source} was made for world size {planned_world}, but this run has {world_size} ranks; "
            f"make a new plan with `ctnocvr plan --world-size {world_size} --save ...`"
        )
    wanted = sorted(set(table_names))
    planned = sorted(
        set(plan_meta.get("tables") or {}) or (plan_table_names(plan) if plan is not None else [])
    )
    if planned and planned != wanted:
        missing = sorted(set(wanted) - set(planned))
        extra = sorted(set(planned) - set(wanted))
        raise PlanCompatibilityError(
            f"{source} was made for another table set: tables of this model not in the plan {missing}, "
            f"tables in the plan not in this model {extra}"
        )
    planned_device = plan_meta.get("device")
    if device_type is not None and planned_device is not None and planned_device != device_type:
        raise PlanCompatibilityError(
            f"{source} was made for device {planned_device!r}, but this run is on {device_type!r}"
        )
    if plan is not None:
        for module_plan in plan.plan.values():
            for table, ps in module_plan.items():  # type: ignore[union-attr]
                for rank in ps.ranks or []:
                    if not 0 <= rank < world_size:
                        raise PlanCompatibilityError(
                            f"{source}: table {table} is placed on rank {rank}, outside 0..{world_size - 1}"
                        )


def check_plan_shapes(plan_meta: Mapping[str, Any], module: nn.Module) -> None:
    """Refuse a plan whose recorded table shapes differ from ``module``'s (e.g. another vocabulary)."""
    recorded = plan_meta.get("tables") or {}
    actual = table_shapes(module)
    diffs = [
        f"{t}: plan {list(recorded[t])} vs model {actual[t]}"
        for t in sorted(set(recorded) & set(actual))
        if [int(v) for v in recorded[t]] != actual[t]
    ]
    if diffs:
        raise PlanCompatibilityError(
            f"{plan_meta.get('source', 'the plan')} was made for other table sizes "
            f"([num_embeddings, dim]): {'; '.join(diffs)}"
        )


def plan_meta(
    module: nn.Module,
    topology: Topology,
    batch_size: int,
    plan_cfg: PlanConfig,
    optim: OptimConfig | None = None,
) -> dict[str, Any]:
    """The ``meta`` block saved with a plan: what it was made for."""
    return {
        "world_size": topology.world_size,
        "local_world_size": topology.local_world_size,
        "device": topology.compute_device,
        "hbm_gb_per_rank": topology.devices[0].storage.hbm / GIB,
        "ddr_gb_per_rank": topology.devices[0].storage.ddr / GIB,
        "batch_size_per_rank": batch_size,
        "storage_reservation": plan_cfg.storage_reservation,
        "storage_reservation_percentage": plan_cfg.storage_reservation_percentage,
        "sparse_optimizer": optim.sparse if optim is not None else None,
        "tables": table_shapes(module),
        "torch": torch.__version__,
    }
