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

The statistics themselves (checks, returns, risk, drawdowns, trades and positions) live in
:mod:`training.metric_stats` and are re-exported here; this module adds the summary, the JSON form and the bootstrap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from market import json_codec as _json_codec
from training.metric_stats import (
    MIN_DISPERSION,
    MetricInputError,
    TradeLike,
    _as_1d_float,
    _check_equity,
    _check_finite,
    _check_scalar,
    _first_bad,
    annualized_return,
    avg_holding_bars,
    avg_leverage,
    bars_per_year,
    calmar_ratio,
    exposure,
    max_drawdown,
    max_drawdown_duration_bars,
    profit_factor,
    returns_from_equity,
    sharpe_ratio,
    sortino_ratio,
    total_return,
    turnover_ratio,
    win_rate,
)
from training.metric_stats import SECONDS_PER_YEAR as SECONDS_PER_YEAR

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
