"""The levers of issue 16 act, through the real env entry points (``TradingEnv.step`` / ``step_decision``,
``BatchedTradingEnv``, ``step_bar``); their defaults keep today's env bit for bit (``test_kernel_equivalence.py``
runs with the defaults, unchanged, and the parameter slots are checked here).

* decision interval (``TradingRulesConfig.decision_interval_bars``),
* minimum holding period and no-trade band (``min_hold_bars``, ``rebalance_band_frac``),
* reward cost term and volatility scaling (``RewardConfig.cost_penalty_mult``, ``vol_scaling_target_annual``),
* volatility-targeted sizing (``ActionConfig.sizing_mode = "vol_target"``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from envs import kernel as K
from envs.accounting import AccountState, Bar, cost_params, is_decision_bar, rules_params, step_bar
from envs.actions import ActionConfig, decode_action
from envs.config import CostConfig, TradingRulesConfig
from envs.rewards import RewardConfig
from envs.sizing import SizingRules, ex_ante_vol_annual, size_entry, vol_target_fields
from envs.trading_env import EnvConfig, EnvData, TradingEnv, env_params
from envs.vector_env import BatchedTradingEnv
from market.decision import Decision
from market.instruments import bundled_spec
from tests.envs.helpers import HOUR_NS, T0_NS, make_env_data, simple_atr
from tests.envs.test_kernel_equivalence import _random_bars, _random_decision
from tests.kit.candles import make_candles

NO_COSTS = CostConfig(cost_multiplier=0.0)
LONG = Decision(1, leverage=2.0, size_frac=0.5, stop_atr=1.0, take_profit_atr=8.0)


def _cfg(**kw) -> EnvConfig:
    base = {"episode_len_bars": None, "random_start": False, "min_equity_frac": 0.0, "max_drawdown_frac": 1.0,
            "info_level": "full", "reward": RewardConfig(kind="log_return")}  # fmt: skip
    return EnvConfig(**{**base, **kw})


def _flat_data(n: int, lows: dict[int, float] | None = None, opens: dict[int, float] | None = None) -> EnvData:
    """1h bars from 2024-01-01 00:00 UTC at 10,000 (high/low +-20), ATR 100; ``lows`` / ``opens`` override bars."""
    o = np.full(n, 10_000.0)
    for i, v in (opens or {}).items():
        o[i] = v
    c = o.copy()
    h = o + 20.0
    lo = o - 20.0
    for i, v in (lows or {}).items():
        lo[i] = v
    return EnvData(
        open_time_ns=T0_NS + HOUR_NS * np.arange(n), open=o, high=h, low=lo, close=c, atr=np.full(n, 100.0),
        funding_rate=np.full(n, np.nan), is_funding_time=np.zeros(n, bool),
        market_obs=np.zeros((n, 2), np.float32), market_obs_names=("a", "b"),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Defaults: today's parameters
# ---------------------------------------------------------------------------------------------


def test_default_levers_leave_the_kernel_parameters_of_today() -> None:
    cfg = EnvConfig()
    p = env_params(cfg)
    for slot in (K.P_MIN_HOLD, K.P_REBALANCE, K.P_BAND, K.P_SIZING_MODE, K.P_COST_PEN, K.P_RW_VOL_TARGET):
        assert p[slot] == 0.0
    assert rules_params(cfg.costs, None) is cost_params(cfg.costs)
    assert rules_params(cfg.costs, TradingRulesConfig()) is cost_params(cfg.costs)
    env = TradingEnv(make_env_data(50), cfg)
    assert env._bars[:, K.B_DECISION].tolist() == [1.0] * 50 and np.isnan(env._bars[:, K.B_VOL]).all()


def test_lever_fields_are_validated() -> None:
    with pytest.raises(ValueError):
        TradingRulesConfig(decision_interval_bars=0)
    with pytest.raises(ValueError):
        TradingRulesConfig(rebalance_band_frac=1.5)
    with pytest.raises(ValueError):
        ActionConfig(sizing_mode="kelly")
    with pytest.raises(ValueError):
        RewardConfig(cost_penalty_mult=-1.0)


# ---------------------------------------------------------------------------------------------
# Decision interval
# ---------------------------------------------------------------------------------------------


def test_decision_bars_close_at_multiples_of_the_interval_since_the_epoch() -> None:
    times = T0_NS + HOUR_NS * np.arange(12)  # 2024-01-01 00:00 .. 11:00 opens
    assert np.flatnonzero(is_decision_bar(times, HOUR_NS, 4)).tolist() == [3, 7, 11]  # close 04:00, 08:00, 12:00
    assert is_decision_bar(times, HOUR_NS, 1).all()


@pytest.mark.parametrize("seed", range(3))
def test_interval_4_reads_the_action_every_4th_bar_and_charges_every_bar(seed: int) -> None:
    """A step of the k = 4 env equals, bar for bar, a k = 1 env given the same action at the decision bar and
    holds at the three bars after it: same account, equity, observation, fills (each at its own bar), funding
    charged at every funding bar inside the step, stops / take-profits / liquidations between decisions; the
    step's reward is the sum of the four per-bar rewards. (Funding settles at every bar of this data, so that
    it falls between decisions: with 8-hourly funding and k = 4 it would fall on the decision's own bar.)"""
    candles = make_candles(400, seed=seed, vol_per_bar=0.03)
    obs = pd.DataFrame(np.zeros((400, 2), np.float32), index=candles.index, columns=["a", "b"])
    data = EnvData.from_frames(candles, obs, simple_atr(candles), funding_interval_hours=1)
    base = {"actions": ActionConfig(max_leverage=50.0, max_size_frac=1.0), "reward": RewardConfig(warmup_bars=3)}
    k4 = TradingEnv(data, _cfg(trading_rules=TradingRulesConfig(decision_interval_bars=4), **base))
    k1 = TradingEnv(data, _cfg(**base))
    flags = is_decision_bar(data.open_time_ns, HOUR_NS, 4)
    start = 3  # 2021-01-01 03:00 opens, closes 04:00: a decision bar
    obs4, _ = k4.reset(options={"start_index": start, "end_index": 399})
    obs1, _ = k1.reset(options={"start_index": start, "end_index": 399})
    assert np.array_equal(obs4, obs1)
    rng = np.random.default_rng(seed)
    between: set[str] = set()  # fills at the bars between two decisions
    funding_inside = 0
    done = False
    while not done:
        action = rng.uniform(-1.2, 1.2, 5).astype(np.float32)
        got = k4.step(action)
        want = k1.step(action)
        reward, fees, funding = want[1], want[4]["fees_usdt"], want[4]["funding_usdt"]
        fills, trades = list(want[4]["fills"]), list(want[4]["closed_trades"])
        n_bars = 1
        while not (want[2] or want[3]) and not flags[k1.current_index]:
            want = k1.step_decision(None)
            funding_inside += want[4]["funding_usdt"] != 0.0
            between.update(f.reason for f in want[4]["fills"])
            reward += want[1]
            fees += want[4]["fees_usdt"]
            funding += want[4]["funding_usdt"]
            fills += want[4]["fills"]
            trades += want[4]["closed_trades"]
            n_bars += 1
        assert k4.current_index == k1.current_index and (n_bars == 4 or want[2] or want[3])
        assert np.array_equal(got[0], want[0]) and got[1] == reward and got[2:4] == want[2:4]
        info = got[4]
        assert info["equity_usdt"] == want[4]["equity_usdt"]
        assert info["fees_usdt"] == fees and info["funding_usdt"] == funding
        assert list(info["fills"]) == fills and list(info["closed_trades"]) == trades
        assert dataclasses.astuple(k4.account_state) == dataclasses.astuple(k1.account_state)
        done = got[2] or got[3]
    assert funding_inside > 0  # funding was charged at bars between two decisions
    assert between & {"stop", "take_profit", "liquidation"} and between <= {"stop", "take_profit", "liquidation"}


