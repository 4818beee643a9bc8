"""``--format aliccp-raw``, part 1: options, the worker context, and stage 1 -- the common-features
table (pipeline: :mod:`ctnocvr_rec.data.formats.aliccp_raw`)."""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctnocvr_rec.data.csr import Csr
from ctnocvr_rec.data.formats.base import PrepareError, raw_text
from ctnocvr_rec.data.rawfiles import (
    chunk_ranges,
    read_range,
)
from ctnocvr_rec.data.rawformat import (
    COMMON,
    FieldSlots,
    FileKind,
    ParsedChunk,
    Reason,
    parse_chunk,
)
from ctnocvr_rec.data.schema import DEFAULT_SCHEMA, FieldSchema
from ctnocvr_rec.data.swar import PAD, hash_key, padded_words, tokens_equal, word_view
from ctnocvr_rec.data.vocab import CountAccumulator, FieldVocab
from ctnocvr_rec.data.writer_rules import (
    output_options,
    progress_bar,
    raise_first,
)

USER_ID_FIELD = "101"
SKELETON_FILE = "sample_skeleton_{split}.csv"
COMMON_FILE = "common_features_{split}.csv"
MIN_BUCKETS = 4  # so that pass 2 keeps several cores busy even on a small split (fixed: output must not depend on cores)


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
    #: where the user fields (the common-features file's) go: ``per-request`` writes each request's
    #: once to ``requests/<split>.arrow`` and the loader joins them by ``request_id``
    #: (:mod:`ctnocvr_rec.data.requests`; at Ali-CCP's full shape 24x less disk and ~3x less prepare
    #: CPU, docs/fullshape.md); ``per-row`` copies them onto every impression row (the layout before
    #: 2026-12-01). The rows the loader yields are the same either way.
    user_features: str = "per-request"

    def output_options(self) -> dict[str, Any]:
        """The options that change the output (fingerprint + manifest)."""
        return {**output_options(self), "user_features": self.user_features}


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
class RawContext:
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
    #: fields stored once per request (``user_features == "per-request"``: every user field), and the
    #: schema of what the shards hold (the others)
    per_request: tuple[str, ...] = ()
    shard_schema: FieldSchema | None = None
    #: ``manifest["per_request"]["files"]`` entries written so far
    request_files: list[dict[str, Any]] = field(default_factory=list)
    #: wall seconds per phase ("train/common", "train/pass1", ...), reported, never written
    timings: dict[str, float] = field(default_factory=dict)


_CTX: RawContext | None = None


def set_context(ctx: RawContext | None) -> None:
    """Set the context the workers read (in the parent, before the pool forks)."""
    global _CTX
    _CTX = ctx


def context() -> RawContext:
    assert _CTX is not None, "worker context not set"
    return _CTX


# ----------------------------------------------------------------------------------------------
# Chunking and reading
# ----------------------------------------------------------------------------------------------


def chunk_bytes(opts: PrepareOptions) -> int:
    return max(1, int(opts.chunk_mb * (1 << 20)))


def line_text(raw: bytes) -> str:
    # control bytes shown escaped: a rejects.csv row stays one physical line
    return raw_text(raw.decode("utf-8", "replace"))


def key_of_line(raw: bytes, kind: FileKind) -> bytes | None:
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
    chunk = parse_chunk(data, COMMON, context().user_slots)
    rejects = []
    for r in chunk.rejects:
        raw = chunk.raw_line(data, r.line)
        key = key_of_line(raw, COMMON)
        rejects.append((r.line, r.reason, r.detail, line_text(raw), hash_key(key) if key else None))
    key_offsets, key_bytes = _gather_tokens(np.frombuffer(data, np.uint8), chunk.key_start, chunk.key_len)
    line_offset = start + chunk.line_starts[chunk.line]
    chunk.line_starts = chunk.line_ends = np.zeros(0, np.int64)  # not needed by the parent
    chunk.rejects = []
    # int32 ids from here on where they fit: the parent holds every chunk's pieces at once while it
    # concatenates them (the measured peak of a split's common table)
    chunk.slots = [_narrow(s) for s in chunk.slots]
    return _CommonPart(chunk.n_lines, chunk, rejects, key_offsets, key_bytes, line_offset)


