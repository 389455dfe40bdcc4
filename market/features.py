"""Causal, scale-free features of candles (the observation's market part).

Every value in row t is computed from candles with open time <= t only: indicators are TA-Lib's
(forward recursions and trailing windows), rolling statistics are trailing windows that include bar
t, funding is forward-filled from settlements, and higher-timeframe features are joined by the
higher bar's *close* time. So computing on ``candles.iloc[:t+1]`` gives exactly the row t of the
full computation (truncation invariance; tested, and checked for every column by
``ats check lookahead``). Recursive indicators (EMA, Wilder's ATR/ADX/RSI smoothing, OBV) start at
the first row of the frame, so their values depend on where the frame starts (not on where it
ends): :func:`warmup_bars` bounds the leading NaN rows, :func:`min_history_bars` the history a
serving buffer needs for its last row to match the batch computation.

Normalisation: every feature is scale-free (a log return, a ratio to price, a bounded oscillator,
a z-score against a *trailing* window, or a calendar sine/cosine), so no statistic is fitted on
any period and the same function serves training and serving. The observation normaliser fitted
on the training period (``agents.observation.ObsNormalizer``) is stored in the bundle.

Columns (float32, in this order; ``{h}``, ``{w}``, ``{p}`` are windows from :class:`FeatureConfig`,
all in bars of the candle interval; ``r_t = ln(C_t / C_{t-1})``; O H L C V = open, high, low,
close, volume):

=======================  ==============================================  ===========================  ==============  ============================
name                     formula or TA-Lib function                      window (default)             unit            source
=======================  ==============================================  ===========================  ==============  ============================
``logret_{h}b``          ln(C_t / C_{t-h})                               ``return_horizons_bars``     log return      --
                                                                         (1, 3, 6, 12, 24, 72)
``atr_pct``              ``ATR`` / C                                     ``atr_period_bars`` (14)     fraction        Wilder 1978
``adx``                  ``ADX`` / 100                                   ``adx_period_bars`` (14)     [0, 1]          Wilder 1978
``plus_di``              ``PLUS_DI`` / 100                               ``adx_period_bars``          [0, 1]          Wilder 1978
``minus_di``             ``MINUS_DI`` / 100                              ``adx_period_bars``          [0, 1]          Wilder 1978
``rsi``                  ``RSI`` / 100                                   ``rsi_period_bars`` (14)     [0, 1]          Wilder 1978
``macd_hist_rel``        ``MACD`` histogram / C                          12 / 26 / 9                  fraction        Appel 1979
``bb_width``             ``BBANDS`` (upper - lower) / middle             ``bbands_period_bars`` (20)  fraction        Bollinger 2001
``bb_pctb``              (C - lower) / (upper - lower); 0.5 if equal     ``bbands_period_bars``       ratio           Bollinger 2001
``rvol_{w}b``            std(r, ddof=1)                                  ``realized_vol_windows_bars``  per-bar log   --
                                                                         (24, 72)
``volume_z``             z-score of ln(1 + V)                            ``volume_z_window_bars`` 48  z               --
``ema_dist_{p}b``        C / ``EMA``(p) - 1                              ``ema_periods_bars``         fraction        --
                                                                         (20, 50, 200)
``funding_bps``          last settled funding rate x 1e4 (ffill)         --                           bps             Binance
``funding_z``            z-score of the forward-filled rate              ``funding_z_window_bars``    z               --
                                                                         (168)
``hour_sin/cos``         sin/cos(2 pi hour / 24) of the open time        --                           [-1, 1]         --
``dow_sin/cos``          sin/cos(2 pi day / 7), Monday 0, fractional     --                           [-1, 1]         --
``bar_range``            (H - L) / C                                     1                            fraction        --
``close_loc``            (C - L) / (H - L); 0.5 if H == L                1                            [0, 1]          --
``parkinson_vol_{w}b``   sqrt(mean(ln(H/L)^2) / (4 ln 2))                ``parkinson_window_bars``    per-bar log     Parkinson 1980
                                                                         (24)
``gk_vol_{w}b``          sqrt(mean(0.5 ln(H/L)^2                         ``garman_klass_window_bars`` per-bar log     Garman & Klass 1980
                         - (2 ln 2 - 1) ln(C/O)^2))                      (24)
``ema_slope_{p}b``       ln(EMA_t / EMA_{t-k}) / k, k =                  ``ema_periods_bars``         log / bar       --
                         ``ema_slope_lag_bars`` (5)
``stochrsi_k``           ``STOCHRSI`` fastk / 100 (0 if RSI flat)        ``stochrsi_period_bars``     [0, 1]          Chande & Kroll 1994
                                                                         (RSI 14, stoch 14)
``stochrsi_d``           ``STOCHRSI`` fastd (SMA 3 of fastk) / 100       ``stochrsi_period_bars``     [0, 1]          Chande & Kroll 1994
``obv_slope_{w}b``       (``OBV``_t - ``OBV``_{t-w}) / sum(V);           ``obv_window_bars`` (24)     [-1, 1]         Granville 1963
                         0 if no volume
``vwap_dist_{w}b``       C / VWAP - 1, VWAP = sum(TP V) / sum(V),        ``vwap_window_bars`` (24)    fraction        --
                         TP = (H+L+C)/3; mean TP if no volume
``hurst_{w}b``           OLS slope of ln std(x_t - x_{t-k}) on ln k,     ``hurst_window_bars`` (128)  [0, 1]          Mandelbrot & Van Ness 1968;
                         x = ln C, k = 1, 2, 4, 8, 16; 0.5 if flat                                                    Taqqu et al. 1995
``er_{w}b``              abs(C_t - C_{t-w}) / sum abs(C_j - C_{j-1});    ``efficiency_window_bars``   [0, 1]          Kaufman 1995
                         0 if flat                                       (10)
``sign_entropy_{w}b``    binary Shannon entropy of p = share of r > 0    ``entropy_window_bars`` (24) bits, [0, 1]    Shannon 1948
``skew_{w}b``            skewness of r (bias-corrected); 0 if flat       ``moments_window_bars`` (72) --              --
``kurt_{w}b``            excess kurtosis of r (bias-corrected);          ``moments_window_bars``      --              --
                         0 if flat
``autocorr1_{w}b``       corr(r_t, r_{t-1}) over the window; 0 if flat   ``moments_window_bars``      [-1, 1]         --
``dist_high_{w}b``       C / ``MAX``(H) - 1                              ``range_window_bars`` (168)  fraction <= 0   --
``dist_low_{w}b``        C / ``MIN``(L) - 1                              ``range_window_bars``        fraction >= 0   --
``funding_cum_{w}b_bps`` sum of funding settled in the last w bars x 1e4 ``funding_cum_window_bars``  bps             Binance
                                                                         (24 = 24 h of 1h bars)
``is_gap``               the candles' ``is_gap`` column (1.0 = a bar     --                           {0, 1}          --
                         filled by the gap policy), else 0.0
``htf_{tf}_{name}``      higher-timeframe features, see below            in ``tf`` bars               as above        as above
=======================  ==============================================  ===========================  ==============  ============================

Funding: the rate settled at open time T is known by the close of that bar, so forward-filling it
is causal. If the candles have no ``funding_rate`` column, the three funding features are 0.0 on
every row (the schema never changes); if they have one, the rows before the first settlement are
NaN (warm-up). Z-scores whose trailing std is (numerically) zero are 0.0.

Higher timeframes (opt-in, ``FeatureConfig.higher_timeframes``, e.g. ``("4h",)``): the candles
are resampled into bins of ``tf`` anchored on the Unix epoch (4h bins start at 00:00, 04:00, ...
UTC); only *complete* bins are kept (a bin of ``tf / interval`` bars; the partial first and last
bins of a frame are dropped). On the complete bins :data:`HTF_FEATURES` are computed (windows in
``tf`` bars). A row with open time t (closing at t + interval) gets the values of the last bin
whose close time (bin open + tf) is <= t + interval: a 1h bar never sees a 4h bar that has not
closed yet (the 1h bar 03:00-04:00 is the first to see the 00:00-04:00 bar). See
:func:`resample_candles` and :func:`higher_timeframe_features`.

Sources: ATR, ADX/DI and RSI: Wilder (1978), *New Concepts in Technical Trading Systems*; MACD:
Appel (1979); Bollinger bands: Bollinger (2001), *Bollinger on Bollinger Bands*; Stochastic RSI:
Chande & Kroll (1994), *The New Technical Trader*; OBV: Granville (1963), *Granville's New Key to
Stock Market Profits*; all as implemented by TA-Lib (https://ta-lib.org). Parkinson (1980), "The
extreme value method for estimating the variance of the rate of return", *J. Business* 53(1);
Garman & Klass (1980), "On the estimation of security price volatilities from historical data",
*J. Business* 53(1). Hurst exponent: the std of k-lag differences of an fBm path scales as k^H
(Mandelbrot & Van Ness 1968, *SIAM Review* 10(4)); the log-log regression over lags is the
variogram / aggregated-variance family of estimators compared in Taqqu, Teverovsky & Willinger
(1995), "Estimators for long-range dependence: an empirical study", *Fractals* 3(4). Efficiency
ratio: Kaufman (1995), *Smarter Trading*. Entropy: Shannon (1948).

ATR, the rolling helpers, the Hurst exponent and the higher-timeframe features are computed in
:mod:`market.feature_blocks` (re-exported here).
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pandas as pd
import talib
from pydantic import Field, field_validator, model_validator

from market.candles import FUNDING_COLUMN, check_candles
from market.config_base import StrictConfig
from market.errors import DataValidationError
from market.feature_blocks import (
    _RETURN_STD_FLOOR,
    HTF_EMA_PERIOD_BARS,
    HTF_RETURN_HORIZONS_BARS,
    HTF_RVOL_WINDOW_BARS,
    HURST_LAGS_BARS,
    _htf_factor,
    _log_returns,
    _rolling_sum,
    _rolling_z,
    _safe_ratio,
    higher_timeframe_features,
    higher_timeframe_names,
    hurst_exponent,
)
from market.feature_blocks import HTF_FEATURES as HTF_FEATURES
from market.feature_blocks import atr as atr
from market.feature_blocks import resample_candles as resample_candles
from market.rolling import rolling_corr, rolling_kurt, rolling_mean, rolling_skew, rolling_std

IS_GAP_COLUMN = "is_gap"
"""Optional candle column (float64 0.0/1.0) set by the gap policy ``mark``; passed through as a feature."""

_FUNDING_STD_FLOOR = 1e-12
"""A trailing std of the funding rate at or below this (fraction) counts as zero: z-score 0."""
_VOLUME_STD_FLOOR = 1e-12
"""A trailing std of log(1 + volume) at or below this counts as zero: z-score 0."""
_BB_WIDTH_FLOOR = 1e-12
"""Bands closer than this fraction of the middle band count as coinciding: %B 0.5."""


_TIMEFRAME_RE = re.compile(r"^[1-9][0-9]*(min|h|d)$")


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
        (20, 50, 200), description="EMA periods of the close/EMA - 1 distance and EMA slope features, bars"
    )
    funding_z_window_bars: int = Field(168, description="trailing window of the funding-rate z-score, bars")
    parkinson_window_bars: int = Field(24, description="window of the Parkinson high-low volatility, bars")
    garman_klass_window_bars: int = Field(24, description="window of the Garman-Klass OHLC volatility, bars")
    ema_slope_lag_bars: int = Field(5, description="lag k of the EMA slope ln(EMA_t / EMA_{t-k}) / k, bars")
    stochrsi_period_bars: int = Field(
        14, description="Stochastic RSI: RSI period and stochastic window (%D = SMA 3 of %K), bars"
    )
    obv_window_bars: int = Field(24, description="window of the OBV slope (signed volume / volume), bars")
    vwap_window_bars: int = Field(24, description="window of the rolling VWAP, bars")
    hurst_window_bars: int = Field(128, description="window of log prices of the Hurst estimator, bars")
    efficiency_window_bars: int = Field(10, description="window of Kaufman's efficiency ratio, bars")
    entropy_window_bars: int = Field(24, description="window of the entropy of return signs, bars")
    moments_window_bars: int = Field(
        72, description="window of the skewness, kurtosis and lag-1 autocorrelation of returns, bars"
    )
    range_window_bars: int = Field(168, description="window of the rolling high / low distances, bars")
    funding_cum_window_bars: int = Field(
        24, description="window of the cumulative funding (24 = 24 h of 1h bars), bars"
    )
    higher_timeframes: tuple[str, ...] = Field(
        (), description="higher timeframes whose HTF_FEATURES are joined by close time, e.g. ('4h',)"
    )

    @field_validator("return_horizons_bars", "realized_vol_windows_bars", "ema_periods_bars")
    @classmethod
    def _non_empty_unique(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("must list at least one window")
        if len(set(value)) != len(value):
            raise ValueError(f"windows must be unique, got {value}")
        return value

    @field_validator("higher_timeframes")
    @classmethod
    def _timeframes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"higher_timeframes must be unique, got {value}")
        for tf in value:
            if not _TIMEFRAME_RE.match(tf):
                raise ValueError(f"higher timeframe {tf!r} must look like '15min', '4h' or '1d'")
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
            "parkinson_window_bars": 1,
            "garman_klass_window_bars": 1,
            "ema_slope_lag_bars": 1,
            "stochrsi_period_bars": 2,
            "obv_window_bars": 1,
            "vwap_window_bars": 1,
            "hurst_window_bars": 2 * max(HURST_LAGS_BARS) + 2,
            "efficiency_window_bars": 1,
            "entropy_window_bars": 2,
            "moments_window_bars": 4,
            "range_window_bars": 1,
            "funding_cum_window_bars": 1,
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


def _base_feature_names(cfg: FeatureConfig) -> list[str]:
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
        f"parkinson_vol_{cfg.parkinson_window_bars}b",
        f"gk_vol_{cfg.garman_klass_window_bars}b",
        *(f"ema_slope_{p}b" for p in cfg.ema_periods_bars),
        "stochrsi_k",
        "stochrsi_d",
        f"obv_slope_{cfg.obv_window_bars}b",
        f"vwap_dist_{cfg.vwap_window_bars}b",
        f"hurst_{cfg.hurst_window_bars}b",
        f"er_{cfg.efficiency_window_bars}b",
        f"sign_entropy_{cfg.entropy_window_bars}b",
        f"skew_{cfg.moments_window_bars}b",
        f"kurt_{cfg.moments_window_bars}b",
        f"autocorr1_{cfg.moments_window_bars}b",
        f"dist_high_{cfg.range_window_bars}b",
        f"dist_low_{cfg.range_window_bars}b",
        f"funding_cum_{cfg.funding_cum_window_bars}b_bps",
        IS_GAP_COLUMN,
    ]


def feature_names(cfg: FeatureConfig) -> list[str]:
    """Column names of :func:`compute_features` for ``cfg``, in order, without computing anything."""
    names = _base_feature_names(cfg)
    for tf in cfg.higher_timeframes:
        names += higher_timeframe_names(tf)
    return names


def _htf_warmup_bars(cfg: FeatureConfig) -> int:
    """Leading NaN rows of the higher-timeframe features, in bars of that timeframe."""
    return int(
        max(
            3 * HTF_EMA_PERIOD_BARS,
            5 * max(cfg.adx_period_bars, cfg.atr_period_bars, cfg.rsi_period_bars),
            HTF_RVOL_WINDOW_BARS + 1,
            max(HTF_RETURN_HORIZONS_BARS) + 1,
        )
    )


def warmup_bars(cfg: FeatureConfig, bar_interval: pd.Timedelta | str = "1h") -> int:
    """Conservative number of leading bars before every feature is defined and converged.

    Bounds both the NaN warm-up rows of :func:`compute_features` and the history that recursive
    indicators need before their start-up value stops mattering: 3 x the longest EMA (the weight
    of the seed decays as (1 - 2/(p+1))^n, about e^-6 after 3p bars), 3 x (slow + signal) for MACD,
    5 x the Wilder periods (ADX is smoothed twice), 3 x the Stochastic RSI period plus 3, the
    longest trailing window plus one (the Hurst window plus its longest lag), the funding z-score
    window plus 32 bars (one 8-hour funding interval at 15-minute bars: the wait for the first
    settlement; bars of 15 minutes or longer are assumed), and for each higher timeframe its own
    warm-up (in its bars, plus one partial bin) times the number of base bars per higher bar.

    Parameters
    ----------
    cfg : FeatureConfig
        Windows.
    bar_interval : pandas.Timedelta or str, default "1h"
        Interval of the candles; used only to convert ``cfg.higher_timeframes`` into bars.

    Returns
    -------
    int
        Number of bars (>= the leading NaN rows of ``compute_features`` on gap-free candles with
        funding settlements every 8 hours).

    Raises
    ------
    ValueError
        If a higher timeframe is not a whole multiple (>= 2) of ``bar_interval``.
    """
    terms = [
        3 * max(cfg.ema_periods_bars),
        3 * (cfg.macd_slow_bars + cfg.macd_signal_bars),
        5 * max(cfg.adx_period_bars, cfg.atr_period_bars, cfg.rsi_period_bars),
        3 * cfg.stochrsi_period_bars + 3,
        cfg.bbands_period_bars,
        max(cfg.return_horizons_bars) + 1,
        max(cfg.realized_vol_windows_bars) + 1,
        cfg.volume_z_window_bars,
        cfg.funding_z_window_bars + 32,
        cfg.funding_cum_window_bars + 32,
        max(cfg.ema_periods_bars) + cfg.ema_slope_lag_bars,
        cfg.parkinson_window_bars,
        cfg.garman_klass_window_bars,
        cfg.obv_window_bars + 1,
        cfg.vwap_window_bars,
        cfg.hurst_window_bars + 1,
        cfg.efficiency_window_bars + 1,
        cfg.entropy_window_bars + 1,
        cfg.moments_window_bars + 2,
        cfg.range_window_bars,
    ]
    for tf in cfg.higher_timeframes:
        terms.append((_htf_warmup_bars(cfg) + 1) * _htf_factor(tf, bar_interval))
    return int(max(terms))


def min_history_bars(cfg: FeatureConfig, bar_interval: pd.Timedelta | str = "1h") -> int:
    """Candles a serving buffer needs so that its last feature row matches the batch computation.

    Trailing-window features are identical once the buffer covers their window; recursive ones
    (EMA, MACD, Wilder's ATR/ADX/RSI, Stochastic RSI) depend on their seed, whose weight after n
    bars is (1 - 2/(p+1))^n for an EMA of period p and (1 - 1/p)^n for Wilder smoothing. The
    bound is 5 x the longest EMA period (seed weight about e^-10 = 4.5e-5), 5 x (MACD slow +
    signal), 10 x the Wilder periods (ADX smooths twice; e^-10 again), the warm-up of
    :func:`warmup_bars`, and 2 x the higher-timeframe warm-up in base bars. With the defaults it
    is 1,000 bars (the serving loop's default ``context_bars``). Measured on the bundled BTCUSDT
    data (300 buffer end points, float32 outputs): the largest deviation of the buffer's last row
    from the batch row is 1.9e-5 in ``ema_dist_200b`` (0.002 % of price), 2e-7 in
    ``ema_slope_200b``, 3e-7 in ``htf_4h_adx``, <= 4e-9 elsewhere
    (``tests/market/test_features.py`` asserts 5e-5 for EMA-based columns, 1e-6 for the others).

    Parameters
    ----------
    cfg : FeatureConfig
        Windows.
    bar_interval : pandas.Timedelta or str, default "1h"
        Interval of the candles; used only to convert ``cfg.higher_timeframes`` into bars.

    Returns
    -------
    int
        Number of candles (the last of them being the bar whose features are served).

    Raises
    ------
    ValueError
        If a higher timeframe is not a whole multiple (>= 2) of ``bar_interval``.
    """
    terms = [
        5 * max(cfg.ema_periods_bars),
        5 * (cfg.macd_slow_bars + cfg.macd_signal_bars),
        10 * max(cfg.adx_period_bars, cfg.atr_period_bars, cfg.rsi_period_bars, cfg.stochrsi_period_bars),
        warmup_bars(cfg, bar_interval),
    ]
    for tf in cfg.higher_timeframes:
        terms.append(2 * (_htf_warmup_bars(cfg) + 1) * _htf_factor(tf, bar_interval))
    return int(max(terms))


def compute_features(
    candles: pd.DataFrame, cfg: FeatureConfig, *, validate: bool = True, tail_rows: int | None = None
) -> pd.DataFrame:
    """Compute the causal feature matrix (see the module docstring for the columns).

    Parameters
    ----------
    candles : pandas.DataFrame
        Canonical candles (T rows, gap-free, UTC open-time index), optionally with ``funding_rate``
        and ``is_gap`` (float64, 0.0 or 1.0).
    cfg : FeatureConfig
        Windows.
    validate : bool
        Check the candles first (default). ``False`` is for callers that have validated these very
        candles already: the serving loops validate every candle before a decision context is built
        (``serving.loop``, ``serving.live.validate_window``), and the serving policy re-checks its
        observation for non-finite values; skipping saves ~2 ms per bar on a 1,000-bar history.
    tail_rows : int | None
        Compute the trailing-window statistics only for the last ``tail_rows`` rows (the earlier rows
        are NaN, dropped by :func:`drop_warmup`); None: every row. Rows that are computed are
        identical to the full computation's (each window statistic depends on its window only). The
        recursive TA-Lib indicators always run over the whole frame. Serving uses it: the policy
        needs the last TCN window of rows, not the whole history.

    Returns
    -------
    pandas.DataFrame
        float32, shape (T, len(feature_names(cfg))), same index as ``candles``. NaN only in a
        leading block of warm-up rows (drop them with :func:`drop_warmup`).

    Raises
    ------
    DataValidationError
        If the candles break a rule of :func:`market.candles.validate_candles` (checked against
        their own median spacing): a non-finite price, a gap, an inconsistent bar, ...; rule
        ``is_gap_values`` if an ``is_gap`` value is not 0.0 or 1.0 (the rows are named).
    ValueError
        If a higher timeframe of ``cfg`` is not a whole multiple (>= 2) of the candle interval.
    """
    if validate:
        check_candles(candles, source="compute_features input")
    index = candles.index
    o, h, lo, c, v = (
        np.ascontiguousarray(candles[k].to_numpy(dtype=np.float64))
        for k in ("open", "high", "low", "close", "volume")
    )
    n = len(c)
    if tail_rows is not None and tail_rows < 1:
        raise ValueError(f"tail_rows must be >= 1 or None, got {tail_rows}")
    first = 0 if tail_rows is None else max(0, n - int(tail_rows))
    cols: dict[str, np.ndarray] = {}
    log_c = np.log(c)

    for hb in cfg.return_horizons_bars:
        cols[f"logret_{hb}b"] = _log_returns(log_c, hb)

    cols["atr_pct"] = talib.ATR(h, lo, c, timeperiod=cfg.atr_period_bars) / c
    cols["adx"] = talib.ADX(h, lo, c, timeperiod=cfg.adx_period_bars) / 100.0
    cols["plus_di"] = talib.PLUS_DI(h, lo, c, timeperiod=cfg.adx_period_bars) / 100.0
    cols["minus_di"] = talib.MINUS_DI(h, lo, c, timeperiod=cfg.adx_period_bars) / 100.0
    cols["rsi"] = talib.RSI(c, timeperiod=cfg.rsi_period_bars) / 100.0
    _, _, hist = talib.MACD(
        c, fastperiod=cfg.macd_fast_bars, slowperiod=cfg.macd_slow_bars, signalperiod=cfg.macd_signal_bars
    )
    cols["macd_hist_rel"] = hist / c
    upper, middle, lower = talib.BBANDS(
        c, timeperiod=cfg.bbands_period_bars, nbdevup=cfg.bbands_nbdev, nbdevdn=cfg.bbands_nbdev, matype=talib.MA_Type.SMA
    )
    band = upper - lower
    cols["bb_width"] = band / middle
    flat = band <= _BB_WIDTH_FLOOR * middle
    pctb = np.divide(c - lower, band, out=np.full(n, 0.5), where=~flat)
    pctb[np.isnan(band)] = np.nan
    cols["bb_pctb"] = pctb

    r1_arr = _log_returns(log_c, 1)
    for w in cfg.realized_vol_windows_bars:
        cols[f"rvol_{w}b"] = rolling_std(r1_arr, w, 1, first)

    cols["volume_z"] = _rolling_z(np.log1p(v), cfg.volume_z_window_bars, _VOLUME_STD_FLOOR, first)

    emas = {p: talib.EMA(c, timeperiod=p) for p in cfg.ema_periods_bars}
    for p in cfg.ema_periods_bars:
        cols[f"ema_dist_{p}b"] = c / emas[p] - 1.0

    if FUNDING_COLUMN in candles.columns:
        rate = candles[FUNDING_COLUMN].to_numpy(dtype=np.float64)
        last_rate = pd.Series(rate).ffill()
        cols["funding_bps"] = last_rate.to_numpy() * 1e4
        cols["funding_z"] = _rolling_z(last_rate.to_numpy(), cfg.funding_z_window_bars, _FUNDING_STD_FLOOR, first)
        cum = _rolling_sum(np.nan_to_num(rate, nan=0.0), cfg.funding_cum_window_bars, first) * 1e4
        cum[last_rate.isna().to_numpy()] = np.nan  # before the first settlement: unknown, not zero
        funding_cum = cum
    else:
        cols["funding_bps"] = np.zeros(n)
        cols["funding_z"] = np.zeros(n)
        funding_cum = np.zeros(n)

    ns = index.as_unit("ns").asi8  # UTC epoch; 1970-01-01 was a Thursday (Monday = 0 -> + 3)
    hours = (ns // 3_600_000_000_000) % 24 + ((ns // 60_000_000_000) % 60) / 60.0
    days = ((ns // 86_400_000_000_000) + 3) % 7 + hours / 24.0
    cols["hour_sin"] = np.sin(2.0 * np.pi * hours / 24.0)
    cols["hour_cos"] = np.cos(2.0 * np.pi * hours / 24.0)
    cols["dow_sin"] = np.sin(2.0 * np.pi * days / 7.0)
    cols["dow_cos"] = np.cos(2.0 * np.pi * days / 7.0)

    rng = h - lo
    cols["bar_range"] = rng / c
    cols["close_loc"] = np.divide(c - lo, rng, out=np.full(n, 0.5), where=rng > 0)

    # --- range-based volatility (Parkinson 1980; Garman & Klass 1980), per-bar log units
    log_hl2 = np.log(h / lo) ** 2
    log_co2 = np.log(c / o) ** 2
    pk_w, gk_w = cfg.parkinson_window_bars, cfg.garman_klass_window_bars
    pk_mean = rolling_mean(log_hl2, pk_w, first)
    cols[f"parkinson_vol_{pk_w}b"] = np.sqrt(np.maximum(pk_mean, 0.0) / (4.0 * np.log(2.0)))
    gk_term = 0.5 * log_hl2 - (2.0 * np.log(2.0) - 1.0) * log_co2
    gk_mean = rolling_mean(gk_term, gk_w, first)
    cols[f"gk_vol_{gk_w}b"] = np.sqrt(np.maximum(gk_mean, 0.0))

    # --- trend: EMA slopes
    k = cfg.ema_slope_lag_bars
    for p in cfg.ema_periods_bars:
        cols[f"ema_slope_{p}b"] = _log_returns(np.log(emas[p]), k) / k

    # --- Stochastic RSI (TA-Lib: 0 where RSI is flat over the window)
    sp = cfg.stochrsi_period_bars
    fastk, fastd = talib.STOCHRSI(c, timeperiod=sp, fastk_period=sp, fastd_period=3, fastd_matype=talib.MA_Type.SMA)
    cols["stochrsi_k"] = np.clip(fastk / 100.0, 0.0, 1.0)  # clip: SMA rounding can leave -1e-15
    cols["stochrsi_d"] = np.clip(fastd / 100.0, 0.0, 1.0)

    # --- volume: OBV slope, VWAP distance
    ow = cfg.obv_window_bars
    obv = talib.OBV(c, v)
    obv_change = np.full(n, np.nan)
    if n > ow:
        obv_change[ow:] = obv[ow:] - obv[:-ow]
    vol_sum_obv = _rolling_sum(v, ow, first)
    vol_sum_obv[:ow] = np.nan  # the change needs w + 1 bars
    cols[f"obv_slope_{ow}b"] = np.clip(_safe_ratio(obv_change, vol_sum_obv, 0.0, 0.0), -1.0, 1.0)
    vw = cfg.vwap_window_bars
    tp = (h + lo + c) / 3.0
    pv_sum, v_sum = _rolling_sum(tp * v, vw, first), _rolling_sum(v, vw, first)
    tp_mean = _rolling_sum(tp, vw, first) / vw
    vwap = np.where(v_sum > 0.0, np.divide(pv_sum, v_sum, out=np.ones(n), where=v_sum > 0.0), tp_mean)
    vwap[np.isnan(v_sum)] = np.nan
    cols[f"vwap_dist_{vw}b"] = c / vwap - 1.0

    # --- structure
    cols[f"hurst_{cfg.hurst_window_bars}b"] = hurst_exponent(log_c, cfg.hurst_window_bars, first_row=first)
    ew = cfg.efficiency_window_bars
    net = np.full(n, np.nan)
    if n > ew:
        net[ew:] = np.abs(c[ew:] - c[:-ew])
    path = _rolling_sum(np.abs(np.concatenate([[np.nan], np.diff(c)])), ew, first)
    cols[f"er_{ew}b"] = np.clip(_safe_ratio(net, path, 0.0, 0.0), 0.0, 1.0)
    nw = cfg.entropy_window_bars
    up = np.where(np.isnan(r1_arr), np.nan, (r1_arr > 0.0).astype(np.float64))
    p_up = _rolling_sum(up, nw, first) / nw
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -(p_up * np.log2(p_up) + (1.0 - p_up) * np.log2(1.0 - p_up))
    ent[(p_up == 0.0) | (p_up == 1.0)] = 0.0
    cols[f"sign_entropy_{nw}b"] = ent
    mw = cfg.moments_window_bars
    r_std = rolling_std(r1_arr, mw, 0, first)
    moving = r_std > _RETURN_STD_FLOOR
    for name, values in (("skew", rolling_skew(r1_arr, mw, first)), ("kurt", rolling_kurt(r1_arr, mw, first))):
        out = np.where(moving & np.isfinite(values), values, 0.0)  # pandas may give NaN at tiny variance
        out[np.isnan(r_std)] = np.nan
        cols[f"{name}_{mw}b"] = out
    lagged = np.full(n, np.nan)
    lagged[1:] = r1_arr[:-1]
    ac = rolling_corr(r1_arr, lagged, mw, first)
    lag_std = rolling_std(lagged, mw, 0, first)
    ac = np.where(moving & (lag_std > _RETURN_STD_FLOOR) & np.isfinite(ac), np.clip(ac, -1.0, 1.0), 0.0)
    ac[np.isnan(lag_std) | np.isnan(r_std)] = np.nan
    cols[f"autocorr1_{mw}b"] = ac
    rw = cfg.range_window_bars
    cols[f"dist_high_{rw}b"] = c / talib.MAX(h, timeperiod=rw) - 1.0 if rw > 1 else c / h - 1.0
    cols[f"dist_low_{rw}b"] = c / talib.MIN(lo, timeperiod=rw) - 1.0 if rw > 1 else c / lo - 1.0

    # --- funding cumulative, gap flag
    cols[f"funding_cum_{cfg.funding_cum_window_bars}b_bps"] = funding_cum
    cols[IS_GAP_COLUMN] = _is_gap_column(candles)

    for tf in cfg.higher_timeframes:
        htf = higher_timeframe_features(candles, tf, cfg)
        for name in htf.columns:
            cols[name] = htf[name].to_numpy()

    names = feature_names(cfg)
    assert list(cols) == names, "feature_names and compute_features disagree"
    matrix = np.empty((n, len(names)), dtype=np.float32)  # one block: far cheaper than a dict of columns
    for j, name in enumerate(names):
        matrix[:, j] = cols[name]
    return pd.DataFrame(matrix, index=index, columns=_column_index(tuple(names)), copy=False)


@functools.lru_cache(maxsize=64)
def _column_index(names: tuple[str, ...]) -> pd.Index:
    """The feature columns as a (cached, immutable) pandas Index: building it costs ~0.5 ms per call."""
    return pd.Index(names)


def _is_gap_column(candles: pd.DataFrame) -> np.ndarray:
    """The ``is_gap`` candle column as float64 0/1, or zeros when absent; refuses other values."""
    if IS_GAP_COLUMN not in candles.columns:
        return np.zeros(len(candles))
    flag = pd.to_numeric(candles[IS_GAP_COLUMN], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(flag, (0.0, 1.0))
    if bad.any():
        raise DataValidationError(
            "is_gap_values",
            candles.index[bad],
            source="compute_features input",
            detail="is_gap must be 0.0 or 1.0",
        )
    return flag


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
            str(col) for col, bad in zip(features.columns, ~np.isfinite(values[bad_after]).all(axis=0), strict=True) if bad
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
