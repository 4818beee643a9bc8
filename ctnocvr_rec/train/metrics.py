"""Exact evaluation metrics (numpy): ROC AUC with ties, log-loss, calibration, GAUC.

These are exact over whatever arrays they are given; the distributed evaluation gathers every
rank's predictions first, so the figures cover the whole evaluation set (not a window).
"""

from __future__ import annotations

import numpy as np


def _tie_runs(sorted_scores: np.ndarray, breaks: np.ndarray | None = None) -> np.ndarray:
    """Start of every run of equal values in ``sorted_scores`` ``[n]`` (n >= 1), int64 ``[runs]``;
    ``breaks`` (bool ``[n]``, optional, consumed): positions that start a run anyway (a new group)."""
    new = np.empty(sorted_scores.size, dtype=bool) if breaks is None else breaks
    if breaks is None:
        new[0] = True
        np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=new[1:])
    else:
        new[1:] |= sorted_scores[1:] != sorted_scores[:-1]
    return np.flatnonzero(new)


def _twice_rank_sums(starts: np.ndarray, positives: np.ndarray, n: int) -> np.ndarray:
    """``2 x`` the 1-based average rank of each run times its positives, int64 ``[runs]`` (exact):
    a run ``[start, end)`` of tied scores has average rank ``(start + end + 1) / 2``."""
    twice = np.empty_like(starts)
    twice[:-1] = starts[1:]
    twice[-1] = n
    twice += starts
    twice += 1
    twice *= positives
    return twice


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with average ranks for ties); NaN if one class is absent.

    Equals ``sklearn.metrics.roc_auc_score`` on the same inputs. The rank sum of the positives is
    taken per run of tied scores in integer arithmetic (``2 x`` average rank x positives of the run),
    so it is exact and needs ~20 B of temporaries per row (one sort order, the sorted scores and
    labels, the run starts) rather than a float rank for every row: the evaluation runs this over
    every row of a test split at once.
    """
    positive = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores).ravel()
    if scores.dtype.kind != "f":  # floats sort as they are (float32 -> float64 keeps order and ties)
        scores = scores.astype(np.float64)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    positive = positive[order]
    del order
    starts = _tie_runs(sorted_scores)
    del sorted_scores
    twice = _twice_rank_sums(starts, np.add.reduceat(positive, starts, dtype=np.int64), positive.size)
    rank_sum_pos = int(twice.sum()) / 2.0
    return float((rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` (clipped to [eps, 1-eps]); NaN if empty.

    Computed in place on one float64 copy of ``probs`` plus one result array (16 B per row, not a
    float64 temporary per operation): the evaluation runs it over every row of a test split.
    """
    labels = np.asarray(labels).ravel()
    probs = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    if labels.size == 0:
        return float("nan")
    if labels.dtype.kind not in "bi":  # signed integers or bools need no float copy; others do
        labels = labels.astype(np.float64)
    loss = np.log(probs)
    loss *= labels
    np.negative(probs, out=probs)
    np.log1p(probs, out=probs)
    probs *= 1 - labels
    loss += probs
    return float(-np.mean(loss))


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
    ``(group, score)``, then per run of equal ``(group, score)`` its positives and ``2 x`` its average
    rank inside the group (integers, as in :func:`roc_auc`), summed per group. Exact, O(n log n)
    however many groups there are, ~30 B of temporaries per row. NaN when no group has both classes.
    """
    groups = np.asarray(groups).ravel()
    positive = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores).ravel()
    if scores.dtype.kind != "f":
        scores = scores.astype(np.float64)
    n = positive.size
    if n == 0:
        return float("nan")
    order = np.lexsort((scores, groups))
    sorted_groups = groups[order]
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(sorted_groups[1:], sorted_groups[:-1], out=new_group[1:])
    del sorted_groups
    group_starts = np.flatnonzero(new_group)  # [G] row of each group's first element
    sorted_scores = scores[order]
    positive = positive[order]
    del order
    # runs of equal (group, score): a new group always starts a run
    run_starts = _tie_runs(sorted_scores, breaks=new_group)
    del sorted_scores, new_group
    run_positives = np.add.reduceat(positive, run_starts, dtype=np.int64)
    del positive
    # 2 x average rank inside the group = 2 x global average rank - 2 x the group's start
    twice = _twice_rank_sums(run_starts, run_positives, n)
    first_run = np.searchsorted(run_starts, group_starts)  # [G] index of each group's first run
    group_of_run = np.repeat(np.arange(group_starts.size), np.diff(np.append(first_run, run_starts.size)))
    twice -= 2 * group_starts[group_of_run] * run_positives
    del group_of_run
    rank_sum2 = np.add.reduceat(twice, first_run)
    pos = np.add.reduceat(run_positives, first_run)
    del twice, run_positives, run_starts
    size = np.diff(np.append(group_starts, n))
    neg = size - pos
    valid = (pos > 0) & (neg > 0)
    if not valid.any():
        return float("nan")
    pos, neg = pos[valid].astype(np.float64), neg[valid].astype(np.float64)
    auc = (rank_sum2[valid] / 2.0 - pos * (pos + 1) / 2.0) / (pos * neg)
    return float(np.average(auc, weights=size[valid].astype(np.float64)))


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
        users, clicks, scores = (np.asarray(columns[k]) for k in ("user_id", "click", "p_ctr"))
        known = users >= 0
        if not known.all():  # (no copies of the whole split's columns when every user is known)
            users, clicks, scores = users[known], clicks[known], scores[known]
        out["gauc_ctr"] = grouped_auc(users, clicks, scores)
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
