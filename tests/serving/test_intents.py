"""Pure intent functions: client ids, rounding, sizing, bar plans."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.sizing import SizingError, round_to_tick
from market.decision import Decision
from serving.intents import (
    CLIENT_ID_PATTERN,
    ExchangePosition,
    IntentError,
    MarketRules,
    OpenProtection,
    client_order_id,
    entry_quantity,
    exchange_leverage,
    parse_client_order_id,
    plan_bar,
    protective_intents,
    tightened_stop,
)

RULES = MarketRules("BTCUSDT", tick_size_usdt=0.1, step_size_base=0.001, min_qty_base=0.001, min_notional_usdt=100.0)
T = pd.Timestamp("2024-03-01 05:00", tz="UTC")
LONG = Decision(direction=1, leverage=3.0, size_frac=0.5, stop_atr=1.0, take_profit_atr=2.0)


def test_client_id_is_deterministic_valid_and_distinct():
    a = client_order_id("BTCUSDT", T, "entry")
    assert a == client_order_id("BTCUSDT", T, "entry") == "ats-BTCUSDT-1709269200-entry"
    assert CLIENT_ID_PATTERN.fullmatch(a)
    others = {client_order_id("BTCUSDT", T, k) for k in ("exit", "stop", "tp", "stopmv")}
    others.add(client_order_id("BTCUSDT", T + pd.Timedelta(hours=1), "entry"))
    others.add(client_order_id("ETHUSDT", T, "entry"))
    assert a not in others and len(others) == 6
    assert parse_client_order_id(a) == ("BTCUSDT", 1709269200, "entry")
    assert parse_client_order_id("x-cvBPrNm9abc") is None


def test_client_id_long_symbol_hashed_and_errors():
    cid = client_order_id("A" * 30, T, "stopmv")
    assert len(cid) <= 36 and CLIENT_ID_PATTERN.fullmatch(cid)
    with pytest.raises(IntentError, match="unknown intent kind"):
        client_order_id("BTCUSDT", T, "open")
    with pytest.raises(IntentError, match="tz-aware"):
        client_order_id("BTCUSDT", pd.Timestamp("2024-01-01"), "entry")
    with pytest.raises(IntentError, match="newClientOrderId"):
        client_order_id("BTC USDT", T, "entry")


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[A-Z0-9]{2,40}", fullmatch=True), st.integers(0, 4_000_000_000), st.sampled_from(
    ["entry", "exit", "stop", "tp", "stopmv"]))
def test_client_id_always_matches_binance_rule(symbol, secs, kind):
    cid = client_order_id(symbol, pd.Timestamp(secs, unit="s", tz="UTC"), kind)
    assert CLIENT_ID_PATTERN.fullmatch(cid)


def test_round_to_tick_is_the_kernels_rounding():
    # the live intents round with the kernel's rule (envs.sizing.round_to_tick), float noise of n * tick removed
    assert round_to_tick(0.30000000000000004, 0.1, -1) == 0.3
    assert round_to_tick(100.05, 0.1, -1) == 100.0
    assert round_to_tick(100.05, 0.1, 1) == 100.1
    assert round_to_tick(0.0019999, 0.001, -1) == 0.001
    assert round_to_tick(100.04, 0.1, 0) == 100.0 and round_to_tick(100.06, 0.1, 0) == 100.1
    with pytest.raises(SizingError):
        round_to_tick(math.nan, 0.1, -1)
    with pytest.raises(SizingError):
        round_to_tick(1.0, 0.0, -1)


def test_entry_quantity_sizing_and_limits():
    qty, why = entry_quantity(10_000.0, 0.5, 3.0, 50_000.0, RULES)
    assert why is None and qty == pytest.approx(0.3)  # 15,000 USDT / 50,000
    qty, why = entry_quantity(50.0, 0.5, 1.0, 50_000.0, RULES)
    assert qty == 0.0 and "min_qty" in why
    qty, why = entry_quantity(150.0, 0.5, 1.0, 70.0, RULES)  # 1.071 units * 70 = 75 USDT < 100
    assert qty == 0.0 and "min_notional" in why
    with pytest.raises(IntentError, match="price_usdt"):
        entry_quantity(10_000.0, 0.5, 3.0, math.inf, RULES)
    with pytest.raises(IntentError, match="equity_usdt"):
        entry_quantity(math.nan, 0.5, 3.0, 1.0, RULES)


def test_protective_prices_long_and_short():
    # nearest tick, as the env kernel rounds an entry's stop and take-profit: 49,876.594 -> 49,876.6, 50,246.962 -> 50,247.0
    stop, tp = protective_intents("BTCUSDT", T, 1, 50_000.05, 123.456, LONG, RULES)
    assert stop.trigger_price == pytest.approx(49_876.6) and tp.trigger_price == pytest.approx(50_247.0)
    assert stop.side == tp.side == "sell" and stop.close_position and stop.reduce_only
    assert stop.order_type == "stop_market" and tp.order_type == "take_profit_market"
    short = Decision(direction=-1, leverage=2.0, size_frac=0.2, stop_atr=1.0, take_profit_atr=2.0)
    stop, tp = protective_intents("BTCUSDT", T, -1, 50_000.05, 123.456, short, RULES)
    assert stop.trigger_price == pytest.approx(50_123.5) and tp.trigger_price == pytest.approx(49_753.1)
    assert stop.side == "buy"
    with pytest.raises(IntentError, match="atr_usdt"):
        protective_intents("BTCUSDT", T, 1, 50_000.0, math.nan, LONG, RULES)


def test_plan_flat_to_long_and_reversal():
    plan = plan_bar(symbol="BTCUSDT", bar_open_time=T, position=ExchangePosition(), protection=OpenProtection(),
                    decision=LONG, price_usdt=50_000.0, equity_usdt=10_000.0, rules=RULES)
    assert plan.entry_side == 1 and plan.cancels == ()
    assert [(o.kind, o.side, o.qty_base) for o in plan.orders] == [("entry", "buy", pytest.approx(0.3))]
    prot = OpenProtection("ats-BTCUSDT-1-stop", 49_000.0, "ats-BTCUSDT-1-tp", 52_000.0)
    short = Decision(direction=-1, leverage=1.0, size_frac=0.5)
    plan = plan_bar(symbol="BTCUSDT", bar_open_time=T, position=ExchangePosition(1, 0.3, 50_000.0),
                    protection=prot, decision=short, price_usdt=50_000.0, equity_usdt=10_000.0, rules=RULES)
    assert plan.cancels == ("ats-BTCUSDT-1-stop", "ats-BTCUSDT-1-tp")
    assert [(o.kind, o.side, o.reduce_only) for o in plan.orders] == [("exit", "sell", True), ("entry", "sell", False)]
    assert plan.orders[0].qty_base == 0.3 and plan.entry_side == -1


def test_plan_blocked_entry_still_exits():
    short = Decision(direction=-1, leverage=1.0, size_frac=0.5)
    plan = plan_bar(symbol="BTCUSDT", bar_open_time=T, position=ExchangePosition(1, 0.3, 50_000.0),
                    protection=OpenProtection(), decision=short, price_usdt=50_000.0, equity_usdt=10_000.0,
                    rules=RULES, allow_entry=False)
    assert [o.kind for o in plan.orders] == ["exit"] and plan.entry_side == 0 and "entry blocked" in plan.notes


def test_plan_hold_and_stop_move_only_when_tightening():
    pos = ExchangePosition(1, 0.3, 50_000.0)
    prot = OpenProtection("old-stop", 49_000.0, "old-tp", 52_000.0)
    hold = Decision(direction=1, leverage=3.0, size_frac=0.5)
    assert plan_bar(symbol="BTCUSDT", bar_open_time=T, position=pos, protection=prot, decision=hold,
                    price_usdt=50_000.0, equity_usdt=1.0, rules=RULES).orders == ()
    trail = Decision(direction=1, leverage=3.0, size_frac=0.5, new_stop_price=49_500.07)
    plan = plan_bar(symbol="BTCUSDT", bar_open_time=T, position=pos, protection=prot, decision=trail,
                    price_usdt=50_000.0, equity_usdt=1.0, rules=RULES)
    assert plan.cancels == ("old-stop",)
    assert plan.orders[0].kind == "stopmv" and plan.orders[0].trigger_price == 49_500.0
    loosen = Decision(direction=1, leverage=3.0, size_frac=0.5, new_stop_price=48_000.0)
    plan = plan_bar(symbol="BTCUSDT", bar_open_time=T, position=pos, protection=prot, decision=loosen,
                    price_usdt=50_000.0, equity_usdt=1.0, rules=RULES)
    assert plan.orders == () and plan.cancels == () and plan.notes


def test_tightened_stop_short_rounds_up():
    assert tightened_stop(-1, 51_000.0, 50_500.01, 0.1) == pytest.approx(50_500.1)
    assert tightened_stop(-1, 51_000.0, 51_000.0, 0.1) is None


def test_exchange_leverage():
    assert exchange_leverage(1.0) == 1 and exchange_leverage(2.2) == 3 and exchange_leverage(500.0) == 125
    with pytest.raises(IntentError):
        exchange_leverage(math.nan)
