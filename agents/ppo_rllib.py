"""PPO on Ray RLlib (new API stack): one machine or a Ray cluster, same env, same bundle as SB3.

The agent trains on the registered ``ats/TradingEnv-v1`` (:data:`envs.ENV_ID`) built from the same
:class:`envs.trading_env.EnvData` (normalised market observation) and
:class:`envs.trading_env.EnvConfig` as the Stable-Baselines3 backend (:mod:`agents.ppo_sb3`);
RLlib creates it in every env runner with ``gymnasium.make_vec(ENV_ID, data=..., config=...)``.

Policy network parity with SB3 and :class:`agents.actor.ActorNet`: RLlib's default PPO RLModule is
configured with ``fcnet_hiddens = net_arch``, ``tanh``, separate actor and critic encoders
(``vf_share_layers=False``), a linear policy head and a state-independent log-std
(``free_log_std=True``, SB3's ``log_std`` parameter). The Gaussian mean is then
``pi(actor_encoder(obs))``, exactly ActorNet's ``action_net(policy_net(obs))``; RLlib's
deterministic action is that mean clipped to the ``[-1, 1]`` box (``normalize_actions`` is the
identity for that box). :func:`actor_state_from_rllib` renames the tensors, so the exported
``policy.safetensors`` is the SB3 layout and ``ats evaluate`` / ``ats serve`` cannot tell which
backend trained it. The PPO loss is set to SB3's defaults: clipped surrogate without the KL
penalty (Schulman et al. 2017), ``vf_coef = 0.5``, global gradient-norm clip 0.5, no value clip;
both standardise the GAE advantages (RLlib per train batch, SB3 per minibatch). Other differences:
weight initialisation (SB3 uses orthogonal init) and RLlib's fragment-based sampling, so equal seeds
do not give equal runs across backends.

The validation backtest and the episode statistics are injected as callables (the module does not
import ``training``). Checkpoint selection works as in SB3: every ``eval_every_steps`` env steps the
current actor is backtested on the validation period and the tensors with the best validation
Sortino are kept; the test period is never seen.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.actor import ActorNet
from agents.devices import rllib_num_gpus
from agents.tb_logging import EXPOSURE_FROM_END, write_hparams, write_scalars, write_trading_layout
from envs import ENV_ID
from envs.actions import decode_action
from envs.trading_env import ACCOUNT_FEATURES, EnvConfig, EnvData
from market.decision import Decision, DecisionContext, StatelessPolicy

EpisodeStats = Callable[[np.ndarray], dict[str, float]]  # equity path (n+1,) -> stats
ActorValidator = Callable[[ActorNet], dict[str, float]]  # current actor -> validation metrics ("sortino")

#: Trading statistics summed per training iteration by :class:`TradingEpisodeCallback`.
_EPISODE_KEY = "ats_episode"

#: RLlib result entries mirrored under SB3's TensorBoard tags (so both backends share the charts).
SB3_TAGS: dict[tuple[str, ...], str] = {
    ("env_runners", "episode_return_mean"): "rollout/ep_rew_mean",
    ("env_runners", "episode_len_mean"): "rollout/ep_len_mean",
    ("learners", "default_policy", "policy_loss"): "train/policy_gradient_loss",
    ("learners", "default_policy", "vf_loss"): "train/value_loss",
    ("learners", "default_policy", "total_loss"): "train/loss",
    ("learners", "default_policy", "vf_explained_var"): "train/explained_variance",
    ("learners", "default_policy", "default_optimizer_learning_rate"): "train/learning_rate",
}


# ----------------------------------------------------------------------------------------------
# Weights: RLlib default PPO module <-> ActorNet
# ----------------------------------------------------------------------------------------------


def actor_state_from_rllib(module_state: Mapping[str, Any], n_hidden: int) -> dict[str, torch.Tensor]:
    """Rename the actor tensors of RLlib's default PPO module to :class:`ActorNet`'s names.

    ``encoder.actor_encoder.net.mlp.{2i}.{weight,bias}`` -> ``policy_net.{2i}.*`` (i < n_hidden; the
    odd indices are the activations, as in ActorNet's ``Sequential``) and ``pi.net.mlp.0.*`` ->
    ``action_net.*``. Critic tensors and ``pi.log_std`` are dropped (the deterministic action is the mean).

    Parameters
    ----------
    module_state : Mapping[str, Tensor | np.ndarray]
        ``RLModule.state_dict()`` or ``LearnerGroup.get_weights()[module_id]``.
    n_hidden : int
        Number of hidden layers (``len(net_arch)``).

    Returns
    -------
    dict[str, torch.Tensor]
        float32 CPU tensors, contiguous, ready for :func:`agents.actor.save_actor`.

    Raises
    ------
    ValueError
        If a layer is missing, or the policy head has hidden layers (``head_fcnet_hiddens`` set),
        or the encoder is shared with the critic: the module is then not ActorNet-shaped.
    """
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        if src not in module_state:
            raise ValueError(
                f"RLlib module has no tensor {src!r}: expected the default PPO module with fcnet_hiddens of "
                f"{n_hidden} layers and vf_share_layers=False (keys: {sorted(module_state)[:8]}...)"
            )
        out[dst] = torch.as_tensor(np.asarray(module_state[src]), dtype=torch.float32).detach().cpu().clone().contiguous()

    for i in range(n_hidden):
        for kind in ("weight", "bias"):
            take(f"encoder.actor_encoder.net.mlp.{2 * i}.{kind}", f"policy_net.{2 * i}.{kind}")
    if f"encoder.actor_encoder.net.mlp.{2 * n_hidden}.weight" in module_state:
        raise ValueError(f"RLlib actor encoder has more than {n_hidden} layers")
    if "pi.net.mlp.1.weight" in module_state or "pi.net.mlp.2.weight" in module_state:
        raise ValueError("RLlib policy head has hidden layers (head_fcnet_hiddens); ActorNet expects one linear head")
    for kind in ("weight", "bias"):
        take(f"pi.net.mlp.0.{kind}", f"action_net.{kind}")
    return out


def actor_from_tensors(tensors: Mapping[str, torch.Tensor], obs_dim: int, hidden: tuple[int, ...]) -> ActorNet:
    """An eval-mode :class:`ActorNet` (tanh) holding ``tensors`` (strict load: shapes must match)."""
    net = ActorNet(obs_dim, 5, tuple(hidden), "tanh")
    net.load_state_dict(dict(tensors), strict=True)
    return net.eval()


class ActorPolicy(StatelessPolicy):
    """A :class:`market.decision.Policy` around an :class:`ActorNet` (validation during training).

    Uses ``ctx.observation`` (the backtester's env observation, drawdown included): deterministic
    action = mean, clipped to [-1, 1], decoded with ``action_config``. Carries no state, needs one
    candle, places stops in the env's ATR.
    """

    name = "ppo"

    def __init__(self, actor: ActorNet, action_config):
        self.actor = actor
        self.action_config = action_config
        self.last_raw_action: np.ndarray | None = None

    def decide(self, ctx: DecisionContext) -> Decision:
        """The actor's deterministic decision on ``ctx.observation``; sets ``last_raw_action``."""
        self.last_raw_action = None
        if ctx.observation is None:
            raise ValueError("ActorPolicy needs ctx.observation (it is used inside backtests only)")
        self.last_raw_action = self.actor.act(ctx.observation)
        return decode_action(self.last_raw_action, self.action_config)


# ----------------------------------------------------------------------------------------------
# Episode statistics inside the env runners
# ----------------------------------------------------------------------------------------------


def _callback_base():
    from ray.rllib.callbacks.callbacks import RLlibCallback

    return RLlibCallback


class TradingEpisodeCallback(_callback_base()):  # type: ignore[misc]  # base class of the installed ray version
    """RLlib callback: trading statistics of every finished training episode.

    Runs in each env runner. It follows each episode's equity (``info["equity_usdt"]``) and its
    exposure (``pos_exposure`` of the observation, signed notional / equity) step by step, and at the
    end logs ``episode_stats(equity path)`` plus ``fees_usdt``, ``funding_usdt``, ``n_trades``,
    ``turnover_usdt`` (the env's episode totals in the last ``info``) and ``avg_leverage``
    (mean |exposure| over the episode's bars) as per-iteration sums and counts under
    ``env_runners/ats_episode/<name>/{sum,n}``; :func:`episode_means` turns them into means, so
    several env runners aggregate exactly.
    """

    def __init__(self, episode_stats: EpisodeStats | None = None, initial_equity_usdt: float = 10_000.0):
        super().__init__()
        self._stats = episode_stats
        self._initial = float(initial_equity_usdt)
        self._paths: dict[str, tuple[list[float], list[float]]] = {}

    def on_episode_start(self, *, episode, **kwargs) -> None:
        """Start the episode's equity and exposure paths."""
        self._paths[episode.id_] = ([self._initial], [])

    def on_episode_step(self, *, episode, **kwargs) -> None:
        """Append the step's equity and absolute exposure."""
        equity, exposure = self._paths.setdefault(episode.id_, ([self._initial], []))
        equity.append(float(episode.get_infos(-1)["equity_usdt"]))
        exposure.append(abs(float(episode.get_observations(-1)[-EXPOSURE_FROM_END])))

    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
        """Log the episode's statistics, fees and funding to ``metrics_logger``."""
        equity, exposure = self._paths.pop(episode.id_, ([self._initial], []))
        if metrics_logger is None or len(equity) < 2:
            return
        info = episode.get_infos(-1)
        stats = dict(self._stats(np.asarray(equity, dtype=np.float64))) if self._stats else {}
        stats.update(
            fees_usdt=info.get("fees_paid_usdt", math.nan),
            funding_usdt=info.get("funding_paid_usdt", math.nan),
            n_trades=info.get("n_trades", math.nan),
            turnover_usdt=info.get("turnover_usdt", math.nan),
            avg_leverage=float(np.mean(exposure)) if exposure else math.nan,
        )
        for key, value in stats.items():
            v = float(value)
            if np.isfinite(v):
                metrics_logger.log_value((_EPISODE_KEY, key, "sum"), v, reduce="sum")
                metrics_logger.log_value((_EPISODE_KEY, key, "n"), 1.0, reduce="sum")


def episode_means(result: Mapping[str, Any]) -> dict[str, float]:
    """``{"episode/<name>": mean}`` from the sums :class:`TradingEpisodeCallback` logged this iteration."""
    block = result.get("env_runners", {}).get(_EPISODE_KEY, {})
    out = {}
    for key, agg in block.items():
        n = float(agg.get("n", 0.0)) if isinstance(agg, Mapping) else 0.0
        if n > 0:
            out[f"episode/{key}"] = float(agg["sum"]) / n
    return out


def flatten_numeric(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], float]:
    """Finite numeric leaves of a nested result dict, keyed by their path."""
    out: dict[tuple[str, ...], float] = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            out.update(flatten_numeric(value, path))
        elif (
            isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool)
            and np.isfinite(float(value))
        ):
            out[path] = float(value)
    return out


