"""Experiment configuration: one YAML describing a data set, a base run config and the grids.

Layout of an experiment YAML (packaged ones: ``ctnocvr_rec/configs/experiments/<name>.yaml``, named
by ``--config <name>``; every key optional except ``run``)::

    name: synth_preset
    out_dir: runs/experiments/synth_preset     # run folders and reports go below this
    base_config: ""                            # optional run YAML (or packaged run name) merged *under* ``run``
    data_setup:                                # run once if the prepared set is missing (data_setup.py)
      synth: {out: artifacts/synth_preset/raw, rows_train: 600000, seed: 7}      # SynthConfig fields
      prepare: {raw_dir: artifacts/synth_preset/raw, out_dir: artifacts/synth_preset/prepared}
    ground_truth: artifacts/synth_preset/raw   # folder of ground_truth_<split>.parquet ("" = none)
    run: {data: {...}, model: {...}, train: {...}, eval: {...}}   # a RunConfig tree
    table3: {archs: [esmm, mmoe, cgc, ple], seeds: [0, 1, 2, 3, 4]}
    sweep: {archs: [mmoe, cgc], seeds: [0, 1, 2], grids: {model.loss_weight_cvr: [...], ...}}
    ranking: {arch: mmoe, seed: 0, score: pctcvr, alpha: 1.0, top_k: 3}
    compare: {methods: [base, escm2_ips, escm2_dr, dcmt], archs: [esmm, mmoe], ctnocvr: [false, true],
              seeds: [0, 1, 2]}
    when_helps: {archs: [esmm, mmoe], seeds: [0, 1, 2], synth: {rows_train: 100000, ...},
                 knobs: {clickbait_share: [0.0, 0.1, 0.2, 0.3], ...}, prepare: {valid_fraction: 0.1}}

Keys are checked strictly (a typo is an error naming the valid keys), and the ``run`` tree is
validated as a :class:`~ctnocvr_rec.config.RunConfig`.

File references (``base_config``, ``run.data.schema``, and ``data.schema`` inside the base config) are
relative to the folder of the YAML file holding them when the file exists there, else to the working
directory, else packaged names (:func:`ctnocvr_rec.resources.resolve`). Data and output folders
(``out_dir``, ``data_setup`` folders, ``ground_truth``, ``run.data.prepared_dir``) are relative to the
working directory.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctnocvr_rec import registry
from ctnocvr_rec.config import (
    AT_LEAST_1,
    NON_NEGATIVE,
    ConfigError,
    RunConfig,
    anchor_file_references,
    from_dict,
    load_yaml_mapping,
    parse_override,
    ranged,
)
from ctnocvr_rec.resources import resolve
from ctnocvr_rec.yaml_strict import YamlError

#: the paper's Sec. 3.2 grids
PAPER_LOSS_WEIGHT_CVR_GRID = [0.2, 0.5, 0.8, 1.0, 2.0, 4.0, 5.0]
PAPER_SCORE_WEIGHT_GRID = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.02, 0.03]
ARCHS = registry.ARCHS


@dataclass
class Table3Spec:
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    seeds: list[int] = ranged(lambda: [0, 1, 2, 3, 4], NON_NEGATIVE)


@dataclass
class SweepSpec:
    archs: list[str] = field(default_factory=lambda: ["mmoe", "cgc"])
    seeds: list[int] = ranged(lambda: [0, 1, 2], NON_NEGATIVE)
    #: dotted RunConfig key -> values; each key is swept on its own around the base config
    grids: dict[str, list[Any]] = field(
        default_factory=lambda: {
            "model.loss_weight_cvr": list(PAPER_LOSS_WEIGHT_CVR_GRID),
            "model.score_weight": list(PAPER_SCORE_WEIGHT_GRID),
        }
    )
    #: the paper sweeps the models *with* the CTnoCVR task (Fig. 3)
    use_ctnocvr: bool = True


@dataclass
class RankingSpec:
    #: which table3 runs `report ranking --config` compares when no run folders are given
    arch: str = "mmoe"
    seed: int = ranged(0, NON_NEGATIVE)
    #: ranking score: pctcvr | pctr | pcvr | pctr_pcvr_alpha (pCTR * pCVR^alpha)
    score: str = "pctcvr"
    alpha: float = ranged(1.0, NON_NEGATIVE)
    #: candidates exposed per request
    top_k: int = ranged(3, AT_LEAST_1)


@dataclass
class CompareSpec:
    """`experiment compare`: every method x arch x {without, with} CTnoCVR x seed."""

    methods: list[str] = field(default_factory=lambda: list(registry.METHOD_NAMES))
    archs: list[str] = field(default_factory=lambda: ["esmm", "mmoe"])
    #: the +CTnoCVR flag values to run for every method
    ctnocvr: list[bool] = field(default_factory=lambda: [False, True])
    seeds: list[int] = ranged(lambda: [0, 1, 2], NON_NEGATIVE)
    #: ranking shift on synthetic data: candidates exposed per request, and the ranking score
    top_k: int = ranged(3, AT_LEAST_1)
    score: str = "pctcvr"


@dataclass
class DataSetup:
    """Typed data set-up steps (:mod:`ctnocvr_rec.experiments.data_setup`); {} = no such step."""

    #: ``out`` (raw folder), ``workers`` and SynthConfig fields: ``data.synth.generate``
    synth: dict[str, Any] = field(default_factory=dict)
    #: PrepareOptions fields (``raw_dir``, ``out_dir`` required): ``data.prepare.prepare``
    prepare: dict[str, Any] = field(default_factory=dict)


@dataclass
class WhenHelpsSpec:
    """`experiment when-helps`: one synthetic data set per regime (one knob moved off the defaults),
    every arch x {Base, +CTnoCVR} x seed on each (see :mod:`ctnocvr_rec.experiments.when_helps`)."""

    archs: list[str] = field(default_factory=lambda: ["esmm", "mmoe"])
    seeds: list[int] = ranged(lambda: [0, 1, 2], NON_NEGATIVE)
    #: SynthConfig fields shared by every regime (the study's defaults; the rest: SynthConfig's own)
    synth: dict[str, Any] = field(default_factory=dict)
    #: SynthConfig field -> levels; each knob is varied on its own, the others stay at ``synth``
    knobs: dict[str, list[Any]] = field(default_factory=lambda: {
        "clickbait_share": [0.0, 0.1, 0.2, 0.3],
        "cvr": [0.03, 0.1, 0.2, 0.4],
        "selection_strength": [0.0, 0.5, 1.0, 2.0],
        "rows_train": [50_000, 100_000, 200_000, 400_000],
    })
    #: PrepareOptions fields for every regime's prepared set (e.g. valid_fraction, seed, workers)
    prepare: dict[str, Any] = field(default_factory=dict)
    #: folder of the regimes' raw and prepared data ("" = <out_dir>/data)
    data_dir: str = ""


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    out_dir: str = ""
    base_config: str = ""
    data_setup: DataSetup = field(default_factory=DataSetup)
    ground_truth: str = ""
    run: dict[str, Any] = field(default_factory=dict)
    table3: Table3Spec = field(default_factory=Table3Spec)
    sweep: SweepSpec = field(default_factory=SweepSpec)
    ranking: RankingSpec = field(default_factory=RankingSpec)
    compare: CompareSpec = field(default_factory=CompareSpec)
    when_helps: WhenHelpsSpec = field(default_factory=WhenHelpsSpec)
    #: where the YAML came from (for messages), not a YAML key
    source: str = field(default="", metadata={"internal": True})

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir or f"runs/experiments/{self.name}")


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment YAML; ``overrides`` (``key.sub=value``) apply to the ``run`` tree."""
    if path:
        try:
            path = resolve("experiment", path)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    tree: dict[str, Any] = load_yaml_mapping(path) if path else {}
    if "source" in tree:
        raise ConfigError(f"{path}: 'source' is not a configuration key")
    if isinstance(tree.get("data_setup"), list):  # the former list of `ctnocvr data ...` command lines
        from ctnocvr_rec.experiments.data_setup import steps_from_command_lines

        tree["data_setup"] = steps_from_command_lines(tree["data_setup"], str(path))
    try:
        exp = from_dict(ExperimentConfig, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    exp.source = str(path or "<defaults>")
    run_tree: dict[str, Any] = {}
    if exp.base_config:
        base_dir = Path(path).parent if path else None
        try:
            base_path = resolve("run", exp.base_config, base_dir)
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: base_config: {e}") from None
        run_tree = anchor_file_references(load_yaml_mapping(base_path), base_path.parent)
    own_run = anchor_file_references(copy.deepcopy(exp.run), Path(path).parent) if path else exp.run
    run_tree = deep_merge(run_tree, own_run)
    for item in overrides or []:
        try:  # typed and range-checked on its own, so an error names the --set, not the preset
            keys, value = parse_override(item, RunConfig, flag="--set")
        except YamlError as e:
            raise ConfigError(str(e)) from None
        set_dotted(run_tree, ".".join(keys), value)
    exp.run = run_tree
    build_run_config(exp, {})  # validate now, not 20 runs later
    for key, values in exp.sweep.grids.items():
        for value in values:
            build_run_config(exp, {key: value})
    validate_names(exp)
    from ctnocvr_rec.experiments import data_setup  # numpy/pyarrow: only once a config is loaded

    data_setup.validate(exp.data_setup, exp.source)
    return exp


def validate_names(exp: ExperimentConfig) -> None:
    """Every arch and method named by the grids is in the registry (an error names the valid ones)."""
    for arch in [*exp.table3.archs, *exp.sweep.archs, exp.ranking.arch, *exp.compare.archs, *exp.when_helps.archs]:
        if arch not in ARCHS:
            raise ConfigError(f"{exp.source}: unknown arch {arch!r}; valid: {list(ARCHS)}")
    for method in exp.compare.methods:
        if method not in registry.METHOD_NAMES:
            raise ConfigError(f"{exp.source}: unknown method {method!r}; valid: {list(registry.METHOD_NAMES)}")


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, recursing into mappings; inputs are not modified."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted = "a.b.c"``, creating mappings on the way."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def build_run_config(exp: ExperimentConfig, settings: dict[str, Any]) -> RunConfig:
    """The experiment's base run tree with ``settings`` (dotted key -> value) applied, validated."""
    tree = copy.deepcopy(exp.run)
    for dotted, value in settings.items():
        set_dotted(tree, dotted, value)
    try:
        return from_dict(RunConfig, tree)
    except ConfigError as e:
        raise ConfigError(f"{exp.source}: run config: {e}") from None
