"""Parquet loading: one split of a prepared set -> :class:`CtnocvrBatch` es, sharded over ranks and workers.

Sharding rule (documented contract, tested in ``tests/test_data_loader.py``)
---------------------------------------------------------------------------
1. The split's Parquet row groups (files sorted by name, row groups in file order) form the *units*.
   Each epoch, the units are put in an order -- a permutation seeded by ``(seed, epoch)`` when
   ``shuffle`` is on, file order otherwise -- and concatenated into one virtual stream of ``N`` rows.
   Every rank computes the same order (no communication needed).
2. Rank ``r`` of ``R`` gets one contiguous range of that stream:

   * ``drop_remainder=False`` (evaluation): ``[floor(r N / R), floor((r + 1) N / R))``: every row exactly
     once over all ranks; ranks differ by at most one row, hence by at most one batch;
   * ``drop_remainder=True`` (training): each rank gets ``floor(N / (R B))`` full batches, i.e. rows
     ``[r K B, (r + 1) K B)`` with ``K = floor(N / (R B))``; the ``< R B`` remaining rows of the epoch
     are skipped (they differ between epochs when ``shuffle`` is on). Every rank runs the same
     number of steps, which DMP's collectives need.

   :meth:`ParquetBatchDataset.batch_counts` gives the batch count of every rank, so a trainer that
   evaluates with ``drop_remainder=False`` can see the (at most one) missing step and equalise (e.g.
   run the extra collective with an empty input or stop all ranks at ``min``).
3. The rank's range is cut into batches ``j = 0 .. n-1`` of ``B`` rows; only the last may be short.
   With ``W`` DataLoader workers, worker ``w`` builds one contiguous block of batches (the first
   ``n mod W`` workers one batch more than the others), so each worker decodes only the row groups
   of its block. The DataLoader takes one batch from each worker in turn, so the rank's batches come
   out in the *canonical order* :func:`canonical_order` ``(n, W)``: the blocks interleaved round-robin
   (for ``W = 1``, simply ``0, 1, 2, ...``).
4. With ``shuffle`` and ``shuffle_window_batches > 0``, rows are also permuted inside windows of
   that many batches (seeded by ``(seed, epoch, rank, window)``); a window is decoded once per
   worker whose block touches it (once, except at block boundaries).

Resume: :meth:`state_dict` is ``{"epoch", "batches_yielded", "num_workers"}`` (``num_workers``: the
``W`` of the canonical order of the pass in progress). After :meth:`load_state_dict` the next
iteration yields exactly the rest of that order, ``canonical_order(n, W_saved)[batches_yielded:]``,
for any current worker count ``W'`` (worker ``p`` takes every ``W'``-th remaining batch starting at
``p``, which the round-robin DataLoader yields in order; earlier batches are not read). So a resumed
run sees exactly the batches the interrupted one had not seen yet, in the same order.
An iteration always continues from where the previous one stopped; once the pass is finished
(``batches_yielded == len``) the next iteration is a fresh pass of the same epoch, so call
:meth:`set_epoch` between training epochs (it also resets the position).

Epoch plans (elastic resume): a state may also carry ``"plan"``, a list of runs
``[world, rank, first, end]`` naming *origin batches*: batch ``j`` (``first <= j < end``) of rank
``rank`` under rule 2 with ``world`` ranks (its rows and, with the row shuffle, its window
permutation seeded by ``rank`` are exactly those that rank would read). With a plan the rank's
batches of the epoch are the plan's origin batches in order (``len`` = their count) instead of its
own contiguous range; the canonical order and resume rules above apply to plan positions. A plan is
how the untrained rest of an interrupted epoch is split over another number of ranks
(:mod:`ctnocvr_rec.data.epoch_plan`); :meth:`set_epoch` drops it.
When the dataset runs inside DataLoader workers, the count lives in the main process: use
:class:`ResumableDataLoader` (from :func:`make_dataloader`), whose ``state_dict`` does the counting.

Batches are assembled by :mod:`ctnocvr_rec.data.batching` (vectorised, no per-row Python) from
windows of batches. One background thread decodes the next row group this worker needs (Arrow
releases the GIL) while another builds the next batches; the consumer works on the current one.

Throughput (``benchmark_loader``, demo train split of 180k rows and ~87 ids per row, batch 4096,
one process, 2 cores, load average ~1, best / median of 5): shards of ``prepare``'s layout 2
(lz4, int32 non-null lists, no dictionary) 936k / 858k samples/s in file order and 598k / 522k
shuffled; the earlier zstd + dictionary int64 shards 709k / 627k and 456k / 401k (the previous
loader on those: 578k / 535k and 293k / 290k). Other load on the machine lowers all of these.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ctnocvr_rec.data.batch import CtnocvrBatch
from ctnocvr_rec.data.batching import ID_COLUMNS, LABEL_COLUMNS, BatchRows, feature_columns

# re-exported: these helpers used to live here (prepared.py keeps them free of torch)
from ctnocvr_rec.data.prepared import PreparedSet, read_manifest, resolve_schema, split_files  # noqa: F401
from ctnocvr_rec.data.rawfiles import apply_worker_malloc_settings
from ctnocvr_rec.data.requests import RequestStore
from ctnocvr_rec.data.schema import FieldSchema
from ctnocvr_rec.data.units import RangeReader, Unit

#: batches per decoded window when rows are not shuffled (fewer, larger numpy calls per batch)
_PLAIN_WINDOW_BATCHES = 4
#: bytes of batches a loader may build ahead of its consumer (``prefetch_batches`` is capped by it).
#: Measured on the 1/10 full-shape set (528 ids per row): with 8 evaluation batches of 16,384 rows
#: read ahead, each loader worker of a 2-rank evaluation grew to 2.3-2.5 GB.
READ_AHEAD_BYTES = 256 << 20


def canonical_order(n_batches: int, workers: int) -> np.ndarray:
    """Order in which a DataLoader with ``workers`` workers yields a rank's ``n_batches`` batches.

    Worker ``w`` owns the contiguous block of batches ``[start_w, start_w + c_w)`` with
    ``c_w = n // W + (w < n % W)``; the DataLoader takes one batch from each worker in turn.

    >>> canonical_order(7, 2).tolist()
    [0, 4, 1, 5, 2, 6, 3]
    """
    workers = max(1, workers)
    counts = n_batches // workers + (np.arange(workers) < n_batches % workers)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rounds = int(counts.max()) if n_batches else 0
    grid = starts[None, :] + np.arange(rounds)[:, None]  # [round, worker]
    valid = np.arange(rounds)[:, None] < counts[None, :]
    return grid[valid].astype(np.int64)  # row-major: round by round, workers in turn


class ParquetBatchDataset(IterableDataset):
    """Batches of one split of a prepared set, for one rank (see the module doc for the rules).

    Args:
        prepared_dir: folder written by ``ctnocvr data prepare``, or an opened :class:`PreparedSet`.
        split: ``train`` | ``valid`` | ``test`` (a sub-folder of ``prepared_dir``).
        batch_size: rows per batch ``B``.
        schema: field schema (a selection of the prepared set's fields); default: the one in
            ``manifest.json``.
        rank, world_size: this process's rank and the number of ranks.
        shuffle: per-epoch shuffle of row-group order and of rows inside windows.
        seed: shuffle seed (combined with the epoch).
        shuffle_window_batches: window size of the row shuffle, in batches; 0 = shuffle only the
            row-group order (``prepare`` already shuffled the rows globally; the window shuffle only
            varies batch composition between epochs and costs a gather of every id, ~1/3 of the
            loader's CPU).
        drop_remainder: every rank gets the same number of full batches (training); off: every row
            exactly once, ranks may differ by one batch (evaluation).
        prefetch_batches: batches read ahead by a background thread while the current one is built,
            at most :data:`READ_AHEAD_BYTES` of them (estimated from the split's ids per row): at
            Ali-CCP's full shape an evaluation batch of 16,384 rows is ~100 MB, and a slow consumer
            lets the read-ahead fill completely.
    """

    def __init__(
        self,
        prepared_dir: str | Path | PreparedSet,
        split: str,
        batch_size: int,
        schema: FieldSchema | str | Path | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_window_batches: int = 4,
        drop_remainder: bool = False,
        prefetch_batches: int = 8,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        prepared = (prepared_dir.select(schema) if schema else prepared_dir) if isinstance(
            prepared_dir, PreparedSet) else PreparedSet.open(prepared_dir, schema)
        self.prepared_dir = str(prepared.root)
        self.split = split
        self.batch_size = batch_size
        self.schema = prepared.schema
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        if shuffle_window_batches < 0:
            raise ValueError(f"shuffle_window_batches must be >= 0, got {shuffle_window_batches}")
        self.shuffle_window_batches = shuffle_window_batches
        self.drop_remainder = drop_remainder
        self.prefetch_batches = max(1, prefetch_batches)
        ids_per_row = sum(prepared.ids_per_row(split).values())
        #: estimated bytes of one batch (an upper bound): int64 id + float32 weight per id, the dense
        #: row, 5 scalars (ids travel as int32 below 2**31 table rows: data/batching.py)
        self.batch_bytes = int(batch_size * (12 * ids_per_row + 4 * len(self.schema.dense) + 40))
        self.prefetch_batches = max(1, min(self.prefetch_batches, READ_AHEAD_BYTES // max(1, self.batch_bytes)))
        self.files = prepared.files(split)
        #: the prepared set (its request tables are opened lazily, in the process that reads)
        self.prepared = prepared
        per_request = set(prepared.per_request_fields)
        self.per_request_fields = [s.name for s in self.schema if s.name in per_request]
        self._requests: RequestStore | None = None
        skip = {c for s in self.schema if s.name in per_request for c in (s.name, s.weight_column)}
        self.columns = [c for c in (*ID_COLUMNS, *LABEL_COLUMNS, *feature_columns(self.schema)) if c not in skip]
        self.units: list[Unit] = []
        for i, path in enumerate(self.files):
            handle = pq.ParquetFile(path)
            meta = handle.metadata
            names = set(handle.schema_arrow.names)
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing} required by schema {self.schema.source}")
            self.units.extend(Unit(i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
        self.num_rows = sum(u.rows for u in self.units)
        self.set_epoch(0)

    # ---------------------------------------------------------------- plan of an epoch

    def rank_row_range(self, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
        """Row range ``[lo, hi)`` of ``rank`` (default: this one) in the epoch's virtual stream, under
        ``world_size`` ranks (default: this dataset's)."""
        r = self.rank if rank is None else rank
        ranks = self.world_size if world_size is None else world_size
        n, b = self.num_rows, self.batch_size
        if self.drop_remainder:
            per_rank = (n // (ranks * b)) * b
            return r * per_rank, (r + 1) * per_rank
        return (r * n) // ranks, ((r + 1) * n) // ranks

    def batch_counts(self) -> list[int]:
        """Batches per epoch of every rank (equal when ``drop_remainder``; else they differ by <= 1)."""
        counts = []
        for r in range(self.world_size):
            lo, hi = self.rank_row_range(r)
            counts.append(-(-(hi - lo) // self.batch_size))
        return counts

    def __len__(self) -> int:
        """Batches of this rank in one epoch (all of them, regardless of a resume offset)."""
        if self._plan is not None:
            return sum(end - first for _, _, first, end in self._plan)
        return self.batch_counts()[self.rank]

    def _origins(self) -> list[tuple[int, int, int]]:
        """``(world, rank, batch)`` of every batch position of this rank's epoch (see "Epoch plans")."""
        if self._plan is None:
            return [(self.world_size, self.rank, j) for j in range(len(self))]
        return [(w, r, j) for w, r, first, end in self._plan for j in range(first, end)]

    def _unit_order(self) -> list[Unit]:
        if not self.shuffle:
            return list(self.units)
        perm = np.random.default_rng([self.seed, self.epoch, 0x51]).permutation(len(self.units))
        return [self.units[i] for i in perm]

    # ---------------------------------------------------------------- epoch / resume state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shuffle order) and start it from its first batch."""
        self.epoch = int(epoch)
        self._start_batch = 0
        self._batches_yielded = 0
        self._order_workers: int | None = None
        self._plan: list[list[int]] | None = None

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches_yielded", "num_workers"}`` (+ ``"plan"`` when the epoch follows one),
        counting batches yielded in this process (use :class:`ResumableDataLoader`'s when loading
        through DataLoader workers)."""
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "batches_yielded": self._start_batch + self._batches_yielded,
            "num_workers": self._order_workers or 1,
        }
        if self._plan is not None:
            state["plan"] = [list(run) for run in self._plan]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._start_batch = int(state["batches_yielded"])
        self._batches_yielded = 0
        self._order_workers = int(state.get("num_workers", 1))
        plan = state.get("plan")
        self._plan = None if plan is None else [[int(v) for v in run] for run in plan]

    # ---------------------------------------------------------------- reading

    def request_store(self) -> RequestStore | None:
        """The memory-mapped request tables when fields of the schema are stored per request (opened
        on first use, in the process that reads), else None."""
        if self.per_request_fields and self._requests is None:
            self._requests = self.prepared.request_store()
        return self._requests if self.per_request_fields else None

    def __getstate__(self) -> dict[str, Any]:
        # a memory map does not pickle (DataLoader workers under spawn): each process opens its own
        state = dict(self.__dict__)
        state["_requests"] = None
        return state

    def __iter__(self) -> Iterator[CtnocvrBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n_batches = len(self)
        # continue where the last pass (or a loaded state) stopped; a finished pass starts over
        start = self._start_batch + self._batches_yielded
        if start >= n_batches or (start == 0 and info is None):
            start, self._order_workers = 0, None
        order_workers = self._order_workers or workers
        if info is None:
            self._start_batch, self._batches_yielded, self._order_workers = start, 0, order_workers
        b = self.batch_size
        shuffle_rows = self.shuffle and self.shuffle_window_batches > 0
        # batches are cut from windows of m batches, decoded (and, shuffling, gathered) as a whole
        m = self.shuffle_window_batches if shuffle_rows else _PLAIN_WINDOW_BATCHES
        # the rest of the pass's canonical order, dealt round-robin: the DataLoader asks the workers
        # in turn starting at 0, so the batches come out in that order (see the module doc)
        # Each position is an origin batch (world, rank, j): rows [lo + j b, ...) of that rank's range
        # under that world size; without a plan, simply (this world, this rank, position).
        origins = self._origins()
        mine = [origins[p] for p in canonical_order(n_batches, order_workers)[start:][worker::workers].tolist()]
        ranges = {(w, r): self.rank_row_range(r, w) for w, r, _ in mine}
        # single-process loading decodes with Arrow's thread pool; inside DataLoader workers the
        # workers already use the cores. The reader decodes the next row group this worker needs in
        # its own thread while the current one is cut into batches.
        order = self._unit_order()
        requests = self.request_store()
        reader = RangeReader(self.files, order, self.columns, use_threads=info is None,
                              wanted_rows=[(ranges[w, r][0] + j * b, min(ranges[w, r][0] + (j + 1) * b, ranges[w, r][1]))
                                           for w, r, j in mine])
        window: dict[str, Any] = {"index": -1}
        # without the row shuffle, a window is a run of up to m consecutive batches of this worker
        # (never rows of another worker's block, which this worker would decode for nothing)
        runs: dict[tuple[int, int, int], tuple[int, int]] = {}  # batch -> (first batch, batches) of its window
        i = 0
        while not shuffle_rows and i < len(mine):
            t = 1
            w0, r0, j0 = mine[i]
            while t < m and i + t < len(mine) and mine[i + t] == (w0, r0, j0 + t):
                t += 1
            runs.update((mine[i + q], (j0, t)) for q in range(t))
            i += t

        def build_batch(origin: tuple[int, int, int]) -> CtnocvrBatch:
            """Origin batch ``(world, rank, j)`` (runs in the prefetch thread only: the reader is not shared)."""
            w, r, j = origin
            lo, hi = ranges[w, r]
            first, count = runs[origin] if not shuffle_rows else ((j // m) * m, m)
            if window["index"] != (w, r, first):
                w_lo = lo + first * b
                w_hi = min(w_lo + count * b, hi)
                rows = None
                if shuffle_rows:
                    # seeded by the origin rank: a batch has the same rows whichever rank reads it
                    perm = np.random.default_rng([self.seed, self.epoch, r, first // m, 0x52]).permutation(
                        w_hi - w_lo)
                    # the permutation picks each batch's rows; taking them in stream order (sorted)
                    # reads memory forwards and the order inside a batch does not matter
                    rows = np.concatenate([np.sort(perm[k:k + b]) for k in range(0, len(perm), b)])
                window["rows"] = BatchRows(reader.read(w_lo, w_hi), self.schema, rows, requests)
                window["index"] = (w, r, first)
            k = j - first
            return window["rows"].batch(k * b, min((k + 1) * b, window["rows"].n))

        # A background thread reads, decodes and builds the next batches (Arrow and numpy release
        # the GIL) while the consumer works on the current one.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-prefetch")
        pending: deque[Future] = deque()
        try:
            upcoming = iter(mine)
            for j in itertools.islice(upcoming, self.prefetch_batches):
                pending.append(pool.submit(build_batch, j))
            while pending:
                batch = pending.popleft().result()
                nxt = next(upcoming, None)
                if nxt is not None:
                    pending.append(pool.submit(build_batch, nxt))
                if info is None:
                    self._batches_yielded += 1
                yield batch
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)
            reader.close()


def _worker_init(_: int) -> None:
    # loader workers decode Arrow data; torch's intra-op threads would only compete for the cores
    torch.set_num_threads(1)


def _worker_init_releasing(worker_id: int) -> None:
    """``_worker_init`` + glibc's steady-state heap limits instead of the ones inherited from a rank
    that raised them for its step (``train/allocator.py``). For evaluation loaders: their batches
    (``eval_batch_size``, 4x the training batch by default) make the workers the largest processes
    of a full-shape evaluation, and each batch lives for one hand-over. 2-rank epoch on the 1/10
    full-shape set: 8.45 -> 6.97-7.06 GB peak RSS summed. Not for training loaders: there the same
    settings cost 6-15% of training samples/s on 2 cores (more page faults in the workers, on the
    ranks' cores; docs/train.md)."""
    _worker_init(worker_id)
    apply_worker_malloc_settings()


class ResumableDataLoader:
    """A DataLoader over a :class:`ParquetBatchDataset` that knows where it is in the epoch.

    ``state_dict()`` -> ``{"epoch", "batches_yielded"}`` counted here, in the main process, so it is
    right for any number of workers; ``load_state_dict`` makes the next iteration continue there.
    """

    def __init__(self, dataset: ParquetBatchDataset, num_workers: int = 0, prefetch_factor: int = 2,
                 release_worker_memory: bool = False) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        #: workers under glibc's steady-state heap limits (:func:`_worker_init_releasing`)
        self.release_worker_memory = release_worker_memory
        self.prefetch_factor = prefetch_factor
        self._yielded = 0
        self._start = 0
        self._order_workers: int | None = None
        self._plan: list[list[int]] | None = None  # the epoch plan, if the state carried one

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self._start, self._yielded, self._order_workers, self._plan = 0, 0, None, None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "epoch": self.dataset.epoch,
            "batches_yielded": self._start + self._yielded,
            "num_workers": self._order_workers or max(1, self.num_workers),
        }
        if self._plan is not None:
            state["plan"] = [list(run) for run in self._plan]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._start, self._yielded = int(state["batches_yielded"]), 0
        self._order_workers = int(state.get("num_workers", 1))
        plan = state.get("plan")
        self._plan = None if plan is None else [[int(v) for v in run] for run in plan]

    def __len__(self) -> int:
        """Batches of this rank in one epoch."""
        return len(self.dataset)

    def __iter__(self) -> Iterator[CtnocvrBatch]:
        start = self._start + self._yielded  # continue; after a finished pass, start a new one
        if start >= len(self.dataset) or start == 0:
            start, self._order_workers = 0, max(1, self.num_workers)
        self._start, self._yielded = start, 0
        position: dict[str, Any] = {"epoch": self.dataset.epoch, "batches_yielded": start,
                                    "num_workers": self._order_workers}
        if self._plan is not None:
            position["plan"] = self._plan
        self.dataset.load_state_dict(position)
        loader = DataLoader(
            self.dataset,
            batch_size=None,  # the dataset yields whole batches
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            worker_init_fn=(_worker_init_releasing if self.release_worker_memory else _worker_init)
            if self.num_workers > 0 else None,
            persistent_workers=False,
        )
        for batch in loader:
            self._yielded += 1
            yield batch


def make_dataloader(
    prepared_dir: str | Path | PreparedSet,
    split: str,
    batch_size: int,
    schema: FieldSchema | str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    shuffle_window_batches: int = 4,
    drop_remainder: bool = False,
    release_worker_memory: bool = False,
) -> ResumableDataLoader:
    """A :class:`ResumableDataLoader` over a new :class:`ParquetBatchDataset` (same arguments);
    ``release_worker_memory``: workers run under glibc's steady-state heap limits (evaluation loaders)."""
    dataset = ParquetBatchDataset(
        prepared_dir, split, batch_size, schema=schema, rank=rank, world_size=world_size, shuffle=shuffle,
        seed=seed, shuffle_window_batches=shuffle_window_batches, drop_remainder=drop_remainder,
    )
    return ResumableDataLoader(dataset, num_workers=num_workers, release_worker_memory=release_worker_memory)


def benchmark_loader(
    prepared_dir: str | Path,
    split: str = "train",
    batch_size: int = 4096,
    num_workers: int = 0,
    shuffle: bool = True,
    shuffle_window_batches: int = 4,
    passes: int = 1,
    schema: FieldSchema | str | Path | None = None,
) -> dict[str, float]:
    """Samples/s of :func:`make_dataloader` over ``passes`` full passes (for ``tools/bench_data.py``).

    Returns ``samples``, ``wall_s``, ``samples_per_s`` and ``samples_per_cpu_s`` (CPU time of this
    process and its threads; workers' CPU is not included) plus the mean ids per row.
    """
    import time

    loader = make_dataloader(prepared_dir, split, batch_size, schema=schema, num_workers=num_workers,
                             shuffle=shuffle, shuffle_window_batches=shuffle_window_batches)
    samples = ids = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for epoch in range(passes):
        loader.set_epoch(epoch)
        for batch in loader:
            samples += batch.batch_size
            ids += batch.sparse_features.values().numel()
            if batch.weighted_features is not None:
                ids += batch.weighted_features.values().numel()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "samples": samples,
        "wall_s": wall,
        "samples_per_s": samples / wall if wall else float("nan"),
        "samples_per_cpu_s": samples / cpu if cpu else float("nan"),
        "ids_per_row": ids / samples if samples else float("nan"),
        "batch_size": batch_size,
        "num_workers": num_workers,
    }
