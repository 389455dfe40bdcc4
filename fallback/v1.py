"""V1 rule engine: adaptive breakout-trend, the fallback behind the V2 (PPO) stack.

Three layers, all computed with TA-Lib from the trailing ``history_bars`` closed candles of the
decision context (causal: only bars at or before t are used):

1. **Environment filter** -- trend strength ADX_t >= ``adx_min`` (Wilder 1978, *New Concepts in
   Technical Trading Systems*); Bollinger width ``(upper - lower) / middle`` (Bollinger 2001,
   *Bollinger on Bollinger Bands*) ranked against its own last ``bb_width_lookback_bars`` values
   with a percentile rank in [``bb_width_pct_min``, ``bb_width_pct_max``] (neither dead-quiet nor
   blow-off volatility); participation ``volume_t / SMA(volume)_t >= volume_min_ratio``.
2. **Direction** -- EMA fast > mid > slow and +DI > -DI: long bias; EMA fast < mid < slow and
   +DI < -DI: short bias; otherwise none.
3. **Trigger** -- range breakout: long if ``close_t > open_t + k (high_{t-1} - low_{t-1})``, short if
   ``close_t < open_t - k (high_{t-1} - low_{t-1})``.

A position is entered only when flat and all three layers agree; an open position is held (its
exits are the stop and the take-profit placed at entry). Sizing is fixed-fractional risk: losing
``risk_per_trade_frac`` of equity when a stop ``stop_atr_mult`` ATRs away is hit (see
:func:`size_position`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import talib

from fallback.config import V1Config
from market.decision import Decision, DecisionContext

_PRICE_COLUMNS = ("open", "high", "low", "close", "volume")


# Standard Bollinger bands (2 standard deviations). Not a config field: the filter uses the
# percentile rank of the width in its own history, which does not depend on this multiplier.
BB_NBDEV = 2.0

def size_position(
    equity_usdt: float, atr_price: float, close_price: float, cfg: V1Config
) -> dict[str, float]:
    """Fixed-fractional risk sizing of a new position.

    ``risk = risk_per_trade_frac * equity``; ``stop_dist = stop_atr_mult * ATR``;
    ``qty = risk / stop_dist``; ``notional = qty * close``;
    ``leverage = clip(ceil(notional / equity), 1, max_leverage)``;
    ``size_frac = min(1, notional / leverage / equity)`` (so notional <= max_leverage * equity).
    Fees and slippage are not part of the risk budget.

    Parameters
    ----------
    equity_usdt : float
        Account equity in USDT, > 0.
    atr_price : float
        ATR of the decision bar in price units (USDT), > 0.
    close_price : float
        Close of the decision bar in USDT, > 0.
    cfg : V1Config
        Uses ``risk_per_trade_frac``, ``stop_atr_mult`` and ``max_leverage``.

    Returns
    -------
    dict[str, float]
        ``risk_usdt``, ``stop_dist_price``, ``qty_base`` (intended, before the cap),
        ``notional_usdt`` (intended), ``leverage``, ``size_frac``.

    Raises
    ------
    ValueError
        If an input is non-finite or not > 0.
    """
    for name, value in (("equity_usdt", equity_usdt), ("atr_price", atr_price), ("close_price", close_price)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"size_position: {name} must be finite and > 0, got {value!r}")
    risk_usdt = cfg.risk_per_trade_frac * equity_usdt
    stop_dist = cfg.stop_atr_mult * atr_price
    qty = risk_usdt / stop_dist
    notional = qty * close_price
    # tolerance so that a ratio of 2.0000000000000004 (rounding) asks for 2x, not 3x
    lev_needed = math.ceil(notional / equity_usdt - 1e-9)
    leverage = float(min(max(lev_needed, 1.0), cfg.max_leverage))
    size_frac = min(1.0, notional / leverage / equity_usdt)
    return {
        "risk_usdt": risk_usdt,
        "stop_dist_price": stop_dist,
        "qty_base": qty,
        "notional_usdt": notional,
        "leverage": leverage,
        "size_frac": size_frac,
    }


def _validated_window(candles: pd.DataFrame, history_bars: int) -> pd.DataFrame:
    """Return the trailing ``history_bars`` rows after checking columns and finiteness."""
    if not isinstance(candles, pd.DataFrame):
        raise TypeError(f"V1: ctx.candles must be a pandas DataFrame, got {type(candles).__name__}")
    missing = [c for c in _PRICE_COLUMNS if c not in candles.columns]
    if missing:
        raise ValueError(f"V1: ctx.candles lacks required columns {missing}")
    window = candles.iloc[-history_bars:]
    values = window.loc[:, list(_PRICE_COLUMNS)].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"V1: non-finite candle value {values[row, col]!r} in column '{_PRICE_COLUMNS[col]}' at "
            f"open time {window.index[row]} ({int(bad.sum())} non-finite values in the window)"
        )
    return window


def _percentile_rank(history: np.ndarray) -> float:
    """Share of ``history`` values <= its last value, in (0, 1]; NaN if any value is NaN."""
    if np.isnan(history).any():
        return float("nan")
    return float(np.mean(history <= history[-1]))


class V1Policy:
    """Adaptive breakout-trend rule engine implementing :class:`market.decision.Policy`.

    A pure function of ``ctx.candles`` (closed candles up to bar t; only the last
    ``cfg.history_bars`` rows are used), ``ctx.position`` and ``ctx.equity_usdt``; holds no state.

    Parameters
    ----------
    config : V1Config, optional
        Rule parameters (defaults: ``V1Config()``).
    """

    name = "v1"

    def __init__(self, config: V1Config | None = None) -> None:
        self.config = config if config is not None else V1Config()

    @property
    def history_bars(self) -> int:
        """Trailing candles the engine needs (callers pass at least this many rows)."""
        return self.config.history_bars

    def decide(self, ctx: DecisionContext) -> Decision:
        """Return the target position for the next bar (see :meth:`explain` for the why).

        Raises
        ------
        ValueError
            If the candle window holds a non-finite value, lacks a column, or the equity is
            non-finite.
        TypeError
            If ``ctx.candles`` is not a DataFrame.
        """
        return self.explain(ctx)["decision"]

    def explain(self, ctx: DecisionContext) -> dict[str, Any]:
        """Evaluate every layer and return its values, its pass/fail and the decision.

        Returns
        -------
        dict
            ``ready`` (bool: history long enough and indicators finite), ``reason`` (str: why this
            decision: ``not_ready: ...``, ``hold: position open``, ``filter_failed: ...``,
            ``no_trend_bias``, ``no_breakout``, ``trigger_against_bias``, ``no_equity``,
            ``entry_long`` / ``entry_short``), ``filter``, ``direction``, ``trigger`` (dicts of
            indicator values and pass flags, None when not ready), ``sizing`` (see
            :func:`size_position`, None unless entering) and ``decision`` (:class:`Decision`).

        Raises
        ------
        ValueError
            Same as :meth:`decide`.
        """
        cfg = self.config
        equity = float(ctx.equity_usdt)
        if not math.isfinite(equity):
            raise ValueError(f"V1: ctx.equity_usdt must be finite, got {ctx.equity_usdt!r}")
        window = _validated_window(ctx.candles, cfg.history_bars)
        side = int(ctx.position.side)
        out: dict[str, Any] = {
            "bar_open_time": ctx.bar_open_time,
            "ready": False,
            "reason": "",
            "filter": None,
            "direction": None,
            "trigger": None,
            "sizing": None,
            "decision": Decision(direction=side) if side != 0 else Decision.flat(),
        }
        hold_reason = "hold: position open" if side != 0 else None

        if len(window) < cfg.history_bars:
            out["reason"] = hold_reason or f"not_ready: {len(window)} rows < history_bars={cfg.history_bars}"
            return out

        o = window["open"].to_numpy(np.float64)
        h = window["high"].to_numpy(np.float64)
        lo = window["low"].to_numpy(np.float64)
        c = window["close"].to_numpy(np.float64)
        v = window["volume"].to_numpy(np.float64)

        adx = talib.ADX(h, lo, c, timeperiod=cfg.adx_period_bars)
        plus_di = talib.PLUS_DI(h, lo, c, timeperiod=cfg.adx_period_bars)
        minus_di = talib.MINUS_DI(h, lo, c, timeperiod=cfg.adx_period_bars)
        upper, middle, lower = talib.BBANDS(
            c, timeperiod=cfg.bb_period_bars, nbdevup=BB_NBDEV, nbdevdn=BB_NBDEV, matype=0
        )
        width = (upper - lower) / middle
        lookback = width[-cfg.bb_width_lookback_bars :]
        width_pct = (
            _percentile_rank(lookback) if len(lookback) == cfg.bb_width_lookback_bars else float("nan")
        )
        vol_ma = talib.SMA(v, timeperiod=cfg.volume_ma_bars)
        volume_ratio = v[-1] / vol_ma[-1] if vol_ma[-1] > 0 else float("nan")
        ema_fast = talib.EMA(c, timeperiod=cfg.ema_fast_bars)[-1]
        ema_mid = talib.EMA(c, timeperiod=cfg.ema_mid_bars)[-1]
        ema_slow = talib.EMA(c, timeperiod=cfg.ema_slow_bars)[-1]
        atr = talib.ATR(h, lo, c, timeperiod=cfg.atr_period_bars)[-1]
        prev_range = h[-2] - lo[-2]

        values = {
            "adx": float(adx[-1]),
            "plus_di": float(plus_di[-1]),
            "minus_di": float(minus_di[-1]),
            "bb_width": float(width[-1]),
            "bb_width_pct": width_pct,
            "volume_ratio": float(volume_ratio),
            "ema_fast": float(ema_fast),
            "ema_mid": float(ema_mid),
            "ema_slow": float(ema_slow),
            "atr": float(atr),
        }
        nan_names = [k for k, x in values.items() if not math.isfinite(x)]
        if nan_names:
            out["reason"] = hold_reason or f"not_ready: indicator NaN: {', '.join(nan_names)}"
            return out
        out["ready"] = True

        adx_pass = values["adx"] >= cfg.adx_min
        width_pass = cfg.bb_width_pct_min <= width_pct <= cfg.bb_width_pct_max
        volume_pass = values["volume_ratio"] >= cfg.volume_min_ratio
        out["filter"] = {
            "adx": values["adx"],
            "adx_min": cfg.adx_min,
            "adx_pass": adx_pass,
            "bb_width": values["bb_width"],
            "bb_width_pct": width_pct,
            "bb_width_pass": width_pass,
            "volume_ratio": values["volume_ratio"],
            "volume_pass": volume_pass,
            "pass": adx_pass and width_pass and volume_pass,
        }

        if ema_fast > ema_mid > ema_slow and values["plus_di"] > values["minus_di"]:
            bias = 1
        elif ema_fast < ema_mid < ema_slow and values["plus_di"] < values["minus_di"]:
            bias = -1
        else:
            bias = 0
        out["direction"] = {
            "ema_fast": values["ema_fast"],
            "ema_mid": values["ema_mid"],
            "ema_slow": values["ema_slow"],
            "plus_di": values["plus_di"],
            "minus_di": values["minus_di"],
            "bias": bias,
        }

        long_level = o[-1] + cfg.breakout_k * prev_range
        short_level = o[-1] - cfg.breakout_k * prev_range
        signal = 1 if c[-1] > long_level else (-1 if c[-1] < short_level else 0)
        out["trigger"] = {
            "close": float(c[-1]),
            "open": float(o[-1]),
            "prev_range": float(prev_range),
            "long_level": float(long_level),
            "short_level": float(short_level),
            "signal": signal,
        }

        if hold_reason is not None:
            out["reason"] = hold_reason
            return out
        if not out["filter"]["pass"]:
            failed = [
                n
                for n, ok in (("adx", adx_pass), ("bb_width", width_pass), ("volume", volume_pass))
                if not ok
            ]
            out["reason"] = f"filter_failed: {', '.join(failed)}"
            return out
        if bias == 0:
            out["reason"] = "no_trend_bias"
            return out
        if signal == 0:
            out["reason"] = "no_breakout"
            return out
        if signal != bias:
            out["reason"] = "trigger_against_bias"
            return out
        if equity <= 0:
            out["reason"] = "no_equity"
            return out
        if values["atr"] <= 0:
            out["reason"] = "not_ready: ATR is 0"
            out["ready"] = False
            return out

        sizing = size_position(equity, values["atr"], float(c[-1]), cfg)
        sizing["atr_price"] = values["atr"]
        out["sizing"] = sizing
        out["decision"] = Decision(
            direction=bias,
            leverage=sizing["leverage"],
            size_frac=sizing["size_frac"],
            stop_atr=cfg.stop_atr_mult,
            take_profit_atr=cfg.reward_risk_ratio * cfg.stop_atr_mult,
        )
        out["reason"] = "entry_long" if bias == 1 else "entry_short"
        return out
