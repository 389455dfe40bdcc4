"""V1 rule engine: adaptive breakout-trend (ABT), the fallback behind the V2 (PPO) stack and its baseline.

Three layers, computed from the trailing ``history_bars`` closed candles (causal: only bars at or
before t; indicator definitions in :mod:`fallback.indicators`):

1. **Environment filter** -- trend strength ADX_t >= ``adx_min`` (Wilder 1978, *New Concepts in
   Technical Trading Systems*); Bollinger width ``(upper - lower) / middle`` (Bollinger 2001,
   *Bollinger on Bollinger Bands*) ranked against its own last ``bb_width_lookback_bars`` values
   with a percentile rank in [``bb_width_pct_min``, ``bb_width_pct_max``] (neither dead-quiet nor
   blow-off volatility); participation ``volume_t / SMA(volume)_t >= volume_min_ratio``.
2. **Direction** -- EMA fast > mid > slow on each of the last ``alignment_persist_bars`` bars and
   +DI_t > -DI_t: long bias; the mirror image: short bias; otherwise none.
3. **Trigger** (``trigger_mode``) -- volatility breakout: long if
   ``close_t > open_t + k_long (high_{t-1} - low_{t-1})``, short if
   ``close_t < open_t - k_short (high_{t-1} - low_{t-1})``; pullback to the mid EMA that resumes:
   long if ``low_t <= EMA_mid_t + tol ATR_t`` and ``close_t > max(open_t, EMA_mid_t)``, short mirrored.

**Regime-conditional thresholds**: with ``ctx.regime_proba`` (K forward-filtered HMM state
probabilities, calm -> volatile) and K ``regime_adjustments``, the deltas of the argmax state
(``regime_mode="argmax"``) or the probability-weighted deltas (``"expected"``) are added to
``adx_min``, ``volume_min_ratio`` and the long/short ``breakout_k``; without them the base values apply.
Where the probabilities come from: in backtests and reports (``ats evaluate``, ``ats walkforward``,
``ats evaluate --policy v1 --regime``) the bundle's / a causally fitted HMM's filtered probabilities
at each decision bar (:func:`training.evaluate.span_regime_proba`). In serving, V1 decides exactly
when the bundle failed, so no probabilities from it are trusted and the base thresholds apply.

**Exits**: stop ``stop_atr_mult`` ATRs and take-profit ``reward_risk_ratio x stop_atr_mult`` ATRs
from the fill (2:1 by default, break-even win rate 1/3), then the phased trailing of
:mod:`fallback.trailing`: on a hold, V1 asks for ``Decision.new_stop_price`` when the phase's stop
tightens the current one; if that stop already lies at or beyond the close, V1 exits (flat).

**Sizing**: fixed-fractional risk, capped by ``max_leverage``, ``max_symbol_notional_frac`` and
``max_same_direction_notional_frac`` (:func:`size_position`).

V1 holds no state: trailing derives from ``ctx.position`` (entry, take-profit, stop, bars in trade)
and the candles, so a restart changes nothing. :class:`V1Policy` computes the indicators from
``ctx.candles`` every bar (serving); :class:`V1SeriesPolicy` reads them precomputed once over a
series (backtests) and takes the identical decisions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from fallback.config import V1Config
from fallback.indicators import (
    BB_NBDEV,  # noqa: F401 - re-exported
    BarIndicators,
    SeriesIndicators,
    validated_arrays,
    window_indicators,
)
from fallback.trailing import initial_risk, tightened, trail_state
from market.decision import Decision, DecisionContext, PositionView, StatelessPolicy

__all__ = ["V1Policy", "V1SeriesPolicy", "decide_from_indicators", "effective_thresholds", "size_position"]


def size_position(
    equity_usdt: float,
    atr_price: float,
    close_price: float,
    cfg: V1Config,
    *,
    other_same_direction_notional_usdt: float = 0.0,
) -> dict[str, float]:
    """Fixed-fractional risk sizing of a new position, with exposure limits.

    ``risk = risk_per_trade_frac * equity``; ``stop_dist = stop_atr_mult * ATR``;
    ``qty = risk / stop_dist``; ``notional = qty * close``;
    ``leverage = clip(ceil(notional / equity), 1, max_leverage)``;
    ``cap = equity * min(max_leverage, max_symbol_notional_frac,
    max_same_direction_notional_frac - other_same_direction_notional / equity)`` (>= 0);
    ``size_frac = min(1, min(notional, cap) / leverage / equity)``.
    Fees and slippage are not part of the risk budget (Van Tharp's position sizing, fixed-fractional).

    Parameters
    ----------
    equity_usdt : float
        Account equity in USDT, > 0.
    atr_price : float
        ATR of the decision bar in price units (USDT), > 0.
    close_price : float
        Close of the decision bar in USDT, > 0.
    cfg : V1Config
        Uses ``risk_per_trade_frac``, ``stop_atr_mult``, ``max_leverage``,
        ``max_symbol_notional_frac`` and ``max_same_direction_notional_frac``.
    other_same_direction_notional_usdt : float
        Notional (USDT, >= 0) already open in the same direction on other symbols (0 for V1's
        single-symbol context).

    Returns
    -------
    dict[str, float]
        ``risk_usdt``, ``stop_dist_price``, ``qty_base`` (intended, before the caps),
        ``notional_usdt`` (intended), ``notional_cap_usdt``, ``leverage``, ``size_frac``.

    Raises
    ------
    ValueError
        If an input is non-finite or not > 0 (``other_same_direction_notional_usdt``: < 0).
    """
    for name, value in (("equity_usdt", equity_usdt), ("atr_price", atr_price), ("close_price", close_price)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"size_position: {name} must be finite and > 0, got {value!r}")
    other = other_same_direction_notional_usdt
    if not math.isfinite(other) or other < 0:
        raise ValueError(
            f"size_position: other_same_direction_notional_usdt must be finite and >= 0, got {other!r}"
        )
    risk_usdt = cfg.risk_per_trade_frac * equity_usdt
    stop_dist = cfg.stop_atr_mult * atr_price
    qty = risk_usdt / stop_dist
    notional = qty * close_price
    cap_frac = min(cfg.max_leverage, cfg.max_symbol_notional_frac,
                   cfg.max_same_direction_notional_frac - other / equity_usdt)  # fmt: skip
    cap = max(0.0, cap_frac) * equity_usdt
    # tolerance so that a ratio of 2.0000000000000004 (rounding) asks for 2x, not 3x
    lev_needed = math.ceil(min(notional, cap) / equity_usdt - 1e-9)
    leverage = float(min(max(lev_needed, 1.0), cfg.max_leverage))
    size_frac = min(1.0, min(notional, cap) / leverage / equity_usdt)
    return {
        "risk_usdt": risk_usdt,
        "stop_dist_price": stop_dist,
        "qty_base": qty,
        "notional_usdt": notional,
        "notional_cap_usdt": cap,
        "leverage": leverage,
        "size_frac": size_frac,
    }


def effective_thresholds(regime_proba: np.ndarray | None, cfg: V1Config) -> dict[str, Any]:
    """Entry thresholds after the regime adjustment.

    Parameters
    ----------
    regime_proba : np.ndarray | None
        Filtered state probabilities at bar t, shape (K,), K = ``len(cfg.regime_adjustments)``;
        None or no adjustments configured: base thresholds.
    cfg : V1Config

    Returns
    -------
    dict
        ``adx_min``, ``volume_min_ratio``, ``long_breakout_k``, ``short_breakout_k`` (floats) and
        ``regime`` (argmax state, or None when no adjustment applies).

    Raises
    ------
    ValueError
        If ``regime_proba`` has the wrong shape, a non-finite or negative value, or does not sum
        to 1 (within 1e-6).
    """
    base = {"adx_min": cfg.adx_min, "volume_min_ratio": cfg.volume_min_ratio,
            "long_breakout_k": cfg.breakout_k, "short_breakout_k": cfg.breakout_k, "regime": None}  # fmt: skip
    adj = cfg.regime_adjustments
    if regime_proba is None or not adj:
        return base
    p = np.asarray(regime_proba, dtype=np.float64)
    if p.shape != (len(adj),):
        raise ValueError(
            f"V1: regime_proba has shape {p.shape}, expected ({len(adj)},) = one per regime_adjustments"
        )
    if not np.isfinite(p).all() or (p < 0).any() or abs(p.sum() - 1.0) > 1e-6:
        raise ValueError(f"V1: regime_proba must be finite, >= 0 and sum to 1, got {p.tolist()}")
    state = int(np.argmax(p))
    w = np.eye(len(adj))[state] if cfg.regime_mode == "argmax" else p

    def delta(name: str) -> float:
        return float(sum(wi * getattr(a, name) for wi, a in zip(w, adj, strict=True)))

    return {
        "adx_min": min(100.0, max(0.0, cfg.adx_min + delta("adx_min_delta"))),
        "volume_min_ratio": max(0.0, cfg.volume_min_ratio + delta("volume_min_ratio_delta")),
        "long_breakout_k": max(0.0, cfg.breakout_k + delta("long_breakout_k_delta")),
        "short_breakout_k": max(0.0, cfg.breakout_k + delta("short_breakout_k_delta")),
        "regime": state,
    }


def _hold_or_trail(
    ind: BarIndicators, position: PositionView, cfg: V1Config
) -> tuple[Decision, str, dict | None]:
    """Decision for an open position: hold, hold with a tighter stop, or exit when the stop is crossed."""
    side = int(position.side)
    hold = Decision(direction=side)
    if not cfg.trailing_enabled:
        return hold, "hold: position open", None
    risk = initial_risk(
        side, float(position.entry_price), position.take_profit_price, position.stop_price, cfg
    )
    if risk is None or not (math.isfinite(ind.atr) and ind.atr > 0):
        return hold, "hold: position open (no trailing: risk or ATR unknown)", None
    k = max(1, min(int(position.bars_in_trade), len(ind.high_tail)))
    extreme = float(ind.high_tail[-k:].max()) if side > 0 else float(ind.low_tail[-k:].min())
    st = trail_state(side, float(position.entry_price), risk, extreme, ind.atr, cfg)
    info = {"phase": st.phase, "excursion_r": st.excursion_r, "candidate_stop": st.stop_price,
            "risk_price": risk, "extreme": extreme, "current_stop": position.stop_price}  # fmt: skip
    new_stop = tightened(side, position.stop_price, st.stop_price)
    if st.stop_price is not None and side * (ind.close - st.stop_price) <= 0:
        return (
            Decision.flat(),
            f"exit: trailing stop {st.stop_price:.8g} (phase {st.phase}) crossed at the close",
            info,
        )
    if new_stop is None:
        return hold, f"hold: position open (trailing phase {st.phase})", info
    info["new_stop"] = new_stop
    return Decision(direction=side, new_stop_price=new_stop), f"trail: phase {st.phase}", info


def decide_from_indicators(
    ind: BarIndicators,
    position: PositionView,
    equity_usdt: float,
    cfg: V1Config,
    regime_proba: np.ndarray | None = None,
) -> dict[str, Any]:
    """The V1 decision from the indicators of bar t (the one code path of both V1 policies).

    Returns
    -------
    dict
        ``ready`` (bool), ``reason`` (``not_ready: ...``, ``hold: ...``, ``trail: phase N``,
        ``exit: trailing stop ...``, ``filter_failed: ...``, ``no_trend_bias``, ``no_trigger``,
        ``trigger_against_bias``, ``no_equity``, ``exposure_limit``, ``entry_long`` / ``entry_short``),
        ``thresholds`` (:func:`effective_thresholds`), ``filter``, ``direction``, ``trigger``,
        ``trailing`` (dicts, None when not evaluated), ``sizing`` (:func:`size_position`, None unless
        entering) and ``decision`` (:class:`Decision`).

    Raises
    ------
    ValueError
        If ``equity_usdt`` or ``regime_proba`` is invalid.
    """
    equity = float(equity_usdt)
    if not math.isfinite(equity):
        raise ValueError(f"V1: ctx.equity_usdt must be finite, got {equity_usdt!r}")
    side = int(position.side)
    out: dict[str, Any] = {
        "ready": False, "reason": "", "thresholds": None, "filter": None, "direction": None, "trigger": None,
        "trailing": None, "sizing": None, "decision": Decision(direction=side) if side != 0 else Decision.flat(),
    }  # fmt: skip
    if side != 0:  # an open position: hold or trail (needs only the ATR and the highs/lows)
        decision, reason, info = _hold_or_trail(ind, position, cfg)
        out.update(decision=decision, reason=reason, trailing=info, ready=ind.n_rows >= cfg.history_bars)
        return out
    if ind.n_rows < cfg.history_bars:
        out["reason"] = f"not_ready: {ind.n_rows} rows < history_bars={cfg.history_bars}"
        return out
    values = ind.values()
    nan_names = [k for k, x in values.items() if not math.isfinite(x)]
    if nan_names:
        out["reason"] = f"not_ready: indicator NaN: {', '.join(nan_names)}"
        return out
    out["ready"] = True
    th = effective_thresholds(regime_proba, cfg)
    out["thresholds"] = th

    adx_pass = ind.adx >= th["adx_min"]
    width_pass = cfg.bb_width_pct_min <= ind.bb_width_pct <= cfg.bb_width_pct_max
    volume_pass = ind.volume_ratio >= th["volume_min_ratio"]
    out["filter"] = {
        "adx": ind.adx, "adx_min": th["adx_min"], "adx_pass": adx_pass, "bb_width": ind.bb_width,
        "bb_width_pct": ind.bb_width_pct, "bb_width_pass": width_pass, "volume_ratio": ind.volume_ratio,
        "volume_pass": volume_pass, "pass": adx_pass and width_pass and volume_pass,
    }  # fmt: skip

    if ind.aligned_long and ind.plus_di > ind.minus_di:
        bias = 1
    elif ind.aligned_short and ind.plus_di < ind.minus_di:
        bias = -1
    else:
        bias = 0
    out["direction"] = {
        "ema_fast": ind.ema_fast, "ema_mid": ind.ema_mid, "ema_slow": ind.ema_slow, "plus_di": ind.plus_di,
        "minus_di": ind.minus_di, "aligned_long": ind.aligned_long, "aligned_short": ind.aligned_short, "bias": bias,
    }  # fmt: skip

    long_level = ind.open + th["long_breakout_k"] * ind.prev_range
    short_level = ind.open - th["short_breakout_k"] * ind.prev_range
    breakout = 1 if ind.close > long_level else (-1 if ind.close < short_level else 0)
    band = cfg.pullback_atr_tol * ind.atr
    if ind.low <= ind.ema_mid + band and ind.close > max(ind.open, ind.ema_mid):
        pullback = 1
    elif ind.high >= ind.ema_mid - band and ind.close < min(ind.open, ind.ema_mid):
        pullback = -1
    else:
        pullback = 0
    use_breakout = cfg.trigger_mode in ("breakout", "either")
    use_pullback = cfg.trigger_mode in ("pullback", "either")
    signals = {s for s, on in ((breakout, use_breakout), (pullback, use_pullback)) if on and s != 0}
    signal = bias if bias in signals else (signals.pop() if len(signals) == 1 else 0)
    out["trigger"] = {
        "close": ind.close, "open": ind.open, "prev_range": ind.prev_range, "long_level": long_level,
        "short_level": short_level, "breakout": breakout, "pullback": pullback, "mode": cfg.trigger_mode,
        "signal": signal,
    }  # fmt: skip

    if not out["filter"]["pass"]:
        failed = [
            n for n, ok in (("adx", adx_pass), ("bb_width", width_pass), ("volume", volume_pass)) if not ok
        ]
        out["reason"] = f"filter_failed: {', '.join(failed)}"
        return out
    if bias == 0:
        out["reason"] = "no_trend_bias"
        return out
    if signal == 0:
        out["reason"] = "no_trigger"
        return out
    if signal != bias:
        out["reason"] = "trigger_against_bias"
        return out
    if equity <= 0:
        out["reason"] = "no_equity"
        return out
    if ind.atr <= 0:
        out["reason"] = "not_ready: ATR is 0"
        out["ready"] = False
        return out
    sizing = size_position(equity, ind.atr, ind.close, cfg)
    sizing["atr_price"] = ind.atr
    out["sizing"] = sizing
    if sizing["size_frac"] <= 0:
        out["reason"] = "exposure_limit"
        return out
    out["decision"] = Decision(
        direction=bias,
        leverage=sizing["leverage"],
        size_frac=sizing["size_frac"],
        stop_atr=cfg.stop_atr_mult,
        take_profit_atr=cfg.reward_risk_ratio * cfg.stop_atr_mult,
    )
    out["reason"] = "entry_long" if bias == 1 else "entry_short"
    return out


class V1Policy(StatelessPolicy):
    """Adaptive breakout-trend rule engine implementing :class:`market.decision.Policy` (per-bar path).

    A pure function of ``ctx.candles`` (closed candles up to bar t; only the last
    ``cfg.history_bars`` rows are used), ``ctx.position``, ``ctx.equity_usdt`` and
    ``ctx.regime_proba``; holds no state (empty :class:`market.decision.PolicyState`), has no raw
    output (``last_raw_action`` None). Used by serving.

    Parameters
    ----------
    config : V1Config, optional
        Rule parameters (defaults: ``V1Config()``).
    """

    name = "v1"

    def __init__(self, config: V1Config | None = None) -> None:
        self.config = config if config is not None else V1Config()

    def history_bars(self, bar_interval: pd.Timedelta) -> int:
        """Trailing candles the engine needs (``config.history_bars``, whatever the bar interval)."""
        return self.config.history_bars

    @property
    def atr_period_bars(self) -> int:  # type: ignore[override]  # StatelessPolicy's default is a plain attribute
        """ATR period (bars) in whose units this engine's ``stop_atr`` / ``take_profit_atr`` are meant:
        the executor must place its stops with the ATR of this period (it sized with it)."""
        return self.config.atr_period_bars

    def decide(self, ctx: DecisionContext) -> Decision:
        """Return the target position for the next bar (see :meth:`explain` for the why).

        Raises
        ------
        ValueError
            If the candle window holds a non-finite value, lacks a column, the equity is
            non-finite or ``ctx.regime_proba`` is invalid.
        TypeError
            If ``ctx.candles`` is not a DataFrame.
        """
        return self.explain(ctx)["decision"]

    def explain(self, ctx: DecisionContext) -> dict[str, Any]:
        """Evaluate every layer; see :func:`decide_from_indicators` (plus ``bar_open_time``).

        Raises
        ------
        ValueError, TypeError
            Same as :meth:`decide`.
        """
        equity = float(ctx.equity_usdt)
        if not math.isfinite(equity):
            raise ValueError(f"V1: ctx.equity_usdt must be finite, got {ctx.equity_usdt!r}")
        arrays = validated_arrays(ctx.candles, self.config.history_bars)
        if len(arrays[0]) < 2:
            ind = _empty_indicators(len(arrays[0]), arrays)
        else:
            ind = window_indicators(*arrays, self.config)
        out = decide_from_indicators(ind, ctx.position, equity, self.config, ctx.regime_proba)
        out["bar_open_time"] = ctx.bar_open_time
        return out


def _empty_indicators(n: int, arrays: tuple[np.ndarray, ...]) -> BarIndicators:
    nan = float("nan")
    last = [float(a[-1]) if n else nan for a in arrays]
    return BarIndicators(n, last[0], last[1], last[2], last[3], nan, nan, nan, nan, nan, nan, nan, nan, nan, nan,
                         nan, False, False, arrays[1], arrays[2])  # fmt: skip


class V1SeriesPolicy(StatelessPolicy):
    """V1 with its indicators precomputed once over a candle series (backtests and evaluation).

    ``decide(ctx)`` reads the row of ``ctx.bar_open_time`` and runs the same decision code as
    :class:`V1Policy`; ``ctx.candles`` is not read. The decisions are identical to
    :class:`V1Policy` on the trailing window (tested).

    Parameters
    ----------
    candles : pd.DataFrame
        The whole series the backtest walks through, history included (``open high low close volume``).
    config : V1Config, optional
    regime_proba : np.ndarray, optional
        float (T, K) filtered state probabilities aligned with ``candles``; used when
        ``ctx.regime_proba`` is None. NaN rows mean "no regime known" (base thresholds).

    Raises
    ------
    ValueError
        If the candles are invalid, or ``regime_proba`` has the wrong number of rows.
    """

    name = "v1"

    def __init__(
        self, candles: pd.DataFrame, config: V1Config | None = None, regime_proba: np.ndarray | None = None
    ) -> None:
        self.config = config if config is not None else V1Config()
        self.series = SeriesIndicators(candles, self.config)
        if regime_proba is not None:
            regime_proba = np.asarray(regime_proba, dtype=np.float64)
            if regime_proba.ndim != 2 or len(regime_proba) != len(self.series):
                raise ValueError(
                    f"V1: regime_proba has shape {regime_proba.shape}, expected ({len(self.series)}, K)"
                )
        self.regime_proba = regime_proba

    def history_bars(self, bar_interval: pd.Timedelta) -> int:
        """Trailing candles the engine needs (``config.history_bars``; the series holds them)."""
        return self.config.history_bars

    @property
    def atr_period_bars(self) -> int:  # type: ignore[override]  # StatelessPolicy's default is a plain attribute
        """ATR period (bars) of the stop/take-profit distances, V1's own (as :class:`V1Policy`)."""
        return self.config.atr_period_bars

    def decide(self, ctx: DecisionContext) -> Decision:
        """The decision at ``ctx.bar_open_time`` (a bar of the precomputed series).

        Raises
        ------
        KeyError
            If the series has no bar at ``ctx.bar_open_time``.
        ValueError
            If the equity or the regime probabilities are invalid.
        """
        return self.explain(ctx)["decision"]

    def explain(self, ctx: DecisionContext) -> dict[str, Any]:
        """Like :meth:`V1Policy.explain`, from the precomputed row."""
        t = self.series.row_of(ctx.bar_open_time)
        proba = ctx.regime_proba
        if proba is None and self.regime_proba is not None and np.isfinite(self.regime_proba[t]).all():
            proba = self.regime_proba[t]
        out = decide_from_indicators(self.series.at(t), ctx.position, ctx.equity_usdt, self.config, proba)
        out["bar_open_time"] = ctx.bar_open_time
        return out
