"""The method comparison as a markdown table and a PNG (rows from :func:`compare.aggregate_compare`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ctnocvr_rec.experiments.records import SIGNIFICANCE, TASK_METRICS, TASK_TITLES

COMPARISON_TITLES = {"base": "vs Base", "ctnocvr": "vs +CTnoCVR", "plain": "+CTnoCVR on top"}


def _pm(row: dict[str, Any], key: str) -> str:
    mean, std = row.get(f"{key}_mean", math.nan), row.get(f"{key}_std", math.nan)
    return "n/a" if math.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _p(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.3g}" if value >= 0.001 else f"{value:.1e}"


def _delta(row: dict[str, Any], key: str) -> str:
    """``+0.41 (p=0.03, 3/3)``: mean paired CVR AUC difference in points, t-test p, wins/pairs."""
    if f"vs_{key}_diff" not in row:
        return "-"
    mark = "*" if row[f"vs_{key}_p_t"] < SIGNIFICANCE else ""
    return (f"{100 * row[f'vs_{key}_diff']:+.2f}{mark} (p={_p(row[f'vs_{key}_p_t'])}, "
            f"{row[f'vs_{key}_wins']}/{row[f'vs_{key}_pairs']})")


def render_compare_markdown(rows: list[dict[str, Any]], records: list[dict[str, Any]], title: str,
                            command: str, top_k: int = 3, score: str = "pctcvr") -> str:
    has_oracle = any("oracle_auc_cvr" in r for r in records)
    lines = [f"# CVR methods compared -- {title}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    header = ["Backbone", "Method", "CVR AUC (%)", *COMPARISON_TITLES.values(),
              *[f"{TASK_TITLES[m]} AUC (%)" for m in TASK_METRICS[1:]]]
    if has_oracle:
        header += ["CVR gap to oracle", f"clickbait in top-{top_k} (%)", f"gems in top-{top_k} (%)",
                   f"true pCTCVR of top-{top_k} (%)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous_arch = None
    for row in rows:
        cells = [row["arch_title"] if row["arch"] != previous_arch else "", f"{row['title']} (n={row['n_seeds']})",
                 _pm(row, "auc_cvr"), *[_delta(row, k) for k in COMPARISON_TITLES],
                 *[_pm(row, m) for m in TASK_METRICS[1:]]]
        if has_oracle:
            cells += [_pm(row, "gap_auc_cvr"), _pm(row, "topk_clickbait_share"), _pm(row, "topk_gem_share"),
                      _pm(row, "topk_true_ctcvr")]
        previous_arch = row["arch"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "AUCs in %, mean ± sample std over seeds (CVR AUC on clicked rows, the others on all rows). The three "
        "comparison columns give the mean paired difference of the CVR AUC in points, the two-sided paired "
        f"t-test p and wins/pairs over seeds (same seed = same initialisation and data order); * = p < "
        f"{SIGNIFICANCE}. 'vs Base' and 'vs +CTnoCVR' compare with the backbone's own objective without / with "
        "the paper's CTnoCVR task; '+CTnoCVR on top' compares a method run with the CTnoCVR task with the same "
        "method without it. Sign-flip p-values are in compare.csv.",
    ]
    if has_oracle:
        oracle = np.nanmean([r["oracle_auc_cvr"] for r in records])
        lines += ["", f"Oracle CVR AUC (true probabilities of the synthetic data, same rows): {100 * oracle:.2f}%. "
                      "Gap = model AUC - oracle AUC, in points. Ranking shift: each request's candidates ranked by "
                      f"the run's {score}, the first {top_k} exposed; the share of exposures that are planted "
                      "clickbait / hidden-gem items, and their mean TRUE pCTR·pCVR (expected conversions per "
                      "exposure, higher is better)."]
    lines += ["", "## Summary", ""] + [f"- {line}" for line in summary_lines(rows)] + [""]
    return "\n".join(lines)


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per backbone: the best mean CVR AUC, and where the CTnoCVR task added or cost significantly."""
    lines = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        arch_rows = [r for r in rows if r["arch"] == arch and not math.isnan(r.get("auc_cvr_mean", math.nan))]
        if not arch_rows:
            continue
        best = max(arch_rows, key=lambda r: r["auc_cvr_mean"])
        line = f"{best['arch_title']}: best mean CVR AUC {100 * best['auc_cvr_mean']:.2f}% by {best['title']}"
        if "vs_base_diff" in best:
            line += f" ({_delta(best, 'base')} vs Base)"
        effects = []
        for r in arch_rows:
            key = "plain" if "vs_plain_diff" in r else ("base" if r["method"] == "base" and r["ctnocvr"] else None)
            if key is None or f"vs_{key}_diff" not in r or not r[f"vs_{key}_p_t"] < SIGNIFICANCE:
                continue
            verb = "helped" if r[f"vs_{key}_diff"] > 0 else "HURT"
            effects.append(f"CTnoCVR {verb} {r['title'].replace(' +CTnoCVR', '') or 'Base'} "
                           f"({100 * r[f'vs_{key}_diff']:+.2f})")
        testable = any(r.get(f"vs_{k}_pairs", 0) >= 2 for r in arch_rows for k in COMPARISON_TITLES)
        if effects:
            line += "; " + "; ".join(effects) + "."
        elif testable:
            line += "; no significant effect of adding CTnoCVR."
        else:
            line += "; too few paired seeds (< 2) to test the effect of CTnoCVR."
        lines.append(line)
    return lines


def plot_compare(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per backbone: CVR AUC mean ± std per method, without and with CTnoCVR side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r["arch"] for r in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.8), dpi=120, squeeze=False)
    for ax, arch in zip(axes[0], archs):
        arch_rows = [r for r in rows if r["arch"] == arch]
        methods = list(dict.fromkeys(r["method"] for r in arch_rows))
        titles = {r["method"]: r["title"].replace(" +CTnoCVR", "") for r in arch_rows if not r["ctnocvr"]}
        positions = np.arange(len(methods))
        for offset, flag, label in ((-0.2, False, "without CTnoCVR"), (0.2, True, "+CTnoCVR")):
            by_method = {r["method"]: r for r in arch_rows if r["ctnocvr"] == flag}
            mean = [100 * by_method[m].get("auc_cvr_mean", math.nan) if m in by_method else math.nan for m in methods]
            std = [100 * by_method[m].get("auc_cvr_std", math.nan) if m in by_method else math.nan for m in methods]
            if not all(math.isnan(v) for v in mean):
                ax.bar(positions + offset, mean, width=0.4, yerr=std, capsize=3, label=label)
        ax.set_xticks(positions, [titles.get(m, "Base" if m == "base" else m) for m in methods], rotation=20)
        finite = [100 * r["auc_cvr_mean"] for r in arch_rows if not math.isnan(r.get("auc_cvr_mean", math.nan))]
        if finite:
            ax.set_ylim(min(finite) - 2.0, max(finite) + 1.5)
        ax.set_title(arch_rows[0]["arch_title"])
        ax.set_ylabel("CVR AUC (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: CVR AUC by method (mean ± std over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
