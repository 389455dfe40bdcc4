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

A pooled run (``data.symbols``, :func:`train_pooled`) prepares every symbol with its own candles, funding and
instrument spec, stacks one set of regime/signal models out of fold over all symbols (folds and purge per symbol,
:func:`fit_stack_pooled`), trains PPO on episodes that each draw a symbol, and chooses the checkpoint on the
equal-weight portfolio of the symbols' validation backtests.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from market import json_codec
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
from training.config import (
    RunConfig,
    SymbolSource,
    check_run_instrument,
    source_instrument,
    symbol_env_config,
)
from training.portfolio import portfolio_metrics

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
        """Number of candle rows."""
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
    return prepare_source(cfg, cfg.data.sources()[0], log, primary=True)


def prepare_symbols(cfg: RunConfig, log: Log = lambda s: None) -> list[PreparedData]:
    """:func:`prepare_data` of every symbol of the run (``data.symbols``; one for a single-symbol run), primary first,
    each with its own candles, funding and instrument spec, cut at the same period boundaries.

    Raises
    ------
    DataValidationError, market.instruments.InstrumentSpecError
        As :func:`prepare_data`, for any symbol (the message names its file).
    """
    sources = cfg.data.sources()
    return [prepare_source(cfg, s, log, primary=i == 0) for i, s in enumerate(sources)]


def prepare_source(cfg: RunConfig, source: SymbolSource, log: Log = lambda s: None, *, primary: bool = True) -> PreparedData:
    """:func:`prepare_data` of one symbol of the run; ``primary``: its spec must be ``cfg.env.costs.instrument``."""
    d = cfg.data
    resolved = source_instrument(source)
    symbol = source.symbol
    candles_path = Path(source.candles_path) if source.candles_path else bundled_candles_path(symbol)
    funding_path = (Path(source.funding_path) if source.funding_path
                    else (None if source.candles_path else bundled_funding_path(symbol)))
    candles = load_candles(candles_path, gap_policy=d.gap_policy)
    if funding_path is not None:
        candles = join_funding(candles, load_funding(funding_path))
    span = candles.loc[(candles.index >= d.ts("load_start")) & (candles.index < d.ts("test_end"))]
    if span.empty:
        raise DataValidationError("period_in_data", [], source=str(candles_path))
    check_spec_fits(resolved.spec, symbol, span["close"].to_numpy())
    if primary:
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
        "symbol": symbol,
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
    return fit_stack_pooled([prep], [fit_end], cfg, device=device, seed=seed)


def fit_stack_pooled(preps: list[PreparedData], fit_ends: list[int], cfg: RunConfig, *, device: str,
                     seed: int) -> StackModels:
    """One set of regime and signal models fitted on rows ``[0, fit_ends[i])`` of every symbol ``preps[i]``.

    Pooled, not per symbol: the features are scale-free (returns, ratios, ATR %), so one HMM, one LightGBM and one
    TCN see every symbol's history, and a pooled bundle serves any of its symbols with one observation builder.
    Each symbol is its own sequence: the HMM is fitted with per-symbol ``lengths`` and filtered per symbol, the
    LightGBM targets (state h bars ahead) are built within each symbol, TCN windows never span two symbols, and the
    label purge (:func:`purge_bars`) is applied at the end of each symbol's fitting rows. With one symbol this is
    exactly :func:`fit_stack`.
    """
    cols = list(cfg.regime_input_features)
    missing = [c for c in cols if c not in preps[0].features.columns]
    if missing:
        raise ValueError(f"regime_input_features not among the feature columns: {missing}")
    single = len(preps) == 1
    x_parts = [p.features[cols].to_numpy(np.float64)[:e] for p, e in zip(preps, fit_ends, strict=True)]
    lengths = None if single else [len(x) for x in x_parts]
    x_hmm = x_parts[0] if single else np.concatenate(x_parts)
    hmm = RegimeHMM(cfg.regime).fit(x_hmm, lengths)
    f_parts = [p.features.to_numpy(np.float32)[:e] for p, e in zip(preps, fit_ends, strict=True)]
    filtered = hmm.filtered_proba(x_hmm) if single else np.concatenate([hmm.filtered_proba(x) for x in x_parts])
    feats = f_parts[0] if single else np.concatenate(f_parts)
    transition = RegimeTransitionModel(cfg.regime).fit(feats, filtered, cfg.regime.horizon_bars, lengths)
    l_parts = []
    for p, e in zip(preps, fit_ends, strict=True):
        lab = p.labels[:e].copy()
        lab[max(0, e - purge_bars(cfg)) :] = -1
        l_parts.append(lab)
    labels = l_parts[0] if single else np.concatenate(l_parts)
    valid = None
    if not single:  # a TCN window ends at least window_bars - 1 rows into its own symbol
        valid = np.ones(len(labels), dtype=np.bool_)
        for a in np.cumsum([0, *lengths[:-1]]):
            valid[a : a + cfg.signals.window_bars - 1] = False
    signals_cfg = cfg.signals.updated(seed=seed)
    tcn = train_tcn(feats, labels, signals_cfg, device=device, valid_mask=valid)
    return StackModels(hmm=hmm, transition=transition, tcn=tcn, hmm_columns=tuple(cols))


