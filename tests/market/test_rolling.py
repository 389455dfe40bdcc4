"""Trailing-window statistics (market/rolling.py) against pandas, and their window-only dependence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from market.features import FeatureConfig, compute_features, drop_warmup
from market.rolling import rolling_corr, rolling_kurt, rolling_mean, rolling_skew, rolling_std, rolling_sum
from tests.kit.candles import make_candles


def _series(seed: int = 0, n: int = 3_000) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=n) * 0.01
    x[150] = np.nan  # a NaN: every window holding it is NaN
    return x


def _pandas(x: np.ndarray, w: int):
    r = pd.Series(x).rolling(w, min_periods=w)
    lagged = pd.Series(x).shift(1)
    return {
        "sum": r.sum(), "mean": r.mean(), "std1": r.std(ddof=1), "std0": r.std(ddof=0), "skew": r.skew(),
        "kurt": r.kurt(), "corr": r.corr(lagged),
    }


def _ours(x: np.ndarray, w: int):
    lagged = np.concatenate([[np.nan], x[:-1]])
    return {
        "sum": rolling_sum(x, w), "mean": rolling_mean(x, w), "std1": rolling_std(x, w, 1),
        "std0": rolling_std(x, w, 0), "skew": rolling_skew(x, w), "kurt": rolling_kurt(x, w),
        "corr": rolling_corr(x, lagged, w),
    }


@pytest.mark.parametrize("window", [3, 10, 24, 72, 168])
def test_matches_pandas_on_random_data(window: int) -> None:
    x = _series()
    ours, ref = _ours(x, window), _pandas(x, window)
    for name, expected in ref.items():
        expected = expected.to_numpy()
        assert np.array_equal(np.isnan(ours[name]), np.isnan(expected)), name
        ok = ~np.isnan(expected)
        np.testing.assert_allclose(ours[name][ok], expected[ok], rtol=1e-8, atol=1e-15, err_msg=name)


def test_identical_values_have_exactly_zero_moments() -> None:
    x = np.full(400, 3e-4)  # e.g. a funding rate that did not change for days
    assert np.all(rolling_std(x, 168)[167:] == 0.0)
    for f in (rolling_skew, rolling_kurt):
        assert np.isnan(f(x, 168)).all()  # undefined, as pandas
    assert np.isnan(rolling_corr(x, np.arange(400.0), 24)).all()
    y = np.r_[np.random.default_rng(1).normal(size=200) * 0.01, x]  # a flat stretch after moving values
    assert np.all(rolling_std(y, 168)[200 + 167:] == 0.0)


def test_rows_depend_on_their_window_only_and_first_row_skips() -> None:
    x = _series(seed=2)
    full = rolling_std(x, 72)
    part = rolling_std(x[1_000:], 72)  # another frame start: the same windows give the same bits
    assert np.array_equal(part[71:], full[1_000 + 71:])
    tail = rolling_kurt(x, 72, first_row=2_900)
    assert np.isnan(tail[:2_900]).all()
    assert np.array_equal(tail[2_900:], rolling_kurt(x, 72)[2_900:])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="window"):
        rolling_sum(np.ones(5), 0)
    with pytest.raises(ValueError, match="rows"):
        rolling_corr(np.ones(5), np.ones(4), 2)


def test_compute_features_tail_rows_are_the_full_rows() -> None:
    candles = make_candles(900, seed=5)
    cfg = FeatureConfig()
    full = compute_features(candles, cfg)
    tail, dropped = drop_warmup(compute_features(candles, cfg, tail_rows=40))
    assert len(tail) == 40 and dropped == len(candles) - 40
    assert np.array_equal(tail.to_numpy(), full.iloc[-40:].to_numpy())
    with pytest.raises(ValueError, match="tail_rows"):
        compute_features(candles, cfg, tail_rows=0)
