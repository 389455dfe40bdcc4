"""Precomputed (series) V1 = per-bar V1; regime thresholds; exposure limits; long/short symmetry on real data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import talib

from fallback.config import RegimeAdjustment, V1Config
from fallback.indicators import windowed_ema
from fallback.v1 import V1Policy, V1SeriesPolicy, effective_thresholds, size_position
from market.bundled import bundled_candles_path
from market.candles import load_candles
from market.decision import DecisionContext, PositionView
from tests.fallback.series import mirror, trend_candles

EQUITY = 10_000.0


@pytest.fixture(scope="module")
def real() -> pd.DataFrame:
    """1,900 real BTCUSDT 1h candles (bundled), 2022-01-01 on."""
    c = load_candles(bundled_candles_path("BTCUSDT"))
    a = int(np.searchsorted(c.index, pd.Timestamp("2022-01-01", tz="UTC")))
    return c.iloc[a : a + 1900]


@pytest.mark.parametrize(("period", "length"), [(5, 5), (5, 40), (20, 600), (200, 600), (200, 201)])
def test_windowed_ema_equals_talib_on_each_window(period: int, length: int) -> None:
    rng = np.random.default_rng(7)
    c = 100.0 + np.cumsum(rng.normal(0.0, 1.0, 700))
    got = windowed_ema(c, period, length)
    assert np.isnan(got[: length - 1]).all()
    for e in (length - 1, length + 3, 699):
        want = talib.EMA(c[e - length + 1 : e + 1], timeperiod=period)[-1]
        assert got[e] == pytest.approx(want, rel=1e-12)


def _position(candles: pd.DataFrame, t: int, side: int) -> PositionView:
    """A position opened 3 bars before t at that bar's close, risk 1.5 x its range."""
    entry = float(candles["close"].iloc[t - 3])
    risk = 1.5 * float(candles["high"].iloc[t - 3] - candles["low"].iloc[t - 3]) + 1.0
    return PositionView(side=side, quantity_base=0.1, entry_price=entry, bars_in_trade=3,
                        stop_price=entry - side * risk, take_profit_price=entry + side * 2 * risk)  # fmt: skip


REGIME_CFG = V1Config(
    trailing_enabled=True, alignment_persist_bars=5, trigger_mode="pullback", pullback_atr_tol=0.5, adx_min=15.0,
    regime_adjustments=(RegimeAdjustment(long_breakout_k_delta=-0.2), RegimeAdjustment(adx_min_delta=10.0)),
    regime_mode="expected",
)  # fmt: skip


@pytest.mark.parametrize(
    "cfg", [V1Config(trailing_enabled=True), REGIME_CFG], ids=["trailing", "pullback_regime"]
)
def test_precomputed_path_gives_the_per_bar_decisions(real: pd.DataFrame, cfg: V1Config) -> None:
    n = len(real)
    proba1 = 0.5 + 0.5 * np.sin(np.arange(n) / 50.0)
    proba = np.column_stack([proba1, 1.0 - proba1]) if cfg.regime_adjustments else None
    series = V1SeriesPolicy(real, cfg, regime_proba=proba)
    per_bar = V1Policy(cfg)
    kinds = {"entry": 0, "trail": 0, "exit": 0}
    for t in range(590, n):  # includes the not-ready bars before history_bars
        side = (0, 0, 1, -1)[t % 4]
        pos = _position(real, t, side) if side else PositionView()
        ctx = DecisionContext(real.index[t], real.iloc[max(0, t - 999) : t + 1], pos, EQUITY,
                              regime_proba=None if proba is None else proba[t])  # fmt: skip
        ctx_series = DecisionContext(real.index[t], real.iloc[t : t + 1], pos, EQUITY)  # candles unused
        a, b = per_bar.explain(ctx), series.explain(ctx_series)
        assert a["decision"] == b["decision"], f"bar {t} ({real.index[t]}): {a['reason']} != {b['reason']}"
        assert a["reason"] == b["reason"]
        for k in kinds:
            kinds[k] += a["reason"].startswith(k)
    assert min(kinds.values()) >= 3, kinds  # the comparison covers entries, stop moves and exits


def test_series_policy_rejects_an_unknown_bar(real: pd.DataFrame) -> None:
    policy = V1SeriesPolicy(real.iloc[:700])
    with pytest.raises(KeyError, match="no bar"):
        policy.decide(DecisionContext(real.index[800], real.iloc[:801], PositionView(), EQUITY))


