#!/usr/bin/env python
"""Data benchmark: ``prepare`` vs a naive line-by-line reference, loader samples/s, peak RSS.

One run, the same synthetic raw files (``ctnocvr_rec.data.synth``) for every measurement:

1. ``ctnocvr data prepare`` end to end (both official splits): rows/s = skeleton rows / wall time.
2. :func:`naive_prepare`, the same job written the way community Ali-CCP scripts do it, in plain
   Python line by line: index the common-features file in a dict, read the skeleton, join on
   ``common_feature_index``, count the vocabularies on train (pass 1), then re-read, map ids and
   write the same Parquet columns in buffered, shuffled row groups (pass 2).
   ``--naive-rows N`` limits it to the first ``N`` skeleton lines of each split; its
   common-features time is then pro-rated by the share of skeleton lines processed (it is linear
   in the lines, so the rows/s stay comparable).
3. The loader (``ctnocvr_rec.data.dataset.benchmark_loader``) over the prepared train split at
   batch 4096, one process, in file order and shuffled (window of 4 batches): samples/s, best of
   ``--loader-repeats`` passes each (other jobs on the machine only ever slow a pass down).
   ``--dense N`` also measures the loader on a copy of the prepared set with ``N`` dense features
   (:func:`add_dense_columns`: float32 ``<name>__d`` columns appended to every shard, same row groups),
   so the cost of ``batch.dense`` is the difference of the two lines.

Each phase runs in its own subprocess so that its peak RSS (``getrusage``, self and children) is
its own. Usage::

    .venv/bin/python tools/bench_data.py                 # 1M train rows (+ 10% test rows)
    .venv/bin/python tools/bench_data.py --rows 200000 --naive-rows 50000

Measured on the 2-core dev machine, ``--rows 1000000 --naive-rows 100000`` (2026-11-28).
Shard layout 2 (lz4, int32 non-null id lists, no dictionary pages on lists; one run, load average
1.6): prepare 1.1M rows at 122k rows/s, naive 5.7k rows/s (21.5x wall-clock); CPU per row 14.8 us
(prepare, all processes) vs 175 us (naive): 11.9x less CPU per row. Peak RSS 273 MiB parent + 643
MiB per worker (naive 1.2 GiB). Loader at batch 4096, one process, best of 5 (the five in brackets):
773k samples/s in file order (527-773k), 519k shuffled (473-519k); peak RSS 933 MiB (the torch
import, two decoded row groups of 65,536 rows, the memory-mapped shards).
Earlier runs with zstd + dictionary-encoded int64 lists and the previous loader, under load 5-6:
prepare 24-33k rows/s (naive 2.6-3.0k; 11.1-11.4x less CPU per row), loader 114-155k samples/s.
Where prepare's CPU goes (one process, profile, zstd layout): ~45% the Parquet writer (every row
carries its request's ~100 user-history values and weights), ~28% parsing, ~15% gathering the
joined user lists.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children so far."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _peak_rss_mb() -> dict[str, float]:
    """Peak resident set size (MiB) of this process and of its largest waited-for child."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"self": self_kb / 1024, "largest_child": child_kb / 1024}


# ----------------------------------------------------------------------------------------------
# The naive reference
# ----------------------------------------------------------------------------------------------


def _parse_items(feature_list: str) -> list[tuple[str, int, float]]:
    items = []
    if feature_list:
        for item in feature_list.split("\x01"):
            name, rest = item.split("\x02")
            fid, value = rest.split("\x03")
            items.append((name, int(fid), float(value)))
    return items


