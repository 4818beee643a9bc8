"""`ctnocvr report ranking`: the paper's Table 4 and Fig. 2 offline, Base vs +CTnoCVR.

Both runs' predictions on the same evaluation split are re-ranked per request (``request_id``: the
impressions sharing one common-feature key) by a ranking score, and the top-k of every request are
"exposed". Per item (the ground truth's ``item_id`` when the synthetic sidecar exists, else the
mapped id of field ``205`` from the prepared Parquet) the exposures, observed CTR (clicks /
exposures) and CVR (conversions / clicks) are aggregated, plus the true CTR/CVR from the sidecar.

Definitions used in the summary:

* **high-CTR-low-CVR item**: the item's *logged* CTR and CVR are measured over all its impressions in
  the evaluation split (independent of either ranker, so the class is the same before and after);
  an item is high-CTR-low-CVR when its CTR is strictly above the median CTR and its CVR is at or
  below the median CVR, medians over the items exposed by either ranker. "At or below" because
  conversions are sparse: the median item CVR is often exactly 0, and "strictly below 0" would make
  the class empty while zero-conversion high-CTR items are exactly the clickbait of the paper.
* **exposure share** of a set of items: their exposures / all exposures.
* **conversions per 1,000 exposures**: observed = 1000 * conversions on exposed impressions /
  exposures; expected (sidecar) = 1000 * mean of ``p_ctr * p_cvr`` over exposed impressions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads

from ctnocvr_rec.experiments import oracle as oracle_mod
from ctnocvr_rec.experiments.runs import eval_split, read_metrics, read_predictions
from ctnocvr_rec.experiments.table3 import write_csv
from ctnocvr_rec.yaml_strict import load_yaml_file

SCORES = ("pctcvr", "pctr", "pcvr", "pctr_pcvr_alpha")
ITEM_FIELD = "205"


def ranking_score(preds: dict[str, np.ndarray], score: str, alpha: float = 1.0) -> np.ndarray:
    """The ranking score of every row: pCTCVR, pCTR, pCVR or pCTR * pCVR^alpha."""
    if score == "pctcvr":
        return np.asarray(preds["p_ctcvr"], dtype=np.float64)
    if score == "pctr":
        return np.asarray(preds["p_ctr"], dtype=np.float64)
    if score == "pcvr":
        return np.asarray(preds["p_cvr"], dtype=np.float64)
    if score == "pctr_pcvr_alpha":
        return (
            np.asarray(preds["p_ctr"], dtype=np.float64)
            * np.asarray(preds["p_cvr"], dtype=np.float64) ** alpha
        )
    raise ValueError(f"unknown ranking score {score!r}; valid: {list(SCORES)}")


def rank_within_requests(request_id: np.ndarray, score: np.ndarray, tie_break: np.ndarray) -> np.ndarray:
    """0-based position of every row inside its request, by descending score (ties: ``tie_break`` asc)."""
    order = np.lexsort((tie_break, -score, request_id))
    sorted_requests = request_id[order]
    starts = np.r_[0, np.flatnonzero(sorted_requests[1:] != sorted_requests[:-1]) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, order.size]))
    ranks = np.empty(order.size, dtype=np.int64)
    ranks[order] = np.arange(order.size) - group_start
    return ranks


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


def item_table(
    rows: EvalRows, exposed: np.ndarray, items: np.ndarray, inverse: np.ndarray
) -> dict[str, np.ndarray]:
    """Per item (``items[j]``): exposures, clicks, conversions, observed CTR/CVR, true CTR/CVR."""
    n = items.size
    weights = exposed.astype(np.float64)
    exposures = np.bincount(inverse, weights=weights, minlength=n)
    clicks = np.bincount(inverse, weights=weights * rows.click, minlength=n)
    conversions = np.bincount(inverse, weights=weights * rows.conversion, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "exposures": exposures,
            "clicks": clicks,
            "conversions": conversions,
            "ctr": clicks / exposures,
            "cvr": np.where(clicks > 0, conversions / np.maximum(clicks, 1), np.nan),
        }
        if rows.true_ctr is not None and rows.true_cvr is not None:
            sum_ctr = np.bincount(inverse, weights=weights * rows.true_ctr, minlength=n)
            sum_ctcvr = np.bincount(inverse, weights=weights * rows.true_ctr * rows.true_cvr, minlength=n)
            out["true_ctr"] = sum_ctr / exposures
            out["true_cvr"] = sum_ctcvr / sum_ctr
    return out


def _share(mask: np.ndarray, exposures: np.ndarray) -> float:
    total = exposures.sum()
    return float(exposures[mask].sum() / total) if total else math.nan


def ranking_report(
    base_dir: str | Path,
    ctnocvr_dir: str | Path,
    out_dir: str | Path,
    split: str | None = None,
    gt_dir: str | Path | None = None,
    score: str = "pctcvr",
    alpha: float = 1.0,
    top_k: int = 3,
    top_items: int = 10,
    command: str = "",
) -> dict[str, Any]:
    """Write ranking.md / ranking_items.csv / ranking_summary.json / ranking_fig2.png; return the summary."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    base_dir, ctnocvr_dir, out_dir = Path(base_dir), Path(ctnocvr_dir), Path(out_dir)
    rows, before, after, split = load_eval_rows(
        base_dir, ctnocvr_dir, split, Path(gt_dir) if gt_dir else None
    )
    ranks = {
        name: rank_within_requests(rows.request_id, ranking_score(preds, score, alpha), rows.sample_id)
        for name, preds in (("before", before), ("after", after))
    }
    exposed = {name: r < top_k for name, r in ranks.items()}
    items, inverse = np.unique(rows.item, return_inverse=True)
    tables = {name: item_table(rows, exp, items, inverse) for name, exp in exposed.items()}
    logged = item_table(rows, np.ones(rows.sample_id.size, dtype=bool), items, inverse)
    mean_rank = {
        name: np.bincount(inverse, weights=r.astype(np.float64), minlength=items.size) / logged["exposures"]
        for name, r in ranks.items()
    }

    # high-CTR-low-CVR: logged rates, medians over items exposed by either ranker (see module doc)
    shown = (tables["before"]["exposures"] > 0) | (tables["after"]["exposures"] > 0)
    logged_cvr = np.nan_to_num(logged["cvr"], nan=0.0)
    median_ctr = float(np.median(logged["ctr"][shown]))
    median_cvr = float(np.median(logged_cvr[shown]))
    hclc = (logged["ctr"] > median_ctr) & (logged_cvr <= median_cvr)

    summary: dict[str, Any] = {
        "split": split, "score": score, "alpha": alpha, "top_k": top_k,
        "base_run": str(base_dir), "ctnocvr_run": str(ctnocvr_dir),
        "requests": int(np.unique(rows.request_id).size), "impressions": int(rows.sample_id.size),
        "items": int(items.size), "median_item_ctr": median_ctr, "median_item_cvr": median_cvr,
        "hclc_items": int(hclc.sum()),
    }  # fmt: skip
    for name in ("before", "after"):
        t = tables[name]
        n_exposed = float(t["exposures"].sum())
        stats: dict[str, Any] = {
            "exposures": int(n_exposed),
            "hclc_exposure_share": _share(hclc, t["exposures"]),
            "clicks_per_1000": 1000 * t["clicks"].sum() / n_exposed,
            "conversions_per_1000": 1000 * t["conversions"].sum() / n_exposed,
            "distinct_items_exposed": int((t["exposures"] > 0).sum()),
        }
        if rows.true_ctr is not None:
            mask = exposed[name]
            stats["expected_conversions_per_1000"] = 1000 * float(
                np.mean(rows.true_ctr[mask] * rows.true_cvr[mask])
            )
            stats["expected_clicks_per_1000"] = 1000 * float(np.mean(rows.true_ctr[mask]))
        if rows.segment is not None:
            for seg in ("clickbait", "gem", "normal"):
                stats[f"{seg}_exposure_share"] = float(np.mean(rows.segment[exposed[name]] == seg))
        summary[name] = stats
    if rows.true_ctr is not None and rows.true_cvr is not None:
        # reference: the exposures an oracle ranking by the true p_ctr * p_cvr would pick
        true_ctcvr = rows.true_ctr * rows.true_cvr
        oracle_exposed = rank_within_requests(rows.request_id, true_ctcvr, rows.sample_id) < top_k
        summary["oracle_expected_conversions_per_1000"] = 1000 * float(np.mean(true_ctcvr[oracle_exposed]))
    if rows.segment is not None:
        summary["segment_share_of_impressions"] = {
            seg: float(np.mean(rows.segment == seg)) for seg in ("clickbait", "gem", "normal")
        }

    out_dir.mkdir(parents=True, exist_ok=True)
    item_segment = _item_segment(rows, items, inverse)
    item_rows = []
    for j in np.argsort(-tables["before"]["exposures"], kind="mergesort"):
        rec: dict[str, Any] = {"item": int(items[j]), "impressions": int(logged["exposures"][j]),
                               "logged_ctr": logged["ctr"][j], "logged_cvr": logged["cvr"][j], "hclc": bool(hclc[j])}  # fmt: skip
        if item_segment is not None:
            rec["segment"] = item_segment[j]
        for name in ("before", "after"):
            for key, values in tables[name].items():
                rec[f"{name}_{key}"] = values[j]
            rec[f"{name}_mean_rank"] = mean_rank[name][j]
        item_rows.append(rec)
    write_csv(out_dir / "ranking_items.csv", item_rows, list(item_rows[0]))
    with open(out_dir / "ranking_summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    md = render_ranking_markdown(summary, tables, items, item_segment, top_items, command)
    (out_dir / "ranking.md").write_text(md, encoding="utf-8")
    plot_rank_movement(logged, mean_rank, tables, item_segment, out_dir / "ranking_fig2.png", summary)
    return summary


def _item_segment(rows: EvalRows, items: np.ndarray, inverse: np.ndarray) -> np.ndarray | None:
    if rows.segment is None:
        return None
    seg = np.empty(items.size, dtype=object)
    seg[inverse] = rows.segment  # an item's segment is fixed, so any of its rows will do
    return seg.astype(str)


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


#: summary entries compared across seeds (key, label, is a share)
SEED_SUMMARY_KEYS = (
    ("hclc_exposure_share", "exposure share of high-CTR-low-CVR items", True),
    ("clickbait_exposure_share", "exposure share of planted clickbait items", True),
    ("gem_exposure_share", "exposure share of planted hidden gems", True),
    ("clicks_per_1000", "clicks per 1,000 exposures (observed)", False),
    ("conversions_per_1000", "conversions per 1,000 exposures (observed)", False),
    ("expected_conversions_per_1000", "expected conversions per 1,000 exposures (true p_ctr*p_cvr)", False),
)


def ranking_over_seeds(
    arch_root: Path,
    seeds: list[int],
    out_dir: str | Path,
    command: str = "",
    **report_kwargs: Any,
) -> Path:
    """:func:`ranking_report` for every seed's Base/+CTnoCVR pair under ``arch_root`` (``<out>/table3/<arch>``),
    then ``ranking_seeds.md``: mean before/after over seeds and a paired t-test per summary entry."""
    from ctnocvr_rec.experiments.stats import mean_std, paired_comparison

    out_dir = Path(out_dir)
    summaries = {}
    for seed in seeds:
        base, ctnocvr = arch_root / "base" / f"seed{seed}", arch_root / "ctnocvr" / f"seed{seed}"
        if not ((base / "metrics.json").is_file() and (ctnocvr / "metrics.json").is_file()):
            continue
        summaries[seed] = ranking_report(
            base, ctnocvr, out_dir / f"seed{seed}", command=command, **report_kwargs
        )
    if not summaries:
        raise FileNotFoundError(f"{arch_root}: no seed has both a finished Base and +CTnoCVR run")
    first = next(iter(summaries.values()))
    lines = [
        f"# Ranking report over seeds -- `{arch_root}`",
        "",
        *([f"Command: `{command}`", ""] if command else []),
        f"Seeds {sorted(summaries)}; score `{first['score']}`, top-{first['top_k']} of each request exposed, "
        f"split `{first['split']}`. Mean ± sample std over seeds; p = two-sided paired t-test over seeds.",
        "",
        "| | before (Base) | after (+CTnoCVR) | change | p (paired t) | after > before |",
        "|---|---|---|---|---|---|",
    ]
    for key, label, is_share in SEED_SUMMARY_KEYS:
        if key not in first["before"]:
            continue
        before = [s["before"][key] for s in summaries.values()]
        after = [s["after"][key] for s in summaries.values()]
        test = paired_comparison(before, after)
        scale, unit = (100.0, "%") if is_share else (1.0, "")
        (mb, sb), (ma, sa) = mean_std(before), mean_std(after)
        p_text = "n/a" if math.isnan(test.p_t) else f"{test.p_t:.3g}"
        lines.append(
            f"| {label} | {scale * mb:.2f}{unit} ± {scale * sb:.2f} | {scale * ma:.2f}{unit} ± {scale * sa:.2f} | "
            f"{scale * test.mean_diff:+.2f}{' pts' if is_share else ''} | {p_text} | {test.wins}/{test.n} |"
        )
    lines.append("")
    path = out_dir / "ranking_seeds.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
