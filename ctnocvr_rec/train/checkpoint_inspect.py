"""What a run's checkpoints hold (``ctnocvr checkpoint inspect RUN_DIR``), read without a process group.

Per published checkpoint: step, epoch, world size, time; the plan it was sharded with (tables per
sharding type, the placement and column split of every sharded table); the table weights and the
optimiser state present in the DCP snapshot (fused state per table, with the row-wise momentum's
column shards; the dense optimiser's state), their sizes; every rank's data position; and whether
it carries the ``elastic`` record a resume on another world size needs.

Example::

    >>> report = inspect_run("runs/demo")          # doctest: +SKIP
    >>> print(format_report(report))               # doctest: +SKIP
"""

from __future__ import annotations

import datetime
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ctnocvr_rec.train.checkpoint import CheckpointInfo, list_checkpoints
from ctnocvr_rec.train.reshard import plan_layouts


def _tensor_bytes(md: TensorStorageMetadata) -> int:
    numel = 1
    for n in md.size:
        numel *= int(n)
    dtype = md.properties.dtype if md.properties is not None else torch.float32
    return numel * torch.empty((), dtype=dtype).element_size()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _table(fqn: str) -> str | None:
    """Table name of a DCP key under ``...embedding_bags.<table>.weight...``."""
    parts = fqn.split(".")
    for i in range(len(parts) - 2):
        if parts[i] == "embedding_bags" and parts[i + 2] == "weight":
            return parts[i + 1]
    return None


def inspect_checkpoint(info: CheckpointInfo) -> dict[str, Any]:
    """A JSON-able description of one checkpoint folder."""
    meta = info.meta
    layouts = plan_layouts(meta["plan"]) if meta.get("plan") else {}
    state = FileSystemReader(str(info.path)).read_metadata().state_dict_metadata
    tables: dict[str, dict[str, Any]] = {}
    dense = {"tensors": 0, "bytes": 0, "keys": Counter()}
    for key, md in state.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        size, nbytes = [int(n) for n in md.size], _tensor_bytes(md)
        table = _table(key)
        if table is not None:
            entry = tables.setdefault(table, {"weight": None, "optimiser": {}})
            if key.startswith("model."):
                entry["weight"] = {"shape": size, "bytes": nbytes}
            else:
                kind, _, rest = key.removeprefix("optim.state.").partition(".")
                name = rest.rsplit(".", 1)[-1]
                entry["optimiser"][f"{kind}:{name}"] = {"shape": size, "bytes": nbytes}
        elif key.startswith("optim.state."):
            dense["tensors"] += 1
            dense["bytes"] += nbytes
            dense["keys"][key.rsplit(".", 1)[-1]] += 1
    for name, layout in layouts.items():
        table = name.rsplit(".", 1)[-1]
        if table in tables:
            tables[table].update(sharding_type=layout.sharding_type, compute_kernel=layout.compute_kernel,
                                 ranks=list(layout.ranks), columns=[list(c) for c in layout.columns])
    ranks = []
    for r in range(int(meta.get("world_size", 0))):
        path = info.path / f"rank-{r}.pt"
        if not path.is_file():
            ranks.append({"rank": r, "missing": True})
            continue
        ts = torch.load(path, weights_only=False).get("train_state", {})
        ds = ts.get("data_state") or {}
        plan = ds.get("plan")
        ranks.append({"rank": r, "epoch": ts.get("epoch"), "batches_trained_in_epoch": ds.get("batches_yielded", 0),
                      "epoch_plan_batches": None if plan is None else sum(e - f for _, _, f, e in plan)})
    files = [p for p in info.path.iterdir() if p.is_file()]
    return {
        "path": str(info.path),
        "step": info.step,
        "epoch": meta.get("epoch"),
        "world_size": meta.get("world_size"),
        "saved_at": meta.get("saved_at"),
        "elastic_record": "elastic" in meta,
        "data": (meta.get("elastic") or {}).get("data"),
        "sharding_types": dict(Counter(t.sharding_type for t in layouts.values())),
        "tables": dict(sorted(tables.items())),
        "dense_optimiser": {"tensors": dense["tensors"], "bytes": dense["bytes"], "keys": dict(dense["keys"])},
        "ranks": ranks,
        "bytes": {"total": sum(p.stat().st_size for p in files),
                  "dcp": sum(p.stat().st_size for p in files if p.suffix == ".distcp"),
                  "rank_files": sum(p.stat().st_size for p in files if p.name.startswith("rank-"))},
    }


