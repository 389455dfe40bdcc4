"""Typed, frozen configuration of the V1 rule engine (adaptive breakout-trend)."""

from __future__ import annotations

from pydantic import Field, model_validator

from market.config_base import StrictConfig


class V1Config(StrictConfig):
    """Parameters of :class:`fallback.v1.V1Policy`; every field is read by the engine.

    Raises
    ------
    pydantic.ValidationError
        On an unknown key, a value out of its range, EMA periods not strictly increasing
        (fast < mid < slow) or ``bb_width_pct_min > bb_width_pct_max``.
    """

    # Layer 1: environment filter
    adx_period_bars: int = Field(14, ge=2, description="Wilder ADX / +DI / -DI period, in bars.")
    adx_min: float = Field(20.0, ge=0.0, le=100.0, description="Minimum ADX (trend strength) to trade.")
    bb_period_bars: int = Field(20, ge=2, description="Bollinger band moving-average period, in bars.")
    bb_width_lookback_bars: int = Field(
        500, ge=2, description="Bars of Bollinger-width history the current width is ranked against."
    )
    bb_width_pct_min: float = Field(
        0.10, ge=0.0, le=1.0, description="Lowest allowed percentile rank of the Bollinger width (0..1)."
    )
    bb_width_pct_max: float = Field(
        0.95, ge=0.0, le=1.0, description="Highest allowed percentile rank of the Bollinger width (0..1)."
    )
    volume_ma_bars: int = Field(20, ge=1, description="Simple moving average period of volume, in bars.")
    volume_min_ratio: float = Field(
        0.8, ge=0.0, description="Minimum ratio volume_t / SMA(volume)_t (participation filter)."
    )
    # Layer 2: direction
    ema_fast_bars: int = Field(20, ge=2, description="Fast EMA period, in bars.")
    ema_mid_bars: int = Field(50, ge=2, description="Middle EMA period, in bars.")
    ema_slow_bars: int = Field(200, ge=2, description="Slow EMA period, in bars.")
    # Layer 3: trigger
    breakout_k: float = Field(
        0.5,
        ge=0.0,
        description="Breakout threshold: close must pass open +/- k x previous bar's range (high - low).",
    )
    # Risk and sizing
    atr_period_bars: int = Field(14, ge=1, description="Wilder ATR period, in bars (stop distance unit).")
    stop_atr_mult: float = Field(1.5, gt=0.0, description="Stop-loss distance from the fill, in ATRs.")
    reward_risk_ratio: float = Field(
        2.0, gt=0.0, description="Take-profit distance as a multiple of the stop distance."
    )
    risk_per_trade_frac: float = Field(
        0.01, gt=0.0, le=1.0, description="Fraction of equity lost if the stop is hit (before costs)."
    )
    max_leverage: float = Field(3.0, ge=1.0, description="Cap on leverage (and on notional / equity).")
    history_bars: int = Field(
        600, ge=3, description="Trailing candles the engine needs and uses; fewer -> flat (not ready)."
    )

    @model_validator(mode="after")
    def _check_orderings(self) -> V1Config:
        if not self.ema_fast_bars < self.ema_mid_bars < self.ema_slow_bars:
            raise ValueError(
                "EMA periods must satisfy ema_fast_bars < ema_mid_bars < ema_slow_bars, got "
                f"{self.ema_fast_bars}, {self.ema_mid_bars}, {self.ema_slow_bars}"
            )
        if self.bb_width_pct_min > self.bb_width_pct_max:
            raise ValueError(
                f"bb_width_pct_min ({self.bb_width_pct_min}) must be <= bb_width_pct_max "
                f"({self.bb_width_pct_max})"
            )
        return self
