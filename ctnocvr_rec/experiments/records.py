"""Finished runs as records, and the CSV writer: what every experiment's report is built from.

A record is one finished run: its plan labels (arch, variant, seed, ...), its task AUCs from
``metrics.json`` and -- on synthetic data, given the ground-truth folder -- the oracle AUCs of the
true probabilities on the same rows and the run's gap to them (:mod:`oracle`). ``table3``,
``sweep``, ``compare`` and ``when_helps`` all read their runs through :func:`per_run_records`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from ctnocvr_rec import registry
from ctnocvr_rec.experiments import oracle as oracle_mod
from ctnocvr_rec.experiments.runs import (
    RunSpec,
    eval_split,
    is_finished,
    metric,
    read_metrics,
    read_predictions,
)
from ctnocvr_rec.experiments.spec import ExperimentConfig

TASK_METRICS = ("auc_cvr", "auc_ctr", "auc_ctcvr", "auc_ctnocvr")
TASK_TITLES = {"auc_cvr": "CVR", "auc_ctr": "CTR", "auc_ctcvr": "CTCVR", "auc_ctnocvr": "CTnoCVR"}
ARCH_TITLES = {name: spec.title for name, spec in registry.BACKBONES.items()}
#: the Base / +CTnoCVR pair of table3 and when_helps: (variant folder, use_ctnocvr, title)
VARIANTS = (("base", False, "Base"), ("ctnocvr", True, "+CTnoCVR"))
#: the p-value below which a report calls a paired difference significant
SIGNIFICANCE = 0.05


def find_ground_truth_dir(exp: ExperimentConfig, override: str = "") -> Path | None:
    """The sidecar folder: ``--ground-truth``, else the config's ``ground_truth``, else None."""
    chosen = override or exp.ground_truth
    if not chosen:
        return None
    path = Path(chosen)
    if not path.is_dir():
        raise FileNotFoundError(f"ground truth folder {path} does not exist")
    return path


def per_run_records(exp: ExperimentConfig, specs: list[RunSpec], gt_dir: Path | None) -> list[dict[str, Any]]:
    """One record per finished run: its labels, metrics, and (with ground truth) oracle AUCs."""
    root = exp.output_dir
    truth_cache: dict[Path, dict[str, np.ndarray]] = {}
    records = []
    for spec in specs:
        run_dir = spec.run_dir(root)
        if not is_finished(run_dir):
            continue
        data = read_metrics(run_dir)
        rec: dict[str, Any] = {**spec.labels, "run_dir": str(run_dir), "split": data.get("split", "")}
        for name in TASK_METRICS:
            rec[name] = metric(data, name)
        if gt_dir is not None:
            split = eval_split(data, run_dir)
            gt_file = oracle_mod.ground_truth_file(gt_dir, split)
            if gt_file not in truth_cache:
                truth_cache[gt_file] = oracle_mod.load_ground_truth(gt_file)
            preds = read_predictions(run_dir, split)
            truth = oracle_mod.join_ground_truth(
                preds["sample_id"], truth_cache[gt_file], source=str(gt_file)
            )
            for name, value in oracle_mod.oracle_aucs(
                preds["click"], preds["conversion"], truth["p_ctr"], truth["p_cvr"]
            ).items():
                rec[f"oracle_{name}"] = value
                rec[f"gap_{name}"] = rec[name] - value
        records.append(rec)
    return records


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """``rows`` as CSV with ``columns`` (default: every key, sorted); NaN is written as an empty cell."""
    columns = columns or sorted({k for r in rows for k in r})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k, "")) for k in columns})


def json_default(value: Any) -> Any:
    """``json.dump(default=...)`` of the experiment reports: numpy scalars as numbers, anything else
    unserialisable as its text (floats, NaN included, never reach here: json writes them itself)."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _csv_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value

