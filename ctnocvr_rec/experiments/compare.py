"""`ctnocvr experiment compare`: CVR methods x backbones x {without, with} CTnoCVR x seeds, on equal terms.

Every run shares the experiment's base run config (data, sizes, steps, optimiser); only
``model.arch``, ``model.method``, ``model.use_ctnocvr`` and the seed differ, and the seed fixes both
the initialisation and the data order, so runs with the same seed form pairs. Runs are seed-major
(an interrupted experiment has every variant at some seeds) and resumable (a run folder with a
``metrics.json`` is never redone).

Per arch and variant the aggregate holds the mean and sample std over seeds of every task AUC (CVR
on clicked rows), on synthetic data the oracle gap and the ranking shift (:mod:`exposure`: clickbait
and gem share and true pCTCVR of each request's top-k by the run's score), and three paired comparisons of the CVR AUC:
against ``base``, against the paper's ``+CTnoCVR`` (``ctnocvr``), and -- for a method run with the
flag -- against the same method without it ("does CTnoCVR add anything on top of ESCM²/DCMT?").
Writes ``compare.csv``, ``compare_runs.csv``, ``compare.json``, ``compare.md`` and ``compare.png``
(the last two by :mod:`compare_report`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ctnocvr_rec import registry
from ctnocvr_rec.config import ConfigError
from ctnocvr_rec.experiments import oracle as oracle_mod
from ctnocvr_rec.experiments.compare_report import plot_compare, render_compare_markdown
from ctnocvr_rec.experiments.exposure import EXPOSURE_KEYS, exposure_metrics
from ctnocvr_rec.experiments.ranking import SCORES
from ctnocvr_rec.experiments.records import (
    TASK_METRICS,
    find_ground_truth_dir,
    json_default,
    per_run_records,
    write_csv,
)
from ctnocvr_rec.experiments.runs import (
    RunFn,
    RunSpec,
    eval_split,
    execute_runs,
    read_predictions,
    seeded_settings,
)
from ctnocvr_rec.experiments.spec import ExperimentConfig, build_run_config, validate_names
from ctnocvr_rec.experiments.stats import mean_std, paired_comparison

#: the paired comparisons: key -> (reference variant of a row, or None = the row's own plain method)
REFERENCES: dict[str, str | None] = {"base": "base", "ctnocvr": "ctnocvr", "plain": None}


def variants(exp: ExperimentConfig) -> list[tuple[str, bool]]:
    """(method, use_ctnocvr) pairs in table order: methods as configured, each without then with."""
    return [(m, flag) for m in exp.compare.methods for flag in sorted(set(exp.compare.ctnocvr))]


def plan_compare(exp: ExperimentConfig) -> list[RunSpec]:
    specs = []
    for seed in exp.compare.seeds:
        for arch in exp.compare.archs:
            for method, flag in variants(exp):
                name = registry.variant_name(method, flag)
                specs.append(RunSpec(
                    rel_dir=f"compare/{arch}/{name}/seed{seed}",
                    settings=seeded_settings(arch, flag, seed, method=method),
                    labels={"arch": arch, "method": method, "ctnocvr": flag, "variant": name, "seed": seed},
                ))
    return specs


def reference_of(variant: str, method: str, flag: bool, key: str) -> str | None:
    """The variant a row is compared with under ``key`` (None: no such comparison for this row)."""
    target = REFERENCES[key]
    if target is None:  # +CTnoCVR on top of a method: compare with the method alone
        target = registry.variant_name(method, False) if flag and method != "base" else None
    return None if target is None or target == variant else target


def aggregate_compare(records: list[dict[str, Any]], exp: ExperimentConfig) -> list[dict[str, Any]]:
    """One row per (arch, variant): means/stds over seeds and the paired CVR AUC comparisons."""
    rows = []
    for arch in exp.compare.archs:
        by_variant: dict[str, dict[int, dict[str, Any]]] = {}
        for rec in records:
            if rec["arch"] == arch:
                by_variant.setdefault(rec["variant"], {})[rec["seed"]] = rec
        for method, flag in variants(exp):
            name = registry.variant_name(method, flag)
            runs = by_variant.get(name, {})
            recs = [runs[s] for s in sorted(runs)]
            row: dict[str, Any] = {
                "arch": arch, "arch_title": registry.BACKBONES[arch].title, "method": method, "ctnocvr": flag,
                "variant": name, "title": registry.variant_title(method, flag), "n_seeds": len(recs),
            }
            for key in sorted({k for r in recs for k in r if k.startswith(("auc_", "oracle_", "gap_", "topk_"))}):
                row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in recs])
            for key in REFERENCES:
                ref = reference_of(name, method, flag, key)
                if ref is None or ref not in by_variant:
                    continue
                seeds = sorted(set(runs) & set(by_variant[ref]))
                if not seeds:
                    continue
                test = paired_comparison([by_variant[ref][s]["auc_cvr"] for s in seeds],
                                         [runs[s]["auc_cvr"] for s in seeds])
                row.update({f"vs_{key}": ref, f"vs_{key}_pairs": test.n, f"vs_{key}_diff": test.mean_diff,
                            f"vs_{key}_p_t": test.p_t, f"vs_{key}_p_sign_flip": test.p_sign_flip,
                            f"vs_{key}_wins": test.wins})
            rows.append(row)
    return rows


CSV_COLUMNS = [
    "arch", "variant", "method", "ctnocvr", "n_seeds",
    *[f"{m}_{s}" for m in TASK_METRICS for s in ("mean", "std")],
    *[f"vs_{k}_{f}" for k in REFERENCES for f in ("pairs", "diff", "p_t", "p_sign_flip", "wins")],
    "oracle_auc_cvr_mean", "gap_auc_cvr_mean", "gap_auc_cvr_std",
    *[f"{k}_{s}" for k in EXPOSURE_KEYS for s in ("mean", "std")],
]  # fmt: skip


def add_exposure_metrics(records: list[dict[str, Any]], gt_dir: Path, top_k: int, score: str) -> None:
    """Adds the ranking-shift figures (:mod:`exposure`) to every record, in place."""
    truth_cache: dict[Path, dict[str, np.ndarray]] = {}
    for rec in records:
        split = eval_split({"split": rec.get("split")}, rec["run_dir"])
        gt_file = oracle_mod.ground_truth_file(gt_dir, split)
        if gt_file not in truth_cache:
            truth_cache[gt_file] = oracle_mod.load_ground_truth(gt_file)
        preds = read_predictions(rec["run_dir"], split)
        truth = oracle_mod.join_ground_truth(preds["sample_id"], truth_cache[gt_file], source=str(gt_file))
        rec.update(exposure_metrics(preds, truth, top_k, score))


def run_compare(
    exp: ExperimentConfig,
    run_fn: RunFn | None = None,
    nproc: int = 1,
    gt_dir: str = "",
    report_only: bool = False,
    command: str = "",
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train the missing runs (unless ``report_only``), then write the tables and the plot; returns compare.md."""
    validate_names(exp)
    if exp.compare.score not in SCORES or exp.compare.top_k < 1:
        raise ConfigError(f"{exp.source}: compare.score must be one of {list(SCORES)} and compare.top_k >= 1, "
                          f"got {exp.compare.score!r}, {exp.compare.top_k}")
    specs = plan_compare(exp)
    build_run_config(exp, {})
    for spec in specs:  # a bad method/section setting fails here, before any training
        build_run_config(exp, spec.settings)
    if not report_only:
        execute_runs(exp, specs, run_fn=run_fn, nproc=nproc, log=log)
    truth_dir = find_ground_truth_dir(exp, gt_dir)
    records = per_run_records(exp, specs, truth_dir)
    if not records:
        raise FileNotFoundError(f"{exp.output_dir}/compare: no finished runs")
    if truth_dir is not None:
        add_exposure_metrics(records, truth_dir, exp.compare.top_k, exp.compare.score)
    rows = aggregate_compare(records, exp)
    out = exp.output_dir
    write_csv(out / "compare.csv", rows, CSV_COLUMNS)
    run_columns = ["arch", "variant", "method", "ctnocvr", "seed", "split", *TASK_METRICS]
    run_columns += sorted({k for r in records for k in r if k.startswith(("oracle_", "gap_", "topk_"))})
    run_columns.append("run_dir")
    write_csv(out / "compare_runs.csv", records, run_columns)
    with open(out / "compare.json", "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "runs": records}, f, indent=2, default=json_default)
    plot_compare(rows, out / "compare.png", exp.name)
    md = render_compare_markdown(rows, records, exp.name, command, exp.compare.top_k, exp.compare.score)
    (out / "compare.md").write_text(md, encoding="utf-8")
    return out / "compare.md"

