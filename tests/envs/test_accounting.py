"""Hand-computed scenarios for the one accounting module (``envs.accounting``).

The pure formula helpers (maintenance bracket, liquidation price, slippage fraction) are not in the product:
the compiled kernel computes them inline; their hand-checkable versions are the reference copies in
``tests/envs/reference_accounting.py``, and the bracket-at-LP rule is checked on the kernel too.
"""

from __future__ import annotations

import math

import pytest

from envs import kernel as K
from envs.accounting import AccountState, cost_params, is_funding_time, step_bar
from envs.config import CostConfig
from market.decision import Decision, NonFiniteDecisionError
from tests.envs.helpers import HOUR_NS, T0_NS, bar
from tests.envs.reference_accounting import (
    liquidation_price,
    maintenance_bracket,
    position_liquidation_price,
    slippage_frac,
)

DEFAULT = CostConfig()
NO_COSTS = CostConfig(cost_multiplier=0.0)
FIXED_SLIP = CostConfig(slippage_atr_coef=0.0)  # slip = 1 bp, fee = 5 bp


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-12, abs=1e-9)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def test_liquidation_price_worked_example_long_20x() -> None:
    # Long 1 BTC at 10,000 USDT with 20x: WB = 10,000 / 20 = 500, MMR 0.4 %, cum 0.
    # LP = (WB + cum - s Q EP) / (Q MMR - s Q) = (500 + 0 - 10000) / (0.004 - 1) = 9500 / 0.996
    expected = 9500.0 / 0.996
    assert expected == pytest.approx(9538.152610441767, rel=1e-15)
    assert liquidation_price(1, 1.0, 10_000.0, 500.0, 0.004, 0.0) == approx(expected)


def test_liquidation_price_short_and_cum() -> None:
    # Short 2 BTC at 20,000 with WB 8,000, MMR 0.5 %, cum 50:
    # LP = (Q EP + WB + cum) / (Q (1 + MMR)) = (40000 + 8000 + 50) / (2 * 1.005) = 48050 / 2.01
    assert liquidation_price(-1, 2.0, 20_000.0, 8_000.0, 0.005, 50.0) == approx(48_050.0 / 2.01)


def test_liquidation_price_uses_the_bracket_of_the_notional_at_the_liquidation_price() -> None:
    # Short 5 BTC at 9,900 (notional 49,500: bracket 1, MMR 0.4 %, cum 0) with WB 4,950 (10x):
    # LP with the entry bracket = (49500 + 4950) / (5 * 1.004) = 10846.61..., where the notional
    # 5 * 10846.6 = 54,233 is in bracket 2 (MMR 0.5 %, cum 50): Binance recomputes with it,
    # LP = (49500 + 4950 + 50) / (5 * 1.005) = 54500 / 5.025.
    p = cost_params(DEFAULT)

    def kernel_lp(side: int, qty: float, entry: float, wallet: float) -> float:  # what the product computes
        return K.position_liq_price(side, qty, entry, wallet, K._bracket_row(qty * entry, p), p)

    assert liquidation_price(-1, 5.0, 9_900.0, 4_950.0, 0.004, 0.0) == approx(54_450.0 / 5.02)
    for lp in (position_liquidation_price, lambda *a: kernel_lp(*a[:4])):
        assert lp(-1, 5.0, 9_900.0, 4_950.0, DEFAULT) == approx(54_500.0 / 5.025)
        # A long's LP notional is lower: 5.05 BTC at 9,990 (50,449.5, bracket 2) at 10x, WB 5,044.95:
        # LP(bracket 2) = (50449.5 - 5044.95 - 50) / (5.05 * 0.995) -> notional ~45,355 is in bracket 1,
        # so LP = (50449.5 - 5044.95) / (5.05 * 0.996).
        assert lp(1, 5.05, 9_990.0, 5_044.95, DEFAULT) == approx((50_449.5 - 5_044.95) / (5.05 * 0.996))
        # Within one bracket nothing changes (the 20x example above).
        assert lp(1, 1.0, 10_000.0, 500.0, DEFAULT) == approx(9500.0 / 0.996)


