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
