"""Stable-Baselines3 ``VecEnv`` backed by :class:`envs.vector_env.BatchedTradingEnv`.

SB3 trains on its own ``VecEnv`` API, not on gymnasium's ``VectorEnv``; this adapter steps all envs
in one compiled call instead of SB3's ``DummyVecEnv`` loop over N Python envs. Wrap it in SB3's
``VecMonitor`` for the ``rollout/ep_*`` statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from envs.trading_env import EnvConfig, EnvData
from envs.vector_env import BatchedTradingEnv


class BatchedSB3VecEnv(VecEnv):
    """SB3 ``VecEnv`` over ``num_envs`` trading envs stepped together in compiled code.

    ``step_wait`` returns observations float32 (N, F + 6), rewards float32 (N,), dones bool (N,)
    and one info dict per env: ``{"equity_usdt": float}`` every step; at the end of an episode also
    ``terminal_observation`` (the last observation; the returned one is the next episode's first),
    ``TimeLimit.truncated`` and the episode totals of ``envs.kernel.FINAL_STATS`` (so
    ``agents.ppo_sb3.EpisodeMetricsCallback`` works unchanged).

    Parameters
    ----------
    data : EnvData
    config : EnvConfig
    num_envs : int
    """

    def __init__(self, data: EnvData, config: EnvConfig, num_envs: int) -> None:
        self.venv = BatchedTradingEnv(data, config, num_envs, copy=False)
        super().__init__(num_envs, self.venv.single_observation_space, self.venv.single_action_space)
        self._actions: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        """Reset all envs (seeded by the last :meth:`seed` call, if any); observations (N, F + 6)."""
        seed = self._seeds[0] if self._seeds and self._seeds[0] is not None else None
        obs, _ = self.venv.reset(seed=seed)
        self._reset_seeds()
        self._reset_options()
        return obs.copy()

    def step_async(self, actions: np.ndarray) -> None:
        """Store the actions (N, 5) for :meth:`step_wait`."""
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        """Step all envs; see the class docstring for the infos."""
        obs, rewards, terminated, truncated, infos = self.venv.step(self._actions)
        equity = infos["equity_usdt"].tolist()
        out_infos: list[dict[str, Any]] = [{"equity_usdt": e} for e in equity]
        dones = terminated | truncated
        if "final_obs" in infos:
            final = {name: values.tolist() for name, values in infos["final_info"].items()}
            for k in np.flatnonzero(dones).tolist():
                info = out_infos[k]
                info.update({name: values[k] for name, values in final.items()})
                info["terminal_observation"] = infos["final_obs"][k]
                info["TimeLimit.truncated"] = bool(truncated[k] and not terminated[k])
        return obs.copy(), rewards.astype(np.float32), dones, out_infos

    def close(self) -> None:
        """Nothing to release."""
        self.venv.close()

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seed the random episode starts at the next :meth:`reset` (one generator for all envs)."""
        self._seeds = [seed] + [None] * (self.num_envs - 1)
        return self._seeds

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The batched env's attribute, once per selected env."""
        return [getattr(self.venv, attr_name)] * len(list(self._get_indices(indices)))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set an attribute on the batched env (shared by all envs).

        Raises
        ------
        ValueError
            If only some envs are selected (the envs share one object).
        """
        if len(list(self._get_indices(indices))) != self.num_envs:
            raise ValueError("BatchedSB3VecEnv: attributes are shared by all envs; set them for all indices")
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        """Not supported: the envs are rows of one batched env, not separate objects.

        Raises
        ------
        NotImplementedError
            Always.
        """
        raise NotImplementedError(f"BatchedSB3VecEnv has no per-env objects to call {method_name!r} on")

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        """No gymnasium wrappers inside: False for every env."""
        return [False] * len(list(self._get_indices(indices)))

