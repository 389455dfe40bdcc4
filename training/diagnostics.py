"""Layer diagnostics: does each layer of the V2 stack carry information out of fold?

DESIGN.md: "A layer earns its place in the observation only if out-of-fold diagnostics and an ablation show it
carries information; otherwise the report says so." This module measures, on predictions made by models fitted
strictly before the rows they predict (never in-sample):

1. **Signal layer (TCN)**: multi-class log-loss of the triple-barrier softmax against the class-prior
   baseline, whose prior is the class frequencies of the *training* labels of the models that made the
   predictions (the purged labels the TCN was fitted on, never the evaluated rows'); the difference
   ``log-loss(model) - log-loss(prior)`` (< 0: the TCN beats the prior) with a block-bootstrap interval; and
   one-vs-rest ROC AUC per class (Mann-Whitney form, Hanley & McNeil 1982; the prior's constant score has AUC
   0.5).
2. **Regime transition (LightGBM h ahead)**: accuracy and balanced accuracy (mean recall over the regimes that
   occur, Brodersen et al. 2010) of ``argmax regime_ahead_p[t]`` against the target ``argmax regime_p[t + h]``
   (the filtered regime h bars later, as :func:`regime.transition.build_targets` defines it), beside the
   "regime persists" baseline ``argmax regime_p[t]``; the accuracy difference with a block-bootstrap interval.
   Only rows whose target lies in the same block are used (same HMM, same state order).
3. **HMM regime separation**: per filtered regime ``argmax regime_p[t]`` (forward-filtered, causal), the mean
   and volatility (sample std) of the next-bar log return ``log(close[t+1] / close[t])`` with block-bootstrap
   intervals and bar counts; Kruskal-Wallis p of the returns by regime (location; Kruskal & Wallis 1952) and
   Brown-Forsythe p (scale: Levene's test about the median; Brown & Forsythe 1974). Both p-values assume
   independent bars, so with serially dependent returns they are optimistic: read the intervals first.
4. **Observation ablation** (:func:`observation_ablation`): the small PPO trained with the observation restricted
   to the market features only, + regime, + signal, + both (:class:`ObservationGroups` selects the columns
   *before* the env is built, so ``envs`` needs no option); each variant's best validation Sortino (the
   checkpoint rule of ``ats train``; the test period is not read).

Intervals: circular moving-block bootstrap (Politis & Romano 1992), percentile 95 % by default, block length
= the label horizon unless configured; pooled statistics resample within each block (fold/symbol) and
concatenate, so no resampled block spans two folds.

Where the out-of-fold predictions come from (:mod:`training.pipeline`): ``build_market_obs`` stacks fold k's
regime/signal outputs from models fitted on rows before fold k (``fit_stack``, labels purged ``purge_bars``
before the fold; ``folds.json`` records ``fit_rows``/``predict_rows``); validation and test outputs come from
the final models fitted on the training period. :func:`diagnose_stack` reads those; in a walk-forward the
bundle's final models predict each fold's validation and test windows (:func:`bundle_blocks`), and
:func:`walkforward_diagnostics` reports them per fold and pooled (validation and test pooled separately: a
later fold's validation window may overlap an earlier fold's test window).

Output: plain dicts; :func:`walkforward_diagnostics` returns them through :mod:`market.json_codec`
(non-finite numbers as the codec writes them). :func:`diagnostics_tables` / :func:`diagnostics_html` render them.
"""

from __future__ import annotations

import html
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from agents.observation import SIGNAL_COLUMNS, ObsNormalizer, model_outputs
from market import json_codec
from market.config_base import StrictConfig
from training.layer_stats import (  # re-exported: the statistics live there
    CLASS_NAMES,
    class_prior,
    regime_separation,
    signal_diagnostics,
    transition_diagnostics,
)

Log = Callable[[str], None]


ObsGroup = Literal["market", "regime", "signal"]
ABLATION_VARIANTS: dict[str, tuple[str, ...]] = {
    "market": ("market",),
    "market+regime": ("market", "regime"),
    "market+signal": ("market", "signal"),
    "market+regime+signal": ("market", "regime", "signal"),
}


# --------------------------------------------------------------------------------------------- configs


class ObservationGroups(StrictConfig):
    """Which column groups of the market observation enter the agent's observation.

    ``market``: the feature columns; ``regime``: ``regime_p{k}`` and ``regime_ahead_p{k}``; ``signal``:
    ``signal_p_down/timeout/up``. Applied to the market-observation frame before the env is built
    (:meth:`select`); the env appends the account features as always.
    """

    groups: tuple[ObsGroup, ...] = ("market", "regime", "signal")

    @field_validator("groups")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one observation group")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate observation groups: {v}")
        return v

    def columns(self, names: Sequence[str], feature_columns: Sequence[str]) -> list[str]:
        """The kept names, in the order of ``names``.

        Raises
        ------
        ValueError
            If a name belongs to no group.
        """
        groups = column_groups(names, feature_columns)
        keep = {n for g in self.groups for n in groups[g]}
        return [n for n in names if n in keep]

    def select(self, market_obs: pd.DataFrame, feature_columns: Sequence[str]) -> pd.DataFrame:
        """``market_obs`` restricted to the kept columns (same rows, same order)."""
        return market_obs.loc[:, self.columns(list(market_obs.columns), feature_columns)]


