"""V1 alone under the env's cost model: one evaluation period, and a walk-forward parameter sweep.

:func:`evaluate_v1` trades V1 (indicators precomputed once, :class:`fallback.v1.V1SeriesPolicy`)
through :func:`training.backtest.run_backtest`, i.e. the same ``TradingEnv`` / ``envs.accounting``
fills, fees, slippage, funding and liquidation as every other strategy. The env gets a zero-width
market observation (V1 reads candles, not features) and the ATR of V1's own ``atr_period_bars``,
so the env places V1's stop and take-profit at exactly the ATR V1 sized with.

:func:`walk_forward_sweep` chooses V1's parameters on training folds only (expanding windows,
López de Prado 2018, ch. 7 / Pardo 2008, *The Evaluation and Optimization of Trading Strategies*,
walk-forward analysis): ``[start, end)`` is cut into ``n_folds + 1`` equal blocks; fold k trains on
blocks 0..k-1 (all of the past) and is tested on block k. Each combination of the grid is
backtested once over the whole span (one continuous account); the metrics of a window are those
of its bars (equity returns) and of the trades that closed in it. The combination with the best
training score (profit factor or Sortino) is reported on the following test window; the
walk-forward result pools the test windows (returns concatenated, trades pooled).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import pandas as pd

from envs.accounting import ClosedTrade
from envs.trading_env import EnvConfig, EnvData
from fallback.config import V1Config
from fallback.v1 import V1SeriesPolicy
from market.bundled import bundled_candles_path, bundled_funding_path
from market.candles import join_funding, load_candles, load_funding
from market.features import atr as atr_indicator
from market.instruments import (
    DEFAULT_SYMBOL,
    InstrumentSpecError,
    ResolvedSpec,
    check_spec_fits,
    resolve_spec,
    symbol_from_data_path,
)
from regime.config import RegimeConfig
from training import metrics as M
from training.backtest import BacktestResult, run_backtest
from training.fanout import Progress, RaySettings, run_tasks
from training.pipeline import summarize_backtest
from training.report import write_report

Log = Callable[[str], None]


class SweepResult(TypedDict):
    """What :func:`walk_forward_sweep` returns."""

    combos: pd.DataFrame  # out-of-sample result of every combination, per fold
    folds: pd.DataFrame  # per fold: the combination chosen on the training window and its test result
    walk_forward: dict[str, float]  # pooled out-of-sample statistics of the chosen combinations
    execution: dict[str, Any] | None  # Ray runs: where each combination ran, retries (training.fanout); else None
SelectBy = Literal["profit_factor", "sortino"]


def parse_period(text: str) -> tuple[pd.Timestamp, pd.Timestamp]:
    """``"START:END"`` (UTC dates or times, END exclusive) -> timestamps.

    Raises
    ------
    ValueError
        If the text is not ``START:END`` with parseable, increasing bounds.
    """
    parts = text.split(":") if text.count(":") == 1 else text.split("/")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(f"period must be START:END (e.g. 2024-01-01:2025-01-01), got {text!r}")
    try:
        a, b = (pd.Timestamp(p.strip(), tz="UTC") for p in parts)
    except ValueError as exc:
        raise ValueError(f"period {text!r}: {exc}") from exc
    if not a < b:
        raise ValueError(f"period {text!r}: START must be before END")
    return a, b


def load_v1_candles(path: str | Path | None) -> pd.DataFrame:
    """Validated candles with funding joined when a funding file is known.

    ``None`` loads the bundled 1h candles and funding of the bundled symbol. For a file ``<SYMBOL>-<tf>.parquet``
    the funding history ``<SYMBOL>-funding.parquet`` in the same folder is joined if it exists
    (otherwise the cost model's fallback funding rate applies).

    Raises
    ------
    FileNotFoundError, market.errors.DataValidationError
        From :func:`market.candles.load_candles`.
    """
    if path is None:
        return join_funding(load_candles(bundled_candles_path()), load_funding(bundled_funding_path()))
    path = Path(path)
    candles = load_candles(path)
    funding = path.with_name(path.name.split("-")[0] + "-funding.parquet")
    if "-" in path.name and funding.is_file() and "funding_rate" not in candles.columns:
        candles = join_funding(candles, load_funding(funding))
    return candles


def data_instrument(
    data: str | Path | None,
    candles: pd.DataFrame,
    *,
    symbol: str | None = None,
    spec_path: str | Path | None = None,
) -> ResolvedSpec:
    """The instrument spec of user candles (``--data``), checked against them.

    The symbol is ``symbol`` (``--symbol``), else the store file name ``<SYMBOL>-<tf>.parquet`` of ``data``, else,
    for the bundled candles (``data`` None), the bundled symbol. The spec: ``spec_path`` (``--instrument-spec``),
    else ``<SYMBOL>.spec.json`` next to ``data``, else the bundled table
    (:func:`market.instruments.resolve_spec`); then :func:`market.instruments.check_spec_fits` on the closes.

    Raises
    ------
    market.instruments.InstrumentSpecError
        If the symbol cannot be told (a file not named ``SYMBOL-TF.parquet`` and no ``symbol``), ``symbol``
        contradicts the file name, no source knows the symbol, or the spec does not fit the candles.
    """
    from_name = symbol_from_data_path(data) if data is not None else DEFAULT_SYMBOL
    if symbol is not None:
        symbol = symbol.strip().upper()
        if from_name is not None and from_name != symbol:
            raise InstrumentSpecError(
                f"--symbol {symbol} contradicts the data file {data}, named for {from_name}; pass the symbol of the data"
            )
    symbol = symbol or from_name
    if symbol is None:
        raise InstrumentSpecError(
            f"cannot tell the symbol of {data}: name the file <SYMBOL>-<timeframe>.parquet (as `ats data download` "
            "does) or pass --symbol SYMBOL"
        )
    candles_path = Path(data) if data is not None else bundled_candles_path(symbol)
    resolved = resolve_spec(symbol, spec_path=spec_path, candles_path=candles_path)
    check_spec_fits(resolved.spec, symbol, candles["close"].to_numpy())
    return resolved


def v1_env_data(candles: pd.DataFrame, atr: np.ndarray) -> EnvData:
    """EnvData with a zero-width market observation (V1 needs none) for the rows of ``candles``."""
    obs = pd.DataFrame(index=candles.index, dtype=np.float32)
    return EnvData.from_frames(candles, obs, np.asarray(atr, dtype=np.float64))


def _rows(candles: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp, v1: V1Config) -> tuple[int, int]:
    idx = candles.index
    a, b = int(np.searchsorted(idx, start)), int(np.searchsorted(idx, end))
    if b - a < 2:
        raise ValueError(f"period [{start}, {end}) holds {b - a} bars of the candles ({idx[0]} .. {idx[-1]})")
    return a, b


#: Feature columns the regime HMM observes by default (as ``training.config.RunConfig.regime_input_features``).
REGIME_COLUMNS: tuple[str, ...] = ("logret_24b", "rvol_24b")


def causal_regime_proba(
    candles: pd.DataFrame,
    fit_end: pd.Timestamp,
    regime: RegimeConfig | None = None,
    *,
    columns: Sequence[str] = REGIME_COLUMNS,
) -> np.ndarray:
    """Forward-filtered HMM regime probabilities for every row of ``candles``, fitted before ``fit_end``.

    The causal features of :func:`market.features.compute_features` (default ``FeatureConfig``)
    give the HMM input ``columns``; :class:`regime.hmm.RegimeHMM` is fitted on the rows whose open
    time is before ``fit_end`` (and whose features are defined), then its forward filter (Rabiner
    1989; row t uses rows up to t only) runs from the first defined row through the end. So the
    probabilities of an evaluation period starting at ``fit_end`` use no bar of that period for
    fitting and no later bar for filtering.

    Parameters
    ----------
    candles : pd.DataFrame
        Validated candles (T rows).
    fit_end : pd.Timestamp
        End (exclusive, UTC) of the fitting span; normally the start of the evaluated period.
    regime : RegimeConfig, optional
        HMM settings (``n_states`` K, restarts, seed); default ``RegimeConfig()``.
    columns : sequence of str
        Feature columns the HMM observes.

    Returns
    -------
    np.ndarray
        float64 (T, K); rows sum to 1, NaN rows where the features are not yet defined (warm-up).
        States are ordered calm -> volatile, as ``V1Config.regime_adjustments`` expects.

    Raises
    ------
    ValueError
        If a column is not a feature, or fewer than 10 K defined rows lie before ``fit_end``.
    """
    from market.features import FeatureConfig, compute_features
    from regime.hmm import RegimeHMM

    regime = regime or RegimeConfig()
    feats = compute_features(candles, FeatureConfig())
    missing = [c for c in columns if c not in feats.columns]
    if missing:
        raise ValueError(f"regime columns {missing} are not feature columns")
    x = feats[list(columns)].to_numpy(np.float64)
    ok = np.isfinite(x).all(axis=1)
    first = int(np.argmax(ok)) if ok.any() else len(x)
    if not ok[first:].all():
        bad = first + int(np.argmin(ok[first:]))
        raise ValueError(f"regime features are non-finite at row {bad} ({candles.index[bad]}) after the warm-up")
    n_fit = int(np.searchsorted(candles.index, fit_end)) - first
    need = 10 * regime.n_states
    if n_fit < need:
        raise ValueError(
            f"only {max(n_fit, 0)} bars with regime features before {fit_end}; the HMM needs at least {need}"
        )
    hmm = RegimeHMM(regime).fit(x[first : first + n_fit])
    out = np.full((len(x), regime.n_states), np.nan)
    out[first:] = hmm.filtered_proba(x[first:])
    return out


def evaluate_v1(
    candles: pd.DataFrame,
    start: pd.Timestamp,
    end: pd.Timestamp,
    v1: V1Config,
    env: EnvConfig,
    *,
    regime_proba: np.ndarray | None = None,
    fit_regime: RegimeConfig | None = None,
    regime_columns: Sequence[str] = REGIME_COLUMNS,
) -> BacktestResult:
    """Backtest V1 over the bars opening in ``[start, end)`` under the env's cost model.

    Candles before ``start`` are closed history V1 may read (its ``history_bars``); rows whose
    ATR is not yet defined are skipped at the start of the period and reported in the error if
    nothing is left.

    Parameters
    ----------
    candles : pd.DataFrame
        Validated candles (``open high low close volume``, optional ``funding_rate``).
    regime_proba : np.ndarray, optional
        (T, K) filtered HMM probabilities aligned with ``candles`` (see ``V1SeriesPolicy``).
    fit_regime : RegimeConfig, optional
        Regime input for V1's regime-conditional thresholds, built causally: an HMM fitted on the
        bars before ``start`` and forward-filtered through the period (:func:`causal_regime_proba`).
        Needs ``v1.regime_adjustments`` with one entry per HMM state; not with ``regime_proba``.
    regime_columns : sequence of str
        Feature columns the fitted HMM observes (``RunConfig.regime_input_features``).

    Raises
    ------
    ValueError
        If the period holds fewer than 2 bars with a defined ATR; if ``fit_regime`` is given with
        ``regime_proba``, or ``v1.regime_adjustments`` does not hold ``fit_regime.n_states``
        entries (the probabilities would be unused or rejected), or too little history precedes ``start``.
    """
    a, b = _rows(candles, start, end, v1)
    if fit_regime is not None:
        if regime_proba is not None:
            raise ValueError("evaluate_v1: give regime_proba or fit_regime, not both")
        if len(v1.regime_adjustments) != fit_regime.n_states:
            raise ValueError(
                f"evaluate_v1: fit_regime has {fit_regime.n_states} states but V1Config.regime_adjustments holds "
                f"{len(v1.regime_adjustments)} entries (need one per state, calm -> volatile)"
            )
        regime_proba = causal_regime_proba(candles.iloc[:b], start, fit_regime, columns=regime_columns)
    atr = atr_indicator(candles.iloc[:b], v1.atr_period_bars)
    first_ok = int(np.argmax(np.isfinite(atr) & (atr > 0)))
    a = max(a, first_ok)
    if b - a < 2:
        raise ValueError(f"period [{start}, {end}) has fewer than 2 bars with a defined ATR")
    history = candles.iloc[:b]
    proba = None if regime_proba is None else np.asarray(regime_proba)[:b]
    policy = V1SeriesPolicy(history, v1, regime_proba=proba)
    data = v1_env_data(candles.iloc[a:b], atr[a:b])
    return run_backtest(policy, data, history, env, offset=a, history_bars=v1.history_bars)


def write_v1_report(
    res: BacktestResult, out: Path, *, bar_interval_s: float, notes: Sequence[str] = ()
) -> dict:
    """Write ``out/metrics.json`` and ``out/report.html`` for one V1 backtest; return the metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"v1": summarize_backtest(res, bar_interval_s)}
    (out / "metrics.json").write_text(json.dumps({k: M.to_jsonable(v) for k, v in metrics.items()}, indent=1,
                                                 allow_nan=False))  # fmt: skip
    extra = {"costs paid (USDT)": pd.DataFrame({"v1": {
        "fees": res.fees_paid_usdt, "slippage": res.slippage_paid_usdt, "funding": res.funding_paid_usdt,
        "liquidation fees": res.liquidation_fees_usdt, "orders skipped (min notional)": res.n_skipped_min_notional}})}  # fmt: skip
    write_report(out, title="ats V1 evaluation", equity_curves={"v1": res.equity}, metrics=metrics,
                 notes=list(notes), extra_tables=extra)  # fmt: skip
    return metrics


