"""The one place that builds TorchRec's sharders, topology and planner.

``ctnocvr train`` (through DMP) and ``ctnocvr plan`` (what-if plans on a laptop) both call these
functions, so the plan printed by the tool is the plan the trainer would make for the same inputs.

* :func:`make_sharders` – the sharder list *with* the fused sparse optimiser. The same list must go to
  the planner and to ``DistributedModelParallel``: the planner sizes optimiser state from the sharder's
  ``fused_params`` and DMP builds the fused kernels from them (a sharder without them silently falls
  back to fbgemm's EXACT_SGD).
* :func:`make_topology` – ``Topology`` through ``TopologyFactory`` (no "build it with the factory"
  warning), capacities per rank in GiB.
* :func:`build_planner` – ``EmbeddingShardingPlanner`` with a storage reservation that does not warn
  and per-table ``ParameterConstraints`` from :class:`~ctnocvr_rec.config.PlanConfig`, checked against
  the CPU rules first so a CPU run asking for row-wise sharding or UVM gets an explanation instead of
  "No available sharding type".
* :func:`plan_to_json` / :func:`plan_from_json` / :func:`check_plan_compatible` – the saved plan
  format for ``ctnocvr plan --save`` and ``ctnocvr train --plan``.

Heavy imports (torch, torchrec) are at module level here: this module is only imported by code that
is about to plan or shard anyway.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.fbgemm_qcomm_codec import CommOp, CommType, QCommsConfig, get_qcomm_codecs_registry
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.proposers import GreedyProposer, GridSearchProposer, UniformProposer
from torchrec.distributed.planner.storage_reservations import (
    FixedPercentageStorageReservation,
    HeuristicalStorageReservation,
)
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    StorageReservation,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import (
    ModuleSharder,
    ShardingPlan,
    ShardingType,
)

from ctnocvr_rec.config import OptimConfig, PlanConfig

GIB = 1 << 30

#: version of the saved plan format (bumped when the JSON layout changes)
PLAN_FORMAT_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Device rules (checked on torchrec 1.8.0 / fbgemm-gpu-cpu 1.8.0, see docs/design.md)
# ---------------------------------------------------------------------------------------------

#: config name -> fbgemm optimiser
SPARSE_OPTIMISERS: dict[str, EmbOptimType] = {
    "exact_sgd": EmbOptimType.EXACT_SGD,
    "exact_adagrad": EmbOptimType.EXACT_ADAGRAD,
    "exact_rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
    "partial_rowwise_adam": EmbOptimType.PARTIAL_ROWWISE_ADAM,
    "lamb": EmbOptimType.LAMB,
    "partial_rowwise_lamb": EmbOptimType.PARTIAL_ROWWISE_LAMB,
    "lars_sgd": EmbOptimType.LARS_SGD,
}
#: the fbgemm CPU kernels implement only these (others fail with "not supported in CPU mode")
CPU_SPARSE_OPTIMISERS = ("exact_sgd", "exact_adagrad", "exact_rowwise_adagrad")

#: sharding types the EBC sharder offers on CPU; the rest (row-wise family, grid) need CUDA
CPU_SHARDING_TYPES = (
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
)
#: compute kernels that exist on CPU (fused for the sharded types, dense for data-parallel)
CPU_COMPUTE_KERNELS = (EmbeddingComputeKernel.FUSED.value, EmbeddingComputeKernel.DENSE.value)

DEVICE_TYPES = ("cpu", "cuda")
STORAGE_RESERVATIONS = ("fixed", "heuristic", "none")
#: keys accepted in PlanConfig.constraints[<table>]
CONSTRAINT_KEYS = (
    "sharding_types",
    "compute_kernels",
    "min_partition",
    "pooling_factors",
    "num_poolings",
    "enforce_hbm",
)


def _check_device_type(device_type: str) -> None:
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device type {device_type!r} is not one of {list(DEVICE_TYPES)}")


# ---------------------------------------------------------------------------------------------
# Sharders
# ---------------------------------------------------------------------------------------------


#: tables with fewer rows than this are looked up with int32 ids (:func:`id_dtype`)
INT32_ID_ROWS = 2**31


def id_dtype(num_embeddings: Iterable[int]) -> torch.dtype:
    """The id dtype of the batches and of fbgemm's lookups: int32 when every table has fewer than
    2**31 rows (then every valid id fits), else int64.

    int32 halves the ids' bytes wherever they move: the loader workers' batches, the KJT all-to-all
    of the input distribution (the biggest transfer of a step at Ali-CCP's ~500 history ids per row)
    and the kernels' index reads. An int64 KJT still works (TorchRec casts it before the lookup).

    >>> id_dtype([400_001, 14]), id_dtype([2**31])
    (torch.int32, torch.int64)
    """
    return torch.int32 if max(num_embeddings, default=0) < INT32_ID_ROWS else torch.int64


def fused_params(optim: OptimConfig, device_type: str, ids: torch.dtype = torch.int64) -> dict[str, Any]:
    """The fbgemm ``fused_params`` of the sparse optimiser (validated for the device); ``ids``: the
    index and offset dtype TorchRec hands the kernels (:func:`id_dtype`)."""
    _check_device_type(device_type)
    name = optim.sparse.lower()
    if name not in SPARSE_OPTIMISERS:
        raise ValueError(
            f"train.optim.sparse={optim.sparse!r} is not a known fused sparse optimiser; "
            f"choose one of {sorted(SPARSE_OPTIMISERS)}"
        )
    if device_type == "cpu" and name not in CPU_SPARSE_OPTIMISERS:
        raise ValueError(
            f"train.optim.sparse={optim.sparse!r} has no CPU kernel in fbgemm-gpu-cpu; on CPU use one of "
            f"{list(CPU_SPARSE_OPTIMISERS)} (the others run on CUDA only)"
        )
    if ids not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be torch.int32 or torch.int64, got {ids}")
    # train.optim.weight_decay is the dense optimiser's (train/optim.py); the tables get none
    return {
        "optimizer": SPARSE_OPTIMISERS[name],
        "learning_rate": float(optim.sparse_lr),
        "eps": float(optim.sparse_eps),
        # TorchRec casts the KJT's values / offsets to these before the lookup (a no-op when the
        # batch already has them; fbgemm itself then runs its int32 or int64 kernels)
        "embedding_table_index_type": ids,
        "embedding_table_offset_type": ids,
    }


#: precisions of the pooled-embedding all-to-alls (``plan.comm_*_precision``) -> devices that have them
COMM_PRECISIONS: dict[str, tuple[str, ...]] = {"fp32": ("cpu", "cuda"), "fp16": ("cpu", "cuda"), "bf16": ("cuda",)}


def qcomm_codecs(forward: str, backward: str, device_type: str) -> dict[str, Any] | None:
    """TorchRec's quantized-comms codec registry for the pooled-embedding all-to-alls (``None``: fp32
    both ways, nothing to encode). Refuses a precision the device's backend lacks instead of TorchRec's
    silent fallback (gloo has no bf16 all-to-all: TorchRec would warn and send fp16)."""
    _check_device_type(device_type)
    for what, value in (("comm_forward_precision", forward), ("comm_backward_precision", backward)):
        if value not in COMM_PRECISIONS:
            raise ValueError(f"plan.{what}={value!r} is not one of {sorted(COMM_PRECISIONS)}")
        if device_type not in COMM_PRECISIONS[value]:
            raise ValueError(f"plan.{what}={value!r} has no {device_type} all-to-all (gloo sends fp32 or fp16); "
                             f"use one of {[p for p, d in COMM_PRECISIONS.items() if device_type in d]}")
    if forward == backward == "fp32":
        return None
    return get_qcomm_codecs_registry(
        QCommsConfig(forward_precision=CommType(forward), backward_precision=CommType(backward)),
        comm_ops=[CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL],  # the only one table-/column-wise shardings use here
        device=torch.device(device_type),
    )


def make_sharders(
    optim: OptimConfig, device_type: str, plan_cfg: PlanConfig | None = None, ids: torch.dtype = torch.int64
) -> list[ModuleSharder[nn.Module]]:
    """The one sharder list (fused sparse optimiser, the comms precision of ``plan_cfg`` and the
    kernels' id dtype ``ids``, :func:`id_dtype` of the table sizes, included) for both planner and DMP."""
    plan_cfg = plan_cfg or PlanConfig()
    sharder = EmbeddingBagCollectionSharder(
        fused_params=fused_params(optim, device_type, ids),
        qcomm_codecs_registry=qcomm_codecs(
            plan_cfg.comm_forward_precision, plan_cfg.comm_backward_precision, device_type
        ),
    )
    return [sharder]  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------------
# Topology
# ---------------------------------------------------------------------------------------------


def make_topology(
    world_size: int,
    local_world_size: int | None,
    device_type: str,
    hbm_gb: float = 0.0,
    ddr_gb: float = 0.0,
) -> Topology:
    """A planner ``Topology``; ``hbm_gb`` / ``ddr_gb`` are per rank in GiB (0 = TorchRec's default).

    On CPU the ranks have no HBM: TorchRec's planner then places the tables in "DDR", and
    ``ddr_gb`` is the capacity that matters.
    """
    _check_device_type(device_type)
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    local = local_world_size or world_size
    if local < 1 or world_size % local != 0:
        raise ValueError(f"local world size {local} must divide the world size {world_size} (ranks per host)")
    if hbm_gb < 0 or ddr_gb < 0:
        raise ValueError(f"memory capacities must be >= 0 GiB, got hbm={hbm_gb}, ddr={ddr_gb}")
    trainer = TrainerConfig(
        world_size=world_size,
        local_world_size=local,
        hbm_cap_bytes=int(hbm_gb * GIB) if hbm_gb else None,
        ddr_cap_bytes=int(ddr_gb * GIB) if ddr_gb else None,
    )
    return TopologyFactory.create_topology(
        trainer_config=trainer,
        hardware_config=HardwareConfig(),
        kernel_config=KernelConfig(compute_device=device_type),
    )


# ---------------------------------------------------------------------------------------------
# Constraints and planner
# ---------------------------------------------------------------------------------------------


def _as_list(value: Any, where: str) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"{where}: expected a list (or comma-separated string), got {value!r}")


