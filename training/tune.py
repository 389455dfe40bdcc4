"""``ats tune``: hyperparameter search for PPO and the reward with Ray Tune (Optuna TPE + ASHA).

Objective: the mean **validation** Sortino over walk-forward folds that all lie before the run's
test period. The folds come from :func:`training.walkforward.fold_windows` applied to the span
``[train_start, test_start)`` of the run config: ``folds`` windows tile ``[val_start, test_start)``,
and fold k validates on the ``val_bars`` bars before its window and trains on everything before
that (expanding). The tuner scores only those validation windows; the run's test period
``[test_start, test_end)`` is never loaded into a trial, and the windows after each fold's
validation are never traded.

The regime/signal stack of a fold does not depend on the searched parameters (PPO and reward), so
it is fitted once per fold in the driver (:func:`prepare_fold`) and shared with the trials through
Ray's object store. A trial trains PPO on each fold in turn (SB3 or RLlib backend, 1 CPU, torch 1
thread) and reports after every fold, so ASHA (Li et al. 2020) or the median stopping rule
(Golovin et al. 2017) can stop a bad configuration after its first fold(s). Each fold's score is the
validation Sortino of the checkpoint the pipeline would select (best of the validation backtests,
as in ``ats train``), clipped to ``[-SORTINO_CAP, SORTINO_CAP]``; NaN (no downside, no return) counts
as ``-SORTINO_CAP``.

Outputs in ``out``: ``results.csv`` (one row per trial: parameters, per-fold scores, mean, status),
``best_config.yaml`` (the run config with the best completed trial's parameters, for ``ats train``),
``trials.json`` (``n_trials`` = every configuration tried, including stopped and failed ones:
``ats walkforward --tuning-dir OUT`` adds it to the trial count of the deflated Sharpe ratio (Bailey &
López de Prado 2014)), ``folds.json`` (the fold windows) and Ray's own trial logs under
``ray_results/``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import Field

from market import json_codec
from market.config_base import StrictConfig
from training.config import RLlibConfig, RunConfig
from training.walkforward import FoldWindow, WalkForwardConfig, fold_run_config, fold_windows

SORTINO_CAP = 10.0
METRIC = "val_sortino_mean"
Log = Callable[[str], None]


class TuneConfig(StrictConfig):
    """One search: how many trials, over which folds, with which pruning."""

    trials: int = Field(8, ge=1, description="configurations to try")
    folds: int = Field(2, ge=1, description="walk-forward folds inside [val_start, test_start)")
    val_bars: int | None = Field(
        None, ge=24, description="validation bars per fold; None = the fold window length"
    )
    backend: Literal["sb3", "rllib"] = "sb3"
    scheduler: Literal["asha", "median", "none"] = "asha"
    search: Literal["optuna", "random"] = "optuna"
    max_concurrent: int = Field(
        1, ge=1, description="trials running at once (each takes 1 CPU, plus 1 per RLlib env runner or learner)"
    )
    gpus_per_trial: float = Field(0.0, ge=0.0, description="GPUs reserved per trial (device cuda when > 0)")
    seed: int = 0


def trial_bundles(backend: str, rllib: RLlibConfig, *, gpus_per_trial: float) -> list[dict[str, float]]:
    """Ray placement-group bundles of one tuning trial (``{"CPU": n, "GPU": g}``, logical Ray units).

    Bundle 0 is the trial process itself: 1 CPU and ``gpus_per_trial`` GPUs (with the RLlib backend
    and remote learners the GPUs go to the learners instead). With the RLlib backend the algorithm the
    trial builds starts actors of its own, which must fit in the trial's placement group (Tune
    schedules them there) or the trial waits forever for CPUs the local Ray does not have: one
    ``{"CPU": 1}`` bundle per env runner (``num_cpus_per_env_runner=1``, see
    :func:`agents.ppo_rllib.build_ppo_config`) and one per remote learner (1 CPU without a GPU, else
    0 CPU and :func:`agents.devices.rllib_num_gpus` GPUs). These are the rules of RLlib's
    ``Algorithm.default_resource_request`` for the same config.

    Raises
    ------
    ValueError
        If ``gpus_per_trial`` < 0, or ``rllib.num_gpus_per_learner`` > 0 while ``gpus_per_trial`` is 0
        (the trial runs on CPU).
    """
    from agents.devices import rllib_num_gpus

    if gpus_per_trial < 0:
        raise ValueError(f"gpus_per_trial must be >= 0, got {gpus_per_trial}")
    if backend != "rllib":
        return [{"CPU": 1.0, "GPU": float(gpus_per_trial)}]
    learner_gpus = rllib_num_gpus("cuda" if gpus_per_trial > 0 else "cpu", rllib.num_gpus_per_learner)
    n_learners = int(rllib.num_learners)
    main = {"CPU": 1.0, "GPU": float(gpus_per_trial) if n_learners == 0 else 0.0}
    runners = [{"CPU": 1.0, "GPU": 0.0} for _ in range(int(rllib.num_env_runners))]
    learners = [{"CPU": 0.0 if learner_gpus > 0 else 1.0, "GPU": learner_gpus} for _ in range(n_learners)]
    return [main, *runners, *learners]


def local_ray_cpus(bundles: list[dict[str, float]], max_concurrent: int) -> int:
    """Logical CPUs a local Ray needs to run ``max_concurrent`` trials of ``bundles`` at once (>= 1)."""
    return max(1, math.ceil(max_concurrent * sum(b.get("CPU", 0.0) for b in bundles)))


def search_space() -> dict[str, Any]:
    """Ray Tune search space; keys are dotted paths into :class:`training.config.RunConfig`.

    PPO (Schulman et al. 2017): learning rate, entropy coefficient, clip range, discount, GAE lambda.
    Reward (:class:`envs.rewards.RewardConfig`): form, adaptation rate ``eta``, turnover and drawdown
    penalties.
    """
    from ray import tune

    return {
        "ppo.learning_rate": tune.loguniform(1e-4, 1e-3),
        "ppo.ent_coef": tune.uniform(0.0, 0.01),
        "ppo.clip_range": tune.choice([0.1, 0.2, 0.3]),
        "ppo.gamma": tune.choice([0.95, 0.99, 0.995]),
        "ppo.gae_lambda": tune.choice([0.9, 0.95, 0.98]),
        "env.reward.kind": tune.choice(["sortino", "differential_sharpe"]),
        "env.reward.eta": tune.loguniform(0.002, 0.05),
        "env.reward.turnover_penalty": tune.uniform(0.0, 0.002),
        "env.reward.drawdown_penalty": tune.uniform(0.0, 1.0),
    }


def apply_params(cfg: RunConfig, params: Mapping[str, Any]) -> RunConfig:
    """``cfg`` with the dotted-path ``params`` set, re-validated (unknown paths and bad values raise).

    Raises
    ------
    KeyError
        If a path does not name an existing config field.
    pydantic.ValidationError
        If a value is invalid for its field.
    """
    raw = cfg.model_dump(mode="json")
    for path, value in params.items():
        node = raw
        keys = path.split(".")
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                raise KeyError(f"tune parameter {path!r}: {key!r} is not a config section")
            node = node[key]
        if keys[-1] not in node:
            raise KeyError(f"tune parameter {path!r}: no field {keys[-1]!r}")
        node[keys[-1]] = value.item() if isinstance(value, np.generic) else value
    return RunConfig.model_validate(raw)


def tuning_windows(cfg: RunConfig, folds: int, val_bars: int | None, bar: pd.Timedelta) -> list[FoldWindow]:
    """Fold windows for tuning, all ending at or before ``cfg.data.test_start`` (see module docstring).

    Raises
    ------
    ValueError
        If a fold's training window would be too short (from :func:`fold_windows`).
    """
    d = cfg.data
    span_bars = int((d.ts("test_start") - d.ts("val_start")) / bar)
    window = span_bars // folds
    if window < 24:
        raise ValueError(f"validation period of {span_bars} bars is too short for {folds} folds")
    wf = WalkForwardConfig(
        base_config="(tune)", data_start=d.train_start, start=d.val_start, end=d.test_start, folds=folds,
        scheme="expanding", train_bars=500, val_bars=val_bars or window,
    )
    windows = fold_windows(wf, bar)
    if windows[-1].test_end > d.ts("test_start"):
        raise AssertionError("tuning folds reach into the test period")
    return windows


def window_json(w: FoldWindow) -> dict[str, Any]:
    """The part of a tuning fold a trial uses: training ``[train_start, val_start)`` and validation
    ``[val_start, val_end)`` (the fold's later window is never traded by the tuner, so it is not listed)."""
    return {"fold": w.fold, "train_start": str(w.train_start), "val_start": str(w.val_start),
            "val_end": str(w.val_end if w.val_end is not None else w.test_start)}


def score(sortino: float) -> float:
    """A fold's objective value: Sortino clipped to ``[-cap, cap]``; NaN -> ``-cap``."""
    s = float(sortino)
    return -SORTINO_CAP if math.isnan(s) else float(np.clip(s, -SORTINO_CAP, SORTINO_CAP))


@dataclass(frozen=True)
class FoldData:
    """What a trial needs to train and validate on one fold (regime/signal stack already applied)."""

    fold: int
    window: dict[str, Any]
    train: Any  # envs.trading_env.EnvData (normalised market observation)
    val: Any  # envs.trading_env.EnvData
    val_candles: pd.DataFrame
    bar_interval_s: float
    pooled: dict[str, Any] | None = None  # a pooled run: {symbol: (train EnvData, val EnvData, val candles, spec)}


def prepare_fold(cfg: RunConfig, window: FoldWindow, *, device: str, log: Log) -> FoldData:
    """Data, out-of-fold regime/signal observation and normaliser of one fold (as ``ats train`` builds them)."""
    from agents.observation import ObsNormalizer
    from training.pipeline import build_market_obs, env_data, fold_starts, prepare_data

    if len(cfg.data.sources()) > 1:
        return prepare_pooled_fold(cfg, window, device=device, log=log)
    prep = prepare_data(cfg)
    market_obs, _, _ = build_market_obs(prep, cfg, device=device, log=lambda s: None)
    first = fold_starts(prep, cfg)[0]
    normalizer = ObsNormalizer.fit(market_obs.iloc[: prep.val_row - first].to_numpy(np.float32), cfg.ppo.obs_clip)
    log(f"fold {window.fold}: train {window.train_start:%Y-%m-%d}..{window.val_start:%Y-%m-%d}, "
        f"validation {window.val_start:%Y-%m-%d %H:%M}..{window.test_start:%Y-%m-%d %H:%M}")
    return FoldData(
        fold=window.fold, window=window_json(window),
        train=env_data(prep, market_obs, normalizer, first, prep.val_row),
        val=env_data(prep, market_obs, normalizer, prep.val_row, prep.test_row),
        val_candles=prep.candles.iloc[prep.val_row : prep.test_row],
        bar_interval_s=float(prep.info["bar_interval_s"]),
    )


def prepare_pooled_fold(cfg: RunConfig, window: FoldWindow, *, device: str, log: Log) -> FoldData:
    """:func:`prepare_fold` of a pooled run (``data.symbols``): every symbol's data and spec, one regime/signal
    stack over all symbols (:func:`training.pipeline.build_market_obs_pooled`), one normaliser; ``train``, ``val``
    and ``val_candles`` are the primary symbol's, ``pooled`` holds every symbol's."""
    from agents.observation import ObsNormalizer
    from training.pipeline import build_market_obs_pooled, env_data, pooled_fold_first, prepare_symbols

    preps = prepare_symbols(cfg)
    market_obs, _, _ = build_market_obs_pooled(preps, cfg, device=device, log=lambda s: None)
    firsts = pooled_fold_first(preps, cfg)
    normalizer = ObsNormalizer.fit(np.concatenate([o.iloc[: p.val_row - f].to_numpy(np.float32)
                                                   for o, p, f in zip(market_obs, preps, firsts, strict=True)]), cfg.ppo.obs_clip)
    pooled = {p.info["symbol"]: (env_data(p, o, normalizer, f, p.val_row), env_data(p, o, normalizer, p.val_row, p.test_row),
                                 p.candles.iloc[p.val_row : p.test_row], p.instrument.spec)
              for p, o, f in zip(preps, market_obs, firsts, strict=True)}
    log(f"fold {window.fold} ({len(preps)} symbols): train {window.train_start:%Y-%m-%d}..{window.val_start:%Y-%m-%d}, "
        f"validation {window.val_start:%Y-%m-%d %H:%M}..{window.test_start:%Y-%m-%d %H:%M}")
    first = next(iter(pooled.values()))
    return FoldData(fold=window.fold, window=window_json(window), train=first[0], val=first[1], val_candles=first[2],
                    bar_interval_s=float(preps[0].info["bar_interval_s"]), pooled=pooled)


def train_and_validate(cfg: RunConfig, fold: FoldData, *, backend: str, device: str, tb_dir: Path) -> dict[str, float]:
    """Train PPO on ``fold.train`` with ``backend``; return the selected checkpoint's validation metrics.

    A pooled fold (``fold.pooled``) trains on every symbol (each under its own spec, with ``cfg``'s env settings)
    and is scored on the equal-weight portfolio's validation metrics (SB3 only), as ``ats train`` chooses its
    checkpoint.
    """
    from training.backtest import run_backtest
    from training.pipeline import episode_stats, summarize_backtest

    if fold.pooled is not None:
        return _train_and_validate_pooled(cfg, fold, backend=backend, device=device, tb_dir=tb_dir)

    def backtest(policy) -> dict[str, float]:
        return summarize_backtest(run_backtest(policy, fold.val, fold.val_candles, cfg.env), fold.bar_interval_s)

    stats = episode_stats(fold.bar_interval_s)
    if backend == "rllib":
        from agents.ppo_rllib import ActorPolicy, train_ppo_rllib

        result = train_ppo_rllib(
            fold.train, cfg.env, cfg.ppo, cfg.rllib, seed=cfg.seed, device=device, tensorboard_dir=tb_dir,
            episode_stats=stats, validator=lambda actor: backtest(ActorPolicy(actor, cfg.env.actions)),
        )
    else:
        from agents.policy import SB3ActorPolicy
        from agents.ppo_sb3 import train_ppo

        result = train_ppo(
            fold.train, cfg.env, cfg.ppo, seed=cfg.seed, device=device, tensorboard_dir=tb_dir,
            episode_stats=stats, validator=lambda model: backtest(SB3ActorPolicy(model, cfg.env.actions)),
        )
    return result.best_metrics


def _train_and_validate_pooled(cfg: RunConfig, fold: FoldData, *, backend: str, device: str,
                               tb_dir: Path) -> dict[str, float]:
    from agents.policy import SB3ActorPolicy
    from agents.ppo_sb3 import train_ppo
    from training.backtest import run_backtest
    from training.config import symbol_env_config
    from training.pipeline import episode_stats
    from training.portfolio import portfolio_metrics

    if backend != "sb3":
        raise ValueError("tuning a pooled multi-symbol config (data.symbols) runs on the sb3 backend only")
    assert fold.pooled is not None
    envs = {sym: symbol_env_config(cfg, spec) for sym, (_, _, _, spec) in fold.pooled.items()}
    legs = [(sym, train, envs[sym]) for sym, (train, _, _, _) in fold.pooled.items()]

    def validator(model) -> dict[str, float]:
        results = {sym: run_backtest(SB3ActorPolicy(model, cfg.env.actions), val, candles, envs[sym])
                   for sym, (_, val, candles, _) in fold.pooled.items()}
        return portfolio_metrics(results, fold.bar_interval_s)

    result = train_ppo(legs, cfg.env, cfg.ppo, seed=cfg.seed, device=device, tensorboard_dir=tb_dir,
                       episode_stats=episode_stats(fold.bar_interval_s), validator=validator)
    return result.best_metrics


def _trial(params: dict[str, Any], *, base: dict, folds: list[FoldData], backend: str, device: str, out: str) -> None:
    """Ray Tune function trainable: one configuration over every fold, reporting after each fold."""
    import torch
    from ray import tune

    torch.set_num_threads(1)
    cfg = apply_params(RunConfig.model_validate(base), params)
    trial_dir = Path(out) / "trials" / tune.get_context().get_trial_id()
    scores: dict[str, float] = {}
    for fold in folds:
        metrics = train_and_validate(cfg, fold, backend=backend, device=device, tb_dir=trial_dir / f"fold{fold.fold}")
        scores[f"val_sortino_fold{fold.fold}"] = score(metrics.get("sortino", math.nan))
        tune.report({METRIC: float(np.mean(list(scores.values()))), "folds_done": len(scores), **scores})


def results_table(rows: list[dict[str, Any]], n_folds: int) -> pd.DataFrame:
    """Trial table sorted best first: completed trials (all folds) by the objective, then the rest.

    ``rows`` hold ``trial_id``, ``error`` (str or None), the last reported metrics and ``config/<path>``.
    ``status``: ``completed`` (all folds), ``stopped_early`` (pruned by the scheduler) or ``error``.
    """
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    folds_done = frame.get("folds_done", pd.Series(0, index=frame.index)).fillna(0).astype(int)
    errors = frame.get("error", pd.Series(None, index=frame.index))
    frame["folds_done"] = folds_done
    frame["status"] = np.where(errors.notna(), "error", np.where(folds_done >= n_folds, "completed", "stopped_early"))
    frame["_rank"] = frame["status"].map({"completed": 0, "stopped_early": 1, "error": 2})
    if METRIC not in frame:
        frame[METRIC] = np.nan
    frame = frame.sort_values(["_rank", METRIC], ascending=[True, False], na_position="last").drop(columns="_rank")
    return frame.reset_index(drop=True)


def run_tune(base: RunConfig, tcfg: TuneConfig, out: Path, *, ray_address: str | None = None,
             storage_path: str | None = None, log: Log = print) -> dict:
    """Run the search into ``out``; return the summary written to ``out/trials.json``.

    ``storage_path``: where Ray Tune keeps trial results and checkpoints (default
    ``out/ray_results``). On a multi-node cluster it must be reachable from every node: a shared
    filesystem path or a cloud URI (``s3://bucket/prefix``), as Ray's "Configuring Persistent
    Storage" guide requires; the summary files are still written to ``out`` on the driver.

    Raises
    ------
    RuntimeError
        If no trial completed a single fold.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from agents.ppo_sb3 import resolve_device
    from training.pipeline import prepare_data

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = base.updated(backend=tcfg.backend)
    device = "cuda" if tcfg.gpus_per_trial > 0 else "cpu"
    stack_device = resolve_device(cfg.device)
    bar = pd.Timedelta(seconds=prepare_data(cfg).info["bar_interval_s"])
    windows = tuning_windows(cfg, tcfg.folds, tcfg.val_bars, bar)
    (out / "folds.json").write_text(json_codec.dumps([window_json(w) for w in windows], indent=1))
    folds = [prepare_fold(fold_run_config(cfg, w, cfg.seed, bar), w, device=stack_device, log=log) for w in windows]
    fold_cfg = fold_run_config(cfg, windows[0], cfg.seed, bar)  # periods differ per fold; PPO/env/reward do not
    bundles = trial_bundles(tcfg.backend, cfg.rllib, gpus_per_trial=tcfg.gpus_per_trial)

    started = False
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=local_ray_cpus(bundles, tcfg.max_concurrent), include_dashboard=False,
                     log_to_driver=False)
        started = True
    try:
        if tcfg.search == "optuna":
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            search = ConcurrencyLimiter(
                OptunaSearch(sampler=optuna.samplers.TPESampler(seed=tcfg.seed)), max_concurrent=tcfg.max_concurrent
            )
        else:
            search = BasicVariantGenerator(random_state=tcfg.seed, max_concurrent=tcfg.max_concurrent)
        scheduler = {
            "asha": lambda: ASHAScheduler(time_attr="training_iteration", max_t=tcfg.folds, grace_period=1,
                                          reduction_factor=2),
            "median": lambda: MedianStoppingRule(time_attr="training_iteration", grace_period=1,
                                                 min_samples_required=2),
            "none": FIFOScheduler,
        }[tcfg.scheduler]()
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=fold_cfg.model_dump(mode="json"), folds=folds, backend=tcfg.backend,
                                 device=device, out=str(out)),
            tune.PlacementGroupFactory(bundles, strategy="PACK"),  # RLlib's env runners/learners included
        )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(),
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=tcfg.trials, search_alg=search,
                                        scheduler=scheduler),
            run_config=tune.RunConfig(name="tune", storage_path=storage_path or str(Path(out).resolve() / "ray_results"),
                                     verbose=1),
        )
        grid = tuner.fit()
        rows = []
        for res in grid:
            row = {"trial_id": res.metrics.get("trial_id") if res.metrics else None,
                   "error": None if res.error is None else f"{type(res.error).__name__}: {res.error}"}
            row.update({k: v for k, v in (res.metrics or {}).items()
                        if k == METRIC or k == "folds_done" or k.startswith("val_sortino_fold")})
            row.update({f"config/{k}": v for k, v in (res.config or {}).items()})
            rows.append(row)
    finally:
        if started:
            ray.shutdown()

    table = results_table(rows, tcfg.folds)
    table.to_csv(out / "results.csv", index=False)
    scored = table[table["folds_done"] > 0] if not table.empty else table
    if scored.empty:
        raise RuntimeError(f"no tuning trial finished a fold; see {out / 'ray_results'}")
    best_row = scored.iloc[0]
    best_params = {k[len("config/"):]: v for k, v in best_row.items() if k.startswith("config/")}
    best_cfg = apply_params(cfg, best_params)
    (out / "best_config.yaml").write_text(yaml.safe_dump(best_cfg.model_dump(mode="json"), sort_keys=False))
    counts = table["status"].value_counts().to_dict()
    summary = {
        "n_trials": len(table),
        "n_completed": int(counts.get("completed", 0)),
        "n_stopped_early": int(counts.get("stopped_early", 0)),
        "n_errors": int(counts.get("error", 0)),
        "metric": METRIC,
        "objective": f"mean validation Sortino over {tcfg.folds} walk-forward folds before test_start "
                     f"(each clipped to +-{SORTINO_CAP:g})",
        "search": "optuna TPE" if tcfg.search == "optuna" else "random",
        "scheduler": tcfg.scheduler,
        "backend": tcfg.backend,
        "tune_config": tcfg.model_dump(mode="json"),
        "folds": [window_json(w) for w in windows],
        "best": {"params": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in best_params.items()},
                 METRIC: float(best_row[METRIC]), "status": str(best_row["status"])},
        "note": "`ats walkforward --tuning-dir` with this directory adds n_trials to the deflated Sharpe ratio's "
                "trial count",
    }
    (out / "trials.json").write_text(json_codec.dumps(summary, strict=False, indent=1))
    log(f"tune: {summary['n_trials']} trials ({summary['n_completed']} completed, {summary['n_stopped_early']} "
        f"stopped early, {summary['n_errors']} failed); best {METRIC} {summary['best'][METRIC]:.3f}")
    return summary
