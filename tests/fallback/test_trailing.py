"""Phased trailing stop: exact stops bar by bar, symmetry, and V1's hold / trail / exit decisions."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fallback.config import V1Config
from fallback.trailing import initial_risk, tightened, trail_path, trail_state
from fallback.v1 import V1Policy
from market.decision import Decision, DecisionContext, NonFiniteDecisionError, PositionView
from tests.fallback.series import mirror, trend_candles

ON = V1Config(trailing_enabled=True)
CFG = ON  # breakeven at 1 R, wide trail 2 ATR from 1.5 R, tight trail 1 ATR from 2 R

# long: entry 100, initial stop 98 (R = 2), ATR 1 except the last bar (3)
HIGHS = np.array([100.5, 101.9, 102.0, 103.0, 103.5, 104.2, 104.0, 103.0])
ATRS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0])
# excursion (R): 0.25, 0.95, 1.0, 1.5, 1.75, 2.1, 2.1, 2.1
EXPECTED_PHASES = [0, 0, 1, 2, 2, 3, 3, 3]
EXPECTED_STOPS = [
    98.0,
    98.0,
    100.0,
    101.0,
    101.5,
    103.2,
    103.2,
    103.2,
]  # last: 104.2 - 3 = 101.2 would loosen


def test_long_stops_bar_by_bar() -> None:
    stops, phases = trail_path(1, 100.0, 98.0, HIGHS, HIGHS - 1.0, ATRS, CFG)
    assert phases.tolist() == EXPECTED_PHASES
    assert stops == pytest.approx(EXPECTED_STOPS, abs=1e-12)


def test_short_stops_mirror_the_long_ones() -> None:
    lows = 200.0 - HIGHS
    stops, phases = trail_path(-1, 100.0, 102.0, lows + 1.0, lows, ATRS, CFG)
    assert phases.tolist() == EXPECTED_PHASES
    assert stops == pytest.approx([200.0 - s for s in EXPECTED_STOPS], abs=1e-12)


def test_phase_boundaries_and_break_even_floor() -> None:
    # phase 2 close to break-even: 101.5 - 2 x 1 = 99.5 < entry -> the stop stays at break-even
    st = trail_state(1, 100.0, 1.0, 101.5, 1.0, CFG)
    assert (st.phase, st.stop_price) == (2, 100.0)
    assert trail_state(1, 100.0, 2.0, 101.99, 1.0, CFG).phase == 0
    assert trail_state(-1, 100.0, 2.0, 96.0, 1.0, CFG) == trail_state(-1, 100.0, 2.0, 96.0, 1.0, CFG)
    assert trail_state(-1, 100.0, 2.0, 96.0, 1.0, CFG).stop_price == pytest.approx(97.0)  # 96 + 1 x ATR


def test_tightened_only_moves_towards_the_price() -> None:
    assert tightened(1, 98.0, 99.0) == 99.0
    assert tightened(1, 98.0, 97.0) is None
    assert tightened(1, 98.0, 98.0) is None
    assert tightened(-1, 102.0, 101.0) == 101.0
    assert tightened(-1, 102.0, 103.0) is None
    assert tightened(1, None, 99.0) == 99.0
    assert tightened(1, 98.0, None) is None


def test_initial_risk_from_the_position() -> None:
    assert initial_risk(1, 100.0, 106.0, 99.5, CFG) == pytest.approx(3.0)  # (106 - 100) / 2, stop moved
    assert initial_risk(-1, 100.0, None, 103.0, CFG) == pytest.approx(3.0)
    assert initial_risk(1, 100.0, None, None, CFG) is None
    assert initial_risk(0, 100.0, 106.0, 97.0, CFG) is None


def test_trail_state_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="atr_price"):
        trail_state(1, 100.0, 1.0, 101.0, math.nan, CFG)
    with pytest.raises(ValueError, match="side"):
        trail_state(0, 100.0, 1.0, 101.0, 1.0, CFG)


# ---- through V1 -----------------------------------------------------------------------------------


def _ctx(candles: pd.DataFrame, position: PositionView) -> DecisionContext:
    return DecisionContext(candles.index[-1], candles, position, 10_000.0)


def _long(entry: float, risk: float, stop: float | None = None, bars: int = 5) -> PositionView:
    return PositionView(side=1, quantity_base=1.0, entry_price=entry, bars_in_trade=bars,
                        stop_price=entry - risk if stop is None else stop, take_profit_price=entry + 2 * risk)  # fmt: skip


def _short(entry: float, risk: float, stop: float | None = None, bars: int = 5) -> PositionView:
    return PositionView(side=-1, quantity_base=1.0, entry_price=entry, bars_in_trade=bars,
                        stop_price=entry + risk if stop is None else stop, take_profit_price=entry - 2 * risk)  # fmt: skip


def test_v1_asks_for_the_phase_stop_and_mirrors_it() -> None:
    base = trend_candles()
    extreme = float(base["high"].iloc[-5:].max())
    atr = V1Policy().explain(DecisionContext(base.index[-1], base, PositionView(), 10_000.0))["sizing"][
        "atr_price"
    ]
    risk = 1.5 * atr
    e = V1Policy(ON).explain(_ctx(base, _long(extreme - 1.75 * risk, risk)))  # 1.75 R: phase 2
    assert e["trailing"]["phase"] == 2 and e["reason"] == "trail: phase 2"
    assert e["decision"].direction == 1
    assert e["decision"].new_stop_price == pytest.approx(
        extreme - 2.0 * atr
    )  # 2 ATRs behind the highest high
    m = mirror(base)
    es = V1Policy(ON).explain(_ctx(m, _short(3_000.0 - (extreme - 1.75 * risk), risk)))
    assert es["decision"].direction == -1
    assert es["decision"].new_stop_price == pytest.approx(3_000.0 - e["decision"].new_stop_price)


def test_v1_keeps_a_tighter_stop_and_holds() -> None:
    base = trend_candles()
    extreme = float(base["high"].iloc[-5:].max())
    entry = extreme - 1.75 * 3.0
    e = V1Policy(ON).explain(_ctx(base, _long(entry, 3.0, stop=extreme - 0.1 * 3.0 - 1.4)))
    assert e["decision"] == Decision(direction=1)  # candidate below the current stop: no move
    assert e["reason"].startswith("hold")


def test_v1_exits_when_the_stop_is_already_crossed_at_the_close() -> None:
    base = trend_candles()
    close = float(base["close"].iloc[-1])
    extreme = float(base["high"].iloc[-5:].max())
    entry = close + 0.2  # excursion (extreme - entry) / 1 >= 1 R: break-even stop above the close
    assert extreme - entry >= 1.0
    e = V1Policy(ON).explain(_ctx(base, _long(entry, 1.0)))
    assert e["decision"] == Decision.flat() and e["reason"].startswith("exit: trailing stop")


def test_new_stop_price_is_validated() -> None:
    with pytest.raises(NonFiniteDecisionError, match="new_stop_price"):
        Decision(direction=1, new_stop_price=math.nan)
    with pytest.raises(NonFiniteDecisionError, match="new_stop_price"):
        Decision(direction=1, new_stop_price=-1.0)
    with pytest.raises(NonFiniteDecisionError, match="new_stop_price"):
        Decision(direction=0, new_stop_price=100.0)
    assert Decision(direction=1).new_stop_price is None


@settings(max_examples=60, deadline=None)
@given(
    moves=st.lists(st.floats(-3.0, 3.0, allow_nan=False), min_size=1, max_size=40),
    atr=st.floats(0.2, 3.0),
    risk=st.floats(0.5, 5.0),
)
def test_stops_never_loosen_and_mirror_exactly(moves: list[float], atr: float, risk: float) -> None:
    closes = 100.0 + np.cumsum(moves)
    highs, lows, atrs = closes + 0.5, closes - 0.5, np.full(len(closes), atr)
    stops, phases = trail_path(1, 100.0, 100.0 - risk, highs, lows, atrs, CFG)
    assert (np.diff(stops) >= 0).all() and stops[0] >= 100.0 - risk
    assert (np.diff(phases) >= 0).all()  # the extreme only grows, so the phase only rises
    assert ((phases == 0) | (stops >= 100.0)).all()  # from phase 1 on, never below break-even
    s_stops, s_phases = trail_path(-1, 100.0, 100.0 + risk, 200.0 - lows, 200.0 - highs, atrs, CFG)
    assert s_phases.tolist() == phases.tolist()
    np.testing.assert_allclose(s_stops, 200.0 - stops, rtol=0, atol=1e-9)
