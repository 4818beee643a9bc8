"""The synthetic data's ground truth: the true probabilities joined to a run's predictions.

``ctnocvr data synth`` writes ``ground_truth_{train,test}.parquet`` next to the raw files, one row
per impression: ``sample_id, item_id, segment (normal|clickbait|gem), p_ctr, p_cvr``. The oracle
AUCs are the AUCs the true probabilities reach on the same rows and labels a model is scored on
(the ceiling a perfect model approaches, below 1 because labels are Bernoulli draws):

* CTR:     ``p_ctr`` against click, all rows;
* CVR:     ``p_cvr`` against conversion, clicked rows only (the paper's CVR AUC);
* CTCVR:   ``p_ctr * p_cvr`` against conversion, all rows;
* CTnoCVR: ``p_ctr * (1 - p_cvr)`` against click-and-no-conversion, all rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ctnocvr_rec.train.metrics import roc_auc

GROUND_TRUTH_COLUMNS = ("sample_id", "item_id", "segment", "p_ctr", "p_cvr")


def ground_truth_file(gt_dir: str | Path, split: str) -> Path:
    """``ground_truth_<split>.parquet``; the valid split is carved from train, so it falls back there."""
    gt_dir = Path(gt_dir)
    direct = gt_dir / f"ground_truth_{split}.parquet"
    if direct.exists():
        return direct
    fallback = gt_dir / ("ground_truth_test.parquet" if split == "test" else "ground_truth_train.parquet")
    if fallback.exists():
        return fallback
    raise FileNotFoundError(f"{gt_dir}: no ground_truth_{split}.parquet (nor {fallback.name})")


def load_ground_truth(path: str | Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    missing = [c for c in GROUND_TRUTH_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    out = {c: table.column(c).to_numpy(zero_copy_only=False) for c in GROUND_TRUTH_COLUMNS}
    out["segment"] = np.asarray(out["segment"]).astype(str)
    return out


def join_ground_truth(
    sample_ids: np.ndarray, truth: dict[str, np.ndarray], source: str = ""
) -> dict[str, np.ndarray]:
    """The truth rows for ``sample_ids`` in their order; every id must be present (else an error)."""
    truth_ids = np.asarray(truth["sample_id"], dtype=np.int64)
    order = np.argsort(truth_ids, kind="mergesort")
    sorted_ids = truth_ids[order]
    if sorted_ids.size > 1 and np.any(sorted_ids[1:] == sorted_ids[:-1]):
        dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0]
        raise ValueError(f"{source}: sample_id {dup} appears more than once in the ground truth")
    wanted = np.asarray(sample_ids, dtype=np.int64)
    pos = np.searchsorted(sorted_ids, wanted)
    pos_clipped = np.minimum(pos, sorted_ids.size - 1)
    found = (pos < sorted_ids.size) & (sorted_ids[pos_clipped] == wanted)
    if not found.all():
        first = int(wanted[~found][0])
        raise ValueError(
            f"{source}: {int((~found).sum())} of {wanted.size} predicted sample_ids are not in the ground "
            f"truth (first: {first}); is it the sidecar of the evaluated split?"
        )
    rows = order[pos_clipped]
    return {k: np.asarray(v)[rows] for k, v in truth.items()}


def oracle_aucs(
    click: np.ndarray, conversion: np.ndarray, p_ctr: np.ndarray, p_cvr: np.ndarray
) -> dict[str, float]:
    """AUCs of the true probabilities on these rows (keys like the trainer's: ``auc_ctr`` ...)."""
    click = np.asarray(click).astype(bool)
    conversion = np.asarray(conversion).astype(bool)
    p_ctr = np.asarray(p_ctr, dtype=np.float64)
    p_cvr = np.asarray(p_cvr, dtype=np.float64)
    return {
        "auc_ctr": roc_auc(click, p_ctr),
        "auc_cvr": roc_auc(conversion[click], p_cvr[click]),
        "auc_ctcvr": roc_auc(conversion, p_ctr * p_cvr),
        "auc_ctnocvr": roc_auc(click & ~conversion, p_ctr * (1.0 - p_cvr)),
    }
