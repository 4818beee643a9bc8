"""`ctnocvr data synth`: synthetic Ali-CCP raw files with a known ground truth.

Writes, into ``--out``, exactly the official raw layout (no header line, as in the official files):

* ``sample_skeleton_{train,test}.csv``: ``sample_id,click,buy,common_feature_index,feature_num,feature_list``
  (one line per impression; item, combination and context fields);
* ``common_features_{train,test}.csv``: ``common_feature_index,feature_num,feature_list``
  (one line per request; user fields, incl. the multi-valued weighted 14-day histories);
* ``ground_truth_{train,test}.parquet``: ``sample_id, item_id, segment, p_ctr, p_cvr``: the true
  click and post-click conversion probabilities of every impression, the raw field-205 item id and
  the item's planted segment (``normal | clickbait | gem``);
* ``synth_config.json``: every parameter, the derived intercepts and realised rates.

``feature_list`` items are ``field\\x02feature_id\\x03value`` joined by ``\\x01``. Feature ids are
global integers, disjoint between fields (as in the real data); ``value`` is ``1.0`` for unweighted
fields and a ``log(1 + count)`` weight for weighted ones.

What is drawn -- items with an appeal and a quality, planted clickbait and hidden-gem segments,
users with click/buy biases and histories, requests of candidate items, the selection strength and
the solved intercepts -- is the world model of :mod:`ctnocvr_rec.data.synth_world`. This module
holds the knobs (:class:`SynthConfig`), renders each block of drawn impressions as raw lines from
precomputed string tables (no per-field Python work per row), writes the files and runs the CLI.

Deterministic by ``--seed``: entities and every fixed-size block of requests draw from their own
``SeedSequence``; the test split uses the same users and items with different requests.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctnocvr_rec.data.schema import DEFAULT_SCHEMA, FieldSchema, load_schema
from ctnocvr_rec.data.synth_world import (
    COUNT_BUCKET_EDGES,
    SEGMENTS,
    World,
    build_world,
    calibrate,
    draw_impressions,
    request_sizes,
    seeded_rng,
    sigmoid,
)

SPLITS = ("train", "test")

#: requests per generation block; fixed (not a CLI knob) so that the output depends only on the seed
REQUESTS_PER_BLOCK = 4096
MAX_WEIGHT_COUNT = 256  # weights are written from a lookup table of log(1 + count)


@dataclass
class SynthConfig:
    """Every knob of the generator (written to ``synth_config.json``)."""

    rows_train: int = 200_000
    rows_test: int = 50_000
    users: int = 20_000
    items: int = 5_000
    seed: int = 0
    #: target mean pCTR over impressions
    ctr: float = 0.04
    #: target mean pCVR over clicks (200k rows at 4% CTR give ~2.4k conversions)
    cvr: float = 0.3
    clickbait_share: float = 0.1
    gem_share: float = 0.1
    #: segment shifts on the logit scale: clickbait +ctr_shift/-cvr_shift, gem -ctr_shift/+cvr_shift
    segment_ctr_shift: float = 1.2
    segment_cvr_shift: float = 1.5
    #: scale of the click logit's feature part (intercept re-solved): 0 = clicks at random (no
    #: sample selection bias), 1 = the default world, > 1 = more selective clicking
    selection_strength: float = 1.0
    #: mean candidate items per request (rows are grouped by request, as in Ali-CCP)
    mean_request_size: float = 20.0
    #: mean number of past items behind a user's 14-day histories (cold-start users have none)
    history_length: float = 30.0
    cold_user_share: float = 0.05
    #: preferred categories per user
    preferred_categories: int = 3
    #: share of a request's candidates drawn from the user's preferred categories
    preferred_candidate_share: float = 0.5
    #: share of users missing each optional user attribute (absent fields stay absent in the file)
    missing_attr_share: float = 0.03
    schema: str = DEFAULT_SCHEMA  # packaged field schema name, or a YAML path
    #: filled in by the generator
    derived: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Writing the raw format
# --------------------------------------------------------------------------------------------


def _piece_table(world: World, name: str, value: str = "1.0") -> np.ndarray:
    """``field\\x02raw_id\\x03value`` for every local value of ``name`` (object array)."""
    off = world.id_offset[name]
    return np.array([f"{name}\x02{off + v}\x03{value}" for v in range(world.cardinality[name])], dtype=object)


#: weight text of count c at index c, and "" (absent) at the end
_WEIGHT_STR = np.array([f"{math.log1p(c):.5f}" for c in range(MAX_WEIGHT_COUNT + 1)] + [""], dtype=object)
#: ",click,buy," at index click + buy (click=0, buy=1 cannot occur)
_LABEL_STR = np.array([",0,0,", ",1,0,", ",1,1,"], dtype=object)


def _weight_strings(counts: np.ndarray) -> np.ndarray:
    return _WEIGHT_STR[np.minimum(counts, MAX_WEIGHT_COUNT)]


def _item_strings(world: World, schema: FieldSchema) -> tuple[np.ndarray, np.ndarray]:
    """Feature-list text of every item's own fields (schema order) and its feature count."""
    roles = world.roles
    n_items = len(world.item_appeal)
    parts: list[np.ndarray] = []
    counts = np.zeros(n_items, dtype=np.int64)
    for spec in schema.by_group("item"):
        if spec is roles.item_id:
            parts.append(_piece_table(world, spec.name))
            counts += 1
            continue
        csr = world.item_attr[spec.name]
        table = _piece_table(world, spec.name)
        pieces = table[csr.values].tolist()
        off = csr.offsets.tolist()
        parts.append(np.array(["\x01".join(pieces[off[i]:off[i + 1]]) for i in range(n_items)], dtype=object))
        counts += np.diff(csr.offsets)
    joined = parts[0]
    for p in parts[1:]:
        joined = joined + "\x01" + p
    return joined, counts


