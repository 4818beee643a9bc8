"""Small synthetic schemas and batch streams for tests and benchmarks of the rankers.

Builds :class:`CtnocvrBatch` es directly (random unweighted + weighted KJTs, split by
:func:`split_features`, + labels that depend on a few ids), so the
model tests do not need the data pipeline. The labels follow a hidden logistic model over two fields,
so a ranker that learns drives its loss down within a few dozen steps.

Example::

    schema = tiny_schema()
    sizes = {name: 20 for name in schema.names}
    stream = SyntheticStream(schema, sizes, batch_size=256, seed=0)
    batch = stream.next_batch()
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from ctnocvr_rec.config import ModelConfig
from ctnocvr_rec.data.batch import CtnocvrBatch
from ctnocvr_rec.data.schema import FieldSchema

#: table sizes for :func:`tiny_schema`
TINY_SIZES: dict[str, int] = {"ctx": 5, "user": 30, "u_hist": 40, "item": 30, "u_tag": 12, "i_tag": 12, "combo": 25}


def tiny_schema() -> FieldSchema:
    """Seven fields over all four groups, listed out of group order on purpose; ``u_tag`` and
    ``i_tag`` share table ``t_tag``; ``u_hist`` is multi-valued and weighted; ``u_tag`` is weighted,
    so the shared ``t_tag`` is a weighted table and plain ``i_tag`` rides in the weighted KJT too."""
    return FieldSchema.from_dict({"fields": [dict(f) for f in _TINY_FIELDS]}, source="<tiny_schema>")


_TINY_FIELDS: tuple[dict[str, object], ...] = (
    {"name": "ctx", "group": "context"},
    {"name": "user", "group": "user"},
    {"name": "u_hist", "group": "user", "multi_valued": True, "weighted": True},
    {"name": "item", "group": "item"},
    {"name": "u_tag", "group": "user", "table": "t_tag", "weighted": True},
    {"name": "i_tag", "group": "item", "table": "t_tag"},
    {"name": "combo", "group": "combination"},
)


def tiny_dense_schema(num_dense: int = 3) -> FieldSchema:
    """:func:`tiny_schema` plus ``num_dense`` dense features ``d0, d1, ...`` (``d0`` log1p, ``d1``
    standardised, the rest plain; the transforms matter to the writer and serving, not to the model)."""
    dense: list[dict[str, object]] = []
    for k in range(num_dense):
        dense.append({"name": f"d{k}", "transform": "log1p" if k == 0 else "none", "standardize": k == 1})
    tree = {"fields": [dict(f) for f in _TINY_FIELDS], "dense": dense}
    return FieldSchema.from_dict(tree, source="<tiny_dense_schema>")


def tiny_model_config(arch: str, use_ctnocvr: bool, **overrides: object) -> ModelConfig:
    """A small :class:`ModelConfig` for fast tests (dim 6 is not a multiple of 4 on purpose)."""
    cfg = ModelConfig(
        arch=arch,
        use_ctnocvr=use_ctnocvr,
        embedding_dim=6,
        num_experts=4,
        num_task_experts=2,
        num_shared_experts=2,
        num_levels=2,
        expert_hidden=[8],
        tower_hidden=[16],
    )
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise AttributeError(f"ModelConfig has no field {key!r}")
        setattr(cfg, key, value)
    return cfg


def random_kjt(
    schema: FieldSchema,
    num_embeddings: Mapping[str, int],
    batch_size: int,
    generator: torch.Generator,
    max_multi: int = 4,
) -> KeyedJaggedTensor:
    """ONE weighted KJT of every field (the pre-split formulation; :func:`split_features` turns it into
    the batch contract's two KJTs), keys ``f_<field>`` in schema order: one id per single-valued
    field, 0..max_multi per multi-valued field; weights U(0.5, 1.5) for weighted fields, 1.0 otherwise."""
    lengths: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    for spec in schema:
        if spec.multi_valued:
            lens = torch.randint(0, max_multi + 1, (batch_size,), generator=generator)
        else:
            lens = torch.ones(batch_size, dtype=torch.int64)
        n = int(lens.sum())
        lengths.append(lens)
        values.append(torch.randint(0, int(num_embeddings[spec.name]), (n,), generator=generator))
        if spec.weighted:
            weights.append(0.5 + torch.rand(n, generator=generator))
        else:
            weights.append(torch.ones(n))
    return KeyedJaggedTensor(
        keys=schema.feature_names,
        values=torch.cat(values),
        lengths=torch.cat(lengths).to(torch.int32),
        weights=torch.cat(weights),
    )


def _join(kjt_per_key: Mapping[str, JaggedTensor], keys: list[str], stride: int,
          weighted: bool) -> KeyedJaggedTensor:
    parts = [kjt_per_key[k] for k in keys]
    return KeyedJaggedTensor(
        keys=list(keys),
        values=torch.cat([jt.values() for jt in parts]) if parts else torch.empty(0, dtype=torch.int64),
        lengths=torch.cat([jt.lengths() for jt in parts]).to(torch.int32) if parts
        else torch.empty(0, dtype=torch.int32),
        weights=(torch.cat([jt.weights() for jt in parts]) if parts else torch.empty(0)) if weighted else None,
        stride=stride,
    )


def split_features(
    kjt: KeyedJaggedTensor, schema: FieldSchema
) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor | None]:
    """A weighted KJT of every field -> the batch contract's ``(sparse_features, weighted_features)``:
    an unweighted KJT of the unweighted tables' fields and a weighted KJT of the weighted tables'
    fields (``None`` if there are none), both in schema order (``FieldSchema.weighted_feature_names``)."""
    per_key = kjt.to_dict()
    plain = _join(per_key, schema.unweighted_feature_names, kjt.stride(), weighted=False)
    weighted_names = schema.weighted_feature_names
    weighted = _join(per_key, weighted_names, kjt.stride(), weighted=True) if weighted_names else None
    return plain, weighted


def random_features(
    schema: FieldSchema,
    num_embeddings: Mapping[str, int],
    batch_size: int,
    generator: torch.Generator,
    max_multi: int = 4,
) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor | None]:
    """:func:`random_kjt` split into ``(sparse_features, weighted_features)``."""
    return split_features(random_kjt(schema, num_embeddings, batch_size, generator, max_multi), schema)


class SyntheticStream:
    """Endless stream of batches whose labels depend on the first id of two fields.

    ``click ~ Bernoulli(σ(α[id_a] + β))`` and, given a click, ``conversion ~ Bernoulli(σ(γ[id_b] + δ))``,
    where ``a``/``b`` are the first two single-valued fields of the schema (in schema order) and the
    per-id effects are drawn once from the seed. Rows with a click but no conversion get c = 1.
    With dense features in the schema, each batch also carries ``dense`` ``[B, D]`` ~ N(0, 1) and the
    click logit gains ``effect_scale * dense[:, 0]`` (drawn after everything else, so a sparse-only
    schema's stream is the same as without this feature).
    """

    def __init__(
        self,
        schema: FieldSchema,
        num_embeddings: Mapping[str, int],
        batch_size: int,
        seed: int = 0,
        effect_scale: float = 2.5,
        click_bias: float = -1.0,
        conversion_bias: float = -0.5,
    ) -> None:
        self.schema = schema
        self.num_embeddings = dict(num_embeddings)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        singles = [s for s in schema if not s.multi_valued]
        if len(singles) < 2:
            raise ValueError("SyntheticStream needs two single-valued fields")
        self.click_field, self.conversion_field = singles[0], singles[1]
        self.click_effect = effect_scale * torch.randn(num_embeddings[self.click_field.name], generator=self.generator)
        self.conversion_effect = effect_scale * torch.randn(
            num_embeddings[self.conversion_field.name], generator=self.generator
        )
        self.effect_scale = effect_scale
        self.click_bias = click_bias
        self.conversion_bias = conversion_bias

    def next_batch(self) -> CtnocvrBatch:
        kjt = random_kjt(self.schema, self.num_embeddings, self.batch_size, self.generator)
        per_key = kjt.to_dict()
        id_a = per_key[self.click_field.feature_name].values()
        id_b = per_key[self.conversion_field.feature_name].values()
        p_click = torch.sigmoid(self.click_effect[id_a] + self.click_bias)
        p_conv = torch.sigmoid(self.conversion_effect[id_b] + self.conversion_bias)
        dense = None
        if self.schema.dense:
            dense = torch.randn(self.batch_size, len(self.schema.dense), generator=self.generator)
            p_click = torch.sigmoid(self.click_effect[id_a] + self.click_bias + self.effect_scale * dense[:, 0])
        click = (torch.rand(self.batch_size, generator=self.generator) < p_click).float()
        conversion = click * (torch.rand(self.batch_size, generator=self.generator) < p_conv).float()
        plain, weighted = split_features(kjt, self.schema)
        return CtnocvrBatch.from_labels(plain, click, conversion, weighted_features=weighted, dense=dense)

    def __iter__(self) -> SyntheticStream:
        return self

    def __next__(self) -> CtnocvrBatch:
        return self.next_batch()


def copy_global_state(local_state: Mapping[str, object], global_state: Mapping[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors into a possibly sharded state dict, in place.

    ``local_state`` is e.g. ``DistributedModelParallel(...).state_dict()``: plain tensors are copied
    whole; for a ``ShardedTensor`` each local shard receives its slice of the global tensor
    (``shard_offsets`` / ``shard_sizes``). Used to give a sharded model the weights of an unsharded one.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for name, local in local_state.items():
        if name not in global_state:
            raise KeyError(f"{name!r} not in the global state (has: {sorted(global_state)[:8]}...)")
        full = global_state[name].detach()
        with torch.no_grad():
            if isinstance(local, ShardedTensor):
                for shard in local.local_shards():
                    index = tuple(
                        slice(offset, offset + size)
                        for offset, size in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
                    )
                    shard.tensor.copy_(full[index])
            elif isinstance(local, torch.Tensor):
                if hasattr(local, "to_local") and hasattr(local, "placements"):  # DTensor
                    raise NotImplementedError(f"{name}: DTensor state is not supported here")
                local.copy_(full)
            else:
                raise TypeError(f"{name}: unexpected state entry of type {type(local).__name__}")
