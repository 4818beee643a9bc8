"""What the evaluation keeps per row, and that joining it does not double it.

An evaluation keeps, for the exact whole-split metrics, a few columns of every row of the split
(millions per rank at Ali-CCP's full shape); everything else of a batch is dropped after its forward.
Measured on the 1/10 full-shape test split (4.3 M rows, ``docs/train.md``), the memory a one-process
evaluation gained per row was these columns: 52 B per row (all ids as int64, labels as float32),
joined at the end into copies (twice the bytes) and copied once more by the one-rank gather.
Checked here with ``tracemalloc``, which sees numpy's buffers (the batches, built before it starts,
and torch's own buffers are not counted): the old code fails each test.
"""

from __future__ import annotations

import ctypes.util
import platform
import tracemalloc

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctnocvr_rec.data import rawfiles
from ctnocvr_rec.data.batch import CtnocvrBatch
from ctnocvr_rec.train.distributed import DistContext
from ctnocvr_rec.train.evaluate import (
    PREDICTION_COLUMNS,
    evaluate,
    gather_columns,
    needed_columns,
    predict,
)
from ctnocvr_rec.train.metrics import task_metrics

ROWS_PER_BATCH = 2048
BATCHES = 40
ROWS = ROWS_PER_BATCH * BATCHES


class Scores(torch.nn.Module):
    """Stands in for a ranker: one probability per task, from the batch's ids."""

    def forward(self, batch: CtnocvrBatch) -> tuple[None, dict[str, torch.Tensor]]:
        p = torch.sigmoid(batch.sparse_features.values().float() / 400)
        return None, {"p_ctr": p, "p_cvr": p.sqrt(), "p_ctcvr": p * p.sqrt(), "p_ctnocvr": p - p * p.sqrt()}


def _batches() -> list[CtnocvrBatch]:
    rng = np.random.default_rng(7)
    out = []
    for b in range(BATCHES):
        ids = torch.from_numpy(rng.integers(0, 1000, ROWS_PER_BATCH))
        kjt = KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.ones(ROWS_PER_BATCH, dtype=torch.int32))
        click = torch.from_numpy((rng.random(ROWS_PER_BATCH) < 0.3).astype(np.float32))
        conversion = click * torch.from_numpy((rng.random(ROWS_PER_BATCH) < 0.3).astype(np.float32))
        first = b * ROWS_PER_BATCH
        out.append(CtnocvrBatch.from_labels(
            kjt, click, conversion,
            sample_id=torch.arange(first, first + ROWS_PER_BATCH),
            request_id=torch.arange(first, first + ROWS_PER_BATCH) // 8,
            user_id=torch.from_numpy(rng.integers(0, 300, ROWS_PER_BATCH))))
    return out


def _one_rank() -> DistContext:
    return DistContext(0, 1, 0, 1, torch.device("cpu"), "gloo", None, False)


