"""Task towers (paper Sec. 2.3, eq. 5): one MLP per task from its gated representation to a logit.

A tower is ``torchrec.modules.mlp.MLP`` over ``hidden`` (ReLU; paper sizes 300/200/80) followed by a
linear output unit; it returns the *logit*. Probabilities and losses are computed from logits by
:class:`~ctnocvr_rec.modules.ctnocvr_head.CtnocvrHead`, in log space.

Example::

    tower = TaskTower(in_features=16, hidden=[300, 200, 80])
    logit = tower(f_k)        # f_k [B, 16] -> [B]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.modules.mlp import MLP

from ctnocvr_rec.modules.experts import ExpertExtraction


class TaskTower(nn.Module):
    """MLP tower ending in one logit.

    Args:
        in_features: input width.
        hidden: hidden layer widths (ReLU after each); empty gives a logistic-regression tower.
        dropout: dropout probability on the tower input (0 disables it; the paper does not use it).
        device: parameter device.

    Call: ``x`` ``[B, in_features]`` -> logit ``[B]``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (300, 200, 80),
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The last layer has no activation: it is the logit.
        self.mlp = MLP(in_features, [int(h) for h in hidden] + [1], activation="relu", device=device,
                       activation_on_last=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.dropout(x)).squeeze(-1)


class MultiTaskOverArch(nn.Module):
    """Gated experts + one tower per task: a drop-in multi-task "over arch" on any dense input.

    ``ExpertExtraction`` (MMoE / CGC / PLE by its expert counts and levels) followed by a
    :class:`TaskTower` per task. Replacing e.g. ``torchrec.models.dlrm.DLRM.over_arch`` with it turns
    DLRM's ``[B, 1]`` logit into ``[B, T]`` task logits for :class:`CtnocvrHead` (docs/dropin.md).

    Args:
        in_features: input width ``d``.
        num_tasks: ``T`` (order is the caller's, e.g. CTR, CVR, CTnoCVR).
        num_task_experts, num_shared_experts, expert_hidden, num_levels: see ``ExpertExtraction``.
        tower_hidden: hidden widths of each tower (paper: 300/200/80).
        dropout: tower input dropout.
        device: parameter device.

    Call: ``x`` ``[B, d]`` -> logits ``[B, T]``.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        num_task_experts: int = 0,
        num_shared_experts: int = 8,
        expert_hidden: Sequence[int] = (16,),
        num_levels: int = 1,
        tower_hidden: Sequence[int] = (300, 200, 80),
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.num_tasks = int(num_tasks)
        self.experts = ExpertExtraction(
            in_features, num_tasks, num_task_experts, num_shared_experts, expert_hidden, num_levels, device
        )
        self.towers = nn.ModuleList(
            [TaskTower(self.experts.out_features, tower_hidden, dropout, device) for _ in range(self.num_tasks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated = self.experts(x)  # [B, T, h]
        return torch.stack([tower(gated[:, k]) for k, tower in enumerate(self.towers)], dim=1)
