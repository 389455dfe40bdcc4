"""Triple-barrier labels: hand-made outcomes, undefined rows, dependence only on rows <= t + H."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pydantic
import pytest

from market.bundled import bundled_candles_path
from market.candles import load_candles
from market.errors import DataValidationError
from market.features import atr
from market.labels import (
    LABEL_DOWN,
    LABEL_TIMEOUT,
    LABEL_UNDEFINED,
    LABEL_UP,
    TripleBarrierConfig,
    label_end_index,
    triple_barrier_labels,
)
from tests.kit.candles import make_candles

# ATR period 3 on flat bars (high 101, low 99, close 100) is exactly 2, so from bar 4 the barriers
# are 100 +- 1 x 2 = [98, 102] and the window is bars 5, 6, 7.
CFG = TripleBarrierConfig(horizon_bars=3, upper_atr_mult=1.0, lower_atr_mult=1.0, atr_period_bars=3)
T = 4


def _path(bars: list[tuple[float, float, float]]) -> pd.DataFrame:
    """5 flat bars, then ``bars`` as (high, low, close), then 3 flat bars; open = previous close."""
    rows = [(101.0, 99.0, 100.0)] * 5 + bars + [(101.0, 99.0, 100.0)] * 3
    high, low, close = (np.array(col, dtype=np.float64) for col in zip(*rows, strict=True))
    open_ = np.concatenate([[100.0], close[:-1]])
    high, low = np.maximum(high, np.maximum(open_, close)), np.minimum(low, np.minimum(open_, close))
    index = pd.date_range("2022-01-01", periods=len(rows), freq="1h", tz="UTC", name="open_time")
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": 1.0}, index=index)


FLAT = (101.0, 99.0, 100.0)


@pytest.mark.parametrize(
    ("bars", "expected"),
    [
        ([(102.5, 99.5, 102.0), FLAT, FLAT], LABEL_UP),  # upper touched at bar 5
        ([FLAT, FLAT, (102.0, 99.0, 101.0)], LABEL_UP),  # touching exactly counts, last bar of window
        ([(100.5, 97.5, 98.0), FLAT, FLAT], LABEL_DOWN),  # lower touched at bar 5
        ([FLAT, (101.0, 96.0, 97.0), (110.0, 99.0, 109.0)], LABEL_DOWN),  # down first, then up
        ([(101.5, 99.5, 101.0), (103.0, 100.0, 100.5), (100.0, 90.0, 91.0)], LABEL_UP),  # up first
        ([FLAT, FLAT, FLAT], LABEL_TIMEOUT),  # no barrier within 3 bars
        ([FLAT, FLAT, FLAT, (110.0, 99.0, 109.0)], LABEL_TIMEOUT),  # touch after the horizon
        ([(103.0, 97.0, 100.0), FLAT, FLAT], LABEL_TIMEOUT),  # both in one bar: ambiguous
        ([FLAT, (103.0, 97.0, 100.0), (110.0, 99.0, 109.0)], LABEL_TIMEOUT),  # ambiguous bar ends the scan
    ],
)
def test_hand_made_outcomes(bars, expected):
    candles = _path(bars)
    assert atr(candles, 3)[T] == 2.0
    labels = triple_barrier_labels(candles, CFG)
    assert labels[T] == expected


def test_undefined_rows_dtype_and_shape():
    candles = _path([FLAT, FLAT, FLAT])
    labels = triple_barrier_labels(candles, CFG)
    assert labels.dtype == np.int8 and labels.shape == (len(candles),)
    np.testing.assert_array_equal(labels[:3], LABEL_UNDEFINED)  # ATR still NaN
    np.testing.assert_array_equal(labels[-3:], LABEL_UNDEFINED)  # window runs past the data
    assert (labels[3:-3] == LABEL_TIMEOUT).all()


def test_too_short_frame_is_all_undefined():
    labels = triple_barrier_labels(make_candles(20, seed=0), TripleBarrierConfig(horizon_bars=24))
    assert (labels == LABEL_UNDEFINED).all()


def _reference(candles: pd.DataFrame, cfg: TripleBarrierConfig) -> np.ndarray:
    """Plain loop over bars and offsets: the definition, written the slow way."""
    high, low, close = (candles[c].to_numpy() for c in ("high", "low", "close"))
    width = atr(candles, cfg.atr_period_bars)
    n = len(close)
    out = np.full(n, LABEL_UNDEFINED, dtype=np.int8)
    for t in range(n - cfg.horizon_bars):
        if np.isnan(width[t]):
            continue
        up_b, dn_b = close[t] + cfg.upper_atr_mult * width[t], close[t] - cfg.lower_atr_mult * width[t]
        out[t] = LABEL_TIMEOUT
        for k in range(t + 1, t + cfg.horizon_bars + 1):
            up, dn = high[k] >= up_b, low[k] <= dn_b
            if up or dn:
                out[t] = LABEL_TIMEOUT if (up and dn) else (LABEL_UP if up else LABEL_DOWN)
                break
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop(seed):
    candles = make_candles(800, seed=seed, vol_per_bar=0.02)
    cfg = TripleBarrierConfig(horizon_bars=12, upper_atr_mult=1.5, lower_atr_mult=1.0, atr_period_bars=10)
    labels = triple_barrier_labels(candles, cfg)
    np.testing.assert_array_equal(labels, _reference(candles, cfg))
    assert {LABEL_DOWN, LABEL_TIMEOUT, LABEL_UP} <= set(np.unique(labels).tolist())


def test_label_depends_only_on_rows_up_to_t_plus_h():
    candles = make_candles(400, seed=5)
    cfg = TripleBarrierConfig(horizon_bars=24)
    base = triple_barrier_labels(candles, cfg)
    rng = np.random.default_rng(0)
    for t in rng.integers(14, 400 - 24 - 1, size=10):
        end = label_end_index(int(t), cfg)
        assert end == t + 24
        changed = candles.copy()
        changed.iloc[end + 1 :, :4] *= 3.0  # still OHLC-consistent and positive
        assert triple_barrier_labels(changed, cfg)[t] == base[t]
        assert triple_barrier_labels(candles.iloc[: end + 1], cfg)[t] == base[t]  # truncated after t + H


def test_bad_candles_raise():
    candles = make_candles(100, seed=0)
    candles.iloc[50, candles.columns.get_loc("low")] = np.nan
    with pytest.raises(DataValidationError) as info:
        triple_barrier_labels(candles, TripleBarrierConfig())
    assert info.value.rule == "finite_values"


def test_config_validation():
    with pytest.raises(pydantic.ValidationError):
        TripleBarrierConfig(horizon_bars=0)
    with pytest.raises(pydantic.ValidationError):
        TripleBarrierConfig(upper_atr_mult=-1.0)
    with pytest.raises(pydantic.ValidationError):
        TripleBarrierConfig(horizon=24)


def test_fast_enough_on_real_data():
    candles = load_candles(bundled_candles_path())  # 48,192 bars
    start = time.perf_counter()
    labels = triple_barrier_labels(candles, TripleBarrierConfig())
    assert time.perf_counter() - start < 1.0
    assert (labels[-24:] == LABEL_UNDEFINED).all() and (labels[14:-24] != LABEL_UNDEFINED).all()