def _user_strings(world: World, schema: FieldSchema) -> tuple[np.ndarray, np.ndarray]:
    """Feature-list text of every user's fields (schema order) and its feature count."""
    roles = world.roles
    n_users = len(world.user_click_bias)
    columns: list[list[str]] = []
    counts = np.zeros(n_users, dtype=np.int64)
    for spec in schema.by_group("user"):
        if spec is roles.user_id:
            columns.append(_piece_table(world, spec.name).tolist())
            counts += 1
        elif spec.name in world.histories:
            hist = world.histories[spec.name]
            if spec.weighted:
                entries = (_piece_table(world, spec.name, "")[hist.keys % hist.cardinality]
                           + _weight_strings(hist.counts)).tolist()
            else:
                entries = _piece_table(world, spec.name)[hist.keys % hist.cardinality].tolist()
            off = hist.user_offsets.tolist()
            columns.append(["\x01".join(entries[off[u]:off[u + 1]]) for u in range(n_users)])
            counts += np.diff(hist.user_offsets)
        else:
            vals = world.user_attr[spec.name]
            table = np.append(_piece_table(world, spec.name), "")  # index -1 -> "" (absent)
            columns.append(table[vals].tolist())
            counts += vals >= 0
    # join the non-empty parts of each user
    text = ["\x01".join([p for p in row if p]) for row in zip(*columns)]
    return np.array(text, dtype=object), counts


def _count_bucket(counts: np.ndarray) -> np.ndarray:
    return np.searchsorted(COUNT_BUCKET_EDGES, counts, side="right")


def _request_keys(seed: int, split_code: int, request_index: np.ndarray) -> list[str]:
    """Distinct 16-hex-digit common_feature_index strings (a bijective 64-bit mix of the index)."""
    x = (request_index.astype(np.uint64) + np.uint64(split_code) * np.uint64(1 << 40)
         + np.uint64(seed % (1 << 20)) * np.uint64(1 << 44))
    with np.errstate(over="ignore"):  # splitmix64 finaliser: a bijection on uint64
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return [f"{v:016x}" for v in x.tolist()]


@dataclass
class SplitSummary:
    rows: int
    requests: int
    clicks: int
    conversions: int
    mean_p_ctr: float
    seconds: float
    segment_rates: dict[str, dict[str, float]]


GROUND_TRUTH_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("item_id", pa.int64()),
    ("segment", pa.dictionary(pa.int8(), pa.string())),
    ("p_ctr", pa.float64()),
    ("p_cvr", pa.float64()),
])


@dataclass
class _SplitJob:
    """Everything a block renderer needs (shared with forked workers through a module global)."""

    world: World
    cfg: SynthConfig
    split_code: int
    sizes: np.ndarray
    block_request_start: np.ndarray  # first request index of each block
    block_sample_start: np.ndarray  # first sample_id of each block
    b_ctr: float
    b_cvr: float
    item_text: np.ndarray
    item_count: np.ndarray
    user_text: np.ndarray
    user_count: np.ndarray
    comb_tables: dict[str, np.ndarray]
    ctx_tables: dict[str, np.ndarray]


