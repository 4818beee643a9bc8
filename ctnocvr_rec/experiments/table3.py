"""`ctnocvr experiment table3`: the paper's Table 3 (CVR AUC, Base vs +CTnoCVR) over seeds.

Runs every arch x {Base, +CTnoCVR} x seed (seed-major order, so an interrupted experiment still has
every model at some seeds), then aggregates the finished runs' ``metrics.json`` into
``table3.csv`` / ``table3.md`` / ``table3_runs.csv``: mean +- sample std over seeds of the CVR AUC
(clicked rows), absolute (AUC points) and relative improvement, a paired t-test and an exact
sign-flip test across seeds, the CTR / CTCVR / CTnoCVR AUCs, and -- when the synthetic ground truth
exists -- the oracle AUCs of the true probabilities on the same rows and each model's gap to them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctnocvr_rec.experiments.records import (
    ARCH_TITLES,
    SIGNIFICANCE,
    TASK_METRICS,
    TASK_TITLES,
    VARIANTS,
    find_ground_truth_dir,
    json_default,
    per_run_records,
    write_csv,
)
from ctnocvr_rec.experiments.runs import RunFn, RunSpec, execute_runs, seeded_settings
from ctnocvr_rec.experiments.spec import ExperimentConfig, build_run_config
from ctnocvr_rec.experiments.stats import mean_std, paired_comparison


def plan_table3(exp: ExperimentConfig) -> list[RunSpec]:
    specs = []
    for seed in exp.table3.seeds:
        for arch in exp.table3.archs:
            for variant, use_ctnocvr, _ in VARIANTS:
                specs.append(
                    RunSpec(
                        rel_dir=f"table3/{arch}/{variant}/seed{seed}",
                        settings=seeded_settings(arch, use_ctnocvr, seed),
                        labels={"arch": arch, "variant": variant, "seed": seed},
                    )
                )
    return specs


@dataclass
class ArchSummary:
    arch: str
    rows: dict[str, dict[str, Any]]  # variant -> aggregated row
    seeds_paired: list[int]


def aggregate(records: list[dict[str, Any]], archs: list[str]) -> list[ArchSummary]:
    """Per arch: per-variant mean/std over seeds, and the paired comparison on seeds run by both."""
    out = []
    for arch in archs:
        by_variant = {
            v: {r["seed"]: r for r in records if r["arch"] == arch and r["variant"] == v}
            for v, _, _ in VARIANTS
        }
        paired = sorted(set(by_variant["base"]) & set(by_variant["ctnocvr"]))
        rows: dict[str, dict[str, Any]] = {}
        for variant, _, title in VARIANTS:
            recs = [by_variant[variant][s] for s in sorted(by_variant[variant])]
            row: dict[str, Any] = {
                "model": ARCH_TITLES.get(arch, arch),
                "arch": arch,
                "variant": title,
                "n_seeds": len(recs),
            }
            for key in [k for k in (recs[0] if recs else {}) if k.startswith(("auc_", "oracle_", "gap_"))]:
                row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in recs])
            rows[variant] = row
        if paired:
            before = [by_variant["base"][s]["auc_cvr"] for s in paired]
            after = [by_variant["ctnocvr"][s]["auc_cvr"] for s in paired]
            test = paired_comparison(before, after)
            base_mean = float(np.mean(before))
            rows["ctnocvr"].update(
                paired_seeds=len(paired),
                abs_improvement=test.mean_diff,
                rel_improvement=test.mean_diff / base_mean if base_mean else math.nan,
                t=test.t,
                p_paired_t=test.p_t,
                p_sign_flip=test.p_sign_flip,
                wins=test.wins,
            )
            for name in TASK_METRICS[1:]:  # the other tasks: paired difference and t-test p
                other = paired_comparison(
                    [by_variant["base"][s][name] for s in paired],
                    [by_variant["ctnocvr"][s][name] for s in paired],
                )
                rows["ctnocvr"][f"diff_{name}"] = other.mean_diff
                rows["ctnocvr"][f"p_paired_t_{name}"] = other.p_t
        out.append(ArchSummary(arch=arch, rows=rows, seeds_paired=paired))
    return out


CSV_COLUMNS = [
    "model", "arch", "variant", "n_seeds",
    "auc_cvr_mean", "auc_cvr_std", "paired_seeds", "abs_improvement", "rel_improvement", "t", "p_paired_t",
    "p_sign_flip", "wins",
    "auc_ctr_mean", "auc_ctr_std", "auc_ctcvr_mean", "auc_ctcvr_std", "auc_ctnocvr_mean", "auc_ctnocvr_std",
    "oracle_auc_cvr_mean", "gap_auc_cvr_mean", "gap_auc_cvr_std",
    "oracle_auc_ctr_mean", "gap_auc_ctr_mean", "oracle_auc_ctcvr_mean", "gap_auc_ctcvr_mean",
    "oracle_auc_ctnocvr_mean", "gap_auc_ctnocvr_mean",
    "diff_auc_ctr", "p_paired_t_auc_ctr", "diff_auc_ctcvr", "p_paired_t_auc_ctcvr",
    "diff_auc_ctnocvr", "p_paired_t_auc_ctnocvr",
]  # fmt: skip


def _pct(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def _pm(row: dict[str, Any], key: str) -> str:
    mean, std = row.get(f"{key}_mean", math.nan), row.get(f"{key}_std", math.nan)
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _p(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3g}" if value >= 0.001 else f"{value:.1e}"


def verdict(row: dict[str, Any]) -> str:
    """One plain sentence on whether +CTnoCVR helped this model's CVR AUC."""
    model = row["model"]
    if "abs_improvement" not in row:
        return f"{model}: no seed finished for both Base and +CTnoCVR yet."
    diff, p, wins, n = row["abs_improvement"], row["p_paired_t"], row["wins"], row["paired_seeds"]
    change = f"{100 * diff:+.2f} AUC points ({100 * row['rel_improvement']:+.2f}%), better on {wins}/{n} seeds, paired t p = {_p(p)}"
    if n < 2 or math.isnan(p):
        return f"{model}: {change} -- too few seeds to test."
    if diff > 0 and p < SIGNIFICANCE:
        return f"{model}: +CTnoCVR helped: {change}."
    if diff < 0 and p < SIGNIFICANCE:
        return f"{model}: +CTnoCVR HURT the CVR AUC: {change}."
    direction = "higher" if diff > 0 else "lower"
    return f"{model}: +CTnoCVR did NOT help significantly ({direction} on average, not significant at {SIGNIFICANCE}): {change}."


