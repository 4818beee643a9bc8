"""``ctnocvr data prepare --format table``: any Parquet or CSV files plus a table schema YAML.

::

    ctnocvr data prepare --format table --table-schema my_schema.yaml \\
        --train 'logs/train-*.parquet' --test logs/test.csv --out data/prepared/mine

The table schema (:mod:`~ctnocvr_rec.data.formats.table_schema`, ``docs/formats-table.md``) names the
label columns, the optional user / request id columns, the sparse fields and the dense features. The
files of a split are read in the order given (a glob's matches sorted), each in record batches of at
most :data:`BATCH_ROWS` rows (``ParquetFile.iter_batches``; ``pyarrow.csv.open_csv`` streaming, every
column as text), so memory does not grow with the input.

Before anything is read, every file is checked: it exists, its extension says Parquet (``.parquet``,
``.pq``) or CSV (``.csv``, ``.tsv``, optionally ``.gz`` / ``.bz2``), it has every column the schema
reads, and (Parquet) each column's type can hold what the schema says (e.g. ids are integers, text or
lists of them; not floats). Each problem is a :class:`PrepareError` naming the file and the column.

Rows: ``row`` is the 1-based data row of the file (the header is not counted); in a CSV file it is
on line ``row + 1`` (blank lines count as rows, and are rejected as missing values).
"""

from __future__ import annotations

import argparse
import glob
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ctnocvr_rec.data.formats import table_decode as decode
from ctnocvr_rec.data.formats.base import (
    MAX_CHUNK_ROWS,
    PrepareError,
    RawRows,
    Reject,
    add_split_file_arguments,
    raw_text,
)
from ctnocvr_rec.data.formats.table_schema import TableSchema, TableSchemaError, load_table_schema
from ctnocvr_rec.data.schema import FieldSchema
from ctnocvr_rec.yaml_strict import YamlError, load_yaml_file

#: rows per RawRows chunk (a Parquet batch; CSV blocks are cut to it)
BATCH_ROWS = min(65_536, MAX_CHUNK_ROWS)
CSV_BLOCK_BYTES = 4 << 20
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".tsv")
COMPRESSED_SUFFIXES = (".gz", ".bz2")
SPLITS = ("train", "valid", "test")


