"""BatchedTradingEnv equals N single TradingEnvs, and behaves as a gymnasium VectorEnv."""

from __future__ import annotations

import numpy as np
import pytest

from envs.actions import ActionConfig
from envs.trading_env import EnvConfig, TradingEnv
from envs.vector_env import BatchedTradingEnv
from market.decision import NonFiniteDecisionError
from tests.envs.helpers import make_env_data

N_ENVS = 12
N_STEPS = 300


def _config() -> EnvConfig:
    # High leverage on volatile data: stops, take-profits, liquidations and funding all happen.
    return EnvConfig(
        episode_len_bars=N_STEPS, info_level="full", min_equity_frac=0.05, max_drawdown_frac=0.95,
        actions=ActionConfig(max_leverage=60.0, max_size_frac=1.0),
    )  # fmt: skip


def test_batched_env_equals_single_envs_step_for_step() -> None:
    data = make_env_data(700, seed=3, vol_per_bar=0.03)
    cfg = _config()
    rng = np.random.default_rng(0)
    starts = rng.integers(0, 700 - N_STEPS - 1, N_ENVS)
    ends = starts + N_STEPS
    batched = BatchedTradingEnv(data, cfg, N_ENVS)
    obs_b, info_b = batched.reset(seed=1, options={"start_index": starts, "end_index": ends})
    singles = [TradingEnv(data, cfg) for _ in range(N_ENVS)]
    live = np.ones(N_ENVS, dtype=bool)  # compared until each env's first episode ends
    reasons: set[str] = set()
    funding = 0.0
    for k, env in enumerate(singles):
        obs, info = env.reset(options={"start_index": int(starts[k]), "end_index": int(ends[k])})
        assert np.array_equal(obs, obs_b[k]) and info["equity_usdt"] == info_b["equity_usdt"][k]
    for _ in range(N_STEPS):
        actions = rng.uniform(-1.2, 1.2, (N_ENVS, 5)).astype(np.float32)
        obs_b, rew_b, term_b, trunc_b, info_b = batched.step(actions)
        for k in np.flatnonzero(live):
            obs, reward, term, trunc, info = singles[k].step(actions[k])
            assert reward == rew_b[k] and term == term_b[k] and trunc == trunc_b[k]
            assert info["equity_usdt"] == info_b["equity_usdt"][k]
            reasons.update(f.reason for f in info["fills"])
            funding += abs(info["funding_usdt"])
            if term or trunc:
                assert info_b["_final_obs"][k] and np.array_equal(obs, info_b["final_obs"][k])
                final = info_b["final_info"]
                assert final["fees_paid_usdt"][k] == info["fees_paid_usdt"]
                assert final["n_trades"][k] == info["n_trades"]
                live[k] = False
            else:
                assert np.array_equal(obs, obs_b[k])
        if not live.any():
            break
    assert {"entry", "stop", "take_profit", "liquidation"} <= reasons and funding > 0


def test_autoreset_starts_a_new_episode_in_the_same_step() -> None:
    data = make_env_data(200, seed=1)
    env = BatchedTradingEnv(data, EnvConfig(episode_len_bars=5), 3)
    obs, _ = env.reset(seed=0)
    flat = np.zeros((3, 5), dtype=np.float32)
    for _ in range(4):
        obs, _, term, trunc, infos = env.step(flat)
        assert not (term | trunc).any() and "final_obs" not in infos
    obs, _, term, trunc, infos = env.step(flat)
    assert trunc.all() and not term.any() and infos["_final_obs"].all()
    # the new episodes start flat at the initial equity, observation of their own start bar
    assert np.array_equal(obs[:, -6:], np.zeros((3, 6), dtype=np.float32))
    assert (infos["equity_usdt"] == 10_000.0).all() and np.array_equal(infos["final_info"]["n_trades"], [0, 0, 0])


def test_same_seed_same_batched_trajectory() -> None:
    data = make_env_data(300, seed=2, vol_per_bar=0.02)
    actions = np.random.default_rng(5).uniform(-1, 1, (150, 4, 5)).astype(np.float32)

    def run(seed: int) -> list[np.ndarray]:
        env = BatchedTradingEnv(data, EnvConfig(episode_len_bars=40), 4)
        out = [env.reset(seed=seed)[0]]
        out += [env.step(a)[0] for a in actions]
        return out

    first, second, other = run(7), run(7), run(8)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_step_errors_name_the_problem() -> None:
    env = BatchedTradingEnv(make_env_data(100), EnvConfig(), 2)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.zeros((2, 5), dtype=np.float32))
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
        env.step(np.zeros((3, 5), dtype=np.float32))
    bad = np.zeros((2, 5), dtype=np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(NonFiniteDecisionError, match=r"env 1.*'size'"):
        env.step(bad)
    with pytest.raises(ValueError, match="env 0: evaluation span"):
        env.reset(options={"start_index": [50, 10], "end_index": [40, 20]})


def test_copy_true_returns_arrays_the_next_step_does_not_overwrite() -> None:
    data = make_env_data(200, seed=4, vol_per_bar=0.02)
    actions = np.random.default_rng(2).uniform(-1, 1, (12, 3, 5)).astype(np.float32)
    owned, shared = BatchedTradingEnv(data, EnvConfig(episode_len_bars=5), 3), \
        BatchedTradingEnv(data, EnvConfig(episode_len_bars=5), 3, copy=False)  # fmt: skip
    owned.reset(seed=0)
    shared.reset(seed=0)
    kept, snapshots = [], []
    for a in actions:
        out = owned.step(a)
        ref = shared.step(a)
        kept.append(out)
        snapshots.append([np.array(x, copy=True) for x in ref[:4]] + [
            {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else
                 {n: np.array(c, copy=True) for n, c in v.items()}) for k, v in ref[4].items()}])  # fmt: skip
    # every earlier result still holds its own step's values (equal to the copy=False env's at that step)
    for out, snap in zip(kept, snapshots, strict=True):
        for x, y in zip(out[:4], snap[:4], strict=True):
            assert np.array_equal(x, y)
        assert out[4].keys() == snap[4].keys()
        assert np.array_equal(out[4]["equity_usdt"], snap[4]["equity_usdt"])
        if "final_info" in snap[4]:
            done = snap[4]["_final_obs"]
            assert np.array_equal(out[4]["final_obs"][done], snap[4]["final_obs"][done])
            assert all(np.array_equal(out[4]["final_info"][k][done], snap[4]["final_info"][k][done])
                       for k in snap[4]["final_info"])  # fmt: skip
    assert sum("final_info" in s[4] for s in snapshots) >= 2
