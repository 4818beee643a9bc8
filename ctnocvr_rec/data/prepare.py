"""`ctnocvr data prepare --format NAME`: input files -> shuffled Parquet shards + vocabulary + manifest.

The formats are in :data:`ctnocvr_rec.data.formats.FORMATS` (``docs/formats.md``): ``aliccp-raw`` (the
default, the official raw files; its own pipeline, :mod:`ctnocvr_rec.data.formats.aliccp_raw`) and the
formats whose readers feed the format-neutral writer :mod:`ctnocvr_rec.data.writer`. This module is the
command: the options every format shares, each format's own options, the dispatch and the summary.

The raw pipeline's names stay importable from here (``PrepareOptions``, ``prepare``, ``PrepareError``,
``SPLIT_STREAM``, ``seeded_unit``, ``SKELETON_FILE``, ``COMMON_FILE``, ``chunk_ranges``).
"""

from __future__ import annotations

import argparse
from typing import Any

from ctnocvr_rec.data.formats.aliccp_raw import (  # noqa: F401  (re-exported: the raw pipeline's API)
    COMMON_FILE,
    RAW_FORMAT,
    SKELETON_FILE,
    PrepareOptions,
    chunk_ranges,
    options_from_args,
    prepare,
)
from ctnocvr_rec.data.formats.base import PrepareError  # noqa: F401  (re-exported)
from ctnocvr_rec.data.writer_rules import SPLIT_STREAM, seeded_unit  # noqa: F401  (re-exported)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ctnocvr_rec.data.formats import FORMATS

    d = PrepareOptions(raw_dir="", out_dir="")
    parser.add_argument(
        "--format",
        choices=tuple(FORMATS),
        default=RAW_FORMAT,
        help="input format (default %(default)s; docs/formats.md): "
        + "; ".join(f"{name}: {getattr(fmt, 'help', '')}" for name, fmt in FORMATS.items()),
    )
    parser.add_argument("--out", required=True, help="prepared data folder (written atomically)")
    parser.add_argument(
        "--schema",
        default=None,
        help=f"field schema: packaged name or YAML path (default: the format's; {RAW_FORMAT}: {d.schema})",
    )
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=d.valid_fraction,
        help="share of the train input carved out as the valid split when no valid input is given "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--split-by",
        choices=("row", "user"),
        default=d.split_by,
        help="valid split unit: single rows or whole users (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the split and the shuffle")
    parser.add_argument("--chunk-mb", type=float, default=d.chunk_mb,
                        help="bytes per read / parse task (MiB); the output does not depend on it")
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
        "--strict", action="store_true", help="stop at the first bad row (FILE:ROW: reason (field ...))"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    parser.add_argument(
        "--allow-empty-split",
        action="store_true",
        help="write the output even if a split ends up with no rows (default: an error naming the "
        "split and its top reject reasons)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    for name, fmt in FORMATS.items():
        fmt.add_arguments(parser.add_argument_group(f"--format {name}"))


def run(args: argparse.Namespace) -> int:
    from ctnocvr_rec.data.formats import FORMATS
    from ctnocvr_rec.data.writer import WriterOptions, write_prepared

    name = getattr(args, "format", None) or RAW_FORMAT
    fmt = FORMATS[name]
    own_pipeline = getattr(fmt, "prepare", None)
    if own_pipeline is not None:  # aliccp-raw: its joins need their own pipeline
        manifest = own_pipeline(args)
    else:
        if getattr(args, "raw_dir", None):
            raise PrepareError(f"--raw-dir: only for --format {RAW_FORMAT} (--format {name} reads files)")
        source = fmt.open(args)
        opts = WriterOptions(
            out_dir=args.out,
            valid_fraction=args.valid_fraction,
            split_by=args.split_by,
            seed=args.seed,
            rows_per_shard=args.rows_per_shard,
            strict=args.strict,
            allow_empty_split=args.allow_empty_split,
            force=args.force,
            progress=not args.no_progress,
            compression=args.compression,
        )
        options = getattr(fmt, "options", None)  # optional: the format options that change the output
        manifest = write_prepared(source, opts, name, options(args) if options else {})
    print(summary(manifest))
    return 0


def summary(manifest: dict[str, Any]) -> str:
    """Human-readable summary: rows per split and the rows_in = written + rejected balance."""
    r = manifest["rejects"]
    lines = [
        f"rows_in {r['rows_in']:,} = rows_written {r['rows_written']:,} + rows_rejected {r['rows_rejected']:,}"
        + (f" (common-features lines rejected: {r['common_rows_rejected']:,})" if "common_rows_rejected" in r else "")
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
