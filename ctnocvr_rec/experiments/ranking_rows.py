"""The rows a ranking report compares: both runs' predictions on one split, item ids and the truth.

Both runs must score the same samples; rows are sorted by ``sample_id``. Items are the ground
truth's ``item_id`` when the synthetic sidecar exists, else the first mapped id of field ``205`` in
the prepared Parquet of the run's ``data.prepared_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from ctnocvr_rec.experiments import oracle as oracle_mod
from ctnocvr_rec.experiments.runs import eval_split, read_metrics, read_predictions
from ctnocvr_rec.yaml_strict import load_yaml_file

ITEM_FIELD = "205"


@dataclass
class EvalRows:
    """The evaluation rows, sorted by sample_id, shared by both runs."""

    sample_id: np.ndarray
    request_id: np.ndarray
    click: np.ndarray
    conversion: np.ndarray
    item: np.ndarray
    segment: np.ndarray | None  # planted segment (sidecar only)
    true_ctr: np.ndarray | None
    true_cvr: np.ndarray | None


def _sorted_predictions(run_dir: Path, split: str) -> dict[str, np.ndarray]:
    preds = read_predictions(run_dir, split)
    order = np.argsort(preds["sample_id"], kind="mergesort")
    return {k: v[order] for k, v in preds.items()}


def _prepared_dir_of(run_dir: Path) -> Path:
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        tree = load_yaml_file(cfg_path) or {}
    else:
        tree = read_metrics(run_dir).get("config") or {}
    prepared = (tree.get("data") or {}).get("prepared_dir")
    if not prepared:
        raise ValueError(f"{run_dir}: cannot find data.prepared_dir in config.yaml or metrics.json")
    return Path(prepared)


def item_ids_from_prepared(prepared_dir: Path, split: str, sample_ids: np.ndarray) -> np.ndarray:
    """The first mapped id of field 205 of every sample (``-1`` when the field is empty)."""
    split_dir = prepared_dir / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: prepared split folder missing (needed for item ids)")
    table = pads.dataset(str(split_dir), format="parquet").to_table(columns=["sample_id", ITEM_FIELD])
    ids = table.column("sample_id").to_numpy()
    lists = table.column(ITEM_FIELD).combine_chunks()
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy()
    lengths = np.diff(offsets)
    first = np.full(lengths.size, -1, dtype=np.int64)
    nonempty = lengths > 0
    first[nonempty] = values[offsets[:-1][nonempty]]
    order = np.argsort(ids, kind="mergesort")
    pos = np.searchsorted(ids[order], sample_ids)
    pos = np.minimum(pos, ids.size - 1)
    found = ids[order][pos] == sample_ids
    if not found.all():
        raise ValueError(f"{split_dir}: {int((~found).sum())} predicted sample_ids not in the prepared split")
    return first[order][pos].astype(np.int64)


def load_eval_rows(base_dir: Path, ctnocvr_dir: Path, split: str | None, gt_dir: Path | None):
    """Both runs' predictions on the same rows, plus item ids and (with a sidecar) the truth."""
    split = split or eval_split(read_metrics(base_dir), base_dir)
    before = _sorted_predictions(base_dir, split)
    after = _sorted_predictions(ctnocvr_dir, split)
    if before["sample_id"].size != after["sample_id"].size or not np.array_equal(
        before["sample_id"], after["sample_id"]
    ):
        raise ValueError(
            f"{base_dir} and {ctnocvr_dir}: predictions/{split}.parquet cover different samples "
            f"({before['sample_id'].size} vs {after['sample_id'].size} rows); both must score the same split"
        )
    segment = true_ctr = true_cvr = None
    if gt_dir is not None:
        gt_file = oracle_mod.ground_truth_file(gt_dir, split)
        truth = oracle_mod.join_ground_truth(
            before["sample_id"], oracle_mod.load_ground_truth(gt_file), str(gt_file)
        )
        item = truth["item_id"].astype(np.int64)
        segment, true_ctr, true_cvr = truth["segment"], truth["p_ctr"], truth["p_cvr"]
    else:
        item = item_ids_from_prepared(_prepared_dir_of(base_dir), split, before["sample_id"])
    rows = EvalRows(
        sample_id=before["sample_id"].astype(np.int64),
        request_id=before["request_id"].astype(np.int64),
        click=before["click"].astype(bool),
        conversion=before["conversion"].astype(bool),
        item=item,
        segment=segment,
        true_ctr=None if true_ctr is None else true_ctr.astype(np.float64),
        true_cvr=None if true_cvr is None else true_cvr.astype(np.float64),
    )
    return rows, before, after, split
