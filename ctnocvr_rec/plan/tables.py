"""Embedding tables for planning: their sizes (prepared set, config or preset) and the module to plan.

The planner must see exactly the module the trainer shards, otherwise a saved plan does not apply:
:func:`build_plannable_model` builds the real ranker (``ctnocvr_rec.models.build_model``) on ``meta``.

Table sizes (:func:`resolve_num_embeddings`) come from, in this order: an explicit mapping, a prepared
set's ``manifest.json["num_embeddings"]``, or a preset YAML (packaged:
``ctnocvr_rec/configs/presets/<name>.yaml``; a path to a preset YAML works too).
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
from ctnocvr_rec.data.prepared import PreparedSet
from ctnocvr_rec.data.schema import FieldSchema
from ctnocvr_rec.resources import packaged_names, resolve
from ctnocvr_rec.yaml_strict import load_yaml_file


@dataclass
class TableSizes:
    """Table sizes per field and where they came from (plus optional planner hints)."""

    num_embeddings: dict[str, int]
    source: str
    #: mean ids per sample per field (planner pooling factor), when the source knows it
    pooling_factors: dict[str, float] = field(default_factory=dict)


def list_presets() -> list[str]:
    return packaged_names("preset")


def load_preset(name: str) -> TableSizes:
    """Read the packaged ``configs/presets/<name>.yaml`` (``aliccp-full`` -> ``aliccp_full.yaml``) or a
    preset YAML file."""
    path = resolve("preset", name)
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


def open_prepared(prepared_dir: str | Path, schema: FieldSchema | str | Path | None = None) -> PreparedSet:
    """:meth:`PreparedSet.open`, with a missing manifest explained for the planner's user."""
    if not PreparedSet.exists(prepared_dir):
        raise FileNotFoundError(
            f"{Path(prepared_dir) / 'manifest.json'} does not exist: run `ctnocvr data prepare` first, point "
            f"--prepared at a prepared set, or use built-in sizes with --preset ({', '.join(list_presets())})"
        )
    return PreparedSet.open(prepared_dir, schema)


def load_manifest_sizes(prepared: str | Path | PreparedSet) -> TableSizes:
    """``num_embeddings`` per field from a prepared set's ``manifest.json``, and its train split's
    mean ids per row as pooling factors (:meth:`PreparedSet.ids_per_row`)."""
    if not isinstance(prepared, PreparedSet):
        prepared = open_prepared(prepared)
    path = prepared.manifest_path
    raw = prepared.manifest.get("num_embeddings")
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{path}: no 'num_embeddings' mapping")
    sizes = {str(k): _positive_int(v, f"{path}: num_embeddings.{k}") for k, v in raw.items()}
    return TableSizes(sizes, source=str(path), pooling_factors=prepared.ids_per_row("train"))


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
    prepared_dir: str | Path | PreparedSet | None = None,
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
