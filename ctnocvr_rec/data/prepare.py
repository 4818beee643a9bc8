"""`ctnocvr data prepare`: raw Ali-CCP csv -> shuffled Parquet shards + vocabulary + manifest.

Output layout and columns: ``docs/design.md`` ("Prepared data set").

Pipeline (per official split; train first because its vocabulary maps test):

1. **Common features** (``common_features_<split>.csv``): parsed in parallel byte-range chunks
   (:func:`~ctnocvr_rec.data.rawformat.parse_chunk`) into the only in-memory table: per user field
   a CSR of raw ids (+ weights), rows in file order, looked up by two 64-bit hashes of the
   ``common_feature_index`` and confirmed by the key's bytes (kept with the table): a key's identity is
   its bytes. Duplicate keys keep the first line; later ones are rejected. A UTF-8 byte order mark
   at the start of any file is skipped (:mod:`~ctnocvr_rec.data.rawfiles`).
2. **Pass 1 over the skeleton** (parallel chunks): parse, join each row to its common row (unknown
   keys are rejected), assign the split (valid carved from train by a seeded hash of ``sample_id`` or
   of the user id) and a shuffle bucket (seeded hash of the line's byte offset), and write the rows
   bucket-sorted to one Arrow IPC scratch file per chunk, skeleton ids still raw. Workers return id
   counts of train-split rows and how many train rows reference each common row.
3. **Vocabulary** (train only): skeleton-field counts from pass 1; user-field counts from the common
   table weighted by those reference counts (counts are impressions). Then the common table's ids
   are mapped once.
4. **Pass 2** (parallel over buckets): gather bucket ``b`` from every scratch file (in file order),
   map skeleton ids, join the user fields by CSR gathers, permute each split's rows with
   ``default_rng([seed, split, b])`` and write ``<split>/part-<b>.parquet``.

Memory is bounded by the common table plus two buckets (``--rows-per-shard`` rows each). The
output depends only on the input and the options (not on ``--workers`` or ``--chunk-mb``); it is
written to a temporary folder and renamed into place, and a re-run with unchanged inputs and options
is skipped (``--force`` rebuilds). A split given as input that ends up empty is an error unless
``--allow-empty-split``; temporary folders left by a killed run are removed by the next one.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ctnocvr_rec.data.prepared import FORMAT, PreparedSet, read_manifest, write_manifest
from ctnocvr_rec.data.rawfiles import (
    bom_length,
    chunk_ranges,
    read_range,
    remove_stale_temporaries,
    temporary_folder,
)
from ctnocvr_rec.data.rawformat import (
    COMMON,
    PAD,
    SKELETON,
    Csr,
    FieldSlots,
    FileKind,
    ParsedChunk,
    Reason,
    hash_key,
    padded_words,
    parse_chunk,
    tokens_equal,
    word_view,
)
from ctnocvr_rec.data.schema import DEFAULT_SCHEMA, FieldSchema, load_schema
from ctnocvr_rec.data.shards import FieldValues, shard_table, write_shard
from ctnocvr_rec.data.vocab import CountAccumulator, FieldVocab, merge_counts

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
USER_ID_FIELD = "101"
SKELETON_FILE = "sample_skeleton_{split}.csv"
COMMON_FILE = "common_features_{split}.csv"
MIN_BUCKETS = 4  # so that pass 2 keeps several cores busy even on a small split (fixed: output must not depend on cores)
RAW_LINE_LIMIT = 300  # characters of the raw line kept in rejects.csv


class PrepareError(ValueError):
    """Bad input under ``--strict`` or an unusable input/output folder (message names file and line)."""


@dataclass
class PrepareOptions:
    raw_dir: str
    out_dir: str
    schema: str = DEFAULT_SCHEMA  # packaged field schema name, or a YAML path
    valid_fraction: float = 0.1
    split_by: str = "row"  # row | user
    seed: int = 0
    workers: int = 0  # 0 = all cores
    chunk_mb: float = 8.0
    rows_per_shard: int = 262_144
    strict: bool = False
    #: accept a split that ends up with no rows (empty file or every row rejected); without it that
    #: is an error naming the split and its top reject reasons
    allow_empty_split: bool = False
    force: bool = False
    progress: bool = True
    #: Parquet codec of the shards. Measured on the demo train split (180k rows, ~87 ids per row,
    #: int32 non-null id lists, no dictionary; best of 3, load ~4 on 2 cores): pq read 0.78M rows/s
    #: with "none" (6.7x the zstd size), 0.69M "lz4" (2.3x), 0.33-0.49M "zstd" (1x). lz4 reads within
    #: ~10% of uncompressed at a third of its size; "none" for the last bit, "zstd" to save disk.
    compression: str = "lz4"

    def output_options(self) -> dict[str, Any]:
        """The options that change the output (fingerprint + manifest)."""
        return {
            "valid_fraction": self.valid_fraction,
            "split_by": self.split_by,
            "seed": self.seed,
            "rows_per_shard": self.rows_per_shard,
            "compression": self.compression,
            # shard layout: 2 = non-nullable id lists, int32 ids where they fit, no dictionary pages
            # on list columns (a changed layout must not count as up to date)
            "layout": 2,
        }


# ----------------------------------------------------------------------------------------------
# Seeded hashing (split and shuffle rules)
# ----------------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def seeded_unit(values: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """Uniform [0, 1) float64 per value, a pure function of (value, seed, stream)."""
    salt = _splitmix64(np.array([seed * 1_000_003 + stream], np.int64))[0]
    h = _splitmix64(values.astype(np.int64).view(np.uint64) ^ salt)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


SPLIT_STREAM, BUCKET_STREAM = 1, 2


# ----------------------------------------------------------------------------------------------
# Worker context (set in the parent before the pool forks; workers only read it)
# ----------------------------------------------------------------------------------------------


@dataclass
class CommonTable:
    """The common-features table of one split: user-field CSRs in file order plus a key index."""

    file: str
    lines_in: int
    sorted_h1: np.ndarray  # uint64 [R] key hashes, sorted
    sorted_h2: np.ndarray  # uint64 [R] second hash of the same keys
    sorted_row: np.ndarray  # int64 [R] table row of each sorted key
    line: np.ndarray  # int64 [R] 1-based line of each table row
    key_offsets: np.ndarray  # int64 [R + 1] key bytes of row r: key_padded[PAD + key_offsets[r] : ...[r + 1]]
    key_padded: np.ndarray  # uint8, the keys' bytes back to back with PAD zero bytes on each side
    slots: list[Csr]  # per user field; raw ids until map_ids()
    user_id: np.ndarray  # int64 [R] first field-101 id or -1
    rejected_keys: dict[tuple[int, int], tuple[int, str]]  # (h1, h2) -> (line, reason) of rejected lines
    rejects: list[tuple[str, int, str, str, str]]
    ignored: dict[str, int]

    @property
    def n_rows(self) -> int:
        return len(self.line)

    def lookup(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """Table row of each key hash pair, -1 when unknown (confirm hits with :meth:`same_keys`)."""
        if self.n_rows == 0:
            return np.full(len(h1), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.sorted_h1, h1), self.n_rows - 1)
        hit = (self.sorted_h1[pos] == h1) & (self.sorted_h2[pos] == h2)
        return np.where(hit, self.sorted_row[pos], -1)

    def same_keys(
        self, rows: np.ndarray, words: np.ndarray, start: np.ndarray, length: np.ndarray
    ) -> np.ndarray:
        """bool ``[n]``: table row ``rows[i]`` has exactly the key bytes ``words``-buffer
        ``[start[i], start[i] + length[i])`` (the exact check behind every hash hit)."""
        key_start = self.key_offsets[rows] + PAD
        key_len = self.key_offsets[rows + 1] - self.key_offsets[rows]
        return tokens_equal(word_view(self.key_padded), key_start, key_len, words, start, length)


@dataclass
class _Context:
    options: PrepareOptions
    schema: FieldSchema
    skeleton_slots: FieldSlots
    user_slots: FieldSlots
    scratch: Path
    common: CommonTable | None = None
    split_tag: str = ""  # official split being processed: train | test
    skeleton_path: str = ""
    skeleton_bom: int = 0  # bytes of the skeleton file's UTF-8 byte order mark (0 or 3)
    buckets: int = 1
    vocabs: dict[str, FieldVocab] = field(default_factory=dict)
    request_base: int = 0
    out_tmp: Path | None = None
    #: wall seconds per phase ("train/common", "train/pass1", ...), reported, never written
    timings: dict[str, float] = field(default_factory=dict)


_CTX: _Context | None = None


def _ctx() -> _Context:
    assert _CTX is not None, "worker context not set"
    return _CTX


# ----------------------------------------------------------------------------------------------
# Chunking and reading
# ----------------------------------------------------------------------------------------------


def _chunk_bytes(opts: PrepareOptions) -> int:
    return max(1, int(opts.chunk_mb * (1 << 20)))


def _line_text(raw: bytes) -> str:
    # control bytes shown escaped: a rejects.csv row stays one physical line
    text = raw.decode("utf-8", "replace").translate(
        {0: "\\x00", 1: "\\x01", 2: "\\x02", 3: "\\x03", 10: "\\n", 13: "\\r"}
    )
    return text[:RAW_LINE_LIMIT] + ("..." if len(text) > RAW_LINE_LIMIT else "")


def _key_of_line(raw: bytes, kind: FileKind) -> bytes | None:
    columns = raw.rstrip(b"\r").split(b",")
    return columns[kind.col(kind.key_column)] if len(columns) == kind.n_columns else None


# ----------------------------------------------------------------------------------------------
# Stage 1: common features
# ----------------------------------------------------------------------------------------------


@dataclass
class _CommonPart:
    n_lines: int
    chunk: ParsedChunk
    rejects: list[tuple[int, str, str, str, tuple[int, int] | None]]  # local line, reason, detail, raw, key hashes
    key_offsets: np.ndarray  # int64 [n + 1] into key_bytes, per accepted line
    key_bytes: np.ndarray  # uint8, the accepted lines' keys back to back
    line_offset: np.ndarray  # int64 [n] byte offset in the file of each accepted line


def _gather_tokens(buffer: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets int64 [n + 1], bytes uint8)``: the tokens ``buffer[start:start + length]`` back to back."""
    offsets = np.zeros(len(start) + 1, np.int64)
    np.cumsum(length, out=offsets[1:])
    index = np.arange(int(offsets[-1]), dtype=np.int64) + np.repeat(start - offsets[:-1], length)
    return offsets, buffer[index]


