"""Dense arch: the MLP that turns the dense (numeric) features into one more block of the ranker input.

As DLRM's dense arch (``torchrec.models.dlrm.DenseArch``: an ``MLP`` with ReLU after every layer,
the last included), :class:`DenseFeatureArch` maps the batch's ``[B, D]`` dense features to
``[B, out_features]``; the ranker concatenates that block after the pooled field embeddings::

    x = [ user fields | item fields | combination fields | context fields | dense arch output ]

The rankers use ``out_features = model.embedding_dim``: the dense features then join ``x`` like one
more field of the same width (DLRM makes the same choice so that its interaction can treat the dense
block as one more embedding). The experts and towers see a block whose scale and width match a
field's, and the input width grows by one field whatever ``D`` is, so enabling dense features changes
the model by a small, predictable amount instead of letting a wide raw block dominate the experts.

Example::

    arch = DenseFeatureArch(in_features=8, hidden=[64], out_features=18)
    block = arch(batch.dense)            # [B, 8] -> [B, 18]
    x = torch.cat([pooled, block], dim=1)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.modules.mlp import MLP


class DenseFeatureArch(nn.Module):
    """MLP over the dense features, ReLU after every layer (DLRM's dense arch).

    Args:
        in_features: ``D``, the number of dense features (``len(FieldSchema.dense)``).
        hidden: hidden layer widths before the output layer (empty: one ``D -> out_features`` layer).
        out_features: width of the output block (the rankers pass ``model.embedding_dim``).
        device: parameter device (``meta`` leaves materialisation to ``DistributedModelParallel``,
            which calls each ``nn.Linear``'s ``reset_parameters``).

    Call: ``dense`` float32 ``[B, in_features]`` -> ``[B, out_features]``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (64,),
        out_features: int = 18,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1 (a schema without dense features needs no dense arch), "
                             f"got {in_features}")
        widths = [int(h) for h in hidden] + [int(out_features)]
        if any(w < 1 for w in widths):
            raise ValueError(f"layer widths must be >= 1, got hidden={list(hidden)}, out_features={out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.mlp = MLP(self.in_features, widths, bias=True, activation="relu", device=device)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return self.mlp(dense)
