"""Typed run configuration: nested dataclasses loaded from YAML with dotted overrides.

``load_config("mmoe", ["model.num_experts=8", "train.steps=200"])`` returns a :class:`RunConfig`
(``"mmoe"``: the packaged ``ctnocvr_rec/configs/mmoe.yaml``; a path to a YAML file works too, see
``ctnocvr_rec.resources``). Unknown keys (in YAML or in an override) raise :class:`ConfigError` listing the
valid keys at that level, so a typo never silently falls back to a default. Every numeric field
declares its valid range next to it (``ranged(default, AT_LEAST_1)``); a value outside it is a
:class:`ConfigError` naming the key and the range. YAML is read strictly (``yaml_strict``: no tags,
no duplicate keys, errors with file:line), and an error in ``-o key=value`` names that ``-o``.

Each section belongs to one part of the package (``data``, ``model``, ``train``, ``eval``,
``plan``); the owners add fields to their own section only.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ctnocvr_rec.resources import resolve
from ctnocvr_rec.yaml_strict import YamlError, load_yaml_file, parse_yaml_value

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value that does not fit the schema."""


# --------------------------------------------------------------------------------------------
# Valid ranges of numeric fields
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """Valid values of a numeric field: finite and within the bounds (``*_open``: bound excluded).
    For a list field it applies to every element, for a mapping field to every value."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "any finite number"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)  # probabilities, ratios
FRACTION_BELOW_1 = Range(0, 1, high_open=True)  # dropout, reserved share of memory
PROPENSITY_CLIP = Range(0, 1, low_open=True)  # floor of pCTR in inverse-propensity weights


def ranged(default: Any, valid: Range) -> Any:
    """A dataclass field with its valid range in the metadata; ``default`` may be a factory."""
    if callable(default):
        return field(default_factory=default, metadata={"range": valid})
    return field(default=default, metadata={"range": valid})


def _check_range(f: dataclasses.Field, value: Any, where: str) -> None:
    valid: Range | None = f.metadata.get("range")
    if valid is None or value is None:
        return
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not valid.allows(v):
            each = "each value " if isinstance(value, (list, dict)) else ""
            raise ConfigError(f"{where}: {v!r} is out of range; valid values: {each}{valid}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the prepared shards live and how they are read."""

    #: folder written by ``ctnocvr data prepare`` (holds manifest.json, vocab, train/ valid/ test/)
    prepared_dir: str = "artifacts/data/prepared"
    #: field schema: "" = the prepared set's own (its manifest.json; ``ctnocvr plan --preset`` without a
    #: prepared set uses the packaged "aliccp"), else a packaged name ("aliccp") or a YAML path
    #: (relative: to the config file's folder first, then the working directory). A schema given here
    #: selects fields of the prepared set; each must be in the manifest's schema with the same spec.
    schema: str = ""
    train_split: str = "train"
    eval_split: str = "valid"
    test_split: str = "test"
    batch_size: int = ranged(4096, AT_LEAST_1)
    eval_batch_size: int = ranged(8192, AT_LEAST_1)
    num_workers: int = ranged(0, NON_NEGATIVE)
    #: seed of the per-epoch shuffle of shard order and of rows inside a read buffer
    shuffle_seed: int = ranged(0, NON_NEGATIVE)
    #: window of the row shuffle, in batches (0 = shuffle only the row-group order)
    shuffle_buffer_batches: int = ranged(4, NON_NEGATIVE)


@dataclass
class Escm2IpsConfig:
    """ESCM²-IPS (``model.method: escm2_ips``; ctnocvr_rec/modules/escm2_ips.py).

    A field ``<term>_weight`` is the weight of loss term ``<term>``; the CTR weight is
    ``model.loss_weight_ctr``. Defaults of the weights: the ESCM² reference configuration.
    """

    #: λ_c, the counterfactual (IPS) CVR risk over all exposures
    cvr_ips_weight: float = ranged(0.5, NON_NEGATIVE)
    #: λ_g, the global CTCVR risk
    ctcvr_weight: float = ranged(0.5, NON_NEGATIVE)
    #: floor of the propensity pCTR (inverse weight at most 1 / clip)
    propensity_clip: float = ranged(0.05, PROPENSITY_CLIP)
    #: stop the gradient through the inverse propensity (as the reference code)
    detach_propensity: bool = True


