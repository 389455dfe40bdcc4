"""Typed, frozen configuration of the V1 rule engine (adaptive breakout-trend)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from market.config_base import StrictConfig


class RegimeAdjustment(StrictConfig):
    """Additive changes of V1's entry thresholds while the market is in one HMM regime.

    The effective threshold is ``base + delta`` (clipped to the field's range: ADX to [0, 100],
    the others to >= 0). Example: in a strong uptrend favour longs (``long_breakout_k_delta < 0``,
    ``short_breakout_k_delta > 0``); in high volatility tighten both sides (both > 0); in a choppy
    sideways regime raise the bar (``adx_min_delta > 0``).
    """

    adx_min_delta: float = Field(0.0, description="Added to adx_min (ADX points).")
    volume_min_ratio_delta: float = Field(0.0, description="Added to volume_min_ratio.")
    long_breakout_k_delta: float = Field(0.0, description="Added to breakout_k for long triggers.")
    short_breakout_k_delta: float = Field(0.0, description="Added to breakout_k for short triggers.")


class V1Config(StrictConfig):
    """Parameters of :class:`fallback.v1.V1Policy`; every field is read by the engine.

    The defaults reproduce the committed V1 baseline (alignment on the decision bar only, breakout
    trigger, no trailing); persistence, the pullback trigger, phased trailing and regime
    adjustments are switched on here. Trailing asks the execution layer to move the stop
    (``Decision.new_stop_price``), which ``envs.accounting`` / ``envs.kernel`` honour on a hold
    (env, backtest and paper broker alike); V1 also exits at the next open when the close has
    already crossed the candidate stop. Trailing stays off by default: in the walk-forward sweep on
    the bundled BTCUSDT 1h data (2021-01-01..2025-07-01, 4 folds) every trailing variant tried
    scored below its non-trailing twin on the training folds, and forcing it on lowered the
    out-of-sample profit factor from 0.884 to 0.760.

    Raises
    ------
    pydantic.ValidationError
        On an unknown key, a value out of its range, EMA periods not strictly increasing
        (fast < mid < slow), ``bb_width_pct_min > bb_width_pct_max``, trailing thresholds not
        ordered (``trail_breakeven_at_r <= trail_wide_at_r <= trail_tight_at_r``) or
        ``trail_tight_atr > trail_wide_atr``.
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
    alignment_persist_bars: int = Field(
        1, ge=1, description="Bars (ending at t) on which the EMA alignment must hold, in bars."
    )
    # Layer 3: trigger
    trigger_mode: Literal["breakout", "pullback", "either"] = Field(
        "breakout", description="Entry trigger: volatility breakout, pullback to the mid EMA, or either."
    )
    breakout_k: float = Field(
        0.5,
        ge=0.0,
        description="Breakout threshold: close must pass open +/- k x previous bar's range (high - low).",
    )
    pullback_atr_tol: float = Field(
        0.25,
        ge=0.0,
        description="Pullback touch band: the bar's low (long) / high (short) within this many ATRs of the mid EMA.",
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
    max_symbol_notional_frac: float = Field(
        3.0, gt=0.0, description="Cap on this symbol's position notional / equity."
    )
    max_same_direction_notional_frac: float = Field(
        3.0,
        gt=0.0,
        description="Cap on the notional / equity of all positions in one direction (other symbols' "
        "exposure in that direction included, see fallback.v1.apply_exposure_limits).",
    )
    history_bars: int = Field(
        600, ge=3, description="Trailing candles the engine needs and uses; fewer -> flat (not ready)."
    )
    # Exits: phased trailing of the stop (in R = initial risk per unit = stop distance at entry)
    trailing_enabled: bool = Field(
        False,
        description="Move the stop of an open position (phases 1-3) through Decision.new_stop_price "
        "(off by default: see the class docstring).",
    )
    trail_breakeven_at_r: float = Field(
        1.0, gt=0.0, description="Phase 1 from this favourable excursion (in R): stop to the entry price."
    )
    trail_wide_at_r: float = Field(
        1.5,
        gt=0.0,
        description="Phase 2 from this excursion (in R): trail trail_wide_atr ATRs behind the extreme.",
    )
    trail_tight_at_r: float = Field(
        2.0,
        gt=0.0,
        description="Phase 3 from this excursion (in R): trail trail_tight_atr ATRs behind the extreme.",
    )
    trail_wide_atr: float = Field(2.0, gt=0.0, description="Phase-2 trailing distance, in ATRs.")
    trail_tight_atr: float = Field(1.0, gt=0.0, description="Phase-3 trailing distance, in ATRs.")
    # Regime-conditional thresholds
    regime_adjustments: tuple[RegimeAdjustment, ...] = Field(
        (),
        description="One adjustment per HMM state (calm -> volatile); empty: base thresholds always.",
    )
    regime_mode: Literal["argmax", "expected"] = Field(
        "argmax",
        description="argmax: the most probable state's deltas; expected: probability-weighted deltas.",
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
        if not self.trail_breakeven_at_r <= self.trail_wide_at_r <= self.trail_tight_at_r:
            raise ValueError(
                "trailing thresholds must satisfy trail_breakeven_at_r <= trail_wide_at_r <= trail_tight_at_r, got "
                f"{self.trail_breakeven_at_r}, {self.trail_wide_at_r}, {self.trail_tight_at_r}"
            )
        if self.trail_tight_atr > self.trail_wide_atr:
            raise ValueError(
                f"trail_tight_atr ({self.trail_tight_atr}) must be <= trail_wide_atr ({self.trail_wide_atr})"
            )
        return self
