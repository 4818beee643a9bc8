"""Typed run configuration: nested dataclasses loaded from YAML with dotted overrides.

``load_config("configs/mmoe.yaml", ["model.num_experts=8", "train.steps=200"])`` returns a
:class:`RunConfig`. Unknown keys (in YAML or in an override) raise :class:`ConfigError` listing the
valid keys at that level, so a typo never silently falls back to a default.

Each section belongs to one part of the package (``data``, ``model``, ``train``, ``eval``,
``plan``); the owners add fields to their own section only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value that does not fit the schema."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the prepared shards live and how they are read."""

    #: folder written by ``ctnocvr data prepare`` (holds manifest.json, vocab, train/ valid/ test/)
    prepared_dir: str = "artifacts/data/prepared"
    #: field schema YAML (see configs/fields/aliccp.yaml)
    schema: str = "configs/fields/aliccp.yaml"
    train_split: str = "train"
    eval_split: str = "valid"
    test_split: str = "test"
    batch_size: int = 4096
    eval_batch_size: int = 8192
    num_workers: int = 0
    #: seed of the per-epoch shuffle of shard order and of rows inside a read buffer
    shuffle_seed: int = 0
    shuffle_buffer_batches: int = 4


@dataclass
class Escm2IpsConfig:
    """ESCM²-IPS (``model.method: escm2_ips``; ctnocvr_rec/modules/escm2_ips.py).

    A field ``<term>_weight`` is the weight of loss term ``<term>``; the CTR weight is
    ``model.loss_weight_ctr``. Defaults of the weights: the ESCM² reference configuration.
    """

    #: λ_c, the counterfactual (IPS) CVR risk over all exposures
    cvr_ips_weight: float = 0.5
    #: λ_g, the global CTCVR risk
    ctcvr_weight: float = 0.5
    #: floor of the propensity pCTR (inverse weight at most 1 / clip)
    propensity_clip: float = 0.05
    #: stop the gradient through the inverse propensity (as the reference code)
    detach_propensity: bool = True


@dataclass
class Escm2DrConfig:
    """ESCM²-DR (``model.method: escm2_dr``; ctnocvr_rec/modules/escm2_dr.py). Fields as
    :class:`Escm2IpsConfig`, the CVR risk being the doubly-robust one, plus the imputation loss."""

    cvr_dr_weight: float = 0.5
    #: weight of the imputation tower's error-regression loss (ours: 1)
    imputation_weight: float = 1.0
    ctcvr_weight: float = 0.5
    propensity_clip: float = 0.05
    detach_propensity: bool = True


@dataclass
class DcmtConfig:
    """DCMT (``model.method: dcmt``; ctnocvr_rec/modules/dcmt.py). ``<term>_weight`` as above."""

    #: the factual + counterfactual IPS CVR loss
    cvr_dcmt_weight: float = 1.0
    #: λ of the counterfactual prior |1 − (pCVR + pCVR*)| (our default; tune per data set)
    counterfactual_weight: float = 0.1
    #: optional ESMM global risk (0 = logged, not trained)
    ctcvr_weight: float = 0.0
    propensity_clip: float = 0.05
    detach_propensity: bool = True


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
    embedding_dim: int = 18
    #: per-field overrides of the embedding dim, e.g. {"101": 24}
    field_embedding_dims: dict[str, int] = field(default_factory=dict)
    #: expert counts (paper sweeps "number of experts and units in {16, 8, 4}")
    num_experts: int = 8  # MMoE shared experts
    num_shared_experts: int = 4  # CGC/PLE shared experts (m_s)
    num_task_experts: int = 4  # CGC/PLE experts per task (m_k)
    num_levels: int = 2  # PLE extraction levels (CGC is one level; not in the paper)
    #: layer widths of each expert MLP (paper: units in {16, 8, 4})
    expert_hidden: list[int] = field(default_factory=lambda: [16])
    #: task tower hidden widths (paper: MLP dims {300, 200, 80})
    tower_hidden: list[int] = field(default_factory=lambda: [300, 200, 80])
    #: dropout on each tower's input (not in the paper)
    dropout: float = 0.0
    #: loss weights of eq. 6 (paper sweeps λ_cvr and λ_ctnocvr over {0.2, 0.5, 0.8, 1, 2, 4, 5};
    #: best λ_cvr = 0.5). The CVR term is averaged over clicked rows only.
    loss_weight_ctr: float = 1.0
    loss_weight_cvr: float = 0.5
    loss_weight_ctnocvr: float = 1.0
    loss_weight_ctcvr: float = 1.0  # ESMM only
    #: the paper's "score weight" ω (swept over 0.0001…0.03, best 0.01, Fig. 3b). Our reading: weight of
    #: BCE(c, pCTR·(1 − pCVR)) in MMoE/CGC/PLE +CTnoCVR (0 disables the term)
    score_weight: float = 0.01
    #: settings of the CVR objectives (used when ``method`` names them)
    escm2_ips: Escm2IpsConfig = field(default_factory=Escm2IpsConfig)
    escm2_dr: Escm2DrConfig = field(default_factory=Escm2DrConfig)
    dcmt: DcmtConfig = field(default_factory=DcmtConfig)