def _checked_names(
    value: Any, where: str, valid: list[str], cpu_valid: Sequence[str], device_type: str, cuda_only_why: str
) -> list[str]:
    """Lower-cased names from a constraint entry, each known and, on CPU, available there."""
    names = [str(v).lower() for v in _as_list(value, where)]
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"{where}: unknown {bad}; valid: {valid}")
    cuda_only = [n for n in names if n not in cpu_valid]
    if device_type == "cpu" and cuda_only:
        raise ValueError(f"{where}: {cuda_only} exist only on CUDA ({cuda_only_why}); on CPU use {list(cpu_valid)}")
    return names


def make_constraints(
    plan_cfg: PlanConfig,
    device_type: str,
    table_names: Iterable[str] | None = None,
    default_pooling_factors: Mapping[str, list[float]] | None = None,
) -> dict[str, ParameterConstraints]:
    """Per-table ``ParameterConstraints`` from ``plan_cfg.constraints``, checked for the device.

    ``table_names`` (when given) is the model's table set: a constraint on an unknown table is an
    error naming the tables that exist. ``default_pooling_factors`` (table -> one factor per feature,
    e.g. from a preset or data stats) applies where the config gives none.
    """
    _check_device_type(device_type)
    known = set(table_names) if table_names is not None else None
    all_types = [s.value for s in ShardingType]
    all_kernels = [k.value for k in EmbeddingComputeKernel]
    out: dict[str, ParameterConstraints] = {}
    specs: dict[str, Mapping[str, Any]] = {
        t: {"pooling_factors": list(pf)} for t, pf in (default_pooling_factors or {}).items()
    }
    for table, spec in plan_cfg.constraints.items():
        if isinstance(spec, Mapping):
            spec = {**specs.get(table, {}), **spec}
        specs[table] = spec
    for table, spec in specs.items():
        where = f"plan.constraints.{table}"
        if known is not None and table not in known:
            raise ValueError(f"{where}: no table named {table!r}; tables: {sorted(known)}")
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a mapping of {list(CONSTRAINT_KEYS)}, got {spec!r}")
        unknown = sorted(set(spec) - set(CONSTRAINT_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {list(CONSTRAINT_KEYS)}")
        kwargs: dict[str, Any] = {}
        if "sharding_types" in spec:
            kwargs["sharding_types"] = _checked_names(
                spec["sharding_types"], f"{where}.sharding_types", all_types, CPU_SHARDING_TYPES, device_type,
                "TorchRec's CPU embedding kernels cannot shard a table by rows",
            )
        if "compute_kernels" in spec:
            kwargs["compute_kernels"] = _checked_names(
                spec["compute_kernels"], f"{where}.compute_kernels", all_kernels, CPU_COMPUTE_KERNELS,
                device_type, "UVM and caching kernels keep rows in host memory for a GPU",
            )
        if "min_partition" in spec:
            kwargs["min_partition"] = int(spec["min_partition"])
        for key in ("pooling_factors", "num_poolings"):
            if key in spec:
                values = [float(v) for v in _as_list(spec[key], f"{where}.{key}")]
                if any(v <= 0 for v in values):
                    raise ValueError(f"{where}.{key}: values must be > 0, got {values}")
                kwargs[key] = values
        if "enforce_hbm" in spec:
            kwargs["enforce_hbm"] = bool(spec["enforce_hbm"])
        out[table] = ParameterConstraints(**kwargs)
    return out


def dense_parameter_bytes(module: nn.Module | None) -> int:
    """Bytes of the non-embedding parameters (×6: weights, Adam state, grads, DDP buckets)."""
    if module is None:
        return 0
    total = 0
    for name, param in module.named_parameters():
        if "embedding_bag" in name or "embedding_bags" in name:
            continue
        total += param.numel() * param.element_size()
    return 6 * total


def make_storage_reservation(plan_cfg: PlanConfig, module: nn.Module | None = None) -> StorageReservation:
    """The planner's storage reservation: ``fixed`` (a percentage of every rank), ``heuristic``
    (percentage + dense parameters and input estimate) or ``none``."""
    kind = plan_cfg.storage_reservation
    pct = float(plan_cfg.storage_reservation_percentage)
    if not 0.0 <= pct <= 1.0:
        raise ValueError(f"plan.storage_reservation_percentage must be in [0, 1], got {pct}")
    if kind == "fixed":
        return FixedPercentageStorageReservation(percentage=pct)
    if kind == "none":
        return FixedPercentageStorageReservation(percentage=0.0)
    if kind == "heuristic":
        # Given a dense estimate the heuristic does not over-count a meta model; its constructor warns
        # unconditionally, which is the case the warning itself recommends, so silence it here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return HeuristicalStorageReservation(
                percentage=pct, dense_tensor_estimate=dense_parameter_bytes(module)
            )
    raise ValueError(f"plan.storage_reservation={kind!r} is not one of {list(STORAGE_RESERVATIONS)}")


def build_planner(
    topology: Topology,
    batch_size: int,
    plan_cfg: PlanConfig,
    constraints: dict[str, ParameterConstraints] | None = None,
    module: nn.Module | None = None,
) -> EmbeddingShardingPlanner:
    """The one planner construction, used by the trainer and ``ctnocvr plan``.

    ``batch_size`` is the per-rank batch. ``constraints`` overrides the ones made from
    ``plan_cfg.constraints`` (pass ``make_constraints(...)`` with the table names to get the table
    check); ``module`` only feeds the ``heuristic`` reservation's dense estimate.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if constraints is None:
        constraints = make_constraints(plan_cfg, topology.compute_device)
    threshold = int(plan_cfg.greedy_threshold)
    if threshold < 0:
        raise ValueError(f"plan.greedy_threshold must be >= 0 (0 = exhaustive), got {threshold}")
    kwargs: dict[str, Any] = {
        "topology": topology,
        "batch_size": batch_size,
        "storage_reservation": make_storage_reservation(plan_cfg, module),
        # TorchRec's stats table goes to logger.info; `ctnocvr plan` renders the same numbers itself
        "debug": False,
    }
    if plan_cfg.hbm_first and topology.compute_device == "cuda":
        return HbmFirstPlanner(threshold=threshold, constraints=constraints, **kwargs)
    return EmbeddingShardingPlanner(proposer=_proposers(threshold), constraints=constraints or None, **kwargs)  # type: ignore[arg-type]


def _proposers(threshold: int) -> list[Any]:
    """TorchRec's default proposers, the greedy ones stopping after ``threshold`` feasible proposals in
    a row that are no better (0 = never). Unbounded they walk every option of every table (~700
    partitions for 23 tables on 64 ranks, ~12 s here) and, on the plans we checked, end at the same
    perf rating."""
    return [
        GridSearchProposer(),
        GreedyProposer(threshold=threshold or None),
        GreedyProposer(use_depth=False, threshold=threshold or None),
        UniformProposer(),
    ]


#: kernels that keep a table entirely in HBM (or replicate it): what a plan that fits in HBM uses
HBM_KERNELS = [EmbeddingComputeKernel.FUSED.value, EmbeddingComputeKernel.DENSE.value]


class HbmFirstPlanner(EmbeddingShardingPlanner):
    """TorchRec's planner that first searches HBM-only kernels and falls back to the full search
    (UVM / caching kernels too) only when that finds no plan.

    Why: TorchRec's perf model rates UVM and caching kernels slower than HBM ones, so when everything
    fits in HBM the full search ends at an HBM-only plan anyway; enumerating and estimating those
    options is most of the planning time (3 of 16 sharding-type x kernel pairs instead of 16 on
    CUDA). Tables whose constraints already name compute kernels keep theirs.
    """

    def __init__(
        self, threshold: int, constraints: dict[str, ParameterConstraints] | None, **kwargs: Any
    ) -> None:
        super().__init__(proposer=_proposers(threshold), constraints=constraints or None, **kwargs)
        self._threshold = threshold
        self._given_constraints = dict(constraints or {})
        self._kwargs = kwargs
        #: "hbm-first" or "full": which search produced the last plan
        self.search_used = ""

    def plan(self, module: nn.Module, sharders: list[ModuleSharder[nn.Module]]) -> ShardingPlan:  # type: ignore[override]
        from torchrec.distributed.planner.types import PlannerError

        hbm_only = dict(self._given_constraints)
        for table in table_shapes(module):
            given = hbm_only.get(table)
            if given is None:
                hbm_only[table] = ParameterConstraints(compute_kernels=list(HBM_KERNELS))
            elif given.compute_kernels is None:
                hbm_only[table] = dataclasses.replace(given, compute_kernels=list(HBM_KERNELS))
        first = EmbeddingShardingPlanner(
            proposer=_proposers(self._threshold),
            constraints=hbm_only,
            **self._kwargs,  # type: ignore[arg-type]
        )
        try:
            plan = first.plan(module, sharders)
        except PlannerError:
            self.search_used = "full"
            return super().plan(module, sharders)
        # expose the winning search's state, as after a plain EmbeddingShardingPlanner.plan
        self._best_plan = first._best_plan
        self._storage_reservation = first._storage_reservation
        self._num_proposals, self._num_plans = first._num_proposals, first._num_plans
        self.search_used = "hbm-first"
        return plan


def table_shapes(module: nn.Module) -> dict[str, list[int]]:
    """``{table: [num_embeddings, embedding_dim]}`` of every EBC inside ``module``."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    shapes: dict[str, list[int]] = {}
    for sub in module.modules():
        if isinstance(sub, EmbeddingBagCollection):
            for cfg in sub.embedding_bag_configs():
                shapes[cfg.name] = [int(cfg.num_embeddings), int(cfg.embedding_dim)]
    return shapes
