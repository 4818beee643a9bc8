"""Columns of a prepared split -> :class:`~ctnocvr_rec.data.batch.CtnocvrBatch`: the batch assembly.

:func:`table_to_batch` builds one batch from an Arrow table of a prepared split; the loader
(:mod:`ctnocvr_rec.data.dataset`) uses :class:`BatchRows` to cut many batches from one decoded window.

Batches are built vectorised from Arrow list offsets and values (numpy views, no copy), cut from
windows of batches: without the row shuffle a window is a run of consecutive batches; with it, each
field of the window is gathered once into the shuffled order (one ``index_select`` per field, not
per batch). Each batch is then copied into preallocated key-major arrays, a constant number of calls
per field; nothing loops over rows in Python. Dense features (``<name>__d`` float32 columns) are
stacked once per window into a ``[rows, D]`` array (one strided copy per column) and each batch
takes a copy of its ``[B, D]`` slice.

Fields stored once per request (``requests/<split>.arrow``, :mod:`ctnocvr_rec.data.requests`) are
gathered by the rows' ``request_id`` into the same per-field arrays a per-row shard gives.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctnocvr_rec.data.batch import CtnocvrBatch
from ctnocvr_rec.data.csr import csr_gather_index
from ctnocvr_rec.data.requests import RequestStore
from ctnocvr_rec.data.schema import FieldSchema, FieldSpec

#: non-feature columns of a prepared split (design.md, "Prepared data set")
ID_COLUMNS = ("sample_id", "request_id", "user_id")
LABEL_COLUMNS = ("click", "conversion")


def feature_columns(schema: FieldSchema) -> list[str]:
    """Parquet columns holding the features of ``schema`` (ids, then weights where weighted, then the
    ``<name>__d`` column of every dense feature)."""
    cols = []
    for spec in schema:
        cols.append(spec.name)
        if spec.weighted:
            cols.append(spec.weight_column)
    cols.extend(d.column for d in schema.dense)
    return cols


def _dense_matrix(table: pa.Table, schema: FieldSchema, order: np.ndarray | None) -> np.ndarray | None:
    """The dense columns of ``table`` as one float32 ``[n, D]`` array (rows in ``order`` when given),
    ``schema.dense`` order; None for a sparse-only schema. One strided copy per column."""
    if not schema.dense:
        return None
    n = table.num_rows if order is None else len(order)
    out = np.empty((n, len(schema.dense)), dtype=np.float32)
    for k, spec in enumerate(schema.dense):
        column = table.column(spec.column)
        if column.null_count:
            raise ValueError(f"column {spec.column!r} holds nulls; a prepared set stores every dense value")
        values = column.to_numpy()  # zero-copy for one chunk
        out[:, k] = values if order is None else values[order]
    if not np.isfinite(out).all():
        k = int(np.flatnonzero(~np.isfinite(out).all(axis=0))[0])
        raise ValueError(f"column {schema.dense[k].column!r} holds non-finite values")
    return out


def _list_parts(column: pa.ChunkedArray | pa.Array, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets [n + 1], values)`` of a list column as numpy views, without copying the ids.

    Row ``i`` owns ``values[offsets[i]:offsets[i + 1]]`` (``offsets[0]`` may be > 0 for a sliced
    column: ``values`` is the whole child array). Several chunks are concatenated first (one copy,
    only where a range spans two row groups). ``values`` keeps the stored dtype (int32 or int64).
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for chunk in chunks:
        if chunk.null_count:
            raise ValueError(f"column {name!r} holds null lists; a prepared set stores absent fields as []")
    if not chunks:
        return np.zeros(1, np.int32), np.zeros(0, np.int64)
    array = chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks)
    return array.offsets.to_numpy(), array.values.to_numpy()


def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[index]`` through torch's ``index_select``: ~2x faster than numpy's fancy indexing
    on these 1-D int32 / float32 arrays (measured: 21 vs 44 ms for the 15.7M ids of the demo split)."""
    with warnings.catch_warnings():
        # Arrow buffers are read-only; index_select only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(values)
    return torch.index_select(source, 0, torch.from_numpy(index)).numpy()


