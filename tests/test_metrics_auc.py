import numpy as np
from sklearn.metrics import roc_auc_score

from ctnocvr_rec.train.metrics import roc_auc


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(5000) < 0.1
    s = np.round(rng.random(5000) + 0.3 * y, 2)  # rounding makes many ties
    assert abs(roc_auc(y, s) - roc_auc_score(y, s)) < 1e-12


def test_auc_hand_case_and_degenerate():
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.4, 0.45, 0.8])) == 0.75
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))
