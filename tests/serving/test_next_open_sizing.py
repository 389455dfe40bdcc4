"""Live entry sizing parity with the env kernel at an open equal to the last close (issue 18, sim/exchange parity).

The kernel sizes an entry at its fill (the next open with adverse slippage, tick-rounded) with the cash it holds
after closing the position held. Live sizes before that open exists: :func:`serving.intents.next_open_entry` takes
the last close for it and applies the kernel's rule (its fill function, :func:`serving.intents.modelled_fill_price`,
and on a flip the equity less the modelled exit's fee and slippage). For random decisions, prices, ATRs, equities
and cost models on two instruments, the quantity, the fill and the sizing equity are the kernel's when the next open
is the last close: entries from flat and direct flips.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from envs.accounting import AccountState, Bar, step_bar
from envs.config import CostConfig
from market.decision import Decision
from market.instruments import BUNDLED_SPECS, InstrumentSpec
from serving.intents import (
    ExchangePosition,
    FillModel,
    IntentError,
    MarketRules,
    OpenProtection,
    modelled_fill_price,
    next_open_entry,
    plan_bar,
)
from tests.kit.instruments import xrp_test_spec

T0 = pd.Timestamp("2024-01-01 01:00", tz="UTC")  # not a funding time
NS = int(T0.value)
HOUR_NS = 3_600_000_000_000

#: (spec, price range USDT, equity range USDT): notionals inside the first maintenance brackets
SPECS: dict[str, tuple[InstrumentSpec, tuple[float, float], tuple[float, float]]] = {
    "BTCUSDT": (BUNDLED_SPECS["BTCUSDT"], (20_000.0, 100_000.0), (200.0, 20_000.0)),
    "XRPUSDT": (xrp_test_spec(), (0.3, 3.0), (20.0, 600.0)),
}


def _costs(rng: np.random.Generator, spec: InstrumentSpec) -> CostConfig:
    return CostConfig(slippage_bps=float(rng.choice([0.0, 1.0, rng.uniform(0, 8)])),
                      slippage_atr_coef=float(rng.choice([0.0, 0.05, rng.uniform(0, 0.2)])),
                      taker_fee_bps=float(rng.choice([4.0, 5.0])), cost_multiplier=float(rng.choice([1.0, 2.0])),
                      instrument=spec)  # fmt: skip


def _decision(rng: np.random.Generator, direction: int) -> Decision:
    return Decision(direction=direction, leverage=float(rng.uniform(1.0, 5.0)), size_frac=float(rng.uniform(0.05, 1)),
                    stop_atr=float(rng.uniform(0.5, 4.0)), take_profit_atr=float(rng.uniform(0.5, 8.0)))  # fmt: skip


def _bar(ns: int, price: float) -> Bar:
    return Bar(ns, price, price, price, price, math.nan, False)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_next_open_entry_parity_with_the_kernel_from_flat_and_on_a_flip(name: str) -> None:
    spec, (p_lo, p_hi), (e_lo, e_hi) = SPECS[name]
    rules = MarketRules.from_spec(spec)
    rng = np.random.default_rng(7)
    compared = flips = 0
    for _ in range(150):
        costs = _costs(rng, spec)
        ref = round(float(rng.uniform(p_lo, p_hi)) / spec.tick_size_usdt) * spec.tick_size_usdt
        atr = ref * float(rng.uniform(0.002, 0.03))
        equity = float(np.exp(rng.uniform(math.log(e_lo), math.log(e_hi))))
        state, position = AccountState.initial(equity), ExchangePosition()
        if rng.random() < 0.5:  # a position held into the bar: opened at an earlier open, marked at ref
            first = _decision(rng, int(rng.choice([-1, 1])))
            entry_price = ref * float(rng.uniform(0.98, 1.02))
            state = step_bar(state, first, _bar(NS - 2 * HOUR_NS, entry_price), atr, costs).state
            if state.side != 0:
                position = ExchangePosition(state.side, state.qty_base, state.entry_price)
        direction = -position.side if position.side else int(rng.choice([-1, 1]))
        decision = _decision(rng, direction)
        kernel = step_bar(state, decision, _bar(NS, ref), atr, costs)
        entry = [f for f in kernel.fills if f.reason == "entry"]
        live = next_open_entry(position=position, decision=decision, reference_usdt=ref,
                               equity_usdt=state.equity(ref), rules=rules, fills=FillModel(costs, atr))  # fmt: skip
        assert live.fill_usdt == modelled_fill_price(ref, direction, atr, costs, spec.tick_size_usdt)
        if not entry:  # the kernel skipped it (below the minimums): so does live, with a reason
            assert not live.size.traded and kernel.skipped_min_notional
            continue
        compared += 1
        flips += position.side != 0
        assert live.size.traded and live.size.quantity_base == entry[0].qty_base
        assert live.fill_usdt == entry[0].price
        if position.side != 0:  # the sizing equity is the kernel's cash after the exit
            assert live.equity_usdt == pytest.approx(kernel.state.cash_usdt + kernel.state.margin_usdt
                                                     + entry[0].fee_usdt, rel=1e-12)  # fmt: skip
        # plan_bar with the fill model sends that quantity
        plan = plan_bar(symbol=spec.symbol, bar_open_time=T0, position=position, protection=OpenProtection(),
                        decision=decision, price_usdt=ref, equity_usdt=state.equity(ref), rules=rules,
                        fills=FillModel(costs, atr))  # fmt: skip
        assert plan.orders[-1].kind == "entry" and plan.orders[-1].qty_base == entry[0].qty_base
    assert compared >= 100 and flips >= 40


def test_modelled_fill_is_the_kernels_adverse_fill() -> None:
    costs = CostConfig(slippage_bps=2.0, slippage_atr_coef=0.1)
    tick = costs.instrument.tick_size_usdt
    # slip = (2 / 1e4 + 0.1 * 300 / 50,000) = 8e-4: buy 50,040.0 (up to the tick), sell 49,960.0
    assert modelled_fill_price(50_000.0, 1, 300.0, costs) == pytest.approx(50_040.0)
    assert modelled_fill_price(50_000.0, -1, 300.0, costs) == pytest.approx(49_960.0)
    assert modelled_fill_price(50_000.03, 1, 0.0, costs.updated(slippage_bps=0.0), tick) == pytest.approx(50_000.1)
    for bad in (math.nan, -1.0):
        with pytest.raises(IntentError, match="atr_usdt"):
            modelled_fill_price(50_000.0, 1, bad, costs)
    with pytest.raises(IntentError, match="trade_side"):
        modelled_fill_price(50_000.0, 0, 300.0, costs)
    with pytest.raises(IntentError, match="direction"):
        next_open_entry(position=ExchangePosition(), decision=Decision.flat(), reference_usdt=50_000.0,
                        equity_usdt=1_000.0, rules=MarketRules.from_spec(costs.instrument),
                        fills=FillModel(costs, 300.0))  # fmt: skip