def test_step_decision_reads_the_decision_only_at_decision_bars() -> None:
    env = TradingEnv(_flat_data(10), _cfg(costs=NO_COSTS, trading_rules=TradingRulesConfig(decision_interval_bars=4)))
    env.reset(options={"start_index": 0, "end_index": 9})  # a given span is kept (bar 0 is no decision bar)
    for t in range(3):  # bars 0, 1, 2 close at 01:00, 02:00, 03:00: the decision is not read
        assert not env.is_decision_bar()
        *_, info = env.step_decision(LONG)
        assert info["fills"] == () and env.account_state.side == 0 and env.current_index == t + 1
    assert env.is_decision_bar()  # bar 3 closes at 04:00
    *_, info = env.step_decision(LONG)
    assert [f.reason for f in info["fills"]] == ["entry"] and env.account_state.side == 1


def test_random_starts_move_to_decision_bars_single_and_batched_alike() -> None:
    data = make_env_data(600, seed=5, vol_per_bar=0.02)
    cfg = EnvConfig(episode_len_bars=50, trading_rules=TradingRulesConfig(decision_interval_bars=6))
    flags = is_decision_bar(data.open_time_ns, HOUR_NS, 6)
    env = TradingEnv(data, cfg)
    for seed in range(20):
        env.reset(seed=seed)
        start, end = env.episode_span
        assert flags[start] and end == start + 50
    batched = BatchedTradingEnv(data, cfg, 8)
    batched.reset(seed=3)
    assert all(flags[int(t)] for t in batched._fs[:, K.E_T])


