"""Hand-computed scenarios for ``Decision.new_stop_price`` in the execution layer (issue 8).

Every case runs :func:`envs.accounting.step_bar` (the compiled kernel behind the env, the backtest and
the paper broker). Costs: ``FIXED_SLIP`` = 1 bp slippage, 5 bp taker fee, tick 0.1, lot 0.001.

Long set-up (bar 1, decision long 2x, margin 50 % of 10,000 USDT, ATR 200): fill
``10000 * 1.0001 = 10001.0``; qty ``floor(10000 / 10001 / 0.001) * 0.001 = 0.999``; stop
``10001 - 2 * 200 = 9601``; take-profit ``10001 + 4 * 200 = 10801``.
Short set-up: fill ``10000 * 0.9999 = 9999.0``; qty ``floor(10000 / 9999 / 0.001) * 0.001 = 1.0``;
stop ``9999 + 400 = 10399``; take-profit ``9999 - 800 = 9199``.
"""

from __future__ import annotations

import pytest

from envs.accounting import AccountState, BarResult, step_bar
from envs.config import CostConfig
from market.decision import Decision
from tests.envs.helpers import bar

FIXED_SLIP = CostConfig(slippage_atr_coef=0.0)
ATR = 200.0


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-12, abs=1e-9)


def _open(side: int) -> AccountState:
    res = step_bar(AccountState.initial(10_000.0), Decision(side, leverage=2.0, size_frac=0.5),
                   bar(1, 10_000, 10_050, 9_950, 10_000), ATR, FIXED_SLIP)  # fmt: skip
    s = res.state
    if side > 0:
        assert (s.side, s.entry_price, s.qty_base, s.stop_price, s.take_profit_price) == (1, 10_001.0, 0.999, 9_601.0,
                                                                                          10_801.0)
    else:
        assert (s.side, s.entry_price, s.qty_base, s.stop_price, s.take_profit_price) == (-1, 9_999.0, 1.0, 10_399.0,
                                                                                          9_199.0)
    return s


def _hold(state: AccountState, new_stop: float, o: float, h: float, lo: float, c: float) -> BarResult:
    return step_bar(state, Decision(state.side, new_stop_price=new_stop), bar(2, o, h, lo, c), ATR, FIXED_SLIP)


# -- the stop moves only when it tightens, tick-rounded away from the market ----------------------


def test_long_tighter_stop_moves_rounded_down() -> None:
    s1 = _open(1)
    res = _hold(s1, 9_800.37, 10_100, 10_200, 9_900, 10_150)  # low 9900 > 9800.3: not hit
    assert res.state.stop_price == 9_800.3  # 9800.37 rounded down to the 0.1 tick
    assert res.fills == () and res.state.side == 1 and res.state.take_profit_price == 10_801.0


def test_short_tighter_stop_moves_rounded_up() -> None:
    s1 = _open(-1)
    res = _hold(s1, 10_200.33, 9_900, 10_100, 9_850, 9_880)  # high 10100 < 10200.4: not hit
    assert res.state.stop_price == 10_200.4  # rounded up
    assert res.fills == () and res.state.side == -1


@pytest.mark.parametrize(("side", "looser"), [(1, 9_500.0), (1, 9_601.04), (-1, 10_500.0), (-1, 10_398.96)])
def test_looser_or_equal_stop_is_ignored(side: int, looser: float) -> None:
    # 9601.04 rounds down to 9601.0 and 10398.96 up to 10399.0: equal to the stop, not tighter
    s1 = _open(side)
    res = _hold(s1, looser, 10_000, 10_050, 9_950, 10_000)
    assert res.state.stop_price == s1.stop_price and res.fills == ()


def test_new_stop_is_ignored_on_a_side_change() -> None:
    s1 = _open(1)
    # flip to short asking for a stop: the long closes at the open, the short gets its ATR stop
    # short fill = 10000 * 0.9999 = 9999.0 -> stop 9999 + 2 * 200 = 10399, whatever new_stop_price says
    res = step_bar(s1, Decision(-1, leverage=2.0, size_frac=0.5, new_stop_price=9_999.5),
                   bar(2, 10_000, 10_050, 9_950, 10_000), ATR, FIXED_SLIP)  # fmt: skip
    assert [f.reason for f in res.fills] == ["exit_signal", "entry"]
    assert res.state.side == -1 and res.state.stop_price == 10_399.0


