"""A tiny prepared set of random rows, written by the package's shard writer (``data/shards.py``).

Used by the loader and stats tests so they do not depend on ``ctnocvr data prepare``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ctnocvr_rec.data.schema import FieldSchema, load_schema
from ctnocvr_rec.data.shards import FieldValues, shard_table, write_split_tables

SCHEMA_NAME = "aliccp"  # the packaged ctnocvr_rec/configs/fields/aliccp.yaml


def aliccp_schema() -> FieldSchema:
    return load_schema(SCHEMA_NAME)


def fixture_num_embeddings(schema: FieldSchema) -> dict[str, int]:
    """Table rows of field ``k``: ids are drawn from ``[0, 7 + 3k)``."""
    return {spec.name: 7 + 3 * k + 1 for k, spec in enumerate(schema)}


def random_split_table(schema: FieldSchema, rows: int, seed: int, first_sample_id: int = 1) -> pa.Table:
    """Random rows: single-valued fields hold 0 or 1 id, multi-valued 0..4; valid label pairs only."""
    rng = np.random.default_rng(seed)
    click = (rng.random(rows) < 0.3).astype(np.int8)
    conversion = (click * (rng.random(rows) < 0.4)).astype(np.int8)
    scalars = {
        "sample_id": np.arange(first_sample_id, first_sample_id + rows),
        "request_id": rng.integers(0, max(rows // 5, 1), rows),
        "user_id": np.where(rng.random(rows) < 0.1, -1, rng.integers(1000, 1040, rows)),
        "click": click,
        "conversion": conversion,
    }
    fields: dict[str, FieldValues] = {}
    for k, spec in enumerate(schema):
        max_len = 4 if spec.multi_valued else 1
        lengths = rng.integers(0, max_len + 1, rows)
        if not spec.multi_valued:
            lengths = (rng.random(rows) < 0.9).astype(np.int64)  # mostly present, sometimes absent
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = rng.integers(0, 7 + 3 * k, offsets[-1]).astype(np.int64)
        weights = rng.random(offsets[-1]).astype(np.float32) * 3 if spec.weighted else None
        fields[spec.name] = FieldValues(offsets, ids, weights)
    return shard_table(scalars, fields, schema, fixture_num_embeddings(schema))


def write_prepared(
    root: Path,
    schema: FieldSchema,
    splits: dict[str, int],
    rows_per_file: int = 50,
    row_group_size: int = 16,
    seed: int = 0,
) -> dict[str, pa.Table]:
    """Write ``root/<split>/part-*.parquet`` + ``manifest.json``; returns each split's full table."""
    tables = {}
    first_id = 1
    for s_index, (split, rows) in enumerate(splits.items()):
        tables[split] = random_split_table(schema, rows, seed + 17 * s_index, first_sample_id=first_id)
        first_id += rows
    write_split_tables(root, schema, tables, fixture_num_embeddings(schema), rows_per_file, row_group_size)
    return tables
