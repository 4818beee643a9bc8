"""Python API: ``train_and_evaluate(cfg, nproc)`` and ``evaluate_checkpoint(...)``.

``nproc == 1`` trains in this process (a one-rank process group is created and destroyed around the
run, unless the caller already runs under torchrun). ``nproc > 1`` takes the run folder's writer lock
(:mod:`ctnocvr_rec.train.runlock`), writes the resolved config to the run folder and launches
``torch.distributed.run --standalone`` with ``nproc`` workers running ``ctnocvr train``, which borrow
the lock; the result is read back from ``metrics.json``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctnocvr_rec.config import RunConfig, save_config
from ctnocvr_rec.train import divergence

if TYPE_CHECKING:
    from ctnocvr_rec.train.checkpoint import CheckpointInfo
    from ctnocvr_rec.train.distributed import DistContext
    from ctnocvr_rec.train.loop import NonFiniteLossError


def torchrun_command(config_path: str | Path, nproc: int, max_restarts: int = 0, resume: bool = False,
                     plan_file: str | None = None, nnodes: int = 1) -> list[str]:
    """The ``python -m torch.distributed.run ... -m ctnocvr_rec.cli train`` command line."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "-m", "ctnocvr_rec.cli", "train", "-c", str(config_path),
    ]
    if resume:
        cmd.append("--resume")
    if plan_file:
        cmd += ["--plan", str(plan_file)]
    return cmd


def worker_env(nproc: int) -> dict[str, str]:
    """Environment of launched workers: a fair share of the cores each unless the user set threads."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, nproc)))
    return env


def launch_local_ranks(cfg: RunConfig, nproc: int, max_restarts: int = 0, resume: bool = False,
                       plan_file: str | None = None, announce: bool = False) -> int:
    """Run ``ctnocvr train`` on ``nproc`` local ranks through ``torch.distributed.run``; its exit code.

    This process takes the run folder's writer lock *before* writing ``config.yaml`` (a second
    training of the same folder is refused here, before anything is launched) and holds it across
    torchrun's restarts; torchrun gets the lock's descriptor and the workers its token
    (:mod:`ctnocvr_rec.train.runlock`). Raises :class:`~ctnocvr_rec.train.runlock.RunFolderBusyError`.
    """
    from ctnocvr_rec.train.runlock import acquire_run_lock

    run_dir = Path(cfg.train.run_dir)
    with acquire_run_lock(run_dir, role="launcher") as lock:
        for note in lock.notes:
            print(f"[train] {note}", file=sys.stderr, flush=True)
        config_path = run_dir / "config.yaml"
        save_config(cfg, config_path)
        cmd = torchrun_command(config_path, nproc, max_restarts=max_restarts, resume=resume, plan_file=plan_file)
        if announce:
            print("[train] launching: " + " ".join(cmd), file=sys.stderr, flush=True)
        env = lock.child_env(worker_env(nproc))
        return subprocess.run(cmd, env=env, pass_fds=lock.pass_fds, check=False).returncode


def enable_rank_stacks() -> None:
    """Python stacks of every thread on stderr (torchrun's log of the rank) when it is needed most:
    ``kill -USR1 <pid>`` prints them from a stuck rank (where it waits), and a fatal signal from
    native code (a segfault, or ``std::terminate``'s SIGABRT from a collective library's thread)
    prints them before the rank dies, instead of a bare exit code -6 / -11."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)


def run_in_process(cfg: RunConfig, resume: bool = False, plan_file: str | None = None) -> dict[str, Any] | None:
    """Train on this process's rank (every rank of a torchrun job calls this)."""
    from ctnocvr_rec.train.allocator import tune_host_allocator
    from ctnocvr_rec.train.distributed import init_distributed, shutdown
    from ctnocvr_rec.train.known_warnings import quiet_benign_fbgemm_warning
    from ctnocvr_rec.train.loop import NonFiniteLossError, Trainer

    quiet_benign_fbgemm_warning()
    run_dir = Path(cfg.train.run_dir)
    earlier = divergence.of_this_job(run_dir)
    if earlier is not None:  # a torchelastic restart after a divergence: training again cannot help
        raise NonFiniteLossError(
            f"{earlier['message']} [attempt {earlier.get('attempt', 0)} of this job diverged "
            f"({run_dir / divergence.MARKER}); this restarted attempt does not train again]",
            int(earlier.get("step", -1)),
        )
    enable_rank_stacks()
    if cfg.train.tune_host_allocator:
        tune_host_allocator()
    ctx = init_distributed(cfg.train.device)
    try:
        if ctx.is_main and divergence.restart_count() == 0:
            divergence.clear(run_dir)  # an earlier job's record
        try:
            return Trainer(cfg, ctx, plan_file=plan_file, resume=resume).run()
        except NonFiniteLossError as e:
            _record_divergence(ctx, run_dir, e)
            raise
    finally:
        shutdown(ctx)


def _record_divergence(ctx: DistContext, run_dir: Path, error: NonFiniteLossError) -> None:
    """Rank 0 writes ``diverged.json`` with the message of the first rank that saw the non-finite terms,
    before any rank exits (collective: every rank raises at the same step; once one rank exits,
    torchelastic stops the others, rank 0 maybe before it wrote the record)."""
    from ctnocvr_rec.train.distributed import barrier, gather_to_main

    reports = gather_to_main(ctx, (bool(error.terms), str(error)))
    if ctx.is_main:
        assert reports is not None
        message = next((m for has_terms, m in reports if has_terms), str(error))
        divergence.record(run_dir, message, error.step)
    barrier(ctx)


def train_and_evaluate(cfg: RunConfig, nproc: int = 1, resume: bool = False, plan_file: str | None = None,
                       max_restarts: int = 0) -> dict[str, Any]:
    """Train ``cfg`` on ``nproc`` local ranks, evaluate, and return the ``metrics.json`` content."""
    from ctnocvr_rec.train.distributed import launched_by_torchrun

    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    run_dir = Path(cfg.train.run_dir)
    if nproc == 1 or launched_by_torchrun():
        result = run_in_process(cfg, resume=resume, plan_file=plan_file)
        if result is None:  # a non-zero rank of an outer torchrun job
            return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        return result
    started = time.time()
    returncode = launch_local_ranks(cfg, nproc, max_restarts=max_restarts, resume=resume, plan_file=plan_file)
    diverged = divergence.since(run_dir, started) if returncode != 0 else None
    if diverged is not None:
        from ctnocvr_rec.train.loop import NonFiniteLossError

        raise NonFiniteLossError(diverged["message"], int(diverged.get("step", -1)))
    if returncode != 0:
        raise RuntimeError(f"training with {nproc} ranks failed (exit {returncode}); see the output above")
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file() or metrics_path.stat().st_mtime < started - 1:
        raise RuntimeError(f"{metrics_path} was not written by the run")
    return json.loads(metrics_path.read_text(encoding="utf-8"))


def open_run_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None,
                        overrides: list[str] | None = None) -> tuple[RunConfig, CheckpointInfo]:
    """The saved config of a run folder (with ``overrides``) and the checkpoint to load, verified:
    the newest intact one (each newer damaged one reported on stderr), or exactly the one named.
    What eval and export start from."""
    from ctnocvr_rec.config import load_config
    from ctnocvr_rec.train import checkpoint as ckpt

    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --run-dir must be a folder written by `ctnocvr train`")
    cfg = load_config(config_path, overrides)
    info = ckpt.verified_checkpoint(checkpoint) if checkpoint else ckpt.newest_intact_checkpoint(run_dir)
    if info is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints has no published checkpoint")
    return cfg, info


