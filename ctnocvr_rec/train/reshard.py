"""Elastic resume: continue a run from a checkpoint saved under another world size or sharding plan.

Same world size and same plan (the common restart): nothing here runs; ``checkpoint.load_checkpoint``
restores everything bit for bit. Otherwise :func:`resume_resharded` loads the state into the model
sharded for *this* job:

* **Table weights, dense parameters, dense optimiser state (Adam moments and step), data-parallel
  tables' dense state**: read through DCP, which reshards by global offsets. Exact.
* **Fused optimiser state** of a table that stays on the fused kernels:

  - ``exact_adagrad`` keeps one accumulator per weight, laid out like the table: exact under any
    sharding (DCP reshards it like the weights).
  - ``exact_rowwise_adagrad`` keeps one accumulator per row *per column shard*: TorchRec stores a
    table of ``R`` rows cut into ``k`` column shards (widths ``d_1..d_k``, sorted by column) as one
    ``[k R]`` vector, shard ``i`` at ``[i R, (i + 1) R)`` (a table-wise table has ``k = 1``). Shard
    ``i`` adds ``mean_{c in shard i} g_c^2`` per step, so for any group ``G`` of columns that is a
    union of old shards the accumulator it would have had is, exactly,
    ``m_G = sum_i (|G cap shard_i| / |G|) m_i`` (eq. R1). Each new shard gets eq. R1 over the old
    shards it overlaps: **exact** when every new shard is a union of whole old shards (column-wise ->
    table-wise, merging shards, an unchanged split); when a new shard cuts an old one (table-wise ->
    column-wise), the old shard's per-column share was never recorded, and eq. R1 gives the new
    shard the old shard's whole-group mean: the documented **approximation** (reported per table).
  - ``exact_sgd`` has no state.
* **A table moving between data-parallel and the fused kernels** changes optimiser (the dense one,
  Adam by default, steps data-parallel tables): the weights carry over exactly, the optimiser state
  starts fresh (fused momentum 0, or a fresh dense-optimiser state) and the change is reported.
* **Step, epoch, LR schedule position**: from the checkpoint (the schedule is a function of the step).
* **Data position**: with another world size, the untrained rest of the epoch is split over the new
  ranks (:mod:`ctnocvr_rec.data.epoch_plan`); nothing is read twice, fewer than ``R'`` batches of the
  epoch are skipped (reported). This needs the checkpoint's ``elastic`` record (written since this
  module exists); an older checkpoint resumes on its own world size only.
* **RNG**: on another world size each rank re-seeds from ``(train.seed, step, rank)``; with the
  same world size every rank restores its own saved RNG state.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import FileSystemReader

from ctnocvr_rec.config import RunConfig, to_dict
from ctnocvr_rec.data.epoch_plan import nothing_trained, split_remaining
from ctnocvr_rec.train.checkpoint import CheckpointInfo, set_rng_state
from ctnocvr_rec.train.distributed import DistContext

#: version of the ``elastic`` record in meta.json
ELASTIC_FORMAT = 1
DATA_PARALLEL = "data_parallel"


class ReshardError(ValueError):
    """A checkpoint that cannot be continued on this job's topology; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# The record saved with every checkpoint
# ---------------------------------------------------------------------------------------------


def elastic_record(cfg: RunConfig, num_rows: int) -> dict[str, Any]:
    """What a resume on another topology needs beyond the plan: how the epoch's rows were cut."""
    return {
        "format": ELASTIC_FORMAT,
        "data": {
            "split": cfg.data.train_split,
            "num_rows": int(num_rows),
            "batch_size": cfg.data.batch_size,
            "shuffle_seed": cfg.data.shuffle_seed,
            "shuffle_window_batches": cfg.data.shuffle_buffer_batches,
        },
        "plan_config": to_dict(cfg.plan),
    }


def resume_plan(meta: Mapping[str, Any], world_size: int, cfg: RunConfig) -> tuple[str | None, str]:
    """The plan to shard with on a resume without ``--plan``, and why.

    The checkpoint's own plan when the world size and the plan settings (``cfg.plan``) are those it
    was saved with (then the resume is bit-identical); ``None`` (plan afresh for this job) otherwise.
    """
    saved_world = int(meta.get("world_size", -1))
    if saved_world != world_size:
        return None, f"the checkpoint was saved on {saved_world} rank(s), this job has {world_size}"
    record = meta.get("elastic")
    if record is not None and record.get("plan_config") != json.loads(json.dumps(to_dict(cfg.plan))):
        return None, "the plan settings (plan.*) differ from the checkpoint's"
    return meta.get("plan"), "same world size and plan settings: the checkpoint's plan"


