"""``ctnocvr checkpoint ACTION``: look at the checkpoints of a run folder without loading a model.

``ctnocvr checkpoint verify RUN_DIR [--json]`` checks every checkpoint of ``RUN_DIR/checkpoints``
against the sizes and sha256 digests recorded when it was published and lists each one as
``intact``, ``unverified`` (written before checksums were recorded) or ``DAMAGED`` with the reasons.
``RUN_DIR`` may also be one checkpoint folder. Exit status:

- 0: the newest checkpoint is usable (intact or unverified); older damaged ones are listed only;
- 1: the newest is damaged but an older one is usable (``--resume`` and ``ctnocvr eval`` fall back
  to it and say so);
- 2: no usable checkpoint (all damaged, or none at all).

``ctnocvr checkpoint inspect RUN_DIR [--json]``: per checkpoint the step, world size, plan summary,
tables and optimiser state present, sizes, data positions and whether it can move to another
world size (:mod:`ctnocvr_rec.train.checkpoint_inspect`).

Actions are added to :data:`ACTIONS` (one ``add_<action>(subparsers)`` function each).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_NEWEST_USABLE = 0
EXIT_FELL_BACK = 1
EXIT_NONE_USABLE = 2


def add_verify(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser("verify", help="check every checkpoint of a run against its recorded checksums",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `ctnocvr train` (or one checkpoint folder)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run_verify)


def add_inspect(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser("inspect", help="what each checkpoint of a run holds")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `ctnocvr train`")
    p.add_argument("--json", action="store_true", help="print JSON instead of the text report")
    p.add_argument("--all-tables", action="store_true", help="list data-parallel tables one by one too")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from ctnocvr_rec.train.checkpoint_inspect import format_report, inspect_run

    report = inspect_run(args.run_dir)
    print(json.dumps(report, indent=1) if args.json else format_report(report, args.all_tables))
    return 0


#: the ``ctnocvr checkpoint`` actions, in --help order
ACTIONS: list[Callable[[argparse._SubParsersAction], None]] = [add_verify, add_inspect]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="checkpoint tools: verify | inspect", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="checkpoint_action", required=True, metavar="ACTION")
    for add in ACTIONS:
        add(actions)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def verify_folder(target: Path) -> tuple[list[Any], list[Path], Path]:
    """Statuses of the checkpoints of a run folder (or of one checkpoint folder), the unpublished
    temp folders, and the folder listed."""
    from ctnocvr_rec.train import checkpoint_integrity as integrity

    if not target.is_dir():
        raise FileNotFoundError(f"{target}: no such run folder")
    if (target / integrity.META_FILE).is_file() or integrity.STEP_DIR.match(target.name):
        return [integrity.verify_checkpoint(target)], [], target
    root = target / "checkpoints"
    temps = sorted(root.glob(".step-*.tmp")) if root.is_dir() else []
    return integrity.scan(root), temps, root


def run_verify(args: argparse.Namespace) -> int:
    target = Path(args.run_dir)
    statuses, temps, root = verify_folder(target)
    usable = [s for s in statuses if s.usable]
    if not usable:
        code = EXIT_NONE_USABLE
    else:
        code = EXIT_NEWEST_USABLE if statuses[-1].usable else EXIT_FELL_BACK
    if args.json:
        print(json.dumps({
            "folder": str(root),
            "checkpoints": [{"step": s.step, "path": str(s.path), "state": s.state, "problems": s.problems,
                             "bytes": s.bytes, "seconds": round(s.seconds, 4)} for s in statuses],
            "unpublished": [str(t) for t in temps],
            "newest_usable": str(usable[-1].path) if usable else None,
            "exit_code": code,
        }, indent=1))
        return code
    if not statuses:
        print(f"{root}: no published checkpoint", file=sys.stderr)
        return code
    print(f"{root}: {len(statuses)} checkpoint(s), oldest first")
    width = max(len(s.path.name) for s in statuses)
    for s in statuses:
        if s.state == "damaged":
            print(f"  {s.path.name:<{width}}  DAMAGED     {s.problems[0]}")
            for extra in s.problems[1:]:
                print(f"  {'':<{width}}              {extra}")
        elif s.state == "unverified":
            print(f"  {s.path.name:<{width}}  unverified  no checksums (written before they were recorded)")
        else:
            files = len(s.meta.get("files", {}))
            print(f"  {s.path.name:<{width}}  intact      {files} files, {_size(s.bytes)}, "
                  f"checked in {s.seconds:.2f} s")
    for t in temps:
        print(f"  {t.name}  unpublished (a save in progress or left by a crash; ignored)")
    if code == EXIT_NONE_USABLE:
        print("no usable checkpoint: `--resume` and `ctnocvr eval` stop with this damage")
    elif code == EXIT_FELL_BACK:
        print(f"the newest is damaged: `--resume` and `ctnocvr eval` use {usable[-1].path.name} and report the "
              "skipped ones")
    else:
        print(f"newest usable: {usable[-1].path.name}")
    return code
