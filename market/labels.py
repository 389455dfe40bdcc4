"""Triple-barrier labels (López de Prado 2018, *Advances in Financial Machine Learning*, ch. 3).

From bar t, with entry at ``close_t``, an upper barrier ``close_t + upper_atr_mult x ATR_t`` and a
lower barrier ``close_t - lower_atr_mult x ATR_t`` (ATR in price units, so the barriers scale with
volatility, as AFML's ``p_t (1 +- k sigma_t)`` with ``sigma_t = ATR_t / p_t``), and a vertical
barrier ``horizon_bars`` bars later. The path of bars t+1 .. t+H is scanned with their highs and
lows; a barrier counts as touched when ``high >= upper`` or ``low <= lower``. The label is the
first barrier touched:

* :data:`LABEL_UP` (2): the upper barrier first;
* :data:`LABEL_DOWN` (0): the lower barrier first;
* :data:`LABEL_TIMEOUT` (1): neither within H bars, **or both within the same bar** (the bar's
  high and low do not tell which came first; calling it up or down would bias the labels, so the
  ambiguous bar ends the scan as a time-out);
* :data:`LABEL_UNDEFINED` (-1): the last ``horizon_bars`` rows (their window runs past the data)
  and rows whose ATR is NaN (the first ``atr_period_bars`` rows).

A label at t depends on prices up to bar ``t + horizon_bars`` (:func:`label_end_index`): train/test
splits need a purge of at least ``horizon_bars`` bars (AFML ch. 7).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from market.candles import check_candles
from market.config_base import StrictConfig
from market.features import atr

LABEL_DOWN = 0
LABEL_TIMEOUT = 1
LABEL_UP = 2
LABEL_UNDEFINED = -1


class TripleBarrierConfig(StrictConfig):
    """Barrier geometry of the triple-barrier labels."""

    horizon_bars: int = Field(24, description="vertical barrier: bars after t scanned for a touch")
    upper_atr_mult: float = Field(2.0, description="upper barrier distance from close_t, in ATRs")
    lower_atr_mult: float = Field(2.0, description="lower barrier distance from close_t, in ATRs")
    atr_period_bars: int = Field(14, description="ATR period (Wilder smoothing), bars")

    @model_validator(mode="after")
    def _check_ranges(self) -> TripleBarrierConfig:
        if self.horizon_bars < 1:
            raise ValueError(f"horizon_bars must be >= 1, got {self.horizon_bars}")
        if self.atr_period_bars < 1:
            raise ValueError(f"atr_period_bars must be >= 1, got {self.atr_period_bars}")
        for name in ("upper_atr_mult", "lower_atr_mult"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        return self


def triple_barrier_labels(candles: pd.DataFrame, cfg: TripleBarrierConfig) -> np.ndarray:
    """Label every bar with the triple-barrier outcome (see the module docstring).

    Parameters
    ----------
    candles : pandas.DataFrame
        Canonical candles, T rows (gap-free, validated against their own spacing).
    cfg : TripleBarrierConfig
        Horizon and barrier widths.

    Returns
    -------
    numpy.ndarray
        int8, shape (T,): 0 down, 1 time-out, 2 up, -1 undefined.

    Raises
    ------
    DataValidationError
        If the candles break a rule of :func:`market.candles.validate_candles`.
    """
    check_candles(candles, source="triple_barrier_labels input")
    high = candles["high"].to_numpy(dtype=np.float64)
    low = candles["low"].to_numpy(dtype=np.float64)
    close = candles["close"].to_numpy(dtype=np.float64)
    n = len(close)
    horizon = cfg.horizon_bars
    labels = np.full(n, LABEL_UNDEFINED, dtype=np.int8)
    m = n - horizon  # rows 0..m-1 have a full window t+1..t+H inside the data
    if m <= 0:
        return labels

    width = atr(candles, cfg.atr_period_bars)[:m]
    upper = close[:m] + cfg.upper_atr_mult * width
    lower = close[:m] - cfg.lower_atr_mult * width
    out = np.full(m, LABEL_TIMEOUT, dtype=np.int8)
    open_ = np.ones(m, dtype=bool)  # no barrier touched yet
    for k in range(1, horizon + 1):
        up = high[k : k + m] >= upper
        down = low[k : k + m] <= lower
        out[open_ & up & ~down] = LABEL_UP
        out[open_ & down & ~up] = LABEL_DOWN
        # both in one bar: stays LABEL_TIMEOUT; either way the scan ends for that row
        open_ &= ~(up | down)
        if not open_.any():
            break
    out[np.isnan(width)] = LABEL_UNDEFINED
    labels[:m] = out
    return labels


def label_end_index(t: int, cfg: TripleBarrierConfig) -> int:
    """Index of the last bar whose prices the label at bar ``t`` depends on: ``t + horizon_bars``.

    Used to purge training samples whose label window overlaps a test window (AFML ch. 7).
    """
    return int(t) + cfg.horizon_bars
