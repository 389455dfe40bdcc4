"""Risk guard of the serving loop: position limits and kill switches, independent of the policy.

Every bar the loop (paper replay or live) asks :meth:`RiskGuard.review` whether the policy's
:class:`~market.decision.Decision` may go to the broker, given an :class:`AccountSnapshot`
(equity marked to market). Each closed round trip is reported with
:meth:`RiskGuard.record_closed_trade`. The guard answers a :class:`GuardVerdict`: the decision to
submit (possibly clipped or replaced), the trading state and the reasons.

States (after nautilus_trader's risk engine ``ACTIVE / REDUCING / HALTED``, see
``shared/reference/reliability.md`` section 1.5):

==========  =====================================================================================
ACTIVE      entries allowed, within ``max_leverage`` and ``max_notional_per_symbol_usdt``
REDUCING    exits only (flat, or holding / tightening the open position); set by the daily loss
            limit and cleared automatically at the next UTC day
HALTED      exits only, and with ``flatten_on_halt`` the open position is closed; set by the
            drawdown halt, the two kill switches or a failure inside the guard; **sticky**: it
            survives restarts (through the store) and only :func:`reset_risk` clears it
==========  =====================================================================================

Limits (all in :class:`RiskConfig`; a ``None`` disables a limit):

* daily loss: ``1 - equity / day_start_equity >= daily_loss_limit_frac`` -> REDUCING for the
  rest of the UTC day. ``day_start_equity`` is the last equity marked before the UTC day of
  ``account.time`` began (the first equity seen that day after a restart on a new day).
* drawdown halt: ``1 - equity / peak_equity >= max_drawdown_halt_frac`` -> HALTED (peak of the
  marked equity since the last reset).
* fast kill switch: ``fast_kill_consecutive_losses`` losing round trips in a row (net PnL < 0)
  -> HALTED.
* slow kill switch: profit factor ``sum(wins) / |sum(losses)|`` of the last
  ``slow_kill_window_trades`` round trips below ``slow_kill_min_profit_factor`` -> HALTED
  (evaluated once that many trades exist; no losing trade gives an infinite factor).
* entry size: a new position's leverage above ``max_leverage`` or notional
  ``size_frac * equity * leverage`` above ``max_notional_per_symbol_usdt`` is clipped to the limit
  (``oversize_action="clip"``) or refused (``"refuse"``: the decision becomes flat). The notional
  uses the equity of the snapshot (the fill happens at the next open, at a slightly different
  equity). An open position that grew beyond a limit is not reduced (a target-position decision
  cannot express a partial close).

Failure policy: any exception inside :meth:`RiskGuard.review` or
:meth:`RiskGuard.record_closed_trade` (a non-finite equity or PnL included) puts the guard in
HALTED with a ``guard_error`` reason (persisted if the store still works) and the verdict allows
exits only; the guard never raises to the loop and never fails open.

The math is pure functions (:func:`observe_equity`, :func:`observe_trade`, :func:`evaluate`,
:func:`gate_decision`); :class:`RiskGuard` only holds the current :class:`RiskStatus` and writes
its changes to the ``risk_state`` table of :class:`serving.store.StateStore`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field

from market.config_base import StrictConfig
from market.decision import Decision
from market.trade_stats import profit_factor  # the one profit factor (re-exported for callers)
from serving.store import RiskStateRecord, StateStore

DEFAULT_SCOPE = "default"


class RiskState(StrEnum):
    """Trading state of the guard; see the module docstring."""

    ACTIVE = "ACTIVE"
    REDUCING = "REDUCING"
    HALTED = "HALTED"


_SEVERITY = {RiskState.ACTIVE: 0, RiskState.REDUCING: 1, RiskState.HALTED: 2}


class RiskConfig(StrictConfig):
    """Limits of the :class:`RiskGuard` (fractions are of equity, 0.05 = 5 %)."""

    max_leverage: float = Field(5.0, ge=1.0, description="Largest leverage of a new position.")
    max_notional_per_symbol_usdt: float = Field(
        250_000.0, gt=0.0, description="Largest notional of a new position in the symbol, USDT."
    )
    oversize_action: Literal["clip", "refuse"] = Field(
        "clip", description="An entry above a size limit is clipped to it, or refused (flat)."
    )
    daily_loss_limit_frac: float | None = Field(
        0.05, gt=0.0, le=1.0,
        description="Loss of marked equity since the start of the UTC day that sets REDUCING until the next day.",
    )  # fmt: skip
    max_drawdown_halt_frac: float | None = Field(
        0.30, gt=0.0, le=1.0, description="Drawdown of marked equity from its peak that sets HALTED."
    )
    fast_kill_consecutive_losses: int | None = Field(
        10, ge=1, description="Consecutive losing round trips that set HALTED."
    )
    slow_kill_min_profit_factor: float | None = Field(
        0.8,
        gt=0.0,
        description="Profit factor over the last slow_kill_window_trades below which HALTED is set.",
    )
    slow_kill_window_trades: int = Field(
        50, ge=1, description="Round trips the slow kill switch looks back over."
    )
    flatten_on_halt: bool = Field(
        True, description="In HALTED, close the open position (else only block entries)."
    )


@dataclass(frozen=True)
class AccountSnapshot:
    """The account as the guard sees it at the close of a bar.

    Attributes
    ----------
    time : pd.Timestamp
        tz-aware time of the snapshot (the bar's open time in the loops); its UTC date is the
        day of the daily loss limit.
    equity_usdt : float
        Equity marked to market, USDT (finite, > 0).
    position_side : int
        -1 short, 0 flat, +1 long.
    position_qty_base : float
        Absolute position size, base units (>= 0).
    position_notional_usdt : float
        ``qty * mark price``, USDT (>= 0).
    leverage : float
        Leverage of the open position (1.0 when flat).
    """

    time: pd.Timestamp
    equity_usdt: float
    position_side: int
    position_qty_base: float
    position_notional_usdt: float
    leverage: float


@dataclass(frozen=True)
class GuardVerdict:
    """Answer of :meth:`RiskGuard.review`: the decision to submit, the state and why.

    ``reasons`` lists what the guard changed (``leverage_clipped: ...``, ``entry_refused: ...``)
    and, when the state is not ACTIVE, the reasons of the state. ``state`` is the string value of
    :class:`RiskState`.
    """

    decision: Decision
    state: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class RiskTracker:
    """Bookkeeping the limits need (JSON-persisted in ``risk_state.tracker``, except ``last_equity_usdt``).

    ``day`` is the ISO UTC date of the last equity observation; ``reducing_day`` the UTC day on
    which the daily loss limit was hit (REDUCING until it changes); ``recent_pnls_usdt`` the net
    PnL of the last round trips (at most the slow window), oldest first.
    """

    peak_equity_usdt: float | None = None
    day: str | None = None
    day_start_equity_usdt: float | None = None
    reducing_day: str | None = None
    consecutive_losses: int = 0
    recent_pnls_usdt: tuple[float, ...] = ()
    last_equity_usdt: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The persisted fields as a JSON-able dict."""
        d = dataclasses.asdict(self)
        d.pop("last_equity_usdt")
        d["recent_pnls_usdt"] = list(self.recent_pnls_usdt)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RiskTracker:
        """Inverse of :meth:`to_json` (``last_equity_usdt`` is unknown after a restart).

        Raises
        ------
        ValueError
            If a field is missing or of the wrong kind.
        """
        try:
            return cls(
                peak_equity_usdt=None if d["peak_equity_usdt"] is None else float(d["peak_equity_usdt"]),
                day=d["day"],
                day_start_equity_usdt=(
                    None if d["day_start_equity_usdt"] is None else float(d["day_start_equity_usdt"])
                ),
                reducing_day=d["reducing_day"],
                consecutive_losses=int(d["consecutive_losses"]),
                recent_pnls_usdt=tuple(float(x) for x in d["recent_pnls_usdt"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid persisted risk tracker {d!r}: {exc}") from exc


@dataclass(frozen=True)
class RiskStatus:
    """State, its reasons and the tracker: everything the guard knows."""

    state: RiskState = RiskState.ACTIVE
    reasons: tuple[str, ...] = ()
    tracker: RiskTracker = RiskTracker()


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------


def _utc_day(time: pd.Timestamp) -> str:
    ts = pd.Timestamp(time)
    if ts is pd.NaT or ts.tzinfo is None:
        raise ValueError(f"time must be a tz-aware timestamp, got {time!r}")
    return ts.tz_convert("UTC").date().isoformat()


def check_account(account: AccountSnapshot) -> None:
    """Raise ``ValueError`` naming the first field of ``account`` that no order may be based on."""
    _utc_day(account.time)
    eq = account.equity_usdt
    if not (isinstance(eq, (int, float)) and math.isfinite(eq) and eq > 0):
        raise ValueError(f"account.equity_usdt must be finite and > 0, got {eq!r}")
    if account.position_side not in (-1, 0, 1):
        raise ValueError(f"account.position_side must be -1, 0 or 1, got {account.position_side!r}")
    for name in ("position_qty_base", "position_notional_usdt"):
        v = getattr(account, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"account.{name} must be finite and >= 0, got {v!r}")
    if not (math.isfinite(account.leverage) and account.leverage > 0):
        raise ValueError(f"account.leverage must be finite and > 0, got {account.leverage!r}")


def observe_equity(tracker: RiskTracker, time: pd.Timestamp, equity_usdt: float) -> RiskTracker:
    """Tracker after marking ``equity_usdt`` (USDT, finite > 0) at ``time`` (tz-aware).

    On a new UTC day the day-start equity becomes the last equity seen before it (or this one
    when none is known, e.g. right after a restart); the peak is the running maximum.

    Raises
    ------
    ValueError
        If ``time`` is naive or ``equity_usdt`` is not finite and > 0.
    """
    if not (math.isfinite(equity_usdt) and equity_usdt > 0):
        raise ValueError(f"equity_usdt must be finite and > 0, got {equity_usdt!r}")
    day = _utc_day(time)
    day_start = tracker.day_start_equity_usdt
    if tracker.day != day or day_start is None:
        day_start = tracker.last_equity_usdt if tracker.last_equity_usdt is not None else equity_usdt
    peak = equity_usdt if tracker.peak_equity_usdt is None else max(tracker.peak_equity_usdt, equity_usdt)
    return dataclasses.replace(
        tracker, peak_equity_usdt=peak, day=day, day_start_equity_usdt=day_start, last_equity_usdt=equity_usdt
    )


def observe_trade(tracker: RiskTracker, pnl_usdt: float, window_trades: int) -> RiskTracker:
    """Tracker after a closed round trip with net PnL ``pnl_usdt`` (USDT; < 0 is a loss).

    Raises
    ------
    ValueError
        If ``pnl_usdt`` is not finite.
    """
    if not math.isfinite(pnl_usdt):
        raise ValueError(f"pnl_usdt must be finite, got {pnl_usdt!r}")
    losses = tracker.consecutive_losses + 1 if pnl_usdt < 0 else 0
    recent = (*tracker.recent_pnls_usdt, float(pnl_usdt))[-window_trades:]
    return dataclasses.replace(tracker, consecutive_losses=losses, recent_pnls_usdt=recent)


def breaches(tracker: RiskTracker, config: RiskConfig) -> list[tuple[RiskState, str]]:
    """Limits the tracker breaks now, as (state they set, reason), in the module's order.

    The equity limits use ``tracker.last_equity_usdt`` (nothing is checked before one is known).
    """
    out: list[tuple[RiskState, str]] = []
    eq = tracker.last_equity_usdt
    if eq is not None and config.daily_loss_limit_frac is not None and tracker.day_start_equity_usdt:
        loss = 1.0 - eq / tracker.day_start_equity_usdt
        if loss >= config.daily_loss_limit_frac:
            out.append((RiskState.REDUCING, (
                f"daily_loss: {loss:.2%} of the day-start equity {tracker.day_start_equity_usdt:.2f} USDT "
                f">= limit {config.daily_loss_limit_frac:.2%} (UTC day {tracker.day})"
            )))  # fmt: skip
    if eq is not None and config.max_drawdown_halt_frac is not None and tracker.peak_equity_usdt:
        dd = 1.0 - eq / tracker.peak_equity_usdt
        if dd >= config.max_drawdown_halt_frac:
            out.append((RiskState.HALTED, (
                f"max_drawdown: {dd:.2%} below the peak {tracker.peak_equity_usdt:.2f} USDT "
                f">= limit {config.max_drawdown_halt_frac:.2%}"
            )))  # fmt: skip
    n_fast = config.fast_kill_consecutive_losses
    if n_fast is not None and tracker.consecutive_losses >= n_fast:
        out.append(
            (
                RiskState.HALTED,
                f"fast_kill: {tracker.consecutive_losses} consecutive losing trades >= {n_fast}",
            )
        )
    m, pf_min = config.slow_kill_window_trades, config.slow_kill_min_profit_factor
    if pf_min is not None and len(tracker.recent_pnls_usdt) >= m:
        pf = profit_factor(tracker.recent_pnls_usdt[-m:])
        if pf < pf_min:
            out.append(
                (RiskState.HALTED, f"slow_kill: profit factor {pf:.3f} over the last {m} trades < {pf_min}")
            )
    return out


def evaluate(status: RiskStatus, tracker: RiskTracker, config: RiskConfig) -> RiskStatus:
    """The next status given the updated ``tracker`` (pure transition function).

    HALTED is sticky (new halting reasons are appended to the old ones). Otherwise the state is
    the most severe breach; a daily-loss breach marks its UTC day so REDUCING lasts until the day
    changes even if equity recovers.
    """
    found = breaches(tracker, config)
    if any(state is RiskState.REDUCING for state, _ in found):
        tracker = dataclasses.replace(tracker, reducing_day=tracker.day)
    if status.state is RiskState.HALTED:
        new = tuple(
            r
            for s, r in found
            if s is RiskState.HALTED and _kind(r) not in {_kind(x) for x in status.reasons}
        )
        return RiskStatus(RiskState.HALTED, status.reasons + new, tracker)
    halting = tuple(r for s, r in found if s is RiskState.HALTED)
    if halting:
        return RiskStatus(RiskState.HALTED, halting, tracker)
    reducing = tuple(r for s, r in found if s is RiskState.REDUCING)
    if reducing:
        return RiskStatus(RiskState.REDUCING, reducing, tracker)
    if tracker.reducing_day is not None and tracker.reducing_day == tracker.day:
        kept = (
            status.reasons
            if status.state is RiskState.REDUCING
            else (f"daily_loss: limit hit on {tracker.day}",)
        )
        return RiskStatus(RiskState.REDUCING, kept, tracker)
    return RiskStatus(RiskState.ACTIVE, (), tracker)


def _kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def _is_entry(decision: Decision, side: int) -> bool:
    return decision.direction != 0 and decision.direction != side


def gate_decision(
    decision: Decision, account: AccountSnapshot, state: RiskState, config: RiskConfig
) -> tuple[Decision, tuple[str, ...]]:
    """Apply the state and the entry limits to ``decision`` (pure).

    Exits (flat) and holds (same side, with or without a tighter ``new_stop_price``) always pass,
    except that HALTED with ``flatten_on_halt`` replaces a hold of an open position by flat. An entry (a new
    position, or a reversal) passes only in ACTIVE and within the size limits; refused, it becomes
    flat (a reversal then only closes the old position).

    Returns
    -------
    (Decision, tuple[str, ...])
        The decision to submit and what was changed (empty when unchanged).
    """
    side = account.position_side
    if state is RiskState.HALTED and config.flatten_on_halt and side != 0 and decision.direction != 0:
        return Decision.flat(), (f"halted_flatten: decision {decision.direction:+d} replaced by flat",)
    if not _is_entry(decision, side):
        return decision, ()
    if state is not RiskState.ACTIVE:
        return Decision.flat(), (f"entry_refused: {state.value} allows exits only",)
    reasons: list[str] = []
    lev, size = decision.leverage, decision.size_frac
    if lev > config.max_leverage:
        if config.oversize_action == "refuse":
            return Decision.flat(), (
                f"entry_refused: leverage {lev:.3g} > max_leverage {config.max_leverage:.3g}",
            )
        reasons.append(f"leverage_clipped: {lev:.3g} -> {config.max_leverage:.3g}")
        lev = config.max_leverage
    notional = size * account.equity_usdt * lev
    cap = config.max_notional_per_symbol_usdt
    if notional > cap:
        if config.oversize_action == "refuse":
            return Decision.flat(), (f"entry_refused: notional {notional:.2f} USDT > max {cap:.2f} USDT",)
        new_size = cap / (account.equity_usdt * lev)
        reasons.append(
            f"notional_clipped: {notional:.2f} -> {cap:.2f} USDT (size_frac {size:.4g} -> {new_size:.4g})"
        )
        size = new_size
    if not reasons:
        return decision, ()
    return dataclasses.replace(decision, leverage=lev, size_frac=size), tuple(reasons)


def _exits_only(decision: Decision, side: int) -> Decision:
    """The fail-closed decision: the input if it is a hold or an exit, else flat. Never raises."""
    direction = getattr(decision, "direction", None)
    if isinstance(decision, Decision) and (direction == 0 or direction == side):
        return decision
    return Decision.flat()


# ----------------------------------------------------------------------------------------------
# The stateful guard
# ----------------------------------------------------------------------------------------------


def _status_from_record(record: RiskStateRecord | None) -> RiskStatus:
    if record is None:
        return RiskStatus()
    return RiskStatus(RiskState(record.state), tuple(record.reasons), RiskTracker.from_json(record.tracker))


class RiskGuard:
    """Stateful wrapper: holds the :class:`RiskStatus`, persists each change, never raises to the loop.

    Parameters
    ----------
    config : RiskConfig
        Limits.
    store : StateStore | None
        Where the state history lives; the latest ``risk_state`` row of ``scope`` is loaded at
        construction, so a HALTED guard stays HALTED after a restart; a reset written later by
        another process (:func:`reset_risk`) is picked up at the next review or trade. None: in
        memory only.
    scope : str
        Key of this guard's rows (one per account/symbol).
    now : Callable[[], datetime]
        Wall clock for ``created_at``.

    Raises
    ------
    ValueError
        At construction, if the persisted state cannot be read back (refuse to start rather than
        trade with a forgotten kill switch); ``sqlalchemy.exc.SQLAlchemyError`` if the store fails.
    """

    def __init__(
        self,
        config: RiskConfig,
        store: StateStore | None = None,
        *,
        scope: str = DEFAULT_SCOPE,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.store = store
        self.scope = scope
        self._now = now
        self._status = _status_from_record(store.latest_risk_state(scope) if store is not None else None)
        self._reset_seen = self._latest_reset_stamp()

    def _latest_reset_stamp(self) -> int | None:
        return self.store.latest_risk_state_id(self.scope, change="reset") if self.store is not None else None

    def _sync_reset(self) -> None:
        """Adopt a reset written by another process (``ats serve reset-risk``) since the last check."""
        if self.store is None:
            return
        stamp = self._latest_reset_stamp()
        if stamp is not None and stamp != self._reset_seen:
            rec = self.store.latest_risk_state(self.scope, change="reset")
            if rec is not None:
                self._status = _status_from_record(rec)
            self._reset_seen = stamp

    @property
    def status(self) -> RiskStatus:
        """The current status (state, reasons, tracker)."""
        return self._status

    @property
    def state(self) -> RiskState:
        """The current state."""
        return self._status.state

    def review(self, decision: Decision, account: AccountSnapshot) -> GuardVerdict:
        """Mark the account, update the state, and gate ``decision`` (see :func:`gate_decision`).

        Never raises: on any internal failure the guard goes HALTED (reason ``guard_error``) and
        the verdict allows exits only.
        """
        try:
            self._sync_reset()
            check_account(account)
            tracker = observe_equity(self._status.tracker, account.time, float(account.equity_usdt))
            self._commit(evaluate(self._status, tracker, self.config), account.time)
            gated, changes = gate_decision(decision, account, self._status.state, self.config)
            state_reasons = (
                ()
                if self._status.state is RiskState.ACTIVE
                else tuple(f"state: {r}" for r in self._status.reasons)
            )
            return GuardVerdict(gated, self._status.state.value, changes + state_reasons)
        except Exception as exc:  # noqa: BLE001 - fail closed, never open
            reason = self._fail(account.time if isinstance(account, AccountSnapshot) else None, exc)
            side = account.position_side if isinstance(account, AccountSnapshot) else 0
            return GuardVerdict(_exits_only(decision, side), RiskState.HALTED.value, (reason,))

    def observe(self, time: pd.Timestamp, equity_usdt: float) -> RiskStatus:
        """Mark ``equity_usdt`` (USDT) at ``time`` and update the state, without a decision to gate (the account's
        guard of a multi-symbol run gates with :func:`serving.account_risk.gate_account`). Returns the status.

        Raises
        ------
        ValueError
            ``time`` naive or ``equity_usdt`` not finite and > 0 (the caller fails closed: :meth:`fail`).
        """
        self._sync_reset()
        tracker = observe_equity(self._status.tracker, time, float(equity_usdt))
        self._commit(evaluate(self._status, tracker, self.config), time)
        return self._status

    def fail(self, time: Any, exc: BaseException) -> str:
        """Go HALTED because of ``exc`` (reason ``guard_error: ...``, persisted if the store works); returns the
        reason. Never raises."""
        return self._fail(time, exc)

    def record_closed_trade(self, time: pd.Timestamp, pnl_usdt: float) -> None:
        """Count a closed round trip (net PnL in USDT) for the kill switches; never raises."""
        try:
            self._sync_reset()
            _utc_day(time)
            tracker = observe_trade(
                self._status.tracker, float(pnl_usdt), self.config.slow_kill_window_trades
            )
            self._commit(evaluate(self._status, tracker, self.config), time)
        except Exception as exc:  # noqa: BLE001 - fail closed
            self._fail(time, exc)

    def _commit(self, new: RiskStatus, time: pd.Timestamp) -> None:
        old = self._status
        state_changed = (new.state, new.reasons) != (old.state, old.reasons)
        if self.store is not None and (state_changed or new.tracker.to_json() != old.tracker.to_json()):
            self.store.append_risk_state(RiskStateRecord(
                self.scope, pd.Timestamp(time), new.state.value, "transition" if state_changed else "update",
                new.reasons, new.tracker.to_json(), self._now(),
            ))  # fmt: skip
        self._status = new

    def _fail(self, time: Any, exc: BaseException) -> str:
        reason = f"guard_error: {type(exc).__name__}: {exc}"
        old = self._status
        reasons = (*old.reasons, reason) if old.state is RiskState.HALTED else (reason,)
        self._status = RiskStatus(RiskState.HALTED, reasons, old.tracker)
        if self.store is not None:
            try:
                ts = pd.Timestamp(time) if time is not None else pd.Timestamp(self._now())
                if ts is pd.NaT or ts.tzinfo is None:
                    ts = pd.Timestamp(self._now())
                self.store.append_risk_state(RiskStateRecord(
                    self.scope, ts, RiskState.HALTED.value, "error", reasons, old.tracker.to_json(), self._now(),
                ))  # fmt: skip
            except Exception:  # noqa: BLE001 - the in-memory state is already HALTED
                pass
        return reason


def reset_risk(
    store_or_db: StateStore | str | Path,
    *,
    scope: str = DEFAULT_SCOPE,
    note: str = "manual reset",
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> RiskStateRecord:
    """Explicit human reset (``ats serve reset-risk --db ...``): the scope goes back to ACTIVE.

    Clears the kill-switch trade window, the peak and the day anchor (the drawdown and daily
    limits restart from the next marked equity); the previous rows stay in the history.

    Parameters
    ----------
    store_or_db : StateStore | str | Path
        The store, or the path of its SQLite file.
    scope : str
        The guard's scope.
    note : str
        Who/why, recorded in the reason (``manual_reset: <note>``).

    Returns
    -------
    RiskStateRecord
        The row written.
    """
    store = store_or_db if isinstance(store_or_db, StateStore) else StateStore.sqlite(store_or_db)
    stamp = now()
    record = RiskStateRecord(
        scope, pd.Timestamp(stamp), RiskState.ACTIVE.value, "reset", (f"manual_reset: {note}",),
        RiskTracker().to_json(), stamp,
    )  # fmt: skip
    store.append_risk_state(record)
    if not isinstance(store_or_db, StateStore):
        store.close()
    return record