def tensorboard_scalars(result: Mapping[str, Any]) -> dict[str, float]:
    """TensorBoard scalars of one RLlib iteration.

    ``episode/*`` (trading statistics, same names as SB3), SB3's ``rollout/`` and ``train/`` tags
    for the common quantities (:data:`SB3_TAGS`; ``train/entropy_loss`` = -entropy as in SB3), and
    every other numeric env-runner / learner entry under ``rllib/...`` (timers excluded).
    """
    flat = flatten_numeric({k: result[k] for k in ("env_runners", "learners") if k in result})
    scalars = {tag: flat[path] for path, tag in SB3_TAGS.items() if path in flat}
    entropy = flat.get(("learners", "default_policy", "entropy"))
    if entropy is not None:
        scalars["train/entropy_loss"] = -entropy
    for path, value in flat.items():
        if _EPISODE_KEY in path or any("timer" in p or "connector" in p for p in path):
            continue
        scalars["rllib/" + "/".join(path)] = value
    scalars.update(episode_means(result))
    return scalars


def env_steps_sampled(result: Mapping[str, Any]) -> int:
    """Lifetime env steps sampled, from an RLlib result (new API stack keys)."""
    for path in (("num_env_steps_sampled_lifetime",), ("env_runners", "num_env_steps_sampled_lifetime")):
        node: Any = result
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None:
            return int(node)
    raise KeyError("RLlib result has no num_env_steps_sampled_lifetime")


