"""``ctnocvr data prepare --format aliccp-raw`` (the default): raw Ali-CCP csv -> shuffled Parquet
shards + vocabulary + manifest. This module: the orchestration, the manifest and the registered
:data:`FORMAT`; stage 1 is in :mod:`.aliccp_raw_common`, the worker passes in :mod:`.aliccp_raw_passes`,
the rules shared with the other formats in :mod:`ctnocvr_rec.data.writer_rules`.

Output layout and columns: ``docs/design.md`` ("Prepared data set").

Pipeline (per official split; train first because its vocabulary maps test):

1. **Common features** (``common_features_<split>.csv``): parsed in parallel byte-range chunks
   (:func:`~ctnocvr_rec.data.rawformat.parse_chunk`) into the only in-memory table: per user field
   a CSR of raw ids (+ weights), rows in file order, looked up by two 64-bit hashes of the
   ``common_feature_index`` and confirmed by the key's bytes (kept with the table): a key's identity is
   its bytes. Duplicate keys keep the first line; later ones are rejected. A UTF-8 byte order mark
   at the start of any file is skipped (:mod:`~ctnocvr_rec.data.rawfiles`).
2. **Pass 1 over the skeleton** (parallel chunks): parse, join each row to its common row (unknown
   keys are rejected), assign the split (valid carved from train by a seeded hash of ``sample_id`` or
   of the user id) and a shuffle bucket (seeded hash of the line's byte offset), and write the rows
   bucket-sorted to one Arrow IPC scratch file per chunk, skeleton ids still raw. Workers return id
   counts of train-split rows and how many train rows reference each common row.
3. **Vocabulary** (train only): skeleton-field counts from pass 1; user-field counts from the common
   table weighted by those reference counts (counts are impressions). Then the common table's ids
   are mapped once.
4. **Pass 2** (parallel over buckets): gather bucket ``b`` from every scratch file (in file order),
   map skeleton ids, join the user fields by CSR gathers, permute each split's rows with
   ``default_rng([seed, split, b])`` and write ``<split>/part-<b>.parquet``.

Memory is bounded by the common table plus two buckets (``--rows-per-shard`` rows each). The
output depends only on the input and the options (not on ``--workers`` or ``--chunk-mb``); it is
written to a temporary folder and renamed into place, and a re-run with unchanged inputs and options
is skipped (``--force`` rebuilds). A split given as input that ends up empty is an error unless
``--allow-empty-split``; temporary folders left by a killed run are removed by the next one.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ctnocvr_rec.data.csr import Csr
from ctnocvr_rec.data.formats.aliccp_raw_common import (
    COMMON_FILE,
    MIN_BUCKETS,
    SKELETON_FILE,
    USER_ID_FIELD,
    PrepareOptions,
    RawContext,
    chunk_bytes,
    fork_pool,
    imap,
    load_common,
    map_common_ids,
    set_context,
    weighted_common_counts,
)
from ctnocvr_rec.data.formats.aliccp_raw_passes import pass1_task, pass2_task
from ctnocvr_rec.data.formats.base import PrepareError
from ctnocvr_rec.data.prepared import FORMAT as PREPARED_FORMAT
from ctnocvr_rec.data.prepared import write_manifest
from ctnocvr_rec.data.rawfiles import (
    bom_length,
    chunk_ranges,
    release_free_memory,
    remove_stale_temporaries,
    temporary_folder,
)
from ctnocvr_rec.data.rawformat import FieldSlots
from ctnocvr_rec.data.requests import FOLDER as REQUESTS_FOLDER
from ctnocvr_rec.data.requests import LAYOUTS as REQUEST_LAYOUTS
from ctnocvr_rec.data.requests import write_request_table
from ctnocvr_rec.data.schema import DEFAULT_SCHEMA, FieldSchema, load_schema
from ctnocvr_rec.data.shards import id_type
from ctnocvr_rec.data.vocab import CountAccumulator, FieldVocab, merge_counts
from ctnocvr_rec.data.writer_rules import (
    SPLIT_CODES,
    Checksums,
    check_no_empty_split,
    check_options,
    existing_output,
    fingerprint,
    progress_bar,
    publish,
    raise_first,
    write_rejects,
)

# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------

def _estimate_rows(path: Path) -> int:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if not head:
        return 1
    lines = max(head.count(b"\n"), 1)
    return max(1, math.ceil(size / (len(head) / lines)))


def _process_split(
    split_tag: str, ctx: RawContext, rejects: list[tuple[str, int, str, str, str]], report: dict[str, Any]
) -> None:
    """Common table, pass 1, (vocab for train), pass 2 for one official split."""
    opts = ctx.options
    raw = Path(opts.raw_dir)
    skeleton_path = raw / SKELETON_FILE.format(split=split_tag)
    common_path = raw / COMMON_FILE.format(split=split_tag)
    ctx.split_tag = split_tag
    ctx.skeleton_path = str(skeleton_path)
    ctx.skeleton_bom = bom_length(skeleton_path)
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        ctx.timings[f"{split_tag}/{phase}"] = now - clock
        clock = now

    set_context(ctx)
    pool = fork_pool(opts.workers)
    try:
        common = load_common(common_path, ctx, pool, opts.progress)
    finally:
        if pool is not None:
            pool.terminate()
    rejects.extend(common.rejects)
    ctx.common = common
    release_free_memory()  # the parse's chunk pieces (measured: ~0.45 GB of freed heap at 1/10 scale)
    lap("common")

    # pass 1
    ctx.buckets = max(MIN_BUCKETS, math.ceil(_estimate_rows(skeleton_path) / opts.rows_per_shard))
    (ctx.scratch / split_tag).mkdir(parents=True, exist_ok=True)
    ranges = chunk_ranges(skeleton_path, chunk_bytes(opts))
    tasks = [(i, s, e) for i, (s, e) in enumerate(ranges)]
    counters = [CountAccumulator() for _ in ctx.skeleton_slots.names]
    refs: list[tuple[np.ndarray, np.ndarray]] = []
    rows_by_split: Counter[str] = Counter()
    ignored: Counter[str] = Counter()
    skeleton_rejects: list[tuple[str, int, str, str, str]] = []
    line_base = fast_lines = 0
    set_context(ctx)
    pool = fork_pool(opts.workers)
    try:
        with progress_bar(skeleton_path.stat().st_size, f"skeleton {skeleton_path.name}", opts.progress) as bar:
            for (start, end), res in zip(ranges, imap(pool, pass1_task, tasks)):
                for line, reason, detail, raw_text in res.rejects:
                    skeleton_rejects.append(
                        (skeleton_path.name, line_base + line + 1, reason, detail, raw_text)
                    )
                if opts.strict and res.rejects:
                    raise_first(skeleton_rejects, opts.raw_dir)
                for counter, (ids, counts) in zip(counters, res.counts):
                    counter.add(ids, counts)
                refs.append(res.common_refs)
                rows_by_split.update(res.rows_by_split)
                ignored.update(res.ignored)
                line_base += res.n_lines
                fast_lines += res.fast_lines
                bar.update(end - start)
    finally:
        if pool is not None:
            pool.terminate()
    rejects.extend(skeleton_rejects)
    release_free_memory()
    lap("pass1")

    # vocabulary (train only), then map the common table once
    if split_tag == "train":
        ref_rows, ref_counts = merge_counts(refs)
        row_refs = np.zeros(common.n_rows, np.int64)
        row_refs[ref_rows] = ref_counts
        for spec in ctx.schema:
            if spec.is_user:
                csr = common.slots[ctx.user_slots.names.index(spec.name)]
                ids, counts = weighted_common_counts(csr, row_refs)
            else:
                ids, counts = counters[ctx.skeleton_slots.names.index(spec.name)].result()
            ctx.vocabs[spec.name] = FieldVocab.build(spec, ids, counts)
    for k, name in enumerate(ctx.user_slots.names):
        common.slots[k] = map_common_ids(common.slots[k], ctx.vocabs[name])
    if ctx.per_request:
        _write_requests(ctx, split_tag)
        # pass 2 needs only the list lengths of these fields (ids per row): free the ids and weights
        for name in ctx.per_request:
            k = ctx.user_slots.names.index(name)
            common.slots[k] = Csr(common.slots[k].offsets, np.zeros(0, np.int32), None)

    lap("vocab")

    # pass 2 (its workers fork from here: hand freed heap back first, or each fork inherits it;
    # build the id lookups once here, or each worker builds its own)
    for vocab in ctx.vocabs.values():
        vocab.prepare_lookup()
    release_free_memory()
    assert ctx.out_tmp is not None
    for split_name in SPLIT_CODES:
        (ctx.out_tmp / split_name).mkdir(exist_ok=True)
    files: dict[str, list[dict[str, Any]]] = {}
    set_context(ctx)
    pool = fork_pool(opts.workers)
    try:
        with progress_bar(ctx.buckets, f"shards   {split_tag}", opts.progress, unit="bucket") as bar:
            for written in imap(pool, pass2_task, [(b, len(ranges)) for b in range(ctx.buckets)]):
                for split_name, info in written.items():
                    files.setdefault(split_name, []).append(info)
                bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()
    shutil.rmtree(ctx.scratch / split_tag)
    lap("pass2")

    rows_written = sum(rows_by_split.values())
    report["files"][split_tag] = {
        "skeleton": {
            "file": skeleton_path.name,
            "rows_in": line_base,
            "rows_written": rows_written,
            "rows_rejected": len(skeleton_rejects),
            "rows_parsed_by_exact_path": line_base - fast_lines,
            "ignored_field_values": dict(sorted(ignored.items())),
        },
        "common": {
            "file": common_path.name,
            "rows_in": common.lines_in,
            "rows_kept": common.n_rows,
            "rows_rejected": len(common.rejects),
            "ignored_field_values": dict(sorted(common.ignored.items())),
        },
        "buckets": ctx.buckets,
    }
    for split_name, infos in files.items():
        entry = report["splits"].setdefault(
            split_name, {"rows": 0, "clicks": 0, "conversions": 0, "files": []}
        )
        ids = report["request_ids"].setdefault(split_name, Counter())
        for info in infos:
            entry["rows"] += info["rows"]
            entry["clicks"] += info["clicks"]
            entry["conversions"] += info["conversions"]
            entry["files"].append(info["file"])
            ids.update(info["request_ids"])
    ctx.request_base += common.n_rows
    ctx.common = None
    set_context(None)
    # the common table's spilled, memory-mapped columns (aliccp_raw_common._SpilledColumn)
    shutil.rmtree(ctx.scratch / f"common-{split_tag}", ignore_errors=True)


def _write_requests(ctx: RawContext, split_tag: str) -> None:
    """``requests/<split_tag>.arrow``: the per-request fields of the split's common table (mapped),
    one row per request in ``request_id`` order (:mod:`ctnocvr_rec.data.requests`)."""
    assert ctx.common is not None and ctx.out_tmp is not None
    common = ctx.common
    fields = {}
    for name in ctx.per_request:
        csr = common.slots[ctx.user_slots.names.index(name)]
        fields[name] = (csr.offsets, csr.ids, csr.weights if ctx.schema[name].weighted else None)
    rel = f"{REQUESTS_FOLDER}/{split_tag}.arrow"
    types = {name: id_type(ctx.vocabs[name].num_embeddings) for name in ctx.per_request}
    write_request_table(ctx.out_tmp / rel, fields, types)
    ctx.request_files.append({"file": rel, "first_request_id": ctx.request_base, "requests": common.n_rows})


def prepare(opts: PrepareOptions) -> dict[str, Any]:
    """Run the whole preparation; returns the manifest (also written to ``<out>/manifest.json``)."""
    check_options(opts)
    if opts.workers <= 0:
        opts.workers = os.cpu_count() or 1
    raw = Path(opts.raw_dir)
    out = Path(opts.out_dir)
    schema = load_schema(opts.schema)
    if opts.user_features not in REQUEST_LAYOUTS:
        raise PrepareError(f"--user-features must be one of {list(REQUEST_LAYOUTS)}, got {opts.user_features!r}")
    if opts.split_by == "user" and USER_ID_FIELD not in [s.name for s in schema.user_fields]:
        raise PrepareError(f"--split-by user needs the user-id field {USER_ID_FIELD!r} in {opts.schema}")
    splits = ["train"]
    for name in (SKELETON_FILE, COMMON_FILE):
        if not (raw / name.format(split="train")).is_file():
            raise PrepareError(f"{raw / name.format(split='train')}: missing (the train split is required)")
    test_files = [raw / n.format(split="test") for n in (SKELETON_FILE, COMMON_FILE)]
    if all(p.is_file() for p in test_files):
        splits.append("test")
    elif any(p.is_file() for p in test_files):
        missing = [str(p) for p in test_files if not p.is_file()]
        raise PrepareError(f"test split incomplete: missing {missing}")
    sources = [raw / n.format(split=s) for s in splits for n in (SKELETON_FILE, COMMON_FILE)]
    fingerprint_ = fingerprint(opts.output_options(), schema, sources)
    old = existing_output(out, fingerprint_, opts.force, opts.progress)
    if old is not None:
        return old

    t0 = time.perf_counter()
    remove_stale_temporaries(out)
    checksums = Checksums(sources)
    tmp = temporary_folder(out, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "vocab").mkdir(parents=True)
    (tmp / "rejects").mkdir()
    user_specs = schema.user_fields
    skeleton_specs = schema.skeleton_fields
    ctx = RawContext(
        options=opts,
        schema=schema,
        skeleton_slots=FieldSlots(
            tuple(s.name for s in skeleton_specs), tuple(s.weighted for s in skeleton_specs)
        ),
        user_slots=FieldSlots(tuple(s.name for s in user_specs), tuple(s.weighted for s in user_specs)),
        scratch=tmp / "_scratch",
        out_tmp=tmp,
    )
    if opts.user_features == "per-request" and user_specs:
        ctx.per_request = tuple(s.name for s in user_specs)
        ctx.shard_schema = replace(schema, fields=tuple(skeleton_specs))
    rejects: list[tuple[str, int, str, str, str]] = []
    report: dict[str, Any] = {"files": {}, "splits": {}, "request_ids": {}}
    try:
        for split_tag in splits:
            _process_split(split_tag, ctx, rejects, report)
        shutil.rmtree(ctx.scratch, ignore_errors=True)
        if not opts.allow_empty_split:
            _check_no_empty_split(opts, splits, report, rejects)
        for split_name in SPLIT_CODES:
            if not any((tmp / split_name).iterdir()):
                (tmp / split_name).rmdir()
        for vocab in ctx.vocabs.values():
            vocab.save(tmp / "vocab")
        write_rejects(tmp / "rejects" / "rejects.csv", rejects)
        manifest = _manifest(opts, schema, ctx, report, rejects, checksums.get(), sources, fingerprint_)
        write_manifest(tmp, manifest)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["_wall_s"] = time.perf_counter() - t0  # not written: the file stays byte-identical
    manifest["_timings"] = dict(ctx.timings)
    return manifest


def _check_no_empty_split(
    opts: PrepareOptions,
    official: list[str],
    report: dict[str, Any],
    rejects: list[tuple[str, int, str, str, str]],
) -> None:
    """Raise when an official split given as input (train; test when its files exist) ends up with no
    rows: an empty skeleton file or every row rejected (``--allow-empty-split`` accepts it). The valid
    split is carved at random from train and may legitimately be empty on a tiny train file.
    """
    inputs = {}
    for name in official:
        skeleton = report["files"][name]["skeleton"]
        path = str(Path(opts.raw_dir) / skeleton["file"])
        inputs[name] = [(path, skeleton["file"], skeleton["rows_in"], skeleton["rows_written"])]
    check_no_empty_split(inputs, rejects, unit="line")


def _manifest(
    opts: PrepareOptions,
    schema: FieldSchema,
    ctx: RawContext,
    report: dict[str, Any],
    rejects: list[tuple[str, int, str, str, str]],
    checksums: dict[str, str],
    sources: list[Path],
    fingerprint: str,
) -> dict[str, Any]:
    skeleton_files = [v["skeleton"] for v in report["files"].values()]
    rows_in = sum(s["rows_in"] for s in skeleton_files)
    rows_written = sum(s["rows_written"] for s in skeleton_files)
    rows_rejected = sum(s["rows_rejected"] for s in skeleton_files)
    assert rows_in == rows_written + rows_rejected, (rows_in, rows_written, rows_rejected)
    by_reason: dict[str, dict[str, int]] = {}
    for file, _, reason, _, _ in rejects:
        by_reason.setdefault(file, {}).setdefault(reason, 0)
        by_reason[file][reason] += 1
    splits = {}
    for name in SPLIT_CODES:
        entry = report["splits"].get(name, {"rows": 0, "clicks": 0, "conversions": 0, "files": []})
        entry["files"] = sorted(entry["files"])
        splits[name] = entry
    per_request: dict[str, Any] = {}
    if ctx.per_request:
        per_request["per_request"] = {
            "fields": list(ctx.per_request),
            "key": "request_id",
            "files": ctx.request_files,
            "ids_per_row": {
                split: {f: count / splits[split]["rows"] for f, count in sorted(ids.items())}
                for split, ids in report["request_ids"].items() if splits[split]["rows"]
            },
            "rule": "fields stored once per request in requests/<official split>.arrow (row = request_id - "
            "first_request_id) and joined onto the shards' rows by request_id (ctnocvr_rec/data/requests.py)",
        }
    return {
        "format": PREPARED_FORMAT,
        "fingerprint": fingerprint,
        "schema": schema.to_dict(),
        "num_embeddings": {name: v.num_embeddings for name, v in ctx.vocabs.items()},
        "splits": splits,
        "split_rule": {
            "valid_fraction": opts.valid_fraction,
            "by": opts.split_by,
            "seed": opts.seed,
            "rule": (
                "a row of the official train file goes to valid iff u < valid_fraction, where u is a "
                "seeded splitmix64 hash of its "
                + ("sample_id" if opts.split_by == "row" else "user id (field 101; -1 when absent)")
                + " mapped to [0, 1); test is the official test file"
            ),
        },
        "shuffle": {
            "seed": opts.seed,
            "rule": "bucket = seeded hash of the line's byte offset; each bucket's rows of a split are "
            "permuted with numpy default_rng([seed, split_code, bucket]); one shard per bucket and split",
            "split_codes": SPLIT_CODES,
        },
        "vocab": {
            "built_on": "train",
            "folder": "vocab",
            "counts": "train-split impressions carrying the id (user fields: per referencing row)",
            "sizes": {name: v.size for name, v in ctx.vocabs.items()},
        },
        "request_id": "row of the common_feature_index in its common-features file (file order, "
        "duplicates and rejects skipped), test rows offset by the train common rows",
        **per_request,
        "sources": {
            p.name: {"bytes": p.stat().st_size, "sha256": checksums.get(p.name, "")} for p in sources
        },
        "input_files": report["files"],
        "rejects": {
            "file": "rejects/rejects.csv",
            "rows_in": rows_in,
            "rows_written": rows_written,
            "rows_rejected": rows_rejected,
            "common_rows_rejected": sum(v["common"]["rows_rejected"] for v in report["files"].values()),
            "by_file_and_reason": by_reason,
        },
        "options": opts.output_options(),
    }


# ----------------------------------------------------------------------------------------------
# The registered format
# ----------------------------------------------------------------------------------------------


RAW_FORMAT = "aliccp-raw"


class RawFormat:
    """``--format aliccp-raw``: runs :func:`prepare` (its own pipeline: the common-features join, parallel
    byte-range parsing) instead of handing rows to the format-neutral writer."""

    name = RAW_FORMAT
    help = "the official raw Ali-CCP files in --raw-dir (sample_skeleton_*.csv + common_features_*.csv)"

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--raw-dir",
            help="folder with sample_skeleton_{train,test}.csv and common_features_{train,test}.csv "
            "(test optional)",
        )
        parser.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
        parser.add_argument(
            "--user-features", choices=REQUEST_LAYOUTS, default="per-request",
            help="per-request (default): the common-features file's user fields stored once per request "
            "in requests/<split>.arrow and joined by request_id when loading (at the full shape ~24x less "
            "disk, ~3x less prepare CPU); per-row: copied onto every impression row. Same batches either way",
        )

    def open(self, args: Any) -> Any:
        raise PrepareError(f"--format {RAW_FORMAT} runs its own pipeline (RawFormat.prepare), not the writer")

    def options(self, args: Any) -> dict[str, Any]:
        return {}

    def prepare(self, args: Any) -> dict[str, Any]:
        """Check the options, build :class:`PrepareOptions` from the CLI arguments and run :func:`prepare`."""
        if not args.raw_dir:
            raise PrepareError(f"--format {RAW_FORMAT} needs --raw-dir FOLDER")
        given = [f"--{n}" for n in ("train", "valid", "test") if getattr(args, n, None)]
        if given:
            raise PrepareError(f"{', '.join(given)}: not options of --format {RAW_FORMAT} (it reads --raw-dir)")
        return prepare(options_from_args(args))


FORMAT = RawFormat()


def options_from_args(args: Any) -> PrepareOptions:
    """The :class:`PrepareOptions` of parsed ``ctnocvr data prepare`` flags."""
    return PrepareOptions(
        raw_dir=args.raw_dir,
        out_dir=args.out,
        schema=args.schema or DEFAULT_SCHEMA,
        valid_fraction=args.valid_fraction,
        split_by=args.split_by,
        seed=args.seed,
        workers=args.workers,
        chunk_mb=args.chunk_mb,
        rows_per_shard=args.rows_per_shard,
        strict=args.strict,
        force=args.force,
        allow_empty_split=args.allow_empty_split,
        progress=not args.no_progress,
        compression=args.compression,
        user_features=getattr(args, "user_features", "per-request"),
    )
