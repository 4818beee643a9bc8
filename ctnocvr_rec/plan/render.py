"""Text renderings of a :class:`~ctnocvr_rec.plan.report.PlanReport` and of a plan diff.

``table`` is aligned plain text for a terminal, ``markdown`` the same tables as GitHub markdown
(for READMEs and issues); JSON output is ``report.to_dict()`` plus the plan itself (see commands.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ctnocvr_rec.plan.report import PlanReport, TableRow
from ctnocvr_rec.plan.sharding import GIB

ABBREV = {
    "data_parallel": "DP",
    "table_wise": "TW",
    "column_wise": "CW",
    "row_wise": "RW",
    "table_row_wise": "TWRW",
    "table_column_wise": "TWCW",
    "grid_shard": "GRID",
}


def rank_ranges(ranks: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    values = sorted(set(ranks))
    if not values:
        return "-"
    parts: list[str] = []
    start = prev = values[0]
    for r in values[1:] + [None]:  # type: ignore[list-item]
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(parts)


def _gib(n: float) -> str:
    return f"{n / GIB:.3f}"


def _shard_summary(table: TableRow) -> str:
    """Distinct shard shapes with counts: ``8x[50001,20]``."""
    counts = Counter(tuple(s.sizes) for s in table.shards)
    return " ".join(f"{n}x[{','.join(map(str, size))}]" for size, n in counts.items())


def _grid(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool) -> list[str]:
    cells = [[str(c) for c in row] for row in rows]
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in cells]
        return out
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in cells]


def render_report(report: PlanReport, fmt: str = "table", show_shards: bool = False) -> str:
    """The plan as ``table`` (plain text) or ``markdown``."""
    if fmt not in ("table", "markdown"):
        raise ValueError(f"format {fmt!r} is not table | markdown | json")
    md = fmt == "markdown"
    meta = report.meta
    lines: list[str] = []
    head = (
        f"Sharding plan: {meta.get('world_size')} ranks ({meta.get('local_world_size')} per host), "
        f"device {meta.get('device')}, batch {meta.get('batch_size_per_rank')} per rank, "
        f"HBM {meta.get('hbm_gb_per_rank', 0):.1f} GiB + DDR {meta.get('ddr_gb_per_rank', 0):.1f} GiB per rank, "
        f"reservation {meta.get('storage_reservation')} {meta.get('storage_reservation_percentage')}, "
        f"sparse optimiser {meta.get('sparse_optimizer')}"
    )
    sizes = f"Tables from {meta.get('sizes_source')} ({meta.get('module_kind')}); planned in {report.plan_seconds:.2f} s"
    lines += [f"**{head}**" if md else head, sizes, ""]

    lines.append("### Tables" if md else "Tables")
    table_rows = [
        [
            t.name,
            f"{t.num_embeddings}x{t.embedding_dim}",
            ABBREV.get(t.sharding_type, t.sharding_type),
            t.compute_kernel,
            rank_ranges(t.ranks),
            _shard_summary(t),
            _gib(t.hbm_bytes),
            _gib(t.ddr_bytes),
            f"{t.perf_ms:.3f}",
        ]
        for t in report.tables
    ]
    lines += _grid(
        ["table", "rows x dim", "sharding", "kernel", "ranks", "shards", "HBM GiB", "DDR GiB", "perf ms"],
        table_rows,
        md,
    )
    if show_shards:
        lines += ["", "### Shards" if md else "Shards (rank: offsets + sizes)"]
        shard_rows = [
            [
                t.name,
                s.rank,
                f"[{','.join(map(str, s.offsets))}]",
                f"[{','.join(map(str, s.sizes))}]",
                _gib(s.hbm_bytes),
                _gib(s.ddr_bytes),
            ]
            for t in report.tables
            for s in t.shards
        ]
        lines += _grid(["table", "rank", "offsets", "sizes", "HBM GiB", "DDR GiB"], shard_rows, md)

    lines += ["", "### Ranks" if md else "Ranks (used = shards + the reservation's input/dense estimate)"]
    rank_rows = []
    for r in report.ranks:
        hbm_pct = f" ({r.used_hbm_bytes / r.hbm_capacity_bytes:.1%})" if r.hbm_capacity_bytes else ""
        ddr_pct = f" ({r.used_ddr_bytes / r.ddr_capacity_bytes:.1%})" if r.ddr_capacity_bytes else ""
        rank_rows.append(
            [
                r.rank,
                r.num_shards,
                _gib(r.sparse_hbm_bytes),
                _gib(r.used_hbm_bytes) + hbm_pct,
                _gib(r.used_ddr_bytes) + ddr_pct,
                f"{r.perf_ms:.3f}",
                f"{r.fwd_compute_ms:.3f}/{r.fwd_comms_ms:.3f}/{r.bwd_compute_ms:.3f}/{r.bwd_comms_ms:.3f}",
            ]
        )
    lines += _grid(
        [
            "rank",
            "shards",
            "tables HBM GiB",
            "used HBM GiB",
            "used DDR GiB",
            "perf ms",
            "fwd comp/comms, bwd comp/comms ms",
        ],
        rank_rows,
        md,
    )
    imb = report.imbalance
    lines += [
        "",
        "Imbalance across ranks (max / mean): "
        f"perf {imb['perf_max_over_mean']:.3f}, HBM {imb['hbm_max_over_mean']:.3f}, DDR {imb['ddr_max_over_mean']:.3f}",
    ]
    return "\n".join(lines)


def _table_entries(tree: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for module_path, params in tree.get("modules", {}).items():
        for name, entry in params.items():
            out[name] = {**entry, "module": module_path}
    return out


def _describe(entry: Mapping[str, Any]) -> str:
    shards = entry.get("shards") or []
    sizes = Counter(tuple(s["sizes"]) for s in shards)
    shape = " ".join(f"{n}x[{','.join(map(str, k))}]" for k, n in sizes.items()) or "replicated"
    return (
        f"{ABBREV.get(entry['sharding_type'], entry['sharding_type'])}/{entry['compute_kernel']} "
        f"ranks {rank_ranges(entry.get('ranks') or [])} {shape}"
    )


def diff_plans(a: Mapping[str, Any], b: Mapping[str, Any], name_a: str = "a", name_b: str = "b") -> list[str]:
    """Lines describing what moved between two saved plans (empty when they are the same)."""
    lines: list[str] = []
    meta_a, meta_b = a.get("meta") or {}, b.get("meta") or {}
    for key in (
        "world_size",
        "local_world_size",
        "device",
        "batch_size_per_rank",
        "hbm_gb_per_rank",
        "ddr_gb_per_rank",
    ):
        if meta_a.get(key) != meta_b.get(key):
            lines.append(f"meta {key}: {meta_a.get(key)} -> {meta_b.get(key)}")
    ta, tb = _table_entries(a), _table_entries(b)
    for name in sorted(set(ta) - set(tb)):
        lines.append(f"{name}: only in {name_a} ({_describe(ta[name])})")
    for name in sorted(set(tb) - set(ta)):
        lines.append(f"{name}: only in {name_b} ({_describe(tb[name])})")
    for name in sorted(set(ta) & set(tb)):
        ea, eb = ta[name], tb[name]
        keys = ("sharding_type", "compute_kernel", "ranks", "shards")
        if any(ea.get(k) != eb.get(k) for k in keys):
            lines.append(f"{name}: {_describe(ea)}  ->  {_describe(eb)}")
    return lines
