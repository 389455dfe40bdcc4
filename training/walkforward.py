"""``ats walkforward``: refit the whole pipeline on forward folds, trade each fold's test window, and
judge the stitched out-of-sample result with multi-seed statistics, the deflated Sharpe ratio and PBO.

Folds (forward-only, López de Prado 2018 ch. 7 / 12): the evaluated span ``[start, end)`` is tiled by
``folds`` equal test windows. Fold k trades ``[T_k, T_{k+1})``, chooses its PPO checkpoint on the
``val_bars`` before ``T_k``, and fits regime, signal and PPO models on the training window before the
validation window (``expanding``: from ``data_start``; ``rolling``: the last ``train_bars``). Labels
whose horizon reaches into the validation window are purged inside the pipeline (``purge_bars`` >=
label horizon, see :func:`training.pipeline.fit_stack`). Because every training window ends before its
own validation and test windows, no training bar follows a test bar of the same fold: the embargo of
purged k-fold CV, which guards training data *after* a test window, is satisfied by construction;
``embargo_bars`` additionally leaves a gap between a validation window and its test window.

Each fold and seed is a full ``ats train`` run directory under ``OUT/fold{k}/seed{s}``; its windows,
seed and data hash are in that run's ``config.yaml`` and bundle manifest, and ``OUT/folds.json``
lists them all. Re-running with the same config reproduces the metrics (seeded everything).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import Field

from agents.baselines import RandomPolicy
from agents.bundle import load_bundle
from envs.actions import decode_action
from market.config_base import StrictConfig
from market.features import warmup_bars
from training import metrics as M
from training.backtest import BacktestResult, run_backtest
from training.config import RunConfig, load_config
from training.evaluate import test_period_backtests
from training.pipeline import Log, prepare_data, summarize_backtest, train_run
from training.report import write_report
from training.stats import deflated_sharpe_ratio, probability_of_backtest_overfitting


class WalkForwardConfig(StrictConfig):
    """A walk-forward study: the base run config and how the span is cut into folds."""

    base_config: str = Field(..., description="run config (path relative to this file) used for every fold")
    data_start: str = Field(..., description="first bar of the earliest training window (UTC)")
    start: str = Field(..., description="first bar of the first test window (UTC)")
    end: str = Field(..., description="end (exclusive) of the last test window (UTC)")
    folds: int = Field(2, ge=1)
    scheme: Literal["expanding", "rolling"] = "expanding"
    train_bars: int = Field(4000, ge=500, description="rolling scheme: training length; expanding: minimum")
    val_bars: int = Field(720, ge=24, description="validation window before each test window")
    embargo_bars: int = Field(0, ge=0, description="gap between a validation window and its test window")
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1, description="PPO/model seeds per fold")
    tuning_trials: int = Field(0, ge=0, description="configurations tried before this study (counted by the DSR)")
    bootstrap_block_bars: int = Field(24, ge=1)
    bootstrap_samples: int = Field(500, ge=50)


@dataclass(frozen=True)
class FoldWindow:
    """Bar-time boundaries of one fold (UTC): train [train_start, val_start), val, test."""

    fold: int
    train_start: pd.Timestamp
    val_start: pd.Timestamp
    test_start: pd.Timestamp
    test_end: pd.Timestamp

    def as_json(self) -> dict:
        return {k: (str(v) if isinstance(v, pd.Timestamp) else v) for k, v in self.__dict__.items()}


def fold_windows(wf: WalkForwardConfig, bar: pd.Timedelta) -> list[FoldWindow]:
    """Cut ``[start, end)`` into ``folds`` test windows (whole bars) and place train/val before each.

    Raises
    ------
    ValueError
        If a training window would start before ``data_start`` or be shorter than ``train_bars``.
    """
    start, end = pd.Timestamp(wf.start, tz="UTC"), pd.Timestamp(wf.end, tz="UTC")
    n_bars = int((end - start) / bar)
    edges = [start + bar * int(round(i * n_bars / wf.folds)) for i in range(wf.folds + 1)]
    data_start = pd.Timestamp(wf.data_start, tz="UTC")
    out = []
    for k, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        val_start = a - bar * (wf.val_bars + wf.embargo_bars)
        train_start = data_start if wf.scheme == "expanding" else val_start - bar * wf.train_bars
        if train_start < data_start or (val_start - train_start) < bar * wf.train_bars:
            raise ValueError(
                f"fold {k}: training window {train_start}..{val_start} is shorter than train_bars={wf.train_bars} "
                f"or starts before data_start={data_start}"
            )
        out.append(FoldWindow(k, train_start, val_start, a, b))
    return out


def fold_run_config(base: RunConfig, w: FoldWindow, seed: int, bar: pd.Timedelta) -> RunConfig:
    """The base config with this fold's periods and seed."""
    margin = bar * (warmup_bars(base.features) + 50)
    data = base.data.model_copy(update={
        "load_start": str(w.train_start - margin), "train_start": str(w.train_start),
        "val_start": str(w.val_start), "test_start": str(w.test_start),
        "test_end": str(w.test_end),
    })
    return base.model_copy(update={"data": data, "seed": seed, "name": f"{base.name}-fold{w.fold}-seed{seed}"})


