"""``escm2_dr``: ESCM²'s doubly-robust counterfactual CVR risk with an imputation tower (SIGIR '22).

As ``escm2_ips`` (E1, E2, E4 of :mod:`escm2_ips`) with the counterfactual risk replaced by the
doubly-robust estimator and an extra *imputation tower* g that predicts the CVR error. With
e = BCE(r, σ(b)) the CVR error of a row and ê = softplus(g) ≥ 0 its imputed value:

    L_CVR^DR  = 1/N Σ_D [ ê' + o · (e − ê') / max(t̂, clip) ]                            (D1)
    L_IMP     = 1/N Σ_D o · (e' − ê)² / max(t̂, clip)                                    (D2)
    L = λ_ctr·L_CTR + λ_c·L_CVR^DR + λ_imp·L_IMP + λ_g·L_CTCVR                          (D3)

where ' marks a detached value (the joint-learning split of DR, Wang et al. ICML '19): (D1) trains
the CVR tower with the imputation held fixed, (D2) trains the imputation tower with the CVR error
held fixed. (The ESCM² reference code detaches neither; then (D1) would also push ê by
(1 − o/t̂), which is not a regression of the error.) Unclicked rows enter (D1) through ê' only;
their (unobserved) conversion label never reaches a gradient: o = 0 multiplies every e term.

Choices that are ours: ê = softplus(g) (the reference squashes ê into (0, 1) with a softmax,
but e = BCE is unbounded above), and the propensity handling of :mod:`escm2_ips` (floor
``propensity_clip``, detached by default). Equation labels are ours (see :mod:`escm2_ips`).

Example::

    objective = Escm2DrObjective({"ctr": 1.0, "cvr_dr": 0.5, "imputation": 1.0, "ctcvr": 0.5})
    loss, out = objective(logits, click, conversion)   # logits [B, 3]: ctr, cvr, imputation
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ctnocvr_rec.modules.cvr_objective import PropensityObjective, ctcvr_bce, inverse_propensity


class Escm2DrObjective(PropensityObjective):
    """ESCM²-DR: terms ``ctr``, ``cvr_dr`` (D1), ``imputation`` (D2), ``ctcvr`` (+ CTnoCVR terms).

    Args:
        loss_weights: e.g. ``{"ctr": 1, "cvr_dr": λ_c, "imputation": λ_imp, "ctcvr": λ_g}``.
        ctnocvr: ``"none" | "derived" | "tower"``.
        propensity_clip, detach_propensity: as :class:`~ctnocvr_rec.modules.escm2_ips.Escm2IpsObjective`.

    Towers: ``ctr, cvr, imputation`` (+ ``ctnocvr``). Call as :class:`CvrObjective`.
    """

    name = "escm2_dr"
    extra_tasks = ("imputation",)
    method_terms = ("ctr", "cvr_dr", "imputation", "ctcvr")

    def objective_terms(
        self, col: Mapping[str, torch.Tensor], click: torch.Tensor, conversion: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        a, b = col["ctr"], col["cvr"]
        terms = self.ctr_terms(a, click)
        if "cvr_dr" in self.loss_weights or "imputation" in self.loss_weights:
            weight = inverse_propensity(F.logsigmoid(a), self.propensity_clip, self.detach_propensity)
            error = F.binary_cross_entropy_with_logits(b, conversion, reduction="none")  # e, [B]
            imputed = F.softplus(col["imputation"])  # ê, [B]
            if "cvr_dr" in self.loss_weights:
                fixed = imputed.detach()
                terms["cvr_dr"] = (fixed + click * (error - fixed) * weight).mean()
            if "imputation" in self.loss_weights:
                terms["imputation"] = (click * (error.detach() - imputed) ** 2 * weight).mean()
        if "ctcvr" in self.loss_weights:
            terms["ctcvr"] = ctcvr_bce(a, b, click, conversion)
        return terms
