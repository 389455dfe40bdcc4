"""Evaluation statistics of a backtest: small pure functions, numpy arrays in, floats out.

Inputs are the per-bar series a backtest produces:

* ``equity`` : float array, shape (T+1,), USDT, account equity marked to market at each bar close,
  starting with the initial equity (so ``equity[t+1]`` is the mark after bar t);
* ``returns`` : float array, shape (T,), per-bar simple net returns (after fees, slippage, funding),
  ``returns[t] = equity[t+1] / equity[t] - 1``;
* ``trades`` : sequence of closed trades, any objects with ``pnl_usdt`` (float, net PnL in USDT) and
  ``bars_held`` (int) attributes (see :class:`TradeLike`, e.g. ``envs.accounting.ClosedTrade``).

Conventions for undefined or unbounded values (all documented per function):

* a statistic with no data (no bars, no trades) is ``nan``;
* a ratio whose risk denominator is zero is ``inf`` when the reward is positive and ``0.0`` otherwise
  (Sortino, Calmar); the Sharpe ratio of a zero-dispersion series is ``0.0``; the profit factor follows
  :func:`market.trade_stats.profit_factor` (``inf`` without losses, ``0.0`` without wins, ``nan`` for 0/0);
* :func:`to_jsonable` writes ``nan``/``inf``/``-inf`` as the strings ``"NaN"``/``"Infinity"``/``"-Infinity"``
  (:mod:`market.json_codec`).

Bad input (wrong shape, non-finite or non-positive equity, negative costs) raises
:class:`MetricInputError` naming the argument and, for arrays, the first offending index.

Crypto perpetuals trade 24/7, so a year has ``365 * 86400 / bar_interval_s`` bars (8,760 for 1h,
35,040 for 15m), see :func:`bars_per_year`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from market import json_codec as _json_codec
from market import trade_stats as _trade_stats

__all__ = [
    "METRIC_DESCRIPTIONS",
    "MIN_DISPERSION",
    "MetricInputError",
    "TradeLike",
    "annualized_return",
    "avg_holding_bars",
    "avg_leverage",
    "bars_per_year",
    "block_bootstrap_ci",
    "calmar_ratio",
    "exposure",
    "max_drawdown",
    "max_drawdown_duration_bars",
    "profit_factor",
    "returns_from_equity",
    "sharpe_ratio",
    "sortino_ratio",
    "summarize",
    "to_jsonable",
    "total_return",
    "turnover_ratio",
    "win_rate",
]

SECONDS_PER_YEAR: float = 365.0 * 86_400.0
"""Seconds in a (365-day) year; crypto markets trade 24/7."""

MIN_DISPERSION: float = 1e-12
"""Per-bar standard / downside deviation at or below which a return series counts as having none.

