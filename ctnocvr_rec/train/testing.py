"""Test helpers of the trainer: a tiny prepared set and two debug hooks.

Written by the package's shard writer (``data/shards.py``; no raw files, no ``prepare``):
:func:`write_tiny_prepared` writes the 23 Ali-CCP schema fields with small vocabularies; ``click``
depends on the ids of fields 205 (item) and 101 (user), ``conversion`` (given a click) on field 206,
so a ranker's AUCs rise above 0.5 within a few dozen steps. With ``num_dense > 0`` the schema also
gets that many dense features (:func:`aliccp_dense_schema`; raw values log-normal, stored ``log1p`` +
standardised with train-split stats through ``data/dense.py``, the stats in the manifest) and the
click logit also depends on the first of them.

Hooks (off unless their environment variable is set; the trainer calls them):

* ``CTNOCVR_LOG_SAMPLE_IDS=<dir>``: every rank appends one JSON line per trained batch to
  ``<dir>/rank-<r>.jsonl``: ``{"epoch", "step", "ids": [sample ids]}`` (which rows a run trained).
* ``CTNOCVR_DUMP_AFTER_LOAD=<dir>``: right after a resume has loaded a checkpoint, every rank writes
  ``<dir>/rank-<r>.pt``: ``{"model": {key: [(offsets, tensor)]}, "optim": {key: [(offsets, tensor)]},
  "dense": {key: tensor}}`` with its local shards of every embedding table's weight and fused optimiser
  state, and the dense-feature arch's parameters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ctnocvr_rec.data.dense import fit_dense_stats, transform_dense
from ctnocvr_rec.data.schema import DEFAULT_SCHEMA, DenseSpec, FieldSchema, load_schema
from ctnocvr_rec.data.shards import FieldValues, shard_table, write_split_tables

SCHEMA_NAME = DEFAULT_SCHEMA  # the packaged aliccp schema
VOCAB = 40  # ids 1..VOCAB-1 per field (0 = OOV), so num_embeddings = VOCAB
#: dense feature names of torch-rechub's processed Ali-CCP files (the names only; values are ours)
DENSE_NAMES = ("D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853")


def aliccp_dense_schema(num_dense: int = 8) -> FieldSchema:
    """The packaged aliccp schema plus the first ``num_dense`` of :data:`DENSE_NAMES` (``log1p`` then
    standardised, as skewed count-like features usually are)."""
    base = load_schema(SCHEMA_NAME)
    if not 0 <= num_dense <= len(DENSE_NAMES):
        raise ValueError(f"num_dense must be in [0, {len(DENSE_NAMES)}], got {num_dense}")
    dense = tuple(DenseSpec(name, "log1p", True) for name in DENSE_NAMES[:num_dense])
    return FieldSchema(base.fields, source=f"{base.source} + {num_dense} dense", dense=dense)


def raw_dense_values(rows: int, seed: int, num_dense: int) -> dict[str, np.ndarray]:
    """Raw (untransformed) dense values: log-normal, a few exact zeros (count-like)."""
    rng = np.random.default_rng([seed, 0xD])  # its own stream: the sparse columns are as without dense
    out = {}
    for k, name in enumerate(DENSE_NAMES[:num_dense]):
        values = rng.lognormal(mean=1.0 + 0.3 * k, sigma=1.0, size=rows)
        values[rng.random(rows) < 0.1] = 0.0
        out[name] = values
    return out


def _split_table(schema: FieldSchema, rows: int, seed: int, first_sample_id: int, users: int,
                 dense: dict[str, np.ndarray] | None = None, own_requests: bool = False) -> pa.Table:
    """One split; ``dense``: the *stored* (transformed) values of every dense feature of ``schema``."""
    rng = np.random.default_rng(seed)
    effects = np.random.default_rng(1234).normal(0.0, 1.5, size=(3, VOCAB))  # same truth for all splits
    fields: dict[str, FieldValues] = {}
    first_ids: dict[str, np.ndarray] = {}
    for spec in schema:
        if spec.multi_valued:
            lengths = rng.integers(0, 4, rows)
        else:
            lengths = np.ones(rows, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = rng.integers(1, VOCAB, offsets[-1]).astype(np.int64)
        if not spec.multi_valued:
            first_ids[spec.name] = ids
        weights = (0.5 + rng.random(offsets[-1])).astype(np.float32) if spec.weighted else None
        fields[spec.name] = FieldValues(offsets, ids, weights)
    logit_click = effects[0][first_ids["205"]] + effects[1][first_ids["101"]] - 1.5
    if schema.dense:
        logit_click = logit_click + 1.5 * dense[schema.dense[0].name]  # type: ignore[index]
    click = (rng.random(rows) < 1 / (1 + np.exp(-logit_click))).astype(np.int8)
    logit_conv = effects[2][first_ids["206"]] - 0.5
    conversion = (click * (rng.random(rows) < 1 / (1 + np.exp(-logit_conv)))).astype(np.int8)
    scalars = {
        "sample_id": np.arange(first_sample_id, first_sample_id + rows),
        # (drawn either way, so the rest of the table does not depend on own_requests)
        "request_id": rng.integers(0, max(1, rows // 4), rows),
        "user_id": first_ids["101"] % users,
        "click": click,
        "conversion": conversion,
    }
    if own_requests:  # every row its own request, numbered like the sample ids (from 0)
        scalars["request_id"] = scalars["sample_id"] - 1
    return shard_table(scalars, fields, schema, {spec.name: VOCAB for spec in schema}, dense=dense)


def _move_user_fields_to_requests(root: Path, schema: FieldSchema, tables: dict[str, pa.Table]) -> None:
    """Rewrite a tiny set in the per-request layout (ctnocvr_rec/data/requests.py): every split's
    user fields go to ``requests/<split>.arrow`` (its rows are its own requests, in table order) and
    leave the shards; the manifest gains ``per_request``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ctnocvr_rec.data.prepared import read_manifest, write_manifest
    from ctnocvr_rec.data.requests import FOLDER, MANIFEST_KEY, write_request_table
    from ctnocvr_rec.data.shards import id_type, write_shard

    user = [spec for spec in schema if spec.is_user]
    drop = [c for spec in user for c in ((spec.name, spec.weight_column) if spec.weighted else (spec.name,))]
    manifest = read_manifest(root)
    files, ids_per_row = [], {}
    for split, table in tables.items():
        rid = table.column("request_id").to_numpy()
        first = int(rid[0])
        assert (rid == np.arange(first, first + len(rid))).all()
        fields = {}
        for spec in user:
            column = table.column(spec.name).combine_chunks()
            offsets = column.offsets.to_numpy().astype(np.int64)
            weights = table.column(spec.weight_column).combine_chunks().values.to_numpy() if spec.weighted else None
            fields[spec.name] = (offsets - offsets[0], column.values.to_numpy(), weights)
        rel = f"{FOLDER}/{split}.arrow"
        write_request_table(root / rel, fields, {spec.name: id_type(VOCAB) for spec in user})
        files.append({"file": rel, "first_request_id": first, "requests": len(rid)})
        ids_per_row[split] = {spec.name: float(pc.mean(pc.list_value_length(table.column(spec.name))).as_py())
                              for spec in user}
        for rel_shard in manifest["splits"][split]["files"]:
            shard = pq.read_table(root / rel_shard).drop_columns(drop)
            write_shard(shard, root / rel_shard, row_group_size=250)
    manifest[MANIFEST_KEY] = {"fields": [spec.name for spec in user], "key": "request_id", "files": files,
                              "ids_per_row": ids_per_row}
    write_manifest(root, manifest)