_JOB: _SplitJob | None = None


@dataclass
class _Block:
    skeleton: bytes
    common: bytes
    truth: dict[str, np.ndarray]
    clicks: int
    conversions: int
    p_ctr_sum: float
    segment_rows: np.ndarray
    segment_clicks: np.ndarray
    segment_conversions: np.ndarray


def _render_block(block: int) -> _Block:
    """Generate and format the impressions of one block of requests (pure function of the seed)."""
    job = _JOB
    assert job is not None
    world, cfg, roles = job.world, job.cfg, job.world.roles
    start = block * REQUESTS_PER_BLOCK
    block_sizes = job.sizes[start:start + REQUESTS_PER_BLOCK]
    rng = seeded_rng(cfg.seed, 4, job.split_code, block)
    imp = draw_impressions(world, cfg, block_sizes, rng)
    n = len(imp.item)
    p_ctr = sigmoid(imp.logit_ctr + job.b_ctr)
    p_cvr = sigmoid(imp.logit_cvr + job.b_cvr)
    click = (rng.random(n) < p_ctr).astype(np.int64)
    buy = click * (rng.random(n) < p_cvr)  # a conversion needs a click: never click=0, buy=1
    first_request = int(job.block_request_start[block])
    keys = _request_keys(cfg.seed, job.split_code, np.arange(first_request, first_request + len(block_sizes)))
    # skeleton: sample_id,click,buy,common_feature_index,feature_num,feature_list
    # Each line is the concatenation of string columns gathered from lookup tables (object fancy
    # indexing copies references only), joined once per row: no per-field Python work per row.
    first_sample = int(job.block_sample_start[block])
    sample_ids = np.arange(first_sample, first_sample + n, dtype=np.int64)
    feature_num = job.item_count[imp.item].copy()
    columns: list[np.ndarray | list[str]] = [
        list(map(str, sample_ids.tolist())),
        _LABEL_STR[click + buy],  # ",click,buy,"
        np.array([k + "," for k in keys], dtype=object)[imp.request_of_row],
        None,  # feature_num, filled below once all optional features are counted
        job.item_text[imp.item],
    ]
    for c in roles.combinations:
        hist_name = roles.combination_history[c.name]
        count = imp.match_count[hist_name]
        attr_first = world.item_attr[world.histories[hist_name].attr].first[imp.item]
        table = job.comb_tables[c.name]  # "\x01field\x02id\x03[1.0]" per local id, then "" (absent)
        present = count > 0  # a combination feature exists only where the user history matches
        local = attr_first * (len(COUNT_BUCKET_EDGES) + 1) + _count_bucket(count)
        columns.append(table[np.where(present, local, len(table) - 1)])
        if c.weighted:
            columns.append(_WEIGHT_STR[np.where(present, np.minimum(count, MAX_WEIGHT_COUNT), len(_WEIGHT_STR) - 1)])
        feature_num += present
    for name, table in job.ctx_tables.items():
        columns.append(table[imp.context[name]])
        feature_num += 1
    columns[3] = [f"{f}," for f in feature_num.tolist()]
    skeleton = ("\n".join(map("".join, zip(*columns))) + "\n").encode("ascii")
    # common features: common_feature_index,feature_num,feature_list (one line per request)
    common = "".join([
        f"{k},{job.user_count[u]},{job.user_text[u]}\n" for k, u in zip(keys, imp.request_user.tolist())
    ]).encode("ascii")
    seg = world.item_segment[imp.item]
    truth = {
        "sample_id": sample_ids,
        "item_id": world.id_offset[roles.item_id.name] + imp.item,
        "segment": seg,
        "p_ctr": p_ctr,
        "p_cvr": p_cvr,
    }
    return _Block(
        skeleton, common, truth, int(click.sum()), int(buy.sum()), float(p_ctr.sum()),
        np.bincount(seg, minlength=3), np.bincount(seg, weights=click, minlength=3),
        np.bincount(seg, weights=buy, minlength=3),
    )


