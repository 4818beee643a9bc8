"""Build the sharded ranker: model on ``meta`` → plan (planned collectively or enforced) → DMP.

The planner, topology and sharders come from :mod:`ctnocvr_rec.plan.sharding` (the same functions
``ctnocvr plan`` uses), and the *same* sharder list goes to the planner and to DMP so the fused
optimiser settings reach the kernels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan

from ctnocvr_rec.config import RunConfig
from ctnocvr_rec.data.prepared import PreparedSet
from ctnocvr_rec.data.schema import FieldSchema
from ctnocvr_rec.train.distributed import DistContext, broadcast_from_main
from ctnocvr_rec.train.weight_grads import skip_per_sample_weight_grads

log = logging.getLogger(__name__)


@dataclass
class ShardedModel:
    model: DistributedModelParallel
    plan: ShardingPlan
    plan_json: str
    sharders: list[ModuleSharder[torch.nn.Module]]
    schema: FieldSchema
    num_embeddings: dict[str, int]


def model_inputs(cfg: RunConfig) -> tuple[FieldSchema, dict[str, int]]:
    """Field schema (the manifest's, or ``cfg.data.schema``'s selection of it) and table sizes of the
    prepared set named by ``cfg.data``."""
    prepared = PreparedSet.open(cfg.data.prepared_dir, cfg.data.schema)
    return prepared.schema, prepared.table_sizes()


def build_unsharded_model(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """The plain ranker on ``device`` (evaluation/export of a checkpoint in one process)."""
    from ctnocvr_rec.models import build_model

    schema, num_embeddings = model_inputs(cfg)
    return build_model(cfg.model, schema, num_embeddings, device=device)


def build_sharded_model(cfg: RunConfig, ctx: DistContext, plan_file: str | None = None) -> ShardedModel:
    """Model on meta, planned for the live topology (or ``plan_file`` enforced), wrapped in DMP."""
    from ctnocvr_rec.models import build_model
    from ctnocvr_rec.plan import saved, sharding
    from ctnocvr_rec.plan.api import load_enforced_plan, pooling_by_table

    prepared = PreparedSet.open(cfg.data.prepared_dir, cfg.data.schema)
    schema, num_embeddings = prepared.schema, prepared.table_sizes()
    model = build_model(cfg.model, schema, num_embeddings, device=torch.device("meta"))
    sharders = sharding.make_sharders(
        cfg.train.optim, ctx.device_type, cfg.plan, ids=sharding.id_dtype(num_embeddings.values())
    )
    topology = sharding.make_topology(
        ctx.world_size, ctx.local_world_size, ctx.device_type, cfg.plan.hbm_gb, cfg.plan.ddr_gb
    )
    meta = saved.plan_meta(model, topology, cfg.data.batch_size, cfg.plan, cfg.train.optim)
    meta["source"] = "ctnocvr train"
    if plan_file:
        plan = load_enforced_plan(plan_file, model, ctx.world_size, ctx.device_type)
    else:
        # the train split's ids per row as pooling factors: the planner's cost model balances the
        # tables over ranks by them (with 1 per field it put the heavy histories together); the same
        # figures `ctnocvr plan --prepared` uses, so its plan is the one trained
        pooling = pooling_by_table(schema, prepared.ids_per_row("train"))
        constraints = sharding.make_constraints(
            cfg.plan, ctx.device_type, list(meta["tables"]), default_pooling_factors=pooling
        )
        planner = sharding.build_planner(topology, cfg.data.batch_size, cfg.plan, constraints, module=model)
        if ctx.world_size > 1:
            plan = planner.collective_plan(model, sharders, torch.distributed.group.WORLD)
        else:
            plan = planner.plan(model, sharders)
    # every rank must shard with the identical plan: rank 0's text is the reference
    plan_json = saved.plan_to_json(plan, meta)
    plan_json = broadcast_from_main(ctx, plan_json)
    plan, _ = saved.plan_from_json(plan_json)
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(torch.distributed.group.WORLD),
        device=ctx.device,
        plan=plan,
        sharders=sharders,
    )
    # the history weights are data: fbgemm need not compute their gradient (train/weight_grads.py)
    skip_per_sample_weight_grads(dmp)
    return ShardedModel(dmp, plan, plan_json, sharders, schema, num_embeddings)


def describe_plan(plan: ShardingPlan) -> str:
    """One line per table: sharding type, kernel, ranks (what rank 0 prints at start)."""
    lines = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            ranks = ",".join(str(r) for r in ps.ranks or [])
            lines.append(f"  {module_path}.{table}: {ps.sharding_type}/{ps.compute_kernel} on rank(s) {ranks}")
    return "\n".join(lines)
