"""A tiny prepared set with learnable labels, for the trainer's tests and quick local runs.

Written directly with pyarrow in the layout of docs/design.md (no raw files, no ``prepare``): the
23 Ali-CCP schema fields with small vocabularies; ``click`` depends on the ids of fields 205 (item)
and 101 (user), ``conversion`` (given a click) on field 206, so a ranker's AUCs rise above 0.5
within a few dozen steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctnocvr_rec.data.schema import load_schema

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "configs" / "fields" / "aliccp.yaml"
VOCAB = 40  # ids 1..VOCAB-1 per field (0 = OOV), so num_embeddings = VOCAB


def _split_table(rows: int, seed: int, first_sample_id: int, users: int) -> pa.Table:
    schema = load_schema(SCHEMA_PATH)
    rng = np.random.default_rng(seed)
    effects = np.random.default_rng(1234).normal(0.0, 1.5, size=(3, VOCAB))  # same truth for all splits
    columns: dict[str, pa.Array] = {}
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
        columns[spec.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids, pa.int64()))
        if spec.weighted:
            weights = (0.5 + rng.random(offsets[-1])).astype(np.float32)
            columns[spec.weight_column] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(weights))
    logit_click = effects[0][first_ids["205"]] + effects[1][first_ids["101"]] - 1.5
    click = (rng.random(rows) < 1 / (1 + np.exp(-logit_click))).astype(np.int8)
    logit_conv = effects[2][first_ids["206"]] - 0.5
    conversion = (click * (rng.random(rows) < 1 / (1 + np.exp(-logit_conv)))).astype(np.int8)
    head = {
        "sample_id": pa.array(np.arange(first_sample_id, first_sample_id + rows), pa.int64()),
        "request_id": pa.array(rng.integers(0, max(1, rows // 4), rows), pa.int64()),
        "user_id": pa.array(first_ids["101"] % users, pa.int64()),
        "click": pa.array(click, pa.int8()),
        "conversion": pa.array(conversion, pa.int8()),
    }
    return pa.table({**head, **columns})


def write_tiny_prepared(root: str | Path, splits: dict[str, int] | None = None, rows_per_file: int = 1000,
                        seed: int = 0, users: int = 25) -> Path:
    """Write ``root/{train,valid,test}/part-*.parquet`` + ``manifest.json``; returns ``root``."""
    root = Path(root)
    splits = splits or {"train": 4000, "valid": 600, "test": 900}
    schema = load_schema(SCHEMA_PATH)
    first = 1
    info = {}
    for k, (split, rows) in enumerate(splits.items()):
        table = _split_table(rows, seed + 101 * k, first, users)
        first += rows
        (root / split).mkdir(parents=True, exist_ok=True)
        for part, start in enumerate(range(0, rows, rows_per_file)):
            pq.write_table(table.slice(start, rows_per_file), root / split / f"part-{part:05d}.parquet",
                           row_group_size=250)
        info[split] = {"rows": rows}
    manifest = {
        "schema": schema.to_dict(),
        "num_embeddings": {spec.name: VOCAB for spec in schema},
        "splits": info,
    }
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root
