"""Memory of a one-process evaluation, sampled after every batch: where does it grow?

Runs :func:`ctnocvr_rec.train.api.evaluate_checkpoint` (what ``ctnocvr eval`` runs) with its batch
iterator wrapped, and after every ``--every``-th batch records this process's ``VmRSS``, ``RssAnon``
and ``RssFile`` (``/proc/self/status``) next to glibc's heap figures (``mallinfo2``: ``heap`` bytes
obtained from the OS, ``inuse`` by live blocks, ``free`` inside it, ``mmapped`` in separate maps), then
at the phases after the pass (``loader-done``, ``before-metrics``, ``end``). The slope of each figure
against the rows read (fitted from batch 16 on, past the warm-up to the pass's working set) tells
live growth (``inuse``) from memory the allocator keeps (``RssAnon`` above it) and from the
memory-mapped shards paged in (``RssFile``).

Example (docs/train.md, "What the evaluation's memory is")::

    python tools/probe_eval_memory.py --run-dir RUN --json probe.json
    python tools/probe_eval_memory.py --run-dir RUN --tune-allocator   # as inside `ctnocvr train`

Linux with glibc only (``mallinfo2``, glibc >= 2.33).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _sampler(out: list[dict[str, Any]]) -> Any:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    start = time.time()

    def sample(tag: str, **extra: Any) -> None:
        row: dict[str, Any] = {"tag": tag, "t": round(time.time() - start, 2)}
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                key, value = line.split(":", 1)
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    row[key] = int(value.split()[0]) >> 10  # MB
        info = libc.mallinfo2()
        row.update(heap=info.arena >> 20, inuse=info.uordblks >> 20, free=info.fordblks >> 20,
                   mmapped=info.hblkhd >> 20, **extra)
        out.append(row)

    return sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="run folder written by `ctnocvr train`")
    parser.add_argument("--split", default="test")
    parser.add_argument("--every", type=int, default=1, help="sample after every N-th batch")
    parser.add_argument("--tune-allocator", action="store_true",
                        help="apply the trainer's glibc settings first (train/allocator.py)")
    parser.add_argument("--json", help="write every sample here")
    parser.add_argument("-o", "--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    import ctnocvr_rec.train.data_source as data_source
    from ctnocvr_rec.train.api import evaluate_checkpoint

    samples: list[dict[str, Any]] = []
    sample = _sampler(samples)
    if args.tune_allocator:
        from ctnocvr_rec.train.allocator import tune_host_allocator

        tune_host_allocator()
    opened = data_source.open_eval_batches

    def open_watched(cfg: Any, ctx: Any, split: str) -> Iterable[Any] | None:
        batches = opened(cfg, ctx, split)
        if batches is None:
            return None

        def watched() -> Iterator[Any]:
            rows = 0
            for i, batch in enumerate(batches):
                rows += batch.batch_size
                yield batch
                if i % args.every == 0:
                    sample("batch", i=i, rows=rows)
            sample("loader-done", rows=rows)
        return watched()

    # evaluate_checkpoint imports it from the module at call time
    data_source.open_eval_batches = open_watched  # type: ignore[assignment]
    import ctnocvr_rec.train.evaluate as evaluate_module

    metrics_fn = evaluate_module.task_metrics

    def task_metrics(columns: dict[str, np.ndarray], gauc: bool = True) -> dict[str, float]:
        sample("before-metrics", rows=len(columns["click"]))
        return metrics_fn(columns, gauc=gauc)

    evaluate_module.task_metrics = task_metrics  # type: ignore[assignment]
    sample("start")
    evaluate_checkpoint(args.run_dir, split=args.split, overrides=args.override)
    sample("end")

    batches = [s for s in samples if s["tag"] == "batch" and s["i"] >= 16]
    summary: dict[str, Any] = {"peak_rss_mb": max(s["VmHWM"] for s in samples),
                               "phases": {s["tag"]: {k: s[k] for k in ("RssAnon", "RssFile", "inuse", "heap")}
                                          for s in samples if s["tag"] not in ("batch", "start")}}
    if len(batches) >= 2:
        rows = np.array([s["rows"] for s in batches], dtype=np.float64)
        summary["bytes_per_row"] = {
            key: round(float(np.polyfit(rows, np.array([s[key] for s in batches]) * 2.0**20, 1)[0]), 1)
            for key in ("RssAnon", "RssFile", "inuse", "heap")}
        summary["rows"] = int(batches[-1]["rows"])
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(samples, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