Float rounding makes the standard deviation of a constant series ~1e-18 rather than 0; without a
floor the Sharpe ratio of such a series would be an arbitrary huge number.
"""

METRIC_DESCRIPTIONS: dict[str, str] = {
    "total_return": "final equity / initial equity - 1",
    "annualized_return": "geometric: (final / initial) ** (bars per year / bars) - 1",
    "sortino": "annualised Sortino ratio, MAR 0, downside deviation over all bars (Sortino & Price 1994)",
    "sharpe": "annualised Sharpe ratio of per-bar returns (mean / std, ddof=1, x sqrt(bars per year))",
    "calmar": "annualised return / max drawdown (whole period)",
    "max_drawdown": "largest peak-to-trough fall of equity, fraction of the peak",
    "max_drawdown_duration_bars": "longest run of consecutive bar closes below the running equity peak",
    "profit_factor": "gross profit / gross loss over closed trades",
    "win_rate": "share of closed trades with pnl > 0",
    "turnover": "traded notional / mean equity",
    "fees_paid": "fees paid, USDT",
    "funding_paid": "funding paid, USDT (negative: received)",
    "slippage_paid": "slippage cost, USDT",
    "n_trades": "number of closed trades",
    "avg_holding_bars": "mean bars held per closed trade",
    "exposure": "share of bars with an open position",
    "avg_leverage": "mean effective leverage while a position is open: |position notional| / equity at each bar close",
    "n_bars": "number of bars evaluated",
}
"""One-line definition of each key returned by :func:`summarize` (used by the HTML report)."""


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


# ---------------------------------------------------------------------------------------------------------
# Summary, JSON and bootstrap
# ---------------------------------------------------------------------------------------------------------


def summarize(
    equity: np.ndarray,
    *,
    bar_interval_s: float,
    trades: Sequence[TradeLike],
    fees_paid_usdt: float,
    funding_paid_usdt: float,
    slippage_paid_usdt: float,
    turnover_usdt: float,
    position_side: np.ndarray | None = None,
    position_notional_usdt: np.ndarray | None = None,
) -> dict[str, float]:
    """Return every evaluation metric of one backtest as a flat dict of floats.

    Parameters
    ----------
    equity : array_like of float, shape (T+1,)
        Equity in USDT marked at each bar close, starting with the initial equity; finite, > 0.
    bar_interval_s : float
        Bar length in seconds (annualisation uses :func:`bars_per_year`).
    trades : sequence of TradeLike
        Closed trades (``pnl_usdt``, ``bars_held``).
    fees_paid_usdt : float
        Cumulative fees paid, USDT, >= 0.
    funding_paid_usdt : float
        Cumulative funding paid, USDT (negative when funding was received on balance).
    slippage_paid_usdt : float
        Cumulative slippage cost, USDT, >= 0.
    turnover_usdt : float
        Cumulative traded notional, USDT, >= 0.
    position_side : array_like, shape (T,), optional
        Side held during each bar (-1/0/+1); without it ``exposure`` is ``nan``.
    position_notional_usdt : array_like, shape (T,), optional
        Position notional at each bar close, USDT; without it ``avg_leverage`` is ``nan``.

    Returns
    -------
    dict[str, float]
        Keys (definitions in :data:`METRIC_DESCRIPTIONS`): ``total_return, annualized_return, sortino,
        sharpe, calmar, max_drawdown, max_drawdown_duration_bars, profit_factor, win_rate, turnover,
        fees_paid, funding_paid, slippage_paid, n_trades, avg_holding_bars, exposure, avg_leverage, n_bars``.
        Returns, drawdown, win rate and exposure are fractions; costs are USDT; ``sortino`` uses
        MAR 0. Values may be ``nan``/``inf`` as documented per metric; use :func:`to_jsonable`
        before writing JSON.

    Raises
    ------
    MetricInputError
        On malformed equity (empty, non-finite, negative, not starting positive, or positive again
        after a zero mark), costs or trades, or a ``position_side`` / ``position_notional_usdt``
        whose length is not T.

    Notes
    -----
    A wiped-out account is reported, not rejected: equity may reach 0 and must then stay 0; the bar
    that reaches 0 has return -1 and later bars return 0 (nothing left at risk).
    """
    eq = _check_equity(equity, allow_zero=True)
    periods = bars_per_year(bar_interval_s)
    returns = _returns_through_ruin(eq)
    n_bars = returns.size
    fees = _check_scalar(fees_paid_usdt, "fees_paid_usdt", non_negative=True)
    funding = _check_scalar(funding_paid_usdt, "funding_paid_usdt", non_negative=False)
    slippage = _check_scalar(slippage_paid_usdt, "slippage_paid_usdt", non_negative=True)
    if position_side is None:
        expo = math.nan
    else:
        side = _as_1d_float(position_side, "position_side")
        if side.size != n_bars:
            raise MetricInputError(
                f"position_side must have one entry per bar ({n_bars} = len(equity) - 1), got {side.size}"
            )
        expo = exposure(side)
    if position_notional_usdt is None:
        lev = math.nan
    else:
        notional = _as_1d_float(position_notional_usdt, "position_notional_usdt")
        if notional.size != n_bars:
            raise MetricInputError(
                f"position_notional_usdt must have one entry per bar ({n_bars} = len(equity) - 1), got {notional.size}"
            )
        lev = avg_leverage(notional, eq[1:])
    return {
        "total_return": total_return(eq),
        "annualized_return": annualized_return(eq, periods),
        "sortino": sortino_ratio(returns, periods),
        "sharpe": sharpe_ratio(returns, periods),
        "calmar": calmar_ratio(eq, periods),
        "max_drawdown": max_drawdown(eq),
        "max_drawdown_duration_bars": float(max_drawdown_duration_bars(eq)),
        "profit_factor": profit_factor(trades),
        "win_rate": win_rate(trades),
        "turnover": turnover_ratio(turnover_usdt, float(np.mean(eq))),
        "fees_paid": fees,
        "funding_paid": funding,
        "slippage_paid": slippage,
        "n_trades": float(len(trades)),
        "avg_holding_bars": avg_holding_bars(trades),
        "exposure": expo,
        "avg_leverage": lev,
        "n_bars": float(n_bars),
    }


def _returns_through_ruin(eq: np.ndarray) -> np.ndarray:
    """Per-bar returns of a validated curve (eq[0] > 0, eq >= 0) that may end in ruin (zeros)."""
    zero = np.flatnonzero(eq == 0.0)
    if zero.size == 0:
        return eq[1:] / eq[:-1] - 1.0
    k = int(zero[0])
    after = eq[k:]
    if (after != 0.0).any():
        i = k + _first_bad(after != 0.0)
        raise MetricInputError(f"equity is 0 at index {k} (ruin) but positive again at index {i}: {eq[i]!r}")
    returns = np.zeros(eq.size - 1, dtype=np.float64)
    returns[:k] = eq[1 : k + 1] / eq[:k] - 1.0
    return returns


def to_jsonable(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of a metrics mapping that ``json.dump(..., allow_nan=False)`` accepts.

    The project's one JSON codec (:mod:`market.json_codec`, strict mode): floats (Python or numpy)
    become Python floats, with ``nan`` -> ``"NaN"``, ``inf`` -> ``"Infinity"``, ``-inf`` ->
    ``"-Infinity"`` (read back by :func:`market.json_codec.loads`); numpy integers and booleans become
    Python ints/bools. Nested mappings (e.g. metrics per strategy) and lists/tuples are converted
    recursively; strings and ``None`` pass through. (Before the codec, ``nan`` was written as ``null`` and
    infinities as ``"inf"``/``"-inf"``; the codec still reads those files.)

    Parameters
    ----------
    metrics : Mapping[str, Any]
        Usually the output of :func:`summarize`.

    Returns
    -------
    dict[str, Any]
        JSON-safe copy; keys unchanged.

    Raises
    ------
    MetricInputError
        If a key is not a string or a value has an unsupported type.
    """
    try:
        return _json_codec.to_jsonable(dict(metrics), strict=True)
    except TypeError as exc:
        raise MetricInputError(f"metrics are not JSON-able: {exc}") from exc


