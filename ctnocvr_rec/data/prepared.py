"""Light helpers over a prepared set (``ctnocvr data prepare`` output); no torch import.

A prepared set is ``<prepared_dir>/manifest.json`` plus ``<split>/*.parquet`` shards (design.md,
"Prepared data set"). These helpers are shared by the loader (``dataset.py``, which needs torch)
and by commands that must stay fast to import (``stats.py``, ``ctnocvr --help``).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

from ctnocvr_rec.data.schema import FieldSchema, load_schema


def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """``<prepared_dir>/manifest.json`` as a dict.

    Raises ``FileNotFoundError`` when it is missing and ``ValueError`` (file, line) when it is not
    valid JSON or not a JSON object.
    """
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a folder written by `ctnocvr data prepare`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def resolve_schema(prepared_dir: str | Path, schema: FieldSchema | str | Path | None) -> FieldSchema:
    """The schema given, else the one recorded in ``<prepared_dir>/manifest.json`` (``"schema"``)."""
    if isinstance(schema, FieldSchema):
        return schema
    if schema is not None:
        return load_schema(schema)
    manifest_path = Path(prepared_dir) / "manifest.json"
    if manifest_path.exists():
        tree = read_manifest(prepared_dir).get("schema")
        if isinstance(tree, dict) and tree.get("fields"):
            return FieldSchema.from_dict(tree, source=f"{manifest_path}:schema")
    raise ValueError(f"{prepared_dir}: no schema given and manifest.json holds none; pass schema=")


def split_files(prepared_dir: str | Path, split: str) -> list[str]:
    """Parquet files of ``split``, sorted by name."""
    files = sorted(glob.glob(os.path.join(str(prepared_dir), split, "*.parquet")))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {os.path.join(str(prepared_dir), split)}")
    return files
