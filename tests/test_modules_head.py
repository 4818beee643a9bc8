"""CtnocvrHead: predictions, eq. 6 loss term by term, clicked-only CVR, numerics."""

from __future__ import annotations

import math

import pytest
import torch

from ctnocvr_rec.modules import CtnocvrHead, bce_from_log_prob, log1mexp

A = [0.3, -1.2, 2.0, 0.1]  # CTR logits
B_ = [1.1, 0.4, -0.7, -2.5]  # CVR logits
C = [-0.2, 0.9, 0.5, -1.0]  # CTnoCVR tower logits
CLICK = [1.0, 0.0, 1.0, 1.0]
CONV = [1.0, 0.0, 0.0, 0.0]
LABEL_C = [0.0, 0.0, 1.0, 1.0]  # click and not conversion


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _bce(y: float, p: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _t(xs: list[float]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def _hand_terms() -> dict[str, float]:
    p_ctr = [_sig(a) for a in A]
    p_cvr = [_sig(b) for b in B_]
    return {
        "ctr": _mean([_bce(y, p) for y, p in zip(CLICK, p_ctr)]),
        "cvr": _mean([_bce(z, p) for y, z, p in zip(CLICK, CONV, p_cvr) if y == 1]),
        "ctnocvr_tower": _mean([_bce(c, _sig(z)) for c, z in zip(LABEL_C, C)]),
        "ctnocvr_derived": _mean([_bce(c, pc * (1 - pv)) for c, pc, pv in zip(LABEL_C, p_ctr, p_cvr)]),
        "ctcvr": _mean([_bce(y * z, pc * pv) for y, z, pc, pv in zip(CLICK, CONV, p_ctr, p_cvr)]),
    }


def test_tower_mode_loss_equals_hand_computation_term_by_term():
    weights = {"ctr": 1.0, "cvr": 0.5, "ctnocvr": 2.0, "score": 0.01}
    head = CtnocvrHead("tower", weights)
    loss, out = head(_t(A), _t(B_), _t(C), _t(CLICK), _t(CONV))  # label c derived inside
    ref = _hand_terms()
    expected = {"ctr": ref["ctr"], "cvr": ref["cvr"], "ctnocvr": ref["ctnocvr_tower"], "score": ref["ctnocvr_derived"]}
    for term, value in expected.items():
        assert out[f"loss_{term}"].item() == pytest.approx(value, rel=1e-12), term
    total = sum(weights[t] * v for t, v in expected.items())
    assert loss.item() == pytest.approx(total, rel=1e-12)
    assert out["loss"].item() == pytest.approx(total, rel=1e-12)
    assert "loss_ctcvr" not in out
    torch.testing.assert_close(out["p_ctnocvr"], torch.sigmoid(_t(C)))


def test_esmm_modes_loss_and_derived_prediction():
    head = CtnocvrHead("derived", {"ctr": 1.0, "ctcvr": 1.0, "ctnocvr": 0.8})
    loss, out = head(_t(A), _t(B_), None, _t(CLICK), _t(CONV), _t(LABEL_C))
    ref = _hand_terms()
    assert out["loss_ctr"].item() == pytest.approx(ref["ctr"], rel=1e-12)
    assert out["loss_ctcvr"].item() == pytest.approx(ref["ctcvr"], rel=1e-12)
    assert out["loss_ctnocvr"].item() == pytest.approx(ref["ctnocvr_derived"], rel=1e-12)
    assert loss.item() == pytest.approx(ref["ctr"] + ref["ctcvr"] + 0.8 * ref["ctnocvr_derived"], rel=1e-12)
    assert "loss_cvr" not in out
    p_ctr, p_cvr = torch.sigmoid(_t(A)), torch.sigmoid(_t(B_))
    torch.testing.assert_close(out["p_ctnocvr"], p_ctr * (1 - p_cvr))
    torch.testing.assert_close(out["p_ctcvr"], p_ctr * p_cvr)
    # the Base head (no CTnoCVR task) still reports the derived pCTnoCVR
    _, base = CtnocvrHead("none", {"ctr": 1.0, "ctcvr": 1.0})(_t(A), _t(B_), None, _t(CLICK), _t(CONV))
    torch.testing.assert_close(base["p_ctnocvr"], p_ctr * (1 - p_cvr))
    assert "loss_ctnocvr" not in base


def test_unclicked_rows_get_zero_gradient_through_cvr_term():
    head = CtnocvrHead("none", {"cvr": 1.0})
    cvr_logit = _t(B_).requires_grad_()
    loss, _ = head(_t(A), cvr_logit, None, _t(CLICK), _t(CONV))
    loss.backward()
    clicked = _t(CLICK) > 0
    assert (cvr_logit.grad[~clicked] == 0).all()
    assert (cvr_logit.grad[clicked].abs() > 0).all()
    # mean over the 3 clicked rows: d/db BCE = sigmoid(b) - z, divided by 3
    torch.testing.assert_close(cvr_logit.grad[clicked], (torch.sigmoid(_t(B_)) - _t(CONV))[clicked] / 3)


def test_no_click_batch_is_finite_and_cvr_term_is_exactly_zero():
    head = CtnocvrHead("tower", {"ctr": 1.0, "cvr": 1.0, "ctnocvr": 1.0, "score": 0.01})
    logits = [_t(v).float().requires_grad_() for v in (A, B_, C)]
    zeros = torch.zeros(4)
    loss, out = head(*logits, zeros, zeros)
    loss.backward()
    assert out["loss_cvr"].item() == 0.0
    assert torch.isfinite(loss)
    for g in logits:
        assert torch.isfinite(g.grad).all()
    assert (logits[1].grad.abs() > 0).all()  # the score term still reaches the CVR tower


@pytest.mark.parametrize("scale", [1.0, 20.0, 80.0, 400.0])
def test_log_space_products_are_finite_and_accurate_for_extreme_logits(scale):
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(64, generator=gen) * scale).requires_grad_()
    b = (torch.randn(64, generator=gen) * scale).requires_grad_()
    y = (torch.rand(64, generator=gen) < 0.5).float()
    head = CtnocvrHead("derived", {"ctr": 1.0, "ctcvr": 1.0, "ctnocvr": 1.0})
    loss, out = head(a, b, None, y, y * (torch.rand(64, generator=gen) < 0.5).float())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    if scale <= 20.0:  # where float64 can form the product directly, the log-space value agrees
        p = torch.sigmoid(a.double()) * torch.sigmoid(-b.double())
        direct = -(y * p.log() + (1 - y) * (1 - p).log())
        torch.testing.assert_close(
            bce_from_log_prob(torch.nn.functional.logsigmoid(a) + torch.nn.functional.logsigmoid(-b), y),
            direct.float(),
            rtol=1e-4,
            atol=1e-5,
        )


def test_log1mexp_matches_float64_and_has_no_nan_gradient():
    x = torch.tensor([-1e-8, -1e-3, -0.5, -0.7, -1.0, -30.0, -200.0, 0.0], requires_grad=True)
    y = log1mexp(x)
    ref = torch.log(1 - torch.exp(x.detach().double().clamp(max=-1e-30)))
    torch.testing.assert_close(y[:-1].double(), ref[:-1], rtol=1e-5, atol=1e-7)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_head_rejects_inconsistent_configuration():
    with pytest.raises(ValueError, match="unknown loss term"):
        CtnocvrHead("tower", {"ctr": 1.0, "ctcvr_typo": 1.0})
    with pytest.raises(ValueError, match="'score'"):
        CtnocvrHead("derived", {"ctr": 1.0, "score": 0.01})
    with pytest.raises(ValueError, match="'ctnocvr' needs"):
        CtnocvrHead("none", {"ctr": 1.0, "ctnocvr": 1.0})
    with pytest.raises(ValueError, match="ctnocvr must be one of"):
        CtnocvrHead("both")
    head = CtnocvrHead("tower", {"ctr": 1.0, "ctnocvr": 1.0})
    with pytest.raises(ValueError, match="needs ctnocvr_logit"):
        head(_t(A), _t(B_), None, _t(CLICK), _t(CONV))
