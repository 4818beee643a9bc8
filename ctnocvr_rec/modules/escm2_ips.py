"""``escm2_ips``: ESCM²'s counterfactual CVR risk with inverse propensity scoring (Wang et al., SIGIR '22).

ESCM² (Sec. "Entire Space Counterfactual Multi-task Model") trains ESMM's towers with

    L = λ_ctr·L_CTR + λ_c·L_CVR^IPS + λ_g·L_CTCVR                                        (E1)

(empirical, counterfactual and global risk). With a = CTR logit, b = CVR logit, o = click,
r = conversion, N = all exposures of the batch, t̂ = σ(a) the propensity:

    L_CTR      = 1/N Σ_D BCE(o, σ(a))                                                    (E2)
    L_CVR^IPS  = 1/N Σ_D o · BCE(r, σ(b)) / max(t̂, clip)                                 (E3)
    L_CTCVR    = 1/N Σ_D BCE(o·r, σ(a)·σ(b))                                             (E4)

(E3) is averaged over ALL exposures, not over the clicked rows: E_D[o·δ/t] = E_D[δ] when t is the
true click probability, which is what makes the risk unbiased over the entire space. Only clicked
rows contribute to it (o = 0 zeroes the rest; a batch without clicks gives exactly 0).

Equation labels (E1)-(E4) are ours: the paper's equation numbers could not be checked here; the
formulas follow its text and the authors' reference implementation (PaddleRec ``escm2``).

Propensity: clipped below at ``propensity_clip`` (weight ≤ 1/clip) and, by default, *detached*
(``detach_propensity=True``): the reference code sets ``stop_gradient`` on the inverse propensity,
so (E3) trains the CVR tower only and the CTR tower learns from (E2) and (E4). (The reference clips
the weight at 15, i.e. a propensity floor of 1/15; our default floor 0.05 is a weight of at most 20.)

Example::

    objective = Escm2IpsObjective({"ctr": 1.0, "cvr_ips": 0.5, "ctcvr": 0.5}, propensity_clip=0.05)
    loss, out = objective(logits, click, conversion)     # logits [B, 2]: ctr, cvr
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ctnocvr_rec.modules.cvr_objective import PropensityObjective, ctcvr_bce, inverse_propensity


class Escm2IpsObjective(PropensityObjective):
    """ESCM²-IPS: terms ``ctr`` (E2), ``cvr_ips`` (E3), ``ctcvr`` (E4), + the CTnoCVR terms if composed.

    Args:
        loss_weights: e.g. ``{"ctr": λ_ctr, "cvr_ips": λ_c, "ctcvr": λ_g}`` (+ ``ctnocvr``/``score``).
        ctnocvr: ``"none" | "derived" | "tower"``.
        propensity_clip: floor of the propensity t̂ in (E3), in (0, 1].
        detach_propensity: stop the gradient through 1/t̂ (reference behaviour).

    Towers: ``ctr, cvr`` (+ ``ctnocvr``). Call as :class:`CvrObjective`.
    """

    name = "escm2_ips"
    method_terms = ("ctr", "cvr_ips", "ctcvr")

    def objective_terms(
        self, col: Mapping[str, torch.Tensor], click: torch.Tensor, conversion: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        a, b = col["ctr"], col["cvr"]
        terms = self.ctr_terms(a, click)
        if "cvr_ips" in self.loss_weights:
            weight = inverse_propensity(F.logsigmoid(a), self.propensity_clip, self.detach_propensity)
            per_row = F.binary_cross_entropy_with_logits(b, conversion, reduction="none")
            terms["cvr_ips"] = (click * per_row * weight).mean()
        if "ctcvr" in self.loss_weights:
            terms["ctcvr"] = ctcvr_bce(a, b, click, conversion)
        return terms
