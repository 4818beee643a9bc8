"""Loader samples/s with worker processes forked from a process tuned like a training rank, with and
without the glibc reset of an evaluation loader's workers (``apply_worker_malloc_settings``), interleaved rounds.

The main process calls ``tune_host_allocator()`` first, as ``ctnocvr train`` does on every rank, then
iterates :func:`ctnocvr_rec.data.dataset.make_dataloader` over one split with ``--workers`` worker
processes (a fast consumer: only the batch sizes are read). Mode ``inherit`` runs the workers as a
training loader does (``release_worker_memory=False``: they keep the rank's settings); mode ``reset``
as an evaluation loader does; mode ``mallopt=MMAP:TRIM:PAD`` sets other values (bytes) in the
workers, for comparison. Prints one JSON line per pass. Usage::

    python tools/bench_loader_workers.py /work/fullshape_data/s10_req --split test --batch-size 16384 \\
        --rank 0 --world-size 2 --rounds 2

Run it under ``tools/measure_tree.py --per-process`` for the workers' peak memory of each mode
(one mode per command: ``--modes reset``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

from ctnocvr_rec.data import dataset, rawfiles
from ctnocvr_rec.train.allocator import tune_host_allocator


def _custom_init(values: tuple[int, int, int]) -> Callable[[int], None]:
    """A worker init that sets mmap threshold, trim threshold and top pad to ``values`` (bytes)."""
    def init(_: int) -> None:
        torch.set_num_threads(1)
        mallopt = rawfiles.libc_function("mallopt")
        params = (rawfiles.M_MMAP_THRESHOLD, rawfiles.M_TRIM_THRESHOLD, rawfiles.M_TOP_PAD)
        for param, value in zip(params, values, strict=True):
            assert mallopt(param, value) == 1, (param, value)
        rawfiles.release_free_memory()
    return init


def one_pass(args: argparse.Namespace, mode: str) -> dict[str, object]:
    """Samples/s of one pass over the split in ``mode`` (``inherit`` or ``reset``)."""
    # inherit: a training loader's workers (the rank's settings); reset: an evaluation loader's
    # (``_worker_init_releasing``); mallopt=...: the evaluation init with other values
    original = dataset._worker_init_releasing
    if mode.startswith("mallopt="):
        mmap_t, trim_t, pad = (int(v) for v in mode.split("=")[1].split(":"))
        dataset._worker_init_releasing = _custom_init((mmap_t, trim_t, pad))
    elif mode not in ("inherit", "reset"):
        raise ValueError(f"unknown mode {mode!r}")
    try:
        loader = dataset.make_dataloader(args.prepared_dir, args.split, args.batch_size, rank=args.rank,
                                         world_size=args.world_size, num_workers=args.workers,
                                         release_worker_memory=mode != "inherit")
        samples, t0, cpu0 = 0, time.perf_counter(), os.times()
        for batch in loader:
            samples += batch.batch_size
        wall, cpu1 = time.perf_counter() - t0, os.times()
    finally:
        dataset._worker_init_releasing = original
    # workers are waited for when the loader ends, so children_* holds their CPU
    worker_cpu = (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
    return {"mode": mode, "samples": samples, "wall_s": round(wall, 2), "samples_per_s": round(samples / wall),
            "worker_cpu_s": round(worker_cpu, 2), "load": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prepared_dir")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=16384)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--modes", default="inherit,reset",
                   help="comma-separated: inherit, reset, mallopt=MMAP:TRIM:PAD (bytes, set in each worker)")
    args = p.parse_args()
    if args.workers < 1:
        p.error("--workers must be >= 1 (the reset happens in worker processes)")
    print(json.dumps({"tuned": tune_host_allocator()}), flush=True)
    for _ in range(args.rounds):
        for mode in args.modes.split(","):
            print(json.dumps(one_pass(args, mode)), flush=True)


if __name__ == "__main__":
    main()