def render_markdown(
    summaries: list[ArchSummary], records: list[dict[str, Any]], title: str, command: str
) -> str:
    has_oracle = any("oracle_auc_cvr" in r for r in records)
    lines = [f"# Table 3 -- {title}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    header = ["Model", "", "CVR AUC (%)", "Abs.", "Rel.", "p (paired t)", "p (sign-flip)", "wins",
              "CTR AUC (%)", "CTCVR AUC (%)", "CTnoCVR AUC (%)"]  # fmt: skip
    if has_oracle:
        header.append("CVR gap to oracle")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for summary in summaries:
        for variant, _, _ in VARIANTS:
            row = summary.rows[variant]
            improved = variant == "ctnocvr" and "abs_improvement" in row
            cells = [
                row["model"] if variant == "base" else "",
                f"{row['variant']} (n={row['n_seeds']})",
                _pm(row, "auc_cvr"),
                f"{100 * row['abs_improvement']:+.2f}" if improved else "-",
                f"{100 * row['rel_improvement']:+.2f}%" if improved else "-",
                _p(row["p_paired_t"]) if improved else "-",
                _p(row["p_sign_flip"]) if improved else "-",
                f"{row['wins']}/{row['paired_seeds']}" if improved else "-",
                _pm(row, "auc_ctr"),
                _pm(row, "auc_ctcvr"),
                _pm(row, "auc_ctnocvr"),
            ]
            if has_oracle:
                cells.append(_pm(row, "gap_auc_cvr"))
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "AUCs in %, mean ± sample std over seeds; Abs. = mean paired difference in AUC points, Rel. = Abs. / "
        "Base mean. p-values are two-sided over the paired seeds (same seed = same initialisation and data "
        "order): paired Student t-test (t CDF computed in closed form) and exact sign-flip permutation test "
        "(smallest attainable p = 2/2^n). CVR AUC on clicked rows, the other AUCs on all rows."
    )
    if has_oracle:
        orc = {k: np.nanmean([r[f"oracle_{k}"] for r in records]) for k in TASK_METRICS}
        lines += [
            "",
            "Oracle (true probabilities of the synthetic data on the same rows): "
            + ", ".join(f"{TASK_TITLES[k]} AUC {_pct(v)}%" for k, v in orc.items())
            + ". Gap = model AUC - oracle AUC (AUC points x 100 above).",
        ]
    lines += [
        "",
        "Other tasks, +CTnoCVR minus Base (mean paired difference in AUC points, paired t-test p):",
        "",
        "| Model | CTR | CTCVR | CTnoCVR |",
        "|---|---|---|---|",
    ]
    for summary in summaries:
        row = summary.rows["ctnocvr"]
        if "diff_auc_ctr" in row:
            cells = [
                f"{100 * row[f'diff_{m}']:+.2f} (p={_p(row[f'p_paired_t_{m}'])})" for m in TASK_METRICS[1:]
            ]
            lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines += ["", "## Summary", ""]
    lines += [f"- {verdict(s.rows['ctnocvr'])}" for s in summaries]
    lines.append("")
    return "\n".join(lines)


def run_table3(
    exp: ExperimentConfig,
    run_fn: RunFn | None = None,
    nproc: int = 1,
    gt_dir: str = "",
    report_only: bool = False,
    command: str = "",
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train what is missing (unless ``report_only``), then write the tables; returns table3.md."""
    specs = plan_table3(exp)
    build_run_config(exp, {})
    if not report_only:
        execute_runs(exp, specs, run_fn=run_fn, nproc=nproc, log=log)
    records = per_run_records(exp, specs, find_ground_truth_dir(exp, gt_dir))
    if not records:
        raise FileNotFoundError(f"{exp.output_dir}/table3: no finished runs")
    summaries = aggregate(records, exp.table3.archs)
    out = exp.output_dir
    rows = [s.rows[v] for s in summaries for v, _, _ in VARIANTS]
    write_csv(out / "table3.csv", rows, CSV_COLUMNS)
    run_columns = ["arch", "variant", "seed", "split", *TASK_METRICS]
    run_columns += sorted({k for r in records for k in r if k.startswith(("oracle_", "gap_"))}) + ["run_dir"]
    write_csv(out / "table3_runs.csv", records, run_columns)
    md = render_markdown(summaries, records, exp.name, command)
    (out / "table3.md").write_text(md, encoding="utf-8")
    with open(out / "table3.json", "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "runs": records}, f, indent=2, default=json_default)
    return out / "table3.md"

