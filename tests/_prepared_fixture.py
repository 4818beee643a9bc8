"""A tiny prepared set written directly with pyarrow in the layout of docs/design.md.

Used by the loader and stats tests so they do not depend on ``ctnocvr data prepare``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctnocvr_rec.data.schema import FieldSchema, load_schema

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "configs" / "fields" / "aliccp.yaml"


def aliccp_schema() -> FieldSchema:
    return load_schema(SCHEMA_PATH)


def random_split_table(schema: FieldSchema, rows: int, seed: int, first_sample_id: int = 1) -> pa.Table:
    """Random rows: single-valued fields hold 0 or 1 id, multi-valued 0..4; valid label pairs only."""
    rng = np.random.default_rng(seed)
    click = (rng.random(rows) < 0.3).astype(np.int8)
    conversion = (click * (rng.random(rows) < 0.4)).astype(np.int8)
    columns: dict[str, pa.Array] = {
        "sample_id": pa.array(np.arange(first_sample_id, first_sample_id + rows), pa.int64()),
        "request_id": pa.array(rng.integers(0, max(rows // 5, 1), rows), pa.int64()),
        "user_id": pa.array(np.where(rng.random(rows) < 0.1, -1, rng.integers(1000, 1040, rows)), pa.int64()),
        "click": pa.array(click, pa.int8()),
        "conversion": pa.array(conversion, pa.int8()),
    }
    for k, spec in enumerate(schema):
        max_len = 4 if spec.multi_valued else 1
        lengths = rng.integers(0, max_len + 1, rows)
        if not spec.multi_valued:
            lengths = (rng.random(rows) < 0.9).astype(np.int64)  # mostly present, sometimes absent
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = rng.integers(0, 7 + 3 * k, offsets[-1]).astype(np.int64)
        columns[spec.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids, pa.int64()))
        if spec.weighted:
            weights = rng.random(offsets[-1]).astype(np.float32) * 3
            columns[spec.weight_column] = pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(weights, pa.float32()))
    return pa.table(columns)


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
        table = random_split_table(schema, rows, seed + 17 * s_index, first_sample_id=first_id)
        first_id += rows
        (root / split).mkdir(parents=True, exist_ok=True)
        for part, start in enumerate(range(0, rows, rows_per_file)):
            pq.write_table(table.slice(start, rows_per_file), root / split / f"part-{part:05d}.parquet",
                           row_group_size=row_group_size)
        tables[split] = table
    manifest = {
        "schema": schema.to_dict(),
        "num_embeddings": {spec.name: 7 + 3 * k + 1 for k, spec in enumerate(schema)},
        "splits": {split: {"rows": t.num_rows} for split, t in tables.items()},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return tables