def _stitch(results: list[BacktestResult], initial: float) -> pd.Series:
    """Chain test-window equity curves into one out-of-sample curve starting at ``initial``."""
    rets = [r.equity.pct_change().iloc[1:] for r in results]
    r = pd.concat(rets)
    first = results[0].equity.index[0]
    eq = initial * np.cumprod(1.0 + r.to_numpy())
    return pd.Series(np.concatenate([[initial], eq]), index=pd.DatetimeIndex([first, *r.index]))


def load_walkforward(path: Path, **overrides: object) -> tuple[WalkForwardConfig, RunConfig]:
    """Parse a walk-forward YAML (``overrides`` replace top-level keys) and its base run config.

    Raises
    ------
    pydantic.ValidationError, training.config.ConfigError
        Unknown keys or invalid values in either file.
    """
    raw = yaml.safe_load(Path(path).read_text())
    raw.update({k: v for k, v in overrides.items() if v is not None})
    wf = WalkForwardConfig.model_validate(raw)
    return wf, load_config((Path(path).parent / wf.base_config).resolve())


def run_walkforward(wf: WalkForwardConfig, base: RunConfig, out: Path, *, log: Log = print) -> dict:
    """Run the study into ``out``; return the summary written to ``out/metrics.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bar = pd.Timedelta(seconds=3600)  # refined from the data below
    windows = None
    per_strategy: dict[str, list[BacktestResult]] = {}
    ppo_by_seed: dict[int, list[BacktestResult]] = {s: [] for s in wf.seeds}
    val_sortino: dict[int, list[float]] = {s: [] for s in wf.seeds}
    fold_records = []
    for seed in wf.seeds:
        for k in range(wf.folds):
            if windows is None:
                prep0 = prepare_data(fold_run_config(base, FoldWindow(0, pd.Timestamp(wf.data_start, tz="UTC"),
                    pd.Timestamp(wf.start, tz="UTC") - bar * wf.val_bars, pd.Timestamp(wf.start, tz="UTC"),
                    pd.Timestamp(wf.end, tz="UTC")), wf.seeds[0], bar))
                bar = pd.Timedelta(seconds=prep0.info["bar_interval_s"])
                windows = fold_windows(wf, bar)
            w = windows[k]
            cfg = fold_run_config(base, w, seed, bar)
            run_dir = out / f"fold{k}" / f"seed{seed}"
            log(f"fold {k + 1}/{wf.folds}, seed {seed}: train {w.train_start:%Y-%m-%d}..{w.val_start:%Y-%m-%d}, "
                f"test {w.test_start:%Y-%m-%d}..{w.test_end:%Y-%m-%d}")
            bundle_dir = train_run(cfg, run_dir, log=lambda s: None)
            bundle = load_bundle(bundle_dir)
            prep = prepare_data(cfg)
            results = test_period_backtests(cfg, bundle, prep)
            ppo_by_seed[seed].append(results["ppo"])
            v = bundle.manifest["metrics"]["validation"].get("sortino")
            val_sortino[seed].append(float(v) if isinstance(v, (int, float)) else np.nan)
            fold_records.append({**w.as_json(), "seed": seed, "run_dir": str(run_dir),
                                 "data_sha256": prep.info["candles_sha256"]})
            if seed == wf.seeds[0]:  # seed-independent strategies are traded once per fold
                data_rand = _random_result(cfg, bundle, prep, seed=k)
                for name in ("v1", "buy_and_hold", "flat"):
                    per_strategy.setdefault(name, []).append(results[name])
                per_strategy.setdefault("random", []).append(data_rand)
    (out / "folds.json").write_text(json.dumps(fold_records, indent=1))
    return _summarize(wf, base, out, bar, per_strategy, ppo_by_seed, val_sortino, log)


def _random_result(cfg: RunConfig, bundle, prep, seed: int) -> BacktestResult:
    """The seeded random policy on the fold's test window, same env and costs."""
    from agents.observation import model_outputs
    from envs.trading_env import EnvData

    a, b = prep.test_row, prep.n_rows
    market = pd.concat([prep.features.iloc[a:b], model_outputs(prep.features, bundle.models, start=a, end=b)], axis=1)
    data = EnvData.from_frames(prep.candles.iloc[a:b], pd.DataFrame(bundle.normalizer(market.to_numpy(np.float32)),
                               index=market.index, columns=market.columns), prep.atr[a:b])
    policy = RandomPolicy(lambda x: decode_action(x, cfg.env.actions), seed=seed)
    return run_backtest(policy, data, prep.candles.iloc[:b], cfg.env, offset=a)


