"""Sizing parity (issue 18): the env kernel, the paper broker and the live intents size an entry by one rule.

For random decisions on several instruments (the bundled BTCUSDT spec, the XRPUSDT test spec and XRP variants
with a small max market quantity, a min quantity above the step and a low max leverage), the kernel driven
through :meth:`envs.trading_env.TradingEnv.step_decision`, the paper broker (:class:`serving.paper.PaperBroker`,
i.e. :func:`envs.accounting.step_bar`) and the live intents (:func:`serving.intents.plan_bar`,
:func:`serving.intents.exchange_leverage`, :func:`serving.intents.protective_intents`) give the same quantity,
margin, stop and take-profit prices and exchange leverage, given the same reference price (live sizes at its
best estimate of the fill; here it is handed the kernel's simulated fill) and the same taker fee. The live
margin is what the exchange takes for the live orders: ``qty * fill / exchange leverage``.

Then edge cases of :mod:`envs.sizing`: below the min notional or the min quantity (no trade, a reason), the max
market quantity cap, the max leverage cap, fractional leverage (2.3 -> exchange 3 with the notional of 2.3 and
the liquidation price from the real margin, hand-computed), and non-finite inputs (an error, never a trade).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from envs import sizing
from envs.accounting import AccountState, Bar, step_bar
from envs.config import CostConfig
from envs.trading_env import EnvConfig, EnvData, TradingEnv
from market.decision import Decision, NonFiniteDecisionError
from market.instruments import BUNDLED_SPECS, InstrumentSpec
from serving.intents import (
    ExchangePosition,
    IntentError,
    MarketRules,
    OpenProtection,
    entry_quantity,
    exchange_leverage,
    plan_bar,
    protective_intents,
)
from serving.paper import PaperBroker
from tests.envs import reference_accounting as ref
from tests.kit.instruments import xrp_test_spec

T0 = pd.Timestamp("2024-01-01 00:00", tz="UTC")
HOUR = pd.Timedelta(hours=1)

#: (spec, price range USDT, equity range USDT). The equities keep the largest notional (equity x max leverage
#: drawn) in brackets whose maintenance margin rate lies below 1 / leverage by more than the entry's adverse
#: slippage, so that no entry is liquidated in its own bar (the state compared is the entry's).
SPECS: dict[str, tuple[InstrumentSpec, tuple[float, float], tuple[float, float]]] = {
    "BTCUSDT": (BUNDLED_SPECS["BTCUSDT"], (20_000.0, 100_000.0), (50.0, 20_000.0)),
    "XRPUSDT": (xrp_test_spec(), (0.3, 3.0), (5.0, 600.0)),
    # a small max market quantity (the cap binds), a min quantity above the step, max leverage 10
    "XRP-capped": (xrp_test_spec(max_market_qty_base=3_000.0, min_qty_base=25.0, max_leverage=10),
                   (0.3, 3.0), (5.0, 8_000.0)),
}  # fmt: skip


def _random_decision(rng: np.random.Generator) -> Decision:
    return Decision(
        direction=int(rng.choice([-1, 1])),
        leverage=float(rng.choice([1.0, 2.0, 2.3, rng.uniform(1, 5), rng.uniform(1, 20), rng.uniform(1, 100)])),
        size_frac=float(rng.choice([0.0005, 0.01, rng.uniform(0, 1), 1.0])),
        stop_atr=float(rng.uniform(0.3, 5.0)),
        take_profit_atr=float(rng.uniform(0.3, 8.0)),
    )


def _costs(rng: np.random.Generator, spec: InstrumentSpec) -> CostConfig:
    if rng.random() < 0.5:  # no slippage: the fill is the open
        return CostConfig(slippage_bps=0.0, slippage_atr_coef=0.0, taker_fee_bps=float(rng.choice([5.0, 4.0])),
                          instrument=spec)  # fmt: skip
    return CostConfig(instrument=spec)


def _flat_data(price: float, atr: float) -> EnvData:
    """Three bars at one price (high = low = open = close): the entry at bar 1's open touches no level."""
    idx = pd.DatetimeIndex([T0, T0 + HOUR, T0 + 2 * HOUR])
    candles = pd.DataFrame({c: [price] * 3 for c in ("open", "high", "low", "close")}, index=idx)
    candles["volume"] = 1.0
    obs = pd.DataFrame({"f0": np.zeros(3, dtype=np.float32)}, index=idx)
    return EnvData.from_frames(candles, obs, np.full(3, atr))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_sizing_parity_kernel_paper_and_live_agree(name: str) -> None:
    spec, (p_lo, p_hi), (e_lo, e_hi) = SPECS[name]
    rules = MarketRules.from_spec(spec)
    rng = np.random.default_rng(18)
    traded = skipped = capped_qty = fractional = 0
    for _ in range(120):
        decision = _random_decision(rng)
        costs = _costs(rng, spec)
        fee_rate = costs.taker_fee_bps / 1e4 * costs.cost_multiplier
        price = float(rng.uniform(p_lo, p_hi))
        price = round(price / spec.tick_size_usdt) * spec.tick_size_usdt
        atr = price * float(rng.uniform(0.005, 0.03))
        equity = float(np.exp(rng.uniform(math.log(e_lo), math.log(e_hi))))
        side = decision.direction

        # 1. the kernel, through the env's decision entry point
        env = TradingEnv(_flat_data(price, atr), EnvConfig(initial_equity_usdt=equity, costs=costs,
                                                           random_start=False, info_level="full"))  # fmt: skip
        env.reset(options={"start_index": 0})
        _, _, _, _, info = env.step_decision(decision)
        k = env.account_state
        # 2. the paper broker (step_bar: the same kernel, its backtest entry point)
        broker = PaperBroker(equity, costs)
        broker.submit(decision, atr)
        t1 = int((T0 + HOUR).value)
        broker.on_bar(Bar(t1, price, price, price, price, math.nan, False))
        paper = broker.state

        # 3. live: the entry order of the bar plan at the kernel's fill price (its reference price), the
        # exchange leverage set before it, the stop / take-profit placed after its fill
        fill = info["fills"][0].price if info["fills"] else price
        plan = plan_bar(symbol=spec.symbol, bar_open_time=T0, position=ExchangePosition(), protection=OpenProtection(),
                        decision=decision, price_usdt=fill, equity_usdt=equity, rules=rules,
                        taker_fee_rate=fee_rate)  # fmt: skip
        lev_x = exchange_leverage(decision.leverage, spec.max_leverage)
        one = sizing.size_entry(side=side, equity_usdt=equity, size_frac=decision.size_frac,
                                leverage=decision.leverage, price_usdt=fill, fee_rate=fee_rate, rules=rules,
                                atr_usdt=atr, stop_atr=decision.stop_atr,
                                take_profit_atr=decision.take_profit_atr)  # fmt: skip
        assert one.exchange_leverage == lev_x == math.ceil(min(decision.leverage, spec.max_leverage))

        if not plan.orders:  # live skips: so do the kernel (both entry points) and the rule itself
            assert plan.entry_side == 0 and any("entry skipped" in n for n in plan.notes)
            assert k.side == 0 and paper.side == 0 and info["skipped_min_notional"]
            assert k.n_skipped_min_notional == paper.n_skipped_min_notional == 1
            assert not one.traded and one.skip_reason in plan.notes[0]
            skipped += 1
            continue
        traded += 1
        (entry,) = plan.orders
        qty = entry.qty_base
        stop, tp = protective_intents(spec.symbol, T0, side, fill, atr, decision, rules)
        live_margin = qty * fill / lev_x  # what the exchange takes at the leverage live sets
        assert k.side == paper.side == side, f"position exited in its entry bar: {info['closed_trades']}"
        assert entry.side == ("buy" if side > 0 else "sell")
        assert k.entry_price == paper.entry_price == fill
        assert k.qty_base == paper.qty_base == qty == one.quantity_base
        assert k.margin_usdt == paper.margin_usdt == live_margin == one.margin_usdt
        assert k.stop_price == paper.stop_price == stop.trigger_price == one.stop_price
        assert k.take_profit_price == paper.take_profit_price == tp.trigger_price == one.take_profit_price
        # the kernel's liquidation price is computed from the margin the exchange takes
        assert k.liquidation_price == paper.liquidation_price
        assert k.liquidation_price == pytest.approx(
            ref.position_liquidation_price(side, qty, fill, live_margin, costs), rel=1e-12)
        capped_qty += qty == pytest.approx(spec.max_market_qty_base or math.inf)
        fractional += decision.leverage != math.floor(decision.leverage)
    # the random draws cover trades, skips and fractional leverage (and the cap where it can bind)
    assert traded >= 30 and skipped >= 3 and fractional >= 10
    if name == "XRP-capped":
        assert capped_qty >= 3