def test_liquidation_price_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="side"):
        liquidation_price(0, 1.0, 10_000.0, 500.0, 0.004, 0.0)
    with pytest.raises(ValueError, match="wallet_usdt"):
        liquidation_price(1, 1.0, 10_000.0, math.nan, 0.004, 0.0)


def test_maintenance_bracket_first_cap_at_or_above_notional() -> None:
    assert maintenance_bracket(50_000.0, DEFAULT) == (0.004, 0.0)
    assert maintenance_bracket(50_000.01, DEFAULT) == (0.005, 50.0)
    assert maintenance_bracket(12_000_000.0, DEFAULT) == (0.01, 11_450.0)
    with pytest.raises(ValueError, match="exceeds the largest"):
        maintenance_bracket(70_000_001.0, DEFAULT)


def test_slippage_frac_fixed_plus_atr_part() -> None:
    # 1 bp + 0.05 * 200 / 10000 = 0.0001 + 0.001 = 0.0011; doubled by cost_multiplier 2
    assert slippage_frac(200.0, 10_000.0, DEFAULT) == approx(0.0011)
    assert slippage_frac(200.0, 10_000.0, CostConfig(cost_multiplier=2.0)) == approx(0.0022)
    with pytest.raises(ValueError, match="atr_at_decision"):
        slippage_frac(math.nan, 10_000.0, DEFAULT)


def test_is_funding_time_every_8_hours() -> None:
    assert [is_funding_time(T0_NS + h * HOUR_NS, 8) for h in (0, 1, 7, 8, 16, 24)] == [
        True, False, False, True, True, True
    ]  # fmt: skip
    assert not is_funding_time(T0_NS + 60 * 1_000_000_000, 8)  # 00:01


# ------------------------------------------------------------------------------------------------
# Scenarios
# ------------------------------------------------------------------------------------------------


def test_long_entry_then_exit_on_signal_exact_equity_fees_once() -> None:
    s0 = AccountState.initial(10_000.0)
    # Bar 1 (01:00) fills a long decided at the close of bar 0 with ATR 200:
    # slip = 1e-4 + 0.05 * 200 / 10000 = 0.0011 -> fill = 10000 * 1.0011 = 10011.0 (on the tick)
    # margin budget = 0.5 * 10000 = 5000 (< 10000 / (1 + 2 * 0.0005)); notional budget 10000 at 2x
    # qty = floor(10000 / 10011 / 0.001) * 0.001 = 0.998; notional = 0.998 * 10011 = 9990.978
    # margin = 9990.978 / 2 = 4995.489; fee = 9990.978 * 0.0005 = 4.995489
    # slippage = 0.998 * 11 = 10.978; cash = 10000 - 4995.489 - 4.995489 = 4999.515511
    r1 = step_bar(
        s0, Decision(1, leverage=2.0, size_frac=0.5), bar(1, 10_000, 10_100, 9_950, 10_050), 200.0, DEFAULT
    )
    s1 = r1.state
    assert (s1.side, s1.qty_base, s1.entry_price, s1.leverage) == (1, 0.998, 10_011.0, 2.0)
    assert s1.margin_usdt == approx(4_995.489)
    assert s1.cash_usdt == approx(4_999.515511)
    assert r1.fees_usdt == approx(4.995489)
    assert r1.slippage_usdt == approx(10.978)
    # stop = 10011 - 2 * 200 = 9611, take-profit = 10011 + 4 * 200 = 10811 (Decision defaults 2 / 4 ATR)
    assert (s1.stop_price, s1.take_profit_price) == (9_611.0, 10_811.0)
    # LP = (Q EP - WB - cum) / (Q (1 - MMR)) = (9990.978 - 4995.489) / (0.998 * 0.996)
    assert s1.liquidation_price == approx(4_995.489 / (0.998 * 0.996))
    # equity at the close 10050: cash + margin + qty * (10050 - 10011) = 4999.515511 + 4995.489 + 38.922
    # leverage enters once, through qty (0.998 BTC ~ 2 x equity / price)
    assert r1.equity_usdt == approx(10_033.926511)
    assert s1.bars_in_trade == 1 and s1.n_trades == 1 and s1.n_fills == 1

    # Bar 2 (02:00): flat decided at the close of bar 1 with ATR 200.
    # sell fill = 10100 * (1 - 1e-4) - 0.05 * 200 = 10100 - 1.01 - 10 = 10088.99 -> tick down 10088.9
    # notional = 0.998 * 10088.9 = 10068.7222; fee = 5.0343611
    # price PnL = 0.998 * (10088.9 - 10011) = 77.7442
    # cash = 4999.515511 + 4995.489 + 77.7442 - 5.0343611 = 10067.7143499
    r2 = step_bar(s1, Decision.flat(), bar(2, 10_100, 10_200, 10_000, 10_150), 200.0, DEFAULT)
    s2 = r2.state
    assert s2.side == 0 and s2.qty_base == 0.0 and s2.margin_usdt == 0.0
    assert [f.reason for f in r2.fills] == ["exit_signal"]
    assert r2.fills[0].price == 10_088.9 and r2.fills[0].side == -1
    assert r2.fees_usdt == approx(5.0343611)
    assert s2.cash_usdt == approx(10_067.7143499)
    assert r2.equity_usdt == approx(10_067.7143499)
    # fees charged once per fill: 4.995489 + 5.0343611
    assert s2.fees_paid_usdt == approx(10.0298501)
    assert s2.turnover_usdt == approx(9_990.978 + 10_068.7222)
    (trade,) = r2.closed_trades
    # net trade PnL = 77.7442 - 4.995489 - 5.0343611 = 67.7143499 = equity change
    assert trade.pnl_usdt == approx(67.7143499)
    assert trade.pnl_usdt == approx(r2.equity_usdt - 10_000.0)
    assert (trade.exit_reason, trade.bars_held, trade.entry_price, trade.exit_price) == (
        "exit_signal",
        1,
        10_011.0,
        10_088.9,
    )