def _write_split(
    world: World, cfg: SynthConfig, split: str, rows: int, first_sample_id: int, b_ctr: float,
    b_cvr: float, texts: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], out: Path, workers: int,
) -> SplitSummary:
    """Write one split's skeleton, common features and ground truth; blocks render in ``workers``
    forked processes (in order, so the output does not depend on the worker count)."""
    global _JOB
    t0 = time.perf_counter()
    split_code = SPLITS.index(split) + 1
    roles = world.roles
    sizes = request_sizes(cfg, rows, seeded_rng(cfg.seed, 3, split_code))
    n_blocks = (len(sizes) + REQUESTS_PER_BLOCK - 1) // REQUESTS_PER_BLOCK
    block_starts = np.arange(n_blocks, dtype=np.int64) * REQUESTS_PER_BLOCK
    rows_before = np.concatenate([[0], np.cumsum(sizes)])[block_starts] if n_blocks else block_starts
    _JOB = _SplitJob(
        world=world, cfg=cfg, split_code=split_code, sizes=sizes, block_request_start=block_starts,
        block_sample_start=first_sample_id + rows_before, b_ctr=b_ctr, b_cvr=b_cvr,
        item_text=texts[0], item_count=texts[1], user_text=texts[2], user_count=texts[3],
        comb_tables={
            c.name: np.append("\x01" + _piece_table(world, c.name, "" if c.weighted else "1.0"), "")
            for c in roles.combinations
        },
        ctx_tables={s.name: "\x01" + _piece_table(world, s.name) for s in roles.contexts},
    )
    segment_dictionary = pa.array(SEGMENTS, pa.string())
    seg_rows, seg_clicks, seg_convs = np.zeros(3), np.zeros(3), np.zeros(3)
    clicks_total = conv_total = 0
    p_ctr_sum = 0.0
    pool = None
    try:
        if workers > 1 and n_blocks > 1:
            # fork: workers inherit the world (no pickling); blocks come back in order
            pool = multiprocessing.get_context("fork").Pool(min(workers, n_blocks))
            blocks = pool.imap(_render_block, range(n_blocks))
        else:
            blocks = map(_render_block, range(n_blocks))
        with open(out / f"sample_skeleton_{split}.csv", "wb") as skel, open(
            out / f"common_features_{split}.csv", "wb"
        ) as common, pq.ParquetWriter(
            out / f"ground_truth_{split}.parquet", GROUND_TRUTH_SCHEMA, use_dictionary=["segment"]
        ) as truth:
            for blk in blocks:
                skel.write(blk.skeleton)
                common.write(blk.common)
                t = blk.truth
                truth.write_table(pa.table({
                    "sample_id": pa.array(t["sample_id"], pa.int64()),
                    "item_id": pa.array(t["item_id"], pa.int64()),
                    "segment": pa.DictionaryArray.from_arrays(pa.array(t["segment"], pa.int8()), segment_dictionary),
                    "p_ctr": pa.array(t["p_ctr"], pa.float64()),
                    "p_cvr": pa.array(t["p_cvr"], pa.float64()),
                }, schema=GROUND_TRUTH_SCHEMA))
                seg_rows += blk.segment_rows
                seg_clicks += blk.segment_clicks
                seg_convs += blk.segment_conversions
                clicks_total += blk.clicks
                conv_total += blk.conversions
                p_ctr_sum += blk.p_ctr_sum
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        _JOB = None
    rates = {
        SEGMENTS[s]: {
            "rows": int(seg_rows[s]),
            "ctr": float(seg_clicks[s] / seg_rows[s]) if seg_rows[s] else float("nan"),
            "cvr": float(seg_convs[s] / seg_clicks[s]) if seg_clicks[s] else float("nan"),
        }
        for s in range(3)
    }
    return SplitSummary(rows, len(sizes), clicks_total, conv_total, p_ctr_sum / max(rows, 1),
                        time.perf_counter() - t0, rates)


