"""The statistics of :mod:`training.metrics`: input checks, returns, risk ratios, drawdowns and the trade and
position statistics of one backtest; small pure functions, numpy arrays in, floats out.

Inputs, conventions for undefined values and errors are those of :mod:`training.metrics` (its docstring), which
re-exports every public name here and builds the summary, the JSON form and the bootstrap on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from market import trade_stats as _trade_stats

SECONDS_PER_YEAR: float = 365.0 * 86_400.0
"""Seconds in a (365-day) year; crypto markets trade 24/7."""

MIN_DISPERSION: float = 1e-12
"""Per-bar standard / downside deviation at or below which a return series counts as having none.

Float rounding makes the standard deviation of a constant series ~1e-18 rather than 0; without a
floor the Sharpe ratio of such a series would be an arbitrary huge number.
"""


class MetricInputError(ValueError):
    """Input to a metric is malformed (shape, non-finite or out-of-range value); a data-quality error."""


@runtime_checkable
class TradeLike(Protocol):
    """A closed trade as seen by the metrics: net PnL in USDT and holding time in bars."""

    @property
    def pnl_usdt(self) -> float:
        """Net PnL of the trade in USDT (after its fees, slippage and funding)."""
        ...

    @property
    def bars_held(self) -> int:
        """Number of bars the position was open (>= 0)."""
        ...


# ---------------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------------


def _as_1d_float(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise MetricInputError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_finite(arr: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        i = _first_bad(bad)
        raise MetricInputError(
            f"{name} has {int(bad.sum())} non-finite value(s); first at index {i}: {arr[i]!r}"
        )


def _check_equity(equity: Any, *, allow_zero: bool = False) -> np.ndarray:
    arr = _as_1d_float(equity, "equity")
    if arr.size == 0:
        raise MetricInputError("equity is empty; it needs at least the initial equity")
    _check_finite(arr, "equity")
    bad = arr < 0 if allow_zero else arr <= 0
    if arr[0] <= 0:
        raise MetricInputError(f"equity must start positive, got equity[0] = {arr[0]!r}")
    if bad.any():
        i = _first_bad(bad)
        rule = "negative" if allow_zero else "non-positive"
        raise MetricInputError(f"equity has a {rule} value at index {i}: {arr[i]!r}")
    return arr


def _check_periods(periods_per_year: float) -> float:
    p = float(periods_per_year)
    if not math.isfinite(p) or p <= 0:
        raise MetricInputError(f"periods_per_year must be finite and > 0, got {periods_per_year!r}")
    return p


def _check_scalar(value: float, name: str, *, non_negative: bool) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise MetricInputError(f"{name} must be finite, got {value!r}")
    if non_negative and v < 0:
        raise MetricInputError(f"{name} must be >= 0, got {value!r}")
    return v


def _trade_arrays(trades: Sequence[TradeLike]) -> tuple[np.ndarray, np.ndarray]:
    pnl = np.empty(len(trades), dtype=np.float64)
    held = np.empty(len(trades), dtype=np.float64)
    for i, trade in enumerate(trades):
        try:
            pnl[i] = float(trade.pnl_usdt)
            held[i] = float(trade.bars_held)
        except AttributeError as exc:
            raise MetricInputError(
                f"trades[{i}] ({type(trade).__name__}) lacks pnl_usdt or bars_held"
            ) from exc
        if not math.isfinite(pnl[i]):
            raise MetricInputError(f"trades[{i}].pnl_usdt is not finite: {trade.pnl_usdt!r}")
        if not math.isfinite(held[i]) or held[i] < 0:
            raise MetricInputError(f"trades[{i}].bars_held must be a finite count >= 0: {trade.bars_held!r}")
    return pnl, held


# ---------------------------------------------------------------------------------------------------------
# Time and returns
# ---------------------------------------------------------------------------------------------------------


def bars_per_year(bar_interval_s: float) -> float:
    """Return the number of bars in a year of a 24/7 market.

    Parameters
    ----------
    bar_interval_s : float
        Bar length in seconds (3600 for 1h bars), > 0.

    Returns
    -------
    float
        ``365 * 86400 / bar_interval_s`` (8760.0 for 1h, 35040.0 for 15m).

    Raises
    ------
    MetricInputError
        If ``bar_interval_s`` is not finite or not > 0.
    """
    s = float(bar_interval_s)
    if not math.isfinite(s) or s <= 0:
        raise MetricInputError(f"bar_interval_s must be finite and > 0, got {bar_interval_s!r}")
    return SECONDS_PER_YEAR / s


def returns_from_equity(equity: np.ndarray) -> np.ndarray:
    """Return per-bar simple returns of an equity curve.

    Parameters
    ----------
    equity : array_like of float, shape (T+1,)
        Equity in USDT marked at each bar close, starting with the initial equity.

    Returns
    -------
    numpy.ndarray of float64, shape (T,)
        ``equity[1:] / equity[:-1] - 1`` (empty when T = 0).

    Raises
    ------
    MetricInputError
        If ``equity`` is not 1-D, is empty, or holds a non-finite or non-positive value (the message
        names the first offending index).
    """
    eq = _check_equity(equity)
    return eq[1:] / eq[:-1] - 1.0


def total_return(equity: np.ndarray) -> float:
    """Return the total simple return ``equity[-1] / equity[0] - 1`` of an equity curve.

    Parameters
    ----------
    equity : array_like of float, shape (T+1,)
        Equity in USDT, finite, starting positive; zero marks (a wiped-out account) are allowed.

    Returns
    -------
    float
        Total return as a fraction (0.1 = +10 %); 0.0 for a single mark.

    Raises
    ------
    MetricInputError
        If ``equity`` is empty, not 1-D, non-finite, negative, or does not start positive.
    """
    eq = _check_equity(equity, allow_zero=True)
    return float(eq[-1] / eq[0] - 1.0)


def annualized_return(equity: np.ndarray, periods_per_year: float) -> float:
    """Return the geometric annualised return (compound annual growth rate) of an equity curve.

    ``(equity[-1] / equity[0]) ** (periods_per_year / T) - 1`` with T = ``len(equity) - 1`` bars.

    Parameters
    ----------
    equity : array_like of float, shape (T+1,)
        Equity in USDT, finite, starting positive; zero marks are allowed (annualised return -1).
    periods_per_year : float
        Bars per year, see :func:`bars_per_year`.

    Returns
    -------
    float
        Annualised return as a fraction; ``nan`` when T = 0; ``inf`` when the extrapolation overflows
        (a large gain over a very short period).

    Raises
    ------
    MetricInputError
        On malformed ``equity`` or non-positive ``periods_per_year``.
    """
    eq = _check_equity(equity, allow_zero=True)
    p = _check_periods(periods_per_year)
    n_bars = eq.size - 1
    if n_bars == 0:
        return math.nan
    growth = np.float64(eq[-1] / eq[0])
    with np.errstate(over="ignore"):
        return float(np.power(growth, p / n_bars) - 1.0)


# ---------------------------------------------------------------------------------------------------------
# Risk-adjusted ratios
# ---------------------------------------------------------------------------------------------------------


def sharpe_ratio(returns: np.ndarray, periods_per_year: float) -> float:
    """Return the annualised Sharpe ratio of per-bar returns (risk-free rate 0).

    ``mean(r) / std(r, ddof=1) * sqrt(periods_per_year)`` (Sharpe 1994, "The Sharpe Ratio",
    J. Portfolio Management 21(1), with a zero benchmark).

    Parameters
    ----------
    returns : array_like of float, shape (T,)
        Per-bar simple net returns.
    periods_per_year : float
        Bars per year, see :func:`bars_per_year`.

    Returns
    -------
    float
        Annualised Sharpe ratio; ``nan`` when T < 2 (sample standard deviation undefined); ``0.0``
        when the standard deviation is at most :data:`MIN_DISPERSION` (a constant series, e.g. a
        strategy that never trades).

    Raises
    ------
    MetricInputError
        If ``returns`` is not 1-D or holds a non-finite value, or ``periods_per_year`` is not > 0.
    """
    r = _as_1d_float(returns, "returns")
    _check_finite(r, "returns")
    p = _check_periods(periods_per_year)
    if r.size < 2:
        return math.nan
    std = float(np.std(r, ddof=1))
    if std <= MIN_DISPERSION:
        return 0.0
    return float(np.mean(r)) / std * math.sqrt(p)


def sortino_ratio(returns: np.ndarray, periods_per_year: float, mar: float = 0.0) -> float:
    """Return the annualised Sortino ratio of per-bar returns.

    ``(mean(r) - MAR) / DD * sqrt(periods_per_year)`` with the downside deviation
    ``DD = sqrt(mean(min(0, r - MAR) ** 2))`` averaged over **all** T bars, not only the losing ones
    (Sortino & Price 1994, "Performance measurement in a downside risk framework", J. Investing 3(3)).

    Parameters
    ----------
    returns : array_like of float, shape (T,)
        Per-bar simple net returns.
    periods_per_year : float
        Bars per year, see :func:`bars_per_year`.
    mar : float, default 0.0
        Minimum acceptable return per bar (same units as ``returns``).

    Returns
    -------
    float
        Annualised Sortino ratio; ``nan`` when T = 0. When ``DD`` is at most :data:`MIN_DISPERSION`
        (no bar below the MAR): ``inf`` if ``mean(r) - MAR > 0``, else ``0.0``.

    Raises
    ------
    MetricInputError
        If ``returns`` is not 1-D or holds a non-finite value, ``mar`` is not finite, or
        ``periods_per_year`` is not > 0.
    """
    r = _as_1d_float(returns, "returns")
    _check_finite(r, "returns")
    p = _check_periods(periods_per_year)
    m = _check_scalar(mar, "mar", non_negative=False)
    if r.size == 0:
        return math.nan
    excess = r - m
    mean_excess = float(np.mean(excess))
    downside = float(np.sqrt(np.mean(np.minimum(excess, 0.0) ** 2)))
    if downside <= MIN_DISPERSION:
        return math.inf if mean_excess > 0 else 0.0
    return mean_excess / downside * math.sqrt(p)


def max_drawdown(equity: np.ndarray) -> float:
    """Return the maximum drawdown ``max_t (1 - equity[t] / max_{s<=t} equity[s])``.

    Parameters
    ----------
    equity : array_like of float, shape (T+1,)
        Equity in USDT, finite, starting positive; zero marks allowed (drawdown 1.0).

    Returns
    -------
    float
        Largest peak-to-trough fall as a fraction of the peak, in [0, 1] (0.25 = -25 %).

    Raises
    ------
    MetricInputError
        If ``equity`` is empty, not 1-D, non-finite, negative, or does not start positive.
    """
    eq = _check_equity(equity, allow_zero=True)
    peak = np.maximum.accumulate(eq)
    return float(np.max(1.0 - eq / peak))


def max_drawdown_duration_bars(equity: np.ndarray) -> int:
    """Return the longest run of consecutive marks strictly below the running equity peak.

    A mark equal to the previous peak counts as recovered. A drawdown still open at the end of the
    series counts up to the last mark. Example: ``[100, 90, 95, 100, 80]`` -> runs ``[90, 95]`` (2)
    and ``[80]`` (1) -> 2.

    Parameters
    ----------
    equity : array_like of float, shape (T+1,)
        Equity in USDT, finite, starting positive; zero marks allowed.

    Returns
    -------
    int
        Duration in bars, >= 0.

    Raises
    ------
    MetricInputError
        If ``equity`` is empty, not 1-D, non-finite, negative, or does not start positive.
    """
    eq = _check_equity(equity, allow_zero=True)
    underwater = eq < np.maximum.accumulate(eq)
    longest = run = 0
    for flag in underwater:
        run = run + 1 if flag else 0
        longest = max(longest, run)
    return longest


def calmar_ratio(equity: np.ndarray, periods_per_year: float) -> float:
    """Return the Calmar ratio: annualised return / maximum drawdown, both over the whole curve.

    Young (1991, "Calmar Ratio: A Smoother Tool", Futures 20(1)) used the last 36 months; here the
    window is the whole evaluated period.

    Parameters
    ----------
    equity : array_like of float, shape (T+1,)
        Equity in USDT.
    periods_per_year : float
        Bars per year, see :func:`bars_per_year`.

    Returns
    -------
    float
        ``annualized_return / max_drawdown``; ``nan`` when T = 0; when the maximum drawdown is 0:
        ``inf`` if the annualised return is > 0, else ``0.0``.

    Raises
    ------
    MetricInputError
        On malformed ``equity`` or non-positive ``periods_per_year``.
    """
    ann = annualized_return(equity, periods_per_year)
    if math.isnan(ann):
        return math.nan
    mdd = max_drawdown(equity)
    if mdd <= 0.0:
        return math.inf if ann > 0 else 0.0
    return ann / mdd


# ---------------------------------------------------------------------------------------------------------
# Trades and activity
# ---------------------------------------------------------------------------------------------------------


def profit_factor(trades: Sequence[TradeLike]) -> float:
    """Return the profit factor: gross profit / gross loss of closed trades.

    Gross profit is the sum of positive ``pnl_usdt``, gross loss the absolute sum of negative ones.

    Parameters
    ----------
    trades : sequence of TradeLike
        Closed trades.

    Returns
    -------
    float
        Profit factor >= 0; ``nan`` with no trades or when every trade has pnl 0 (0/0); ``inf`` when
        there are winning trades and no losing trade; ``0.0`` with losing trades only. The one rule:
        :func:`market.trade_stats.profit_factor` (the live risk guard uses it too).

    Raises
    ------
    MetricInputError
        If a trade lacks the attributes or has a non-finite pnl or a negative ``bars_held``.
    """
    pnl, _ = _trade_arrays(trades)
    return _trade_stats.profit_factor(pnl)


def win_rate(trades: Sequence[TradeLike]) -> float:
    """Return the share of closed trades with ``pnl_usdt > 0`` (break-even trades are not wins).

    Parameters
    ----------
    trades : sequence of TradeLike
        Closed trades.

    Returns
    -------
    float
        Fraction in [0, 1]; ``nan`` with no trades.

    Raises
    ------
    MetricInputError
        If a trade is malformed (see :func:`profit_factor`).
    """
    pnl, _ = _trade_arrays(trades)
    if pnl.size == 0:
        return math.nan
    return float(np.mean(pnl > 0))


def avg_holding_bars(trades: Sequence[TradeLike]) -> float:
    """Return the mean ``bars_held`` of closed trades.

    Parameters
    ----------
    trades : sequence of TradeLike
        Closed trades.

    Returns
    -------
    float
        Mean holding time in bars; ``nan`` with no trades.

    Raises
    ------
    MetricInputError
        If a trade is malformed (see :func:`profit_factor`).
    """
    _, held = _trade_arrays(trades)
    if held.size == 0:
        return math.nan
    return float(np.mean(held))


def exposure(position_side: np.ndarray) -> float:
    """Return the fraction of bars with an open position.

    Parameters
    ----------
    position_side : array_like, shape (T,)
        Side of the position held during each bar: -1 short, 0 flat, +1 long (any non-zero value
        counts as a position, so signed sizes work too).

    Returns
    -------
    float
        Fraction in [0, 1]; ``nan`` when T = 0.

    Raises
    ------
    MetricInputError
        If ``position_side`` is not 1-D or holds a non-finite value.
    """
    side = _as_1d_float(position_side, "position_side")
    _check_finite(side, "position_side")
    if side.size == 0:
        return math.nan
    return float(np.mean(side != 0))


def avg_leverage(position_notional_usdt: np.ndarray, equity_at_close: np.ndarray) -> float:
    """Return the mean effective leverage over the bars that hold a position.

    Effective (account) leverage at a bar close is ``|position notional| / equity``, the ratio
    exchanges and risk reports quote; it differs from the leverage chosen at entry once prices move
    or when only part of the equity is committed as margin.

    Parameters
    ----------
    position_notional_usdt : array_like, shape (T,)
        Notional of the position held at each bar close, USDT (sign ignored; 0 when flat).
    equity_at_close : array_like, shape (T,)
        Marked-to-market equity at the same bar closes, USDT, >= 0.

    Returns
    -------
    float
        Mean of ``|notional| / equity`` over bars with a non-zero notional and positive equity;
        ``nan`` when there is no such bar.

    Raises
    ------
    MetricInputError
        If the arrays are not 1-D, differ in length, or hold a non-finite value.
    """
    notional = _as_1d_float(position_notional_usdt, "position_notional_usdt")
    eq = _as_1d_float(equity_at_close, "equity_at_close")
    _check_finite(notional, "position_notional_usdt")
    _check_finite(eq, "equity_at_close")
    if notional.size != eq.size:
        raise MetricInputError(
            f"position_notional_usdt ({notional.size}) and equity_at_close ({eq.size}) must have the same length"
        )
    held = (notional != 0) & (eq > 0)
    if not held.any():
        return math.nan
    return float(np.mean(np.abs(notional[held]) / eq[held]))


def turnover_ratio(turnover_usdt: float, mean_equity: float) -> float:
    """Return turnover as traded notional divided by mean equity.

    Parameters
    ----------
    turnover_usdt : float
        Cumulative traded notional in USDT (entries and exits, both counted), >= 0.
    mean_equity : float
        Mean equity over the period in USDT, > 0.

    Returns
    -------
    float
        ``turnover_usdt / mean_equity`` (2.0 = twice the average equity was traded).

    Raises
    ------
    MetricInputError
        If ``turnover_usdt`` is negative or non-finite, or ``mean_equity`` is not finite and > 0.
    """
    t = _check_scalar(turnover_usdt, "turnover_usdt", non_negative=True)
    m = _check_scalar(mean_equity, "mean_equity", non_negative=True)
    if m <= 0:
        raise MetricInputError(f"mean_equity must be > 0, got {mean_equity!r}")
    return t / m
