"""Shared reader of delimited text files with a header line whose columns are single integer ids, two
0/1 labels and float dense values (the community Ali-CCP CSVs: torch-rechub, AITM).

Rules (docs/formats.md, "CSV rules"):

* Columns are matched **by header name**: their order does not matter and other columns (a pandas
  index column ``Unnamed: 0`` or an unnamed leading column, anything else) are ignored and listed
  in the manifest. A required column missing from the header, or present twice, is an error
  naming file and column. A first line that looks like data (every value numeric) is an error
  ("no header line").
* Tolerated: a UTF-8 byte order mark, CRLF line ends, a missing final newline, blank lines (skipped,
  but counted in row numbers), spaces around values, integers written as floats (``3.0``).
* Rejected row by row (``file:row`` with the column and value): a wrong number of values on a line,
  an id that is not an integer (``x``, ``3.5``, empty), a label not in {0, 1}, a dense value that is
  not a number. Empty dense values and ``nan`` are read as NaN and rejected by the writer.
* Row numbers are data rows: row 1 is the line after the header (line = row + 1).
* No quoting: values are numbers; a quote character is an ordinary character (``"3"`` is rejected as
  non-numeric instead of joining lines). A lone carriage return inside a line stops the run with an
  error naming the rows (it would shift every later row number).
"""

from __future__ import annotations

import argparse
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ctnocvr_rec.data.formats.base import (
    MAX_CHUNK_ROWS,
    PrepareError,
    RawRows,
    Reason,
    Reject,
    add_split_file_arguments,
    raw_text,
    single_valued,
    split_files_from_args,
)
from ctnocvr_rec.data.rawfiles import UTF8_BOM
from ctnocvr_rec.data.schema import FieldSchema, load_schema

_INT_TEXT = r"^\s*[+-]?\d+(\.0*)?\s*$"
_FLOAT_TEXT = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$|^\s*[+-]?(nan|inf|infinity)\s*$"
_NUMBER = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")


@dataclass(frozen=True)
class CsvLayout:
    """Which header columns a format needs.

    Attributes:
        click: label column of the click (0/1).
        conversion: label column of the conversion (0/1).
        sparse: field name -> column of its single integer id.
        dense: dense feature name -> column of its float value.
        user_id: the field (a key of ``sparse``) whose raw id is also the row's user id (GAUC,
            ``--split-by user``), or "".
        delimiter: one character.
    """

    click: str
    conversion: str
    sparse: dict[str, str]
    dense: dict[str, str]
    user_id: str = ""
    delimiter: str = ","

    @property
    def required(self) -> list[str]:
        return [self.click, self.conversion, *self.sparse.values(), *self.dense.values()]


@dataclass(frozen=True)
class Header:
    names: list[str]  # every column of the file, in file order (stripped)
    data_start: int  # byte offset of the first data line
    bom: bool


def read_header(path: Path, layout: CsvLayout, format_name: str) -> Header:
    """The header of ``path`` checked against ``layout`` (:class:`PrepareError` names file and column)."""
    with open(path, "rb") as f:
        first = f.readline()
    bom = first.startswith(UTF8_BOM)
    line = first[len(UTF8_BOM):] if bom else first
    start = len(first)
    text = line.rstrip(b"\n").rstrip(b"\r").decode("utf-8", "replace")
    if not text.strip():
        raise PrepareError(f"{path}:1: empty first line; --format {format_name} needs a header line "
                           f"naming the columns ({', '.join(layout.required[:4])}, ...)")
    names = [n.strip().strip('"').strip() for n in text.split(layout.delimiter)]
    if all(_NUMBER.match(n) for n in names):
        raise PrepareError(
            f"{path}:1: no header line (the first line is data: {text[:80]!r}); --format {format_name} "
            f"matches columns by name: add the header line {layout.delimiter.join(layout.required)}")
    missing = [c for c in layout.required if c not in names]
    if missing:
        raise PrepareError(
            f"{path}:1: header lacks column(s) {missing} required by --format {format_name}; "
            f"header has {names}")
    twice = sorted({c for c in layout.required if names.count(c) > 1})
    if twice:
        raise PrepareError(f"{path}:1: column(s) {twice} appear more than once in the header")
    return Header(names, start, bom)


