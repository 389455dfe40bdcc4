"""PPO training with Stable-Baselines3, TensorBoard logging and checkpoint selection on validation.

The validation backtest and the episode statistics are injected as callables, so this module
does not depend on ``training`` (data flows market -> ... -> agents -> training).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import HParam, configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

from agents.tb_logging import EXPOSURE_FROM_END
from envs.trading_env import EnvConfig, EnvData, TradingEnv

EpisodeStats = Callable[[np.ndarray], dict[str, float]]  # equity path (n+1,) -> stats
Validator = Callable[[PPO], dict[str, float]]  # current model -> validation metrics (must hold "sortino")


def resolve_device(device: str) -> str:
    """Map ``auto`` to ``cuda`` when a GPU is visible, else ``cpu``; reject an unavailable ``cuda``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


def make_vec_env(
    data: EnvData | Sequence[tuple[str, EnvData, EnvConfig]], config: EnvConfig, *, n_envs: int, seed: int,
    batched: bool = False,
) -> DummyVecEnv | VecMonitor:
    """``n_envs`` TradingEnvs with random episode starts, seeded ``seed, seed+1, ...``.

    ``data`` as a sequence of ``(symbol, EnvData, EnvConfig)`` legs (a pooled multi-symbol run): each env is an
    :class:`envs.multi_env.MultiSymbolEnv` drawing a symbol per episode, trading it with that symbol's own data and
    config (instrument spec); ``batched`` is not available then.

    Each env is wrapped in SB3's ``Monitor`` so ``rollout/ep_rew_mean`` and ``ep_len_mean`` are logged.
    With ``batched=True`` the envs are rows of one compiled batched env
    (:class:`envs.sb3_vec.BatchedSB3VecEnv`, random starts from one generator seeded ``seed``) under
    SB3's ``VecMonitor``: same env dynamics and infos, without the per-env Python loop.
    """
    if not isinstance(data, EnvData):
        if batched:
            raise ValueError("make_vec_env: the batched env trades one symbol; pooled legs need batched=False")
        from envs.multi_env import MultiSymbolEnv

        legs = list(data)
        venv = DummyVecEnv([lambda: Monitor(MultiSymbolEnv(legs)) for _ in range(n_envs)])
        venv.seed(seed)
        return venv
    if batched:
        from envs.sb3_vec import BatchedSB3VecEnv

        vec = VecMonitor(BatchedSB3VecEnv(data, config, n_envs))
        vec.seed(seed)
        return vec
    venv = DummyVecEnv([lambda: Monitor(TradingEnv(data, config)) for _ in range(n_envs)])
    venv.seed(seed)
    return venv


class EpisodeMetricsCallback(BaseCallback):
    """Log trading statistics of every finished training episode to TensorBoard (``episode/*``).

    The same names and definitions as the RLlib backend's ``TradingEpisodeCallback``: the stats of
    the equity path, the env's episode totals, and ``avg_leverage`` = mean |``pos_exposure``|
    (signed notional / equity, read from the raw observation: no observation normalisation is used).
    """

    def __init__(self, episode_stats: EpisodeStats, initial_equity_usdt: float):
        super().__init__()
        self._stats = episode_stats
        self._initial = initial_equity_usdt
        self._paths: list[list[float]] = []
        self._exposure: list[list[float]] = []

    def _on_training_start(self) -> None:
        self._paths = [[] for _ in range(self.training_env.num_envs)]
        self._exposure = [[] for _ in range(self.training_env.num_envs)]

    def _on_step(self) -> bool:
        new_obs = self.locals.get("new_obs")
        for i, (info, done) in enumerate(zip(self.locals["infos"], self.locals["dones"], strict=True)):
            path = self._paths[i]
            if not path:
                path.append(self._initial)  # every episode starts flat at the initial equity
            path.append(info["equity_usdt"])
            if done:  # the env was reset: new_obs[i] is the next episode's first observation
                terminal = info.get("terminal_observation")
                if terminal is not None:
                    self._exposure[i].append(abs(float(terminal[-EXPOSURE_FROM_END])))
            elif new_obs is not None:
                self._exposure[i].append(abs(float(new_obs[i][-EXPOSURE_FROM_END])))
            if done:
                stats = self._stats(np.asarray(path, dtype=np.float64))
                stats.update(
                    fees_usdt=info["fees_paid_usdt"],
                    funding_usdt=info["funding_paid_usdt"],
                    n_trades=info["n_trades"],
                    turnover_usdt=info["turnover_usdt"],
                    avg_leverage=float(np.mean(self._exposure[i])) if self._exposure[i] else float("nan"),
                )
                for key, value in stats.items():
                    if np.isfinite(value):
                        self.logger.record_mean(f"episode/{key}", float(value))
                self._paths[i], self._exposure[i] = [], []
        return True


