"""``ats evaluate``: trade the held-out test period once with PPO, V1, buy-and-hold and flat.

The PPO policy is the exported bundle (loaded the way serving loads it, weights without pickle).
The regime and signal outputs of the test period come from the bundle's models, which were
fitted on the training period only; nothing in the test period was used for fitting or selection.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from agents.baselines import BuyAndHoldPolicy, FlatPolicy
from agents.bundle import PolicyBundle, load_bundle
from agents.observation import model_outputs
from agents.policy import FrozenPPOPolicy
from envs.trading_env import EnvData
from fallback.v1 import V1Policy
from training import metrics as M
from training.backtest import BacktestResult, run_backtest
from training.config import RunConfig, load_config
from training.pipeline import Log, PreparedData, prepare_data, summarize_backtest
from training.report import write_report

STRATEGIES = ("ppo", "v1", "buy_and_hold", "flat")
COST_MULTIPLIERS = (0.0, 1.0, 2.0)


def test_period_backtests(
    cfg: RunConfig,
    bundle: PolicyBundle,
    prep: PreparedData,
    *,
    cost_multiplier: float = 1.0,
    strategies: tuple[str, ...] = STRATEGIES,
) -> dict[str, BacktestResult]:
    """Backtest ``strategies`` (PPO = the bundle, V1, buy-and-hold, flat) on the test period.

    All of them trade through the same env and costs; ``cost_multiplier`` scales fees and slippage
    (cost sensitivity: 0, 1, 2).
    """
    a, b = prep.test_row, prep.n_rows
    outputs = model_outputs(prep.features, bundle.models, start=a, end=b)
    market = pd.concat([prep.features.iloc[a:b], outputs], axis=1)
    if list(market.columns) != bundle.market_obs_names:
        raise ValueError("test observation columns differ from the bundle's schema")
    normed = pd.DataFrame(bundle.normalizer(market.to_numpy(np.float32)), index=market.index, columns=market.columns)
    data = EnvData.from_frames(prep.candles.iloc[a:b], normed, prep.atr[a:b])
    candles = prep.candles.iloc[:b]  # history before the test period is visible to V1 (closed candles)
    env_cfg = cfg.env.model_copy(update={"costs": cfg.env.costs.model_copy(update={"cost_multiplier": cost_multiplier})})
    factories = {
        "ppo": lambda: FrozenPPOPolicy(bundle),
        "v1": lambda: V1Policy(cfg.v1),
        "buy_and_hold": BuyAndHoldPolicy,
        "flat": FlatPolicy,
    }
    return {
        name: run_backtest(factories[name](), data, candles, env_cfg, offset=a, history_bars=cfg.v1.history_bars)
        for name in strategies
    }


def _sides(res: BacktestResult) -> pd.Series:
    """Position side held during each bar of a backtest, indexed by bar open time."""
    return pd.Series(res.position_side, index=res.equity.index[1:])


def test_period_regimes(bundle: PolicyBundle, prep: PreparedData) -> np.ndarray:
    """Most likely forward-filtered HMM state (0 calmest .. K-1 most volatile) at each test bar, int (n,)."""
    outputs = model_outputs(prep.features, bundle.models, start=prep.test_row, end=prep.n_rows)
    probs = outputs[[f"regime_p{k}" for k in range(bundle.models.n_states)]].to_numpy()
    return probs.argmax(axis=1)


def regime_slices(res: BacktestResult, regimes: np.ndarray, bar_s: float) -> dict[str, dict[str, float]]:
    """Return-based metrics of one backtest, broken down by the regime at decision time.

    The return of bar t+1 belongs to the regime of bar t (where the decision that produced it was
    taken). Per regime: ``n_bars``, ``share_of_bars``, compounded ``total_return`` over those bars,
    annualised ``sortino`` and ``sharpe`` of those bar returns, and ``exposure``.
    """
    eq = res.equity.to_numpy(np.float64)
    r = np.divide(eq[1:], eq[:-1], out=np.ones(len(eq) - 1), where=eq[:-1] > 0) - 1.0  # 0 after a ruin
    decided = regimes[: len(r)]
    p = M.bars_per_year(bar_s)
    out = {}
    for k in np.unique(regimes):
        mask = decided == k
        rk = r[mask]
        out[f"regime_{int(k)}"] = {
            "n_bars": float(mask.sum()),
            "share_of_bars": float(mask.mean()),
            "total_return": float(np.prod(1.0 + rk) - 1.0) if rk.size else float("nan"),
            "sortino": M.sortino_ratio(rk, p) if rk.size > 1 else float("nan"),
            "sharpe": M.sharpe_ratio(rk, p) if rk.size > 1 else float("nan"),
            "exposure": float((res.position_side[: len(r)][mask] != 0).mean()) if rk.size else float("nan"),
        }
    return out


def evaluate_run(run_dir: Path, *, log: Log = print, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Backtest the four strategies on the test period; write ``report/metrics.json`` and ``report/report.html``."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    bundle = load_bundle(run_dir / "bundle", device=device)
    prep = prepare_data(cfg, log)
    bar_s = prep.info["bar_interval_s"]
    results = test_period_backtests(cfg, bundle, prep)
    metrics: dict[str, dict[str, float]] = {}
    for name, res in results.items():
        metrics[name] = summarize_backtest(res, bar_s)
        log(f"test {name:>12}: return {metrics[name]['total_return']:+.2%}, Sortino {metrics[name]['sortino']:.2f}, "
            f"max DD {metrics[name]['max_drawdown']:.2%}, trades {metrics[name]['n_trades']:.0f}")
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({k: M.to_jsonable(v) for k, v in metrics.items()}, indent=1, allow_nan=False))
    costs = cfg.env.costs
    notes = [
        f"Symbol {cfg.data.symbol}, bar interval {bar_s / 3600:g} h; test period {prep.info['test'][0]} to "
        f"{prep.info['test'][1]} ({prep.info['test'][2]} bars), never used for fitting or selection.",
        f"Training {prep.info['train'][0]} to {prep.info['train'][1]}; validation (PPO checkpoint choice) "
        f"{prep.info['validation'][0]} to {prep.info['validation'][1]}.",
        f"Costs for every strategy: taker fee {costs.taker_fee_bps} bps per fill, slippage {costs.slippage_bps} bps + "
        f"{costs.slippage_atr_coef} x ATR%, 8-hourly funding from the exchange history "
        f"(fallback rate {costs.funding_fallback_rate} where missing), isolated-margin liquidation.",
        f"Initial equity {cfg.env.initial_equity_usdt:,.0f} USDT; decisions at bar close, fills at the next open; "
        "an open position at the end is marked to market.",
        f"Bundle: {bundle.path} (schema {bundle.manifest['observation']['schema_hash'][:12]}).",
    ]
    regimes = test_period_regimes(bundle, prep)
    slices = {name: regime_slices(res, regimes, bar_s) for name, res in results.items()}
    sensitivity = {}
    for mult in COST_MULTIPLIERS:
        runs = results if mult == 1.0 else test_period_backtests(cfg, bundle, prep, cost_multiplier=mult,
                                                                 strategies=("ppo", "v1"))
        for name in ("ppo", "v1"):
            m = summarize_backtest(runs[name], bar_s)
            sensitivity[f"{name} costs x{mult:g}"] = {k: m[k] for k in ("total_return", "sortino", "fees_paid",
                                                                          "slippage_paid", "n_trades")}
    (out / "regime_slices.json").write_text(json.dumps(M.to_jsonable(slices), indent=1, allow_nan=False))
    (out / "cost_sensitivity.json").write_text(json.dumps(M.to_jsonable(sensitivity), indent=1, allow_nan=False))
    extra = {"costs paid (USDT)": pd.DataFrame(
        {n: {"fees": r.fees_paid_usdt, "slippage": r.slippage_paid_usdt, "funding": r.funding_paid_usdt,
             "liquidation fees": r.liquidation_fees_usdt, "orders skipped (min notional)": r.n_skipped_min_notional}
         for n, r in results.items()}).round(2)}
    extra["cost sensitivity (fees and slippage x 0, 1, 2)"] = pd.DataFrame(sensitivity).round(4)
    for name, table in slices.items():
        extra[f"{name} by regime at decision time (0 = calmest)"] = pd.DataFrame(table).round(4)
    write_report(out, title=f"ats test-period report: {cfg.name}",
                 equity_curves={n: r.equity for n, r in results.items()}, metrics=metrics, notes=notes,
                 extra_tables=extra, positions={n: _sides(r) for n, r in results.items() if n != "flat"},
                 regimes=pd.Series(regimes, index=prep.features.index[prep.test_row :]))
    return metrics
