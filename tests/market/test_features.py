"""Causal features: truncation invariance, schema, warm-up, hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydantic
import pytest

from market.bundled import bundled_candles_path, bundled_funding_path
from market.candles import join_funding, load_candles, load_funding
from market.errors import DataValidationError
from market.features import (
    FeatureConfig,
    atr,
    compute_features,
    drop_warmup,
    feature_names,
    warmup_bars,
)
from tests.kit.candles import make_candles

CFG = FeatureConfig()


@pytest.fixture(scope="module")
def synthetic() -> pd.DataFrame:
    return make_candles(1500, seed=7)


@pytest.fixture(scope="module")
def real_slice() -> pd.DataFrame:
    candles = join_funding(load_candles(bundled_candles_path()), load_funding(bundled_funding_path()))
    return candles.iloc[30_003:33_003]  # 3000 bars of 2023, starting off a funding time


def _leading_nan_rows(values: np.ndarray) -> int:
    finite = np.isfinite(values).all(axis=1)
    return int(np.argmax(finite)) if finite.any() else len(values)


def _assert_truncation_invariant(candles: pd.DataFrame, seed: int) -> None:
    full = compute_features(candles, CFG).to_numpy()
    rng = np.random.default_rng(seed)
    cuts = np.concatenate([[0, 1, 250], rng.integers(2, len(candles), size=7)])
    for t in cuts:
        part = compute_features(candles.iloc[: t + 1], CFG).to_numpy()
        np.testing.assert_array_equal(part[t], full[t], err_msg=f"row {t} changed when later rows were cut")


def test_truncation_invariance_synthetic(synthetic):
    _assert_truncation_invariant(synthetic, seed=11)


def test_truncation_invariance_real_data(real_slice):
    _assert_truncation_invariant(real_slice, seed=12)


@pytest.mark.parametrize("which", ["synthetic", "real_slice"])
def test_schema_dtype_and_leading_nan_block(which, request):
    candles = request.getfixturevalue(which)
    feats = compute_features(candles, CFG)
    assert list(feats.columns) == feature_names(CFG)
    assert feats.shape == (len(candles), len(feature_names(CFG))) and feats.shape[1] >= 20
    assert (feats.dtypes == np.float32).all()
    assert feats.index.equals(candles.index)
    values = feats.to_numpy()
    lead = _leading_nan_rows(values)
    assert 0 < lead <= warmup_bars(CFG)
    assert np.isnan(values[:lead]).any(axis=1).all()  # every dropped row really holds a NaN
    assert np.isfinite(values[lead:]).all()  # nothing non-finite after the warm-up
    kept, dropped = drop_warmup(feats)
    assert dropped == lead and len(kept) == len(feats) - lead
    assert kept.index[0] == feats.index[lead]


def test_feature_names_follow_config():
    cfg = FeatureConfig(
        return_horizons_bars=(2, 5), realized_vol_windows_bars=(10,), ema_periods_bars=(8, 30)
    )
    names = feature_names(cfg)
    assert names[:2] == ["logret_2b", "logret_5b"]
    assert "rvol_10b" in names and "ema_dist_8b" in names and "ema_dist_30b" in names
    assert "rvol_24b" not in names
    assert list(compute_features(make_candles(120, seed=1), cfg).columns) == names
    assert len(set(feature_names(CFG))) == len(feature_names(CFG))


def test_warmup_bars_default():
    assert warmup_bars(CFG) == 600  # 3 x EMA(200)
    assert warmup_bars(FeatureConfig(ema_periods_bars=(10,))) == 168 + 32  # funding z window + wait


def test_config_is_frozen_and_strict():
    with pytest.raises(pydantic.ValidationError):
        FeatureConfig(rsi_period_bar=14)  # typo: unknown key
    with pytest.raises(pydantic.ValidationError):
        FeatureConfig(macd_fast_bars=30, macd_slow_bars=26)
    with pytest.raises(pydantic.ValidationError):
        FeatureConfig(ema_periods_bars=())
    with pytest.raises(pydantic.ValidationError):
        CFG.atr_period_bars = 7
    assert hash(CFG) == hash(FeatureConfig())


def test_non_finite_candle_in_the_middle_raises(synthetic):
    bad = synthetic.copy()
    bad.iloc[700, bad.columns.get_loc("close")] = np.nan
    with pytest.raises(DataValidationError) as info:
        compute_features(bad, CFG)
    assert info.value.rule == "finite_values" and info.value.rows == [bad.index[700]]


def test_drop_warmup_refuses_nan_or_inf_after_warmup(synthetic):
    feats = compute_features(synthetic, CFG)
    for value in (np.nan, np.inf):
        bad = feats.copy()
        bad.iloc[900, 3] = value
        with pytest.raises(DataValidationError) as info:
            drop_warmup(bad)
        assert info.value.rule == "nan_after_warmup"
        assert info.value.rows == [feats.index[900]]
        assert feats.columns[3] in str(info.value)


def test_drop_warmup_without_any_finite_row():
    feats = compute_features(make_candles(50, seed=3), CFG)  # shorter than EMA(200)
    with pytest.raises(DataValidationError) as info:
        drop_warmup(feats)
    assert info.value.rule == "nan_after_warmup"


def test_gap_in_candles_raises(synthetic):
    with pytest.raises(DataValidationError) as info:
        compute_features(synthetic.drop(index=synthetic.index[500]), CFG)
    assert info.value.rule == "regular_interval"


# ------------------------------------------------------------------ hand-computed values


def _hand_candles() -> pd.DataFrame:
    """48 bars from Monday 2021-01-04 00:00 UTC; close alternates 100, 102; one doji bar."""
    n = 48
    index = pd.date_range("2021-01-04", periods=n, freq="1h", tz="UTC", name="open_time")
    close = np.where(np.arange(n) % 2 == 0, 100.0, 102.0)
    open_ = np.concatenate([[100.0], close[:-1]])
    df = pd.DataFrame(
        {
            "open": open_,
            "high": np.maximum(open_, close) + 1.0,
            "low": np.minimum(open_, close) - 1.0,
            "close": close,
            "volume": np.arange(1.0, n + 1.0),
        },
        index=index,
    )
    df.iloc[10, :4] = 102.0  # doji: open = high = low = close (prev close 102)
    df.iloc[11, 0] = 102.0
    df["funding_rate"] = np.nan
    df.iloc[0, 5] = 1e-4
    df.iloc[8, 5] = -2e-4
    return df


def test_hand_computed_values():
    df = _hand_candles()
    cfg = FeatureConfig(
        return_horizons_bars=(1, 2),
        realized_vol_windows_bars=(4,),
        volume_z_window_bars=5,
        ema_periods_bars=(3,),
        funding_z_window_bars=3,
    )
    f = compute_features(df, cfg)
    f32 = np.float32
    assert np.isnan(f["logret_1b"].iloc[0])
    assert f["logret_1b"].iloc[1] == f32(np.log(102.0 / 100.0))
    assert f["logret_2b"].iloc[3] == f32(0.0)  # 102 -> 102
    # bar range and close location (row 1: open 100, close 102, high 103, low 99)
    assert f["bar_range"].iloc[1] == f32(4.0 / 102.0)
    assert f["close_loc"].iloc[1] == f32(3.0 / 4.0)
    assert f["close_loc"].iloc[10] == f32(0.5)  # high == low
    assert f["bar_range"].iloc[10] == f32(0.0)
    # funding: forward-filled last settled rate, in bps
    np.testing.assert_array_equal(f["funding_bps"].iloc[:8], np.full(8, f32(1.0)))
    np.testing.assert_array_equal(f["funding_bps"].iloc[8:], np.full(40, f32(-2.0)))
    # funding z over 3 bars: constant -> 0; row 8 window (1e-4, 1e-4, -2e-4): (x - mean) / std
    assert f["funding_z"].iloc[2] == f32(0.0)
    w = np.array([1e-4, 1e-4, -2e-4])
    assert f["funding_z"].iloc[8] == pytest.approx((w[-1] - w.mean()) / w.std(ddof=1), rel=1e-6)
    # volume z over 5 bars of log(1 + volume)
    lv = np.log1p(np.arange(1.0, 49.0))
    win = lv[16:21]
    assert f["volume_z"].iloc[20] == pytest.approx((win[-1] - win.mean()) / win.std(ddof=1), rel=1e-6)
    # realized vol: std (ddof=1) of the last 4 one-bar log returns
    r = np.diff(np.log(df["close"].to_numpy()))
    assert f["rvol_4b"].iloc[30] == pytest.approx(r[26:30].std(ddof=1), rel=1e-6)
    assert np.isnan(f["rvol_4b"].iloc[3]) and np.isfinite(f["rvol_4b"].iloc[4])
    # calendar: Monday 00:00 and 06:00
    assert (f["hour_sin"].iloc[0], f["hour_cos"].iloc[0]) == (f32(0.0), f32(1.0))
    assert f["hour_sin"].iloc[6] == f32(1.0)
    assert (f["dow_sin"].iloc[0], f["dow_cos"].iloc[0]) == (f32(0.0), f32(1.0))
    # bounded oscillators are scaled to [0, 1]
    for col in ("adx", "plus_di", "minus_di", "rsi"):
        vals = f[col].dropna()
        assert len(vals) > 0 and vals.between(0.0, 1.0).all()


def test_constant_market_gives_zero_z_scores_and_distances():
    n = 80
    index = pd.date_range("2021-01-01", periods=n, freq="1h", tz="UTC", name="open_time")
    df = pd.DataFrame({"open": 50.0, "high": 51.0, "low": 49.0, "close": 50.0, "volume": 7.0}, index=index)
    cfg = FeatureConfig(ema_periods_bars=(5,), volume_z_window_bars=10)
    f = compute_features(df, cfg)
    tail = f.iloc[-5:]
    np.testing.assert_array_equal(tail["volume_z"], 0.0)
    np.testing.assert_array_equal(tail["ema_dist_5b"], 0.0)
    np.testing.assert_array_equal(tail["atr_pct"], np.float32(2.0 / 50.0))
    np.testing.assert_array_equal(tail["bb_pctb"], 0.5)


def test_without_funding_column_funding_features_are_zero():
    f = compute_features(make_candles(300, seed=4, with_funding=False), CFG)
    assert list(f.columns) == feature_names(CFG)
    np.testing.assert_array_equal(f["funding_bps"], 0.0)
    np.testing.assert_array_equal(f["funding_z"], 0.0)


def test_atr_hand_computed():
    n = 20
    index = pd.date_range("2021-01-01", periods=n, freq="1h", tz="UTC", name="open_time")
    df = pd.DataFrame({"open": 100.0, "high": 101.0, "low": 99.0, "close": 100.0, "volume": 1.0}, index=index)
    df.iloc[10, [1, 3]] = [106.0, 105.0]  # TR = max(106-99, |106-100|, |99-100|) = 7
    out = atr(df, 3)
    assert out.dtype == np.float64 and out.shape == (n,)
    assert np.isnan(out[:3]).all()
    np.testing.assert_allclose(out[3:10], 2.0)
    assert out[10] == pytest.approx((2 * 2.0 + 7.0) / 3)  # Wilder smoothing
    with pytest.raises(ValueError):
        atr(df, 0)
