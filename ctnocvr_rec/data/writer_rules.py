"""Rules every prepared set follows, whatever its input format: the seeded split and shuffle hashes,
the fingerprint (skip-if-unchanged), source checksums, ``rejects.csv``, ``--strict``, the empty-split
check, the output-folder checks and the atomic publish. One definition each, used by the
format-neutral writer (:mod:`ctnocvr_rec.data.writer`) and the raw Ali-CCP pipeline
(:mod:`ctnocvr_rec.data.formats.aliccp_raw`). Layout of a prepared set: ``docs/design.md``.

Reject records are tuples ``(file, row, reason, detail, raw)``; ``row`` is a line number for the raw
files and a data row (header not counted) for the other formats.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ctnocvr_rec.data.formats.base import PrepareError
from ctnocvr_rec.data.prepared import FORMAT, PreparedSet, read_manifest
from ctnocvr_rec.data.rawfiles import temporary_folder
from ctnocvr_rec.data.schema import FieldSchema

#: split codes of the scratch files, the shuffle seeds and the manifest
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
#: streams of :func:`seeded_unit`: the valid split and the shuffle bucket use independent hashes
SPLIT_STREAM, BUCKET_STREAM = 1, 2
#: shard layout: 2 = non-nullable id lists, int32 ids where they fit, no dictionary pages on list
#: columns (a changed layout must not count as up to date)
SHARD_LAYOUT = 2

RejectRecord = tuple[str, int, str, str, str]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def seeded_unit(values: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """Uniform [0, 1) float64 per value, a pure function of (value, seed, stream)."""
    salt = _splitmix64(np.array([seed * 1_000_003 + stream], np.int64))[0]
    h = _splitmix64(values.astype(np.int64).view(np.uint64) ^ salt)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def output_options(opts: Any) -> dict[str, Any]:
    """The writer options that change the output (fingerprint + manifest ``options``)."""
    return {
        "valid_fraction": opts.valid_fraction,
        "split_by": opts.split_by,
        "seed": opts.seed,
        "rows_per_shard": opts.rows_per_shard,
        "compression": opts.compression,
        "layout": SHARD_LAYOUT,
    }


def check_options(opts: Any) -> None:
    """:class:`PrepareError` on an out-of-range ``--valid-fraction``, ``--split-by``, ``--rows-per-shard``."""
    if not 0.0 <= opts.valid_fraction < 1.0:
        raise PrepareError(f"--valid-fraction must be in [0, 1), got {opts.valid_fraction}")
    if opts.split_by not in ("row", "user"):
        raise PrepareError(f"--split-by must be row or user, got {opts.split_by!r}")
    if opts.rows_per_shard < 1:
        raise PrepareError("--rows-per-shard must be >= 1")


def fingerprint(
    options: Mapping[str, Any], schema: FieldSchema, sources: list[Path], input_format: Mapping[str, Any] | None = None,
    by_name: bool = True,
) -> str:
    """Hash of everything the output depends on: writer options, schema, the sources' names (or paths),
    sizes and modification times, and (for the non-raw formats) the input format and its options."""
    tree: dict[str, Any] = {
        "format": FORMAT,
        "options": dict(options),
        "schema": schema.to_dict(),
        "sources": [(p.name if by_name else str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sources],
    }
    if input_format is not None:
        tree["input_format"] = dict(input_format)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


class Checksums:
    """sha256 of the source files, computed in a background thread (hashlib releases the GIL).
    Keyed by file name (``by_name``) or by the path as given."""

    def __init__(self, paths: list[Path], by_name: bool = True) -> None:
        self.result: dict[str, str] = {}
        self.by_name = by_name
        self.thread = threading.Thread(target=self._run, args=(paths,), daemon=True)
        self.thread.start()

    def _run(self, paths: list[Path]) -> None:
        for path in paths:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(4 << 20):
                    h.update(block)
            self.result[path.name if self.by_name else str(path)] = h.hexdigest()

    def get(self) -> dict[str, str]:
        self.thread.join()
        return self.result


def write_rejects(path: Path, rejects: Iterable[RejectRecord], row_column: str = "line") -> None:
    """``rejects.csv``: ``file,<row_column>,reason,detail,raw``, one row per reject."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", row_column, "reason", "detail", "raw"])
        writer.writerows(rejects)


def raise_first(rejects: Iterable[RejectRecord], folder: str = "", line_offset: int | None = None) -> None:
    """``--strict``: the first reject (by row) as ``FILE:ROW: reason (detail)`` (file under ``folder``
    when given; ``line_offset``: header lines, to add the line number for data-row numbered files)."""
    file, row, reason, detail, _ = min(rejects, key=lambda r: r[1])
    where = f"{Path(folder) / file}" if folder else file
    line = f"; line {row + line_offset}" if line_offset else ""
    raise PrepareError(f"{where}:{row}: {reason} ({detail}{line})")


def check_no_empty_split(
    inputs: Mapping[str, list[tuple[str, str, int, int]]],
    rejects: list[RejectRecord],
    unit: str = "line",
) -> None:
    """Raise when a split given as input ends up with no rows: its files are empty or every row was
    rejected (``--allow-empty-split`` skips this check). ``inputs``: split -> ``(display path,
    reject file key, rows_in, rows_written)`` per input file. A valid split carved at random from
    train may legitimately be empty on a tiny train file and is not checked.
    """
    problems = []
    for name, files in inputs.items():
        if sum(f[3] for f in files):
            continue
        keys = {f[1] for f in files}
        rows_in = sum(f[2] for f in files)
        path = ", ".join(f[0] for f in files)
        mine = [r for r in rejects if r[0] in keys]
        reasons = Counter(r[2] for r in mine)
        top = ", ".join(f"{reason} {count:,}" for reason, count in reasons.most_common(3))
        if rows_in:
            text = f"split {name} is empty: all {rows_in:,} rows of {path} rejected (top reasons: {top})"
        else:
            text = f"split {name} is empty: {path} has no rows"
        first = min(mine, key=lambda r: r[1], default=None)
        if first is not None:
            text += f"; first: {unit} {first[1]}: {first[2]} ({first[3]})"
        problems.append(text)
    if problems:
        raise PrepareError("; ".join(problems) + ". Pass --allow-empty-split to write it anyway.")


def existing_output(out: Path, fingerprint_: str, force: bool, progress: bool) -> dict[str, Any] | None:
    """The manifest of ``out`` when it is up to date (same fingerprint, no ``--force``), else None;
    :class:`PrepareError` when ``out`` is a non-empty folder that is not a prepared set."""
    if out.exists():
        if PreparedSet.exists(out):
            old = read_manifest(out)
            if old.get("fingerprint") == fingerprint_ and not force:
                if progress:
                    print(f"{out}: up to date (same inputs and options); --force rebuilds", file=sys.stderr)
                return old
        elif any(out.iterdir()):
            raise PrepareError(f"{out}: exists, is not empty and holds no manifest.json; not overwriting it")
    return None


def publish(tmp: Path, out: Path) -> None:
    """Swap the finished ``tmp`` into place: the old folder (ours, it has a manifest) goes only once
    the new one is complete."""
    old = temporary_folder(out, "old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


class NullBar:
    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "B") -> Any:
    """A tqdm bar on stderr (or a no-op one when ``enabled`` is false)."""
    if not enabled:
        return NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=sys.stderr, leave=False)
