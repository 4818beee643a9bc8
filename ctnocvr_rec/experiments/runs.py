"""Run folders of an experiment: planning, resumable execution with progress, and reading back.

A run folder is finished when its ``metrics.json`` exists (the trainer writes it last); finished
runs are never redone, so an interrupted ``table3`` or ``sweep`` continues where it stopped.
The trainer is reached only through the documented API
``ctnocvr_rec.train.api.train_and_evaluate(cfg, nproc) -> dict`` (imported lazily, so reports work
without torch); tests pass their own ``run_fn`` with the same signature.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ctnocvr_rec.config import RunConfig, save_config
from ctnocvr_rec.experiments.spec import ExperimentConfig, build_run_config

RunFn = Callable[[RunConfig, int], dict]

#: prediction columns the reports need (docs/design.md, run folder contract)
PREDICTION_COLUMNS = ("sample_id", "request_id", "click", "conversion", "p_ctr", "p_cvr", "p_ctcvr")


@dataclass
class RunSpec:
    """One planned training run: where it goes, what it changes, and how it is labelled."""

    rel_dir: str  # below the experiment's output folder
    settings: dict[str, Any]  # dotted RunConfig key -> value, applied over the base run tree
    labels: dict[str, Any] = field(default_factory=dict)  # arch, variant, seed, param, value

    def run_dir(self, root: Path) -> Path:
        return root / self.rel_dir


def seeded_settings(arch: str, use_ctnocvr: bool, seed: int, method: str | None = None) -> dict[str, Any]:
    """Settings shared by every experiment run.

    The seed drives both the initialisation (``train.seed``) and the data order
    (``data.shuffle_seed``), so Base and +CTnoCVR with the same seed form a proper pair.
    Predictions are always saved: the oracle and the ranking report read them. ``method`` sets
    ``model.method`` (None: the base config's).
    """
    settings: dict[str, Any] = {
        "model.arch": arch,
        "model.use_ctnocvr": use_ctnocvr,
        "train.seed": seed,
        "data.shuffle_seed": seed,
        "eval.save_predictions": True,
    }
    if method is not None:
        settings["model.method"] = method
    return settings


def default_run_fn(cfg: RunConfig, nproc: int) -> dict:
    from ctnocvr_rec.train.api import train_and_evaluate  # torch/torchrec only when training

    return train_and_evaluate(cfg, nproc=nproc)


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file()


def execute_runs(
    exp: ExperimentConfig,
    specs: list[RunSpec],
    run_fn: RunFn | None = None,
    nproc: int = 1,
    log: Callable[[str], None] | None = None,
) -> None:
    """Train every unfinished run of ``specs`` in order, printing progress and an ETA."""
    run_fn = run_fn or default_run_fn
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    root = exp.output_dir
    todo = [s for s in specs if not is_finished(s.run_dir(root))]
    log(f"[{exp.name}] {len(specs)} runs, {len(specs) - len(todo)} already finished, {len(todo)} to run")
    durations: list[float] = []
    for i, spec in enumerate(todo, 1):
        run_dir = spec.run_dir(root)
        cfg = build_run_config(exp, {**spec.settings, "train.run_dir": str(run_dir)})
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        start = time.perf_counter()
        result = run_fn(cfg, nproc)
        durations.append(time.perf_counter() - start)
        if not is_finished(run_dir):
            # the trainer contract says it writes metrics.json; keep the result if it did not
            _write_json(run_dir / "metrics.json", result)
        metrics = read_metrics(run_dir)["metrics"]
        eta = np.mean(durations) * (len(todo) - i)
        log(
            f"[{exp.name}] {i}/{len(todo)} {spec.rel_dir}: {durations[-1]:.0f} s, "
            f"CVR AUC {metrics.get('auc_cvr', float('nan')):.4f}, "
            f"CTR AUC {metrics.get('auc_ctr', float('nan')):.4f}; ETA {eta / 60:.1f} min"
        )


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``metrics.json`` (must hold a ``metrics`` mapping)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.json (run not finished?)")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise ValueError(f"{path}: expected an object with a 'metrics' mapping")
    return data


def metric(data: dict[str, Any], name: str) -> float:
    value = data["metrics"].get(name)
    return float(value) if value is not None else math.nan


def eval_split(data: dict[str, Any], run_dir: str | Path) -> str:
    """The split the run was evaluated on: ``metrics.json["split"]``, else the only predictions file."""
    split = data.get("split")
    if split:
        return str(split)
    files = sorted((Path(run_dir) / "predictions").glob("*.parquet"))
    if len(files) == 1:
        return files[0].stem
    raise ValueError(f"{run_dir}/metrics.json: no 'split' and {len(files)} prediction files")


def read_predictions(
    run_dir: str | Path, split: str, columns: tuple[str, ...] = PREDICTION_COLUMNS
) -> dict[str, np.ndarray]:
    """Columns of ``<run_dir>/predictions/<split>.parquet`` (a file or a folder of parts) as arrays."""
    path = Path(run_dir) / "predictions" / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no predictions (was eval.save_predictions on?)")
    table = pq.read_table(path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    return {c: table.column(c).to_numpy() for c in columns}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
    tmp.replace(path)
