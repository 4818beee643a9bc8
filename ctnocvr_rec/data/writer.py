"""The format-neutral prepared-set writer: :class:`~ctnocvr_rec.data.formats.base.RawRows` chunks from
any input format -> shuffled Parquet shards + vocabulary + manifest + rejects.

Used by every ``ctnocvr data prepare --format NAME`` except ``aliccp-raw`` (whose joins need their own
pipeline, :mod:`ctnocvr_rec.data.formats.aliccp_raw`; both follow :mod:`ctnocvr_rec.data.writer_rules`). Two
passes, memory bounded by one reader chunk plus one output shard:

1. **Pass 1** (reader chunks in file order): reader rejects, then the writer's own checks (labels in
   {0, 1}, no ``click=0, conversion=1`` pair, every dense value finite; NaN = missing); ``sample_id``
   = running data-row index over the input files in order (train, valid, test; rejected rows keep
   their index, so a row's id and split never depend on other rows); split: a row of the train
   files goes to valid iff a seeded hash of its ``sample_id`` (``--split-by row``) or user id
   (``user``) is below ``--valid-fraction`` -- only when no valid file is given; train-split id
   counts (vocabulary) and exact sums of the transformed dense values (standardisation); the rows
   go, still raw, to one Arrow IPC scratch file per chunk and split, sorted by a seeded hash
   ``u`` of their ``sample_id``.
2. **Vocabulary** (train only, :class:`~ctnocvr_rec.data.vocab.FieldVocab`) and dense mean/std.
3. **Pass 2** (per split, per bucket ``b`` of ``B = ceil(rows / --rows-per-shard)``): the rows with
   ``floor(u * B) == b`` from every scratch file, put in ``sample_id`` order, permuted with
   ``default_rng([seed, split_code, b])``, ids mapped, dense standardised, written as
   ``<split>/part-<b>.parquet`` through :mod:`ctnocvr_rec.data.shards`.

The output depends only on the input rows and the options, not on how the reader cut its chunks
(the chunk order is undone by the ``sample_id`` sort; dense sums are exact). It is built in a
temporary folder and swapped into place; an unchanged re-run is skipped (``--force`` rebuilds).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ctnocvr_rec.data.csr import csr_gather_index
from ctnocvr_rec.data.dense import ExactMoments, dense_transform, standardize_dense
from ctnocvr_rec.data.formats.base import InputSource, PrepareError, RawRows, Reason, Reject, raw_text
from ctnocvr_rec.data.prepared import FORMAT, write_manifest
from ctnocvr_rec.data.rawfiles import remove_stale_temporaries, temporary_folder
from ctnocvr_rec.data.schema import FieldSchema
from ctnocvr_rec.data.shards import FieldValues, shard_table, write_shard
from ctnocvr_rec.data.vocab import CountAccumulator, FieldVocab, count_ids
from ctnocvr_rec.data.writer_rules import (
    BUCKET_STREAM,
    SPLIT_CODES,
    SPLIT_STREAM,
    Checksums,
    RejectRecord,
    check_no_empty_split,
    check_options,
    existing_output,
    fingerprint,
    output_options,
    progress_bar,
    publish,
    raise_first,
    seeded_unit,
    write_rejects,
)


@dataclass
class WriterOptions:
    """The format-neutral options of ``ctnocvr data prepare`` (same meaning as for ``aliccp-raw``)."""

    out_dir: str
    valid_fraction: float = 0.1
    split_by: str = "row"  # row | user
    seed: int = 0
    rows_per_shard: int = 262_144
    strict: bool = False
    allow_empty_split: bool = False
    force: bool = False
    progress: bool = True
    compression: str = "lz4"

    def output_options(self) -> dict[str, Any]:
        return output_options(self)


# ----------------------------------------------------------------------------------------------
# Pass 1
# ----------------------------------------------------------------------------------------------


@dataclass
class _FileStats:
    split: str
    header_lines: int = 0
    rows_in: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    last_row: int = 0


@dataclass
class _State:
    opts: WriterOptions
    schema: FieldSchema
    scratch: Path
    carve_valid: bool
    counters: dict[str, CountAccumulator]
    moments: dict[str, ExactMoments]
    rejects: list[RejectRecord] = field(default_factory=list)
    files: dict[str, _FileStats] = field(default_factory=dict)
    scratch_files: dict[int, list[Path]] = field(default_factory=lambda: {c: [] for c in SPLIT_CODES.values()})
    rows: dict[int, int] = field(default_factory=lambda: {c: 0 for c in SPLIT_CODES.values()})
    sample_base: int = 0  # sample_id of data row 1 of the current file
    current_file: str = ""
    user_ids_missing: bool = False


def _check_chunk(chunk: RawRows, schema: FieldSchema) -> None:
    """A reader's chunk must carry every schema field and dense feature, all of length n."""
    n = len(chunk)
    problems = [f"field {s.name} missing" for s in schema if s.name not in chunk.sparse]
    problems += [f"dense feature {d.name} missing" for d in schema.dense if d.name not in chunk.dense]
    for name, values in chunk.sparse.items():
        if len(values.offsets) != n + 1:
            problems.append(f"field {name}: {len(values.offsets) - 1} rows, expected {n}")
    for arr_name in ("click", "conversion"):
        if len(getattr(chunk, arr_name)) != n:
            problems.append(f"{arr_name}: wrong length")
    if problems:
        raise PrepareError(f"{chunk.file}: the reader returned a malformed chunk ({'; '.join(problems)})")


