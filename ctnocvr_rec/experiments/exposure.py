"""Ranking shift of one run on synthetic data: what its scores expose in the top-k of each request.

Every request's candidates are ranked by the run's score (default pCTCVR, ties by sample id) and the
first ``top_k`` are "exposed". With the synthetic ground truth joined on ``sample_id`` this gives

* ``topk_clickbait_share`` / ``topk_gem_share``: the share of exposures that are planted clickbait
  (high CTR, low CVR) / hidden-gem (low CTR, high CVR) items;
* ``topk_true_ctcvr``: the mean TRUE pCTR·pCVR of the exposures, i.e. the expected conversions per
  exposure the ranking buys (the oracle ranking maximises it).
"""

from __future__ import annotations

import numpy as np

from ctnocvr_rec.experiments.ranking import rank_within_requests, ranking_score

EXPOSURE_KEYS = ("topk_clickbait_share", "topk_gem_share", "topk_true_ctcvr")


def exposure_metrics(preds: dict[str, np.ndarray], truth: dict[str, np.ndarray], top_k: int,
                     score: str = "pctcvr") -> dict[str, float]:
    """``preds`` (``sample_id, request_id, p_ctr, p_cvr, p_ctcvr``) and ``truth`` rows in the same order
    (``segment, p_ctr, p_cvr``) -> the :data:`EXPOSURE_KEYS` of the top ``top_k`` per request."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    ranks = rank_within_requests(np.asarray(preds["request_id"]), ranking_score(preds, score),
                                 np.asarray(preds["sample_id"]))
    exposed = ranks < top_k
    segment = np.asarray(truth["segment"]).astype(str)[exposed]
    value = (np.asarray(truth["p_ctr"], dtype=np.float64) * np.asarray(truth["p_cvr"], dtype=np.float64))[exposed]
    return {
        "topk_clickbait_share": float(np.mean(segment == "clickbait")),
        "topk_gem_share": float(np.mean(segment == "gem")),
        "topk_true_ctcvr": float(value.mean()),
    }
