"""``ats train``: candles -> features -> regime/signal models (out-of-fold) -> PPO -> bundle -> test report.

Periods (``RunConfig.data``): rows are bars after the feature warm-up; train ``[train_start,
val_start)``, validation ``[val_start, test_start)``, test ``[test_start, test_end)``.

Out-of-fold stacking (López de Prado 2018, ch. 7, forward-only folds): the training period is cut
into a first fitting block and ``n_folds`` forward folds; the regime and signal outputs of fold k
come from models fitted on bars before fold k only, with triple-barrier labels whose horizon would
reach into fold k purged (``purge_bars`` >= label horizon). The agent trains on those outputs.
Validation and test outputs come from models fitted on the whole training period (same purge at
its end). Model selection (PPO checkpoint) uses validation only; the test period is traded once,
by :func:`training.evaluate.evaluate_run`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from agents.actor import actor_state_from_sb3
from agents.bundle import save_bundle
from agents.observation import ObsNormalizer, StackModels, model_outputs
from agents.policy import SB3ActorPolicy
from agents.ppo_sb3 import resolve_device, train_ppo
from agents.tb_logging import write_layout_to
from envs.trading_env import EnvData
from market.bundled import bundled_candles_path, bundled_funding_path
from market.candles import join_funding, load_candles, load_funding
from market.errors import DataValidationError
from market.features import atr as atr_indicator
from market.features import compute_features, drop_warmup
from market.instruments import ResolvedSpec, check_spec_fits
from market.labels import triple_barrier_labels
from regime.hmm import RegimeHMM
from regime.transition import RegimeTransitionModel
from signals.tcn import train_tcn
from training import metrics as M
from training.backtest import run_backtest
from training.config import RunConfig, check_run_instrument, run_instrument

Log = Callable[[str], None]


@dataclass(frozen=True)
class PreparedData:
    """Candles, features, ATR and labels aligned row for row after the warm-up, plus period bounds."""

    candles: pd.DataFrame
    features: pd.DataFrame
    atr: np.ndarray  # float64, price units
    labels: np.ndarray  # int8, -1 undefined
    val_row: int  # first validation row
    test_row: int  # first test row
    info: dict = field(default_factory=dict)
    val_end_row: int | None = None  # end (exclusive) of validation; None = test_row (no embargo gap)
    instrument: ResolvedSpec | None = None  # the run's instrument spec and where it came from

    @property
    def val_stop(self) -> int:
        """End (exclusive) of the validation rows; rows ``[val_stop, test_row)`` are the embargo gap."""
        return self.test_row if self.val_end_row is None else self.val_end_row

    @property
    def n_rows(self) -> int:
        return len(self.candles)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepare_data(cfg: RunConfig, log: Log = lambda s: None) -> PreparedData:
    """Load, validate, join funding, compute causal features and labels, drop the warm-up explicitly.

    The run's instrument spec is resolved (:func:`training.config.run_instrument`), checked against the loaded
    candles (:func:`market.instruments.check_spec_fits`) and against ``cfg.env.costs.instrument``, and recorded in
    ``info["instrument"]`` (origin, file, spec).

    Raises
    ------
    DataValidationError
        Bad candles, or a warm-up that does not end before ``train_start``.
    market.instruments.InstrumentSpecError
        No spec for the symbol, a spec that does not fit the candles, or a cost model with another spec.
    """
    d = cfg.data
    resolved = run_instrument(cfg)
    candles_path = Path(d.candles_path) if d.candles_path else bundled_candles_path(d.symbol)
    funding_path = Path(d.funding_path) if d.funding_path else (None if d.candles_path else bundled_funding_path(d.symbol))
    candles = load_candles(candles_path, gap_policy=d.gap_policy)
    if funding_path is not None:
        candles = join_funding(candles, load_funding(funding_path))
    span = candles.loc[(candles.index >= d.ts("load_start")) & (candles.index < d.ts("test_end"))]
    if span.empty:
        raise DataValidationError("period_in_data", [], source=str(candles_path))
    check_spec_fits(resolved.spec, d.symbol, span["close"].to_numpy())
    check_run_instrument(cfg, resolved)
    n_gap_filled = int(span["is_gap"].sum()) if "is_gap" in span.columns else 0  # bars filled in the span
    feats_all = compute_features(span, cfg.features)
    feats, n_warm = drop_warmup(feats_all)
    if len(feats) == 0 or feats.index[0] > d.ts("train_start"):
        raise DataValidationError(
            "warmup_before_train_start", [str(feats.index[0]) if len(feats) else "none"], source=str(candles_path)
        )
    atr_all = atr_indicator(span, cfg.features.atr_period_bars)
    labels_all = triple_barrier_labels(span, cfg.labels)
    keep = feats.index >= d.ts("train_start")
    feats = feats.loc[keep]
    pos = span.index.get_indexer(feats.index)
    candles_kept = span.iloc[pos]
    idx = feats.index
    val_row = int(np.searchsorted(idx, d.ts("val_start")))
    test_row = int(np.searchsorted(idx, d.ts("test_start")))
    val_end_row = int(np.searchsorted(idx, d.ts("val_end")))
    if not 0 < val_row < val_end_row <= test_row < len(idx):
        raise DataValidationError("period_boundaries", [str(d.ts("val_start")), str(d.ts("test_start"))], source=str(candles_path))
    info = {
        "symbol": d.symbol,
        "candles_file": str(candles_path),
        "candles_sha256": _sha256(candles_path),
        "funding_file": str(funding_path) if funding_path else None,
        "funding_sha256": _sha256(funding_path) if funding_path else None,
        "loaded_span": [str(span.index[0]), str(span.index[-1])],
        "gap_policy": d.gap_policy,
        "gap_rows_filled": n_gap_filled,
        "warmup_rows_dropped": int(n_warm),
        "rows_before_train_start_dropped": int((~keep).sum()),
        "train": [str(idx[0]), str(idx[val_row - 1]), val_row],
        "validation": [str(idx[val_row]), str(idx[val_end_row - 1]), val_end_row - val_row],
        "embargo_bars": test_row - val_end_row,
        "test": [str(idx[test_row]), str(idx[-1]), len(idx) - test_row],
        "bar_interval_s": float((idx[1] - idx[0]).total_seconds()),
        "instrument": resolved.record(),
    }
    log(resolved.describe())
    log(
        f"data: {len(span)} bars loaded ({n_gap_filled} missing bars filled, gap policy {d.gap_policy}), "
        f"{n_warm} warm-up rows dropped; train {info['train'][2]}, "
        f"validation {info['validation'][2]}, test {info['test'][2]} bars"
    )
    return PreparedData(candles_kept, feats, atr_all[pos], labels_all[pos], val_row, test_row, info, val_end_row,
                        resolved)


def purge_bars(cfg: RunConfig) -> int:
    """Gap between the last label used for fitting and the first predicted bar (>= label horizon)."""
    horizon = max(cfg.labels.horizon_bars, cfg.regime.horizon_bars)
    return max(horizon, cfg.stacking.purge_bars or 0)


def fit_stack(prep: PreparedData, fit_end: int, cfg: RunConfig, *, device: str, seed: int) -> StackModels:
    """Fit HMM, regime-ahead LightGBM and TCN on rows ``[0, fit_end)`` with the label purge.

    Labels at t depend on prices up to t + horizon, so label rows ``t >= fit_end - purge`` are
    excluded; the LightGBM target (filtered state at t + h) is built inside ``[0, fit_end)``.
    """
    cols = list(cfg.regime_input_features)
    missing = [c for c in cols if c not in prep.features.columns]
    if missing:
        raise ValueError(f"regime_input_features not among the feature columns: {missing}")
    x_hmm = prep.features[cols].to_numpy(np.float64)[:fit_end]
    hmm = RegimeHMM(cfg.regime).fit(x_hmm)
    filtered = hmm.filtered_proba(x_hmm)
    feats = prep.features.to_numpy(np.float32)[:fit_end]
    transition = RegimeTransitionModel(cfg.regime).fit(feats, filtered, cfg.regime.horizon_bars)
    labels = prep.labels[:fit_end].copy()
    labels[max(0, fit_end - purge_bars(cfg)) :] = -1
    signals_cfg = cfg.signals.model_copy(update={"seed": seed})
    tcn = train_tcn(feats, labels, signals_cfg, device=device)
    return StackModels(hmm=hmm, transition=transition, tcn=tcn, hmm_columns=tuple(cols))


def fold_starts(prep: PreparedData, cfg: RunConfig) -> list[int]:
    """First rows of the out-of-fold blocks inside the training period, plus the training end."""
    first = max(cfg.stacking.min_fit_bars, cfg.signals.window_bars)
    if first >= prep.val_row - cfg.stacking.n_folds * 50:
        raise ValueError(
            f"training period ({prep.val_row} bars) too short for min_fit_bars={first} and {cfg.stacking.n_folds} folds"
        )
    return [int(round(b)) for b in np.linspace(first, prep.val_row, cfg.stacking.n_folds + 1)]


def build_market_obs(prep: PreparedData, cfg: RunConfig, *, device: str, log: Log) -> tuple[pd.DataFrame, StackModels, list[dict]]:
    """Market observation (features + model outputs) for rows ``[first fold, end)``.

    Returns the observation frame, the final models (fitted on the whole training period) and a
    record of the folds.
    """
    starts = fold_starts(prep, cfg)
    parts, folds = [], []
    for k, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        t0 = time.perf_counter()
        models = fit_stack(prep, a, cfg, device=device, seed=cfg.seed + k)
        parts.append(model_outputs(prep.features, models, start=a, end=b))
        folds.append({"fold": k, "fit_rows": [0, a], "predict_rows": [a, b], "purge_bars": purge_bars(cfg),
                      "predict_span": [str(prep.features.index[a]), str(prep.features.index[b - 1])]})
        log(f"out-of-fold block {k + 1}/{len(starts) - 1}: fitted on {a} bars, predicted {b - a} bars "
            f"({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    final = fit_stack(prep, prep.val_row, cfg, device=device, seed=cfg.seed + 100)
    parts.append(model_outputs(prep.features, final, start=prep.val_row, end=prep.n_rows))
    log(f"final regime/signal models fitted on the training period ({time.perf_counter() - t0:.1f} s)")
    outputs = pd.concat(parts)
    first = starts[0]
    obs = pd.concat([prep.features.iloc[first:], outputs], axis=1)
    return obs, final, folds


def env_data(prep: PreparedData, market_obs: pd.DataFrame, normalizer: ObsNormalizer, start: int, end: int) -> EnvData:
    """EnvData for feature rows ``[start, end)`` with the normalised market observation."""
    rows = prep.features.index[start:end]
    obs = market_obs.loc[rows]
    normed = pd.DataFrame(normalizer(obs.to_numpy(np.float32)), index=rows, columns=obs.columns)
    return EnvData.from_frames(prep.candles.iloc[start:end], normed, prep.atr[start:end])


def episode_stats(bar_interval_s: float) -> Callable[[np.ndarray], dict[str, float]]:
    """Statistics of one training episode's equity path, for TensorBoard."""

    def stats(equity: np.ndarray) -> dict[str, float]:
        r = M.returns_from_equity(equity)
        p = M.bars_per_year(bar_interval_s)
        return {"return": M.total_return(equity), "sortino": M.sortino_ratio(r, p), "max_drawdown": M.max_drawdown(equity)}

    return stats