# ---------------------------------------------------------------------------------------------
# Edge cases of the rule
# ---------------------------------------------------------------------------------------------

BTC = BUNDLED_SPECS["BTCUSDT"]
BTC_RULES = sizing.SizingRules.from_spec(BTC)
NO_SLIP = CostConfig(slippage_bps=0.0, slippage_atr_coef=0.0, instrument=BTC)


def _open_btc(decision: Decision, price: float, equity: float = 10_000.0, costs: CostConfig = NO_SLIP):
    """Step_bar (the kernel) opening ``decision`` at a flat bar at ``price``."""
    return step_bar(AccountState.initial(equity), decision, Bar(0, price, price, price, price, math.nan, False),
                    price * 0.01, costs)  # fmt: skip


def test_fractional_leverage_sets_the_next_integer_with_the_notional_unchanged_and_the_real_margin() -> None:
    # equity 10,000, size 0.5, leverage 2.3 at 50,000: budget min(5,000, 10,000 / (1 + 2.3 x 0.0005)) = 5,000,
    # notional 5,000 x 2.3 = 11,500 -> 0.23 BTC; exchange leverage 3, margin 11,500 / 3 = 3,833.33
    d = Decision(1, leverage=2.3, size_frac=0.5, stop_atr=1.0, take_profit_atr=2.0)
    one = sizing.size_entry(side=1, equity_usdt=10_000.0, size_frac=0.5, leverage=2.3, price_usdt=50_000.0,
                            fee_rate=0.0005, rules=BTC_RULES)  # fmt: skip
    assert (one.quantity_base, one.notional_usdt, one.exchange_leverage) == (0.23, 11_500.0, 3)
    assert one.margin_usdt == 11_500.0 / 3
    at3 = sizing.size_entry(side=1, equity_usdt=10_000.0, size_frac=0.5, leverage=3.0, price_usdt=50_000.0,
                            fee_rate=0.0005, rules=BTC_RULES)  # fmt: skip
    assert at3.notional_usdt == 15_000.0  # sizing at the rounded leverage would have grown the position
    s = _open_btc(d, 50_000.0).state
    assert (s.qty_base, s.entry_price, s.leverage) == (0.23, 50_000.0, 2.3)
    assert s.margin_usdt == 11_500.0 / 3 and s.cash_usdt == 10_000.0 - 11_500.0 / 3 - 11_500.0 * 0.0005
    # Binance LP of the long with the margin the exchange takes (bracket 1: MMR 0.4 %, cum 0):
    # (Q EP - WB) / (Q (1 - MMR)) = (11,500 - 3,833.33) / (0.23 x 0.996) = 33,467.2 (the fractional 2.3's
    # margin 5,000 gave 28,374.4: the simulated liquidation was farther than the exchange's)
    assert s.liquidation_price == pytest.approx((11_500.0 - 11_500.0 / 3) / (0.23 * 0.996), rel=1e-12)
    assert s.liquidation_price == pytest.approx(33_467.2, abs=0.1)
    assert exchange_leverage(2.3, BTC.max_leverage) == 3 and exchange_leverage(3.0) == 3


