"""`ctnocvr experiment sweep`: one-at-a-time hyper-parameter sweeps like the paper's Fig. 3.

Each grid key (a dotted RunConfig key, e.g. ``model.loss_weight_cvr``) is varied on its own around
the experiment's base run config, for every arch and seed (``use_ctnocvr`` as configured; the paper
sweeps the +CTnoCVR models). Writes ``sweep_runs.csv`` (one row per run), ``sweep.csv`` (mean and
sample std over seeds per key, arch and value) and ``sweep_<key>.png``: the CVR AUC against the
value, one line per arch with a mean ± std band, values equally spaced as in Fig. 3.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ctnocvr_rec.experiments.records import ARCH_TITLES, TASK_METRICS, per_run_records, write_csv
from ctnocvr_rec.experiments.runs import RunFn, RunSpec, execute_runs, seeded_settings
from ctnocvr_rec.experiments.spec import ExperimentConfig, build_run_config
from ctnocvr_rec.experiments.stats import mean_std


def _value_label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plan_sweep(exp: ExperimentConfig) -> list[RunSpec]:
    specs = []
    for key, values in exp.sweep.grids.items():
        for seed in exp.sweep.seeds:
            for arch in exp.sweep.archs:
                for value in values:
                    settings = seeded_settings(arch, exp.sweep.use_ctnocvr, seed)
                    settings[key] = value
                    specs.append(
                        RunSpec(
                            rel_dir=f"sweep/{key}/{arch}/{_value_label(value)}/seed{seed}",
                            settings=settings,
                            labels={"param": key, "arch": arch, "value": value, "seed": seed},
                        )
                    )
    return specs


def aggregate_sweep(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(r["param"], r["arch"], r["value"]) for r in records}, key=lambda k: (k[0], k[1], k[2]))
    for param, arch, value in keys:
        recs = [r for r in records if (r["param"], r["arch"], r["value"]) == (param, arch, value)]
        row: dict[str, Any] = {"param": param, "arch": arch, "value": value, "n_seeds": len(recs)}
        for name in TASK_METRICS:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([r[name] for r in recs])
        rows.append(row)
    return rows


def plot_sweep(rows: list[dict[str, Any]], param: str, values: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    positions = np.arange(len(values))
    for arch in sorted({r["arch"] for r in rows if r["param"] == param}):
        by_value = {r["value"]: r for r in rows if r["param"] == param and r["arch"] == arch}
        mean = np.array([100 * by_value[v]["auc_cvr_mean"] if v in by_value else math.nan for v in values])
        std = np.array([100 * by_value[v]["auc_cvr_std"] if v in by_value else math.nan for v in values])
        (line,) = ax.plot(positions, mean, marker="o", label=f"{ARCH_TITLES.get(arch, arch)} +CTnoCVR")
        ax.fill_between(positions, mean - std, mean + std, alpha=0.2, color=line.get_color())
    ax.set_xticks(positions, [_value_label(v) for v in values])
    ax.set_xlabel(param)
    ax.set_ylabel("CVR AUC (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_sweep(
    exp: ExperimentConfig,
    run_fn: RunFn | None = None,
    nproc: int = 1,
    report_only: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train the missing sweep runs (unless ``report_only``), write CSVs and plots; returns sweep.csv."""
    specs = plan_sweep(exp)
    build_run_config(exp, {})
    if not report_only:
        execute_runs(exp, specs, run_fn=run_fn, nproc=nproc, log=log)
    records = per_run_records(exp, specs, gt_dir=None)
    if not records:
        raise FileNotFoundError(f"{exp.output_dir}/sweep: no finished runs")
    out = exp.output_dir
    write_csv(out / "sweep_runs.csv", records, ["param", "arch", "value", "seed", *TASK_METRICS, "run_dir"])
    rows = aggregate_sweep(records)
    columns = ["param", "arch", "value", "n_seeds"] + [
        f"{m}_{s}" for m in TASK_METRICS for s in ("mean", "std")
    ]
    write_csv(out / "sweep.csv", rows, columns)
    for param, values in exp.sweep.grids.items():
        plot_sweep(rows, param, list(values), out / f"sweep_{param}.png", f"{exp.name}: {param}")
    return out / "sweep.csv"