def test_hold_when_direction_equals_side_and_none_keeps_everything() -> None:
    s1 = step_bar(AccountState.initial(10_000.0), Decision(1, 1.0, 0.5), bar(1, 10_000, 10_050, 9_990, 10_000), 100.0,
                  NO_COSTS).state  # fmt: skip
    for decision in (Decision(1, leverage=5.0, size_frac=1.0, stop_atr=0.1), None):
        r = step_bar(s1, decision, bar(2, 10_000, 10_050, 9_990, 10_020), 100.0, NO_COSTS)
        assert r.fills == () and r.state.qty_base == s1.qty_base and r.state.stop_price == s1.stop_price
        assert r.state.bars_in_trade == 2


def test_reversal_closes_then_opens_two_fees() -> None:
    # No slippage (coef 0, bps 0) to keep the numbers round; fee 5 bp.
    cfg = CostConfig(slippage_bps=0.0, slippage_atr_coef=0.0)
    s1 = step_bar(AccountState.initial(10_000.0), Decision(1, 1.0, 0.5), bar(1, 10_000, 10_050, 9_990, 10_000), 100.0,
                  cfg).state  # fmt: skip
    # long: margin 0.5 * 10000 = 5000 -> qty floor(5000 / 10000 / 0.001) * 0.001 = 0.5, fee 2.5
    assert s1.qty_base == 0.5 and s1.cash_usdt == approx(10_000 - 5_000 - 2.5)
    r = step_bar(s1, Decision(-1, 1.0, 0.5), bar(2, 10_200, 10_250, 10_150, 10_200), 100.0, cfg)
    # exit: cash = 4997.5 + 5000 + 0.5 * 200 - 0.5 * 10200 * 0.0005 = 10097.5 - 2.55 = 10094.95
    # entry short: margin = 0.5 * 10094.95 = 5047.475 -> qty = floor(5047.475 / 10200 / 0.001) * 0.001 = 0.494
    # notional 5038.8, fee 2.5194, cash = 10094.95 - 5038.8 - 2.5194 = 5053.6306
    assert [(f.reason, f.side) for f in r.fills] == [("exit_signal", -1), ("entry", -1)]
    assert r.fees_usdt == approx(2.55 + 2.5194)
    assert r.state.side == -1 and r.state.qty_base == 0.494
    assert r.state.cash_usdt == approx(5_053.6306)
    assert r.equity_usdt == approx(5_053.6306 + 5_038.8)


