"""Optimisers: fused sparse (in the embedding kernels) + dense, in one ``CombinedOptimizer``.

The sparse optimiser of the tables is not built here: it lives inside the fbgemm kernels, configured
by the sharders' ``fused_params`` (:func:`ctnocvr_rec.plan.sharding.make_sharders`) and exposed by DMP
as ``model.fused_optimizer``. This module wraps every other parameter in a dense optimiser (Adam by
default), combines both, and schedules the learning rate of both (linear warm-up, then constant,
linear or cosine decay towards ``min_lr_ratio``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from ctnocvr_rec.config import OptimConfig

DENSE_OPTIMISERS = ("adam", "adagrad", "sgd")
DECAYS = ("none", "linear", "cosine")


def dense_optimizer_factory(optim: OptimConfig) -> Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]:
    name = optim.dense.lower()
    if name == "adam":
        return lambda params: torch.optim.Adam(params, lr=optim.dense_lr, weight_decay=optim.weight_decay)
    if name == "adagrad":
        return lambda params: torch.optim.Adagrad(params, lr=optim.dense_lr, weight_decay=optim.weight_decay)
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=optim.dense_lr, weight_decay=optim.weight_decay)
    raise ValueError(f"train.optim.dense={optim.dense!r} is not one of {list(DENSE_OPTIMISERS)}")


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> tuple[CombinedOptimizer, KeyedOptimizer]:
    """``CombinedOptimizer([("fused", model.fused_optimizer), ("dense", <dense>)])`` and its dense part.

    ``model`` is the DMP-wrapped ranker: parameters owned by the fused kernels are filtered out by
    ``in_backward_optimizer_filter``, so each parameter is stepped by exactly one optimiser.
    """
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters()))
    if not dense_params:
        raise ValueError("the model has no dense parameters to optimise (expected experts/towers)")
    dense = KeyedOptimizerWrapper(dense_params, dense_optimizer_factory(optim))
    fused = getattr(model, "fused_optimizer", None)
    parts: list[tuple[str, KeyedOptimizer]] = []
    if fused is not None:
        parts.append(("fused", fused))
    parts.append(("dense", dense))
    return CombinedOptimizer(parts), dense


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base learning rates before optimiser step ``step`` (0-based).

    Warm-up: linear from ``1/warmup_steps`` to 1 over ``warmup_steps``. Decay (after warm-up, over the
    remaining ``total_steps``): ``none`` keeps 1, ``linear`` and ``cosine`` go to ``min_lr_ratio``.
    """
    if optim.decay not in DECAYS:
        raise ValueError(f"train.optim.decay={optim.decay!r} is not one of {list(DECAYS)}")
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.decay == "none" or total_steps <= optim.warmup_steps:
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    floor = optim.min_lr_ratio
    if optim.decay == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Sets ``lr = base_lr * lr_factor(step)`` on every param group (fused ones included).

    The fused kernels read ``param_groups[0]["lr"]`` at each ``step``/``zero_grad``, so one loop over
    the combined optimiser's groups schedules the tables and the dense layers alike.
    """

    def __init__(self, optimizer: KeyedOptimizer, optim: OptimConfig, total_steps: int) -> None:
        self.optimizer = optimizer
        self.optim = optim
        self.total_steps = total_steps
        # base rates by position: a checkpoint load may replace the group dicts, not their order
        self._base: list[float] = [float(g["lr"]) for g in optimizer.param_groups]

    def apply(self, step: int) -> float:
        factor = lr_factor(step, self.optim, self.total_steps)
        groups: list[Any] = list(self.optimizer.param_groups)
        for group, base in zip(groups, self._base, strict=True):
            group["lr"] = base * factor
        return factor