def test_batched_env_equals_single_envs_with_every_lever_on() -> None:
    data = make_env_data(700, seed=3, vol_per_bar=0.03)
    cfg = EnvConfig(
        episode_len_bars=200, info_level="full", min_equity_frac=0.05, max_drawdown_frac=0.95,
        actions=ActionConfig(max_leverage=20.0, max_size_frac=1.0, sizing_mode="vol_target", target_vol_annual=3.0,
                             vol_span_bars=48),
        reward=RewardConfig(cost_penalty_mult=1.5, vol_scaling_target_annual=0.5, drawdown_penalty=0.3),
        trading_rules=TradingRulesConfig(decision_interval_bars=3, min_hold_bars=4, rebalance_band_frac=0.2),
    )  # fmt: skip
    n = 6
    starts = 53 + 21 * np.arange(n)  # open hours = 2 (mod 3): they close at multiples of 3 h
    assert is_decision_bar(data.open_time_ns[starts], HOUR_NS, 3).all()
    batched = BatchedTradingEnv(data, cfg, n)
    obs_b, _ = batched.reset(seed=1, options={"start_index": starts, "end_index": starts + 200})
    singles = [TradingEnv(data, cfg) for _ in range(n)]
    for k, env in enumerate(singles):
        obs, _ = env.reset(options={"start_index": int(starts[k]), "end_index": int(starts[k] + 200)})
        assert np.array_equal(obs, obs_b[k])
    rng = np.random.default_rng(0)
    live = np.ones(n, bool)
    reasons: set[str] = set()
    for _ in range(80):
        actions = rng.uniform(-1.2, 1.2, (n, 5)).astype(np.float32)
        obs_b, rew_b, term_b, trunc_b, info_b = batched.step(actions)
        for k in np.flatnonzero(live):
            obs, reward, term, trunc, info = singles[k].step(actions[k])
            assert reward == rew_b[k] and term == term_b[k] and trunc == trunc_b[k]
            assert info["equity_usdt"] == info_b["equity_usdt"][k]
            reasons.update(f.reason for f in info["fills"])
            if term or trunc:
                live[k] = False
            else:
                assert np.array_equal(obs, obs_b[k])
    assert "rebalance" in reasons and "entry" in reasons