def test_below_the_min_notional_and_the_min_quantity_no_trade_with_a_reason() -> None:
    # 10,000 x 0.009 x 1 = 90 USDT < 100: 0.0018 -> 0.001 BTC at 50,000 = 50 USDT
    one = sizing.size_entry(side=1, equity_usdt=10_000.0, size_frac=0.009, leverage=1.0, price_usdt=50_000.0,
                            fee_rate=0.0005, rules=BTC_RULES)  # fmt: skip
    assert not one.traded and one.quantity_base == 0.0 and one.margin_usdt == 0.0
    assert "min_notional" in one.skip_reason
    res = _open_btc(Decision(1, leverage=1.0, size_frac=0.009), 50_000.0)
    assert res.state.side == 0 and res.skipped_min_notional and res.state.cash_usdt == 10_000.0
    assert entry_quantity(10_000.0, 0.009, 1.0, 50_000.0, MarketRules.from_spec(BTC))[1] == one.skip_reason
    # min quantity above the step: 25 XRP minimum, 20 XRP asked
    xrp = sizing.SizingRules.from_spec(xrp_test_spec(min_qty_base=25.0))
    one = sizing.size_entry(side=-1, equity_usdt=1_000.0, size_frac=0.01, leverage=1.0, price_usdt=0.5,
                            fee_rate=0.0005, rules=xrp)  # fmt: skip
    assert not one.traded and "min_qty" in one.skip_reason
    # no equity: no trade, a reason, no error
    one = sizing.size_entry(side=1, equity_usdt=-5.0, size_frac=0.5, leverage=2.0, price_usdt=50_000.0,
                            fee_rate=0.0005, rules=BTC_RULES)  # fmt: skip
    assert not one.traded and "no margin budget" in one.skip_reason


