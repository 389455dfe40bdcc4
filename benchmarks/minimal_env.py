"""The minimal possible trading env: the reference the issue's throughput targets compare against.

It indexes precomputed arrays and books an O(1) PnL (position x log return of the next bar): no
costs, no stops, no funding, no liquidation, no account features. Same observation and action
spaces as :class:`envs.trading_env.TradingEnv`, so SB3 trains the same network on both.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class MinimalTradingEnv(gym.Env):
    """Observation ``obs[t]`` (precomputed, float32 (T, D)); reward ``position * log(close[t+1] / close[t])``
    with ``position = sign(a[0])`` outside a dead zone of 0.3; episodes of ``episode_len_bars`` steps
    from a seeded random start, ``truncated`` at the end.

    Parameters
    ----------
    obs : np.ndarray
        float32 (T, D).
    close : np.ndarray
        float64 (T,), > 0.
    episode_len_bars : int
        Steps per episode (< T).

    Raises
    ------
    ValueError
        If the shapes disagree or ``episode_len_bars`` does not fit in the data.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}  # type: ignore[misc]  # gymnasium annotates it per instance; it is a class constant

    def __init__(self, obs: np.ndarray, close: np.ndarray, episode_len_bars: int = 720) -> None:
        super().__init__()
        obs = np.ascontiguousarray(obs, dtype=np.float32)
        close = np.asarray(close, dtype=np.float64)
        if obs.ndim != 2 or close.shape != (len(obs),):
            raise ValueError(f"obs (T, D) and close (T,) must align, got {obs.shape} and {close.shape}")
        if not 1 <= episode_len_bars < len(obs) - 1:
            raise ValueError(f"episode_len_bars must be in [1, {len(obs) - 2}], got {episode_len_bars}")
        self._obs = obs
        self._ret = np.diff(np.log(close), append=0.0).tolist()  # return from t to t+1
        self._len = episode_len_bars
        self.observation_space = spaces.Box(-np.inf, np.inf, (obs.shape[1],), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (5,), np.float32)
        self._t = 0
        self._end = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode at a random bar; returns ``(obs[start], {})``."""
        super().reset(seed=seed)
        self._t = int(self.np_random.integers(0, len(self._obs) - self._len - 1))
        self._end = self._t + self._len
        return self._obs[self._t].copy(), {}

    def step(self, action):
        """Hold ``sign(a[0])`` (0 inside the dead zone) over the next bar."""
        a0 = float(action[0])
        position = 1.0 if a0 > 0.3 else (-1.0 if a0 < -0.3 else 0.0)
        reward = position * self._ret[self._t]
        self._t += 1
        return self._obs[self._t].copy(), reward, False, self._t >= self._end, {}
