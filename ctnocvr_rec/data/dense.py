"""The dense-feature transform: the one definition shared by the prepared-set writer and serving.

A dense (numeric) feature of the schema (:class:`~ctnocvr_rec.data.schema.DenseSpec`) is stored in a
prepared set already transformed: first ``transform`` (``none``, or ``log1p``: ``sign(x) * log1p(|x|)``,
defined for negative values too), then, when ``standardize`` is set, ``(x - mean) / std`` with the
mean and standard deviation of the *transformed* train values (``manifest["dense_stats"][name]``).
``ctnocvr predict`` / :class:`~ctnocvr_rec.serving.scorer.Scorer` on raw input apply the same
function with the stats exported in ``serving.json``, so a raw value is scored exactly as the model
saw it in training.

The writer fits the moments with :class:`ExactMoments` (exact sums: the figures do not depend on how
the input was chunked) and stores ``standardize_dense(dense_transform(x))``; serving calls
:func:`transform_dense`, which is the same two steps, so both round identically.

This module needs numpy only (the serving side imports it without torch or the data pipeline).

Example::

    stats = fit_dense_stats(train_values, transform="log1p")           # {"mean": .., "std": ..}
    stored = transform_dense(train_values, "log1p", True, stats["mean"], stats["std"])   # float32 [n]
"""


from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

#: ``DenseSpec.transform`` values (kept equal to ``ctnocvr_rec.data.schema.DENSE_TRANSFORMS``)
TRANSFORMS = ("none", "log1p")
#: a standard deviation below this is treated as 1 (a constant feature stays finite: its values become 0)
MIN_STD = 1e-12


def dense_transform(values: np.ndarray, transform: str) -> np.ndarray:
    """float64: ``none`` as is, ``log1p`` = ``sign(x) * log1p(|x|)`` (schema.py, DenseSpec)."""
    x = np.asarray(values, dtype=np.float64)
    if transform == "log1p":
        return np.sign(x) * np.log1p(np.abs(x))
    if transform == "none":
        return x
    raise ValueError(f"dense transform must be one of {TRANSFORMS}, got {transform!r}")


def fit_dense_stats(values: np.ndarray, transform: str = "none") -> dict[str, float]:
    """``{"mean", "std"}`` (population std, float64) of ``values`` after ``transform``; fit on train only.

    A constant (or empty) column gets ``std`` 1.0, so standardising it gives 0 rather than a division by 0.
    """
    x = dense_transform(values, transform)
    if x.size == 0:
        return {"mean": 0.0, "std": 1.0}
    mean, std = float(x.mean()), float(x.std())
    return {"mean": mean, "std": std if std > MIN_STD else 1.0}


def standardize_dense(x: np.ndarray, standardize: bool, mean: float, std: float) -> np.ndarray:
    """Transformed float64 values -> the stored float32 values: ``(x - mean) / std`` when
    ``standardize`` (a std below :data:`MIN_STD` counts as 1), computed in float64, cast once."""
    if standardize:
        x = (np.asarray(x, np.float64) - float(mean)) / (float(std) if float(std) > MIN_STD else 1.0)
    return np.asarray(x).astype(np.float32)


def transform_dense(values: np.ndarray, transform: str = "none", standardize: bool = False,
                    mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """Raw values ``[n]`` -> the stored / scored float32 values ``[n]`` (module docstring).

    Computed in float64 and cast once, so the writer and serving round identically. A non-finite input
    (or result) raises ``ValueError``: a prepared set holds none, and a model must not score one.
    """
    out = standardize_dense(dense_transform(values, transform), standardize, mean, std)
    if not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        raise ValueError(f"dense value at position {bad} is not finite after the transform "
                         f"({np.asarray(values).reshape(-1)[bad]!r} -> {out[bad]})")
    return out


_SCALE = 1200  # every finite float64 is an integer multiple of 2^-1074; 2^-1200 leaves room


def _exact_sum(x: np.ndarray) -> int:
    """``sum(x) * 2**_SCALE`` as an exact integer (finite float64 input): order-independent."""
    if len(x) == 0:
        return 0
    mantissa, exponent = np.frexp(x)
    ints = (mantissa * float(1 << 53)).astype(np.int64)  # exact: x = ints * 2^(exponent - 53)
    shift = exponent.astype(np.int64) - 53 + _SCALE
    order = np.argsort(shift, kind="stable")
    shift, ints = shift[order], ints[order]
    starts = np.flatnonzero(np.r_[True, shift[1:] != shift[:-1]])
    # split the 53-bit mantissas so that sums of up to 2^36 of them stay exact in int64
    high = np.add.reduceat(ints >> 26, starts)
    low = np.add.reduceat(ints & ((1 << 26) - 1), starts)
    total = 0
    for s, h, lo in zip(shift[starts].tolist(), high.tolist(), low.tolist()):
        total += ((h << 26) + lo) << s
    return total


@dataclass
class ExactMoments:
    """Count, sum and sum of squares of float64 values, summed exactly: the mean and standard
    deviation do not depend on the order or grouping of the values (chunk size)."""

    n: int = 0
    total: int = 0  # sum * 2^_SCALE
    total_sq: int = 0  # sum of squares * 2^_SCALE

    def add(self, x: np.ndarray, name: str) -> None:
        squares = x * x
        if not np.isfinite(squares).all():
            # a ValueError: the writer reports it as its PrepareError (this module imports nothing of ours)
            raise ValueError(f"dense feature {name}: values too large to standardise (|x| > 1e154)")
        self.n += len(x)
        self.total += _exact_sum(x)
        self.total_sq += _exact_sum(squares)

    def mean_std(self) -> tuple[float, float]:
        """Population mean and standard deviation (std 1.0 when it is 0 or there are no values)."""
        if self.n == 0:
            return 0.0, 1.0
        mean = Fraction(self.total, self.n << _SCALE)
        var = Fraction(self.total_sq, self.n << _SCALE) - mean * mean
        std = math.sqrt(float(var)) if var > 0 else 0.0
        return float(mean), std if std > 0 else 1.0
