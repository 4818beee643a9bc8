"""`ctnocvr data stats`: the paper's Table 2 and per-field statistics of a prepared set.

Table 2 columns (paper Sec. 3.1): ``#user`` (distinct ``user_id``, absent users (-1) not counted),
``#item`` (distinct non-OOV ids of the item-id field ``205``), ``#impression`` (rows), ``#click``,
``#conversion``, plus ``CTR = #click / #impression`` and ``CVR = #conversion / #click``.
Ids in a prepared set are mapped ids: for ``vocab`` fields id 0 is the OOV bucket and is not counted
as an id (its share is reported as ``oov_share``), so on ``test`` an item never seen in train counts
in ``oov_share`` rather than in ``#item``.

Per field: ``cardinality`` (distinct ids present), ``num_embeddings`` (table size from the manifest),
``mean_len`` (mean ids per row), ``max_len``, ``empty_share`` (rows without the field) and
``oov_share`` (share of ids mapped to OOV). Everything is computed with ``pyarrow.compute`` column by
column and file by file (distinct ids are merged as sets of unique values).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctnocvr_rec.data.prepared import PreparedSet
from ctnocvr_rec.data.schema import OOV_ID, FieldSchema, FieldSpec


@dataclass
class _FieldAcc:
    """Running per-field sums over files."""

    uniques: list[pa.Array] = field(default_factory=list)
    values: int = 0
    empty_rows: int = 0
    max_len: int = 0
    oov: int = 0


@dataclass
class _SplitAcc:
    rows: int = 0
    clicks: int = 0
    conversions: int = 0
    users: list[pa.Array] = field(default_factory=list)
    missing_user_rows: int = 0
    fields: dict[str, _FieldAcc] = field(default_factory=dict)


def _item_field(schema: FieldSchema) -> FieldSpec:
    items = [s for s in schema.by_group("item") if not s.multi_valued]
    if not items:
        raise ValueError(f"schema {schema.source}: no single-valued item field to count items with")
    return next((s for s in items if s.name == "205"), items[0])


def _as_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _accumulate(acc: _SplitAcc, table: pa.Table, schema: FieldSchema) -> None:
    acc.rows += table.num_rows
    acc.clicks += int(pc.sum(table.column("click")).as_py() or 0)
    acc.conversions += int(pc.sum(table.column("conversion")).as_py() or 0)
    user = table.column("user_id")
    present = pc.not_equal(user, -1)
    acc.missing_user_rows += table.num_rows - int(pc.sum(present).as_py() or 0)
    acc.users.append(_as_array(pc.unique(pc.filter(user, present))))
    for spec in schema:
        col = table.column(spec.name)
        lengths = pc.list_value_length(col).fill_null(0)
        flat = pc.list_flatten(col)
        fa = acc.fields.setdefault(spec.name, _FieldAcc())
        fa.values += len(flat)
        fa.empty_rows += int(pc.sum(pc.equal(lengths, 0)).as_py() or 0)
        fa.max_len = max(fa.max_len, int(pc.max(lengths).as_py() or 0))
        if spec.mapping == "vocab":
            fa.oov += int(pc.sum(pc.equal(flat, OOV_ID)).as_py() or 0)
        fa.uniques.append(_as_array(pc.unique(flat)))


def _distinct(arrays: list[pa.Array], exclude: int | None = None) -> int:
    if not arrays:
        return 0
    merged = pc.unique(pa.concat_arrays([a.cast(pa.int64()) for a in arrays]))
    n = len(merged)
    if exclude is not None:
        n -= int(pc.sum(pc.equal(merged, exclude)).as_py() or 0)
    return n


def _summarise(acc: _SplitAcc, schema: FieldSchema, num_embeddings: dict[str, int]) -> dict[str, Any]:
    item = _item_field(schema)
    oov_of = {s.name: (OOV_ID if s.mapping == "vocab" else None) for s in schema}
    table2 = {
        "users": _distinct(acc.users),
        "items": _distinct(acc.fields[item.name].uniques, oov_of[item.name]),
        "impressions": acc.rows,
        "clicks": acc.clicks,
        "conversions": acc.conversions,
        "ctr": acc.clicks / acc.rows if acc.rows else float("nan"),
        "cvr": acc.conversions / acc.clicks if acc.clicks else float("nan"),
        "rows_without_user": acc.missing_user_rows,
    }
    fields = {}
    for spec in schema:
        fa = acc.fields[spec.name]
        fields[spec.name] = {
            "group": spec.group,
            "multi_valued": spec.multi_valued,
            "weighted": spec.weighted,
            "mapping": spec.mapping,
            "cardinality": _distinct(fa.uniques, oov_of[spec.name]),
            "num_embeddings": num_embeddings.get(spec.name),
            "mean_len": fa.values / acc.rows if acc.rows else float("nan"),
            "max_len": fa.max_len,
            "empty_share": fa.empty_rows / acc.rows if acc.rows else float("nan"),
            "oov_share": (fa.oov / fa.values if fa.values else 0.0) if spec.mapping == "vocab" else None,
        }
    return {"table2": table2, "fields": fields}


def compute_stats(
    prepared_dir: str | Path, splits: list[str], schema: FieldSchema | str | Path | None = None
) -> dict[str, Any]:
    """Table 2 + per-field stats of each split, and of all of them together (``"all"``) if several."""
    prepared = PreparedSet.open(prepared_dir, schema)
    schema, num_embeddings = prepared.schema, prepared.num_embeddings
    # fields stored once per request (data/requests.py) are joined onto each row group by request_id
    per_request = [n for n in schema.names if n in prepared.per_request_fields]
    requests = prepared.request_store() if per_request else None
    columns = ["user_id", "click", "conversion", *(["request_id"] if per_request else []),
               *(n for n in schema.names if n not in per_request)]
    total = _SplitAcc()
    out: dict[str, Any] = {"prepared_dir": str(prepared_dir), "splits": {}}
    for split in splits:
        acc = _SplitAcc()
        for path in prepared.files(split):
            handle = pq.ParquetFile(path)
            missing = [c for c in columns if c not in handle.schema_arrow.names]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}")
            for g in range(handle.metadata.num_row_groups):  # bounded memory: one row group at a time
                table = handle.read_row_group(g, columns=columns)
                if requests is not None:
                    table = requests.join(table, per_request)
                _accumulate(acc, table, schema)
                if len(splits) > 1:
                    _accumulate(total, table, schema)
        out["splits"][split] = _summarise(acc, schema, num_embeddings)
    if len(splits) > 1:
        out["splits"]["all"] = _summarise(total, schema, num_embeddings)
    return out


def _fmt_count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def format_stats(stats: dict[str, Any]) -> str:
    """Readable tables: Table 2 (one row per split), then per-field statistics of each split."""
    lines = [f"Prepared set: {stats['prepared_dir']}", "", "Table 2: statistics of the data set"]
    head = f"{'split':<8}{'#user':>12}{'#item':>12}{'#impression':>14}{'#click':>12}{'#conversion':>13}{'CTR':>9}{'CVR':>9}"
    lines += [head, "-" * len(head)]
    for split, s in stats["splits"].items():
        t = s["table2"]
        lines.append(
            f"{split:<8}{t['users']:>12,}{t['items']:>12,}{t['impressions']:>14,}{t['clicks']:>12,}"
            f"{t['conversions']:>13,}{t['ctr']:>9.4f}{t['cvr']:>9.4f}")
    for split, s in stats["splits"].items():
        lines += ["", f"Fields ({split})"]
        head = (f"{'field':<8}{'group':<13}{'multi':>6}{'wtd':>5}{'mapping':>8}{'cardinality':>13}"
                f"{'tables':>10}{'mean_len':>10}{'max_len':>9}{'empty':>8}{'oov':>8}")
        lines += [head, "-" * len(head)]
        for name, f in s["fields"].items():
            oov = "-" if f["oov_share"] is None else f"{f['oov_share']:.3f}"
            lines.append(
                f"{name:<8}{f['group']:<13}{'y' if f['multi_valued'] else '':>6}{'y' if f['weighted'] else '':>5}"
                f"{f['mapping']:>8}{f['cardinality']:>13,}{_fmt_count(f['num_embeddings']):>10}"
                f"{f['mean_len']:>10.3f}{f['max_len']:>9}{f['empty_share']:>8.3f}{oov:>8}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepared", required=True, help="folder written by `ctnocvr data prepare`")
    parser.add_argument("--split", nargs="+", default=["train"],
                        help="split(s) to describe; several also give their union as 'all' (default: train)")
    parser.add_argument("--schema", default=None,
                        help="fields to describe: packaged schema name or YAML, a selection of the manifest's "
                        "schema (default: the manifest's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    stats = compute_stats(args.prepared, list(args.split), args.schema)
    if args.json:
        json.dump(stats, sys.stdout, indent=2, default=_json_default)
        sys.stdout.write("\n")
    else:
        print(format_stats(stats))
    return 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")
