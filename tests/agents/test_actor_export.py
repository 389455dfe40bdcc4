"""The exported actor (safetensors, no pickle) reproduces SB3's deterministic action exactly."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO

from agents.actor import actor_state_from_sb3, load_actor, save_actor
from regime.hmm import ModelLoadError


class _BoxEnv(gym.Env):
    observation_space = gym.spaces.Box(-np.inf, np.inf, (11,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (5,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(11, np.float32), {}

    def step(self, action):
        return np.zeros(11, np.float32), 0.0, True, False, {}


@pytest.fixture(scope="module")
def sb3_model():
    model = PPO("MlpPolicy", _BoxEnv(), seed=3, policy_kwargs={"net_arch": {"pi": [16, 8], "vf": [16, 8]}}, device="cpu")
    # move the weights away from their initialisation so the test is not about zeros
    for p in model.policy.parameters():
        p.data.add_(0.3 * np.random.default_rng(0).standard_normal(tuple(p.shape)).astype(np.float32).__array__().mean())
    return model


def test_exported_actor_matches_sb3_predict(sb3_model, tmp_path):
    path = tmp_path / "policy.safetensors"
    save_actor(path, actor_state_from_sb3(sb3_model.policy))
    actor = load_actor(path, obs_dim=11, action_dim=5, hidden=(16, 8), activation="tanh")
    rng = np.random.default_rng(1)
    for _ in range(20):
        obs = rng.normal(0, 2, 11).astype(np.float32)
        expected, _ = sb3_model.predict(obs, deterministic=True)
        np.testing.assert_allclose(actor.act(obs), expected, rtol=0, atol=1e-6)


def test_truncated_actor_file_raises_model_load_error(sb3_model, tmp_path):
    path = tmp_path / "policy.safetensors"
    save_actor(path, actor_state_from_sb3(sb3_model.policy))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=r"policy\.safetensors"):
        load_actor(path, obs_dim=11, action_dim=5, hidden=(16, 8), activation="tanh")


def test_wrong_architecture_raises_model_load_error(sb3_model, tmp_path):
    path = tmp_path / "policy.safetensors"
    save_actor(path, actor_state_from_sb3(sb3_model.policy))
    with pytest.raises(ModelLoadError, match="do not match"):
        load_actor(path, obs_dim=11, action_dim=5, hidden=(32, 8), activation="tanh")