@pytest.mark.parametrize(
    ("direction", "rate", "expected_payment"),
    [
        (-1, 0.0001, -0.5),  # short receives a positive rate: -1 * 0.5 * 10000 * 0.0001
        (1, 0.0001, 0.5),  # long pays a positive rate
        (-1, -0.0002, 1.0),  # short pays a negative rate
    ],
)
def test_funding_sign_by_side(direction: int, rate: float, expected_payment: float) -> None:
    # Entry at 07:00 (no funding), 0.5 BTC at 10000, 1x, no costs: margin 5000, cash 5000.
    s1 = step_bar(AccountState.initial(10_000.0), Decision(direction, 1.0, 0.5), bar(7, 10_000, 10_050, 9_950, 10_000),
                  100.0, NO_COSTS).state  # fmt: skip
    assert s1.qty_base == 0.5 and s1.funding_paid_usdt == 0.0
    # 08:00 is a funding time: payment = side * qty * open * rate, taken from the isolated margin.
    r = step_bar(s1, None, bar(8, 10_000, 10_010, 9_890, 9_900, rate=rate), 100.0, NO_COSTS)
    assert r.funding_usdt == approx(expected_payment)
    assert r.state.margin_usdt == approx(5_000.0 - expected_payment)
    assert r.state.funding_paid_usdt == approx(expected_payment)
    # equity = 5000 + (5000 - payment) + side * 0.5 * (9900 - 10000)
    assert r.equity_usdt == approx(10_000.0 - expected_payment + direction * 0.5 * -100.0)
    # the liquidation price is recomputed from the new wallet balance
    assert r.state.liquidation_price == approx(liquidation_price(direction, 0.5, 10_000.0, 5_000.0 - expected_payment,
                                                                 0.004, 0.0))  # fmt: skip
    assert r.state.n_fallback_funding == 0


def test_short_with_funding_then_exit_trade_pnl_includes_funding() -> None:
    s1 = step_bar(AccountState.initial(10_000.0), Decision(-1, 1.0, 0.5), bar(7, 10_000, 10_050, 9_950, 10_000), 100.0,
                  NO_COSTS).state  # fmt: skip
    s2 = step_bar(s1, None, bar(8, 10_000, 10_010, 9_890, 9_900, rate=0.0001), 100.0, NO_COSTS).state
    r3 = step_bar(s2, Decision.flat(), bar(9, 9_900, 9_950, 9_850, 9_900), 100.0, NO_COSTS)
    (trade,) = r3.closed_trades
    # price PnL = -1 * 0.5 * (9900 - 10000) = 50; funding received 0.5 -> net 50.5
    assert trade.pnl_usdt == approx(50.5)
    assert r3.equity_usdt == approx(10_050.5)


def test_nan_funding_rate_uses_fallback_and_is_counted() -> None:
    s1 = step_bar(AccountState.initial(10_000.0), Decision(1, 1.0, 0.5), bar(15, 10_000, 10_050, 9_950, 10_000), 100.0,
                  NO_COSTS).state  # fmt: skip
    r = step_bar(s1, None, bar(16, 10_000, 10_010, 9_990, 10_000, rate=math.nan), 100.0, NO_COSTS)
    # fallback 0.0001: 0.5 * 10000 * 0.0001 = 0.5 paid by the long
    assert r.funding_usdt == approx(0.5)
    assert r.state.n_fallback_funding == 1
    # not a funding time: no payment, nothing counted
    r2 = step_bar(r.state, None, bar(17, 10_000, 10_010, 9_990, 10_000), 100.0, NO_COSTS)
    assert r2.funding_usdt == 0.0 and r2.state.n_fallback_funding == 1


def test_funding_not_charged_when_flat_going_into_settlement() -> None:
    r = step_bar(AccountState.initial(10_000.0), Decision(1, 1.0, 0.5), bar(8, 10_000, 10_050, 9_950, 10_000, 0.01),
                 100.0, NO_COSTS)  # fmt: skip
    assert r.funding_usdt == 0.0 and r.state.qty_base == 0.5


