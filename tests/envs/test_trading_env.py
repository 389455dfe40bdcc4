"""TradingEnv and EnvData: API conformance, hand-made episode, spans, determinism, validation."""

from __future__ import annotations

import math
import warnings

import gymnasium
import numpy as np
import pandas as pd
import pytest
from gymnasium.utils.env_checker import check_env

from envs import ENV_ID
from envs.config import CostConfig
from envs.rewards import RewardConfig
from envs.trading_env import ACCOUNT_FEATURES, EnvConfig, EnvData, TradingEnv, account_features
from market.decision import Decision, NonFiniteDecisionError
from tests.envs.helpers import HOUR_NS, T0_NS, make_env_data, simple_atr
from tests.kit.candles import make_candles

NO_COSTS_LOG = EnvConfig(
    episode_len_bars=None, random_start=False, costs=CostConfig(cost_multiplier=0.0),
    reward=RewardConfig(kind="log_return"), info_level="full",
)  # fmt: skip


def _hand_data() -> EnvData:
    # 1h bars from 01:00 (no funding time inside), ATR 100, two constant market features.
    o = [10_000, 10_000, 10_050, 10_100, 9_950]
    h = [10_000, 10_100, 10_100, 10_100, 10_000]
    lo = [10_000, 9_950, 10_000, 9_900, 9_900]
    c = [10_000, 10_050, 10_100, 9_950, 9_950]
    n = len(o)
    return EnvData(
        open_time_ns=np.array([T0_NS + (i + 1) * HOUR_NS for i in range(n)]),
        open=np.array(o, float), high=np.array(h, float), low=np.array(lo, float), close=np.array(c, float),
        atr=np.full(n, 100.0), funding_rate=np.full(n, np.nan), is_funding_time=np.zeros(n, bool),
        market_obs=np.tile(np.array([[0.5, -1.0]], np.float32), (n, 1)), market_obs_names=("a", "b"),
    )  # fmt: skip


def test_hand_made_episode_observation_reward_info() -> None:
    env = TradingEnv(_hand_data(), NO_COSTS_LOG)
    obs, info = env.reset(seed=0)
    assert obs.shape == (2 + len(ACCOUNT_FEATURES),) and obs.dtype == np.float32
    assert obs.tolist() == [0.5, -1.0, 0, 0, 0, 0, 0, 0]
    assert info == {"equity_usdt": 10_000.0, "bar_open_time_ns": T0_NS + HOUR_NS}
    # Long 2x with half the equity, decided at the close of bar 0, filled at the open of bar 1 (10000, no costs):
    # margin 5000 -> qty 1.0 BTC; close 10050 -> equity 10050
    obs, reward, terminated, truncated, info = env.step_decision(Decision(1, leverage=2.0, size_frac=0.5))
    assert env.current_index == 1 and info["bar_open_time_ns"] == T0_NS + 2 * HOUR_NS
    assert info["equity_usdt"] == 10_050.0 and info["position_qty_base"] == 1.0
    assert info["position_notional_usdt"] == 10_050.0 and info["n_trades"] == 1
    assert reward == pytest.approx(math.log(10_050 / 10_000))
    assert info["reward_base"] == reward and info["reward_turnover_penalty"] == 0.0
    # account features: side, exposure = 10050 / 10050, leverage 2 / 5, uPnL 50 / 10050, 1 bar / 720, dd 0
    expected = [1.0, 1.0, 0.4, 50 / 10_050, 1 / 720, 0.0]
    assert obs[2:] == pytest.approx(np.array(expected, np.float32), rel=1e-6)
    assert not terminated and not truncated
    env.step_decision(None)  # close 10100 -> equity 10100 (the peak)
    obs, reward, *_ = env.step_decision(None)  # close 9950 -> equity 9950
    assert env.equity_usdt == 9_950.0
    assert reward == pytest.approx(math.log(9_950 / 10_100))
    assert obs[-1] == pytest.approx(1 - 9_950 / 10_100, rel=1e-6)  # drawdown from the episode's peak
    assert env.position_view().bars_in_trade == 3
    # last bar: the data ends -> truncated, not terminated
    *_, terminated, truncated, _ = env.step_decision(Decision.flat())
    assert (terminated, truncated) == (False, True)
    with pytest.raises(RuntimeError, match="reset"):
        env.step_decision(None)


