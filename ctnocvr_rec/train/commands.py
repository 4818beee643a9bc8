"""``ctnocvr train`` and ``ctnocvr eval``.

``ctnocvr train -c cfg.yaml -o key=value ... [--resume] [--plan plan.json] [--nproc N]``: under
torchrun/TorchX every rank runs this command and trains its share; from a shell, ``--nproc N > 1``
relaunches itself through ``torch.distributed.run --standalone`` with N workers. A run folder has one
writer (:mod:`ctnocvr_rec.train.runlock`): a training of a folder another live process writes exits
with :data:`EXIT_RUN_FOLDER_BUSY` before writing anything.

``ctnocvr eval --run-dir RUN [--checkpoint DIR] [--split test] [--predictions]``: one process,
unsharded model, any checkpoint of the run (by default the newest one whose checksums verify; each
newer damaged one is reported).
"""

from __future__ import annotations

import argparse
import sys
import time

#: exit code of a training refused because another live process writes its run folder
EXIT_RUN_FOLDER_BUSY = 4


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (and evaluate) a ranker", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True, help="run config: a YAML file or a packaged name (mmoe, mmoe_ctnocvr, esmm, cgc, ple, aliccp_paper_mmoe, ...)")
    # nargs="+": several overrides after one -o, because `torchx run` rejects a repeated option
    p.add_argument("-o", "--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, one or more per -o, -o repeatable: "
                        "-o model.num_experts=8 train.steps=200 (same as -o model.num_experts=8 -o train.steps=200)")
    p.add_argument("--run-dir", help="run folder (same as -o train.run_dir=...)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run folder")
    p.add_argument("--plan", help="enforce a saved sharding plan (JSON from `ctnocvr plan --save`)")
    p.add_argument("--nproc", type=int, default=1,
                   help="local ranks; >1 relaunches through torch.distributed.run (ignored under torchrun)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc > 1: restarts of the job after a rank fails (each resumes from the newest checkpoint)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint of a run (one process, unsharded)")
    p.add_argument("--run-dir", required=True, help="run folder written by `ctnocvr train`")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest of the run)")
    p.add_argument("--split", default="test", help="split of the prepared set (default: test)")
    p.add_argument("--predictions", action="store_true", help="also write predictions/<split>.parquet")
    p.add_argument("-o", "--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override the run's config, e.g. -o data.prepared_dir=... (one or more per -o)")
    p.add_argument("--json", action="store_true", help="print the result JSON instead of the table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run_eval)


def register(sub: argparse._SubParsersAction) -> None:
    _add_train(sub)
    _add_eval(sub)


def run_train(args: argparse.Namespace) -> int:
    from ctnocvr_rec.config import load_config
    from ctnocvr_rec.train import divergence
    from ctnocvr_rec.train.distributed import launched_by_torchrun

    overrides = list(args.override)
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir}")
    cfg = load_config(args.config, overrides)
    from ctnocvr_rec.train.runlock import RunFolderBusyError

    if args.nproc > 1 and not launched_by_torchrun():
        from pathlib import Path

        from ctnocvr_rec.train.api import launch_local_ranks

        started = time.time()
        try:
            returncode = launch_local_ranks(cfg, args.nproc, args.max_restarts, args.resume, args.plan, announce=True)
        except RunFolderBusyError as e:
            print(f"ctnocvr train: error: {e}", file=sys.stderr)
            return EXIT_RUN_FOLDER_BUSY
        diverged = divergence.since(Path(cfg.train.run_dir), started) if returncode != 0 else None
        if diverged is not None:  # torchrun says 1 for any failed worker; a divergence is 3
            print(f"ctnocvr train: error: {diverged['message']}", file=sys.stderr)
            return 3
        return returncode

    from ctnocvr_rec.train.api import run_in_process
    from ctnocvr_rec.train.loop import NonFiniteLossError

    try:
        result = run_in_process(cfg, resume=args.resume, plan_file=args.plan)
    except NonFiniteLossError as e:
        print(f"ctnocvr train: error: {e}", file=sys.stderr)
        return 3
    except RunFolderBusyError as e:
        print(f"ctnocvr train: error: {e}", file=sys.stderr)
        return EXIT_RUN_FOLDER_BUSY
    if result is not None:
        print(f"[train] results: {cfg.train.run_dir}/metrics.json", file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import json

    from ctnocvr_rec.train.api import evaluate_checkpoint
    from ctnocvr_rec.train.metrics import format_metrics_table

    result = evaluate_checkpoint(args.run_dir, args.checkpoint, args.split, args.override, args.predictions)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print(f"{args.split} metrics of {result['checkpoint']} (step {result['steps']}, "
              f"saved on {result['saved_world_size']} rank(s)):")
        print(format_metrics_table(result["metrics"]))
    return 0
