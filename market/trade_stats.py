"""Statistics of closed trades shared by the backtest reports and the live risk guard (one rule, one copy).

:func:`profit_factor` is the only profit factor of the project: ``training.metrics.profit_factor`` (reports,
walk-forward, V1 selection) and ``serving.risk`` (the slow kill switch) both call it, so a backtest and the
live guard judge the same trades the same way. :func:`exits_by_reason` groups closed trades by why they ended
(stop, take-profit, signal, liquidation, rebalance) for the reports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def profit_factor(pnls_usdt: Iterable[float]) -> float:
    """Gross profit / gross loss of closed trades' pnl.

    Gross profit is the sum of the positive pnl, gross loss the absolute sum of the negative ones;
    break-even trades (pnl exactly 0) count in neither.

    Convention for the cases where the ratio has no denominator:

    ========================================  =======  ===================================================
    trades                                    result   why
    ========================================  =======  ===================================================
    none                                      ``nan``  nothing to judge
    every pnl exactly 0                       ``nan``  0/0: no profit and no loss is neither good nor bad
    winners and no loser (zeros allowed)      ``inf``  profit without any loss
    losers and no winner (zeros allowed)      ``0.0``  0 / loss
    ========================================  =======  ===================================================

    A ``nan`` compares False with any threshold, so the slow kill switch (``pf < minimum``) does not fire
    on it, as it does not on ``inf``.

    Raises
    ------
    ValueError
        If a pnl is not finite.
    """
    pnl = np.asarray(
        list(pnls_usdt) if not isinstance(pnls_usdt, np.ndarray) else pnls_usdt, dtype=np.float64
    )
    if pnl.ndim != 1:
        pnl = pnl.reshape(-1)
    if not np.isfinite(pnl).all():
        raise ValueError(f"pnl must be finite, got {pnl[~np.isfinite(pnl)][0]!r}")
    gross_profit = float(pnl[pnl > 0].sum())
    gross_loss = float(-pnl[pnl < 0].sum())
    if gross_loss == 0.0:
        return math.inf if gross_profit > 0 else math.nan
    return gross_profit / gross_loss


#: Report names of the exit reasons the execution kernel emits (``envs.accounting.FILL_REASONS`` minus
#: ``entry``): a close asked for by the policy (a flip, or going flat) is a ``signal`` exit; ``rebalance`` is
#: the partial close of a resize (``TradingRulesConfig.rebalance_band_frac``).
EXIT_REASON_NAMES: dict[str, str] = {
    "exit_signal": "signal",
    "stop": "stop",
    "take_profit": "take_profit",
    "liquidation": "liquidation",
    "rebalance": "rebalance",
}


def exits_by_reason(
    reasons: Iterable[str], pnls_usdt: Iterable[float], bars_held: Iterable[float]
) -> dict[str, dict[str, float]]:
    """Closed trades grouped by why they ended.

    Parameters
    ----------
    reasons, pnls_usdt, bars_held
        One entry per closed trade: the kernel's exit reason (``exit_signal``, ``stop``, ``take_profit``,
        ``liquidation``; renamed by :data:`EXIT_REASON_NAMES`, any other reason kept as it is), the net PnL
        in USDT and the bars held.

    Returns
    -------
    dict
        ``{reason: {"count", "share", "mean_pnl_usdt", "total_pnl_usdt", "mean_bars_held"}}`` with a row for
        every reason of :data:`EXIT_REASON_NAMES` (count 0, the means ``nan``) and any other reason met;
        ``share`` is the count over all closed trades (``nan`` with none), so the counts sum to the number of
        trades and the shares to 1.

    Raises
    ------
    ValueError
        If the three sequences differ in length, or a pnl or a bars-held value is not finite.
    """
    names = [EXIT_REASON_NAMES.get(str(r), str(r)) for r in reasons]
    pnl = np.asarray(list(pnls_usdt), dtype=np.float64).reshape(-1)
    held = np.asarray(list(bars_held), dtype=np.float64).reshape(-1)
    if not len(names) == pnl.size == held.size:
        raise ValueError(f"reasons ({len(names)}), pnls ({pnl.size}) and bars held ({held.size}) differ in length")
    if not (np.isfinite(pnl).all() and np.isfinite(held).all()):
        raise ValueError("pnl and bars held must be finite")
    out: dict[str, dict[str, float]] = {}
    arr = np.asarray(names, dtype=object)
    for name in dict.fromkeys([*EXIT_REASON_NAMES.values(), *names]):
        mask = arr == name if arr.size else np.zeros(0, dtype=bool)
        k = int(mask.sum())
        out[name] = {
            "count": float(k),
            "share": float(k / arr.size) if arr.size else math.nan,
            "mean_pnl_usdt": float(pnl[mask].mean()) if k else math.nan,
            "total_pnl_usdt": float(pnl[mask].sum()),
            "mean_bars_held": float(held[mask].mean()) if k else math.nan,
        }
    return out
