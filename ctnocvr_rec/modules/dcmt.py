"""``dcmt``: direct entire-space causal multi-task CVR with twin CVR towers (Zhu et al., ICDE '23).

DCMT predicts a *factual* CVR r̂ = σ(b) (used at inference) and a *counterfactual* CVR
r̂* = σ(b*) from a twin tower. Clicked rows form the factual space, with the observed conversion
label; unclicked rows form the counterfactual space, where the conversion label (always 0 there)
is inverted to r* = 1. Each space is inverse-propensity weighted by its own propensity, and the
counterfactual prior "r̂ + r̂* = 1" is a soft constraint over all exposures:

    L_CVR^DCMT = 1/N Σ_D [ o · BCE(r, r̂) / max(t̂, clip)
                          + (1 − o) · BCE(1, r̂*) / max(1 − t̂, clip) ]                    (C1)
    L_CF       = 1/N Σ_D | 1 − (r̂ + r̂*) |                                                 (C2)
    L = λ_ctr·L_CTR + λ_cvr·L_CVR^DCMT + λ_cf·L_CF [+ λ_g·L_CTCVR]                         (C3)

with t̂ = σ(a) the CTR tower's click propensity (1 − t̂ = σ(−a), formed in log space). This is our
reading of the paper's counterfactual mechanism (its text, and the description of DCMT in later
work as "assigning inverted conversion labels to non-clicked items"); the equation labels are ours
and the paper's numbering could not be checked here. The CTCVR term is optional (weight 0 by
default in the config); the propensities are clipped and, by default, detached as in ESCM²'s IPS.

Example::

    objective = DcmtObjective({"ctr": 1.0, "cvr_dcmt": 1.0, "counterfactual": 0.001})
    loss, out = objective(logits, click, conversion)   # logits [B, 3]: ctr, cvr, cvr_counterfactual
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ctnocvr_rec.modules.cvr_objective import PropensityObjective, ctcvr_bce, inverse_propensity


class DcmtObjective(PropensityObjective):
    """DCMT: terms ``ctr``, ``cvr_dcmt`` (C1), ``counterfactual`` (C2), ``ctcvr`` (+ CTnoCVR terms).

    Args:
        loss_weights: e.g. ``{"ctr": 1, "cvr_dcmt": λ_cvr, "counterfactual": λ_cf}`` (+ ``ctcvr``).
        ctnocvr: ``"none" | "derived" | "tower"``.
        propensity_clip: floor of t̂ and of 1 − t̂, in (0, 1].
        detach_propensity: stop the gradient through both inverse propensities.

    Towers: ``ctr, cvr, cvr_counterfactual`` (+ ``ctnocvr``). Call as :class:`CvrObjective`.
    """

    name = "dcmt"
    extra_tasks = ("cvr_counterfactual",)
    method_terms = ("ctr", "cvr_dcmt", "counterfactual", "ctcvr")

    def objective_terms(
        self, col: Mapping[str, torch.Tensor], click: torch.Tensor, conversion: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        a, b, b_cf = col["ctr"], col["cvr"], col["cvr_counterfactual"]
        terms = self.ctr_terms(a, click)
        if "cvr_dcmt" in self.loss_weights:
            w_click = inverse_propensity(F.logsigmoid(a), self.propensity_clip, self.detach_propensity)
            w_unclick = inverse_propensity(F.logsigmoid(-a), self.propensity_clip, self.detach_propensity)
            factual = F.binary_cross_entropy_with_logits(b, conversion, reduction="none")
            # BCE(1, σ(b*)) = −log σ(b*): the inverted label of the unclicked rows
            counterfactual = -F.logsigmoid(b_cf)
            terms["cvr_dcmt"] = (click * factual * w_click + (1.0 - click) * counterfactual * w_unclick).mean()
        if "counterfactual" in self.loss_weights:
            terms["counterfactual"] = (1.0 - (torch.sigmoid(b) + torch.sigmoid(b_cf))).abs().mean()
        if "ctcvr" in self.loss_weights:
            terms["ctcvr"] = ctcvr_bce(a, b, click, conversion)
        return terms
