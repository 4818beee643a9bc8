"""Compressed sparse rows: per-row variable-length values (ids, optional weights) and their gather.

The one container of list-valued columns while data moves between the raw parser, the writer, the
request tables and serving: row ``i`` owns ``ids[offsets[i]:offsets[i + 1]]``.
:func:`csr_gather_index` is the vectorised row gather they all use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Csr:
    """Per-row variable-length values: row ``i`` owns ``ids[offsets[i]:offsets[i+1]]``.

    Shapes: ``offsets`` int64 ``[n + 1]``, ``ids`` int64 ``[nnz]``, ``weights`` float32 ``[nnz]`` or None.
    """

    offsets: np.ndarray
    ids: np.ndarray
    weights: np.ndarray | None

    @property
    def n_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray) -> Csr:
        """Rows ``rows`` (any order, repeats allowed), vectorised."""
        offsets, index = csr_gather_index(self.offsets, rows)
        return Csr(offsets, self.ids[index], None if self.weights is None else self.weights[index])

    @staticmethod
    def concat(parts: list[Csr], weighted: bool) -> Csr:
        offsets = [np.zeros(1, np.int64)]
        base = 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        ids = np.concatenate([p.ids for p in parts]) if parts else np.zeros(0, np.int64)
        weights = None
        if weighted:
            weights = np.concatenate([p.weights for p in parts]) if parts else np.zeros(0, np.float32)
        return Csr(np.concatenate(offsets), ids, weights)

    @staticmethod
    def empty(n_rows: int, weighted: bool) -> Csr:
        return Csr(
            np.zeros(n_rows + 1, np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.float32) if weighted else None,
        )


def csr_gather_index(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (int64 ``[len(rows) + 1]``) and value index of the CSR rows ``rows`` (any order,
    repeats allowed): ``values[index]`` are their values in order."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new_offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    total = int(new_offsets[-1])
    # index = start of the value's row + its position inside the row (int32 when it fits: less traffic)
    dtype = np.int32 if len(offsets) and int(offsets[-1]) < 2**31 and total < 2**31 else np.int64
    if total == len(rows) and (lengths == 1).all():  # one value per row (most fields): the starts
        return new_offsets, starts.astype(dtype)
    index = np.arange(total, dtype=dtype)
    index += np.repeat((starts - new_offsets[:-1]).astype(dtype), lengths)
    return new_offsets, index