# ---------------------------------------------------------------------------------------------
# Walk-forward sweep
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowStats:
    """Metrics of one window of a backtest: trades closed in it, returns of its bars."""

    profit_factor: float
    win_rate: float
    sortino: float
    n_trades: int
    total_return: float


def window_stats(res: BacktestResult, start_ns: int, end_ns: int, periods_per_year: float) -> WindowStats:
    """Stats of ``res`` restricted to the bar closes in ``[start_ns, end_ns)`` (open times, UTC ns).

    The returns are those of the equity marks of the window's bars; the trades those whose exit
    time lies in the window.
    """
    t = res.equity.index.asi8
    eq = res.equity.to_numpy(np.float64)
    sel = np.flatnonzero((t >= start_ns) & (t < end_ns))
    if len(sel) == 0:
        return WindowStats(math.nan, math.nan, math.nan, 0, math.nan)
    lo = max(sel[0] - 1, 0)
    window_eq = eq[lo : sel[-1] + 1]
    trades = [tr for tr in res.trades if start_ns <= tr.exit_time_ns < end_ns]
    r = M.returns_from_equity(window_eq) if len(window_eq) > 1 else np.zeros(0)
    return WindowStats(
        profit_factor=M.profit_factor(trades), win_rate=M.win_rate(trades),
        sortino=M.sortino_ratio(r, periods_per_year) if len(r) else math.nan,
        n_trades=len(trades), total_return=float(window_eq[-1] / window_eq[0] - 1.0),
    )  # fmt: skip


