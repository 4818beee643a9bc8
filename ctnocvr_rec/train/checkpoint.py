"""Fault-tolerant checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of one checkpoint (``<run_dir>/checkpoints/step-<N>/``)::

    .metadata, __*_*.distcp   DCP shards of {"model": model.state_dict(), "optim": optimizer.state_dict()}
    rank-<r>.pt               this rank's data position, RNG states, epoch (torch.save)
    meta.json                 step, world size, sharding plan, time, sha256 + size of every other
                              file and a checksum of itself  -- written last

Every rank writes into ``.step-<N>.tmp`` first and hashes its own files; after a barrier rank 0
gathers the digests, writes ``meta.json`` and publishes the folder with one atomic ``os.rename``. A
crash at any point before the rename leaves only a ``.tmp`` folder, which readers ignore and the next
save removes, so the previous checkpoint stays the newest loadable one. After publishing, rank 0 keeps
the newest ``keep`` checkpoints.

Every load verifies first (:mod:`ctnocvr_rec.train.checkpoint_integrity`): resuming and evaluating
take the newest checkpoint that verifies and report each newer one skipped and why; with none intact
they raise :class:`CheckpointDamagedError` naming the damage. Checkpoints written before checksums
were recorded load with a warning that they cannot be verified.

A checkpoint written on N ranks loads into an unsharded model in one process
(:func:`load_model_weights`): DCP reshards the table shards on load. Training continues from it on
another world size or plan through :mod:`ctnocvr_rec.train.reshard` (``meta.json`` carries the
``elastic`` record it needs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ctnocvr_rec.train import checkpoint_integrity as integrity
from ctnocvr_rec.train.checkpoint_integrity import (
    META_FILE,
    CheckpointDamagedError,
    CheckpointLoadError,
    CheckpointStatus,
)
from ctnocvr_rec.train.distributed import DistContext, barrier, broadcast_from_main, gather_to_main

_STEP_DIR = re.compile(r"^step-(\d+)$")


def report_to_stderr(message: str) -> None:
    """Default reporter of skipped / unverified checkpoints: one line on stderr."""
    print(f"[checkpoint] {message}", file=sys.stderr, flush=True)


@dataclass
class CheckpointInfo:
    step: int
    path: Path
    meta: dict[str, Any]


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Published checkpoints of a run, oldest first (folders without ``meta.json`` are skipped)."""
    root = checkpoints_root(run_dir)
    found: list[CheckpointInfo] = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        meta_path = child / META_FILE
        if not match or not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # a damaged meta.json means the folder is not a usable checkpoint
        found.append(CheckpointInfo(int(match.group(1)), child, meta))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: str | Path) -> CheckpointInfo | None:
    """The highest published step, *not verified* (to load one, use :func:`newest_intact_checkpoint`)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """Info of one checkpoint folder given by path, without verifying its files."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not a published checkpoint (no {META_FILE})")
    match = _STEP_DIR.match(path.name)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return CheckpointInfo(int(match.group(1)) if match else int(meta.get("step", -1)), path, meta)


def _info(status: CheckpointStatus) -> CheckpointInfo:
    return CheckpointInfo(status.step, status.path, status.meta)


