"""The reader interface of ``ctnocvr data prepare --format NAME``: what an input format hands the writer.

An input format turns files into :class:`RawRows` chunks of *raw* values (ids not yet mapped, dense
values not yet transformed, labels as read); the format-neutral writer
(:mod:`ctnocvr_rec.data.writer`) does everything else: the label-pair check, dense non-finite
rejects, the valid split, the train vocabulary, dense transforms, the seeded shuffle, shards,
manifest, rejects and ``--strict``. A format is one module with a module-level ``FORMAT`` object
(:class:`InputFormat`) plus one line in :data:`ctnocvr_rec.data.formats.FORMATS`; see
``docs/formats.md``.

Example (a reader yielding one chunk of two rows)::

    ids = np.array([7, 9], np.int64)
    yield RawRows(
        file="train.csv", rows=np.array([1, 2]), click=np.array([1, 0], np.int8),
        conversion=np.array([1, 0], np.int8), sparse={"205": single_valued(ids)},
        dense={"D508": np.array([0.5, np.nan])}, user_id=None, request_id=None, rejects=[])
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ctnocvr_rec.data.schema import FieldSchema
from ctnocvr_rec.data.shards import FieldValues

#: rows per :class:`RawRows` chunk a reader should not exceed (bounded memory)
MAX_CHUNK_ROWS = 262_144
#: characters of a rejected row's raw text kept in rejects.csv
RAW_TEXT_LIMIT = 300


class PrepareError(ValueError):
    """Bad input under ``--strict`` or an unusable input/output (message names file, row and field)."""


class Reason:
    """Reject reasons: the strings written to rejects.csv and counted in the manifest."""

    WRONG_COLUMN_COUNT = "wrong_column_count"
    NON_NUMERIC = "non_numeric"
    BAD_KEY = "bad_common_feature_index"
    MALFORMED_ITEM = "malformed_feature_item"
    FEATURE_NUM_MISMATCH = "feature_num_mismatch"
    BAD_LABEL = "bad_label"
    INVALID_LABEL_PAIR = "invalid_label_pair"
    UNKNOWN_COMMON = "unknown_common_feature_index"
    DUPLICATE_COMMON = "duplicate_common_feature_index"
    #: a dense value that is missing (empty, NaN) or infinite (checked by the writer)
    DENSE_NOT_FINITE = "dense_not_finite"
    #: a dense value that is not a number at all (checked by the reader)
    BAD_DENSE = "bad_dense_value"


@dataclass(frozen=True)
class Reject:
    """One input row kept aside: ``file:row``, why (a :class:`Reason`), the field and value, the raw text."""

    file: str
    row: int
    reason: str
    detail: str
    raw: str = ""


@dataclass
class RawRows:
    """A chunk of input rows in file order, raw (unmapped) values.

    Attributes:
        file: the input file, as given by the user.
        rows: int64 ``[n]`` 1-based data-row numbers in ``file`` (a header is not counted: for a CSV
            with one header line, the line number is ``row + header_lines``); rejects say ``file:row``.
        click: int8 ``[n]`` in {0, 1}.
        conversion: int8 ``[n]`` in {0, 1} (``click=0, conversion=1`` is rejected by the writer).
        sparse: per schema field a CSR of raw int64 ids (+ float32 weights for a weighted field).
            String ids are turned into int64 by :func:`stable_id_hash`.
        dense: per schema dense feature float64 ``[n]`` raw values (the writer applies the schema's
            transform); NaN = missing, rejected by the writer.
        user_id: int64 ``[n]`` raw user id (GAUC groups by it, ``--split-by user`` splits by it);
            None: -1 for every row.
        request_id: int64 ``[n]`` raw request id (ranking reports); None: -1.
        rejects: rows of this chunk the reader could not parse (not in the arrays above).
        header_lines: lines before data row 1 (CSV: 1; Parquet: 0), only to print line numbers.
    """

    file: str
    rows: np.ndarray
    click: np.ndarray
    conversion: np.ndarray
    sparse: dict[str, FieldValues]
    dense: dict[str, np.ndarray]
    user_id: np.ndarray | None = None
    request_id: np.ndarray | None = None
    rejects: list[Reject] = field(default_factory=list)
    header_lines: int = 0

    def __len__(self) -> int:
        return len(self.rows)


class InputSource(Protocol):
    """One opened input: its schema, its files per split and a chunked reader."""

    schema: FieldSchema

    def files(self) -> dict[str, list[Path]]:
        """``"train"`` (required), ``"valid"`` and ``"test"`` (optional) -> input files in read order."""
        ...

    def read(self, split: str) -> Iterator[RawRows]:
        """The rows of ``split``'s files in file order, chunks of at most :data:`MAX_CHUNK_ROWS` rows.
        Raises :class:`PrepareError` (file, row/line, column) on input it cannot read at all."""
        ...

    # Optional: ``describe() -> dict`` (JSON-able facts about the input: columns used, columns
    # ignored, header); the writer records it in the manifest under ``input``.


class InputFormat(Protocol):
    """A registered input format (``ctnocvr data prepare --format NAME``)."""

    name: str
    #: one line for ``--help`` (optional)
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this format's own options (use :func:`add_split_file_arguments` for --train/--valid/--test;
        other options should start with the format's name, e.g. ``--table-delimiter``)."""
        ...

    def open(self, args: argparse.Namespace) -> InputSource:
        """Check paths and options (:class:`PrepareError` on bad ones) and return the source."""
        ...

    def options(self, args: argparse.Namespace) -> dict[str, Any]:
        """Optional: the format options that change the output (fingerprint and manifest), JSON-able."""
        ...

    # Optional: ``prepare(args) -> manifest`` for a format that runs its own pipeline instead of
    # handing rows to the writer (only ``aliccp-raw``: its common-features join).