def _metrics_of(results: list[BacktestResult], bar_s: float, initial: float) -> dict[str, float]:
    """Metrics of the stitched curve (costs and trades summed over the windows)."""
    eq = _stitch(results, initial)
    trades = [t for r in results for t in r.trades]
    sides = np.concatenate([r.position_side for r in results])
    return M.summarize(
        eq.to_numpy(), bar_interval_s=bar_s, trades=trades,
        fees_paid_usdt=sum(r.fees_paid_usdt for r in results), funding_paid_usdt=sum(r.funding_paid_usdt for r in results),
        slippage_paid_usdt=sum(r.slippage_paid_usdt for r in results), turnover_usdt=sum(r.turnover_usdt for r in results),
        position_side=sides,
    )


def _summarize(wf, base, out, bar, per_strategy, ppo_by_seed, val_sortino, log) -> dict:
    bar_s = bar.total_seconds()
    p = M.bars_per_year(bar_s)
    initial = base.env.initial_equity_usdt
    seeds = list(ppo_by_seed)
    # PPO seed chosen on validation only (mean validation Sortino over the folds), never on test
    chosen = max(seeds, key=lambda s: np.nanmean(val_sortino[s]) if np.isfinite(val_sortino[s]).any() else -np.inf)
    strategies = {"ppo": ppo_by_seed[chosen], **per_strategy}
    metrics = {name: _metrics_of(res, bar_s, initial) for name, res in strategies.items()}
    per_seed = {s: _metrics_of(ppo_by_seed[s], bar_s, initial) for s in seeds}
    keys = list(metrics["ppo"])
    seed_stats = {k: {"mean": float(np.nanmean([per_seed[s][k] for s in seeds])),
                      "std": float(np.nanstd([per_seed[s][k] for s in seeds], ddof=1)) if len(seeds) > 1 else 0.0}
                  for k in keys}
    per_fold = {name: [summarize_fold(r, bar_s) for r in res] for name, res in strategies.items()}
    ci = {}
    for name, res in strategies.items():
        r = M.returns_from_equity(_stitch(res, initial).to_numpy())
        if np.ptp(r) > 0:
            ci[name] = M.block_bootstrap_ci(r, lambda x: M.sortino_ratio(x, p), block_len=wf.bootstrap_block_bars,
                                            n_boot=wf.bootstrap_samples, alpha=0.05, seed=0)
    seed_returns = np.column_stack([M.returns_from_equity(_stitch(ppo_by_seed[s], initial).to_numpy()) for s in seeds])
    seed_sharpes = seed_returns.mean(axis=0) / np.maximum(seed_returns.std(axis=0, ddof=1), 1e-12)
    n_trials = len(seeds) + wf.tuning_trials
    chosen_returns = seed_returns[:, seeds.index(chosen)]
    dsr = None
    if chosen_returns.std() > 0:
        dsr = deflated_sharpe_ratio(chosen_returns, n_trials=n_trials,
                                    sr_variance=float(np.var(seed_sharpes, ddof=1)) if len(seeds) > 1 else 0.0)
    dsr_reading = dsr.reading() if dsr else "DSR undefined: the chosen PPO seed never changed its equity (no trades)"
    pbo = None
    if len(seeds) >= 2 and np.ptp(seed_returns, axis=1).max() > 0:  # identical seeds leave nothing to rank
        n_blocks = 8 if len(seed_returns) >= 16 * 8 else 4
        pbo = probability_of_backtest_overfitting(seed_returns, n_blocks=n_blocks)
    summary = {
        "windows": [w for w in json.loads((out / "folds.json").read_text()) if w["seed"] == seeds[0]],
        "seeds": seeds, "chosen_seed_by_validation": chosen,
        "validation_sortino_by_seed": {str(s): val_sortino[s] for s in seeds},
        "stitched": {k: M.to_jsonable(v) for k, v in metrics.items()},
        "ppo_over_seeds": M.to_jsonable({f"{k}.{stat}": v[stat] for k, v in seed_stats.items() for stat in v}),
        "per_fold": {k: [M.to_jsonable(m) for m in v] for k, v in per_fold.items()},
        "sortino_ci95": {k: [float(v[0]), float(v[1])] for k, v in ci.items()},
        "deflated_sharpe": {"reading": dsr_reading, "n_trials": n_trials, **({} if dsr is None else {
            "dsr": dsr.dsr, "sr_per_bar": dsr.sr, "sr0_per_bar": dsr.sr0, "skew": dsr.skew, "kurtosis": dsr.kurtosis})},
        "pbo": None if pbo is None else {"pbo": pbo.pbo, "n_blocks": pbo.n_blocks, "configs": "PPO seeds",
                                          "reading": pbo.reading()},
    }
    summary = M.to_jsonable(summary)
    (out / "metrics.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    notes = [
        f"Walk-forward, {wf.scheme} scheme, {wf.folds} folds over {wf.start} .. {wf.end}; validation {wf.val_bars} bars "
        f"before each test window; seeds {seeds} (PPO shown: seed {chosen}, chosen on mean validation Sortino).",
        dsr_reading + f" (trials counted: {n_trials} = {len(seeds)} seeds + {wf.tuning_trials} tuning runs).",
        pbo.reading() + " (configurations: PPO seeds)." if pbo
        else "PBO undefined: fewer than 2 seeds, or all seeds traded identically out of sample.",
        "Sortino 95 % block-bootstrap intervals: " + ", ".join(f"{k} [{v[0]:.2f}, {v[1]:.2f}]" for k, v in ci.items()),
        "All strategies trade the same test windows under the same cost model; equity is stitched across windows.",
    ]
    write_report(out, title=f"ats walk-forward: {base.name}",
                 equity_curves={k: _stitch(v, initial) for k, v in strategies.items()}, metrics=metrics, notes=notes,
                 extra_tables={"PPO over seeds (mean, std)": pd.DataFrame(seed_stats).T})
    for line in notes[:3]:
        log(line)
    return summary


def summarize_fold(res: BacktestResult, bar_s: float) -> dict[str, float]:
    """Metrics of one fold's test window."""
    return summarize_backtest(res, bar_s)
