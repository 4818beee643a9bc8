"""The untrained rest of an interrupted epoch, split over another number of ranks (elastic resume).

Under the training rule of :mod:`ctnocvr_rec.data.dataset` (``drop_remainder``), rank ``r`` of ``R``
reads its own contiguous run of ``K = floor(N / (R B))`` batches; what an interrupted epoch has
consumed is therefore a *set of per-rank prefixes* (in each rank's canonical order), not a prefix of
the global stream. Resuming on ``R'`` ranks must train exactly the batches no rank has trained yet.

The unit of bookkeeping is the *origin batch* ``(world, rank, j)``: batch ``j`` of ``rank`` under
``world`` ranks. Its rows (and its window permutation when rows are shuffled) are fixed by the
dataset's rules, so any rank can read it. A plan is a list of runs ``[world, rank, first, end]``.

:func:`split_remaining` collects every old rank's untrained origin batches (rank by rank, in batch
order), deals them out in contiguous shares of ``K' = floor(U / R')`` batches to the new ranks and
reports the ``U - R' K'`` (< ``R'``) batches that no new rank gets: the only rows of the epoch that
are skipped. Nothing is read twice. Nested resumes compose: an old rank that itself followed a plan
contributes the untrained rest of *its* plan.

Example: 2 ranks of 5 batches each, rank 0 trained 3 and rank 1 trained 3; on 1 rank the rest is
``[[2, 0, 3, 5], [2, 1, 3, 5]]`` (4 batches, none dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ctnocvr_rec.data.dataset import canonical_order

#: one run of origin batches: [world, rank, first batch, end batch)
Run = list[int]
Origin = tuple[int, int, int]


def expand(plan: Sequence[Sequence[int]]) -> list[Origin]:
    """Origin batches of ``plan``, in order."""
    return [(int(w), int(r), j) for w, r, first, end in plan for j in range(int(first), int(end))]


def compress(origins: Sequence[Origin]) -> list[Run]:
    """Inverse of :func:`expand`: consecutive batches of one origin rank become one run."""
    runs: list[Run] = []
    for w, r, j in origins:
        if runs and runs[-1][0] == w and runs[-1][1] == r and runs[-1][3] == j:
            runs[-1][3] = j + 1
        else:
            runs.append([w, r, j, j + 1])
    return runs


def rank_plan(state: dict[str, Any] | None, world: int, rank: int, batches_per_rank: int) -> list[Run]:
    """The plan a rank followed in the epoch: its state's ``plan``, else its own contiguous batches."""
    if state is not None and state.get("plan") is not None:
        return [[int(v) for v in run] for run in state["plan"]]
    return [[world, rank, 0, batches_per_rank]] if batches_per_rank > 0 else []


def untrained(state: dict[str, Any] | None, world: int, rank: int, batches_per_rank: int) -> list[Origin]:
    """Origin batches of one old rank not yet trained, in plan order.

    ``state`` is the rank's loader state after its last trained batch (``None``: none trained yet);
    the trained ones are the first ``batches_yielded`` of the canonical order over ``num_workers``.
    """
    origins = expand(rank_plan(state, world, rank, batches_per_rank))
    if state is None:
        return origins
    consumed = min(int(state["batches_yielded"]), len(origins))
    done = set(canonical_order(len(origins), int(state.get("num_workers", 1)))[:consumed].tolist())
    return [o for p, o in enumerate(origins) if p not in done]


@dataclass
class EpochSplit:
    """The rest of an epoch split over the new ranks."""

    plans: list[list[Run]]  # per new rank, its origin batches
    batches_left: int  # untrained batches of the epoch over all old ranks (U)
    dropped: list[Origin]  # the U mod R' batches no new rank gets

    @property
    def batches_per_rank(self) -> int:
        return sum(end - first for _, _, first, end in self.plans[0]) if self.plans else 0


def split_remaining(states: Sequence[dict[str, Any] | None], old_world: int, batches_per_rank: int,
                    new_world: int) -> EpochSplit:
    """Split what the old ranks (``states[r]`` = rank r's loader state) left of the epoch over
    ``new_world`` ranks; ``batches_per_rank`` is ``K`` of the old layout (``floor(N / (R B))``)."""
    if len(states) != old_world:
        raise ValueError(f"expected the loader states of {old_world} old rank(s), got {len(states)}")
    if new_world < 1:
        raise ValueError(f"new world size must be >= 1, got {new_world}")
    pool: list[Origin] = []
    for rank, state in enumerate(states):
        pool.extend(untrained(state, old_world, rank, batches_per_rank))
    share = len(pool) // new_world
    plans = [compress(pool[i * share:(i + 1) * share]) for i in range(new_world)]
    return EpochSplit(plans=plans, batches_left=len(pool), dropped=pool[new_world * share:])


def nothing_trained(states: Sequence[dict[str, Any] | None]) -> bool:
    """True when no old rank trained a batch of the epoch and none followed a plan: the epoch can
    simply start over with the new world size's own split."""
    return all(s is None or (int(s.get("batches_yielded", 0)) == 0 and s.get("plan") is None) for s in states)
