"""The training run of one rank: build → (resume) → pipeline loop → checkpoints → final evaluation.

``run(cfg, plan_file=..., resume=...)`` is what every rank executes (``ctnocvr train`` under torchrun /
TorchX, or directly in one process). Rank 0 returns the ``metrics.json`` content; other ranks None.

Determinism and resume: the data position saved with a checkpoint is the loader state right after
the last *trained* batch. ``TrainPipelineSparseDist`` reads up to two batches ahead (and the
lock-step reader in front of it, :class:`~ctnocvr_rec.train.lockstep.LockstepBatches`, one more), so
the loader state is snapshotted as each batch is read (:class:`TrackedBatches`) and the snapshot of
the batch just trained is the one saved.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from ctnocvr_rec import registry
from ctnocvr_rec.config import RunConfig, save_config, to_dict
from ctnocvr_rec.data.batch import CtnocvrBatch
from ctnocvr_rec.train import checkpoint as ckpt
from ctnocvr_rec.train import reshard
from ctnocvr_rec.train.data_source import TrainData, estimate_steps_per_epoch, open_eval_batches
from ctnocvr_rec.train.distributed import DistContext, all_reduce_cpu, barrier, broadcast_from_main
from ctnocvr_rec.train.evaluate import evaluate
from ctnocvr_rec.train.lockstep import LockstepBatches
from ctnocvr_rec.train.logs import RunLogger
from ctnocvr_rec.train.metrics import format_metrics_table
from ctnocvr_rec.train.optim import LRSchedule, build_optimizer
from ctnocvr_rec.train.runlock import TOKEN_ENV, RunFolderBusyError, RunLock, acquire_run_lock
from ctnocvr_rec.train.setup import build_sharded_model, describe_plan
from ctnocvr_rec.train.testing import dump_table_state, log_trained_sample_ids, sample_id_log_dir


def unpipelined_sharded_modules(model: torch.nn.Module, pipeline: TrainPipelineSparseDist) -> list[str]:
    """Names of the sharded modules (both EBCs of the field embedding) that ``pipeline`` does not
    pipeline. TorchRec logs only when it pipelines none; one of two missing would go unnoticed."""
    from torchrec.distributed.types import ShardedModule

    pipelined = {id(m) for m in pipeline._pipelined_modules}
    return [name for name, m in model.named_modules() if isinstance(m, ShardedModule) and id(m) not in pipelined]

#: loss terms tracked in the logs (those the model reports; every method's, from the registry)
LOSS_TERMS = ("loss", *(f"loss_{term}" for term in registry.loss_term_names()))


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the step and the loss term.

    ``step``: the step; ``terms``: this rank's non-finite terms (empty when another rank saw them)."""

    def __init__(self, message: str, step: int = -1, terms: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.terms = dict(terms or {})


@dataclass
class TrainState:
    """Where training stands (saved with every checkpoint)."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # current epoch
    batches_in_epoch: int = 0  # batches of the current epoch already trained
    data_state: Any = None  # loader state after the last trained batch (None = start of epoch)
    samples: int = 0  # rows trained (all ranks)
    train_time_s: float = 0.0  # wall time spent in training steps (all attempts)


class TrackedBatches:
    """Wraps the per-epoch batch iterator; remembers the loader state after each handed-out batch."""

    def __init__(self, batches: Iterator[CtnocvrBatch], data: TrainData, keep_ids: bool = False) -> None:
        self._batches = batches
        self._data = data
        self._states: deque[Any] = deque()
        self._ids: deque[list[int]] | None = deque() if keep_ids else None  # test hook (testing.py)

    def __iter__(self) -> TrackedBatches:
        return self

    def __next__(self) -> CtnocvrBatch:
        batch = next(self._batches)
        self._states.append(self._data.state_dict())
        if self._ids is not None:
            self._ids.append(batch.sample_id.tolist())
        return batch

    def pop_trained_state(self) -> Any:
        """Loader state after the batch the pipeline just trained (call once per trained step)."""
        return self._states.popleft()

    def pop_trained_ids(self) -> list[int]:
        """Sample ids of the batch the pipeline just trained (only with ``keep_ids``)."""
        assert self._ids is not None
        return self._ids.popleft()


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _maybe_inject_fault(ctx: DistContext, step: int) -> None:
    """Test hook ``CTNOCVR_FAULT_AT_STEP=<N>``: the last rank dies after step N (first attempt only).

    Under torchelastic it SIGKILLs itself (only when ``TORCHELASTIC_RESTART_COUNT`` is 0, so the
    restarted job runs through); in a plain process it raises instead.
    """
    target = os.environ.get("CTNOCVR_FAULT_AT_STEP")
    if target is None or int(target) != step or ctx.rank != ctx.world_size - 1:
        return
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        raise RuntimeError(f"injected fault after step {step}")
    if restart == "0":
        os.kill(os.getpid(), signal.SIGKILL)


def _loss_values(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(outputs[k]) for k in LOSS_TERMS if k in outputs}


def _check_finite(ctx: DistContext, step: int, losses: dict[str, float], last_ckpt: str | None,
                  batches: LockstepBatches[CtnocvrBatch]) -> None:
    """Stop every rank together when any rank saw a non-finite loss term (the verdict rides on the
    lock-step batches' one all-reduce per step, :meth:`LockstepBatches.after_step`)."""
    bad_local = [k for k, v in losses.items() if not math.isfinite(v)]
    if not batches.after_step(ok=not bad_local):
        terms = ", ".join(f"{k}={losses[k]}" for k in bad_local) or "(on another rank)"
        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"non-finite loss at step {step} on rank {ctx.rank}: {terms}; stopping ({where}). "
            "Lower the learning rates or check the input data.",
            step, {k: losses[k] for k in bad_local},
        )


def loop_batches(ctx: DistContext, batches: Iterator[CtnocvrBatch]) -> LockstepBatches[CtnocvrBatch]:
    """``batches`` as the loop hands them to the pipeline: in lock-step over the ranks, stopping every
    rank as soon as one has none left (:class:`~ctnocvr_rec.train.lockstep.LockstepBatches`)."""
    return LockstepBatches(ctx, batches)


def loop_step_check(ctx: DistContext, step: int, outputs: dict[str, torch.Tensor],
                    batches: LockstepBatches[CtnocvrBatch], last_ckpt: str | None = None) -> dict[str, float]:
    """After a step (collective): its loss terms as floats, checked finite on every rank together in
    the same all-reduce that keeps ``batches`` in lock-step; raises :class:`NonFiniteLossError` on
    every rank when any rank saw a non-finite term."""
    losses = _loss_values(outputs)
    _check_finite(ctx, step, losses, last_ckpt, batches)
    return losses


class Trainer:
    """One rank's training run. Collective: every rank constructs it and calls :meth:`run`."""

    def __init__(self, cfg: RunConfig, ctx: DistContext, plan_file: str | None = None,
                 resume: bool = False) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.run_dir = Path(cfg.train.run_dir)
        self.plan_file = plan_file
        self.resume = resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        self.state = TrainState()
        self._num_rows = 0  # rows of the training split (set in run; saved in the checkpoints' elastic record)
        self.last_checkpoint: str | None = None

    # ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any] | None:
        """Take the run folder's writer lock (rank 0), train, evaluate, release."""
        lock = self._take_run_lock()
        try:
            return self._run_locked()
        finally:
            if lock is not None:
                lock.release()

    def _take_run_lock(self) -> RunLock | None:
        """Rank 0 locks the run folder before anything is written to it (runlock.py says who holds it
        under each launcher); every rank learns the outcome, so a refused job stops on all ranks."""
        lock, error = None, None
        if self.ctx.is_main:
            try:
                lock = acquire_run_lock(self.run_dir, inherited_token=os.environ.get(TOKEN_ENV))
            except RunFolderBusyError as e:
                error = str(e)
        error = broadcast_from_main(self.ctx, error)
        if error:
            raise RunFolderBusyError(error)
        for note in lock.notes if lock is not None else []:
            print(f"[train] {note}", file=sys.stderr, flush=True)
        return lock

    def _run_locked(self) -> dict[str, Any] | None:
        cfg, ctx = self.cfg, self.ctx
        wall_start = time.time()
        seed_everything(cfg.train.seed)
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            if not self.resume:
                self._set_aside_old_checkpoints()
        barrier(ctx)

        skipped: list[str] = []  # checkpoints passed over on resume (damaged / unverified): printed now, logged below

        def report(message: str) -> None:
            skipped.append(message)
            ckpt.report_to_stderr(message)

        resume_from = ckpt.agree_on_checkpoint(ctx, self.run_dir, report) if self.resume else None
        plan_source = self.plan_file
        plan_why = ""
        if resume_from is not None and not plan_source:
            # the checkpoint's own plan (bit-identical resume), or a fresh plan for another topology
            plan_source, plan_why = reshard.resume_plan(resume_from.meta, ctx.world_size, cfg)
        sharded = build_sharded_model(cfg, ctx, plan_source)
        model = sharded.model
        if ctx.is_main:
            (self.run_dir / "plan.json").write_text(sharded.plan_json + "\n", encoding="utf-8")
        optimizer, dense_optimizer = build_optimizer(model, cfg.train.optim)
        feature_names = sharded.schema.feature_names

        data = TrainData(cfg, ctx)
        self._num_rows = data.num_rows
        steps_per_epoch = estimate_steps_per_epoch(cfg, ctx)
        total_steps = cfg.train.steps if cfg.train.steps > 0 else cfg.train.epochs * steps_per_epoch
        schedule = LRSchedule(optimizer, cfg.train.optim, total_steps)

        resharded: reshard.ResumedState | None = None
        if resume_from is not None:
            dense_optimizer.init_state()  # Adam's moments must exist for DCP to load into them
            if reshard.same_layout(resume_from.meta, ctx.world_size, sharded.plan_json):
                rank_state = ckpt.load_checkpoint(ctx, resume_from, model, optimizer)
                self.state = TrainState(**rank_state["train_state"])
            else:
                resharded = reshard.resume_resharded(cfg, ctx, resume_from, model, optimizer,
                                                     sharded.plan_json, data.num_rows)
                self.state = TrainState(**resharded.train_state)
                if cfg.train.steps <= 0 and resharded.world_changed:  # epochs-based: steps left depend on the new split
                    left = steps_per_epoch if resharded.batches_left_in_epoch is None else resharded.batches_left_in_epoch
                    total_steps = self.state.step + left + max(0, cfg.train.epochs - self.state.epoch - 1) * steps_per_epoch
                    schedule.total_steps = total_steps
            self.last_checkpoint = str(resume_from.path)
            dump_table_state(ctx, model, optimizer)  # test hook: no-op unless CTNOCVR_DUMP_AFTER_LOAD is set

        logger = RunLogger(self.run_dir, ctx.is_main, total_steps, self.state.step, cfg.train.progress_bar)
        if resume_from is not None:
            logger.message(f"[train] resumed from {resume_from.path} (step {self.state.step})"
                           + (f"; planned afresh: {plan_why}" if plan_source is None else ""))
        if resharded is not None:
            logger.message("\n".join(resharded.report.lines()))
        for message in skipped:
            logger.record("checkpoint", self.state.step, {"message": message})
        logger.message(f"[train] {ctx.world_size} rank(s), {ctx.backend}, device {ctx.device}; plan:\n"
                       + describe_plan(sharded.plan))
        if cfg.train.bf16 and ctx.device_type != "cuda":
            logger.message("[train] train.bf16 is a GPU option (bf16 autocast); ignored on CPU")

        try:
            self._train(model, optimizer, dense_optimizer, schedule, data, total_steps, feature_names, logger)
            metrics = self._final(model, feature_names, logger, wall_start)
        finally:
            logger.close()
        return metrics

    def _set_aside_old_checkpoints(self) -> None:
        """A fresh (not resumed) run must not mix its checkpoints with an earlier run's in the folder:
        a later ``--resume`` would pick whichever step number is higher. Move them aside, never delete."""
        root = ckpt.checkpoints_root(self.run_dir)
        if root.is_dir() and any(root.iterdir()):
            aside = root.with_name(f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(root, aside)
            print(f"[train] starting fresh: moved the earlier checkpoints to {aside} "
                  "(pass --resume to continue a run instead)", flush=True)

    # ----------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.train.bf16 and self.ctx.device_type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _save(self, model: Any, optimizer: Any, plan_json: str) -> None:
        path = ckpt.save_checkpoint(
            self.ctx, self.run_dir, self.state.step, model, optimizer,
            rank_state={"train_state": asdict(self.state)},
            meta={"plan": plan_json, "epoch": self.state.epoch,
                  "elastic": reshard.elastic_record(self.cfg, self._num_rows)},
            keep=self.cfg.train.keep_checkpoints,
        )
        self.last_checkpoint = str(path)

    def _train(self, model: Any, optimizer: Any, dense_optimizer: Any, schedule: LRSchedule, data: TrainData,
               total_steps: int, feature_names: list[str], logger: RunLogger) -> None:
        cfg, ctx, st = self.cfg, self.ctx, self.state
        tc = cfg.train
        plan_json = (self.run_dir / "plan.json").read_text(encoding="utf-8") if ctx.is_main else ""
        plan_json = broadcast_from_main(ctx, plan_json)
        pipeline = TrainPipelineSparseDist(model, optimizer, ctx.device, execute_all_batches=True)
        window: dict[str, float] = {}
        window_rows, window_steps, window_t0 = 0, 0, time.perf_counter()
        pipelined_checked = False
        id_log = sample_id_log_dir()
        done = total_steps > 0 and st.step >= total_steps
        while not done and st.epoch < tc.epochs:
            epoch_batches = data.epoch_batches(st.epoch, st.data_state)
            tracked = TrackedBatches(epoch_batches, data, keep_ids=id_log is not None)
            synced = loop_batches(ctx, tracked)
            model.train()
            while True:
                if total_steps > 0 and st.step >= total_steps:
                    done = True
                    break
                schedule.apply(st.step)
                t0 = time.perf_counter()
                try:
                    with self._autocast():
                        outputs = pipeline.progress(synced)
                except StopIteration:
                    break
                st.train_time_s += time.perf_counter() - t0
                if not pipelined_checked:
                    # TorchRec only logs when its fx trace misses the sharded EBC; then the input
                    # distribution is no longer overlapped with compute, so say it plainly once.
                    pipelined_checked = True
                    missed = unpipelined_sharded_modules(model, pipeline)
                    if missed:
                        logger.message(f"[train] warning: TrainPipelineSparseDist did not pipeline the sharded "
                                       f"module(s) {missed} (its fx trace missed them); their input "
                                       f"distribution runs inline, unoverlapped")
                st.step += 1
                st.batches_in_epoch += 1
                st.data_state = tracked.pop_trained_state()
                if id_log is not None:
                    log_trained_sample_ids(id_log, ctx.rank, st.epoch, st.step, tracked.pop_trained_ids())
                rows = int(outputs["p_ctr"].shape[0]) if "p_ctr" in outputs else cfg.data.batch_size
                losses = loop_step_check(ctx, st.step, outputs, synced, self.last_checkpoint)
                _maybe_inject_fault(ctx, st.step)
                for k, v in losses.items():
                    window[k] = window.get(k, 0.0) + v
                window_rows += rows
                window_steps += 1
                logger.advance()
                if tc.log_every_steps > 0 and st.step % tc.log_every_steps == 0:
                    st.samples += self._log_window(logger, window, window_rows, window_steps, window_t0, schedule)
                    window, window_rows, window_steps, window_t0 = {}, 0, 0, time.perf_counter()
                if tc.eval_every_steps > 0 and st.step % tc.eval_every_steps == 0:
                    pipeline.detach()
                    self._periodic_eval(model, feature_names, logger)
                    pipeline.attach(model)
                if tc.checkpoint_every_steps > 0 and st.step % tc.checkpoint_every_steps == 0:
                    self._save(model, optimizer, plan_json)
            if not done:  # the epoch ran out of batches: a fresh pipeline for the next one
                st.epoch += 1
                st.batches_in_epoch = 0
                st.data_state = None
                pipeline.detach()  # restores the original sharded-module forwards
                pipeline = TrainPipelineSparseDist(model, optimizer, ctx.device, execute_all_batches=True)
        if window_steps:
            st.samples += self._log_window(logger, window, window_rows, window_steps, window_t0, schedule)
        pipeline.detach()
        self._save(model, optimizer, plan_json)

    def _log_window(self, logger: RunLogger, window: dict[str, float], rows: int, steps: int, t0: float,
                    schedule: LRSchedule) -> int:
        """Average the window over ranks (collective), log it; returns the rows trained by all ranks."""
        keys = sorted(window)
        values = torch.tensor([window[k] for k in keys] + [float(rows), float(steps)], dtype=torch.float64)
        all_reduce_cpu(self.ctx, values, "sum")
        total_rows = int(values[-2].item())
        rank_steps = max(1.0, values[-1].item())
        elapsed = max(1e-9, time.perf_counter() - t0)
        entry = {k: values[i].item() / rank_steps for i, k in enumerate(keys)}
        entry.update({
            "samples_per_s": total_rows / elapsed,
            "epoch": self.state.epoch,
            "lr_factor": schedule.apply(self.state.step),
        })
        logger.record("train", self.state.step, entry)
        logger.show({"samples/s": entry["samples_per_s"],
                     **{k.removeprefix("loss_"): v for k, v in entry.items() if k.startswith("loss_")}})
        return total_rows

    def _periodic_eval(self, model: Any, feature_names: list[str], logger: RunLogger) -> None:
        cfg = self.cfg
        batches = open_eval_batches(cfg, self.ctx, cfg.data.eval_split)
        if batches is None:
            return
        metrics = evaluate(self.ctx, model, batches, feature_names, self.ctx.device, gauc=cfg.eval.gauc,
                           bf16=cfg.train.bf16, max_batches=cfg.eval.periodic_max_batches)
        if metrics is not None:
            logger.record("eval", self.state.step, {"split": cfg.data.eval_split, **metrics})
            logger.message(f"[eval step {self.state.step}, {cfg.data.eval_split}] "
                           + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("auc_")))

    def _final(self, model: Any, feature_names: list[str], logger: RunLogger, wall_start: float
               ) -> dict[str, Any] | None:
        cfg, ctx = self.cfg, self.ctx
        split = cfg.eval.final_split or cfg.data.test_split
        batches = open_eval_batches(cfg, ctx, split)
        if batches is None and not cfg.eval.final_split:
            # a prepared set made without test files: report on the validation split instead
            logger.message(f"[train] no '{split}' split in {cfg.data.prepared_dir}; final evaluation on "
                           f"'{cfg.data.eval_split}'")
            split = cfg.data.eval_split
            batches = open_eval_batches(cfg, ctx, split)
        if batches is None:
            raise FileNotFoundError(f"{cfg.data.prepared_dir}: no '{split}' split to evaluate on")
        predictions = self.run_dir / "predictions" / f"{split}.parquet" if cfg.eval.save_predictions else None
        metrics = evaluate(ctx, model, batches, feature_names, ctx.device, gauc=cfg.eval.gauc,
                           predictions_path=predictions, bf16=cfg.train.bf16)
        if metrics is None:
            return None
        st = self.state
        result = results_record(
            cfg, metrics, split, wall_start,
            samples_per_s=st.samples / st.train_time_s if st.train_time_s > 0 else float("nan"),
            steps=st.step,
            epochs_completed=st.epoch,
            world_size=ctx.world_size,
            checkpoint=self.last_checkpoint,
        )
        logger.record("final", st.step, {"split": split, **metrics})
        write_results(self.run_dir / "metrics.json", result)
        logger.message(f"[train] {split} metrics after {st.step} steps:\n{format_metrics_table(metrics)}")
        return result


def results_record(cfg: RunConfig, metrics: dict[str, Any], split: str, wall_start: float,
                   **extra: Any) -> dict[str, Any]:
    """The ``metrics.json`` / ``eval_<split>.json`` document (design.md, "Run folder")."""
    return {
        "metrics": metrics,
        "split": split,
        "seed": cfg.train.seed,
        "config": to_dict(cfg),
        "git_rev": git_revision(),
        "wall_s": time.time() - wall_start,
        **extra,
    }


def write_results(path: Path, result: dict[str, Any]) -> None:
    import json

    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