@dataclass
class Escm2DrConfig:
    """ESCM²-DR (``model.method: escm2_dr``; ctnocvr_rec/modules/escm2_dr.py). Fields as
    :class:`Escm2IpsConfig`, the CVR risk being the doubly-robust one, plus the imputation loss."""

    cvr_dr_weight: float = ranged(0.5, NON_NEGATIVE)
    #: weight of the imputation tower's error-regression loss (ours: 1)
    imputation_weight: float = ranged(1.0, NON_NEGATIVE)
    ctcvr_weight: float = ranged(0.5, NON_NEGATIVE)
    propensity_clip: float = ranged(0.05, PROPENSITY_CLIP)
    detach_propensity: bool = True


@dataclass
class DcmtConfig:
    """DCMT (``model.method: dcmt``; ctnocvr_rec/modules/dcmt.py). ``<term>_weight`` as above."""

    #: the factual + counterfactual IPS CVR loss
    cvr_dcmt_weight: float = ranged(1.0, NON_NEGATIVE)
    #: λ of the counterfactual prior |1 − (pCVR + pCVR*)| (our default; tune per data set)
    counterfactual_weight: float = ranged(0.1, NON_NEGATIVE)
    #: optional ESMM global risk (0 = logged, not trained)
    ctcvr_weight: float = ranged(0.0, NON_NEGATIVE)
    propensity_clip: float = ranged(0.05, PROPENSITY_CLIP)
    detach_propensity: bool = True


@dataclass
class ChorusCvrConfig:
    """ChorusCVR (``model.method: choruscvr``; ctnocvr_rec/modules/choruscvr.py). ``<term>_weight`` as
    above; the defaults are ours (the paper's could not be checked here)."""

    #: ESMM's global CTCVR risk over all exposures (H2)
    ctcvr_weight: float = ranged(1.0, NON_NEGATIVE)
    #: NDM: BCE(click and not converted, pCTR * pUnCVR) over all exposures (H3)
    ctuncvr_weight: float = ranged(1.0, NON_NEGATIVE)
    #: hard labels on clicked rows: BCE(r, pCVR) + BCE(1 - r, pUnCVR) (H4)
    cvr_weight: float = ranged(0.5, NON_NEGATIVE)
    #: SAM: soft alignment of the two towers on unclicked rows (H5)
    align_weight: float = ranged(0.1, NON_NEGATIVE)