def column_groups(names: Sequence[str], feature_columns: Sequence[str]) -> dict[str, list[str]]:
    """Split observation column names into ``market`` / ``regime`` / ``signal``.

    Raises
    ------
    ValueError
        If a name is neither a feature column nor a model-output column.
    """
    feats = set(feature_columns)
    out: dict[str, list[str]] = {"market": [], "regime": [], "signal": []}
    for n in names:
        if n in feats:
            out["market"].append(n)
        elif n in SIGNAL_COLUMNS:
            out["signal"].append(n)
        elif _is_regime_column(n):
            out["regime"].append(n)
        else:
            raise ValueError(f"observation column {n!r} is in no group (market features, regime, signal)")
    return out


def _is_regime_column(name: str) -> bool:
    for prefix in ("regime_ahead_p", "regime_p"):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return True
    return False


class AblationConfig(StrictConfig):
    """Observation ablation of a walk-forward (expensive: one stack fit and ``len(variants)`` PPO trainings per
    fold and seed, so off by default)."""

    enabled: bool = False
    variants: tuple[str, ...] = tuple(ABLATION_VARIANTS)
    seeds: tuple[int, ...] = Field((), description="seeds trained per fold; empty = the walk-forward's first seed")
    folds: tuple[int, ...] = Field((), description="folds ablated; empty = every fold")
    total_timesteps: int | None = Field(None, ge=64, description="PPO budget per variant; None = the run config's")

    @field_validator("variants")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [x for x in v if x not in ABLATION_VARIANTS]
        if bad or not v:
            raise ValueError(f"variants must be among {list(ABLATION_VARIANTS)}, got {list(v)}")
        return v


class DiagnosticsConfig(StrictConfig):
    """Layer diagnostics of a walk-forward (``diagnostics:`` of its YAML)."""

    enabled: bool = True
    bootstrap_samples: int = Field(500, ge=50)
    block_bars: int | None = Field(None, ge=1, description="bootstrap block length; None = the label horizon")
    alpha: float = Field(0.05, gt=0, lt=1, description="miscoverage of the intervals (0.05: 95 %)")
    seed: int = 0
    ablation: AblationConfig = Field(default_factory=AblationConfig)


@dataclass(frozen=True)
class DiagSettings:
    """What the pure functions need: bootstrap settings, the label purge and the regime horizon (bars)."""

    block_bars: int
    n_boot: int = 500
    alpha: float = 0.05
    seed: int = 0
    purge_bars: int = 0
    regime_horizon_bars: int = 1

    @classmethod
    def of(cls, cfg: Any, dcfg: DiagnosticsConfig | None = None) -> DiagSettings:
        """Settings of a run config (``labels.horizon_bars``, ``regime.horizon_bars``, the pipeline's purge)."""
        from training.pipeline import purge_bars

        dcfg = dcfg or DiagnosticsConfig()
        return cls(block_bars=dcfg.block_bars or int(cfg.labels.horizon_bars), n_boot=dcfg.bootstrap_samples,
                   alpha=dcfg.alpha, seed=dcfg.seed, purge_bars=int(purge_bars(cfg)),
                   regime_horizon_bars=int(cfg.regime.horizon_bars))

    def as_json(self) -> dict:
        """The settings as a JSON-ready dict."""
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class OofBlock:
    """Rows ``[start, end)`` predicted by models fitted on rows ``[0, fit_end)`` (labels purged before
    ``fit_end``); ``start >= fit_end`` (out of fold)."""

    name: str
    fit_end: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 < self.fit_end <= self.start < self.end:
            raise ValueError(f"block {self.name}: need 0 < fit_end <= start < end, got "
                             f"{self.fit_end}, {self.start}, {self.end} (an in-sample block?)")


@dataclass(frozen=True)
class StackPredictions:
    """Rows of one symbol aligned with its feature rows (warm-up dropped): triple-barrier ``labels`` (int,
    -1 undefined), ``close`` (float64) and the model ``outputs`` (columns
    :func:`agents.observation.model_output_names`; NaN on rows that were not predicted)."""

    labels: np.ndarray
    close: np.ndarray
    outputs: pd.DataFrame

    def __post_init__(self) -> None:
        if not len(self.labels) == len(self.close) == len(self.outputs):
            raise ValueError(f"labels ({len(self.labels)}), close ({len(self.close)}) and outputs "
                             f"({len(self.outputs)}) must have the same rows")

    @property
    def n_states(self) -> int:
        """Number of regime-probability columns in the outputs."""
        return sum(1 for c in self.outputs.columns if str(c).startswith("regime_p"))

    @classmethod
    def of(cls, prep: Any, outputs: pd.DataFrame) -> StackPredictions:
        """A prepared run's labels and closes with ``outputs`` (any subset of its feature rows, e.g. a
        market-observation frame) reindexed to the feature rows."""
        cols = [c for c in outputs.columns if c in SIGNAL_COLUMNS or _is_regime_column(str(c))]
        out = outputs.loc[:, cols].reindex(prep.features.index)
        return cls(np.asarray(prep.labels), prep.candles["close"].to_numpy(np.float64), out)


