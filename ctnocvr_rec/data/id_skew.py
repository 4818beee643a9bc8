"""How skewed a prepared set's ids are, and ids drawn to match it (benchmark workloads).

A recommender's ids are far from uniform: a few items, shops and users carry most impressions. The
cost of an embedding lookup depends on it (hot rows stay in cache), so a throughput benchmark on
uniform ids measures another workload than training on real data. This module

* fits a Zipf exponent to one field's id counts (:func:`fit_zipf_exponent`, maximum likelihood),
* profiles a prepared set (:func:`profile_prepared`): per field the fitted exponent, the number of
  distinct ids and the distribution of list lengths (0 for an absent field, 1 for single-valued
  fields, the history length for multi-valued ones),
* draws ids with a given exponent over a table of any size (:class:`ZipfIds`), the hot ids either
  scattered over the table by a seeded permutation or at rows ``1..k``.

Only numpy and pyarrow; no torch.

Example:
    >>> rng = np.random.default_rng(0)
    >>> ids = ZipfIds(num_rows=10_000, exponent=1.1, seed=0).sample(200_000, rng)
    >>> counts = np.bincount(ids)
    >>> round(fit_zipf_exponent(counts[counts > 0]), 1)
    1.1
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctnocvr_rec.data.prepared import PreparedSet

#: exponents are searched in [0, MAX_EXPONENT]
MAX_EXPONENT = 8.0


def _mean_log_rank(exponent: float, log_ranks: np.ndarray) -> float:
    """``E[ln r]`` under ``p(r) ~ r^-exponent`` on the ranks whose logs are ``log_ranks``."""
    logw = -exponent * log_ranks
    w = np.exp(logw - logw.max())
    return float((w * log_ranks).sum() / w.sum())


def fit_zipf_exponent(counts: np.ndarray, tol: float = 1e-6) -> float:
    """Maximum-likelihood exponent ``s`` of a finite Zipf law ``p(r) ~ r^-s``, ``r = 1..N``.

    Args:
        counts: ``[N]`` occurrences of each distinct id (any order; zeros are dropped). Each
            occurrence is one draw; an id's rank is its position by decreasing count.

    Returns:
        ``s >= 0``. The log-likelihood ``-s * sum(c_r ln r) - n ln H(N, s)`` is concave in ``s``;
        its maximum is where the model's mean log-rank equals the data's, found by bisection.
        0 for fewer than two distinct ids or counts flatter than uniform.
    """
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    c = c[c > 0]
    if len(c) < 2:
        return 0.0
    log_ranks = np.log(np.arange(1, len(c) + 1, dtype=np.float64))
    target = float((c * log_ranks).sum() / c.sum())
    if target >= _mean_log_rank(0.0, log_ranks):
        return 0.0
    lo, hi = 0.0, MAX_EXPONENT
    if _mean_log_rank(hi, log_ranks) > target:
        return hi
    while hi - lo > tol:  # E_s[ln r] decreases in s
        mid = 0.5 * (lo + hi)
        if _mean_log_rank(mid, log_ranks) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass
class FieldProfile:
    """One field of a prepared set, as a workload.

    Attributes:
        exponent: Zipf exponent fitted to the train-split counts of its raw ids (``vocab/<f>.parquet``).
        distinct_ids: ids seen on train.
        length_values / length_probs: the distribution of the field's list length per row
            (train split): ``length_values[i]`` occurs in a share ``length_probs[i]`` of the rows.
    """

    exponent: float
    distinct_ids: int
    length_values: list[int]
    length_probs: list[float]

    @property
    def mean_length(self) -> float:
        return float(np.dot(self.length_values, self.length_probs))

    def to_dict(self) -> dict[str, object]:
        return {"exponent": self.exponent, "distinct_ids": self.distinct_ids,
                "length_values": self.length_values, "length_probs": self.length_probs}

    @classmethod
    def from_dict(cls, tree: dict[str, object]) -> FieldProfile:
        return cls(float(tree["exponent"]), int(tree["distinct_ids"]),  # type: ignore[arg-type]
                   [int(v) for v in tree["length_values"]],  # type: ignore[union-attr]
                   [float(p) for p in tree["length_probs"]])  # type: ignore[union-attr]


def profile_prepared(prepared_dir: str | Path, fields: list[str], split: str = "train") -> dict[str, FieldProfile]:
    """Profile ``fields`` of the prepared set at ``prepared_dir``.

    Exponents come from ``vocab/<field>.parquet`` (column ``count``: train impressions per raw id,
    ids mapped to OOV included); list lengths from the ``<split>/*.parquet`` shards.
    """
    root = Path(prepared_dir)
    # (fields stored once per request, data/requests.py, come joined onto the rows)
    table = PreparedSet.open(root).read_table(split, columns=fields)
    out: dict[str, FieldProfile] = {}
    for name in fields:
        vocab_file = root / "vocab" / f"{name}.parquet"
        if not vocab_file.is_file():
            raise FileNotFoundError(f"{vocab_file} not found: field {name!r} has no vocabulary artifact")
        counts = pq.read_table(vocab_file, columns=["count"]).column("count").to_numpy()
        lengths = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
        values, freq = np.unique(lengths, return_counts=True)
        out[name] = FieldProfile(
            exponent=fit_zipf_exponent(counts),
            distinct_ids=int((counts > 0).sum()),
            length_values=[int(v) for v in values],
            length_probs=[float(f) for f in freq / freq.sum()],
        )
    return out


class ZipfIds:
    """Draws rows ``1..num_rows-1`` of a table (row 0 is the OOV row) with ``p(rank r) ~ r^-exponent``.

    The rank-``r`` id is row ``r`` with ``scatter=False`` and row ``perm[r]`` of a seeded random
    permutation with ``scatter=True`` (hot rows spread over the table, as hashed or unsorted ids
    are; ``ctnocvr data prepare`` itself numbers ids by decreasing count, i.e. ``scatter=False``).
    ``exponent=0`` is uniform.
    """

    def __init__(self, num_rows: int, exponent: float, seed: int, scatter: bool = True) -> None:
        if num_rows < 2:
            raise ValueError(f"num_rows must be >= 2 (row 0 is OOV), got {num_rows}")
        n = num_rows - 1
        self.uniform = exponent == 0.0
        self.n = n
        if not self.uniform:
            cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
            self.cdf = cdf / cdf[-1]
        self.perm = np.random.default_rng(seed).permutation(n) if scatter else None

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """``[size]`` int64 rows in ``[1, num_rows)``."""
        if self.uniform:
            rank = rng.integers(0, self.n, size)
        else:
            rank = np.minimum(np.searchsorted(self.cdf, rng.random(size), side="right"), self.n - 1)
        rows = rank if self.perm is None else self.perm[rank]
        return rows.astype(np.int64) + 1
