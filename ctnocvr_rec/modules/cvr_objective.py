"""CVR-side training objectives: the common contract, the propensity helpers and the ``base`` objective.

A *CVR objective* turns the task logits of any backbone into ``(loss, outputs)``. It declares the
towers it needs (``tasks``: CTR and CVR first, then the method's own towers, then the CTnoCVR tower
when ``ctnocvr="tower"``), its loss terms, and the keys of its outputs. Every objective composes with
the CTnoCVR task of the SIGIR'22 paper by one argument, ``ctnocvr``:

* ``"none"``    – no CTnoCVR task;
* ``"derived"`` – the term λ_ctnocvr·BCE(c, pCTR·(1 − pCVR)) (ESMM-style backbones, paper eq. 2);
* ``"tower"``   – a CTnoCVR tower with its own loss (+ the ω score term), gated backbones.

The CTnoCVR terms are computed by :class:`CtnocvrHead` itself (the one definition of that loss).

Methods (one file each): ``base`` (here: ESMM's / the paper's objective, delegated to
:class:`CtnocvrHead` unchanged), :mod:`escm2_ips`, :mod:`escm2_dr`, :mod:`dcmt`.

Numerics shared by the debiasing methods: the propensity t̂ = pCTR enters as an inverse weight
1 / max(t̂, clip) = exp(−max(log σ(a), log clip)), formed from ``logsigmoid`` so that no probability
is rounded to 0 before it is inverted; the weight is bounded by 1 / clip, so every term is finite for
logits of any size (tested at ±80).

Example (any backbone's logits ``[B, T]`` in ``objective.tasks`` order)::

    objective = Escm2IpsObjective({"ctr": 1.0, "cvr_ips": 0.5, "ctcvr": 0.5}, ctnocvr="derived")
    loss, out = objective(logits, click, conversion)     # logits [B, len(objective.tasks)]
    loss.backward(); out["p_cvr"], out["loss_cvr_ips"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ctnocvr_rec.labels import derive_ctnocvr_label
from ctnocvr_rec.modules.ctnocvr_head import CTNOCVR_MODES, CtnocvrHead, bce_from_log_prob, task_probabilities

#: loss terms contributed by the CTnoCVR task (composable with every objective)
CTNOCVR_TERMS = ("ctnocvr", "score")


def inverse_propensity(log_p: torch.Tensor, clip: float, detach: bool) -> torch.Tensor:
    """``1 / max(p, clip)`` from ``log p`` ``[B]``: at most ``1 / clip``, finite for any logit.

    ``detach`` stops the gradient through the propensity (the weight is then a constant of the step,
    as in the ESCM² reference code, where the inverse propensity has ``stop_gradient``).
    """
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"propensity clip must be in (0, 1], got {clip}")
    log_t = torch.clamp(log_p, min=math.log(clip))
    if detach:
        log_t = log_t.detach()
    return torch.exp(-log_t)


def ctcvr_bce(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor, click: torch.Tensor,
              conversion: torch.Tensor) -> torch.Tensor:
    """ESMM's global risk, mean over all rows: BCE(click·conversion, pCTR·pCVR), in log space."""
    return bce_from_log_prob(F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit), click * conversion).mean()


