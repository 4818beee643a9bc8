"""Per-request fields: stored once per request, joined onto impression rows by ``request_id``; no torch.

Ali-CCP's user features live in the common-features file, one line per request, and a request has
~58 impressions on average. Copying them onto every impression row (the ``per-row`` layout) makes
the full-shape set ~178 GB and ``prepare`` >= 42 min on 2 cores, 85 % of it spent copying ~509
history ids per row (docs/fullshape.md). In the ``per-request`` layout the shards keep
``request_id`` and lose those fields; each official split's requests are written once to
``requests/<split>.arrow``, which the loader memory-maps and gathers from. The joined rows are the
per-row layout's rows exactly (same vocabulary, same ids, same order), so models, batches and
checkpoints do not change.

Layout (``manifest["per_request"]``)::

    {"fields": ["101", ..., "150_14"],           # schema fields stored per request
     "key": "request_id",
     "files": [{"file": "requests/train.arrow", "first_request_id": 0, "requests": R_train},
               {"file": "requests/test.arrow", "first_request_id": R_train, "requests": R_test}],
     "ids_per_row": {"train": {"150_14": 41.2, ...}, "valid": {...}, "test": {...}}}

Each file is an uncompressed Arrow IPC file holding one record batch: row ``r`` is request
``first_request_id + r``; per field ``<name>`` a ``list<int32 not null>`` of table rows (int64 for a
table of >= 2^31 rows) and, for a weighted field, ``<name>__w`` a ``list<float32 not null>``.
Uncompressed and memory-mapped, so every rank and loader worker on a host shares one copy in the page
cache instead of holding its own. ``ids_per_row`` (mean ids per impression row, each request's ids
counted once per row that references it) feeds the planner's pooling factors, which the shards'
Parquet footers cannot give for these fields.

Example::

    store = RequestStore.open(prepared_root, manifest["per_request"])
    offsets, ids, weights = store.parts("150_14", request_ids)   # CSR of the rows' lists
    table = store.join(shard_table, ["150_14"])                   # the same as list columns
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

#: the manifest key of this layout's description
MANIFEST_KEY = "per_request"
#: folder of the request tables inside a prepared set
FOLDER = "requests"
#: ``--user-features`` values of ``prepare --format aliccp-raw``
LAYOUTS = ("per-request", "per-row")

Take = Callable[[np.ndarray, np.ndarray], np.ndarray]


def write_request_table(
    path: str | Path,
    fields: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    value_types: Mapping[str, pa.DataType],
) -> int:
    """Write one request table: per field ``(offsets [R + 1] from 0, table rows [nnz], weights
    [nnz] or None)`` of ``R`` requests, in request order. ``value_types``: each field's id type
    (``shards.id_type``). Returns the bytes written. One record batch, no compression (module doc)."""
    from ctnocvr_rec.data.shards import list_type

    columns: dict[str, pa.Array] = {}
    n_rows = None
    for name, (offsets, ids, weights) in fields.items():
        offsets = np.asarray(offsets)
        if n_rows is None:
            n_rows = len(offsets) - 1
        elif len(offsets) - 1 != n_rows:
            raise ValueError(f"write_request_table: field {name} has {len(offsets) - 1} requests, not {n_rows}")
        # int32 offsets hold < 2^31 ids per field; past that (a ~4x larger common file than Ali-CCP's)
        # the column becomes a large_list
        large = int(offsets[-1]) > np.iinfo(np.int32).max
        offset_array = pa.array(offsets.astype(np.int64 if large else np.int32, copy=False))
        value_type = value_types[name]
        id_array = pa.array(np.asarray(ids).astype(value_type.to_pandas_dtype(), copy=False), value_type)
        make = pa.LargeListArray.from_arrays if large else pa.ListArray.from_arrays
        list_of = (lambda t: pa.large_list(pa.field("element", t, nullable=False))) if large else list_type
        columns[name] = make(offset_array, id_array, type=list_of(value_type))
        if weights is not None:
            columns[f"{name}__w"] = make(offset_array, pa.array(np.asarray(weights, np.float32), pa.float32()),
                                         type=list_of(pa.float32()))
    batch = pa.RecordBatch.from_pydict(columns)
    batch = batch.cast(pa.schema([f.with_nullable(False) for f in batch.schema]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return path.stat().st_size


@dataclass
class _RequestFile:
    path: Path
    first: int
    requests: int
    batch: pa.RecordBatch
    source: Any  # the memory map, kept open while the batch is used

    def field(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets [R + 1] int64 from 0, values)`` of list column ``name`` (zero-copy values)."""
        index = self.batch.schema.get_field_index(name)
        if index < 0:
            raise ValueError(f"{self.path}: no column {name!r} (its columns: {self.batch.schema.names})")
        column = self.batch.column(index)
        offsets = column.offsets.to_numpy().astype(np.int64)
        values = column.values.to_numpy()
        return offsets - offsets[0], values[int(offsets[0]):int(offsets[-1])]


