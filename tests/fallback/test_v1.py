"""V1 rule engine: layers, hold, sizing, readiness and the use of every config field."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from fallback.config import RegimeAdjustment, V1Config
from fallback.v1 import V1Policy, size_position
from market.decision import Decision, DecisionContext, Policy, PositionView
from tests.fallback.series import mirror, pullback_candles, trend_candles

EQUITY = 10_000.0


def _ctx(candles: pd.DataFrame, side: int = 0, equity: float = EQUITY) -> DecisionContext:
    return DecisionContext(
        bar_open_time=candles.index[-1], candles=candles, position=PositionView(side=side), equity_usdt=equity
    )


def _explain(
    candles: pd.DataFrame, cfg: V1Config | None = None, side: int = 0, equity: float = EQUITY
) -> dict:
    return V1Policy(cfg).explain(_ctx(candles, side, equity))


@pytest.fixture(scope="module")
def base() -> pd.DataFrame:
    return trend_candles()


@pytest.fixture(scope="module")
def base_explain(base: pd.DataFrame) -> dict:
    return _explain(base)


def _only_failed_layer(e: dict) -> set[str]:
    failed = set()
    for flag in ("adx_pass", "bb_width_pass", "volume_pass"):
        if not e["filter"][flag]:
            failed.add(flag)
    if e["direction"]["bias"] != 1:
        failed.add("direction")
    if e["trigger"]["signal"] != 1:
        failed.add("trigger")
    return failed


def test_is_a_policy() -> None:
    assert isinstance(V1Policy(), Policy)
    assert V1Policy().name == "v1"


def test_uptrend_with_breakout_enters_long(base: pd.DataFrame, base_explain: dict) -> None:
    e = base_explain
    assert e["ready"] and e["reason"] == "entry_long"
    assert _only_failed_layer(e) == set()
    d = V1Policy().decide(_ctx(base))
    assert d == e["decision"]
    assert d.direction == 1
    assert d.stop_atr == 1.5 and d.take_profit_atr == 3.0  # 2 x 1.5 ATR
    # the breakout: close - open = 4 > 0.5 x previous range (2 x wick 1.5 + |body|)
    trig = e["trigger"]
    assert trig["close"] - trig["open"] == pytest.approx(4.0)
    assert trig["long_level"] == pytest.approx(trig["open"] + 0.5 * trig["prev_range"])


def test_mirrored_prices_enter_short(base: pd.DataFrame, base_explain: dict) -> None:
    e = _explain(mirror(base))
    assert e["reason"] == "entry_short"
    d = e["decision"]
    assert d.direction == -1 and d.stop_atr == 1.5 and d.take_profit_atr == 3.0
    # ADX is symmetric, +DI and -DI swap, EMAs reflect
    assert e["filter"]["adx"] == pytest.approx(base_explain["filter"]["adx"])
    assert e["direction"]["plus_di"] == pytest.approx(base_explain["direction"]["minus_di"])
    assert e["direction"]["minus_di"] == pytest.approx(base_explain["direction"]["plus_di"])
    assert e["direction"]["ema_slow"] == pytest.approx(3_000.0 - base_explain["direction"]["ema_slow"])


def test_adx_layer_alone_fails(base: pd.DataFrame, base_explain: dict) -> None:
    cfg = V1Config(adx_min=base_explain["filter"]["adx"] + 0.01)
    e = _explain(base, cfg)
    assert _only_failed_layer(e) == {"adx_pass"}
    assert e["decision"] == Decision.flat() and e["reason"] == "filter_failed: adx"


@pytest.mark.parametrize("bound", ["min", "max"])
def test_bollinger_width_layer_alone_fails(base: pd.DataFrame, base_explain: dict, bound: str) -> None:
    pct = base_explain["filter"]["bb_width_pct"]
    assert 0.1 < pct < 0.95
    cfg = V1Config(bb_width_pct_min=pct + 0.01) if bound == "min" else V1Config(bb_width_pct_max=pct - 0.01)
    e = _explain(base, cfg)
    assert _only_failed_layer(e) == {"bb_width_pass"}
    assert e["decision"] == Decision.flat() and e["reason"] == "filter_failed: bb_width"


def test_volume_layer_alone_fails() -> None:
    e = _explain(trend_candles(last_volume_mult=0.5))  # breakout on half the usual volume
    assert e["filter"]["volume_ratio"] < 0.8
    assert _only_failed_layer(e) == {"volume_pass"}
    assert e["decision"] == Decision.flat() and e["reason"] == "filter_failed: volume"


def test_direction_layer_alone_fails() -> None:
    # 45-bar pullback before the breakout: EMA20 < EMA50 while +DI > -DI and the filter passes
    e = _explain(trend_candles(reverse_bars=(540, 585)))
    assert e["direction"]["ema_fast"] < e["direction"]["ema_mid"]
    assert _only_failed_layer(e) == {"direction"}
    assert e["decision"] == Decision.flat() and e["reason"] == "no_trend_bias"


def test_trigger_layer_alone_fails() -> None:
    e = _explain(trend_candles(breakout=1.0))  # 1.0 < 0.5 x previous range (3.76)
    assert _only_failed_layer(e) == {"trigger"}
    assert e["decision"] == Decision.flat() and e["reason"] == "no_trigger"


def test_trigger_against_bias_gives_flat(base: pd.DataFrame) -> None:
    e = _explain(trend_candles(breakout=-4.0))  # a downside breakout inside an uptrend
    assert e["trigger"]["signal"] == -1 and e["direction"]["bias"] == 1
    assert e["decision"] == Decision.flat()


@pytest.mark.parametrize("side", [1, -1])
def test_open_position_is_held(base: pd.DataFrame, side: int) -> None:
    e = _explain(base, side=side)
    assert e["decision"] == Decision(direction=side)
    assert e["reason"].startswith("hold: position open")
    assert e["sizing"] is None


def test_open_position_is_held_even_without_history(base: pd.DataFrame) -> None:
    assert V1Policy().decide(_ctx(base.iloc[-50:], side=-1)) == Decision(direction=-1)


@pytest.mark.parametrize(
    ("atr", "leverage", "size_frac", "notional"),
    [
        (100.0, 2.0, 1.0, 20_000.0),  # qty = 100 / 150 = 2/3; 2/3 x 30000 = 20000 = 2.0 x equity
        (300.0, 1.0, 2.0 / 3.0, 20_000.0 / 3),  # qty = 100 / 450; notional 6666.67 -> 1x, 2/3 of equity
        (50.0, 3.0, 1.0, 40_000.0),  # notional 40000 = 4x equity -> capped at 3x, whole equity
    ],
)
def test_sizing_by_hand(atr: float, leverage: float, size_frac: float, notional: float) -> None:
    s = size_position(10_000.0, atr, 30_000.0, V1Config())
    assert s["risk_usdt"] == pytest.approx(100.0)
    assert s["stop_dist_price"] == pytest.approx(1.5 * atr)
    assert s["notional_usdt"] == pytest.approx(notional)
    assert s["leverage"] == leverage
    assert s["size_frac"] == pytest.approx(size_frac)


def test_sizing_atr_120_by_hand() -> None:
    # risk 100 / stop 180 = 0.5556 BTC; x 30000 = 16666.67 USDT = 1.67 x equity -> 2x; margin 8333.33 = 0.8333
    s = size_position(10_000.0, 120.0, 30_000.0, V1Config())
    assert s["leverage"] == 2.0
    assert s["size_frac"] == pytest.approx(16_666.666666 / 2 / 10_000, rel=1e-6)


def test_sizing_rejects_non_finite() -> None:
    with pytest.raises(ValueError, match="atr_price"):
        size_position(10_000.0, float("nan"), 30_000.0, V1Config())


def test_decision_uses_sizing_of_the_bar(base_explain: dict) -> None:
    e = base_explain
    s = size_position(EQUITY, e["sizing"]["atr_price"], e["trigger"]["close"], V1Config())
    assert e["decision"].leverage == s["leverage"] == 3.0
    assert e["decision"].size_frac == pytest.approx(s["size_frac"])
    # notional = 100 / (1.5 ATR) x close, margin = notional / 3
    atr, close = e["sizing"]["atr_price"], e["trigger"]["close"]
    assert e["decision"].size_frac == pytest.approx(100.0 / (1.5 * atr) * close / 3.0 / EQUITY)


def test_not_enough_rows_gives_flat(base: pd.DataFrame) -> None:
    e = _explain(base.iloc[-599:])
    assert not e["ready"] and e["reason"].startswith("not_ready: 599 rows")
    assert e["decision"] == Decision.flat()


def test_nan_indicator_gives_flat(base: pd.DataFrame) -> None:
    e = _explain(base, V1Config(ema_slow_bars=601))
    assert not e["ready"] and "ema_slow" in e["reason"]
    assert e["decision"] == Decision.flat()


def test_non_finite_candle_raises(base: pd.DataFrame) -> None:
    bad = base.copy()
    bad.iloc[300, bad.columns.get_loc("low")] = np.inf
    with pytest.raises(ValueError, match=r"'low' at open time 2024-01-13 12:00:00\+00:00"):
        V1Policy().decide(_ctx(bad))


def test_missing_column_raises(base: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="volume"):
        V1Policy().decide(_ctx(base.drop(columns="volume")))


def test_non_positive_equity_gives_flat(base: pd.DataFrame) -> None:
    e = _explain(base, equity=0.0)
    assert e["decision"] == Decision.flat() and e["reason"] == "no_equity"


def test_non_finite_equity_raises(base: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="equity"):
        V1Policy().decide(_ctx(base, equity=float("nan")))


def test_only_the_trailing_history_is_used(base: pd.DataFrame) -> None:
    older = trend_candles(100, base=500.0, breakout=0.0)
    older.index = base.index[0] - pd.Timedelta(hours=100) + pd.to_timedelta(np.arange(100), unit="h")
    longer = pd.concat([older, base])
    e_long, e_base = _explain(longer), _explain(base)
    assert e_long["decision"] == e_base["decision"]
    assert e_long["filter"] == e_base["filter"]


def test_config_rejects_bad_orderings_and_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="ema_fast_bars < ema_mid_bars"):
        V1Config(ema_fast_bars=60)
    with pytest.raises(ValidationError, match="bb_width_pct_min"):
        V1Config(bb_width_pct_min=0.9, bb_width_pct_max=0.5)
    with pytest.raises(ValidationError):
        V1Config(adx_minimum=20.0)


# ---- every config field changes behaviour --------------------------------------------------------

PULLBACK = {"reverse_bars": (540, 585)}
RECENT_ALIGNMENT = {"reverse_bars": (560, 586)}  # EMAs aligned on the last 1-2 bars only
OPEN_BB = {"bb_width_pct_min": 0.0}
P1 = {"alignment_persist_bars": 1}
EITHER = {"trigger_mode": "either"}
ON = {"trailing_enabled": True}  # the pullback series pauses: width at the bottom of its history


def _pullback_series(offset: float) -> pd.DataFrame:
    return pullback_candles(offset)


def _trail_position(base_e: dict, base: pd.DataFrame, excursion_r: float) -> PositionView:
    """A long whose favourable excursion over the last 5 bars is ``excursion_r`` R (R = 1.5 ATR)."""
    atr = base_e["sizing"]["atr_price"]
    risk = 1.5 * atr
    extreme = float(base["high"].iloc[-5:].max())
    entry = extreme - excursion_r * risk
    return PositionView(side=1, quantity_base=1.0, entry_price=entry, bars_in_trade=5,
                        stop_price=entry - risk, take_profit_price=entry + 2 * risk)  # fmt: skip


def _field_cases(base_e: dict, base: pd.DataFrame) -> list[tuple]:
    """(field, candles, reference overrides, changed overrides, check(ref, new), ctx kwargs) per field."""
    f = base_e["filter"]
    flat = Decision.flat()
    pb0, pb02 = _pullback_series(0.0), _pullback_series(0.2)

    def flips_to_flat(ref: dict, new: dict) -> bool:
        return ref["decision"].direction == 1 and new["decision"] == flat

    def flips_to_long(ref: dict, new: dict) -> bool:
        return ref["decision"] == flat and new["decision"].direction == 1

    def resized(ref: dict, new: dict) -> bool:
        return new["decision"].direction == 1 and new["decision"] != ref["decision"]

    def stop_moved_differently(ref: dict, new: dict) -> bool:
        return ref["decision"].new_stop_price != new["decision"].new_stop_price

    phase2 = {"position": _trail_position(base_e, base, 1.75)}  # default thresholds: phase 2
    wide_tight = {**ON, "trail_wide_at_r": 2.5, "trail_tight_at_r": 3.0}  # phase 1 at 1.75 R
    regime2 = (RegimeAdjustment(), RegimeAdjustment(adx_min_delta=200.0))
    regime_ctx = {"regime_proba": np.array([0.6, 0.4])}
    b = base
    return [
        ("adx_period_bars", b, {}, {"adx_period_bars": 400}, flips_to_flat, {}),  # ADX needs 799 bars
        ("adx_min", b, {}, {"adx_min": f["adx"] + 0.01}, flips_to_flat, {}),
        ("bb_period_bars", b, {}, {"bb_period_bars": 150}, flips_to_flat, {}),  # 149 + 500 > 600
        ("bb_width_lookback_bars", b, {}, {"bb_width_lookback_bars": 590}, flips_to_flat, {}),
        ("bb_width_pct_min", b, {}, {"bb_width_pct_min": f["bb_width_pct"] + 0.01}, flips_to_flat, {}),
        ("bb_width_pct_max", b, {}, {"bb_width_pct_max": f["bb_width_pct"] - 0.01}, flips_to_flat, {}),
        ("volume_ma_bars", b, {"volume_min_ratio": 1.2}, {"volume_min_ratio": 1.2, "volume_ma_bars": 1},
         flips_to_flat, {}),
        ("volume_min_ratio", b, {}, {"volume_min_ratio": f["volume_ratio"] + 0.01}, flips_to_flat, {}),
        ("ema_fast_bars", trend_candles(**PULLBACK), P1, {**P1, "ema_fast_bars": 5}, flips_to_long, {}),
        ("ema_mid_bars", trend_candles(**PULLBACK), P1, {**P1, "ema_mid_bars": 100}, flips_to_long, {}),
        ("ema_slow_bars", b, {}, {"ema_slow_bars": 601}, flips_to_flat, {}),
        ("alignment_persist_bars", trend_candles(**RECENT_ALIGNMENT), {}, {"alignment_persist_bars": 3},
         flips_to_flat, {}),
        ("trigger_mode", pb0, OPEN_BB, {**OPEN_BB, "trigger_mode": "either"}, flips_to_long, {}),
        ("breakout_k", b, {}, {"breakout_k": 2.0}, flips_to_flat, {}),  # 4.0 < 2 x 3.76
        ("pullback_atr_tol", pb02, {**OPEN_BB, **EITHER}, {**OPEN_BB, **EITHER, "pullback_atr_tol": 0.1},
         flips_to_flat, {}),
        ("atr_period_bars", b, {}, {"atr_period_bars": 100}, resized, {}),
        ("stop_atr_mult", b, {}, {"stop_atr_mult": 3.0},
         lambda r, n: (n["decision"].stop_atr == 3.0 and n["decision"].take_profit_atr == 6.0
                       and n["decision"].size_frac < r["decision"].size_frac), {}),
        ("reward_risk_ratio", b, {}, {"reward_risk_ratio": 3.0}, lambda r, n: n["decision"].take_profit_atr == 4.5, {}),
        ("risk_per_trade_frac", b, {}, {"risk_per_trade_frac": 0.005}, resized, {}),
        ("max_leverage", b, {}, {"max_leverage": 2.0},
         lambda r, n: n["decision"].leverage == 2.0 and n["decision"].size_frac == 1.0, {}),
        ("max_symbol_notional_frac", b, {}, {"max_symbol_notional_frac": 1.0},
         lambda r, n: resized(r, n) and n["decision"].size_frac * n["decision"].leverage == pytest.approx(1.0), {}),
        ("max_same_direction_notional_frac", b, {}, {"max_same_direction_notional_frac": 0.5},
         lambda r, n: resized(r, n) and n["decision"].size_frac * n["decision"].leverage == pytest.approx(0.5), {}),
        ("history_bars", b, {}, {"history_bars": 601}, flips_to_flat, {}),
        ("trailing_enabled", b, {}, ON,
         lambda r, n: r["decision"] == Decision(direction=1) and n["decision"].new_stop_price is not None, phase2),
        ("trail_breakeven_at_r", b, wide_tight, {**wide_tight, "trail_breakeven_at_r": 1.8},
         lambda r, n: r["trailing"]["phase"] == 1 and n["trailing"]["phase"] == 0 and stop_moved_differently(r, n),
         phase2),
        ("trail_wide_at_r", b, ON, {**ON, "trail_wide_at_r": 1.8},
         lambda r, n: r["trailing"]["phase"] == 2 and n["trailing"]["phase"] == 1 and stop_moved_differently(r, n),
         phase2),
        ("trail_tight_at_r", b, ON, {**ON, "trail_tight_at_r": 1.6},
         lambda r, n: n["trailing"]["phase"] == 3 and stop_moved_differently(r, n), phase2),
        ("trail_wide_atr", b, ON, {**ON, "trail_wide_atr": 2.5}, stop_moved_differently, phase2),
        ("trail_tight_atr", b, {**ON, "trail_tight_at_r": 1.6}, {**ON, "trail_tight_at_r": 1.6, "trail_tight_atr": 0.5},
         stop_moved_differently, phase2),
        ("regime_adjustments", b, {}, {"regime_adjustments": (RegimeAdjustment(adx_min_delta=200.0),) * 2},
         flips_to_flat, regime_ctx),
        ("regime_mode", b, {"regime_adjustments": regime2}, {"regime_adjustments": regime2, "regime_mode": "expected"},
         flips_to_flat, regime_ctx),
    ]  # fmt: skip


def test_every_config_field_changes_behaviour(base: pd.DataFrame, base_explain: dict) -> None:
    cases = _field_cases(base_explain, base)
    assert {c[0] for c in cases} == set(V1Config.model_fields)
    for field, candles, ref_over, new_over, check, ctx_kw in cases:
        ctx = DecisionContext(candles.index[-1], candles, ctx_kw.get("position", PositionView()), EQUITY,
                              regime_proba=ctx_kw.get("regime_proba"))  # fmt: skip
        ref = V1Policy(V1Config(**ref_over)).explain(ctx)
        new = V1Policy(V1Config(**new_over)).explain(ctx)
        assert check(ref, new), (
            f"changing {field} did not change the behaviour: {ref['reason']} / {new['reason']}"
        )
        assert math.isfinite(new["decision"].size_frac)


def test_non_dataframe_candles_raise_type_error(base: pd.DataFrame) -> None:
    ctx = DecisionContext(base.index[-1], base.to_numpy(), PositionView(), EQUITY)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="DataFrame"):
        V1Policy().decide(ctx)
