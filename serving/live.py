"""Live bar loop for Binance USDⓈ-M (testnet or live): decide once per closed bar, never send twice.

One call of :meth:`LiveLoop.step` does, in this order (every phase is idempotent, so a process
killed anywhere and restarted carries on where it stopped):

1. **Clock**: read the exchange time; ``offset = server - wall`` (injected wall clock). The bar
   to decide is the last one *closed by the exchange clock*, so a jump of the local clock never
   skips or repeats a bar; an offset beyond ``max_clock_offset_ms`` blocks entries (event).
   **Missed bars**: every bar has exactly one decision row. The loop only ever decides the last
   closed bar, so a bar with no decision row when a later bar is reached can no longer be
   decided: it is recorded afterwards, once reconciliation has read the exchange, as source
   'missed' (:func:`missed_bar_records`), with the side of the reconciled exchange position as
   its direction (nothing was sent for it: the position and its exchange-side
   stop/take-profit were left as they were) and a reason saying
   why: every attempt of that bar failed in this process (attempt count and last error), or no
   step ran for it (process stopped, restarting, or failing before the bar was known). One
   ``bars_missed`` event per gap. A new run (no decision yet) has no gap.
2. **Reconcile** (:meth:`LiveLoop.reconcile`): resolve every unresolved intent of earlier bars by
   client id (found: record it; absent: 'abandoned'), store new fills since the last seen trade
   id (dedup on trade id), compare the exchange position with ``last trusted position row
   ('baseline' or 'reconcile') + signed fills after its trade id`` (:meth:`LiveLoop._sync_position`).
   **Unknown is not flat**: a read that fails, or answers with a truncated, empty or malformed body
   or record (:class:`serving.errors.MalformedResponseError`, checked at the broker edge), ends
   the step (retried within the bar); nothing is cancelled, nothing is sent, the position and its
   stop are held. A disagreement is read again (``reconcile_reads``, spaced) before it counts: a
   stop or take-profit filling between the trades read and the position read agrees on the next
   read. Equal -> a 'reconcile' row; a confirmed difference -> an 'unreconciled' row and an
   event, and the loop refuses to trade (no order at all, exits included; the decision is still
   recorded) until a later read agrees again (a 'reconcile' row, ``position_reconciled`` event)
   or an operator accepts the exchange position: ``ats serve accept-position --db
   STATE --note "who and why"`` writes a request (:meth:`serving.store.StateStore.request_position_accept`)
   that the next reconciliation applies (a new 'baseline' row and a ``position_accepted`` event,
   so the same bar may trade), or :meth:`LiveLoop.reset_position_baseline` in-process. Our stops
   and take-profits no longer open are looked up once: one that triggered is 'filled' and its
   trades are linked to it by the order it placed (Binance ``actualOrderId``); cancelled or
   expired ones are 'cancelled'. Our protective orders left open on a flat position are cancelled
   only when that flat position agrees with our trades. Each repair is an event.
3. **Candles**: the last ``context_bars`` closed bars from a rolling in-memory window
   (:class:`serving.candles.CandleCache`: paged at start and when catching up, ccxt serves at most
   1,000 klines a request; otherwise one small request re-reading the last few bars). The window
   must be complete, unique, sorted, gapless, finite and OHLC-consistent and end at the bar to
   decide. Otherwise the bar is **quarantined**: the policy is not asked (a 'guard' decision holds
   the position; stops stay on the exchange; entries are impossible). Bad candles
   (:mod:`serving.candles`, repair policy): a flawed row is re-fetched once; the bar's own flawed
   candle quarantines it; another flawed row holds the bars for ``bad_candle_hold_bars``, then is
   repaired as a gap (previous close, volume 0; ``candle_repaired`` event) so trading resumes.
   The funding history of the window is joined as ``funding_rate`` (:func:`with_funding_column`);
   if it cannot be fetched the bar is quarantined too.
4. **Decide** (only if the bar has no decision row yet): bundle -> V1 -> flat with
   :func:`serving.choice.choose`; then the optional risk guard
   (``guard.review(decision, AccountSnapshot) -> GuardVerdict``; a guard that raises blocks
   entries: fail closed). The decision row and its intents (:func:`serving.intents.plan_bar`) are
   written in ONE transaction **before** anything is sent.
5. **Execute** the bar's intents: exit (after cancelling our open protective orders), entry
   (after setting leverage), stop move; then, once the entry has a fill, its ``stop`` and ``tp``
   (written, then sent); if the exchange refuses the stop, the position is closed at once
   (``unprot`` intent); a held position found without its stop or take-profit gets them again
   (:meth:`LiveLoop._repair_protection`). Before a resend (status 'sent'/'unknown'/'not_found') the
   client id is looked up; a create that timed out, dropped, answered 5xx or -4116 is resolved by
   ``lookup_attempts`` spaced lookups. Binance's order queries lag its matching engine (-2013 for
   an accepted order) and a filled market order frees its client id, so a **market** order none
   finds is re-sent (same id) only when, ``create_settle_s`` after its send, one more lookup
   misses it, no trade of an unknown order has appeared since and the position agrees with our
   trades (:meth:`LiveLoop._settle_unknown`); otherwise it is held (``resend_withheld``)
   and the next reconciliation finds its trades. A stop or take-profit none finds is re-sent at
   once (the exchange refuses a second open order with the same id, -4116).
6. Record fills, position and an equity snapshot. A bar whose decision is recorded but whose
   equity row is not (stopped in between) gets it on the next step: at once within the bar, or
   with an ``equity_recorded_late`` event once the bar has passed.

Notifications (optional ``notifier``, :mod:`serving.notify`): after every step, successful or
not, the events of this run written since the last publish and the exchange fills stored since
(entries, exits, stops, take-profits, external fills) go to ``notifier.publish``; only the first
``step_failed`` of a streak is passed on. A notifier that raises is ignored: it never stops the
loop.

Failures (:meth:`LiveLoop.run`): a retryable, ambiguous or rejected error ends the step; it is
retried within the same bar after ``step_retry_initial_s`` (doubling, at most ``step_retry_max_s``
and never past the next bar close). Any other exception is recorded (redacted, with its
traceback) as ``internal_error`` and halts entries for the rest of the process (exits are still
sent); a :class:`FatalError` stops the loop.

Crash points (:mod:`serving.crash`): the loop calls ``crash_points.hit(name)`` at each point of
:data:`serving.crash.CRASH_POINTS` (``after_intent_written``, ``after_send``, ``after_ack``,
``after_fill``, ``during_reconciliation``); the object is injected (no-op by default), and
``tests/serving/test_crash_recovery.py`` injects :class:`serving.crash.KillAt` to SIGKILL the process there.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
from pydantic import Field

from market.config_base import StrictConfig
from market.decision import Decision, DecisionContext, Policy, PositionView
from market.features import atr as atr_indicator
from market.instruments import DEFAULT_CCXT_SYMBOL
from serving.candles import (  # noqa: F401 - parse_ohlcv_row and validate_window re-exported
    CandleCache,
    CandleWindow,
    fetch_funding_since,
    parse_ohlcv_row,
    validate_window,
)
from serving.choice import choose, reason_kind
from serving.crash import NO_CRASH, CrashPoints
from serving.errors import AmbiguousOutcomeError, FatalError, RejectedError, RetryableError
from serving.exchange import BinanceFuturesBroker, OrderSnapshot, RateLimitedError
from serving.hotswap import PolicySlot
from serving.intents import (
    ExchangePosition,
    OpenProtection,
    OrderIntent,
    client_order_id,
    exchange_leverage,
    parse_client_order_id,
    plan_bar,
    protective_intents,
)
from serving.notify import Notifier
from serving.risk import AccountSnapshot
from serving.secrets import strip_url_queries
from serving.store import (
    DecisionRecord,
    EquityRecord,
    EventRecord,
    ExchangeFillRecord,
    FillRecord,
    StateStore,
)

_TF_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000, "1h": 3_600_000, "4h": 14_400_000}


class LiveConfig(StrictConfig):
    """Settings of :class:`LiveLoop` (units in the names)."""

    run_id: str = Field("live", min_length=1, max_length=128, description="Key of this run's rows in the store.")
    mode: Literal["testnet", "live"] = Field("testnet", description="Recorded in the live_started event (ats status).")
    symbol: str = Field(DEFAULT_CCXT_SYMBOL, description="Unified ccxt symbol.")
    timeframe: str = Field("1h", description="Bar length; one of 1m 5m 15m 30m 1h 4h.")
    context_bars: int = Field(300, ge=20, le=1500, description="Closed candles given to the policies.")
    atr_period_bars: int = Field(
        14, ge=1, description="ATR period for stop/take-profit distances of a policy that does not state its own "
        "(V2 and V1 state theirs: atr_period_bars of the bundle's features and of V1's config).")
    decision_timeout_ms: float = Field(2_000.0, gt=0, description="Deadline of the primary policy, ms.")
    close_delay_s: float = Field(3.0, ge=0, description="Wait after a bar close before polling its candle, s.")
    poll_interval_s: float = Field(1.0, gt=0, description="Minimum sleep between two steps, s.")
    max_clock_offset_ms: float = Field(
        2_500.0, gt=0, description="Largest |exchange - local| clock offset with which entries are allowed, ms."
    )
    max_leverage: int = Field(20, ge=1, le=125, description="Upper bound of the leverage set on the exchange.")
    rate_limit_max_wait_s: float = Field(30.0, gt=0, description="Longest Retry-After honoured inside a bar, s.")
    lookup_attempts: int = Field(
        3, ge=1, le=10, description="Lookups by client id (spaced, doubling) before an unconfirmed intent is resent."
    )
    lookup_spacing_s: float = Field(1.0, ge=0, description="Wait before the second lookup, s (doubles after).")
    step_retry_initial_s: float = Field(
        2.0, gt=0, description="A failed step is retried within the bar after this wait, s (doubling)."
    )
    step_retry_max_s: float = Field(60.0, gt=0, description="Longest wait between retries of a failed step, s.")
    create_settle_s: float = Field(
        30.0, ge=0, description="A market order whose create had an unknown outcome is re-sent (same client id) "
        "only when, this long after it was sent, lookups still miss it AND the trades and the position show it did "
        "not execute; longer than the exchange's order-query lag (Binance: a few seconds), s.")
    reconcile_reads: int = Field(
        3, ge=1, le=10, description="Reads of trades and position before a disagreement with the expected position "
        "is confirmed (a fill landing between the two reads resolves on a re-read).")
    reconcile_read_spacing_s: float = Field(
        1.0, ge=0, description="Wait before the second read of a reconciliation, s (doubles after).")
    with_funding: bool = Field(
        True, description="Join the funding history as ``funding_rate`` (features use it); a failed fetch "
        "quarantines the bar."
    )
    bad_candle_hold_bars: int = Field(
        2, ge=0, le=1000, description="Bars held (no policy, hold-or-flat) after an invalid or missing candle "
        "inside the context window is first seen and re-fetched in vain; then it is repaired as a gap (previous "
        "close, volume 0, candle_repaired event). The decided bar's own bad candle is always quarantined.")


class GuardLike(Protocol):
    """The risk guard interface (``serving.risk.RiskGuard``)."""

    def review(self, decision: Decision, account: Any) -> Any: ...

    def record_closed_trade(self, time: pd.Timestamp, pnl_usdt: float) -> None: ...


# ---------------------------------------------------------------------------------------------
# candles
# ---------------------------------------------------------------------------------------------


def last_closed_bar_ms(server_ms: int, tf_ms: int) -> int:
    """Open time (ms) of the last bar of ``tf_ms`` ms closed at exchange time ``server_ms`` (pure)."""
    return (server_ms // tf_ms) * tf_ms - tf_ms


def seconds_to_next_poll(now_ms: float, tf_ms: int, close_delay_s: float, poll_interval_s: float) -> float:
    """Seconds from ``now_ms`` (exchange-corrected wall clock, ms) until ``close_delay_s`` after the
    next bar close, within [``poll_interval_s``, one bar] (pure)."""
    next_close = (now_ms // tf_ms + 1) * tf_ms
    wait = (next_close - now_ms) / 1000.0 + close_delay_s
    return float(min(max(wait, poll_interval_s), tf_ms / 1000.0))


def atr_period_of(policy: object, default_bars: int) -> int:
    """ATR period (bars) in whose units ``policy`` means its stop and take-profit distances: its
    ``atr_period_bars`` (the bundle's feature ATR for V2, V1's own), else ``default_bars``."""
    period = getattr(policy, "atr_period_bars", None)
    return int(period) if period else int(default_bars)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, *, install: bool = True) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT only set ``stop`` (the loop finishes its bar first);
    the previous handlers come back afterwards. Nothing is installed outside the main thread or
    when ``install`` is False."""
    previous: dict[int, Any] = {}
    if install and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def with_funding_column(candles: pd.DataFrame, funding: Sequence[tuple[int, float]], tf_ms: int) -> pd.DataFrame:
    """``candles`` plus a float64 ``funding_rate`` column: the rate settled in each bar (funding time
    floored to the bar's open time, as the training data), NaN in bars without a settlement.
    Settlements outside the window are ignored (pure)."""
    out = candles.copy()
    col = np.full(len(out), np.nan)
    pos = {int(t.value // 1_000_000): i for i, t in enumerate(out.index)}
    for t_ms, rate in funding:
        i = pos.get((int(t_ms) // tf_ms) * tf_ms)
        if i is not None:
            col[i] = float(rate)
    out["funding_rate"] = col
    return out


def missed_bars(last_decided: pd.Timestamp | None, bar: pd.Timestamp, tf_ms: int) -> list[pd.Timestamp]:
    """Open times strictly between ``last_decided`` and ``bar`` (pure): bars that closed with no decision.

    Empty when ``last_decided`` is None (a new run) or not earlier than the bar before ``bar``.
    """
    if last_decided is None:
        return []
    step = pd.Timedelta(milliseconds=tf_ms)
    first = last_decided + step
    return list(pd.date_range(first, bar - step, freq=step)) if first < bar else []


def missed_bar_records(run_id: str, bars: Sequence[pd.Timestamp], side: int, reasons: dict[pd.Timestamp, str],
                       default_reason: str, created_at: pd.Timestamp) -> list[DecisionRecord]:
    """Decision rows (source 'missed') of ``bars`` (pure): direction ``side`` (the position left in
    place), default sizing, no raw action, latency 0, reason ``reasons.get(bar, default_reason)``."""
    decision = Decision(direction=int(side)) if side else Decision.flat()
    return [DecisionRecord.from_decision(run_id, b, "missed", decision, raw_action=None,
                                         fallback_reason=reasons.get(b, default_reason), latency_ms=0.0,
                                         created_at=created_at.to_pydatetime()) for b in bars]  # fmt: skip


def fill_notices(fills: Sequence[ExchangeFillRecord]) -> list[FillRecord]:
    """Exchange trades as :class:`FillRecord` for :func:`serving.notify.messages` (pure).

    ``reason`` is the intent kind of our client id ('entry', 'exit', 'stop', 'tp', 'unprot',
    'stopmv'), 'external' for a trade of an order we did not place; the bar is the trade time.
    """
    out = []
    for f in fills:
        parsed = parse_client_order_id(f.client_id) if f.client_id else None
        out.append(FillRecord(f.run_id, f.time, int(f.side), float(f.qty_base), float(f.price), float(f.fee_usdt),
                              0.0, parsed[2] if parsed else "external"))
    return out


MISSED_NO_STEP = ("missed: no step ran for this bar before the next close (process stopped or restarting, or every "
                  "attempt failed before the bar was known); nothing was sent, the position was left as it was")


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one :meth:`LiveLoop.step` did. ``bar_open_time`` None: no new closed bar yet."""

    bar_open_time: pd.Timestamp | None
    source: str | None = None
    decision: Decision | None = None
    quarantined: bool = False
    entries_blocked: tuple[str, ...] = ()
    sent: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)


_PROTECTIVE = ("stop_market", "take_profit_market")
_UNRESOLVED = ("written", "sent", "unknown", "not_found")


class LiveLoop:
    """The live serving loop over a :class:`serving.exchange.BinanceFuturesBroker` (module docstring).

    Parameters
    ----------
    broker : BinanceFuturesBroker
    store : StateStore
    config : LiveConfig
    primary : Policy | PolicySlot | None
        The V2 policy (None when its bundle failed to load; ``primary_load_error`` says why and is
        recorded as ``bundle_load_failed: <why>`` with every decision), or a
        :class:`serving.hotswap.PolicySlot` holding it: then failures back off (V1 decides the
        skipped bars) and new bundles (watched directory, ``ats serve reload``) are validated and
        swapped in between bars, exactly as in paper serving. A plain policy is wrapped in a slot
        without a loader (backoff only).
    fallback : Policy
        The V1 policy.
    guard : GuardLike | None
        Optional risk guard (``serving.risk.RiskGuard``); None = no guard.
    wall_clock_s : Callable[[], float]
        Local wall clock, seconds since the epoch (injected for clock-jump tests).
    monotonic_s : Callable[[], float]
        Monotonic clock for decision latency.
    sleep : Callable[[float], None]
        Used between steps and for Retry-After waits.
    redact : Callable[[str], str]
        Applied to every error text before it is recorded (e.g. ``ApiCredentials.redact``).
    notifier : Notifier | None
        Receives the run's new events and exchange fills after every step (module docstring);
        None: no notifications.
    crash_points : CrashPoints
        Called at each crash point (:mod:`serving.crash`); the default never fires. Tests inject
        :class:`serving.crash.KillAt`.
    """

    def __init__(
        self,
        broker: BinanceFuturesBroker,
        store: StateStore,
        config: LiveConfig,
        *,
        primary: Policy | PolicySlot | None,
        fallback: Policy,
        primary_load_error: str | None = None,
        guard: GuardLike | None = None,
        wall_clock_s: Callable[[], float] = time.time,
        monotonic_s: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        redact: Callable[[str], str] = lambda text: text,
        notifier: Notifier | None = None,
        crash_points: CrashPoints = NO_CRASH,
    ) -> None:
        if config.timeframe not in _TF_MS:
            raise ValueError(f"timeframe {config.timeframe!r} not supported; use one of {sorted(_TF_MS)}")
        self.broker, self.store, self.config = broker, store, config
        if primary is None and primary_load_error and not primary_load_error.startswith("bundle_load_failed"):
            primary_load_error = f"bundle_load_failed: {primary_load_error}"
        self.slot = primary if isinstance(primary, PolicySlot) else PolicySlot(primary, load_error=primary_load_error)
        self.fallback, self.primary_load_error = fallback, primary_load_error
        self._last_ctx: DecisionContext | None = None
        self.guard = guard
        self.wall_clock_s, self.monotonic_s, self._sleep = wall_clock_s, monotonic_s, sleep
        self._safe = lambda text: redact(strip_url_queries(text))  # no secret, no signed URL is ever recorded
        self.tf_ms = _TF_MS[config.timeframe]
        #: the rolling candle window (paging, flaws, repairs: :mod:`serving.candles`)
        self.candle_cache = CandleCache(config.timeframe, self.tf_ms, config.context_bars, config.bad_candle_hold_bars)
        self.stop_requested = threading.Event()
        self._started = False
        self._last_reason_kind: str | None = None
        self.clock_offset_ms: float = 0.0
        #: set by an unexpected exception in a step: entries stay halted for this process's life
        self.internal_error: str | None = None
        self.notifier = notifier
        self.crash_points = crash_points
        self._notified: tuple[int, int] | None = None  # (events id, exchange fills id) already published
        self._risk_state: str | None = None  # the guard's state at the last review
        self._attempt_bar: pd.Timestamp | None = None  # bar of the step in progress (None: not known yet)
        #: bar -> (failed attempts, last error) for bars whose steps failed in this process
        self._bar_failures: dict[pd.Timestamp, tuple[int, str]] = {}

    # -- helpers --------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.config.run_id

    @property
    def market_id(self) -> str:
        return self.broker.market_id

    def _event(self, time_: pd.Timestamp, kind: str, detail: dict[str, Any] | None = None) -> None:
        self.store.append_event(self.run_id, time_, kind, detail or {})

    def _now_ts(self) -> pd.Timestamp:
        return pd.Timestamp(int(self.wall_clock_s() * 1000), unit="ms", tz="UTC")

    def start(self) -> None:
        """Load market rules, require one-way position mode, set isolated margin (once per process)."""
        if self._started:
            return
        self.broker.load()
        self.broker.require_one_way_mode()
        self.broker.set_isolated_margin()
        self._started = True
        if self._notified is None:
            self._notified = self.store.max_ids()  # notify from now on, not the history
        self._event(self._now_ts(), "live_started", {"mode": self.config.mode, "symbol": self.config.symbol, "timeframe": self.config.timeframe,
                                                     "primary": getattr(self.primary, "name", None), "base_url": getattr(self.broker, "base_url", None)})

    @property
    def primary(self) -> Policy | None:
        """The current V2 policy (None while unavailable)."""
        return self.slot.policy

    # -- reconciliation -------------------------------------------------------------------------
    def _record_snapshot(self, snap: OrderSnapshot, client_id: str, when: pd.Timestamp) -> None:
        """Store one observation of our order ``client_id`` and move its intent to the status it shows.

        Trades stored before the order was known (an order found late by lookup) are linked to it. A
        stop or take-profit that triggered (``actual_order_id`` set) is 'filled': the order it placed
        is recorded under our client id too, and its stored trades are linked to it."""
        self.store.record_order(client_id, snap.exchange_id, snap.status, snap.filled_base, snap.average_price, when)
        if snap.exchange_id:
            self.store.link_fills(snap.exchange_id, client_id)
        if snap.conditional and snap.actual_order_id is not None:
            if self.store.client_id_of_order(snap.actual_order_id) is None:
                self.store.record_order(client_id, snap.actual_order_id, "triggered", snap.filled_base,
                                        snap.average_price, when)
            self.store.link_fills(snap.actual_order_id, client_id)
            if self.store.intent_status(client_id) != "filled":
                self.store.mark_intent(client_id, "filled", when, {"exchange_id": snap.exchange_id,
                                                                   "actual_order_id": snap.actual_order_id})
            return
        if snap.status == "rejected":
            status = "rejected"
        elif snap.status in ("canceled", "expired") and snap.filled_base <= 0:
            status = "cancelled"
        elif snap.filled_base > 0 and snap.status in ("closed", "expired", "canceled"):
            status = "filled"
        else:
            status = "acked"
        if self.store.intent_status(client_id) != status:
            self.store.mark_intent(client_id, status, when, {"exchange_id": snap.exchange_id,
                                                             "filled_base": snap.filled_base})

    def reconcile(self, current_bar: pd.Timestamp | None) -> dict[str, Any]:
        """Bring the store in line with the exchange (module docstring, phase 2).

        Returns a dict with ``position`` (:class:`ExchangePosition`), ``protection``
        (:class:`OpenProtection`), ``blocked`` (bool: the position is unreconciled), ``open_orders``.
        """
        now = self._now_ts()
        sym = self.market_id
        # (a) unresolved intents of earlier bars
        for it in self.store.unresolved_intents(self.run_id):
            if current_bar is not None and it["bar_open_time"] >= current_bar:
                continue  # this bar's intents are executed by the step itself
            conditional = it["order_type"] in _PROTECTIVE
            snap = self.broker.lookup(it["client_id"], conditional=conditional)
            if snap is not None:
                self._record_snapshot(snap, it["client_id"], now)
                self._event(now, "intent_resolved", {"client_id": it["client_id"], "status": snap.status})
            else:
                self.store.mark_intent(it["client_id"], "abandoned", now, {"reason": "not on the exchange, bar passed"})
                self._event(now, "intent_abandoned", {"client_id": it["client_id"], "was": it["status"]})
        # (b) fills and position; an operator's accept-position request is applied here
        position, agreed = self._sync_position(now, crash=True)
        request = self.store.pending_position_accept(sym)
        if request is not None:
            self._adopt_exchange_position(position, now, "position_accepted", {
                "note": request.get("note"), "request_id": request["request_id"],
                "seen_signed_qty": request.get("seen_signed_qty")})  # fmt: skip
            agreed = True
        # (c) open orders: our protective orders no longer open are looked up once (triggered ->
        # 'filled' and their trades linked; cancelled/expired -> 'cancelled'); orphans on a flat
        # position are cancelled only when that flat position agrees with our trades
        opened = self.broker.open_orders()
        ours = [o for o in opened if parse_client_order_id(o.client_id) is not None]
        self._resolve_closed_protection({o.client_id for o in ours}, now)
        if position.side == 0 and agreed:
            for o in ours:
                if o.conditional:
                    self.broker.cancel(o.client_id, conditional=True)
                    self._event(now, "orphan_order_cancelled", {"client_id": o.client_id})
                    if self.store.intent_status(o.client_id) is not None:
                        self.store.mark_intent(o.client_id, "cancelled", now, {"reason": "position flat"})
            ours = [o for o in ours if not o.conditional]
        stops = [o for o in ours if o.conditional and o.order_type == "stop_market"]
        tps = [o for o in ours if o.conditional and o.order_type == "take_profit_market"]
        protection = OpenProtection(
            stops[-1].client_id if stops else None, stops[-1].trigger_price if stops else None,
            tps[-1].client_id if tps else None, tps[-1].trigger_price if tps else None,
        )
        if position.side != 0 and not stops:
            self._event(now, "position_without_stop", {"side": position.side, "qty_base": position.qty_base})
        return {"position": position, "protection": protection, "blocked": self.store.position_blocked(sym),
                "open_orders": ours}

    def _resolve_closed_protection(self, open_ids: set[str], now: pd.Timestamp) -> None:
        """Look up each of our 'acked' stops and take-profits that the exchange no longer lists as
        open, and record what became of it (:meth:`_record_snapshot`); one lookup each, since a
        resolved intent is no longer 'acked'. Not found: left as it is (asked again next bar)."""
        intents = self.store.intents(self.run_id)
        if not len(intents):
            return
        acked = intents[(intents["status"] == "acked") & intents["order_type"].isin(_PROTECTIVE)]
        for cid in acked["client_id"]:
            if cid in open_ids:
                continue
            snap = self.broker.lookup(cid, conditional=True)
            if snap is not None and (snap.actual_order_id is not None or snap.status != "open"):
                self._record_snapshot(snap, cid, now)
                self._event(now, "protection_resolved", {"client_id": cid, "status": snap.status,
                                                         "actual_order_id": snap.actual_order_id})

    def _report_closed_trades(self, records: list[ExchangeFillRecord], now: pd.Timestamp) -> None:
        by_order: dict[str, float] = {}
        for r in records:
            if r.realized_pnl_usdt != 0.0:
                key = r.exchange_order_id or str(r.trade_id)
                by_order[key] = by_order.get(key, 0.0) + r.realized_pnl_usdt - r.fee_usdt
        for pnl in by_order.values():
            try:
                self.guard.record_closed_trade(now, float(pnl))  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - the guard fails closed on its own
                self._event(now, "guard_error", {"where": "record_closed_trade", "error": self._safe(repr(exc))[:500]})

    def reset_position_baseline(self) -> None:
        """Operator action in-process: accept the exchange position as the new reference (unblocks
        trading). From the command line: ``ats serve accept-position`` (module docstring)."""
        self.start()
        self._adopt_exchange_position(self.broker.position(), self._now_ts(), "position_baseline_reset", {})

    def _adopt_exchange_position(self, pos: ExchangePosition, now: pd.Timestamp, kind: str,
                                 detail: dict[str, Any]) -> None:
        """Write ``pos`` as the new 'baseline' (fills stored so far included) with a ``kind`` event."""
        self.store.record_position(self.run_id, self.market_id, now, pos.side, pos.qty_base, pos.entry_price,
                                   "baseline", self.store.last_trade_id(self.market_id),
                                   events=[EventRecord(self.run_id, now, kind,
                                                       {**detail, "signed_qty": pos.side * pos.qty_base})])

    # -- sending --------------------------------------------------------------------------------
    def _intent_from_row(self, r: dict[str, Any]) -> OrderIntent:
        return OrderIntent(r["client_id"], r["kind"], r["symbol"], pd.Timestamp(r["bar_open_time"]), r["side"],
                           r["order_type"], r["qty_base"], r["trigger_price"], bool(r["reduce_only"]),
                           bool(r["close_position"]))

    def _ensure_sent(self, intent: OrderIntent, result: StepResult) -> OrderSnapshot | None:
        """Send ``intent`` unless the exchange already has it; returns the exchange's view (None: not placed).

        Never twice: an intent that may have reached the exchange ('sent': the process stopped
        during the request; 'unknown': the create timed out, dropped, answered 5xx or -4116) is
        looked up by client id first (spaced lookups: Binance's order queries lag its matching
        engine). A conditional order not found is re-sent with the same id (while it is open, the
        exchange refuses a second one with -4116). A **market** order not found is re-sent only
        when :meth:`_settle_unknown` proves it absent (``create_settle_s`` after the send, no trade
        of an unknown order since, position as expected); otherwise it is held ('unknown' stays,
        ``resend_withheld`` event) and the next reconciliation finds its trades or its order.
        """
        cid = intent.client_id
        conditional = intent.order_type in _PROTECTIVE
        status = self.store.intent_status(cid)
        if status in ("acked", "filled"):
            row = self.store.latest_order(cid)
            if row is None:
                return None
            return OrderSnapshot(cid, row["exchange_order_id"] or "", row["status"], intent.side, intent.order_type,
                                 intent.qty_base or 0.0, row["filled_qty_base"], row["avg_price"],
                                 intent.trigger_price, conditional, intent.reduce_only)
        if status in ("rejected", "abandoned", "cancelled"):
            return None
        ambiguous = status in ("sent", "unknown")  # may have reached the exchange
        look_first = status == "not_found"
        for _attempt in range(3):
            now = self._now_ts()
            if ambiguous or look_first:
                snap = self._lookup_spaced(cid, conditional, spaced=ambiguous)  # never send twice
                if snap is not None:
                    self._record_snapshot(snap, cid, self._now_ts())
                    result.events.append(f"found_by_client_id:{cid}")
                    return snap
                if ambiguous and not conditional:  # a filled market order frees its id: prove it absent
                    snap, absent = self._settle_unknown(cid)
                    if snap is not None:
                        result.events.append(f"found_by_client_id:{cid}")
                        return snap
                    if not absent:
                        self._event(self._now_ts(), "resend_withheld", {
                            "client_id": cid, "why": "not found by client id, but its absence is not confirmed by "
                            "trades and position; held, reconciled next bar"})  # fmt: skip
                        result.events.append(f"resend_withheld:{cid}")
                        return None
                if self.store.intent_status(cid) != "not_found":
                    self.store.mark_intent(cid, "not_found", now)
            self.store.mark_intent(cid, "sent", now)
            try:
                snap = self.broker.create(intent)
            except AmbiguousOutcomeError as exc:
                self.store.mark_intent(cid, "unknown", self._now_ts(), {"error": self._safe(str(exc))[:500]})
                self._event(self._now_ts(), "ambiguous_create", {"client_id": cid, "error": self._safe(str(exc))[:500]})
                ambiguous, look_first = True, False
                continue  # next attempt starts with a lookup
            except RateLimitedError as exc:
                wait = min(exc.retry_after_s, self.config.rate_limit_max_wait_s)
                self._event(self._now_ts(), "rate_limited", {"client_id": cid, "retry_after_s": exc.retry_after_s})
                self._sleep(wait)
                ambiguous, look_first = False, True  # refused by the limiter: one lookup, then send
                continue
            except RejectedError as exc:
                self.store.mark_intent(cid, "rejected", self._now_ts(), {"error": self._safe(str(exc))[:500]})
                self._event(self._now_ts(), "order_rejected", {"client_id": cid, "error": self._safe(str(exc))[:500]})
                return None
            self.crash_points.hit("after_send")
            self._record_snapshot(snap, cid, self._now_ts())
            result.sent.append(cid)
            self.crash_points.hit("after_ack")
            return snap
        self._event(self._now_ts(), "intent_unresolved", {"client_id": cid})
        return None

    def _settle_unknown(self, cid: str) -> tuple[OrderSnapshot | None, bool]:
        """What became of the market order ``cid`` that lookups did not find: ``(snapshot, absent)``.

        Waits until ``create_settle_s`` after its last send (longer than the exchange's query
        lag) and looks it up once more: found -> ``(snapshot, False)``, recorded. Otherwise reads
        trades and position (:meth:`_sync_position`): ``absent`` (proven not executed) when no
        trade of an order we do not know has appeared since the send and the position agrees with
        our trades. A read that fails raises (the step is retried; nothing is sent meanwhile).
        """
        sent = self.store.last_status_time(cid, "sent")
        if sent is not None:
            left = self.config.create_settle_s - (self._now_ts() - sent).total_seconds()
            if left > 0:
                self._sleep(left)
        snap = self.broker.lookup(cid, conditional=False)
        if snap is not None:
            self._record_snapshot(snap, cid, self._now_ts())
            return snap, False
        _position, agreed = self._sync_position(self._now_ts())
        fills = self.store.exchange_fills(self.market_id)
        if sent is not None and len(fills):
            fills = fills[fills["time"] >= sent - pd.Timedelta(seconds=1)]
        unknown = fills[fills["client_id"].isna()] if len(fills) else fills
        return None, bool(agreed and not len(unknown))

    def _lookup_spaced(self, cid: str, conditional: bool, *, spaced: bool) -> OrderSnapshot | None:
        """Look ``cid`` up (open and closed orders); after an ambiguous create (``spaced``), up to
        ``lookup_attempts`` times, ``lookup_spacing_s`` apart and doubling, because an order that
        reached the exchange may take a moment to be visible by client id."""
        attempts = self.config.lookup_attempts if spaced else 1
        wait = self.config.lookup_spacing_s
        for k in range(attempts):
            if k:
                self._sleep(wait)
                wait *= 2.0
            snap = self.broker.lookup(cid, conditional=conditional)
            if snap is not None:
                return snap
        return None

    def _cancel_protection(self, open_orders: list[OrderSnapshot], kinds: tuple[str, ...], bar: pd.Timestamp) -> None:
        now = self._now_ts()
        for o in open_orders:
            parsed = parse_client_order_id(o.client_id)
            if not o.conditional or parsed is None or parsed[2] not in kinds:
                continue
            if pd.Timestamp(parsed[1], unit="s", tz="UTC") >= bar:
                continue  # this bar's own protective orders stay
            self.broker.cancel(o.client_id, conditional=True)
            if self.store.intent_status(o.client_id) is not None:
                self.store.mark_intent(o.client_id, "cancelled", now, {"reason": "replaced"})

    # -- one bar --------------------------------------------------------------------------------
    def last_closed_bar_ms(self, server_ms: int) -> int:
        """Open time (ms) of the last bar closed at ``server_ms``."""
        return last_closed_bar_ms(server_ms, self.tf_ms)

    def step(self) -> StepResult:
        """Process the last closed bar if it is new or unfinished (module docstring); then publish the
        new events and fills to the notifier. Errors of the step propagate (see :meth:`run`)."""
        try:
            return self._step()
        finally:
            self.publish_notifications()

    def _step(self) -> StepResult:
        self._attempt_bar = None
        self.start()
        cfg = self.config
        server_ms = self.broker.server_time_ms()
        wall_ms = self.wall_clock_s() * 1000.0
        self.clock_offset_ms = server_ms - wall_ms
        bar_ms = self.last_closed_bar_ms(server_ms)
        bar = pd.Timestamp(bar_ms, unit="ms", tz="UTC")
        self._attempt_bar = bar
        state = self.reconcile(bar)
        self._record_late_equity(bar, state["position"])
        self._record_missed(bar, state["position"].side)
        decided = self.store.decision_at(self.run_id, bar)
        result = StepResult(bar)
        if decided is not None:
            intents = self.store.bar_intents(self.run_id, bar)
            unfinished = any(i["status"] in _UNRESOLVED for i in intents)
            entry = next((i for i in intents if i["kind"] == "entry"), None)
            needs_protection = entry is not None and entry["status"] in ("acked", "filled") and not any(
                i["kind"] in ("stop", "tp") for i in intents)
            if not unfinished and not needs_protection:
                if not self.store.has_equity(self.run_id, bar):  # stopped after its orders, before its equity
                    self._finish(bar, state, result)
                return StepResult(None)  # nothing new
            result.source = str(decided["source"])
            result.decision = Decision(int(decided["direction"]), float(decided["leverage"]),
                                       float(decided["size_frac"]), float(decided["stop_atr"]),
                                       float(decided["take_profit_atr"]))
            self._event(bar, "bar_resumed", {"unfinished": [i["client_id"] for i in intents if i["status"] in _UNRESOLVED]})
            window = self._fetch_window(bar_ms)
            atr_t = self._atr(window.candles, result.source)
            self._execute(bar, [self._intent_from_row(i) for i in intents if i["kind"] in ("exit", "entry", "stopmv", "unprot")],
                          state, result, atr_t)
            self._finish(bar, state, result)
            return result

        blocked: list[str] = []
        if abs(self.clock_offset_ms) > cfg.max_clock_offset_ms:
            blocked.append(f"clock_offset: {self.clock_offset_ms:.0f} ms")
        if state["blocked"]:
            blocked.append("position_unreconciled")
        if self.internal_error is not None:
            blocked.append(f"internal_error: {self.internal_error}")
        window = self._fetch_window(bar_ms)
        position: ExchangePosition = state["position"]
        equity = self.broker.equity_usdt()
        events: list[EventRecord] = []
        raw: tuple[float, ...] | None = None
        latency_ms = 0.0
        if window.candles is None:
            result.quarantined = True
            blocked.append("quarantine")
            decision = Decision(direction=position.side) if position.side != 0 else Decision.flat()
            source, reason = "guard", f"quarantine: {'; '.join(window.problems)}"[:2000]
            events.append(EventRecord(self.run_id, bar, "quarantine", {"problems": list(window.problems)}))
            atr_t = math.nan
        else:
            view = self._position_view(position, state["protection"], bar)
            recorded_peak = self.store.peak_equity(self.run_id)  # the run's, not the policy instance's
            ctx = DecisionContext(bar_open_time=bar, candles=window.candles, position=view, equity_usdt=equity,
                                  peak_equity_usdt=max(equity, recorded_peak if recorded_peak is not None else equity))
            bar_index = bar_ms // self.tf_ms  # the slot's backoff counts bars
            for kind, detail in self.slot.poll(bar_index, self._last_ctx):  # hot-swap between bars
                events.append(EventRecord(self.run_id, bar, kind, detail))
            policy, unavailable = self.slot.acquire(bar_index)
            choice = choose(ctx, policy, self.fallback, unavailable or self.primary_load_error, cfg.decision_timeout_ms,
                            self.monotonic_s)
            if policy is not None:
                for kind, detail in self.slot.record(bar_index, choice.primary_failure):
                    events.append(EventRecord(self.run_id, bar, kind, detail))
            self._last_ctx = ctx
            decision, source, reason, raw, latency_ms = (choice.decision, choice.source, choice.reason,
                                                          choice.raw_action, choice.latency_ms)
            for kind, detail in choice.events:
                events.append(EventRecord(self.run_id, bar, kind, detail))
            if source != "v2" and reason is not None:
                kind = reason_kind(reason)
                if kind != self._last_reason_kind:
                    events.append(EventRecord(self.run_id, bar, "fallback_engaged", {"reason": reason}))
                self._last_reason_kind = kind
            else:
                self._last_reason_kind = None
            atr_t = self._atr(window.candles, source)  # in the deciding policy's ATR units
        if not (math.isfinite(atr_t) and atr_t > 0):
            blocked.append(f"atr_invalid: {atr_t!r}")
        if not equity > 0:
            blocked.append(f"equity_not_positive: {equity!r}")
        # the close of the decided bar sizes an entry; on a quarantined bar there is none (entries blocked)
        price = float(window.candles["close"].iloc[-1]) if window.candles is not None else math.nan
        if self.guard is not None:
            decision, guard_blocks, guard_events = self._review(decision, bar, equity, position, price)
            blocked += guard_blocks
            events += guard_events
        plan = plan_bar(symbol=self.market_id, bar_open_time=bar, position=position, protection=state["protection"],
                        decision=decision, price_usdt=price, equity_usdt=equity, rules=self.broker.rules,
                        allow_entry=not blocked)
        if plan.notes:
            events.append(EventRecord(self.run_id, bar, "plan_notes", {"notes": list(plan.notes), "blocked": blocked}))
        record = DecisionRecord.from_decision(
            self.run_id, bar, source, decision, raw_action=raw, fallback_reason=reason, latency_ms=latency_ms,
            created_at=self._now_ts().to_pydatetime(),
        )
        orders = list(plan.orders)
        if state["blocked"] or self.internal_error is not None:
            # an unreconciled position (or an unexpected error earlier in this process): no order at
            # all, exits included, since their size would rest on a position we cannot vouch for
            why = "position_unreconciled" if state["blocked"] else f"internal_error: {self.internal_error}"
            if orders or state["blocked"]:
                events.append(EventRecord(self.run_id, bar, "trading_refused", {
                    "reason": why, "orders_not_sent": [o.client_id for o in orders]}))  # fmt: skip
            orders = [] if state["blocked"] else [o for o in orders if o.reduce_only]
        self.store.write_intents(self.run_id, orders, self._now_ts(), decisions=[record], events=events)
        self.crash_points.hit("after_intent_written")
        result.source, result.decision, result.entries_blocked = source, decision, tuple(blocked)
        self._execute(bar, orders, state, result, atr_t)
        if position.side != 0 and decision.direction == position.side and not state["blocked"]:
            self._repair_protection(bar, position, state["protection"], window.candles, result)
        self._finish(bar, state, result)
        return result

    def _record_late_equity(self, bar: pd.Timestamp, position: ExchangePosition) -> None:
        """The last decided bar before ``bar`` has no equity row (the process stopped or failed between
        its orders and its equity snapshot, and the bar has passed): record one now, with the
        equity read now and ``position`` (this step's reconciled one), and an ``equity_recorded_late``
        event saying so."""
        last = self.store.last_decision_bar(self.run_id)
        if last is None or last >= bar or self.store.has_equity(self.run_id, last):
            return
        row = self.store.decision_at(self.run_id, last)
        if row is None or row["source"] == "missed":
            return
        equity = self.broker.equity_usdt()
        now = self._now_ts()
        self.store.append(equity=[EquityRecord(self.run_id, last, equity, equity, position.side, position.qty_base)],
                          events=[EventRecord(self.run_id, now, "equity_recorded_late", {
                              "bar": str(last), "equity_usdt": equity,
                              "why": "stopped before the bar's equity snapshot; equity read at the next step"})])

    def _record_missed(self, bar: pd.Timestamp, side: int) -> None:
        """Record the bars before ``bar`` that closed without a decision (source 'missed'; module
        docstring), with ``side``: the reconciled exchange position (what was left in place)."""
        gap = missed_bars(self.store.last_decision_bar(self.run_id), bar, self.tf_ms)
        if not gap:
            self._bar_failures = {b: v for b, v in self._bar_failures.items() if b >= bar}
            return
        reasons = {b: (f"missed: every attempt to process this bar failed before its decision was recorded ({n} "
                       f"attempts; last: {err}); nothing was sent, the position was left as it was")
                   for b, (n, err) in self._bar_failures.items()}  # fmt: skip
        side = int(side)
        now = self._now_ts()
        rows = missed_bar_records(self.run_id, gap, side, reasons, MISSED_NO_STEP, now)
        failed = [b for b in gap if b in self._bar_failures]
        self.store.append(decisions=rows, events=[EventRecord(self.run_id, now, "bars_missed", {
            "first": str(gap[0]), "last": str(gap[-1]), "count": len(gap), "failed_in_process": len(failed),
            "position_side": side})])  # fmt: skip
        self._bar_failures = {b: v for b, v in self._bar_failures.items() if b >= bar}

    def _note_failure(self, error: str) -> None:
        """Count a failed attempt of the bar in progress (its reason if it ends up missed)."""
        if self._attempt_bar is None:
            return
        n, _ = self._bar_failures.get(self._attempt_bar, (0, ""))
        self._bar_failures[self._attempt_bar] = (n + 1, error[:300])

    def publish_notifications(self) -> None:
        """Hand the run's events and fills stored since the last call to the notifier; never raises."""
        if self.notifier is None or self._notified is None:
            return
        try:
            events, ev_id = self.store.events_after(self.run_id, self._notified[0])
            fills, fill_id = self.store.exchange_fills_after(self.market_id, self._notified[1])
            self._notified = (ev_id, fill_id)
            events = [e for e in events if not (e.kind == "step_failed" and e.detail.get("consecutive", 1) > 1)]
            if events or fills:
                self.notifier.publish(events, fill_notices(fills))
        except Exception:  # noqa: BLE001 - a notification must never stop trading
            return

    def _repair_protection(self, bar: pd.Timestamp, position: ExchangePosition, protection: OpenProtection,
                           candles: pd.DataFrame | None, result: StepResult) -> None:
        """A held position without its stop (or take-profit): place the missing one(s) again.

        Levels: ``stop_atr`` / ``take_profit_atr`` of the decision that opened the position (defaults
        of :class:`Decision` for a position we did not open) times the ATR of this bar in the opening
        policy's period (:meth:`_atr_period`), from the exchange's entry price; ids of this bar. A stop the exchange refuses (price already beyond
        it) closes the position (``unprot``).
        """
        missing = [k for k, present in (("stop", protection.stop_price), ("tp", protection.tp_price)) if present is None]
        if not missing or not position.entry_price > 0:
            return
        found = self._our_entry(position)
        atr_t = self._atr(candles, None if found is None else str(found[1]["source"]))
        if not (math.isfinite(atr_t) and atr_t > 0):
            return
        opening = self._opening_decision(position) or Decision(direction=position.side)
        stop, tp = protective_intents(self.market_id, bar, position.side, position.entry_price, atr_t, opening,
                                      self.broker.rules)
        todo = [i for i in (stop, tp) if i.kind in missing]
        self.store.write_intents(self.run_id, todo, self._now_ts(), events=[EventRecord(
            self.run_id, bar, "protection_repaired", {"missing": missing, "atr": atr_t})])
        for intent in todo:
            self._ensure_sent(intent, result)
        if "stop" in missing and self.store.intent_status(stop.client_id) == "rejected":
            self._close_unprotected(bar, result)

    def _our_entry(self, position: ExchangePosition) -> tuple[pd.Timestamp, dict[str, Any]] | None:
        """(bar, decision row) of our latest filled entry on the side of ``position``; None if none."""
        if position.side == 0:
            return None
        intents = self.store.intents(self.run_id)
        side = "buy" if position.side > 0 else "sell"
        mine = intents[(intents["kind"] == "entry") & (intents["status"] == "filled") & (intents["side"] == side)]
        if not len(mine):
            return None
        entry_bar = mine["bar_open_time"].iloc[-1]
        row = self.store.decision_at(self.run_id, entry_bar)
        return None if row is None else (entry_bar, row)

    def _opening_decision(self, position: ExchangePosition) -> Decision | None:
        """The decision of our latest filled entry on the side of ``position`` (None if none)."""
        found = self._our_entry(position)
        if found is None:
            return None
        row = found[1]
        return Decision(int(row["direction"]), float(row["leverage"]), float(row["size_frac"]),
                        float(row["stop_atr"]), float(row["take_profit_atr"]))

    def _position_view(self, position: ExchangePosition, protection: OpenProtection, bar: pd.Timestamp
                       ) -> PositionView:
        """The position as the policies saw it in training: leverage of the deciding bar and closed bars
        since the fill (the entry of bar b fills at the open of b+1), from our latest filled entry of
        this side; an entry we did not make gives leverage 1 and 0 bars."""
        leverage, bars = 1.0, 0
        found = self._our_entry(position)
        if found is not None:
            entry_bar, row = found
            leverage = float(row["leverage"])
            bars = max(0, int((bar - entry_bar) / pd.Timedelta(milliseconds=self.tf_ms)))
        return PositionView(side=position.side, quantity_base=position.qty_base, entry_price=position.entry_price,
                            leverage=leverage, bars_in_trade=bars, stop_price=protection.stop_price,
                            take_profit_price=protection.tp_price)

    def _review(self, decision: Decision, bar: pd.Timestamp, equity: float, position: ExchangePosition,
                mark_usdt: float) -> tuple[Decision, list[str], list[EventRecord]]:
        if not math.isfinite(mark_usdt):
            mark_usdt = position.entry_price  # quarantined bar: no trusted close, mark at entry
        try:
            notional = position.qty_base * mark_usdt
            snap = AccountSnapshot(time=bar, equity_usdt=float(equity), position_side=position.side,
                                     position_qty_base=position.qty_base, position_notional_usdt=notional,
                                     # effective account leverage (the exchange reports none per position)
                                     leverage=1.0 if position.side == 0 else max(1.0, notional / equity))
            verdict = self.guard.review(decision, snap)  # type: ignore[union-attr]
            if not isinstance(verdict.decision, Decision):
                raise TypeError(f"guard returned {type(verdict.decision).__name__}")
        except Exception as exc:  # noqa: BLE001 - fail closed: no entries
            return (Decision(direction=position.side) if position.side else Decision.flat(), ["guard_error"],
                    [EventRecord(self.run_id, bar, "guard_error", {"error": self._safe(repr(exc))[:500]})])
        blocks = [] if verdict.state == "ACTIVE" else [f"guard_{verdict.state}"]
        events = [] if not verdict.reasons else [EventRecord(self.run_id, bar, "guard_verdict", {
            "state": verdict.state, "reasons": list(verdict.reasons)})]
        previous, self._risk_state = self._risk_state, str(verdict.state)
        if self._risk_state != previous and not (previous is None and self._risk_state == "ACTIVE"):
            events.append(EventRecord(self.run_id, bar, "risk_state_changed", {
                "from": previous, "to": self._risk_state, "reasons": list(verdict.reasons)}))  # fmt: skip
        return verdict.decision, blocks, events

    def _fetch_window(self, bar_ms: int) -> CandleWindow:
        """The context window of the bar opening at ``bar_ms`` from the rolling candle cache (module
        docstring, phase 3), with ``funding_rate`` joined; ``candles`` None (quarantine) with the
        problems when the bar's own candle is bad or missing, a page is malformed, the window is
        held for a flawed row or lacks history, or the funding history cannot be fetched. The
        cache's ``candle_repaired`` / ``candle_corrected`` events are recorded here.

        Raises
        ------
        RetryableError, RejectedError
            A klines request failed (the step fails and is retried).
        """
        ctx = self.candle_cache.context(self.broker, bar_ms)
        bar = pd.Timestamp(bar_ms, unit="ms", tz="UTC")
        for kind, detail in ctx.events:
            self._event(bar, kind, detail)
        if ctx.candles is None:
            why = ctx.problem if ctx.problem is not None else ctx.hold.reason if ctx.hold is not None else "no window"
            return CandleWindow(None, (why,))
        window = CandleWindow(ctx.candles, ())
        if not self.config.with_funding:
            return window
        try:
            funding = fetch_funding_since(self.broker, int(window.candles.index[0].value // 1_000_000), bar_ms)
        except RetryableError as exc:
            return CandleWindow(None, (f"funding history unavailable: {self._safe(str(exc))[:300]}",))
        return CandleWindow(with_funding_column(window.candles, funding, self.tf_ms), ())

    def _atr_period(self, source: str | None) -> int:
        """ATR period (bars) in whose units the decisions of ``source`` place stops: the deciding
        policy's ``atr_period_bars`` (V2: the bundle's feature ATR, V1: its own), else
        ``config.atr_period_bars``."""
        return atr_period_of({"v1": self.fallback, "v2": self.slot.policy}.get(source or ""),
                             self.config.atr_period_bars)

    def _atr(self, candles: pd.DataFrame | None, source: str | None) -> float:
        """ATR of the last bar of ``candles`` (price units) in ``source``'s period; NaN without candles."""
        if candles is None:
            return math.nan
        return float(atr_indicator(candles, self._atr_period(source))[-1])

    def _execute(self, bar: pd.Timestamp, orders: list[OrderIntent], state: dict[str, Any], result: StepResult,
                 atr_t: float) -> None:
        open_orders: list[OrderSnapshot] = state["open_orders"]
        entry_snap: OrderSnapshot | None = None
        entry_intent: OrderIntent | None = None
        for intent in orders:
            if intent.kind == "exit":
                self._cancel_protection(open_orders, ("stop", "tp", "stopmv"), bar)
            elif intent.kind == "stopmv":
                self._cancel_protection(open_orders, ("stop", "stopmv"), bar)
            elif intent.kind == "entry":
                decision = result.decision or Decision.flat()
                self.broker.set_leverage(exchange_leverage(decision.leverage, self.config.max_leverage))
            snap = self._ensure_sent(intent, result)
            if intent.kind == "entry":
                entry_snap, entry_intent = snap, intent
            if snap is not None and snap.filled_base > 0:
                self.crash_points.hit("after_fill")
        if entry_intent is None or entry_snap is None or entry_snap.filled_base <= 0:
            return
        fill_price = entry_snap.average_price
        decision = result.decision
        if decision is None or fill_price is None or not (math.isfinite(atr_t) and atr_t > 0):
            self._event(bar, "protection_skipped", {"why": f"fill_price={fill_price!r} atr={atr_t!r}"})
            return
        side = 1 if entry_intent.side == "buy" else -1
        stop, tp = protective_intents(self.market_id, bar, side, fill_price, atr_t, decision, self.broker.rules)
        self.store.write_intents(self.run_id, [stop, tp], self._now_ts())
        for intent in (stop, tp):
            self._ensure_sent(intent, result)
        if self.store.intent_status(stop.client_id) == "rejected":
            self._close_unprotected(bar, result)

    def _close_unprotected(self, bar: pd.Timestamp, result: StepResult) -> None:
        """The exchange refused the stop of a new position: close it (reduce-only market, own intent)."""
        position = self.broker.position()
        if position.side == 0:
            return
        intent = OrderIntent(client_order_id(self.market_id, bar, "unprot"), "unprot", self.market_id, bar,
                             "sell" if position.side > 0 else "buy", "market", position.qty_base, None, True, False)
        self.store.write_intents(self.run_id, [intent], self._now_ts(), events=[EventRecord(
            self.run_id, bar, "stop_rejected_closing", {"signed_qty": position.side * position.qty_base})])
        self._ensure_sent(intent, result)
        for o in self.broker.open_orders():  # its take-profit is now an orphan
            if o.conditional and parse_client_order_id(o.client_id) is not None:
                self.broker.cancel(o.client_id, conditional=True)
                if self.store.intent_status(o.client_id) is not None:
                    self.store.mark_intent(o.client_id, "cancelled", self._now_ts(), {"reason": "stop rejected"})

    def _sync_position(self, now: pd.Timestamp, *, crash: bool = False) -> tuple[ExchangePosition, bool]:
        """Store fills after the last seen trade id and the position, checked against them (one
        transaction); returns the exchange position and whether it agrees with our trades.

        Expected signed position = the last *trusted* position row ('baseline' or 'reconcile') +
        signed fills after its ``last_trade_id`` (a pure function of stored rows, so a crash between
        any two calls changes nothing; an 'unreconciled' row records what the exchange showed, never
        our expectation). A disagreement is read again (``reconcile_reads`` reads of trades then
        position, ``reconcile_read_spacing_s`` apart, doubling) before it is confirmed: a stop or
        take-profit that fills between the two reads shows in the next one. A confirmed
        disagreement writes an 'unreconciled' row (trading refused); the next read that agrees
        writes a 'reconcile' row and clears it (``position_reconciled`` event). A read that fails or
        is malformed raises (:class:`serving.errors.RetryableError`): unknown is never taken for
        flat. With no row yet, our expectation is flat ('baseline' 0): a non-zero exchange position
        is 'unreconciled' (an external position is never adopted silently).
        """
        sym = self.market_id
        last_tid = self.store.last_trade_id(sym)
        trusted = self.store.last_trusted_position(sym)
        half_step = self.broker.rules.step_size_base / 2
        wait = self.config.reconcile_read_spacing_s
        reads = 0
        while True:
            fills = self.broker.fills_since(last_tid)
            if crash and reads == 0:
                self.crash_points.hit("during_reconciliation")
            position = self.broker.position()
            reads += 1
            expected = self._expected_signed(trusted, fills)
            ok = abs(expected - position.side * position.qty_base) <= half_step
            if ok or reads >= (1 if trusted is None else self.config.reconcile_reads):
                break
            self._sleep(wait)
            wait *= 2.0
        records = [
            ExchangeFillRecord(self.run_id, sym, f.trade_id, f.exchange_order_id,
                               self.store.client_id_of_order(f.exchange_order_id), f.side, f.qty_base, f.price,
                               f.fee_usdt, f.realized_pnl_usdt, f.time)
            for f in fills
        ]  # fmt: skip
        ids = [f.trade_id for f in fills] + ([last_tid] if last_tid is not None else [])
        new_last_tid = max(ids) if ids else None
        signed = position.side * position.qty_base
        events: list[EventRecord] = []
        if records:
            events.append(EventRecord(self.run_id, now, "fills_recorded", {"trade_ids": [r.trade_id for r in records]}))
        if trusted is None:
            events.append(EventRecord(self.run_id, now, "position_baseline", {"signed_qty": 0.0,
                                                                              "exchange_signed_qty": signed}))
            self.store.record_position(self.run_id, sym, now, 0, 0.0, 0.0, "baseline", new_last_tid, fills=records,
                                       events=events)
            if not ok:
                self.store.record_position(
                    self.run_id, sym, now, position.side, position.qty_base, position.entry_price, "unreconciled",
                    new_last_tid, events=[EventRecord(self.run_id, now, "position_unreconciled", {
                        "exchange_signed_qty": signed, "expected_signed_qty": 0.0, "why": "external position"})],
                )  # fmt: skip
            return position, ok
        if reads > 1:
            events.append(EventRecord(self.run_id, now, "position_read_again", {
                "reads": reads, "agreed": ok, "exchange_signed_qty": signed, "expected_signed_qty": expected}))
        if ok and self.store.position_blocked(sym):
            events.append(EventRecord(self.run_id, now, "position_reconciled", {
                "signed_qty": signed, "why": "a later read agrees with our trades"}))
        if not ok:
            events.append(EventRecord(self.run_id, now, "position_unreconciled", {
                "exchange_signed_qty": signed, "expected_signed_qty": expected, "reads": reads}))
        n_new = self.store.record_position(self.run_id, sym, now, position.side, position.qty_base,
                                           position.entry_price, "reconcile" if ok else "unreconciled", new_last_tid,
                                           fills=records, events=events)
        if n_new and self.guard is not None:
            self._report_closed_trades(records, now)
        return position, ok

    def _expected_signed(self, trusted: dict[str, Any] | None, new_fills: Sequence[Any]) -> float:
        """Signed position we expect (base units): ``trusted`` row + stored fills after its trade id +
        ``new_fills`` not stored yet (:class:`serving.exchange.TradeFill`); flat without a row."""
        if trusted is None:
            return 0.0
        stored = self.store.exchange_fills(self.market_id)
        known = stored[stored["trade_id"] > (trusted["last_trade_id"] or 0)]
        known_ids = {int(x) for x in known["trade_id"]}
        expected = trusted["side"] * trusted["qty_base"] + float((known["side"] * known["qty_base"]).sum())
        return expected + sum(f.side * f.qty_base for f in new_fills if f.trade_id not in known_ids)

    def _finish(self, bar: pd.Timestamp, state: dict[str, Any], result: StepResult) -> None:
        """Record fills and position; the bar's equity row (one per bar: a resumed bar keeps its first);
        then raise when an intent of the bar is still unresolved, so :meth:`run` resumes the bar
        within it (the resume looks the intent up again and protects a filled entry at once)
        instead of leaving it, and a position it may have opened without a stop, to the next bar.

        Raises
        ------
        RetryableError
            An intent of ``bar`` is still 'written', 'sent', 'unknown' or 'not_found'.
        """
        position, _agreed = self._sync_position(self._now_ts())
        if not self.store.has_equity(self.run_id, bar):
            equity = self.broker.equity_usdt()
            self.store.append(equity=[EquityRecord(self.run_id, bar, equity, equity, position.side,
                                                   position.qty_base)])
        unresolved = [i["client_id"] for i in self.store.bar_intents(self.run_id, bar) if i["status"] in _UNRESOLVED]
        if unresolved:
            raise RetryableError(f"intents of bar {bar} unresolved: {unresolved}; the bar is resumed within it")

    # -- running --------------------------------------------------------------------------------
    def seconds_to_next_poll(self) -> float:
        """Seconds until ``close_delay_s`` after the next bar close, by the exchange-corrected wall clock."""
        return seconds_to_next_poll(self.wall_clock_s() * 1000.0 + self.clock_offset_ms, self.tf_ms,
                                    self.config.close_delay_s, self.config.poll_interval_s)

    def run(self, *, max_steps: int | None = None, install_signal_handlers: bool = True,
            poll_s: float | None = None) -> int:
        """Step until stopped (SIGTERM/SIGINT, :attr:`stop_requested`) or ``max_steps`` bars decided.

        A signal only sets :attr:`stop_requested`; the bar in progress finishes first. Retryable,
        ambiguous and rejected errors end the step (recorded as ``step_failed``; the next poll
        resumes the bar by client id); a :class:`FatalError` stops the loop (re-raised).
        Returns the number of bars processed.
        """
        with stop_on_signals(self.stop_requested, install=install_signal_handlers):
            return self._run(max_steps, poll_s)

    def _run(self, max_steps: int | None, poll_s: float | None) -> int:
        done = 0
        failures = 0  # consecutive failed steps: retried within the bar, with a doubling wait
        while not self.stop_requested.is_set():
            failed = False
            self._attempt_bar = None
            try:
                result = self.step()
                if result.bar_open_time is not None:
                    done += 1
            except (RetryableError, AmbiguousOutcomeError, RejectedError) as exc:
                failed = True
                self._note_failure(self._safe(f"{type(exc).__name__}: {exc}"))
                self._event(self._now_ts(), "step_failed", {"error": self._safe(f"{type(exc).__name__}: {exc}")[:1000],
                                                            "consecutive": failures + 1})  # fmt: skip
            except FatalError as exc:
                self._event(self._now_ts(), "fatal_error", {"error": self._safe(f"{type(exc).__name__}: {exc}")[:1000]})
                self.publish_notifications()
                raise
            except Exception as exc:  # noqa: BLE001 - a bug or unforeseen error: exits go on, entries stop
                failed = True
                self.internal_error = self._safe(f"{type(exc).__name__}: {exc}")[:300]
                self._note_failure(self.internal_error)
                self._event(self._now_ts(), "internal_error", {
                    "error": self._safe(f"{type(exc).__name__}: {exc}")[:1000],
                    "traceback": self._safe(traceback.format_exc())[-3000:],
                    "effect": "entries halted until restart; exits still sent"})  # fmt: skip
            if failed:
                self.publish_notifications()
            failures = failures + 1 if failed else 0
            if max_steps is not None and done >= max_steps:
                break
            if failed and poll_s is None:
                retry = min(self.config.step_retry_initial_s * 2.0 ** (failures - 1), self.config.step_retry_max_s)
                wait = min(retry, self.seconds_to_next_poll())
            else:
                wait = self.seconds_to_next_poll() if poll_s is None else poll_s
            end = self.monotonic_s() + wait
            while not self.stop_requested.is_set() and self.monotonic_s() < end:
                self._sleep(min(1.0, max(0.0, end - self.monotonic_s())))  # 1 s slices: a signal stops promptly
        self._event(self._now_ts(), "live_stopped", {"bars": done})
        self.publish_notifications()
        return done
