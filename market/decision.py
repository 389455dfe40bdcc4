"""The decision interface shared by every policy (frozen PPO, V1 rules, baselines).

A policy is asked once per bar, at the close of bar t, and answers with a :class:`Decision`:
the *target* position. The execution layer (``envs.accounting``) fills it at the open of bar
t+1. Fallback from V2 to V1 is a swap of objects implementing :class:`Policy`, not a second
code path. The protocol declares everything a caller reads from a policy (history needed, ATR
period of its stops, raw output, carried state: :class:`PolicyState`), so no caller probes a
policy for optional attributes.

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
    def flat(cls) -> Decision:
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


@dataclass(frozen=True, slots=True)
class PolicyState:
    """Everything a policy carries from one bar to the next that changes what it decides.

    Attributes
    ----------
    peak_equity_usdt : float | None
        Highest account equity the policy has been shown, USDT (the drawdown input of the V2
        observation, ``envs.trading_env.account_features``); None before the first bar.

    Where it lives: the serving loops keep the run's record in the state store (the peak of the
    run's equity rows, ``StateStore.peak_equity``) and state it in every :class:`DecisionContext`
    (``peak_equity_usdt``); :meth:`advanced` lets that record win over the instance's memory, so a
    restarted process (a new instance) and a hot-swapped bundle see the run's state. A hot swap
    also hands the outgoing policy's state to the incoming one (:meth:`Policy.restore`,
    ``serving.hotswap.PolicySlot``), for callers that do not state it.

    Not state (a fresh instance computes the same decision without it): caches whose loss only
    restarts a computation the batch path does in full (``FrozenPPOPolicy``'s HMM forward-filter
    step, whose cold start differs by float noise, and its history lengths), and
    ``last_raw_action``, a record of the last call that is never read back as an input.
    """

    peak_equity_usdt: float | None = None

    def advanced(self, ctx: DecisionContext) -> PolicyState:
        """Return the state after being shown ``ctx`` (pure).

        ``ctx.peak_equity_usdt`` stated: ``max(ctx.peak_equity_usdt, ctx.equity_usdt)`` (the run's
        record); otherwise the running maximum of the equities shown. A non-finite equity changes
        nothing.
        """
        equity = float(ctx.equity_usdt)
        if ctx.peak_equity_usdt is not None:
            record = float(ctx.peak_equity_usdt)
            return PolicyState(max(record, equity) if math.isfinite(equity) else record)
        if not math.isfinite(equity):
            return self
        return PolicyState(equity if self.peak_equity_usdt is None else max(self.peak_equity_usdt, equity))


@runtime_checkable
class Policy(Protocol):
    """Anything that maps a :class:`DecisionContext` to a :class:`Decision`, with what its callers read.

    Members
    -------
    name : str
        Short label recorded with each decision (``v2``, ``v1``, ``flat``, ...).
    atr_period_bars : int | None
        ATR period (bars) in whose units ``Decision.stop_atr`` / ``take_profit_atr`` are meant: the
        caller places stops with the ATR of this period. None: the caller's (the env's) ATR.
    last_raw_action : np.ndarray | None
        The raw model output behind the last decision (e.g. the actor's 5 numbers, float32), set by
        every :meth:`decide` (None when the policy has none, or the call failed before the model
        answered); serving records it with the decision.
    state : PolicyState
        What the policy carries across bars (:class:`PolicyState`).
    history_bars(bar_interval) -> int
        Closed candles ``ctx.candles`` must hold (>= 1) for a decision on bars of ``bar_interval``.
    restore(state)
        Replace the carried state (restart, hot swap).
    decide(ctx) -> Decision
        The target position for the next bar; raises on failure (the caller falls back).

    ``isinstance(obj, Policy)`` checks that every member is present (:func:`missing_policy_members`
    names the absent ones); :class:`StatelessPolicy` holds the defaults of a policy with no state.
    """

    @property
    def name(self) -> str:
        """Short label recorded with each decision."""
        ...

    @property
    def atr_period_bars(self) -> int | None:
        """ATR period (bars) of the stop/take-profit distances; None: the caller's."""
        ...

    @property
    def last_raw_action(self) -> np.ndarray | None:
        """Raw model output behind the last decision (None: none)."""
        ...

    @property
    def state(self) -> PolicyState:
        """What the policy carries across bars."""
        ...

    def history_bars(self, bar_interval: pd.Timedelta) -> int:
        """Return how many closed candles a decision needs on bars of ``bar_interval`` (>= 1)."""
        ...

    def restore(self, state: PolicyState) -> None:
        """Replace the carried state (restart, hot swap)."""
        ...

    def decide(self, ctx: DecisionContext) -> Decision:
        """Return the target position for the next bar; raise on failure (caller falls back)."""
        ...


POLICY_MEMBERS: tuple[str, ...] = (
    "name", "atr_period_bars", "last_raw_action", "state", "history_bars", "restore", "decide",
)  # fmt: skip
"""The members of :class:`Policy`, in declaration order."""


def missing_policy_members(obj: object) -> list[str]:
    """Return the :class:`Policy` members ``obj`` lacks (empty: it is a Policy)."""
    return [m for m in POLICY_MEMBERS if not hasattr(obj, m)]


def require_policy(obj: object, role: str) -> Policy:
    """``obj`` as a :class:`Policy`.

    Raises
    ------
    TypeError
        If ``obj`` lacks a member of the protocol (names ``role`` and the missing members).
    """
    if isinstance(obj, Policy):
        return obj
    missing = ", ".join(missing_policy_members(obj))
    raise TypeError(f"{role} {type(obj).__name__} is not a Policy: it lacks {missing}")


class StatelessPolicy:
    """Defaults of :class:`Policy` for a policy that carries nothing across bars.

    No raw output (``last_raw_action`` None), stops in the caller's ATR (``atr_period_bars`` None),
    one candle of history, an empty :class:`PolicyState` (``restore`` ignores what it is given).
    Subclasses set ``name``, implement ``decide`` and override what differs.
    """

    name: str = "policy"
    atr_period_bars: int | None = None
    last_raw_action: np.ndarray | None = None

    @property
    def state(self) -> PolicyState:
        """Always the empty state: nothing is carried."""
        return PolicyState()

    def history_bars(self, bar_interval: pd.Timedelta) -> int:
        """One candle: the decision reads at most the last one."""
        return 1

    def restore(self, state: PolicyState) -> None:
        """Nothing to restore."""

    def decide(self, ctx: DecisionContext) -> Decision:
        """Raise ``NotImplementedError``: subclasses decide."""
        raise NotImplementedError
