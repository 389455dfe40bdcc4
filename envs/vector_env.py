"""Batched trading env: N copies of :class:`envs.trading_env.TradingEnv` stepped at once in compiled code.

All N envs share the data arrays; their states are the rows of two arrays, and one call to
:func:`envs.kernel.batch_step` steps all of them with the same :func:`envs.kernel.env_step` the
single env runs, so a batched env and N single envs with the same spans and actions give identical
observations, rewards and equity (tested in ``tests/envs/test_vector_env.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from envs import kernel as K
from envs.accounting import raise_kernel_error
from envs.actions import decode_action
from envs.trading_env import ACCOUNT_FEATURES, EnvConfig, EnvData, align_starts, env_params, kernel_arrays
from market.decision import NonFiniteDecisionError

_START_BUFFER = 4_096


class BatchedTradingEnv(VectorEnv):
    """``num_envs`` trading envs over the same data, stepped together (gymnasium ``VectorEnv``).

    Spaces: ``single_observation_space`` float32 ``(F + 6,)`` and ``single_action_space``
    ``Box(-1, 1, (5,))`` as in :class:`~envs.trading_env.TradingEnv`; batched ``(N, F + 6)`` and
    ``(N, 5)``. Episodes follow ``config`` (span, random start, termination rules); the random
    starts come from ``self.np_random`` (seeded by :meth:`reset`). The levers of ``config`` act as in
    the single env (each env's step runs the same :func:`envs.kernel.env_step`): with a decision interval
    of k bars one step reads one action and runs every bar to the next decision bar, and random starts are
    moved to decision bars.

    Autoreset: same-step (``AutoresetMode.SAME_STEP``): when env k ends, ``step`` returns the first
    observation of its next episode in ``obs[k]``; ``infos["final_obs"]`` (float32 (N, F + 6),
    valid where the mask ``infos["_final_obs"]`` is True) holds the last observations and
    ``infos["final_info"]`` the episode totals (``envs.kernel.FINAL_STATS`` -> float64 (N,) arrays,
    mask ``infos["_final_info"]``). Every step
    ``infos["equity_usdt"]`` holds the equity of each env at the close (float64 (N,)).

    Parameters
    ----------
    data : EnvData
        At least 2 bars.
    config : EnvConfig | None
    num_envs : int
        N >= 1.
    copy : bool
        True (default): every ``step`` returns new arrays the caller owns (the kernel writes into
        them directly); False returns the internal buffers, overwritten by the next call.

    Raises
    ------
    TypeError
        If ``data`` is not an :class:`EnvData`.
    ValueError
        If ``num_envs < 1`` or ``data`` has fewer than 2 bars.
    """

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": AutoresetMode.SAME_STEP}  # type: ignore[misc]  # gymnasium annotates it per instance; it is a class constant

    def __init__(self, data: EnvData, config: EnvConfig | None = None, num_envs: int = 1, copy: bool = True):
        if not isinstance(data, EnvData):
            raise TypeError(f"data must be an EnvData, got {type(data).__name__}")
        if len(data) < 2:
            raise ValueError(f"data needs at least 2 bars, got {len(data)}")
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.data = data
        self.config = config if config is not None else EnvConfig()
        self.num_envs = int(num_envs)
        self.copy = copy
        n, dim = self.num_envs, data.market_obs.shape[1] + len(ACCOUNT_FEATURES)
        self.single_observation_space = spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        self.single_action_space = spaces.Box(-1.0, 1.0, (5,), np.float32)
        self.observation_space = batch_space(self.single_observation_space, n)
        self.action_space = batch_space(self.single_action_space, n)
        self._bars, self._times, self._mobs = kernel_arrays(data, self.config)
        self._p = env_params(self.config)
        self._fs = np.zeros((n, K.N_ENV_FLOAT), dtype=np.float64)
        self._is = np.zeros((n, K.N_INT), dtype=np.int64)
        self._obs = np.zeros((n, dim), dtype=np.float32)
        self._final_obs = np.zeros((n, dim), dtype=np.float32)
        self._final_stats = np.zeros((n, len(K.FINAL_STATS)), dtype=np.float64)
        self._rewards = np.zeros(n, dtype=np.float64)
        self._terminated = np.zeros(n, dtype=np.bool_)
        self._truncated = np.zeros(n, dtype=np.bool_)
        self._equity = np.zeros(n, dtype=np.float64)
        self._ev = np.zeros((n, K.MAX_EVENTS, K.N_EV), dtype=np.float64)
        self._evi = np.zeros((n, K.MAX_EVENTS, K.N_EVI), dtype=np.int64)
        self._out = np.zeros((n, K.N_OUT), dtype=np.float64)
        self._starts = np.zeros(_START_BUFFER + n, dtype=np.int64)
        last = len(data) - 1
        length = self.config.episode_len_bars
        self._cursor = np.array([len(self._starts), 0 if length is None else length, last], dtype=np.int64)
        self._started = False
        self._action_shape = (n, 5)
        self._refill_at = len(self._starts) - n

    # -- episode starts ----------------------------------------------------------------------------

    def _draw_starts(self, size: int) -> np.ndarray:
        """Start indices with the single env's rule (``TradingEnv._span`` without options), each moved to the
        first decision bar at or after it (:func:`envs.trading_env.align_starts`)."""
        last = len(self.data) - 1
        length = self.config.episode_len_bars
        if not self.config.random_start or (length is not None and length >= last):
            starts = np.zeros(size, dtype=np.int64)
        else:
            high = last if length is None else last - length + 1
            starts = self.np_random.integers(0, high, size=size).astype(np.int64)
        if self.config.trading_rules.decision_interval_bars == 1:
            return starts
        return align_starts(starts, self._bars, last)

    def _refill_starts(self) -> None:
        self._starts[:] = self._draw_starts(len(self._starts))
        self._cursor[0] = 0

    # -- gymnasium API -----------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset all N envs.

        Parameters
        ----------
        seed : int | None
            Seeds ``self.np_random`` (the random starts).
        options : dict | None
            ``{"start_index": (N,) ints, "end_index": (N,) ints}`` runs fixed spans (as the single
            env's options, per env); later autoresets use random starts again.

        Returns
        -------
        (observations (N, F + 6) float32, infos ``{"equity_usdt": (N,)}``)

        Raises
        ------
        ValueError
            On unknown option keys or an invalid span.
        """
        if seed is not None:
            self._np_random, self._np_random_seed = seeding.np_random(seed)
            self._refill_starts()
        elif self._cursor[0] > len(self._starts) - self.num_envs:
            self._refill_starts()
        last = len(self.data) - 1
        n = self.num_envs
        length = self.config.episode_len_bars
        if options:
            unknown = set(options) - {"start_index", "end_index"}
            if unknown:
                raise ValueError(f"unknown reset options {sorted(unknown)}; allowed: start_index, end_index")
            starts = np.broadcast_to(np.asarray(options.get("start_index", 0), dtype=np.int64), (n,))
            if options.get("end_index") is not None:
                ends = np.broadcast_to(np.asarray(options["end_index"], dtype=np.int64), (n,))
            else:
                ends = starts * 0 + last if length is None else np.minimum(starts + length, last)
            bad = np.flatnonzero(~((starts >= 0) & (starts < ends) & (ends <= last)))
            if len(bad):
                k = int(bad[0])
                raise ValueError(
                    f"env {k}: evaluation span needs 0 <= start_index < end_index <= {last}, "
                    f"got ({int(starts[k])}, {int(ends[k])})"
                )
        else:
            starts = self._starts[self._cursor[0] : self._cursor[0] + n].copy()
            self._cursor[0] += n
            ends = np.full(n, last) if length is None else np.minimum(starts + length, last)
        for k in range(n):
            K.reset_env(self._fs[k], self._is[k], int(starts[k]), int(ends[k]), self._p)
            K.write_observation(self._fs[k], self._is[k], self._bars, self._mobs, self._p, self._obs[k])
        self._equity[:] = self._fs[:, K.E_EQUITY]
        self._started = True
        obs = self._obs.copy() if self.copy else self._obs
        return obs, {"equity_usdt": self._equity.copy()}

    def step(self, actions):
        """Step all N envs with ``actions`` (N, 5); see the class docstring for autoreset and infos.

        Raises
        ------
        RuntimeError
            If called before :meth:`reset`.
        ValueError
            If ``actions`` does not have shape (N, 5).
        market.decision.NonFiniteDecisionError
            If an action holds a non-finite value (names the env; the envs before it in the batch
            have stepped, the others have not: reset before going on).
        """
        if not self._started:
            raise RuntimeError("step called before reset(); call reset()")
        a = actions
        if a.__class__ is not np.ndarray or a.dtype.char != "f" or not a.flags.c_contiguous:
            a = np.ascontiguousarray(actions, dtype=np.float32)
        if a.shape != self._action_shape:
            raise ValueError(f"actions must have shape ({self.num_envs}, 5), got {a.shape}")
        if self._cursor[0] > self._refill_at:
            self._refill_starts()
        if self.copy:
            # Fresh arrays the kernel writes into (every row of obs, rewards, flags and equity is
            # written each step): the caller owns them, and no second copy is made. final_obs and
            # final_stats stay scratch buffers, copied below only on steps where an episode ended.
            n = self.num_envs
            self._obs = np.empty_like(self._obs)
            self._rewards = np.empty(n, dtype=np.float64)
            self._terminated = np.empty(n, dtype=np.bool_)
            self._truncated = np.empty(n, dtype=np.bool_)
            self._equity = np.empty(n, dtype=np.float64)
        code, value = K.batch_step(
            a, self._fs, self._is, self._bars, self._times, self._mobs, self._p, self._obs, self._rewards,
            self._terminated, self._truncated, self._final_obs, self._final_stats, self._equity,
            self._starts, self._cursor, self._ev, self._evi, self._out,
        )  # fmt: skip
        if code != K.OK:
            k = value
            self._started = False
            if code == K.ERR_ACTION:
                try:
                    decode_action(a[k], self.config.actions)
                except NonFiniteDecisionError as exc:
                    raise NonFiniteDecisionError(f"env {k}: {exc}") from None
            raise_kernel_error(code, self._out[k], self.config.costs, f"BatchedTradingEnv.step, env {k}")
        infos: dict[str, Any] = {"equity_usdt": self._equity}
        if value:
            done = self._terminated | self._truncated
            # copy=True: the caller owns a copy; copy=False: the buffer itself (overwritten next step)
            infos["final_obs"] = self._final_obs.copy() if self.copy else self._final_obs
            infos["_final_obs"] = done
            infos["final_info"] = dict(zip(K.FINAL_STATS, self._final_stats.T.copy(), strict=True))
            infos["_final_info"] = done
        return self._obs, self._rewards, self._terminated, self._truncated, infos

    @property
    def equity_usdt(self) -> np.ndarray:
        """Equity of each env at the last close, float64 (N,) (a copy)."""
        return self._equity.copy()

    def close_extras(self, **kwargs: Any) -> None:
        """Nothing to release (no subprocesses)."""