@dataclass(frozen=True)
class BlockArrays:
    """The evaluated rows of one :class:`OofBlock`: signal (``proba``, ``y``, ``prior``), transition
    (``ahead``, ``persist``, ``target``), regime separation (``ret``, ``regime``)."""

    name: str
    span: tuple[str, str]
    n_states: int
    proba: np.ndarray
    y: np.ndarray
    prior: np.ndarray
    ahead: np.ndarray
    persist: np.ndarray
    target: np.ndarray
    ret: np.ndarray
    regime: np.ndarray


def block_arrays(sp: StackPredictions, block: OofBlock, settings: DiagSettings) -> BlockArrays:
    """Extract the rows of ``block`` (and nothing else) for the three diagnostics.

    The prior is the class frequencies of labels ``[0, fit_end - purge_bars)``: exactly the labels the
    block's TCN was fitted on (:func:`training.pipeline.fit_stack`). Rows with an undefined label are left
    out of the signal diagnostics; transition rows need ``t + h`` inside the block; regime rows need a next bar.

    Raises
    ------
    ValueError
        If a block row has no (finite) prediction, or the block lies outside the rows.
    """
    T = len(sp.labels)
    if block.end > T:
        raise ValueError(f"block {block.name} ends at row {block.end} > {T} rows")
    a, b = block.start, block.end
    out = sp.outputs.iloc[a:b]
    if not np.isfinite(out.to_numpy(np.float64)).all():
        raise ValueError(f"block {block.name}: rows [{a}, {b}) have missing model outputs (not predicted)")
    k = sp.n_states
    filt = out[[f"regime_p{s}" for s in range(k)]].to_numpy(np.float64)
    ahead = out[[f"regime_ahead_p{s}" for s in range(k)]].to_numpy(np.float64)
    proba = out[list(SIGNAL_COLUMNS)].to_numpy(np.float64)
    prior = class_prior(sp.labels[: max(0, block.fit_end - settings.purge_bars)])
    y = np.asarray(sp.labels[a:b], dtype=np.int64)
    keep = y >= 0
    h = settings.regime_horizon_bars
    state = np.argmax(filt, axis=1)
    m = max(0, (b - a) - h)
    q = min(b, T - 1) - a
    ret = np.log(sp.close[a + 1 : a + 1 + q] / sp.close[a : a + q]) if q > 0 else np.zeros(0)
    times = sp.outputs.index
    return BlockArrays(
        name=block.name, span=(str(times[a]), str(times[b - 1])), n_states=k,
        proba=proba[keep], y=y[keep], prior=prior,
        ahead=np.argmax(ahead[:m], axis=1), persist=state[:m], target=state[h : h + m],
        ret=ret, regime=state[: max(q, 0)],
    )


def layer_summary(arrays: Sequence[BlockArrays], settings: DiagSettings) -> dict[str, Any]:
    """The three diagnostics over one block, or pooled over several (each block keeps its own prior;
    the bootstrap resamples within blocks)."""
    if not arrays:
        raise ValueError("no block to summarise")
    k = arrays[0].n_states
    proba = np.concatenate([x.proba for x in arrays])
    y = np.concatenate([x.y for x in arrays])
    prior = np.concatenate([np.tile(x.prior, (len(x.y), 1)) for x in arrays])
    sig = signal_diagnostics(proba, y, prior, [len(x.y) for x in arrays], settings)
    if len(arrays) == 1:
        sig["prior"] = dict(zip(CLASS_NAMES, arrays[0].prior.tolist(), strict=True))
    tr = transition_diagnostics(np.concatenate([x.ahead for x in arrays]), np.concatenate([x.persist for x in arrays]),
                                np.concatenate([x.target for x in arrays]), k, [len(x.target) for x in arrays],
                                settings)
    reg = regime_separation(np.concatenate([x.ret for x in arrays]), np.concatenate([x.regime for x in arrays]), k,
                            [len(x.ret) for x in arrays], settings)
    return {"blocks": [x.name for x in arrays], "span": [arrays[0].span[0], arrays[-1].span[1]],
            "signal": sig, "regime_ahead": tr, "hmm": reg}