def _row_text(chunk: RawRows, i: int, schema: FieldSchema) -> str:
    """A row the writer rejects, as ``click=.. conversion=.. <field>=<ids> <dense>=<value>`` (the reader
    has the raw text; this keeps the values next to the reason)."""
    parts = [f"click={int(chunk.click[i])}", f"conversion={int(chunk.conversion[i])}"]
    for spec in schema:
        v = chunk.sparse[spec.name]
        ids = v.ids[int(v.offsets[i]):int(v.offsets[i + 1])]
        parts.append(f"{spec.name}={'|'.join(str(x) for x in ids.tolist())}")
    parts += [f"{d.name}={float(chunk.dense[d.name][i])!r}" for d in schema.dense]
    return raw_text(" ".join(parts))


def label_dense_rejects(chunk: RawRows, schema: FieldSchema) -> tuple[np.ndarray, list[Reject]]:
    """bool ``[n]`` rows the writer rejects, and their :class:`Reject` (first problem of each row): bad
    labels, ``click=0, conversion=1``, non-finite dense values. Also used by ``ctnocvr predict --format``."""
    n = len(chunk)
    click = np.asarray(chunk.click)
    conversion = np.asarray(chunk.conversion)
    bad = np.zeros(n, bool)
    why: dict[int, tuple[str, str]] = {}

    def note(mask: np.ndarray, reason: str, detail: Any) -> None:
        for i in np.flatnonzero(mask & ~bad).tolist():
            why[i] = (reason, detail(i))
        bad[:] |= mask

    for name, values in (("click", click), ("conversion", conversion)):
        note((values != 0) & (values != 1), Reason.BAD_LABEL, lambda i, v=values, f=name: f"field {f}: {int(v[i])}")
    note((click == 0) & (conversion == 1), Reason.INVALID_LABEL_PAIR,
         lambda i: "field click/conversion: click=0, conversion=1 (conversion without click)")
    for spec in schema.dense:
        values = np.asarray(chunk.dense[spec.name], np.float64)
        note(~np.isfinite(values), Reason.DENSE_NOT_FINITE,
             lambda i, v=values, f=spec.name: f"field {f}: {'missing' if np.isnan(v[i]) else float(v[i])}")
    rejects = [
        Reject(chunk.file, int(chunk.rows[i]), reason, detail, _row_text(chunk, i, schema))
        for i, (reason, detail) in sorted(why.items())
    ]
    return bad, rejects