def _line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of each line of ``data`` (end excludes ``\\n`` and a ``\\r`` before it)."""
    buf = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(buf == 10)
    ends = nl if len(data) == 0 or data.endswith(b"\n") else np.r_[nl, len(data)]
    starts = np.r_[0, nl + 1][: len(ends)]
    has_cr = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13) if len(ends) else np.zeros(0, bool)
    return starts.astype(np.int64), (ends - has_cr).astype(np.int64)


def _chunks(path: Path, start: int, chunk_bytes: int) -> Iterator[bytes]:
    """Byte chunks of whole lines from ``start`` to the end of the file."""
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            block = f.read(chunk_bytes)
            if not block:
                return
            if not block.endswith(b"\n"):
                block += f.readline()
            yield block


class _ChunkParser:
    """Parses one byte chunk of data lines into a :class:`RawRows` (see the module rules)."""

    def __init__(self, path: Path, display: str, header: Header, layout: CsvLayout) -> None:
        self.path, self.display, self.header, self.layout = path, display, header, layout
        self.used = layout.required
        self.column_names = [n if n else f"_unnamed_{i}" for i, n in enumerate(header.names)]
        # a duplicated *ignored* name would confuse the reader: make every name unique
        seen: dict[str, int] = {}
        for i, n in enumerate(self.column_names):
            if n in seen:
                self.column_names[i] = f"{n}_{i}"
            seen.setdefault(n, i)

    def parse(self, data: bytes, row_base: int) -> tuple[RawRows, int]:
        """Rows of ``data`` (``row_base`` data rows came before it). Returns the rows and the number
        of lines in ``data`` (blank ones included)."""
        starts, ends = _line_bounds(data)
        # blank lines (nothing before the line end) are skipped by pyarrow too; they keep their row number
        nonblank = np.flatnonzero(ends > starts)
        invalid: list[tuple[int, str]] = []

        def on_invalid(row: Any) -> str:
            invalid.append((int(row.number), f"{row.actual_columns} values, the header has {row.expected_columns}"))
            return "skip"

        types = {n: pa.string() for n in self.column_names}
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(use_threads=False, column_names=self.column_names, block_size=len(data) + 1),
            # no quoting: these files hold numbers only, and a stray quote must cost one row, not
            # join lines (a quoted number is then a non-numeric reject)
            parse_options=pacsv.ParseOptions(delimiter=self.layout.delimiter, quote_char=False,
                                             invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types=types, include_columns=self.used, strings_can_be_null=False,
                quoted_strings_can_be_null=False),
        )
        # pyarrow numbers rows among non-blank lines (1-based): map back to lines of this chunk
        bad_index = np.array(sorted(n - 1 for n, _ in invalid), np.int64)
        if table.num_rows + len(invalid) != len(nonblank):
            raise PrepareError(
                f"{self.display}: rows {row_base + 1}..{row_base + len(starts)}: could not match parsed rows "
                f"to lines (a stray carriage return or quote?); first line: {data[:80]!r}")
        good_lines = np.delete(nonblank, bad_index)
        rejects = [
            Reject(self.display, row_base + int(nonblank[n - 1]) + 1, Reason.WRONG_COLUMN_COUNT,
                   why,
                   raw_text(data[starts[nonblank[n - 1]]:ends[nonblank[n - 1]]].decode("utf-8", "replace")))
            for n, why in sorted(invalid)
        ]
        rows = row_base + good_lines + 1
        n = table.num_rows
        bad = np.zeros(n, bool)
        first_problem: dict[int, tuple[str, str]] = {}

        def note(mask: np.ndarray, reason: str, column: str, values: pa.Array) -> None:
            for i in np.flatnonzero(mask & ~bad).tolist():
                first_problem[i] = (reason, f"field {column}: {values[i].as_py()!r}")
            bad[:] |= mask

        labels = {}
        for name in (self.layout.click, self.layout.conversion):
            values = table.column(name).combine_chunks()
            ints, ok = _to_int(values)
            okl = ok & ((ints == 0) | (ints == 1))
            note(~ok, Reason.BAD_LABEL, name, values)
            note(ok & ~okl, Reason.BAD_LABEL, name, values)
            labels[name] = np.where(okl, ints, 0).astype(np.int8)
        ids = {}
        for field, column in self.layout.sparse.items():
            values = table.column(column).combine_chunks()
            ints, ok = _to_int(values)
            note(~ok, Reason.NON_NUMERIC, column, values)
            ids[field] = ints
        dense = {}
        for name, column in self.layout.dense.items():
            values = table.column(column).combine_chunks()
            floats, ok = _to_float(values)
            note(~ok, Reason.BAD_DENSE, column, values)
            dense[name] = floats
        for i, (reason, detail) in sorted(first_problem.items()):
            line_index = int(good_lines[i])
            rejects.append(Reject(
                self.display, int(rows[i]), reason, detail,
                raw_text(data[starts[line_index]:ends[line_index]].decode("utf-8", "replace"))))
        rejects.sort(key=lambda r: r.row)
        keep = np.flatnonzero(~bad)
        user = ids[self.layout.user_id][keep] if self.layout.user_id else None
        out = RawRows(
            file=self.display,
            rows=rows[keep].astype(np.int64),
            click=labels[self.layout.click][keep],
            conversion=labels[self.layout.conversion][keep],
            sparse={f: single_valued(v[keep]) for f, v in ids.items()},
            dense={d: v[keep] for d, v in dense.items()},
            user_id=user,
            request_id=None,
            rejects=rejects,
            header_lines=1,
        )
        return out, len(starts)


def _to_int(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 values, ok mask) of integer text; ``3.0`` is 3; anything else is not ok (value 0)."""
    try:
        return pc.cast(values, pa.int64()).to_numpy(zero_copy_only=False), np.ones(len(values), bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    ok = pc.match_substring_regex(values, _INT_TEXT).to_numpy(zero_copy_only=False).astype(bool)
    trimmed = pc.replace_substring_regex(pc.utf8_trim_whitespace(values), r"\.0*$", "")
    cleaned = pc.if_else(pa.array(ok), trimmed, pa.scalar("0"))
    try:
        ints = pc.cast(cleaned, pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:  # out of int64 range: those values one by one
        ints = np.zeros(len(values), np.int64)
        for i, text in enumerate(cleaned.to_pylist()):
            try:
                ints[i] = int(text)
            except (OverflowError, ValueError):
                ok[i] = False
            else:
                if not -(1 << 63) <= int(text) < (1 << 63):
                    ok[i], ints[i] = False, 0
    return np.where(ok, ints, 0).astype(np.int64), ok


def _to_float(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, ok mask): numbers parse, empty text is NaN (missing), other text is not ok."""
    try:
        return pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False), np.ones(len(values), bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    trimmed = pc.utf8_trim_whitespace(values)
    empty = pc.equal(pc.utf8_length(trimmed), 0).to_numpy(zero_copy_only=False).astype(bool)
    ok = pc.match_substring_regex(trimmed, _FLOAT_TEXT, ignore_case=True).to_numpy(zero_copy_only=False).astype(bool)
    cleaned = pc.if_else(pa.array(ok), trimmed, pa.scalar("nan"))
    floats = pc.cast(cleaned, pa.float64()).to_numpy(zero_copy_only=False).copy()
    floats[empty] = np.nan
    return floats, ok | empty


def read_delimited(
    paths: list[Path], layout: CsvLayout, format_name: str, chunk_bytes: int = 8 << 20
) -> Iterator[RawRows]:
    """:class:`RawRows` of ``paths`` in order, chunks of whole lines of about ``chunk_bytes`` (and at
    most :data:`MAX_CHUNK_ROWS` rows)."""
    for path in paths:
        header = read_header(path, layout, format_name)
        parser = _ChunkParser(path, str(path), header, layout)
        row_base = 0
        for block in _chunks(path, header.data_start, chunk_bytes):
            for piece in _split_rows(block, MAX_CHUNK_ROWS):
                rows, lines = parser.parse(piece, row_base)
                row_base += lines
                yield rows


def _split_rows(block: bytes, max_rows: int) -> Iterator[bytes]:
    """``block`` cut into pieces of at most ``max_rows`` lines."""
    if block.count(b"\n") <= max_rows:
        yield block
        return
    nl = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
    start = 0
    for k in range(max_rows - 1, len(nl), max_rows):
        yield block[start:int(nl[k]) + 1]
        start = int(nl[k]) + 1
    if start < len(block):
        yield block[start:]


def describe(paths: list[Path], layout: CsvLayout, format_name: str) -> dict[str, Any]:
    """Manifest facts: per file the columns ignored (not required by the format)."""
    out = {}
    for path in paths:
        header = read_header(path, layout, format_name)
        out[str(path)] = {
            "byte_order_mark": header.bom,
            "ignored_columns": [n for n in header.names if n not in layout.required],
        }
    return out


# ----------------------------------------------------------------------------------------------
# A format of header CSV files (the community Ali-CCP formats are instances)
# ----------------------------------------------------------------------------------------------


def layout_for(schema: FieldSchema, user_field: str = "101") -> CsvLayout:
    """The columns to read: every field and dense feature of ``schema`` (a field's column is its name)."""
    return CsvLayout(
        click="click",
        conversion="purchase",
        sparse={spec.name: spec.name for spec in schema},
        dense={d.name: d.name for d in schema.dense},
        user_id=user_field if user_field in schema.names else "",
    )


class CsvSource:
    """An opened set of CSV files of one layout (any format built on :class:`CsvFormat`)."""

    def __init__(self, name: str, schema: FieldSchema, files: dict[str, list[Path]], chunk_bytes: int) -> None:
        self.name = name
        self.schema = schema
        self._files = files
        self.layout = layout_for(schema)
        self.chunk_bytes = chunk_bytes
        for paths in files.values():  # header problems surface before any work
            describe(paths, self.layout, name)

    def files(self) -> dict[str, list[Path]]:
        return self._files

    def read(self, split: str) -> Iterator[RawRows]:
        return read_delimited(self._files.get(split, []), self.layout, self.name, self.chunk_bytes)

    def describe(self) -> dict[str, Any]:
        paths = [p for ps in self._files.values() for p in ps]
        return {"files": describe(paths, self.layout, self.name)}


class CsvFormat:
    """A header-CSV format: ``--train/--valid/--test`` files and a packaged default schema."""

    def __init__(self, name: str, help_text: str, default_schema: str) -> None:
        self.name = name
        self.help = help_text
        self.default_schema = default_schema

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_split_file_arguments(parser)

    def open(self, args: argparse.Namespace) -> CsvSource:
        schema = load_schema(getattr(args, "schema", None) or self.default_schema)
        chunk_bytes = max(1, int(float(getattr(args, "chunk_mb", 8.0) or 8.0) * (1 << 20)))
        return CsvSource(self.name, schema, split_files_from_args(args, self.name), chunk_bytes)

    def options(self, args: argparse.Namespace) -> dict[str, Any]:
        return {}
