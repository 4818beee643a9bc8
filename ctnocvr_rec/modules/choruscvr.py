"""``choruscvr``: CVR supervised on the entire space by a twin "un-CVR" tower (arXiv 2502.08277).

ChorusCVR adds a tower û = σ(u) for the probability that a click does NOT convert. Its entire-space
task is CTunCVR, "click and not converted" -- the CTnoCVR label of the SIGIR'22 paper
(:func:`~ctnocvr_rec.labels.derive_ctnocvr_label`) -- predicted as pCTR·û; and the two CVR towers
supervise each other on the unclicked rows, where no conversion label exists, through soft labels.

Our reading, with the paper's module names (the equations are ours; the paper's own formulas could
not be checked here, so this is a reading of its description, not a transcription):

    L_CTR     = 1/N Σ_D BCE(o, t̂)                                                        (H1)
    L_CTCVR   = 1/N Σ_D BCE(o·r, t̂·r̂)                     (ESMM's global risk)             (H2)
    L_CTunCVR = 1/N Σ_D BCE(o·(1 − r), t̂·û)               (NDM: negative discrimination)   (H3)
    L_CVR     = 1/|O| Σ_O [ BCE(r, r̂) + BCE(1 − r, û) ]    (clicked rows, hard labels)      (H4)
    L_align   = 1/|D∖O| Σ_{D∖O} [ BCE(sg(1 − û), r̂) + BCE(sg(1 − r̂), û) ]                 (H5)
    L = λ_ctr·H1 + λ_ctcvr·H2 + λ_ctuncvr·H3 + λ_cvr·H4 + λ_align·H5

(SAM, soft alignment: on unclicked rows each tower learns the other's complement, with the target
detached: sg = stop-gradient.) t̂ = σ(a), r̂ = σ(b), û = σ(u); o click, r conversion; products are
formed in log space (log t̂ + log û) and soft-label BCEs from logits, so every term is finite for
logits of any size. Inference uses r̂ (the CVR tower), as every method here does. The CTnoCVR flag
composes as usual: ``ctnocvr="derived"`` adds BCE(c, t̂·(1 − r̂)) -- the same label as H3 but on the
CVR tower itself.

Example::

    objective = ChorusCvrObjective({"ctr": 1.0, "ctcvr": 1.0, "ctuncvr": 1.0, "cvr": 0.5, "align": 0.1})
    loss, out = objective(logits, click, conversion)   # logits [B, 3]: ctr, cvr, uncvr
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ctnocvr_rec.labels import derive_ctnocvr_label
from ctnocvr_rec.modules.ctnocvr_head import bce_from_log_prob, masked_mean
from ctnocvr_rec.modules.cvr_objective import CvrObjective, ctcvr_bce


class ChorusCvrObjective(CvrObjective):
    """ChorusCVR: terms ``ctr`` (H1), ``ctcvr`` (H2), ``ctuncvr`` (H3), ``cvr`` (H4), ``align`` (H5).

    Args:
        loss_weights: e.g. ``{"ctr": 1, "ctcvr": 1, "ctuncvr": 1, "cvr": 0.5, "align": 0.1}``
            (+ CTnoCVR terms); a term is computed iff its key is present.
        ctnocvr: ``"none" | "derived" | "tower"``.

    Towers: ``ctr, cvr, uncvr`` (+ ``ctnocvr``). Call as :class:`CvrObjective`: logits ``[B, T]``,
    labels ``[B]`` -> ``(loss, outputs)``.
    """

    name = "choruscvr"
    extra_tasks = ("uncvr",)
    method_terms = ("ctr", "ctcvr", "ctuncvr", "cvr", "align")

    def objective_terms(
        self, col: Mapping[str, torch.Tensor], click: torch.Tensor, conversion: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        a, b, u = col["ctr"], col["cvr"], col["uncvr"]
        w = self.loss_weights
        terms: dict[str, torch.Tensor] = {}
        if "ctr" in w:
            terms["ctr"] = F.binary_cross_entropy_with_logits(a, click)
        if "ctcvr" in w:
            terms["ctcvr"] = ctcvr_bce(a, b, click, conversion)
        if "ctuncvr" in w:
            label = derive_ctnocvr_label(click, conversion).to(a.dtype)
            terms["ctuncvr"] = bce_from_log_prob(F.logsigmoid(a) + F.logsigmoid(u), label).mean()
        if "cvr" in w:
            hard = (F.binary_cross_entropy_with_logits(b, conversion, reduction="none")
                    + F.binary_cross_entropy_with_logits(u, 1.0 - conversion, reduction="none"))
            terms["cvr"] = masked_mean(hard, click)
        if "align" in w:
            # 1 − σ(x) = σ(−x): the complement of each tower, detached, is the other's soft label
            soft = (F.binary_cross_entropy_with_logits(b, torch.sigmoid(-u).detach(), reduction="none")
                    + F.binary_cross_entropy_with_logits(u, torch.sigmoid(-b).detach(), reduction="none"))
            terms["align"] = masked_mean(soft, 1.0 - click)
        return terms