def naive_prepare(
    raw_dir: str, out_dir: str, schema_path: str, valid_fraction: float, seed: int, max_rows: int | None
) -> dict[str, Any]:
    """Line-by-line Python preparation producing the same columns as ``ctnocvr data prepare``.

    Returns ``{"rows": skeleton lines processed, "seconds": wall time, "cpu_seconds": CPU time}``
    (times pro-rated for the common-features file when ``max_rows`` limits the skeleton lines).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctnocvr_rec.data.schema import load_schema

    schema = load_schema(schema_path)
    fields = list(schema)
    user_fields = {f.name for f in schema.user_fields}
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    rng = random.Random(seed)
    counts: dict[str, Counter[int]] = {f.name: Counter() for f in fields}
    vocab: dict[str, dict[int, int]] = {}
    rows_total = 0
    seconds = cpu_seconds = 0.0
    request_base = 0

    arrow_fields = [
        pa.field("sample_id", pa.int64()),
        pa.field("request_id", pa.int64()),
        pa.field("user_id", pa.int64()),
        pa.field("click", pa.int8()),
        pa.field("conversion", pa.int8()),
    ]
    for f in fields:
        arrow_fields.append(pa.field(f.name, pa.list_(pa.int64())))
        if f.weighted:
            arrow_fields.append(pa.field(f.weight_column, pa.list_(pa.float32())))
    arrow_schema = pa.schema(arrow_fields)

    for split in ("train", "test"):
        skeleton_path = Path(raw_dir) / f"sample_skeleton_{split}.csv"
        common_path = Path(raw_dir) / f"common_features_{split}.csv"
        if not skeleton_path.exists():
            continue
        # --- common features: a dict of dicts
        t0, c0 = time.perf_counter(), time.process_time()
        common: dict[str, tuple[int, dict[str, list[tuple[int, float]]]]] = {}
        with open(common_path, encoding="utf-8") as f:
            for line in f:
                key, feature_num, feature_list = line.rstrip("\n").split(",")
                items = _parse_items(feature_list)
                if int(feature_num) != len(items) or key in common:
                    continue
                feats: dict[str, list[tuple[int, float]]] = {}
                for name, fid, value in items:
                    feats.setdefault(name, []).append((fid, value))
                common[key] = (len(common), feats)
        t_common, c_common = time.perf_counter() - t0, time.process_time() - c0
        with open(skeleton_path, "rb") as f:
            total_lines = sum(1 for _ in f)
        used_lines = min(total_lines, max_rows) if max_rows else total_lines

        def skeleton_rows(path: Path = skeleton_path, limit: int = used_lines, common: dict = common):
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if i >= limit:
                        return
                    sid, click, buy, key, feature_num, feature_list = line.rstrip("\n").split(",")
                    items = _parse_items(feature_list)
                    if int(feature_num) != len(items) or key not in common or (click, buy) == ("0", "1"):
                        continue  # a reject
                    yield int(sid), int(click), int(buy), key, items

        t0, c0 = time.perf_counter(), time.process_time()
        splits_of_rows: list[str] = []
        if split == "train":
            # pass 1: vocabulary counts on train rows (user fields via the joined common row)
            for _sid, _click, _buy, key, items in skeleton_rows():
                target = "valid" if rng.random() < valid_fraction else "train"
                splits_of_rows.append(target)
                if target != "train":
                    continue
                for name, fid, _value in items:
                    if name in counts:
                        counts[name][fid] += 1
                for name, values in common[key][1].items():
                    if name in counts:
                        for fid, _value in values:
                            counts[name][fid] += 1
            for f in fields:
                if f.mapping == "vocab":
                    ranked = sorted(
                        (fid for fid, c in counts[f.name].items() if c >= f.min_count),
                        key=lambda fid, c=counts[f.name]: (-c[fid], fid),
                    )
                    vocab[f.name] = {fid: i + 1 for i, fid in enumerate(ranked)}

        # per field: (name, from common?, vocab dict or None, hash buckets, weight column or None)
        plan = [
            (
                f.name,
                f.name in user_fields,
                vocab.get(f.name),
                f.num_buckets,
                f.weight_column if f.weighted else None,
            )
            for f in fields
        ]

        # pass 2: re-read, join, map, write shuffled buffers
        writers: dict[str, Any] = {}
        buffers: dict[str, list[dict[str, Any]]] = {}

        def flush(name: str, buffers: dict = buffers, writers: dict = writers) -> None:
            rows = buffers.pop(name, [])
            if not rows:
                return
            rng.shuffle(rows)
            if name not in writers:
                (out / name).mkdir(parents=True, exist_ok=True)
                writers[name] = pq.ParquetWriter(
                    out / name / "part-00000.parquet", arrow_schema, compression="zstd"
                )
            columns = {c: [r[c] for r in rows] for c in arrow_schema.names}
            writers[name].write_table(
                pa.Table.from_pydict(columns, schema=arrow_schema), row_group_size=65_536
            )

        for n, (sid, click, buy, key, items) in enumerate(skeleton_rows()):
            target = splits_of_rows[n] if split == "train" else "test"
            request_id, user = common[key]
            by_field: dict[str, list[tuple[int, float]]] = {}
            for name, fid, value in items:
                by_field.setdefault(name, []).append((fid, value))
            row: dict[str, Any] = {
                "sample_id": sid,
                "request_id": request_base + request_id,
                "user_id": user["101"][0][0] if "101" in user else -1,
                "click": click,
                "conversion": buy,
            }
            for name, from_user, ids, buckets, weight_column in plan:
                values = (user if from_user else by_field).get(name, ())
                if ids is None:
                    row[name] = [fid % buckets for fid, _ in values]
                else:
                    row[name] = [ids.get(fid, 0) for fid, _ in values]
                if weight_column:
                    row[weight_column] = [value for _, value in values]
            buffers.setdefault(target, []).append(row)
            if len(buffers[target]) >= 65_536:
                flush(target)
        for name in list(buffers):
            flush(name)
        for writer in writers.values():
            writer.close()
        share = used_lines / max(total_lines, 1)
        seconds += time.perf_counter() - t0 + t_common * share
        cpu_seconds += time.process_time() - c0 + c_common * share
        rows_total += used_lines
        request_base += len(common)
    return {"rows": rows_total, "seconds": seconds, "cpu_seconds": cpu_seconds}


# ----------------------------------------------------------------------------------------------
# Phases (each in its own subprocess)
# ----------------------------------------------------------------------------------------------


def phase_synth(args: argparse.Namespace) -> dict[str, Any]:
    from ctnocvr_rec.data.synth import SynthConfig, generate

    t0 = time.perf_counter()
    cfg = SynthConfig(
        rows_train=args.rows,
        rows_test=args.rows // 10,
        users=max(1000, args.rows // 50),
        items=max(500, args.rows // 200),
        seed=0,
    )
    generate(cfg, args.raw, workers=args.workers)
    return {"seconds": time.perf_counter() - t0}


def phase_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from ctnocvr_rec.data.prepare import PrepareOptions, prepare

    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    manifest = prepare(
        PrepareOptions(
            args.raw, args.prepared, workers=args.workers, force=True, progress=not args.no_progress,
            user_features=args.user_features,
        )
    )
    seconds = time.perf_counter() - t0
    rows = manifest["rejects"]["rows_in"]
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "cpu_seconds": _cpu_seconds() - cpu0,
        "phases": manifest.get("_timings", {}),
        "exact_path_rows": sum(
            v["skeleton"]["rows_parsed_by_exact_path"] for v in manifest["input_files"].values()
        ),
    }


def phase_naive(args: argparse.Namespace) -> dict[str, Any]:
    result = naive_prepare(args.raw, args.naive_out, "aliccp", 0.1, 0, args.naive_rows)
    result["rows_per_s"] = result["rows"] / result["seconds"]
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def phase_loader(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ctnocvr_rec.data.dataset import benchmark_loader

    torch.set_num_threads(1)
    runs: dict[str, list[float]] = {}
    for shuffle in (False, True):
        key = "shuffled" if shuffle else "file_order"
        # best of N: other jobs on the machine only ever make a run slower
        runs[key] = [
            benchmark_loader(args.prepared, "train", args.batch_size, shuffle=shuffle)["samples_per_s"]
            for _ in range(args.loader_repeats)
        ]
    return {
        "samples_per_s": {k: max(v) for k, v in runs.items()},
        "runs": runs,
        "load_average": os.getloadavg()[0],
        "peak_rss_mb": _peak_rss_mb(),
    }


def add_dense_columns(prepared: str | Path, out: str | Path, num_dense: int, seed: int = 0) -> Path:
    """A copy of the prepared set ``prepared`` at ``out`` with ``num_dense`` dense features ``b0, b1, ...``
    (stored values ~ N(0, 1), float32) appended to every shard with the same row groups and compression;
    the manifest gains the schema's ``dense:`` list and identity ``dense_stats``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctnocvr_rec.data.prepared import read_manifest, write_manifest
    from ctnocvr_rec.data.shards import write_shard

    prepared, out = Path(prepared), Path(out)
    manifest = read_manifest(prepared)
    names = [f"b{k}" for k in range(num_dense)]
    rng = np.random.default_rng(seed)
    for split, info in (manifest.get("splits") or {}).items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for rel in info["files"]:
            handle = pq.ParquetFile(prepared / rel)
            meta = handle.metadata
            table = handle.read()
            for name in names:
                values = rng.standard_normal(table.num_rows).astype(np.float32)
                table = table.append_column(pa.field(f"{name}__d", pa.float32(), nullable=False), pa.array(values))
            write_shard(table, out / rel, compression=meta.row_group(0).column(0).compression.lower(),
                        row_group_size=meta.row_group(0).num_rows)
    if (prepared / "requests").is_dir():  # per-request fields (data/requests.py): the same tables
        shutil.copytree(prepared / "requests", out / "requests", dirs_exist_ok=True)
    manifest["schema"]["dense"] = [{"name": n, "transform": "none", "standardize": False} for n in names]
    manifest["dense_stats"] = {n: {"mean": 0.0, "std": 1.0} for n in names}
    write_manifest(out, manifest)
    return out