def _common_task(task: tuple[str, int, int]) -> _CommonPart:
    """Parse common-features bytes ``[start, end)`` (rejects carry their key hashes for later lookups)."""
    path, start, end = task
    data = read_range(path, start, end)
    chunk = parse_chunk(data, COMMON, _ctx().user_slots)
    rejects = []
    for r in chunk.rejects:
        raw = chunk.raw_line(data, r.line)
        key = _key_of_line(raw, COMMON)
        rejects.append((r.line, r.reason, r.detail, _line_text(raw), hash_key(key) if key else None))
    key_offsets, key_bytes = _gather_tokens(np.frombuffer(data, np.uint8), chunk.key_start, chunk.key_len)
    line_offset = start + chunk.line_starts[chunk.line]
    chunk.line_starts = chunk.line_ends = np.zeros(0, np.int64)  # not needed by the parent
    chunk.rejects = []
    return _CommonPart(chunk.n_lines, chunk, rejects, key_offsets, key_bytes, line_offset)


def _raw_line_at(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.readline().rstrip(b"\n").rstrip(b"\r")


def load_common(path: Path, ctx: _Context, pool: Any, progress: bool) -> CommonTable:
    """Parse a common-features file into a :class:`CommonTable` (duplicates and bad lines rejected).

    A key's identity is its bytes: rows are indexed by two 64-bit hashes of the key, and any two rows
    whose hashes are equal have their key bytes compared. Equal bytes are a duplicate (the first line
    wins, later ones are rejects); different bytes with equal hashes are a collision, which stops the
    run (never observed; it would otherwise merge two keys).
    """
    ranges = chunk_ranges(path, _chunk_bytes(ctx.options))
    tasks = [(str(path), s, e) for s, e in ranges]
    parts: list[ParsedChunk] = []
    rejects: list[tuple[str, int, str, str, str]] = []
    rejected_keys: dict[tuple[int, int], tuple[int, str]] = {}
    ignored: Counter[str] = Counter()
    line_base = 0
    lines: list[np.ndarray] = []
    key_offsets: list[np.ndarray] = []
    key_bytes: list[np.ndarray] = []
    line_offsets: list[np.ndarray] = []
    key_base = 0
    with _bar(os.path.getsize(path), f"common   {path.name}", progress) as bar:
        for (start, end), part in zip(ranges, _imap(pool, _common_task, tasks)):
            for line, reason, detail, raw, hashes in part.rejects:
                rejects.append((path.name, line_base + line + 1, reason, detail, raw))
                if hashes is not None:
                    rejected_keys.setdefault(hashes, (line_base + line + 1, reason))
            if ctx.options.strict and part.rejects:
                _raise_first(rejects, ctx.options.raw_dir)
            lines.append(part.chunk.line + line_base + 1)
            parts.append(part.chunk)
            key_offsets.append(part.key_offsets[:-1] + key_base)
            key_base += int(part.key_offsets[-1])
            key_bytes.append(part.key_bytes)
            line_offsets.append(part.line_offset)
            ignored.update(part.chunk.ignored)
            line_base += part.n_lines
            bar.update(end - start)
    line = np.concatenate(lines) if lines else np.zeros(0, np.int64)
    line_offset = np.concatenate(line_offsets) if line_offsets else np.zeros(0, np.int64)
    key_off = np.concatenate(key_offsets + [np.array([key_base], np.int64)])
    key_padded = padded_words(np.concatenate(key_bytes) if key_bytes else np.zeros(0, np.uint8))[0]
    h1 = np.concatenate([p.key_h1 for p in parts]) if parts else np.zeros(0, np.uint64)
    h2 = np.concatenate([p.key_h2 for p in parts]) if parts else np.zeros(0, np.uint64)
    slots = []
    for k, w in enumerate(ctx.user_slots.weighted):
        # one field at a time, freeing the chunk pieces as we go: peak = table + one field
        slots.append(Csr.concat([p.slots[k] for p in parts], w) if parts else Csr.empty(0, w))
        for p in parts:
            p.slots[k] = Csr.empty(0, w)
    # duplicate keys: the first line wins, later ones are rejects
    order = np.argsort(h1, kind="stable")
    same = h1[order][1:] == h1[order][:-1]
    if same.any():
        # the first occurrence of a run of equal h1 is the earliest line (stable sort)
        first_of_run = np.maximum.accumulate(np.where(np.r_[True, ~same], np.arange(len(order)), 0))
        dup_pos = np.flatnonzero(np.r_[False, same])
        dups, firsts = order[dup_pos], order[first_of_run[dup_pos]]
        key_words = word_view(key_padded)
        equal = (h2[dups] == h2[firsts]) & tokens_equal(
            key_words,
            key_off[dups] + PAD,
            key_off[dups + 1] - key_off[dups],
            key_words,
            key_off[firsts] + PAD,
            key_off[firsts + 1] - key_off[firsts],
        )
        if not equal.all():
            i = int(np.flatnonzero(~equal)[0])

            def key_text(r: int) -> str:
                return repr(key_padded[PAD + key_off[r] : PAD + key_off[r + 1]].tobytes())

            raise PrepareError(
                f"{path}:{int(line[dups[i]])}: field common_feature_index: {key_text(dups[i])} has the "
                f"same 64-bit hash as the different key {key_text(firsts[i])} of line {int(line[firsts[i]])}; "
                "stopping rather than merging two keys (please report this input)"
            )
        for dup, first in zip(dups.tolist(), firsts.tolist()):
            rejects.append(
                (
                    path.name,
                    int(line[dup]),
                    Reason.DUPLICATE_COMMON,
                    f"field common_feature_index: already defined at line {int(line[first])}",
                    _line_text(_raw_line_at(path, int(line_offset[dup]))),
                )
            )
        if ctx.options.strict:
            _raise_first(rejects, ctx.options.raw_dir)
        keep = np.ones(len(line), bool)
        keep[dups] = False
        rows = np.flatnonzero(keep)
        line, h1, h2 = line[rows], h1[rows], h2[rows]
        key_len = key_off[rows + 1] - key_off[rows]
        new_off = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(key_len, out=new_off[1:])
        kept_bytes = _gather_tokens(key_padded, key_off[rows] + PAD, key_len)[1]
        key_off, key_padded = new_off, padded_words(kept_bytes)[0]
        slots = [s.take(rows) for s in slots]
        order = np.argsort(h1, kind="stable")
    user_id = np.full(len(line), -1, np.int64)
    if USER_ID_FIELD in ctx.user_slots.names:
        users = slots[ctx.user_slots.names.index(USER_ID_FIELD)]
        has = users.lengths > 0
        user_id[has] = users.ids[users.offsets[:-1][has]]
    rejects.sort(key=lambda r: r[1])
    return CommonTable(
        file=path.name,
        lines_in=line_base,
        sorted_h1=h1[order],
        sorted_h2=h2[order],
        sorted_row=order.astype(np.int64),
        line=line,
        key_offsets=key_off,
        key_padded=key_padded,
        slots=slots,
        user_id=user_id,
        rejected_keys=rejected_keys,
        rejects=rejects,
        ignored=dict(ignored),
    )


# ----------------------------------------------------------------------------------------------
# Stage 2: pass 1 over the skeleton
# ----------------------------------------------------------------------------------------------


@dataclass
class _Pass1Result:
    chunk_index: int
    n_lines: int
    rejects: list[tuple[int, str, str, str]]  # local line, reason, detail, raw
    rows_by_split: dict[str, int]
    counts: list[tuple[np.ndarray, np.ndarray]]  # per skeleton slot, train-split rows only
    common_refs: tuple[np.ndarray, np.ndarray]  # (common rows, train-split row counts)
    ignored: dict[str, int]
    fast_lines: int


def _count_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids and their counts (a bincount when the id range is small, else a sort)."""
    if len(ids) and int(ids.min()) >= 0 and int(ids.max()) < 4 * len(ids) + 65_536:
        counts = np.bincount(ids)
        present = np.flatnonzero(counts)
        return present.astype(np.int64), counts[present].astype(np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    return uniq, counts.astype(np.int64)


def _scratch_file(ctx: _Context, chunk_index: int) -> Path:
    return ctx.scratch / ctx.split_tag / f"chunk-{chunk_index:06d}.arrow"


def _pass1_task(task: tuple[int, int, int]) -> _Pass1Result:
    """Parse skeleton bytes ``[start, end)``, join, split, bucket; write one scratch file.

    The scratch file (Arrow IPC) holds one record batch per bucket (rows in file order) with
    ``byte_offset, sample_id, click, buy, crow`` (common-table row), ``split`` (0 train, 1 valid,
    2 test) and per skeleton field its raw ids (+ ``__w`` weights).
    """
    chunk_index, start, end = task
    ctx = _ctx()
    opts = ctx.options
    common = ctx.common
    assert common is not None
    data = read_range(ctx.skeleton_path, start, end)
    chunk = parse_chunk(data, SKELETON, ctx.skeleton_slots)
    rejects = [(r.line, r.reason, r.detail, _line_text(chunk.raw_line(data, r.line))) for r in chunk.rejects]

    crow = common.lookup(chunk.key_h1, chunk.key_h2)
    hits = np.flatnonzero(crow >= 0)
    words = padded_words(np.frombuffer(data, np.uint8))[1]
    same = common.same_keys(crow[hits], words, chunk.key_start[hits] + PAD, chunk.key_len[hits])
    if not same.all():
        i = int(hits[np.flatnonzero(~same)[0]])
        line = int(chunk.line[i])
        file_line = read_range(ctx.skeleton_path, 0, start).count(b"\n") + line + 1  # rare path: count lines
        raise PrepareError(
            f"{ctx.skeleton_path}:{file_line}: field common_feature_index: "
            f"{_key_of_line(chunk.raw_line(data, line), SKELETON)!r} has the same 64-bit hashes as the "
            f"different key of {common.file}:{int(common.line[crow[i]])}; stopping rather than merging "
            "two keys (please report this input)"
        )
    unknown = np.flatnonzero(crow < 0)
    for i in unknown.tolist():
        line = int(chunk.line[i])
        raw = chunk.raw_line(data, line)
        key = _key_of_line(raw, SKELETON) or b""
        why = f"not in {common.file}"
        seen = common.rejected_keys.get((int(chunk.key_h1[i]), int(chunk.key_h2[i])))
        if seen is not None:
            why = f"its line {common.file}:{seen[0]} was rejected ({seen[1]})"
        detail = f"field common_feature_index: {key.decode('utf-8', 'replace')!r} {why}"
        rejects.append((line, Reason.UNKNOWN_COMMON, detail, _line_text(raw)))
    rejects.sort()
    keep = np.flatnonzero(crow >= 0)
    n = len(keep)
    crow = crow[keep]
    ints = chunk.ints[keep]
    sample_id, click, buy = ints[:, 0], ints[:, 1].astype(np.int8), ints[:, 2].astype(np.int8)
    # counted after a byte order mark: the shuffle does not depend on whether the file has one
    byte_offset = start - ctx.skeleton_bom + chunk.line_starts[chunk.line[keep]]
    slots = [s.take(keep) for s in chunk.slots] if len(unknown) else chunk.slots

    if ctx.split_tag == "train":
        split_key = sample_id if opts.split_by == "row" else common.user_id[crow]
        split = np.where(seeded_unit(split_key, opts.seed, SPLIT_STREAM) < opts.valid_fraction, 1, 0)
    else:
        split = np.full(n, SPLIT_CODES["test"])
    split = split.astype(np.int8)
    bucket = (seeded_unit(byte_offset, opts.seed, BUCKET_STREAM) * ctx.buckets).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(ctx.buckets + 1))

    columns: dict[str, pa.Array] = {
        "byte_offset": pa.array(byte_offset[order]),
        "sample_id": pa.array(sample_id[order]),
        "click": pa.array(click[order]),
        "buy": pa.array(buy[order]),
        "crow": pa.array(crow[order].astype(np.int32)),
        "split": pa.array(split[order]),
    }
    for k, name in enumerate(ctx.skeleton_slots.names):
        s = slots[k].take(order)
        columns[name] = pa.ListArray.from_arrays(pa.array(s.offsets.astype(np.int32)), pa.array(s.ids))
        if s.weights is not None:
            columns[name + "__w"] = pa.ListArray.from_arrays(
                pa.array(s.offsets.astype(np.int32)), pa.array(s.weights)
            )
    table = pa.table(columns).combine_chunks()
    batch = table.to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], table.schema)
    with ipc.new_file(_scratch_file(ctx, chunk_index), table.schema) as writer:
        for b in range(ctx.buckets):
            writer.write_batch(batch.slice(bounds[b], bounds[b + 1] - bounds[b]))

    counts: list[tuple[np.ndarray, np.ndarray]] = []
    refs = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    is_train = split == SPLIT_CODES["train"]
    if ctx.split_tag == "train":
        for s in slots:
            value_is_train = np.repeat(is_train, s.lengths)
            counts.append(_count_ids(s.ids[value_is_train]))
        refs = np.unique(crow[is_train], return_counts=True)
    rows_by_split = {
        name: int((split == code).sum()) for name, code in SPLIT_CODES.items() if (split == code).any()
    }
    return _Pass1Result(
        chunk_index, chunk.n_lines, rejects, rows_by_split, counts, refs, chunk.ignored, chunk.fast_lines
    )


# ----------------------------------------------------------------------------------------------
# Stage 4: pass 2 (bucket -> shuffled shards)
# ----------------------------------------------------------------------------------------------


def _list_parts(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 from 0, flat values) of a single-chunk list column, slice-safe."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = np.asarray(array.offsets, dtype=np.int64)
    return offsets - offsets[0], array.flatten().to_numpy()


def _pass2_task(task: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """Bucket ``b`` of every scratch file -> one shuffled shard per split present in it.

    Returns ``{split: {"file", "rows", "clicks", "conversions"}}`` of the shards written.
    """
    bucket, n_chunks = task
    ctx = _ctx()
    common = ctx.common
    assert common is not None and ctx.out_tmp is not None
    batches = []
    for c in range(n_chunks):
        with pa.memory_map(str(_scratch_file(ctx, c))) as source:
            batch = ipc.open_file(source).get_batch(bucket)
            if batch.num_rows:
                batches.append(batch)
    written: dict[str, dict[str, Any]] = {}
    if not batches:
        return written
    table = pa.Table.from_batches(batches).combine_chunks()
    split = table.column("split").to_numpy()
    crow_all = table.column("crow").to_numpy().astype(np.int64)
    skeleton = {}
    for name, weighted in zip(ctx.skeleton_slots.names, ctx.skeleton_slots.weighted):
        offsets, ids = _list_parts(table.column(name))
        weights = _list_parts(table.column(name + "__w"))[1] if weighted else None
        skeleton[name] = Csr(offsets, ctx.vocabs[name].map(ids), weights)
    for split_name, code in SPLIT_CODES.items():
        rows = np.flatnonzero(split == code)
        if len(rows) == 0:
            continue
        rng = np.random.default_rng([ctx.options.seed, code, bucket])
        rows = rows[rng.permutation(len(rows))]
        crow = crow_all[rows]
        click = table.column("click").to_numpy()[rows]
        buy = table.column("buy").to_numpy()[rows]
        scalars = {
            "sample_id": table.column("sample_id").to_numpy()[rows],
            "request_id": crow + ctx.request_base,
            "user_id": common.user_id[crow],
            "click": click,
            "conversion": buy,
        }
        fields: dict[str, FieldValues] = {}
        for spec in ctx.schema:
            if spec.is_user:
                csr = common.slots[ctx.user_slots.names.index(spec.name)].take(crow)
            else:
                csr = skeleton[spec.name].take(rows)
            fields[spec.name] = FieldValues(csr.offsets, csr.ids, csr.weights if spec.weighted else None)
        num_embeddings = {spec.name: ctx.vocabs[spec.name].num_embeddings for spec in ctx.schema}
        rel = f"{split_name}/part-{bucket:05d}.parquet"
        write_shard(shard_table(scalars, fields, ctx.schema, num_embeddings), ctx.out_tmp / rel,
                    compression=ctx.options.compression)
        written[split_name] = {
            "file": rel,
            "rows": len(rows),
            "clicks": int(click.sum()),
            "conversions": int(buy.sum()),
        }
    return written


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------


class _NullBar:
    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _bar(total: int, desc: str, enabled: bool, unit: str = "B") -> Any:
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=sys.stderr, leave=False)


def _imap(pool: Any, fn: Any, tasks: list[Any]) -> Iterator[Any]:
    if pool is None:
        return map(fn, tasks)
    return pool.imap(fn, tasks)


def _raise_first(rejects: Iterable[tuple[str, int, str, str, str]], folder: str) -> None:
    """--strict: the first reject (by line) as ``FILE:LINE: reason (field ...)``."""
    file, line, reason, detail, _ = min(rejects, key=lambda r: r[1])
    raise PrepareError(f"{Path(folder) / file}:{line}: {reason} ({detail})")


def _fork_pool(workers: int) -> Any:
    if workers <= 1:
        return None
    return multiprocessing.get_context("fork").Pool(workers)


class _Checksums:
    """sha256 of the source files, computed in a background thread (hashlib releases the GIL)."""

    def __init__(self, paths: list[Path]) -> None:
        self.result: dict[str, str] = {}
        self.thread = threading.Thread(target=self._run, args=(paths,), daemon=True)
        self.thread.start()

    def _run(self, paths: list[Path]) -> None:
        for path in paths:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(4 << 20):
                    h.update(block)
            self.result[path.name] = h.hexdigest()

    def get(self) -> dict[str, str]:
        self.thread.join()
        return self.result


def _fingerprint(opts: PrepareOptions, schema: FieldSchema, sources: list[Path]) -> str:
    tree = {
        "format": FORMAT,
        "options": opts.output_options(),
        "schema": schema.to_dict(),
        "sources": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sources],
    }
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def _estimate_rows(path: Path) -> int:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if not head:
        return 1
    lines = max(head.count(b"\n"), 1)
    return max(1, math.ceil(size / (len(head) / lines)))


def _process_split(
    split_tag: str, ctx: _Context, rejects: list[tuple[str, int, str, str, str]], report: dict[str, Any]
) -> None:
    """Common table, pass 1, (vocab for train), pass 2 for one official split."""
    global _CTX
    opts = ctx.options
    raw = Path(opts.raw_dir)
    skeleton_path = raw / SKELETON_FILE.format(split=split_tag)
    common_path = raw / COMMON_FILE.format(split=split_tag)
    ctx.split_tag = split_tag
    ctx.skeleton_path = str(skeleton_path)
    ctx.skeleton_bom = bom_length(skeleton_path)
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        ctx.timings[f"{split_tag}/{phase}"] = now - clock
        clock = now

    _CTX = ctx
    pool = _fork_pool(opts.workers)
    try:
        common = load_common(common_path, ctx, pool, opts.progress)
    finally:
        if pool is not None:
            pool.terminate()
    rejects.extend(common.rejects)
    ctx.common = common
    lap("common")

    # pass 1
    ctx.buckets = max(MIN_BUCKETS, math.ceil(_estimate_rows(skeleton_path) / opts.rows_per_shard))
    (ctx.scratch / split_tag).mkdir(parents=True, exist_ok=True)
    ranges = chunk_ranges(skeleton_path, _chunk_bytes(opts))
    tasks = [(i, s, e) for i, (s, e) in enumerate(ranges)]
    counters = [CountAccumulator() for _ in ctx.skeleton_slots.names]
    refs: list[tuple[np.ndarray, np.ndarray]] = []
    rows_by_split: Counter[str] = Counter()
    ignored: Counter[str] = Counter()
    skeleton_rejects: list[tuple[str, int, str, str, str]] = []
    line_base = fast_lines = 0
    _CTX = ctx
    pool = _fork_pool(opts.workers)
    try:
        with _bar(skeleton_path.stat().st_size, f"skeleton {skeleton_path.name}", opts.progress) as bar:
            for (start, end), res in zip(ranges, _imap(pool, _pass1_task, tasks)):
                for line, reason, detail, raw_text in res.rejects:
                    skeleton_rejects.append(
                        (skeleton_path.name, line_base + line + 1, reason, detail, raw_text)
                    )
                if opts.strict and res.rejects:
                    _raise_first(skeleton_rejects, opts.raw_dir)
                for counter, (ids, counts) in zip(counters, res.counts):
                    counter.add(ids, counts)
                refs.append(res.common_refs)
                rows_by_split.update(res.rows_by_split)
                ignored.update(res.ignored)
                line_base += res.n_lines
                fast_lines += res.fast_lines
                bar.update(end - start)
    finally:
        if pool is not None:
            pool.terminate()
    rejects.extend(skeleton_rejects)
    lap("pass1")

    # vocabulary (train only), then map the common table once
    if split_tag == "train":
        ref_rows, ref_counts = merge_counts(refs)
        row_refs = np.zeros(common.n_rows, np.int64)
        row_refs[ref_rows] = ref_counts
        for spec in ctx.schema:
            if spec.is_user:
                csr = common.slots[ctx.user_slots.names.index(spec.name)]
                weight = np.repeat(row_refs, csr.lengths)
                ids, inverse = np.unique(csr.ids, return_inverse=True)
                counts = np.bincount(inverse, weights=weight, minlength=len(ids)).astype(np.int64)
                seen = counts > 0
                ids, counts = ids[seen], counts[seen]
            else:
                ids, counts = counters[ctx.skeleton_slots.names.index(spec.name)].result()
            ctx.vocabs[spec.name] = FieldVocab.build(spec, ids, counts)
    for k, name in enumerate(ctx.user_slots.names):
        csr = common.slots[k]
        common.slots[k] = Csr(csr.offsets, ctx.vocabs[name].map(csr.ids), csr.weights)

    lap("vocab")

    # pass 2
    assert ctx.out_tmp is not None
    for split_name in SPLIT_CODES:
        (ctx.out_tmp / split_name).mkdir(exist_ok=True)
    files: dict[str, list[dict[str, Any]]] = {}
    _CTX = ctx
    pool = _fork_pool(opts.workers)
    try:
        with _bar(ctx.buckets, f"shards   {split_tag}", opts.progress, unit="bucket") as bar:
            for written in _imap(pool, _pass2_task, [(b, len(ranges)) for b in range(ctx.buckets)]):
                for split_name, info in written.items():
                    files.setdefault(split_name, []).append(info)
                bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()
    shutil.rmtree(ctx.scratch / split_tag)
    lap("pass2")

    rows_written = sum(rows_by_split.values())
    report["files"][split_tag] = {
        "skeleton": {
            "file": skeleton_path.name,
            "rows_in": line_base,
            "rows_written": rows_written,
            "rows_rejected": len(skeleton_rejects),
            "rows_parsed_by_exact_path": line_base - fast_lines,
            "ignored_field_values": dict(sorted(ignored.items())),
        },
        "common": {
            "file": common_path.name,
            "rows_in": common.lines_in,
            "rows_kept": common.n_rows,
            "rows_rejected": len(common.rejects),
            "ignored_field_values": dict(sorted(common.ignored.items())),
        },
        "buckets": ctx.buckets,
    }
    for split_name, infos in files.items():
        entry = report["splits"].setdefault(
            split_name, {"rows": 0, "clicks": 0, "conversions": 0, "files": []}
        )
        for info in infos:
            entry["rows"] += info["rows"]
            entry["clicks"] += info["clicks"]
            entry["conversions"] += info["conversions"]
            entry["files"].append(info["file"])
    ctx.request_base += common.n_rows
    ctx.common = None
    _CTX = None


def _write_rejects(path: Path, rejects: list[tuple[str, int, str, str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", "line", "reason", "detail", "raw"])
        writer.writerows(rejects)


def prepare(opts: PrepareOptions) -> dict[str, Any]:
    """Run the whole preparation; returns the manifest (also written to ``<out>/manifest.json``)."""
    if not 0.0 <= opts.valid_fraction < 1.0:
        raise PrepareError(f"--valid-fraction must be in [0, 1), got {opts.valid_fraction}")
    if opts.split_by not in ("row", "user"):
        raise PrepareError(f"--split-by must be row or user, got {opts.split_by!r}")
    if opts.rows_per_shard < 1:
        raise PrepareError("--rows-per-shard must be >= 1")
    if opts.workers <= 0:
        opts.workers = os.cpu_count() or 1
    raw = Path(opts.raw_dir)
    out = Path(opts.out_dir)
    schema = load_schema(opts.schema)
    if opts.split_by == "user" and USER_ID_FIELD not in [s.name for s in schema.user_fields]:
        raise PrepareError(f"--split-by user needs the user-id field {USER_ID_FIELD!r} in {opts.schema}")
    splits = ["train"]
    for name in (SKELETON_FILE, COMMON_FILE):
        if not (raw / name.format(split="train")).is_file():
            raise PrepareError(f"{raw / name.format(split='train')}: missing (the train split is required)")
    test_files = [raw / n.format(split="test") for n in (SKELETON_FILE, COMMON_FILE)]
    if all(p.is_file() for p in test_files):
        splits.append("test")
    elif any(p.is_file() for p in test_files):
        missing = [str(p) for p in test_files if not p.is_file()]
        raise PrepareError(f"test split incomplete: missing {missing}")
    sources = [raw / n.format(split=s) for s in splits for n in (SKELETON_FILE, COMMON_FILE)]
    fingerprint = _fingerprint(opts, schema, sources)
    if out.exists():
        if PreparedSet.exists(out):
            old = read_manifest(out)
            if old.get("fingerprint") == fingerprint and not opts.force:
                if opts.progress:
                    print(f"{out}: up to date (same inputs and options); --force rebuilds", file=sys.stderr)
                return old
        elif any(out.iterdir()):
            raise PrepareError(f"{out}: exists, is not empty and holds no manifest.json; not overwriting it")

    t0 = time.perf_counter()
    remove_stale_temporaries(out)
    checksums = _Checksums(sources)
    tmp = temporary_folder(out, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "vocab").mkdir(parents=True)
    (tmp / "rejects").mkdir()
    user_specs = schema.user_fields
    skeleton_specs = schema.skeleton_fields
    ctx = _Context(
        options=opts,
        schema=schema,
        skeleton_slots=FieldSlots(
            tuple(s.name for s in skeleton_specs), tuple(s.weighted for s in skeleton_specs)
        ),
        user_slots=FieldSlots(tuple(s.name for s in user_specs), tuple(s.weighted for s in user_specs)),
        scratch=tmp / "_scratch",
        out_tmp=tmp,
    )
    rejects: list[tuple[str, int, str, str, str]] = []
    report: dict[str, Any] = {"files": {}, "splits": {}}
    try:
        for split_tag in splits:
            _process_split(split_tag, ctx, rejects, report)
        shutil.rmtree(ctx.scratch, ignore_errors=True)
        if not opts.allow_empty_split:
            _check_no_empty_split(opts, splits, report, rejects)
        for split_name in SPLIT_CODES:
            if not any((tmp / split_name).iterdir()):
                (tmp / split_name).rmdir()
        for vocab in ctx.vocabs.values():
            vocab.save(tmp / "vocab")
        _write_rejects(tmp / "rejects" / "rejects.csv", rejects)
        manifest = _manifest(opts, schema, ctx, report, rejects, checksums.get(), sources, fingerprint)
        write_manifest(tmp, manifest)
        # swap into place: the old folder (ours, it has a manifest) goes only once the new one is complete
        old = temporary_folder(out, "old")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["_wall_s"] = time.perf_counter() - t0  # not written: the file stays byte-identical
    manifest["_timings"] = dict(ctx.timings)
    return manifest


def _check_no_empty_split(
    opts: PrepareOptions,
    official: list[str],
    report: dict[str, Any],
    rejects: list[tuple[str, int, str, str, str]],
) -> None:
    """Raise when an official split given as input (train; test when its files exist) ends up with no
    rows: an empty skeleton file or every row rejected (``--allow-empty-split`` accepts it). The valid
    split is carved at random from train and may legitimately be empty on a tiny train file.
    """
    problems = []
    for name in official:
        skeleton = report["files"][name]["skeleton"]
        if skeleton["rows_written"]:
            continue
        reasons = Counter(r[2] for r in rejects if r[0] == skeleton["file"])
        top = ", ".join(f"{reason} {count:,}" for reason, count in reasons.most_common(3))
        path = Path(opts.raw_dir) / skeleton["file"]
        if skeleton["rows_in"]:
            text = f"split {name} is empty: all {skeleton['rows_in']:,} rows of {path} rejected (top reasons: {top})"
        else:
            text = f"split {name} is empty: {path} has no rows"
        first = min((r for r in rejects if r[0] == skeleton["file"]), key=lambda r: r[1], default=None)
        if first is not None:
            text += f"; first: line {first[1]}: {first[2]} ({first[3]})"
        problems.append(text)
    if problems:
        raise PrepareError("; ".join(problems) + ". Pass --allow-empty-split to write it anyway.")


def _manifest(
    opts: PrepareOptions,
    schema: FieldSchema,
    ctx: _Context,
    report: dict[str, Any],
    rejects: list[tuple[str, int, str, str, str]],
    checksums: dict[str, str],
    sources: list[Path],
    fingerprint: str,
) -> dict[str, Any]:
    skeleton_files = [v["skeleton"] for v in report["files"].values()]
    rows_in = sum(s["rows_in"] for s in skeleton_files)
    rows_written = sum(s["rows_written"] for s in skeleton_files)
    rows_rejected = sum(s["rows_rejected"] for s in skeleton_files)
    assert rows_in == rows_written + rows_rejected, (rows_in, rows_written, rows_rejected)
    by_reason: dict[str, dict[str, int]] = {}
    for file, _, reason, _, _ in rejects:
        by_reason.setdefault(file, {}).setdefault(reason, 0)
        by_reason[file][reason] += 1
    splits = {}
    for name in SPLIT_CODES:
        entry = report["splits"].get(name, {"rows": 0, "clicks": 0, "conversions": 0, "files": []})
        entry["files"] = sorted(entry["files"])
        splits[name] = entry
    return {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "schema": schema.to_dict(),
        "num_embeddings": {name: v.num_embeddings for name, v in ctx.vocabs.items()},
        "splits": splits,
        "split_rule": {
            "valid_fraction": opts.valid_fraction,
            "by": opts.split_by,
            "seed": opts.seed,
            "rule": (
                "a row of the official train file goes to valid iff u < valid_fraction, where u is a "
                "seeded splitmix64 hash of its "
                + ("sample_id" if opts.split_by == "row" else "user id (field 101; -1 when absent)")
                + " mapped to [0, 1); test is the official test file"
            ),
        },
        "shuffle": {
            "seed": opts.seed,
            "rule": "bucket = seeded hash of the line's byte offset; each bucket's rows of a split are "
            "permuted with numpy default_rng([seed, split_code, bucket]); one shard per bucket and split",
            "split_codes": SPLIT_CODES,
        },
        "vocab": {
            "built_on": "train",
            "folder": "vocab",
            "counts": "train-split impressions carrying the id (user fields: per referencing row)",
            "sizes": {name: v.size for name, v in ctx.vocabs.items()},
        },
        "request_id": "row of the common_feature_index in its common-features file (file order, "
        "duplicates and rejects skipped), test rows offset by the train common rows",
        "sources": {
            p.name: {"bytes": p.stat().st_size, "sha256": checksums.get(p.name, "")} for p in sources
        },
        "input_files": report["files"],
        "rejects": {
            "file": "rejects/rejects.csv",
            "rows_in": rows_in,
            "rows_written": rows_written,
            "rows_rejected": rows_rejected,
            "common_rows_rejected": sum(v["common"]["rows_rejected"] for v in report["files"].values()),
            "by_file_and_reason": by_reason,
        },
        "options": opts.output_options(),
    }


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PrepareOptions(raw_dir="", out_dir="")
    parser.add_argument(
        "--raw-dir",
        required=True,
        help="folder with sample_skeleton_{train,test}.csv and "
        "common_features_{train,test}.csv (test optional)",
    )
    parser.add_argument("--out", required=True, help="prepared data folder (written atomically)")
    parser.add_argument("--schema", default=d.schema, help="field schema: packaged name or YAML path (default %(default)s)")
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=d.valid_fraction,
        help="share of the train file carved out as the valid split (default %(default)s)",
    )
    parser.add_argument(
        "--split-by",
        choices=("row", "user"),
        default=d.split_by,
        help="valid split unit: single rows or whole users (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the split and the shuffle")
    parser.add_argument("--workers", type=int, default=d.workers, help="processes (default: all cores)")
    parser.add_argument("--chunk-mb", type=float, default=d.chunk_mb, help="bytes per parse task (MiB)")
    parser.add_argument(
        "--rows-per-shard",
        type=int,
        default=d.rows_per_shard,
        help="target rows per shuffle bucket / output shard (default %(default)s)",
    )
    parser.add_argument(
        "--compression",
        choices=("lz4", "none", "snappy", "zstd", "gzip", "brotli"),
        default=d.compression,
        help="Parquet codec (default %(default)s: reads ~2x faster than zstd; none: fastest, ~3x lz4's size)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first bad line (FILE:LINE: reason)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    parser.add_argument(
        "--allow-empty-split",
        action="store_true",
        help="write the output even if a split ends up with no rows (default: an error naming the "
        "split and its top reject reasons)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    """The :class:`PrepareOptions` of parsed :func:`add_arguments` flags."""
    return PrepareOptions(
        raw_dir=args.raw_dir,
        out_dir=args.out,
        schema=args.schema,
        valid_fraction=args.valid_fraction,
        split_by=args.split_by,
        seed=args.seed,
        workers=args.workers,
        chunk_mb=args.chunk_mb,
        rows_per_shard=args.rows_per_shard,
        strict=args.strict,
        force=args.force,
        allow_empty_split=args.allow_empty_split,
        progress=not args.no_progress,
        compression=args.compression,
    )


def run(args: argparse.Namespace) -> int:
    manifest = prepare(options_from_args(args))
    print(summary(manifest))
    return 0


def summary(manifest: dict[str, Any]) -> str:
    """Human-readable summary: rows per split and the rows_in = written + rejected balance."""
    r = manifest["rejects"]
    lines = [
        f"rows_in {r['rows_in']:,} = rows_written {r['rows_written']:,} + rows_rejected {r['rows_rejected']:,}"
        f" (common-features lines rejected: {r['common_rows_rejected']:,})"
    ]
    for name, s in manifest["splits"].items():
        lines.append(
            f"  {name:5s} {s['rows']:>12,} rows  {s['clicks']:>10,} clicks  {s['conversions']:>8,} "
            f"conversions  {len(s['files'])} shards"
        )
    for file, reasons in r["by_file_and_reason"].items():
        lines.append(f"  rejects {file}: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    if "_wall_s" in manifest:
        lines.append(
            f"  {manifest['_wall_s']:.1f}s, {r['rows_in'] / max(manifest['_wall_s'], 1e-9):,.0f} rows/s ("
            + ", ".join(f"{k} {v:.1f}s" for k, v in manifest.get("_timings", {}).items())
            + ")"
        )
    return "\n".join(lines)
