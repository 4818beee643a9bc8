"""Raw Ali-CCP files -> batches of raw-id columns for ``ctnocvr predict --raw-dir``.

Reads ``sample_skeleton_<split>.csv`` + ``common_features_<split>.csv`` with the parser of ``data
prepare`` (:func:`ctnocvr_rec.data.rawformat.parse_chunk`: same acceptance rules, same reject
reasons). As in ``prepare``, the common-features table is the only thing held in memory (user fields
by ``common_feature_index``; a duplicate key keeps its first line); the skeleton is streamed in byte
chunks, so memory does not grow with the number of impressions. Rejected lines (bad lines, unknown
``common_feature_index``) are counted by reason and returned with file, line and detail; they get no
prediction. Ids stay raw here: the caller maps them through the exported vocabularies.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctnocvr_rec.data.csr import Csr
from ctnocvr_rec.data.prepare import COMMON_FILE, SKELETON_FILE, chunk_ranges
from ctnocvr_rec.data.rawformat import COMMON, SKELETON, FieldSlots, Reason, parse_chunk


@dataclass
class RawBatch:
    """``columns[field] = (raw ids int64 [n], lengths int64 [B], weights float32 [n] or None)``;
    ``dense[name]`` = raw (untransformed) values ``[B]`` of a dense feature (the official Ali-CCP raw
    format has none: empty)."""

    sample_id: np.ndarray
    click: np.ndarray
    conversion: np.ndarray
    columns: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    dense: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.sample_id)


@dataclass
class RawReport:
    rows_in: int = 0
    rows_read: int = 0
    rejects: list[tuple[str, int, str, str]] = field(default_factory=list)  # file, line, reason, detail
    ignored: Counter[str] = field(default_factory=Counter)

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(r[2] for r in self.rejects))


@dataclass
class _Common:
    sorted_h1: np.ndarray
    sorted_h2: np.ndarray
    sorted_row: np.ndarray
    slots: list[Csr]

    def lookup(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        if len(self.sorted_h1) == 0:
            return np.full(len(h1), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.sorted_h1, h1), len(self.sorted_h1) - 1)
        hit = (self.sorted_h1[pos] == h1) & (self.sorted_h2[pos] == h2)
        return np.where(hit, self.sorted_row[pos], -1)


def _read(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def raw_files(raw_dir: str | Path, split: str) -> tuple[Path, Path]:
    raw = Path(raw_dir)
    skeleton, common = raw / SKELETON_FILE.format(split=split), raw / COMMON_FILE.format(split=split)
    for path in (skeleton, common):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (--raw-dir needs {skeleton.name} and {common.name})")
    return skeleton, common


def _load_common(path: Path, slots: FieldSlots, chunk_bytes: int, report: RawReport) -> _Common:
    parts, h1s, h2s, lines = [], [], [], []
    base = 0
    for start, end in chunk_ranges(path, chunk_bytes):
        chunk = parse_chunk(_read(path, start, end), COMMON, slots)
        report.rejects += [(path.name, base + r.line + 1, r.reason, r.detail) for r in chunk.rejects]
        report.ignored.update(chunk.ignored)
        parts.append(chunk.slots)
        h1s.append(chunk.key_h1)
        h2s.append(chunk.key_h2)
        lines.append(chunk.line + base + 1)
        base += chunk.n_lines
    h1 = np.concatenate(h1s) if h1s else np.zeros(0, np.uint64)
    h2 = np.concatenate(h2s) if h2s else np.zeros(0, np.uint64)
    line = np.concatenate(lines) if lines else np.zeros(0, np.int64)
    csrs = [Csr.concat([p[k] for p in parts], w) for k, w in enumerate(slots.weighted)]
    order = np.argsort(h1, kind="stable")
    dup = np.r_[False, (h1[order][1:] == h1[order][:-1]) & (h2[order][1:] == h2[order][:-1])]
    for i in np.flatnonzero(dup).tolist():  # the first line of a key wins, as in `data prepare`
        report.rejects.append((path.name, int(line[order[i]]), Reason.DUPLICATE_COMMON,
                               "field common_feature_index: defined on an earlier line"))
    order = order[~dup]
    return _Common(h1[order], h2[order], order.astype(np.int64), csrs)


def iter_raw_batches(raw_dir: str | Path, split: str, user_fields: list[tuple[str, bool]],
                     skeleton_fields: list[tuple[str, bool]], batch_size: int, report: RawReport,
                     chunk_mb: float = 8.0, on_bytes: object = None) -> Iterator[RawBatch]:
    """Batches of ``batch_size`` accepted rows in file order; ``*_fields``: ``(name, weighted)``.

    ``report`` collects counts and rejects as the stream goes; ``on_bytes(n)`` (optional) is called
    with the skeleton bytes consumed (for a progress bar).
    """
    skeleton_path, common_path = raw_files(raw_dir, split)
    chunk_bytes = max(1, int(chunk_mb * (1 << 20)))
    user_slots = FieldSlots(tuple(n for n, _ in user_fields), tuple(w for _, w in user_fields))
    skeleton_slots = FieldSlots(tuple(n for n, _ in skeleton_fields), tuple(w for _, w in skeleton_fields))
    common = _load_common(common_path, user_slots, chunk_bytes, report)
    base = 0
    for start, end in chunk_ranges(skeleton_path, chunk_bytes):
        chunk = parse_chunk(_read(skeleton_path, start, end), SKELETON, skeleton_slots)
        report.rows_in += chunk.n_lines
        report.ignored.update(chunk.ignored)
        report.rejects += [(skeleton_path.name, base + r.line + 1, r.reason, r.detail) for r in chunk.rejects]
        crow = common.lookup(chunk.key_h1, chunk.key_h2)
        for i in np.flatnonzero(crow < 0).tolist():
            report.rejects.append((skeleton_path.name, base + int(chunk.line[i]) + 1, Reason.UNKNOWN_COMMON,
                                   f"field common_feature_index: not in {common_path.name}"))
        keep = np.flatnonzero(crow >= 0)
        base += chunk.n_lines
        for lo in range(0, len(keep), batch_size):
            rows = keep[lo:lo + batch_size]
            columns: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
            for k, name in enumerate(user_slots.names):
                csr = common.slots[k].take(crow[rows])
                columns[name] = (csr.ids, csr.lengths, csr.weights)
            for k, name in enumerate(skeleton_slots.names):
                csr = chunk.slots[k].take(rows)
                columns[name] = (csr.ids, csr.lengths, csr.weights)
            ints = chunk.ints[rows]
            report.rows_read += len(rows)
            yield RawBatch(ints[:, 0].astype(np.int64), ints[:, 1].astype(np.int8), ints[:, 2].astype(np.int8),
                           columns)
        if callable(on_bytes):
            on_bytes(end - start)


def skeleton_bytes(raw_dir: str | Path, split: str) -> int:
    return os.path.getsize(raw_files(raw_dir, split)[0])
