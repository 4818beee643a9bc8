"""The CTnoCVR head: probabilities and the loss of eq. 6 from the task logits.

Inputs are the logits ``a`` (CTR), ``b`` (CVR) and, in tower mode, ``c`` (CTnoCVR), all ``[B]``.
Predictions (paper eqs. 1-2)::

    pCTR = σ(a)    pCVR = σ(b)    pCTCVR = σ(a)·σ(b)
    pCTnoCVR = σ(c)                      (ctnocvr="tower": own tower and gate, MMoE/CGC/PLE, Fig. 1)
             = σ(a)·(1 − σ(b)) = σ(a)·σ(−b)   (ctnocvr="derived" or "none": eq. 2, ESMM's natural form)

Loss (eq. 6 made precise; each active term is a mean binary cross-entropy, then weighted and summed)::

    ctr      λ_ctr      · BCE(click, pCTR)                 over all rows
    cvr      λ_cvr      · BCE(conversion, pCVR)            over CLICKED rows only (mean over clicked
                                                           rows; a batch without clicks gives exactly 0)
    ctnocvr  λ_ctnocvr  · BCE(c, pCTnoCVR)                 over all rows (pCTnoCVR as above)
    ctcvr    λ_ctcvr    · BCE(click·conversion, pCTCVR)    over all rows (ESMM)
    score    ω          · BCE(c, pCTR·(1 − pCVR))          over all rows (tower mode only)

The *score* term is our reading of the paper's "score weight" (Sec. 3.2, Fig. 3b; swept over
0.0001…0.03, best 0.01): "a parameter … introduced to enable the CVR task to better obtain information
from the CTnoCVR task". The CTnoCVR label constrains pCTR·(1 − pCVR) on the entire space, so this
term sends a gradient to the CVR tower from unclicked rows too. The paper gives no formula; this is
an interpretation.

Numerics: products of probabilities are never formed and then logged. log σ(a)σ(b) = logσ(a) + logσ(b),
log(1 − σ(b)) = logσ(−b), and log(1 − p) for a product p comes from :func:`log1mexp`. The loss stays
finite and its gradient NaN-free for logits of any size.

Example (the drop-in use, with any model's logits)::

    head = CtnocvrHead(ctnocvr="tower", loss_weights={"ctr": 1.0, "cvr": 0.5, "ctnocvr": 1.0, "score": 0.01})
    loss, out = head(ctr_logit, cvr_logit, ctnocvr_logit, click, conversion)
    loss.backward(); out["p_cvr"], out["loss_cvr"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ctnocvr_rec.labels import derive_ctnocvr_label

CTNOCVR_MODES = ("none", "derived", "tower")
LOSS_TERMS = ("ctr", "cvr", "ctnocvr", "ctcvr", "score")
_LOG_HALF = -math.log(2.0)
# log p is clamped just below 0 so that log(1 - p) stays finite when p rounds to 1 in float32
# (|log(1-p)| <= ~69, PyTorch's BCE clamps its logs at -100 for the same reason).
_MAX_LOG_P = -1e-30


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on the whole range (Mächler 2012).

    Uses ``log(-expm1(x))`` near 0 and ``log1p(-exp(x))`` below ``-log 2``; each branch only sees
    inputs where it is finite, so gradients through the unused branch cannot turn into NaN.
    """
    x = x.clamp(max=_MAX_LOG_P)
    near_zero = x > _LOG_HALF
    safe_near = torch.where(near_zero, x, torch.full_like(x, _LOG_HALF))
    safe_far = torch.where(near_zero, torch.full_like(x, 2 * _LOG_HALF), x)
    return torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def bce_from_log_prob(log_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise BCE of a probability given as ``log p``: ``-(y log p + (1-y) log(1-p))``."""
    return -(target * log_p + (1.0 - target) * log1mexp(log_p))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over rows where ``mask`` is 1; exactly 0 (not NaN) when no row is."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def task_probabilities(
    ctr_logit: torch.Tensor, cvr_logit: torch.Tensor, ctnocvr_logit: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """``p_ctr, p_cvr, p_ctcvr, p_ctnocvr`` ``[B]`` (eqs. 1-2) from logits; ``p_ctnocvr`` is σ(own logit)
    when ``ctnocvr_logit`` is given, else the derived pCTR·(1 − pCVR). Products are formed in log space."""
    log_p_ctr = F.logsigmoid(ctr_logit)
    p_ctcvr = torch.exp(log_p_ctr + F.logsigmoid(cvr_logit))
    if ctnocvr_logit is not None:
        p_ctnocvr = torch.sigmoid(ctnocvr_logit)
    else:
        p_ctnocvr = torch.exp(log_p_ctr + F.logsigmoid(-cvr_logit))
    return {
        "p_ctr": torch.sigmoid(ctr_logit),
        "p_cvr": torch.sigmoid(cvr_logit),
        "p_ctcvr": p_ctcvr,
        "p_ctnocvr": p_ctnocvr,
    }


class CtnocvrHead(nn.Module):
    """Predictions and the eq. 6 loss from CTR / CVR / (CTnoCVR) logits. No parameters.

    Args:
        ctnocvr: ``"tower"`` – pCTnoCVR is σ(own logit) (MMoE/CGC/PLE +CTnoCVR); ``"derived"`` –
            pCTnoCVR = pCTR·(1 − pCVR) (ESMM +CTnoCVR); ``"none"`` – no CTnoCVR task (Base models;
            the derived pCTnoCVR is still reported).
        loss_weights: active loss terms and their weights, keys from
            ``("ctr", "cvr", "ctnocvr", "ctcvr", "score")``. A term is computed and logged iff its key
            is present (so a weight of 0 logs it without training on it).

    Call: ``forward(ctr_logit, cvr_logit, ctnocvr_logit, click, conversion, ctnocvr=None)``, all ``[B]``
    (``ctnocvr_logit`` only in tower mode, else ``None``; the CTnoCVR label is derived from click and
    conversion when not given). Returns ``(loss, outputs)``: ``loss`` the weighted sum (a scalar
    with grad); ``outputs`` detached ``p_ctr, p_cvr, p_ctcvr, p_ctnocvr`` ``[B]``, ``loss`` and
    ``loss_<term>`` (unweighted term values) scalars.
    """

    def __init__(self, ctnocvr: str = "tower", loss_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if ctnocvr not in CTNOCVR_MODES:
            raise ValueError(f"ctnocvr must be one of {CTNOCVR_MODES}, got {ctnocvr!r}")
        weights = dict(loss_weights if loss_weights is not None else {"ctr": 1.0, "cvr": 1.0})
        unknown = sorted(set(weights) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"unknown loss term(s) {unknown}; valid: {LOSS_TERMS}")
        if not weights:
            raise ValueError("at least one loss term must be active")
        if "ctnocvr" in weights and ctnocvr == "none":
            raise ValueError("loss term 'ctnocvr' needs ctnocvr='tower' or 'derived'")
        if "score" in weights and ctnocvr != "tower":
            raise ValueError("loss term 'score' (ω·BCE(c, pCTR·(1−pCVR))) only applies with ctnocvr='tower'")
        self.ctnocvr = ctnocvr
        self.uses_ctnocvr_tower: bool = ctnocvr == "tower"
        # Fixed, ordered Python data: the active terms are known at trace time.
        self.terms: tuple[str, ...] = tuple(t for t in LOSS_TERMS if t in weights)
        self.loss_weights: dict[str, float] = {t: float(weights[t]) for t in self.terms}
        #: keys of the outputs dict, fixed at construction. Callers that build their own dict from it
        #: index these keys instead of mutating it: TrainPipelineSparseDist's tracer treats modules
        #: without a sharded child (this head) as leaves, so the dict it returns is a single Proxy.
        self.output_keys: tuple[str, ...] = (
            "p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr", "loss", *(f"loss_{t}" for t in self.terms)
        )

    def predict(
        self, ctr_logit: torch.Tensor, cvr_logit: torch.Tensor, ctnocvr_logit: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Probabilities ``p_ctr, p_cvr, p_ctcvr, p_ctnocvr`` (``[B]``, with grad)."""
        if self.uses_ctnocvr_tower and ctnocvr_logit is None:
            raise ValueError("CtnocvrHead(ctnocvr='tower') needs ctnocvr_logit")
        return task_probabilities(ctr_logit, cvr_logit, ctnocvr_logit if self.uses_ctnocvr_tower else None)

    def loss_terms(
        self,
        ctr_logit: torch.Tensor,
        cvr_logit: torch.Tensor,
        ctnocvr_logit: torch.Tensor | None,
        click: torch.Tensor,
        conversion: torch.Tensor,
        ctnocvr: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Unweighted value of every active term (scalars with grad)."""
        terms: dict[str, torch.Tensor] = {}
        if "ctr" in self.loss_weights:
            terms["ctr"] = F.binary_cross_entropy_with_logits(ctr_logit, click)
        if "cvr" in self.loss_weights:
            per_row = F.binary_cross_entropy_with_logits(cvr_logit, conversion, reduction="none")
            terms["cvr"] = masked_mean(per_row, click)
        log_p_ctr = F.logsigmoid(ctr_logit)
        if "ctnocvr" in self.loss_weights:
            if self.uses_ctnocvr_tower:
                if ctnocvr_logit is None:
                    raise ValueError("CtnocvrHead(ctnocvr='tower') needs ctnocvr_logit")
                terms["ctnocvr"] = F.binary_cross_entropy_with_logits(ctnocvr_logit, ctnocvr)
            else:
                terms["ctnocvr"] = bce_from_log_prob(log_p_ctr + F.logsigmoid(-cvr_logit), ctnocvr).mean()
        if "ctcvr" in self.loss_weights:
            terms["ctcvr"] = bce_from_log_prob(log_p_ctr + F.logsigmoid(cvr_logit), click * conversion).mean()
        if "score" in self.loss_weights:
            terms["score"] = bce_from_log_prob(log_p_ctr + F.logsigmoid(-cvr_logit), ctnocvr).mean()
        return terms

    def forward(
        self,
        ctr_logit: torch.Tensor,
        cvr_logit: torch.Tensor,
        ctnocvr_logit: torch.Tensor | None,
        click: torch.Tensor,
        conversion: torch.Tensor,
        ctnocvr: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        click = click.to(ctr_logit.dtype)
        conversion = conversion.to(ctr_logit.dtype)
        label_ctnocvr = (derive_ctnocvr_label(click, conversion) if ctnocvr is None else ctnocvr).to(ctr_logit.dtype)
        terms = self.loss_terms(ctr_logit, cvr_logit, ctnocvr_logit, click, conversion, label_ctnocvr)
        first = self.terms[0]
        loss = self.loss_weights[first] * terms[first]
        for name in self.terms[1:]:
            loss = loss + self.loss_weights[name] * terms[name]
        outputs = {k: v.detach() for k, v in self.predict(ctr_logit, cvr_logit, ctnocvr_logit).items()}
        outputs["loss"] = loss.detach()
        for name in self.terms:
            outputs[f"loss_{name}"] = terms[name].detach()
        return loss, outputs