def diagnose_blocks(sp: StackPredictions, blocks: Sequence[OofBlock], settings: DiagSettings,
                    pools: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Per-block summaries (``per_block``, by name) and pooled ones (``pooled``: name -> the block names
    pooled; default: every block as ``all``)."""
    arrays = {b.name: block_arrays(sp, b, settings) for b in blocks}
    pools = pools if pools is not None else {"all": [b.name for b in blocks]}
    return {"per_block": {n: layer_summary([a], settings) for n, a in arrays.items()},
            "pooled": {p: layer_summary([arrays[n] for n in names], settings) for p, names in pools.items() if names}}


def stack_blocks(prep: Any, folds: Sequence[Mapping[str, Any]], *, symbol: str | None = None,
                 covered: pd.Index | None = None) -> list[OofBlock]:
    """The out-of-fold blocks of one ``ats train`` run: every ``folds.json`` record (``fit_rows`` /
    ``predict_rows``, or ``by_symbol[symbol]`` of a pooled run), then ``validation`` and ``test``
    (predicted by the final models fitted on ``[0, val_row)``), those whose rows ``covered`` holds."""
    out = []
    for rec in folds:
        r = rec["by_symbol"][symbol] if "by_symbol" in rec else rec
        out.append(OofBlock(f"fold{rec['fold']}", int(r["fit_rows"][1]), *map(int, r["predict_rows"])))
    out.append(OofBlock("validation", prep.val_row, prep.val_row, prep.val_stop))
    out.append(OofBlock("test", prep.val_row, prep.test_row, prep.n_rows))
    if covered is not None:
        idx = prep.features.index
        out = [b for b in out if idx[b.start] in covered and idx[b.end - 1] in covered]
    return out


def diagnose_stack(prep: Any, market_obs: pd.DataFrame, folds: Sequence[Mapping[str, Any]], cfg: Any, *,
                   dcfg: DiagnosticsConfig | None = None, symbol: str | None = None) -> dict[str, Any]:
    """Diagnostics of what the pipeline already has: ``market_obs`` (from ``build_market_obs``; out-of-fold
    model outputs on the training folds, final models on validation/test) and its fold records.

    Per block (``fold{k}``, ``validation``, ``test``) and pooled: ``oof_training`` (the training folds, what the
    agent trains on) and ``validation``.
    """
    settings = DiagSettings.of(cfg, dcfg)
    blocks = stack_blocks(prep, folds, symbol=symbol, covered=market_obs.index)
    sp = StackPredictions.of(prep, market_obs)
    pools = {"oof_training": [b.name for b in blocks if b.name.startswith("fold")],
             "validation": [b.name for b in blocks if b.name == "validation"]}
    return {"settings": settings.as_json(), **diagnose_blocks(sp, blocks, settings, pools)}


def bundle_blocks(prep: Any, models: Any, settings: DiagSettings) -> dict[str, BlockArrays]:
    """``validation`` and ``test`` block arrays of a prepared run, predicted by its final models (a bundle's
    ``models``, fitted on ``[0, val_row)``)."""
    outputs = model_outputs(prep.features, models, start=prep.val_row, end=prep.n_rows)
    sp = StackPredictions.of(prep, outputs)
    return {b.name: block_arrays(sp, b, settings)
            for b in (OofBlock("validation", prep.val_row, prep.val_row, prep.val_stop),
                      OofBlock("test", prep.val_row, prep.test_row, prep.n_rows))}


# --------------------------------------------------------------------------------------------- ablation


def observation_ablation(cfg: Any, *, variants: Sequence[str] = tuple(ABLATION_VARIANTS),
                         total_timesteps: int | None = None, run_dir: Path | None = None, log: Log = lambda s: None,
                         dcfg: DiagnosticsConfig | None = None, stack_diagnostics: bool = True) -> dict[str, Any]:
    """Train the run's PPO once per observation variant and report each one's validation Sortino.

    The regime/signal models are stacked out of fold once (:func:`training.pipeline.build_market_obs`, or the
    pooled twin for ``data.symbols``), exactly as ``ats train`` does; each variant then keeps the column groups
    of :data:`ABLATION_VARIANTS` (:class:`ObservationGroups`, applied before the env is built), fits its own
    observation normaliser on the training rows and trains PPO with the run's seed and budget (or
    ``total_timesteps``); its checkpoint is the best validation Sortino (single symbol) or the best validation
    Sortino of the equal-weight portfolio (pooled), as in ``ats train``. The test period is not read.

    Returns ``{"variants": {name: {validation_sortino, validation_total_return, validation_max_drawdown,
    validation_n_trades, validation_sortino_final, validation_sortino_mean_over_checkpoints, checkpoints,
    best_step, n_obs_columns, seconds}}, "seed", "total_timesteps", "symbols", "reading"}`` and, with
    ``stack_diagnostics``, the layer diagnostics of the stacked predictions (:func:`diagnose_stack`) under ``stack``.

    Raises
    ------
    ValueError
        On an unknown variant or a pooled config with a backend other than sb3.
    """
    from agents.policy import SB3ActorPolicy
    from agents.ppo_sb3 import resolve_device, train_ppo
    from training.backtest import run_backtest
    from training.config import symbol_env_config
    from training.pipeline import (
        build_market_obs,
        build_market_obs_pooled,
        env_data,
        episode_stats,
        fold_starts,
        pooled_fold_first,
        prepare_symbols,
        summarize_backtest,
    )
    from training.portfolio import portfolio_metrics

    bad = [v for v in variants if v not in ABLATION_VARIANTS]
    if bad or not variants:
        raise ValueError(f"ablation variants must be among {list(ABLATION_VARIANTS)}, got {list(variants)}")
    if total_timesteps is not None:
        ppo = cfg.ppo.updated(total_timesteps=int(total_timesteps),
                              eval_every_steps=min(cfg.ppo.eval_every_steps, int(total_timesteps)))
        cfg = cfg.updated(ppo=ppo)
    device = resolve_device(cfg.device)
    preps = prepare_symbols(cfg)
    pooled = len(preps) > 1
    if pooled and cfg.backend != "sb3":
        raise ValueError("the pooled ablation runs on the sb3 backend only")
    t0 = time.perf_counter()
    if pooled:
        obs_list, _final, folds = build_market_obs_pooled(preps, cfg, device=device, log=log)
        firsts = pooled_fold_first(preps, cfg)
    else:
        obs, _final, folds = build_market_obs(preps[0], cfg, device=device, log=log)
        obs_list, firsts = [obs], [fold_starts(preps[0], cfg)[0]]
    log(f"ablation: regime/signal models stacked out of fold ({time.perf_counter() - t0:.0f} s)")
    feature_cols = list(preps[0].features.columns)
    bar_s = preps[0].info["bar_interval_s"]
    symbols = [p.info["symbol"] for p in preps]
    envs = {p.info["symbol"]: symbol_env_config(cfg, p.instrument.spec) for p in preps} if pooled else None
    tmp = None
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ats-ablation-")
        run_dir = Path(tmp.name)
    out: dict[str, Any] = {}
    try:
        for name in variants:
            t1 = time.perf_counter()
            sel = ObservationGroups(groups=ABLATION_VARIANTS[name])
            obs_v = [sel.select(o, feature_cols) for o in obs_list]
            train_rows = np.concatenate([o.iloc[: p.val_row - f].to_numpy(np.float32)
                                         for o, p, f in zip(obs_v, preps, firsts, strict=True)])
            normalizer = ObsNormalizer.fit(train_rows, cfg.ppo.obs_clip)
            vals = {p.info["symbol"]: (env_data(p, o, normalizer, p.val_row, p.val_stop),
                                       p.candles.iloc[p.val_row : p.val_stop]) for p, o in zip(preps, obs_v, strict=True)}
            if pooled:
                train = [(p.info["symbol"], env_data(p, o, normalizer, f, p.val_row), envs[p.info["symbol"]])
                         for p, o, f in zip(preps, obs_v, firsts, strict=True)]

                def validator(model, vals=vals) -> dict[str, float]:
                    res = {s: run_backtest(SB3ActorPolicy(model, cfg.env.actions), d, c, envs[s])
                           for s, (d, c) in vals.items()}
                    return portfolio_metrics(res, bar_s)
            else:
                train = env_data(preps[0], obs_v[0], normalizer, firsts[0], preps[0].val_row)

                def validator(model, vals=vals) -> dict[str, float]:
                    d, c = vals[symbols[0]]
                    return summarize_backtest(run_backtest(SB3ActorPolicy(model, cfg.env.actions), d, c, cfg.env),
                                              bar_s)

            result = train_ppo(train, cfg.env, cfg.ppo, seed=cfg.seed, device=device,
                               tensorboard_dir=Path(run_dir) / name.replace("+", "_") / "tb",
                               episode_stats=episode_stats(bar_s), validator=validator)
            best = result.best_metrics
            out[name] = {"validation_sortino": float(best.get("sortino", np.nan)),
                         "validation_total_return": float(best.get("total_return", np.nan)),
                         "validation_max_drawdown": float(best.get("max_drawdown", np.nan)),
                         "validation_n_trades": float(best.get("n_trades", np.nan)),
                         **_checkpoint_record(result.history),
                         "best_step": int(result.best_step), "n_obs_columns": int(obs_v[0].shape[1]),
                         "seconds": round(time.perf_counter() - t1, 1)}
            log(f"ablation {name}: {obs_v[0].shape[1]} market columns, best validation Sortino "
                f"{out[name]['validation_sortino']:.3f} at step {result.best_step}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    res: dict[str, Any] = {"seed": int(cfg.seed), "total_timesteps": int(cfg.ppo.total_timesteps),
                           "symbols": symbols, "variants": out, "reading": ablation_reading({"_": out})}
    if stack_diagnostics:
        res["stack"] = {s: diagnose_stack(p, o, folds, cfg, dcfg=dcfg, symbol=s if pooled else None)
                        for s, p, o in zip(symbols, preps, obs_list, strict=True)}
    return res


def _checkpoint_record(history: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Every validated checkpoint's Sortino, return and trades, and their means: when the best checkpoint is
    flat (Sortino 0, no trade) for every variant, these still show which observation traded less badly."""
    keys = ("timesteps", "sortino", "total_return", "n_trades")
    rows = [{k: float(h.get(k, np.nan)) for k in keys} for h in history]
    sortinos = np.array([r["sortino"] for r in rows], np.float64)
    finite = sortinos[np.isfinite(sortinos)]
    return {"validation_sortino_final": rows[-1]["sortino"] if rows else float("nan"),
            "validation_sortino_mean_over_checkpoints": float(finite.mean()) if finite.size else float("nan"),
            "checkpoints": rows}


