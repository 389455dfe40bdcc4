"""Phased trailing stop of V1, as pure functions (no state: everything derives from the position).

R is the trade's initial risk per unit of base asset (price units): the distance from the entry
price to the stop V1 placed at entry, ``stop_atr_mult x ATR``. V1 recovers it from the position
alone, so it is restart-safe: the take-profit is never moved, and V1 placed it ``reward_risk_ratio``
R from the entry, so ``R = |take_profit - entry| / reward_risk_ratio`` (see :func:`initial_risk`).

The favourable excursion of a trade at bar t is ``side x (extreme - entry) / R`` where the extreme
is the highest high (long) / lowest low (short) of the bars since the fill, bar t included. Phases
(the usual break-even-then-chandelier scheme; Le Beau & Lucas 1992, *Technical Traders Guide to
Computer Analysis of the Futures Market*, "chandelier exit"):

* phase 0 (excursion < ``trail_breakeven_at_r``): no trailing, the entry stop stays;
* phase 1 (>= ``trail_breakeven_at_r``): stop to break-even (the entry price);
* phase 2 (>= ``trail_wide_at_r``): ``extreme - side x trail_wide_atr x ATR_t``, never worse than break-even;
* phase 3 (>= ``trail_tight_at_r``): ``extreme - side x trail_tight_atr x ATR_t``, never worse than break-even.

A stop only ever tightens (long: up, short: down); :func:`tightened` returns None otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fallback.config import V1Config


@dataclass(frozen=True, slots=True)
class TrailState:
    """Trailing phase and candidate stop at one bar close.

    ``excursion_r`` is the favourable excursion in R; ``stop_price`` the candidate stop (USDT),
    None in phase 0.
    """

    phase: int
    excursion_r: float
    stop_price: float | None


def initial_risk(
    side: int, entry_price: float, take_profit_price: float | None, stop_price: float | None, cfg: V1Config
) -> float | None:
    """Initial risk R per unit (price units) of an open position, from the position alone.

    ``R = |take_profit - entry| / reward_risk_ratio`` (the take-profit never moves); without a
    take-profit ``R = |entry - stop|`` (exact before the stop has moved); None when neither is
    known or the result is not finite and > 0.
    """
    if side not in (-1, 1) or not (math.isfinite(entry_price) and entry_price > 0):
        return None
    if take_profit_price is not None:
        r = abs(float(take_profit_price) - entry_price) / cfg.reward_risk_ratio
    elif stop_price is not None:
        r = abs(entry_price - float(stop_price))
    else:
        return None
    return r if math.isfinite(r) and r > 0 else None


def trail_state(
    side: int, entry_price: float, risk_price: float, extreme_price: float, atr_price: float, cfg: V1Config
) -> TrailState:
    """Phase and candidate stop of a position at a bar close (see the module docstring).

    Parameters
    ----------
    side : int
        +1 long, -1 short.
    entry_price, risk_price : float
        Entry price and initial risk R (price units, > 0).
    extreme_price : float
        Highest high (long) / lowest low (short) since the fill, bar t included.
    atr_price : float
        ATR at bar t (price units, > 0).
    cfg : V1Config
        Uses the ``trail_*`` fields.

    Raises
    ------
    ValueError
        If an input is non-finite, ``risk_price`` or ``atr_price`` is <= 0, or ``side`` is not +-1.
    """
    if side not in (-1, 1):
        raise ValueError(f"trail_state: side must be -1 or +1, got {side!r}")
    for name, value in (("entry_price", entry_price), ("risk_price", risk_price),
                        ("extreme_price", extreme_price), ("atr_price", atr_price)):  # fmt: skip
        if not math.isfinite(value) or (name != "extreme_price" and value <= 0):
            raise ValueError(f"trail_state: {name} must be finite and > 0, got {value!r}")
    excursion = side * (extreme_price - entry_price) / risk_price
    if excursion < cfg.trail_breakeven_at_r:
        return TrailState(0, excursion, None)
    if excursion < cfg.trail_wide_at_r:
        return TrailState(1, excursion, entry_price)
    phase, dist = (2, cfg.trail_wide_atr) if excursion < cfg.trail_tight_at_r else (3, cfg.trail_tight_atr)
    chandelier = extreme_price - side * dist * atr_price
    stop = max(entry_price, chandelier) if side > 0 else min(entry_price, chandelier)
    return TrailState(phase, excursion, stop)


def tightened(side: int, current_stop: float | None, candidate: float | None) -> float | None:
    """``candidate`` if it tightens ``current_stop`` (long: higher, short: lower), else None."""
    if candidate is None:
        return None
    if current_stop is None or side * (candidate - current_stop) > 0:
        return candidate
    return None


def trail_path(
    side: int,
    entry_price: float,
    initial_stop: float,
    high: np.ndarray,
    low: np.ndarray,
    atr: np.ndarray,
    cfg: V1Config,
) -> tuple[np.ndarray, np.ndarray]:
    """Stop level and phase at each bar close of a trade, stepped bar by bar.

    Bar 0 is the fill bar. The stop after the close of bar i is the tighter of the stop before it
    and :func:`trail_state`'s candidate at bar i (the extreme over bars 0..i). Stop exits are not
    simulated: the path shows the levels a position that is still open would carry.

    Parameters
    ----------
    high, low, atr : np.ndarray
        float64 (n,), the trade's bars (USDT).

    Returns
    -------
    (stops, phases) : tuple[np.ndarray, np.ndarray]
        float64 (n,) stop after each close; int8 (n,) phase at each close.
    """
    risk = abs(entry_price - initial_stop)
    stops = np.empty(len(high))
    phases = np.empty(len(high), dtype=np.int8)
    stop = initial_stop
    extreme = -math.inf if side > 0 else math.inf
    for i in range(len(high)):
        extreme = max(extreme, high[i]) if side > 0 else min(extreme, low[i])
        st = trail_state(side, entry_price, risk, extreme, float(atr[i]), cfg)
        new = tightened(side, stop, st.stop_price)
        stop = stop if new is None else new
        stops[i] = stop
        phases[i] = st.phase
    return stops, phases