def file_kind(path: Path) -> str:
    """``"parquet"`` or ``"csv"`` from the file name (PrepareError otherwise)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in PARQUET_SUFFIXES and path.suffix.lower() not in COMPRESSED_SUFFIXES:
        return "parquet"
    if last in CSV_SUFFIXES:
        return "csv"
    raise PrepareError(f"{path}: cannot tell the file type from its name: use .parquet / .pq for Parquet, "
                       f".csv / .tsv (optionally .gz / .bz2) for CSV")


def expand(patterns: list[str], split: str) -> list[Path]:
    """The files of a split: paths as given, globs expanded (sorted); each must exist."""
    files: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise PrepareError(f"--{split} {pattern}: the pattern matches no file")
            files += [Path(m) for m in matches]
        else:
            files.append(Path(pattern))
    for path in files:
        if not path.is_file():
            raise PrepareError(f"--{split} {path}: no such file")
        file_kind(path)
    return files


# ---------------------------------------------------------------------------------------------
# Open-time checks: columns present, Parquet types usable
# ---------------------------------------------------------------------------------------------


def _base_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _type_problem(t: pa.DataType, role: str, table: TableSchema) -> str:
    """Why a Parquet column of type ``t`` cannot serve ``role`` ('' when it can)."""
    t = _base_type(t)
    item = _base_type(t.value_type) if decode.is_list(t) else t
    if role in ("click", "conversion"):
        ok = _is_number(t) or pa.types.is_boolean(t) or decode.is_text(t)
        return "" if ok else "a label column must hold 0/1 numbers, booleans or text"
    if role == "dense":
        return "" if (_is_number(t) or decode.is_text(t)) else "a dense column must hold numbers or text"
    if role in ("user_id", "request_id"):
        ok = pa.types.is_integer(t) or decode.is_text(t)
        return "" if ok else "an id column must hold integers or text (id_type: string)"
    binding = next(b for b in table.sparse if b.spec.name == role.split(":", 1)[1])
    if role.startswith("weights:"):
        ok = _is_number(item) or decode.is_text(item)
        return "" if ok else "a weight column must hold numbers, text or lists of numbers"
    if decode.is_list(t) and not binding.spec.multi_valued:
        return f"field {binding.spec.name} is single-valued but the column is a list (set multi_valued: true)"
    if not (pa.types.is_integer(item) or decode.is_text(item)):
        return f"field {binding.spec.name} needs integer or text ids (a float is not an id)"
    if binding.spec.weighted and not binding.weight_column and not decode.is_text(item):
        return (f"weighted field {binding.spec.name}: a non-text column needs 'weight_column' "
                f"(id:weight pairs only exist in text)")
    return ""


def _roles(table: TableSchema) -> list[tuple[str, str]]:
    """``(column, role)`` of every use of an input column."""
    roles = [(table.click, "click"), (table.conversion, "conversion")]
    roles += [(c.column, name) for name, c in (("user_id", table.user_id), ("request_id", table.request_id)) if c]
    for b in table.sparse:
        roles.append((b.column, f"field:{b.spec.name}"))
        if b.weight_column:
            roles.append((b.weight_column, f"weights:{b.spec.name}"))
    roles += [(d.column, "dense") for d in table.dense]
    return roles


def check_file(path: Path, table: TableSchema) -> list[str]:
    """The file's column names; PrepareError naming ``path`` and the column when the file cannot give
    what ``table`` reads."""
    if file_kind(path) == "parquet":
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as e:
            raise PrepareError(f"{path}: not a readable Parquet file: {e}") from None
        names = schema.names
    else:
        names = _csv_header(path, table)
    missing = [c for c in table.required_columns() if c not in names]
    if missing:
        raise PrepareError(f"{path}: missing column(s) {missing} that {table.source} reads; "
                           f"the file has {names[:40]}")
    twice = [c for c in table.required_columns() if names.count(c) > 1]
    if twice:
        raise PrepareError(f"{path}: column(s) {twice} appear more than once in the file (which one is meant?)")
    if file_kind(path) == "parquet":
        for column, role in _roles(table):
            problem = _type_problem(schema.field(column).type, role, table)
            if problem:
                raise PrepareError(f"{path}: column {column!r} has type {schema.field(column).type}: {problem}")
    return names


def _csv_header(path: Path, table: TableSchema) -> list[str]:
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 16, use_threads=False),
                                parse_options=pacsv.ParseOptions(delimiter=table.csv.delimiter,
                                                                 quote_char='"' if table.csv.quoting else False,
                                                                 invalid_row_handler=lambda row: "skip"),
                                convert_options=pacsv.ConvertOptions(column_types={}, include_columns=[]))
        names = reader.schema.names
    except (OSError, pa.ArrowException) as e:
        if "Empty CSV file" in str(e):
            raise PrepareError(f"{path}: empty file: a CSV input needs a header row") from None
        raise PrepareError(f"{path}: cannot read the CSV header: {e}") from None
    return names


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _batches_parquet(path: Path, columns: list[str]) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
        yield batch, np.arange(row + 1, row + batch.num_rows + 1, dtype=np.int64)
        row += batch.num_rows


def _batches_csv(path: Path, table: TableSchema, columns: list[str], bad_lines: list[Reject]) \
        -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """Record batches of ``columns`` as text, with their data-row numbers; rows with the wrong number of
    cells are not in any batch: they are appended to ``bad_lines`` (their numbers are skipped)."""
    skipped: set[int] = set()
    expected_cells = len(_csv_header(path, table))

    def on_invalid(row: pacsv.InvalidRow) -> str:
        data_row = row.number - 1
        skipped.add(data_row)
        bad_lines.append(Reject(str(path), data_row, decode.WRONG_COLUMN_COUNT,
                                f"line {row.number}: {row.actual_columns} cells, the header has {expected_cells}",
                                raw_text(row.text)))
        return "skip"

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=table.csv.delimiter, ignore_empty_lines=False,
                                         quote_char='"' if table.csv.quoting else False,
                                         invalid_row_handler=on_invalid),
        # binary, not string: a cell that is not UTF-8 rejects its row instead of failing the file
        convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in columns},
                                             include_columns=columns, strings_can_be_null=False),
    )
    next_row = 1
    for batch in _guarded(reader, path, lambda: next_row):  # noqa: B023 (late binding wanted: the row now)
        for start in range(0, batch.num_rows, BATCH_ROWS):
            part = batch.slice(start, BATCH_ROWS)
            # the next part.num_rows data-row numbers that are not skipped lines (the handler has
            # seen every malformed line of this block before the block is returned)
            ahead = np.array(sorted(r for r in skipped if r >= next_row), np.int64)
            numbers = np.setdiff1d(np.arange(next_row, next_row + part.num_rows + len(ahead)), ahead)
            numbers = numbers[: part.num_rows]
            if len(numbers):
                next_row = int(numbers[-1]) + 1
            skipped.difference_update(ahead[ahead < next_row].tolist())  # keep the set small
            yield part, numbers


def _guarded(batches: Iterator[pa.RecordBatch], path: Path, next_row: Callable[[], int]) \
        -> Iterator[pa.RecordBatch]:
    """``batches``, a CSV error that cannot be kept to one row made a PrepareError naming the file."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except pa.ArrowInvalid as e:
            raise PrepareError(f"{path}: unreadable CSV from data row {next_row()} "
                               f"(line {next_row() + 1}) on: {e}") from None
        yield batch