def phase_dense_copy(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    add_dense_columns(args.prepared, args.dense_out, args.dense)
    return {"seconds": time.perf_counter() - t0}


PHASES = {"synth": phase_synth, "prepare": phase_prepare, "naive": phase_naive, "loader": phase_loader,
          "dense_copy": phase_dense_copy}


def _run_phase(name: str, argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--phase", name, *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic train rows (test: 10%%)")
    parser.add_argument(
        "--naive-rows", type=int, default=0, help="skeleton lines per split for the naive reference (0 = all)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--loader-repeats", type=int, default=5, help="loader passes per mode (best is reported)")
    parser.add_argument("--work", default="", help="work folder (default: a temporary one, removed)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--dense", type=int, default=0,
                        help="also measure the loader with this many dense features appended (0 = off)")
    parser.add_argument("--skip-prepare", action="store_true",
                        help="reuse the prepared set in --work (loader measurements only)")
    parser.add_argument("--user-features", choices=("per-request", "per-row"), default="per-request",
                        help="prepare's layout of the user fields (default: prepare's default, per-request)")
    parser.add_argument("--dense-out", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    parser.add_argument("--prepared", help=argparse.SUPPRESS)
    parser.add_argument("--naive-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return 0

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ctnocvr-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    common_argv = [
        "--rows",
        str(args.rows),
        "--naive-rows",
        str(args.naive_rows),
        "--workers",
        str(args.workers),
        "--batch-size",
        str(args.batch_size),
        "--loader-repeats",
        str(args.loader_repeats),
        "--raw",
        str(work / "raw"),
        "--prepared",
        str(work / "prepared"),
        "--naive-out",
        str(work / "naive"),
        "--dense",
        str(args.dense),
        "--dense-out",
        str(work / "prepared_dense"),
        "--user-features",
        args.user_features,
    ]
    if args.no_progress:
        common_argv.append("--no-progress")
    try:
        if not (work / "raw" / "sample_skeleton_train.csv").exists():
            synth = _run_phase("synth", common_argv)
            print(f"synth: {args.rows:,} train rows in {synth['seconds']:.1f}s", file=sys.stderr)
        prepared = naive = None
        if not args.skip_prepare:
            prepared = _run_phase("prepare", common_argv)
            naive = _run_phase("naive", common_argv)
        loader = _run_phase("loader", common_argv)
        dense_loader = None
        if args.dense:
            _run_phase("dense_copy", common_argv)
            dense_argv = [*common_argv, "--prepared", str(work / "prepared_dense")]  # the later flag wins
            dense_loader = _run_phase("loader", dense_argv)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if prepared is not None and naive is not None:
        _print_prepare(args, prepared, naive)
    _print_loader(loader, args.batch_size, "")
    if dense_loader is not None:
        _print_loader(dense_loader, args.batch_size, f" +{args.dense} dense")
    return 0


def _print_prepare(args: argparse.Namespace, prepared: dict[str, Any], naive: dict[str, Any]) -> None:
    ratio = prepared["rows_per_s"] / naive["rows_per_s"]
    print(
        f"raw files: {args.rows:,} train + {args.rows // 10:,} test rows (ctnocvr_rec.data.synth), "
        f"{args.workers} workers, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"prepare : {prepared['rows']:>10,} rows in {prepared['seconds']:7.1f}s = {prepared['rows_per_s']:>10,.0f} "
        f"rows/s  (peak RSS parent {prepared['peak_rss_mb']['self']:,.0f} MiB, largest worker "
        f"{prepared['peak_rss_mb']['largest_child']:,.0f} MiB)"
    )
    print(
        f"naive   : {naive['rows']:>10,} rows in {naive['seconds']:7.1f}s = {naive['rows_per_s']:>10,.0f} "
        f"rows/s  (peak RSS {naive['peak_rss_mb']['self']:,.0f} MiB)"
    )
    print("          phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in prepared["phases"].items()))
    print(f"speed-up: {ratio:.1f}x wall-clock (target >= 10x)")
    prepare_cpu, naive_cpu = (
        prepared["cpu_seconds"] / prepared["rows"],
        naive["cpu_seconds"] / naive["rows"],
    )
    print(
        f"CPU     : prepare {prepare_cpu * 1e6:.1f} us/row over all its processes, naive {naive_cpu * 1e6:.1f} "
        f"us/row: {naive_cpu / prepare_cpu:.1f}x less CPU per row; prepare kept "
        f"{prepared['cpu_seconds'] / prepared['seconds']:.2f} cores busy (other load on the machine "
        "lowers the wall-clock ratio, not this one)"
    )


def _print_loader(loader: dict[str, Any], batch_size: int, what: str) -> None:
    best, runs = loader["samples_per_s"], loader["runs"]
    for key, label in (("file_order", "file order"), ("shuffled", "shuffled (window 4)")):
        print(
            f"loader{what or '  '}: {best[key]:>10,.0f} samples/s at batch {batch_size}, 1 process, {label}: best of "
            f"{len(runs[key])} ({', '.join(f'{x / 1e3:.0f}k' for x in runs[key])}; target >= 500k), load "
            f"average {loader['load_average']:.1f} (peak RSS {loader['peak_rss_mb']['self']:,.0f} MiB)"
        )


if __name__ == "__main__":
    sys.exit(main())
