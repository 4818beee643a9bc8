"""A tiny prepared set with learnable labels, for the trainer's tests and quick local runs.

Written by the package's shard writer (``data/shards.py``; no raw files, no ``prepare``): the
23 Ali-CCP schema fields with small vocabularies; ``click`` depends on the ids of fields 205 (item)
and 101 (user), ``conversion`` (given a click) on field 206, so a ranker's AUCs rise above 0.5
within a few dozen steps.
"""

from __future__ import annotations

from pathlib import Path

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
