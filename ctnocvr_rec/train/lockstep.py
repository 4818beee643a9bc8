"""Training batches in lock-step over the ranks, with the per-step check in the same all-reduce.

A sharded model needs every rank in every step, so all ranks must train the same number of batches:
the ``j``-th batch is trained only if *every* rank has a ``j``-th batch (``synced_batches(...,
until="any_done")`` decides this with one tiny all-reduce per batch). The loop also stops every rank
together at the step where any rank saw a non-finite loss, which needs a second all-reduce per step.

:class:`LockstepBatches` gives the same answers with one all-reduce per step instead of two: after
each step, :meth:`LockstepBatches.after_step` reads one batch ahead on this rank and all-reduces
(MIN) ``[batches buffered here, step ok here]``. The first value is how many batches every rank
holds, so the pipeline's next ``next()`` calls are answered from that *credit* without talking to the
other ranks; the second says whether every rank's step was fine. Only a ``next()`` with no credit left
(the pipeline's first fill of an epoch, which takes up to three batches, or the end of the data)
all-reduces on its own. Ranks still hand out the same batches in the same order and stop at the same
batch as with ``synced_batches``; each rank only reads one batch further ahead of training.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

import torch

from ctnocvr_rec.train.distributed import DistContext, all_reduce_cpu

T = TypeVar("T")

#: batches read ahead when a ``next()`` finds no credit: the pipeline's fill (batch i, i+1, i+2)
FILL_AHEAD = 3


class LockstepBatches(Generic[T]):
    """Iterate ``batches`` in lock-step with the other ranks (collective: every rank makes the same
    calls in the same order: ``next()`` from the pipeline, :meth:`after_step` once per trained step).

    ``fill_ahead``: how many batches a ``next()`` without credit reads before it all-reduces.
    ``all_reduces`` counts this rank's all-reduces (for tests and benchmarks).
    """

    def __init__(self, ctx: DistContext, batches: Iterable[T], fill_ahead: int = FILL_AHEAD) -> None:
        if fill_ahead < 1:
            raise ValueError(f"fill_ahead must be >= 1, got {fill_ahead}")
        self._ctx = ctx
        self._source: Iterator[T] = iter(batches)
        self._buffer: deque[T] = deque()
        self._source_done = False
        self._credit = 0  # buffered batches that every rank is known to hold too
        self._stopped = False
        self._fill_ahead = fill_ahead
        self.all_reduces = 0

    def __iter__(self) -> LockstepBatches[T]:
        return self

    def __next__(self) -> T:
        if self._stopped:
            raise StopIteration
        if self._credit == 0:
            self._read_ahead(self._fill_ahead)
            self._agree(True)
        if self._credit == 0:  # some rank has no batch left: every rank stops here
            self._stopped = True
            raise StopIteration
        self._credit -= 1
        return self._buffer.popleft()

    def after_step(self, ok: bool) -> bool:
        """Collective, once per trained step: ``True`` iff ``ok`` on every rank. Also reads one batch
        ahead here and learns how many batches every rank holds, so that the next ``next()`` needs no
        all-reduce of its own."""
        self._read_ahead(1)
        return self._agree(ok)

    def _read_ahead(self, count: int) -> None:
        while len(self._buffer) < count and not self._source_done:
            try:
                self._buffer.append(next(self._source))
            except StopIteration:
                self._source_done = True

    def _agree(self, ok: bool) -> bool:
        # every rank has handed out the same batches, so the shortest buffer is what all ranks hold
        flags = torch.tensor([len(self._buffer), 1 if ok else 0], dtype=torch.int64)
        all_reduce_cpu(self._ctx, flags, "min")
        self.all_reduces += 1
        self._credit = int(flags[0])
        return bool(flags[1])
