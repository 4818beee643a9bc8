"""Exact evaluation metrics against scikit-learn and hand references."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from ctnocvr_rec.train.metrics import calibration, grouped_auc, log_loss, task_metrics


def _columns(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    click = (rng.random(n) < 0.3).astype(np.int8)
    conversion = (click * (rng.random(n) < 0.4)).astype(np.int8)
    ctnocvr = ((click == 1) & (conversion == 0)).astype(np.int8)
    # rounded scores: many ties, which an exact AUC must average
    def score(label: np.ndarray) -> np.ndarray:
        return np.clip(np.round(0.2 + 0.2 * label + 0.5 * rng.random(n), 2), 0.01, 0.99)
    return {
        "click": click, "conversion": conversion, "ctnocvr": ctnocvr,
        "p_ctr": score(click), "p_cvr": score(conversion) - 0.1 * click, "p_ctcvr": score(conversion),
        "p_ctnocvr": score(ctnocvr), "user_id": rng.integers(-1, 60, n),
    }


def test_task_aucs_equal_sklearn_on_the_right_rows():
    cols = _columns(4000, 0)
    m = task_metrics(cols)
    clicked = cols["click"] == 1
    assert abs(m["auc_ctr"] - roc_auc_score(cols["click"], cols["p_ctr"])) < 1e-6
    # CVR only over clicked rows: over all rows it would be a different number
    cvr_clicked = roc_auc_score(cols["conversion"][clicked], cols["p_cvr"][clicked])
    assert abs(m["auc_cvr"] - cvr_clicked) < 1e-6
    assert abs(cvr_clicked - roc_auc_score(cols["conversion"], cols["p_cvr"])) > 1e-3
    assert abs(m["auc_ctcvr"] - roc_auc_score(cols["conversion"], cols["p_ctcvr"])) < 1e-6
    assert abs(m["auc_ctnocvr"] - roc_auc_score(cols["ctnocvr"], cols["p_ctnocvr"])) < 1e-6
    assert m["rows"] == 4000 and m["clicked_rows"] == clicked.sum()


def test_logloss_and_calibration_match_references():
    cols = _columns(3000, 1)
    m = task_metrics(cols)
    clicked = cols["click"] == 1
    ref = sk_log_loss(cols["conversion"][clicked], cols["p_cvr"][clicked], labels=[0, 1])
    assert abs(m["logloss_cvr"] - ref) < 1e-9
    assert abs(m["logloss_ctr"] - sk_log_loss(cols["click"], cols["p_ctr"], labels=[0, 1])) < 1e-9
    assert abs(m["calib_ctr"] - cols["p_ctr"].mean() / cols["click"].mean()) < 1e-12
    assert calibration(np.array([0, 1, 1, 0]), np.array([0.25, 0.25, 0.25, 0.25])) == pytest.approx(0.5)
    assert np.isnan(calibration(np.zeros(3), np.full(3, 0.2)))
    assert log_loss(np.array([1.0]), np.array([1.0])) < 1e-6  # clipped, finite


def test_gauc_equals_per_user_sklearn_weighted_by_rows():
    cols = _columns(5000, 2)
    users, y, s = cols["user_id"], cols["click"], cols["p_ctr"]
    known = users >= 0
    aucs, weights = [], []
    for u in np.unique(users[known]):
        sel = users == u
        if 0 < y[sel].sum() < sel.sum():
            aucs.append(roc_auc_score(y[sel], s[sel]))
            weights.append(sel.sum())
    reference = np.average(aucs, weights=weights)
    assert abs(task_metrics(cols)["gauc_ctr"] - reference) < 1e-9
    assert abs(grouped_auc(users[known], y[known], s[known]) - reference) < 1e-9


def test_gauc_skips_single_class_groups_and_handles_ties():
    groups = np.array([1, 1, 1, 2, 2, 3, 3, 3])
    labels = np.array([1, 0, 0, 1, 1, 0, 1, 0])
    scores = np.array([0.5, 0.5, 0.1, 0.9, 0.2, 0.3, 0.3, 0.3])
    # group 1: AUC 0.75 (one tie); group 2 has no negative; group 3: all tied -> 0.5
    assert grouped_auc(groups, labels, scores) == pytest.approx((0.75 * 3 + 0.5 * 3) / 6)
    assert np.isnan(grouped_auc(np.array([1, 1]), np.array([1, 1]), np.array([0.1, 0.2])))
