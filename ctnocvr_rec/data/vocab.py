"""Per-field id vocabularies: raw Ali-CCP feature ids -> embedding rows.

Built on the train split by ``ctnocvr data prepare`` and reused for valid and test. Counts are
*impressions*: an id counts once per train-split row that carries it (a user-field id in a
common-features line counts once for every train row of that request).

* ``mapping: vocab``: ids with ``count >= min_count`` get ``1..V`` in order of decreasing count
  (ties: increasing raw id); everything else, including ids never seen on train, maps to
  :data:`~ctnocvr_rec.data.schema.OOV_ID` ``= 0``. Table size ``V + 1``.
* ``mapping: hash``: ``raw_id mod num_buckets``. Table size ``num_buckets``.

Artifact: ``vocab/<field>.parquet`` with ``raw_id, count, mapped_id`` (int64), every id seen on train,
sorted by ``mapped_id`` (1..V first, then the ids mapped to OOV by decreasing count).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctnocvr_rec.data.schema import OOV_ID, FieldSchema, FieldSpec


def merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``(ids, counts)`` pairs into one pair with sorted unique ids."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(parts) == 1:
        return parts[0]
    ids = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    uniq, inverse = np.unique(ids, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=len(uniq)).astype(np.int64)


def count_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids and their counts (a bincount when the id range is small, else a sort)."""
    if len(ids) and int(ids.min()) >= 0 and int(ids.max()) < 4 * len(ids) + 65_536:
        counts = np.bincount(ids)
        present = np.flatnonzero(counts)
        return present.astype(np.int64), counts[present].astype(np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    return uniq, counts.astype(np.int64)


class CountAccumulator:
    """Streaming id counter: keeps per-chunk ``np.unique`` results and compacts them now and then."""

    def __init__(self, compact_every: int = 8_000_000) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending = 0
        self.compact_every = compact_every

    def add(self, ids: np.ndarray, counts: np.ndarray) -> None:
        self.parts.append((ids, counts))
        self.pending += len(ids)
        if self.pending > self.compact_every:
            self.parts = [merge_counts(self.parts)]
            self.pending = len(self.parts[0][0])

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return merge_counts(self.parts)


@dataclass
class FieldVocab:
    """Id mapping of one field. ``raw_ids`` sorted; ``mapped[i]`` is the row of ``raw_ids[i]``."""

    spec: FieldSpec
    raw_ids: np.ndarray
    counts: np.ndarray
    mapped: np.ndarray

    @property
    def num_embeddings(self) -> int:
        if self.spec.mapping == "hash":
            return self.spec.num_buckets
        return int(self.mapped.max(initial=0)) + 1

    @property
    def size(self) -> int:
        """Known ids (excluding OOV)."""
        return int((self.mapped != OOV_ID).sum()) if self.spec.mapping == "vocab" else len(self.raw_ids)

    def map(self, ids: np.ndarray) -> np.ndarray:
        """Mapped ids (int64, same shape) of raw ids."""
        if self.spec.mapping == "hash":
            return np.mod(ids, self.spec.num_buckets)
        if len(self.raw_ids) == 0:
            return np.zeros_like(ids)
        table = self._dense_table()
        if table is not None:  # compact raw-id range: one gather instead of a binary search per id
            base = int(self.raw_ids[0])
            inside = (ids >= base) & (ids < base + len(table))
            return np.where(inside, table[np.where(inside, ids - base, 0)], OOV_ID).astype(np.int64)
        pos = np.minimum(np.searchsorted(self.raw_ids, ids), len(self.raw_ids) - 1)
        return np.where(self.raw_ids[pos] == ids, self.mapped[pos], OOV_ID)

    def _dense_table(self) -> np.ndarray | None:
        """``table[raw_id - raw_ids[0]] = mapped id`` (int32) when the raw ids span at most 2^24
        values and at most 16x their count (Ali-CCP's ids are global across fields: a table from 0
        would cost every field the span of all fields before it), else None (binary search)."""
        if not hasattr(self, "_table"):
            self._table = None
            if len(self.raw_ids):
                base, top = int(self.raw_ids[0]), int(self.raw_ids[-1])
                span = top - base + 1
                if span <= min(1 << 24, max(16 * len(self.raw_ids), 1 << 16)) and int(self.mapped.max()) < (1 << 31):
                    self._table = np.full(span, OOV_ID, np.int32)
                    self._table[self.raw_ids - base] = self.mapped
        return self._table

    def prepare_lookup(self) -> None:
        """Build the lookup table now (call before forking workers: they then share it instead of
        each building its own copy)."""
        if self.spec.mapping != "hash":
            self._dense_table()

    @classmethod
    def build(cls, spec: FieldSpec, raw_ids: np.ndarray, counts: np.ndarray) -> FieldVocab:
        """From sorted unique ids and their train counts."""
        raw_ids = np.asarray(raw_ids, np.int64)
        counts = np.asarray(counts, np.int64)
        if spec.mapping == "hash":
            return cls(spec, raw_ids, counts, np.mod(raw_ids, spec.num_buckets))
        mapped = np.full(len(raw_ids), OOV_ID, np.int64)
        kept = np.flatnonzero(counts >= spec.min_count)
        # rank by count desc, raw id asc (raw_ids are sorted, so a stable sort on -count does it)
        ranked = kept[np.argsort(-counts[kept], kind="stable")]
        mapped[ranked] = np.arange(1, len(ranked) + 1)
        return cls(spec, raw_ids, counts, mapped)

    def to_table(self) -> pa.Table:
        known = self.mapped != OOV_ID if self.spec.mapping == "vocab" else np.ones(len(self.raw_ids), bool)
        # known ids by mapped id, then OOV ids by count desc / raw id asc
        order = np.lexsort((self.raw_ids, -self.counts, self.mapped, ~known))
        return pa.table(
            {
                "raw_id": pa.array(self.raw_ids[order], pa.int64()),
                "count": pa.array(self.counts[order], pa.int64()),
                "mapped_id": pa.array(self.mapped[order], pa.int64()),
            }
        )

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / f"{self.spec.name}.parquet"
        pq.write_table(self.to_table(), path, compression="zstd")
        return path

    @classmethod
    def load(cls, spec: FieldSpec, folder: str | Path) -> FieldVocab:
        table = pq.read_table(Path(folder) / f"{spec.name}.parquet")
        raw = table.column("raw_id").to_numpy()
        order = np.argsort(raw, kind="stable")
        return cls(
            spec,
            raw[order],
            table.column("count").to_numpy()[order],
            table.column("mapped_id").to_numpy()[order],
        )


def load_vocabs(schema: FieldSchema, folder: str | Path) -> dict[str, FieldVocab]:
    return {spec.name: FieldVocab.load(spec, folder) for spec in schema}