class RequestStore:
    """The request tables of a prepared set, memory-mapped; gathers rows' per-request fields.

    Open it in the process that reads (each DataLoader worker opens its own: a memory map does not
    travel through pickling; the pages are shared through the page cache anyway).
    """

    def __init__(self, root: Path, fields: Sequence[str], files: list[_RequestFile], where: str) -> None:
        self.root = root
        self.fields = tuple(fields)
        self.files = files
        self.where = where
        self._firsts = np.array([f.first for f in files], np.int64)
        self._ends = np.array([f.first + f.requests for f in files], np.int64)
        self._parts: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        self._single: dict[tuple[int, str], bool] = {}

    @classmethod
    def open(cls, root: str | Path, entry: Mapping[str, Any]) -> RequestStore:
        """From ``manifest["per_request"]`` (module doc); ``ValueError`` names the manifest entry or
        file that does not match."""
        root = Path(root)
        where = f"{root / 'manifest.json'}: {MANIFEST_KEY}"
        fields = entry.get("fields")
        if not isinstance(fields, list) or not fields:
            raise ValueError(f"{where}: 'fields' must be a non-empty list of field names")
        files = []
        for i, item in enumerate(entry.get("files") or []):
            try:
                path, first, count = root / str(item["file"]), int(item["first_request_id"]), int(item["requests"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}: files[{i}] needs file, first_request_id, requests") from None
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found ({where}.files[{i}])")
            source = pa.memory_map(str(path), "r")
            reader = ipc.open_file(source)
            if reader.num_record_batches != 1:
                raise ValueError(f"{path}: expected one record batch, found {reader.num_record_batches}")
            batch = reader.get_batch(0)
            if batch.num_rows != count:
                raise ValueError(f"{path}: {batch.num_rows} requests, the manifest says {count}")
            files.append(_RequestFile(path, first, count, batch, source))
        if not files:
            raise ValueError(f"{where}: 'files' is empty")
        files.sort(key=lambda f: f.first)
        for a, b in zip(files, files[1:]):
            if a.first + a.requests > b.first:
                raise ValueError(f"{where}: request ranges of {a.path.name} and {b.path.name} overlap")
        return cls(root, fields, files, where)

    def _field(self, k: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        key = (k, name)
        if key not in self._parts:
            self._parts[key] = self.files[k].field(name)
            offsets = self._parts[key][0]
            # one id per request (a profile field): the gather index is the request rows themselves
            self._single[key] = len(offsets) - 1 == int(offsets[-1]) and bool((np.diff(offsets) == 1).all())
        return self._parts[key]

    def _locate(self, request_ids: np.ndarray) -> np.ndarray:
        """File index of every request id; ``ValueError`` naming the first id outside every file."""
        k = np.searchsorted(self._firsts, request_ids, side="right") - 1
        bad = (k < 0) | (request_ids >= self._ends[np.maximum(k, 0)])
        if bad.any():
            rid = int(request_ids[np.flatnonzero(bad)[0]])
            ranges = ", ".join(f"{f.path.name} [{f.first}, {f.first + f.requests})" for f in self.files)
            raise ValueError(f"request_id {rid} is in no request table of {self.where} ({ranges}); "
                             f"{int(bad.sum())} row(s) affected: shards and request tables do not match")
        return k

    def parts(self, name: str, request_ids: np.ndarray, take: Take = np.take,
              weights: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Field ``name`` of rows whose requests are ``request_ids`` ``[n]``, as a CSR:
        ``(offsets [n + 1] int64 from 0, ids [nnz], weights [nnz] float32 or None)``; row ``i``'s
        list is request ``request_ids[i]``'s. ``take(values, index)``: the gather to use (the loader
        passes a faster one). ``weights=False`` skips the weight column."""
        from ctnocvr_rec.data.csr import csr_gather_index

        request_ids = np.asarray(request_ids, np.int64)
        k = self._locate(request_ids)
        has_weights = weights and self.files[0].batch.schema.get_field_index(f"{name}__w") >= 0
        pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        groups = [(int(k[0]), None)] if len(k) and (k == k[0]).all() else [
            (int(f), np.flatnonzero(k == f)) for f in np.unique(k)]
        for f, rows in groups:
            offsets, ids = self._field(f, name)
            rid = request_ids if rows is None else request_ids[rows]
            if self._single[(f, name)]:
                out_offsets, src = np.arange(len(rid) + 1, dtype=np.int64), rid - self.files[f].first
            else:
                out_offsets, src = csr_gather_index(offsets, rid - self.files[f].first)
            got_w = take(self._field(f, f"{name}__w")[1], src) if has_weights else None
            pieces.append((out_offsets, take(ids, src), got_w))
        if len(groups) <= 1:
            if not pieces:
                return np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32) if has_weights else None
            return pieces[0]
        # rows of several files (a split mixing requests of two official splits): back to row order
        order = np.concatenate([rows for _, rows in groups])
        lengths = np.concatenate([np.diff(p[0]) for p in pieces])
        ids = np.concatenate([p[1] for p in pieces])
        w = np.concatenate([p[2] for p in pieces]) if has_weights else None
        sorted_offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=sorted_offsets[1:])
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        out_offsets, src = csr_gather_index(sorted_offsets, position)
        return out_offsets, ids[src], None if w is None else w[src]

    def join(self, table: pa.Table, names: Sequence[str] | None = None) -> pa.Table:
        """``table`` (rows with a ``request_id`` column) plus list columns ``<name>`` (and ``__w``) of
        the per-request fields ``names`` (default: all), typed as the request tables store them."""
        from ctnocvr_rec.data.shards import list_type

        rid = table.column("request_id").to_numpy()
        for name in (self.fields if names is None else names):
            offsets, ids, w = self.parts(name, rid)
            index = self.files[0].batch.schema.get_field_index(name)
            value_type = self.files[0].batch.schema.field(index).type.value_type
            offset_array = pa.array(offsets.astype(np.int32))
            table = table.append_column(name, pa.ListArray.from_arrays(
                offset_array, pa.array(ids, value_type), type=list_type(value_type)))
            if w is not None:
                table = table.append_column(f"{name}__w", pa.ListArray.from_arrays(
                    offset_array, pa.array(w, pa.float32()), type=list_type(pa.float32())))
        return table


def ids_per_row(entry: Mapping[str, Any] | None, split: str) -> dict[str, float]:
    """``manifest["per_request"]["ids_per_row"][split]`` (empty when absent)."""
    if not entry:
        return {}
    return {str(k): float(v) for k, v in ((entry.get("ids_per_row") or {}).get(split) or {}).items()}
