"""CVR objectives (escm2_ips, escm2_dr, dcmt, + CTnoCVR): hand-computed losses, gradients, numerics, rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctnocvr_rec import registry
from ctnocvr_rec.config import ModelConfig
from ctnocvr_rec.models import build_objective
from ctnocvr_rec.models.rankers import ESMM, MMoE
from ctnocvr_rec.modules import CtnocvrHead, DcmtObjective, Escm2DrObjective, Escm2IpsObjective

# six rows: clicked and not, converted and not; row 1 has a tiny pCTR (propensity clip active)
A = np.array([0.3, -6.0, 2.0, 0.1, -0.4, 1.5])  # CTR logits
B = np.array([1.1, 0.4, -0.7, -2.5, 0.8, -0.3])  # CVR logits
G = np.array([-0.5, 0.2, 1.3, -1.1, 0.6, 0.0])  # method's own tower (imputation / counterfactual CVR)
C = np.array([-0.2, 0.9, 0.5, -1.0, 0.3, 0.7])  # CTnoCVR tower logits
CLICK = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
CONV = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
CLIP = 0.05

IPS_W = {"ctr": 1.0, "cvr_ips": 0.5, "ctcvr": 0.7}
DR_W = {"ctr": 1.0, "cvr_dr": 0.5, "imputation": 0.3, "ctcvr": 0.7}
DCMT_W = {"ctr": 1.0, "cvr_dcmt": 0.9, "counterfactual": 0.2, "ctcvr": 0.4}


def sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def bce(y, p):
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def hand_terms(method: str, a=A, b=B, g=G, frozen=None, detach: bool = True) -> dict[str, float]:
    """The method's loss terms written out in numpy float64 from the formulas in the module docstrings.

    ``frozen = (a0, b0, g0)``: the logits the *detached* quantities are computed from (the propensity
    when ``detach``; DR's ê in its risk and e in its imputation loss always). Differentiating this
    function with ``frozen`` held fixed gives the gradient autograd must produce.
    """
    a0, b0, g0 = frozen if frozen is not None else (a, b, g)
    pa, pb, pg = sig(a), sig(b), sig(g)
    common = {"ctr": bce(CLICK, pa).mean(), "ctcvr": bce(CLICK * CONV, pa * pb).mean()}
    pa_w = sig(a0) if detach else pa
    prop = np.maximum(pa_w, CLIP)
    if method == "escm2_ips":
        return {**common, "cvr_ips": (CLICK * bce(CONV, pb) / prop).mean()}
    if method == "escm2_dr":
        err, imp = bce(CONV, pb), np.log1p(np.exp(g))
        err0, imp0 = bce(CONV, sig(b0)), np.log1p(np.exp(g0))
        return {**common, "cvr_dr": (imp0 + CLICK * (err - imp0) / prop).mean(),
                "imputation": (CLICK * (err0 - imp) ** 2 / prop).mean()}
    factual = CLICK * bce(CONV, pb) / prop
    counterfactual = (1 - CLICK) * -np.log(pg) / np.maximum(1 - pa_w, CLIP)
    return {**common, "cvr_dcmt": (factual + counterfactual).mean(), "counterfactual": np.abs(1 - pb - pg).mean()}


def make(method: str, ctnocvr: str = "none", detach: bool = True, extra: dict | None = None):
    weights = {"escm2_ips": IPS_W, "escm2_dr": DR_W, "dcmt": DCMT_W}[method] | (extra or {})
    cls = {"escm2_ips": Escm2IpsObjective, "escm2_dr": Escm2DrObjective, "dcmt": DcmtObjective}[method]
    return cls(weights, ctnocvr=ctnocvr, propensity_clip=CLIP, detach_propensity=detach)


def logits_for(obj, dtype=torch.float64) -> torch.Tensor:
    cols = {"ctr": A, "cvr": B, "imputation": G, "cvr_counterfactual": G, "ctnocvr": C}
    return torch.tensor(np.stack([cols[t] for t in obj.tasks], axis=1), dtype=dtype)


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


METHODS = ["escm2_ips", "escm2_dr", "dcmt"]


@pytest.mark.parametrize("method", METHODS)
def test_loss_equals_hand_computation_term_by_term(method):
    obj = make(method)
    loss, out = obj(logits_for(obj), t(CLICK), t(CONV))
    ref = hand_terms(method)
    assert set(obj.terms) == set(ref)
    for term, value in ref.items():
        assert out[f"loss_{term}"].item() == pytest.approx(value, rel=1e-12), term
    total = sum(obj.loss_weights[k] * v for k, v in ref.items())
    assert loss.item() == pytest.approx(total, rel=1e-12)
    # pCVR is the (factual) CVR tower's; pCTCVR = pCTR * pCVR
    np.testing.assert_allclose(out["p_cvr"].numpy(), sig(B), rtol=1e-12)
    np.testing.assert_allclose(out["p_ctcvr"].numpy(), sig(A) * sig(B), rtol=1e-12)


def test_propensity_clip_is_active_on_the_small_ctr_row():
    # row 1: pCTR = σ(−6) ≈ 0.0025 < 0.05, so its weight is 1/0.05 = 20, not ≈ 400
    obj = make("escm2_ips", extra=None)
    _, out = obj(logits_for(obj), t(CLICK), t(CONV))
    unclipped = (CLICK * bce(CONV, sig(B)) / sig(A)).mean()
    assert out["loss_cvr_ips"].item() < 0.5 * unclipped


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ctnocvr", ["derived", "tower"])
def test_ctnocvr_composes_with_each_method(method, ctnocvr):
    extra = {"ctnocvr": 0.8} | ({"score": 0.01} if ctnocvr == "tower" else {})
    obj = make(method, ctnocvr=ctnocvr, extra=extra)
    assert obj.tasks[-1] == "ctnocvr" if ctnocvr == "tower" else "ctnocvr" not in obj.tasks
    loss, out = obj(logits_for(obj), t(CLICK), t(CONV))
    ref = hand_terms(method)
    head = CtnocvrHead(ctnocvr, extra)
    _, head_out = head(t(A), t(B), t(C) if ctnocvr == "tower" else None, t(CLICK), t(CONV))
    for term in extra:
        assert out[f"loss_{term}"].item() == pytest.approx(head_out[f"loss_{term}"].item(), rel=1e-12)
    total = sum(obj.loss_weights[k] * v for k, v in ref.items())
    total += sum(extra[k] * head_out[f"loss_{k}"].item() for k in extra)
    assert loss.item() == pytest.approx(total, rel=1e-12)
    if ctnocvr == "tower":
        np.testing.assert_allclose(out["p_ctnocvr"].numpy(), sig(C), rtol=1e-12)


@pytest.mark.parametrize("method", ["escm2_ips", "dcmt"])
def test_gradcheck_float64_without_detached_parts(method):
    """With the propensity not detached, IPS and DCMT are plain functions of the logits: gradcheck."""
    obj = make(method, ctnocvr="tower", detach=False, extra={"ctnocvr": 1.0, "score": 0.01})
    logits = logits_for(obj).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: obj(x, t(CLICK), t(CONV))[0], (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("detach", [True, False])
def test_gradient_equals_finite_differences_with_detached_parts_frozen(method, detach):
    """Where a quantity is detached (propensity, DR's ê and e), autograd's gradient is the derivative
    with that quantity frozen: compared with central differences of :func:`hand_terms` in float64."""
    obj = make(method, detach=detach)
    logits = logits_for(obj).requires_grad_(True)
    obj(logits, t(CLICK), t(CONV))[0].backward()
    columns = [A, B, G]
    weights = obj.loss_weights

    def total(cols):
        terms = hand_terms(method, *cols, frozen=(A, B, G), detach=detach)
        return sum(weights[k] * v for k, v in terms.items())

    eps = 1e-6
    numeric = np.zeros((len(A), obj.num_tasks))
    for j in range(obj.num_tasks):
        for i in range(len(A)):
            up = [c.copy() for c in columns]
            down = [c.copy() for c in columns]
            up[j][i] += eps
            down[j][i] -= eps
            numeric[i, j] = (total(up) - total(down)) / (2 * eps)
    np.testing.assert_allclose(logits.grad.numpy(), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_give_finite_loss_and_gradients(method, dtype):
    obj = make(method, ctnocvr="derived", detach=False, extra={"ctnocvr": 1.0})
    rng = np.random.default_rng(0)
    n = 64
    logits = torch.tensor(rng.choice([-200.0, -80.0, 80.0, 200.0], size=(n, obj.num_tasks)), dtype=dtype, requires_grad=True)
    click = torch.tensor(rng.integers(0, 2, n), dtype=dtype)
    conv = click * torch.tensor(rng.integers(0, 2, n), dtype=dtype)
    loss, out = obj(logits, click, conv)
    loss.backward()
    assert torch.isfinite(loss), loss
    assert all(torch.isfinite(v).all() for v in out.values())
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("method", METHODS)
def test_batch_without_clicks(method):
    obj = make(method)
    zeros = np.zeros_like(CLICK)
    logits = logits_for(obj).requires_grad_(True)
    loss, out = obj(logits, t(zeros), t(zeros))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    if method == "escm2_ips":
        assert out["loss_cvr_ips"].item() == 0.0
    if method == "escm2_dr":  # only the imputed errors remain; nothing to regress them on
        assert out["loss_imputation"].item() == 0.0
        assert out["loss_cvr_dr"].item() == pytest.approx(np.log1p(np.exp(G)).mean(), rel=1e-12)
    if method == "dcmt":  # only the counterfactual (unclicked) half, every row weighted 1/max(1 - pCTR, clip)
        expected = (-np.log(sig(G)) / np.maximum(1 - sig(A), CLIP)).mean()
        assert out["loss_cvr_dcmt"].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_conversion_labels_of_unclicked_rows_never_matter(method):
    """CVR terms read the conversion label on clicked rows only: a (corrupt) conversion on an
    unclicked row changes neither the loss nor any gradient."""
    obj = make(method, ctnocvr="derived", extra={"ctnocvr": 1.0})
    corrupt = CONV.copy()
    corrupt[CLICK == 0] = 1.0

    def run(conv):
        logits = logits_for(obj).requires_grad_(True)
        loss, _ = obj(logits, t(CLICK), t(conv), ctnocvr=t(CLICK * (1 - CONV)))
        loss.backward()
        return loss.item(), logits.grad

    (l0, g0), (l1, g1) = run(CONV), run(corrupt)
    if method == "escm2_ips" or method == "escm2_dr" or method == "dcmt":
        # the CTCVR label is click·conversion, so it is unaffected too
        assert l0 == l1
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)


def test_detached_propensity_routes_gradients_to_the_right_towers():
    # ESCM²-IPS: the counterfactual risk alone trains the CVR tower only
    obj = Escm2IpsObjective({"cvr_ips": 1.0}, detach_propensity=True)
    logits = logits_for(obj).requires_grad_(True)
    obj(logits, t(CLICK), t(CONV))[0].backward()
    assert torch.all(logits.grad[:, 0] == 0) and torch.any(logits.grad[:, 1] != 0)
    obj = Escm2IpsObjective({"cvr_ips": 1.0}, detach_propensity=False)
    logits = logits_for(obj).requires_grad_(True)
    obj(logits, t(CLICK), t(CONV))[0].backward()
    assert torch.any(logits.grad[:, 0] != 0)
    # ESCM²-DR: the DR risk does not move the imputation tower, the imputation loss not the CVR tower
    for term, frozen, moved in (("cvr_dr", 2, 1), ("imputation", 1, 2)):
        obj = Escm2DrObjective({term: 1.0})
        logits = logits_for(obj).requires_grad_(True)
        obj(logits, t(CLICK), t(CONV))[0].backward()
        assert torch.all(logits.grad[:, frozen] == 0), term
        assert torch.any(logits.grad[:, moved] != 0), term


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown loss term"):
        Escm2IpsObjective({"ctr": 1.0, "cvr": 1.0})
    with pytest.raises(ValueError, match="propensity clip"):
        DcmtObjective({"ctr": 1.0}, propensity_clip=0.0)
    with pytest.raises(ValueError, match="only applies with ctnocvr='tower'"):
        Escm2DrObjective({"ctr": 1.0, "score": 0.01}, ctnocvr="derived")
    with pytest.raises(ValueError, match="model.method must be one of"):
        build_objective(ModelConfig(method="nise"), MMoE)


@pytest.mark.parametrize("method", registry.METHOD_NAMES)
def test_registry_builds_every_method_from_its_config_section(method):
    for backbone_cls, flag in ((ESMM, False), (ESMM, True), (MMoE, True)):
        cfg = ModelConfig(method=method, use_ctnocvr=flag)
        obj = build_objective(cfg, backbone_cls)
        assert obj.name == method
        assert ("ctnocvr" in obj.terms) == flag
        assert ("ctnocvr" in obj.tasks) == (flag and backbone_cls.ctnocvr_mode == "tower")
    spec = registry.METHODS[method]
    if spec.section:  # every <term>_weight of the section reaches the objective
        cfg = ModelConfig(method=method, use_ctnocvr=False)
        section = getattr(cfg, spec.section)
        obj = build_objective(cfg, MMoE)
        for term in obj.terms:
            if term != "ctr":
                assert obj.loss_weights[term] == getattr(section, f"{term}_weight")
        if hasattr(section, "propensity_clip"):  # the propensity-weighted methods
            assert obj.propensity_clip == section.propensity_clip
        for term in registry.loss_term_names():
            assert isinstance(term, str)
