"""Field embeddings: the sparse arch of every ranker (paper Sec. 2.3, "feature transformation block").

:class:`FieldEmbedding` builds its tables from a :class:`~ctnocvr_rec.data.schema.FieldSchema`: one
table per field (fields whose schema entry names the same ``table:`` share it), SUM pooling, split
over two :class:`~torchrec.EmbeddingBagCollection` s that follow the batch contract
(``docs/design.md``):

* ``embedding_bag_collection`` (``is_weighted=False``): the unweighted tables, fed the batch's
  unweighted ``sparse_features``; a plain sum of the embedding vectors (paper 2.3);
* ``weighted_embedding_bag_collection`` (``is_weighted=True``): the tables with at least one
  ``weighted: true`` field (``FieldSchema.weighted_table_names``), fed ``weighted_features``; the
  weighted sum (plain fields of such a table carry weight 1.0).

Either is ``None`` when it would have no table (an EBC without tables is invalid). The split exists
for speed: fbgemm's weighted CPU kernels run a weighted csr2csc and always compute per-sample-weight
gradients, which plain fields do not need.

Output layout (fixed, documented, paper 2.3: user and item fields embedded separately, then all field
vectors concatenated into ``x``)::

    x = [ user fields | item fields | combination fields | context fields ]   # [B, output_dim]

Inside a group, fields keep schema order; each field occupies its *logical* embedding dim.

Dims not divisible by 4
-----------------------
fbgemm's fused kernels (the ones TorchRec shards with) require an embedding dim divisible by 4, and
the paper's default dim is 18. A field of logical dim ``d`` is therefore served by a physical table of
dim ``ceil4(d)`` whose pooled output is cut back to the first ``d`` columns. The cuts and the reorder
into group order are views of the pooled ``KeyedTensor`` (selected by key: a sharded EBC orders its
output by sharding group, not by config) joined by one ``torch.cat``. The forward
result, and the gradients of the kept columns, are exactly those of a dim-``d`` table; the padding
columns never reach the loss, so their gradient is zero. Under SGD and EXACT_ADAGRAD the kept
columns are updated exactly as a dim-``d`` table would be. One caveat: EXACT_ROWWISE_ADAGRAD averages
the squared gradient over the row's *physical* columns. The zero-gradient padding columns then make
its accumulator ``d / ceil4(d)`` of a true dim-``d`` table's (18/20 for the paper's dim), so the
effective step is ``sqrt(ceil4(d) / d)`` times larger (about 5 % for dim 18).

Table sizes come from ``num_embeddings`` (``manifest.json["num_embeddings"]``, field name -> rows).
The EBCs are built on the ``meta`` device by default so that the sharding planner places them and
``DistributedModelParallel`` materialises them.

Example::

    schema = load_schema("aliccp")
    emb = FieldEmbedding(schema, num_embeddings, embedding_dim=18, device=torch.device("cpu"))
    x = emb(batch.sparse_features, batch.weighted_features)   # [B, 23 * 18]
    parts = emb.split_groups(x)               # {"user": [B, 13*18], "item": [B, 5*18], ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctnocvr_rec.data.schema import GROUPS, FieldSchema

#: order of the field groups in the concatenated output (paper 2.3: user, item, then the rest)
GROUP_ORDER: tuple[str, ...] = ("user", "item", "combination", "context")
assert set(GROUP_ORDER) == set(GROUPS)

#: fbgemm's fused kernels need an embedding dim divisible by this
KERNEL_DIM_MULTIPLE = 4


def physical_dim(logical_dim: int, multiple: int = KERNEL_DIM_MULTIPLE) -> int:
    """Smallest multiple of ``multiple`` that is >= ``logical_dim`` (18 -> 20, 12 -> 12).

    >>> physical_dim(18), physical_dim(12), physical_dim(1)
    (20, 12, 4)
    """
    if logical_dim <= 0:
        raise ValueError(f"embedding dim must be positive, got {logical_dim}")
    return -(-logical_dim // multiple) * multiple


@dataclass(frozen=True)
class FieldSlot:
    """Where one field lands in the output ``x``."""

    field: str
    feature_name: str
    group: str
    table_name: str
    dim: int  # logical dim (columns in x)
    offset: int  # first column in x


class FieldEmbedding(nn.Module):
    """Unweighted + weighted EBCs over the schema's fields, pooled per field, concatenated in group order.

    Args:
        schema: the field schema (the KJT keys are ``spec.feature_name``).
        num_embeddings: field name -> table rows (``manifest.json["num_embeddings"]``). Fields sharing
            a table use the largest of their sizes.
        embedding_dim: logical dim of every field (paper default 18; sweep {12, 18, 24}).
        field_embedding_dims: per-field overrides of ``embedding_dim`` (field name -> dim). Fields
            sharing a table must end up with the same dim.
        device: where the tables are created; ``meta`` (default) leaves placement to the planner/DMP.

    Call: ``features`` (unweighted KJT of the unweighted tables' fields, keys ``f_<field>``, stride
    ``B``), ``weighted_features`` (weighted KJT of the weighted tables' fields, or ``None`` when there
    are none) -> ``x`` ``[B, output_dim]``.
    """

    def __init__(
        self,
        schema: FieldSchema,
        num_embeddings: Mapping[str, int],
        embedding_dim: int = 18,
        field_embedding_dims: Mapping[str, int] | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        overrides = dict(field_embedding_dims or {})
        unknown = sorted(set(overrides) - set(schema.names))
        if unknown:
            raise ValueError(
                f"field_embedding_dims names field(s) {unknown} that are not in schema "
                f"{schema.source or '<schema>'}; fields: {schema.names}"
            )
        missing = [name for name in schema.names if name not in num_embeddings]
        if missing:
            raise ValueError(
                f"num_embeddings has no table size for field(s) {missing} "
                f"(schema {schema.source or '<schema>'}); it has: {sorted(num_embeddings)}"
            )

        # Tables, in first-use schema order; each table collects its fields' feature names.
        table_dim: dict[str, int] = {}
        table_rows: dict[str, int] = {}
        table_features: dict[str, list[str]] = {}
        table_first_field: dict[str, str] = {}
        field_dim: dict[str, int] = {}
        for spec in schema:
            dim = int(overrides.get(spec.name, embedding_dim))
            if dim <= 0:
                raise ValueError(f"field {spec.name}: embedding dim must be positive, got {dim}")
            rows = int(num_embeddings[spec.name])
            if rows <= 0:
                raise ValueError(f"field {spec.name}: num_embeddings must be positive, got {rows}")
            field_dim[spec.name] = dim
            table = spec.table_name
            if table in table_dim:
                if table_dim[table] != dim:
                    raise ValueError(
                        f"fields {table_first_field[table]} and {spec.name} share table {table!r} "
                        f"but have embedding dims {table_dim[table]} and {dim}"
                    )
                table_rows[table] = max(table_rows[table], rows)
                table_features[table].append(spec.feature_name)
            else:
                table_dim[table] = dim
                table_rows[table] = rows
                table_features[table] = [spec.feature_name]
                table_first_field[table] = spec.name

        def configs(names: list[str]) -> list[EmbeddingBagConfig]:
            return [
                EmbeddingBagConfig(
                    name=table,
                    embedding_dim=physical_dim(table_dim[table]),
                    num_embeddings=table_rows[table],
                    feature_names=list(table_features[table]),
                    pooling=PoolingType.SUM,
                )
                for table in names
            ]

        weighted_tables = schema.weighted_table_names
        unweighted = configs([t for t in table_dim if t not in weighted_tables])
        weighted = configs([t for t in table_dim if t in weighted_tables])
        device = device if device is not None else torch.device("meta")
        self.embedding_bag_collection: EmbeddingBagCollection | None = (
            EmbeddingBagCollection(tables=unweighted, is_weighted=False, device=device) if unweighted else None
        )
        self.weighted_embedding_bag_collection: EmbeddingBagCollection | None = (
            EmbeddingBagCollection(tables=weighted, is_weighted=True, device=device) if weighted else None
        )
        #: KJT keys each EBC reads (schema order)
        self.unweighted_feature_names: list[str] = schema.unweighted_feature_names
        self.weighted_feature_names: list[str] = schema.weighted_feature_names

        self._physical: dict[str, int] = {
            feature: cfg.embedding_dim for cfg in (*unweighted, *weighted) for feature in cfg.feature_names
        }
        slots: list[FieldSlot] = []
        offset = 0
        for group in GROUP_ORDER:
            for spec in schema.by_group(group):
                dim = field_dim[spec.name]
                slots.append(FieldSlot(spec.name, spec.feature_name, group, spec.table_name, dim, offset))
                offset += dim
        self.slots: tuple[FieldSlot, ...] = tuple(slots)
        self.group_dims: dict[str, int] = {
            g: sum(s.dim for s in slots if s.group == g) for g in GROUP_ORDER
        }
        self.output_dim: int = offset
        self._weighted_set: frozenset[str] = frozenset(self.weighted_feature_names)

    @property
    def feature_names(self) -> list[str]:
        """KJT keys in output order."""
        return [s.feature_name for s in self.slots]

    def forward(
        self, features: KeyedJaggedTensor, weighted_features: KeyedJaggedTensor | None = None
    ) -> torch.Tensor:
        """``features`` (unweighted KJT), ``weighted_features`` (weighted KJT or None) -> ``[B, output_dim]``."""
        # Select by key, never by position: a *sharded* EBC orders its output keys by sharding
        # group, not by table config, so column offsets computed from the config would be wrong.
        # (Two separate dicts rather than one merged: under the pipeline's fx trace the pooled
        # outputs are Proxies, which support indexing but not iteration.)
        # Both EBCs are called before either result is read. Sharded, each call runs its lookup,
        # starts the all-to-all of its pooled output and returns a lazy awaitable; reading it
        # (``to_dict``) waits. So the weighted tables' all-to-all is under way while the unweighted
        # lookup runs, and in the backward the two gradient all-to-alls overlap the other EBC's
        # kernel too. Unsharded, the order changes nothing.
        weighted_out = None
        if self.weighted_embedding_bag_collection is not None:
            if weighted_features is None:
                raise ValueError(
                    f"FieldEmbedding: fields {self.weighted_feature_names} belong to weighted tables, but "
                    "weighted_features is None (build the batch with the schema's weighted/unweighted split, "
                    "CtnocvrBatch.weighted_features)"
                )
            weighted_out = self.weighted_embedding_bag_collection(weighted_features)
        plain_out = self.embedding_bag_collection(features) if self.embedding_bag_collection is not None else None
        pooled_plain = plain_out.to_dict() if plain_out is not None else None  # {f_<field>: [B, ceil4(dim)]}
        pooled_weighted = weighted_out.to_dict() if weighted_out is not None else None
        parts = []
        for slot in self.slots:
            pooled = pooled_weighted if slot.feature_name in self._weighted_set else pooled_plain
            assert pooled is not None  # every slot's table lives in one of the two EBCs
            column = pooled[slot.feature_name]
            parts.append(column if slot.dim == self._physical[slot.feature_name] else column[:, : slot.dim])
        # One copy: drops the padding columns and puts the fields in group order.
        return torch.cat(parts, dim=1)

    def split_groups(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x`` ``[B, output_dim]`` -> ``{group: [B, group_dims[group]]}`` (empty groups omitted)."""
        parts: dict[str, torch.Tensor] = {}
        start = 0
        for group in GROUP_ORDER:
            width = self.group_dims[group]
            if width:
                parts[group] = x[:, start : start + width]
            start += width
        return parts
