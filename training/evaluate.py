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


def test_period_backtests(cfg: RunConfig, bundle: PolicyBundle, prep: PreparedData) -> dict[str, BacktestResult]:
    """Backtest PPO (the bundle), V1, buy-and-hold and flat on the test period under the same costs."""
    a, b = prep.test_row, prep.n_rows
    outputs = model_outputs(prep.features, bundle.models, start=a, end=b)
    market = pd.concat([prep.features.iloc[a:b], outputs], axis=1)
    if list(market.columns) != bundle.market_obs_names:
        raise ValueError("test observation columns differ from the bundle's schema")
    normed = pd.DataFrame(bundle.normalizer(market.to_numpy(np.float32)), index=market.index, columns=market.columns)
    data = EnvData.from_frames(prep.candles.iloc[a:b], normed, prep.atr[a:b])
    candles = prep.candles.iloc[:b]  # history before the test period is visible to V1 (closed candles)
    policies = {
        "ppo": FrozenPPOPolicy(bundle),
        "v1": V1Policy(cfg.v1),
        "buy_and_hold": BuyAndHoldPolicy(),
        "flat": FlatPolicy(),
    }
    return {
        name: run_backtest(policy, data, candles, cfg.env, offset=a, history_bars=cfg.v1.history_bars)
        for name, policy in policies.items()
    }


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
    extra = {"costs paid (USDT)": pd.DataFrame(
        {n: {"fees": r.fees_paid_usdt, "slippage": r.slippage_paid_usdt, "funding": r.funding_paid_usdt,
             "liquidation fees": r.liquidation_fees_usdt, "orders skipped (min notional)": r.n_skipped_min_notional}
         for n, r in results.items()})}
    write_report(out, title=f"ats test-period report: {cfg.name}",
                 equity_curves={n: r.equity for n, r in results.items()}, metrics=metrics, notes=notes,
                 extra_tables=extra)
    return metrics
