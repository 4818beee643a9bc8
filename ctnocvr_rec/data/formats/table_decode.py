"""Decoding one record batch of a ``table`` input into raw labels, ids, weights and dense values.

Every value goes through the same code whatever the container: a CSV column is text, a Parquet column
is text, a number or a list; text is trimmed and an empty cell is *missing*, like a null. Rows with a
value that cannot be used are flagged once (the first problem in schema order) in a :class:`Problems`
and dropped by the caller; the rest are vectorised Arrow compute + numpy (no Python loop per row, only
per *flagged* row to word its reject).

Reasons (rejects.csv ``reason``): ``missing_value``, ``bad_label`` (not 0/1), ``bad_id`` (not an
integer id, or out of int64), ``bad_list`` (a null or empty item inside a list), ``bad_weight`` (a
missing / non-numeric weight, or not one weight per id), ``bad_dense_value`` (a dense value that is
not a number), ``bad_encoding`` (a CSV cell that is not UTF-8 text). A missing dense value (null, empty text) is passed on as NaN, like a Parquet NaN: the
writer rejects it (``dense_not_finite``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctnocvr_rec.data.formats.base import Reason, stable_id_hash
from ctnocvr_rec.data.formats.table_schema import CsvOptions, SparseBinding
from ctnocvr_rec.data.shards import FieldValues

MISSING_VALUE = "missing_value"
BAD_LABEL = Reason.BAD_LABEL
BAD_ID = "bad_id"
BAD_LIST = "bad_list"
BAD_WEIGHT = "bad_weight"
BAD_DENSE = Reason.BAD_DENSE
BAD_ENCODING = "bad_encoding"
WRONG_COLUMN_COUNT = Reason.WRONG_COLUMN_COUNT

_INT_TEXT = r"^[+-]?[0-9]+$"
_NUMBER_TEXT = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_INT64_MAX = np.iinfo(np.int64).max


class Problems:
    """Per row of a batch: ``None`` or the first ``(reason, detail)`` found for it."""

    def __init__(self, n: int) -> None:
        self.entries: list[tuple[str, str] | None] = [None] * n
        self.bad = np.zeros(n, bool)

    def flag(self, rows: np.ndarray, reason: str, detail: Callable[[int], str]) -> None:
        """Flag ``rows`` (bool ``[n]`` mask or row indices); ``detail(row)`` words the problem."""
        index = np.flatnonzero(rows) if rows.dtype == bool else np.unique(rows)
        for i in index[~self.bad[index]]:
            self.entries[int(i)] = (reason, detail(int(i)))
        self.bad[index] = True


def as_text(batch: pa.RecordBatch, problems: Problems) -> pa.RecordBatch:
    """``batch`` with its binary columns (CSV cells) as UTF-8 text; rows with a cell that is not UTF-8
    are flagged (their cells decoded with ``\\x..`` escapes, for the reject's raw text)."""
    columns = []
    for name, arr in zip(batch.schema.names, batch.columns):
        if pa.types.is_binary(arr.type):
            try:
                arr = arr.cast(pa.string())
            except pa.ArrowInvalid:  # find the bad cells the slow way (only in a batch that has one)
                cells = arr.to_pylist()
                bad = np.zeros(len(cells), bool)
                text = []
                for i, cell in enumerate(cells):
                    try:
                        text.append(cell.decode("utf-8"))
                    except UnicodeDecodeError:
                        bad[i] = True
                        text.append(cell.decode("utf-8", errors="backslashreplace"))
                arr = pa.array(text, pa.string())
                problems.flag(bad, BAD_ENCODING, lambda i, n=name, c=cells: f"column {n!r}: not UTF-8 text "
                                                                            f"({_show(c[i])})")
        columns.append(arr)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _unwrap(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _trimmed(arr: pa.Array) -> pa.Array:
    return pc.utf8_trim_whitespace(arr.cast(pa.string()))


def _missing(arr: pa.Array) -> np.ndarray:
    """Null, or empty text after trimming."""
    missing = arr.is_null()
    if is_text(arr.type):
        missing = pc.or_(missing, pc.equal(pc.utf8_length(_trimmed(arr)), 0))
    return missing.fill_null(True).to_numpy(zero_copy_only=False)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def numbers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(float64 [n], bad [n])`` of a numeric, boolean or text column (missing values: NaN, not bad)."""
    arr = _unwrap(arr)
    if is_text(arr.type):
        text = _trimmed(arr)
        ok = pc.match_substring_regex(text, _NUMBER_TEXT).fill_null(False)
        values = pc.if_else(ok, text, pa.scalar("nan")).cast(pa.float64())
        bad = pc.and_(pc.invert(ok), pc.greater(pc.utf8_length(text), 0)).fill_null(False)
        return values.to_numpy(zero_copy_only=False), bad.to_numpy(zero_copy_only=False)
    values = arr.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    return values, np.zeros(len(arr), bool)


def _element_ids(values: pa.Array, id_type: str) -> tuple[np.ndarray, np.ndarray]:
    """``(int64 ids, bad)`` of the (non-null) items of one field."""
    if id_type == "string":
        text = values.cast(pa.string()) if not is_text(values.type) else _trimmed(values)
        # each distinct text hashed once (ids repeat: users, categories)
        distinct = pc.dictionary_encode(text)
        hashed = stable_id_hash(distinct.dictionary.to_pylist())
        return hashed[distinct.indices.to_numpy(zero_copy_only=False)], np.zeros(len(values), bool)
    if pa.types.is_integer(values.type):
        bad = np.zeros(len(values), bool)
        if pa.types.is_uint64(values.type):
            bad = pc.greater(values, pa.scalar(_INT64_MAX, pa.uint64())).to_numpy(zero_copy_only=False)
            values = pc.if_else(pa.array(bad), pa.scalar(0, pa.uint64()), values)
        return values.cast(pa.int64()).to_numpy(zero_copy_only=False), bad
    text = _trimmed(values)
    ok = pc.match_substring_regex(text, _INT_TEXT).to_numpy(zero_copy_only=False)
    safe = pc.if_else(pa.array(ok), text, pa.scalar("0"))
    try:
        return safe.cast(pa.int64()).to_numpy(zero_copy_only=False), ~ok
    except pa.ArrowInvalid:  # an integer beyond int64 somewhere in the batch: find it the slow way
        ids = np.zeros(len(values), np.int64)
        for i, (good, item) in enumerate(zip(ok, safe.to_pylist())):
            number = int(item)
            if good and -_INT64_MAX - 1 <= number <= _INT64_MAX:
                ids[i] = number
            else:
                ok[i] = False
        return ids, ~ok


def labels(arr: pa.Array, column: str, problems: Problems) -> np.ndarray:
    """int8 ``[n]`` 0/1 labels of ``column``; flags missing and non-0/1 values."""
    values, bad = numbers(arr)
    missing = np.isnan(values) & ~bad
    bad |= ~missing & ~np.isin(values, (0.0, 1.0))
    show = _unwrap(arr)
    problems.flag(missing, MISSING_VALUE, lambda i: f"column {column!r} is empty")
    problems.flag(bad, BAD_LABEL, lambda i: f"column {column!r}: {_show(show[i].as_py())} is not 0 or 1")
    out = np.zeros(len(values), np.int8)
    out[~(missing | bad)] = values[~(missing | bad)].astype(np.int8)
    return out


def dense(arr: pa.Array, column: str, problems: Problems) -> np.ndarray:
    """float64 ``[n]`` raw dense values (missing: NaN, for the writer to reject); flags non-numeric text."""
    arr = _unwrap(arr)
    values, bad = numbers(arr)
    problems.flag(bad, BAD_DENSE, lambda i: f"column {column!r}: {_show(arr[i].as_py())} is not a number")
    return values


def row_ids(arr: pa.Array, column: str, id_type: str, problems: Problems) -> np.ndarray:
    """int64 ``[n]`` raw user / request ids (single-valued, required)."""
    arr = _unwrap(arr)
    missing = _missing(arr)
    ids, bad = _element_ids(pc.if_else(pa.array(missing), _blank(arr.type), arr), id_type)
    problems.flag(missing, MISSING_VALUE, lambda i: f"column {column!r} is empty")
    problems.flag(bad, BAD_ID, lambda i: f"column {column!r}: {_show(arr[i].as_py())} is not an integer id")
    return ids


def _blank(t: pa.DataType) -> pa.Scalar:
    """A stand-in value for missing cells (their result is discarded)."""
    return pa.scalar("0" if is_text(t) else 0, t)


def _as_lists(arr: pa.Array, multi: bool, delimiter: str) -> pa.Array:
    """The column as a list array: lists stay, multi-valued text is split, scalars are wrapped."""
    if is_list(arr.type):
        return arr
    if is_text(arr.type) and multi:
        return pc.split_pattern(_trimmed(arr), delimiter)
    return pa.ListArray.from_arrays(pa.array(np.arange(len(arr) + 1, dtype=np.int32)), arr)


def _flat(lists: pa.Array, missing: np.ndarray) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """``(lengths [n], items, parent row of each item)``, missing rows holding no items."""
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    lengths[missing] = 0
    parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    items = pc.list_flatten(lists)
    keep = ~missing[parent]
    return lengths, items.filter(pa.array(keep)), parent[keep]


def sparse_field(
    batch: pa.RecordBatch, binding: SparseBinding, csv: CsvOptions, problems: Problems
) -> FieldValues:
    """CSR of one field's raw ids (+ float32 weights) over all ``n`` rows of ``batch``."""
    spec, column = binding.spec, binding.column
    arr = _unwrap(batch.column(column))
    missing = _missing(arr)
    lists = _as_lists(arr, spec.multi_valued, csv.list_delimiter)
    lengths, items, parent = _flat(lists, missing)
    item_bad = items.is_null().to_numpy(zero_copy_only=False)
    if is_text(items.type):
        item_bad |= pc.equal(pc.utf8_length(_trimmed(items)), 0).fill_null(True).to_numpy(zero_copy_only=False)
    if not binding.allow_missing:
        problems.flag(missing, MISSING_VALUE, lambda i: f"column {column!r} (field {spec.name}) is empty")
    problems.flag(parent[item_bad], BAD_LIST,
                  lambda i: f"column {column!r} (field {spec.name}): {_show(arr[i].as_py())} has an empty item")
    items = pc.if_else(pa.array(item_bad), _blank(items.type), items)
    weights = None
    if spec.weighted and not binding.weight_column:
        # weights inside the text: "id<weight_delimiter>weight" items
        if not is_text(items.type):
            raise ValueError(f"field {spec.name}: weighted non-text column {column!r} needs a weight_column")
        parts = pc.split_pattern(_trimmed(items), csv.weight_delimiter, max_splits=1)
        not_pair = pc.list_value_length(parts).to_numpy(zero_copy_only=False) != 2
        parts = pc.if_else(pa.array(not_pair), pa.scalar(["0", "1"], parts.type), parts)
        no_weight = not_pair & ~item_bad
        items, weight_text = pc.list_element(parts, 0), pc.list_element(parts, 1)
        weights, weight_bad = numbers(weight_text)
        weight_bad |= np.isnan(weights) | no_weight
        problems.flag(parent[weight_bad & ~item_bad], BAD_WEIGHT,
                      lambda i: f"column {column!r} (field {spec.name}): {_show(arr[i].as_py())} needs "
                                f"id{csv.weight_delimiter}weight items with numeric weights")
    elif spec.weighted:
        weights = _parallel_weights(batch, binding, csv, missing, lengths, problems, arr)
    ids, id_bad = _element_ids(items, binding.id_type)
    problems.flag(parent[id_bad & ~item_bad], BAD_ID,
                  lambda i: f"column {column!r} (field {spec.name}): {_show(arr[i].as_py())} is not an integer id")
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return FieldValues(offsets, ids, None if weights is None else weights.astype(np.float32))


def _parallel_weights(
    batch: pa.RecordBatch, binding: SparseBinding, csv: CsvOptions, missing: np.ndarray,
    lengths: np.ndarray, problems: Problems, ids_arr: pa.Array,
) -> np.ndarray:
    """Weights from ``weight_column``: one per id of the row (rows whose count differs are flagged)."""
    name, column = binding.spec.name, binding.weight_column
    arr = _unwrap(batch.column(column))
    w_missing = _missing(arr) & ~missing
    lists = _as_lists(arr, binding.spec.multi_valued, csv.list_delimiter)
    w_lengths, items, parent = _flat(lists, missing)
    values, bad = numbers(items)
    bad |= np.isnan(values)
    wrong_count = (w_lengths != lengths) & ~missing & ~w_missing
    problems.flag(w_missing, BAD_WEIGHT, lambda i: f"weight column {column!r} (field {name}) is empty")
    problems.flag(wrong_count, BAD_WEIGHT,
                  lambda i: f"field {name}: {lengths[i]} id(s) in {binding.column!r} but {w_lengths[i]} "
                            f"weight(s) in {column!r}")
    problems.flag(parent[bad], BAD_WEIGHT,
                  lambda i: f"weight column {column!r} (field {name}): {_show(arr[i].as_py())} is not numeric")
    # rows flagged above are dropped; the kept rows have exactly one weight per id
    out = np.zeros(int(lengths.sum()), np.float64)
    ok_rows = ~problems.bad
    src = np.repeat(ok_rows, w_lengths)
    dst = np.repeat(ok_rows, lengths)
    out[dst] = values[src]
    return out


def keep_rows(values: FieldValues, keep: np.ndarray) -> FieldValues:
    """``values`` restricted to the rows where ``keep`` (bool ``[n]``) is true."""
    lengths = np.diff(values.offsets)
    item_keep = np.repeat(keep, lengths)
    offsets = np.zeros(int(keep.sum()) + 1, np.int64)
    np.cumsum(lengths[keep], out=offsets[1:])
    weights = None if values.weights is None else values.weights[item_keep]
    return FieldValues(offsets, values.ids[item_keep], weights)
