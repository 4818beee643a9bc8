"""Checksums of checkpoint files: recorded at publish time, verified before any load.

``meta.json`` of a checkpoint holds a manifest ``files: {name: {"size": bytes, "sha256": hex}}`` of
every other file of the folder (DCP shards ``__<r>_<i>.distcp``, ``.metadata``, ``rank-<r>.pt``) and a
``checksum`` of its own content, so damage anywhere (a flipped bit, a truncated or deleted file, an
edited or deleted ``meta.json``) is found before the bytes reach a model. sha256 because it is the
fastest strong hash of ``hashlib`` on CPUs with SHA extensions (measured: docs/train.md).

Who hashes what at save time: each rank hashes the files it wrote itself (``rank-<r>.pt`` and DCP's
``__<r>_*`` files, still in its page cache) in parallel with the other ranks; rank 0 gathers the
entries and hashes the rest (``.metadata``, anything unclaimed). This assumes what publishing
already does: every rank writes into one folder on a shared filesystem, visible to rank 0.

A checkpoint is one of:

- ``intact``: every recorded file has its size and hash, ``meta.json`` its checksum;
- ``unverified``: written before checksums were recorded (no manifest): usable, with a warning;
- ``damaged``: anything else, with one reason per problem (``file: expected vs actual``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HASH_NAME = "sha256"
META_FILE = "meta.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
_CHUNK = 4 << 20


class CheckpointLoadError(ValueError):
    """A checkpoint could not be read into the model (damage a manifest cannot see, or a checkpoint of
    another model layout). A ``ValueError`` like every other bad-input error: the CLI prints one line."""


class CheckpointDamagedError(CheckpointLoadError):
    """A checkpoint (or every checkpoint of a run) failed verification against its checksums."""


def file_digest(path: str | Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of one file (hashlib releases the GIL: threads run in parallel)."""
    digest = hashlib.new(HASH_NAME)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, HASH_NAME: digest.hexdigest()}


