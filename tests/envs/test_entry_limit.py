"""Maker-priced entries (issue 16 lever, ``CostConfig.entry_order = "limit"``): a limit order at the fill bar's open
(less ``entry_limit_offset_bps``), filled at its price with the maker fee and no slippage only when the bar trades
*through* it; otherwise no trade and a counted missed entry. Through every entry point: ``step_bar`` (backtests'
bar step, the paper broker), ``TradingEnv.step_decision`` / ``step`` and the batched env. The default
(``"market"``) keeps the kernel bit for bit: ``test_kernel_equivalence.py`` runs unchanged.

Hand-computed numbers: equity 10,000 USDT, the bundled BTCUSDT rules (tick 0.1, step 0.001), maker 2 bps, taker
5 bps, slippage 1 bps + 0.05 x ATR / open, ATR 100.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from envs import kernel as K
from envs.accounting import AccountState, Bar, cost_params, step_bar
from envs.actions import ActionConfig
from envs.config import CostConfig
from envs.sizing import SizingRules, size_entry
from envs.trading_env import EnvConfig, EnvData, TradingEnv
from envs.vector_env import BatchedTradingEnv
from market.decision import Decision, DecisionContext, StatelessPolicy
from market.instruments import bundled_spec
from serving.intents import OrderIntent
from serving.paper import PaperBroker
from tests.envs.helpers import HOUR_NS, T0_NS, bar, make_env_data
from tests.envs.test_kernel_equivalence import _random_bars, _random_decision
from tests.kit.candles import make_candles
from training.backtest import run_backtest
from training.exits import exit_summary, exits_table

LIMIT = CostConfig(entry_order="limit")
MARKET = CostConfig()
LONG = Decision(1, leverage=2.0, size_frac=0.5, stop_atr=1.0, take_profit_atr=8.0)
SHORT = Decision(-1, leverage=2.0, size_frac=0.5, stop_atr=1.0, take_profit_atr=8.0)
ATR = 100.0
FLAT = AccountState.initial(10_000.0)
RULES = SizingRules.from_spec(MARKET.instrument)


def _env(rows: list[tuple[float, float, float, float]], costs: CostConfig = LIMIT) -> TradingEnv:
    """A full-info env over 1h bars ``(open, high, low, close)`` from 2024-01-01 00:00 UTC, ATR 100, no funding."""
    o, h, lo, c = (np.array(col, dtype=np.float64) for col in zip(*rows, strict=True))
    n = len(rows)
    data = EnvData(
        open_time_ns=T0_NS + HOUR_NS * np.arange(n), open=o, high=h, low=lo, close=c, atr=np.full(n, ATR),
        funding_rate=np.full(n, np.nan), is_funding_time=np.zeros(n, bool), market_obs=np.zeros((n, 1), np.float32),
        market_obs_names=("x",),
    )  # fmt: skip
    cfg = EnvConfig(episode_len_bars=None, random_start=False, min_equity_frac=0.0, max_drawdown_frac=1.0,
                    info_level="full", costs=costs)  # fmt: skip
    env = TradingEnv(data, cfg)
    env.reset(options={"start_index": 0, "end_index": n - 1})
    return env


# ---------------------------------------------------------------------------------------------
# Config and defaults
# ---------------------------------------------------------------------------------------------


def test_default_is_the_market_entry_and_the_offset_needs_a_limit_entry() -> None:
    p = cost_params(MARKET)
    assert MARKET.entry_order == "market" and p[K.P_ENTRY_LIMIT] == 0.0 and p[K.P_ENTRY_OFFSET] == 0.0
    q = cost_params(CostConfig(entry_order="limit", entry_limit_offset_bps=25.0))
    assert q[K.P_ENTRY_LIMIT] == 1.0 and q[K.P_ENTRY_OFFSET] == 0.0025
    with pytest.raises(ValueError, match=r"entry_limit_offset_bps=25\.0 is set but entry_order is 'market'"):
        CostConfig(entry_limit_offset_bps=25.0)
    with pytest.raises(ValueError):
        CostConfig(entry_order="limit", entry_limit_offset_bps=-1.0)
    with pytest.raises(ValueError):
        CostConfig(entry_order="post_only")  # type: ignore[arg-type]
    env = _env([(10_000.0, 10_050.0, 9_990.0, 10_020.0)] * 3, MARKET)  # market: the info keys of before
    *_, info = env.step_decision(LONG)
    assert "missed_entry" not in info and "n_missed_entries" not in info


# ---------------------------------------------------------------------------------------------
# Fills: through, touch, short, flip, sizing
# ---------------------------------------------------------------------------------------------


def test_a_long_limit_fills_at_the_open_with_the_maker_fee_when_the_low_trades_through() -> None:
    r = step_bar(FLAT, LONG, bar(1, 10_000.0, 10_050.0, 9_990.0, 10_020.0), ATR, LIMIT)
    (fill,) = r.fills
    # budget min(0.5 x 10,000, 10,000 / (1 + 2 x 0.0002)) = 5,000 -> notional 10,000 -> 1.0 BTC at 10,000
    assert (fill.reason, fill.side, fill.qty_base, fill.price) == ("entry", 1, 1.0, 10_000.0)
    assert fill.fee_usdt == pytest.approx(2.0, abs=1e-12) and fill.slippage_usdt == 0.0  # 10,000 x 0.0002
    s = r.state
    assert (s.side, s.entry_price, s.margin_usdt, s.stop_price, s.take_profit_price) == (1, 10_000.0, 5_000.0,
                                                                                         9_900.0, 10_800.0)
    assert s.cash_usdt == pytest.approx(4_998.0) and r.slippage_usdt == 0.0
    assert r.equity_usdt == pytest.approx(10_018.0)  # 4,998 + 5,000 + (10,020 - 10,000)
    market = step_bar(FLAT, LONG, bar(1, 10_000.0, 10_050.0, 9_990.0, 10_020.0), ATR, MARKET)
    # the market entry pays taker and slippage: 10,000 x (1 + 0.0001 + 0.05 x 100 / 10,000) = 10,006
    assert (market.fills[0].price, market.fills[0].qty_base) == (10_006.0, 0.999)


def test_a_bar_that_only_touches_the_limit_fills_nothing_and_counts_a_missed_entry() -> None:
    r = step_bar(FLAT, LONG, bar(1, 10_000.0, 10_050.0, 10_000.0, 10_020.0), ATR, LIMIT)  # low == limit
    assert r.fills == () and r.state == FLAT and r.equity_usdt == 10_000.0 and r.fees_usdt == 0.0
    assert not r.skipped_min_notional  # a missed entry is not a skip
    env = _env([(10_000.0, 10_050.0, 9_990.0, 10_020.0), (10_000.0, 10_050.0, 10_000.0, 10_020.0),
                (10_020.0, 10_060.0, 10_010.0, 10_030.0), (10_030.0, 10_040.0, 10_020.0, 10_030.0)])  # fmt: skip
    *_, info = env.step_decision(LONG)  # bar 1 only touches 10,000
    assert info["fills"] == () and info["missed_entry"] and info["n_missed_entries"] == 1
    assert env.account_state.side == 0 and info["fees_usdt"] == 0.0 and not info["skipped_min_notional"]
    *_, info = env.step_decision(LONG)  # bar 2's low 10,010 < 10,020: filled
    assert [(f.reason, f.price) for f in info["fills"]] == [("entry", 10_020.0)]
    assert not info["missed_entry"] and info["n_missed_entries"] == 1
    *_, info = env.step_decision(None)  # the episode's last bar: totals of the lean info too
    assert info["n_missed_entries"] == 1 and info["n_trades"] == 1


def test_a_short_limit_fills_when_the_high_trades_through_and_not_on_a_touch() -> None:
    r = step_bar(FLAT, SHORT, bar(1, 10_000.0, 10_010.0, 9_950.0, 9_980.0), ATR, LIMIT)
    (fill,) = r.fills
    assert (fill.reason, fill.side, fill.qty_base, fill.price, fill.slippage_usdt) == ("entry", -1, 1.0, 10_000.0,
                                                                                       0.0)
    assert fill.fee_usdt == pytest.approx(2.0, abs=1e-12)
    assert (r.state.stop_price, r.state.take_profit_price) == (10_100.0, 9_200.0)
    assert r.equity_usdt == pytest.approx(10_018.0)  # 4,998 + 5,000 - (9,980 - 10,000)
    touch = step_bar(FLAT, SHORT, bar(1, 10_000.0, 10_000.0, 9_950.0, 9_980.0), ATR, LIMIT)  # high == limit
    assert touch.fills == () and touch.state == FLAT


def test_a_flip_closes_at_market_and_opens_the_new_side_with_the_limit() -> None:
    long = step_bar(FLAT, LONG, bar(1, 10_000.0, 10_050.0, 9_990.0, 10_000.0), ATR, LIMIT).state
    through = bar(2, 10_000.0, 10_040.0, 9_990.0, 10_010.0)
    r = step_bar(long, SHORT, through, ATR, LIMIT)
    out, entry = r.fills
    slip = 0.0001 + 0.05 * ATR / 10_000.0
    assert (out.reason, out.side, out.price) == ("exit_signal", -1, 9_994.0)  # 10,000 x (1 - 0.0006), taker
    assert out.fee_usdt == pytest.approx(1.0 * 9_994.0 * 0.0005) and out.slippage_usdt == pytest.approx(10_000 * slip)
    cash = long.cash_usdt + long.margin_usdt + (9_994.0 - 10_000.0) - out.fee_usdt
    want = size_entry(side=-1, equity_usdt=cash, size_frac=0.5, leverage=2.0, price_usdt=10_000.0, fee_rate=0.0002,
                      rules=RULES)  # the one sizing rule at the limit price, maker fee rate  # fmt: skip
    assert (entry.reason, entry.side, entry.price, entry.slippage_usdt) == ("entry", -1, 10_000.0, 0.0)
    assert entry.qty_base == want.quantity_base and r.state.margin_usdt == want.margin_usdt
    assert entry.fee_usdt == pytest.approx(want.quantity_base * 10_000.0 * 0.0002)
    no_through = step_bar(long, SHORT, bar(2, 10_000.0, 10_000.0, 9_950.0, 9_980.0), ATR, LIMIT)  # high == open
    assert [f.reason for f in no_through.fills] == ["exit_signal"] and no_through.state.side == 0  # closed, flat
    assert no_through.state.cash_usdt == pytest.approx(cash)


def test_limit_offset_sizes_at_the_limit_price_rounded_away_from_the_market() -> None:
    costs = CostConfig(entry_order="limit", entry_limit_offset_bps=50.0)
    r = step_bar(FLAT, LONG, bar(1, 10_000.0, 10_050.0, 9_900.0, 10_000.0), ATR, costs)  # limit 9,950
    (fill,) = r.fills
    want = size_entry(side=1, equity_usdt=10_000.0, size_frac=0.5, leverage=2.0, price_usdt=9_950.0, fee_rate=0.0002,
                      rules=RULES, atr_usdt=ATR, stop_atr=1.0, take_profit_atr=8.0)  # fmt: skip
    assert fill.price == 9_950.0 and fill.qty_base == want.quantity_base == 1.005  # 10,000 / 9,950 -> 1.005 BTC
    assert (r.state.margin_usdt, r.state.stop_price, r.state.take_profit_price) == (
        want.margin_usdt, want.stop_price, want.take_profit_price)  # fmt: skip
    assert step_bar(FLAT, LONG, bar(1, 10_000.0, 10_050.0, 9_950.0, 10_000.0), ATR, costs).fills == ()  # touch
    short = step_bar(FLAT, SHORT, bar(1, 10_000.0, 10_060.0, 9_990.0, 10_000.0), ATR, costs)
    assert short.fills[0].price == 10_050.0
    one_bp = CostConfig(entry_order="limit", entry_limit_offset_bps=1.0)
    # 10,000.05 x 0.9999 = 9,999.049995 -> buy rounded down to 9,999.0; x 1.0001 = 10,001.050005 -> sell up to 10,001.1
    buy = step_bar(FLAT, LONG, bar(1, 10_000.05, 10_100.0, 9_900.0, 10_000.0), ATR, one_bp)
    sell = step_bar(FLAT, SHORT, bar(1, 10_000.05, 10_100.0, 9_900.0, 10_000.0), ATR, one_bp)
    assert buy.fills[0].price == 9_999.0 and sell.fills[0].price == 10_001.1


def test_below_the_minimums_a_limit_entry_is_a_skip_not_a_miss() -> None:
    tiny = Decision(1, leverage=1.0, size_frac=0.001, stop_atr=1.0, take_profit_atr=8.0)  # 10 USDT < min notional
    env = _env([(10_000.0, 10_050.0, 10_000.0, 10_020.0)] * 3)  # a touch only: it would also be missed
    *_, info = env.step_decision(tiny)
    assert info["skipped_min_notional"] and not info["missed_entry"] and info["n_missed_entries"] == 0


# ---------------------------------------------------------------------------------------------
# The fill bar's exits
# ---------------------------------------------------------------------------------------------


def test_in_the_fill_bar_the_stop_acts_on_the_low_and_the_take_profit_on_the_close_only() -> None:
    # stop 9,900, take-profit 10,800 from the limit 10,000
    stopped = step_bar(FLAT, LONG, bar(1, 10_000.0, 10_050.0, 9_850.0, 9_950.0), ATR, LIMIT)
    assert [f.reason for f in stopped.fills] == ["entry", "stop"] and stopped.state.side == 0
    assert stopped.fills[1].price == 9_894.0  # 9,900 x (1 - 0.0006), taker
    high_before = step_bar(FLAT, LONG, bar(1, 10_000.0, 10_900.0, 9_990.0, 10_500.0), ATR, LIMIT)
    assert [f.reason for f in high_before.fills] == ["entry"] and high_before.state.side == 1  # the high may precede
    market = step_bar(FLAT, LONG, bar(1, 10_000.0, 10_900.0, 9_990.0, 10_500.0), ATR, MARKET)
    assert [f.reason for f in market.fills] == ["entry", "take_profit"]  # a market entry at the open: it does not
    closed_above = step_bar(FLAT, LONG, bar(1, 10_000.0, 10_900.0, 9_990.0, 10_850.0), ATR, LIMIT)
    assert [f.reason for f in closed_above.fills] == ["entry", "take_profit"] and closed_above.state.side == 0
    assert closed_above.fills[1].price == round(10_800.0 * (1 - 0.0001 - 0.05 * ATR / 10_000.0), 1)
    # a short: its stop on the high, its take-profit on the close
    s_stop = step_bar(FLAT, SHORT, bar(1, 10_000.0, 10_150.0, 9_950.0, 10_050.0), ATR, LIMIT)
    assert [f.reason for f in s_stop.fills] == ["entry", "stop"]
    s_low = step_bar(FLAT, SHORT, bar(1, 10_000.0, 10_010.0, 9_100.0, 9_500.0), ATR, LIMIT)
    assert [f.reason for f in s_low.fills] == ["entry"]
    s_tp = step_bar(FLAT, SHORT, bar(1, 10_000.0, 10_010.0, 9_100.0, 9_150.0), ATR, LIMIT)
    assert [f.reason for f in s_tp.fills] == ["entry", "take_profit"]


# ---------------------------------------------------------------------------------------------
# Every path agrees: step_bar (backtests, paper), the env, the batched env
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_step_bar_equals_the_env_with_limit_entries_and_keeps_the_books(seed: int) -> None:
    """Random sequences with gaps and liquidations: ``step_bar`` (the paper broker's path) equals
    ``TradingEnv.step_decision``; the env's missed-entry flag is exactly an opening decision that neither filled
    nor was skipped; equity - initial = closed trades' net PnL + the open trade's."""
    rng = np.random.default_rng(seed)
    costs = CostConfig(entry_order="limit", entry_limit_offset_bps=float(rng.choice([0.0, 5.0])),
                       take_profit_order=str(rng.choice(["market", "limit"])),
                       instrument=bundled_spec("BTCUSDT").model_copy(update={"min_notional_usdt": 5.0}))  # fmt: skip
    bars = []
    for t, o, h, lo, c, rate, funding in _random_bars(rng, 300):  # a third of the bars open at their low or high
        if rng.random() < 0.35:
            lo, h = (o, h) if c >= o else (lo, o)
        bars.append((t, o, h, lo, c, rate, funding))
    n = len(bars)
    data = EnvData(
        open_time_ns=np.array([b[0] for b in bars]), open=np.array([b[1] for b in bars]),
        high=np.array([b[2] for b in bars]), low=np.array([b[3] for b in bars]), close=np.array([b[4] for b in bars]),
        atr=np.array([b[1] * 0.01 for b in bars]), funding_rate=np.array([b[5] for b in bars]),
        is_funding_time=np.array([b[6] for b in bars]), market_obs=np.zeros((n, 1), np.float32),
        market_obs_names=("x",),
    )  # fmt: skip
    env = TradingEnv(data, EnvConfig(episode_len_bars=None, random_start=False, min_equity_frac=0.0,
                                     max_drawdown_frac=1.0, info_level="full", costs=costs,
                                     actions=ActionConfig(max_leverage=20.0)))  # fmt: skip
    env.reset(options={"start_index": 0, "end_index": n - 1})
    state = AccountState.initial(10_000.0)
    closed_pnl = 0.0
    missed = entries = 0
    for t in range(n - 1):
        decision = _random_decision(rng, state, bars[t + 1][1])
        if decision is not None and decision.direction != 0:
            decision = dataclasses.replace(decision, leverage=min(decision.leverage, 20.0))
        res = step_bar(state, decision, Bar(*bars[t + 1]), bars[t][1] * 0.01, costs)
        *_, info = env.step_decision(decision)
        assert dataclasses.astuple(env.account_state) == dataclasses.astuple(res.state)
        assert info["fills"] == res.fills and info["closed_trades"] == res.closed_trades
        opening = decision is not None and decision.direction not in (0, state.side)
        entered = any(f.reason == "entry" for f in res.fills)
        assert info["missed_entry"] == (opening and not entered and not res.skipped_min_notional)
        missed += info["missed_entry"]
        entries += entered
        for f in res.fills:
            if f.reason == "entry":  # at the limit, maker fee, no slippage
                assert f.slippage_usdt == 0.0 and f.fee_usdt == pytest.approx(f.qty_base * f.price * 0.0002)
        closed_pnl += sum(tr.pnl_usdt for tr in res.closed_trades)
        state = res.state
        open_part = (state.side * state.qty_base * (bars[t + 1][4] - state.entry_price) - state.entry_fee_usdt
                     - state.trade_funding_usdt) if state.side else 0.0  # fmt: skip
        assert res.equity_usdt - 10_000.0 == pytest.approx(closed_pnl + open_part, abs=1e-6)
        if res.equity_usdt <= 0:
            break
    assert info["n_missed_entries"] == missed and missed >= 3 and entries >= 10


def test_batched_env_equals_single_envs_with_limit_entries_and_counts_the_misses() -> None:
    data = make_env_data(500, seed=3, vol_per_bar=0.02)
    cfg = EnvConfig(episode_len_bars=120, info_level="lean", min_equity_frac=0.05, max_drawdown_frac=0.95,
                    actions=ActionConfig(max_leverage=10.0, max_size_frac=1.0),
                    costs=CostConfig(entry_order="limit", entry_limit_offset_bps=10.0))  # fmt: skip
    n = 4
    starts = 20 + 90 * np.arange(n)
    batched = BatchedTradingEnv(data, cfg, n)
    obs_b, _ = batched.reset(seed=1, options={"start_index": starts, "end_index": starts + 120})
    singles = [TradingEnv(data, cfg) for _ in range(n)]
    for k, env in enumerate(singles):
        env.reset(options={"start_index": int(starts[k]), "end_index": int(starts[k] + 120)})
    rng = np.random.default_rng(0)
    live = np.ones(n, bool)
    n_missed = 0
    while live.any():
        actions = rng.uniform(-1.0, 1.0, (n, 5)).astype(np.float32)
        obs_b, rew_b, _, _, info_b = batched.step(actions)
        for k in np.flatnonzero(live):
            obs, reward, term, trunc, info = singles[k].step(actions[k])
            assert reward == rew_b[k] and info["equity_usdt"] == info_b["equity_usdt"][k]
            if term or trunc:
                live[k] = False
                assert info["n_missed_entries"] == info_b["final_info"]["n_missed_entries"][k]
                assert info["n_trades"] == info_b["final_info"]["n_trades"][k]
                n_missed += info["n_missed_entries"]
            else:
                assert np.array_equal(obs, obs_b[k])
    assert n_missed > 0


# ---------------------------------------------------------------------------------------------
# Serving: the paper broker follows the kernel
# ---------------------------------------------------------------------------------------------


def test_the_paper_broker_enters_with_the_limit_as_the_kernel_does() -> None:
    broker = PaperBroker(10_000.0, LIMIT)
    broker.on_bar(bar(0, 10_000.0, 10_010.0, 9_990.0, 10_000.0))
    broker.submit(LONG, ATR)
    touch = broker.on_bar(bar(1, 10_000.0, 10_050.0, 10_000.0, 10_020.0))  # low == limit: missed
    assert touch.fills == () and broker.state.side == 0
    broker.submit(LONG, ATR)
    through = bar(2, 10_020.0, 10_050.0, 10_000.0, 10_030.0)
    result = broker.on_bar(through)
    assert result == step_bar(touch.state, LONG, through, ATR, LIMIT)  # the kernel's bar step, nothing else
    (fill,) = result.fills
    assert (fill.reason, fill.price, fill.slippage_usdt) == ("entry", 10_020.0, 0.0)
    assert fill.fee_usdt == pytest.approx(fill.qty_base * 10_020.0 * 0.0002)


def test_the_paper_venues_market_orders_stay_market_orders_under_a_limit_entry_config() -> None:
    """The order venue (the live loop's double) models Binance market orders: a limit-entry cost config does not
    turn them into limit orders that a touch would leave unfilled."""
    t1 = bar(1, 10_000.0, 10_050.0, 10_000.0, 10_020.0)  # would not fill a limit at its open
    results = []
    for costs in (LIMIT, MARKET):
        venue = PaperBroker(10_000.0, costs, leverage=2)
        venue.open_bar(bar(0, 10_000.0, 10_010.0, 9_990.0, 10_000.0), ATR)
        venue.close_bar()
        venue.create(OrderIntent("e1", "entry", "BTCUSDT", None, "buy", "market", 0.5, None, False, False))  # type: ignore[arg-type]
        trades = venue.open_bar(t1, ATR)
        results.append([(tr.side, tr.qty_base, tr.price) for tr in trades])
        assert venue.state.side == 1
    assert results[0] == results[1] and results[0][0][2] == 10_006.0  # taker fill with slippage
    assert results[0][0][:2] == (1, 0.5)


# ---------------------------------------------------------------------------------------------
# Reports: the backtest result and the exits summary count the missed entries
# ---------------------------------------------------------------------------------------------


class _EveryOtherBar(StatelessPolicy):
    """Long at bars with an even hour, flat at the others: an entry attempt every other bar."""

    name = "every_other_bar"

    def decide(self, ctx: DecisionContext) -> Decision:
        return LONG if ctx.bar_open_time.hour % 2 == 0 else Decision.flat()


def test_backtest_result_and_exit_summary_count_the_missed_entries() -> None:
    candles = make_candles(300, seed=2, vol_per_bar=0.01)
    data = make_env_data(300, seed=2, vol_per_bar=0.01)
    costs = CostConfig(entry_order="limit", entry_limit_offset_bps=20.0)
    res = run_backtest(_EveryOtherBar(), data, candles, EnvConfig(costs=costs), history_bars=1)
    env = TradingEnv(data, EnvConfig(episode_len_bars=None, random_start=False, min_equity_frac=0.0,
                                     max_drawdown_frac=1.0, info_level="full", costs=costs))  # fmt: skip
    env.reset(options={"start_index": 0, "end_index": 299})
    missed = 0
    for t in range(299):
        *_, info = env.step_decision(LONG if candles.index[t].hour % 2 == 0 else Decision.flat())
        missed += info["missed_entry"]
    assert res.n_missed_entries == missed and 10 <= missed and len(res.trades) >= 10
    s = exit_summary(res)
    assert s["missed_entries"] == float(missed)
    assert exits_table({"x": s}).loc["missed entries (limit not filled)", "x"] == str(missed)
    market = run_backtest(_EveryOtherBar(), data, candles, EnvConfig(), history_bars=1)
    assert market.n_missed_entries == 0 and exit_summary(market)["missed_entries"] == 0.0
    assert "missed entries (limit not filled)" not in exits_table({"x": exit_summary(market)}).index