@dataclass
class ModelConfig:
    """Ranker architecture (paper Sec. 2.3 / 3.2). See ``ctnocvr_rec/models/rankers.py``.

    Paper values: the sweep ranges of Sec. 3.2 are given per field; where the paper reports a best
    value (λ_cvr = 0.5, Fig. 3a; ω = 0.01, Fig. 3b) it is the default; other defaults are ours.
    """

    #: backbone, a name of ``BACKBONES`` in ctnocvr_rec/registry.py (esmm, mmoe, cgc, ple)
    arch: str = "mmoe"
    #: CVR objective, a name of ``METHODS`` in ctnocvr_rec/registry.py; ``base`` is the backbone's own
    #: objective. ``use_ctnocvr`` adds the CTnoCVR task to any of them
    method: str = "base"
    #: False = the paper's "Base" model; True = "+CTnoCVR" (ESMM: derived pCTnoCVR term;
    #: MMoE/CGC/PLE: a third task with its own gate and tower, plus the score term)
    use_ctnocvr: bool = True
    #: default embedding dim of every field (paper sweeps {12, 18, 24}). Dims not divisible by 4 are
    #: served by a table of dim ceil4(d) cut back to d (fbgemm kernel constraint; see
    #: modules/field_embedding.py)
    embedding_dim: int = ranged(18, AT_LEAST_1)
    #: per-field overrides of the embedding dim, e.g. {"101": 24}
    field_embedding_dims: dict[str, int] = ranged(dict, AT_LEAST_1)
    #: expert counts (paper sweeps "number of experts and units in {16, 8, 4}")
    num_experts: int = ranged(8, AT_LEAST_1)  # MMoE shared experts
    #: CGC/PLE shared experts (m_s) and experts per task (m_k); 0 is allowed for one of them
    #: (modules/experts.py checks that each task gets at least one expert)
    num_shared_experts: int = ranged(4, NON_NEGATIVE)
    num_task_experts: int = ranged(4, NON_NEGATIVE)
    num_levels: int = ranged(2, AT_LEAST_1)  # PLE extraction levels (CGC is one level; not in the paper)
    #: layer widths of each expert MLP (paper: units in {16, 8, 4})
    expert_hidden: list[int] = ranged(lambda: [16], AT_LEAST_1)
    #: task tower hidden widths (paper: MLP dims {300, 200, 80})
    tower_hidden: list[int] = ranged(lambda: [300, 200, 80], AT_LEAST_1)
    #: hidden widths of the dense arch (modules/dense_arch.py, DLRM-style MLP, ReLU after every layer)
    #: that maps a schema's dense features to one block of ``embedding_dim`` columns joined after the
    #: pooled field embeddings, like one more field (not in the paper; unused by sparse-only schemas).
    #: ``[]``: a single dense -> embedding_dim layer
    dense_hidden: list[int] = ranged(lambda: [64], AT_LEAST_1)
    #: dropout on each tower's input (not in the paper)
    dropout: float = ranged(0.0, FRACTION_BELOW_1)
    #: loss weights of eq. 6 (paper sweeps λ_cvr and λ_ctnocvr over {0.2, 0.5, 0.8, 1, 2, 4, 5};
    #: best λ_cvr = 0.5). The CVR term is averaged over clicked rows only.
    loss_weight_ctr: float = ranged(1.0, NON_NEGATIVE)
    loss_weight_cvr: float = ranged(0.5, NON_NEGATIVE)
    loss_weight_ctnocvr: float = ranged(1.0, NON_NEGATIVE)
    loss_weight_ctcvr: float = ranged(1.0, NON_NEGATIVE)  # ESMM only
    #: the paper's "score weight" ω (swept over 0.0001…0.03, best 0.01, Fig. 3b). Our reading: weight of
    #: BCE(c, pCTR·(1 − pCVR)) in MMoE/CGC/PLE +CTnoCVR (0 disables the term)
    score_weight: float = ranged(0.01, NON_NEGATIVE)
    #: settings of the CVR objectives (used when ``method`` names them)
    escm2_ips: Escm2IpsConfig = field(default_factory=Escm2IpsConfig)
    escm2_dr: Escm2DrConfig = field(default_factory=Escm2DrConfig)
    dcmt: DcmtConfig = field(default_factory=DcmtConfig)
    choruscvr: ChorusCvrConfig = field(default_factory=ChorusCvrConfig)


@dataclass
class OptimConfig:
    #: fused sparse optimiser of the tables: exact_rowwise_adagrad | exact_adagrad | exact_sgd
    #: (CPU kernels support only these three; GPU also: adam, partial_rowwise_adam, lamb, lars_sgd)
    sparse: str = "exact_rowwise_adagrad"
    sparse_lr: float = ranged(0.05, POSITIVE)
    sparse_eps: float = ranged(1e-8, POSITIVE)
    #: dense optimiser: adam | adagrad | sgd
    dense: str = "adam"
    dense_lr: float = ranged(1e-3, POSITIVE)
    weight_decay: float = ranged(0.0, NON_NEGATIVE)
    warmup_steps: int = ranged(0, NON_NEGATIVE)
    #: none | linear | cosine (decay over train.steps after warm-up)
    decay: str = "none"
    #: lr factor at the end of the decay
    min_lr_ratio: float = ranged(0.1, FRACTION)


