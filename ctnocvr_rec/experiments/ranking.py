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

This module ranks and counts; the rows come from :mod:`ranking_rows`, the markdown and the figure
from :mod:`ranking_report`, the report over all seeds from :mod:`ranking_seeds`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ctnocvr_rec.experiments.ranking_report import plot_rank_movement, render_ranking_markdown
from ctnocvr_rec.experiments.ranking_rows import EvalRows, load_eval_rows
from ctnocvr_rec.experiments.records import write_csv

SCORES = ("pctcvr", "pctr", "pcvr", "pctr_pcvr_alpha")


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