# Common entry for the exit scenarios: fee 5 bp, slip 1 bp (no ATR part), ATR 100, 1x, half the equity.
# buy fill = 10000 * 1.0001 = 10001.0; qty = floor(5000 / 10001 / 0.001) * 0.001 = 0.499
# notional = 4990.499 = margin; fee = 2.4952495; cash = 10000 - 4990.499 - 2.4952495 = 5007.0057505
# stop = 10001 - 2 * 100 = 9801.0; take-profit = 10001 + 4 * 100 = 10401.0; LP = 0 (1x long, never hit)
ENTRY_CASH = 5_007.0057505


def _long_entry() -> AccountState:
    r = step_bar(AccountState.initial(10_000.0), Decision(1, 1.0, 0.5, 2.0, 4.0), bar(1, 10_000, 10_100, 9_900, 10_050),
                 100.0, FIXED_SLIP)  # fmt: skip
    s = r.state
    assert (s.qty_base, s.entry_price, s.stop_price, s.take_profit_price) == (
        0.499,
        10_001.0,
        9_801.0,
        10_401.0,
    )
    assert s.cash_usdt == approx(ENTRY_CASH) and s.margin_usdt == approx(4_990.499)
    return s


def test_stop_hit_intrabar_fills_at_stop_less_slippage() -> None:
    s1 = _long_entry()
    r = step_bar(s1, None, bar(2, 10_000, 10_050, 9_700, 9_750), 100.0, FIXED_SLIP)
    # sell at 9801 * (1 - 1e-4) = 9800.0199 -> tick down 9800.0; slippage = 0.499 * 1.0
    # fee = 0.499 * 9800 * 0.0005 = 2.4451; price PnL = 0.499 * (9800 - 10001) = -100.299
    # cash = 5007.0057505 + 4990.499 - 100.299 - 2.4451 = 9894.7606505
    (fill,) = r.fills
    assert (fill.reason, fill.price, fill.side) == ("stop", 9_800.0, -1)
    assert fill.fee_usdt == approx(2.4451) and fill.slippage_usdt == approx(0.499)
    assert r.state.side == 0 and r.equity_usdt == approx(9_894.7606505)
    (trade,) = r.closed_trades
    # net = -100.299 - 2.4952495 - 2.4451 = -105.2393495
    assert trade.pnl_usdt == approx(-105.2393495) and trade.exit_reason == "stop" and trade.bars_held == 2


def test_take_profit_hit() -> None:
    s1 = _long_entry()
    r = step_bar(s1, None, bar(2, 10_100, 10_450, 10_050, 10_300), 100.0, FIXED_SLIP)
    # sell at 10401 * (1 - 1e-4) = 10399.9599 -> 10399.9; fee = 0.499 * 10399.9 * 0.0005 = 2.59477505
    # price PnL = 0.499 * 398.9 = 199.0511; cash = 5007.0057505 + 4990.499 + 199.0511 - 2.59477505
    (fill,) = r.fills
    assert (fill.reason, fill.price) == ("take_profit", 10_399.9)
    assert r.equity_usdt == approx(5_007.0057505 + 4_990.499 + 199.0511 - 2.59477505)
    assert r.closed_trades[0].pnl_usdt == approx(199.0511 - 2.4952495 - 2.59477505)


def test_gap_through_stop_fills_at_open() -> None:
    s1 = _long_entry()
    r = step_bar(s1, None, bar(2, 9_700, 9_750, 9_600, 9_650), 100.0, FIXED_SLIP)
    # open 9700 < stop 9801: sell at 9700 * (1 - 1e-4) = 9699.03 -> 9699.0; PnL = 0.499 * (9699 - 10001) = -150.698
    # fee = 0.499 * 9699 * 0.0005 = 2.4199005
    (fill,) = r.fills
    assert (fill.reason, fill.price) == ("stop", 9_699.0)
    assert fill.slippage_usdt == approx(0.499 * 1.0)
    assert r.equity_usdt == approx(ENTRY_CASH + 4_990.499 - 150.698 - 2.4199005)