# ---------------------------------------------------------------------------------------------
# Table layouts of a plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableLayout:
    """How one table is sharded in a plan."""

    sharding_type: str
    compute_kernel: str
    columns: tuple[tuple[int, int], ...]  # distinct column ranges of its shards, sorted (() if unknown)
    ranks: tuple[int, ...]

    @property
    def fused(self) -> bool:
        return self.sharding_type != DATA_PARALLEL

    def describe(self) -> str:
        text = self.sharding_type
        if len(self.columns) > 1:
            text += f" ({len(self.columns)} column shards: " + ", ".join(f"{a}-{b}" for a, b in self.columns) + ")"
        return text


def plan_layouts(plan: str | Mapping[str, Any]) -> dict[str, TableLayout]:
    """``{"<module path>.<table>": TableLayout}`` of a saved plan (JSON text or its dict)."""
    tree = json.loads(plan) if isinstance(plan, str) else plan
    out: dict[str, TableLayout] = {}
    for module, params in (tree.get("modules") or {}).items():
        for table, entry in params.items():
            shards = entry.get("shards") or []
            columns = sorted({(int(s["offsets"][1]), int(s["offsets"][1]) + int(s["sizes"][1])) for s in shards})
            out[f"{module}.{table}"] = TableLayout(
                sharding_type=str(entry.get("sharding_type")),
                compute_kernel=str(entry.get("compute_kernel")),
                columns=tuple(columns),
                ranks=tuple(int(r) for r in entry.get("ranks") or []),
            )
    return out


def same_layout(meta: Mapping[str, Any], world_size: int, plan_json: str) -> bool:
    """True when the job has the checkpoint's world size and its exact plan (the bit-identical path)."""
    if int(meta.get("world_size", -1)) != world_size or not meta.get("plan"):
        return False
    return json.loads(meta["plan"]).get("modules") == json.loads(plan_json).get("modules")


def _table_of(param_fqn: str) -> str | None:
    """``<module>.<table>`` of an embedding table's weight FQN (``...embedding_bags.<t>.weight``)."""
    parts = param_fqn.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-3] == "embedding_bags":
        return ".".join(parts[:-3] + [parts[-2]])
    return None


# ---------------------------------------------------------------------------------------------
# Row-wise Adagrad momentum between column splits (eq. R1)
# ---------------------------------------------------------------------------------------------


def remap_rowwise_momentum(saved: torch.Tensor, rows: int, old_columns: tuple[tuple[int, int], ...],
                           new_columns: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, bool]:
    """Row-wise momentum ``[k_old * rows]`` of the old column split -> ``[k_new * rows]`` of the new one.

    New shard ``j`` = ``sum_i (overlap(i, j) / width_j) * old shard i`` (eq. R1 of the module doc),
    computed in float64. Returns the new vector and whether every new shard is a union of whole old
    shards (then the result is exact, otherwise the documented approximation).

    >>> m, exact = remap_rowwise_momentum(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2, ((0, 4), (4, 8)), ((0, 8),))
    >>> m.tolist(), exact
    ([2.0, 3.0], True)
    """
    if saved.numel() != rows * len(old_columns):
        raise ReshardError(f"row-wise momentum of {saved.numel()} values does not match {rows} rows x "
                           f"{len(old_columns)} column shard(s) of the saved plan")
    old = saved.reshape(len(old_columns), rows).to(torch.float64)
    new = torch.zeros(len(new_columns), rows, dtype=torch.float64)
    exact = True
    for j, (a, b) in enumerate(new_columns):
        for i, (c, d) in enumerate(old_columns):
            overlap = min(b, d) - max(a, c)
            if overlap > 0:
                new[j] += (overlap / (b - a)) * old[i]
                exact = exact and overlap == d - c
    return new.reshape(-1).to(saved.dtype), exact


# ---------------------------------------------------------------------------------------------
# Loading model + optimiser state under another plan
# ---------------------------------------------------------------------------------------------


@dataclass
class ReshardReport:
    """What a resharded load did (printed by rank 0)."""

    old_world: int
    new_world: int
    changed_tables: list[str] = field(default_factory=list)  # one line per table whose sharding changed
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"[train] resharded resume: world size {self.old_world} -> {self.new_world}"]
        if self.changed_tables:
            out.append("[train] tables whose sharding changed:")
            out.extend(f"  {line}" for line in self.changed_tables)
        else:
            out.append("[train] no table changed its sharding type or column split")
        out.extend(f"[train] {note}" for note in self.notes)
        return out