def test_new_stop_is_ignored_when_flat() -> None:
    # from flat a long with new_stop_price is an entry: the stop is the ATR stop (9601), not 9990
    res = step_bar(AccountState.initial(10_000.0), Decision(1, leverage=2.0, size_frac=0.5, new_stop_price=9_990.0),
                   bar(1, 10_000, 10_050, 9_950, 10_000), ATR, FIXED_SLIP)  # fmt: skip
    assert res.state.stop_price == 9_601.0
    # flat and holding flat (None): nothing to move, nothing happens
    assert step_bar(AccountState.initial(10_000.0), None, bar(1, 10_000, 10_050, 9_950, 10_000), ATR,
                    FIXED_SLIP).state.stop_price is None  # fmt: skip


# -- fills at the moved stop -----------------------------------------------------------------------


def test_long_moved_stop_is_hit_intrabar_at_its_price() -> None:
    s1 = _open(1)
    # stop moved to 9900; the bar trades down to 9850: stop fill at 9900 * (1 - 1e-4) = 9899.01 -> 9899.0
    res = _hold(s1, 9_900.0, 10_000, 10_050, 9_850, 9_870)
    assert [(f.reason, f.side, f.price) for f in res.fills] == [("stop", -1, 9_899.0)]
    # net PnL = 0.999 * (9899 - 10001) - entry fee - exit fee
    entry_fee = 0.999 * 10_001.0 * 0.0005
    exit_fee = 0.999 * 9_899.0 * 0.0005
    assert res.closed_trades[0].pnl_usdt == approx(0.999 * (9_899.0 - 10_001.0) - entry_fee - exit_fee)
    assert res.state.side == 0
    # without the move the original stop 9601 was not reached (low 9850): the position stays open
    assert step_bar(s1, Decision(1), bar(2, 10_000, 10_050, 9_850, 9_870), ATR, FIXED_SLIP).state.side == 1


def test_long_gap_through_new_stop_fills_at_the_open() -> None:
    s1 = _open(1)
    # new stop 10120 above the open 10100: filled at the open, 10100 * (1 - 1e-4) = 10098.99 -> 10098.9
    res = _hold(s1, 10_120.0, 10_100, 10_200, 10_050, 10_150)
    assert [(f.reason, f.price) for f in res.fills] == [("stop", 10_098.9)]
    assert res.fills[0].slippage_usdt == approx(0.999 * (10_100.0 - 10_098.9))


def test_short_moved_stop_hit_and_gap_mirror() -> None:
    s1 = _open(-1)
    # intrabar: stop 10100 reached by the high 10150: buy at 10100 * 1.0001 = 10101.01 -> tick up 10101.1
    res = _hold(s1, 10_100.0, 10_000, 10_150, 9_950, 10_120)
    assert [(f.reason, f.side, f.price) for f in res.fills] == [("stop", 1, 10_101.1)]
    # gap: new stop 9900 below the open 9920: bought at the open, 9920 * 1.0001 = 9920.992 -> 9921.0
    res = _hold(s1, 9_900.0, 9_920, 9_990, 9_850, 9_950)
    assert [(f.reason, f.price) for f in res.fills] == [("stop", 9_921.0)]


def test_liquidation_at_the_open_comes_before_the_stop_move() -> None:
    s0 = AccountState.initial(10_000.0)
    s1 = step_bar(s0, Decision(1, leverage=50.0, size_frac=0.5), bar(1, 10_000, 10_050, 9_950, 10_000), ATR,
                  FIXED_SLIP).state  # fmt: skip
    lp = s1.liquidation_price
    assert lp is not None and lp > 9_601.0  # 50x: liquidated long before the ATR stop
    o = round(lp - 30.0, 1)
    # the requested stop (above the open) would fill at the open, but the open is past the
    # liquidation price: the liquidation engine acts first and the stop request is moot
    res = _hold(s1, lp + 10.0, o, o + 5.0, o - 20.0, o)
    assert [(f.reason, f.price) for f in res.fills] == [("liquidation", o)]
    assert res.liquidated and res.state.side == 0


def test_moved_stop_survives_into_the_next_bars() -> None:
    s1 = _open(1)
    s2 = _hold(s1, 9_900.0, 10_100, 10_200, 9_950, 10_150).state
    # hold without a request: the moved stop stays and fills at the next bar that reaches it
    res = step_bar(s2, Decision(1), bar(3, 10_000, 10_010, 9_880, 9_890), ATR, FIXED_SLIP)
    assert [(f.reason, f.price) for f in res.fills] == [("stop", 9_899.0)]
    assert res.closed_trades[0].bars_held == 3
