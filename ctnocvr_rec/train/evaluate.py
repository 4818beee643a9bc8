"""Distributed evaluation: every rank predicts its share, rank 0 computes exact whole-set metrics.

A sharded model needs every rank in every forward (the table shards exchange embeddings), so ranks
run the same number of forwards: while any rank still has a batch, a rank that ran out feeds an
empty one-row batch whose outputs are thrown away (:func:`synced_batches` with ``until="all_done"``).
Predictions and labels are then gathered to rank 0 (pickled over the gloo control group), where
:func:`ctnocvr_rec.train.metrics.task_metrics` computes AUC / GAUC / log-loss / calibration over all
rows of the split, and optionally writes them to Parquet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctnocvr_rec.data.batch import CtnocvrBatch
from ctnocvr_rec.data.rawfiles import release_free_memory
from ctnocvr_rec.train.distributed import DistContext, all_reduce_cpu, gather_to_main
from ctnocvr_rec.train.metrics import task_metrics

T = TypeVar("T")

#: columns gathered per row (predictions, labels and ids), in the order of the predictions Parquet
PREDICTION_COLUMNS = (
    "sample_id", "request_id", "user_id", "click", "conversion", "ctnocvr",
    "p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr",
)
_INT_COLUMNS = ("sample_id", "request_id", "user_id")


def synced_batches(ctx: DistContext, batches: Iterable[T], until: str) -> Iterator[T | None]:
    """Iterate ``batches`` in lock-step with the other ranks.

    ``until="any_done"`` (training) stops everyone as soon as one rank has no next batch, so all
    ranks run the same number of steps and none waits forever in a collective.
    ``until="all_done"`` (evaluation) goes on while any rank has a batch; exhausted ranks get ``None``.
    One tiny all-reduce per batch over the gloo group decides.
    """
    if until not in ("any_done", "all_done"):
        raise ValueError(f"until={until!r}")
    iterator = iter(batches)
    exhausted = False
    flag = torch.zeros(1, dtype=torch.int32)
    while True:
        item: T | None = None
        if not exhausted:
            try:
                item = next(iterator)
            except StopIteration:
                exhausted = True
        flag[0] = 0 if exhausted else 1
        all_reduce_cpu(ctx, flag, "min" if until == "any_done" else "max")
        if flag.item() == 0:
            return
        yield item


def empty_batch(feature_names: list[str], weighted_feature_names: Iterable[str] = (),
                num_dense: int = 0) -> CtnocvrBatch:
    """A one-row batch with no ids in any field (a stand-in forward for an exhausted rank).

    ``feature_names``: every KJT key (schema order); those in ``weighted_feature_names`` go to the
    weighted KJT (``weighted_features``, ``None`` if there are none), the rest to the unweighted one,
    as in the batch contract (``docs/design.md``); ``num_dense``: ``D`` of a model with dense features
    (the batch then carries zeros ``[1, D]``; 0: ``dense=None``).
    """
    weighted_set = set(weighted_feature_names)

    def kjt(keys: list[str], weighted: bool) -> KeyedJaggedTensor:
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.empty(0, dtype=torch.int64),
            lengths=torch.zeros(len(keys), dtype=torch.int32),
            weights=torch.empty(0, dtype=torch.float32) if weighted else None,
            stride=1,
        )

    plain = kjt([k for k in feature_names if k not in weighted_set], weighted=False)
    weighted_keys = [k for k in feature_names if k in weighted_set]
    weighted_kjt = kjt(weighted_keys, weighted=True) if weighted_keys else None
    dense = torch.zeros(1, num_dense) if num_dense > 0 else None
    return CtnocvrBatch.from_labels(plain, torch.zeros(1), torch.zeros(1), weighted_features=weighted_kjt,
                                    dense=dense)


def model_weighted_feature_names(model: torch.nn.Module) -> list[str]:
    """KJT keys the model's (possibly DMP-wrapped) :class:`FieldEmbedding` reads from ``weighted_features``."""
    from ctnocvr_rec.modules.field_embedding import FieldEmbedding

    for sub in model.modules():
        if isinstance(sub, FieldEmbedding):
            return list(sub.weighted_feature_names)
    return []


def model_num_dense_features(model: torch.nn.Module) -> int:
    """``D`` of the (possibly DMP-wrapped) model's :class:`DenseFeatureArch` (0: sparse-only)."""
    from ctnocvr_rec.modules.dense_arch import DenseFeatureArch

    for sub in model.modules():
        if isinstance(sub, DenseFeatureArch):
            return sub.in_features
    return 0


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


#: label columns: 0/1 by the batch contract (``data/batch.py``), kept as int8 (exact, 1 byte per row)
_LABEL_COLUMNS = ("click", "conversion", "ctnocvr")


def needed_columns(gauc: bool, predictions: bool) -> tuple[str, ...]:
    """The :data:`PREDICTION_COLUMNS` an evaluation keeps per row: labels and ``p_*`` always,
    ``user_id`` for GAUC, ``sample_id`` / ``request_id`` only when the predictions are written.

    Per row that is 4 x 4 B of ``p_*`` + 3 x 1 B of labels (+ 8 B ``user_id``, + 16 B of ids): 27 B
    with GAUC against the 52 B of keeping every column as before (float32 labels, all ids).
    """
    if predictions:
        return PREDICTION_COLUMNS
    return tuple(n for n in PREDICTION_COLUMNS
                 if n.startswith("p_") or n in _LABEL_COLUMNS or (n == "user_id" and gauc))


