"""ChorusCVR (our reading, modules/choruscvr.py): hand-computed terms, gradients, numerics, rows, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctnocvr_rec.config import ModelConfig
from ctnocvr_rec.models import build_objective
from ctnocvr_rec.models.rankers import ESMM, MMoE
from ctnocvr_rec.modules import ChorusCvrObjective, CtnocvrHead

A = np.array([0.3, -6.0, 2.0, 0.1, -0.4, 1.5])  # CTR logits
B = np.array([1.1, 0.4, -0.7, -2.5, 0.8, -0.3])  # CVR logits
U = np.array([-0.5, 0.2, 1.3, -1.1, 0.6, 0.0])  # un-CVR tower logits
C = np.array([-0.2, 0.9, 0.5, -1.0, 0.3, 0.7])  # CTnoCVR tower logits
CLICK = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
CONV = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
W = {"ctr": 1.0, "ctcvr": 0.7, "ctuncvr": 0.9, "cvr": 0.5, "align": 0.3}


def sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def bce(y, p):
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def hand_terms(a=A, b=B, u=U, frozen=None) -> dict[str, float]:
    """H1-H5 of the module docstring in numpy float64; ``frozen = (b0, u0)``: the logits the detached
    soft labels of H5 come from (differentiating with them fixed = what autograd must give)."""
    b0, u0 = frozen if frozen is not None else (b, u)
    pa, pb, pu = sig(a), sig(b), sig(u)
    clicked, unclicked = CLICK == 1, CLICK == 0
    hard = bce(CONV, pb) + bce(1 - CONV, pu)
    soft = bce(1 - sig(u0), pb) + bce(1 - sig(b0), pu)
    return {
        "ctr": bce(CLICK, pa).mean(),
        "ctcvr": bce(CLICK * CONV, pa * pb).mean(),
        "ctuncvr": bce(CLICK * (1 - CONV), pa * pu).mean(),
        "cvr": hard[clicked].mean(),
        "align": soft[unclicked].mean(),
    }


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def logits_for(obj, dtype=torch.float64) -> torch.Tensor:
    cols = {"ctr": A, "cvr": B, "uncvr": U, "ctnocvr": C}
    return torch.tensor(np.stack([cols[k] for k in obj.tasks], axis=1), dtype=dtype)


def test_loss_equals_hand_computation_term_by_term():
    obj = ChorusCvrObjective(W)
    assert obj.tasks == ("ctr", "cvr", "uncvr")
    loss, out = obj(logits_for(obj), t(CLICK), t(CONV))
    ref = hand_terms()
    for term, value in ref.items():
        assert out[f"loss_{term}"].item() == pytest.approx(value, rel=1e-12), term
    assert loss.item() == pytest.approx(sum(W[k] * v for k, v in ref.items()), rel=1e-12)
    np.testing.assert_allclose(out["p_cvr"].numpy(), sig(B), rtol=1e-12)  # inference: the CVR tower
    np.testing.assert_allclose(out["p_ctcvr"].numpy(), sig(A) * sig(B), rtol=1e-12)


@pytest.mark.parametrize("ctnocvr", ["derived", "tower"])
def test_ctnocvr_composes(ctnocvr):
    extra = {"ctnocvr": 0.8} | ({"score": 0.01} if ctnocvr == "tower" else {})
    obj = ChorusCvrObjective(W | extra, ctnocvr=ctnocvr)
    loss, out = obj(logits_for(obj), t(CLICK), t(CONV))
    _, head = CtnocvrHead(ctnocvr, extra)(t(A), t(B), t(C) if ctnocvr == "tower" else None, t(CLICK), t(CONV))
    total = sum(W[k] * v for k, v in hand_terms().items()) + sum(extra[k] * head[f"loss_{k}"].item() for k in extra)
    assert loss.item() == pytest.approx(total, rel=1e-12)


def test_gradcheck_of_the_undetached_terms():
    obj = ChorusCvrObjective({k: v for k, v in W.items() if k != "align"} | {"ctnocvr": 1.0}, ctnocvr="derived")
    logits = logits_for(obj).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: obj(x, t(CLICK), t(CONV))[0], (logits,), eps=1e-6, atol=1e-7)


def test_gradient_equals_finite_differences_with_the_soft_labels_frozen():
    obj = ChorusCvrObjective(W)
    logits = logits_for(obj).requires_grad_(True)
    obj(logits, t(CLICK), t(CONV))[0].backward()

    def total(cols):
        return sum(W[k] * v for k, v in hand_terms(*cols, frozen=(B, U)).items())

    eps, numeric = 1e-6, np.zeros((len(A), 3))
    for j in range(3):
        for i in range(len(A)):
            up, down = [c.copy() for c in (A, B, U)], [c.copy() for c in (A, B, U)]
            up[j][i] += eps
            down[j][i] -= eps
            numeric[i, j] = (total(up) - total(down)) / (2 * eps)
    np.testing.assert_allclose(logits.grad.numpy(), numeric, rtol=1e-6, atol=1e-8)


def test_alignment_moves_only_the_two_cvr_towers_and_only_on_unclicked_rows():
    obj = ChorusCvrObjective({"align": 1.0})
    logits = logits_for(obj).requires_grad_(True)
    obj(logits, t(CLICK), t(CONV))[0].backward()
    grad = logits.grad
    assert torch.all(grad[:, 0] == 0)  # CTR tower untouched
    assert torch.all(grad[CLICK == 1, 1:] == 0) and torch.all(grad[CLICK == 0, 1:] != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_give_finite_loss_and_gradients(dtype):
    obj = ChorusCvrObjective(W | {"ctnocvr": 1.0}, ctnocvr="derived")
    rng = np.random.default_rng(0)
    n = 64
    logits = torch.tensor(rng.choice([-200.0, -80.0, 80.0, 200.0], size=(n, obj.num_tasks)), dtype=dtype,
                          requires_grad=True)
    click = torch.tensor(rng.integers(0, 2, n), dtype=dtype)
    conv = click * torch.tensor(rng.integers(0, 2, n), dtype=dtype)
    loss, out = obj(logits, click, conv)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in out.values())
    assert torch.isfinite(logits.grad).all()


def test_conversion_labels_of_unclicked_rows_never_matter_and_no_click_batches_work():
    obj = ChorusCvrObjective(W)
    corrupt = CONV.copy()
    corrupt[CLICK == 0] = 1.0

    def run(click, conv):
        logits = logits_for(obj).requires_grad_(True)
        loss, out = obj(logits, t(click), t(conv))
        loss.backward()
        return loss.item(), logits.grad, out

    (l0, g0, _), (l1, g1, _) = run(CLICK, CONV), run(CLICK, corrupt)
    assert l0 == l1
    torch.testing.assert_close(g0, g1, rtol=0, atol=0)
    loss, grad, out = run(np.zeros_like(CLICK), np.zeros_like(CONV))
    assert np.isfinite(loss) and torch.isfinite(grad).all() and out["loss_cvr"].item() == 0.0


def test_built_from_the_config_section_on_every_backbone_kind():
    for backbone in (ESMM, MMoE):
        obj = build_objective(ModelConfig(method="choruscvr", use_ctnocvr=False), backbone)
        assert isinstance(obj, ChorusCvrObjective)
        assert obj.loss_weights == {"ctr": 1.0, "ctcvr": 1.0, "ctuncvr": 1.0, "cvr": 0.5, "align": 0.1}
    obj = build_objective(ModelConfig(method="choruscvr", use_ctnocvr=True), MMoE)
    assert obj.tasks[-1] == "ctnocvr" and "score" in obj.loss_weights