def summarize_backtest(res, bar_interval_s: float) -> dict[str, float]:
    """Metrics of a :class:`training.backtest.BacktestResult`."""
    return M.summarize(
        res.equity.to_numpy(np.float64),
        bar_interval_s=bar_interval_s,
        trades=res.trades,
        fees_paid_usdt=res.fees_paid_usdt,
        funding_paid_usdt=res.funding_paid_usdt,
        slippage_paid_usdt=res.slippage_paid_usdt,
        turnover_usdt=res.turnover_usdt,
        position_side=res.position_side,
        position_notional_usdt=res.position_notional_usdt,
    )


def train_run(cfg: RunConfig, run_dir: Path, *, log: Log = print, on_ppo_progress: Callable[[int], None] | None = None) -> Path:
    """Run the whole training pipeline and write ``run_dir/bundle``; return the bundle path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    device = resolve_device(cfg.device)
    log(f"device: {device}")
    prep = prepare_data(cfg, log)
    market_obs, final_models, folds = build_market_obs(prep, cfg, device=device, log=log)
    first = fold_starts(prep, cfg)[0]
    normalizer = ObsNormalizer.fit(market_obs.iloc[: prep.val_row - first].to_numpy(np.float32), cfg.ppo.obs_clip)
    train = env_data(prep, market_obs, normalizer, first, prep.val_row)
    val = env_data(prep, market_obs, normalizer, prep.val_row, prep.val_stop)
    val_candles = prep.candles.iloc[prep.val_row : prep.val_stop]
    bar_s = prep.info["bar_interval_s"]

    def validator(model) -> dict[str, float]:
        res = run_backtest(SB3ActorPolicy(model, cfg.env.actions), val, val_candles, cfg.env)
        return summarize_backtest(res, bar_s)

    t0 = time.perf_counter()
    hparams = {"seed": cfg.seed, "backend": cfg.backend,
               **{f"ppo/{k}": v for k, v in cfg.ppo.model_dump().items() if isinstance(v, (int, float))},
               "reward/kind": cfg.env.reward.kind, "reward/eta": cfg.env.reward.eta}
    if cfg.backend == "rllib":
        from agents.ppo_rllib import ActorPolicy, train_ppo_rllib

        def actor_validator(actor) -> dict[str, float]:
            res = run_backtest(ActorPolicy(actor, cfg.env.actions), val, val_candles, cfg.env)
            return summarize_backtest(res, bar_s)

        result = train_ppo_rllib(
            train, cfg.env, cfg.ppo, cfg.rllib, seed=cfg.seed, device=device, tensorboard_dir=run_dir / "tb",
            episode_stats=episode_stats(bar_s), validator=actor_validator, on_progress=on_ppo_progress,
            hparams={**hparams, **{f"rllib/{k}": v for k, v in cfg.rllib.model_dump().items() if v is not None}},
            log=log,
        )
        actor_tensors = result.actor_tensors
    else:
        result = train_ppo(
            train, cfg.env, cfg.ppo, seed=cfg.seed, device=device, tensorboard_dir=run_dir / "tb",
            episode_stats=episode_stats(bar_s), validator=validator, on_progress=on_ppo_progress, hparams=hparams,
        )
        write_layout_to(run_dir / "tb" / "PPO_1")
        actor_tensors = actor_state_from_sb3(result.model.policy)
    log(f"PPO: {cfg.ppo.total_timesteps} steps in {time.perf_counter() - t0:.0f} s; best validation Sortino "
        f"{result.best_metrics.get('sortino', float('nan')):.3f} at step {result.best_step}")
    (run_dir / "folds.json").write_text(json.dumps(folds, indent=1))
    (run_dir / "validation_history.json").write_text(json.dumps([M.to_jsonable(h) for h in result.history], indent=1))
    bundle = save_bundle(
        run_dir / "bundle",
        actor_tensors=actor_tensors,
        hidden=tuple(cfg.ppo.net_arch),
        activation="tanh",
        normalizer=normalizer,
        feature_config=cfg.features,
        env_config=cfg.env,
        models=final_models,
        run_config=cfg.model_dump(mode="json"),
        data_info={**prep.info, "folds": folds},
        metrics={"validation": M.to_jsonable(result.best_metrics), "selected_step": result.best_step},
    )
    _write_replay(prep, cfg, run_dir / "replay")
    return bundle


REPLAY_HISTORY_BARS = 1200


def _write_replay(prep: PreparedData, cfg: RunConfig, out: Path) -> None:
    """Write the test period (plus history for the warm-up) as candles for ``ats serve --replay``."""
    out.mkdir(parents=True, exist_ok=True)
    start = max(0, prep.test_row - REPLAY_HISTORY_BARS)
    frame = prep.candles.iloc[start:].reset_index().rename(columns={"open_time": "timestamp"})
    frame.to_parquet(out / "test_candles.parquet", compression="zstd", index=False)