def _spill(state: _State, code: int, scalars: dict[str, np.ndarray], fields: dict[str, FieldValues],
           dense: dict[str, np.ndarray], rows: np.ndarray) -> None:
    """Rows ``rows`` (chunk positions, in their scratch order) of split ``code`` to a new scratch file."""
    columns: dict[str, pa.Array] = {name: pa.array(values[rows]) for name, values in scalars.items()}
    for spec in state.schema:
        values = fields[spec.name]
        offsets, index = csr_gather_index(np.asarray(values.offsets, np.int64), rows)
        arrow_offsets = pa.array(offsets)
        columns[spec.name] = pa.LargeListArray.from_arrays(
            arrow_offsets, pa.array(np.asarray(values.ids, np.int64)[index]))
        if spec.weighted:
            if values.weights is None:
                raise PrepareError(f"field {spec.name} is weighted in the schema but the reader gave no weights")
            columns[spec.weight_column] = pa.LargeListArray.from_arrays(
                arrow_offsets, pa.array(np.asarray(values.weights, np.float32)[index]))
    for spec in state.schema.dense:
        columns[spec.column] = pa.array(dense[spec.name][rows])
    table = pa.table(columns)
    path = state.scratch / f"split{code}-{len(state.scratch_files[code]):06d}.arrow"
    with ipc.new_file(path, table.schema) as writer:
        writer.write_table(table)
    state.scratch_files[code].append(path)
    state.rows[code] += len(rows)


def _pass1_chunk(state: _State, split_in: str, chunk: RawRows) -> None:
    opts, schema = state.opts, state.schema
    _check_chunk(chunk, schema)
    if chunk.file != state.current_file:  # a new input file: its rows continue the running index
        if state.current_file:
            state.sample_base += state.files[state.current_file].last_row
        state.current_file = chunk.file
    stats = state.files.setdefault(chunk.file, _FileStats(split_in))
    stats.header_lines = chunk.header_lines
    bad, writer_rejects = label_dense_rejects(chunk, schema)
    rejects = sorted(list(chunk.rejects) + writer_rejects, key=lambda r: r.row)
    records = [(r.file, r.row, r.reason, r.detail, r.raw) for r in rejects]
    state.rejects.extend(records)
    if opts.strict and records:
        raise_first(records, line_offset=chunk.header_lines or None)
    all_rows = [int(chunk.rows.max()) if len(chunk) else 0] + [r.row for r in rejects]
    stats.last_row = max(stats.last_row, *all_rows)
    stats.rows_in += len(chunk) + len(chunk.rejects)
    stats.rows_rejected += len(rejects)
    keep = np.flatnonzero(~bad)
    n = len(keep)
    stats.rows_written += n
    if n == 0:
        return
    sample_id = state.sample_base + np.asarray(chunk.rows, np.int64)[keep] - 1
    user_id = (np.asarray(chunk.user_id, np.int64)[keep] if chunk.user_id is not None
               else np.full(n, -1, np.int64))
    request_id = (np.asarray(chunk.request_id, np.int64)[keep] if chunk.request_id is not None
                  else np.full(n, -1, np.int64))
    if split_in == "train":
        if state.carve_valid:
            if opts.split_by == "user" and chunk.user_id is None:
                raise PrepareError(f"{chunk.file}: --split-by user needs user ids, and this input has none; "
                                   "use --split-by row or give a --valid file")
            key = sample_id if opts.split_by == "row" else user_id
            split = np.where(seeded_unit(key, opts.seed, SPLIT_STREAM) < opts.valid_fraction, 1, 0).astype(np.int8)
        else:
            split = np.zeros(n, np.int8)
    else:
        split = np.full(n, SPLIT_CODES[split_in], np.int8)
    u = seeded_unit(sample_id, opts.seed, BUCKET_STREAM)  # shuffle bucket: floor(u * B)
    # chunk-position arrays: the kept rows' values are gathered once per split, sorted by u
    scalars = {
        "u": np.zeros(len(chunk)), "sample_id": np.zeros(len(chunk), np.int64),
        "click": np.asarray(chunk.click, np.int8), "conversion": np.asarray(chunk.conversion, np.int8),
        "user_id": np.full(len(chunk), -1, np.int64), "request_id": np.full(len(chunk), -1, np.int64),
    }
    scalars["u"][keep], scalars["sample_id"][keep] = u, sample_id
    scalars["user_id"][keep], scalars["request_id"][keep] = user_id, request_id
    train_rows = keep[split == SPLIT_CODES["train"]]
    if len(train_rows):
        for spec in schema:
            values = chunk.sparse[spec.name]
            index = csr_gather_index(np.asarray(values.offsets, np.int64), train_rows)[1]
            state.counters[spec.name].add(*count_ids(np.asarray(values.ids, np.int64)[index]))
    dense = {}
    for spec in schema.dense:
        dense[spec.name] = dense_transform(np.asarray(chunk.dense[spec.name], np.float64), spec.transform)
        if spec.standardize and len(train_rows):
            try:
                state.moments[spec.name].add(dense[spec.name][train_rows], spec.name)
            except ValueError as err:  # data/dense.py raises plain ValueErrors
                raise PrepareError(f"{chunk.file}: {err}") from None
    for code in np.unique(split).tolist():
        mine = np.flatnonzero(split == code)
        _spill(state, int(code), scalars, chunk.sparse, dense, keep[mine[np.argsort(u[mine], kind="stable")]])