# ----------------------------------------------------------------------------------------------
# Ray and the algorithm config
# ----------------------------------------------------------------------------------------------


def init_ray(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` (``"auto"`` or ``HOST:PORT``) or start a local Ray.

    A local Ray gets ``num_cpus`` CPUs (None: all), no dashboard, worker logs not forwarded.
    Returns True when this call started/joined Ray (the caller then shuts it down), False when
    Ray was already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def actor_model_config(net_arch: tuple[int, ...]):
    """RLlib ``DefaultModelConfig`` whose actor is :class:`ActorNet`-shaped (tanh MLP ``net_arch`` + linear
    mean head, state-independent log-std, critic with its own encoder of the same sizes)."""
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    return DefaultModelConfig(
        fcnet_hiddens=list(net_arch), fcnet_activation="tanh", vf_share_layers=False, free_log_std=True
    )


def build_ppo_config(
    train_data: EnvData,
    env_config: EnvConfig,
    ppo_config,
    rllib_config,
    *,
    seed: int,
    num_gpus_per_learner: float,
    episode_stats: EpisodeStats | None = None,
):
    """RLlib ``PPOConfig`` for our env with SB3-equivalent network and loss (see module docstring).

    ``ppo_config`` is :class:`training.config.PPOConfig` (duck-typed: ``net_arch, n_envs, n_steps,
    batch_size, n_epochs, learning_rate, gamma, gae_lambda, clip_range, ent_coef``) and
    ``rllib_config`` :class:`training.config.RLlibConfig` (``num_env_runners,
    num_envs_per_env_runner, num_learners, train_batch_size, minibatch_size``). The train batch
    defaults to ``n_envs * n_steps`` env steps (SB3's rollout size) per iteration in total, split
    evenly over ``num_learners`` remote learners when there are any; the minibatch defaults to ``batch_size``.
    """
    from ray.rllib.algorithms.ppo import PPOConfig

    n_runners = int(rllib_config.num_env_runners)
    envs_per_runner = rllib_config.num_envs_per_env_runner or max(1, ppo_config.n_envs // max(1, n_runners))
    train_batch = rllib_config.train_batch_size or ppo_config.n_envs * ppo_config.n_steps
    per_learner = math.ceil(train_batch / max(1, int(rllib_config.num_learners)))
    minibatch = min(rllib_config.minibatch_size or ppo_config.batch_size, per_learner)
    callback = functools.partial(TradingEpisodeCallback, episode_stats, env_config.initial_equity_usdt)
    return (
        PPOConfig()
        .environment(env=ENV_ID, env_config={"data": train_data, "config": env_config}, disable_env_checking=True)
        .env_runners(
            num_env_runners=n_runners,
            num_envs_per_env_runner=envs_per_runner,
            num_cpus_per_env_runner=1,
            rollout_fragment_length="auto",
        )
        .training(
            train_batch_size_per_learner=per_learner,
            minibatch_size=minibatch,
            num_epochs=ppo_config.n_epochs,
            lr=ppo_config.learning_rate,
            gamma=ppo_config.gamma,
            lambda_=ppo_config.gae_lambda,
            clip_param=ppo_config.clip_range,
            entropy_coeff=ppo_config.ent_coef,
            use_kl_loss=False,
            vf_loss_coeff=0.5,
            vf_clip_param=1e12,
            grad_clip=0.5,
            grad_clip_by="global_norm",
        )
        .rl_module(model_config=actor_model_config(ppo_config.net_arch))
        .learners(num_learners=int(rllib_config.num_learners), num_gpus_per_learner=num_gpus_per_learner)
        .callbacks(callback)  # type: ignore[arg-type]  # RLlib calls it to build the callback; its stubs say a class
        .debugging(seed=seed, log_level="WARN")
    )


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------


@dataclass
class RLlibResult:
    """The actor with the best validation Sortino (ActorNet names) and the selection record."""

    actor_tensors: dict[str, torch.Tensor]
    best_step: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    iterations: int = 0
    env_steps: int = 0
    wall_s: float = 0.0


def train_ppo_rllib(
    train_data: EnvData,
    env_config: EnvConfig,
    ppo_config,
    rllib_config,
    *,
    seed: int,
    device: str,
    tensorboard_dir: Path,
    episode_stats: EpisodeStats,
    validator: ActorValidator,
    on_progress: Callable[[int], None] | None = None,
    hparams: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> RLlibResult:
    """Train PPO with RLlib on ``train_data``; return the actor that scored best on validation.

    Ray: joins ``rllib_config.ray_address`` when set, else starts a local Ray with
    ``rllib_config.ray_num_cpus`` CPUs; Ray is shut down at the end only if this call started it.
    Runs ``ceil(total_timesteps / train_batch)`` iterations. Every ``eval_every_steps`` env steps
    (and after the last iteration) the learner's current actor is validated with ``validator``.

    TensorBoard (``tensorboard_dir/PPO_1``, x axis = env steps sampled): the scalars of
    :func:`tensorboard_scalars`, ``val/*``, ``time/fps``, the run's hparams and the trading
    custom-scalars layout.

    Raises
    ------
    ValueError
        Invalid device/GPU combination (see :func:`rllib_num_gpus`).
    RuntimeError
        If no validation result was produced (no iteration ran).
    """
    from torch.utils.tensorboard import SummaryWriter

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be resolved to cpu or cuda, got {device!r}")
    gpus = rllib_num_gpus(device, rllib_config.num_gpus_per_learner)
    started = init_ray(rllib_config.ray_address, num_cpus=rllib_config.ray_num_cpus)
    writer = SummaryWriter(str(Path(tensorboard_dir) / "PPO_1"))
    algo = None
    try:
        config = build_ppo_config(
            train_data, env_config, ppo_config, rllib_config, seed=seed, num_gpus_per_learner=gpus,
            episode_stats=episode_stats,
        )
        algo = config.build_algo()
        write_trading_layout(writer)
        if hparams:
            write_hparams(writer, hparams)
        n_hidden = len(ppo_config.net_arch)
        obs_dim = int(train_data.market_obs.shape[1]) + len(ACCOUNT_FEATURES)
        train_batch = config.train_batch_size_per_learner * max(1, config.num_learners)
        n_iter = max(1, math.ceil(ppo_config.total_timesteps / train_batch))
        best: dict[str, Any] = {"score": -np.inf, "tensors": None, "metrics": {}, "step": 0}
        history: list[dict[str, float]] = []
        next_eval = ppo_config.eval_every_steps
        t0 = time.perf_counter()
        steps = 0

        def validate(step: int) -> None:
            weights = algo.learner_group.get_weights()["default_policy"]
            tensors = actor_state_from_rllib(weights, n_hidden)
            metrics = {**validator(actor_from_tensors(tensors, obs_dim, ppo_config.net_arch)), "timesteps": float(step)}
            history.append(metrics)
            score = metrics["sortino"] if np.isfinite(metrics["sortino"]) else -np.inf
            if best["tensors"] is None or score > best["score"]:
                best.update(score=score, tensors=tensors, metrics=metrics, step=step)
            write_scalars(writer, {f"val/{k}": v for k, v in metrics.items()}, step)
            writer.add_scalar("val/best_sortino", best["score"] if np.isfinite(best["score"]) else -1e9, step)

        for it in range(n_iter):
            result = algo.train()
            steps = env_steps_sampled(result)
            elapsed = time.perf_counter() - t0
            scalars = tensorboard_scalars(result)
            scalars["time/fps"] = steps / max(elapsed, 1e-9)
            write_scalars(writer, scalars, steps)
            if on_progress is not None:
                on_progress(steps)
            if steps >= next_eval or it == n_iter - 1:
                while next_eval <= steps:
                    next_eval += ppo_config.eval_every_steps
                validate(steps)
            writer.flush()
        if best["tensors"] is None:
            raise RuntimeError("RLlib training produced no validated policy")
        log(f"RLlib PPO: {n_iter} iterations, {steps} env steps in {time.perf_counter() - t0:.0f} s "
            f"({steps / max(time.perf_counter() - t0, 1e-9):.0f} steps/s)")
        return RLlibResult(
            actor_tensors=best["tensors"], best_step=int(best["step"]), best_metrics=best["metrics"], history=history,
            iterations=n_iter, env_steps=steps, wall_s=time.perf_counter() - t0,
        )
    finally:
        writer.close()
        if algo is not None:
            algo.stop()
        if started:
            import ray

            ray.shutdown()