@dataclass
class TrainConfig:
    seed: int = ranged(0, NON_NEGATIVE)
    epochs: int = ranged(1, AT_LEAST_1)
    #: stop after this many steps (0 = run the epochs)
    steps: int = ranged(0, NON_NEGATIVE)
    #: every N steps (0 = never; the final checkpoint and evaluation always happen)
    eval_every_steps: int = ranged(0, NON_NEGATIVE)
    checkpoint_every_steps: int = ranged(0, NON_NEGATIVE)
    #: newest checkpoints kept (0 = keep all)
    keep_checkpoints: int = ranged(2, NON_NEGATIVE)
    log_every_steps: int = ranged(20, NON_NEGATIVE)
    run_dir: str = "runs/default"
    #: cpu | cuda | auto
    device: str = "auto"
    bf16: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    #: tqdm bar on rank 0 (samples/s, running loss per task); off for tests / batch jobs
    progress_bar: bool = True
    #: keep large step buffers in the glibc heap (mallopt; train/allocator.py): +10-25 % samples/s
    #: on CPU. Off: glibc defaults (more page faults, less resident memory between steps)
    tune_host_allocator: bool = True


@dataclass
class EvalConfig:
    #: write per-row predictions to Parquet in the run folder
    save_predictions: bool = False
    gauc: bool = True
    #: split evaluated at the end of training into metrics.json ("" = data.test_split)
    final_split: str = ""
    #: cap on the batches per rank of the periodic (every N steps) evaluation; 0 = the whole split
    periodic_max_batches: int = ranged(0, NON_NEGATIVE)


