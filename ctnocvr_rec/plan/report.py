"""Run the planner and turn its result into a report: per table, per rank, imbalance; or explain why
no plan fits.

All figures are the planner's own: the winning ``ShardingOption``s (``planner._best_plan``) carry
each shard's rank, offsets, sizes, ``Storage`` (HBM/DDR bytes) and ``Perf`` (ms estimates), and the
per-rank totals are summed with torchrec's own stats helpers (``_compute_mem_usage_and_perf``), so
they match the table TorchRec itself would log.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.stats import _compute_mem_usage_and_perf, _compute_storage
from torchrec.distributed.planner.types import PlannerError, ShardingOption, Storage
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from ctnocvr_rec.plan.sharding import GIB


@dataclass
class ShardRow:
    rank: int
    offsets: list[int]
    sizes: list[int]
    hbm_bytes: int
    ddr_bytes: int
    perf_ms: float


@dataclass
class TableRow:
    name: str
    module: str
    num_embeddings: int
    embedding_dim: int
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    hbm_bytes: int
    ddr_bytes: int
    perf_ms: float
    shards: list[ShardRow]


@dataclass
class RankRow:
    rank: int
    #: embedding shards only
    sparse_hbm_bytes: int
    #: + the reservation's dense/input estimates (what TorchRec's stats call "used")
    used_hbm_bytes: int
    used_ddr_bytes: int
    hbm_capacity_bytes: int
    ddr_capacity_bytes: int
    perf_ms: float
    fwd_compute_ms: float
    fwd_comms_ms: float
    bwd_compute_ms: float
    bwd_comms_ms: float
    num_shards: int


@dataclass
class PlanReport:
    """Everything ``ctnocvr plan`` prints; ``to_dict`` is the JSON output."""

    meta: dict[str, Any]
    tables: list[TableRow]
    ranks: list[RankRow]
    imbalance: dict[str, float]
    plan_seconds: float
    plan: ShardingPlan | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "plan_seconds": self.plan_seconds,
            "imbalance": self.imbalance,
            "tables": [asdict(t) for t in self.tables],
            "ranks": [asdict(r) for r in self.ranks],
        }


class PlanInfeasibleError(ValueError):
    """No plan fits the topology; the message names the table(s) and the figures."""


def _max_over_mean(values: list[float]) -> float:
    mean = statistics.mean(values) if values else 0.0
    return max(values) / mean if mean > 0 else 1.0


def _table_rows(best_plan: list[ShardingOption]) -> list[TableRow]:
    rows = []
    for so in best_plan:
        shards = [
            ShardRow(
                rank=int(s.rank),  # type: ignore[arg-type]
                offsets=list(s.offset),
                sizes=list(s.size),
                hbm_bytes=int(s.storage.hbm),  # type: ignore[union-attr]
                ddr_bytes=int(s.storage.ddr),  # type: ignore[union-attr]
                perf_ms=float(s.perf.total),  # type: ignore[union-attr]
            )
            for s in so.shards
        ]
        rows.append(
            TableRow(
                name=so.name,
                module=so.path,
                num_embeddings=int(so.tensor.shape[0]),
                embedding_dim=int(so.tensor.shape[1]),
                sharding_type=so.sharding_type,
                compute_kernel=so.compute_kernel,
                ranks=sorted({s.rank for s in shards}),
                hbm_bytes=sum(s.hbm_bytes for s in shards),
                ddr_bytes=sum(s.ddr_bytes for s in shards),
                perf_ms=sum(s.perf_ms for s in shards),
                shards=shards,
            )
        )
    return sorted(rows, key=lambda r: (r.module, r.name))


def _rank_rows(planner: EmbeddingShardingPlanner, topology: Topology) -> list[RankRow]:
    best_plan: list[ShardingOption] = planner._best_plan  # type: ignore[attr-defined]
    _, dense_storage, kjt_storage = _compute_storage(planner._storage_reservation, topology)
    sparse_hbm, used_hbm, used_ddr, perf = _compute_mem_usage_and_perf(
        topology, best_plan, dense_storage, kjt_storage
    )
    shard_count = [0] * topology.world_size
    for so in best_plan:
        for s in so.shards:
            shard_count[int(s.rank)] += 1  # type: ignore[arg-type]
    return [
        RankRow(
            rank=r,
            sparse_hbm_bytes=int(sparse_hbm[r]),
            used_hbm_bytes=int(used_hbm[r]),
            used_ddr_bytes=int(used_ddr[r]),
            hbm_capacity_bytes=int(topology.devices[r].storage.hbm),
            ddr_capacity_bytes=int(topology.devices[r].storage.ddr),
            perf_ms=float(perf[r].total),
            fwd_compute_ms=float(perf[r].fwd_compute),
            fwd_comms_ms=float(perf[r].fwd_comms),
            bwd_compute_ms=float(perf[r].bwd_compute),
            bwd_comms_ms=float(perf[r].bwd_comms),
            num_shards=shard_count[r],
        )
        for r in range(topology.world_size)
    ]


def explain_infeasible(
    planner: EmbeddingShardingPlanner,
    topology: Topology,
    module: nn.Module,
    sharders: list[ModuleSharder[nn.Module]],
    error: Exception,
) -> str:
    """Why no plan fits, in figures: per table the least memory one rank must hold under any allowed
    sharding option, against what each rank has after the storage reservation."""
    reserved = planner._storage_reservation.last_reserved_topology or topology  # type: ignore[attr-defined]
    per_rank = reserved.devices[0].storage
    raw = topology.devices[0].storage
    search_space = planner._enumerator.enumerate(module=module, sharders=sharders)  # type: ignore[attr-defined]
    by_table: dict[str, list[ShardingOption]] = {}
    for so in search_space:
        by_table.setdefault(so.name, []).append(so)

    def largest_shard(so: ShardingOption) -> Storage:
        return max((s.storage for s in so.shards), key=lambda st: st.hbm + st.ddr)  # type: ignore[arg-type, return-value]

    def fits(st: Storage) -> bool:
        return st.hbm <= per_rank.hbm and st.ddr <= per_rank.ddr

    lines = []
    too_big = []
    min_total = Storage(0, 0, 0)
    for name, options in sorted(by_table.items()):
        best = min(options, key=lambda so: (largest_shard(so).hbm, largest_shard(so).ddr))
        need = largest_shard(best)
        # the table's least-HBM option (then least DDR): what it costs the cluster at best
        cheapest_total = min((so.total_storage for so in options), key=lambda st: (st.hbm, st.ddr))
        min_total = min_total + cheapest_total
        if not fits(need):
            too_big.append(
                f"  table {name}: needs at least {need.hbm / GIB:.3f} GiB HBM + {need.ddr / GIB:.3f} GiB DDR "
                f"on one rank (best option: {best.sharding_type}/{best.compute_kernel}, "
                f"{len(best.shards)} shard(s))"
            )
    capacity = (
        f"each rank has {raw.hbm / GIB:.3f} GiB HBM and {raw.ddr / GIB:.3f} GiB DDR, "
        f"{per_rank.hbm / GIB:.3f} GiB HBM and {per_rank.ddr / GIB:.3f} GiB DDR after the storage reservation "
        f"({topology.world_size} ranks: {per_rank.hbm * topology.world_size / GIB:.3f} GiB HBM, "
        f"{per_rank.ddr * topology.world_size / GIB:.3f} GiB DDR in all)"
    )
    if too_big:
        lines.append("no sharding plan fits: these tables do not fit on any single rank")
        lines.extend(too_big)
    else:
        lines.append(
            "no sharding plan fits: every table fits on a rank alone, but not all of them together; "
            f"with each table in its least-HBM option they need {min_total.hbm / GIB:.3f} GiB HBM + "
            f"{min_total.ddr / GIB:.3f} GiB DDR in all"
        )
        biggest = sorted(
            (
                (name, min(so.total_storage.hbm + so.total_storage.ddr for so in opts))
                for name, opts in by_table.items()
            ),
            key=lambda kv: -kv[1],
        )[:3]
        lines.append(
            "  largest tables (HBM+DDR, smallest option): "
            + ", ".join(f"{n} {b / GIB:.3f} GiB" for n, b in biggest)
        )
    lines.append(f"  {capacity}")
    lines.append(
        "  options: more ranks (--world-size), more memory per rank (--hbm-gb/--ddr-gb), a smaller "
        "storage reservation, smaller tables (min_count / hash buckets), or UVM kernels on CUDA"
    )
    lines.append(f"  (planner: {str(error).splitlines()[0]})")
    return "\n".join(lines)


def run_plan(
    planner: EmbeddingShardingPlanner,
    topology: Topology,
    module: nn.Module,
    sharders: list[ModuleSharder[nn.Module]],
    meta: Mapping[str, Any],
) -> PlanReport:
    """Plan ``module`` and report; raises :class:`PlanInfeasibleError` with figures when nothing fits."""
    start = time.perf_counter()
    # torchrec logs a warning per data-parallel table ("Sharding spec not found") and its stats at INFO;
    # the report below carries the same information.
    planner_logger = logging.getLogger()
    previous = planner_logger.level
    planner_logger.setLevel(max(previous, logging.ERROR))
    try:
        plan = planner.plan(module, sharders)
    except PlannerError as e:
        raise PlanInfeasibleError(explain_infeasible(planner, topology, module, sharders, e)) from None
    finally:
        planner_logger.setLevel(previous)
    seconds = time.perf_counter() - start
    meta = {**meta, "search": getattr(planner, "search_used", "") or "full"}
    ranks = _rank_rows(planner, topology)
    imbalance = {
        "perf_max_over_mean": _max_over_mean([r.perf_ms for r in ranks]),
        "hbm_max_over_mean": _max_over_mean([float(r.used_hbm_bytes) for r in ranks]),
        "ddr_max_over_mean": _max_over_mean([float(r.used_ddr_bytes) for r in ranks]),
    }
    return PlanReport(
        meta=dict(meta),
        tables=_table_rows(planner._best_plan),  # type: ignore[attr-defined]
        ranks=ranks,
        imbalance=imbalance,
        plan_seconds=seconds,
        plan=plan,
    )
