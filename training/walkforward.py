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
``embargo_bars`` additionally leaves an untraded gap ``[val_end, test_start)`` between a validation
window and its test window (``DataConfig.val_end``), so checkpoint selection never sees the bars just
before the test window.

Every strategy (PPO, V1, buy-and-hold, time-series momentum ``tsmom``, flat, seeded random) trades the same
test windows under the same cost model. The report adds, on the stitched curves: metrics by HMM regime at
decision time (regimes from the chosen seed's fold models, states ordered calm -> volatile), PPO/V1/tsmom
re-traded with fees and slippage x 0, x 1, x 2, and each strategy's exits by reason over the folds
(:mod:`training.exits`; PnL in each window's own account).

Each fold and seed is a full ``ats train`` run directory under ``OUT/fold{k}/seed{s}``; its windows,
seed and data hash are in that run's ``config.yaml`` and bundle manifest, and ``OUT/folds.json``
lists them all. Re-running with the same config reproduces the metrics (seeded everything).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, ValidationError, field_validator, model_validator
from scipy import stats

from envs.accounting import ClosedTrade
from market import json_codec
from market.config_base import StrictConfig, UtcTime, check_periods
from market.features import warmup_bars
from training import metrics as M
from training.backtest import BacktestResult
from training.config import ConfigError, RunConfig, invalid_config, load_config, read_config_mapping
from training.diagnostics import DiagnosticsConfig, diagnostics_tables, walkforward_diagnostics
from training.evaluate import (
    COST_MULTIPLIERS,
    COST_SENSITIVE,
    STRATEGIES,
    cost_note,
    regime_slices,
    signed_leverage,
    tsmom_note,
)
from training.exits import EXITS_TITLE, exit_summary, exits_table
from training.fanout import Progress, check_ray_address, run_tasks
from training.pipeline import Log, summarize_backtest
from training.portfolio import PORTFOLIO_DEFINITION
from training.provenance import flatten_config, provenance_note, provenance_record
from training.report import write_report
from training.stats import (
    deflated_sharpe_ratio,
    probability_of_backtest_overfitting,
    sharpe_sampling_variance,
)
from training.wf_tasks import (  # noqa: F401 (fold_backtests: re-exported)
    FoldResult,
    FoldTask,
    fold_backtests,
    fold_tasks,
    ray_settings,
    run_fold_task,
    study_bar,
)

VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class WalkForwardConfig(StrictConfig):
    """A walk-forward study: the base run config and how the span is cut into folds."""

    base_config: str = Field(..., description="run config (path relative to this file) used for every fold")
    data_start: UtcTime = Field(..., description="first bar of the earliest training window (UTC)")
    start: UtcTime = Field(..., description="first bar of the first test window (UTC)")
    end: UtcTime = Field(..., description="end (exclusive) of the last test window (UTC)")
    folds: int = Field(2, ge=1)
    scheme: Literal["expanding", "rolling"] = "expanding"
    train_bars: int = Field(4000, ge=500, description="rolling scheme: training length; expanding: minimum")
    val_bars: int = Field(720, ge=24, description="validation window before each test window")
    embargo_bars: int = Field(0, ge=0, description="gap between a validation window and its test window")
    seeds: tuple[int, ...] = Field(
        (0, 1, 2), min_length=3, description="PPO/model seeds per fold (at least 3: mean, std and the DSR's trials)"
    )
    tuning_trials: int = Field(0, ge=0, description="configurations tried before this study (counted by the DSR)")
    bootstrap_block_bars: int = Field(24, ge=1)
    bootstrap_samples: int = Field(500, ge=50)
    base_overrides: dict = Field(
        default_factory=dict,
        description="nested keys merged into the base run config (e.g. {ppo: {total_timesteps: 100000}})",
    )
    variants: dict[str, dict] = Field(
        default_factory=lambda: {"base": {}}, min_length=1,
        description="named variants: nested keys merged into the base run config (after base_overrides), e.g. "
                    "{base: {}, interval4: {env: {trading_rules: {decision_interval_bars: 4}}}}; every variant x seed "
                    "is a trial of the DSR and a column of the PBO matrix; the reported variant is chosen on validation",
    )
    symbols: tuple[str, ...] | None = Field(
        None, min_length=1, description="replaces data.symbols of the base config (bundled or downloaded data by name)",
    )
    diagnostics: DiagnosticsConfig = Field(
        default_factory=DiagnosticsConfig,
        description="out-of-fold layer diagnostics (training.diagnostics); ablation.enabled trains the observation "
                    "ablation (expensive, off by default)",
    )
    ray_address: str | None = Field(
        None, description="run the trainings as Ray tasks: local (start Ray on this machine), auto (the cluster this "
                          "node joined with `ray start`), HOST:PORT or ray://HOST:PORT; null: one after another here",
    )
    cpus_per_task: float | None = Field(
        None, gt=0, description="Ray: logical CPUs reserved per training (null: the base config's torch_threads)")
    gpus_per_task: float = Field(
        0.0, ge=0, description="Ray: GPUs reserved per training (a fraction shares a GPU); > 0 needs device auto|cuda")
    task_retries: int = Field(1, ge=0, le=5, description="Ray: resubmissions of a failed training before the study "
                                                          "stops with an error naming it")

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, value: str | None) -> str | None:
        return None if value is None else check_ray_address(value)

    @model_validator(mode="after")
    def _ordered(self) -> WalkForwardConfig:
        check_periods({"data_start": self.data_start, "start": self.start, "end": self.end})
        for name in self.variants:
            if not VARIANT_NAME.fullmatch(name) or name == "variants":
                raise ValueError(f"variants: {name!r} is not a variant name (letters, digits, '_', '-', '.'; it names "
                                 "the variant's output folder)")
        return self

    def study_dump(self) -> dict:
        """The config as JSON without :data:`EXECUTION_FIELDS` (where the trainings ran is not what the study is;
        the report's provenance and config table use this, so a Ray run reports as the sequential one)."""
        return self.model_dump(mode="json", exclude=set(EXECUTION_FIELDS))


#: Walk-forward config fields that say where the trainings run, not what the study computes.
EXECUTION_FIELDS = ("ray_address", "cpus_per_task", "gpus_per_task", "task_retries")


@dataclass(frozen=True)
class FoldWindow:
    """Bar-time boundaries of one fold (UTC): train [train_start, val_start), validation
    [val_start, val_end or test_start), embargo gap [val_end, test_start), test [test_start, test_end)."""

    fold: int
    train_start: pd.Timestamp
    val_start: pd.Timestamp
    test_start: pd.Timestamp
    test_end: pd.Timestamp
    val_end: pd.Timestamp | None = None  # None: validation runs up to test_start (no embargo gap)

    def as_json(self) -> dict:
        """The fold's boundaries as a JSON-ready dict (times as strings)."""
        return {k: (str(v) if isinstance(v, pd.Timestamp) else v) for k, v in self.__dict__.items()}


def fold_windows(wf: WalkForwardConfig, bar: pd.Timedelta) -> list[FoldWindow]:
    """Cut ``[start, end)`` into ``folds`` test windows (whole bars) and place train/val before each.

    Raises
    ------
    ValueError
        If a training window would start before ``data_start`` or be shorter than ``train_bars``.
    """
    start, end = wf.start, wf.end
    n_bars = int((end - start) / bar)
    edges = [start + bar * round(i * n_bars / wf.folds) for i in range(wf.folds + 1)]
    data_start = wf.data_start
    out = []
    for k, (a, b) in enumerate(itertools.pairwise(edges)):
        val_start = a - bar * (wf.val_bars + wf.embargo_bars)
        train_start = data_start if wf.scheme == "expanding" else val_start - bar * wf.train_bars
        if train_start < data_start or (val_start - train_start) < bar * wf.train_bars:
            raise ValueError(
                f"fold {k}: training window {train_start}..{val_start} is shorter than train_bars={wf.train_bars} "
                f"or starts before data_start={data_start}"
            )
        val_end = a - bar * wf.embargo_bars if wf.embargo_bars else None
        out.append(FoldWindow(k, train_start, val_start, a, b, val_end))
    return out


def fold_run_config(base: RunConfig, w: FoldWindow, seed: int, bar: pd.Timedelta) -> RunConfig:
    """The base config with this fold's periods and seed."""
    margin = bar * (warmup_bars(base.features) + 50)
    data = base.data.updated(
        load_start=w.train_start - margin, train_start=w.train_start, val_start=w.val_start, val_end=w.val_end,
        test_start=w.test_start, test_end=w.test_end,
    )
    return base.updated(data=data, seed=seed, name=f"{base.name}-fold{w.fold}-seed{seed}")


def _stitch(results: list[BacktestResult], initial: float) -> pd.Series:
    """Chain test-window equity curves into one out-of-sample curve starting at ``initial``."""
    return stitch_results(results, initial).equity


def stitch_results(results: list[BacktestResult], initial: float) -> BacktestResult:
    """Chain consecutive test-window backtests into one, as if one account had traded them all.

    Window k is rescaled by ``f_k`` = stitched equity at its start / its own initial equity; its
    equity, position notionals, trade PnL and costs are multiplied by ``f_k`` (so ratios such as
    returns, leverage and profit factor are those of one compounding account) and concatenated.

    Raises
    ------
    ValueError
        If ``results`` is empty.
    """
    if not results:
        raise ValueError("no backtests to stitch")
    level, eqs, times = float(initial), [np.array([initial], np.float64)], [results[0].equity.index[0]]
    trades: list[ClosedTrade] = []
    sides, notionals, costs = [], [], np.zeros(5)
    for res in results:
        e = res.equity.to_numpy(np.float64)
        f = level / e[0]
        eqs.append(e[1:] * f)
        times.extend(res.equity.index[1:])
        sides.append(res.position_side)
        n = res.position_notional_usdt if res.position_notional_usdt is not None else np.zeros(len(e) - 1)
        notionals.append(n * f)
        trades.extend(replace(t, pnl_usdt=t.pnl_usdt * f) for t in res.trades)
        costs += f * np.array([res.fees_paid_usdt, res.funding_paid_usdt, res.slippage_paid_usdt,
                               res.liquidation_fees_usdt, res.turnover_usdt])
        level = float(e[-1] * f)
    return BacktestResult(
        name=results[0].name,
        equity=pd.Series(np.concatenate(eqs), index=pd.DatetimeIndex(times), name=results[0].name),
        position_side=np.concatenate(sides).astype(np.int8), trades=tuple(trades),
        fees_paid_usdt=float(costs[0]), funding_paid_usdt=float(costs[1]), slippage_paid_usdt=float(costs[2]),
        liquidation_fees_usdt=float(costs[3]), turnover_usdt=float(costs[4]),
        n_skipped_min_notional=sum(r.n_skipped_min_notional for r in results),
        terminated=any(r.terminated for r in results), position_notional_usdt=np.concatenate(notionals),
        n_missed_entries=sum(r.n_missed_entries for r in results),
    )


def load_walkforward(path: Path, **overrides: object) -> tuple[WalkForwardConfig, RunConfig]:
    """Parse a walk-forward YAML (``overrides`` replace top-level keys) and its base run config.

    Raises
    ------
    training.config.ConfigError
        Either file missing, not a YAML mapping, or with unknown keys or invalid values.
    """
    raw = read_config_mapping(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        wf = WalkForwardConfig.model_validate(raw)
    except ValidationError as exc:
        raise invalid_config(path, exc) from exc
    base = load_config((Path(path).parent / wf.base_config).resolve())
    if wf.base_overrides:
        try:
            base = RunConfig.model_validate(deep_merge(base.model_dump(mode="json"), wf.base_overrides))
        except ValidationError as exc:
            raise ConfigError(f"{path}: base_overrides: {exc}") from exc
    if wf.symbols is not None:
        base = merged_config(base, {"data": {"symbols": list(wf.symbols)}}, f"{path}: symbols")
    for name in wf.variants:  # every variant's merged config is validated before any fold is trained
        variant_config(wf, base, name, where=f"{path}: ")
    return wf, base


def merged_config(base: RunConfig, overrides: dict, where: str = "") -> RunConfig:
    """``base`` with ``overrides`` merged in (:func:`deep_merge`), validated as a whole; ``env.costs.instrument``
    is resolved again for the merged data (:func:`training.config.with_instrument`). ``data.symbols`` replaces the
    base's symbol keys (``symbol``, ``symbols``, ``candles_path``, ``funding_path``, ``instrument_spec``).

    Raises
    ------
    training.config.ConfigError
        If the merged config is invalid or its instrument spec cannot be resolved.
    """
    from market.instruments import InstrumentSpecError
    from training.config import with_instrument

    raw = base.model_dump(mode="json")
    data_over = overrides.get("data")
    if isinstance(data_over, dict) and "symbols" in data_over:
        raw["data"] = {k: v for k, v in raw["data"].items()
                       if k not in ("symbol", "symbols", "candles_path", "funding_path", "instrument_spec")}
    try:
        return with_instrument(RunConfig.model_validate(deep_merge(raw, overrides)))[0]
    except (ValidationError, InstrumentSpecError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def variant_config(wf: WalkForwardConfig, base: RunConfig, name: str, *, where: str = "") -> RunConfig:
    """The run config of variant ``name``: the base config with the variant's overrides merged in (validated)."""
    overrides = wf.variants[name]
    return merged_config(base, overrides, f"{where}variants.{name}") if overrides else base


@dataclass(frozen=True)
class TuningRecord:
    """An ``ats tune`` search whose configurations the deflated Sharpe ratio must count as trials."""

    trials_json: str  # resolved path of the search's trials.json
    sha256: str  # of that file's bytes
    n_trials: int  # every configuration tried (completed, stopped early or failed)

    def as_json(self) -> dict:
        """The record as a JSON-ready dict."""
        return dict(self.__dict__)


def load_tuning_record(tuning_dir: Path) -> TuningRecord:
    """Read ``tuning_dir/trials.json`` (written by :func:`training.tune.run_tune`).

    Raises
    ------
    FileNotFoundError
        If ``tuning_dir/trials.json`` does not exist.
    ValueError
        If the file is not JSON or its ``n_trials`` is not an integer >= 0.
    """
    path = (Path(tuning_dir) / "trials.json").resolve()
    raw = path.read_bytes()
    try:
        n = json.loads(raw).get("n_trials")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: not a trials.json object ({exc})") from exc
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{path}: n_trials must be an integer >= 0, got {n!r}")
    return TuningRecord(str(path), hashlib.sha256(raw).hexdigest(), n)


def dsr_trial_count(n_seeds: int, tuning_trials: int, tuning: TuningRecord | None = None,
                    n_variants: int = 1) -> dict[str, int]:
    """Trials the deflated Sharpe ratio deflates for (Bailey & López de Prado 2014): every variant x PPO seed
    of the study, the config's ``tuning_trials`` and the configurations of an ``ats tune`` search
    (``--tuning-dir``).

    The two tuning counts are added, never merged: a search counted in both is counted twice, which
    deflates more (the conservative error). Returns ``seeds``, ``variants``, ``variant_seed_trials``
    (their product), ``tuning_trials_config``, ``tuning_dir`` and the sum ``total``.

    Raises
    ------
    ValueError
        If a count is negative or there is no variant.
    """
    from_dir = 0 if tuning is None else tuning.n_trials
    if min(n_seeds, tuning_trials, from_dir) < 0 or n_variants < 1:
        raise ValueError(f"trial counts must be >= 0 (variants >= 1), got {n_seeds}, {tuning_trials}, {from_dir}, "
                         f"{n_variants}")
    return {"seeds": n_seeds, "variants": n_variants, "variant_seed_trials": n_variants * n_seeds,
            "tuning_trials_config": tuning_trials, "tuning_dir": from_dir,
            "total": n_variants * n_seeds + tuning_trials + from_dir}


def deep_merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in recursively (mappings merge, anything else replaces)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class VariantRuns:
    """One variant's fold x seed runs: PPO test results, validation Sortino of each chosen checkpoint, regimes,
    cost-sensitivity reruns and per-symbol results (pooled runs), and its folds.json records."""

    name: str
    cfg: RunConfig
    ppo_by_seed: dict[int, list[BacktestResult]]
    val_sortino: dict[int, list[float]]
    regimes_by_seed: dict[int, list[np.ndarray]]
    sens: dict[float, dict]
    by_symbol_ppo: dict[int, dict[str, list[BacktestResult]]]
    fold_records: list[dict]

    def validation_score(self) -> float:
        """Mean over folds and seeds of each fold run's validation Sortino (of its chosen checkpoint); -inf if none."""
        v = np.array([x for s in self.val_sortino.values() for x in s], np.float64)
        return float(np.nanmean(v)) if np.isfinite(v).any() else -np.inf

    def chosen_seed(self) -> int:
        """The seed with the best mean validation Sortino over the folds (first seed on ties or no value)."""
        seeds = list(self.ppo_by_seed)
        return max(seeds, key=lambda s: np.nanmean(self.val_sortino[s]) if np.isfinite(self.val_sortino[s]).any()
                   else -np.inf)


def choose_variant(runs: dict[str, VariantRuns]) -> str:
    """The variant with the best validation score (:meth:`VariantRuns.validation_score`); the first on ties.
    Test windows play no part."""
    return max(runs, key=lambda n: runs[n].validation_score())


def run_walkforward(
    wf: WalkForwardConfig, base: RunConfig, out: Path, *, log: Log = print, tuning: TuningRecord | None = None,
    on_progress: Progress | None = None,
) -> dict:
    """Run the study into ``out``; return the summary written to ``out/metrics.json``.

    Every variant (``wf.variants``; one variant: run directories ``OUT/fold{k}/seed{s}``, several:
    ``OUT/variants/{name}/fold{k}/seed{s}``) trains every fold and seed; the seed-independent strategies
    (V1, tsmom, buy-and-hold, flat, random) are traded once per fold, under the first variant's config. The
    report's PPO lines are the variant chosen on validation (:func:`choose_variant`) and its seed chosen on
    validation; the test windows are read once, after every run, and select nothing.

    The trainings (:func:`fold_tasks`, each run by :func:`training.wf_tasks.run_fold_task`) run one after another
    in this process, or as Ray tasks when ``wf.ray_address`` is set (:func:`ray_settings`,
    :func:`training.fanout.run_tasks`: ``cpus_per_task`` / ``gpus_per_task`` reserved per task, a failed task
    retried ``task_retries`` times and listed in metrics.json ``execution.retried`` and the log; one that fails
    every attempt stops the study with :class:`training.fanout.TaskFailedError` naming its variant, fold and
    seed). Results are gathered in the sequential order whatever order the tasks finish in
    (:func:`gather_walkforward`), so both give the same report; a Ray run adds ``execution`` (hosts, wall
    times, retries) to metrics.json. ``on_progress(done, total)`` follows the trainings.

    ``tuning`` (:func:`load_tuning_record`): the search that chose ``base``; its trials join the DSR's
    count (:func:`dsr_trial_count`) and it is recorded in the provenance.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = ray_settings(wf, base)
    bar = study_bar(wf, base)
    tasks = fold_tasks(wf, base, out, bar)
    results, report = run_tasks(run_fold_task, tasks, labels=[t.label for t in tasks], ray=settings, log=log,
                                on_progress=on_progress, unit="trainings")
    if report.retried:
        log("retried trainings: " + "; ".join(f"{t.label} ({t.attempts} attempts: {' | '.join(t.errors)})"
                                              for t in report.retried))
    execution = None if settings is None else report.as_json()
    return gather_walkforward(wf, base, out, bar, tasks, results, log=log, tuning=tuning, execution=execution)


def gather_walkforward(wf: WalkForwardConfig, base: RunConfig, out: Path, bar: pd.Timedelta, tasks: list[FoldTask],
                       results: list[FoldResult], *, log: Log = print, tuning: TuningRecord | None = None,
                       execution: dict | None = None) -> dict:
    """Gather the trainings' results (``results[i]`` of ``tasks[i]``, in :func:`fold_tasks` order), write
    ``folds.json`` (and each variant's), choose the variant on validation and summarise (:func:`_summarize`;
    ``execution``, when given, is written to metrics.json as is).

    Raises
    ------
    ValueError
        If ``tasks`` and ``results`` differ in length.
    """
    if len(tasks) != len(results):
        raise ValueError(f"{len(results)} results for {len(tasks)} walk-forward tasks")
    per_strategy: dict[str, list[BacktestResult]] = {}
    baselines = tuple(n for n in COST_SENSITIVE if n != "ppo")
    # cost sensitivity: sens[multiplier]["ppo"][seed] and sens[multiplier][name] (v1, tsmom) lists of fold results
    base_sens: dict[float, dict] = {m: {n: [] for n in baselines} for m in COST_MULTIPLIERS if m != 1.0}
    pooled = len(base.data.sources()) > 1
    by_symbol_other: dict[str, dict[str, list[BacktestResult]]] = {}
    runs: dict[str, VariantRuns] = {}
    all_records: list[dict] = []
    for task, res in zip(tasks, results, strict=True):
        vr = runs.get(task.variant)
        if vr is None:
            vr = runs[task.variant] = VariantRuns(
                task.variant, variant_config(wf, base, task.variant), {s: [] for s in wf.seeds},
                {s: [] for s in wf.seeds}, {s: [] for s in wf.seeds},
                {m: {"ppo": {s: [] for s in wf.seeds}} for m in base_sens}, {s: {} for s in wf.seeds}, [])
        seed, first_seed = task.seed, task.trades_baselines
        for sym, per in (res.per_symbol or {}).items():
            for name, r in per.items():
                if name == "ppo":
                    vr.by_symbol_ppo[seed].setdefault(sym, []).append(r)
                else:
                    by_symbol_other.setdefault(sym, {}).setdefault(name, []).append(r)
        vr.ppo_by_seed[seed].append(res.results["ppo"])
        vr.regimes_by_seed[seed].append(res.regimes)
        for mult in base_sens:
            vr.sens[mult]["ppo"][seed].append(res.sens[mult]["ppo"])
            for name in baselines if first_seed else ():
                base_sens[mult][name].append(res.sens[mult][name])
        vr.val_sortino[seed].append(res.val_sortino)
        vr.fold_records.append(res.record)
        all_records.append(res.record)
        if first_seed:
            for name in STRATEGIES[1:]:  # every strategy but PPO
                per_strategy.setdefault(name, []).append(res.results[name])
    if len(runs) > 1:
        for vname, variant_runs in runs.items():
            (out / "variants" / vname / "folds.json").write_text(json_codec.dumps(variant_runs.fold_records, indent=1))
    (out / "folds.json").write_text(json_codec.dumps(all_records, indent=1))
    chosen_variant = choose_variant(runs)
    vr = runs[chosen_variant]
    sens = {m: {"ppo": vr.sens[m]["ppo"], **base_sens[m]} for m in base_sens}
    return _summarize(wf, vr.cfg, out, bar, per_strategy, vr.ppo_by_seed, vr.val_sortino, log,
                      regimes_by_seed=vr.regimes_by_seed, sens=sens, tuning=tuning,
                      by_symbol=(vr.by_symbol_ppo, by_symbol_other) if pooled else None,
                      runs=runs, chosen_variant=chosen_variant, execution=execution)


def _metrics_of(results: list[BacktestResult], bar_s: float, initial: float) -> dict[str, float]:
    """Metrics of the stitched out-of-sample backtest (one compounding account over the windows)."""
    return summarize_backtest(stitch_results(results, initial), bar_s)


def _sensitivity_table(base: dict[str, list[BacktestResult]], sens: dict, seed: int,
                       bar_s: float, initial: float) -> dict[str, dict[str, float]]:
    """Stitched PPO (chosen seed), V1 and tsmom (``base``: their fold results at costs x 1) with fees and
    slippage x 0, x 1, x 2."""
    runs = {1.0: base}
    runs.update({m: {n: (r[n][seed] if n == "ppo" else r[n]) for n in base} for m, r in sens.items()})
    out = {}
    for mult in COST_MULTIPLIERS:
        for name in base:
            m = _metrics_of(runs[mult][name], bar_s, initial)
            out[f"{name} costs x{mult:g}"] = {k: m[k] for k in ("total_return", "sortino", "max_drawdown",
                                                                 "fees_paid", "slippage_paid", "n_trades")}
    return out


def _summarize(wf, base, out, bar, per_strategy, ppo_by_seed, val_sortino, log, *, regimes_by_seed, sens,
               tuning=None, by_symbol=None, runs: dict[str, VariantRuns], chosen_variant: str,
               execution: dict | None = None) -> dict:
    bar_s = bar.total_seconds()
    p = M.bars_per_year(bar_s)
    initial = base.env.initial_equity_usdt
    seeds = list(ppo_by_seed)
    folds = [f for f in json.loads((out / "folds.json").read_text()) if f.get("variant", chosen_variant) == chosen_variant]
    schemas = sorted({f["schema_hash"] for f in folds})
    provenance = provenance_record(base.model_dump(mode="json"), walkforward_config=wf.study_dump(),
                                   schema_hash=schemas[0] if len(schemas) == 1 else schemas,
                                   data_sha256=sorted({f["data_sha256"] for f in folds}),
                                   **({} if tuning is None else {"tuning": tuning.as_json()}))  # fmt: skip
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
    # every variant x seed is a trial: a column of the DSR's cross-trial variance and of the PBO matrix
    several = len(runs) > 1
    trial_names = [(v, s) for v in runs for s in seeds]
    try:
        seed_returns = np.column_stack([M.returns_from_equity(_stitch(runs[v].ppo_by_seed[s], initial).to_numpy())
                                        for v, s in trial_names])
    except ValueError as exc:
        raise ValueError(f"the variants' stitched test curves differ in length (one set of bars is required): {exc}") \
            from exc
    trial_count = dsr_trial_count(len(seeds), wf.tuning_trials, tuning, n_variants=len(runs))
    n_trials = trial_count["total"]
    chosen_returns = seed_returns[:, trial_names.index((chosen_variant, chosen))]
    dsr, sr_var = None, None
    if chosen_returns.std() > 0:
        sr_var = dsr_trial_variance(seed_returns, chosen_returns)
        dsr = deflated_sharpe_ratio(chosen_returns, n_trials=n_trials, sr_variance=sr_var["used"])
    dsr_reading = dsr.reading() if dsr else (
        "Deflated Sharpe ratio (DSR) undefined: the chosen PPO seed never changed its equity (no trades)")
    # PBO over the configurations one would choose among: every PPO seed and the V1 rules
    v1_returns = M.returns_from_equity(_stitch(per_strategy["v1"], initial).to_numpy())
    pbo_matrix = np.column_stack([seed_returns, v1_returns])
    pbo_columns = [f"ppo {v} seed {s}" if several else f"ppo seed {s}" for v, s in trial_names] + ["v1"]
    pbo = None
    if np.ptp(pbo_matrix, axis=1).max() > 0:  # identical columns leave nothing to rank
        n_blocks = 8 if len(pbo_matrix) >= 16 * 8 else 4
        pbo = probability_of_backtest_overfitting(pbo_matrix, n_blocks=n_blocks)
    stitched = {name: stitch_results(res, initial) for name, res in strategies.items()}
    regimes = np.concatenate(regimes_by_seed[chosen])
    slices = {name: regime_slices(res, regimes, bar_s) for name, res in stitched.items()}
    sensitivity = _sensitivity_table({n: strategies[n] for n in COST_SENSITIVE}, sens, chosen, bar_s, initial)
    exits = {name: exit_summary(res) for name, res in strategies.items()}
    variants = variants_summary(wf, runs, chosen_variant, per_strategy, ci, bar_s, initial,
                                pooled=by_symbol is not None)
    summary = {
        "windows": [w for w in folds if w["seed"] == seeds[0]],
        "seeds": seeds, "chosen_seed_by_validation": chosen,
        "validation_sortino_by_seed": {str(s): val_sortino[s] for s in seeds},
        "stitched": {k: M.to_jsonable(v) for k, v in metrics.items()},
        "ppo_over_seeds": M.to_jsonable({f"{k}.{stat}": v[stat] for k, v in seed_stats.items() for stat in v}),
        "per_fold": {k: [M.to_jsonable(m) for m in v] for k, v in per_fold.items()},
        "sortino_ci95": {k: [float(v[0]), float(v[1])] for k, v in ci.items()},
        "deflated_sharpe": {"reading": dsr_reading, "n_trials": n_trials, "trials_counted": trial_count,
                            **({} if dsr is None else {
            "dsr": dsr.dsr, "sr_per_bar": dsr.sr, "sr0_per_bar": dsr.sr0, "skew": dsr.skew, "kurtosis": dsr.kurtosis,
            "sr_variance_per_bar": sr_var})},
        "pbo": None if pbo is None else {"pbo": pbo.pbo, "n_blocks": pbo.n_blocks, "configs": pbo_columns,
                                          "reading": pbo.reading()},
        "provenance": provenance,
        "regime_slices": slices,
        "cost_sensitivity": sensitivity,
        "exits_by_reason": exits,
        "diagnostics": walkforward_diagnostics(folds, wf.diagnostics, chosen_seed=chosen, out=out, log=log),
    }
    summary["variants"] = variants["variants"]
    summary["variants_table"] = variants["table"]
    summary["chosen_variant"] = variants["chosen"]
    symbol_tables = {}
    if by_symbol is not None:  # a pooled study: the stitched curves above are the equal-weight portfolio
        ppo_sym, other_sym = by_symbol
        per_sym = {sym: {name: M.to_jsonable(_metrics_of(res, bar_s, initial))
                         for name, res in {"ppo": ppo_sym[chosen][sym], **other_sym[sym]}.items()}
                   for sym in ppo_sym[chosen]}
        summary["by_symbol"] = per_sym
        summary["exits_by_reason_by_symbol"] = {
            sym: {name: exit_summary(res) for name, res in {"ppo": ppo_sym[chosen][sym], **other_sym[sym]}.items()}
            for sym in ppo_sym[chosen]}
        summary["portfolio"] = {"weighting": "equal", "symbols": list(per_sym), "definition": PORTFOLIO_DEFINITION}
        symbol_tables = {f"{sym}: stitched metrics (PPO seed {chosen})": pd.DataFrame(m).round(4)
                         for sym, m in per_sym.items()}
    if execution is not None:  # a Ray run: where the trainings ran (absent from a sequential run's report)
        summary["execution"] = execution
    summary = M.to_jsonable(summary)
    (out / "metrics.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    notes = [
        (f"Walk-forward, {wf.scheme} scheme, {wf.folds} folds over {wf.start} .. {wf.end}; validation {wf.val_bars} "
         f"bars before each test window (embargo gap {wf.embargo_bars} bars); seeds {seeds} (PPO shown: seed {chosen}, "
         "chosen on mean validation Sortino)."),
        dsr_reading + f" (trials counted: {n_trials} = {f'{len(runs)} variants x ' if several else ''}{len(seeds)} "
                      f"seeds + {wf.tuning_trials} tuning runs"
        + ("" if tuning is None else f" + {tuning.n_trials} trials of the search in {tuning.trials_json}") + ").",
        pbo.reading() + f" (configurations: {', '.join(pbo_columns)})." if pbo
        else "PBO undefined: every configuration (PPO seeds, V1) traded identically out of sample.",
        "Sortino 95 % block-bootstrap intervals: " + ", ".join(f"{k} [{v[0]:.2f}, {v[1]:.2f}]" for k, v in ci.items()),
        "All strategies trade the same test windows under the same cost model; equity is stitched across windows.",
        cost_note(base.env, "from the exchange history"),
        tsmom_note(base.baselines.tsmom, base.env),
        (f"Data {', '.join(base.data.symbol_names)}, candles sha256 {', '.join(sorted({d[:12] for d in provenance['data_sha256']}))}; "
         f"random policy seed = fold index; folds, seeds and windows in folds.json."),
        provenance_note(provenance),
    ]
    notes.insert(1, variants["chosen"]["statement"])
    if by_symbol is not None:
        notes.insert(1, f"Pooled over {', '.join(base.data.symbol_names)}: the strategy lines are the equal-weight "
                        f"portfolio ({PORTFOLIO_DEFINITION}); per-symbol stitched results in the 'by symbol' tables.")
    extra = {f"variants, stitched out of sample (chosen on validation: {chosen_variant}; baselines beside them)":
             pd.DataFrame(variants["table"]).T,
             **symbol_tables, "PPO over seeds (mean, std)": pd.DataFrame(seed_stats).T,
             "cost sensitivity, stitched (fees and slippage x 0, 1, 2)": pd.DataFrame(sensitivity).round(4),
             f"{EXITS_TITLE}, over the folds (PPO seed {chosen}; PnL in each window's account)": exits_table(exits),
             "costs paid, stitched (USDT)": pd.DataFrame(
                 {n: {"fees": r.fees_paid_usdt, "slippage": r.slippage_paid_usdt, "funding": r.funding_paid_usdt,
                      "liquidation fees": r.liquidation_fees_usdt} for n, r in stitched.items()}).round(2)}
    for name, table in slices.items():
        extra[f"{name} by regime at decision time (0 = calmest; chosen seed's fold models)"] = pd.DataFrame(table).round(4)
    for name, folds in per_fold.items():
        extra[f"{name} per fold"] = pd.DataFrame(folds).T.round(4)
    diag = summary.get("diagnostics") or {}  # the layer diagnostics: their reading among the notes, their tables
    notes.extend(f"Layer diagnostics (out of fold): {line}" for line in diag.get("reading", []))
    extra.update(diagnostics_tables(diag))
    extra["walk-forward config"] = pd.DataFrame({"value": flatten_config(wf.study_dump())})
    extra["run config"] = pd.DataFrame({"value": flatten_config(provenance["config"])})
    write_report(out, title=f"ats walk-forward: {base.name}",
                 equity_curves={k: v.equity for k, v in stitched.items()}, metrics=metrics, notes=notes,
                 extra_tables=extra, positions={n: signed_leverage(r) for n, r in stitched.items() if n != "flat"},
                 regimes=pd.Series(regimes, index=stitched["ppo"].equity.index[:-1]))
    for line in notes[:3]:
        log(line)
    return summary


VARIANT_COLUMNS = ("sortino", "total_return", "max_drawdown", "turnover", "costs_paid")


def _costs_paid(m: dict[str, float]) -> float:
    """Fees + slippage + funding paid (USDT; funding received counts negative)."""
    return float(m["fees_paid"] + m["slippage_paid"] + m["funding_paid"])


def variants_summary(wf: WalkForwardConfig, runs: dict[str, VariantRuns], chosen_variant: str,
                     per_strategy: dict[str, list[BacktestResult]], baseline_ci: dict, bar_s: float, initial: float,
                     *, pooled: bool) -> dict:
    """The variants of a study side by side, stitched out of sample, and the validation-only choice among them.

    ``variants[name]``: its overrides, validation score (mean over folds and seeds of each fold run's validation
    Sortino of its chosen checkpoint), its seed chosen on validation, that seed's stitched metrics, the block-bootstrap
    95 % interval of that seed's Sortino, mean and std over seeds of :data:`VARIANT_COLUMNS` and (pooled runs)
    ``by_symbol``. ``table``: one row per variant and per baseline (v1, tsmom, buy_and_hold, flat: one run, std 0).
    ``chosen``: the chosen variant and how it was chosen.
    """
    p = M.bars_per_year(bar_s)
    variants, table = {}, {}
    for name, vr in runs.items():
        seeds = list(vr.ppo_by_seed)
        per_seed = {s: _metrics_of(vr.ppo_by_seed[s], bar_s, initial) for s in seeds}
        for m in per_seed.values():
            m["costs_paid"] = _costs_paid(m)
        cs = vr.chosen_seed()
        r = M.returns_from_equity(_stitch(vr.ppo_by_seed[cs], initial).to_numpy())
        ci = (M.block_bootstrap_ci(r, lambda x: M.sortino_ratio(x, p), block_len=wf.bootstrap_block_bars,
                                   n_boot=wf.bootstrap_samples, alpha=0.05, seed=0) if np.ptp(r) > 0 else None)
        over = {k: {"mean": float(np.nanmean([per_seed[s][k] for s in seeds])),
                    "std": float(np.nanstd([per_seed[s][k] for s in seeds], ddof=1))} for k in VARIANT_COLUMNS}
        score = vr.validation_score()
        variants[name] = {
            "overrides": wf.variants[name], "validation_sortino_mean": score if np.isfinite(score) else None,
            "validation_sortino_by_seed": {str(s): vr.val_sortino[s] for s in seeds}, "chosen_seed_by_validation": cs,
            "stitched_chosen_seed": per_seed[cs], "sortino_ci95_chosen_seed": None if ci is None else [ci[0], ci[1]],
            "over_seeds": over, "n_seeds": len(seeds),
        }
        if pooled:
            variants[name]["by_symbol"] = {sym: _metrics_of(res, bar_s, initial)
                                           for sym, res in vr.by_symbol_ppo[cs].items()}
        table[f"ppo {name}"] = {
            "validation_sortino": score if np.isfinite(score) else None, "seed": cs,
            "sortino": per_seed[cs]["sortino"], "sortino_ci95_lo": None if ci is None else ci[0],
            "sortino_ci95_hi": None if ci is None else ci[1],
            **{f"{k}_mean": over[k]["mean"] for k in VARIANT_COLUMNS},
            **{f"{k}_std": over[k]["std"] for k in VARIANT_COLUMNS},
        }
    for name in ("v1", "tsmom", "buy_and_hold", "flat"):
        if name not in per_strategy:
            continue
        m = _metrics_of(per_strategy[name], bar_s, initial)
        m["costs_paid"] = _costs_paid(m)
        ci = baseline_ci.get(name)
        table[name] = {"validation_sortino": None, "seed": None, "sortino": m["sortino"],
                       "sortino_ci95_lo": None if ci is None else float(ci[0]),
                       "sortino_ci95_hi": None if ci is None else float(ci[1]),
                       **{f"{k}_mean": m[k] for k in VARIANT_COLUMNS}, **{f"{k}_std": 0.0 for k in VARIANT_COLUMNS}}
    scores = {n: variants[n]["validation_sortino_mean"] for n in runs}
    statement = (
        f"Chosen variant: {chosen_variant} (of {', '.join(runs)}), by the mean over folds and seeds of each fold "
        f"run's validation Sortino of its chosen checkpoint ("
        + ", ".join(f"{n} {'n/a' if v is None else f'{v:.3f}'}" for n, v in scores.items())
        + "; ties: the first listed). Validation only: the test windows were read once (each run's chosen checkpoint traded each of "
        "them once) and no choice (variant, seed or checkpoint) was made on them.")
    chosen = {"name": chosen_variant, "by": "validation", "score": "mean validation sortino over folds and seeds",
              "validation_sortino_mean": scores, "test_windows_read_once": True, "selected_on_test": False,
              "statement": statement}
    return M.to_jsonable({"variants": variants, "table": table, "chosen": chosen})


def dsr_trial_variance(trial_returns: np.ndarray, chosen_returns: np.ndarray) -> dict[str, float]:
    """``V[SR_n]`` for the deflated Sharpe ratio, per bar.

    ``across_trials``: the sample variance of the trials' Sharpe ratios (columns of
    ``trial_returns``, bars x trials; NaN with fewer than 2 trials); ``sampling``: the variance of
    the Sharpe estimator of ``chosen_returns`` (:func:`training.stats.sharpe_sampling_variance`),
    which is the trials' spread under the DSR's null when every trial has true Sharpe 0. With a
    handful of seeds the cross-trial estimate is noisy and can be near 0 (which would deflate
    nothing), so ``used`` is the larger of the two: the conservative choice.
    """
    sr = trial_returns.mean(axis=0) / np.maximum(trial_returns.std(axis=0, ddof=1), 1e-12)
    across = float(np.var(sr, ddof=1)) if trial_returns.shape[1] > 1 else float("nan")
    c = chosen_returns
    sampling = sharpe_sampling_variance(float(c.mean() / c.std(ddof=1)), len(c), float(stats.skew(c, bias=False)),
                                        float(stats.kurtosis(c, fisher=False, bias=False)))  # fmt: skip
    return {"across_trials": across, "sampling": sampling, "used": float(np.nanmax([across, sampling]))}


def summarize_fold(res: BacktestResult, bar_s: float) -> dict[str, float]:
    """Metrics of one fold's test window."""
    return summarize_backtest(res, bar_s)
