"""``--format aliccp-raw``, part 2: pass 1 over the skeleton (parse, join, split, bucket, scratch) and
pass 2 (bucket -> shuffled shards); run in forked workers that read the context of
:mod:`.aliccp_raw_common` (pipeline: :mod:`ctnocvr_rec.data.formats.aliccp_raw`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ctnocvr_rec.data.csr import Csr
from ctnocvr_rec.data.formats.aliccp_raw_common import RawContext, context, key_of_line, line_text
from ctnocvr_rec.data.formats.base import PrepareError
from ctnocvr_rec.data.rawfiles import (
    read_range,
)
from ctnocvr_rec.data.rawformat import (
    SKELETON,
    Reason,
    parse_chunk,
)
from ctnocvr_rec.data.shards import FieldValues, shard_table, write_shard
from ctnocvr_rec.data.swar import PAD, padded_words
from ctnocvr_rec.data.vocab import count_ids
from ctnocvr_rec.data.writer_rules import (
    BUCKET_STREAM,
    SPLIT_CODES,
    SPLIT_STREAM,
    seeded_unit,
)

# ----------------------------------------------------------------------------------------------
# Stage 2: pass 1 over the skeleton
# ----------------------------------------------------------------------------------------------


@dataclass
class _Pass1Result:
    chunk_index: int
    n_lines: int
    rejects: list[tuple[int, str, str, str]]  # local line, reason, detail, raw
    rows_by_split: dict[str, int]
    counts: list[tuple[np.ndarray, np.ndarray]]  # per skeleton slot, train-split rows only
    common_refs: tuple[np.ndarray, np.ndarray]  # (common rows, train-split row counts)
    ignored: dict[str, int]
    fast_lines: int


def _scratch_file(ctx: RawContext, chunk_index: int) -> Path:
    return ctx.scratch / ctx.split_tag / f"chunk-{chunk_index:06d}.arrow"


def pass1_task(task: tuple[int, int, int]) -> _Pass1Result:
    """Parse skeleton bytes ``[start, end)``, join, split, bucket; write one scratch file.

    The scratch file (Arrow IPC) holds one record batch per bucket (rows in file order) with
    ``byte_offset, sample_id, click, buy, crow`` (common-table row), ``split`` (0 train, 1 valid,
    2 test) and per skeleton field its raw ids (+ ``__w`` weights).
    """
    chunk_index, start, end = task
    ctx = context()
    opts = ctx.options
    common = ctx.common
    assert common is not None
    data = read_range(ctx.skeleton_path, start, end)
    chunk = parse_chunk(data, SKELETON, ctx.skeleton_slots)
    rejects = [(r.line, r.reason, r.detail, line_text(chunk.raw_line(data, r.line))) for r in chunk.rejects]

    crow = common.lookup(chunk.key_h1, chunk.key_h2)
    hits = np.flatnonzero(crow >= 0)
    words = padded_words(np.frombuffer(data, np.uint8))[1]
    same = common.same_keys(crow[hits], words, chunk.key_start[hits] + PAD, chunk.key_len[hits])
    if not same.all():
        i = int(hits[np.flatnonzero(~same)[0]])
        line = int(chunk.line[i])
        file_line = read_range(ctx.skeleton_path, 0, start).count(b"\n") + line + 1  # rare path: count lines
        raise PrepareError(
            f"{ctx.skeleton_path}:{file_line}: field common_feature_index: "
            f"{key_of_line(chunk.raw_line(data, line), SKELETON)!r} has the same 64-bit hashes as the "
            f"different key of {common.file}:{int(common.line[crow[i]])}; stopping rather than merging "
            "two keys (please report this input)"
        )
    unknown = np.flatnonzero(crow < 0)
    for i in unknown.tolist():
        line = int(chunk.line[i])
        raw = chunk.raw_line(data, line)
        key = key_of_line(raw, SKELETON) or b""
        why = f"not in {common.file}"
        seen = common.rejected_keys.get((int(chunk.key_h1[i]), int(chunk.key_h2[i])))
        if seen is not None:
            why = f"its line {common.file}:{seen[0]} was rejected ({seen[1]})"
        detail = f"field common_feature_index: {key.decode('utf-8', 'replace')!r} {why}"
        rejects.append((line, Reason.UNKNOWN_COMMON, detail, line_text(raw)))
    rejects.sort()
    keep = np.flatnonzero(crow >= 0)
    n = len(keep)
    crow = crow[keep]
    ints = chunk.ints[keep]
    sample_id, click, buy = ints[:, 0], ints[:, 1].astype(np.int8), ints[:, 2].astype(np.int8)
    # counted after a byte order mark: the shuffle does not depend on whether the file has one
    byte_offset = start - ctx.skeleton_bom + chunk.line_starts[chunk.line[keep]]
    slots = [s.take(keep) for s in chunk.slots] if len(unknown) else chunk.slots

    if ctx.split_tag == "train":
        split_key = sample_id if opts.split_by == "row" else common.user_id[crow]
        split = np.where(seeded_unit(split_key, opts.seed, SPLIT_STREAM) < opts.valid_fraction, 1, 0)
    else:
        split = np.full(n, SPLIT_CODES["test"])
    split = split.astype(np.int8)
    bucket = (seeded_unit(byte_offset, opts.seed, BUCKET_STREAM) * ctx.buckets).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(ctx.buckets + 1))

    columns: dict[str, pa.Array] = {
        "byte_offset": pa.array(byte_offset[order]),
        "sample_id": pa.array(sample_id[order]),
        "click": pa.array(click[order]),
        "buy": pa.array(buy[order]),
        "crow": pa.array(crow[order].astype(np.int32)),
        "split": pa.array(split[order]),
    }
    for k, name in enumerate(ctx.skeleton_slots.names):
        s = slots[k].take(order)
        columns[name] = pa.ListArray.from_arrays(pa.array(s.offsets.astype(np.int32)), pa.array(s.ids))
        if s.weights is not None:
            columns[name + "__w"] = pa.ListArray.from_arrays(
                pa.array(s.offsets.astype(np.int32)), pa.array(s.weights)
            )
    table = pa.table(columns).combine_chunks()
    batch = table.to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], table.schema)
    with ipc.new_file(_scratch_file(ctx, chunk_index), table.schema) as writer:
        for b in range(ctx.buckets):
            writer.write_batch(batch.slice(bounds[b], bounds[b + 1] - bounds[b]))

    counts: list[tuple[np.ndarray, np.ndarray]] = []
    refs = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    is_train = split == SPLIT_CODES["train"]
    if ctx.split_tag == "train":
        for s in slots:
            value_is_train = np.repeat(is_train, s.lengths)
            counts.append(count_ids(s.ids[value_is_train]))
        refs = np.unique(crow[is_train], return_counts=True)
    rows_by_split = {
        name: int((split == code).sum()) for name, code in SPLIT_CODES.items() if (split == code).any()
    }
    return _Pass1Result(
        chunk_index, chunk.n_lines, rejects, rows_by_split, counts, refs, chunk.ignored, chunk.fast_lines
    )


# ----------------------------------------------------------------------------------------------
# Stage 4: pass 2 (bucket -> shuffled shards)
# ----------------------------------------------------------------------------------------------


def _list_parts(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 from 0, flat values) of a single-chunk list column, slice-safe."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = np.asarray(array.offsets, dtype=np.int64)
    return offsets - offsets[0], array.flatten().to_numpy()


def pass2_task(task: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """Bucket ``b`` of every scratch file -> one shuffled shard per split present in it.

    Returns ``{split: {"file", "rows", "clicks", "conversions"}}`` of the shards written.
    """
    bucket, n_chunks = task
    ctx = context()
    common = ctx.common
    assert common is not None and ctx.out_tmp is not None
    batches = []
    for c in range(n_chunks):
        with pa.memory_map(str(_scratch_file(ctx, c))) as source:
            batch = ipc.open_file(source).get_batch(bucket)
            if batch.num_rows:
                batches.append(batch)
    written: dict[str, dict[str, Any]] = {}
    if not batches:
        return written
    table = pa.Table.from_batches(batches).combine_chunks()
    split = table.column("split").to_numpy()
    crow_all = table.column("crow").to_numpy().astype(np.int64)
    skeleton = {}
    for name, weighted in zip(ctx.skeleton_slots.names, ctx.skeleton_slots.weighted):
        offsets, ids = _list_parts(table.column(name))
        weights = _list_parts(table.column(name + "__w"))[1] if weighted else None
        skeleton[name] = Csr(offsets, ctx.vocabs[name].map(ids), weights)
    for split_name, code in SPLIT_CODES.items():
        rows = np.flatnonzero(split == code)
        if len(rows) == 0:
            continue
        rng = np.random.default_rng([ctx.options.seed, code, bucket])
        rows = rows[rng.permutation(len(rows))]
        crow = crow_all[rows]
        click = table.column("click").to_numpy()[rows]
        buy = table.column("buy").to_numpy()[rows]
        scalars = {
            "sample_id": table.column("sample_id").to_numpy()[rows],
            "request_id": crow + ctx.request_base,
            "user_id": common.user_id[crow],
            "click": click,
            "conversion": buy,
        }
        fields: dict[str, FieldValues] = {}
        request_ids: dict[str, int] = {}
        for spec in ctx.schema:
            if spec.name in ctx.per_request:
                # stored once per request (requests/<split>.arrow); count the ids a row would carry
                lengths = common.slots[ctx.user_slots.names.index(spec.name)].lengths
                request_ids[spec.name] = int(lengths[crow].sum())
                continue
            if spec.is_user:
                csr = common.slots[ctx.user_slots.names.index(spec.name)].take(crow)
            else:
                csr = skeleton[spec.name].take(rows)
            fields[spec.name] = FieldValues(csr.offsets, csr.ids, csr.weights if spec.weighted else None)
        shard_schema = ctx.shard_schema or ctx.schema
        num_embeddings = {spec.name: ctx.vocabs[spec.name].num_embeddings for spec in shard_schema}
        rel = f"{split_name}/part-{bucket:05d}.parquet"
        write_shard(shard_table(scalars, fields, shard_schema, num_embeddings), ctx.out_tmp / rel,
                    compression=ctx.options.compression)
        written[split_name] = {
            "file": rel,
            "rows": len(rows),
            "clicks": int(click.sum()),
            "conversions": int(buy.sum()),
            "request_ids": request_ids,
        }
    return written
