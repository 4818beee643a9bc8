"""Embedding tables for planning: their sizes (prepared set, config or preset) and the module to plan.

The planner must see exactly the module the trainer shards, otherwise a saved plan does not apply:
:func:`build_plannable_model` builds the real ranker (``ctnocvr_rec.models.build_model``) on ``meta``.

Table sizes (:func:`resolve_num_embeddings`) come from, in this order: an explicit mapping, a prepared
set's ``manifest.json["num_embeddings"]``, or a preset YAML (``ctnocvr_rec/presets/<name>.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from ctnocvr_rec.config import ModelConfig
from ctnocvr_rec.data.prepared import read_manifest
from ctnocvr_rec.data.schema import FieldSchema
from ctnocvr_rec.yaml_strict import load_yaml_file

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


@dataclass
class TableSizes:
    """Table sizes per field and where they came from (plus optional planner hints)."""

    num_embeddings: dict[str, int]
    source: str
    #: mean ids per sample per field (planner pooling factor), when the source knows it
    pooling_factors: dict[str, float] = field(default_factory=dict)


def list_presets() -> list[str]:
    return sorted(p.stem.replace("_", "-") for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> TableSizes:
    """Read ``presets/<name>.yaml`` (``aliccp-full`` -> ``aliccp_full.yaml``)."""
    path = PRESET_DIR / f"{name.replace('-', '_')}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no preset {name!r} ({path}); presets: {list_presets()}")
    tree = load_yaml_file(path) or {}
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path}: top level must be a mapping with 'fields'")
    fields = tree.get("fields")
    if not isinstance(fields, Mapping) or not fields:
        raise ValueError(f"{path}: 'fields' must be a mapping field -> {{num_embeddings, pooling_factor}}")
    sizes: dict[str, int] = {}
    pooling: dict[str, float] = {}
    for name_, entry in fields.items():
        where = f"{path}: fields.{name_}"
        if not isinstance(entry, Mapping) or "num_embeddings" not in entry:
            raise ValueError(f"{where}: needs 'num_embeddings'")
        sizes[str(name_)] = _positive_int(entry["num_embeddings"], f"{where}.num_embeddings")
        if "pooling_factor" in entry:
            pooling[str(name_)] = float(entry["pooling_factor"])
    return TableSizes(sizes, source=f"preset {name} ({path.name})", pooling_factors=pooling)


def load_manifest_sizes(prepared_dir: str | Path) -> TableSizes:
    """``num_embeddings`` per field from ``<prepared_dir>/manifest.json``."""
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run `ctnocvr data prepare` first, point --prepared at a prepared set, "
            f"or use built-in sizes with --preset ({', '.join(list_presets())})"
        )
    manifest = read_manifest(prepared_dir)
    raw = manifest.get("num_embeddings")
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{path}: no 'num_embeddings' mapping")
    sizes = {str(k): _positive_int(v, f"{path}: num_embeddings.{k}") for k, v in raw.items()}
    return TableSizes(sizes, source=str(path))


def _positive_int(value: Any, where: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{where}: expected a positive integer, got {value!r}")
    return n


def resolve_num_embeddings(
    schema: FieldSchema,
    prepared_dir: str | Path | None = None,
    preset: str | None = None,
    explicit: Mapping[str, int] | None = None,
) -> TableSizes:
    """Table sizes for every schema field; hash fields fall back to their ``num_buckets``."""
    if explicit:
        sizes = TableSizes({str(k): int(v) for k, v in explicit.items()}, source="explicit sizes")
    elif preset:
        sizes = load_preset(preset)
    elif prepared_dir:
        sizes = load_manifest_sizes(prepared_dir)
    else:
        sizes = TableSizes({}, source="schema num_buckets")
    for spec in schema:
        if spec.name not in sizes.num_embeddings and spec.mapping == "hash":
            sizes.num_embeddings[spec.name] = spec.num_buckets
    missing = [spec.name for spec in schema if spec.name not in sizes.num_embeddings]
    if missing:
        raise ValueError(
            f"{sizes.source}: no table size for field(s) {missing} of schema {schema.source}; "
            "give --prepared DIR, --preset NAME, or hash mappings with num_buckets"
        )
    return sizes


def build_plannable_model(
    model_cfg: ModelConfig,
    schema: FieldSchema,
    num_embeddings: Mapping[str, int],
    device: torch.device | None = None,
) -> tuple[nn.Module, str]:
    """The ranker the trainer shards, built on ``meta`` (default), and a word on what it is.

    The tables come from the model's own :class:`~ctnocvr_rec.modules.field_embedding.FieldEmbedding`
    (physical dims rounded up to a multiple of 4 there), so the plan's module paths, table names and
    shapes are exactly what ``ctnocvr train`` hands to DMP.
    """
    from ctnocvr_rec.models import build_model

    model = build_model(model_cfg, schema, dict(num_embeddings), device=device or torch.device("meta"))
    return model, f"{model_cfg.arch} ranker"


def find_ebcs(module: nn.Module) -> dict[str, EmbeddingBagCollection]:
    """``{module path: EBC}`` of every EmbeddingBagCollection in ``module``."""
    return {name: sub for name, sub in module.named_modules() if isinstance(sub, EmbeddingBagCollection)}