def fold_starts(prep: PreparedData, cfg: RunConfig) -> list[int]:
    """First rows of the out-of-fold blocks inside the training period, plus the training end."""
    first = max(cfg.stacking.min_fit_bars, cfg.signals.window_bars)
    if first >= prep.val_row - cfg.stacking.n_folds * 50:
        raise ValueError(
            f"training period ({prep.val_row} bars) too short for min_fit_bars={first} and {cfg.stacking.n_folds} folds"
        )
    return [round(b) for b in np.linspace(first, prep.val_row, cfg.stacking.n_folds + 1).tolist()]


def build_market_obs(prep: PreparedData, cfg: RunConfig, *, device: str, log: Log) -> tuple[pd.DataFrame, StackModels, list[dict]]:
    """Market observation (features + model outputs) for rows ``[first fold, end)``.

    Returns the observation frame, the final models (fitted on the whole training period) and a
    record of the folds.
    """
    starts = fold_starts(prep, cfg)
    parts, folds = [], []
    for k, (a, b) in enumerate(itertools.pairwise(starts)):
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


def build_market_obs_pooled(preps: list[PreparedData], cfg: RunConfig, *, device: str, log: Log
                            ) -> tuple[list[pd.DataFrame], StackModels, list[dict]]:
    """:func:`build_market_obs` of a pooled run: one observation frame per symbol, one set of final models.

    The fold boundaries are times (the primary symbol's :func:`fold_starts` rows), mapped to each symbol's rows,
    so fold k of every symbol is predicted by models fitted on every symbol's bars before it (purged per symbol,
    :func:`fit_stack_pooled`); validation and test outputs come from models fitted on every symbol's training
    period. Returns the frames (rows ``[first fold, end)`` of each symbol), the final models and a fold record.
    """
    times = [preps[0].features.index[r] if r < preps[0].n_rows else None for r in fold_starts(preps[0], cfg)]
    starts = [[int(p.features.index.searchsorted(t)) if t is not None else p.n_rows for t in times[:-1]] + [p.val_row]
              for p in preps]
    parts: list[list[pd.DataFrame]] = [[] for _ in preps]
    folds = []
    for k in range(len(times) - 1):
        t0 = time.perf_counter()
        fit_ends = [s[k] for s in starts]
        models = fit_stack_pooled(preps, fit_ends, cfg, device=device, seed=cfg.seed + k)
        for i, p in enumerate(preps):
            parts[i].append(model_outputs(p.features, models, start=starts[i][k], end=starts[i][k + 1]))
        folds.append({"fold": k, "purge_bars": purge_bars(cfg),
                      "by_symbol": {p.info["symbol"]: {
                          "fit_rows": [0, starts[i][k]], "predict_rows": [starts[i][k], starts[i][k + 1]],
                          "predict_span": [str(p.features.index[starts[i][k]]), str(p.features.index[starts[i][k + 1] - 1])]}
                          for i, p in enumerate(preps)}})
        log(f"out-of-fold block {k + 1}/{len(times) - 1}: fitted on {sum(fit_ends)} bars of {len(preps)} symbols "
            f"({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    final = fit_stack_pooled(preps, [p.val_row for p in preps], cfg, device=device, seed=cfg.seed + 100)
    obs = []
    for i, p in enumerate(preps):
        parts[i].append(model_outputs(p.features, final, start=p.val_row, end=p.n_rows))
        first = starts[i][0]
        obs.append(pd.concat([p.features.iloc[first:], pd.concat(parts[i])], axis=1))
    log(f"final regime/signal models fitted on the training period of {len(preps)} symbols "
        f"({time.perf_counter() - t0:.1f} s)")
    return obs, final, folds


def pooled_fold_first(preps: list[PreparedData], cfg: RunConfig) -> list[int]:
    """First out-of-fold row of each symbol (the row of the primary's first fold time)."""
    t = preps[0].features.index[fold_starts(preps[0], cfg)[0]]
    return [int(p.features.index.searchsorted(t)) for p in preps]


def env_data(prep: PreparedData, market_obs: pd.DataFrame, normalizer: ObsNormalizer, start: int, end: int) -> EnvData:
    """EnvData for feature rows ``[start, end)`` with the normalised market observation (funding times at the
    symbol's spec interval)."""
    rows = prep.features.index[start:end]
    obs = market_obs.loc[rows]
    normed = pd.DataFrame(normalizer(obs.to_numpy(np.float32)), index=rows, columns=obs.columns)
    hours = prep.instrument.spec.funding_interval_hours if prep.instrument is not None else 8
    return EnvData.from_frames(prep.candles.iloc[start:end], normed, prep.atr[start:end], funding_interval_hours=hours)


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
    """Run the whole training pipeline and write ``run_dir/bundle``; return the bundle path.

    A config with several symbols (``data.symbols``) runs :func:`train_pooled`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    device = resolve_device(cfg.device)
    log(f"device: {device}")
    if len(cfg.data.sources()) > 1:
        return train_pooled(cfg, run_dir, device=device, log=log, on_ppo_progress=on_ppo_progress)
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
    bundle = _save_run(run_dir, cfg, result, actor_tensors, normalizer, final_models, folds,
                       data_info={**prep.info, "folds": folds}, drift_reference=_drift_reference([prep], final_models))
    _write_replay(prep, cfg, run_dir / "replay")
    return bundle


def pooled_data_info(preps: list[PreparedData], folds: list[dict]) -> dict:
    """The bundle manifest's ``data`` of a pooled run: the primary symbol's record (as a single-symbol run's, so
    readers of ``data.symbol`` / ``data.instrument`` keep working), plus ``symbols`` (primary first),
    ``instruments`` (each symbol's spec record: origin, file, spec) and ``by_symbol`` (each symbol's data record)."""
    return {**preps[0].info, "folds": folds, "symbols": [p.info["symbol"] for p in preps],
            "instruments": {p.info["symbol"]: p.info["instrument"] for p in preps},
            "by_symbol": {p.info["symbol"]: p.info for p in preps}}


def train_pooled(cfg: RunConfig, run_dir: Path, *, device: str, log: Log = print,
                 on_ppo_progress: Callable[[int], None] | None = None) -> Path:
    """:func:`train_run` of a pooled multi-symbol run (``data.symbols``).

    Every symbol is prepared with its own candles, funding and instrument spec (:func:`prepare_symbols`); one set
    of regime/signal models is stacked out of fold over all symbols (:func:`build_market_obs_pooled`); the
    observation normaliser is fitted on every symbol's training rows; PPO episodes draw a symbol each
    (:class:`envs.multi_env.MultiSymbolEnv`, each symbol under its own spec); the checkpoint is the one with the
    best validation Sortino of the equal-weight portfolio of the symbols' validation backtests
    (:mod:`training.portfolio`). Only the SB3 backend.
    """
    if cfg.backend != "sb3":
        raise ValueError("pooled multi-symbol training (data.symbols) runs on the sb3 backend only")
    preps = prepare_symbols(cfg, log)
    market_obs, final_models, folds = build_market_obs_pooled(preps, cfg, device=device, log=log)
    firsts = pooled_fold_first(preps, cfg)
    train_rows = np.concatenate([o.iloc[: p.val_row - f].to_numpy(np.float32)
                                 for o, p, f in zip(market_obs, preps, firsts, strict=True)])
    normalizer = ObsNormalizer.fit(train_rows, cfg.ppo.obs_clip)
    envs = {p.info["symbol"]: symbol_env_config(cfg, p.instrument.spec) for p in preps}
    legs = [(p.info["symbol"], env_data(p, o, normalizer, f, p.val_row), envs[p.info["symbol"]])
            for p, o, f in zip(preps, market_obs, firsts, strict=True)]
    vals = {p.info["symbol"]: (env_data(p, o, normalizer, p.val_row, p.val_stop), p.candles.iloc[p.val_row : p.val_stop])
            for p, o in zip(preps, market_obs, strict=True)}
    bar_s = preps[0].info["bar_interval_s"]

    def validator(model) -> dict[str, float]:
        results = {sym: run_backtest(SB3ActorPolicy(model, cfg.env.actions), data, candles, envs[sym])
                   for sym, (data, candles) in vals.items()}
        out = portfolio_metrics(results, bar_s)
        for sym, res in results.items():
            out[f"sortino/{sym}"] = summarize_backtest(res, bar_s)["sortino"]
        return out

    t0 = time.perf_counter()
    hparams = {"seed": cfg.seed, "backend": cfg.backend, "n_symbols": len(preps),
               **{f"ppo/{k}": v for k, v in cfg.ppo.model_dump().items() if isinstance(v, (int, float))},
               "reward/kind": cfg.env.reward.kind, "reward/eta": cfg.env.reward.eta}
    result = train_ppo(
        legs, cfg.env, cfg.ppo, seed=cfg.seed, device=device, tensorboard_dir=run_dir / "tb",
        episode_stats=episode_stats(bar_s), validator=validator, on_progress=on_ppo_progress, hparams=hparams,
    )
    write_layout_to(run_dir / "tb" / "PPO_1")
    log(f"PPO: {cfg.ppo.total_timesteps} steps over {len(preps)} symbols in {time.perf_counter() - t0:.0f} s; best "
        f"validation Sortino (equal-weight portfolio) {result.best_metrics.get('sortino', float('nan')):.3f} at step "
        f"{result.best_step}")
    bundle = _save_run(run_dir, cfg, result, actor_state_from_sb3(result.model.policy), normalizer, final_models,
                       folds, data_info=pooled_data_info(preps, folds),
                       selection="best validation Sortino of the equal-weight portfolio of all symbols",
                       drift_reference=_drift_reference(preps, final_models))
    _write_replay(preps[0], cfg, run_dir / "replay")
    for p in preps[1:]:
        _write_replay(p, cfg, run_dir / "replay" / p.info["symbol"])
    return bundle


REPLAY_HISTORY_BARS = 1200


def _save_run(run_dir: Path, cfg: Any, result: Any, actor_tensors: dict[str, Any], normalizer: Any,
              final_models: Any, folds: Any, *, data_info: dict[str, Any], selection: str | None = None,
              drift_reference: dict[str, Any] | None = None) -> Path:
    """Write a trained run's ``folds.json``, ``validation_history.json`` and policy bundle (one- and
    multi-symbol runs alike); ``selection`` says how the checkpoint was chosen when it is not the
    default (best validation Sortino). Returns the bundle directory."""
    (run_dir / "folds.json").write_text(json_codec.dumps(folds, indent=1))
    (run_dir / "validation_history.json").write_text(json_codec.dumps([M.to_jsonable(h) for h in result.history], indent=1))
    metrics = {"validation": M.to_jsonable(result.best_metrics), "selected_step": result.best_step}
    if selection is not None:
        metrics["selection"] = selection
    return save_bundle(
        run_dir / "bundle", actor_tensors=actor_tensors, hidden=tuple(cfg.ppo.net_arch), activation="tanh",
        normalizer=normalizer, feature_config=cfg.features, env_config=cfg.env, models=final_models,
        run_config=cfg.model_dump(mode="json"), data_info=data_info, metrics=metrics, drift_reference=drift_reference,
    )


def _drift_reference(preps: list[PreparedData], models: Any) -> dict[str, Any]:
    """The training distribution the bundle carries for drift detection (:mod:`agents.drift_reference`): every
    symbol's training rows (before its validation period) of the features, and their forward-filtered regime
    probabilities (filtered per symbol)."""
    from agents.drift_reference import fit_reference

    cols = list(models.hmm_columns)
    features = pd.concat([p.features.iloc[: p.val_row] for p in preps])
    proba = np.concatenate([models.hmm.filtered_proba(p.features[cols].to_numpy(np.float64)[: p.val_row])
                            for p in preps])
    return fit_reference(features, proba, source=f"training rows of {len(preps)} symbol(s), before validation")


def _write_replay(prep: PreparedData, cfg: RunConfig, out: Path) -> None:
    """Write the test period (plus history for the warm-up) as candles for ``ats serve --replay``."""
    out.mkdir(parents=True, exist_ok=True)
    start = max(0, prep.test_row - REPLAY_HISTORY_BARS)
    frame = prep.candles.iloc[start:].reset_index().rename(columns={"open_time": "timestamp"})
    frame.to_parquet(out / "test_candles.parquet", compression="zstd", index=False)