def test_max_market_quantity_and_max_leverage_cap_the_entry() -> None:
    # 200,000 x 1.0 x 5 / 50,000 = 20 BTC asked, the max market quantity is 0.5
    spec = BTC.model_copy(update={"max_market_qty_base": 0.5})
    rules = sizing.SizingRules.from_spec(spec)
    one = sizing.size_entry(side=1, equity_usdt=200_000.0, size_frac=1.0, leverage=5.0, price_usdt=50_000.0,
                            fee_rate=0.0005, rules=rules)  # fmt: skip
    assert one.traded and one.quantity_base == 0.5 and one.margin_usdt == 0.5 * 50_000.0 / 5
    costs = NO_SLIP.with_instrument(spec)
    s = _open_btc(Decision(1, leverage=5.0, size_frac=1.0), 50_000.0, 200_000.0, costs).state
    assert (s.qty_base, s.margin_usdt) == (0.5, one.margin_usdt)
    plan = plan_bar(symbol="BTCUSDT", bar_open_time=T0, position=ExchangePosition(), protection=OpenProtection(),
                    decision=Decision(1, leverage=5.0, size_frac=1.0), price_usdt=50_000.0, equity_usdt=200_000.0,
                    rules=MarketRules.from_spec(spec))  # fmt: skip
    assert plan.orders[0].qty_base == 0.5
    # leverage 200 on a max-75 instrument: sized and set at 75
    xrp = sizing.SizingRules.from_spec(xrp_test_spec())
    one = sizing.size_entry(side=1, equity_usdt=100.0, size_frac=0.5, leverage=200.0, price_usdt=0.5,
                            fee_rate=0.0, rules=xrp)  # fmt: skip
    assert (one.leverage, one.exchange_leverage, one.quantity_base) == (75.0, 75, 7_500.0)
    assert exchange_leverage(200.0, 75) == 75


def test_tick_rule_of_the_protective_prices_is_the_nearest_tick() -> None:
    # 50,000.05 - 1 x 123.456 = 49,876.594 -> 49,876.6; + 2 x 123.456 = 50,246.962 -> 50,247.0 (tick 0.1)
    assert sizing.protective_prices(1, 50_000.05, 123.456, 1.0, 2.0, 0.1) == (49_876.6, 50_247.0)
    assert sizing.protective_prices(-1, 50_000.05, 123.456, 1.0, 2.0, 0.1) == (50_123.5, 49_753.1)


@pytest.mark.parametrize("field", ["equity_usdt", "size_frac", "leverage", "price_usdt", "fee_rate", "atr_usdt",
                                   "stop_atr", "take_profit_atr"])  # fmt: skip
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_an_error_never_a_trade(field: str, bad: float) -> None:
    kwargs = {"side": 1, "equity_usdt": 10_000.0, "size_frac": 0.5, "leverage": 2.0, "price_usdt": 50_000.0,
              "fee_rate": 0.0005, "rules": BTC_RULES, "atr_usdt": 500.0, "stop_atr": 1.0, "take_profit_atr": 2.0}
    kwargs[field] = bad
    with pytest.raises(sizing.SizingError, match=field):
        sizing.size_entry(**kwargs)


def test_non_finite_input_to_the_compiled_core_gives_no_trade() -> None:
    tick, step = BTC.tick_size_usdt, BTC.lot_step_base
    args = [10_000.0, 0.5, 2.0, 50_000.0, 0.0005, 500.0, 1.0, 2.0, 1, tick, step, BTC.min_qty_base, 120.0,
            BTC.min_notional_usdt, 125.0, sizing.decimals_pow10(tick), sizing.decimals_pow10(step)]
    assert sizing.size_position(*args)[0] == sizing.SIZE_OK
    for i in range(8):  # equity, size_frac, leverage, price, fee, atr, stop_atr, take_profit_atr
        bad = list(args)
        bad[i] = math.nan
        code, qty, notional, margin = sizing.size_position(*bad)[:4]
        assert code == sizing.SIZE_BAD_INPUT and qty == notional == margin == 0.0
    # the kernel's entry points refuse it before any change (the account is unchanged)
    d = Decision(1, leverage=2.0, size_frac=0.5)
    object.__setattr__(d, "leverage", math.nan)  # bypass the constructor's own check
    with pytest.raises(NonFiniteDecisionError, match="leverage"):
        _open_btc(d, 50_000.0)
    with pytest.raises(IntentError, match="leverage"):
        exchange_leverage(math.nan)
    with pytest.raises(IntentError, match="equity_usdt"):
        entry_quantity(math.inf, 0.5, 2.0, 50_000.0, MarketRules.from_spec(BTC))


def test_bad_rules_are_refused() -> None:
    with pytest.raises(sizing.SizingError, match="step_size_base"):
        dataclasses.replace(BTC_RULES, step_size_base=math.nan)
    with pytest.raises(sizing.SizingError, match="max_leverage"):
        dataclasses.replace(BTC_RULES, max_leverage=0)
    with pytest.raises(IntentError, match="max_qty_base"):
        MarketRules("BTCUSDT", 0.1, 0.001, 0.001, 100.0, max_qty_base=0.0)