def hash_files(folder: Path, names: Iterable[str], threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Digests of ``folder/<name>`` for each name, hashed on up to ``threads`` threads."""
    names = sorted(set(names))
    if not names:
        return {}
    workers = threads or max(1, min(8, os.cpu_count() or 1, len(names)))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(lambda n: file_digest(folder / n), names)))


def own_files(folder: Path, rank: int) -> list[str]:
    """Files of a checkpoint folder written by ``rank``: its ``rank-<r>.pt`` and DCP ``__<r>_*`` shards."""
    prefix = f"__{rank}_"
    return [p.name for p in folder.iterdir()
            if p.is_file() and (p.name == f"rank-{rank}.pt" or p.name.startswith(prefix))]


def complete_manifest(folder: Path, gathered: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Merge the ranks' own-file digests and hash every other file of ``folder`` (rank 0, before publish)."""
    manifest: dict[str, dict[str, Any]] = {}
    for part in gathered:
        manifest.update(part)
    rest = [p.name for p in folder.iterdir() if p.is_file() and p.name != META_FILE and p.name not in manifest]
    manifest.update(hash_files(folder, rest))
    return dict(sorted(manifest.items()))


def meta_checksum(meta: dict[str, Any]) -> str:
    """Checksum of a ``meta.json`` document without its own ``checksum`` field (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.new(HASH_NAME, text.encode("utf-8")).hexdigest()


def seal_meta(meta: dict[str, Any], manifest: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``meta`` with the file manifest and its own checksum added (what save writes as meta.json)."""
    sealed = {**meta, "hash": HASH_NAME, "files": manifest}
    sealed["checksum"] = meta_checksum(sealed)
    return sealed


@dataclass
class CheckpointStatus:
    """Verification result of one checkpoint folder."""

    step: int
    path: Path
    state: str  # "intact" | "unverified" | "damaged"
    problems: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0

    @property
    def usable(self) -> bool:
        return self.state != "damaged"

    def reason(self) -> str:
        return "; ".join(self.problems)


def _short(digest: str) -> str:
    return f"{digest[:12]}…" if len(digest) > 12 else digest


def read_meta(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(meta, None)`` or ``(None, problem)`` for a checkpoint folder's ``meta.json``."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        return None, f"{META_FILE} is missing (a published checkpoint always has one: deleted or damaged)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{META_FILE} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(meta, dict):
        return None, f"{META_FILE} is not a JSON object"
    return meta, None


def verify_checkpoint(path: str | Path, threads: int | None = None) -> CheckpointStatus:
    """Check one checkpoint folder against its manifest (hashes every file: ~1 s/GiB/thread here)."""
    path = Path(path)
    started = time.perf_counter()
    match = STEP_DIR.match(path.name)
    status = CheckpointStatus(int(match.group(1)) if match else -1, path, "damaged")
    meta, problem = read_meta(path)
    if meta is None:
        status.problems.append(str(problem))
        return status
    status.meta = meta
    if status.step < 0:
        status.step = int(meta.get("step", -1))
    files = meta.get("files")
    if not isinstance(files, dict):  # written before checksums: only the layout can be checked
        status.problems.extend(_layout_problems(path, meta))
        status.state = "damaged" if status.problems else "unverified"
        status.seconds = time.perf_counter() - started
        return status
    if meta.get("checksum") != meta_checksum(meta):
        status.problems.append(f"{META_FILE}: its checksum does not match its content (edited or damaged)")
    to_hash = []
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            status.problems.append(f"{name}: missing (expected {want.get('size')} bytes)")
            continue
        size = file.stat().st_size
        if size != want.get("size"):
            status.problems.append(f"{name}: size {size} bytes, expected {want.get('size')} (truncated or overwritten)")
            continue
        to_hash.append(name)
        status.bytes += size
    for name, got in hash_files(path, to_hash, threads).items():
        want = files[name].get(HASH_NAME, "")
        if got[HASH_NAME] != want:
            status.problems.append(f"{name}: {HASH_NAME} {_short(got[HASH_NAME])}, expected {_short(want)} "
                                   "(content changed)")
    status.state = "damaged" if status.problems else "intact"
    status.seconds = time.perf_counter() - started
    return status


def _layout_problems(path: Path, meta: dict[str, Any]) -> list[str]:
    """What can be checked of a checkpoint without a manifest: the files every checkpoint has."""
    problems = []
    if not (path / ".metadata").is_file():
        problems.append(".metadata: missing")
    for rank in range(int(meta.get("world_size", 1))):
        if not (path / f"rank-{rank}.pt").is_file():
            problems.append(f"rank-{rank}.pt: missing")
    return problems


def step_folders(root: Path) -> list[tuple[int, Path]]:
    """Published ``step-<N>`` folders under ``root`` (with or without ``meta.json``), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def scan(root: Path, threads: int | None = None) -> list[CheckpointStatus]:
    """Verify every published checkpoint under ``root`` (``<run_dir>/checkpoints``), oldest first."""
    return [verify_checkpoint(path, threads) for _, path in step_folders(root)]


def skip_message(status: CheckpointStatus) -> str:
    return f"skipping damaged checkpoint {status.path}: {status.reason()}"


def unverified_message(status: CheckpointStatus) -> str:
    return (f"warning: checkpoint {status.path} has no checksums (written before they were recorded): "
            "loading it unverified")


def newest_usable(root: Path, report: Callable[[str], None], threads: int | None = None
                  ) -> CheckpointStatus | None:
    """The newest checkpoint under ``root`` that verifies, newest first, reporting each one skipped.

    None when there is no published checkpoint at all; :class:`CheckpointDamagedError` naming every
    problem when there are some but none is usable.
    """
    skipped: list[CheckpointStatus] = []
    for _, path in reversed(step_folders(root)):
        status = verify_checkpoint(path, threads)
        if status.usable:
            if status.state == "unverified":
                report(unverified_message(status))
            return status
        report(skip_message(status))
        skipped.append(status)
    if skipped:
        details = " | ".join(f"{s.path.name}: {s.reason()}" for s in skipped)
        raise CheckpointDamagedError(f"{root}: no intact checkpoint ({len(skipped)} damaged: {details})")
    return None
