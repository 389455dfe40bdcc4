"""Paper and live size alike on a non-BTC instrument (issue 15): for the same decision, equity and price, the
paper broker (the env kernel) and the live intents give the same quantity, stop and take-profit on XRP's spec."""

from __future__ import annotations

import pandas as pd
import pytest

from envs.accounting import Bar
from envs.config import CostConfig
from market.decision import Decision
from serving.intents import MarketRules, entry_quantity, exchange_leverage, protective_intents
from serving.paper import PaperBroker
from tests.kit.instruments import xrp_test_spec

T = pd.Timestamp("2024-07-01 10:00", tz="UTC")
EQUITY = 10_000.0


@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize(("price", "atr", "leverage", "size_frac", "stop_atr", "tp_atr"), [
    (0.5123, 0.004567, 3.0, 0.5, 1.5, 3.0),   # stop and take-profit off the tick
    (0.4871, 0.003333, 2.0, 0.25, 1.0, 2.0),
    (2.3456, 0.031416, 4.5, 0.8, 2.2, 1.7),   # XRP at 2.3 USDT, fractional leverage
    (0.6001, 0.003, 1.0, 0.0006, 1.0, 1.0),  # 6 USDT: a position just above the 5 USDT minimum notional
])
def test_paper_and_live_give_the_same_quantity_stop_and_take_profit(direction, price, atr, leverage, size_frac,
                                                                    stop_atr, tp_atr):
    spec = xrp_test_spec()
    costs = CostConfig(slippage_bps=0.0, slippage_atr_coef=0.0, instrument=spec)  # fill = the reference price
    decision = Decision(direction=direction, leverage=leverage, size_frac=size_frac, stop_atr=stop_atr,
                        take_profit_atr=tp_atr)
    broker = PaperBroker(EQUITY, costs)
    broker.submit(decision, atr)
    # the fill bar opens at the decided bar's close (the live sizing price) and touches neither level
    bar = Bar(int(T.value), price, price * (1 + 1e-4), price * (1 - 1e-4), price, 0.0, False)
    broker.on_bar(bar)
    paper = broker.state
    assert paper.side == direction and paper.entry_price == pytest.approx(price, abs=1e-12)

    rules = MarketRules.from_spec(spec)
    qty, why = entry_quantity(EQUITY, size_frac, leverage, price, rules)
    stop, tp = protective_intents("XRPUSDT", T, direction, paper.entry_price, atr, decision, rules)
    assert why is None
    assert qty == pytest.approx(paper.qty_base, abs=1e-9)
    assert stop.trigger_price == pytest.approx(paper.stop_price, abs=1e-12)
    assert tp.trigger_price == pytest.approx(paper.take_profit_price, abs=1e-12)
    # on XRP's tick, not BTC's: both levels are multiples of 0.0001 and within half a tick of the ATR distance
    for level, dist in ((stop.trigger_price, -direction * stop_atr * atr), (tp.trigger_price, direction * tp_atr * atr)):
        assert round(level / 1e-4) * 1e-4 == pytest.approx(level, abs=1e-12)
        assert abs(level - (price + dist)) <= 0.5e-4 + 1e-12
    assert exchange_leverage(leverage, spec.max_leverage) == int(-(-leverage // 1))


def test_below_the_min_notional_both_skip():
    spec = xrp_test_spec()
    costs = CostConfig(slippage_bps=0.0, slippage_atr_coef=0.0, instrument=spec)
    decision = Decision(direction=1, leverage=1.0, size_frac=0.0004, stop_atr=1.0, take_profit_atr=1.0)
    broker = PaperBroker(EQUITY, costs)  # 4 USDT of notional < 5 USDT minimum
    broker.submit(decision, 0.001)
    res = broker.on_bar(Bar(int(T.value), 0.5, 0.5001, 0.4999, 0.5, 0.0, False))
    assert broker.state.side == 0 and res.skipped_min_notional
    qty, why = entry_quantity(EQUITY, 0.0004, 1.0, 0.5, MarketRules.from_spec(spec))
    assert qty == 0.0 and "min_notional" in why