@pytest.mark.parametrize(
    "overrides", [{"min_equity_frac": 0.996}, {"max_drawdown_frac": 0.01}]
)  # equity 9950 < 9960; drawdown 150 / 10100 = 1.49 % > 1 %
def test_termination_on_equity_floor_or_drawdown(overrides: dict) -> None:
    env = TradingEnv(_hand_data(), NO_COSTS_LOG.model_copy(update=overrides))
    env.reset()
    env.step_decision(Decision(1, leverage=2.0, size_frac=0.5))
    env.step_decision(None)
    *_, terminated, truncated, _ = env.step_decision(None)
    assert (terminated, truncated) == (True, False)
    with pytest.raises(RuntimeError):
        env.step_decision(None)


def test_turnover_penalty_in_reward() -> None:
    cfg = NO_COSTS_LOG.model_copy(update={"reward": RewardConfig(kind="log_return", turnover_penalty=0.1)})
    env = TradingEnv(_hand_data(), cfg)
    env.reset()
    _, reward, _, _, info = env.step_decision(Decision(1, leverage=2.0, size_frac=0.5))
    # traded notional 10000 / equity 10000 * 0.1 = 0.1
    assert info["reward_turnover_penalty"] == pytest.approx(0.1)
    assert reward == pytest.approx(math.log(10_050 / 10_000) - 0.1)
    assert reward == info["reward_base"] - info["reward_turnover_penalty"] - info["reward_drawdown_penalty"]


def test_step_before_reset_raises() -> None:
    with pytest.raises(RuntimeError, match="reset"):
        TradingEnv(_hand_data()).step(np.zeros(5, np.float32))


def test_non_finite_action_raises() -> None:
    env = TradingEnv(make_env_data(50))
    env.reset(seed=0)
    with pytest.raises(NonFiniteDecisionError, match="leverage"):
        env.step(np.array([1.0, np.nan, 0, 0, 0], np.float32))


def test_check_env_passes() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # infinite Box bounds are intended
        check_env(TradingEnv(make_env_data(200), EnvConfig(episode_len_bars=50)))


def test_gymnasium_make() -> None:
    data = make_env_data(200)
    env = gymnasium.make(ENV_ID, data=data, config=EnvConfig(episode_len_bars=20))
    assert isinstance(env.unwrapped, TradingEnv)
    obs, _ = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    obs, reward, *_ = env.step(env.action_space.sample())
    assert np.isfinite(obs).all() and math.isfinite(reward)
    env.close()


def _trajectory(seed: int, actions: np.ndarray) -> list:
    env = TradingEnv(make_env_data(400, seed=7, vol_per_bar=0.02), EnvConfig(episode_len_bars=100))
    obs, info = env.reset(seed=seed)
    out = [(obs, info)]
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        out.append((obs, reward, terminated, truncated, info))
        if terminated or truncated:
            break
    return out


def _same(x, y) -> bool:
    if isinstance(x, np.ndarray):
        return np.array_equal(x, y)
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y, strict=True))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    return x == y


def test_same_seed_same_trajectory() -> None:
    actions = np.random.default_rng(0).uniform(-1, 1, (100, 5)).astype(np.float32)
    first, second = _trajectory(11, actions), _trajectory(11, actions)
    assert len(first) > 1 and _same(first, second)
    # the seed drives the random start
    starts = {_trajectory(s, actions[:1])[0][1]["bar_open_time_ns"] for s in range(5)}
    assert len(starts) > 1


def test_evaluation_span_runs_exactly_end_minus_start_steps() -> None:
    data = make_env_data(120)
    env = TradingEnv(data, EnvConfig(episode_len_bars=5, random_start=True))
    obs, info = env.reset(options={"start_index": 10, "end_index": 50})
    assert np.array_equal(obs[:4], data.market_obs[10]) and info["bar_open_time_ns"] == data.open_time_ns[10]
    steps = 0
    done = False
    while not done:
        *_, terminated, truncated, _ = env.step_decision(Decision.flat())
        steps += 1
        done = terminated or truncated
        assert not terminated
    assert steps == 40 and truncated and env.current_index == 50
    # to the end of the data
    env.reset(options={"start_index": 100, "end_index": 119})
    assert env.episode_span == (100, 119)
    for bad in ({"start_index": 50, "end_index": 50}, {"start_index": 0, "end_index": 120}, {"begin": 1}):
        with pytest.raises(ValueError):
            env.reset(options=bad)


def test_random_start_window_fits_in_data() -> None:
    env = TradingEnv(make_env_data(60), EnvConfig(episode_len_bars=50))
    for seed in range(20):
        env.reset(seed=seed)
        start, end = env.episode_span
        assert 0 <= start and end == start + 50 and end <= 59


# ------------------------------------------------------------------------------------------------
# EnvData
# ------------------------------------------------------------------------------------------------


