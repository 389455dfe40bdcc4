"""The causal feature computations of :mod:`market.features` that stand on their own: ATR, the rolling helpers
(trailing z-score, log returns, sums, floored ratios), the Hurst exponent and the higher-timeframe features
(complete-bin resampling, the :data:`HTF_FEATURES` of each higher bar, joined on the base rows by close time).

Every value at row t uses rows <= t only (see :mod:`market.features` for the sources and the normalisation).
:mod:`market.features` re-exports the public names: ``market.features.atr`` etc. stay the spelling callers use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import talib

from market.rolling import rolling_mean, rolling_std, rolling_sum

if TYPE_CHECKING:
    from market.features import FeatureConfig

_RETURN_STD_FLOOR = 1e-12
"""A trailing std of 1-bar log returns at or below this counts as a flat market (skew, kurtosis,
autocorrelation 0; Hurst 0.5)."""

HURST_LAGS_BARS: tuple[int, ...] = (1, 2, 4, 8, 16)
"""Lags k of the Hurst estimator (std of k-lag log-price differences ~ k^H)."""

HTF_RETURN_HORIZONS_BARS: tuple[int, ...] = (1, 6)
HTF_RVOL_WINDOW_BARS = 12
HTF_EMA_PERIOD_BARS = 20
HTF_FEATURES: tuple[str, ...] = (
    *(f"logret_{h}b" for h in HTF_RETURN_HORIZONS_BARS),
    f"rvol_{HTF_RVOL_WINDOW_BARS}b",
    "atr_pct",
    "rsi",
    "adx",
    f"ema_dist_{HTF_EMA_PERIOD_BARS}b",
)
"""Features computed on each higher timeframe (windows in bars of that timeframe; ATR, RSI and ADX
use the periods of :class:`FeatureConfig`); same formulas as the base features of the same name."""


def higher_timeframe_names(timeframe: str) -> list[str]:
    """Column names of :func:`higher_timeframe_features` for ``timeframe``: ``htf_{tf}_{name}``."""
    return [f"htf_{timeframe}_{name}" for name in HTF_FEATURES]


def _htf_factor(timeframe: str, bar_interval: pd.Timedelta | str) -> int:
    """Number of base bars in one ``timeframe`` bar; ValueError unless it is an integer >= 2."""
    tf, base = pd.Timedelta(timeframe), pd.Timedelta(bar_interval)
    if base <= pd.Timedelta(0) or tf.value % base.value != 0 or tf.value // base.value < 2:
        raise ValueError(
            f"higher timeframe {timeframe!r} must be a whole multiple (>= 2) of the candle interval {base}"
        )
    return int(tf.value // base.value)


def atr(candles: pd.DataFrame, period_bars: int) -> np.ndarray:
    """Average true range (Wilder 1978) via TA-Lib, in price units.

    ``TR_t = max(high_t - low_t, |high_t - close_{t-1}|, |low_t - close_{t-1}|)``; ATR is the mean
    of the first ``period_bars`` TRs, then Wilder-smoothed:
    ``ATR_t = ((period - 1) ATR_{t-1} + TR_t) / period``. Causal.

    Parameters
    ----------
    candles : pandas.DataFrame
        Candles with float64 ``high low close`` columns, T rows.
    period_bars : int
        Smoothing period, >= 1.

    Returns
    -------
    numpy.ndarray
        float64, shape (T,); NaN in the first ``period_bars`` rows (TA-Lib's lookback).

    Raises
    ------
    ValueError
        If ``period_bars < 1``.
    KeyError
        If a required column is missing.
    """
    if period_bars < 1:
        raise ValueError(f"period_bars must be >= 1, got {period_bars}")
    high, low, close = (
        np.ascontiguousarray(candles[c].to_numpy(dtype=np.float64)) for c in ("high", "low", "close")
    )
    return np.asarray(talib.ATR(high, low, close, timeperiod=period_bars), dtype=np.float64)


def _rolling_z(x: np.ndarray, window: int, std_floor: float, first_row: int = 0) -> np.ndarray:
    """Z-score of x_t against the trailing window ending at t (inclusive); 0 where std <= floor."""
    mean = rolling_mean(x, window, first_row)
    std = rolling_std(x, window, 1, first_row)
    z = np.divide(x - mean, std, out=np.zeros_like(mean), where=std > std_floor)
    z[np.isnan(std) | np.isnan(x)] = np.nan
    return z


def _log_returns(log_c: np.ndarray, horizon: int) -> np.ndarray:
    r = np.full(len(log_c), np.nan)
    if len(log_c) > horizon:
        r[horizon:] = log_c[horizon:] - log_c[:-horizon]
    return r


def _rolling_sum(x: np.ndarray, window: int, first_row: int = 0) -> np.ndarray:
    """Trailing sum over ``window`` rows (inclusive); NaN until the window is full or holds a NaN."""
    return rolling_sum(x, window, first_row)


def _safe_ratio(num: np.ndarray, den: np.ndarray, floor: float, fill: float) -> np.ndarray:
    """Ratio ``num / den`` where den > floor, ``fill`` where 0 <= den <= floor, NaN where either is NaN."""
    out = np.divide(num, den, out=np.full(len(num), fill), where=den > floor)
    out[np.isnan(num) | np.isnan(den)] = np.nan
    return out


def hurst_exponent(
    log_close: np.ndarray, window_bars: int, lags_bars: tuple[int, ...] = HURST_LAGS_BARS, first_row: int = 0
) -> np.ndarray:
    """Rolling Hurst exponent from the scaling of the std of lagged log-price differences.

    For each lag k, ``s_k(t)`` is the std (ddof=0) of ``x_j - x_{j-k}`` over the ``window_bars - k``
    differences whose both ends lie in the trailing window ``x_{t-window_bars+1} .. x_t``
    (x = ln close). For a fractional Brownian motion ``s_k ~ k^H`` (Mandelbrot & Van Ness 1968), so
    ``H`` is the least-squares slope of ``ln s_k`` on ``ln k``, computed for every t at once as a
    fixed linear combination of the ``ln s_k`` columns (a variogram estimator; see Taqqu,
    Teverovsky & Willinger 1995). 0.5 = random walk, > 0.5 trending, < 0.5 mean-reverting.
    One trailing std per lag (:func:`market.rolling.rolling_std`), O(T x window x len(lags)).

    Parameters
    ----------
    log_close : numpy.ndarray
        float64, shape (T,), log prices.
    window_bars : int
        Window of log prices, > 2 x the longest lag.
    lags_bars : tuple of int
        Lags k (>= 1, at least two distinct).
    first_row : int
        Rows before it are NaN (not computed).

    Returns
    -------
    numpy.ndarray
        float64, shape (T,), clipped to [0, 1]; NaN in the first ``window_bars - 1`` rows; 0.5
        where the 1-lag std is at most 1e-12 (no movement: no evidence either way).

    Raises
    ------
    ValueError
        If the window is too short for the lags or fewer than two lags are given.
    """
    lags = np.asarray(sorted(set(lags_bars)), dtype=np.int64)
    if len(lags) < 2 or lags[0] < 1:
        raise ValueError(f"need at least two distinct lags >= 1, got {lags_bars}")
    if window_bars < 2 * int(lags[-1]) + 2:
        raise ValueError(f"window_bars={window_bars} must be >= 2 x the longest lag + 2 ({2 * lags[-1] + 2})")
    x = np.asarray(log_close, dtype=np.float64)
    log_k = np.log(lags.astype(np.float64))
    weights = (log_k - log_k.mean()) / np.sum((log_k - log_k.mean()) ** 2)
    h = np.zeros(len(x))
    flat = np.zeros(len(x), dtype=bool)
    for k, wk in zip(lags, weights, strict=True):
        d = _log_returns(x, int(k))
        s = rolling_std(d, window_bars - int(k), 0, first_row)
        if k == lags[0]:
            flat = s <= _RETURN_STD_FLOOR
        h += wk * np.log(np.maximum(s, 1e-300))
    h = np.clip(h, 0.0, 1.0)
    h[flat] = 0.5
    h[: max(window_bars - 1, first_row)] = np.nan
    return h


def resample_candles(candles: pd.DataFrame, timeframe: str) -> pd.DataFrame:
    """Aggregate gap-free candles into the *complete* bins of a higher timeframe.

    Bins are anchored on the Unix epoch (``floor(open_time / tf)``; 4h bins open at 00:00, 04:00,
    ... UTC). A bin is complete when it holds ``tf / interval`` candles; incomplete bins (the
    partial first and last bins of a frame) are dropped, never extrapolated.

    Parameters
    ----------
    candles : pandas.DataFrame
        Canonical candles (float64 ``open high low close volume``, UTC open-time index, regular
        interval ``interval``), at least 2 rows.
    timeframe : str
        Higher timeframe, a whole multiple (>= 2) of the candle interval, e.g. ``"4h"``.

    Returns
    -------
    pandas.DataFrame
        float64 ``open`` (first), ``high`` (max), ``low`` (min), ``close`` (last), ``volume`` (sum),
        indexed by the bin's UTC open time (``open_time``); one row per complete bin.

    Raises
    ------
    ValueError
        If the candles have fewer than 2 rows or ``timeframe`` is not a whole multiple (>= 2) of
        their interval.
    """
    if len(candles) < 2:
        raise ValueError(f"need at least 2 candles to infer the interval, got {len(candles)}")
    ns = candles.index.as_unit("ns").asi8
    interval = pd.Timedelta(int(np.median(np.diff(ns))))
    factor = _htf_factor(timeframe, interval)
    tf_ns = pd.Timedelta(timeframe).value
    bins = ns // tf_ns
    starts = np.flatnonzero(np.concatenate([[True], bins[1:] != bins[:-1]]))
    ends = np.concatenate([starts[1:], [len(ns)]])
    complete = (ends - starts) == factor
    starts, ends = starts[complete], ends[complete]
    cols = {k: np.ascontiguousarray(candles[k].to_numpy(dtype=np.float64)) for k in ("open", "high", "low", "close", "volume")}
    if len(starts) == 0:
        out = {k: np.empty(0) for k in cols}
    else:
        out = {
            "open": cols["open"][starts],
            "high": _reduce(np.maximum, cols["high"], starts, ends),
            "low": _reduce(np.minimum, cols["low"], starts, ends),
            "close": cols["close"][ends - 1],
            "volume": _reduce(np.add, cols["volume"], starts, ends),
        }
    index = pd.DatetimeIndex(bins[starts] * tf_ns, tz="UTC", name="open_time") if len(starts) else pd.DatetimeIndex([], tz="UTC", name="open_time")
    return pd.DataFrame(out, index=index)


def _reduce(ufunc: np.ufunc, x: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """ufunc.reduce over each [start, end) segment (segments are contiguous runs of ``x``)."""
    # reduceat over the segment starts; the last segment may end before len(x) (a dropped partial
    # bin after it), so reduce over x[:ends[-1]] only.
    return ufunc.reduceat(x[: ends[-1]], starts)


def _htf_columns(bars: pd.DataFrame, cfg: FeatureConfig) -> dict[str, np.ndarray]:
    """:data:`HTF_FEATURES` of complete higher-timeframe bars (float64, one value per bar)."""
    h, lo, c = (np.ascontiguousarray(bars[k].to_numpy(dtype=np.float64)) for k in ("high", "low", "close"))
    n = len(c)
    cols: dict[str, np.ndarray] = {}
    log_c = np.log(c) if n else np.empty(0)
    for hb in HTF_RETURN_HORIZONS_BARS:
        cols[f"logret_{hb}b"] = _log_returns(log_c, hb)
    w = HTF_RVOL_WINDOW_BARS
    cols[f"rvol_{w}b"] = rolling_std(_log_returns(log_c, 1), w, 1)
    nan = np.full(n, np.nan)
    cols["atr_pct"] = talib.ATR(h, lo, c, timeperiod=cfg.atr_period_bars) / c if n else nan
    cols["rsi"] = talib.RSI(c, timeperiod=cfg.rsi_period_bars) / 100.0 if n else nan
    cols["adx"] = talib.ADX(h, lo, c, timeperiod=cfg.adx_period_bars) / 100.0 if n else nan
    p = HTF_EMA_PERIOD_BARS
    cols[f"ema_dist_{p}b"] = c / talib.EMA(c, timeperiod=p) - 1.0 if n else nan
    assert tuple(cols) == HTF_FEATURES
    return cols


def higher_timeframe_features(candles: pd.DataFrame, timeframe: str, cfg: FeatureConfig) -> pd.DataFrame:
    """Higher-timeframe features on the base candles' rows, joined by the higher bar's close time.

    The candles are aggregated by :func:`resample_candles` (complete bins only),
    :data:`HTF_FEATURES` are computed on those bars, and the row with open time t (close time
    t + interval) takes the values of the last higher bar whose close time (bin open + tf) is
    <= t + interval. So no row sees a higher bar that closes after it: with 1h candles and
    ``"4h"``, the rows 00:00, 01:00 and 02:00 still see the 4h bar of 20:00-24:00 the day
    before, and the row 03:00 (closing at 04:00) is the first to see the 00:00-04:00 bar.

    Parameters
    ----------
    candles : pandas.DataFrame
        Canonical, gap-free candles (validated by the caller), at least 2 rows.
    timeframe : str
        Higher timeframe, a whole multiple (>= 2) of the candle interval.
    cfg : FeatureConfig
        ATR / RSI / ADX periods (in bars of ``timeframe``).

    Returns
    -------
    pandas.DataFrame
        float64, index ``candles.index``, columns :func:`higher_timeframe_names`; NaN on rows
        before the first complete higher bar has closed and during that timeframe's warm-up.

    Raises
    ------
    ValueError
        As :func:`resample_candles`.
    """
    names = higher_timeframe_names(timeframe)
    if len(candles) < 2:  # no interval to resample by: no higher bar can have closed
        return pd.DataFrame({k: np.full(len(candles), np.nan) for k in names}, index=candles.index)
    bars = resample_candles(candles, timeframe)
    values = _htf_columns(bars, cfg)
    ns = candles.index.as_unit("ns").asi8
    interval_ns = int(np.median(np.diff(ns)))
    tf_ns = pd.Timedelta(timeframe).value
    bar_close = bars.index.as_unit("ns").asi8 + tf_ns
    row_close = ns + interval_ns
    j = np.searchsorted(bar_close, row_close, side="right") - 1
    seen = j >= 0
    out = {}
    for name, col in zip(names, values.values(), strict=True):
        joined = np.full(len(ns), np.nan)
        joined[seen] = col[j[seen]]
        out[name] = joined
    return pd.DataFrame(out, index=candles.index)