def test_action_path_equals_the_backtest_decision_path_with_levers() -> None:
    """Training (``step`` with the 5-d action) and a backtest (``step_decision`` every bar with the action
    decoded by :func:`envs.actions.decode_action` and the env's volatility) trade identically: the decision
    interval, min hold, band and vol-target sizing are the same rules in both."""
    data = make_env_data(500, seed=7, vol_per_bar=0.02)
    cfg = _cfg(
        actions=ActionConfig(max_leverage=10.0, sizing_mode="vol_target", target_vol_annual=2.0, vol_span_bars=72),
        trading_rules=TradingRulesConfig(decision_interval_bars=4, min_hold_bars=5, rebalance_band_frac=0.25),
    )
    train, test = TradingEnv(data, cfg), TradingEnv(data, cfg)
    train.reset(options={"start_index": 99, "end_index": 480})  # opens 03:00: a decision bar
    test.reset(options={"start_index": 99, "end_index": 480})
    rng = np.random.default_rng(1)
    done = False
    n_rebalance = 0
    while not done:
        action = rng.uniform(-1.0, 1.0, 5).astype(np.float32)
        decision = decode_action(action, cfg.actions, ex_ante_vol_annual=test.ex_ante_vol_annual)
        got = train.step(action)
        reward = 0.0
        while True:
            want = test.step_decision(decision)  # read at the decision bar only
            reward += want[1]
            n_rebalance += any(f.reason == "rebalance" for f in want[4]["fills"])
            if want[2] or want[3] or test.is_decision_bar():
                break
        assert train.current_index == test.current_index and got[1] == reward
        assert dataclasses.astuple(train.account_state) == dataclasses.astuple(test.account_state)
        done = got[2] or got[3]
    assert n_rebalance > 0


# ---------------------------------------------------------------------------------------------
# Minimum holding period and no-trade band
# ---------------------------------------------------------------------------------------------


def test_min_hold_ignores_an_early_flip_but_not_the_stop() -> None:
    # entry at bar 1's open (10,000), stop 9,900; bar 4 trades down to 9,850
    env = TradingEnv(_flat_data(10, lows={4: 9_850.0}), _cfg(costs=NO_COSTS,
                                                            trading_rules=TradingRulesConfig(min_hold_bars=6)))  # fmt: skip
    env.reset(options={"start_index": 0, "end_index": 9})
    env.step_decision(LONG)
    env.step_decision(None)
    env.step_decision(None)
    assert env.current_index == 3 and env.position_view().bars_in_trade == 3
    *_, info = env.step_decision(Decision(-1, leverage=2.0, size_frac=0.5))  # flip after 3 bars: ignored
    assert env.account_state.side == 0  # ... but the stop filled in bar 4
    assert [(f.reason, f.price) for f in info["fills"]] == [("stop", 9_900.0)]
    assert [t.exit_reason for t in info["closed_trades"]] == ["stop"]


def test_min_hold_lets_the_agent_close_after_the_period() -> None:
    env = TradingEnv(_flat_data(12), _cfg(costs=NO_COSTS, trading_rules=TradingRulesConfig(min_hold_bars=6)))
    env.reset(options={"start_index": 0, "end_index": 11})
    env.step_decision(LONG)
    for _ in range(4):
        *_, info = env.step_decision(Decision.flat())  # bars in trade 1 .. 4 (< 6): ignored
        assert info["fills"] == ()
    env.step_decision(None)
    assert env.position_view().bars_in_trade == 6
    *_, info = env.step_decision(Decision(-1, leverage=2.0, size_frac=0.5))
    assert [f.reason for f in info["fills"]] == ["exit_signal", "entry"] and env.account_state.side == -1


def test_without_a_band_a_decision_in_the_held_direction_never_resizes() -> None:
    env = TradingEnv(_flat_data(6), _cfg(costs=NO_COSTS))
    env.reset(options={"start_index": 0, "end_index": 5})
    env.step_decision(LONG)
    *_, info = env.step_decision(Decision(1, leverage=2.0, size_frac=1.0))
    assert info["fills"] == () and env.account_state.qty_base == 1.0


