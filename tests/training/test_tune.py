"""``ats tune``: parameters apply with validation, folds never reach the test period, the results table
ranks completed trials first, and a tiny Ray Tune search on the smoke config writes its outputs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml
from pydantic import ValidationError

from tests.conftest import REPO
from training.config import RLlibConfig, RunConfig, load_config
from training.tune import (
    METRIC,
    SORTINO_CAP,
    apply_params,
    local_ray_cpus,
    results_table,
    score,
    trial_bundles,
    tuning_windows,
)

BAR = pd.Timedelta(hours=1)


@pytest.fixture(scope="module")
def smoke_cfg() -> RunConfig:
    return load_config(REPO / "configs" / "smoke.yaml")


def test_apply_params_sets_nested_fields_and_validates(smoke_cfg):
    cfg = apply_params(smoke_cfg, {"ppo.learning_rate": 5e-4, "env.reward.kind": "differential_sharpe"})
    assert cfg.ppo.learning_rate == 5e-4 and cfg.env.reward.kind == "differential_sharpe"
    assert cfg.ppo.n_steps == smoke_cfg.ppo.n_steps  # untouched fields kept
    with pytest.raises(KeyError, match="no field 'learning_rat'"):
        apply_params(smoke_cfg, {"ppo.learning_rat": 1e-3})
    with pytest.raises(ValidationError):
        apply_params(smoke_cfg, {"env.reward.eta": -1.0})


@pytest.mark.parametrize("folds", [1, 2, 3])
def test_tuning_folds_validate_before_the_test_period(smoke_cfg, folds):
    windows = tuning_windows(smoke_cfg, folds, None, BAR)
    test_start = smoke_cfg.data.ts("test_start")
    assert len(windows) == folds
    for w in windows:
        assert smoke_cfg.data.ts("train_start") == w.train_start < w.val_start < w.test_start <= test_start
        assert w.test_end <= test_start  # nothing of the fold, even its unused window, reaches the test period
    assert windows[-1].test_end == test_start


def test_score_clips_and_penalises_nan():
    assert score(1.5) == 1.5
    assert score(math.inf) == SORTINO_CAP and score(-50) == -SORTINO_CAP
    assert score(math.nan) == -SORTINO_CAP


def test_results_table_ranks_completed_trials_first():
    rows = [
        {"trial_id": "a", "error": None, METRIC: 3.0, "folds_done": 1},  # pruned after one good fold
        {"trial_id": "b", "error": None, METRIC: 0.5, "folds_done": 2},
        {"trial_id": "c", "error": "RuntimeError: boom"},
        {"trial_id": "d", "error": None, METRIC: 1.0, "folds_done": 2},
    ]
    table = results_table(rows, n_folds=2)
    assert list(table["trial_id"]) == ["d", "b", "a", "c"]
    assert list(table["status"]) == ["completed", "completed", "stopped_early", "error"]


@pytest.mark.slow
def test_trial_resources_include_rllib_env_runners_and_learners():
    """Issue 7: an RLlib trial with env runners reserves a CPU for each, and the local Ray holds them all."""
    assert trial_bundles("sb3", RLlibConfig(num_env_runners=4), gpus_per_trial=0.5) == [{"CPU": 1.0, "GPU": 0.5}]
    assert trial_bundles("rllib", RLlibConfig(), gpus_per_trial=0.0) == [{"CPU": 1.0, "GPU": 0.0}]
    two = trial_bundles("rllib", RLlibConfig(num_env_runners=2), gpus_per_trial=0.0)
    assert two == [{"CPU": 1.0, "GPU": 0.0}] * 3
    assert local_ray_cpus(two, max_concurrent=2) == 6 and local_ray_cpus(two, max_concurrent=1) == 3
    gpu = trial_bundles("rllib", RLlibConfig(num_env_runners=1, num_learners=2), gpus_per_trial=1.0)
    assert gpu == [{"CPU": 1.0, "GPU": 0.0}, {"CPU": 1.0, "GPU": 0.0}, {"CPU": 0.0, "GPU": 1.0}, {"CPU": 0.0, "GPU": 1.0}]
    with pytest.raises(ValueError, match="contradicts device=cpu"):
        trial_bundles("rllib", RLlibConfig(num_gpus_per_learner=1.0), gpus_per_trial=0.0)
    with pytest.raises(ValueError, match="gpus_per_trial"):
        trial_bundles("sb3", RLlibConfig(), gpus_per_trial=-1.0)


@pytest.mark.parametrize(("runners", "learners", "gpus"), [(0, 0, 0.0), (2, 0, 0.0), (1, 2, 0.0), (1, 0, 1.0), (2, 2, 1.0)])
def test_trial_resources_equal_rllibs_own_request_for_the_trial_algorithm(smoke_cfg, runners, learners, gpus):
    """The bundles equal RLlib's ``default_resource_request`` for the PPO config a trial builds."""
    pytest.importorskip("ray.rllib")
    from ray.rllib.algorithms.ppo import PPO

    from agents.devices import rllib_num_gpus
    from agents.ppo_rllib import build_ppo_config
    from envs.trading_env import EnvData
    from tests.kit.candles import make_candles

    candles = make_candles(64)
    data = EnvData.from_frames(candles, pd.DataFrame(index=candles.index, dtype="float32"), candles["close"] * 0.01)
    rllib = RLlibConfig(num_env_runners=runners, num_learners=learners)
    config = build_ppo_config(data, smoke_cfg.env, smoke_cfg.ppo, rllib, seed=0,
                              num_gpus_per_learner=rllib_num_gpus("cuda" if gpus else "cpu", None))  # fmt: skip
    theirs = PPO.default_resource_request(config).bundles
    ours = [{k: v for k, v in b.items() if v} for b in trial_bundles("rllib", rllib, gpus_per_trial=gpus)]
    assert ours == theirs


