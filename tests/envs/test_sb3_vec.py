"""BatchedSB3VecEnv: SB3's VecEnv API over the batched env, and PPO trains on it."""

from __future__ import annotations

import numpy as np
import torch
from stable_baselines3 import PPO

from agents.ppo_sb3 import make_vec_env
from envs.sb3_vec import BatchedSB3VecEnv
from envs.trading_env import EnvConfig, TradingEnv
from tests.envs.helpers import make_env_data


def test_steps_match_single_env_and_report_episode_ends() -> None:
    data = make_env_data(200, seed=4, vol_per_bar=0.02)
    cfg = EnvConfig(episode_len_bars=6, random_start=False)
    venv = BatchedSB3VecEnv(data, cfg, 2)
    venv.seed(0)
    obs = venv.reset()
    single = TradingEnv(data, cfg)
    obs1, _ = single.reset()
    assert obs.shape == (2, 10) and obs.dtype == np.float32 and np.array_equal(obs[0], obs1)
    actions = np.random.default_rng(1).uniform(-1, 1, (6, 2, 5)).astype(np.float32)
    actions[:, 1] = actions[:, 0]  # both envs start at bar 0 and take the same actions
    for t in range(6):
        venv.step_async(actions[t])
        obs, rewards, dones, infos = venv.step_wait()
        obs1, reward1, term1, trunc1, info1 = single.step(actions[t, 0])
        assert rewards.dtype == np.float32 and rewards[0] == np.float32(reward1)
        assert infos[0]["equity_usdt"] == info1["equity_usdt"] == infos[1]["equity_usdt"]
        assert dones[0] == (term1 or trunc1)
    assert dones.all() and np.array_equal(infos[0]["terminal_observation"], obs1)
    assert infos[0]["TimeLimit.truncated"] and infos[0]["n_trades"] == info1["n_trades"]
    assert infos[0]["fees_paid_usdt"] == info1["fees_paid_usdt"]
    assert np.array_equal(obs[0], single.reset()[0])  # autoreset: the next episode's first observation


def test_ppo_learns_on_batched_vec_env() -> None:
    torch.set_num_threads(1)
    data = make_env_data(300, seed=5)
    venv = make_vec_env(data, EnvConfig(episode_len_bars=32), n_envs=4, seed=0, batched=True)
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=256)
    assert model.num_timesteps == 256 and len(model.ep_info_buffer) == 8
    assert all(ep["l"] == 32 for ep in model.ep_info_buffer)