def test_band_ignores_a_20_percent_change_and_resizes_outside_it() -> None:
    rules = TradingRulesConfig(rebalance_band_frac=0.5)
    env = TradingEnv(_flat_data(8, opens={5: 10_500.0, 6: 10_500.0, 7: 10_500.0}), _cfg(costs=NO_COSTS,
                                                                                       trading_rules=rules))
    env.reset(options={"start_index": 0, "end_index": 7})
    env.step_decision(LONG)  # margin budget 5,000 x 2 / 10,000 -> 1.0 BTC, margin 5,000
    assert env.account_state.qty_base == 1.0
    *_, info = env.step_decision(Decision(1, leverage=2.0, size_frac=0.6))  # aim 1.2: |0.2| < 0.5 x 1.0
    assert info["fills"] == () and env.account_state.qty_base == 1.0
    *_, info = env.step_decision(Decision(1, leverage=2.0, size_frac=0.8))  # aim 1.6: |0.6| >= 0.5 -> add 0.6
    (fill,) = info["fills"]
    assert (fill.reason, fill.side, fill.qty_base, fill.price) == ("rebalance", 1, 0.6, 10_000.0)
    assert info["closed_trades"] == ()
    s = env.account_state
    assert (s.qty_base, s.entry_price, s.margin_usdt, s.cash_usdt) == (1.6, 10_000.0, 8_000.0, 2_000.0)
    env.step_decision(None)
    # bar 5 opens at 10,500: equity at the open 10,800; aim 0.2 x 10,800 x 2 / 10,500 -> 0.411 BTC; reduce 1.189
    *_, info = env.step_decision(Decision(1, leverage=2.0, size_frac=0.2))
    (fill,) = info["fills"]
    assert (fill.reason, fill.side, fill.price) == ("rebalance", -1, 10_500.0) and fill.qty_base == pytest.approx(1.189)
    (trade,) = info["closed_trades"]
    assert trade.exit_reason == "rebalance" and trade.qty_base == fill.qty_base
    assert trade.pnl_usdt == pytest.approx(1.189 * 500.0)  # no costs: the price PnL of the reduced part
    s = env.account_state
    assert s.qty_base == pytest.approx(0.411) and s.margin_usdt == pytest.approx(8_000.0 * 0.411 / 1.6)
    assert env.equity_usdt == pytest.approx(10_800.0)
    assert s.cash_usdt + s.margin_usdt + s.qty_base * (10_500.0 - s.entry_price) == pytest.approx(10_800.0)


def test_band_add_is_capped_by_the_free_cash() -> None:
    rules = TradingRulesConfig(rebalance_band_frac=0.0)
    env = TradingEnv(_flat_data(5, opens={2: 10_200.0, 3: 10_200.0, 4: 10_200.0}), _cfg(costs=NO_COSTS,
                                                                                      trading_rules=rules))
    env.reset(options={"start_index": 0, "end_index": 4})
    env.step_decision(LONG)
    # at 10,200 the aim is 10,200 x 2 / 10,200 = 2.0 BTC, but 5,000 of free cash buys 5,000 x 2 / 10,200 -> 0.980
    *_, info = env.step_decision(Decision(1, leverage=2.0, size_frac=1.0))
    (fill,) = info["fills"]
    assert fill.qty_base == 0.98 and fill.price == 10_200.0
    s = env.account_state
    assert s.qty_base == 1.98 and s.entry_price == pytest.approx((10_000.0 + 0.98 * 10_200.0) / 1.98)
    assert s.cash_usdt == pytest.approx(5_000.0 - 0.98 * 10_200.0 / 2) and s.cash_usdt >= 0.0


