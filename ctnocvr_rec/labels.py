"""The CTnoCVR label, defined once (paper Sec. 2.2: c = 1 iff click = 1 and conversion = 0).

A leaf module (torch only): the batch (``data/batch.py``) and the loss head
(``modules/ctnocvr_head.py``) both use :func:`derive_ctnocvr_label` from here, so ``modules/`` does not
import ``data/`` for it.
"""

from __future__ import annotations

import torch


def derive_ctnocvr_label(click: torch.Tensor, conversion: torch.Tensor) -> torch.Tensor:
    """c = click AND NOT conversion, as float {0, 1} of the same shape ``[B]`` (paper Sec. 2.2).

    >>> derive_ctnocvr_label(torch.tensor([0., 1., 1.]), torch.tensor([0., 0., 1.]))
    tensor([0., 1., 0.])
    """
    return ((click > 0.5) & ~(conversion > 0.5)).to(torch.float32)