def test_gap_through_take_profit_fills_at_open() -> None:
    s1 = _long_entry()
    r = step_bar(s1, None, bar(2, 10_500, 10_600, 10_450, 10_550), 100.0, FIXED_SLIP)
    # open 10500 > TP 10401: sell at 10500 * 0.9999 = 10498.95 -> 10498.9
    assert [(f.reason, f.price) for f in r.fills] == [("take_profit", 10_498.9)]


def test_open_gapping_through_take_profit_fills_there_even_if_the_bar_later_reaches_the_stop() -> None:
    # The open (10500) is already past the TP (10401): the take-profit order fills at the open, before
    # the bar trades down through the stop (9801). "Stop first" applies only to intrabar touches.
    s1 = _long_entry()
    r = step_bar(s1, None, bar(2, 10_500, 10_600, 9_700, 9_750), 100.0, FIXED_SLIP)
    assert [(f.reason, f.price) for f in r.fills] == [("take_profit", 10_498.9)]
    assert r.state.side == 0


def test_short_open_gapping_through_take_profit_fills_at_the_open() -> None:
    s1 = step_bar(AccountState.initial(10_000.0), Decision(-1, 1.0, 0.5, 2.0, 4.0), bar(1, 10_000, 10_100, 9_900, 10_000),
                  100.0, FIXED_SLIP).state  # fmt: skip
    tp = s1.take_profit_price  # 9999 - 400 = 9599.0
    assert tp == 9_599.0
    r = step_bar(s1, None, bar(2, 9_500, 10_400, 9_450, 10_300), 100.0, FIXED_SLIP)
    # buy back at 9500 * 1.0001 = 9500.95 -> tick up 9501.0, although the high (10400) passes the stop
    assert [(f.reason, f.price) for f in r.fills] == [("take_profit", 9_501.0)]


LIMIT_TP = CostConfig(slippage_atr_coef=0.0, take_profit_order="limit")  # maker 2 bp on the take-profit


def test_limit_take_profit_fills_at_the_level_with_maker_fee_and_no_slippage() -> None:
    s1 = step_bar(AccountState.initial(10_000.0), Decision(1, 1.0, 0.5, 2.0, 4.0), bar(1, 10_000, 10_100, 9_900, 10_050),
                  100.0, LIMIT_TP).state  # fmt: skip
    assert (s1.entry_price, s1.take_profit_price) == (10_001.0, 10_401.0)
    r = step_bar(s1, None, bar(2, 10_100, 10_450, 10_050, 10_420), 100.0, LIMIT_TP)
    (fill,) = r.fills
    assert (fill.reason, fill.price, fill.slippage_usdt) == ("take_profit", 10_401.0, 0.0)
    assert fill.fee_usdt == approx(0.499 * 10_401.0 * 0.0002)
    entry_fee = 0.499 * 10_001.0 * 0.0005
    assert r.closed_trades[0].pnl_usdt == approx(0.499 * 400.0 - entry_fee - 0.499 * 10_401.0 * 0.0002)


def test_limit_take_profit_gapped_through_fills_at_the_open() -> None:
    s1 = step_bar(AccountState.initial(10_000.0), Decision(1, 1.0, 0.5, 2.0, 4.0), bar(1, 10_000, 10_100, 9_900, 10_050),
                  100.0, LIMIT_TP).state  # fmt: skip
    r = step_bar(s1, None, bar(2, 10_500, 10_600, 10_450, 10_550), 100.0, LIMIT_TP)
    assert [(f.reason, f.price, f.fee_usdt) for f in r.fills] == [("take_profit", 10_500.0, approx(0.499 * 10_500 * 2e-4))]


def test_stop_and_take_profit_both_touched_stop_wins() -> None:
    s1 = _long_entry()
    r = step_bar(s1, None, bar(2, 10_000, 10_500, 9_700, 10_400), 100.0, FIXED_SLIP)
    assert [(f.reason, f.price) for f in r.fills] == [("stop", 9_800.0)]


