"""Statistics of closed trades shared by the backtest reports and the live risk guard (one rule, one copy).

:func:`profit_factor` is the only profit factor of the project: ``training.metrics.profit_factor`` (reports,
walk-forward, V1 selection) and ``serving.risk`` (the slow kill switch) both call it, so a backtest and the
live guard judge the same trades the same way.
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
