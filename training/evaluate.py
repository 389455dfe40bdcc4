"""``ats evaluate``: trade a span once with PPO (a bundle), V1, buy-and-hold, time-series momentum (``tsmom``,
:mod:`training.baselines`), flat and a seeded random policy.

Two entry points share everything below them:

* :func:`evaluate_run` trades the held-out test period of a run written by ``ats train``;
* :func:`evaluate_bundle` trades any period of any candle file a user supplies (their own held-out
  data) with an existing bundle.

The PPO policy is the exported bundle (loaded the way serving loads it, weights without pickle).
The regime and signal outputs come from the bundle's models, which were fitted on the bundle's
training period only; features are recomputed causally from the candles, so the first evaluated
bar needs the feature warm-up (and the TCN window) of history before it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from agents.baselines import BuyAndHoldPolicy, FlatPolicy, RandomPolicy
from agents.bundle import PolicyBundle, load_bundle
from agents.observation import model_outputs
from agents.policy import FrozenPPOPolicy
from envs.actions import decode_action
from envs.trading_env import EnvConfig, EnvData
from fallback.config import V1Config
from fallback.v1 import V1Policy
from market.decision import Policy
from market.errors import DataValidationError
from market.features import atr as atr_indicator
from market.features import compute_features, drop_warmup
from market.instruments import ResolvedSpec, check_spec_fits
from training import metrics as M
from training.backtest import BacktestResult, run_backtest
from training.baselines import TsmomConfig, TsmomPolicy, max_exposure
from training.config import RunConfig, load_config, symbol_env_config
from training.exits import EXITS_TITLE, exit_summary, exits_table
from training.pipeline import Log, PreparedData, prepare_data, prepare_symbols, summarize_backtest
from training.portfolio import PORTFOLIO_DEFINITION, equal_weight
from training.provenance import bundle_identity, flatten_config, provenance_note, provenance_record
from training.report import write_report
from training.v1_eval import v1_env_data

STRATEGIES = ("ppo", "v1", "buy_and_hold", "tsmom", "flat", "random")
COST_MULTIPLIERS = (0.0, 1.0, 2.0)
COST_SENSITIVE = ("ppo", "v1", "tsmom")
#: Strategies that need no bundle (no observation): they trade :func:`span_rule_env_data` or V1's own env data.
NO_BUNDLE = frozenset({"v1", "tsmom"})


@dataclass(frozen=True)
class EvalSpan:
    """Rows ``[start_row, end_row)`` of features/candles/ATR aligned row for row (warm-up already dropped).

    Rows before ``start_row`` are closed history: the HMM filter runs through them, the TCN reads its
    window from them and V1 reads ``history_bars`` of candles from them.
    """

    candles: pd.DataFrame
    features: pd.DataFrame
    atr: np.ndarray  # float64 (n_rows,), price units; the feature config's ATR period (V1: span_v1_env_data)
    start_row: int
    end_row: int

    @classmethod
    def test_period(cls, prep: PreparedData) -> EvalSpan:
        """The test period of a prepared run."""
        return cls(prep.candles, prep.features, prep.atr, prep.test_row, prep.n_rows)

    @property
    def open_times(self) -> pd.DatetimeIndex:
        """Open times of the span's bars."""
        return pd.DatetimeIndex(self.features.index[self.start_row : self.end_row])


def span_env_data(bundle: PolicyBundle, span: EvalSpan, funding_interval_hours: int = 8) -> EnvData:
    """Env data of the span: candles, the bundle-normalised market observation and ATR (funding settlement times
    every ``funding_interval_hours``, the traded spec's interval).

    Raises
    ------
    ValueError
        If the observation columns differ from the bundle's schema, or from
        :func:`agents.observation.model_outputs` (history too short, non-finite output).
    """
    a, b = span.start_row, span.end_row
    outputs = model_outputs(span.features, bundle.models, start=a, end=b)
    market = pd.concat([span.features.iloc[a:b], outputs], axis=1)
    if list(market.columns) != bundle.market_obs_names:
        raise ValueError("observation columns differ from the bundle's schema")
    normed = pd.DataFrame(bundle.normalizer(market.to_numpy(np.float32)), index=market.index, columns=market.columns)
    return EnvData.from_frames(span.candles.iloc[a:b], normed, span.atr[a:b], funding_interval_hours=funding_interval_hours)


def span_rule_env_data(span: EvalSpan, funding_interval_hours: int = 8) -> EnvData:
    """Env data of the span without a market observation (zero columns), for the rules that read candles only
    (``tsmom``): the same candles, feature ATR, funding and settlement times as :func:`span_env_data`, so the
    same fills and costs as buy-and-hold and PPO."""
    a, b = span.start_row, span.end_row
    obs = pd.DataFrame(index=span.candles.index[a:b], dtype=np.float32)
    return EnvData.from_frames(span.candles.iloc[a:b], obs, span.atr[a:b], funding_interval_hours=funding_interval_hours)