class ValidationCallback(BaseCallback):
    """Every ``every_steps`` env steps, backtest the current policy on the validation period and keep
    the parameters with the best validation Sortino (checkpoint selection never sees the test period)."""

    def __init__(self, validator: Validator, every_steps: int, on_progress: Callable[[int], None] | None = None):
        super().__init__()
        self._validator = validator
        self._every = every_steps
        self._next = every_steps
        self._on_progress = on_progress
        self.best_sortino = -np.inf
        self.best_state: dict[str, Any] | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_step = 0
        self.history: list[dict[str, float]] = []

    def evaluate_now(self) -> None:
        """Backtest the current policy on the validation period, log it and keep it if best."""
        metrics = self._validator(self.model)  # type: ignore[arg-type]  # SB3 types it BaseAlgorithm; here a PPO
        metrics = {**metrics, "timesteps": float(self.num_timesteps)}
        self.history.append(metrics)
        for key, value in metrics.items():
            if np.isfinite(value):
                self.logger.record(f"val/{key}", float(value))
        score = metrics["sortino"] if np.isfinite(metrics["sortino"]) else -np.inf
        if self.best_state is None or score > self.best_sortino:
            self.best_sortino = score
            self.best_state = copy.deepcopy(self.model.policy.state_dict())
            self.best_metrics = metrics
            self.best_step = self.num_timesteps
        self.logger.record("val/best_sortino", float(self.best_sortino) if np.isfinite(self.best_sortino) else -1e9)

    def _on_step(self) -> bool:
        if self._on_progress is not None:
            self._on_progress(self.num_timesteps)
        if self.num_timesteps >= self._next:
            self._next += self._every
            self.evaluate_now()
        return True

    def _on_training_end(self) -> None:
        if not self.history or self.history[-1]["timesteps"] != self.num_timesteps:
            self.evaluate_now()


@dataclass
class PPOResult:
    """A trained model loaded with its best-validation parameters, and the selection record."""

    model: PPO
    best_step: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def train_ppo(
    train_data: EnvData | Sequence[tuple[str, EnvData, EnvConfig]],
    env_config: EnvConfig,
    ppo_config,
    *,
    seed: int,
    device: str,
    tensorboard_dir: Path,
    episode_stats: EpisodeStats,
    validator: Validator,
    on_progress: Callable[[int], None] | None = None,
    hparams: dict[str, Any] | None = None,
) -> PPOResult:
    """Train PPO on ``train_data`` and return it with the parameters that scored best on validation.

    ``train_data``: one symbol's :class:`EnvData`, or the ``(symbol, EnvData, EnvConfig)`` legs of a pooled run
    (:func:`make_vec_env`); ``env_config`` then only gives the initial equity of the episode statistics.

    TensorBoard receives SB3's scalars (``rollout/``, ``train/``), ``episode/*`` trading statistics
    of each training episode and ``val/*`` validation metrics, under ``tensorboard_dir/PPO_1``.
    """
    venv = make_vec_env(train_data, env_config, n_envs=ppo_config.n_envs, seed=seed)
    model = PPO(
        "MlpPolicy",
        venv,
        n_steps=ppo_config.n_steps,
        batch_size=ppo_config.batch_size,
        n_epochs=ppo_config.n_epochs,
        learning_rate=ppo_config.learning_rate,
        gamma=ppo_config.gamma,
        gae_lambda=ppo_config.gae_lambda,
        clip_range=ppo_config.clip_range,
        ent_coef=ppo_config.ent_coef,
        policy_kwargs={"net_arch": {"pi": list(ppo_config.net_arch), "vf": list(ppo_config.net_arch)}},
        tensorboard_log=str(tensorboard_dir),
        seed=seed,
        device=device,
        verbose=0,
    )
    model.set_logger(configure(str(Path(tensorboard_dir) / "PPO_1"), ["tensorboard"]))
    if hparams:
        model.logger.record("hparams", HParam(hparams, {"val/best_sortino": 0.0}), exclude=("stdout", "csv"))
    val_cb = ValidationCallback(validator, ppo_config.eval_every_steps, on_progress)
    model.learn(
        total_timesteps=ppo_config.total_timesteps,
        callback=CallbackList([EpisodeMetricsCallback(episode_stats, env_config.initial_equity_usdt), val_cb]),
        tb_log_name="PPO",
    )
    if val_cb.best_state is not None:
        model.policy.load_state_dict(val_cb.best_state)
    venv.close()
    return PPOResult(model=model, best_step=val_cb.best_step, best_metrics=val_cb.best_metrics, history=val_cb.history)

