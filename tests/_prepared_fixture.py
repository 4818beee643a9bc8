"""A tiny prepared set of random rows, written by the package's shard writer (``data/shards.py``).

Used by the loader and stats tests so they do not depend on ``ctnocvr data prepare``. A schema with
dense features (``schema.dense``) also gets its ``<name>__d`` columns: raw values drawn per split,
transformed by ``ctnocvr_rec/data/dense.py`` with stats fitted on the first split, the stats written
to the manifest's ``dense_stats``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ctnocvr_rec.data.dense import fit_dense_stats, transform_dense
from ctnocvr_rec.data.schema import DenseSpec, FieldSchema, load_schema
from ctnocvr_rec.data.shards import FieldValues, shard_table, write_split_tables

SCHEMA_NAME = "aliccp"  # the packaged ctnocvr_rec/configs/fields/aliccp.yaml


def aliccp_schema() -> FieldSchema:
    return load_schema(SCHEMA_NAME)


def aliccp_schema_with_dense(num_dense: int = 3) -> FieldSchema:
    """The aliccp fields plus dense ``x0, x1, ...``: ``x0`` log1p + standardised, ``x1`` standardised,
    the rest stored as they are."""
    dense = tuple(DenseSpec(f"x{k}", "log1p" if k == 0 else "none", k <= 1) for k in range(num_dense))
    base = aliccp_schema()
    return FieldSchema(base.fields, source=f"{base.source} + dense", dense=dense)


def raw_dense(schema: FieldSchema, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Raw values of every dense feature (exponential: skewed, non-negative, as counts)."""
    rng = np.random.default_rng([seed, 0xD])
    return {d.name: rng.exponential(2.0 + k, rows) for k, d in enumerate(schema.dense)}


def fixture_num_embeddings(schema: FieldSchema) -> dict[str, int]:
    """Table rows of field ``k``: ids are drawn from ``[0, 7 + 3k)``."""
    return {spec.name: 7 + 3 * k + 1 for k, spec in enumerate(schema)}


def random_split_table(schema: FieldSchema, rows: int, seed: int, first_sample_id: int = 1,
                       dense: dict[str, np.ndarray] | None = None) -> pa.Table:
    """Random rows: single-valued fields hold 0 or 1 id, multi-valued 0..4; valid label pairs only.
    ``dense``: stored values of every dense feature of ``schema`` (default: its raw values untransformed)."""
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
    if schema.dense and dense is None:
        dense = raw_dense(schema, rows, seed)
    return shard_table(scalars, fields, schema, fixture_num_embeddings(schema), dense=dense)


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
    raw = {split: raw_dense(schema, rows, seed + 17 * k) for k, (split, rows) in enumerate(splits.items())}
    first_split = next(iter(splits))
    stats = {d.name: {**fit_dense_stats(raw[first_split][d.name], d.transform), "transform": d.transform}
             for d in schema.dense}
    for s_index, (split, rows) in enumerate(splits.items()):
        stored = {d.name: transform_dense(raw[split][d.name], d.transform, d.standardize,
                                          stats[d.name]["mean"], stats[d.name]["std"])
                  for d in schema.dense} if schema.dense else None
        tables[split] = random_split_table(schema, rows, seed + 17 * s_index, first_sample_id=first_id, dense=stored)
        first_id += rows
    write_split_tables(root, schema, tables, fixture_num_embeddings(schema), rows_per_file, row_group_size,
                       dense_stats=stats or None)
    return tables