def span_v1_env_data(span: EvalSpan, v1_cfg: V1Config) -> EnvData:
    """Env data V1 trades the span with: a zero-width market observation and the ATR of V1's own
    ``atr_period_bars`` (float64, price units).

    The env places a decision's stop and take-profit ``stop_atr`` / ``take_profit_atr`` ATRs from the
    fill with the ATR it is given. V1 sizes a position so that its stop risks ``risk_per_trade_frac``
    of equity at *its* ATR (:func:`fallback.v1.size_position`); with the feature ATR (``span.atr``, the
    feature config's period) a different period would scale V1's risk per trade by the ratio of the
    two ATRs. The ATR is computed on ``span.candles[:end_row]``, the candles V1 itself reads, so it
    equals the ATR V1 sized with; the env's ATR slippage term uses it too (as in
    :func:`training.v1_eval.evaluate_v1`). Span rows where V1's ATR is not yet defined (fewer than
    ``atr_period_bars`` candles before them) take the feature ATR: V1 cannot size an entry there.
    """
    a, b = span.start_row, span.end_row
    atr = atr_indicator(span.candles.iloc[:b], v1_cfg.atr_period_bars)[a:b]
    atr = np.where(np.isfinite(atr) & (atr > 0), atr, span.atr[a:b])
    return v1_env_data(span.candles.iloc[a:b], atr)


_T = TypeVar("_T")


def _needed(value: _T | None) -> _T:
    """``value``, which the caller has already required (a bundle, the bundle's env data, a resolved spec)."""
    if value is None:
        raise ValueError("span_backtests: a bundle (or a resolved instrument spec) is needed here")
    return value


def span_backtests(
    bundle: PolicyBundle | None,
    span: EvalSpan,
    env_cfg: EnvConfig,
    v1_cfg: V1Config,
    *,
    cost_multiplier: float = 1.0,
    strategies: tuple[str, ...] = STRATEGIES,
    random_seed: int = 0,
    tsmom_cfg: TsmomConfig | None = None,
) -> dict[str, BacktestResult]:
    """Backtest ``strategies`` on the span through the same env and costs.

    ``cost_multiplier`` scales fees and slippage (cost sensitivity: 0, 1, 2); ``random_seed`` seeds the
    random policy (uniform actions decoded like the agent's); ``tsmom_cfg`` (default :class:`TsmomConfig`)
    sets the time-series momentum rule, whose exposure is capped by ``env_cfg.actions`` and which trades under
    its own trading rules (:meth:`TsmomConfig.trading_rules`) with ``env_cfg``'s costs and instrument. V1 trades
    :func:`span_v1_env_data` (stops and targets at V1's own ATR period), tsmom :func:`span_rule_env_data`
    (no observation; the same candles, ATR and funding), the others the bundle's observation and the feature
    ATR; ``bundle`` may be None when ``strategies`` holds only ``v1`` (without regime adjustments) and ``tsmom``.

    Raises
    ------
    KeyError
        If a strategy name is not one of :data:`STRATEGIES`.
    ValueError
        If ``bundle`` is None while a strategy or V1's regime adjustments need it.
    """
    if bundle is None and (set(strategies) - NO_BUNDLE or ("v1" in strategies and v1_cfg.regime_adjustments)):
        raise ValueError(f"span_backtests: strategies {strategies} need a bundle")
    hours = env_cfg.costs.funding_interval_hours
    data = span_env_data(_needed(bundle), span, hours) if set(strategies) - NO_BUNDLE else None
    tsmom_cfg = TsmomConfig() if tsmom_cfg is None else tsmom_cfg
    times = span.candles.index[span.start_row : span.end_row]
    bar_s = float(np.median(np.diff(times.asi8))) / 1e9 if len(times) > 1 else 3600.0
    candles = span.candles.iloc[: span.end_row]  # history before the span is visible to V1 (closed candles)
    cfg = env_cfg.updated(costs=env_cfg.costs.updated(cost_multiplier=cost_multiplier))
    factories: dict[str, Callable[[], Policy]] = {
        "ppo": lambda: FrozenPPOPolicy(_needed(bundle)),
        "v1": lambda: V1Policy(v1_cfg),
        "buy_and_hold": BuyAndHoldPolicy,
        "tsmom": lambda: TsmomPolicy(tsmom_cfg, env_cfg.actions, bar_s),
        "flat": FlatPolicy,
        "random": lambda: RandomPolicy(lambda x: decode_action(x, env_cfg.actions), seed=random_seed),
    }
    # V1's regime-conditional thresholds read the bundle's forward-filtered HMM probabilities
    regime = span_regime_proba(_needed(bundle), span) if "v1" in strategies and v1_cfg.regime_adjustments else None
    special = {"v1": lambda: span_v1_env_data(span, v1_cfg), "tsmom": lambda: span_rule_env_data(span, hours)}
    history = {"tsmom": tsmom_cfg.history_bars}
    rules = {"tsmom": cfg.updated(trading_rules=tsmom_cfg.trading_rules())}  # tsmom's own rebalance bars and band
    return {
        name: run_backtest(factories[name](), special[name]() if name in special else _needed(data), candles,
                           rules.get(name, cfg), offset=span.start_row,
                           history_bars=history.get(name, v1_cfg.history_bars),
                           regime_proba=regime if name == "v1" else None)
        for name in strategies
    }


