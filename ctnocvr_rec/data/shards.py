"""The one writer of prepared-set shards (``<split>/part-*.parquet``): columns, types, Parquet options.

``ctnocvr data prepare`` and the test fixtures (``tests/_prepared_fixture.py``,
``ctnocvr_rec/train/testing.py``) all write shards through :func:`shard_table` +
:func:`write_shard`, so the layout the loader reads (design.md, "Prepared data set") is defined here
once. Layout 2 (``PrepareOptions.output_options()["layout"]``):

* scalar columns :data:`SCALAR_TYPES` (``sample_id``, ``request_id``, ``user_id`` int64; ``click``,
  ``conversion`` int8), dictionary-encoded;
* per schema field a non-nullable ``list<element: int32 not null>`` of table rows (int64 only for a
  table of more than 2^31 rows), and for a weighted field ``<name>__w`` a ``list<float32 not null>``
  with the same offsets; no dictionary pages on list columns (they cost the loader ~40% of its
  read speed); every column declared non-nullable (a shard holds no nulls);
* per dense feature of the schema (``schema.dense``) a float32 column ``<name>__d`` holding the
  transformed value (schema.py, "Dense features"), after the field columns.

Example::

    table = shard_table(
        {"sample_id": sid, "request_id": rid, "user_id": uid, "click": c, "conversion": v},
        {"101": FieldValues(offsets, ids), "853": FieldValues(offsets2, ids2, weights2), ...},
        schema, num_embeddings)
    write_shard(table, root / "train" / "part-00000.parquet")
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctnocvr_rec.data.schema import FieldSchema

#: the non-list columns of a shard, in file order, and their types
SCALAR_TYPES: dict[str, pa.DataType] = {
    "sample_id": pa.int64(),
    "request_id": pa.int64(),
    "user_id": pa.int64(),
    "click": pa.int8(),
    "conversion": pa.int8(),
}
SCALAR_COLUMNS = tuple(SCALAR_TYPES)
#: rows per Parquet row group of ``prepare``'s shards (the loader's unit of reading and shuffling)
ROW_GROUP_ROWS = 65_536


@dataclass(frozen=True)
class FieldValues:
    """One field's values of ``n`` rows in CSR form: row ``i`` holds ``ids[offsets[i]:offsets[i + 1]]``.

    Attributes:
        offsets: ``[n + 1]`` integer, starting at 0.
        ids: ``[offsets[-1]]`` table rows (already mapped: vocabulary row or hash bucket).
        weights: ``[offsets[-1]]`` float weights of a weighted field, else None.
    """

    offsets: np.ndarray
    ids: np.ndarray
    weights: np.ndarray | None = None


def id_type(num_embeddings: int) -> pa.DataType:
    """int32 when every mapped id of the field fits (always, short of a 2^31-row table): ~25%
    faster to decode and a third smaller than int64; the loader gives the KJT int64 either way."""
    return pa.int32() if num_embeddings <= np.iinfo(np.int32).max else pa.int64()


def list_type(value_type: pa.DataType) -> pa.DataType:
    # non-nullable items: no definition levels to decode per id (the loader reads ~40% faster)
    return pa.list_(pa.field("element", value_type, nullable=False))


def shard_table(
    scalars: Mapping[str, np.ndarray],
    fields: Mapping[str, FieldValues],
    schema: FieldSchema,
    num_embeddings: Mapping[str, int],
    dense: Mapping[str, np.ndarray] | None = None,
) -> pa.Table:
    """The shard of ``n`` rows in layout 2 (module docstring).

    ``scalars``: every column of :data:`SCALAR_COLUMNS`, ``[n]`` each; ``fields``: every field of
    ``schema`` (weights for the weighted ones); ``num_embeddings`` picks each field's id type;
    ``dense``: ``[n]`` transformed values of every dense feature of ``schema`` (by name).
    """
    dense = dense or {}
    missing = (
        [c for c in SCALAR_COLUMNS if c not in scalars]
        + [s.name for s in schema if s.name not in fields]
        + [d.name for d in schema.dense if d.name not in dense]
    )
    if missing:
        raise ValueError(f"shard_table: missing column(s) {missing}")
    columns: dict[str, pa.Array] = {
        name: pa.array(np.asarray(scalars[name]), type=type_) for name, type_ in SCALAR_TYPES.items()
    }
    for spec in schema:
        values = fields[spec.name]
        offsets = pa.array(np.asarray(values.offsets).astype(np.int32, copy=False))
        value_type = id_type(num_embeddings[spec.name])
        ids = np.asarray(values.ids).astype(value_type.to_pandas_dtype(), copy=False)
        columns[spec.name] = pa.ListArray.from_arrays(offsets, pa.array(ids, value_type), type=list_type(value_type))
        if spec.weighted:
            if values.weights is None:
                raise ValueError(f"shard_table: field {spec.name} is weighted but has no weights")
            columns[spec.weight_column] = pa.ListArray.from_arrays(
                offsets, pa.array(np.asarray(values.weights), pa.float32()), type=list_type(pa.float32())
            )
    for spec in schema.dense:
        values = np.asarray(dense[spec.name], dtype=np.float32)
        if not np.isfinite(values).all():
            raise ValueError(f"shard_table: dense feature {spec.name} has non-finite values")
        columns[spec.column] = pa.array(values, pa.float32())
    table = pa.table(columns)
    return table.cast(pa.schema([f.with_nullable(False) for f in table.schema]))


def write_shard(
    table: pa.Table, path: str | Path, compression: str = "lz4", row_group_size: int = ROW_GROUP_ROWS
) -> None:
    """Write one shard (a :func:`shard_table` or a row slice of one) to ``path``."""
    pq.write_table(
        table,
        path,
        compression=compression,
        row_group_size=row_group_size,
        # dictionary pages only for the scalar columns: for the id lists, dictionary decoding
        # cost the loader ~40% of its read speed (docs in PrepareOptions.compression)
        use_dictionary=list(SCALAR_COLUMNS),
    )


def write_split_tables(
    root: str | Path,
    schema: FieldSchema,
    tables: Mapping[str, pa.Table],
    num_embeddings: Mapping[str, int],
    rows_per_file: int,
    row_group_size: int = ROW_GROUP_ROWS,
    compression: str = "lz4",
    dense_stats: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """A small hand-made prepared set: each split's :func:`shard_table` cut into ``part-*.parquet`` of
    ``rows_per_file`` rows, plus a manifest with the schema, table sizes and per-split counts (the keys
    the trainer, loader, planner and ``data stats`` read). Used by test fixtures and quick local runs;
    ``ctnocvr data prepare`` writes its fuller manifest itself. Returns the manifest."""
    from ctnocvr_rec.data.prepared import FORMAT, write_manifest

    root = Path(root)
    splits: dict[str, dict[str, Any]] = {}
    for split, table in tables.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        files = []
        for part, start in enumerate(range(0, table.num_rows, rows_per_file)):
            rel = f"{split}/part-{part:05d}.parquet"
            write_shard(table.slice(start, rows_per_file), root / rel, compression, row_group_size)
            files.append(rel)
        splits[split] = {
            "rows": table.num_rows,
            "clicks": int(pc.sum(table.column("click")).as_py() or 0),
            "conversions": int(pc.sum(table.column("conversion")).as_py() or 0),
            "files": files,
        }
    manifest = {
        "format": FORMAT,
        "schema": schema.to_dict(),
        "num_embeddings": {spec.name: int(num_embeddings[spec.name]) for spec in schema},
        "splits": splits,
    }
    if schema.dense:
        # what the stored values went through (schema.py, "Dense features"); identity by default
        manifest["dense_stats"] = {
            d.name: dict((dense_stats or {}).get(d.name, {"mean": 0.0, "std": 1.0})) for d in schema.dense
        }
    write_manifest(root, manifest)
    return manifest