def _raw(batch: pa.RecordBatch, i: int) -> str:
    cells = batch.slice(i, 1).to_pylist()[0]
    return raw_text("; ".join(f"{k}={v!r}" for k, v in cells.items()))


def decode_batch(path: str, batch: pa.RecordBatch, rows: np.ndarray, table: TableSchema,
                 header_lines: int = 0) -> RawRows:
    """One record batch -> RawRows of its usable rows (+ Reject of the others, in row order).

    ``header_lines``: CSV 1 (a reject's detail then starts with its line, ``row + 1``), Parquet 0.
    """
    problems = decode.Problems(batch.num_rows)
    batch = decode.as_text(batch, problems)
    click = decode.labels(batch.column(table.click), table.click, problems)
    conversion = decode.labels(batch.column(table.conversion), table.conversion, problems)
    user = table.user_id and decode.row_ids(batch.column(table.user_id.column), table.user_id.column,
                                            table.user_id.id_type, problems)
    request = table.request_id and decode.row_ids(batch.column(table.request_id.column), table.request_id.column,
                                                  table.request_id.id_type, problems)
    sparse = {b.spec.name: decode.sparse_field(batch, b, table.csv, problems) for b in table.sparse}
    dense = {d.spec.name: decode.dense(batch.column(d.column), d.column, problems) for d in table.dense}
    keep = ~problems.bad
    rejects = []
    for i in np.flatnonzero(problems.bad):
        reason, detail = problems.entries[i]
        where = f"line {rows[i] + header_lines}: " if header_lines else ""
        rejects.append(Reject(path, int(rows[i]), reason, where + detail, _raw(batch, int(i))))
    return RawRows(
        file=path,
        rows=rows[keep],
        click=click[keep],
        conversion=conversion[keep],
        sparse={name: decode.keep_rows(values, keep) for name, values in sparse.items()},
        dense={name: values[keep] for name, values in dense.items()},
        user_id=None if user is None else user[keep],
        request_id=None if request is None else request[keep],
        rejects=rejects,
        header_lines=header_lines,
    )