def test_period_backtests(
    cfg: RunConfig,
    bundle: PolicyBundle,
    prep: PreparedData,
    *,
    cost_multiplier: float = 1.0,
    strategies: tuple[str, ...] = STRATEGIES,
    random_seed: int = 0,
) -> dict[str, BacktestResult]:
    """:func:`span_backtests` on the test period of a prepared run, with the run's env, V1 and tsmom config."""
    return span_backtests(bundle, EvalSpan.test_period(prep), cfg.env, cfg.v1, cost_multiplier=cost_multiplier,
                          strategies=strategies, random_seed=random_seed, tsmom_cfg=cfg.baselines.tsmom)


def span_regime_proba(bundle: PolicyBundle, span: EvalSpan) -> np.ndarray:
    """Forward-filtered HMM state probabilities (states ordered calm -> volatile) at each span bar,
    float64 (n, K); rows sum to 1."""
    outputs = model_outputs(span.features, bundle.models, start=span.start_row, end=span.end_row)
    return outputs[[f"regime_p{k}" for k in range(bundle.models.n_states)]].to_numpy(np.float64)


def span_regimes(bundle: PolicyBundle, span: EvalSpan) -> np.ndarray:
    """Most likely forward-filtered HMM state (0 calmest .. K-1 most volatile) at each span bar, int (n,)."""
    return span_regime_proba(bundle, span).argmax(axis=1)


def test_period_regimes(bundle: PolicyBundle, prep: PreparedData) -> np.ndarray:
    """:func:`span_regimes` of the test period."""
    return span_regimes(bundle, EvalSpan.test_period(prep))


def regime_slices(res: BacktestResult, regimes: np.ndarray, bar_s: float) -> dict[str, dict[str, float]]:
    """Metrics of one backtest broken down by the regime at decision time.

    The return of bar t+1 belongs to the regime of bar t (where the decision that produced it was
    taken); so do the bar's position and notional. Per regime: ``n_bars``, ``share_of_bars``,
    compounded ``total_return`` over those bars, annualised ``sortino`` and ``sharpe`` of those bar
    returns, ``max_drawdown`` of the equity compounded over those bars only, ``exposure``,
    ``avg_leverage`` (|notional| / equity while a position is open) and, for trades *entered*
    (decided) in the regime, ``n_trades``, ``win_rate`` and ``profit_factor``.

    Parameters
    ----------
    res : BacktestResult
        One strategy's backtest (equity length n+1).
    regimes : numpy.ndarray of int, shape (>= n,)
        Regime index at each decision bar.
    bar_s : float
        Bar length, seconds (annualisation).
    """
    eq = res.equity.to_numpy(np.float64)
    r = np.divide(eq[1:], eq[:-1], out=np.ones(len(eq) - 1), where=eq[:-1] > 0) - 1.0  # 0 after a ruin
    n = len(r)
    decided = np.asarray(regimes)[:n]
    p = M.bars_per_year(bar_s)
    notional = res.position_notional_usdt if res.position_notional_usdt is not None else np.zeros(n)
    regime_at = pd.Series(decided, index=res.equity.index[:n])
    out = {}
    for k in np.unique(decided):
        mask = decided == k
        rk = r[mask]
        trades_k = [t for t in res.trades if _entry_regime(t, regime_at) == k]
        out[f"regime_{int(k)}"] = {
            "n_bars": float(mask.sum()),
            "share_of_bars": float(mask.mean()),
            "total_return": float(np.prod(1.0 + rk) - 1.0),
            "sortino": M.sortino_ratio(rk, p) if rk.size > 1 else float("nan"),
            "sharpe": M.sharpe_ratio(rk, p) if rk.size > 1 else float("nan"),
            "max_drawdown": M.max_drawdown(np.concatenate([[1.0], np.cumprod(1.0 + rk)])),
            "exposure": float((res.position_side[:n][mask] != 0).mean()),
            "avg_leverage": M.avg_leverage(notional[:n][mask], eq[1:][mask]),
            "n_trades": float(len(trades_k)),
            "win_rate": M.win_rate(trades_k),
            "profit_factor": M.profit_factor(trades_k),
        }
    return out


def _entry_regime(trade, regime_at: pd.Series) -> int | None:
    """Regime of the decision bar that opened ``trade`` (the bar before its entry fill), or None."""
    entry = pd.Timestamp(int(trade.entry_time_ns), tz="UTC")
    pos = regime_at.index.searchsorted(entry, side="left") - 1
    return int(regime_at.iloc[pos]) if 0 <= pos < len(regime_at) else None


def signed_leverage(res: BacktestResult) -> pd.Series:
    """Effective leverage held during each bar, signed by side (short < 0), indexed by bar open time."""
    eq = res.equity.to_numpy(np.float64)[1:]
    notional = res.position_notional_usdt if res.position_notional_usdt is not None else np.abs(res.position_side)
    lev = np.divide(notional, eq, out=np.zeros(len(eq)), where=eq > 0) * np.sign(res.position_side)
    return pd.Series(lev, index=res.equity.index[1:])