def test_short_stop_hit_intrabar() -> None:
    # short 0.499 at 10000 * 0.9999 = 9999.0; stop = 9999 + 200 = 10199.0; buy back at 10199 * 1.0001 = 10200.0199
    # -> tick up 10200.1
    s1 = step_bar(AccountState.initial(10_000.0), Decision(-1, 1.0, 0.5), bar(1, 10_000, 10_100, 9_900, 10_000), 100.0,
                  FIXED_SLIP).state  # fmt: skip
    assert (s1.entry_price, s1.qty_base, s1.stop_price) == (9_999.0, 0.5, 10_199.0)
    r = step_bar(s1, None, bar(2, 10_000, 10_300, 9_950, 10_250), 100.0, FIXED_SLIP)
    assert [(f.reason, f.price, f.side) for f in r.fills] == [("stop", 10_200.1, 1)]
    assert r.closed_trades[0].pnl_usdt == approx(-0.5 * (10_200.1 - 9_999.0) - 0.5 * 9_999.0 * 0.0005
                                                 - 0.5 * 10_200.1 * 0.0005)  # fmt: skip


def _long_20x(cfg: CostConfig) -> AccountState:
    # cash 1000, size 0.5 -> margin 500, 20x -> notional 10000 -> 1 BTC at 10000 (no costs)
    r = step_bar(AccountState.initial(1_000.0), Decision(1, 20.0, 0.5, stop_atr=10.0, take_profit_atr=8.0),
                 bar(1, 10_000, 10_100, 9_900, 10_000), 100.0, cfg)  # fmt: skip
    return r.state


def test_liquidation_at_binance_price_margin_lost_clearance_fee() -> None:
    s1 = _long_20x(NO_COSTS)
    lp = 9_500.0 / 0.996  # worked example: 9538.1526...
    assert (s1.qty_base, s1.entry_price, s1.margin_usdt, s1.cash_usdt) == (1.0, 10_000.0, 500.0, 500.0)
    assert s1.liquidation_price == approx(lp)
    assert s1.stop_price == 9_000.0  # below LP: the liquidation price is met first
    r = step_bar(s1, None, bar(2, 9_900, 9_950, 9_500, 9_600), 100.0, NO_COSTS)
    assert r.liquidated
    (fill,) = r.fills
    assert (fill.reason, fill.fee_usdt) == ("liquidation", 0.0)
    assert fill.price == approx(lp)
    # clearance fee = WB + Q (LP - EP) = 500 + (9538.1526 - 10000) = Q LP MMR - cum = 38.1526...
    assert r.liquidation_fee_usdt == approx(500.0 + lp - 10_000.0)
    assert r.liquidation_fee_usdt == approx(lp * 0.004)
    assert r.state.liquidation_fees_usdt == approx(lp * 0.004)
    # the whole isolated margin is lost; cash unchanged
    assert r.state.cash_usdt == 500.0 and r.state.side == 0 and r.equity_usdt == 500.0
    assert r.closed_trades[0].pnl_usdt == -500.0 and r.closed_trades[0].exit_reason == "liquidation"


def test_liquidation_with_costs_pnl_is_margin_plus_entry_fee() -> None:
    s1 = _long_20x(DEFAULT)
    r = step_bar(s1, None, bar(2, 9_900, 9_950, 8_000, 8_500), 100.0, DEFAULT)
    assert r.liquidated and r.fees_usdt == 0.0
    assert r.equity_usdt == approx(s1.cash_usdt)
    assert r.closed_trades[0].pnl_usdt == approx(-s1.margin_usdt - s1.entry_fee_usdt)


def test_gap_through_liquidation_price_liquidates_at_open() -> None:
    s1 = _long_20x(NO_COSTS)
    r = step_bar(s1, None, bar(2, 9_000, 9_100, 8_900, 9_050), 100.0, NO_COSTS)
    assert r.liquidated and r.fills[0].price == 9_000.0
    # loss beyond the margin is not charged (isolated): clearance fee floored at 0, cash unchanged
    assert r.liquidation_fee_usdt == 0.0 and r.equity_usdt == 500.0