@dataclass
class PlanConfig:
    """Embedding sharding plan inputs (shared by `ctnocvr train` and `ctnocvr plan`)."""

    #: path of a saved plan (JSON) to enforce instead of planning
    plan_file: str = ""
    #: none | fixed | heuristic  storage reservation used by the planner
    storage_reservation: str = "fixed"
    storage_reservation_percentage: float = ranged(0.15, FRACTION_BELOW_1)
    #: per-table constraints: {"t_101": {"sharding_types": ["table_wise"], "compute_kernels": ["fused"]}}
    constraints: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: hbm/ddr capacity per rank in GiB (0 = TorchRec's defaults for the device)
    hbm_gb: float = ranged(0.0, NON_NEGATIVE)
    ddr_gb: float = ranged(0.0, NON_NEGATIVE)
    #: greedy proposers stop after this many feasible proposals in a row that are no better
    #: (0 = walk every option, TorchRec's default; 10 reaches the same plans ~4x faster here)
    greedy_threshold: int = ranged(10, NON_NEGATIVE)
    #: on CUDA, search HBM-only kernels first and add UVM/caching kernels only if nothing fits
    #: (same plans when they fit in HBM, ~3x less planning time)
    hbm_first: bool = True
    #: precision of the pooled-embedding all-to-alls of the forward and the backward (TorchRec's
    #: quantized comms): fp32 (exact, the default) | fp16 | bf16 (CUDA/NCCL only). fp16 halves the bytes
    #: each rank sends per step, and rounds the pooled embeddings and their gradients to fp16 on the
    #: way, so results are no longer bit-equal to a 1-rank run: opt in, e.g. for a bandwidth-bound cluster
    comm_forward_precision: str = "fp32"
    comm_backward_precision: str = "fp32"


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


# --------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as e:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from e
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from e
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``values``; unknown keys and out-of-range values are errors naming
    the key and the valid keys / values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    names = list(fields)
    unknown = sorted(set(values) - set(names))
    if unknown:
        at = where or "top level"
        raise ConfigError(f"unknown key(s) {unknown} at {at}; valid keys: {names}")
    kwargs = {}
    for k, v in values.items():
        key_where = f"{where}.{k}" if where else k
        kwargs[k] = _coerce(v, hints[k], key_where)
        _check_range(fields[k], kwargs[k], key_where)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_override(item: str, cls: type | None = None, flag: str = "-o") -> tuple[list[str], Any]:
    """Check one ``a.b.c=value`` override against ``cls`` (default :class:`RunConfig`).

    Returns the key path and the YAML-parsed value (lists, mappings, numbers and booleans can be
    given on the command line). The value is type- and range-checked here, so an error names the
    override as the user typed it (``-o train.epochs=abc: expected an integer, got 'abc'``), not the
    config file it would have gone into. ``model.field_embedding_dims.101=24`` (dotted keys into a
    free-form mapping) gives the path ``["model", "field_embedding_dims", "101"]``.
    """
    cls = cls or RunConfig
    where = f"{flag} {item}"
    if "=" not in item:
        raise ConfigError(f"{where}: an override must look like key.sub=value")
    dotted, raw = (part.strip() for part in item.split("=", 1))
    keys = dotted.split(".")
    node_cls = cls
    for i, key in enumerate(keys):
        fields = {f.name: f for f in dataclasses.fields(node_cls)}
        if key not in fields:
            at = ".".join(keys[:i]) or "top level"
            raise ConfigError(f"{where}: unknown key {key!r} at {at}; valid keys: {list(fields)}")
        tp = typing.get_type_hints(node_cls)[key]
        if i == len(keys) - 1:
            value = parse_yaml_value(raw, where) if raw != "" else ""
            _check_range(fields[key], _coerce(value, tp, where), where)
            return keys, value
        if typing.get_origin(tp) is dict:
            rest = ".".join(keys[i + 1:])
            value = parse_yaml_value(raw, where)
            _check_range(fields[key], {rest: _coerce(value, typing.get_args(tp)[1], where)}, where)
            return [*keys[: i + 1], rest], value
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{where}: {'.'.join(keys[: i + 1])} is not a section")
        node_cls = tp
    raise AssertionError("unreachable")


def _set_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Strict YAML of ``path`` (see ``yaml_strict``); the top level must be a mapping (empty file -> ``{}``).
    Errors are :class:`ConfigError` naming the file and line."""
    try:
        loaded = load_yaml_file(path) or {}
    except YamlError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


#: keys of a run config that name another file: a relative path there is relative to the folder of the
#: YAML file holding it (when it exists there), else to the working directory or a packaged name
FILE_REFERENCES = (("data", "schema"),)


def anchor_file_references(tree: dict[str, Any], base_dir: str | Path) -> dict[str, Any]:
    """Rewrite the :data:`FILE_REFERENCES` of a run-config ``tree`` (read from a YAML file in
    ``base_dir``) that name an existing file relative to ``base_dir`` to absolute paths, in place.

    Other relative values stay as they are and are resolved later (working directory, packaged name).
    Data and output folders (``data.prepared_dir``, ``train.run_dir``) are not references: they stay
    relative to the working directory.
    """
    for keys in FILE_REFERENCES:
        node: Any = tree
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        value = node.get(keys[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            candidate = Path(base_dir) / value
            if candidate.is_file():
                node[keys[-1]] = str(candidate.resolve())
    return tree


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type[T] = RunConfig
) -> T:
    """Load ``cls`` from a YAML file (optional) and ``key.sub=value`` overrides (checked one by one).

    ``path``: a YAML file or the name of a packaged run config (``"mmoe"``), see
    :func:`ctnocvr_rec.resources.resolve`.
    """
    if path:
        try:
            path = resolve("run", path)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    tree = load_yaml_mapping(path) if path else {}
    if path and cls is RunConfig:
        anchor_file_references(tree, Path(path).parent)
    try:
        file_config = from_dict(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{path or '<defaults>'}: {e}") from None
    if not overrides:
        return file_config
    for item in overrides:
        try:
            keys, value = parse_override(item, cls)
        except YamlError as e:
            raise ConfigError(str(e)) from None
        _set_path(tree, keys, value)
    return from_dict(cls, tree)  # each override was checked above; combined they are valid too


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