def test_tiny_search_writes_table_best_config_and_trial_count(smoke_cfg, tmp_path):
    from training.tune import TuneConfig, run_tune

    # the smoke config with a lighter regime/signal stack and 256 PPO steps per fold, to stay fast on 2 cores
    base = apply_params(smoke_cfg, {"ppo.total_timesteps": 256, "ppo.n_steps": 128, "ppo.eval_every_steps": 256,
                                    "stacking.n_folds": 1, "regime.n_iter": 10})
    out = tmp_path / "tune"
    summary = run_tune(base, TuneConfig(trials=2, folds=2, seed=3), out, log=lambda s: None)
    import ray

    assert not ray.is_initialized()
    trials = json.loads((out / "trials.json").read_text())
    assert trials["n_trials"] == summary["n_trials"] == 2
    assert trials["n_completed"] + trials["n_stopped_early"] + trials["n_errors"] == 2 and trials["n_errors"] == 0
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 2 and {METRIC, "val_sortino_fold0", "config/ppo.learning_rate"} <= set(table.columns)
    best = RunConfig.model_validate(yaml.safe_load((out / "best_config.yaml").read_text()))
    assert best.data == smoke_cfg.data  # the run's own periods, ready for `ats train`
    assert best.stacking.n_folds == 1 and best.ppo.total_timesteps == 256  # the base config's other settings
    assert best.ppo.learning_rate == pytest.approx(table.loc[0, "config/ppo.learning_rate"])
    assert best.env.reward.kind == table.loc[0, "config/env.reward.kind"]
    for fold in trials["folds"]:
        assert pd.Timestamp(fold["val_end"]) <= smoke_cfg.data.ts("test_start")


def test_pooled_fold_trains_on_every_symbol_and_scores_the_portfolio(tmp_path):
    """``ats tune`` accepts a symbol list: a fold holds every symbol's data and spec, and a trial is scored on the
    equal-weight portfolio's validation Sortino (no Ray needed for one fold)."""
    from training.config import SymbolSource
    from training.tune import prepare_fold, train_and_validate
    from training.walkforward import fold_run_config

    cfg = load_config(REPO / "configs" / "smoke_multi.yaml")
    cfg = apply_params(cfg, {"ppo.total_timesteps": 256, "ppo.n_steps": 128, "ppo.eval_every_steps": 256,
                             "stacking.n_folds": 1, "regime.n_iter": 10})
    xrp = cfg.data.sources()[2]
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"symbols": (SymbolSource(symbol="BTCUSDT"), xrp)})})
    w = tuning_windows(cfg, 1, None, BAR)[0]
    fold = prepare_fold(fold_run_config(cfg, w, cfg.seed, BAR), w, device="cpu", log=lambda s: None)
    assert list(fold.pooled) == ["BTCUSDT", "XRPUSDT"]
    assert fold.pooled["XRPUSDT"][3].tick_size_usdt == 0.0001
    metrics = train_and_validate(cfg, fold, backend="sb3", device="cpu", tb_dir=tmp_path / "tb")
    assert "sortino" in metrics and metrics["n_bars"] == len(fold.val) - 1
