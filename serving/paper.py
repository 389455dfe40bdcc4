"""Paper broker: the serving-side wrapper of the one accounting module.

It owns no cost model of its own: every bar goes through :func:`envs.accounting.step_bar`, the
same function the training env and the backtester call, so paper results are charged exactly as
in training (fees, slippage, funding, isolated-margin liquidation), and its entries are sized by the
one sizing rule (:mod:`envs.sizing`, run by the kernel) that the live intents use too.
"""

from __future__ import annotations

import math

from envs.accounting import AccountState, Bar, BarResult, step_bar
from envs.config import CostConfig
from market.decision import Decision, PositionView


class PaperBroker:
    """Simulated USDT-M account filled by :func:`envs.accounting.step_bar`.

    Usage per bar: ``on_bar(bar_t)`` applies the decision submitted at the close of bar t-1,
    then ``submit(decision_t, atr_t)`` queues the decision for bar t+1.

    Parameters
    ----------
    initial_equity_usdt : float
        Starting cash in USDT (finite, > 0).
    costs : CostConfig
        The shared cost model.

    Raises
    ------
    ValueError
        If ``initial_equity_usdt`` is not finite and > 0.
    """

    def __init__(self, initial_equity_usdt: float, costs: CostConfig) -> None:
        self._state = AccountState.initial(initial_equity_usdt)
        self._costs = costs
        self._equity = float(initial_equity_usdt)
        self._pending: tuple[Decision, float] | None = None
        self._last_atr = math.nan
        self._last_time_ns: int | None = None

    @property
    def state(self) -> AccountState:
        """The account after the last processed bar."""
        return self._state

    @property
    def equity_usdt(self) -> float:
        """Equity marked at the close of the last processed bar (the initial equity before any)."""
        return self._equity

    @property
    def pending(self) -> tuple[Decision, float] | None:
        """The queued ``(decision, atr_at_decision)`` for the next bar, or None."""
        return self._pending

    def position_view(self) -> PositionView:
        """The open position as policies see it."""
        return self._state.position_view()

    def submit(self, decision: Decision, atr_at_decision: float) -> None:
        """Queue ``decision`` (taken at the close of the current bar) for the next bar's open.

        Parameters
        ----------
        decision : Decision
            Target position.
        atr_at_decision : float
            ATR of the decision bar in price units (USDT); it sets the stop/take-profit distances
            and the volatility part of slippage.

        Raises
        ------
        TypeError
            If ``decision`` is not a :class:`Decision`.
        ValueError
            If a decision is already pending, or ``atr_at_decision`` is non-finite or <= 0 while a
            fill may follow (a position is open or the decision changes the side).
        """
        if not isinstance(decision, Decision):
            raise TypeError(f"submit expects a Decision, got {type(decision).__name__}")
        if self._pending is not None:
            raise ValueError("a decision is already pending for the next bar; call cancel_pending() first")
        atr = float(atr_at_decision)
        needs_atr = decision.direction != self._state.side or self._state.side != 0
        if needs_atr and not (math.isfinite(atr) and atr > 0):
            raise ValueError(
                f"atr_at_decision must be finite and > 0 when a fill may follow, got {atr_at_decision!r} "
                f"(decision direction {decision.direction}, position side {self._state.side})"
            )
        self._pending = (decision, atr)

    def cancel_pending(self) -> Decision | None:
        """Drop the queued decision and return it (None if there was none)."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending[0]

    def on_bar(self, bar: Bar) -> BarResult:
        """Process the next bar with the pending decision (None: keep the position and its orders).

        Without a pending decision the ATR of the last submitted decision is used for the
        slippage of stop/take-profit fills.

        Raises
        ------
        ValueError
            If the bar is not later than the last processed bar, or from
            :func:`envs.accounting.step_bar` (invalid bar, non-finite ATR when a fill may happen).
            The account and the pending decision are unchanged when it raises.
        """
        if self._last_time_ns is not None and bar.open_time_ns <= self._last_time_ns:
            raise ValueError(
                f"bar open_time_ns={bar.open_time_ns} is not after the last processed bar ({self._last_time_ns})"
            )
        decision, atr = self._pending if self._pending is not None else (None, self._last_atr)
        result = step_bar(self._state, decision, bar, atr, self._costs)
        self._state = result.state
        self._equity = result.equity_usdt
        self._last_time_ns = bar.open_time_ns
        if math.isfinite(atr) and atr > 0:
            self._last_atr = atr
        self._pending = None
        return result