def _local_shards(value: Any) -> list[Any]:
    if isinstance(value, ShardedTensor):
        return value.local_shards()
    raise ReshardError(f"cannot remap optimiser state of type {type(value).__name__} (expected a ShardedTensor)")


def load_resharded_state(ctx: DistContext, info: CheckpointInfo, model: torch.nn.Module, optimizer: Any,
                         plan_json: str) -> ReshardReport:
    """Load model and optimiser state saved under ``info.meta["plan"]`` into ``model``/``optimizer``
    sharded by ``plan_json`` (collective). The dense optimiser must have been through ``init_state()``."""
    saved_plan = info.meta.get("plan")
    if not saved_plan:
        raise ReshardError(f"{info.path}/meta.json has no plan; cannot tell how its tables were sharded")
    old_layouts, new_layouts = plan_layouts(saved_plan), plan_layouts(plan_json)
    report = ReshardReport(int(info.meta.get("world_size", -1)), ctx.world_size)
    for name in sorted(new_layouts):
        old, new = old_layouts.get(name), new_layouts[name]
        if old is None:
            raise ReshardError(f"{info.path}: the saved plan has no table {name}; it belongs to another model")
        if (old.sharding_type, old.columns) != (new.sharding_type, new.columns):
            if "grid_shard" in (old.sharding_type, new.sharding_type):
                # its row-wise momentum repeats the rows per node group: eq. R1 is not written for it
                raise ReshardError(f"{name}: moving a grid-sharded table ({old.describe()} -> {new.describe()}) is "
                                   "not supported; keep it grid-sharded with the same split (--plan)")
            report.changed_tables.append(f"{name.rsplit('.', 1)[-1]}: {old.describe()} -> {new.describe()}")

    saved = FileSystemReader(str(info.path)).read_metadata().state_dict_metadata
    model_state = model.state_dict()
    optim_state = optimizer.state_dict()
    request: dict[str, Any] = {}
    for key, value in model_state.items():
        flat = f"model.{key}"
        if flat not in saved:
            raise ReshardError(f"{info.path}: no saved weights for {key}; the checkpoint belongs to another model")
        request[flat] = value
    remaps: list[tuple[str, Any, tuple[tuple[int, int], ...], tuple[tuple[int, int], ...], int]] = []
    fresh: set[str] = set()
    for part_key, states in optim_state["state"].items():
        part, _, param = part_key.partition(".")
        table = _table_of(param)
        for state_key, value in states.items():
            flat = f"optim.state.{part_key}.{state_key}"
            old, new = (old_layouts.get(table), new_layouts.get(table)) if table else (None, None)
            moved = old is not None and new is not None and old.fused != new.fused
            if moved:
                fresh.add(table.rsplit(".", 1)[-1])  # type: ignore[union-attr]
                continue  # another optimiser's state: this one starts fresh
            if flat not in saved:
                raise ReshardError(f"{info.path}: no saved optimiser state {flat}; resume with the optimiser "
                                   "settings (train.optim.*) the checkpoint was written with")
            rowwise = (part == "fused" and state_key.endswith(".momentum1") and isinstance(value, ShardedTensor)
                       and len(value.size()) == 1)
            if rowwise and old is not None and new is not None and old.columns != new.columns:
                rows = int(value.size()[0]) // max(1, len(new.columns))
                if _local_shards(value):
                    request[flat] = torch.zeros(tuple(saved[flat].size), dtype=value.dtype)  # type: ignore[union-attr]
                remaps.append((flat, value, old.columns, new.columns, rows))
            else:
                request[flat] = value
    dcp.load(request, checkpoint_id=str(info.path))
    approximated = []
    for flat, value, old_columns, new_columns, rows in remaps:
        shards = _local_shards(value)
        if not shards:
            continue
        new_values, exact = remap_rowwise_momentum(request[flat], rows, old_columns, new_columns)
        new_values = new_values.reshape(len(new_columns), rows)
        for shard in shards:
            shard.tensor.copy_(new_values[int(shard.metadata.shard_offsets[0]) // rows])
        if not exact:
            approximated.append(flat.split(".")[-2])
    exact_tables = sorted({f.split(".")[-2] for f, *_ in remaps} - set(approximated))
    if exact_tables:
        report.notes.append("row-wise momentum combined exactly (width-weighted mean of whole column "
                            f"shards) for: {', '.join(exact_tables)}")
    if approximated:
        report.notes.append("row-wise momentum of a split column group copied to each of its new shards "
                            f"(approximation, see docs/train.md) for: {', '.join(sorted(set(approximated)))}")
    if fresh:
        report.notes.append("moved between data-parallel and the fused kernels, optimiser state starts "
                            f"fresh (weights kept): {', '.join(sorted(fresh))}")
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)
    return report


# ---------------------------------------------------------------------------------------------
# Data position and train state on another world size
# ---------------------------------------------------------------------------------------------


@dataclass
class ResumedState:
    train_state: dict[str, Any]
    report: ReshardReport
    #: batches per rank left in the current epoch after the split (None: the epoch starts over / unchanged)
    batches_left_in_epoch: int | None = None

    @property
    def world_changed(self) -> bool:
        """True when the data position was remapped (another world size), False for another plan only."""
        return self.report.old_world != self.report.new_world


def _check_data_record(info: CheckpointInfo, cfg: RunConfig, num_rows: int, world_size: int) -> dict[str, Any]:
    record = info.meta.get("elastic")
    if record is None:
        raise ReshardError(
            f"{info.path} was written before elastic resume existed (its meta.json has no 'elastic' record), "
            f"so its data position cannot be moved to {world_size} rank(s): resume it on "
            f"{info.meta.get('world_size')} rank(s) (with its own plan), or start a new run"
        )
    data = record.get("data") or {}
    here = {"split": cfg.data.train_split, "num_rows": num_rows, "batch_size": cfg.data.batch_size,
            "shuffle_seed": cfg.data.shuffle_seed, "shuffle_window_batches": cfg.data.shuffle_buffer_batches}
    names = {"split": "data.train_split", "num_rows": "rows of the training split",
             "batch_size": "data.batch_size", "shuffle_seed": "data.shuffle_seed",
             "shuffle_window_batches": "data.shuffle_buffer_batches"}
    for key, value in here.items():
        if key in data and data[key] != value:
            raise ReshardError(
                f"{info.path}: {names[key]} is {value!r} in this run but {data[key]!r} in the checkpoint; the rest "
                f"of the epoch is kept as the checkpoint's batches, so resume with the same value"
            )
    return record


def resume_resharded(cfg: RunConfig, ctx: DistContext, info: CheckpointInfo, model: torch.nn.Module,
                     optimizer: Any, plan_json: str, num_rows: int) -> ResumedState:
    """Load a checkpoint whose world size or plan differs from this job's (collective).

    Returns this rank's train state (step, epoch, samples, and the loader state of its share of the
    rest of the epoch) and the report of what changed. ``num_rows``: rows of the training split.
    """
    old_world = int(info.meta.get("world_size", -1))
    if old_world != ctx.world_size:
        _check_data_record(info, cfg, num_rows, ctx.world_size)  # before any loading: fail fast and clearly
    report = load_resharded_state(ctx, info, model, optimizer, plan_json)
    rank_files = [info.path / f"rank-{r}.pt" for r in range(old_world)]
    missing = [str(p) for p in rank_files if not p.is_file()]
    if missing:
        raise ReshardError(f"{info.path}: missing rank file(s) {missing} of the {old_world}-rank checkpoint")
    if old_world == ctx.world_size:
        # another plan on the same ranks: every rank keeps its own data position and RNG stream
        own = torch.load(rank_files[ctx.rank], weights_only=False)
        set_rng_state(own.pop("rng"))
        return ResumedState(own["train_state"], report)
    states = [torch.load(p, weights_only=False)["train_state"] for p in rank_files]
    base = dict(states[0])
    if len({(s["step"], s["epoch"]) for s in states}) != 1:
        raise ReshardError(f"{info.path}: the rank files disagree on step/epoch "
                           f"{[(s['step'], s['epoch']) for s in states]}")
    data_states = [s.get("data_state") for s in states]
    batch = cfg.data.batch_size
    left: int | None = None
    if nothing_trained(data_states):
        base["data_state"] = None
        report.notes.append(f"epoch {base['epoch']} had not started: it runs with this job's own split")
    else:
        split = split_remaining(data_states, old_world, num_rows // (old_world * batch), ctx.world_size)
        left = split.batches_per_rank
        base["data_state"] = {"epoch": base["epoch"], "batches_yielded": 0, "num_workers": 1,
                              "plan": split.plans[ctx.rank]}
        report.notes.append(
            f"epoch {base['epoch']}: {split.batches_left} untrained batch(es) of {batch} rows split over "
            f"{ctx.world_size} rank(s), {left} each; {len(split.dropped)} batch(es) ({len(split.dropped) * batch} "
            "rows) of this epoch are skipped (fewer than the new world size)")
    # a fresh, distinct RNG stream per rank, reproducible from (seed, step, rank)
    seed = (int(cfg.train.seed) * 1_000_003 + int(base["step"]) * 10_007 + ctx.rank) % (2**31)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return ResumedState(base, report, left)
