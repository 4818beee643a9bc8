"""Zipf fit and skewed id sampling (benchmark workloads)."""

from __future__ import annotations

import numpy as np
import pytest

from ctnocvr_rec.data.id_skew import ZipfIds, fit_zipf_exponent, profile_prepared


@pytest.mark.parametrize("exponent", [0.6, 1.0, 1.4])
def test_fit_recovers_the_exponent_of_zipf_draws(exponent):
    rng = np.random.default_rng(3)
    ids = ZipfIds(num_rows=20_001, exponent=exponent, seed=1).sample(300_000, rng)
    counts = np.bincount(ids)
    assert abs(fit_zipf_exponent(counts) - exponent) < 0.03


def test_fit_edge_cases():
    assert fit_zipf_exponent(np.array([5])) == 0.0  # one id: nothing to fit
    assert fit_zipf_exponent(np.full(100, 7)) == pytest.approx(0.0, abs=1e-6)  # uniform
    assert fit_zipf_exponent(np.array([10**9, 1, 0, 0])) > 5  # everything on one id


def test_hot_ids_are_scattered_or_sorted():
    rng = np.random.default_rng(0)
    sorted_ids = ZipfIds(100_001, 1.1, seed=0, scatter=False).sample(50_000, rng)
    scattered = ZipfIds(100_001, 1.1, seed=0, scatter=True).sample(50_000, rng)
    for ids in (sorted_ids, scattered):
        assert ids.min() >= 1 and ids.max() <= 100_000  # row 0 (OOV) never drawn
    top = np.argsort(np.bincount(scattered, minlength=100_001))[::-1][:20]
    assert np.bincount(sorted_ids).argmax() == 1
    assert np.median(top) > 1_000  # the 20 hottest rows are not rows 1..20


def test_profile_of_a_prepared_set(tmp_path):
    from ctnocvr_rec.train.testing import write_tiny_prepared

    prepared = write_tiny_prepared(tmp_path / "p", {"train": 300, "valid": 10, "test": 10})
    (prepared / "vocab").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts = np.bincount(ZipfIds(501, 0.9, seed=0).sample(20_000, np.random.default_rng(1)))
    counts = counts[counts > 0]
    for name in ("205", "110_14"):
        pq.write_table(pa.table({"raw_id": np.arange(len(counts)), "count": counts,
                                 "mapped_id": np.arange(1, len(counts) + 1)}), prepared / "vocab" / f"{name}.parquet")
    prof = profile_prepared(prepared, ["205", "110_14"])
    assert abs(prof["205"].exponent - 0.9) < 0.05
    assert sum(prof["110_14"].length_probs) == pytest.approx(1.0)
    assert prof["205"].length_values == [1] and prof["110_14"].mean_length > 1
    with pytest.raises(FileNotFoundError, match="216.parquet"):
        profile_prepared(prepared, ["216"])
