"""`ctnocvr experiment when-helps`: in which data regimes does the CTnoCVR task lift the CVR AUC?

A question no paper answers, asked of synthetic data with a known ground truth. The study's default
world is ``when_helps.synth`` (SynthConfig fields); each *knob* (a SynthConfig field: clickbait share,
CVR of clicks, selection strength, training rows) is moved over its levels with every other field at
the default. A *regime* is one such world; the levels equal to the default share the ``default``
regime, so 4 knobs x 4 levels that include the default are 13 regimes, not 16.

Per regime, the data are generated and prepared once by the library (:func:`synth.generate`,
:func:`prepare.prepare`) into ``<data_dir>/<regime>/{raw,prepared}``; then every arch x {Base,
+CTnoCVR} x seed trains on them (seed-major over all regimes, so a study stopped early has every
regime at some seeds; a run folder with a ``metrics.json`` is never redone). Same seed = same
initialisation and data order, so Base and +CTnoCVR pair by seed.

Per (knob, level, arch) the report holds the paired difference of the CVR AUC (clicked rows of the
test split) of +CTnoCVR minus Base with its t-based 95% CI, paired t and sign-flip p and wins, the
oracle CVR AUC of the true probabilities on the same rows, Base's gap to it and the share of that gap
that +CTnoCVR closes. Writes ``when_helps.csv``, ``when_helps_runs.csv``, ``when_helps.json``,
``when_helps.md`` and ``when_helps.png`` (the last two by :mod:`when_helps_report`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctnocvr_rec.config import ConfigError
from ctnocvr_rec.data.prepare import PrepareOptions, prepare
from ctnocvr_rec.data.prepared import PreparedSet
from ctnocvr_rec.data.synth import generate
from ctnocvr_rec.experiments.data_setup import prepare_options, synth_config
from ctnocvr_rec.experiments.records import TASK_METRICS, VARIANTS, json_default, per_run_records, write_csv
from ctnocvr_rec.experiments.runs import RunFn, RunSpec, execute_runs, seeded_settings
from ctnocvr_rec.experiments.spec import ExperimentConfig, build_run_config, validate_names
from ctnocvr_rec.experiments.stats import mean_ci, mean_std, paired_comparison
from ctnocvr_rec.experiments.when_helps_report import plot_when_helps, render_when_helps_markdown

DEFAULT_REGIME = "default"


@dataclass(frozen=True)
class Regime:
    """One synthetic world: the study's defaults with at most one knob moved."""

    name: str  # folder name: "default" or "<knob>-<value>"
    synth: dict[str, Any]  # SynthConfig fields

    def raw_dir(self, data_dir: Path) -> Path:
        return data_dir / self.name / "raw"

    def prepared_dir(self, data_dir: Path) -> Path:
        return data_dir / self.name / "prepared"


def data_dir(exp: ExperimentConfig) -> Path:
    return Path(exp.when_helps.data_dir) if exp.when_helps.data_dir else exp.output_dir / "data"


def level_name(knob: str, value: Any) -> str:
    return f"{knob}-{value:g}" if isinstance(value, float) else f"{knob}-{value}"


def plan_regimes(exp: ExperimentConfig) -> tuple[list[Regime], dict[tuple[str, Any], str]]:
    """The distinct regimes, and (knob, level) -> regime name (a level equal to the default: ``default``).

    Every regime's SynthConfig is built (and range-checked) here, before any data are written.
    """
    spec = exp.when_helps
    where = f"{exp.source}: when_helps"
    base = synth_config(spec.synth, f"{where}.synth")
    regimes = {DEFAULT_REGIME: Regime(DEFAULT_REGIME, dict(spec.synth))}  # dropped below if no level uses it
    level_regime: dict[tuple[str, Any], str] = {}
    if not spec.knobs:
        raise ConfigError(f"{where}.knobs: give at least one knob with its levels")
    for knob, levels in spec.knobs.items():
        if not levels:
            raise ConfigError(f"{where}.knobs.{knob}: no levels")
        for value in levels:
            cfg = synth_config({**spec.synth, knob: value}, f"{where}.knobs.{knob}")
            if getattr(cfg, knob) == getattr(base, knob):
                level_regime[(knob, value)] = DEFAULT_REGIME
                continue
            name = level_name(knob, value)
            regimes[name] = Regime(name, {**spec.synth, knob: value})
            level_regime[(knob, value)] = name
    if DEFAULT_REGIME not in level_regime.values():
        del regimes[DEFAULT_REGIME]
    return list(regimes.values()), level_regime


