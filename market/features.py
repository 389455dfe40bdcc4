"""Causal, scale-free features of candles (the observation's market part).

Every value in row t is computed from candles with open time <= t only: indicators are TA-Lib's
(forward recursions and trailing windows), rolling statistics are trailing windows that include bar
t, and funding is forward-filled from settlements. So computing on ``candles.iloc[:t+1]`` gives
exactly the row t of the full computation (truncation invariance; tested). Recursive indicators
(EMA, Wilder's ATR/ADX/RSI smoothing) start at the first row of the frame, so their values depend on
where the frame starts (not on where it ends); :func:`warmup_bars` bounds how much history they need
to converge.

Columns (float32, in this order; ``{h}``, ``{w}``, ``{p}`` come from :class:`FeatureConfig`):

==================  =============================================================================
``logret_{h}b``     log(close_t / close_{t-h}), one column per ``return_horizons_bars`` entry
``atr_pct``         ATR(``atr_period_bars``) / close, a fraction (0.01 = 1 % of price)
``adx``             ADX(``adx_period_bars``) / 100, in [0, 1]
``plus_di``         +DI(``adx_period_bars``) / 100, in [0, 1]
``minus_di``        -DI(``adx_period_bars``) / 100, in [0, 1]
``rsi``             RSI(``rsi_period_bars``) / 100, in [0, 1]
``macd_hist_rel``   MACD histogram (fast, slow, signal EMAs) / close
``bb_width``        Bollinger (upper - lower) / middle (SMA ``bbands_period_bars``, ``bbands_nbdev`` std)
``bb_pctb``         Bollinger %B = (close - lower) / (upper - lower); 0.5 when the bands coincide
``rvol_{w}b``       std (ddof=1) of 1-bar log returns over the last ``w`` bars, per ``realized_vol_windows_bars``
``volume_z``        z-score of log(1 + volume) against its trailing ``volume_z_window_bars`` mean and std
``ema_dist_{p}b``   close / EMA(p) - 1, per ``ema_periods_bars``
``funding_bps``     last settled funding rate in basis points (rate x 1e4), forward-filled
``funding_z``       z-score of the forward-filled funding rate over the trailing ``funding_z_window_bars``
``hour_sin/cos``    sin/cos(2 pi h / 24), h = hour of the bar's open time (fractional for sub-hour bars)
``dow_sin/cos``     sin/cos(2 pi d / 7), d = day of week of the open time (Monday 0, fractional)
``bar_range``       (high - low) / close
``close_loc``       (close - low) / (high - low); 0.5 when high == low
==================  =============================================================================

Funding: the rate settled at open time T is known by the close of that bar, so forward-filling it
is causal. If the candles have no ``funding_rate`` column, ``funding_bps`` and ``funding_z`` are 0.0
on every row (the schema never changes); if they have one, the rows before the first settlement
are NaN (warm-up). Z-scores whose trailing std is (numerically) zero are 0.0.

Sources: ATR, ADX/DI and RSI by Wilder (1978), *New Concepts in Technical Trading Systems*;
MACD by Appel (1979); Bollinger bands by Bollinger (2001), *Bollinger on Bollinger Bands*; all as
implemented by TA-Lib (https://ta-lib.org).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import talib
from pydantic import Field, field_validator, model_validator

from market.candles import FUNDING_COLUMN, check_candles
from market.config_base import StrictConfig
from market.errors import DataValidationError

_FUNDING_STD_FLOOR = 1e-12
"""A trailing std of the funding rate at or below this (fraction) counts as zero: z-score 0."""
_VOLUME_STD_FLOOR = 1e-12
"""A trailing std of log(1 + volume) at or below this counts as zero: z-score 0."""
_BB_WIDTH_FLOOR = 1e-12
"""Bands closer than this fraction of the middle band count as coinciding: %B 0.5."""


class FeatureConfig(StrictConfig):
    """Windows of the features; every length is in bars of the candle interval."""

    return_horizons_bars: tuple[int, ...] = Field(
        (1, 3, 6, 12, 24, 72), description="horizons of the log-return features (bars)"
    )
    atr_period_bars: int = Field(14, description="ATR period (Wilder smoothing), bars")
    adx_period_bars: int = Field(14, description="ADX / +DI / -DI period (Wilder smoothing), bars")
    rsi_period_bars: int = Field(14, description="RSI period (Wilder smoothing), bars")
    macd_fast_bars: int = Field(12, description="MACD fast EMA period, bars")
    macd_slow_bars: int = Field(26, description="MACD slow EMA period, bars")
    macd_signal_bars: int = Field(9, description="MACD signal EMA period, bars")
    bbands_period_bars: int = Field(20, description="Bollinger bands SMA/std window, bars")
    bbands_nbdev: float = Field(2.0, description="Bollinger band half-width in standard deviations")
    realized_vol_windows_bars: tuple[int, ...] = Field(
        (24, 72), description="windows of the realized-volatility features (std of 1-bar log returns), bars"
    )
    volume_z_window_bars: int = Field(48, description="trailing window of the volume z-score, bars")
    ema_periods_bars: tuple[int, ...] = Field(
        (20, 50, 200), description="EMA periods of the close/EMA - 1 distance features, bars"
    )
    funding_z_window_bars: int = Field(168, description="trailing window of the funding-rate z-score, bars")

    @field_validator("return_horizons_bars", "realized_vol_windows_bars", "ema_periods_bars")
    @classmethod
    def _non_empty_unique(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("must list at least one window")
        if len(set(value)) != len(value):
            raise ValueError(f"windows must be unique, got {value}")
        return value

    @model_validator(mode="after")
    def _check_ranges(self) -> FeatureConfig:
        minimum = {
            "atr_period_bars": 1,
            "adx_period_bars": 2,
            "rsi_period_bars": 2,
            "macd_fast_bars": 2,
            "macd_slow_bars": 2,
            "macd_signal_bars": 1,
            "bbands_period_bars": 2,
            "volume_z_window_bars": 2,
            "funding_z_window_bars": 2,
        }
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if any(h < 1 for h in self.return_horizons_bars):
            raise ValueError(f"return_horizons_bars must be >= 1, got {self.return_horizons_bars}")
        if any(w < 2 for w in self.realized_vol_windows_bars):
            raise ValueError(f"realized_vol_windows_bars must be >= 2, got {self.realized_vol_windows_bars}")
        if any(p < 2 for p in self.ema_periods_bars):
            raise ValueError(f"ema_periods_bars must be >= 2, got {self.ema_periods_bars}")
        if self.macd_fast_bars >= self.macd_slow_bars:
            raise ValueError(
                f"macd_fast_bars ({self.macd_fast_bars}) must be < macd_slow_bars ({self.macd_slow_bars})"
            )
        if not (np.isfinite(self.bbands_nbdev) and self.bbands_nbdev > 0):
            raise ValueError(f"bbands_nbdev must be a positive number, got {self.bbands_nbdev}")
        return self


def feature_names(cfg: FeatureConfig) -> list[str]:
    """Column names of :func:`compute_features` for ``cfg``, in order, without computing anything."""
    return [
        *(f"logret_{h}b" for h in cfg.return_horizons_bars),
        "atr_pct",
        "adx",
        "plus_di",
        "minus_di",
        "rsi",
        "macd_hist_rel",
        "bb_width",
        "bb_pctb",
        *(f"rvol_{w}b" for w in cfg.realized_vol_windows_bars),
        "volume_z",
        *(f"ema_dist_{p}b" for p in cfg.ema_periods_bars),
        "funding_bps",
        "funding_z",
        "hour_sin",
        "hour_cos",
        "dow_sin",
        "dow_cos",
        "bar_range",
        "close_loc",
    ]


def warmup_bars(cfg: FeatureConfig) -> int:
    """Conservative number of leading bars before every feature is defined and converged.

    Bounds both the NaN warm-up rows of :func:`compute_features` and the history that recursive
    indicators need before their start-up value stops mattering: 3 x the longest EMA (the weight
    of the seed decays as (1 - 2/(p+1))^n, about e^-6 after 3p bars), 3 x (slow + signal) for MACD,
    5 x the Wilder periods (ADX is smoothed twice), the longest trailing window plus one, and the
    funding z-score window plus 32 bars (one 8-hour funding interval at 15-minute bars: the wait
    for the first settlement; bars of 15 minutes or longer are assumed).

    Returns
    -------
    int
        Number of bars (>= the leading NaN rows of ``compute_features`` on gap-free candles with
        funding settlements every 8 hours).
    """
    return int(
        max(
            3 * max(cfg.ema_periods_bars),
            3 * (cfg.macd_slow_bars + cfg.macd_signal_bars),
            5 * max(cfg.adx_period_bars, cfg.atr_period_bars, cfg.rsi_period_bars),
            cfg.bbands_period_bars,
            max(cfg.return_horizons_bars) + 1,
            max(cfg.realized_vol_windows_bars) + 1,
            cfg.volume_z_window_bars,
            cfg.funding_z_window_bars + 32,
        )
    )


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


def _rolling_z(x: pd.Series, window: int, std_floor: float) -> np.ndarray:
    """Z-score of x_t against the trailing window ending at t (inclusive); 0 where std <= floor."""
    roll = x.rolling(window, min_periods=window)
    mean = roll.mean().to_numpy()
    std = roll.std(ddof=1).to_numpy()
    z = np.divide(x.to_numpy() - mean, std, out=np.zeros_like(mean), where=std > std_floor)
    z[np.isnan(std) | np.isnan(x.to_numpy())] = np.nan
    return z


def compute_features(candles: pd.DataFrame, cfg: FeatureConfig) -> pd.DataFrame:
    """Compute the causal feature matrix (see the module docstring for the columns).

    Parameters
    ----------
    candles : pandas.DataFrame
        Canonical candles (T rows, gap-free, UTC open-time index), optionally with ``funding_rate``.
    cfg : FeatureConfig
        Windows.

    Returns
    -------
    pandas.DataFrame
        float32, shape (T, len(feature_names(cfg))), same index as ``candles``. NaN only in a
        leading block of warm-up rows (drop them with :func:`drop_warmup`).

    Raises
    ------
    DataValidationError
        If the candles break a rule of :func:`market.candles.validate_candles` (checked against
        their own median spacing): a non-finite price, a gap, an inconsistent bar, ...
    """
    check_candles(candles, source="compute_features input")
    index = candles.index
    h, l, c, v = (
        np.ascontiguousarray(candles[k].to_numpy(dtype=np.float64))
        for k in ("high", "low", "close", "volume")
    )
    n = len(c)
    cols: dict[str, np.ndarray] = {}
    log_c = np.log(c)

    for hb in cfg.return_horizons_bars:
        r = np.full(n, np.nan)
        if n > hb:
            r[hb:] = log_c[hb:] - log_c[:-hb]
        cols[f"logret_{hb}b"] = r

    cols["atr_pct"] = talib.ATR(h, l, c, timeperiod=cfg.atr_period_bars) / c
    cols["adx"] = talib.ADX(h, l, c, timeperiod=cfg.adx_period_bars) / 100.0
    cols["plus_di"] = talib.PLUS_DI(h, l, c, timeperiod=cfg.adx_period_bars) / 100.0
    cols["minus_di"] = talib.MINUS_DI(h, l, c, timeperiod=cfg.adx_period_bars) / 100.0
    cols["rsi"] = talib.RSI(c, timeperiod=cfg.rsi_period_bars) / 100.0
    _, _, hist = talib.MACD(
        c, fastperiod=cfg.macd_fast_bars, slowperiod=cfg.macd_slow_bars, signalperiod=cfg.macd_signal_bars
    )
    cols["macd_hist_rel"] = hist / c
    upper, middle, lower = talib.BBANDS(
        c, timeperiod=cfg.bbands_period_bars, nbdevup=cfg.bbands_nbdev, nbdevdn=cfg.bbands_nbdev, matype=0
    )
    band = upper - lower
    cols["bb_width"] = band / middle
    flat = band <= _BB_WIDTH_FLOOR * middle
    pctb = np.divide(c - lower, band, out=np.full(n, 0.5), where=~flat)
    pctb[np.isnan(band)] = np.nan
    cols["bb_pctb"] = pctb

    r1 = pd.Series(np.concatenate([[np.nan], np.diff(log_c)]))
    for w in cfg.realized_vol_windows_bars:
        cols[f"rvol_{w}b"] = r1.rolling(w, min_periods=w).std(ddof=1).to_numpy()

    cols["volume_z"] = _rolling_z(pd.Series(np.log1p(v)), cfg.volume_z_window_bars, _VOLUME_STD_FLOOR)

    for p in cfg.ema_periods_bars:
        cols[f"ema_dist_{p}b"] = c / talib.EMA(c, timeperiod=p) - 1.0

    if FUNDING_COLUMN in candles.columns:
        last_rate = pd.Series(candles[FUNDING_COLUMN].to_numpy(dtype=np.float64)).ffill()
        cols["funding_bps"] = last_rate.to_numpy() * 1e4
        cols["funding_z"] = _rolling_z(last_rate, cfg.funding_z_window_bars, _FUNDING_STD_FLOOR)
    else:
        cols["funding_bps"] = np.zeros(n)
        cols["funding_z"] = np.zeros(n)

    hours = (index.hour + index.minute / 60.0).to_numpy(dtype=np.float64)
    days = index.dayofweek.to_numpy(dtype=np.float64) + hours / 24.0
    cols["hour_sin"] = np.sin(2.0 * np.pi * hours / 24.0)
    cols["hour_cos"] = np.cos(2.0 * np.pi * hours / 24.0)
    cols["dow_sin"] = np.sin(2.0 * np.pi * days / 7.0)
    cols["dow_cos"] = np.cos(2.0 * np.pi * days / 7.0)

    rng = h - l
    cols["bar_range"] = rng / c
    cols["close_loc"] = np.divide(c - l, rng, out=np.full(n, 0.5), where=rng > 0)

    names = feature_names(cfg)
    assert list(cols) == names, "feature_names and compute_features disagree"
    return pd.DataFrame({k: np.asarray(cols[k], dtype=np.float32) for k in names}, index=index)


def drop_warmup(features: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop the leading rows that contain NaN; refuse any non-finite value after them.

    Parameters
    ----------
    features : pandas.DataFrame
        Output of :func:`compute_features` (or any numeric frame), shape (T, F).

    Returns
    -------
    (pandas.DataFrame, int)
        The rows from the first fully-finite row on (a copy), and the number of rows dropped.

    Raises
    ------
    DataValidationError
        ``what="features"``: rule ``nan_after_warmup`` if a NaN or inf appears after the first
        fully-finite row (naming those rows) or if no row is fully finite; rule ``finite_values``
        if a warm-up row holds +-inf (inf is never a warm-up artefact).
    """
    values = features.to_numpy(dtype=np.float64)
    finite_rows = np.isfinite(values).all(axis=1)
    if not finite_rows.any():
        raise DataValidationError(
            "nan_after_warmup",
            what="features",
            detail=f"no fully-finite row among {len(features)} (too little history for the warm-up?)",
        )
    first = int(np.argmax(finite_rows))
    bad_after = np.flatnonzero(~finite_rows[first:]) + first
    if bad_after.size:
        bad_cols = [
            str(col) for col, bad in zip(features.columns, ~np.isfinite(values[bad_after]).all(axis=0)) if bad
        ]
        raise DataValidationError(
            "nan_after_warmup",
            features.index[bad_after],
            what="features",
            detail=f"non-finite values after the warm-up in columns {bad_cols}",
        )
    inf_rows = np.isinf(values[:first]).any(axis=1)
    if inf_rows.any():
        raise DataValidationError(
            "finite_values", features.index[:first][inf_rows], what="features", detail="inf in warm-up rows"
        )
    return features.iloc[first:].copy(), first
