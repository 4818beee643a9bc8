"""``ctnocvr export`` and ``ctnocvr predict`` (docs/serving.md).

``ctnocvr export --run-dir RUN [--checkpoint DIR] --out DIR [--aot]``: any checkpoint of a run (saved
on any number of ranks) -> float program, int8 program, optional AOTInductor package, serving.json.

``ctnocvr predict --model DIR [--precision fp32|int8|aot] --out FILE.parquet`` with ``--prepared DIR
[--split test]``, ``--raw-dir DIR [--split test]`` or ``--format NAME --test FILE...`` (the format's
own options, e.g. ``--table-schema``): streaming batch scoring.
"""

from __future__ import annotations

import argparse
import json


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint of a run for serving (fp32, int8, optional AOT)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run folder written by `ctnocvr train`")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest of the run)")
    p.add_argument("--out", required=True, help="artifact folder to write (written atomically)")
    p.add_argument("--aot", action="store_true",
                   help="also compile an AOTInductor package of the float program (minutes on a small CPU)")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 program")
    p.add_argument("--force", action="store_true", help="replace an existing export folder")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's config, e.g. -o data.prepared_dir=...")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run_export)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score a prepared split or raw Ali-CCP files with an exported model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by `ctnocvr export`")
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8", "aot"), help="program to run")
    p.add_argument("--out", required=True, help="output Parquet file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prepared", help="prepared set (ids already mapped with the model's vocabularies)")
    source.add_argument("--raw-dir", help="folder with sample_skeleton_<split>.csv + common_features_<split>.csv")
    from ctnocvr_rec.data.formats import FORMATS

    row_formats = [name for name, fmt in FORMATS.items() if not hasattr(fmt, "prepare")]
    source.add_argument("--format", choices=row_formats, dest="input_format",
                        help="score files of this `data prepare` input format (the one the model was trained "
                             "on), named by its --train/--valid/--test options; e.g. --format aliccp-rechub-csv "
                             "--test new.csv")
    p.add_argument("--split", default=None,
                   help="split to score (default: test); with --format: which of --train/--valid/--test to score "
                        "(needed only when several are given)")
    p.add_argument("--schema", default=None,
                   help="--format (CSV formats): the field schema the model was trained with, as given to "
                        "`data prepare` (default: the format's own)")
    for name in row_formats:
        FORMATS[name].add_arguments(p.add_argument_group(f"--format {name}"))
    p.add_argument("--batch-size", type=int, default=1024, help="rows per program call (default 1024)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run_predict)


def register(sub: argparse._SubParsersAction) -> None:
    _add_export(sub)
    _add_predict(sub)


def run_export(args: argparse.Namespace) -> int:
    from ctnocvr_rec.serving.export import export_run

    export_run(args.run_dir, args.out, checkpoint=args.checkpoint, aot=args.aot, int8=not args.no_int8,
               overrides=args.override, force=args.force)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import torch

    from ctnocvr_rec.serving.predict import format_summary, predict

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    source, source_desc = None, ""
    if args.input_format:
        from ctnocvr_rec.serving.formatinput import open_for_scoring

        source, source_desc = open_for_scoring(args.input_format, args, args.split)
    elif any(getattr(args, s, None) for s in ("train", "valid", "test", "table_schema")) or args.schema:
        raise ValueError("--train/--valid/--test/--schema/--table-schema go with --format NAME")
    summary = predict(args.model, args.out, precision=args.precision, prepared=args.prepared,
                      split=args.split or "test", raw_dir=args.raw_dir, batch_size=args.batch_size,
                      progress=not args.no_progress, source=source, source_desc=source_desc)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0
