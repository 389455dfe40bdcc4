"""The equal-weight portfolio line of a pooled multi-symbol run.

Definition: N accounts, one per symbol, each starting with the run's initial equity and traded on its own
(the backtests of :mod:`training.evaluate`, each symbol under its own instrument spec); the portfolio is their
average, i.e. the initial equity split equally across the symbols and never rebalanced. Its equity at each
bar is the mean of the N equity curves, and its costs are the means of the N accounts' costs; its trades are
all the accounts' trades (``n_trades`` counts them all; win rate and profit factor are unchanged by the
1/N scale), its ``exposure`` is the fraction of bars with a position open in any account and ``avg_leverage``
the mean notional over the mean equity while a position is open.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from training import metrics as M
from training.backtest import BacktestResult

PORTFOLIO_DEFINITION = (
    "equal weight: one account per symbol, each starting at the initial equity and trading under its own "
    "instrument spec; the portfolio equity is their mean (the initial equity split equally, never rebalanced), "
    "costs are the accounts' mean, n_trades counts every account's trades"
)


def equal_weight(results: Mapping[str, BacktestResult], name: str | None = None) -> BacktestResult:
    """The equal-weight portfolio of one strategy's per-symbol backtests (see the module docstring).

    Raises
    ------
    ValueError
        If ``results`` is empty or the backtests do not cover the same bars (same equity index).
    """
    if not results:
        raise ValueError("equal_weight needs at least one symbol's backtest")
    items = list(results.values())
    index = items[0].equity.index
    for sym, res in results.items():
        if not res.equity.index.equals(index):
            raise ValueError(f"equal_weight: {sym}'s backtest covers other bars than {next(iter(results))}'s")
    n = len(items)
    equity = pd.Series(np.mean([r.equity.to_numpy(np.float64) for r in items], axis=0), index=index,
                       name=name or items[0].name)
    sides = np.stack([r.position_side for r in items])
    notional = None
    notionals = [r.position_notional_usdt for r in items if r.position_notional_usdt is not None]
    if len(notionals) == len(items):
        notional = np.mean(notionals, axis=0)
    return BacktestResult(
        name=name or items[0].name,
        equity=equity,
        position_side=np.any(sides != 0, axis=0).astype(np.int8),
        trades=tuple(t for r in items for t in r.trades),
        fees_paid_usdt=sum(r.fees_paid_usdt for r in items) / n,
        funding_paid_usdt=sum(r.funding_paid_usdt for r in items) / n,
        slippage_paid_usdt=sum(r.slippage_paid_usdt for r in items) / n,
        liquidation_fees_usdt=sum(r.liquidation_fees_usdt for r in items) / n,
        turnover_usdt=sum(r.turnover_usdt for r in items) / n,
        n_skipped_min_notional=sum(r.n_skipped_min_notional for r in items),
        terminated=any(r.terminated for r in items),
        position_notional_usdt=notional,
        n_missed_entries=sum(r.n_missed_entries for r in items),
    )


def portfolio_metrics(results: Mapping[str, BacktestResult], bar_interval_s: float) -> dict[str, float]:
    """Metrics (:func:`training.metrics.summarize`) of the :func:`equal_weight` portfolio."""
    port = equal_weight(results)
    return M.summarize(
        port.equity.to_numpy(np.float64), bar_interval_s=bar_interval_s, trades=port.trades,
        fees_paid_usdt=port.fees_paid_usdt, funding_paid_usdt=port.funding_paid_usdt,
        slippage_paid_usdt=port.slippage_paid_usdt, turnover_usdt=port.turnover_usdt,
        position_side=port.position_side, position_notional_usdt=port.position_notional_usdt,
    )  # fmt: skip
