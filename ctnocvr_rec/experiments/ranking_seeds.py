"""`ctnocvr report ranking --all-seeds`: the ranking report of every seed's pair, and their aggregate."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ctnocvr_rec.experiments.ranking import ranking_report
from ctnocvr_rec.experiments.stats import mean_std, paired_comparison

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