# ----------------------------------------------------------------------------------------------
# Pass 2
# ----------------------------------------------------------------------------------------------


def _list_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.asarray(array.offsets, dtype=np.int64)
    return offsets - offsets[0], array.flatten().to_numpy()


def _write_split(
    state: _State,
    split_name: str,
    vocabs: dict[str, FieldVocab],
    dense_stats: dict[str, dict[str, Any]],
    out_tmp: Path,
) -> dict[str, Any]:
    code = SPLIT_CODES[split_name]
    n_rows = state.rows[code]
    entry: dict[str, Any] = {"rows": 0, "clicks": 0, "conversions": 0, "files": []}
    if n_rows == 0:
        return entry
    buckets = max(1, math.ceil(n_rows / state.opts.rows_per_shard))
    # each scratch file is sorted by u: bucket b is one contiguous slice of it
    bounds = []
    for path in state.scratch_files[code]:
        with pa.memory_map(str(path)) as source:
            u = ipc.open_file(source).read_all().column("u").to_numpy()
        bucket = np.minimum((u * buckets).astype(np.int64), buckets - 1)
        bounds.append(np.searchsorted(bucket, np.arange(buckets + 1)))
    (out_tmp / split_name).mkdir(exist_ok=True)
    num_embeddings = {name: v.num_embeddings for name, v in vocabs.items()}
    schema = state.schema
    with progress_bar(buckets, f"shards   {split_name}", state.opts.progress, unit="bucket") as bar:
        for b in range(buckets):
            pieces = []
            for path, bound in zip(state.scratch_files[code], bounds):
                if bound[b + 1] > bound[b]:
                    with pa.memory_map(str(path)) as source:
                        table = ipc.open_file(source).read_all()
                        pieces.append(table.slice(int(bound[b]), int(bound[b + 1] - bound[b])).combine_chunks())
            if not pieces:
                bar.update(1)
                continue
            table = pa.concat_tables(pieces).combine_chunks()
            sample_id = table.column("sample_id").to_numpy()
            rows = np.argsort(sample_id, kind="stable")  # undo the chunking: file order
            rows = rows[np.random.default_rng([state.opts.seed, code, b]).permutation(len(rows))]
            scalars = {name: table.column(name).to_numpy()[rows]
                       for name in ("sample_id", "request_id", "user_id", "click", "conversion")}
            click, conversion = scalars["click"], scalars["conversion"]
            fields = {}
            for spec in schema:
                offsets, ids = _list_parts(table.column(spec.name))
                offsets, index = csr_gather_index(offsets, rows)
                weights = _list_parts(table.column(spec.weight_column))[1][index] if spec.weighted else None
                fields[spec.name] = FieldValues(offsets, vocabs[spec.name].map(ids[index]), weights)
            dense = {}
            for spec in schema.dense:
                values = table.column(spec.column).to_numpy()[rows]
                stats = dense_stats[spec.name]
                dense[spec.name] = standardize_dense(values, spec.standardize, stats["mean"], stats["std"])
            rel = f"{split_name}/part-{b:05d}.parquet"
            write_shard(shard_table(scalars, fields, schema, num_embeddings, dense), out_tmp / rel,
                        compression=state.opts.compression)
            entry["rows"] += len(rows)
            entry["clicks"] += int(click.sum())
            entry["conversions"] += int(conversion.sum())
            entry["files"].append(rel)
            bar.update(1)
    return entry


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------