@dataclass
class OptimConfig:
    #: fused sparse optimiser of the tables: exact_rowwise_adagrad | exact_adagrad | exact_sgd
    #: (CPU kernels support only these three; GPU also: adam, partial_rowwise_adam, lamb, lars_sgd)
    sparse: str = "exact_rowwise_adagrad"
    sparse_lr: float = 0.05
    sparse_eps: float = 1e-8
    #: dense optimiser: adam | adagrad | sgd
    dense: str = "adam"
    dense_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    #: none | linear | cosine (decay over train.steps after warm-up)
    decay: str = "none"
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 1
    #: stop after this many steps (0 = run the epochs)
    steps: int = 0
    eval_every_steps: int = 0
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    log_every_steps: int = 20
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
    periodic_max_batches: int = 0


@dataclass
class PlanConfig:
    """Embedding sharding plan inputs (shared by `ctnocvr train` and `ctnocvr plan`)."""

    #: path of a saved plan (JSON) to enforce instead of planning
    plan_file: str = ""
    #: none | fixed | heuristic  storage reservation used by the planner
    storage_reservation: str = "fixed"
    storage_reservation_percentage: float = 0.15
    #: per-table constraints: {"t_101": {"sharding_types": ["table_wise"], "compute_kernels": ["fused"]}}
    constraints: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: hbm/ddr capacity per rank in GiB (0 = TorchRec's defaults for the device)
    hbm_gb: float = 0.0
    ddr_gb: float = 0.0
    #: greedy proposers stop after this many feasible proposals in a row that are no better
    #: (0 = walk every option, TorchRec's default; 10 reaches the same plans ~4x faster here)
    greedy_threshold: int = 10
    #: on CUDA, search HBM-only kernels first and add UVM/caching kernels only if nothing fits
    #: (same plans when they fit in HBM, ~3x less planning time)
    hbm_first: bool = True


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
    """Build dataclass ``cls`` from ``values``; unknown keys are errors naming the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(names))
    if unknown:
        at = where or "top level"
        raise ConfigError(f"unknown key(s) {unknown} at {at}; valid keys: {names}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict[str, Any], cls: type, dotted: str, raw: str) -> None:
    """Apply ``a.b.c=raw`` to the nested dict ``tree`` (validated against ``cls``)."""
    keys = dotted.split(".")
    node, node_cls = tree, cls
    for i, key in enumerate(keys):
        names = [f.name for f in dataclasses.fields(node_cls)]
        if key not in names:
            at = ".".join(keys[:i]) or "top level"
            raise ConfigError(f"unknown key {key!r} in override {dotted!r} at {at}; valid keys: {names}")
        tp = typing.get_type_hints(node_cls)[key]
        if i == len(keys) - 1:
            # YAML parses the value so that lists/dicts/numbers/bools can be given on the CLI
            node[key] = yaml.safe_load(raw) if raw != "" else ""
            return
        if typing.get_origin(tp) is dict:
            # dotted keys into a free-form mapping: model.field_embedding_dims.101=24
            sub = node.setdefault(key, {})
            rest = ".".join(keys[i + 1 :])
            sub[rest] = yaml.safe_load(raw)
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is not a section")
        node = node.setdefault(key, {})
        node_cls = tp


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """``yaml.safe_load`` of ``path``; the top level must be a mapping (empty file -> ``{}``)."""
    with open(path, encoding="utf-8") as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type[T] = RunConfig
) -> T:
    """Load ``cls`` from a YAML file (optional) and ``key.sub=value`` overrides."""
    tree = load_yaml_mapping(path) if path else {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        _set_dotted(tree, cls, dotted.strip(), raw.strip())
    try:
        return from_dict(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{path or '<overrides>'}: {e}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
