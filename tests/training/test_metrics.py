"""Hand-computed checks of the evaluation metrics (arithmetic in the comments)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from market import json_codec
from training.metrics import (
    METRIC_DESCRIPTIONS,
    MetricInputError,
    TradeLike,
    annualized_return,
    avg_holding_bars,
    bars_per_year,
    block_bootstrap_ci,
    calmar_ratio,
    exposure,
    max_drawdown,
    max_drawdown_duration_bars,
    profit_factor,
    returns_from_equity,
    sharpe_ratio,
    sortino_ratio,
    summarize,
    to_jsonable,
    total_return,
    turnover_ratio,
    win_rate,
)


@dataclass(frozen=True)
class Trade:
    pnl_usdt: float
    bars_held: int


SUMMARY_KEYS = {
    "total_return",
    "annualized_return",
    "sortino",
    "sharpe",
    "calmar",
    "max_drawdown",
    "max_drawdown_duration_bars",
    "profit_factor",
    "win_rate",
    "turnover",
    "fees_paid",
    "funding_paid",
    "slippage_paid",
    "n_trades",
    "avg_holding_bars",
    "exposure",
}


# --- time and returns -------------------------------------------------------------------------------------


def test_bars_per_year_for_24_7_market():
    assert bars_per_year(3600) == 8760.0  # 365 * 86400 / 3600
    assert bars_per_year(900) == 35040.0  # 15m
    assert bars_per_year(86400) == 365.0


@pytest.mark.parametrize("bad", [0, -3600, math.nan, math.inf])
def test_bars_per_year_rejects_bad_interval(bad):
    with pytest.raises(MetricInputError, match="bar_interval_s"):
        bars_per_year(bad)


def test_returns_from_equity_simple_returns():
    # 110/100 - 1 = 0.1 ; 99/110 - 1 = -0.1
    np.testing.assert_allclose(returns_from_equity(np.array([100.0, 110.0, 99.0])), [0.1, -0.1])
    assert returns_from_equity(np.array([100.0])).shape == (0,)


@pytest.mark.parametrize(
    ("equity", "index"),
    [([100.0, 0.0, 50.0], 1), ([100.0, 90.0, -1.0], 2), ([100.0, 90.0, math.nan], 2), ([100.0, math.inf], 1)],
)
def test_returns_from_equity_names_bad_index(equity, index):
    with pytest.raises(MetricInputError, match=f"index {index}"):
        returns_from_equity(np.array(equity))


def test_returns_from_equity_rejects_2d_and_empty():
    with pytest.raises(MetricInputError, match="1-D"):
        returns_from_equity(np.ones((2, 2)))
    with pytest.raises(MetricInputError, match="empty"):
        returns_from_equity(np.array([]))


def test_total_and_annualized_return():
    # 99 / 100 - 1 = -0.01
    assert total_return(np.array([100.0, 110.0, 99.0])) == pytest.approx(-0.01)
    # 2 bars, 1 bar per year: growth 1.21 over 2 years -> 1.21 ** (1/2) - 1 = 0.1
    assert annualized_return(np.array([100.0, 110.0, 121.0]), 1.0) == pytest.approx(0.1)
    # 1 bar, 2 bars per year: 1.21 ** 2 - 1 = 0.4641
    assert annualized_return(np.array([100.0, 121.0]), 2.0) == pytest.approx(0.4641)
    # 1h bars: 8760 bars of +0.01 % each compound to exactly one year
    eq = 100.0 * 1.0001 ** np.arange(8761)
    assert annualized_return(eq, bars_per_year(3600)) == pytest.approx(1.0001**8760 - 1)
    assert math.isnan(annualized_return(np.array([100.0]), 8760.0))


def test_annualized_return_overflow_is_inf_and_ruin_is_minus_one():
    assert annualized_return(np.array([100.0, 1e6]), 8760.0) == math.inf
    assert annualized_return(np.array([100.0, 50.0, 0.0]), 8760.0) == -1.0


# --- risk-adjusted ratios ---------------------------------------------------------------------------------


def test_sharpe_hand_computed():
    r = np.array([0.01, -0.01, 0.02, 0.0])
    # mean = 0.02 / 4 = 0.005; deviations .005 -.015 .015 -.005; squares sum = 5e-4; var (ddof=1) = 5e-4 / 3
    expected = 0.005 / math.sqrt(5e-4 / 3) * math.sqrt(8760)
    assert sharpe_ratio(r, 8760.0) == pytest.approx(expected)
    # std = sqrt(1.6667e-4) = 0.012910; per bar 0.005 / 0.012910 = 0.3873; x sqrt(8760) = 93.59 -> 36.25
    assert expected == pytest.approx(36.25, abs=0.01)


def test_sharpe_degenerate_cases():
    assert sharpe_ratio(np.full(5, 0.01), 8760.0) == 0.0  # float-rounding std ~1e-18 counts as zero
    assert sharpe_ratio(np.zeros(10), 8760.0) == 0.0
    assert math.isnan(sharpe_ratio(np.array([0.01]), 8760.0))


def test_sortino_uses_all_bars_in_downside_deviation():
    r = np.array([0.02, -0.01, 0.03, -0.02])
    # mean = 0.02 / 4 = 0.005
    # all bars:    DD = sqrt((0 + 1e-4 + 0 + 4e-4) / 4) = sqrt(1.25e-4) = 0.0111803 -> 0.005 / DD = 1/sqrt(5)
    # losing only: DD = sqrt((1e-4 + 4e-4) / 2) = sqrt(2.5e-4) = 0.0158114 -> 0.3162 (must NOT be returned)
    assert sortino_ratio(r, 1.0) == pytest.approx(1 / math.sqrt(5))
    assert sortino_ratio(r, 1.0) != pytest.approx(0.005 / math.sqrt(2.5e-4))
    assert sortino_ratio(r, 8760.0) == pytest.approx(math.sqrt(8760) / math.sqrt(5))


def test_sortino_with_mar():
    r = np.array([0.03, 0.0, 0.02])
    # excess over MAR 0.01: [0.02, -0.01, 0.01]; mean = 0.02 / 3; DD = sqrt(1e-4 / 3)
    expected = (0.02 / 3) / math.sqrt(1e-4 / 3)
    assert sortino_ratio(r, 1.0, mar=0.01) == pytest.approx(expected)
    assert expected == pytest.approx(1.1547, abs=1e-4)


def test_sortino_degenerate_cases():
    assert sortino_ratio(np.array([0.01, 0.02]), 8760.0) == math.inf  # no downside, positive mean
    assert sortino_ratio(np.zeros(4), 8760.0) == 0.0  # no downside, zero mean
    assert math.isnan(sortino_ratio(np.array([]), 8760.0))
    with pytest.raises(MetricInputError, match="index 1"):
        sortino_ratio(np.array([0.01, math.nan]), 8760.0)


def test_drawdown_and_duration_on_hand_made_curve():
    eq = np.array([100.0, 120.0, 90.0, 110.0, 115.0, 130.0, 117.0, 125.0])
    # running peak:     100 120 120 120 120 130 130 130
    # drawdown:           0   0 .25 .083 .042  0  .10 .038  -> max 0.25 (120 -> 90)
    # underwater marks: idx 2,3,4 (run 3), idx 6,7 (run 2, still open at the end) -> 3
    assert max_drawdown(eq) == pytest.approx(0.25)
    assert max_drawdown_duration_bars(eq) == 3


def test_drawdown_edge_cases():
    assert max_drawdown(np.array([100.0, 101.0, 102.0])) == 0.0
    assert max_drawdown_duration_bars(np.array([100.0, 101.0, 102.0])) == 0
    # equal to the old peak counts as recovered: underwater only at idx 1
    assert max_drawdown_duration_bars(np.array([100.0, 90.0, 100.0, 100.0])) == 1
    # never recovers: idx 1..3 underwater
    assert max_drawdown_duration_bars(np.array([100.0, 90.0, 95.0, 99.0])) == 3
    assert max_drawdown(np.array([100.0, 50.0, 0.0])) == 1.0


def test_calmar():
    # 2 bars at 1 bar/year: ann = 1.21 ** 0.5 - 1 = 0.1; max drawdown 100 -> 80 = 0.2; Calmar = 0.5
    assert calmar_ratio(np.array([100.0, 80.0, 121.0]), 1.0) == pytest.approx(0.5)
    assert calmar_ratio(np.array([100.0, 110.0]), 1.0) == math.inf
    assert calmar_ratio(np.array([100.0, 100.0]), 1.0) == 0.0
    assert math.isnan(calmar_ratio(np.array([100.0]), 1.0))


# --- trades and activity ----------------------------------------------------------------------------------


def test_profit_factor_win_rate_holding():
    trades = [Trade(10.0, 1), Trade(-5.0, 2), Trade(20.0, 3), Trade(-10.0, 4), Trade(0.0, 5)]
    assert isinstance(trades[0], TradeLike)
    # gross profit 10 + 20 = 30; gross loss 5 + 10 = 15 -> 2.0
    assert profit_factor(trades) == pytest.approx(2.0)
    # wins: 10 and 20 (the 0 trade is not a win) -> 2 / 5
    assert win_rate(trades) == pytest.approx(0.4)
    # (1 + 2 + 3 + 4 + 5) / 5 = 3
    assert avg_holding_bars(trades) == pytest.approx(3.0)


def test_trade_metrics_degenerate_cases():
    assert profit_factor([Trade(5.0, 1)]) == math.inf
    assert profit_factor([Trade(-5.0, 1)]) == 0.0
    assert math.isnan(profit_factor([]))
    assert math.isnan(profit_factor([Trade(0.0, 1)]))
    assert math.isnan(win_rate([]))
    assert math.isnan(avg_holding_bars([]))


def test_trade_metrics_reject_bad_trades():
    with pytest.raises(MetricInputError, match=r"trades\[1\].pnl_usdt"):
        profit_factor([Trade(1.0, 1), Trade(math.nan, 1)])
    with pytest.raises(MetricInputError, match=r"trades\[0\].bars_held"):
        avg_holding_bars([Trade(1.0, -1)])
    with pytest.raises(MetricInputError, match=r"trades\[0\]"):
        win_rate([object()])


def test_exposure_and_turnover():
    assert exposure(np.array([0, 1, -1, 0])) == pytest.approx(0.5)  # 2 of 4 bars in a position
    assert math.isnan(exposure(np.array([])))
    assert turnover_ratio(5000.0, 1000.0) == pytest.approx(5.0)
    with pytest.raises(MetricInputError, match="turnover_usdt"):
        turnover_ratio(-1.0, 1000.0)
    with pytest.raises(MetricInputError, match="mean_equity"):
        turnover_ratio(1.0, 0.0)


# --- summary ----------------------------------------------------------------------------------------------


def _summary(**overrides):
    kwargs = {
        "bar_interval_s": 3600.0,
        "trades": [Trade(100.0, 1), Trade(-110.0, 1)],
        "fees_paid_usdt": 3.0,
        "funding_paid_usdt": -0.5,
        "slippage_paid_usdt": 1.0,
        "turnover_usdt": 4179.0,
        "position_side": np.array([1, -1, 0]),
    }
    kwargs.update(overrides)
    return summarize(np.array([1000.0, 1100.0, 990.0, 1089.0]), **kwargs)


def test_summarize_hand_computed():
    m = _summary()
    assert SUMMARY_KEYS <= set(m)
    assert set(m) <= set(METRIC_DESCRIPTIONS)
    assert all(isinstance(v, float) for v in m.values())
    assert m["total_return"] == pytest.approx(0.089)  # 1089 / 1000 - 1
    assert m["max_drawdown"] == pytest.approx(0.1)  # 1100 -> 990
    assert m["max_drawdown_duration_bars"] == 2.0  # 990, 1089 below 1100
    assert m["turnover"] == pytest.approx(4.0)  # 4179 / mean(1000, 1100, 990, 1089) = 4179 / 1044.75
    # returns: 0.1, -0.1, 0.1
    assert m["sharpe"] == pytest.approx(sharpe_ratio(np.array([0.1, -0.1, 0.1]), 8760.0))
    # Sortino: mean 0.1/3, DD = sqrt(0.01 / 3) -> (0.1/3) / sqrt(0.01/3) * sqrt(8760)
    assert m["sortino"] == pytest.approx((0.1 / 3) / math.sqrt(0.01 / 3) * math.sqrt(8760))
    assert m["profit_factor"] == pytest.approx(100 / 110)
    assert m["win_rate"] == 0.5
    assert m["n_trades"] == 2.0
    assert m["avg_holding_bars"] == 1.0
    assert m["exposure"] == pytest.approx(2 / 3)
    assert (m["fees_paid"], m["funding_paid"], m["slippage_paid"]) == (3.0, -0.5, 1.0)
    assert m["n_bars"] == 3.0


def test_summarize_validates_inputs():
    with pytest.raises(MetricInputError, match="position_side"):
        _summary(position_side=np.array([1, 0]))
    with pytest.raises(MetricInputError, match="fees_paid_usdt"):
        _summary(fees_paid_usdt=-1.0)
    with pytest.raises(MetricInputError, match="slippage_paid_usdt"):
        _summary(slippage_paid_usdt=math.nan)
    assert math.isnan(_summary(position_side=None)["exposure"])


def test_summarize_reports_a_wiped_out_account():
    m = summarize(
        np.array([100.0, 50.0, 0.0, 0.0]),
        bar_interval_s=3600.0,
        trades=[Trade(-100.0, 2)],
        fees_paid_usdt=0.0,
        funding_paid_usdt=0.0,
        slippage_paid_usdt=0.0,
        turnover_usdt=200.0,
    )
    # returns -0.5, -1.0, then 0.0 (nothing left at risk)
    assert m["total_return"] == -1.0
    assert m["max_drawdown"] == 1.0
    assert m["sortino"] == pytest.approx(sortino_ratio(np.array([-0.5, -1.0, 0.0]), 8760.0))
    with pytest.raises(MetricInputError, match="index 3"):
        summarize(
            np.array([100.0, 0.0, 0.0, 5.0]),
            bar_interval_s=3600.0,
            trades=[],
            fees_paid_usdt=0.0,
            funding_paid_usdt=0.0,
            slippage_paid_usdt=0.0,
            turnover_usdt=0.0,
        )


def test_to_jsonable_round_trip_with_allow_nan_false():
    m = _summary(trades=[], position_side=None)  # profit_factor, win_rate, exposure ... are nan
    m["sortino_test"] = math.inf
    m["worst"] = -math.inf
    m["np_value"] = np.float32(0.5)
    safe = to_jsonable({"ppo": m, "flat": {"n": np.int64(3)}})
    loaded = json.loads(json.dumps(safe, allow_nan=False))
    assert loaded["ppo"]["sortino_test"] == "Infinity"  # market.json_codec: the one convention
    assert loaded["ppo"]["worst"] == "-Infinity"
    assert loaded["ppo"]["profit_factor"] == "NaN"
    decoded = json_codec.loads(json.dumps(safe, allow_nan=False))
    assert decoded["ppo"]["sortino_test"] == math.inf and math.isnan(decoded["ppo"]["profit_factor"])
    assert loaded["ppo"]["np_value"] == 0.5
    assert loaded["ppo"]["total_return"] == pytest.approx(0.089)
    assert loaded["flat"]["n"] == 3
    with pytest.raises(MetricInputError, match="unsupported type"):
        to_jsonable({"x": object()})


# --- bootstrap --------------------------------------------------------------------------------------------


def _sortino_1h(r: np.ndarray) -> float:
    return sortino_ratio(r, bars_per_year(3600))


def test_bootstrap_ci_contains_point_estimate_and_is_deterministic():
    r = np.random.default_rng(7).normal(0.0005, 0.01, 4000)
    point = _sortino_1h(r)
    ci = block_bootstrap_ci(r, _sortino_1h, block_len=24, n_boot=300, alpha=0.05, seed=11)
    assert ci[0] < point < ci[1]
    assert ci == block_bootstrap_ci(r, _sortino_1h, block_len=24, n_boot=300, alpha=0.05, seed=11)
    assert ci != block_bootstrap_ci(r, _sortino_1h, block_len=24, n_boot=300, alpha=0.05, seed=12)


def test_bootstrap_ci_width_matches_theory_for_iid_mean():
    # iid N(0, 0.01), n = 4000: standard error of the mean 0.01 / sqrt(4000) = 1.58e-4,
    # so a 95 % interval is about 2 * 1.96 * 1.58e-4 = 6.2e-4 wide.
    r = np.random.default_rng(3).normal(0.0, 0.01, 4000)
    lo, hi = block_bootstrap_ci(r, np.mean, block_len=1, n_boot=400, alpha=0.05, seed=0)
    assert hi - lo == pytest.approx(2 * 1.96 * 0.01 / math.sqrt(4000), rel=0.2)


def test_bootstrap_blocks_keep_serial_dependence():
    # each draw repeated 20 times: the mean of 4000 values has the error of 200 draws, ~sqrt(20) wider
    r = np.repeat(np.random.default_rng(5).normal(0.0, 0.01, 200), 20)
    iid = block_bootstrap_ci(r, np.mean, block_len=1, n_boot=300, alpha=0.05, seed=0)
    blocks = block_bootstrap_ci(r, np.mean, block_len=100, n_boot=300, alpha=0.05, seed=0)
    assert (blocks[1] - blocks[0]) > 2.5 * (iid[1] - iid[0])


def test_bootstrap_handles_inf_statistic_and_rejects_bad_args():
    r = np.array([0.01, 0.02, 0.03, -0.01])
    lo, hi = block_bootstrap_ci(r, _sortino_1h, block_len=1, n_boot=200, alpha=0.1, seed=0)
    assert hi == math.inf and math.isfinite(lo)
    with pytest.raises(MetricInputError, match="block_len"):
        block_bootstrap_ci(r, np.mean, block_len=5, n_boot=10, alpha=0.05, seed=0)
    with pytest.raises(MetricInputError, match="n_boot"):
        block_bootstrap_ci(r, np.mean, block_len=1, n_boot=0, alpha=0.05, seed=0)
    with pytest.raises(MetricInputError, match="alpha"):
        block_bootstrap_ci(r, np.mean, block_len=1, n_boot=10, alpha=1.0, seed=0)
    with pytest.raises(MetricInputError, match="nan"):
        block_bootstrap_ci(r, lambda x: math.nan, block_len=1, n_boot=10, alpha=0.05, seed=0)


def test_avg_leverage_is_mean_notional_over_equity_while_a_position_is_open():
    from training.metrics import avg_leverage

    # bars: 2000/1000 = 2.0, flat (skipped), 1500/1000 = 1.5, 3000/1200 = 2.5 -> mean 2.0
    notional = np.array([2000.0, 0.0, 1500.0, -3000.0])
    equity = np.array([1000.0, 1000.0, 1000.0, 1200.0])
    assert avg_leverage(notional, equity) == pytest.approx(2.0)
    assert math.isnan(avg_leverage(np.zeros(3), np.ones(3)))
    with pytest.raises(MetricInputError, match="same length"):
        avg_leverage(np.ones(2), np.ones(3))
    with pytest.raises(MetricInputError, match="position_notional_usdt"):
        avg_leverage(np.array([1.0, np.nan]), np.ones(2))


def test_summarize_reports_avg_leverage_against_equity_at_each_bar_close():
    # equity at the three closes: 1100, 990, 1089; notionals 2200 and 990 -> (2.0 + 1.0) / 2 = 1.5
    m = _summary(position_notional_usdt=np.array([2200.0, 990.0, 0.0]))
    assert m["avg_leverage"] == pytest.approx(1.5)
    assert math.isnan(_summary()["avg_leverage"])
    with pytest.raises(MetricInputError, match="one entry per bar"):
        _summary(position_notional_usdt=np.array([1.0, 2.0]))
