"""`ctnocvr data prepare`: raw Ali-CCP csv -> Parquet shards + vocabulary + manifest (in progress)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw-dir", required=True, help="folder with the official raw csv files")
    parser.add_argument("--out", required=True, help="prepared data folder")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("ctnocvr data prepare: not implemented yet")
