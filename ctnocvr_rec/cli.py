"""`ctnocvr` command line: one sub-command group per package area.

Each area registers its own sub-commands through ``register(subparsers)`` in its ``commands``
module, so this file only wires them together (and imports torch lazily per command).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

#: (module, help) of every command area, in --help order
AREAS = [
    ("ctnocvr_rec.data.commands", "data: synth | prepare | stats"),
    ("ctnocvr_rec.train.commands", "train / eval"),
    ("ctnocvr_rec.train.checkpoint_commands", "checkpoint: verify | inspect"),
    ("ctnocvr_rec.plan.commands", "plan: embedding sharding plans"),
    ("ctnocvr_rec.serving.commands", "export / predict: serving artifacts and batch scoring"),
    ("ctnocvr_rec.experiments.commands", "experiment / report: the paper's tables and figures"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctnocvr", description="TorchRec multi-task CVR trainer with the CTnoCVR auxiliary task"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name, _ in AREAS:
        module = importlib.import_module(module_name)
        module.register(sub)
    return parser


def _quiet_known_benign_warnings() -> None:
    """Silence messages torch prints on every run that say nothing about the user's job (each exactly).

    Every rank of a ``--nproc`` or TorchX job runs ``python -m ctnocvr_rec.cli train``, so this covers
    them too; ``train.api.run_in_process`` installs the fbgemm filter again for API callers."""
    from ctnocvr_rec.train.known_warnings import quiet_benign_fbgemm_warning

    quiet_benign_fbgemm_warning()
    # DCP loading a checkpoint into one process (eval/export) is intended, not a fallback.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    # TrainPipelineSparseDist's fx trace triggers torch's note about is_fx_tracing semantics.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    _quiet_known_benign_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        # user-facing errors (bad config, bad input files) print one clear line, not a traceback
        if getattr(args, "debug", False):
            raise
        print(f"ctnocvr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