def _kept(name: str, value: torch.Tensor) -> np.ndarray:
    """A new numpy array holding ``value`` ``[B]`` as kept for the split: int64 ids, int8 labels,
    float32 predictions. Always a copy: a view would keep the batch's storage alive for the whole split
    (one shared-memory file descriptor per column and batch when a loader worker built it:
    tests/test_train_eval_fds.py), or a model output's larger base tensor."""
    value = value.detach() if name in _INT_COLUMNS else value.detach().float()  # bf16 has no numpy type
    dtype = np.int64 if name in _INT_COLUMNS else np.int8 if name in _LABEL_COLUMNS else np.float32
    return np.array(value.cpu().numpy(), dtype=dtype, copy=True)


def _concatenate_releasing(parts: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """One array per column from its per-batch chunks, freeing each column's chunks as it is joined,
    so the join needs one column's bytes more than the chunks, not twice all of them."""
    out = {}
    for name in list(parts):
        chunks = parts.pop(name)
        out[name] = np.concatenate(chunks) if chunks else np.empty(0)
    return out


@torch.no_grad()
def predict(
    ctx: DistContext,
    model: torch.nn.Module,
    batches: Iterable[CtnocvrBatch],
    feature_names: list[str],
    device: torch.device,
    bf16: bool = False,
    max_batches: int = 0,
    columns: Iterable[str] = PREDICTION_COLUMNS,
) -> dict[str, np.ndarray]:
    """This rank's ``columns`` (default: all :data:`PREDICTION_COLUMNS`; a ``p_*`` column the model
    does not output is absent) as numpy arrays ``[rows]``: int64 ids, int8 labels, float32 ``p_*``."""
    wanted = [n for n in PREDICTION_COLUMNS if n in set(columns)]
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    filler: CtnocvrBatch | None = None
    source: Iterable[CtnocvrBatch] = batches
    if max_batches > 0:
        source = (b for i, b in zip(range(max_batches), batches))
    try:
        for batch in synced_batches(ctx, source, until="all_done"):
            real = batch is not None
            if batch is None:
                filler = filler or empty_batch(feature_names, model_weighted_feature_names(model),
                                               model_num_dense_features(model))
                batch = filler
            with _autocast(device, bf16):
                _, outputs = model(batch.to(device))
            if not real:
                continue
            for name in wanted:
                value = outputs.get(name) if name.startswith("p_") else getattr(batch, name)
                if value is not None:
                    parts.setdefault(name, []).append(_kept(name, value))
            del batch, outputs
    finally:
        model.train(was_training)
    return _concatenate_releasing(parts)


def gather_columns(ctx: DistContext, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Concatenate every rank's columns on rank 0 (None on other ranks). Collective.

    One gather per name of :data:`PREDICTION_COLUMNS` (the same calls on every rank, whichever
    columns it has), each popped from ``columns`` as it goes: the pickled copies of one column are
    all that is in flight at a time, instead of every column twice over (pickled and unpickled) on
    top of the local ones. One rank's columns are returned as they are (no copy). ``columns`` is
    empty afterwards.
    """
    out: dict[str, np.ndarray] = {}
    for name in PREDICTION_COLUMNS:
        gathered = gather_to_main(ctx, columns.pop(name, None))
        if gathered is None:
            continue
        pieces = [part for part in gathered if part is not None]
        if pieces:
            out[name] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        del gathered, pieces
    return out if ctx.is_main else None


def write_predictions(columns: dict[str, np.ndarray], path: str | Path) -> Path:
    """Predictions Parquet: ``sample_id, request_id, user_id, click, conversion, ctnocvr, p_*``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name in PREDICTION_COLUMNS:
        if name not in columns:
            continue
        values = columns[name]
        if name in _INT_COLUMNS:
            arrays[name] = pa.array(values.astype(np.int64))
        elif name in ("click", "conversion", "ctnocvr"):
            arrays[name] = pa.array(values.astype(np.int8))
        else:
            arrays[name] = pa.array(values.astype(np.float32))
    pq.write_table(pa.table(arrays), path)
    return path


def evaluate(
    ctx: DistContext,
    model: torch.nn.Module,
    batches: Iterable[CtnocvrBatch],
    feature_names: list[str],
    device: torch.device,
    gauc: bool = True,
    predictions_path: str | Path | None = None,
    bf16: bool = False,
    max_batches: int = 0,
) -> dict[str, float] | None:
    """Exact whole-split metrics on rank 0 (None on the other ranks). Collective: all ranks call it.

    Freed heap pages go back to the OS after the pass and at the end (``malloc_trim``): the trainer
    raises glibc's trim threshold (:mod:`ctnocvr_rec.train.allocator`), so without this a rank would
    keep the evaluation's peak (batches of ``eval_batch_size`` rows, the metrics' sort buffers over
    the whole split) as free heap for the rest of the run: 1.2-2.3 GB after a one-process pass over
    the 1/10 full-shape test split with the trainer's settings (``docs/train.md``).
    """
    try:
        local = predict(ctx, model, batches, feature_names, device, bf16=bf16, max_batches=max_batches,
                        columns=needed_columns(gauc, predictions_path is not None))
        release_free_memory()
        columns = gather_columns(ctx, local)
        if columns is None:
            return None
        if "click" not in columns or columns["click"].size == 0:
            raise ValueError("the evaluation split has no rows")
        metrics = task_metrics(columns, gauc=gauc)
        if predictions_path is not None:
            write_predictions(columns, predictions_path)
        return metrics
    finally:
        release_free_memory()
