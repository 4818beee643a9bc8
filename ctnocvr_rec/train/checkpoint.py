"""Fault-tolerant checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of one checkpoint (``<run_dir>/checkpoints/step-<N>/``)::

    .metadata, __*_*.distcp   DCP shards of {"model": model.state_dict(), "optim": optimizer.state_dict()}
    rank-<r>.pt               this rank's data position, RNG states, epoch (torch.save)
    meta.json                 step, world size, sharding plan, time  -- written last

Every rank writes into ``.step-<N>.tmp`` first; after a barrier rank 0 writes ``meta.json`` and
publishes the folder with one atomic ``os.rename``. A crash at any point before the rename leaves only
a ``.tmp`` folder, which readers ignore and the next save removes, so the previous checkpoint stays
the newest loadable one. After publishing, rank 0 keeps the newest ``keep`` checkpoints.

A checkpoint written on N ranks loads into an unsharded model in one process
(:func:`load_model_weights`): DCP reshards the table shards on load. Training continues from it on
another world size or plan through :mod:`ctnocvr_rec.train.reshard` (``meta.json`` carries the
``elastic`` record it needs).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from ctnocvr_rec.train.distributed import DistContext, barrier, broadcast_from_main

_STEP_DIR = re.compile(r"^step-(\d+)$")
META_FILE = "meta.json"


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
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """Info of one checkpoint folder given by path (``ctnocvr eval --checkpoint``)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not a published checkpoint (no {META_FILE})")
    match = _STEP_DIR.match(path.name)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return CheckpointInfo(int(match.group(1)) if match else int(meta.get("step", -1)), path, meta)


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
    torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank-{ctx.rank}.pt")
    _fault_hook(step)
    barrier(ctx)
    if ctx.is_main:
        full_meta = {**meta, "step": step, "world_size": ctx.world_size, "saved_at": time.time()}
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump(full_meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. end of run right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
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
    dcp.load(state, checkpoint_id=str(info.path))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    rank_file = info.path / f"rank-{ctx.rank}.pt"
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return rank_state


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load only the model weights of a checkpoint into an unsharded model in this process.

    Works whatever the number of ranks and the plan the checkpoint was written with.
    """
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])


def agree_on_checkpoint(ctx: DistContext, run_dir: str | Path) -> CheckpointInfo | None:
    """Rank 0 picks the newest published checkpoint and tells every rank (they may see a stale listing)."""
    chosen = latest_checkpoint(run_dir) if ctx.is_main else None
    path = broadcast_from_main(ctx, str(chosen.path) if chosen else None)
    return read_checkpoint(path) if path else None