def _frames(n: int = 40):
    candles = make_candles(n, seed=2)
    obs = pd.DataFrame(np.zeros((n, 2), np.float32), index=candles.index, columns=["x", "y"])
    return candles, obs, simple_atr(candles, 5).copy()


def test_from_frames_arrays_and_funding_flags() -> None:
    candles, obs, atr = _frames()
    data = EnvData.from_frames(candles, obs, atr)
    assert data.open_time_ns.dtype == np.int64 and data.market_obs.dtype == np.float32
    assert data.open_time_ns[0] == candles.index[0].value
    hours = candles.index.hour
    assert np.array_equal(data.is_funding_time, np.asarray(hours % 8 == 0))
    assert np.array_equal(np.isnan(data.funding_rate), ~data.is_funding_time)
    part = data.slice(5, 15)
    assert len(part) == 10 and part.open[0] == data.open[5]
    with pytest.raises(ValueError):
        data.slice(10, 10)


def test_from_frames_rejects_misaligned_index() -> None:
    candles, obs, atr = _frames()
    shifted = obs.set_axis(obs.index + pd.Timedelta(hours=1))
    with pytest.raises(ValueError, match="row 0"):
        EnvData.from_frames(candles, shifted, atr)
    with pytest.raises(ValueError, match="rows"):
        EnvData.from_frames(candles, obs.iloc[:-1], atr)


def test_from_frames_names_bad_row_and_column() -> None:
    candles, obs, atr = _frames()
    obs.iloc[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"row 5 .*'y'"):
        EnvData.from_frames(candles, obs, atr)
    candles, obs, atr = _frames()
    atr[3] = 0.0
    with pytest.raises(ValueError, match=r"'atr'.*row 3"):
        EnvData.from_frames(candles, obs, atr)
    candles, obs, atr = _frames()
    candles.iloc[7, candles.columns.get_loc("close")] = np.inf
    with pytest.raises(ValueError, match=r"'close'.*row 7"):
        EnvData.from_frames(candles, obs, atr)
    candles, obs, atr = _frames()
    with pytest.raises(ValueError, match="UTC"):
        EnvData.from_frames(candles.tz_localize(None), obs.tz_localize(None), atr)


def test_account_features_function_matches_env_observation() -> None:
    # the serving policy rebuilds the account part from a PositionView: it must equal the env's
    env = TradingEnv(_hand_data(), NO_COSTS_LOG)
    env.reset()
    env.step_decision(Decision(1, leverage=2.0, size_frac=0.5))
    env.step_decision(None)
    obs, *_ = env.step_decision(None)
    for position in (env.position_view(), env.account_state):
        feats = account_features(
            position,
            mark_price=9_950.0,
            equity_usdt=env.equity_usdt,
            peak_equity_usdt=10_100.0,
            config=NO_COSTS_LOG,
        )
        assert feats.dtype == np.float32 and np.array_equal(feats, obs[2:])


def test_lean_info_has_equity_every_step_and_totals_at_the_end() -> None:
    data = make_env_data(120, seed=2, vol_per_bar=0.02)
    lean = TradingEnv(data, EnvConfig(episode_len_bars=8, random_start=False))
    full = TradingEnv(data, EnvConfig(episode_len_bars=8, random_start=False, info_level="full"))
    lean.reset()
    full.reset()
    actions = np.random.default_rng(3).uniform(-1, 1, (8, 5)).astype(np.float32)
    for t, a in enumerate(actions):
        obs_l, rew_l, term_l, trunc_l, info_l = lean.step(a)
        obs_f, rew_f, term_f, trunc_f, info_f = full.step(a)
        assert np.array_equal(obs_l, obs_f) and (rew_l, term_l, trunc_l) == (rew_f, term_f, trunc_f)
        assert lean.full_info() == info_f  # the full snapshot stays available on demand
        components = ("reward_base", "reward_turnover_penalty", "reward_drawdown_penalty")
        assert rew_l == pytest.approx(info_l["reward_base"] - info_l["reward_turnover_penalty"]
                                      - info_l["reward_drawdown_penalty"], abs=1e-12)
        if t < 7:
            assert info_l == {"equity_usdt": info_f["equity_usdt"], **{k: info_f[k] for k in components}}
    totals = ("fees_paid_usdt", "funding_paid_usdt", "slippage_paid_usdt", "liquidation_fees_usdt",
              "turnover_usdt", "n_trades", "n_fills", "n_skipped_min_notional", "n_fallback_funding")  # fmt: skip
    assert trunc_l and info_l == {"equity_usdt": info_f["equity_usdt"], **{k: info_f[k] for k in components + totals}}
    assert info_f["n_trades"] > 0