def block_bootstrap_ci(
    returns: np.ndarray,
    stat_fn: Callable[[np.ndarray], float],
    *,
    block_len: int,
    n_boot: int,
    alpha: float,
    seed: int | np.random.Generator,
) -> tuple[float, float]:
    """Return a percentile confidence interval of a statistic by the circular moving-block bootstrap.

    Each replicate concatenates ``ceil(T / block_len)`` blocks of ``block_len`` consecutive returns,
    each starting at a uniformly drawn index and wrapping around the end of the series (Politis &
    Romano 1992, "A circular block-resampling procedure for stationary data"; moving blocks: Künsch
    1989, Ann. Statist. 17(3)), truncated to T; blocks keep the short-range dependence (volatility
    clustering) that an iid bootstrap would destroy. The interval is the ``alpha/2`` and
    ``1 - alpha/2`` empirical quantiles of the replicates (inverted-CDF order statistics, so infinite
    replicates such as an ``inf`` Sortino sort correctly instead of producing ``nan``).

    Parameters
    ----------
    returns : array_like of float, shape (T,)
        Per-bar returns, finite, T >= 2.
    stat_fn : callable
        Maps a float64 array of shape (T,) to a float, e.g.
        ``lambda r: sortino_ratio(r, bars_per_year(3600))``.
    block_len : int
        Block length in bars, 1 <= block_len <= T (1 gives the iid bootstrap).
    n_boot : int
        Number of bootstrap replicates, >= 1 (1,000 or more for a 95 % interval).
    alpha : float
        Miscoverage in (0, 1); 0.05 gives a 95 % interval.
    seed : int or numpy.random.Generator
        Seed or generator; the same seed gives the same interval.

    Returns
    -------
    tuple[float, float]
        ``(lo, hi)`` with ``lo <= hi``.

    Raises
    ------
    MetricInputError
        On malformed ``returns`` or out-of-range ``block_len``, ``n_boot`` or ``alpha``, or when
        ``stat_fn`` returns ``nan`` for a replicate.
    """
    r = _as_1d_float(returns, "returns")
    _check_finite(r, "returns")
    n = r.size
    if n < 2:
        raise MetricInputError(f"returns needs at least 2 values for a bootstrap, got {n}")
    if isinstance(block_len, bool) or not isinstance(block_len, (int, np.integer)) or not 1 <= block_len <= n:
        raise MetricInputError(f"block_len must be an int in [1, {n}], got {block_len!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise MetricInputError(f"n_boot must be an int >= 1, got {n_boot!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise MetricInputError(f"alpha must be in (0, 1), got {alpha!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n_blocks = -(-n // int(block_len))
    offsets = np.arange(int(block_len))
    stats = np.empty(int(n_boot), dtype=np.float64)
    for b in range(int(n_boot)):
        starts = rng.integers(0, n, size=n_blocks)
        idx = ((starts[:, None] + offsets[None, :]) % n).ravel()[:n]
        stats[b] = float(stat_fn(r[idx]))
    if np.isnan(stats).any():
        raise MetricInputError(
            f"stat_fn returned nan for {int(np.isnan(stats).sum())} of {n_boot} bootstrap replicates"
        )
    lo = float(np.quantile(stats, alpha / 2.0, method="inverted_cdf"))
    hi = float(np.quantile(stats, 1.0 - alpha / 2.0, method="inverted_cdf"))
    return lo, hi