class BatchRows:
    """Rows of a prepared-split table as per-field numpy arrays, to cut batches from.

    Without ``order`` the arrays are zero-copy views of the Arrow buffers. With ``order`` (row
    indices, the rows of batch after batch) every field is gathered once into that order: one
    ``repeat`` and one ``index_select`` per field for the whole window, instead of a gather per
    batch. :meth:`batch` then copies contiguous slices into the KJT's key-major buffers, a constant
    number of numpy calls per field.
    """

    def __init__(self, table: pa.Table, schema: FieldSchema, order: np.ndarray | None = None,
                 requests: RequestStore | None = None) -> None:
        self.schema = schema
        self.n = table.num_rows if order is None else len(order)
        self.columns = {}
        for name in (*ID_COLUMNS, *LABEL_COLUMNS):
            col = table.column(name).to_numpy()
            self.columns[name] = col if order is None else col[order]
        per_request = set(requests.fields) if requests is not None else set()

        def one_field(spec: FieldSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
            """(offsets int32/int64 [n + 1] from 0, ids [nnz], weights float32 [nnz] or None)."""
            if spec.name in per_request:
                # stored once per request (data/requests.py): one gather by the rows' request ids,
                # already in ``order``, gives the same lists the per-row layout stores
                assert requests is not None
                return requests.parts(spec.name, self.columns["request_id"], take=_take, weights=spec.weighted)
            offsets, ids = _list_parts(table.column(spec.name), spec.name)
            weights = None
            if spec.weighted:
                w_offsets, weights = _list_parts(table.column(spec.weight_column), spec.weight_column)
                # same row lengths (the writer shares one offsets buffer; a foreign file may not)
                if len(w_offsets) != len(offsets) or not np.array_equal(
                        w_offsets - w_offsets[0], offsets - offsets[0]):
                    raise ValueError(f"{spec.weight_column}: weight lists do not match the id lists of {spec.name}")
                weights = weights[int(w_offsets[0]):int(w_offsets[-1])]
            ids = ids[int(offsets[0]):int(offsets[-1])]
            offsets = offsets - offsets[0]
            if order is not None:
                offsets, src = csr_gather_index(offsets, order)  # (int32 sources where they fit)
                ids = _take(ids, src)
                weights = _take(weights, src) if weights is not None else None
            return offsets, ids, weights

        # (two threads splitting the fields measured no faster on 2 cores: the read-ahead thread
        # and Arrow's decoding already use the second one)
        #: per field, in schema order: (offsets [n + 1], ids [nnz], weights [nnz] or None)
        self.fields: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = [one_field(s) for s in schema]
        # the weighted/unweighted split of the batch contract (data/batch.py), by schema position
        weighted_tables = schema.weighted_table_names
        self._weighted_index = [i for i, s in enumerate(schema) if s.table_name in weighted_tables]
        self._unweighted_index = [i for i, s in enumerate(schema) if s.table_name not in weighted_tables]
        self._weighted_keys = schema.weighted_feature_names
        self._unweighted_keys = schema.unweighted_feature_names
        #: ``[n, D]`` float32 dense features (row order as the fields), None for a sparse-only schema
        self.dense = _dense_matrix(table, schema, order)

    def _kjt(self, field_index: list[int], keys: list[str], lo: int, hi: int,
             weighted: bool) -> KeyedJaggedTensor:
        """Rows ``[lo, hi)`` of the fields ``field_index`` (schema positions) as one KJT.

        ``lengths`` int32, key-major (``[F * B]``: all rows of the first field, then the next ...);
        ``values`` the ids as stored: int32 (what the writer stores for tables under 2**31 rows, and
        the kernels' id dtype then, ``plan.sharding.id_dtype``: half the bytes of int64 through the
        workers' queues and the input all-to-all), int64 if any field stores int64; with ``weighted``,
        ``weights`` float32: the stored weight for weighted fields and 1.0 for plain fields of a
        weighted table. Without, no weights array at all.
        """
        b = hi - lo
        fields = [self.fields[i] for i in field_index]
        bounds = [(int(off[lo]), int(off[hi])) for off, _, _ in fields]
        total = sum(e - s for s, e in bounds)
        id_type = np.int32 if all(ids.dtype == np.int32 for _, ids, _ in fields) else np.int64
        values = np.empty(total, dtype=id_type)
        weights = np.empty(total, dtype=np.float32) if weighted else None
        lengths = np.empty(len(fields) * b, dtype=np.int32)
        pos = 0
        for f, ((off, ids, wts), (s, e)) in enumerate(zip(fields, bounds)):
            np.subtract(off[lo + 1:hi + 1], off[lo:hi], out=lengths[f * b:(f + 1) * b], casting="unsafe")
            values[pos:pos + e - s] = ids[s:e]  # (an int32 -> int64 cast, if any, rides on the copy)
            if weights is not None:
                weights[pos:pos + e - s] = 1.0 if wts is None else wts[s:e]
            pos += e - s
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(values),
            weights=None if weights is None else torch.from_numpy(weights),
            lengths=torch.from_numpy(lengths),
            stride=b,  # explicit: a KJT with no keys (every table weighted) cannot infer it
        )

    def batch(self, lo: int, hi: int) -> CtnocvrBatch:
        """Rows ``[lo, hi)`` (in this object's row order) as a batch.

        ``sparse_features``: unweighted KJT of the fields of unweighted tables; ``weighted_features``:
        weighted KJT of the fields of weighted tables, or ``None`` when there are none (the split is
        ``FieldSchema.weighted_table_names``). Keys ``f_<field>`` in schema order; layout in
        :meth:`_kjt`. ``dense``: float32 ``[B, D]`` (``FieldSchema.dense`` order) or None.
        """
        kjt = self._kjt(self._unweighted_index, self._unweighted_keys, lo, hi, weighted=False)
        weighted_kjt = (
            self._kjt(self._weighted_index, self._weighted_keys, lo, hi, weighted=True)
            if self._weighted_index else None
        )

        def column(name: str, dtype: type) -> torch.Tensor:
            # astype copies: Arrow buffers are read-only, and the batch tensors must be safe to modify
            return torch.from_numpy(self.columns[name][lo:hi].astype(dtype))

        return CtnocvrBatch.from_labels(
            kjt,
            click=column("click", np.float32),
            conversion=column("conversion", np.float32),
            sample_id=column("sample_id", np.int64),
            request_id=column("request_id", np.int64),
            user_id=column("user_id", np.int64),
            weighted_features=weighted_kjt,
            # a copy: the batch must not keep the window's whole array alive (or ship it to the
            # main process when built in a DataLoader worker)
            dense=None if self.dense is None else torch.from_numpy(self.dense[lo:hi].copy()),
        )


def table_to_batch(table: pa.Table, schema: FieldSchema, requests: RequestStore | None = None) -> CtnocvrBatch:
    """Build a :class:`CtnocvrBatch` from a prepared-split table of ``B`` rows, vectorised.

    Per field, the lengths are the differences of the list offsets and the ids are the
    ``[offsets[0], offsets[-1])`` window of the child values (this also handles sliced and chunked
    columns), copied straight into preallocated arrays; see :meth:`BatchRows.batch` for the layout.
    ``requests``: the prepared set's request store when some fields are stored per request
    (:mod:`ctnocvr_rec.data.requests`); their lists are gathered by the table's ``request_id``.
    """
    return BatchRows(table, schema, requests=requests).batch(0, table.num_rows)