def read_file(path: Path, table: TableSchema) -> Iterator[RawRows]:
    """RawRows chunks of one file, in file order (bounded memory: one record batch at a time)."""
    columns = table.required_columns()
    if file_kind(path) == "parquet":
        for batch, rows in _batches_parquet(path, columns):
            yield decode_batch(str(path), batch, rows, table)
        return
    bad_lines: list[Reject] = []
    for batch, rows in _batches_csv(path, table, columns, bad_lines):
        chunk = decode_batch(str(path), batch, rows, table, header_lines=1)
        chunk.rejects = sorted(chunk.rejects + _take(bad_lines, until=int(rows[-1]) if len(rows) else None),
                               key=lambda r: r.row)
        yield chunk
    if bad_lines:  # malformed lines after the last good row
        tail = _empty_rows(str(path), table)
        tail.rejects = _take(bad_lines, until=None)
        yield tail


def _take(bad_lines: list[Reject], until: int | None) -> list[Reject]:
    taken = [r for r in bad_lines if until is None or r.row < until]
    bad_lines[:] = [r for r in bad_lines if not (until is None or r.row < until)]
    return taken


def _empty_batch(columns: list[str]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({c: pa.array([], pa.string()) for c in columns})


def _empty_rows(path: str, table: TableSchema) -> RawRows:
    return decode_batch(path, _empty_batch(table.required_columns()), np.zeros(0, np.int64), table)


class TableSource:
    """An opened ``table`` input: the schema built from the YAML and the checked files per split."""

    def __init__(self, table: TableSchema, split_files: dict[str, list[Path]],
                 columns: dict[Path, list[str]] | None = None) -> None:
        self.table = table
        self.schema: FieldSchema = table.field_schema
        self._files = split_files
        self._columns = columns or {}

    def describe(self) -> dict[str, Any]:
        """Manifest facts: per file its kind and the columns the table schema does not read."""
        used = set(self.table.required_columns())
        return {"files": {str(path): {"kind": file_kind(path),
                                      "ignored_columns": [c for c in self._columns.get(path, []) if c not in used]}
                          for paths in self._files.values() for path in paths}}

    def files(self) -> dict[str, list[Path]]:
        return {split: list(paths) for split, paths in self._files.items()}

    def read(self, split: str) -> Iterator[RawRows]:
        for path in self._files.get(split, []):
            yield from read_file(path, self.table)


class TableFormat:
    """The ``table`` input format (registry entry ``FORMATS["table"]``)."""

    name = "table"
    help = "any Parquet / CSV files (--train/--valid/--test: files or globs) + --table-schema YAML"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_split_file_arguments(parser)  # --table: these may also be globs ('logs/*.parquet')
        parser.add_argument("--table-schema", metavar="YAML", default=None,
                            help="--format table: the YAML that maps input columns to the labels, user / request "
                                 "ids, sparse fields and dense features (docs/formats-table.md)")

    def options(self, args: argparse.Namespace) -> dict[str, Any]:
        """The table schema as written (it decides the output; recorded in the manifest)."""
        return {"table_schema": load_yaml_file(args.table_schema)}

    def open(self, args: argparse.Namespace) -> TableSource:
        if not getattr(args, "table_schema", None):
            raise PrepareError("--format table needs --table-schema YAML (docs/formats-table.md)")
        if not getattr(args, "train", None):
            raise PrepareError("--format table needs --train PATH... (Parquet or CSV files or globs)")
        if getattr(args, "schema", None):
            raise PrepareError("--schema: not used by --format table (its fields come from --table-schema)")
        try:
            table = load_table_schema(args.table_schema)
        except (TableSchemaError, YamlError) as e:
            raise PrepareError(str(e)) from None
        split_files = {s: expand(getattr(args, s), s) for s in SPLITS if getattr(args, s, None)}
        columns = {path: check_file(path, table) for paths in split_files.values() for path in paths}
        return TableSource(table, split_files, columns)


FORMAT = TableFormat()