def evaluate_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None, split: str = "test",
                        overrides: list[str] | None = None, save_predictions: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint of a run in one process, unsharded (whatever world size it was saved on).

    The checkpoint is verified first: by default the newest intact one is used and every newer
    damaged one is reported on stderr; a ``checkpoint`` named explicitly must be intact.
    Raises :class:`~ctnocvr_rec.train.checkpoint.CheckpointDamagedError` (a ``ValueError``).

    Writes ``<run_dir>/eval_<split>.json`` (same layout as ``metrics.json``) and, if asked,
    ``<run_dir>/predictions/<split>.parquet``.
    """
    from ctnocvr_rec.train import checkpoint as ckpt
    from ctnocvr_rec.train.data_source import open_eval_batches
    from ctnocvr_rec.train.distributed import init_distributed, pick_device, shutdown
    from ctnocvr_rec.train.evaluate import evaluate
    from ctnocvr_rec.train.loop import results_record, write_results
    from ctnocvr_rec.train.setup import build_unsharded_model

    run_dir = Path(run_dir)
    cfg, info = open_run_checkpoint(run_dir, checkpoint, overrides)
    started = time.time()
    device = pick_device(cfg.train.device, 0)
    model = build_unsharded_model(cfg, device)
    ckpt.load_model_weights(info.path, model, verify=False)
    ctx = init_distributed(cfg.train.device)
    try:
        batches = open_eval_batches(cfg, ctx, split)
        if batches is None:
            raise FileNotFoundError(f"{cfg.data.prepared_dir}: no '{split}' split")
        from ctnocvr_rec.train.data_source import open_prepared

        feature_names = open_prepared(cfg).schema.feature_names
        predictions = run_dir / "predictions" / f"{split}.parquet" if save_predictions else None
        metrics = evaluate(ctx, model, batches, feature_names, device, gauc=cfg.eval.gauc,
                           predictions_path=predictions)
    finally:
        shutdown(ctx)
    assert metrics is not None
    result = results_record(
        cfg, metrics, split, started,
        checkpoint=str(info.path),
        steps=int(info.meta.get("step", info.step)),
        saved_world_size=int(info.meta.get("world_size", 0)),
    )
    write_results(run_dir / f"eval_{split}.json", result)
    return result
