"""The decision interface shared by every policy (frozen PPO, V1 rules, baselines).

A policy is asked once per bar, at the close of bar t, and answers with a :class:`Decision`:
the *target* position. The execution layer (``envs.accounting``) fills it at the open of bar
t+1. Fallback from V2 to V1 is a swap of objects implementing :class:`Policy`, not a second
code path.

Semantics of a decision (used identically by the env, the backtester and the paper broker):

* ``direction`` equal to the current side (and not 0): hold; the open position, its stop and
  its take-profit are kept and the other fields are ignored.
* ``direction`` different from the current side: close the open position (if any) at the next
  open, then, if ``direction != 0``, open a new one with ``leverage`` and ``size_frac``; its stop
  and take-profit lie ``stop_atr`` and ``take_profit_atr`` ATRs (ATR of bar t, price units) from
  the fill price.
* ``new_stop_price`` (optional, default None) asks to move the stop of the open position; it is
  honoured only on a hold (``direction`` equal to the current, non-zero side), only if, rounded
  to the tick in the conservative direction (long: down, short: up), it tightens the stop
  (long: higher, short: lower); otherwise it is ignored. Everything else keeps today's meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd


class NonFiniteDecisionError(ValueError):
    """A policy produced a non-finite or out-of-range value; no order may be derived from it."""


@dataclass(frozen=True, slots=True)
class Decision:
    """Target position chosen at the close of a bar.

    Attributes
    ----------
    direction : int
        -1 short, 0 flat, +1 long.
    leverage : float
        Leverage of a new position, >= 1 (notional = margin x leverage).
    size_frac : float
        Fraction of account equity committed as isolated margin to a new position, in [0, 1].
    stop_atr : float
        Stop-loss distance from the fill price in multiples of ATR (price units), > 0.
    take_profit_atr : float
        Take-profit distance from the fill price in multiples of ATR, > 0.
    new_stop_price : float | None
        Requested stop price (USDT) of the open position on a hold (trailing stop), finite and
        > 0; None (default) keeps the stop. Ignored unless ``direction`` equals the current
        non-zero side and the tick-rounded level tightens the stop (see the module docstring).

    Raises
    ------
    NonFiniteDecisionError
        If any field is non-finite or out of its range.
    """

    direction: int
    leverage: float = 1.0
    size_frac: float = 0.0
    stop_atr: float = 2.0
    take_profit_atr: float = 4.0
    new_stop_price: float | None = None

    def __post_init__(self) -> None:
        if self.direction not in (-1, 0, 1):
            raise NonFiniteDecisionError(f"direction must be -1, 0 or 1, got {self.direction!r}")
        for name in ("leverage", "size_frac", "stop_atr", "take_profit_atr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                raise NonFiniteDecisionError(f"{name} must be a finite number, got {value!r}")
        if self.leverage < 1.0:
            raise NonFiniteDecisionError(f"leverage must be >= 1, got {self.leverage}")
        if not 0.0 <= self.size_frac <= 1.0:
            raise NonFiniteDecisionError(f"size_frac must be in [0, 1], got {self.size_frac}")
        if self.stop_atr <= 0 or self.take_profit_atr <= 0:
            raise NonFiniteDecisionError(
                f"stop_atr and take_profit_atr must be > 0, got {self.stop_atr}, {self.take_profit_atr}"
            )
        if self.new_stop_price is not None:
            value = self.new_stop_price
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value) or value <= 0:
                raise NonFiniteDecisionError(f"new_stop_price must be None or a finite number > 0, got {value!r}")
            if self.direction == 0:
                raise NonFiniteDecisionError("new_stop_price needs direction -1 or +1 (a stop of an open position)")

    @classmethod
    def flat(cls) -> "Decision":
        """Return the decision to hold no position."""
        return cls(direction=0)


@dataclass(frozen=True, slots=True)
class PositionView:
    """Read-only view of the open position given to a policy.

    ``side`` is -1/0/+1, ``quantity_base`` the absolute size in base units (e.g. BTC),
    ``entry_price`` in quote units (USDT), ``bars_in_trade`` counts closed bars since the fill.
    """

    side: int = 0
    quantity_base: float = 0.0
    entry_price: float = 0.0
    leverage: float = 1.0
    bars_in_trade: int = 0
    stop_price: float | None = None
    take_profit_price: float | None = None


@dataclass(frozen=True, slots=True)
class DecisionContext:
    """Everything a policy may look at when deciding at the close of bar t.

    Attributes
    ----------
    bar_open_time : pd.Timestamp
        UTC open time of bar t (the bar that just closed).
    candles : pd.DataFrame
        Closed candles up to and including bar t (index: UTC open time, columns
        ``open high low close volume`` float64, optional ``funding_rate``).
    position : PositionView
        The open position before the decision.
    equity_usdt : float
        Marked-to-market account equity at the close of bar t.
    observation : np.ndarray | None
        The V2 observation for bar t, float32 of shape (obs_dim,), or None when unavailable.
    regime_proba : np.ndarray | None
        Forward-filtered HMM state probabilities at bar t, float64 of shape (K,), states ordered
        calm -> volatile (``regime.hmm``), or None when no regime model is available.
    peak_equity_usdt : float | None
        Highest account equity of this run up to and including bar t, USDT (the drawdown input of
        the V2 observation). The serving loops pass it from the run's own record, so a restarted
        process or a hot-swapped bundle sees the same drawdown as an uninterrupted run; None: the
        policy tracks the running maximum of the ``equity_usdt`` it is shown (backtests).
    """

    bar_open_time: pd.Timestamp
    candles: pd.DataFrame
    position: PositionView
    equity_usdt: float
    observation: np.ndarray | None = None
    regime_proba: np.ndarray | None = None
    peak_equity_usdt: float | None = None


@runtime_checkable
class Policy(Protocol):
    """Anything that maps a :class:`DecisionContext` to a :class:`Decision`."""

    name: str

    def decide(self, ctx: DecisionContext) -> Decision:
        """Return the target position for the next bar; raise on failure (caller falls back)."""
        ...