@pytest.mark.parametrize("seed", range(4))
def test_step_bar_with_rules_equals_the_env_and_keeps_the_books(seed: int) -> None:
    """The paper broker's path (:func:`step_bar` with ``rules``) equals ``TradingEnv.step_decision`` under the
    same rules, and with resizes the books still close: equity - initial = the closed trades' net PnL + the
    open trade's (unrealised PnL - its fees and funding)."""
    rng = np.random.default_rng(seed)
    rules = TradingRulesConfig(min_hold_bars=int(rng.integers(0, 3)), rebalance_band_frac=float(rng.choice([0.0, 0.3])))
    costs = CostConfig(instrument=bundled_spec("BTCUSDT").model_copy(update={"min_notional_usdt": 5.0}))
    bars = _random_bars(rng, 300)
    n = len(bars)
    data = EnvData(
        open_time_ns=np.array([b[0] for b in bars]), open=np.array([b[1] for b in bars]),
        high=np.array([b[2] for b in bars]), low=np.array([b[3] for b in bars]), close=np.array([b[4] for b in bars]),
        atr=np.array([b[1] * 0.01 for b in bars]), funding_rate=np.array([b[5] for b in bars]),
        is_funding_time=np.array([b[6] for b in bars]), market_obs=np.zeros((n, 1), np.float32),
        market_obs_names=("x",),
    )  # fmt: skip
    env = TradingEnv(data, _cfg(costs=costs, trading_rules=rules, actions=ActionConfig(max_leverage=20.0)))
    env.reset(options={"start_index": 0, "end_index": n - 1})
    state = AccountState.initial(10_000.0)
    closed_pnl = 0.0
    n_resized = 0
    for t in range(n - 1):
        if state.side != 0 and rng.random() < 0.5:  # an aim in the held direction: a resize outside the band
            decision = Decision(state.side, leverage=float(rng.uniform(1.0, 10.0)), size_frac=float(rng.uniform(0, 1)))
        else:
            decision = _random_decision(rng, state, bars[t + 1][1])
        if decision is not None and decision.direction != 0:
            decision = dataclasses.replace(decision, leverage=min(decision.leverage, 20.0))
        res = step_bar(state, decision, Bar(*bars[t + 1]), bars[t][1] * 0.01, costs, rules=rules)
        *_, info = env.step_decision(decision)
        assert dataclasses.astuple(env.account_state) == dataclasses.astuple(res.state)
        assert info["fills"] == res.fills and info["closed_trades"] == res.closed_trades
        n_resized += any(f.reason == "rebalance" for f in res.fills)
        closed_pnl += sum(tr.pnl_usdt for tr in res.closed_trades)
        state = res.state
        open_part = (state.side * state.qty_base * (bars[t + 1][4] - state.entry_price) - state.entry_fee_usdt
                     - state.trade_funding_usdt) if state.side else 0.0  # fmt: skip
        assert res.equity_usdt - 10_000.0 == pytest.approx(closed_pnl + open_part, abs=1e-6)
        if res.equity_usdt <= 0:
            break
    assert n_resized >= 3


# ---------------------------------------------------------------------------------------------
# Reward: cost term and volatility scaling
# ---------------------------------------------------------------------------------------------


def test_cost_penalty_lowers_the_reward_by_exactly_the_cost_term() -> None:
    data = make_env_data(300, seed=2, vol_per_bar=0.02)
    plain = TradingEnv(data, _cfg(reward=RewardConfig()))
    taxed = TradingEnv(data, _cfg(reward=RewardConfig(cost_penalty_mult=2.5, scale=3.0)))
    for env in (plain, taxed):
        env.reset(options={"start_index": 10, "end_index": 290})
    rng = np.random.default_rng(0)
    n_costly = 0
    for _ in range(280):
        action = rng.uniform(-1.0, 1.0, 5).astype(np.float32)
        equity_prev = plain.equity_usdt
        a = plain.step(action)
        b = taxed.step(action)
        assert a[4]["equity_usdt"] == b[4]["equity_usdt"]  # the penalty does not change what happens
        cost = 3.0 * 2.5 * (b[4]["fees_usdt"] + b[4]["slippage_usdt"]) / equity_prev
        assert b[4]["reward_cost_penalty"] == pytest.approx(cost, rel=1e-12, abs=1e-15)
        assert b[1] == pytest.approx(3.0 * a[1] - cost, rel=1e-12, abs=1e-12)
        assert b[1] == (b[4]["reward_base"] - b[4]["reward_turnover_penalty"] - b[4]["reward_drawdown_penalty"]
                        - b[4]["reward_cost_penalty"])  # fmt: skip
        n_costly += cost > 0
        if a[2] or a[3]:
            break
    assert n_costly > 10 and "reward_cost_penalty" not in a[4]