def write_tiny_prepared(root: str | Path, splits: dict[str, int] | None = None, rows_per_file: int = 1000,
                        seed: int = 0, users: int = 25, num_dense: int = 0, per_request: bool = False) -> Path:
    """Write ``root/{train,valid,test}/part-*.parquet`` + ``manifest.json``; returns ``root``.

    ``per_request``: every row is its own request (``request_id`` = ``sample_id - 1``) and the user
    fields are stored in ``requests/<split>.arrow`` instead of the shards (the per-request layout of
    ``prepare``, ctnocvr_rec/data/requests.py); the batches the loader yields hold the same values.

    ``num_dense``: dense features of :func:`aliccp_dense_schema` (0: the sparse-only set, unchanged);
    their raw values are :func:`raw_dense_values` of each split's seed, the transform fitted on the
    first split (train) only.
    """
    root = Path(root)
    splits = splits or {"train": 4000, "valid": 600, "test": 900}
    schema = aliccp_dense_schema(num_dense) if num_dense else load_schema(SCHEMA_NAME)
    raw = {split: raw_dense_values(rows, seed + 101 * k, num_dense) for k, (split, rows) in enumerate(splits.items())}
    first_split = next(iter(splits))
    stats = {d.name: {**fit_dense_stats(raw[first_split][d.name], d.transform), "transform": d.transform}
             for d in schema.dense}
    first = 1
    tables = {}
    for k, (split, rows) in enumerate(splits.items()):
        stored = {d.name: transform_dense(raw[split][d.name], d.transform, d.standardize,
                                          stats[d.name]["mean"], stats[d.name]["std"]) for d in schema.dense}
        tables[split] = _split_table(schema, rows, seed + 101 * k, first, users, stored, own_requests=per_request)
        first += rows
    write_split_tables(root, schema, tables, {spec.name: VOCAB for spec in schema}, rows_per_file,
                       row_group_size=250, dense_stats=stats if schema.dense else None)
    if per_request:
        _move_user_fields_to_requests(root, schema, tables)
    return root


def sample_id_log_dir() -> Path | None:
    """The ``CTNOCVR_LOG_SAMPLE_IDS`` folder, or None when the hook is off."""
    value = os.environ.get("CTNOCVR_LOG_SAMPLE_IDS")
    return Path(value) if value else None


def log_trained_sample_ids(log_dir: Path, rank: int, epoch: int, step: int, ids: list[int]) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"rank-{rank}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"epoch": epoch, "step": step, "ids": ids}) + "\n")


def _local_pieces(value: Any) -> list[tuple[list[int], Any]]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return [(list(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in value.local_shards()]
    return [([0] * value.dim(), value.detach().clone())]


def dump_table_state(ctx: Any, model: Any, optimizer: Any) -> None:
    """``CTNOCVR_DUMP_AFTER_LOAD`` hook: this rank's shards of the tables and their fused optimiser state,
    and (``"dense"``) the dense-feature arch's parameters (replicated: whole on every rank)."""
    out_dir = os.environ.get("CTNOCVR_DUMP_AFTER_LOAD")
    if not out_dir:
        return
    import torch

    tables = {k: _local_pieces(v) for k, v in model.state_dict().items() if ".embedding_bags." in k}
    optim = {f"{part}.{key}": _local_pieces(v)
             for part, states in optimizer.state_dict()["state"].items() if ".embedding_bags." in part
             for key, v in states.items() if hasattr(v, "dim") or hasattr(v, "local_shards")}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("dense_arch.")}
    torch.save({"model": tables, "optim": optim, "dense": dense}, Path(out_dir) / f"rank-{ctx.rank}.pt")
