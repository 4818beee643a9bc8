"""One handle on a prepared set (``ctnocvr data prepare`` output); no torch import.

A prepared set is ``<root>/manifest.json`` plus ``<split>/*.parquet`` shards and ``vocab/`` (design.md,
"Prepared data set"; shards are written by :mod:`ctnocvr_rec.data.shards`). :class:`PreparedSet` reads
the manifest and its schema once; the trainer, the planner, ``ctnocvr data stats``, the experiments
and the test fixtures all go through it instead of reading ``manifest.json`` themselves. It is light
to import (json, pathlib) so commands that must start fast (``stats``, ``ctnocvr --help``) can use it.

The manifest's schema is the one source of the field list. A caller may pass a schema to *select*
fields (train on fewer fields than were prepared); every selected field must then be in the
manifest's schema with the same spec, else :class:`ValueError` names the field and both sources.

Example::

    prepared = PreparedSet.open("artifacts/demo/prepared")
    prepared.schema.names          # ['101', '121', ...] from manifest.json
    prepared.num_embeddings["205"] # table rows of field 205
    prepared.rows("train"), prepared.files("train")[:1]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctnocvr_rec.data.schema import FieldSchema, load_schema

MANIFEST_FILE = "manifest.json"
#: the ``format`` written into every manifest
FORMAT = "ctnocvr-prepared/1"
#: split folders in their canonical order (others, if any, follow by name)
SPLIT_ORDER = ("train", "valid", "test")


def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """``<prepared_dir>/manifest.json`` as a dict (prefer :meth:`PreparedSet.open`).

    Raises ``FileNotFoundError`` when it is missing and ``ValueError`` (file, line) when it is not
    valid JSON or not a JSON object.
    """
    path = Path(prepared_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a folder written by `ctnocvr data prepare`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def write_manifest(root: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``<root>/manifest.json`` (indented, trailing newline: byte-stable for equal input)."""
    path = Path(root) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def _select_schema(manifest_schema: FieldSchema | None, requested: FieldSchema | None, where: str) -> FieldSchema:
    if requested is None:
        if manifest_schema is None:
            raise ValueError(f"{where}: the manifest holds no schema; pass one (data.schema / --schema)")
        return manifest_schema
    if manifest_schema is None:  # a manifest from before schemas were recorded: trust the caller
        return requested
    for spec in requested:
        if spec.name not in manifest_schema.names:
            raise ValueError(
                f"{requested.source}: field {spec.name!r} is not in the prepared set's schema ({where}); "
                f"its fields: {manifest_schema.names}"
            )
        if manifest_schema[spec.name] != spec:
            raise ValueError(
                f"{requested.source}: field {spec.name!r} differs from the prepared set's ({where}): "
                f"{spec} vs {manifest_schema[spec.name]} (prepared with another schema?)"
            )
    prepared_dense = {d.name: d for d in manifest_schema.dense}
    for dense in requested.dense:
        if prepared_dense.get(dense.name) != dense:
            raise ValueError(
                f"{requested.source}: dense feature {dense.name!r} ({dense}) is not among the prepared set's "
                f"({where}): {list(prepared_dense.values()) or 'none'} (prepared with another schema?)"
            )
    return requested


