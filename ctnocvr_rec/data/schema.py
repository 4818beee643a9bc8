"""Field schema: which Ali-CCP fields exist, their group, arity, weighting and id mapping.

The schema is data (the packaged ``ctnocvr_rec/configs/fields/aliccp.yaml``, named ``aliccp``), not code: readers, loaders and the embedding
module all iterate over :class:`FieldSchema` instead of naming fields.

Naming conventions used across the package:

* ``spec.name`` – the Ali-CCP field id (``"101"``, ``"109_14"``), also the Parquet column name;
* ``spec.weight_column`` – ``"<name>__w"``, the Parquet column of weights of a weighted field;
* ``spec.feature_name`` – ``"f_<name>"``, the key in the ``KeyedJaggedTensor``;
* ``spec.table_name`` – ``"t_<name>"`` unless the YAML sets ``table:`` to share a table;
* ``dense.column`` – ``"<name>__d"``, the float32 Parquet column of a dense (numeric) feature.

Dense features (optional ``dense:`` list in the YAML) are numbers, not ids: a prepared set stores
each as one non-nullable float32 column, already transformed (``log1p`` and/or standardised with the
mean and standard deviation fitted on the train split; the fitted values are in the manifest under
``dense_stats``), and the batch carries them as one ``[B, D]`` tensor in :attr:`FieldSchema.dense`
order. A schema without ``dense:`` is sparse-only, exactly as before.

Weighted vs unweighted features (the batch carries two KJTs, the model two EBCs): a *table* is
weighted when any field mapped to it is ``weighted: true``; every field of a weighted table goes to
the weighted KJT (plain ones with weight 1.0), the rest to the unweighted KJT. The rule lives only in
:attr:`FieldSchema.weighted_table_names` and the properties built on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctnocvr_rec.resources import resolve
from ctnocvr_rec.yaml_strict import load_yaml_file

GROUPS = ("user", "item", "combination", "context")
MAPPINGS = ("vocab", "hash")
DENSE_TRANSFORMS = ("none", "log1p")
OOV_ID = 0  # vocab mapping: id 0 is the out-of-vocabulary bucket; known ids are 1..V
#: the packaged schema used where nothing names one (synth, prepare, plan --preset)
DEFAULT_SCHEMA = "aliccp"


class SchemaError(ValueError):
    pass


@dataclass(frozen=True)
class FieldSpec:
    name: str
    group: str
    multi_valued: bool = False
    weighted: bool = False
    mapping: str = "vocab"
    min_count: int = 1
    num_buckets: int = 0
    table: str = ""

    @property
    def feature_name(self) -> str:
        return f"f_{self.name}"

    @property
    def table_name(self) -> str:
        return self.table or f"t_{self.name}"

    @property
    def weight_column(self) -> str:
        return f"{self.name}__w"

    @property
    def is_user(self) -> bool:
        """User fields are stored in the common-features file, keyed by common_feature_index."""
        return self.group == "user"


@dataclass(frozen=True)
class DenseSpec:
    """One dense (numeric) feature.

    Attributes:
        name: the input column / field name (``"D109_14"``).
        transform: ``none`` or ``log1p`` (``sign(x) * log1p(|x|)``), applied first.
        standardize: then ``(x - mean) / std`` with mean and std fitted on the train split.
    """

    name: str
    transform: str = "none"
    standardize: bool = False

    @property
    def column(self) -> str:
        return f"{self.name}__d"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "transform": self.transform, "standardize": self.standardize}


@dataclass(frozen=True)
class FieldSchema:
    fields: tuple[FieldSpec, ...]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: dense features, batch column order (empty: a sparse-only schema)
    dense: tuple[DenseSpec, ...] = ()

    def __iter__(self) -> Iterator[FieldSpec]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __getitem__(self, name: str) -> FieldSpec:
        for spec in self.fields:
            if spec.name == name:
                return spec
        raise KeyError(f"field {name!r} not in schema {self.source or ''}; fields: {self.names}")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def feature_names(self) -> list[str]:
        return [f.feature_name for f in self.fields]

    @property
    def weighted_table_names(self) -> frozenset[str]:
        """Tables with at least one ``weighted: true`` field (they are served by the weighted EBC)."""
        return frozenset(f.table_name for f in self.fields if f.weighted)

    @property
    def weighted_fields(self) -> list[FieldSpec]:
        """Fields of weighted tables, schema order (the batch's ``weighted_features``)."""
        weighted_tables = self.weighted_table_names
        return [f for f in self.fields if f.table_name in weighted_tables]

    @property
    def unweighted_fields(self) -> list[FieldSpec]:
        """Fields of unweighted tables, schema order (the batch's ``sparse_features``)."""
        weighted_tables = self.weighted_table_names
        return [f for f in self.fields if f.table_name not in weighted_tables]

    @property
    def weighted_feature_names(self) -> list[str]:
        """KJT keys of :attr:`weighted_fields` (empty: the batch has ``weighted_features=None``)."""
        return [f.feature_name for f in self.weighted_fields]

    @property
    def unweighted_feature_names(self) -> list[str]:
        """KJT keys of :attr:`unweighted_fields`."""
        return [f.feature_name for f in self.unweighted_fields]

    def by_group(self, group: str) -> list[FieldSpec]:
        return [f for f in self.fields if f.group == group]

    @property
    def dense_names(self) -> list[str]:
        return [d.name for d in self.dense]

    @property
    def user_fields(self) -> list[FieldSpec]:
        return [f for f in self.fields if f.is_user]

    @property
    def skeleton_fields(self) -> list[FieldSpec]:
        return [f for f in self.fields if not f.is_user]

    def to_dict(self) -> dict[str, Any]:
        tree: dict[str, Any] = {
            "fields": [
                {
                    "name": f.name,
                    "group": f.group,
                    "multi_valued": f.multi_valued,
                    "weighted": f.weighted,
                    "mapping": f.mapping,
                    "min_count": f.min_count,
                    "num_buckets": f.num_buckets,
                    "table": f.table,
                }
                for f in self.fields
            ]
        }
        if self.dense:  # absent for sparse-only schemas: their manifests stay as before
            tree["dense"] = [d.to_dict() for d in self.dense]
        return tree

    @classmethod
    def from_dict(cls, tree: dict[str, Any], source: str = "") -> FieldSchema:
        defaults = dict(tree.get("defaults") or {})
        raw_fields = tree.get("fields")
        if not isinstance(raw_fields, list) or not raw_fields:
            raise SchemaError(f"{source}: 'fields' must be a non-empty list")
        valid = set(FieldSpec.__dataclass_fields__)
        specs: list[FieldSpec] = []
        for i, entry in enumerate(raw_fields):
            where = f"{source}: fields[{i}]"
            if not isinstance(entry, dict) or "name" not in entry:
                raise SchemaError(f"{where}: each field needs at least 'name' and 'group'")
            unknown = set(entry) - valid
            if unknown:
                raise SchemaError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(valid)}")
            merged = {**{k: v for k, v in defaults.items() if k in valid}, **entry}
            merged["name"] = str(merged["name"])
            spec = FieldSpec(**merged)
            if spec.group not in GROUPS:
                raise SchemaError(f"{where} ({spec.name}): group {spec.group!r} not in {GROUPS}")
            if spec.mapping not in MAPPINGS:
                raise SchemaError(f"{where} ({spec.name}): mapping {spec.mapping!r} not in {MAPPINGS}")
            if spec.mapping == "hash" and spec.num_buckets <= 0:
                raise SchemaError(f"{where} ({spec.name}): mapping 'hash' needs num_buckets > 0")
            specs.append(spec)
        dense = _dense_specs(tree.get("dense"), source)
        names = [s.name for s in specs] + [d.name for d in dense]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SchemaError(f"{source}: duplicate field name(s) {dup}")
        return cls(tuple(specs), source=source, dense=dense)