def grid_configs(base: V1Config, grid: Mapping[str, Sequence[Any]]) -> list[tuple[dict[str, Any], V1Config]]:
    """Every combination of ``grid`` applied to ``base`` (validated; invalid combinations raise).

    Raises
    ------
    ValueError
        If a key is not a V1Config field, a value list is empty, or a combination is invalid.
    """
    unknown = [k for k in grid if k not in V1Config.model_fields]
    if unknown:
        raise ValueError(f"grid keys {unknown} are not V1Config fields")
    if any(len(v) == 0 for v in grid.values()):
        raise ValueError("every grid key needs at least one value")
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values, strict=True))
        out.append((params, V1Config.model_validate({**base.model_dump(), **params})))
    return out


def parse_grid(text: str) -> dict[str, list[Any]]:
    """``"breakout_k=0.3,0.5;trigger_mode=breakout,either"`` -> ``{"breakout_k": [0.3, 0.5], ...}``.

    Values are read as int, then float, then bool (true/false), else kept as text.

    Raises
    ------
    ValueError
        If a part is not ``key=v1,v2,...``.
    """

    def value(s: str) -> Any:
        s = s.strip()
        for cast in (int, float):
            try:
                return cast(s)
            except ValueError:
                pass
        return {"true": True, "false": False}.get(s.lower(), s)

    grid: dict[str, list[Any]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, vals = part.partition("=")
        if not sep or not key.strip() or not vals.strip():
            raise ValueError(f"grid part {part!r} is not key=v1,v2,...")
        grid[key.strip()] = [value(v) for v in vals.split(",")]
    return grid


DEFAULT_GRID: dict[str, list[Any]] = {
    "breakout_k": [0.3, 0.6],
    "stop_atr_mult": [1.0, 2.0],
    "trigger_mode": ["breakout", "either"],
}


def _span(a_ns: int, b_ns: int) -> str:
    fmt = "%Y-%m-%d %H:%M"
    return f"{pd.Timestamp(a_ns, tz='UTC'):{fmt}}..{pd.Timestamp(b_ns, tz='UTC'):{fmt}}"


def walk_forward_sweep(
    candles: pd.DataFrame,
    start: pd.Timestamp,
    end: pd.Timestamp,
    grid: Mapping[str, Sequence[Any]],
    env: EnvConfig,
    *,
    base: V1Config | None = None,
    n_folds: int = 3,
    select_by: SelectBy = "profit_factor",
    min_train_trades: int = 10,
    log: Log = lambda s: None,
    ray: RaySettings | None = None,
    on_progress: Progress | None = None,
) -> SweepResult:
    """Walk-forward parameter choice for V1 (see the module docstring).

    The backtests of the combinations (one per combination over the whole span, the expensive part; the folds
    only cut windows out of them) run one after another, or as Ray tasks with ``ray``
    (:func:`training.fanout.run_tasks`: the candles go to the cluster once, each task reserves ``ray.num_cpus``,
    a failed task is retried ``ray.retries`` times); the results are the same either way and in grid order.
    ``on_progress(done, total)`` follows the backtests.

    Returns
    -------
    dict
        ``combos``: one row per (fold, combination) with train and test profit factor, win rate,
        Sortino and trades; ``folds``: one row per fold with the chosen parameters, the train score
        and the chosen set's out-of-sample profit factor, win rate, Sortino, trades;
        ``walk_forward``: pooled out-of-sample ``profit_factor``, ``win_rate``, ``sortino``,
        ``n_trades``, ``total_return`` of the chosen sets.
        ``execution``: with ``ray``, the :class:`training.fanout.ExecutionReport` as JSON (hosts, wall times,
        retried combinations); None when sequential.

    A combination with fewer than ``min_train_trades`` closed training trades, or a non-finite
    score other than +inf, is not eligible (score -inf); ties go to the first in grid order.

    Raises
    ------
    ValueError
        If ``n_folds < 1``, the span is too short for the folds, or the grid is invalid.
    training.fanout.TaskFailedError
        With ``ray``: a combination's backtest failed every attempt (the message names it).
    """
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    if select_by not in ("profit_factor", "sortino"):
        raise ValueError(f"select_by must be 'profit_factor' or 'sortino', got {select_by!r}")
    base = base or V1Config()
    combos = grid_configs(base, grid)
    a, b = _rows(candles, start, end, base)
    bounds = np.linspace(a, b, n_folds + 2).round().astype(int)
    if np.any(np.diff(bounds) < 2):
        raise ValueError(f"[{start}, {end}) holds {b - a} bars, too few for {n_folds} folds")
    ns = candles.index.asi8
    times = [int(ns[i]) if i < len(ns) else int(ns[-1]) + 1 for i in bounds]
    p = M.bars_per_year(float((candles.index[1] - candles.index[0]).total_seconds()))
    labels = [f"combination {i + 1}/{len(combos)} {params}" for i, (params, _) in enumerate(combos)]
    results, report = run_tasks(_combination_backtest, [(cfg, start, end, env) for _, cfg in combos], labels=labels,
                                shared=(candles,), ray=ray, log=log, on_progress=on_progress, unit="backtests")
    for label, res in zip(labels, results, strict=True):
        log(f"{label}: {len(res.trades)} trades")
    rows, fold_rows = [], []
    oos_returns: list[np.ndarray] = []
    oos_trades: list[ClosedTrade] = []
    for k in range(1, n_folds + 1):
        tr0, tr1, te1 = times[0], times[k], times[k + 1]
        scored = []
        for (params, _), res in zip(combos, results, strict=True):
            trn = window_stats(res, tr0, tr1, p)
            tst = window_stats(res, tr1, te1, p)
            rows.append({"fold": k, **params, "train_profit_factor": trn.profit_factor, "train_win_rate": trn.win_rate,
                         "train_sortino": trn.sortino, "train_trades": trn.n_trades,
                         "test_profit_factor": tst.profit_factor, "test_win_rate": tst.win_rate,
                         "test_sortino": tst.sortino, "test_trades": tst.n_trades})  # fmt: skip
            score = getattr(trn, select_by)
            eligible = trn.n_trades >= min_train_trades and (math.isfinite(score) or score == math.inf)
            scored.append(score if eligible else -math.inf)
        best = int(np.argmax(scored))  # first best on ties (grid order)
        params, res = combos[best][0], results[best]
        tst = window_stats(res, tr1, te1, p)
        fold_rows.append({"fold": k, "train": _span(tr0, tr1),
                          "test": _span(tr1, te1),
                          "chosen": json.dumps(params), f"train_{select_by}": scored[best],
                          "test_profit_factor": tst.profit_factor, "test_win_rate": tst.win_rate,
                          "test_sortino": tst.sortino, "test_trades": tst.n_trades,
                          "test_return": tst.total_return})  # fmt: skip
        t = res.equity.index.asi8
        sel = np.flatnonzero((t >= tr1) & (t < te1))
        eq = res.equity.to_numpy(np.float64)[max(sel[0] - 1, 0) : sel[-1] + 1]
        oos_returns.append(M.returns_from_equity(eq))
        oos_trades.extend(tr for tr in res.trades if tr1 <= tr.exit_time_ns < te1)
    r = np.concatenate(oos_returns)
    pooled = {"profit_factor": M.profit_factor(oos_trades), "win_rate": M.win_rate(oos_trades),
              "sortino": M.sortino_ratio(r, p), "n_trades": float(len(oos_trades)),
              "total_return": float(np.prod(1.0 + r) - 1.0)}  # fmt: skip
    return {"combos": pd.DataFrame(rows), "folds": pd.DataFrame(fold_rows), "walk_forward": pooled,
            "execution": None if ray is None else report.as_json()}


def _combination_backtest(item: tuple[V1Config, pd.Timestamp, pd.Timestamp, EnvConfig], attempt: int,
                          candles: pd.DataFrame) -> BacktestResult:
    """One combination's backtest over the sweep's span (a :func:`training.fanout.run_tasks` task)."""
    cfg, start, end, env = item
    return evaluate_v1(candles, start, end, cfg, env)
