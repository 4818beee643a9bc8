"""``ctnocvr checkpoint ...``: look at a run's checkpoints.

``ctnocvr checkpoint inspect RUN_DIR [--json]``: per checkpoint the step, world size, plan summary,
tables and optimiser state present, sizes, data positions and whether it can move to another
world size (:mod:`ctnocvr_rec.train.checkpoint_inspect`).
"""

from __future__ import annotations

import argparse


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="what each checkpoint of a run holds")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `ctnocvr train`")
    p.add_argument("--json", action="store_true", help="print JSON instead of the text report")
    p.add_argument("--all-tables", action="store_true", help="list data-parallel tables one by one too")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run_inspect)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="checkpoint: inspect", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="checkpoint_command", required=True, metavar="ACTION")
    _add_inspect(actions)


def run_inspect(args: argparse.Namespace) -> int:
    import json

    from ctnocvr_rec.train.checkpoint_inspect import format_report, inspect_run

    report = inspect_run(args.run_dir)
    print(json.dumps(report, indent=1) if args.json else format_report(report, args.all_tables))
    return 0