def _raw_line_at(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.readline().rstrip(b"\n").rstrip(b"\r")


def _narrow(csr: Csr) -> Csr:
    """The same CSR with int32 raw ids when every id fits (lossless): the common table is the one
    structure that grows with the data (~378 M ids at Ali-CCP's full shape), so 4 bytes per id is
    1.5 GB of peak memory."""
    ids = csr.ids
    if ids.dtype == np.int64 and (not len(ids) or (np.iinfo(np.int32).min <= int(ids.min()) and int(
            ids.max()) <= np.iinfo(np.int32).max)):
        return Csr(csr.offsets, ids.astype(np.int32), csr.weights)
    return csr


class _SpilledColumn:
    """A growing 1-D array kept in a scratch file while a file's chunks are parsed, read back whole
    at the end: the parent then holds one copy of the common table instead of every chunk's pieces
    plus the concatenated arrays (measured: that end-of-parse concatenation was the run's peak)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pieces: list[tuple[int, int, np.dtype]] = []  # byte offset, length, dtype
        self._file = open(path, "wb")  # noqa: SIM115 (closed in read())
        self._bytes = 0

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        self.pieces.append((self._bytes, len(values), values.dtype))
        self._file.write(values.tobytes())  # one piece at a time (a chunk's worth of ids)
        self._bytes += values.nbytes

    def read(self, empty_dtype: type) -> np.ndarray:
        """All pieces in order as one array (the widest piece dtype).

        When every piece has one dtype (always, short of raw ids beyond int32) the array is the file,
        memory-mapped read-only: page cache shared by the workers forked later, not heap each of them
        counts in its RSS. Otherwise the pieces are read into memory and the file is deleted."""
        self._file.close()
        dtypes = {d for _, n, d in self.pieces if n}
        dtype = np.result_type(*dtypes) if dtypes else np.dtype(empty_dtype)
        total = sum(n for _, n, _ in self.pieces)
        if not total:
            self.path.unlink()
            return np.zeros(0, dtype)
        if len(dtypes) == 1:
            return np.memmap(self.path, dtype, mode="r", shape=(total,))
        out = np.empty(total, dtype)
        pos = 0
        with open(self.path, "rb") as f:
            for offset, n, piece_dtype in self.pieces:
                if n:
                    f.seek(offset)
                    out[pos:pos + n] = np.fromfile(f, piece_dtype, n)
                    pos += n
        self.path.unlink()
        return out


def load_common(path: Path, ctx: RawContext, pool: Any, progress: bool) -> CommonTable:
    """Parse a common-features file into a :class:`CommonTable` (duplicates and bad lines rejected).

    A key's identity is its bytes: rows are indexed by two 64-bit hashes of the key, and any two rows
    whose hashes are equal have their key bytes compared. Equal bytes are a duplicate (the first line
    wins, later ones are rejects); different bytes with equal hashes are a collision, which stops the
    run (never observed; it would otherwise merge two keys).
    """
    ranges = chunk_ranges(path, chunk_bytes(ctx.options))
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
    spill_dir = ctx.scratch / f"common-{ctx.split_tag}"
    spill_dir.mkdir(parents=True, exist_ok=True)
    weighted = ctx.user_slots.weighted
    spilled_ids = [_SpilledColumn(spill_dir / f"ids-{k}.bin") for k in range(len(weighted))]
    spilled_weights = [_SpilledColumn(spill_dir / f"weights-{k}.bin") if w else None for k, w in enumerate(weighted)]
    lengths: list[list[np.ndarray]] = [[] for _ in weighted]
    with progress_bar(os.path.getsize(path), f"common   {path.name}", progress) as bar:
        for (start, end), part in zip(ranges, imap(pool, _common_task, tasks)):
            for line, reason, detail, raw, hashes in part.rejects:
                rejects.append((path.name, line_base + line + 1, reason, detail, raw))
                if hashes is not None:
                    rejected_keys.setdefault(hashes, (line_base + line + 1, reason))
            if ctx.options.strict and part.rejects:
                raise_first(rejects, ctx.options.raw_dir)
            lines.append(part.chunk.line + line_base + 1)
            for k, slot in enumerate(part.chunk.slots):
                lengths[k].append(np.diff(slot.offsets))
                spilled_ids[k].append(slot.ids)
                if spilled_weights[k] is not None:
                    spilled_weights[k].append(slot.weights)  # type: ignore[union-attr, arg-type]
            part.chunk.slots = []
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
    for k in range(len(weighted)):
        offsets = np.zeros(sum(len(n) for n in lengths[k]) + 1, np.int64)
        if len(offsets) > 1:
            np.cumsum(np.concatenate(lengths[k]), out=offsets[1:])
        ids = spilled_ids[k].read(np.int32)
        weights = spilled_weights[k].read(np.float32) if spilled_weights[k] is not None else None  # type: ignore[union-attr]
        slots.append(_narrow(Csr(offsets, ids, weights)))
    # (the memory-mapped files stay until the split is done: ctx.scratch is removed with them)
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
                    line_text(_raw_line_at(path, int(line_offset[dup]))),
                )
            )
        if ctx.options.strict:
            raise_first(rejects, ctx.options.raw_dir)
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


def imap(pool: Any, fn: Any, tasks: list[Any]) -> Iterator[Any]:
    if pool is None:
        return map(fn, tasks)
    return pool.imap(fn, tasks)


def fork_pool(workers: int) -> Any:
    if workers <= 1:
        return None
    return multiprocessing.get_context("fork").Pool(workers)


# ----------------------------------------------------------------------------------------------
# Stage 3 helpers: the common table's vocabulary counts and id mapping, block by block
# ----------------------------------------------------------------------------------------------


#: ids handled at once when counting or mapping the common table (bounds the temporaries)
_BLOCK_IDS = 4_000_000


def _blocks(offsets: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges ``[lo, hi)`` of a CSR holding about :data:`_BLOCK_IDS` ids each (whole rows)."""
    n = len(offsets) - 1
    cuts = np.searchsorted(offsets, np.arange(0, int(offsets[-1]), _BLOCK_IDS), side="right") - 1
    bounds = sorted({0, n, *np.clip(cuts, 0, n).tolist()})
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def weighted_common_counts(csr: Csr, row_refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct ids of a user field and their impression counts (each common row's ids count
    ``row_refs[row]`` times; ids counted 0 times dropped), block by block: exact, and the temporaries
    of one block instead of three id-sized arrays for the whole field."""
    acc = CountAccumulator()
    for lo, hi in _blocks(csr.offsets):
        a, b = int(csr.offsets[lo]), int(csr.offsets[hi])
        weight = np.repeat(row_refs[lo:hi], np.diff(csr.offsets[lo:hi + 1]))
        ids, inverse = np.unique(csr.ids[a:b], return_inverse=True)
        counts = np.bincount(inverse, weights=weight, minlength=len(ids)).astype(np.int64)
        seen = counts > 0
        acc.add(ids[seen], counts[seen])
    return acc.result()


def map_common_ids(csr: Csr, vocab: FieldVocab) -> Csr:
    """``csr`` with its raw ids mapped to table rows, block by block into one array of the shards'
    id type (int32 short of a 2^31-row table), so the raw and mapped ids never both exist in full
    at int64."""
    dtype = np.int32 if vocab.num_embeddings <= np.iinfo(np.int32).max else np.int64
    mapped = np.empty(len(csr.ids), dtype)
    for lo, hi in _blocks(csr.offsets):
        a, b = int(csr.offsets[lo]), int(csr.offsets[hi])
        mapped[a:b] = vocab.map(csr.ids[a:b])
    return Csr(csr.offsets, mapped, csr.weights)