def ablation_reading(runs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """One sentence: the variant with the best mean validation Sortino over ``runs`` (fold/seed -> variant ->
    metrics) and each layer's mean gain over the market-only observation."""
    names = list(next(iter(runs.values()))) if runs else []
    if not names:
        return "Ablation: no run."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = {n: float(np.nanmean([r[n]["validation_sortino"] for r in runs.values() if n in r])) for n in names}
    trades = [r[n].get("validation_n_trades", np.nan) for r in runs.values() for n in r]
    if trades and all(t == 0 for t in trades):
        return (f"Ablation over {len(runs)} run(s): every variant's best validation checkpoint is flat (no trade, "
                f"Sortino {', '.join(f'{n} {v:.2f}' for n, v in mean.items())}): the best checkpoints cannot tell "
                "the layers apart." + _checkpoint_sentence(runs, names))
    best = max(mean, key=lambda n: mean[n] if np.isfinite(mean[n]) else -np.inf)
    text = (f"Ablation over {len(runs)} run(s): best mean validation Sortino with the observation '{best}' "
            f"({mean[best]:.2f}); " + ", ".join(f"{n} {v:.2f}" for n, v in mean.items()) + ".")
    if "market" in mean:
        gains = [f"{n} {mean[n] - mean['market']:+.2f}" for n in names if n != "market"]
        text += " Gain over market features only: " + ", ".join(gains) + "."
    return text + _checkpoint_sentence(runs, names) + (
        " Validation only; differences within the spread of seeds are not evidence.")


def _checkpoint_sentence(runs: Mapping[str, Mapping[str, Mapping[str, Any]]], names: Sequence[str]) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        over = {n: float(np.nanmean([r[n].get("validation_sortino_mean_over_checkpoints", np.nan)
                                     for r in runs.values() if n in r])) for n in names}
    if not any(np.isfinite(v) for v in over.values()):
        return ""
    return " Mean validation Sortino over all checkpoints: " + ", ".join(f"{n} {v:.2f}" for n, v in over.items()) + "."


# --------------------------------------------------------------------------------------------- walk-forward


def _headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    s, t, h = summary["signal"], summary["regime_ahead"], summary["hmm"]
    return {"tcn_log_loss_diff": s.get("log_loss_diff"), "tcn_log_loss_diff_ci95": s.get("log_loss_diff_ci95"),
            "tcn_auc_macro": s.get("auc_macro"), "regime_ahead_accuracy_diff": t.get("accuracy_diff"),
            "regime_ahead_accuracy_diff_ci95": t.get("accuracy_diff_ci95"),
            "hmm_kruskal_p": h.get("kruskal_p"), "hmm_brown_forsythe_p": h.get("brown_forsythe_p")}


def _interval_word(ci: Sequence[float], better_if_negative: bool) -> str:
    lo, hi = ci
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "undetermined"
    if (hi < 0) if better_if_negative else (lo > 0):
        return "better"
    if (lo > 0) if better_if_negative else (hi < 0):
        return "worse"
    return "no different"


def layer_reading(summary: Mapping[str, Any], where: str) -> list[str]:
    """Sentences that say what a (pooled) summary shows."""
    s, t, h = summary["signal"], summary["regime_ahead"], summary["hmm"]
    out = []
    if s.get("n"):
        w = _interval_word(s["log_loss_diff_ci95"], True)
        out.append(f"TCN ({where}, {s['n']} labelled bars): log-loss {s['log_loss_model']:.4f} vs class prior "
                   f"{s['log_loss_prior']:.4f}, difference {s['log_loss_diff']:+.4f} "
                   f"[{s['log_loss_diff_ci95'][0]:+.4f}, {s['log_loss_diff_ci95'][1]:+.4f}]; "
                   f"macro AUC {s['auc_macro']:.3f} [{s['auc_macro_ci95'][0]:.3f}, {s['auc_macro_ci95'][1]:.3f}]: "
                   f"{_verdict(w, 'the class prior')}.")
    if t.get("n"):
        w = _interval_word(t["accuracy_diff_ci95"], False)
        out.append(f"Regime {t['horizon_bars']} bars ahead ({where}): LightGBM accuracy {t['accuracy_model']:.3f} vs "
                   f"'regime persists' {t['accuracy_persist']:.3f}, difference {t['accuracy_diff']:+.3f} "
                   f"[{t['accuracy_diff_ci95'][0]:+.3f}, {t['accuracy_diff_ci95'][1]:+.3f}] (balanced "
                   f"{t['balanced_accuracy_model']:.3f} vs {t['balanced_accuracy_persist']:.3f}): "
                   f"{_verdict(w, 'persistence')}.")
    if h.get("n"):
        occupied = [r for r in h["by_regime"] if r["n_bars"] >= 2]
        vols = ", ".join(f"{r['regime']}: {r['vol'] * 1e4:.0f} bps [{r['vol_ci95'][0] * 1e4:.0f}, "
                         f"{r['vol_ci95'][1] * 1e4:.0f}] ({r['n_bars']} bars)" for r in occupied)
        means = ", ".join(f"{r['regime']}: {r['mean'] * 1e4:+.1f} bps [{r['mean_ci95'][0] * 1e4:+.1f}, "
                          f"{r['mean_ci95'][1] * 1e4:+.1f}]" for r in occupied)
        out.append(f"HMM regimes ({where}): next-bar volatility by regime {vols}; mean {means}; Kruskal-Wallis p "
                   f"{h['kruskal_p']:.3g} (means), Brown-Forsythe p {h['brown_forsythe_p']:.3g} (volatility).")
    return out


def _verdict(word: str, baseline: str) -> str:
    return {"better": f"better than {baseline} (interval excludes 0)",
            "worse": f"worse than {baseline} (interval excludes 0)",
            "no different": f"no evidence it differs from {baseline}",
            "undetermined": "undetermined"}[word]


def walkforward_diagnostics(fold_records: Sequence[Mapping[str, Any]], dcfg: DiagnosticsConfig | None = None, *,
                            chosen_seed: int | None = None, out: Path | None = None,
                            log: Log = lambda s: None) -> dict[str, Any] | None:
    """Layer diagnostics of a walk-forward, per fold and pooled, from its run directories.

    ``fold_records``: the walk-forward's ``folds.json`` (``fold``, ``seed``, ``run_dir`` of each training). Each
    run's bundle models (fitted on its training period) predict its validation and test windows
    (:func:`bundle_blocks`). ``per_fold`` holds the ``chosen_seed``'s (default: the first seed) per fold and
    symbol; ``pooled`` pools its folds and symbols, validation and test separately; ``by_seed`` gives the
    pooled headline numbers of every seed. With ``dcfg.ablation.enabled`` the observation ablation
    (:func:`observation_ablation`) runs per ablated fold and seed under ``out/ablation``. Returns None when
    ``dcfg.enabled`` is false; otherwise a JSON-safe dict (:func:`market.json_codec.to_jsonable`).
    """
    from agents.bundle import load_bundle
    from training.config import load_config
    from training.pipeline import prepare_symbols

    dcfg = dcfg or DiagnosticsConfig()
    if not dcfg.enabled or not fold_records:
        return None
    seeds = list(dict.fromkeys(int(r["seed"]) for r in fold_records))
    chosen = seeds[0] if chosen_seed is None or int(chosen_seed) not in seeds else int(chosen_seed)
    t0 = time.perf_counter()
    arrays: dict[int, list[tuple[int, str, dict[str, BlockArrays]]]] = {s: [] for s in seeds}
    settings = None
    cfgs: dict[tuple[int, int], Any] = {}
    for rec in fold_records:
        run_dir = Path(rec["run_dir"])
        cfg = load_config(run_dir / "config.yaml")
        cfgs[(int(rec["fold"]), int(rec["seed"]))] = cfg
        settings = settings or DiagSettings.of(cfg, dcfg)
        bundle = load_bundle(run_dir / "bundle")
        for prep in prepare_symbols(cfg):
            arrays[int(rec["seed"])].append((int(rec["fold"]), prep.info["symbol"],
                                             bundle_blocks(prep, bundle.models, settings)))
    per_fold = [{"fold": k, "symbol": sym, "seed": chosen, "validation": layer_summary([b["validation"]], settings),
                 "test": layer_summary([b["test"]], settings)} for k, sym, b in arrays[chosen]]
    pooled = {part: layer_summary([b[part] for _, _, b in arrays[chosen]], settings) for part in ("validation", "test")}
    by_seed = {str(s): {part: _headline(layer_summary([b[part] for _, _, b in arrays[s]], settings))
                        for part in ("validation", "test")} for s in seeds}
    log(f"layer diagnostics: {len(fold_records)} runs in {time.perf_counter() - t0:.0f} s")
    reading = layer_reading(pooled["validation"], "validation windows pooled") + \
        layer_reading(pooled["test"], "test windows pooled")
    result: dict[str, Any] = {
        "definition": ("Out of fold only: each fold's models (fitted on its training period, labels purged) predict "
                       "its validation and test windows. TCN log-loss difference = model - class prior of the "
                       "training labels (< 0: better than the prior); regime-ahead accuracy difference = LightGBM - "
                       "'regime persists'; HMM: next-bar log return by filtered regime. 95 % circular block-bootstrap "
                       "intervals, resampled within each fold window."),
        "settings": settings.as_json(), "seed": chosen, "seeds": seeds,
        "per_fold": per_fold, "pooled": pooled, "by_seed": by_seed, "reading": reading, "ablation": None,
    }
    ab = dcfg.ablation
    if ab.enabled:
        folds = sorted({k for k, _ in cfgs}) if not ab.folds else list(ab.folds)
        ab_seeds = list(ab.seeds) or [seeds[0]]
        runs = {}
        for k in folds:
            base = next(c for (f, _), c in cfgs.items() if f == k)
            for s in ab_seeds:
                cfg = cfgs.get((k, s)) or base.updated(seed=s)
                log(f"ablation: fold {k}, seed {s}")
                runs[f"fold{k}/seed{s}"] = observation_ablation(
                    cfg, variants=ab.variants, total_timesteps=ab.total_timesteps, dcfg=dcfg, log=log,
                    run_dir=None if out is None else Path(out) / "ablation" / f"fold{k}" / f"seed{s}")
        variant_runs = {r: v["variants"] for r, v in runs.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = {n: float(np.nanmean([v[n]["validation_sortino"] for v in variant_runs.values()]))
                    for n in ab.variants}
        result["ablation"] = {"runs": runs, "mean_validation_sortino": mean,
                              "reading": ablation_reading(variant_runs)}
        result["reading"].append(result["ablation"]["reading"])
    return json_codec.to_jsonable(result)


# --------------------------------------------------------------------------------------------- rendering


def _fmt_ci(ci: Any, scale: float = 1.0, fmt: str = "{:+.4f}") -> str:
    ci = json_codec.from_jsonable(ci)
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return "—"
    return "[" + ", ".join(fmt.format(float(v) * scale) for v in ci) + "]"


def _num(v: Any) -> float:
    return json_codec.to_float(v)


def diagnostics_tables(diag: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """Tables of a :func:`walkforward_diagnostics` result (or its JSON): TCN, regime-ahead and HMM per fold and
    pooled, and the ablation's validation Sortino per run and variant."""
    if not diag:
        return {}
    rows_s, rows_t, rows_h = {}, {}, {}

    def add(label: str, summary: Mapping[str, Any]) -> None:
        s, t, h = summary["signal"], summary["regime_ahead"], summary["hmm"]
        rows_s[label] = {"bars": s.get("n"), "log-loss model": _num(s.get("log_loss_model")),
                         "log-loss prior": _num(s.get("log_loss_prior")), "difference": _num(s.get("log_loss_diff")),
                         "95 % CI": _fmt_ci(s.get("log_loss_diff_ci95")), "AUC macro": _num(s.get("auc_macro")),
                         "AUC 95 % CI": _fmt_ci(s.get("auc_macro_ci95"), fmt="{:.3f}"),
                         **{f"AUC {c}": _num((s.get("auc_ovr") or {}).get(c)) for c in CLASS_NAMES}}
        rows_t[label] = {"bars": t.get("n"), "accuracy LightGBM": _num(t.get("accuracy_model")),
                         "accuracy persists": _num(t.get("accuracy_persist")),
                         "difference": _num(t.get("accuracy_diff")), "95 % CI": _fmt_ci(t.get("accuracy_diff_ci95"),
                                                                                      fmt="{:+.3f}"),
                         "balanced LightGBM": _num(t.get("balanced_accuracy_model")),
                         "balanced persists": _num(t.get("balanced_accuracy_persist"))}
        for r in h.get("by_regime", []):
            rows_h[f"{label}, regime {r['regime']}"] = {
                "bars": r["n_bars"], "mean (bps)": _num(r["mean"]) * 1e4, "mean 95 % CI": _fmt_ci(r["mean_ci95"], 1e4,
                                                                                                  "{:+.1f}"),
                "vol (bps)": _num(r["vol"]) * 1e4, "vol 95 % CI": _fmt_ci(r["vol_ci95"], 1e4, "{:.1f}"),
                "Kruskal-Wallis p": _num(h.get("kruskal_p")), "Brown-Forsythe p": _num(h.get("brown_forsythe_p"))}

    for f in diag.get("per_fold", []):
        for part in ("validation", "test"):
            add(f"fold {f['fold']} {f['symbol']} {part}", f[part])
    for part, summary in (diag.get("pooled") or {}).items():
        add(f"pooled {part}", summary)
    seed = diag.get("seed")
    out = {f"TCN vs class prior, out of fold (seed {seed})": pd.DataFrame(rows_s).T.round(4),
           f"regime h bars ahead: LightGBM vs 'regime persists', out of fold (seed {seed})":
               pd.DataFrame(rows_t).T.round(4),
           f"HMM regimes: next-bar log return by filtered regime (seed {seed})": pd.DataFrame(rows_h).T.round(4)}
    ab = diag.get("ablation")
    if ab:
        table = {run: {n: _num(m["validation_sortino"]) for n, m in v["variants"].items()}
                 for run, v in ab["runs"].items()}
        table["mean"] = {n: _num(v) for n, v in ab["mean_validation_sortino"].items()}
        out["observation ablation: best validation Sortino per variant"] = pd.DataFrame(table).T.round(3)
        over = {run: {n: _num(m.get("validation_sortino_mean_over_checkpoints")) for n, m in v["variants"].items()}
                for run, v in ab["runs"].items()}
        out["observation ablation: mean validation Sortino over all checkpoints"] = pd.DataFrame(over).T.round(3)
    return out


def diagnostics_html(diag: Mapping[str, Any] | None) -> str:
    """A self-contained HTML fragment (``<section>``) of the layer diagnostics: the reading and the tables.
    Empty string for None."""
    if not diag:
        return ""
    parts = ['<section class="layer-diagnostics">', "<h2>Layer diagnostics (out of fold)</h2>",
             f"<p>{html.escape(str(diag.get('definition', '')))}</p>", "<ul>"]
    parts += [f"<li>{html.escape(line)}</li>" for line in diag.get("reading", [])]
    parts.append("</ul>")
    for title, table in diagnostics_tables(diag).items():
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append(table.to_html(na_rep="—", float_format=lambda v: f"{v:.4g}", border=0))
    parts.append("</section>")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.diagnostics WF_OUT [--ablation] [--ablation-timesteps N] [--ablation-seeds S ...]``: the
    layer diagnostics of a finished walk-forward directory, written to ``WF_OUT/diagnostics.json`` and
    ``WF_OUT/diagnostics.html``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.diagnostics", description=main.__doc__)
    ap.add_argument("wf_out", type=Path)
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--ablation-timesteps", type=int, default=None)
    ap.add_argument("--ablation-seeds", type=int, nargs="*", default=(), help="default: the first seed")
    ap.add_argument("--bootstrap-samples", type=int, default=500)
    args = ap.parse_args(argv)
    records = json_codec.loads((args.wf_out / "folds.json").read_text())
    chosen = None
    metrics = args.wf_out / "metrics.json"
    if metrics.exists():
        chosen = json_codec.loads(metrics.read_text()).get("chosen_seed_by_validation")
    dcfg = DiagnosticsConfig(bootstrap_samples=args.bootstrap_samples,
                             ablation=AblationConfig(enabled=args.ablation, total_timesteps=args.ablation_timesteps,
                                                    seeds=tuple(args.ablation_seeds)))
    diag = walkforward_diagnostics(records, dcfg, chosen_seed=chosen, out=args.wf_out, log=print)
    (args.wf_out / "diagnostics.json").write_text(json_codec.dumps(diag, indent=1))
    (args.wf_out / "diagnostics.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>layer diagnostics</title></head><body>"
        + diagnostics_html(diag) + "</body></html>")
    for line in diag["reading"]:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