@dataclass(frozen=True)
class PreparedSet:
    """A prepared set on disk: its manifest, the schema in use, table sizes, splits and shards.

    Attributes:
        root: the prepared folder.
        manifest: ``manifest.json`` as read (not modified).
        schema: the schema in use: the manifest's, or the caller's selection of its fields.
        num_embeddings: table rows per field (``manifest["num_embeddings"]``), every prepared field.
        prepared_schema: the manifest's own schema (None for a manifest without one).
    """

    root: Path
    manifest: dict[str, Any]
    schema: FieldSchema
    num_embeddings: dict[str, int]
    prepared_schema: FieldSchema | None = None

    @classmethod
    def open(cls, root: str | Path, schema: FieldSchema | str | Path | None = None) -> PreparedSet:
        """Read ``<root>/manifest.json`` once. ``schema``: None/"" = the manifest's; a
        :class:`FieldSchema`, packaged name or YAML path selects fields (see :meth:`select`)."""
        root = Path(root)
        manifest = read_manifest(root)
        where = str(root / MANIFEST_FILE)
        tree = manifest.get("schema")
        prepared_schema = (
            FieldSchema.from_dict(tree, source=f"{where}:schema")
            if isinstance(tree, dict) and tree.get("fields") else None
        )
        raw_sizes = manifest.get("num_embeddings") or {}
        if not isinstance(raw_sizes, dict):
            raise ValueError(f"{where}: 'num_embeddings' must be a mapping field -> rows")
        try:
            sizes = {str(k): int(v) for k, v in raw_sizes.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{where}: 'num_embeddings' values must be integers") from None
        handle = cls(root, manifest, prepared_schema, sizes, prepared_schema)  # type: ignore[arg-type]
        return handle.select(schema)

    def select(self, schema: FieldSchema | str | Path | None) -> PreparedSet:
        """This set with ``schema`` in use: every field of it must be in the manifest's schema with the
        same spec (``ValueError`` names the field). None/"": the manifest's schema."""
        requested = schema if isinstance(schema, FieldSchema) else load_schema(schema) if schema else None
        chosen = _select_schema(self.prepared_schema, requested, str(self.manifest_path))
        return PreparedSet(self.root, self.manifest, chosen, self.num_embeddings, self.prepared_schema)

    @staticmethod
    def exists(root: str | Path) -> bool:
        """Whether ``root`` holds a manifest (a finished ``prepare``)."""
        return (Path(root) / MANIFEST_FILE).is_file()

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def fingerprint(self) -> str | None:
        """Hash of the inputs and options the set was prepared from (None for hand-written sets)."""
        return self.manifest.get("fingerprint")

    @property
    def splits(self) -> list[str]:
        """Splits with a shard folder, canonical order (train, valid, test, then others by name)."""
        vocab = (self.manifest.get("vocab") or {}).get("folder") or "vocab"  # its files are Parquet too
        present = {
            p.name for p in self.root.iterdir() if p.is_dir() and p.name != vocab and any(p.glob("*.parquet"))
        }
        return [s for s in SPLIT_ORDER if s in present] + sorted(present - set(SPLIT_ORDER))

    def has_split(self, split: str) -> bool:
        return (self.root / split).is_dir()

    def rows(self, split: str) -> int:
        """Rows of ``split`` as recorded in the manifest (0 when it records none)."""
        return int(((self.manifest.get("splits") or {}).get(split) or {}).get("rows", 0))

    def files(self, split: str) -> list[str]:
        """Parquet shards of ``split``, sorted by name; ``FileNotFoundError`` when there are none."""
        return split_files(self.root, split)

    def table_sizes(self) -> dict[str, int]:
        """``num_embeddings`` of every field of :attr:`schema`; ``ValueError`` naming the manifest
        when one is missing."""
        missing = [f.name for f in self.schema if f.name not in self.num_embeddings]
        if missing:
            raise ValueError(
                f"{self.manifest_path}: num_embeddings lacks field(s) {missing} of schema "
                f"{self.schema.source} (prepared with another schema?)"
            )
        return {f.name: self.num_embeddings[f.name] for f in self.schema}

    @property
    def per_request(self) -> dict[str, Any] | None:
        """``manifest["per_request"]`` (:mod:`ctnocvr_rec.data.requests`): fields stored once per
        request and joined by ``request_id``; None when every field is on the rows."""
        entry = self.manifest.get("per_request")
        return entry if isinstance(entry, dict) and entry.get("fields") else None

    @property
    def per_request_fields(self) -> tuple[str, ...]:
        """Names of the fields stored per request (not in the shards); empty for a per-row set."""
        entry = self.per_request
        return tuple(str(n) for n in entry["fields"]) if entry else ()

    def request_store(self) -> Any:
        """The memory-mapped :class:`~ctnocvr_rec.data.requests.RequestStore` (None for a per-row set)."""
        from ctnocvr_rec.data.requests import RequestStore

        entry = self.per_request
        return RequestStore.open(self.root, entry) if entry else None

    def read_table(self, split: str, columns: list[str] | None = None) -> Any:
        """The rows of ``split`` as one ``pyarrow.Table`` (shards in name order), per-request fields
        joined by ``request_id`` as list columns, so a per-request set reads like a per-row one.
        ``columns``: the shard columns and fields wanted (default: all). Reads the whole split into
        memory: for inspection and tests; the loader streams instead."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = self.files(split)
        per_request = set(self.per_request_fields)
        wanted_fields = [n for n in self.per_request_fields
                         if columns is None or n in columns or f"{n}__w" in columns]
        shard_columns = None
        if columns is not None:  # read only what is asked (plus the join key)
            shard_columns = [c for c in columns if c.removesuffix("__w") not in per_request]
            if wanted_fields and "request_id" not in shard_columns:
                shard_columns.append("request_id")
            missing = [c for c in shard_columns if c not in pq.read_schema(files[0]).names]
            if missing:
                raise ValueError(f"{self.root / split}: no column(s) {missing}")
        tables = [pq.read_table(path, columns=shard_columns) for path in files]
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        if wanted_fields:
            table = self.request_store().join(table, wanted_fields)
        return table if columns is None else table.select(columns)

    def ids_per_row(self, split: str = "train") -> dict[str, float]:
        """Mean ids per row of every field of :attr:`schema` over ``split``'s shards (empty when the
        split has none): the planner's pooling factors, which its cost model uses to balance tables
        across ranks (a history field carries hundreds of ids per row, a profile field one).

        Read from the Parquet footers alone (no data page is decoded, so it is cheap on any size):
        a list column chunk records one value per id and one level per empty list, so a row with an
        empty list counts as one id here. Per-request fields (not in the shards) take the mean that
        ``prepare`` recorded in the manifest (``per_request.ids_per_row``).
        """
        import pyarrow.parquet as pq

        from ctnocvr_rec.data.requests import ids_per_row as request_ids_per_row

        try:
            files = self.files(split)
        except FileNotFoundError:
            return {}
        wanted = set(self.schema.names)
        values: dict[str, int] = {}
        rows = 0
        for path in files:
            meta = pq.ParquetFile(path).metadata
            rows += meta.num_rows
            leaf_fields = {}
            for i in range(meta.num_columns):
                leaf = meta.schema.column(i).path
                name = leaf[: -len(".list.element")] if leaf.endswith(".list.element") else None
                if name in wanted:
                    leaf_fields[i] = name
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                for i, name in leaf_fields.items():
                    values[name] = values.get(name, 0) + group.column(i).num_values
        if not rows:
            return {}
        means = {name: values[name] / rows for name in values}
        means.update(request_ids_per_row(self.per_request, split))
        return {name: means[name] for name in self.schema.names if name in means}

    def dense_stats(self) -> dict[str, dict[str, Any]]:
        """``{name: {"mean", "std", ...}}`` of every dense feature of :attr:`schema` (the fitted values of
        ``ctnocvr_rec/data/dense.py``'s transform; ``manifest["dense_stats"]``). ``ValueError`` naming the
        manifest when one is missing; ``{}`` for a sparse-only schema."""
        stats = self.manifest.get("dense_stats") or {}
        missing = [d.name for d in self.schema.dense if not isinstance(stats.get(d.name), dict)
                   or not {"mean", "std"} <= set(stats[d.name])]
        if missing:
            raise ValueError(f"{self.manifest_path}: dense_stats lacks {{mean, std}} of dense feature(s) {missing}")
        return {d.name: dict(stats[d.name]) for d in self.schema.dense}

    def vocab(self, field: str) -> Any:
        """The :class:`~ctnocvr_rec.data.vocab.FieldVocab` of ``field`` (raw id -> table row)."""
        from ctnocvr_rec.data.vocab import FieldVocab

        folder = self.root / ((self.manifest.get("vocab") or {}).get("folder") or "vocab")
        return FieldVocab.load(self.schema[field], folder)


def resolve_schema(prepared_dir: str | Path, schema: FieldSchema | str | Path | None) -> FieldSchema:
    """The schema of :meth:`PreparedSet.open` (kept for callers of the old helper)."""
    return PreparedSet.open(prepared_dir, schema).schema


def split_files(prepared_dir: str | Path, split: str) -> list[str]:
    """Parquet files of ``split``, sorted by name (no manifest needed)."""
    folder = Path(prepared_dir) / split
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {folder}")
    return files
