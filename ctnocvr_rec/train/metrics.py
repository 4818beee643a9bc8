"""Exact evaluation metrics (numpy): ROC AUC with ties, log-loss, calibration, GAUC.

These are exact over whatever arrays they are given; the distributed evaluation gathers every
rank's predictions first, so the figures cover the whole evaluation set (not a window).
"""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with average ranks for ties); NaN if one class is absent.

    Equals ``sklearn.metrics.roc_auc_score`` on the same inputs.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # average 1-based rank of each group of tied scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [scores.size]))
    avg_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(avg_rank, ends - starts)
    rank_sum_pos = ranks[labels].sum()
    return float((rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` (clipped to [eps, 1-eps]); NaN if empty."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    probs = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    if labels.size == 0:
        return float("nan")
    return float(-np.mean(labels * np.log(probs) + (1.0 - labels) * np.log1p(-probs)))


def calibration(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean prediction / mean label (1.0 = calibrated); NaN when there is no positive label."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if labels.size == 0 or labels.sum() == 0:
        return float("nan")
    return float(probs.mean() / labels.mean())


def grouped_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Group AUC (GAUC): per-group exact AUC averaged with weights = rows of the group.

    Groups with only one class carry no ranking information and are left out (the usual
    definition, e.g. the DIN paper's user-weighted AUC). Vectorised: one lexsort over
    ``(group, score)``, average ranks for ties inside a group, then per-group rank sums, so it is
    exact and runs in O(n log n) however many groups there are. NaN when no group has both classes.
    """
    groups = np.asarray(groups).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n = labels.size
    if n == 0:
        return float("nan")
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order]
    # start of each group in the sorted order, and of each run of equal (group, score)
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    new_group[1:] = g[1:] != g[:-1]
    new_tie = new_group.copy()
    new_tie[1:] |= s[1:] != s[:-1]
    tie_starts = np.flatnonzero(new_tie)
    tie_ends = np.append(tie_starts[1:], n)
    group_id = np.cumsum(new_group) - 1  # 0..G-1 per sorted row
    group_starts = np.flatnonzero(new_group)
    # 1-based rank inside the group, averaged over ties
    avg_pos = (tie_starts + tie_ends + 1) / 2.0
    ranks = np.repeat(avg_pos, tie_ends - tie_starts) - group_starts[group_id]
    n_groups = group_starts.size
    pos = np.bincount(group_id, weights=y, minlength=n_groups)
    size = np.bincount(group_id, minlength=n_groups).astype(np.float64)
    neg = size - pos
    rank_sum = np.bincount(group_id, weights=np.where(y, ranks, 0.0), minlength=n_groups)
    valid = (pos > 0) & (neg > 0)
    if not valid.any():
        return float("nan")
    auc = (rank_sum[valid] - pos[valid] * (pos[valid] + 1) / 2.0) / (pos[valid] * neg[valid])
    return float(np.average(auc, weights=size[valid]))


#: (task, label column, prediction column, rows) of the per-task metrics; rows "clicked" = click == 1
TASKS = (
    ("ctr", "click", "p_ctr", "all"),
    ("cvr", "conversion", "p_cvr", "clicked"),
    ("ctcvr", "conversion", "p_ctcvr", "all"),
    ("ctnocvr", "ctnocvr", "p_ctnocvr", "all"),
)


def task_metrics(columns: dict[str, np.ndarray], gauc: bool = True) -> dict[str, float]:
    """All evaluation metrics from whole-set columns.

    Args:
        columns: 1-D arrays of equal length ``N``: ``click, conversion, ctnocvr`` labels,
            ``p_ctr, p_cvr, p_ctcvr, p_ctnocvr`` probabilities and (for GAUC) ``user_id``.
            A missing prediction column skips that task.
        gauc: also compute the user-grouped CTR AUC (rows with ``user_id < 0`` are left out).

    Returns:
        ``auc_<task>``, ``logloss_<task>``, ``calib_<task>`` for every task present, ``gauc_ctr``,
        and the row counts ``rows``, ``clicked_rows``. CVR uses clicked rows only (the CVR label
        is only defined after a click); CTR, CTCVR and CTnoCVR use all rows.
    """
    click = np.asarray(columns["click"]) > 0.5
    out: dict[str, float] = {"rows": float(click.size), "clicked_rows": float(click.sum())}
    for task, label_key, pred_key, rows in TASKS:
        if pred_key not in columns:
            continue
        labels = np.asarray(columns[label_key])
        preds = np.asarray(columns[pred_key])
        if rows == "clicked":
            labels, preds = labels[click], preds[click]
        out[f"auc_{task}"] = roc_auc(labels, preds)
        out[f"logloss_{task}"] = log_loss(labels, preds)
        out[f"calib_{task}"] = calibration(labels, preds)
    if gauc and "user_id" in columns and "p_ctr" in columns:
        users = np.asarray(columns["user_id"])
        known = users >= 0
        out["gauc_ctr"] = grouped_auc(users[known], np.asarray(columns["click"])[known],
                                      np.asarray(columns["p_ctr"])[known])
    return out


def format_metrics_table(metrics: dict[str, float]) -> str:
    """A small text table: one row per task, columns AUC / log-loss / calibration."""
    lines = [f"{'task':<9} {'AUC':>8} {'logloss':>9} {'calib':>7}"]
    for task, _, _, rows in TASKS:
        if f"auc_{task}" not in metrics:
            continue
        note = " (clicked rows)" if rows == "clicked" else ""
        lines.append(
            f"{task:<9} {metrics[f'auc_{task}']:>8.4f} {metrics[f'logloss_{task}']:>9.4f} "
            f"{metrics[f'calib_{task}']:>7.3f}{note}"
        )
    if "gauc_ctr" in metrics:
        lines.append(f"{'gauc_ctr':<9} {metrics['gauc_ctr']:>8.4f}")
    return "\n".join(lines)