def generate(
    cfg: SynthConfig, out_dir: str | Path, schema: FieldSchema | None = None, workers: int = 1
) -> dict[str, Any]:
    """Write both splits, the ground truth and ``synth_config.json`` into ``out_dir``.

    ``workers`` > 1 renders blocks in forked processes; the files are byte-identical either way.

    Returns the content of ``synth_config.json`` (config + derived intercepts + per-split summary).
    """
    for name in ("rows_train", "rows_test"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"synth: --{name.replace('_', '-')} must be >= 0")
    for name in ("clickbait_share", "gem_share"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"synth: --{name.replace('_', '-')} must be in [0, 1]")
    if not (math.isfinite(cfg.selection_strength) and cfg.selection_strength >= 0.0):
        raise ValueError(f"synth: --selection-strength must be a finite number >= 0, got {cfg.selection_strength}")
    if cfg.clickbait_share + cfg.gem_share > 1.0:
        raise ValueError("synth: --clickbait-share + --gem-share must be <= 1")
    schema = schema or load_schema(cfg.schema)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = build_world(cfg, schema)
    b_ctr, b_cvr = calibrate(world, cfg)
    texts = (*_item_strings(world, schema), *_user_strings(world, schema))
    setup_s = time.perf_counter() - t0
    summaries = {}
    first_id = 1  # sample ids are unique across splits: train 1..N, test N+1..N+M
    for split, rows in (("train", cfg.rows_train), ("test", cfg.rows_test)):
        summaries[split] = asdict(_write_split(
            world, cfg, split, rows, first_id, b_ctr, b_cvr, texts, out, workers))
        first_id += rows
    report = asdict(cfg)
    report["derived"] = {
        "intercept_ctr": b_ctr,
        "intercept_cvr": b_cvr,
        "cardinality": world.cardinality,
        "feature_id_offset": world.id_offset,
        "history_item_attribute": world.roles.history_attr,
        "combination_history": world.roles.combination_history,
        "segment_items": {s: int((world.item_segment == k).sum()) for k, s in enumerate(SEGMENTS)},
        "setup_seconds": setup_s,
        "splits": summaries,
    }
    with open(out / "synth_config.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=False)
    return report


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    parser.add_argument("--out", required=True, help="output folder for the raw files")
    parser.add_argument("--rows-train", type=int, default=d.rows_train)
    parser.add_argument("--rows-test", type=int, default=d.rows_test)
    parser.add_argument("--users", type=int, default=d.users)
    parser.add_argument("--items", type=int, default=d.items)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--ctr", type=float, default=d.ctr, help="mean pCTR (default %(default)s)")
    parser.add_argument("--cvr", type=float, default=d.cvr, help="mean pCVR over clicks (default %(default)s)")
    parser.add_argument("--clickbait-share", type=float, default=d.clickbait_share)
    parser.add_argument("--gem-share", type=float, default=d.gem_share)
    parser.add_argument("--segment-ctr-shift", type=float, default=d.segment_ctr_shift)
    parser.add_argument("--segment-cvr-shift", type=float, default=d.segment_cvr_shift)
    parser.add_argument("--selection-strength", type=float, default=d.selection_strength,
                        help="scale of the click logit's features: 0 = clicks at random (no selection "
                        "bias), >1 = more selective (default %(default)s)")
    parser.add_argument("--mean-request-size", type=float, default=d.mean_request_size)
    parser.add_argument("--history-length", type=float, default=d.history_length)
    parser.add_argument("--schema", default=d.schema, help="field schema: packaged name or YAML path (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="forked processes rendering blocks; output is byte-identical for any count. "
                        "One process already writes >300k rows/s; more only pay off on idle cores")


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    """The :class:`SynthConfig` of parsed :func:`add_arguments` flags."""
    return SynthConfig(
        rows_train=args.rows_train, rows_test=args.rows_test, users=args.users, items=args.items,
        seed=args.seed, ctr=args.ctr, cvr=args.cvr, clickbait_share=args.clickbait_share,
        gem_share=args.gem_share, segment_ctr_shift=args.segment_ctr_shift,
        segment_cvr_shift=args.segment_cvr_shift, selection_strength=args.selection_strength,
        mean_request_size=args.mean_request_size,
        history_length=args.history_length, schema=args.schema,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    report = generate(cfg, args.out, workers=args.workers)
    wall = time.perf_counter() - t0
    total = cfg.rows_train + cfg.rows_test
    for split, s in report["derived"]["splits"].items():
        seg = ", ".join(f"{k}: ctr {v['ctr']:.4f} cvr {v['cvr']:.4f}" for k, v in s["segment_rates"].items())
        print(f"{split}: {s['rows']} rows, {s['requests']} requests, {s['clicks']} clicks "
              f"(CTR {s['clicks'] / max(s['rows'], 1):.4f}), {s['conversions']} conversions "
              f"(CVR {s['conversions'] / max(s['clicks'], 1):.4f}); {seg}")
    print(f"wrote {args.out} in {wall:.1f}s ({total / max(wall, 1e-9):,.0f} rows/s incl. set-up)")
    return 0
