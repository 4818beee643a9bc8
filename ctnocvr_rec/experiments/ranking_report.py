"""The ranking report as markdown (the paper's Table 4) and a PNG (its Fig. 2)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def _fmt_pct(value: float, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def render_ranking_markdown(
    summary: dict[str, Any],
    tables: dict[str, dict[str, np.ndarray]],
    items: np.ndarray,
    item_segment: np.ndarray | None,
    top_items: int,
    command: str,
) -> str:
    has_truth = "true_ctr" in tables["before"]
    lines = [f"# Ranking report (Table 4 / Fig. 2) -- split `{summary['split']}`", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"Base: `{summary['base_run']}`; +CTnoCVR: `{summary['ctnocvr_run']}`. Score `{summary['score']}`"
        + (f" (alpha={summary['alpha']})" if summary["score"] == "pctr_pcvr_alpha" else "")
        + f", top-{summary['top_k']} of each of {summary['requests']} requests exposed "
        f"({summary['impressions']} candidate impressions, {summary['items']} items).",
        "",
        f"Top {top_items} items by exposures (CTR = clicks/exposures, CVR = conversions/clicks on the exposed "
        "impressions" + ("; true = sidecar probabilities" if has_truth else "") + "):",
        "",
    ]
    cols = ["Item", "CTR (%)", "CVR (%)", "Exposures"] + (
        ["true CTR", "true CVR", "segment"] if has_truth else []
    )
    header = [f"{c} ({side})" if i == 0 else c for side in ("before", "after") for i, c in enumerate(cols)]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    tops = {name: np.argsort(-tables[name]["exposures"], kind="mergesort")[:top_items] for name in tables}
    for i in range(top_items):
        cells = []
        for name in ("before", "after"):
            t = tables[name]
            if i >= tops[name].size or t["exposures"][tops[name][i]] == 0:
                cells += [""] * len(cols)
                continue
            j = tops[name][i]
            cells += [
                str(items[j]),
                _fmt_pct(t["ctr"][j]),
                _fmt_pct(t["cvr"][j]),
                f"{int(t['exposures'][j])}",
            ]
            if has_truth:
                seg = item_segment[j] if item_segment is not None else ""
                cells += [_fmt_pct(t["true_ctr"][j]), _fmt_pct(t["true_cvr"][j]), seg]
        lines.append("| " + " | ".join(cells) + " |")
    b, a = summary["before"], summary["after"]
    lines += [
        "",
        "## Summary (before = Base, after = +CTnoCVR)",
        "",
        "| | before | after | change |",
        "|---|---|---|---|",
    ]

    def row(label: str, key: str, pct: bool) -> None:
        if key not in b:
            return
        fmt = (
            (lambda v: f"{100 * v:.2f}%")
            if pct
            else (lambda v: f"{v:.2f}" if isinstance(v, float) else str(v))
        )
        change = (a[key] - b[key]) * (100 if pct else 1)
        change_text = f"{change:+d}" if isinstance(change, int) else f"{change:+.2f}{' pts' if pct else ''}"
        lines.append(f"| {label} | {fmt(b[key])} | {fmt(a[key])} | {change_text} |")

    row("exposure share of high-CTR-low-CVR items", "hclc_exposure_share", True)
    row("exposure share of planted clickbait items", "clickbait_exposure_share", True)
    row("exposure share of planted hidden gems", "gem_exposure_share", True)
    row("clicks per 1,000 exposures (observed)", "clicks_per_1000", False)
    row("conversions per 1,000 exposures (observed)", "conversions_per_1000", False)
    row("expected clicks per 1,000 exposures (true p_ctr)", "expected_clicks_per_1000", False)
    row("expected conversions per 1,000 exposures (true p_ctr*p_cvr)", "expected_conversions_per_1000", False)
    row("distinct items exposed", "distinct_items_exposed", False)
    lines += [
        "",
        f"High-CTR-low-CVR: logged item CTR > median ({100 * summary['median_item_ctr']:.2f}%) and logged item "
        f"CVR <= median ({100 * summary['median_item_cvr']:.2f}%) over all eval impressions of the item, medians "
        f"over items exposed by either ranker ({summary['hclc_items']} items).",
    ]
    if "oracle_expected_conversions_per_1000" in summary:
        lines.append(
            "Reference: ranking by the true p_ctr*p_cvr would give "
            f"{summary['oracle_expected_conversions_per_1000']:.2f} expected conversions per 1,000 exposures."
        )
    if "segment_share_of_impressions" in summary:
        shares = summary["segment_share_of_impressions"]
        lines.append(
            "Planted segments' share of all candidate impressions: "
            + ", ".join(f"{k} {100 * v:.2f}%" for k, v in shares.items())
            + "."
        )
    lines.append("")
    return "\n".join(lines)


def plot_rank_movement(
    logged: dict[str, np.ndarray],
    mean_rank: dict[str, np.ndarray],
    tables: dict[str, dict[str, np.ndarray]],
    item_segment: np.ndarray | None,
    path: Path,
    summary: dict[str, Any],
) -> None:
    """Fig. 2-like: (a) items in the CTR-CVR plane coloured by exposure change; (b) rank movement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exp_b, exp_a = tables["before"]["exposures"], tables["after"]["exposures"]
    if "true_ctr" in logged:
        # the item's true rates over all its evaluation impressions (exact, no label noise)
        ctr, cvr, axis_note = logged["true_ctr"], logged["true_cvr"], "true"
    else:
        ctr, cvr, axis_note = logged["ctr"], np.nan_to_num(logged["cvr"], nan=0.0), "logged"
    keep = (exp_b + exp_a) > 0
    change = np.log2((exp_a + 1) / (exp_b + 1))
    rank_move = mean_rank["before"] - mean_rank["after"]  # > 0: the item moved up

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    lim = max(1.0, float(np.nanmax(np.abs(change[keep])))) if keep.any() else 1.0
    sc = axes[0].scatter(100 * ctr[keep], 100 * cvr[keep], c=change[keep], cmap="coolwarm_r", vmin=-lim, vmax=lim,
                         s=6 + 30 * np.sqrt((exp_b + exp_a)[keep] / max(1.0, float((exp_b + exp_a).max()))), alpha=0.8)  # fmt: skip
    fig.colorbar(sc, ax=axes[0], label="log2 exposures after / before")
    axes[0].set_xlabel(f"item CTR (%, {axis_note})")
    axes[0].set_ylabel(f"item CVR (%, {axis_note})")
    axes[0].set_title("(a) exposure change of exposed items")
    if item_segment is not None:
        for seg, colour in (("normal", "tab:gray"), ("clickbait", "tab:red"), ("gem", "tab:green")):
            m = keep & (item_segment == seg)
            axes[1].scatter(100 * cvr[m], rank_move[m], s=8, alpha=0.6, color=colour, label=seg)
        axes[1].legend()
    else:
        ratio_colour = np.log10((cvr[keep] + 1e-4) / (ctr[keep] + 1e-4))
        s2 = axes[1].scatter(100 * cvr[keep], rank_move[keep], s=8, alpha=0.6, c=ratio_colour, cmap="viridis")
        fig.colorbar(s2, ax=axes[1], label="log10 CVR / CTR")
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set_xlabel(f"item CVR (%, {axis_note})")
    axes[1].set_ylabel("mean rank position gained (before - after)")
    axes[1].set_title("(b) rank movement with +CTnoCVR")
    fig.suptitle(f"Ranking by {summary['score']}, top-{summary['top_k']} exposed, split {summary['split']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
