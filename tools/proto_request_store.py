"""Prototype: user histories stored once per request, joined in the loader (measurements only).

Today ``prepare`` copies every user field onto every impression row, so a prepared row of the
full-shape data carries ~509 history ids + weights (docs/fullshape.md has the figures). This tool
measures the alternative *without changing* ``prepare`` or the loader, by preparing the two halves
of the proposed layout with today's ``prepare`` and joining them in a benchmark loop:

* ``schemas OUT``: writes ``OUT/rows.yaml`` (the ``aliccp`` schema minus the multi-valued user
  histories ``109_14 110_14 127_14 150_14``) and ``OUT/requests.yaml`` (only those four).
* ``request-raw RAW OUT``: a raw folder whose skeletons hold ONE row per common-features line
  (``i,0,0,<key>,0,``; the common files are symlinked). ``prepare --schema requests.yaml`` on it
  writes the per-request table: one row per request, ``request_id`` numbered exactly as in the
  per-impression set (row of the key in its common file, test offset by the train requests), the
  four histories mapped. (Its vocabulary counts each request once instead of once per impression:
  the ids differ from an integrated prepare, the costs do not.)
* ``bench-join ROWS REQUESTS``: loader samples/s over ``ROWS`` (prepared with ``rows.yaml``), each
  batch joined with the histories of its ``request_id`` from the request table held in memory as
  one CSR per field (``_gather_index``: one repeat + one take per field), then the batch's weighted
  KJT and the joined histories concatenated into one weighted KJT, i.e. the batch the model gets
  today. Reports samples/s of the plain rows-only loader and of loader + join.

Example::

    python tools/proto_request_store.py schemas /tmp/proto
    python tools/proto_request_store.py request-raw RAW /tmp/proto/raw_requests
    ctnocvr data prepare --raw-dir RAW --out /tmp/proto/rows --schema /tmp/proto/rows.yaml
    ctnocvr data prepare --raw-dir /tmp/proto/raw_requests --out /tmp/proto/requests --schema /tmp/proto/requests.yaml
    python tools/proto_request_store.py bench-join /tmp/proto/rows /tmp/proto/requests
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HISTORIES = ("109_14", "110_14", "127_14", "150_14")


def write_schemas(out: Path) -> None:
    from ctnocvr_rec.resources import resolve
    from ctnocvr_rec.yaml_strict import load_yaml_file

    tree = load_yaml_file(resolve("fields", "aliccp", None))
    out.mkdir(parents=True, exist_ok=True)
    for name, keep in (("rows", lambda f: f["name"] not in HISTORIES), ("requests", lambda f: f["name"] in HISTORIES)):
        sub = dict(tree, fields=[f for f in tree["fields"] if keep(f)])
        (out / f"{name}.yaml").write_text(json.dumps(sub, indent=1) + "\n")  # JSON is YAML


def write_request_raw(raw: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        common = raw / f"common_features_{split}.csv"
        if not common.is_file():
            continue
        link = out / common.name
        if not link.exists():
            os.symlink(common.resolve(), link)
        with open(common, "rb") as src, open(out / f"sample_skeleton_{split}.csv", "wb") as dst:
            for i, line in enumerate(src, start=1):
                dst.write(b"%d,0,0,%s,0,\n" % (i, line[:line.index(b",")]))


def _request_csr(requests_dir: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per history field ``(offsets [R + 1], ids [nnz] int32, weights [nnz] float32)``, row =
    ``request_id - first request_id`` of the split (requests are numbered densely per split)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ["request_id", *HISTORIES, *(f"{h}__w" for h in HISTORIES)]
    folders = ("test",) if split == "test" else ("train", "valid")  # valid rows are train requests
    files = [f for d in folders for f in sorted(glob.glob(str(requests_dir / d / "*.parquet")))]
    table = pa.concat_tables([pq.read_table(f, columns=cols) for f in files]).combine_chunks()
    rid = table.column("request_id").to_numpy()
    order = np.argsort(rid)
    first = int(rid[order[0]])
    if not np.array_equal(rid[order], np.arange(first, first + len(rid))):
        raise SystemExit(f"{requests_dir}: request ids of {split} are not dense")
    out = {"_first": (np.array([first]), np.empty(0), np.empty(0))}
    for h in HISTORIES:
        col = table.column(h).chunk(0)
        off = col.offsets.to_numpy().astype(np.int64)
        ids = col.values.to_numpy()
        w = table.column(f"{h}__w").chunk(0).values.to_numpy()
        starts, lengths = off[:-1][order], np.diff(off)[order]
        new_off = np.zeros(len(order) + 1, np.int64)
        np.cumsum(lengths, out=new_off[1:])
        from ctnocvr_rec.data.dataset import _gather_index

        src = _gather_index(starts, lengths, new_off)
        out[h] = (new_off, ids[src], w[src])
    return out


def join_batch(batch, csr: dict):  # noqa: ANN001, ANN201 (CtnocvrBatch -> KJT; torch only here)
    """The batch's weighted KJT with the histories of its requests prepended (one KJT)."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from ctnocvr_rec.data.dataset import _gather_index

    rows = batch.request_id.numpy() - int(csr["_first"][0][0])
    lengths, values, weights = [], [], []
    for h in HISTORIES:
        off, ids, w = csr[h]
        starts = off[rows]
        ln = off[rows + 1] - starts
        out_off = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(ln, out=out_off[1:])
        src = _gather_index(starts, ln, out_off)
        lengths.append(ln.astype(np.int32))
        values.append(ids[src].astype(np.int64))
        weights.append(w[src])
    user = KeyedJaggedTensor(keys=[f"f_{h}" for h in HISTORIES], values=torch.from_numpy(np.concatenate(values)),
                             weights=torch.from_numpy(np.concatenate(weights)),
                             lengths=torch.from_numpy(np.concatenate(lengths)), stride=len(rows))
    if batch.weighted_features is None:
        return user
    return KeyedJaggedTensor.concat([user, batch.weighted_features])


