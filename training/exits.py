"""Exits by reason: how each strategy's trades ended (stop, take-profit, signal, liquidation, rebalance, end of
period).

The execution kernel (``envs.kernel``) records why each trade closed: ``stop`` and ``take_profit`` (its
intrabar exits, stop first when a bar touches both), ``exit_signal`` (the policy asked for another side: a
flip or a close; reported as ``signal``), ``liquidation`` and ``rebalance`` (the partial close of a resize,
``TradingRulesConfig.rebalance_band_frac``). A position still open when a backtest ends is
marked to market, not closed; it is counted apart as ``end_of_period`` and never in the closed trades, so the
reasons' counts sum to ``n_trades``. With limit entries (``CostConfig.entry_order = "limit"``) the entries that
never happened, because the fill bar did not trade through the limit, are counted as ``missed_entries``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from market.trade_stats import exits_by_reason
from training.backtest import BacktestResult


def open_bars_at_end(res: BacktestResult) -> int | None:
    """Bars the position open at the end of ``res`` has been held (its trailing run of one non-zero side in
    ``position_side``), or None when the backtest ends flat."""
    side = np.asarray(res.position_side)
    if side.size == 0 or side[-1] == 0:
        return None
    change = np.flatnonzero(side != side[-1])
    return int(side.size - (change[-1] + 1 if change.size else 0))


def exit_summary(results: BacktestResult | Sequence[BacktestResult]) -> dict:
    """Exits by reason of one backtest, or of consecutive windows of one strategy (a walk-forward's folds,
    or one account per symbol), each window's open position counting as one ``end_of_period``.

    Returns
    -------
    dict
        ``n_closed_trades``; ``avg_holding_bars`` (mean bars held per closed trade, ``nan`` with none);
        ``by_reason`` (:func:`market.trade_stats.exits_by_reason`: count, share, mean and total net PnL in
        USDT, mean bars held per reason); ``end_of_period`` (``count`` of positions open at a window's end,
        marked to market, not closed; ``mean_bars_held`` so far, ``nan`` with none); ``missed_entries`` (limit
        entries not filled: :attr:`training.backtest.BacktestResult.n_missed_entries`, 0 with market entries).
    """
    runs = [results] if isinstance(results, BacktestResult) else list(results)
    trades = [t for r in runs for t in r.trades]
    held = [t.bars_held for t in trades]
    open_bars = [b for b in (open_bars_at_end(r) for r in runs) if b is not None]
    return {
        "n_closed_trades": float(len(trades)),
        "avg_holding_bars": float(np.mean(held)) if held else math.nan,
        "by_reason": exits_by_reason([t.exit_reason for t in trades], [t.pnl_usdt for t in trades], held),
        "end_of_period": {
            "count": float(len(open_bars)),
            "mean_bars_held": float(np.mean(open_bars)) if open_bars else math.nan,
        },
        "missed_entries": float(sum(r.n_missed_entries for r in runs)),
    }


def _cell(count: float, share: float, mean_pnl: float, bars: float) -> str:
    if count == 0:
        return "0"
    head = f"{count:.0f}" + (f" ({share:.0%})" if math.isfinite(share) else "")
    pnl = f", mean {mean_pnl:+,.2f} USDT" if math.isfinite(mean_pnl) else ""
    held = f", {bars:.1f} bars" if math.isfinite(bars) else ""
    return head + pnl + held


def exits_table(summaries: Mapping[str, dict]) -> pd.DataFrame:
    """The report's table: a row per exit reason, a column per strategy, each cell "count (share), mean net PnL
    per trade (USDT), mean bars held"; ``end_of_period`` counts positions open at the end (marked, not closed,
    no share or PnL) and ``all closed`` is the strategy's total (``n_trades``, mean PnL, average holding bars);
    a ``missed entries (limit not filled)`` row is added when a strategy has any (limit entries)."""
    cols = {}
    for name, s in summaries.items():
        col = {
            r: _cell(v["count"], v["share"], v["mean_pnl_usdt"], v["mean_bars_held"])
            for r, v in s["by_reason"].items()
        }
        eop = s["end_of_period"]
        col["end_of_period (open, marked)"] = _cell(eop["count"], math.nan, math.nan, eop["mean_bars_held"])
        n = s["n_closed_trades"]
        total = sum(v["total_pnl_usdt"] for v in s["by_reason"].values())
        col["all closed"] = _cell(n, 1.0, total / n if n else math.nan, s["avg_holding_bars"])
        if any(v.get("missed_entries", 0.0) for v in summaries.values()):
            col["missed entries (limit not filled)"] = f"{s.get('missed_entries', 0.0):.0f}"
        cols[name] = col
    frame = pd.DataFrame(cols)
    frame.index.name = "exit"
    return frame


EXITS_TITLE = (
    "exits by reason (stop, take_profit, signal, liquidation, rebalance; end_of_period = open at the end, "
    "marked to market)"
)
