"""The trainer's view of the data: per-rank batch iterators over a prepared split.

Thin adapter over :class:`ctnocvr_rec.data.dataset.ParquetBatchDataset` (rank/world-size row
splitting, per-epoch shuffle, ``state_dict`` for exact resume), so the loop only sees:

* :class:`TrainData` – ``epoch_batches(epoch, state)`` and ``state_dict()``;
* :func:`open_eval_batches` – this rank's share of an evaluation split, unshuffled, every row once;
* :func:`estimate_steps_per_epoch` – for learning-rate schedules over epochs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ctnocvr_rec.config import RunConfig
from ctnocvr_rec.data.batch import CtnocvrBatch
from ctnocvr_rec.data.prepared import PreparedSet
from ctnocvr_rec.train.distributed import DistContext


def open_prepared(cfg: RunConfig) -> PreparedSet:
    """The prepared set of ``cfg.data`` with the schema in use (manifest's or ``data.schema``)."""
    return PreparedSet.open(cfg.data.prepared_dir, cfg.data.schema)


def _dataset(cfg: RunConfig, ctx: DistContext, split: str, training: bool,
             prepared: PreparedSet | None = None) -> Any:
    """A resumable loader of this rank's share of ``split``.

    Training drops the epoch's remainder so every rank has the same number of full batches (DMP
    needs equal step counts; the loop also stops all ranks at the shortest one as a safeguard).
    Evaluation keeps every row once; ranks may differ by one batch, which the evaluation equalises.
    """
    from ctnocvr_rec.data.dataset import make_dataloader

    return make_dataloader(
        prepared or open_prepared(cfg),
        split=split,
        batch_size=cfg.data.batch_size if training else cfg.data.eval_batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        num_workers=cfg.data.num_workers,
        shuffle=training,
        seed=cfg.data.shuffle_seed,
        shuffle_window_batches=cfg.data.shuffle_buffer_batches,
        drop_remainder=training,
        release_worker_memory=not training,  # evaluation batches are the big ones (data/dataset.py)
    )


def split_exists(cfg: RunConfig, split: str) -> bool:
    return (Path(cfg.data.prepared_dir) / split).is_dir()


class TrainData:
    """This rank's training batches, epoch by epoch, resumable from a saved position."""

    def __init__(self, cfg: RunConfig, ctx: DistContext) -> None:
        if not split_exists(cfg, cfg.data.train_split):
            raise FileNotFoundError(f"{cfg.data.prepared_dir}: no '{cfg.data.train_split}' split to train on")
        self.dataset = _dataset(cfg, ctx, cfg.data.train_split, training=True)

    def epoch_batches(self, epoch: int, state: Any = None) -> Iterator[CtnocvrBatch]:
        """Batches of ``epoch``; with ``state`` (from :meth:`state_dict`) continue after that batch."""
        self.dataset.set_epoch(epoch)
        if state is not None:
            self.dataset.load_state_dict(state)
            if int(state["batches_yielded"]) >= len(self.dataset):
                # saved right after the epoch's last batch: nothing is left of it (the loader itself
                # would start the epoch over, which is right for evaluation passes, not here)
                return iter(())
        return iter(self.dataset)

    def state_dict(self) -> Any:
        return self.dataset.state_dict()

    @property
    def num_rows(self) -> int:
        """Rows of the training split (the epoch's virtual stream, before the per-rank split)."""
        return int(self.dataset.dataset.num_rows)


def open_eval_batches(cfg: RunConfig, ctx: DistContext, split: str) -> Iterable[CtnocvrBatch] | None:
    """This rank's share of ``split`` (None when the prepared set has no such split)."""
    if not split_exists(cfg, split):
        return None
    return _dataset(cfg, ctx, split, training=False)


def estimate_steps_per_epoch(cfg: RunConfig, ctx: DistContext) -> int:
    """Steps of one epoch from the manifest's row count (each rank takes a 1/world share)."""
    rows = open_prepared(cfg).rows(cfg.data.train_split)
    return max(1, math.floor(rows / ctx.world_size / cfg.data.batch_size)) if rows else 1
