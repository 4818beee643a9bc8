"""The dense-feature transform: the one definition shared by the prepared-set writer and serving.

A dense (numeric) feature of the schema (:class:`~ctnocvr_rec.data.schema.DenseSpec`) is stored in a
prepared set already transformed: first ``transform`` (``none``, or ``log1p``: ``sign(x) * log1p(|x|)``,
defined for negative values too), then, when ``standardize`` is set, ``(x - mean) / std`` with the
mean and standard deviation of the *transformed* train values (``manifest["dense_stats"][name]``).
``ctnocvr predict`` / :class:`~ctnocvr_rec.serving.scorer.Scorer` on raw input apply the same
function with the stats exported in ``serving.json``, so a raw value is scored exactly as the model
saw it in training.

This module needs numpy only (the serving side imports it without torch or the data pipeline).

Example::

    stats = fit_dense_stats(train_values, transform="log1p")           # {"mean": .., "std": ..}
    stored = transform_dense(train_values, "log1p", True, stats["mean"], stats["std"])   # float32 [n]
"""

from __future__ import annotations

import numpy as np

#: ``DenseSpec.transform`` values (kept equal to ``ctnocvr_rec.data.schema.DENSE_TRANSFORMS``)
TRANSFORMS = ("none", "log1p")
#: a standard deviation below this is treated as 1 (a constant feature stays finite: its values become 0)
MIN_STD = 1e-12


def _pre(values: np.ndarray, transform: str) -> np.ndarray:
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
    x = _pre(values, transform)
    if x.size == 0:
        return {"mean": 0.0, "std": 1.0}
    mean, std = float(x.mean()), float(x.std())
    return {"mean": mean, "std": std if std > MIN_STD else 1.0}


def transform_dense(values: np.ndarray, transform: str = "none", standardize: bool = False,
                    mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """Raw values ``[n]`` -> the stored / scored float32 values ``[n]`` (module docstring).

    Computed in float64 and cast once, so the writer and serving round identically. A non-finite input
    (or result) raises ``ValueError``: a prepared set holds none, and a model must not score one.
    """
    x = _pre(values, transform)
    if standardize:
        x = (x - float(mean)) / (float(std) if float(std) > MIN_STD else 1.0)
    out = x.astype(np.float32)
    if not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        raise ValueError(f"dense value at position {bad} is not finite after the transform "
                         f"({np.asarray(values).reshape(-1)[bad]!r} -> {out[bad]})")
    return out