def test_mirrored_real_prices_give_mirrored_entries(real: pd.DataFrame) -> None:
    # Bollinger width is relative to the price level (not mirror-invariant): that filter is opened
    cfg = V1Config(bb_width_pct_min=0.0, bb_width_pct_max=1.0)
    centre = float(real["high"].max())
    up, down = V1SeriesPolicy(real, cfg), V1SeriesPolicy(mirror(real, centre), cfg)
    n_long = n_short = 0
    for t in range(599, len(real)):
        ctx = DecisionContext(real.index[t], real.iloc[t : t + 1], PositionView(), EQUITY)
        a, b = up.decide(ctx), down.decide(ctx)
        assert b.direction == -a.direction, real.index[t]
        assert (b.stop_atr, b.take_profit_atr) == (a.stop_atr, a.take_profit_atr)
        n_long += a.direction == 1
        n_short += a.direction == -1
    assert n_long > 5 and n_short > 5


def test_effective_thresholds_by_hand() -> None:
    adj = (RegimeAdjustment(adx_min_delta=10.0, long_breakout_k_delta=-0.2, short_breakout_k_delta=0.3),
           RegimeAdjustment(volume_min_ratio_delta=0.5))  # fmt: skip
    p = np.array([0.25, 0.75])
    argmax = effective_thresholds(p, V1Config(regime_adjustments=adj))
    assert argmax == {"adx_min": 20.0, "volume_min_ratio": pytest.approx(1.3), "long_breakout_k": 0.5,
                      "short_breakout_k": 0.5, "regime": 1}  # fmt: skip
    exp = effective_thresholds(p, V1Config(regime_adjustments=adj, regime_mode="expected"))
    assert exp["adx_min"] == pytest.approx(22.5)  # 20 + 0.25 x 10
    assert exp["volume_min_ratio"] == pytest.approx(1.175)  # 0.8 + 0.75 x 0.5
    assert exp["long_breakout_k"] == pytest.approx(0.45)  # 0.5 - 0.25 x 0.2
    assert exp["short_breakout_k"] == pytest.approx(0.575)  # 0.5 + 0.25 x 0.3
    base = effective_thresholds(None, V1Config(regime_adjustments=adj))
    assert base["adx_min"] == 20.0 and base["regime"] is None


@pytest.mark.parametrize("proba", [np.array([1.0]), np.array([0.5, np.nan]), np.array([0.5, 0.6])])
def test_effective_thresholds_reject_bad_probabilities(proba: np.ndarray) -> None:
    cfg = V1Config(regime_adjustments=(RegimeAdjustment(), RegimeAdjustment()))
    with pytest.raises(ValueError, match="regime_proba"):
        effective_thresholds(proba, cfg)


def test_regime_favouring_longs_lowers_the_long_breakout_bar() -> None:
    candles = trend_candles(breakout=1.0)  # 1.0 < 0.5 x previous range 3.76: no breakout
    cfg = V1Config(regime_adjustments=(RegimeAdjustment(long_breakout_k_delta=-0.3), RegimeAdjustment()))
    policy = V1Policy(cfg)

    def reason(p: np.ndarray | None) -> str:
        return policy.explain(
            DecisionContext(candles.index[-1], candles, PositionView(), EQUITY, regime_proba=p)
        )["reason"]

    assert reason(None) == "no_trigger"
    assert reason(np.array([0.0, 1.0])) == "no_trigger"
    assert reason(np.array([1.0, 0.0])) == "entry_long"  # k = 0.2: 1.0 > 0.2 x 3.76


def test_same_direction_limit_counts_other_exposure() -> None:
    # notional wanted 40,000 (4x equity); caps: 3x leverage, then 3x - 1.5x already long elsewhere
    alone = size_position(10_000.0, 50.0, 30_000.0, V1Config())
    assert alone["leverage"] == 3.0 and alone["size_frac"] == 1.0
    other = size_position(10_000.0, 50.0, 30_000.0, V1Config(), other_same_direction_notional_usdt=15_000.0)
    assert other["notional_cap_usdt"] == pytest.approx(15_000.0)
    assert other["leverage"] == 2.0 and other["size_frac"] == pytest.approx(0.75)
    full = size_position(10_000.0, 50.0, 30_000.0, V1Config(), other_same_direction_notional_usdt=30_000.0)
    assert full["size_frac"] == 0.0
    with pytest.raises(ValueError, match="other_same_direction"):
        size_position(10_000.0, 50.0, 30_000.0, V1Config(), other_same_direction_notional_usdt=-1.0)