def verified_checkpoint(path: str | Path, report: Callable[[str], None] = report_to_stderr) -> CheckpointInfo:
    """One checkpoint folder given by path (``ctnocvr eval --checkpoint``), verified: no fallback, since
    the user named this one; :class:`CheckpointDamagedError` if it is damaged."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    status = integrity.verify_checkpoint(path)
    if not status.usable:
        raise CheckpointDamagedError(f"checkpoint {path} is damaged: {status.reason()}")
    if status.state == "unverified":
        report(integrity.unverified_message(status))
    return _info(status)


def newest_intact_checkpoint(run_dir: str | Path, report: Callable[[str], None] = report_to_stderr
                             ) -> CheckpointInfo | None:
    """The newest checkpoint of a run that verifies; each newer damaged one is reported (skipped, why).

    None when the run has no published checkpoint; :class:`CheckpointDamagedError` naming the damage
    when it has some and none is intact.
    """
    status = integrity.newest_usable(checkpoints_root(run_dir), report)
    return _info(status) if status is not None else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fault_hook(step: int) -> None:
    """Test hook: ``CTNOCVR_FAULT_IN_SAVE_AT_STEP=<N>`` raises inside the save of step N (before publish)."""
    if os.environ.get("CTNOCVR_FAULT_IN_SAVE_AT_STEP") == str(step):
        raise RuntimeError(f"injected fault while saving the checkpoint of step {step}")


def save_checkpoint(
    ctx: DistContext,
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write and publish ``step-<step>`` (collective: every rank must call it)."""
    root = checkpoints_root(run_dir)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a crash during an earlier save
        tmp.mkdir()
    barrier(ctx)
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    dcp.save(state, checkpoint_id=str(tmp))
    with open(tmp / f"rank-{ctx.rank}.pt", "wb") as f:
        torch.save({**rank_state, "rng": rng_state()}, f)
        f.flush()
        os.fsync(f.fileno())
    _fault_hook(step)
    barrier(ctx)
    # each rank hashes the files it wrote (in parallel, from its page cache); rank 0 the rest
    hash_started = time.perf_counter()
    threads = max(1, min(8, (os.cpu_count() or 1) // max(1, ctx.local_world_size)))  # a share of the host's cores
    own = integrity.hash_files(tmp, integrity.own_files(tmp, ctx.rank), threads)
    gathered = gather_to_main(ctx, own)
    if ctx.is_main:
        assert gathered is not None
        manifest = integrity.complete_manifest(tmp, gathered)
        full_meta = integrity.seal_meta(
            {**meta, "step": step, "world_size": ctx.world_size, "saved_at": time.time(),
             "hash_seconds": round(time.perf_counter() - hash_started, 4)},
            manifest,
        )
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump(full_meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. end of run right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)  # the rename itself survives a power cut
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old.path, ignore_errors=True)
    barrier(ctx)
    return final


def load_checkpoint(
    ctx: DistContext,
    info: CheckpointInfo,
    model: torch.nn.Module,
    optimizer: Any,
) -> dict[str, Any]:
    """Load model + optimiser state in place (collective) and return this rank's saved state.

    The optimiser's lazily created state (Adam moments) must exist before DCP can load into it, so
    the caller passes an optimiser whose dense part has been through ``init_state()``.
    """
    saved_world = int(info.meta.get("world_size", -1))
    if saved_world != ctx.world_size:
        # another topology: ctnocvr_rec.train.reshard.resume_resharded maps the state (the trainer
        # picks it when the world size or the plan differs); this strict path loads bit for bit
        raise ValueError(
            f"{info.path}: saved on {saved_world} rank(s), this job has {ctx.world_size}; load it with "
            "ctnocvr_rec.train.reshard.resume_resharded (as `ctnocvr train --resume` does)"
        )
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    with _load_errors(info.path):
        dcp.load(state, checkpoint_id=str(info.path))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    rank_file = info.path / f"rank-{ctx.rank}.pt"
    with _load_errors(rank_file):
        rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return rank_state


def load_model_weights(path: str | Path, model: torch.nn.Module, verify: bool = True,
                       report: Callable[[str], None] = report_to_stderr) -> None:
    """Load only the model weights of a checkpoint into an unsharded model in this process.

    Works whatever the number of ranks and the plan the checkpoint was written with. ``verify``
    checks the folder's checksums first (:class:`CheckpointDamagedError` if damaged); pass False only
    for a folder just verified (or a bare DCP folder without ``meta.json``). A checkpoint that cannot
    be read into ``model`` raises :class:`CheckpointLoadError` naming the cause.
    """
    if verify:
        verified_checkpoint(path, report)
    state = {"model": model.state_dict()}
    with _load_errors(Path(path)):
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])


@contextlib.contextmanager
def _load_errors(path: Path) -> Iterator[None]:
    """Reading errors of DCP / torch.load (damage a manifest cannot see: an unverified checkpoint, a
    file changed after verification, or another model layout) as one :class:`CheckpointLoadError` line."""
    root_logger = logging.getLogger()  # DCP logs its metadata fallbacks there, with tracebacks
    root_logger.addFilter(_quiet_dcp_metadata_fallback)
    try:
        yield
    except CheckpointLoadError:
        raise
    except CheckpointException as e:  # a BaseException whose text is every failing rank's traceback
        failures = list(e.failures.values())
        cause = failures[0][0] if failures else e
        raise CheckpointLoadError(f"{path}: cannot be loaded ({_one_line(cause)})") from e
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise CheckpointLoadError(f"{path}: cannot be loaded ({_one_line(e)})") from e
    finally:
        root_logger.removeFilter(_quiet_dcp_metadata_fallback)


def _one_line(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0][:400]
    return f"{type(error).__name__}: {first}"


def _quiet_dcp_metadata_fallback(record: logging.LogRecord) -> bool:
    """Drop DCP's "... metadata is not found" warnings (with tracebacks): the load error says it once."""
    return not (record.levelno <= logging.WARNING and "metadata is not found" in str(record.msg))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not sync directories
    finally:
        os.close(fd)


def agree_on_checkpoint(ctx: DistContext, run_dir: str | Path,
                        report: Callable[[str], None] = report_to_stderr) -> CheckpointInfo | None:
    """Rank 0 picks the newest intact checkpoint (verifying, reporting those skipped) and tells every
    rank (they may see a stale listing). Raises :class:`CheckpointDamagedError` on every rank when
    checkpoints exist but none is intact."""
    choice: tuple[str, int, dict[str, Any]] | None = None
    error = None
    if ctx.is_main:
        try:
            chosen = newest_intact_checkpoint(run_dir, report)
            choice = (str(chosen.path), chosen.step, chosen.meta) if chosen else None
        except CheckpointDamagedError as e:
            error = str(e)
    choice, error = broadcast_from_main(ctx, (choice, error))
    if error:
        raise CheckpointDamagedError(error)
    return CheckpointInfo(choice[1], Path(choice[0]), choice[2]) if choice else None
