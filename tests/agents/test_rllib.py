"""RLlib backend: the exported actor equals RLlib's deterministic action, and a 2-iteration local RLlib
run on the smoke config produces a bundle that serving loads and decides bars with (V2, no fallback)."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from tests.conftest import REPO

pytest.importorskip("ray.rllib")

from agents.devices import default_torch_threads, rllib_num_gpus, torch_threads_for
from agents.ppo_rllib import (
    actor_from_tensors,
    actor_model_config,
    actor_state_from_rllib,
    episode_means,
    tensorboard_scalars,
)

OBS_DIM, HIDDEN = 13, (16, 8)


def _rllib_module(hidden=HIDDEN):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core import DEFAULT_MODULE_ID

    obs_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (5,), np.float32)
    config = PPOConfig().rl_module(model_config=actor_model_config(hidden))
    spec = config.get_rl_module_spec(spaces={DEFAULT_MODULE_ID: (obs_space, act_space)}, inference_only=False)
    torch.manual_seed(0)
    module = spec.build()
    with torch.no_grad():  # move away from the initialisation (RLlib's policy head starts near 0)
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module


def test_exported_actor_reproduces_rllib_deterministic_action():
    from ray.rllib.core.columns import Columns

    module = _rllib_module()
    actor = actor_from_tensors(actor_state_from_rllib(module.state_dict(), len(HIDDEN)), OBS_DIM, HIDDEN)
    obs = torch.as_tensor(np.random.default_rng(1).normal(0, 2, (64, OBS_DIM)).astype(np.float32))
    with torch.no_grad():
        out = module.forward_inference({Columns.OBS: obs})
        dist = module.get_inference_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
        rllib_action = dist.to_deterministic().sample().numpy()
    assert np.abs(rllib_action).max() > 0.05  # not a trivially-zero policy
    np.testing.assert_allclose(actor(obs).detach().numpy(), rllib_action, rtol=0, atol=1e-6)
    # serving's act() clips to the action box exactly as RLlib's normalize_and_clip connector does
    for row in range(8):
        np.testing.assert_allclose(actor.act(obs[row].numpy()), np.clip(rllib_action[row], -1, 1), atol=1e-6)


def test_actor_state_rejects_a_module_of_another_shape():
    module = _rllib_module(hidden=(16, 8, 4))
    with pytest.raises(ValueError, match="more than 2 layers"):
        actor_state_from_rllib(module.state_dict(), 2)
    with pytest.raises(ValueError, match="no tensor"):
        actor_state_from_rllib({k: v for k, v in module.state_dict().items() if not k.startswith("pi.")}, 3)


def test_gpu_and_thread_selection():
    assert rllib_num_gpus("cpu", None) == 0.0
    assert rllib_num_gpus("cuda", None) == 1.0
    assert rllib_num_gpus("cuda", 0.5) == 0.5
    with pytest.raises(ValueError, match="contradicts device=cpu"):
        rllib_num_gpus("cpu", 1)
    with pytest.raises(ValueError, match=">= 0"):
        rllib_num_gpus("cuda", -1)
    assert default_torch_threads(0, n_cpus=8) == 8
    assert default_torch_threads(3, n_cpus=8) == 5
    assert default_torch_threads(4, n_cpus=2) == 1
    assert torch_threads_for("sb3", 4, n_env_runners=3, n_cpus=4) == 4
    assert torch_threads_for("rllib", 4, n_env_runners=3, n_cpus=4) == 1
    assert torch_threads_for("rllib", 4, n_env_runners=3, joins_cluster=True, n_cpus=4) == 4


def test_episode_means_and_sb3_tags_from_a_result_dict():
    result = {
        "env_runners": {
            "episode_return_mean": 1.5,
            "ats_episode": {"sortino": {"sum": 3.0, "n": 2.0}, "fees_usdt": {"sum": 0.0, "n": 0.0}},
            "timers": {"x": 1.0},
        },
        "learners": {"default_policy": {"policy_loss": -0.1, "entropy": 7.0, "vf_loss": math.nan}},
    }
    assert episode_means(result) == {"episode/sortino": 1.5}
    scalars = tensorboard_scalars(result)
    assert scalars["rollout/ep_rew_mean"] == 1.5 and scalars["train/policy_gradient_loss"] == -0.1
    assert scalars["train/entropy_loss"] == -7.0 and "train/value_loss" not in scalars  # NaN dropped
    assert not any("timers" in k for k in scalars) and "episode/fees_usdt" not in scalars


#: Issue 7: the 1-2 iteration RLlib smoke run must finish in under 90 s (about 25 s on 2 cores). pytest-timeout
#: counts fixture setup, so whichever of these tests runs first (and builds ``rllib_run``) is held to it.
RLLIB_SMOKE_TIMEOUT = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def rllib_run(tmp_path_factory):
    """Two RLlib PPO iterations (512 env steps each, local Ray, sampling in the driver) on the smoke config."""
    from training.config import load_config
    from training.pipeline import train_run
    from training.tune import apply_params

    # the smoke config with one out-of-fold block (the regime/signal fits dominate the time on 2 cores)
    cfg = apply_params(load_config(REPO / "configs" / "smoke.yaml", backend="rllib"), {
        "stacking.n_folds": 1, "ppo.total_timesteps": 1024, "ppo.eval_every_steps": 512,
        "rllib.train_batch_size": 512, "rllib.ray_num_cpus": 2, "rllib.num_env_runners": 0,
    })
    run_dir = tmp_path_factory.mktemp("rllib") / "run"
    train_run(cfg, run_dir, log=lambda s: None)
    import ray

    assert not ray.is_initialized()  # the run shut down the Ray it started
    return run_dir


@RLLIB_SMOKE_TIMEOUT
def test_rllib_bundle_loads_and_serves_bars(rllib_run, tmp_path):
    from agents.bundle import load_bundle
    from serving.app import serve_replay
    from serving.store import StateStore

    bundle = load_bundle(rllib_run / "bundle")
    assert bundle.manifest["config"]["backend"] == "rllib"
    assert bundle.actor.obs_dim == len(bundle.market_obs_names) + 6
    history = json.loads((rllib_run / "validation_history.json").read_text())
    assert [h["timesteps"] for h in history] == [512.0, 1024.0]  # validated after each iteration
    assert bundle.manifest["metrics"]["selected_step"] in (512, 1024)
    db = tmp_path / "state.sqlite"
    summary = serve_replay(
        replay=rllib_run / "replay" / "test_candles.parquet", bundle_dir=rllib_run / "bundle", db_path=db,
        warmup_bars=700, max_bars=20, log=lambda s: None,
    )
    decisions = StateStore.sqlite(db).decisions()
    assert summary.bars == 20 and len(decisions) == 20
    assert (decisions["source"] == "v2").all(), decisions["fallback_reason"].dropna().unique()[:3]
    raw = decisions["raw_action"].map(lambda s: json.loads(s) if isinstance(s, str) else s)
    assert all(len(a) == 5 and np.isfinite(a).all() for a in raw)


@RLLIB_SMOKE_TIMEOUT
def test_rllib_tensorboard_has_trading_metrics_hparams_and_layout(rllib_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(rllib_run / "tb" / "PPO_1"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    same_as_sb3 = {"episode/return", "episode/sortino", "episode/max_drawdown", "episode/fees_usdt",
                   "episode/funding_usdt", "episode/n_trades", "episode/turnover_usdt", "rollout/ep_rew_mean",
                   "val/sortino", "val/best_sortino"}
    assert same_as_sb3 | {"episode/avg_leverage", "time/fps"} <= tags, sorted(same_as_sb3 - tags)
    assert [e.step for e in ea.Scalars("val/sortino")] == [512, 1024]
    lev = [e.value for e in ea.Scalars("episode/avg_leverage")]
    assert all(v >= 0 and np.isfinite(v) for v in lev)
    assert ea.PluginTagToContent("hparams") and ea.PluginTagToContent("custom_scalars")
