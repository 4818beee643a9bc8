"""Write a raw Ali-CCP set with the real data's full *shape* (rows, requests, ~518 features per request).

``ctnocvr data synth`` plants a ground truth (items with appeal/quality, users with biases and
~30-item histories) and formats every line from Python objects: right for learning experiments, too
slow and too small per request to rehearse the real data path. Real Ali-CCP's train split has
42.3 M skeleton rows and a ~730 k-row common-features file of ~518 features per row (~9 GB). This
tool writes that shape at any ``--scale`` (fraction of the real row and request counts), with no
ground truth and no learnable signal beyond label rates:

* ``common_features_{split}.csv``: one line per request: the 9 single-valued user fields of the
  ``aliccp`` schema (``101`` user id, ``121..129`` profile) and the four weighted 14-day histories
  ``109_14, 110_14, 127_14, 150_14`` with list lengths drawn per request from a negative binomial
  (mean ``HISTORY_MEAN``: the ``aliccp-full`` preset's pooling-factor proportions 30:60:50:40 scaled
  to ~509 ids, coefficient of variation ~0.5), weights ``log(1 + count)`` of a small count;
* ``sample_skeleton_{split}.csv``: impressions grouped by request (consecutive, as in the real
  files), ``REAL_ROWS / REAL_REQUESTS`` (~58) rows per request on average with a heavy tail (Gamma
  shares, shape 0.5); item fields ``205 206 207 216`` single, ``210`` multi-valued (1 + Poisson(2)),
  combination fields ``508 509 702 853`` each present with probability 0.5 (``853`` weighted),
  context ``301``; ``click ~ Bernoulli(0.04)``, ``buy = click * Bernoulli(0.0055 / 0.04)`` (Ali-CCP's
  CTR and CTCVR rates).

Ids: every field draws the rank of its id from a Zipf law (exponent ``--exponent``, default 1.05)
over the field's full-scale table size (``aliccp-full`` preset), hot ids scattered by a seeded
permutation (:class:`ctnocvr_rec.data.id_skew.ZipfIds`); raw feature ids are global integers,
disjoint between fields (as in the real files). Attributes of an impression (category, shop, ...)
are drawn independently of its item id: the join and vocabulary costs depend on the counts and
skew, not on that consistency.

Fast: lines are built column-wise with Arrow string kernels (int -> string casts, element-wise and
list joins), one block of requests at a time; deterministic in ``--seed`` (each block draws from
its own ``SeedSequence``). Memory stays at one block (~``--block-requests`` requests).

Example (1/100 of the real shape, ~5 s)::

    python tools/make_fullshape.py --out /tmp/fs100 --scale 0.01
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ctnocvr_rec.data.id_skew import ZipfIds  # noqa: E402
from ctnocvr_rec.resources import resolve  # noqa: E402
from ctnocvr_rec.yaml_strict import load_yaml_file  # noqa: E402

REAL_ROWS = {"train": 42_300_000, "test": 43_000_000}
REAL_REQUESTS = {"train": 730_000, "test": 690_000}
USER_SINGLE = ["101", "121", "122", "124", "125", "126", "127", "128", "129"]
#: mean history lengths: preset pooling factors 30:60:50:40 scaled to ~509 ids (+9 single = ~518)
HISTORY_MEAN = {"109_14": 85.0, "110_14": 170.0, "127_14": 141.0, "150_14": 113.0}
HISTORY_SHAPE = 4.0  # negative-binomial shape: CV = sqrt(1/shape + 1/mean) ~ 0.5
ITEM_SINGLE = ["205", "206", "207", "216"]
ITEM_MULTI = "210"
COMBINATION = ["508", "509", "702", "853"]
WEIGHTED_SKELETON = {"853"}
CONTEXT = "301"
COMBINATION_PRESENT = 0.5
CTR, CTCVR = 0.04, 0.0055
MAX_COUNT = 8  # weights are log(1 + count), count in 1..MAX_COUNT (geometric)
WEIGHT_TEXT = pa.array([f"{math.log1p(c):.6g}" for c in range(1, MAX_COUNT + 1)], pa.string())


class _Ids:
    """Per field: a Zipf sampler over the preset's table size and the field's raw-id base."""

    def __init__(self, exponent: float, seed: int) -> None:
        # the preset file read directly: ctnocvr_rec.plan imports torchrec (a minute under load)
        preset = load_yaml_file(resolve("preset", "aliccp-full"))
        sizes = {name: int(entry["num_embeddings"]) for name, entry in preset["fields"].items()}
        order = USER_SINGLE + list(HISTORY_MEAN) + ITEM_SINGLE + [ITEM_MULTI] + COMBINATION + [CONTEXT]
        self.base: dict[str, int] = {}
        self.sampler: dict[str, ZipfIds] = {}
        next_base = 1_000
        for k, name in enumerate(order):
            self.base[name] = next_base
            next_base += sizes[name] + 1_000
            self.sampler[name] = ZipfIds(sizes[name], exponent, seed=seed * 7919 + k)

    def draw(self, name: str, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.sampler[name].sample(n, rng) + self.base[name]


def _tokens(name: str, ids: np.ndarray, rng: np.random.Generator, weighted: bool) -> pa.Array:
    """``field\\x02id\\x03value`` per id (value ``log(1 + count)`` when weighted, else ``1.0``)."""
    id_text = pc.cast(pa.array(ids), pa.string())
    if weighted:
        count = np.minimum(rng.geometric(0.45, len(ids)), MAX_COUNT) - 1
        value = WEIGHT_TEXT.take(pa.array(count))
    else:
        value = "1.0"
    return pc.binary_join_element_wise(f"{name}\x02", id_text, "\x03", value, "")


def _rows_of(parts: list[tuple[np.ndarray, pa.Array]], n_rows: int) -> tuple[pa.Array, np.ndarray]:
    """Interleave per-field token arrays into row order.

    ``parts``: per field (in output order) ``(lengths [n_rows], tokens [lengths.sum()])``, the
    tokens of row ``r`` consecutive. Returns the rows' ``feature_list`` strings and ``feature_num``.
    """
    lengths = np.stack([p[0] for p in parts], axis=1)  # [n_rows, fields]
    per_row = lengths.sum(axis=1)
    row_start = np.zeros(n_rows + 1, np.int64)
    np.cumsum(per_row, out=row_start[1:])
    # destination of each field's tokens: row start + tokens of earlier fields in the row + rank
    before = np.cumsum(lengths, axis=1) - lengths
    dest = []
    for j, (ln, _) in enumerate(parts):
        starts = np.zeros(n_rows + 1, np.int64)
        np.cumsum(ln, out=starts[1:])
        rank = np.arange(int(starts[-1]), dtype=np.int64) - np.repeat(starts[:-1], ln)
        dest.append(np.repeat(row_start[:-1] + before[:, j], ln) + rank)
    order = np.empty(int(row_start[-1]), np.int64)
    order[np.concatenate(dest)] = np.arange(len(order), dtype=np.int64)
    tokens = pa.concat_arrays([p[1] for p in parts]).take(pa.array(order))
    lists = pa.LargeListArray.from_arrays(pa.array(row_start), tokens)
    return pc.binary_join(lists, "\x01"), per_row


def _lines(columns: list[pa.Array | str]) -> bytes:
    """Columns joined by ``,``, one ``\\n``-terminated line per row, as one bytes object."""
    line = pc.binary_join_element_wise(pc.binary_join_element_wise(*columns, ","), "", "\n")
    offsets = np.frombuffer(line.buffers()[1], np.int32)[line.offset:line.offset + len(line) + 1]
    return line.buffers()[2].to_pybytes()[offsets[0]:offsets[-1]]


def _keys(split_code: int, first: int, n: int) -> pa.Array:
    """Distinct 16-hex-digit ``common_feature_index`` strings (bijective mix of the request index)."""
    x = np.arange(first, first + n, dtype=np.uint64) + np.uint64(split_code) * np.uint64(1 << 40)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    # 16 hex digits through a byte view: each nibble -> one ASCII char
    nib = np.stack([(x >> np.uint64(4 * (15 - i))) & np.uint64(15) for i in range(16)], axis=1).astype(np.uint8)
    chars = np.frombuffer(b"0123456789abcdef", np.uint8)[nib].reshape(-1)
    return pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(0, 16 * n + 1, 16, dtype=np.int32).tobytes()),
                                       pa.py_buffer(chars.tobytes()))


def request_sizes(rows: int, requests: int, rng: np.random.Generator) -> np.ndarray:
    """``[requests]`` impressions per request, each >= 1, summing to ``rows`` (Gamma(0.5) shares)."""
    if requests > rows:
        raise ValueError(f"{requests} requests need at least as many rows, got {rows}")
    share = rng.gamma(0.5, size=requests)
    return 1 + rng.multinomial(rows - requests, share / share.sum())


def write_split(out: Path, split: str, rows: int, requests: int, first_sample_id: int, ids: _Ids,
                seed: int, block_requests: int) -> dict[str, float]:
    split_code = 1 if split == "train" else 2
    sizes = request_sizes(rows, requests, np.random.default_rng([seed, split_code, 0]))
    t0 = time.perf_counter()
    common_tokens = 0
    sample_id = first_sample_id
    with open(out / f"common_features_{split}.csv", "wb") as common_f, \
            open(out / f"sample_skeleton_{split}.csv", "wb") as skel_f:
        for b, first in enumerate(range(0, requests, block_requests)):
            rng = np.random.default_rng([seed, split_code, 1, b])
            n_req = min(block_requests, requests - first)
            keys = _keys(split_code, first, n_req)
            # common features: key,feature_num,feature_list
            parts = []
            for name in USER_SINGLE:
                parts.append((np.ones(n_req, np.int64), _tokens(name, ids.draw(name, n_req, rng), rng, False)))
            for name, mean in HISTORY_MEAN.items():
                ln = rng.negative_binomial(HISTORY_SHAPE, HISTORY_SHAPE / (HISTORY_SHAPE + mean), n_req)
                parts.append((ln, _tokens(name, ids.draw(name, int(ln.sum()), rng), rng, True)))
            feature_list, num = _rows_of(parts, n_req)
            common_tokens += int(num.sum())
            common_f.write(_lines([keys, pc.cast(pa.array(num), pa.string()), feature_list]))
            # skeleton: sample_id,click,buy,key,feature_num,feature_list (rows grouped by request)
            block_sizes = sizes[first:first + n_req]
            n = int(block_sizes.sum())
            click = rng.random(n) < CTR
            buy = click & (rng.random(n) < CTCVR / CTR)
            parts = []
            for name in ITEM_SINGLE:
                parts.append((np.ones(n, np.int64), _tokens(name, ids.draw(name, n, rng), rng, False)))
            ln = 1 + rng.poisson(2.0, n)
            parts.append((ln, _tokens(ITEM_MULTI, ids.draw(ITEM_MULTI, int(ln.sum()), rng), rng, False)))
            for name in COMBINATION:
                ln = (rng.random(n) < COMBINATION_PRESENT).astype(np.int64)
                parts.append((ln, _tokens(name, ids.draw(name, int(ln.sum()), rng), rng, name in WEIGHTED_SKELETON)))
            parts.append((np.ones(n, np.int64), _tokens(CONTEXT, ids.draw(CONTEXT, n, rng), rng, False)))
            feature_list, num = _rows_of(parts, n)
            label = pa.array(np.array(["0,0", "1,0", "1,1"])[click.astype(np.int64) + buy])
            skel_f.write(_lines([
                pc.cast(pa.array(np.arange(sample_id, sample_id + n, dtype=np.int64)), pa.string()),
                label, keys.take(pa.array(np.repeat(np.arange(n_req), block_sizes))),
                pc.cast(pa.array(num), pa.string()), feature_list,
            ]))
            sample_id += n
    return {"rows": rows, "requests": requests, "mean_common_features": common_tokens / max(requests, 1),
            "common_bytes": (out / f"common_features_{split}.csv").stat().st_size,
            "skeleton_bytes": (out / f"sample_skeleton_{split}.csv").stat().st_size,
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=float, default=0.1, help="fraction of real Ali-CCP's rows and requests")
    p.add_argument("--test-scale", type=float, default=None,
                   help="fraction of the real test split (default: --scale; 0 = no test files)")
    p.add_argument("--exponent", type=float, default=1.05, help="Zipf exponent of every field's ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-requests", type=int, default=4096)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = _Ids(args.exponent, args.seed)
    summary: dict[str, object] = {"scale": args.scale, "exponent": args.exponent, "seed": args.seed}
    first = 1
    for split, scale in (("train", args.scale), ("test", args.scale if args.test_scale is None else args.test_scale)):
        if scale <= 0:
            continue
        rows, requests = round(REAL_ROWS[split] * scale), max(1, round(REAL_REQUESTS[split] * scale))
        summary[split] = write_split(out, split, rows, requests, first, ids, args.seed, args.block_requests)
        first += rows
        print(f"{split}: {summary[split]}", file=sys.stderr)
    (out / "fullshape_config.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
