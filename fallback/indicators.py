"""V1's indicators at one bar: from a trailing window (serving) or precomputed over a series (backtest).

Definition (both paths): the value at bar t is the TA-Lib indicator computed on the trailing
window of ``history_bars`` closed candles ending at t (TA-Lib seeds its recursive indicators at the
start of the window). :func:`window_indicators` does exactly that for one bar. :class:`SeriesIndicators`
computes the same numbers for every bar of a series at once:

* EMAs through the closed form of TA-Lib's SMA-seeded recursion over the window
  (``E = F_e + (1 - k)^(L - p) (seed - F_{a-1})``, F TA-Lib's EMA over the whole series,
  k = 2 / (p + 1), see :func:`windowed_ema`), equal to the windowed value up to float rounding;
* Wilder's ATR, ADX, +DI, -DI over the whole series when the window start's weight in the window
  value, ``(1 - 1/p)^(history_bars - 3p)``, is below 1e-13 (then the two agree to float rounding);
  otherwise TA-Lib on each window (exact, slower);
* Bollinger width, its percentile rank and the volume SMA are finite-window indicators.

Causal: the row for bar t uses candles at or before t only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import talib
from numpy.lib.stride_tricks import sliding_window_view

from fallback.config import V1Config

PRICE_COLUMNS = ("open", "high", "low", "close", "volume")

# Standard Bollinger bands (2 standard deviations). Not a config field: the filter uses the
# percentile rank of the width in its own history, which does not depend on this multiplier.
BB_NBDEV = 2.0
_CONVERGED = 1e-13

VALUE_NAMES = ("adx", "plus_di", "minus_di", "bb_width", "bb_width_pct", "volume_ratio",
               "ema_fast", "ema_mid", "ema_slow", "atr")  # fmt: skip


@dataclass(frozen=True, slots=True)
class BarIndicators:
    """Everything V1 reads at bar t.

    Prices in USDT; ``n_rows`` the closed candles available (at most ``history_bars`` counted);
    ``aligned_long`` / ``aligned_short``: EMA fast > mid > slow (resp. <) on each of the last
    ``alignment_persist_bars`` bars; ``high_tail`` / ``low_tail``: float64 views of the window's
    highs and lows ending at t (for the trade's extreme since the fill).
    """

    n_rows: int
    open: float
    high: float
    low: float
    close: float
    prev_range: float
    adx: float
    plus_di: float
    minus_di: float
    bb_width: float
    bb_width_pct: float
    volume_ratio: float
    ema_fast: float
    ema_mid: float
    ema_slow: float
    atr: float
    aligned_long: bool
    aligned_short: bool
    high_tail: np.ndarray
    low_tail: np.ndarray

    def values(self) -> dict[str, float]:
        """The indicator values by name (:data:`VALUE_NAMES`)."""
        return {name: getattr(self, name) for name in VALUE_NAMES}


def validated_arrays(
    candles: pd.DataFrame, rows: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``open high low close volume`` of the last ``rows`` rows (all if None) as float64 arrays.

    Raises
    ------
    TypeError
        If ``candles`` is not a DataFrame.
    ValueError
        If a column is missing or a value is non-finite (names the column, open time and count).
    """
    if not isinstance(candles, pd.DataFrame):
        raise TypeError(f"V1: ctx.candles must be a pandas DataFrame, got {type(candles).__name__}")
    missing = [c for c in PRICE_COLUMNS if c not in candles.columns]
    if missing:
        raise ValueError(f"V1: ctx.candles lacks required columns {missing}")
    n = len(candles) if rows is None else min(rows, len(candles))
    o, h, lo, c, v = (
        np.ascontiguousarray(candles[name].to_numpy(dtype=np.float64)[len(candles) - n :])
        for name in PRICE_COLUMNS
    )
    cols = (o, h, lo, c, v)
    for j, col in enumerate(cols):
        bad = ~np.isfinite(col)
        if bad.any():
            row = int(np.argmax(bad))
            total = sum(int((~np.isfinite(x)).sum()) for x in cols)
            raise ValueError(
                f"V1: non-finite candle value {col[row]!r} in column '{PRICE_COLUMNS[j]}' at "
                f"open time {candles.index[len(candles) - n + row]} ({total} non-finite values in the window)"
            )
    return cols


def _percentile_rank(history: np.ndarray) -> float:
    """Share of ``history`` values <= its last value, in (0, 1]; NaN if any value is NaN."""
    if np.isnan(history).any():
        return float("nan")
    return float(np.mean(history <= history[-1]))


def _aligned(fast: np.ndarray, mid: np.ndarray, slow: np.ndarray, sign: int) -> bool:
    with np.errstate(invalid="ignore"):
        if sign > 0:
            return bool(np.all(fast > mid) and np.all(mid > slow))
        return bool(np.all(fast < mid) and np.all(mid < slow))


def window_indicators(o: np.ndarray, h: np.ndarray, lo: np.ndarray, c: np.ndarray, v: np.ndarray,
                      cfg: V1Config) -> BarIndicators:  # fmt: skip
    """Indicators at the last bar of a window (float64 arrays of equal length >= 2, oldest first).

    Returns NaN values where the window is too short for an indicator (the caller reports not ready).
    """
    n = len(c)
    p_adx, p_atr = cfg.adx_period_bars, cfg.atr_period_bars
    adx = talib.ADX(h, lo, c, timeperiod=p_adx)
    plus_di = talib.PLUS_DI(h, lo, c, timeperiod=p_adx)
    minus_di = talib.MINUS_DI(h, lo, c, timeperiod=p_adx)
    upper, middle, lower = talib.BBANDS(
        c, timeperiod=cfg.bb_period_bars, nbdevup=BB_NBDEV, nbdevdn=BB_NBDEV, matype=talib.MA_Type.SMA
    )
    width = (upper - lower) / middle
    lookback = width[-cfg.bb_width_lookback_bars :]
    width_pct = _percentile_rank(lookback) if len(lookback) == cfg.bb_width_lookback_bars else float("nan")
    vol_ma = talib.SMA(v, timeperiod=cfg.volume_ma_bars)[-1]
    volume_ratio = v[-1] / vol_ma if vol_ma > 0 else float("nan")
    k = cfg.alignment_persist_bars
    ef = talib.EMA(c, timeperiod=cfg.ema_fast_bars)
    em = talib.EMA(c, timeperiod=cfg.ema_mid_bars)
    es = talib.EMA(c, timeperiod=cfg.ema_slow_bars)
    if n >= k:
        al = _aligned(ef[-k:], em[-k:], es[-k:], 1)
        ash = _aligned(ef[-k:], em[-k:], es[-k:], -1)
    else:
        al = ash = False
    atr = talib.ATR(h, lo, c, timeperiod=p_atr)[-1]
    return BarIndicators(
        n_rows=n, open=float(o[-1]), high=float(h[-1]), low=float(lo[-1]), close=float(c[-1]),
        prev_range=float(h[-2] - lo[-2]) if n >= 2 else float("nan"),
        adx=float(adx[-1]), plus_di=float(plus_di[-1]), minus_di=float(minus_di[-1]), bb_width=float(width[-1]),
        bb_width_pct=width_pct, volume_ratio=float(volume_ratio), ema_fast=float(ef[-1]), ema_mid=float(em[-1]),
        ema_slow=float(es[-1]), atr=float(atr), aligned_long=al, aligned_short=ash, high_tail=h, low_tail=lo,
    )  # fmt: skip


def windowed_ema(c: np.ndarray, period: int, length: int) -> np.ndarray:
    """TA-Lib EMA (SMA seed) computed on the window of ``length`` bars ending at each bar, its last value.

    With k = 2 / (period + 1), window start s = e - length + 1 and a = s + period:
    ``E_e = F_e + (1 - k)^(length - period) (SMA(c[s:a]) - F_{a-1})`` where F is any solution of
    the recursion ``F_t = (1 - k) F_{t-1} + k c_t`` defined from row a-1 on (here TA-Lib's EMA over
    the whole series, defined from row period-1 <= a-1): the difference of two solutions decays by
    (1 - k) per bar. TA-Lib's windowed EMA seeds at row a-1 with the SMA, then
    ``E_t = E_{t-1} + k (c_t - E_{t-1})``.

    Returns
    -------
    np.ndarray
        float64 (T,), NaN where the window does not fit (``e < length - 1``) or ``length < period``.
    """
    c = np.asarray(c, dtype=np.float64)
    T = len(c)
    out = np.full(T, np.nan)
    if length < period or T < length:
        return out
    k = 2.0 / (period + 1.0)
    f = talib.EMA(c, timeperiod=period)
    seed = sliding_window_view(c, period).mean(axis=1)  # seed[s] = mean(c[s : s + period])
    e = np.arange(length - 1, T)
    s = e - length + 1
    a = s + period
    out[length - 1 :] = f[e] + (1.0 - k) ** (length - period) * (seed[s] - f[a - 1])
    return out


def _wilder_converged(period: int, window: int) -> bool:
    span = window - 3 * period
    return span > 0 and (1.0 - 1.0 / period) ** span < _CONVERGED


def _per_window(fn, arrays: tuple[np.ndarray, ...], window: int, **kw) -> np.ndarray:
    """Last value of ``fn`` on each trailing window (exact, O(T x window))."""
    T = len(arrays[0])
    out = np.full(T, np.nan)
    for t in range(window - 1, T):
        out[t] = fn(*(a[t - window + 1 : t + 1] for a in arrays), **kw)[-1]
    return out


class SeriesIndicators:
    """V1's indicators for every bar of a candle series, computed once (vectorised, causal).

    ``at(t)`` equals ``window_indicators`` on ``candles.iloc[max(0, t - history_bars + 1) : t + 1]``
    (to float rounding) for every t; rows before ``history_bars - 1`` report their row count so the
    engine answers "not ready" exactly like the per-bar path.

    Parameters
    ----------
    candles : pd.DataFrame
        ``open high low close volume`` (float64, finite), index UTC open times, increasing.
    cfg : V1Config

    Raises
    ------
    ValueError, TypeError
        Like :func:`validated_arrays`.
    """

    def __init__(self, candles: pd.DataFrame, cfg: V1Config) -> None:
        o, h, lo, c, v = validated_arrays(candles)
        self.index = pd.DatetimeIndex(candles.index)
        self._ns = self.index.asi8
        self.cfg = cfg
        W = cfg.history_bars
        T = len(c)
        self.o, self.h, self.lo, self.c = o, h, lo, c
        nan = np.full(T, np.nan)
        p_adx, p_atr = cfg.adx_period_bars, cfg.atr_period_bars
        if _wilder_converged(p_adx, W):
            self.adx = talib.ADX(h, lo, c, timeperiod=p_adx) if T >= 2 * p_adx else nan.copy()
            self.plus_di = talib.PLUS_DI(h, lo, c, timeperiod=p_adx) if T > p_adx else nan.copy()
            self.minus_di = talib.MINUS_DI(h, lo, c, timeperiod=p_adx) if T > p_adx else nan.copy()
        else:
            self.adx = _per_window(talib.ADX, (h, lo, c), W, timeperiod=p_adx)
            self.plus_di = _per_window(talib.PLUS_DI, (h, lo, c), W, timeperiod=p_adx)
            self.minus_di = _per_window(talib.MINUS_DI, (h, lo, c), W, timeperiod=p_adx)
        if _wilder_converged(p_atr, W):
            self.atr = talib.ATR(h, lo, c, timeperiod=p_atr) if T > p_atr else nan.copy()
        else:
            self.atr = _per_window(talib.ATR, (h, lo, c), W, timeperiod=p_atr)
        bbp, L = cfg.bb_period_bars, cfg.bb_width_lookback_bars
        self.bb_width = nan.copy()
        self.bb_width_pct = nan.copy()
        if T >= bbp:
            upper, middle, lower = talib.BBANDS(
                c, timeperiod=bbp, nbdevup=BB_NBDEV, nbdevdn=BB_NBDEV, matype=talib.MA_Type.SMA
            )
            self.bb_width = (upper - lower) / middle
            if W - bbp + 1 >= L and T >= L:  # the lookback fits in the window's defined widths
                win = sliding_window_view(self.bb_width, L)
                ranks = np.empty(len(win))
                for s in range(0, len(win), 4096):
                    chunk = win[s : s + 4096]
                    ranks[s : s + 4096] = (chunk <= chunk[:, -1:]).mean(axis=1)
                    ranks[s : s + 4096][np.isnan(chunk).any(axis=1)] = np.nan
                self.bb_width_pct[L - 1 :] = ranks
        self.volume_ratio = nan.copy()
        if W >= cfg.volume_ma_bars and T >= cfg.volume_ma_bars:
            vma = talib.SMA(v, timeperiod=cfg.volume_ma_bars)
            with np.errstate(divide="ignore", invalid="ignore"):
                self.volume_ratio = np.where(vma > 0, v / vma, np.nan)
        k = cfg.alignment_persist_bars
        lags = {}
        for name, period in (
            ("fast", cfg.ema_fast_bars),
            ("mid", cfg.ema_mid_bars),
            ("slow", cfg.ema_slow_bars),
        ):
            per_lag = []
            for j in range(k):  # EMA at bar t - j from the window ending at t (length W - j)
                e = windowed_ema(c, period, W - j) if W - j >= 1 else nan.copy()
                per_lag.append(np.concatenate([np.full(j, np.nan), e[: T - j]]) if j else e)
            lags[name] = per_lag
        self.ema_fast, self.ema_mid, self.ema_slow = lags["fast"][0], lags["mid"][0], lags["slow"][0]
        with np.errstate(invalid="ignore"):
            al = np.ones(T, dtype=bool)
            ash = np.ones(T, dtype=bool)
            for j in range(k):
                f, m, s_ = lags["fast"][j], lags["mid"][j], lags["slow"][j]
                al &= (f > m) & (m > s_)
                ash &= (f < m) & (m < s_)
        if W < k:
            al[:] = False
            ash[:] = False
        self.aligned_long, self.aligned_short = al, ash
        self.prev_range = np.concatenate([[np.nan], h[:-1] - lo[:-1]])

    def __len__(self) -> int:
        return len(self.c)

    def row_of(self, open_time: pd.Timestamp) -> int:
        """Row of the bar opening at ``open_time``.

        Raises
        ------
        KeyError
            If the series has no bar at that time.
        """
        ns = pd.Timestamp(open_time).value
        i = int(np.searchsorted(self._ns, ns))
        if i >= len(self._ns) or self._ns[i] != ns:
            raise KeyError(f"V1 precomputed series has no bar at {open_time}")
        return i

    def at(self, t: int) -> BarIndicators:
        """Indicators at row ``t`` (same numbers as the per-bar path on the trailing window)."""
        W = self.cfg.history_bars
        s = max(0, t - W + 1)
        return BarIndicators(
            n_rows=t + 1 - s, open=float(self.o[t]), high=float(self.h[t]), low=float(self.lo[t]),
            close=float(self.c[t]), prev_range=float(self.prev_range[t]), adx=float(self.adx[t]),
            plus_di=float(self.plus_di[t]), minus_di=float(self.minus_di[t]), bb_width=float(self.bb_width[t]),
            bb_width_pct=float(self.bb_width_pct[t]), volume_ratio=float(self.volume_ratio[t]),
            ema_fast=float(self.ema_fast[t]), ema_mid=float(self.ema_mid[t]), ema_slow=float(self.ema_slow[t]),
            atr=float(self.atr[t]), aligned_long=bool(self.aligned_long[t]), aligned_short=bool(self.aligned_short[t]),
            high_tail=self.h[s : t + 1], low_tail=self.lo[s : t + 1],
        )  # fmt: skip