def _dense_specs(raw: Any, source: str) -> tuple[DenseSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SchemaError(f"{source}: 'dense' must be a list of {{name, transform, standardize}}")
    valid = set(DenseSpec.__dataclass_fields__)
    out = []
    for i, entry in enumerate(raw):
        where = f"{source}: dense[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise SchemaError(f"{where}: each dense feature needs a 'name'")
        unknown = set(entry) - valid
        if unknown:
            raise SchemaError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(valid)}")
        spec = DenseSpec(str(entry["name"]), str(entry.get("transform", "none")), entry.get("standardize", False))
        if spec.transform not in DENSE_TRANSFORMS:
            raise SchemaError(f"{where} ({spec.name}): transform {spec.transform!r} not in {DENSE_TRANSFORMS}")
        if not isinstance(spec.standardize, bool):
            raise SchemaError(f"{where} ({spec.name}): standardize must be true or false")
        out.append(spec)
    return tuple(out)


def load_schema(ref: str | Path, base_dir: str | Path | None = None) -> FieldSchema:
    """The field schema ``ref`` names: a YAML file, or a packaged schema name (``"aliccp"``).

    ``base_dir``: folder that a relative ``ref`` is looked up in first (the folder of the config file
    holding the reference); the rule is :func:`ctnocvr_rec.resources.resolve`.
    """
    path = resolve("fields", ref, base_dir)
    tree = load_yaml_file(path) or {}  # YamlError (file:line) on bad YAML / duplicate keys
    if not isinstance(tree, dict):
        raise SchemaError(f"{path}: top level must be a mapping with 'fields'")
    return FieldSchema.from_dict(tree, source=str(path))