def write_prepared(
    source: InputSource, opts: WriterOptions, format_name: str, format_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Prepare ``source`` into ``opts.out_dir``; returns the manifest (also in ``manifest.json``)."""
    check_options(opts)
    schema = source.schema
    inputs = source.files()
    if not inputs.get("train"):
        raise PrepareError(f"--format {format_name}: no train input (the train split is required)")
    out = Path(opts.out_dir)
    sources = [p for split in SPLIT_CODES for p in inputs.get(split, [])]
    input_format = {"name": format_name, "options": dict(format_options or {})}
    fingerprint_ = fingerprint(opts.output_options(), schema, sources, input_format, by_name=False)
    old = existing_output(out, fingerprint_, opts.force, opts.progress)
    if old is not None:
        return old

    t0 = time.perf_counter()
    remove_stale_temporaries(out)
    checksums = Checksums(sources, by_name=False)
    tmp = temporary_folder(out, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "vocab").mkdir(parents=True)
    (tmp / "rejects").mkdir()
    (tmp / "_scratch").mkdir()
    state = _State(
        opts=opts,
        schema=schema,
        scratch=tmp / "_scratch",
        carve_valid=not inputs.get("valid"),
        counters={spec.name: CountAccumulator() for spec in schema},
        moments={d.name: ExactMoments() for d in schema.dense},
    )
    for split_in in SPLIT_CODES:  # every input file gets its entry, even one without rows
        for path in inputs.get(split_in, []):
            state.files.setdefault(str(path), _FileStats(split_in))
    timings: dict[str, float] = {}
    try:
        clock = time.perf_counter()
        for split_in in SPLIT_CODES:
            if not inputs.get(split_in):
                continue
            with progress_bar(0, f"read     {split_in}", opts.progress, unit="row") as bar:
                for chunk in source.read(split_in):
                    _pass1_chunk(state, split_in, chunk)
                    bar.update(len(chunk) + len(chunk.rejects))
        timings["pass1"] = time.perf_counter() - clock
        if not opts.allow_empty_split:
            given = {
                split: [(f, f, s.rows_in, s.rows_written) for f, s in state.files.items() if s.split == split]
                for split in SPLIT_CODES if inputs.get(split)
            }
            check_no_empty_split(given, state.rejects, unit="row")
        clock = time.perf_counter()
        vocabs = {spec.name: FieldVocab.build(spec, *state.counters[spec.name].result()) for spec in schema}
        dense_stats: dict[str, dict[str, Any]] = {}
        for spec in schema.dense:
            mean, std = state.moments[spec.name].mean_std() if spec.standardize else (0.0, 1.0)
            dense_stats[spec.name] = {"mean": mean, "std": std, "transform": spec.transform,
                                      "standardize": spec.standardize}
        splits = {name: _write_split(state, name, vocabs, dense_stats, tmp) for name in SPLIT_CODES}
        timings["pass2"] = time.perf_counter() - clock
        shutil.rmtree(state.scratch)
        for name in SPLIT_CODES:
            if (tmp / name).is_dir() and not any((tmp / name).iterdir()):
                (tmp / name).rmdir()
        for vocab in vocabs.values():
            vocab.save(tmp / "vocab")
        write_rejects(tmp / "rejects" / "rejects.csv", state.rejects, row_column="row")
        manifest = _manifest(state, source, format_name, input_format, vocabs, dense_stats, splits,
                             checksums.get(), sources, fingerprint_)
        write_manifest(tmp, manifest)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["_wall_s"] = time.perf_counter() - t0  # not written: the file stays byte-identical
    manifest["_timings"] = timings
    return manifest


def _manifest(
    state: _State,
    source: InputSource,
    format_name: str,
    input_format: dict[str, Any],
    vocabs: dict[str, FieldVocab],
    dense_stats: dict[str, dict[str, Any]],
    splits: dict[str, dict[str, Any]],
    checksums: dict[str, str],
    sources: list[Path],
    fingerprint_: str,
) -> dict[str, Any]:
    opts, schema = state.opts, state.schema
    rows_in = sum(s.rows_in for s in state.files.values())
    rows_written = sum(s.rows_written for s in state.files.values())
    rows_rejected = sum(s.rows_rejected for s in state.files.values())
    assert rows_in == rows_written + rows_rejected, (rows_in, rows_written, rows_rejected)
    by_reason: dict[str, dict[str, int]] = {}
    for file, _, reason, _, _ in state.rejects:
        by_reason.setdefault(file, {}).setdefault(reason, 0)
        by_reason[file][reason] += 1
    describe = getattr(source, "describe", None)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "fingerprint": fingerprint_,
        "schema": schema.to_dict(),
        "num_embeddings": {name: v.num_embeddings for name, v in vocabs.items()},
        "splits": splits,
    }
    if schema.dense:
        manifest["dense_stats"] = dense_stats
    manifest.update({
        "input": {**input_format, **(describe() if callable(describe) else {})},
        "split_rule": {
            "valid_fraction": opts.valid_fraction if state.carve_valid else None,
            "by": opts.split_by,
            "seed": opts.seed,
            "rule": (
                "a row of the train input goes to valid iff u < valid_fraction, where u is a seeded "
                "splitmix64 hash of its " + ("sample_id" if opts.split_by == "row" else "user id")
                + " mapped to [0, 1); valid and test are the files given for them"
                if state.carve_valid else
                "train, valid and test are the files given for them (no valid carved from train)"
            ),
        },
        "shuffle": {
            "seed": opts.seed,
            "rule": "u = seeded hash of sample_id; a split of R rows has B = ceil(R / rows_per_shard) "
            "buckets, bucket = floor(u * B); each bucket's rows, in sample_id order, are permuted with "
            "numpy default_rng([seed, split_code, bucket]); one shard per bucket",
            "split_codes": SPLIT_CODES,
        },
        "sample_id": "running data-row index over the input files in order (train, valid, test files "
        "as given), from 0; rejected rows keep theirs",
        "vocab": {
            "built_on": "train",
            "folder": "vocab",
            "counts": "train-split rows carrying the id",
            "sizes": {name: v.size for name, v in vocabs.items()},
        },
        "request_id": "from the input's request column, -1 when it has none",
        "user_id": "from the input's user column, -1 when it has none",
        "sources": {
            str(p): {"bytes": p.stat().st_size, "sha256": checksums.get(str(p), "")} for p in sources
        },
        "input_files": {
            file: {"split": s.split, "rows_in": s.rows_in, "rows_written": s.rows_written,
                   "rows_rejected": s.rows_rejected, "header_lines": s.header_lines}
            for file, s in state.files.items()
        },
        "rejects": {
            "file": "rejects/rejects.csv",
            "row": "1-based data row of the file (a header line is not counted: line = row + header_lines)",
            "rows_in": rows_in,
            "rows_written": rows_written,
            "rows_rejected": rows_rejected,
            "by_file_and_reason": by_reason,
        },
        "options": opts.output_options(),
    })
    return manifest