def add_split_file_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """``--train FILE [FILE ...]`` (required by file formats), ``--valid``, ``--test``: shared by every
    file-based format, added once however many formats call it."""
    specs = [
        ("--train", "train split input file(s), read in the order given (required)"),
        ("--valid", "valid split input file(s) (optional: without it, valid is carved from train "
                    "by --valid-fraction / --split-by)"),
        ("--test", "test split input file(s) (optional)"),
    ]
    for flag, text in specs:
        try:
            parser.add_argument(flag, nargs="+", default=None, metavar="FILE", help=text)
        except argparse.ArgumentError:  # another format added it already: same meaning
            pass


def split_files_from_args(args: argparse.Namespace, format_name: str) -> dict[str, list[Path]]:
    """``{"train": [...], "valid": [...], "test": [...]}`` from --train/--valid/--test, every file
    checked to exist (:class:`PrepareError` names the missing one)."""
    if not getattr(args, "train", None):
        raise PrepareError(f"--format {format_name} needs --train FILE (and optionally --valid, --test)")
    out: dict[str, list[Path]] = {}
    for split in ("train", "valid", "test"):
        given = getattr(args, split, None) or []
        paths = [Path(p) for p in given]
        for path in paths:
            if not path.is_file():
                raise PrepareError(f"{path}: no such file (--{split})")
        if paths:
            out[split] = paths
    return out


def single_valued(ids: np.ndarray) -> FieldValues:
    """The CSR of a single-valued field: one id per row."""
    ids = np.asarray(ids, np.int64)
    return FieldValues(np.arange(len(ids) + 1, dtype=np.int64), ids)


_HASH_MASK = np.uint64(0x7FFF_FFFF_FFFF_FFFF)


def stable_id_hash(values: Iterable[str | bytes]) -> np.ndarray:
    """int64 ``[n]``: a fixed, platform- and run-independent id for each string id.

    The rule (documented in docs/formats.md; it never changes, prepared sets depend on it): the first
    8 bytes of BLAKE2b (digest_size 8) of the value's UTF-8 bytes, read as a little-endian unsigned
    integer, with the top bit cleared (so ids are >= 0). Equal strings get equal ids; two different
    strings collide with probability ~n^2 / 2^64.

    >>> stable_id_hash(["u1", "u1", "u2"]).tolist()[0] == stable_id_hash(["u1"]).tolist()[0]
    True
    """
    digests = b"".join(
        hashlib.blake2b(v if isinstance(v, bytes) else str(v).encode("utf-8"), digest_size=8).digest()
        for v in values
    )
    return (np.frombuffer(digests, dtype="<u8") & _HASH_MASK).astype(np.int64)


def raw_text(text: str) -> str:
    """A rejected row's text for rejects.csv: control characters escaped (one physical line), cut at
    :data:`RAW_TEXT_LIMIT` characters."""
    clean = text.translate({0: "\\x00", 1: "\\x01", 2: "\\x02", 3: "\\x03", 10: "\\n", 13: "\\r"})
    return clean[:RAW_TEXT_LIMIT] + ("..." if len(clean) > RAW_TEXT_LIMIT else "")
