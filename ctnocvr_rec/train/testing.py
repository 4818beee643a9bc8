"""Test helpers of the trainer: a tiny prepared set and two debug hooks.

Written by the package's shard writer (``data/shards.py``; no raw files, no ``prepare``):
:func:`write_tiny_prepared` writes the 23 Ali-CCP schema fields with small vocabularies; ``click``
depends on the ids of fields 205 (item) and 101 (user), ``conversion`` (given a click) on field 206,
so a ranker's AUCs rise above 0.5 within a few dozen steps.

Hooks (off unless their environment variable is set; the trainer calls them):

* ``CTNOCVR_LOG_SAMPLE_IDS=<dir>``: every rank appends one JSON line per trained batch to
  ``<dir>/rank-<r>.jsonl``: ``{"epoch", "step", "ids": [sample ids]}`` (which rows a run trained).
* ``CTNOCVR_DUMP_AFTER_LOAD=<dir>``: right after a resume has loaded a checkpoint, every rank writes
  ``<dir>/rank-<r>.pt``: ``{"model": {key: [(offsets, tensor)]}, "optim": {key: [(offsets, tensor)]}}``
  with its local shards of every embedding table's weight and fused optimiser state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ctnocvr_rec.data.schema import DEFAULT_SCHEMA, FieldSchema, load_schema
from ctnocvr_rec.data.shards import FieldValues, shard_table, write_split_tables

SCHEMA_NAME = DEFAULT_SCHEMA  # the packaged aliccp schema
VOCAB = 40  # ids 1..VOCAB-1 per field (0 = OOV), so num_embeddings = VOCAB


def _split_table(schema: FieldSchema, rows: int, seed: int, first_sample_id: int, users: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    effects = np.random.default_rng(1234).normal(0.0, 1.5, size=(3, VOCAB))  # same truth for all splits
    fields: dict[str, FieldValues] = {}
    first_ids: dict[str, np.ndarray] = {}
    for spec in schema:
        if spec.multi_valued:
            lengths = rng.integers(0, 4, rows)
        else:
            lengths = np.ones(rows, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = rng.integers(1, VOCAB, offsets[-1]).astype(np.int64)
        if not spec.multi_valued:
            first_ids[spec.name] = ids
        weights = (0.5 + rng.random(offsets[-1])).astype(np.float32) if spec.weighted else None
        fields[spec.name] = FieldValues(offsets, ids, weights)
    logit_click = effects[0][first_ids["205"]] + effects[1][first_ids["101"]] - 1.5
    click = (rng.random(rows) < 1 / (1 + np.exp(-logit_click))).astype(np.int8)
    logit_conv = effects[2][first_ids["206"]] - 0.5
    conversion = (click * (rng.random(rows) < 1 / (1 + np.exp(-logit_conv)))).astype(np.int8)
    scalars = {
        "sample_id": np.arange(first_sample_id, first_sample_id + rows),
        "request_id": rng.integers(0, max(1, rows // 4), rows),
        "user_id": first_ids["101"] % users,
        "click": click,
        "conversion": conversion,
    }
    return shard_table(scalars, fields, schema, {spec.name: VOCAB for spec in schema})


def write_tiny_prepared(root: str | Path, splits: dict[str, int] | None = None, rows_per_file: int = 1000,
                        seed: int = 0, users: int = 25) -> Path:
    """Write ``root/{train,valid,test}/part-*.parquet`` + ``manifest.json``; returns ``root``."""
    root = Path(root)
    splits = splits or {"train": 4000, "valid": 600, "test": 900}
    schema = load_schema(SCHEMA_NAME)
    first = 1
    tables = {}
    for k, (split, rows) in enumerate(splits.items()):
        tables[split] = _split_table(schema, rows, seed + 101 * k, first, users)
        first += rows
    write_split_tables(root, schema, tables, {spec.name: VOCAB for spec in schema}, rows_per_file,
                       row_group_size=250)
    return root


def sample_id_log_dir() -> Path | None:
    """The ``CTNOCVR_LOG_SAMPLE_IDS`` folder, or None when the hook is off."""
    value = os.environ.get("CTNOCVR_LOG_SAMPLE_IDS")
    return Path(value) if value else None


def log_trained_sample_ids(log_dir: Path, rank: int, epoch: int, step: int, ids: list[int]) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"rank-{rank}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"epoch": epoch, "step": step, "ids": ids}) + "\n")


def _local_pieces(value: Any) -> list[tuple[list[int], Any]]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return [(list(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in value.local_shards()]
    return [([0] * value.dim(), value.detach().clone())]


def dump_table_state(ctx: Any, model: Any, optimizer: Any) -> None:
    """``CTNOCVR_DUMP_AFTER_LOAD`` hook: this rank's shards of the tables and their fused optimiser state."""
    out_dir = os.environ.get("CTNOCVR_DUMP_AFTER_LOAD")
    if not out_dir:
        return
    import torch

    tables = {k: _local_pieces(v) for k, v in model.state_dict().items() if ".embedding_bags." in k}
    optim = {f"{part}.{key}": _local_pieces(v)
             for part, states in optimizer.state_dict()["state"].items() if ".embedding_bags." in part
             for key, v in states.items() if hasattr(v, "dim") or hasattr(v, "local_shards")}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save({"model": tables, "optim": optim}, Path(out_dir) / f"rank-{ctx.rank}.pt")
