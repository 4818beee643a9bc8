"""LockstepBatches: the training loop's lock-step protocol (one all-reduce per step) on 2 gloo ranks.

The reference is the protocol it replaced, ``synced_batches(..., until="any_done")`` plus a separate
all-reduce for the non-finite check: same batches handed out, same stop, same verdicts, fewer
all-reduces. The consumer below reads batches as ``TrainPipelineSparseDist.progress`` does (two on the
first call to fill, then one per step before the forward; never again once the iterator ran dry).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctnocvr_rec.train.distributed import DistContext, all_reduce_cpu
from ctnocvr_rec.train.evaluate import synced_batches
from ctnocvr_rec.train.lockstep import LockstepBatches

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ctx(rank: int, world: int) -> DistContext:
    group = dist.group.WORLD if world > 1 else None
    return DistContext(rank, world, rank, world, torch.device("cpu"), "gloo", group, False)


def _train(batches, after_step) -> tuple[list[int], list[bool]]:
    """Drive ``batches`` as the pipeline does; ``after_step(step) -> bool`` runs after each step.
    Returns the trained batches and the verdicts."""
    queue: list[int] = []
    dry = False

    def pull() -> None:
        nonlocal dry
        if not dry:
            item = next(batches, None)
            if item is None:
                dry = True
            else:
                queue.append(item)

    trained, verdicts = [], []
    pull()
    pull()
    while queue:
        pull()  # batch i+2, before the forward of batch i
        trained.append(queue.pop(0))
        verdicts.append(after_step(len(trained)))
    return trained, verdicts


def _worker(rank: int, port: int, cases: list[list[int]], bad_step: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        results = [_case(rank, lengths, bad_step) for lengths in cases]
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _case(rank: int, lengths: list[int], bad_step: int) -> dict:
    """Both protocols on this rank's ``lengths[rank]`` batches (rank 1's step ``bad_step`` fails)."""
    ctx = _ctx(rank, WORLD_SIZE)
    own = list(range(lengths[rank]))
    bad_rank = WORLD_SIZE - 1

    def ok(step: int) -> bool:
        return not (rank == bad_rank and step == bad_step)

    new = LockstepBatches(ctx, own)
    new_trained, new_verdicts = _train(new, lambda step: new.after_step(ok(step)))

    def old_check(step: int) -> bool:
        flag = torch.tensor([0 if ok(step) else 1], dtype=torch.int32)
        all_reduce_cpu(ctx, flag, "max")
        return not flag.item()

    old_trained, old_verdicts = _train(synced_batches(ctx, own, until="any_done"), old_check)
    return {"new": [new_trained, new_verdicts], "old": [old_trained, old_verdicts],
            "all_reduces": new.all_reduces}


CASES = [[5, 3], [2, 6], [4, 4], [0, 3], [1, 1]]


def test_two_ranks_train_the_batches_of_the_old_protocol_with_one_all_reduce_per_step(tmp_path):
    bad_step = 2
    mp.spawn(_worker, args=(_free_port(), CASES, bad_step, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    for lengths, results in zip(CASES, zip(*per_rank)):
        _check_case(lengths, bad_step, results)


def _check_case(lengths: list[int], bad_step: int, results: tuple[dict, ...]) -> None:
    steps = min(lengths)
    for res in results:
        assert res["new"] == res["old"]
        trained, verdicts = res["new"]
        assert trained == list(range(steps))
        # the non-finite verdict of rank 1's step 2 reaches every rank at that step, and only there
        assert verdicts == [step != bad_step for step in range(1, steps + 1)]
        # one per step, one for the pipeline's first fill, one to learn that the data ran out
        assert res["all_reduces"] <= steps + 2


def test_one_rank_hands_out_every_batch_and_stops():
    batches = LockstepBatches(_ctx(0, 1), iter(range(7)))
    trained, verdicts = _train(batches, lambda step: batches.after_step(step != 3))
    assert trained == list(range(7))
    assert verdicts == [step != 3 for step in range(1, 8)]
    with pytest.raises(StopIteration):
        next(batches)


def test_fill_ahead_must_be_positive():
    with pytest.raises(ValueError, match="fill_ahead"):
        LockstepBatches(_ctx(0, 1), [], fill_ahead=0)
