"""`ctnocvr data synth | prepare | stats`.

Each sub-command lives with its implementation (``add_arguments(parser)`` + ``run(args) -> int``
in ``synth.py``, ``prepare.py``, ``stats.py``); this module only wires them.
"""

from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = [
    ("synth", "ctnocvr_rec.data.synth", "write synthetic Ali-CCP raw files with ground truth"),
    ("prepare", "ctnocvr_rec.data.prepare", "input files (--format, default the raw Ali-CCP csv) -> Parquet shards + vocabulary + manifest"),
    ("stats", "ctnocvr_rec.data.stats", "print the paper's Table 2 for a prepared set"),
]


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data: synth | prepare | stats")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    for name, module_name, help_text in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        parser = data_sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)
