"""The *table schema*: a user YAML that maps the columns of any Parquet / CSV files to the fields of a
prepared set (``ctnocvr data prepare --format table --table-schema FILE``; ``docs/formats-table.md``).

It is read strictly: a YAML error, an unknown key, a value of the wrong type or a missing required key
is a :class:`TableSchemaError` naming ``file:line`` and the key, before any input is read. Example::

    labels: {click: clicked, conversion: bought}
    user_id: {column: user, id_type: string}
    fields:
      - {name: user, group: user, id_type: string}
      - {name: tags, group: item, multi_valued: true, weighted: true, mapping: hash, num_buckets: 4096}
    dense:
      - {name: price, transform: log1p, standardize: true}

:func:`load_table_schema` returns a :class:`TableSchema`: where each value comes from (columns, id
types, delimiters) plus the :class:`~ctnocvr_rec.data.schema.FieldSchema` that goes into the manifest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ctnocvr_rec.data.schema import (
    DENSE_TRANSFORMS,
    GROUPS,
    MAPPINGS,
    DenseSpec,
    FieldSchema,
    FieldSpec,
)
from ctnocvr_rec.yaml_strict import StrictSafeLoader, load_yaml_file

ID_TYPES = ("int", "string")
#: field / dense names become shard column names, KJT keys and table names: keep them plain
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")
#: names a field may not take (the shard's scalar columns)
RESERVED_NAMES = frozenset({"sample_id", "request_id", "user_id", "click", "conversion"})


class TableSchemaError(ValueError):
    """A table schema YAML that cannot be used (message: ``file:line: key: problem``)."""


@dataclass(frozen=True)
class IdColumn:
    """An id-valued input column: ``int`` ids are used as they are; ``string`` ids (or any value of a
    ``string`` column, numbers included, as their decimal text) go through ``stable_id_hash``."""

    column: str
    id_type: str = "int"


@dataclass(frozen=True)
class SparseBinding:
    """Where one sparse field's ids (and weights) come from.

    Attributes:
        spec: the field as the prepared set knows it.
        column: input column of the ids: a scalar, a Parquet list, or text (CSV, or a Parquet string
            column) holding ``list_delimiter``-separated ids (multi-valued) or one id.
        id_type: ``int`` or ``string`` (see :class:`IdColumn`).
        weight_column: weighted fields only: a parallel column with one weight per id (a list column,
            a number, or delimited text). Empty: text cells hold ``id<weight_delimiter>weight`` items.
        allow_missing: a null / empty cell is zero ids instead of a rejected row.
    """

    spec: FieldSpec
    column: str
    id_type: str = "int"
    weight_column: str = ""
    allow_missing: bool = False


@dataclass(frozen=True)
class DenseBinding:
    spec: DenseSpec
    column: str


@dataclass(frozen=True)
class CsvOptions:
    """How CSV inputs are split: ``delimiter`` between columns, ``list_delimiter`` between the ids of a
    multi-valued cell, ``weight_delimiter`` between an id and its weight (``7:0.5|9:2``); ``quoting``:
    ``"a, b"`` is one cell (standard CSV). Without it a ``"`` is an ordinary character, so a stray
    quote costs one row instead of joining the lines up to the next quote."""

    delimiter: str = ","
    list_delimiter: str = "|"
    weight_delimiter: str = ":"
    quoting: bool = True


@dataclass(frozen=True)
class TableSchema:
    source: str
    click: str
    conversion: str
    user_id: IdColumn | None
    request_id: IdColumn | None
    sparse: tuple[SparseBinding, ...]
    dense: tuple[DenseBinding, ...]
    csv: CsvOptions
    field_schema: FieldSchema

    def required_columns(self) -> list[str]:
        """Every input column the schema reads, in first-use order (labels, ids, fields, dense)."""
        cols = [self.click, self.conversion]
        cols += [c.column for c in (self.user_id, self.request_id) if c is not None]
        for b in self.sparse:
            cols += [b.column] + ([b.weight_column] if b.weight_column else [])
        cols += [d.column for d in self.dense]
        return list(dict.fromkeys(cols))


# ---------------------------------------------------------------------------------------------
# Located YAML: each value keeps its node, so every error names file:line
# ---------------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._loader = StrictSafeLoader("")

    def fail(self, node: yaml.Node, where: str, problem: str) -> TableSchemaError:
        return TableSchemaError(f"{self.path}:{node.start_mark.line + 1}: {where}: {problem}")

    def mapping(self, node: yaml.Node, where: str, allowed: tuple[str, ...]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, where, f"must be a mapping with keys {list(allowed)}")
        self._loader.flatten_mapping(node)  # `<<: *anchor` merges
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self._loader.construct_object(key_node, deep=True)
            if key not in allowed:
                raise self.fail(key_node, where, f"unknown key {key!r}; valid keys: {list(allowed)}")
            out[key] = value_node
        return out

    def sequence(self, node: yaml.Node, where: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, where, "must be a list")
        return list(node.value)

    def value(self, node: yaml.Node, where: str, kind: type | tuple[type, ...], choices: tuple = ()) -> Any:
        """A scalar of ``kind`` (``bool`` is not an ``int`` here), one of ``choices`` when given."""
        value = self._loader.construct_object(node, deep=True)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds).replace("str", "string")
            raise self.fail(node, where, f"must be a {names}, got {value!r}")
        if choices and value not in choices:
            raise self.fail(node, where, f"{value!r} is not one of {list(choices)}")
        return value

    def column(self, node: yaml.Node, where: str) -> str:
        """A column name: a non-empty string (numbers such as ``101`` are taken as their text)."""
        value = self._loader.construct_object(node, deep=True)
        if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
            raise self.fail(node, where, f"must be a column name, got {value!r}")
        return str(value)


# ---------------------------------------------------------------------------------------------
# The schema's parts
# ---------------------------------------------------------------------------------------------

_TOP_KEYS = ("labels", "user_id", "request_id", "csv", "defaults", "fields", "dense")
_FIELD_KEYS = (
    "name", "column", "group", "multi_valued", "weighted", "weight_column", "id_type", "allow_missing",
    "mapping", "min_count", "num_buckets", "table",
)
_DEFAULT_KEYS = ("group", "multi_valued", "weighted", "id_type", "allow_missing", "mapping", "min_count",
                 "num_buckets")
_BOOL_KEYS = ("multi_valued", "weighted", "allow_missing")
_DENSE_KEYS = ("name", "column", "transform", "standardize")


def _field_value(r: _Reader, key: str, node: yaml.Node, where: str) -> Any:
    if key in _BOOL_KEYS:
        return r.value(node, where, bool)
    if key == "group":
        return r.value(node, where, str, GROUPS)
    if key == "mapping":
        return r.value(node, where, str, MAPPINGS)
    if key == "id_type":
        return r.value(node, where, str, ID_TYPES)
    if key in ("min_count", "num_buckets"):
        value = r.value(node, where, int)
        if value < (1 if key == "min_count" else 0):
            raise r.fail(node, where, f"must be >= {1 if key == 'min_count' else 0}, got {value}")
        return value
    if key in ("column", "weight_column"):
        return r.column(node, where)
    return r.value(node, where, str)  # name, table


def _name(r: _Reader, node: yaml.Node, where: str) -> str:
    name = r.column(node, where)
    if not NAME_PATTERN.match(name) or "__" in name or name in RESERVED_NAMES:
        raise r.fail(node, where, f"name {name!r} must match {NAME_PATTERN.pattern}, hold no '__' and not be "
                                  f"one of {sorted(RESERVED_NAMES)} (it names shard columns and tables)")
    return name


def _sparse(r: _Reader, node: yaml.Node, index: int, defaults: dict[str, Any]) -> SparseBinding:
    where = f"fields[{index}]"
    if isinstance(node, yaml.MappingNode):  # name the field in every message, unknown keys included
        names = [v.value for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == "name"
                 and isinstance(v, yaml.ScalarNode)]
        where += f" ({names[0]})" if names else ""
    keys = r.mapping(node, where, _FIELD_KEYS)
    if "name" not in keys:
        raise r.fail(node, where, "needs 'name' (and 'group', here or in 'defaults')")
    name = _name(r, keys["name"], f"{where}.name")
    where = f"fields[{index}] ({name})"
    values = dict(defaults)
    values.update({k: _field_value(r, k, v, f"{where}.{k}") for k, v in keys.items() if k != "name"})
    if "group" not in values:
        raise r.fail(node, where, f"needs 'group' (one of {list(GROUPS)})")
    if values.get("mapping", "vocab") == "hash" and values.get("num_buckets", 0) <= 0:
        raise r.fail(node, where, "mapping 'hash' needs num_buckets > 0")
    if "weight_column" in values and not values.get("weighted", False):
        raise r.fail(keys["weight_column"], f"{where}.weight_column", "only a 'weighted: true' field has weights")
    spec = FieldSpec(
        name=name,
        group=values["group"],
        multi_valued=values.get("multi_valued", False),
        weighted=values.get("weighted", False),
        mapping=values.get("mapping", "vocab"),
        min_count=values.get("min_count", 1),
        num_buckets=values.get("num_buckets", 0),
        table=values.get("table", ""),
    )
    return SparseBinding(spec, values.get("column", name), values.get("id_type", "int"),
                         values.get("weight_column", ""), values.get("allow_missing", False))


def _dense(r: _Reader, node: yaml.Node, index: int) -> DenseBinding:
    where = f"dense[{index}]"
    if isinstance(node, yaml.ScalarNode):  # `- price` is `- {name: price}`
        name = _name(r, node, where)
        return DenseBinding(DenseSpec(name), name)
    keys = r.mapping(node, where, _DENSE_KEYS)
    if "name" not in keys:
        raise r.fail(node, where, "needs 'name'")
    name = _name(r, keys["name"], f"{where}.name")
    where = f"dense[{index}] ({name})"
    transform = r.value(keys["transform"], f"{where}.transform", str, DENSE_TRANSFORMS) if "transform" in keys else "none"
    standardize = r.value(keys["standardize"], f"{where}.standardize", bool) if "standardize" in keys else False
    column = r.column(keys["column"], f"{where}.column") if "column" in keys else name
    return DenseBinding(DenseSpec(name, transform, standardize), column)


def _id_column(r: _Reader, node: yaml.Node, where: str) -> IdColumn:
    if isinstance(node, yaml.ScalarNode):
        return IdColumn(r.column(node, where))
    keys = r.mapping(node, where, ("column", "id_type"))
    if "column" not in keys:
        raise r.fail(node, where, "needs 'column'")
    id_type = r.value(keys["id_type"], f"{where}.id_type", str, ID_TYPES) if "id_type" in keys else "int"
    return IdColumn(r.column(keys["column"], f"{where}.column"), id_type)


def _labels(r: _Reader, node: yaml.Node) -> tuple[str, str]:
    keys = r.mapping(node, "labels", ("click", "conversion", "conversion_requires_click"))
    for key in ("click", "conversion"):
        if key not in keys:
            raise r.fail(node, "labels", f"needs '{key}' (the column of the {key} label, values 0/1)")
    if "conversion_requires_click" in keys:
        # a note of the semantics, not an option: the CTnoCVR label needs conversion ⊆ click, so the
        # writer always rejects click=0, conversion=1 (reason invalid_label_pair)
        r.value(keys["conversion_requires_click"], "labels.conversion_requires_click", bool, (True,))
    return r.column(keys["click"], "labels.click"), r.column(keys["conversion"], "labels.conversion")


def _csv(r: _Reader, node: yaml.Node) -> CsvOptions:
    keys = r.mapping(node, "csv", ("delimiter", "list_delimiter", "weight_delimiter", "quoting"))
    values: dict[str, Any] = {}
    if "quoting" in keys:
        values["quoting"] = r.value(keys.pop("quoting"), "csv.quoting", bool)
    for key, value_node in keys.items():
        value = r.value(value_node, f"csv.{key}", str)
        if len(value) != 1 or value in "\n\r\"":
            raise r.fail(value_node, f"csv.{key}", f"must be one character (not a quote or newline), got {value!r}")
        values[key] = value
    options = CsvOptions(**values)
    chars = [options.delimiter, options.list_delimiter, options.weight_delimiter]
    if len(set(chars)) != 3:
        raise r.fail(node, "csv", f"delimiter, list_delimiter and weight_delimiter must differ, got {chars}")
    return options


def load_table_schema(path: str | Path) -> TableSchema:
    """Read and validate the table schema YAML ``path`` (:class:`TableSchemaError` names file:line)."""
    path = Path(path)
    try:
        load_yaml_file(path)  # syntax, unsafe tags, duplicate keys: YamlError with file:line
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise TableSchemaError(f"{path}: cannot read the table schema: {e.strerror}") from None
    root = yaml.compose(text, Loader=StrictSafeLoader)
    r = _Reader(path)
    if root is None:
        raise TableSchemaError(f"{path}: empty table schema (needs 'labels' and 'fields')")
    top = r.mapping(root, "table schema", _TOP_KEYS)
    for key in ("labels", "fields"):
        if key not in top:
            raise r.fail(root, "table schema", f"needs '{key}'")
    click, conversion = _labels(r, top["labels"])
    defaults: dict[str, Any] = {}
    if "defaults" in top:
        for key, node in r.mapping(top["defaults"], "defaults", _DEFAULT_KEYS).items():
            defaults[key] = _field_value(r, key, node, f"defaults.{key}")
    field_nodes = r.sequence(top["fields"], "fields")
    if not field_nodes:
        raise r.fail(top["fields"], "fields", "needs at least one sparse field")
    sparse = tuple(_sparse(r, node, i, defaults) for i, node in enumerate(field_nodes))
    dense = tuple(_dense(r, node, i) for i, node in enumerate(r.sequence(top["dense"], "dense"))) \
        if "dense" in top else ()
    names = [b.spec.name for b in sparse] + [d.spec.name for d in dense]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise r.fail(root, "fields/dense", f"duplicate name(s) {dup}")
    return TableSchema(
        source=str(path),
        click=click,
        conversion=conversion,
        user_id=_id_column(r, top["user_id"], "user_id") if "user_id" in top else None,
        request_id=_id_column(r, top["request_id"], "request_id") if "request_id" in top else None,
        sparse=sparse,
        dense=dense,
        csv=_csv(r, top["csv"]) if "csv" in top else CsvOptions(),
        field_schema=FieldSchema(tuple(b.spec for b in sparse), source=str(path),
                                 dense=tuple(d.spec for d in dense)),
    )