def cost_sensitivity(
    base: dict[str, BacktestResult], rerun: Callable[[float], dict[str, BacktestResult]], bar_s: float
) -> dict[str, dict[str, float]]:
    """PPO, V1 and tsmom (:data:`COST_SENSITIVE`) re-traded with fees and slippage x 0, x 1 and x 2
    (``rerun(multiplier)``; x 1 is ``base``)."""
    out = {}
    for mult in COST_MULTIPLIERS:
        runs = base if mult == 1.0 else rerun(mult)
        for name in COST_SENSITIVE:
            if name not in runs:
                continue
            m = summarize_backtest(runs[name], bar_s)
            out[f"{name} costs x{mult:g}"] = {k: m[k] for k in ("total_return", "sortino", "max_drawdown",
                                                                 "fees_paid", "slippage_paid", "n_trades")}
    return out


def write_evaluation(
    out: Path,
    *,
    title: str,
    results: dict[str, BacktestResult],
    regimes: pd.Series,
    sensitivity: dict[str, dict[str, float]],
    bar_s: float,
    notes: list[str],
    log: Log = print,
    provenance: dict | None = None,
    instrument: dict | None = None,
    extra_metrics: dict | None = None,
    extra_tables: dict[str, pd.DataFrame] | None = None,
    exits: dict[str, dict] | None = None,
) -> dict[str, dict[str, float]]:
    """Write ``metrics.json`` (metrics, regime slices, cost sensitivity, ``exits_by_reason``, ``provenance``,
    ``instrument``, and the entries of ``extra_metrics``), the two side files and ``report.html`` (with
    ``extra_tables`` first).

    ``exits`` ({strategy: :func:`training.exits.exit_summary`}): how each strategy's trades ended; default: the
    summaries of ``results`` (a pooled run passes those of every symbol's account).

    ``instrument`` (:func:`instrument_record`): the spec the costs used, where it came from, and the symbols the
    bundle was trained and evaluated on; written to ``metrics.json`` and, as a table, to the report.

    ``regimes`` is the regime index at each decision bar, indexed by bar open time; ``provenance``
    (:func:`training.provenance.provenance_record`) goes into ``metrics.json`` and, as a note and
    the "run config" table, into the report.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {name: summarize_backtest(res, bar_s) for name, res in results.items()}
    for name, m in metrics.items():
        log(f"{name:>12}: return {m['total_return']:+.2%}, Sortino {m['sortino']:.2f}, max DD {m['max_drawdown']:.2%}, "
            f"trades {m['n_trades']:.0f}, avg leverage {m['avg_leverage']:.2f}")
    slices = {name: regime_slices(res, regimes.to_numpy(), bar_s) for name, res in results.items()}
    exits = {name: exit_summary(res) for name, res in results.items()} if exits is None else exits
    (out / "metrics.json").write_text(json.dumps(
        {**{k: M.to_jsonable(v) for k, v in metrics.items()},
         "regime_slices": M.to_jsonable(slices), "cost_sensitivity": M.to_jsonable(sensitivity),
         "exits_by_reason": _jsonable_tree(exits),
         **({} if provenance is None else {"provenance": M.to_jsonable(provenance)}),
         **({} if instrument is None else {"instrument": M.to_jsonable(instrument)}),
         **{k: _jsonable_tree(v) for k, v in (extra_metrics or {}).items()}},
        indent=1, allow_nan=False))
    (out / "regime_slices.json").write_text(json.dumps(M.to_jsonable(slices), indent=1, allow_nan=False))
    (out / "cost_sensitivity.json").write_text(json.dumps(M.to_jsonable(sensitivity), indent=1, allow_nan=False))
    extra = dict(extra_tables or {})
    extra["costs paid (USDT)"] = pd.DataFrame(
        {n: {"fees": r.fees_paid_usdt, "slippage": r.slippage_paid_usdt, "funding": r.funding_paid_usdt,
             "liquidation fees": r.liquidation_fees_usdt, "orders skipped (min notional)": r.n_skipped_min_notional}
         for n, r in results.items()}).round(2)
    extra["cost sensitivity (fees and slippage x 0, 1, 2)"] = pd.DataFrame(sensitivity).round(4)
    extra[EXITS_TITLE] = exits_table(exits)
    for name, table in slices.items():
        extra[f"{name} by regime at decision time (0 = calmest)"] = pd.DataFrame(table).round(4)
    if instrument is not None:
        extra["instrument spec (costs, rounding, brackets)"] = pd.DataFrame({"value": instrument_table(instrument)})
    if provenance is not None:
        notes = [*notes, provenance_note(provenance)]
        extra["run config"] = pd.DataFrame({"value": flatten_config(provenance["config"])})
    write_report(out, title=title, equity_curves={n: r.equity for n, r in results.items()}, metrics=metrics,
                 notes=notes, extra_tables=extra,
                 positions={n: signed_leverage(r) for n, r in results.items() if n != "flat"}, regimes=regimes)
    return metrics


def _jsonable_tree(value):
    """``value`` with every float made JSON-safe (:func:`training.metrics.to_jsonable` at each mapping level)."""
    if isinstance(value, dict):
        return {k: _jsonable_tree(v) for k, v in M.to_jsonable(value).items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable_tree(v) for v in value]
    return value


def instrument_record(resolved: ResolvedSpec, trained_on: str | None) -> dict:
    """The ``instrument`` entry of ``metrics.json``: origin, file and spec (:meth:`ResolvedSpec.record`), plus
    ``trained_on`` (the bundle's symbol, None if unknown), ``evaluated_on`` and ``transfer`` (they differ)."""
    evaluated = resolved.spec.symbol
    return {**resolved.record(), "trained_on": trained_on, "evaluated_on": evaluated,
            "transfer": trained_on is not None and trained_on != evaluated}


def instrument_table(record: dict) -> dict[str, str]:
    """Rows of the report's instrument table from an :func:`instrument_record`."""
    spec = record["spec"]
    rows = {"trained on": str(record.get("trained_on")), "evaluated on": str(record.get("evaluated_on")),
            "spec origin": record["origin"] + (f" ({record['path']})" if record.get("path") else "")}
    for k, v in spec.items():
        if k == "maintenance_brackets":
            v = "; ".join(f"<= {b['notional_cap_usdt']:,.0f} USDT: {b['maint_margin_rate']:.4%} - {b['maint_amount_usdt']:,.0f}"
                          for b in v)
        rows[k] = str(v)
    return rows


def instrument_note(record: dict) -> str:
    """The report line that says which instrument the costs used and whether the bundle is traded on another symbol."""
    spec, tr, ev = record["spec"], record.get("trained_on"), record["evaluated_on"]
    head = (f"Instrument: trained on {tr}, evaluated on {ev} (transfer); the costs, rounding and brackets are {ev}'s."
            if record.get("transfer") else f"Instrument {ev}" + (
                f" (one of the symbols the bundle was pooled over: {tr})." if tr and "+" in tr
                else " (the symbol the bundle was trained on)." if tr else "."))
    where = {"instrument_spec": f"the spec file {record.get('path')}", "data_spec_file": f"the downloaded spec {record.get('path')}",
             "bundled_table": "the bundled table (market/instruments.py)"}[record["origin"]]
    return (f"{head} Instrument spec from {where}: tick {spec['tick_size_usdt']:g} USDT, quantity step "
            f"{spec['lot_step_base']:g}, min notional {spec['min_notional_usdt']:g} USDT, max leverage "
            f"{spec['max_leverage']}x; source: {spec['source']} ({spec['read_on']}).")


def cost_note(env_cfg: EnvConfig, funding_source: str) -> str:
    """The report line that states the cost model every strategy traded under."""
    c = env_cfg.costs
    tp = (f"take-profit as a resting limit order (maker fee {c.maker_fee_bps} bps, no slippage)"
          if c.take_profit_order == "limit" else "take-profit-market orders (taker)")
    if c.entry_order == "limit":  # issue 16 lever: maker-priced entries (envs.config.CostConfig)
        at = "the next open" + (f" -/+ {c.entry_limit_offset_bps:g} bps" if c.entry_limit_offset_bps else "")
        tp += (f", entries as limit orders at {at} (maker fee {c.maker_fee_bps} bps, no slippage; filled only when "
               "the bar trades through the limit, else no entry, counted as missed)")
    return (f"Costs for every strategy: taker fee {c.taker_fee_bps} bps per fill, {tp}, slippage {c.slippage_bps} bps + "
            f"{c.slippage_atr_coef} x ATR%, {c.funding_interval_hours}-hourly funding {funding_source} (fallback rate "
            f"{c.funding_fallback_rate} per settlement where missing), isolated-margin liquidation; decisions at bar "
            "close, fills at the next open; an open position at the end is marked to market. The cost-sensitivity "
            "runs scale fees and slippage only; funding is charged at its recorded rates in every run.")


def tsmom_note(cfg: TsmomConfig, env_cfg: EnvConfig) -> str:
    """The report line that states the time-series momentum baseline's fixed parameters."""
    a = env_cfg.actions
    band = ("never resized" if cfg.rebalance_band_frac is None else
            f"resized (partial close or add) when the target leaves a {cfg.rebalance_band_frac:.0%} band of the held "
            "quantity")
    return (f"tsmom: time-series momentum with volatility targeting (Moskowitz, Ooi & Pedersen 2012; the baseline "
            f"of Zhang, Zohren & Roberts 2020): direction = sign of the trailing {cfg.lookback_bars}-bar return, "
            f"exposure = {cfg.target_vol_annual:.0%} / ex-ante annualised volatility (EWMA of 1-bar returns, span "
            f"{cfg.vol_span_bars} bars), capped at the agent's largest exposure {max_exposure(a):g}x (action bounds, "
            f"{a.sizing_mode} sizing); read at bars closing at a multiple of {cfg.rebalance_interval_bars} bars "
            f"(UTC epoch), {band}; no stop or target. Parameters fixed in the config, never tuned on a test period; "
            "flat until the lookback has history.")


def tsmom_config_of(bundle: PolicyBundle) -> TsmomConfig:
    """The tsmom config stored in the bundle's manifest (``config.baselines.tsmom``); defaults if absent."""
    raw = bundle.manifest.get("config", {}).get("baselines", {}).get("tsmom")
    return TsmomConfig() if raw is None else TsmomConfig.model_validate(raw)


def evaluate_run(run_dir: Path, *, log: Log = print, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Backtest every strategy on a run's test period; write ``run_dir/report/{metrics.json,report.html}``.

    A pooled run (``data.symbols``) is evaluated by :func:`evaluate_pooled`.
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    bundle = load_bundle(run_dir / "bundle", device=device)
    if len(cfg.data.sources()) > 1:
        return evaluate_pooled(run_dir, cfg, bundle, log=log)
    prep = prepare_data(cfg, log)
    bar_s = prep.info["bar_interval_s"]
    span = EvalSpan.test_period(prep)
    tsmom = cfg.baselines.tsmom
    results = span_backtests(bundle, span, cfg.env, cfg.v1, random_seed=cfg.seed, tsmom_cfg=tsmom)
    sensitivity = cost_sensitivity(
        results, lambda m: span_backtests(bundle, span, cfg.env, cfg.v1, cost_multiplier=m, strategies=COST_SENSITIVE,
                                          tsmom_cfg=tsmom), bar_s)
    notes = [
        (f"Symbol {cfg.data.symbol}, bar interval {bar_s / 3600:g} h; test period {prep.info['test'][0]} to "
         f"{prep.info['test'][1]} ({prep.info['test'][2]} bars), never used for fitting or selection."),
        (f"Training {prep.info['train'][0]} to {prep.info['train'][1]}; validation (PPO checkpoint choice) "
         f"{prep.info['validation'][0]} to {prep.info['validation'][1]}."),
        cost_note(cfg.env, "from the exchange history"),
        tsmom_note(tsmom, cfg.env),
        f"Initial equity {cfg.env.initial_equity_usdt:,.0f} USDT; random policy seed {cfg.seed}.",
        f"Bundle: {bundle.path} (schema {bundle.manifest['observation']['schema_hash'][:12]}).",
    ]
    instrument = instrument_record(prep.instrument, bundle_symbol(bundle)) if prep.instrument is not None else None
    if instrument is not None:
        notes.insert(1, instrument_note(instrument))
    regimes = pd.Series(span_regimes(bundle, span), index=span.open_times)
    prov = provenance_record(bundle.manifest["config"], bundle=bundle_identity(bundle.manifest),
                             data_sha256=prep.info["candles_sha256"])  # fmt: skip
    return write_evaluation(run_dir / "report", title=f"ats test-period report: {cfg.name}", results=results,
                            regimes=regimes, sensitivity=sensitivity, bar_s=bar_s, notes=notes, log=log,
                            provenance=prov, instrument=instrument)  # fmt: skip


def pooled_test_backtests(cfg: RunConfig, bundle: PolicyBundle, preps: list[PreparedData], *,
                          cost_multiplier: float = 1.0, strategies: tuple[str, ...] = STRATEGIES,
                          random_seed: int | None = None) -> dict[str, dict[str, BacktestResult]]:
    """:func:`span_backtests` of every symbol's test period, each under its own instrument spec:
    ``{symbol: {strategy: result}}`` (random policy seeded ``random_seed``, default the run's seed)."""
    seed = cfg.seed if random_seed is None else random_seed
    return {p.info["symbol"]: span_backtests(bundle, EvalSpan.test_period(p), symbol_env_config(cfg, _needed(p.instrument).spec),
                                             cfg.v1, cost_multiplier=cost_multiplier, strategies=strategies,
                                             random_seed=seed, tsmom_cfg=cfg.baselines.tsmom)
            for p in preps}


def portfolio_of(by_symbol: dict[str, dict[str, BacktestResult]]) -> dict[str, BacktestResult]:
    """Each strategy's equal-weight portfolio (:func:`training.portfolio.equal_weight`) over the symbols."""
    names = next(iter(by_symbol.values())).keys()
    return {n: equal_weight({s: r[n] for s, r in by_symbol.items()}, n) for n in names}


def evaluate_pooled(run_dir: Path, cfg: RunConfig, bundle: PolicyBundle, *, log: Log = print) -> dict[str, dict[str, float]]:
    """The test report of a pooled multi-symbol run.

    Every symbol's test period is traded by every strategy under that symbol's own spec and funding; the report's
    strategy lines (top level of ``metrics.json``, the curves) are the equal-weight portfolio
    (:data:`training.portfolio.PORTFOLIO_DEFINITION`), ``metrics.json`` adds ``by_symbol`` ({SYMBOL: {strategy:
    metrics}}), ``portfolio`` (the definition and symbols), ``regime_slices_by_symbol`` (each symbol's strategies
    by its own regime), ``instruments`` ({SYMBOL: spec record}) and ``exits_by_reason_by_symbol``; ``exits_by_reason``
    counts every symbol account's exits; ``instrument`` and ``regime_slices`` are the
    primary symbol's record and the portfolio sliced by the primary symbol's regime. The cost sensitivity is the
    portfolio's.
    """
    preps = prepare_symbols(cfg, log)
    bar_s = preps[0].info["bar_interval_s"]
    by_symbol = pooled_test_backtests(cfg, bundle, preps)
    portfolio = portfolio_of(by_symbol)
    sensitivity = cost_sensitivity(
        portfolio, lambda m: portfolio_of(pooled_test_backtests(cfg, bundle, preps, cost_multiplier=m,
                                                                strategies=COST_SENSITIVE)), bar_s)
    by_symbol_metrics = {s: {n: summarize_backtest(r, bar_s) for n, r in res.items()} for s, res in by_symbol.items()}
    for s, ms in by_symbol_metrics.items():
        log(f"{s}: " + ", ".join(f"{n} {m['total_return']:+.2%}" for n, m in ms.items()))
    regimes = {p.info["symbol"]: span_regimes(bundle, EvalSpan.test_period(p)) for p in preps}
    slices = {s: {n: regime_slices(r, regimes[s], bar_s) for n, r in res.items()} for s, res in by_symbol.items()}
    symbols = [p.info["symbol"] for p in preps]
    trained = "+".join(symbols)
    records = {p.info["symbol"]: {**_needed(p.instrument).record(), "trained_on": trained, "evaluated_on": p.info["symbol"],
                                  "transfer": False} for p in preps}
    info = preps[0].info
    notes = [
        (f"Pooled run over {len(symbols)} symbols ({', '.join(symbols)}), bar interval {bar_s / 3600:g} h; test period "
         f"{info['test'][0]} to {info['test'][1]} ({info['test'][2]} bars per symbol), never used for fitting or "
         "selection. One set of regime/signal models and one policy for all symbols; each symbol traded under its "
         "own instrument spec and funding history."),
        (f"The strategy lines are the equal-weight portfolio: {PORTFOLIO_DEFINITION}. Per-symbol results are in the "
         "'by symbol' tables and metrics.json by_symbol."),
        (f"Training {info['train'][0]} to {info['train'][1]}; validation (PPO checkpoint choice: the equal-weight "
         f"portfolio's Sortino) {info['validation'][0]} to {info['validation'][1]}."),
        *[instrument_note(r) for r in records.values()],
        cost_note(cfg.env, "from the exchange history"),
        tsmom_note(cfg.baselines.tsmom, cfg.env),
        (f"Initial equity {cfg.env.initial_equity_usdt:,.0f} USDT per symbol account; random policy seed {cfg.seed}. "
         f"Regime bands of the curves and 'regime_slices': the primary symbol {symbols[0]}'s HMM regime."),
        f"Bundle: {bundle.path} (schema {bundle.manifest['observation']['schema_hash'][:12]}).",
    ]
    prov = provenance_record(bundle.manifest["config"], bundle=bundle_identity(bundle.manifest),
                             data_sha256=info["candles_sha256"])  # fmt: skip
    tables = {f"{s}: test-period metrics": pd.DataFrame(ms).round(4) for s, ms in by_symbol_metrics.items()}
    exits_by_symbol = {s: {n: exit_summary(r) for n, r in res.items()} for s, res in by_symbol.items()}
    names = list(portfolio)  # the portfolio's exits: every symbol account's trades and open positions
    exits = {n: exit_summary([by_symbol[s][n] for s in by_symbol]) for n in names}
    for s, rec in records.items():
        tables[f"{s}: instrument spec"] = pd.DataFrame({"value": instrument_table(rec)})
    span0 = EvalSpan.test_period(preps[0])
    return write_evaluation(
        run_dir / "report", title=f"ats test-period report: {cfg.name} (equal-weight portfolio of {len(symbols)} symbols)",
        results=portfolio, regimes=pd.Series(regimes[symbols[0]], index=span0.open_times), sensitivity=sensitivity,
        bar_s=bar_s, notes=notes, log=log, provenance=prov, instrument=records[symbols[0]],
        extra_metrics={"by_symbol": by_symbol_metrics,
                       "portfolio": {"weighting": "equal", "symbols": symbols, "definition": PORTFOLIO_DEFINITION},
                       "regime_slices_by_symbol": slices, "instruments": records,
                       "exits_by_reason_by_symbol": exits_by_symbol},
        extra_tables=tables, exits=exits,
    )


def bundle_symbol(bundle: PolicyBundle) -> str | None:
    """The symbol a bundle was trained on: its manifest's ``data.symbol``, else its cost model's instrument."""
    sym = bundle.manifest.get("data", {}).get("symbol")
    return str(sym) if sym else bundle.env_config.costs.instrument.symbol


def bundle_span(bundle: PolicyBundle, candles: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> EvalSpan:
    """Features, ATR and the row span ``[start, end)`` of user candles for ``bundle``'s feature schema.

    Features are computed from all candles before ``end`` (causal), the warm-up rows are dropped
    explicitly, and the span must leave the TCN window of history before its first bar.

    Raises
    ------
    market.errors.DataValidationError
        If the candles do not cover ``[start, end)``, or there is not enough history before ``start``
        for the feature warm-up and the TCN window (the message says how many bars are needed).
    """
    hist = candles.loc[candles.index < end]
    if hist.empty or hist.index[-1] < start:
        raise DataValidationError("period_in_data", [f"{start}..{end}"], source="--data candles",
                                  detail="the candles hold no bar in the evaluated period")
    feats_all = compute_features(hist, bundle.feature_config)
    feats, n_warm = drop_warmup(feats_all)
    pos = hist.index.get_indexer(feats.index)
    a = int(feats.index.searchsorted(start))
    need = bundle.models.tcn.window_bars - 1
    if len(feats) == 0 or a < need or a >= len(feats):
        first = str(hist.index[0])
        raise DataValidationError(
            "history_before_period", [str(start)], source="--data candles",
            detail=(f"candles start {first}; the features need {n_warm} warm-up bars and the TCN {need} more bars "
                    "of history before the first evaluated bar"),
        )
    atr = atr_indicator(hist, bundle.feature_config.atr_period_bars)[pos]
    return EvalSpan(hist.iloc[pos], feats, atr, a, len(feats))


def sample_note(data_info: dict, first: pd.Timestamp, last: pd.Timestamp) -> str:
    """Say whether bars ``[first, last]`` overlap the bundle's training or validation bars (from its manifest)."""
    try:
        fit_start, fit_end = pd.Timestamp(data_info["train"][0]), pd.Timestamp(data_info["validation"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return "The bundle's manifest does not record its training span: whether this period is out of sample is unknown."
    span = f"the bundle was fitted and selected on bars {fit_start} .. {fit_end}"
    if last < fit_start or first > fit_end:
        return f"Out of sample: {span}, which this period does not overlap."
    return f"NOT out of sample: {span}, which this period overlaps; read these numbers as in-sample."


def v1_config_of(bundle: PolicyBundle) -> V1Config:
    """The V1 config stored in the bundle's manifest (the one it was evaluated against); defaults if absent."""
    raw = bundle.manifest.get("config", {}).get("v1")
    return V1Config() if raw is None else V1Config.model_validate(raw)


def evaluate_bundle(
    bundle_dir: Path,
    candles: pd.DataFrame,
    start: pd.Timestamp,
    end: pd.Timestamp,
    out: Path,
    *,
    data_label: str,
    instrument: ResolvedSpec,
    random_seed: int = 0,
    log: Log = print,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Trade an existing bundle (and V1, buy-and-hold, tsmom, flat, random) on bars opening in ``[start, end)``.

    Every strategy trades under ``instrument``, the spec of the *data's* symbol (tick, step, min notional,
    brackets, funding interval); the bundle's fees and slippage settings are kept. A bundle trained on another
    symbol is a transfer, and the report says so ("trained on X, evaluated on Y (transfer)").

    Parameters
    ----------
    bundle_dir : Path
        Policy bundle (hashes and observation schema are verified on load).
    candles : pandas.DataFrame
        Validated candles (:func:`market.candles.load_candles`), optionally with ``funding_rate``;
        must include enough history before ``start`` for the bundle's feature warm-up.
    start, end : pandas.Timestamp
        UTC bounds of the evaluated decision bars, ``end`` exclusive.
    out : Path
        Report folder: ``metrics.json``, ``regime_slices.json``, ``cost_sensitivity.json``, ``report.html``.

    instrument : ResolvedSpec
        The data's instrument spec and where it came from (:func:`training.v1_eval.data_instrument`).

    Raises
    ------
    agents.bundle.BundleError (or subclasses), market.errors.DataValidationError
        A bundle that fails its checks; candles that do not cover the period with its history.
    market.instruments.InstrumentSpecError
        A spec that does not fit the candles (:func:`market.instruments.check_spec_fits`).
    """
    bundle = load_bundle(Path(bundle_dir), device=device)
    check_spec_fits(instrument.spec, instrument.spec.symbol, candles["close"].to_numpy())
    span = bundle_span(bundle, candles, start, end)
    env_cfg, v1_cfg, tsmom = bundle.env_config, v1_config_of(bundle), tsmom_config_of(bundle)
    env_cfg = env_cfg.updated(costs=env_cfg.costs.with_instrument(instrument.spec))
    record = instrument_record(instrument, bundle_symbol(bundle))
    pooled = bundle.manifest.get("data", {}).get("symbols") or []
    if len(pooled) > 1 and instrument.spec.symbol in pooled:  # one of the symbols a pooled bundle was trained on
        record.update(trained_on="+".join(pooled), transfer=False)
    bar_s = float((span.features.index[1] - span.features.index[0]).total_seconds())
    results = span_backtests(bundle, span, env_cfg, v1_cfg, random_seed=random_seed, tsmom_cfg=tsmom)
    sensitivity = cost_sensitivity(
        results, lambda m: span_backtests(bundle, span, env_cfg, v1_cfg, cost_multiplier=m, strategies=COST_SENSITIVE,
                                          tsmom_cfg=tsmom), bar_s)
    times = span.open_times
    funding = "from the file's funding history" if "funding_rate" in candles.columns else "at the fallback rate (no history given)"
    notes = [
        (f"Bundle {bundle.path} (schema {bundle.manifest['observation']['schema_hash'][:12]}) evaluated on "
         f"{data_label}: bars opening {times[0]} to {times[-1]} ({len(times)} bars), bar interval {bar_s / 3600:g} h."),
        instrument_note(record),
        sample_note(bundle.manifest.get("data", {}), times[0], times[-1]),
        cost_note(env_cfg, funding),
        tsmom_note(tsmom, env_cfg),
        (f"Initial equity {env_cfg.initial_equity_usdt:,.0f} USDT; random policy seed {random_seed}; V1 and tsmom "
         "with the bundle's recorded configs."),
    ]
    regimes = pd.Series(span_regimes(bundle, span), index=times)
    return write_evaluation(out, title=f"ats evaluate: {Path(bundle_dir).name} on {times[0]:%Y-%m-%d}..{end:%Y-%m-%d}",
                            results=results, regimes=regimes, sensitivity=sensitivity, bar_s=bar_s, notes=notes, log=log,
                            provenance=provenance_record(bundle.manifest["config"],
                                                         bundle=bundle_identity(bundle.manifest)),
                            instrument=record)  # fmt: skip