def _prepare_options(exp: ExperimentConfig, raw: Path, prepared: Path) -> PrepareOptions:
    where = f"{exp.source}: when_helps.prepare"
    own = sorted(set(exp.when_helps.prepare) & {"raw_dir", "out_dir"})
    if own:
        raise ConfigError(f"{where}: {own} are set by the study (one folder per regime)")
    return prepare_options({**exp.when_helps.prepare, "raw_dir": str(raw), "out_dir": str(prepared),
                            "progress": False}, where)


def make_regime_data(exp: ExperimentConfig, regimes: list[Regime], log: Callable[[str], None]) -> None:
    """Generate and prepare every regime whose prepared set is missing (library calls, no CLI).

    The generator is deterministic by its config, so a regime interrupted half-way is simply
    regenerated; ``prepare`` writes atomically and skips an up-to-date output.
    """
    root = data_dir(exp)
    for regime in regimes:
        raw, prepared = regime.raw_dir(root), regime.prepared_dir(root)
        if PreparedSet.exists(prepared) and (raw / "ground_truth_test.parquet").is_file():
            continue
        cfg = synth_config(regime.synth, f"{exp.source}: when_helps regime {regime.name}")
        log(f"[{exp.name}] data for regime {regime.name}: synth {regime.synth} -> {raw}")
        report = generate(cfg, raw)
        test = report["derived"]["splits"]["test"]
        if not test["clicks"] or not test["conversions"]:
            raise ValueError(f"{exp.source}: regime {regime.name}: the test split has {test['clicks']} clicks and "
                             f"{test['conversions']} conversions; the CVR AUC needs both (raise rows_test)")
        prepare(_prepare_options(exp, raw, prepared))


def plan_when_helps(exp: ExperimentConfig, regimes: list[Regime]) -> list[RunSpec]:
    """Seed-major: every regime x arch x {Base, +CTnoCVR} at seed 0, then at seed 1, ..."""
    root = data_dir(exp)
    specs = []
    for seed in exp.when_helps.seeds:
        for regime in regimes:
            for arch in exp.when_helps.archs:
                for variant, use_ctnocvr, _ in VARIANTS:
                    settings = seeded_settings(arch, use_ctnocvr, seed)
                    settings["data.prepared_dir"] = str(regime.prepared_dir(root))
                    specs.append(RunSpec(
                        rel_dir=f"when_helps/{regime.name}/{arch}/{variant}/seed{seed}",
                        settings=settings,
                        labels={"regime": regime.name, "arch": arch, "variant": variant, "seed": seed},
                    ))
    return specs


def _gap_closed(diff: float, gap: float) -> float:
    """The share of Base's distance to the oracle that +CTnoCVR closes (NaN when Base is at the oracle)."""
    return diff / gap if gap > 0 and not math.isnan(diff) else math.nan


def aggregate_when_helps(
    records: list[dict[str, Any]], exp: ExperimentConfig, level_regime: dict[tuple[str, Any], str]
) -> list[dict[str, Any]]:
    """One row per (knob, level, arch), in the config's order: Base and +CTnoCVR means, the paired
    CVR AUC difference with its 95% CI and tests, the oracle and Base's gap to it."""
    by_key: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for rec in records:
        by_key.setdefault((rec["regime"], rec["arch"], rec["variant"]), {})[rec["seed"]] = rec
    rows = []
    for knob, levels in exp.when_helps.knobs.items():
        for value in levels:
            regime = level_regime[(knob, value)]
            for arch in exp.when_helps.archs:
                base, plus = by_key.get((regime, arch, "base"), {}), by_key.get((regime, arch, "ctnocvr"), {})
                seeds = sorted(set(base) & set(plus))
                row: dict[str, Any] = {"knob": knob, "level": value, "regime": regime, "arch": arch,
                                       "n_base": len(base), "n_ctnocvr": len(plus), "pairs": len(seeds)}
                for variant, runs in (("base", base), ("ctnocvr", plus)):
                    for key in ("auc_cvr", "auc_ctr", "oracle_auc_cvr", "gap_auc_cvr"):
                        row[f"{variant}_{key}_mean"], row[f"{variant}_{key}_std"] = mean_std(
                            [runs[s].get(key, math.nan) for s in sorted(runs)])
                if seeds:
                    before = [base[s]["auc_cvr"] for s in seeds]
                    after = [plus[s]["auc_cvr"] for s in seeds]
                    test = paired_comparison(before, after)
                    low, high = mean_ci(np.subtract(after, before))
                    row.update(diff=test.mean_diff, ci_low=low, ci_high=high, p_t=test.p_t,
                               p_sign_flip=test.p_sign_flip, wins=test.wins)
                    gaps = [base[s].get("gap_auc_cvr", math.nan) for s in seeds]
                    row["gap_closed"] = _gap_closed(test.mean_diff, -float(np.mean(gaps)))
                rows.append(row)
    return rows