def test_volatility_scaling_multiplies_the_return_by_target_over_ex_ante_vol() -> None:
    data = make_env_data(300, seed=4, vol_per_bar=0.02)
    cfg = _cfg(reward=RewardConfig(kind="log_return", vol_scaling_target_annual=0.3, cost_penalty_mult=1.0),
               actions=ActionConfig(vol_span_bars=48))  # fmt: skip
    env = TradingEnv(data, cfg)
    env.reset(options={"start_index": 5, "end_index": 290})
    expected_vol = ex_ante_vol_annual(data.close, 3_600.0, 48, 24)
    rng = np.random.default_rng(3)
    seen = 0
    for _ in range(280):
        t = env.current_index
        vol = env.ex_ante_vol_annual
        assert vol == expected_vol[t] or (math.isnan(vol) and math.isnan(expected_vol[t]))
        equity_prev = env.equity_usdt
        *_, info = env.step(rng.uniform(-1.0, 1.0, 5).astype(np.float32))
        k = 0.3 / vol if vol > 0 else 1.0  # no estimate before 24 returns: unscaled
        assert info["reward_base"] == pytest.approx(math.log1p(k * info["bar_return"]), rel=1e-12, abs=1e-15)
        cost = k * (info["fees_usdt"] + info["slippage_usdt"]) / equity_prev
        assert info["reward_cost_penalty"] == pytest.approx(cost, rel=1e-12, abs=1e-15)
        seen += not math.isnan(vol)
    assert seen > 200


# ---------------------------------------------------------------------------------------------
# Volatility-targeted sizing
# ---------------------------------------------------------------------------------------------


def _zigzag_data(a: float, n: int = 160) -> EnvData:
    """Closes alternating +a / -a returns (ex-ante volatility about a x sqrt(8760)), opens at the previous close."""
    c = 10_000.0 * np.cumprod(np.where(np.arange(n) % 2 == 0, 1.0 + a, 1.0 - a))
    o = np.concatenate([[10_000.0], c[:-1]])
    return EnvData(
        open_time_ns=T0_NS + HOUR_NS * np.arange(n), open=o, high=np.maximum(o, c) * 1.0001,
        low=np.minimum(o, c) * 0.9999, close=c, atr=np.full(n, 50.0), funding_rate=np.full(n, np.nan),
        is_funding_time=np.zeros(n, bool), market_obs=np.zeros((n, 1), np.float32), market_obs_names=("x",),
    )  # fmt: skip


def _vol_target_entry(a: float, max_leverage: float = 5.0) -> tuple[TradingEnv, float]:
    cfg = _cfg(costs=NO_COSTS, actions=ActionConfig(sizing_mode="vol_target", target_vol_annual=0.4,
                                                    max_leverage=max_leverage, vol_span_bars=50))  # fmt: skip
    env = TradingEnv(_zigzag_data(a), cfg)
    env.reset(options={"start_index": 100, "end_index": 150})
    vol = env.ex_ante_vol_annual
    env.step(np.array([1.0, -1.0, 1.0, 0.0, 0.0], np.float32))  # long, a2 = +1: the full target (a1 not read)
    return env, vol