def inspect_run(run_dir: str | Path) -> list[dict[str, Any]]:
    """:func:`inspect_checkpoint` of every published checkpoint of ``run_dir``, oldest first."""
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}/checkpoints: no published checkpoint (is this a run folder?)")
    return [inspect_checkpoint(info) for info in found]


def format_report(report: list[dict[str, Any]], all_tables: bool = False) -> str:
    """The text report of :func:`inspect_run` (data-parallel tables summed up unless ``all_tables``)."""
    lines: list[str] = []
    for c in report:
        when = (datetime.datetime.fromtimestamp(c["saved_at"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
                if c.get("saved_at") else "?")
        lines.append(f"{c['path']}: step {c['step']}, epoch {c['epoch']}, {c['world_size']} rank(s), saved {when}, "
                     f"{_human(c['bytes']['total'])}")
        lines.append("  plan: " + ", ".join(f"{n} {t}" for t, n in sorted(c["sharding_types"].items())))
        if c["elastic_record"]:
            d = c["data"] or {}
            lines.append(f"  elastic record: yes (batch {d.get('batch_size')}, {d.get('num_rows')} training rows): "
                         "resumes on any world size")
        else:
            lines.append(f"  elastic record: no (written before elastic resume): resumes on {c['world_size']} rank(s) only")
        lines.append(f"  {'table':<14} {'sharding':<25} {'ranks':<9} {'weight':<6} {'bytes':>9}   optimiser state")
        replicated = []
        for name, t in c["tables"].items():
            w = t.get("weight") or {}
            if t.get("sharding_type") == "data_parallel" and not all_tables:
                replicated.append((name, t))
                continue
            shape = "x".join(str(n) for n in w.get("shape", []))
            opt = ", ".join(f"{k} [{'x'.join(str(n) for n in v['shape'])}] {_human(v['bytes'])}"
                            for k, v in sorted(t["optimiser"].items())) or "-"
            cols = t.get("columns") or []
            sharding = t.get("sharding_type", "?") + (f" ({len(cols)} col)" if len(cols) > 1 else "")
            ranks = ",".join(str(r) for r in t.get("ranks", [])) or "-"
            lines.append(f"  {name:<14} {sharding:<25} {ranks:<9} {shape:<6} {_human(w.get('bytes', 0)):>9}   {opt}")
        if replicated:
            weight_bytes = sum((t.get("weight") or {}).get("bytes", 0) for _, t in replicated)
            state_bytes = sum(v["bytes"] for _, t in replicated for v in t["optimiser"].values())
            kinds = sorted({k for _, t in replicated for k in t["optimiser"]})
            lines.append(f"  + {len(replicated)} data_parallel table(s) (replicated on every rank; --all-tables lists "
                         f"them): weights {_human(weight_bytes)}, optimiser state {_human(state_bytes)} "
                         f"({', '.join(kinds) or 'none'})")
        dense = c["dense_optimiser"]
        keys = ", ".join(f"{k} x{n}" for k, n in sorted(dense["keys"].items()))
        lines.append(f"  dense layers, optimiser state: {dense['tensors']} tensors, {_human(dense['bytes'])} ({keys})")
        for r in c["ranks"]:
            if r.get("missing"):
                lines.append(f"  rank {r['rank']}: rank file MISSING")
                continue
            plan = f", following an epoch plan of {r['epoch_plan_batches']} batches" if r["epoch_plan_batches"] is not None else ""
            lines.append(f"  rank {r['rank']}: epoch {r['epoch']}, {r['batches_trained_in_epoch']} batch(es) of it trained{plan}")
    return "\n".join(lines)
