"""market.trade_stats.profit_factor: the one profit factor and its edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

import serving.risk
import training.metrics
from market.trade_stats import profit_factor


def test_profit_factor_edge_cases() -> None:
    assert math.isnan(profit_factor([]))  # no trades
    assert math.isnan(profit_factor([0.0, 0.0]))  # all break-even: 0/0
    assert profit_factor([5.0]) == math.inf  # wins, no loss
    assert profit_factor([5.0, 0.0]) == math.inf
    assert profit_factor([-5.0, 0.0]) == 0.0  # losses, no win
    assert profit_factor([30.0, -10.0, -5.0, 0.0]) == pytest.approx(2.0)
    assert profit_factor(np.array([1.0, -4.0])) == pytest.approx(0.25)
    assert profit_factor(x for x in (2.0, -1.0)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="finite"):
        profit_factor([1.0, math.nan])


def test_reports_and_the_risk_guard_use_the_same_function() -> None:
    assert serving.risk.profit_factor is profit_factor

    class T:
        def __init__(self, pnl: float) -> None:
            self.pnl_usdt, self.bars_held = pnl, 1

    for pnls in ([], [0.0], [0.0, 0.0], [3.0], [3.0, 0.0], [-1.0], [2.0, -1.0, 0.0]):
        a, b = training.metrics.profit_factor([T(p) for p in pnls]), serving.risk.profit_factor(tuple(pnls))
        assert (math.isnan(a) and math.isnan(b)) or a == b, pnls