def test_vol_target_leverage_halves_when_vol_doubles_and_is_capped() -> None:
    a = 0.1 / math.sqrt(8_760)  # about 10 % a year -> exposure 4
    calm, vol_calm = _vol_target_entry(a)
    wild, vol_wild = _vol_target_entry(2 * a)
    assert vol_wild / vol_calm == pytest.approx(2.0, rel=1e-3)
    lev_calm, lev_wild = calm.account_state.leverage, wild.account_state.leverage
    assert lev_calm == pytest.approx(0.4 / vol_calm, rel=1e-12) and lev_wild == pytest.approx(0.4 / vol_wild, rel=1e-12)
    assert lev_calm / lev_wild == pytest.approx(2.0, rel=1e-3)
    capped, vol_capped = _vol_target_entry(a / 10)  # exposure 40 -> capped at max_leverage 5
    assert 0.4 / vol_capped > 30 and capped.account_state.leverage == 5.0
    for env in (calm, wild, capped):  # notional = exposure x equity (no costs), to the lot step
        s = env.account_state
        assert s.qty_base * s.entry_price == pytest.approx(10_000.0 * s.leverage, abs=s.entry_price * 0.001)


def test_vol_target_below_leverage_one_scales_the_margin_fraction() -> None:
    a = 0.8 / math.sqrt(8_760)  # about 80 % a year -> exposure 0.5: leverage 1, size_frac 0.5
    env, vol = _vol_target_entry(a)
    s = env.account_state
    assert s.leverage == 1.0 and s.qty_base * s.entry_price == pytest.approx(10_000.0 * 0.4 / vol, abs=10.0)


def test_vol_target_goes_through_the_one_sizing_rule() -> None:
    env, vol = _vol_target_entry(0.15 / math.sqrt(8_760))
    s = env.account_state
    lev, frac = vol_target_fields(1.0, 0.4, vol, 5.0)
    sized = size_entry(side=1, equity_usdt=10_000.0, size_frac=frac, leverage=lev, price_usdt=s.entry_price,
                       fee_rate=0.0, rules=SizingRules.from_spec(NO_COSTS.instrument))  # fmt: skip
    assert (s.qty_base, s.margin_usdt, s.leverage) == (sized.quantity_base, sized.margin_usdt, lev)
    decision = decode_action(np.array([1.0, -1.0, 1.0, 0.0, 0.0]), env.config.actions, ex_ante_vol_annual=vol)
    assert (decision.leverage, decision.size_frac) == (lev, frac)


def test_vol_target_without_an_estimate_opens_nothing_and_decode_needs_the_vol() -> None:
    cfg = _cfg(costs=NO_COSTS, actions=ActionConfig(sizing_mode="vol_target", vol_span_bars=50))
    env = TradingEnv(_zigzag_data(0.001), cfg)
    env.reset(options={"start_index": 3, "end_index": 50})  # 3 returns < vol_min_bars 24: no estimate
    assert math.isnan(env.ex_ante_vol_annual)
    *_, info = env.step(np.array([1.0, 0.0, 1.0, 0.0, 0.0], np.float32))
    assert env.account_state.side == 0 and info["skipped_min_notional"]
    with pytest.raises(ValueError, match="ex_ante_vol_annual"):
        decode_action(np.zeros(5), cfg.actions)
    assert vol_target_fields(1.0, 0.4, math.nan, 5.0) == (1.0, 0.0)


def test_ex_ante_vol_is_causal_and_the_weighted_std_of_past_returns() -> None:
    close = 100.0 * np.cumprod(1.0 + np.random.default_rng(0).normal(0.0, 0.01, 200))
    vol = ex_ante_vol_annual(close, 3_600.0, 30, 10)
    assert np.isnan(vol[:10]).all() and np.isfinite(vol[10:]).all()
    assert np.array_equal(ex_ante_vol_annual(close[:121], 3_600.0, 30, 10), vol[:121], equal_nan=True)
    r = close[1:121] / close[:120] - 1.0
    w = (1.0 - 2.0 / 31.0) ** np.arange(len(r) - 1, -1, -1)
    w /= w.sum()
    sd = math.sqrt(w @ (r - w @ r) ** 2)
    assert vol[120] == pytest.approx(sd * math.sqrt(8_760), rel=1e-9)