def _traced(fn):  # type: ignore[no-untyped-def]
    """``(result, peak numpy bytes traced above the start while fn ran)``."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_evaluation_keeps_only_needed_columns_in_compact_types() -> None:
    assert needed_columns(gauc=True, predictions=False) == (
        "user_id", "click", "conversion", "ctnocvr", "p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr")
    assert needed_columns(gauc=False, predictions=False) == (
        "click", "conversion", "ctnocvr", "p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr")
    assert needed_columns(gauc=False, predictions=True) == PREDICTION_COLUMNS

    batches = _batches()
    columns = predict(_one_rank(), Scores(), batches, ["f"], torch.device("cpu"),
                      columns=needed_columns(gauc=True, predictions=False))
    assert set(columns) == set(needed_columns(gauc=True, predictions=False))
    assert all(len(c) == ROWS for c in columns.values())
    # 8 B of user_id + 3 x 1 B of labels + 4 x 4 B of predictions
    assert sum(c.nbytes for c in columns.values()) == 27 * ROWS
    assert columns["click"].dtype == np.int8 and columns["p_ctr"].dtype == np.float32
    # the labels are the batches' (0/1, exact)
    np.testing.assert_array_equal(columns["conversion"], torch.cat([b.conversion for b in batches]).numpy())


def test_predict_joins_the_kept_columns_without_holding_them_twice() -> None:
    batches = _batches()
    columns, peak = _traced(lambda: predict(_one_rank(), Scores(), batches, ["f"], torch.device("cpu")))
    kept = sum(c.nbytes for c in columns.values())
    largest = max(c.nbytes for c in columns.values())
    # the kept chunks, plus one column being joined (slack: small arrays, list growth)
    assert peak <= kept + largest + 64 * 1024, (peak / ROWS, kept / ROWS)
    assert kept == 43 * ROWS  # every column: 3 x 8 B of ids + 3 x 1 B of labels + 4 x 4 B


def test_one_rank_gather_returns_the_columns_without_copying() -> None:
    local = {"click": np.zeros(10, np.int8), "p_ctr": np.full(10, 0.5, np.float32)}
    arrays = dict(local)
    gathered = gather_columns(_one_rank(), local)
    assert gathered is not None
    assert gathered["click"] is arrays["click"] and gathered["p_ctr"] is arrays["p_ctr"]
    assert local == {}  # emptied as gathered


def test_evaluate_metrics_equal_those_of_all_columns_kept_as_float() -> None:
    batches = _batches()
    full = predict(_one_rank(), Scores(), batches, ["f"], torch.device("cpu"))
    reference = task_metrics({k: v.astype(np.float64) if k in ("click", "conversion", "ctnocvr") else v
                              for k, v in full.items()})
    metrics, _ = _traced(lambda: evaluate(_one_rank(), Scores(), batches, ["f"], torch.device("cpu")))
    assert metrics == reference


def test_metrics_over_the_whole_split_need_few_temporary_bytes_per_row() -> None:
    """The metrics run over every row at once (rank 0 holds the whole split): their temporaries are
    the evaluation's peak. Before: float64 copies and ranks of every row, 96 B per row at the peak."""
    rows = 200_000
    rng = np.random.default_rng(3)
    click = (rng.random(rows) < 0.3).astype(np.int8)
    conversion = (click * (rng.random(rows) < 0.4)).astype(np.int8)
    columns = {"click": click, "conversion": conversion, "ctnocvr": click - conversion,
               "user_id": rng.integers(0, 20_000, rows)}
    for name in ("p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr"):
        columns[name] = rng.random(rows).astype(np.float32)
    metrics, peak = _traced(lambda: task_metrics(columns))
    assert peak / rows <= 48, peak / rows
    # the same figures from float64 columns (the scores' dtype changes neither order nor ties)
    assert task_metrics({k: v.astype(np.float64) for k, v in columns.items()}) == metrics


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_giving_freed_heap_back_forks_no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate() trims the heap twice per pass; ``find_library`` would fork ``ldconfig`` from a
    process holding the split's columns each time."""
    rawfiles.libc_function.cache_clear()
    rawfiles._libc.cache_clear()

    def no_child(name: str) -> str:
        raise AssertionError("find_library runs ldconfig in a child process")

    monkeypatch.setattr(ctypes.util, "find_library", no_child)
    try:
        assert rawfiles.release_free_memory()
    finally:
        rawfiles.libc_function.cache_clear()
        rawfiles._libc.cache_clear()
    rawfiles._libc.cache_clear()


def test_bf16_predictions_are_kept_as_float32() -> None:
    """Under autocast a model outputs bf16, which has no numpy type."""

    class Bf16Scores(Scores):
        def forward(self, batch: CtnocvrBatch) -> tuple[None, dict[str, torch.Tensor]]:
            _, outputs = super().forward(batch)
            return None, {k: v.to(torch.bfloat16) for k, v in outputs.items()}

    batches = _batches()[:2]
    columns = predict(_one_rank(), Bf16Scores(), batches, ["f"], torch.device("cpu"))
    expected = torch.cat([Bf16Scores()(b)[1]["p_ctr"] for b in batches]).float().numpy()
    assert columns["p_ctr"].dtype == np.float32
    np.testing.assert_array_equal(columns["p_ctr"], expected)
