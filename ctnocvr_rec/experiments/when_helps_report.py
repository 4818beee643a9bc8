"""The when-helps study as a markdown table and a PNG (rows from :func:`when_helps.aggregate_when_helps`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ctnocvr_rec import registry

#: plain titles of the knobs the packaged study varies (others print their SynthConfig name)
KNOB_TITLES = {
    "clickbait_share": "clickbait share of items",
    "cvr": "CVR of clicks (conversion sparsity)",
    "selection_strength": "selection strength (0 = clicks at random)",
    "rows_train": "training rows",
}
SIGNIFICANCE = 0.05


def _title(arch: str) -> str:
    return registry.BACKBONES[arch].title if arch in registry.BACKBONES else arch


def _num(value: float, scale: float = 100.0, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{scale * value:+.2f}" if sign else f"{scale * value:.2f}"


def _p(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.3g}" if value >= 0.001 else f"{value:.1e}"


def _mean_sd(row: dict[str, Any], variant: str) -> str:
    """``61.24 ± 0.35 (n=3)``; ``61.24 (n=1)`` for one run; ``-`` before any run finished."""
    n = row[f"n_{variant}"]
    if not n:
        return "-"
    mean = _num(row[f"{variant}_auc_cvr_mean"])
    return f"{mean} (n=1)" if n == 1 else f"{mean} ± {_num(row[f'{variant}_auc_cvr_std'])} (n={n})"


def verdict(row: dict[str, Any]) -> str:
    """``helps`` / ``HURTS`` when the 95% CI excludes 0, ``no effect`` when it does not, else why not."""
    if not row.get("pairs", 0):
        return "not run yet"
    if row.get("pairs", 0) < 2 or math.isnan(row.get("ci_low", math.nan)):
        return "too few seeds"
    if row["ci_low"] > 0:
        return "helps"
    if row["ci_high"] < 0:
        return "HURTS"
    return "no effect"


def render_when_helps_markdown(rows: list[dict[str, Any]], defaults: dict[str, Any], title: str, command: str) -> str:
    lines = [f"# When does CTnoCVR help? -- {title}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    shown = ", ".join(f"{k}={v}" for k, v in defaults.items())
    lines += [f"Study defaults (every knob not being varied): {shown or 'SynthConfig defaults'}.", ""]
    for knob in dict.fromkeys(r["knob"] for r in rows):
        lines += [f"## {KNOB_TITLES.get(knob, knob)} (`{knob}`)", ""]
        header = ["Level", "Backbone", "Base CVR AUC (%)", "+CTnoCVR CVR AUC (%)", "Δ (points) [95% CI]",
                  "p (paired t)", "wins", "Oracle CVR AUC (%)", "Base gap to oracle", "gap closed", "verdict"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in (r for r in rows if r["knob"] == knob):
            has_pairs = "diff" in row
            cells = [
                f"{row['level']}" + (" (default)" if row["regime"] == "default" else ""),
                _title(row["arch"]),
                _mean_sd(row, "base"),
                _mean_sd(row, "ctnocvr"),
                (f"{_num(row['diff'], sign=True)} [{_num(row['ci_low'], sign=True)}, {_num(row['ci_high'], sign=True)}]"
                 if has_pairs else "-"),
                _p(row["p_t"]) if has_pairs else "-",
                f"{row['wins']}/{row['pairs']}" if has_pairs else "-",
                _num(row["base_oracle_auc_cvr_mean"]) if row["n_base"] else "-",
                _num(row["base_gap_auc_cvr_mean"], sign=True) if row["n_base"] else "-",
                f"{100 * row['gap_closed']:.0f}%" if has_pairs and not math.isnan(row.get("gap_closed", math.nan))
                else "n/a",
                verdict(row),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Δ = +CTnoCVR minus Base CVR AUC (clicked rows of the test split), mean over paired seeds (same seed = "
        "same initialisation and data order), in AUC points, with the t-based 95% confidence interval; p = "
        "two-sided paired t-test (sign-flip p in when_helps.csv). Oracle = the AUC of the true pCVR on the same "
        "rows; gap = Base minus oracle; gap closed = Δ / (oracle - Base). verdict: helps / HURTS when the 95% CI "
        "excludes 0, else no effect.",
        "",
        "## Summary",
        "",
    ]
    lines += [f"- {line}" for line in summary_lines(rows)] + [""]
    return "\n".join(lines)


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per backbone and knob: the levels where CTnoCVR significantly helped and where it hurt."""
    lines = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for knob in dict.fromkeys(r["knob"] for r in rows):
            mine = [r for r in rows if r["arch"] == arch and r["knob"] == knob and "diff" in r]
            if not mine:
                continue
            parts = [f"{r['level']}: {_num(r['diff'], sign=True)}" for r in mine]
            helps = [str(r["level"]) for r in mine if verdict(r) == "helps"]
            hurts = [str(r["level"]) for r in mine if verdict(r) == "HURTS"]
            tail = []
            if helps:
                tail.append(f"helps at {', '.join(helps)}")
            if hurts:
                tail.append(f"HURTS at {', '.join(hurts)}")
            if not tail:
                tail.append("no level where the 95% CI excludes 0")
            lines.append(f"{_title(arch)}, {KNOB_TITLES.get(knob, knob)}: Δ {'; '.join(parts)} -- {'; '.join(tail)}.")
    return lines


def plot_when_helps(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per knob: Δ CVR AUC (points) with its 95% CI against the level, one line per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs = list(dict.fromkeys(r["knob"] for r in rows))
    fig, axes = plt.subplots(1, len(knobs), figsize=(3.8 * len(knobs), 3.6), dpi=120, squeeze=False)
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    for ax, knob in zip(axes[0], knobs):
        levels = list(dict.fromkeys(r["level"] for r in rows if r["knob"] == knob))
        for k, arch in enumerate(archs):
            by_level = {r["level"]: r for r in rows if r["knob"] == knob and r["arch"] == arch}
            xs, ys, lo, hi = [], [], [], []
            for i, level in enumerate(levels):
                row = by_level.get(level, {})
                if "diff" not in row:
                    continue
                xs.append(i + (k - (len(archs) - 1) / 2) * 0.08)  # side by side, not on top of each other
                ys.append(100 * row["diff"])
                low, high = row.get("ci_low", math.nan), row.get("ci_high", math.nan)
                lo.append(0.0 if math.isnan(low) else 100 * (row["diff"] - low))
                hi.append(0.0 if math.isnan(high) else 100 * (high - row["diff"]))
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=_title(arch))
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(levels)), [f"{v:g}" if isinstance(v, float) else str(v) for v in levels])
        ax.set_xlabel(KNOB_TITLES.get(knob, knob), fontsize=8)
        ax.set_ylabel("Δ CVR AUC, +CTnoCVR - Base (points)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: effect of the CTnoCVR task (mean over paired seeds, 95% CI)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