CSV_COLUMNS = [
    "knob", "level", "regime", "arch", "pairs", "diff", "ci_low", "ci_high", "p_t", "p_sign_flip", "wins",
    "gap_closed", "base_auc_cvr_mean", "base_auc_cvr_std", "ctnocvr_auc_cvr_mean", "ctnocvr_auc_cvr_std",
    "base_oracle_auc_cvr_mean", "base_gap_auc_cvr_mean", "ctnocvr_gap_auc_cvr_mean",
    "base_auc_ctr_mean", "ctnocvr_auc_ctr_mean", "n_base", "n_ctnocvr",
]  # fmt: skip


def regime_records(exp: ExperimentConfig, regimes: list[Regime], specs: list[RunSpec]) -> list[dict[str, Any]]:
    """Finished runs with their metrics and oracle AUCs (each regime against its own ground truth)."""
    root = data_dir(exp)
    records = []
    for regime in regimes:
        mine = [s for s in specs if s.labels["regime"] == regime.name]
        raw = regime.raw_dir(root)
        records += per_run_records(exp, mine, raw if raw.is_dir() else None)
    return records


def run_when_helps(
    exp: ExperimentConfig,
    run_fn: RunFn | None = None,
    nproc: int = 1,
    report_only: bool = False,
    command: str = "",
    log: Callable[[str], None] | None = None,
) -> Path:
    """Make the missing data and runs (unless ``report_only``), then write the tables and the plot;
    returns when_helps.md."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    validate_names(exp)
    regimes, level_regime = plan_regimes(exp)
    specs = plan_when_helps(exp, regimes)
    for spec in specs[: len(regimes) * len(exp.when_helps.archs) * len(VARIANTS)]:
        build_run_config(exp, spec.settings)  # a bad run setting fails here, before any data or training
    _prepare_options(exp, Path("raw"), Path("prepared"))  # so does a bad prepare option
    if not report_only:
        make_regime_data(exp, regimes, log)
        execute_runs(exp, specs, run_fn=run_fn, nproc=nproc, log=log)
    records = regime_records(exp, regimes, specs)
    if not records:
        raise FileNotFoundError(f"{exp.output_dir}/when_helps: no finished runs")
    for rec in records:
        rec["synth"] = next(r.synth for r in regimes if r.name == rec["regime"])
    rows = aggregate_when_helps(records, exp, level_regime)
    out = exp.output_dir
    write_csv(out / "when_helps.csv", rows, CSV_COLUMNS)
    run_columns = ["regime", "arch", "variant", "seed", "split", *TASK_METRICS]
    run_columns += sorted({k for r in records for k in r if k.startswith(("oracle_", "gap_"))}) + ["run_dir"]
    write_csv(out / "when_helps_runs.csv", records, run_columns)
    with open(out / "when_helps.json", "w", encoding="utf-8") as f:
        json.dump({"defaults": exp.when_helps.synth, "rows": rows, "runs": records}, f, indent=2,
                  default=json_default)
    plot_when_helps(rows, out / "when_helps.png", exp.name)
    md = render_when_helps_markdown(rows, exp.when_helps.synth, exp.name, command)
    (out / "when_helps.md").write_text(md, encoding="utf-8")
    return out / "when_helps.md"

