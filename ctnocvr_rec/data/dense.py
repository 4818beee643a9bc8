"""Dense features at preparation time: the transform of :class:`~ctnocvr_rec.data.schema.DenseSpec`
and the train-split moments used to standardise, summed exactly so that they do not depend on the
order or grouping of the values (the writer's chunking).

Example::

    m = ExactMoments()
    for chunk in chunks:
        m.add(dense_transform(chunk, "log1p"), "D508")
    mean, std = m.mean_std()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ctnocvr_rec.data.formats.base import PrepareError


def dense_transform(values: np.ndarray, transform: str) -> np.ndarray:
    """float64: ``none`` as is, ``log1p`` = ``sign(x) * log1p(|x|)`` (schema.py, DenseSpec)."""
    x = np.asarray(values, np.float64)
    if transform == "log1p":
        return np.sign(x) * np.log1p(np.abs(x))
    return x


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
            raise PrepareError(f"dense feature {name}: values too large to standardise (|x| > 1e154)")
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