def bench_join(rows_dir: Path, requests_dir: Path, split: str, batch_size: int, passes: int) -> dict[str, float]:
    from ctnocvr_rec.data.dataset import make_dataloader

    t0 = time.perf_counter()
    csr = _request_csr(requests_dir, split)
    load_s = time.perf_counter() - t0
    result: dict[str, float] = {"request_table_load_s": round(load_s, 2),
                                "request_table_mb": round(sum(a.nbytes + b.nbytes + c.nbytes for a, b, c in csr.values()) / 1e6, 1)}
    for mode in ("rows_only", "rows_plus_join"):
        best = 0.0
        for _ in range(passes):
            loader = make_dataloader(str(rows_dir), split, batch_size, shuffle=True)
            n = ids = 0
            t = time.perf_counter()
            for batch in loader:
                if mode == "rows_plus_join":
                    kjt = join_batch(batch, csr)
                    ids += kjt.values().numel()
                n += batch.batch_size
            best = max(best, n / (time.perf_counter() - t))
        result[f"{mode}_samples_per_s"] = round(best)
        if mode == "rows_plus_join":
            result["weighted_ids_per_row"] = round(ids / n, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("schemas")
    s.add_argument("out")
    r = sub.add_parser("request-raw")
    r.add_argument("raw")
    r.add_argument("out")
    b = sub.add_parser("bench-join")
    b.add_argument("rows")
    b.add_argument("requests")
    b.add_argument("--split", default="train")
    b.add_argument("--batch-size", type=int, default=4096)
    b.add_argument("--passes", type=int, default=2)
    args = p.parse_args(argv)
    if args.cmd == "schemas":
        write_schemas(Path(args.out))
    elif args.cmd == "request-raw":
        write_request_raw(Path(args.raw), Path(args.out))
    else:
        print(json.dumps(bench_join(Path(args.rows), Path(args.requests), args.split, args.batch_size, args.passes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
