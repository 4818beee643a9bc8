"""Small-sample statistics for comparing Base and +CTnoCVR over seeds (numpy + math only).

Two paired tests over per-seed differences ``d_i = after_i - before_i`` (same seed = same
initialisation and data order for both variants, so the seeds are the pairing unit):

* :func:`paired_t_test` -- the paired Student t-test; the t distribution's CDF is computed here in
  closed form for integer degrees of freedom (Abramowitz & Stegun 26.7.3/26.7.4), so no SciPy is
  needed (the tests cross-check it against ``scipy.stats`` when SciPy happens to be installed).
* :func:`sign_flip_test` -- the exact paired permutation (sign-flip) test: under H0 each
  difference is equally likely to have either sign, so all ``2**n`` sign patterns are enumerated.
  It assumes no normality, but its smallest possible p-value is ``2 / 2**n`` (0.0625 for 5 seeds).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np


def mean_std(values: np.ndarray | list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value), NaNs dropped."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


def student_t_two_sided_p(t: float, df: int) -> float:
    """``P(|T| >= |t|)`` for Student's t with integer ``df >= 1`` degrees of freedom.

    Uses ``theta = atan(|t| / sqrt(df))`` and the finite series of A&S 26.7.3 (odd df) and
    26.7.4 (even df) for ``A(t|df) = P(|T| <= |t|)``.
    """
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df!r}")
    df = int(df)
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    sin_t, cos_t = math.sin(theta), math.cos(theta)
    cos2 = cos_t * cos_t
    if df % 2 == 1:
        if df == 1:
            inside = 2.0 * theta / math.pi
        else:
            # cos + (2/3) cos^3 + (2*4)/(3*5) cos^5 + ... + cos^(df-2)
            term, series = cos_t, cos_t
            for j in range(3, df - 1, 2):
                term *= cos2 * (j - 1) / j
                series += term
            inside = 2.0 / math.pi * (theta + sin_t * series)
    else:
        # 1 + (1/2) cos^2 + (1*3)/(2*4) cos^4 + ... + cos^(df-2)
        term, series = 1.0, 1.0
        for j in range(2, df - 1, 2):
            term *= cos2 * (j - 1) / j
            series += term
        inside = sin_t * series
    return float(min(1.0, max(0.0, 1.0 - inside)))


@dataclass(frozen=True)
class PairedTest:
    """Result of a paired comparison of ``after`` against ``before`` over n pairs."""

    n: int
    mean_diff: float
    t: float
    df: int
    p_t: float  # two-sided paired t-test
    p_sign_flip: float  # two-sided exact sign-flip permutation test
    wins: int  # pairs with after > before


def paired_t_test(
    before: np.ndarray | list[float], after: np.ndarray | list[float]
) -> tuple[float, int, float]:
    """Two-sided paired t-test of ``after - before``; returns ``(t, df, p)``.

    Fewer than 2 pairs give NaNs; all differences equal and non-zero give ``t = +-inf, p = 0``;
    all differences zero give ``t = 0, p = 1``.
    """
    diffs = _diffs(before, after)
    n = diffs.size
    if n < 2:
        return float("nan"), max(n - 1, 0), float("nan")
    mean = float(diffs.mean())
    sd = float(diffs.std(ddof=1))
    if sd == 0.0:
        if mean == 0.0:
            return 0.0, n - 1, 1.0
        return math.copysign(math.inf, mean), n - 1, 0.0
    t = mean / (sd / math.sqrt(n))
    return t, n - 1, student_t_two_sided_p(t, n - 1)


def sign_flip_test(
    before: np.ndarray | list[float], after: np.ndarray | list[float], max_exact: int = 20, seed: int = 0
) -> float:
    """Two-sided paired sign-flip permutation p-value of ``|mean(after - before)|``.

    Exact enumeration of all ``2**n`` sign patterns for ``n <= max_exact`` (the observed pattern is
    one of them, so p >= 2 / 2**n); above that, 200,000 random patterns (seeded) plus the observed.
    """
    diffs = _diffs(before, after)
    n = diffs.size
    if n == 0:
        return float("nan")
    observed = abs(float(diffs.mean()))
    # a tolerance so that patterns tying the observed statistic count despite float rounding
    tol = 1e-12 * max(1.0, float(np.abs(diffs).max()))
    if n <= max_exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        stats = np.abs(signs @ diffs) / n
        return float(np.mean(stats >= observed - tol))
    rng = np.random.default_rng(seed)
    draws = 200_000
    signs = rng.choice((1.0, -1.0), size=(draws, n))
    stats = np.abs(signs @ diffs) / n
    return float((np.sum(stats >= observed - tol) + 1) / (draws + 1))


def paired_comparison(before: np.ndarray | list[float], after: np.ndarray | list[float]) -> PairedTest:
    """Both paired tests, the mean difference and the number of wins of ``after``."""
    diffs = _diffs(before, after)
    t, df, p_t = paired_t_test(before, after)
    return PairedTest(
        n=int(diffs.size),
        mean_diff=float(diffs.mean()) if diffs.size else float("nan"),
        t=t,
        df=df,
        p_t=p_t,
        p_sign_flip=sign_flip_test(before, after),
        wins=int(np.sum(diffs > 0)),
    )


def _diffs(before: np.ndarray | list[float], after: np.ndarray | list[float]) -> np.ndarray:
    b = np.asarray(before, dtype=np.float64).ravel()
    a = np.asarray(after, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired test needs equally many values, got {b.size} before and {a.size} after")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep] - b[keep]


def t_critical(df: int, confidence: float = 0.95) -> float:
    """The two-sided Student t quantile: ``P(|T| >= t) = 1 - confidence`` (bisection on the exact CDF).

    Example: ``t_critical(2)`` is 4.303, so a 95% CI of a mean over 3 paired seeds is mean ± 4.303·sd/√3.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    lo, hi = 0.0, 1.0
    while student_t_two_sided_p(hi, df) > alpha:  # p falls as t grows
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if student_t_two_sided_p(mid, df) > alpha:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_ci(diffs: np.ndarray | list[float], confidence: float = 0.95) -> tuple[float, float]:
    """The t-based confidence interval of the mean of ``diffs`` (NaNs dropped; NaN bounds below 2 values)."""
    arr = np.asarray(diffs, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size < 2:
        return float("nan"), float("nan")
    half = t_critical(arr.size - 1, confidence) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return float(arr.mean()) - half, float(arr.mean()) + half