def test_order_below_min_notional_skipped_and_counted() -> None:
    s0 = AccountState.initial(150.0)
    # margin 0.5 * 150 = 75 at 1x -> qty 0.007 BTC at 10000 -> notional 70 < 100: skipped
    r = step_bar(s0, Decision(1, 1.0, 0.5), bar(1, 10_000, 10_100, 9_900, 10_050), 100.0, NO_COSTS)
    assert r.skipped_min_notional and r.fills == ()
    assert r.state.n_skipped_min_notional == 1 and r.state.side == 0 and r.state.cash_usdt == 150.0
    assert r.equity_usdt == 150.0


def test_margin_reduced_so_that_margin_plus_fee_fit_in_cash() -> None:
    # size 1.0 at 1x: margin + fee <= cash -> margin <= 10000 / 1.0005 = 9995.0025 -> qty 0.999 at 10000
    cfg = CostConfig(slippage_bps=0.0, slippage_atr_coef=0.0)
    r = step_bar(AccountState.initial(10_000.0), Decision(1, 1.0, 1.0), bar(1, 10_000, 10_000, 10_000, 10_000), 100.0,
                 cfg)  # fmt: skip
    assert r.state.qty_base == 0.999
    assert r.state.cash_usdt == approx(10_000.0 - 9_990.0 - 4.995)
    assert r.state.cash_usdt >= 0.0


def test_non_finite_decision_or_atr_raises_and_no_fill() -> None:
    s0 = AccountState.initial(10_000.0)
    b = bar(1, 10_000, 10_100, 9_900, 10_050)
    for atr in (math.nan, math.inf, 0.0, -1.0):
        with pytest.raises(ValueError, match="atr_at_decision"):
            step_bar(s0, Decision(1, 1.0, 0.5), b, atr, DEFAULT)
    bad = Decision(1, 1.0, 0.5)
    object.__setattr__(bad, "leverage", math.nan)  # bypass the constructor's own check
    with pytest.raises(NonFiniteDecisionError, match="leverage"):
        step_bar(s0, bad, b, 100.0, DEFAULT)
    # holding a position: a NaN ATR could price a stop fill -> refused as well, state untouched
    s1 = step_bar(s0, Decision(1, 1.0, 0.5), b, 100.0, DEFAULT).state
    snapshot = AccountState(*[getattr(s1, name) for name in s1.__slots__])
    with pytest.raises(ValueError, match="atr_at_decision"):
        step_bar(s1, None, bar(2, 10_000, 10_100, 9_000, 10_050), math.nan, DEFAULT)
    assert s1 == snapshot
    # a flat account with no decision needs no ATR
    assert step_bar(s0, None, b, math.nan, DEFAULT).state == s0


def test_non_finite_bar_raises_naming_field() -> None:
    with pytest.raises(ValueError, match="close"):
        step_bar(
            AccountState.initial(10_000.0), None, bar(1, 10_000, 10_100, 9_900, math.nan), 100.0, DEFAULT
        )
    with pytest.raises(ValueError, match="OHLC"):
        step_bar(AccountState.initial(10_000.0), None, bar(1, 10_000, 9_900, 9_800, 9_850), 100.0, DEFAULT)


def test_initial_state_and_position_view() -> None:
    with pytest.raises(ValueError):
        AccountState.initial(math.nan)
    s = _long_entry()
    view = s.position_view()
    assert (view.side, view.quantity_base, view.entry_price, view.stop_price) == (1, 0.499, 10_001.0, 9_801.0)
    assert s.equity(10_101.0) == approx(s.cash_usdt + s.margin_usdt + 0.499 * 100.0)


def test_open_beyond_liquidation_price_liquidates_before_exit_signal() -> None:
    s1 = _long_20x(NO_COSTS)
    # the flat decision would sell at the open 9000, below LP 9538.15: the liquidation comes first
    r = step_bar(s1, Decision.flat(), bar(2, 9_000, 9_100, 8_900, 9_050), 100.0, NO_COSTS)
    assert [f.reason for f in r.fills] == ["liquidation"]
    assert r.equity_usdt == 500.0 and r.state.cash_usdt == 500.0