class CvrObjective(nn.Module):
    """Base class of the CVR objectives (no parameters).

    Subclasses set ``name``, ``extra_tasks`` (towers beyond CTR and CVR) and ``method_terms`` (their
    loss terms, in summation order) and implement :meth:`objective_terms`.

    Args:
        loss_weights: active terms and their weights: keys from ``method_terms`` and
            :data:`CTNOCVR_TERMS`. A term is computed and logged iff its key is present.
        ctnocvr: ``"none" | "derived" | "tower"`` (see the module docstring).

    Call: ``forward(logits, click, conversion, ctnocvr=None)``: ``logits`` ``[B, T]`` with columns in
    :attr:`tasks` order, labels ``[B]`` (the CTnoCVR label is derived when not given). Returns
    ``(loss, outputs)``: ``loss`` a scalar with grad; ``outputs`` (keys :attr:`output_keys`, all
    detached) ``p_ctr, p_cvr, p_ctcvr, p_ctnocvr`` ``[B]``, ``loss`` and ``loss_<term>`` scalars.
    """

    name: ClassVar[str] = ""
    extra_tasks: ClassVar[tuple[str, ...]] = ()
    method_terms: ClassVar[tuple[str, ...]] = ()

    def __init__(self, loss_weights: Mapping[str, float], ctnocvr: str = "none") -> None:
        super().__init__()
        if ctnocvr not in CTNOCVR_MODES:
            raise ValueError(f"ctnocvr must be one of {CTNOCVR_MODES}, got {ctnocvr!r}")
        weights = dict(loss_weights)
        valid = (*self.method_terms, *CTNOCVR_TERMS)
        unknown = sorted(set(weights) - set(valid))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown loss term(s) {unknown}; valid: {valid}")
        if not weights:
            raise ValueError(f"{type(self).__name__}: at least one loss term must be active")
        ctnocvr_weights = {t: float(weights[t]) for t in CTNOCVR_TERMS if t in weights}
        # CtnocvrHead validates the CTnoCVR part (e.g. 'score' needs the tower) and computes it.
        self.ctnocvr_head = CtnocvrHead(ctnocvr, ctnocvr_weights) if ctnocvr_weights else None
        if ctnocvr == "tower" and self.ctnocvr_head is None:
            raise ValueError("ctnocvr='tower' adds a CTnoCVR tower: give it a 'ctnocvr' loss weight")
        self.ctnocvr = ctnocvr
        self.tasks: tuple[str, ...] = ("ctr", "cvr", *self.extra_tasks) + (("ctnocvr",) if ctnocvr == "tower" else ())
        self.terms: tuple[str, ...] = tuple(t for t in valid if t in weights)
        self.loss_weights: dict[str, float] = {t: float(weights[t]) for t in self.terms}
        #: fixed at construction (the pipeline's fx trace sees this module as a leaf returning a Proxy)
        self.output_keys: tuple[str, ...] = (
            "p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr", "loss", *(f"loss_{t}" for t in self.terms)
        )

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def columns(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logits`` ``[B, T]`` -> ``{task: [B]}`` (no shape check: this runs under fx tracing)."""
        return {task: logits[:, i] for i, task in enumerate(self.tasks)}

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``p_ctr, p_cvr, p_ctcvr, p_ctnocvr`` ``[B]`` (with grad); pCVR is always the CVR tower's."""
        col = self.columns(logits)
        return task_probabilities(col["ctr"], col["cvr"], col.get("ctnocvr"))

    def objective_terms(
        self, col: Mapping[str, torch.Tensor], click: torch.Tensor, conversion: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Unweighted value of each active term of ``method_terms`` (scalars with grad)."""
        raise NotImplementedError

    def loss_terms(
        self, logits: torch.Tensor, click: torch.Tensor, conversion: torch.Tensor, ctnocvr: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Every active term (method + CTnoCVR), unweighted."""
        col = self.columns(logits)
        terms = self.objective_terms(col, click, conversion)
        if self.ctnocvr_head is not None:
            terms.update(self.ctnocvr_head.loss_terms(
                col["ctr"], col["cvr"], col.get("ctnocvr"), click, conversion, ctnocvr))
        return terms

    def forward(
        self, logits: torch.Tensor, click: torch.Tensor, conversion: torch.Tensor, ctnocvr: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        click = click.to(logits.dtype)
        conversion = conversion.to(logits.dtype)
        label = (derive_ctnocvr_label(click, conversion) if ctnocvr is None else ctnocvr).to(logits.dtype)
        terms = self.loss_terms(logits, click, conversion, label)
        first = self.terms[0]
        loss = self.loss_weights[first] * terms[first]
        for name in self.terms[1:]:
            loss = loss + self.loss_weights[name] * terms[name]
        outputs = {k: v.detach() for k, v in self.predict(logits).items()}
        outputs["loss"] = loss.detach()
        for name in self.terms:
            outputs[f"loss_{name}"] = terms[name].detach()
        return loss, outputs


class BaseObjective(CvrObjective):
    """``base``: the backbone's own objective, i.e. today's :class:`CtnocvrHead` unchanged.

    ESMM-style backbones train ``ctr`` + ``ctcvr`` (Ma et al. 2018); gated backbones ``ctr`` +
    clicked-only ``cvr``; with ``ctnocvr`` the paper's terms are added (eq. 6). The whole loss is
    computed by :class:`CtnocvrHead`, so Base / +CTnoCVR runs are bit-identical to the pre-registry
    models.

    Example::

        objective = BaseObjective({"ctr": 1.0, "cvr": 0.5, "ctnocvr": 1.0, "score": 0.01}, ctnocvr="tower")
        loss, out = objective(logits, click, conversion)       # logits [B, 3]: ctr, cvr, ctnocvr
    """

    name = "base"
    method_terms = ("ctr", "cvr", "ctcvr")

    def __init__(self, loss_weights: Mapping[str, float], ctnocvr: str = "none") -> None:
        super().__init__(loss_weights, ctnocvr)
        self.head = CtnocvrHead(ctnocvr, self.loss_weights)
        # CtnocvrHead's own term order (the summation order of the released models)
        self.terms = self.head.terms
        self.output_keys = self.head.output_keys

    def loss_terms(
        self, logits: torch.Tensor, click: torch.Tensor, conversion: torch.Tensor, ctnocvr: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        col = self.columns(logits)
        return self.head.loss_terms(col["ctr"], col["cvr"], col.get("ctnocvr"), click, conversion, ctnocvr)

    def forward(
        self, logits: torch.Tensor, click: torch.Tensor, conversion: torch.Tensor, ctnocvr: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        col = self.columns(logits)
        return self.head(col["ctr"], col["cvr"], col.get("ctnocvr"), click, conversion, ctnocvr)


class PropensityObjective(CvrObjective):
    """A :class:`CvrObjective` whose CVR risk is weighted by inverse propensities (pCTR, clipped).

    Holds the two settings every such method shares (ESCM²-IPS/DR, DCMT) and their CTR term.

    Args:
        loss_weights, ctnocvr: as :class:`CvrObjective`.
        propensity_clip: floor of the propensity in the inverse weights, in (0, 1].
        detach_propensity: stop the gradient through the inverse propensity.
    """

    def __init__(self, loss_weights: Mapping[str, float], ctnocvr: str = "none", propensity_clip: float = 0.05,
                 detach_propensity: bool = True) -> None:
        super().__init__(loss_weights, ctnocvr)
        inverse_propensity(torch.zeros(1), propensity_clip, detach_propensity)  # validates the clip
        self.propensity_clip = float(propensity_clip)
        self.detach_propensity = bool(detach_propensity)

    def ctr_terms(self, ctr_logit: torch.Tensor, click: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"ctr": BCE(click, pCTR)}`` over all exposures when the CTR term is weighted, else ``{}``."""
        if "ctr" not in self.loss_weights:
            return {}
        return {"ctr": F.binary_cross_entropy_with_logits(ctr_logit, click)}
