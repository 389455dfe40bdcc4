"""The I/O side of the live loop's reconciliation (phase 2 of :class:`serving.live.LiveLoop`): read
the exchange and the store, apply the pure rules of :mod:`serving.reconcile`, record what they return.

:meth:`Reconciler.reconcile`: resolve every unresolved intent of earlier bars by client id (found:
record it; absent: 'abandoned'), store new fills since the last seen trade id (dedup on trade id),
compare the exchange position with ``last trusted position row ('baseline' or 'reconcile') +
signed fills after its trade id`` (:meth:`Reconciler.sync_position`). **Unknown is not flat**: a
read that fails, or answers with a truncated, empty or malformed body or record
(:class:`serving.errors.MalformedResponseError`, checked at the broker edge), raises and ends the
step (retried within the bar); nothing is cancelled, nothing is sent, the position and its stop
are held. A disagreement is read again (``reconcile_reads``, spaced) before it counts: a stop or
take-profit filling between the trades read and the position read agrees on the next read. Equal
-> a 'reconcile' row; a confirmed difference -> an 'unreconciled' row and an event, and the loop
refuses to trade until a later read agrees again (a 'reconcile' row, ``position_reconciled``
event) or an operator accepts the exchange position: ``ats serve accept-position --db STATE
--note "who and why"`` writes a request (:meth:`serving.store.StateStore.request_position_accept`)
that the next reconciliation applies (a new 'baseline' row and a ``position_accepted`` event, so
the same bar may trade). Our stops and take-profits no longer open are looked up once: one that
triggered is 'filled' and its trades are linked to it by the order it placed (Binance
``actualOrderId``); cancelled or expired ones are 'cancelled'. Our protective orders left open on a
flat position are cancelled only when that flat position agrees with our trades. Each repair is
an event.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pandas as pd

from serving.broker import Broker, OrderSnapshot
from serving.crash import NO_CRASH, CrashPoints
from serving.intents import ExchangePosition, OpenProtection
from serving.live_config import LiveConfig
from serving.reconcile import (
    PROTECTIVE_TYPES,
    ExchangeView,
    FillRef,
    LocalView,
    PositionRef,
    check_position,
    closed_trade_pnls,
    intent_update,
    our_orders,
    plan_open_orders,
    protection_settled,
)
from serving.store import EventRecord, ExchangeFillRecord, StateStore


class ClosedTradeSink(Protocol):
    """Receives the net PnL of each closed trade (the risk guard, ``serving.risk.RiskGuard``)."""

    def record_closed_trade(self, time: pd.Timestamp, pnl_usdt: float) -> None:
        """Count a closed trade's net PnL (USDT)."""


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What :meth:`Reconciler.reconcile` found.

    ``position``: the exchange's; ``protection``: its open stop and take-profit; ``blocked``: the
    position is unreconciled (trading refused); ``open_orders``: our open orders (orphans cancelled).
    """

    position: ExchangePosition
    protection: OpenProtection
    blocked: bool
    open_orders: tuple[OrderSnapshot, ...]


class Reconciler:
    """Reconciliation of one run and symbol against the exchange (module docstring).

    Parameters
    ----------
    broker, store, config
        The exchange, the state store and the loop's settings (``run_id``, ``reconcile_reads``,
        ``reconcile_read_spacing_s``).
    now : Callable[[], pd.Timestamp]
        The loop's wall clock (UTC).
    sleep : Callable[[float], None]
        Waits between re-reads, s.
    safe : Callable[[str], str]
        Redacts an error text before it is recorded.
    guard : ClosedTradeSink | None
        Told about each closed trade (its failures are recorded as ``guard_error``).
    crash_points : CrashPoints
        ``during_reconciliation`` is passed between the trades read and the position read.
    """

    def __init__(self, broker: Broker, store: StateStore, config: LiveConfig, *,
                 now: Callable[[], pd.Timestamp], sleep: Callable[[float], None], safe: Callable[[str], str],
                 guard: ClosedTradeSink | None = None, crash_points: CrashPoints = NO_CRASH) -> None:
        self.broker, self.store, self.config = broker, store, config
        self._now, self._sleep, self._safe = now, sleep, safe
        self.guard, self.crash_points = guard, crash_points

    @property
    def run_id(self) -> str:
        """The serving run's id (from the config)."""
        return self.config.run_id

    @property
    def market_id(self) -> str:
        """The exchange's id of the traded market."""
        return self.broker.market_id

    def _event(self, time_: pd.Timestamp, kind: str, detail: dict[str, Any]) -> None:
        self.store.append_event(self.run_id, time_, kind, detail)

    def record_snapshot(self, snap: OrderSnapshot, client_id: str, when: pd.Timestamp) -> None:
        """Store one observation of our order ``client_id`` and move its intent to the status it shows
        (:func:`serving.reconcile.intent_update`).

        Trades stored before the order was known (an order found late by lookup) are linked to it. A
        stop or take-profit that triggered (``actual_order_id`` set) is 'filled': the order it placed
        is recorded under our client id too, and its stored trades are linked to it."""
        self.store.record_order(client_id, snap.exchange_id, snap.status, snap.filled_base, snap.average_price, when)
        if snap.exchange_id:
            self.store.link_fills(snap.exchange_id, client_id)
        update = intent_update(snap)
        if update.triggered and snap.actual_order_id is not None:
            if self.store.client_id_of_order(snap.actual_order_id) is None:
                self.store.record_order(client_id, snap.actual_order_id, "triggered", snap.filled_base,
                                        snap.average_price, when)
            self.store.link_fills(snap.actual_order_id, client_id)
        if self.store.intent_status(client_id) != update.status:
            self.store.mark_intent(client_id, update.status, when, dict(update.detail))

    def reconcile(self, current_bar: pd.Timestamp | None) -> Reconciled:
        """Bring the store in line with the exchange (module docstring; intents of ``current_bar``
        and later are left to the step that executes them)."""
        now = self._now()
        sym = self.market_id
        # (a) unresolved intents of earlier bars
        for it in self.store.unresolved_intents(self.run_id, sym):
            if current_bar is not None and it.bar_open_time >= current_bar:
                continue  # this bar's intents are executed by the step itself
            snap = self.broker.lookup(it.client_id, conditional=it.order_type in PROTECTIVE_TYPES)
            if snap is not None:
                self.record_snapshot(snap, it.client_id, now)
                self._event(now, "intent_resolved", {"client_id": it.client_id, "status": snap.status})
            else:
                self.store.mark_intent(it.client_id, "abandoned", now, {"reason": "not on the exchange, bar passed"})
                self._event(now, "intent_abandoned", {"client_id": it.client_id, "was": it.status})
        # (b) fills and position; an operator's accept-position request is applied here
        position, agreed = self.sync_position(now, crash=True)
        request = self.store.pending_position_accept(sym)
        if request is not None:
            self.adopt_exchange_position(position, now, "position_accepted", {
                "note": request.note, "request_id": request.request_id, "seen_signed_qty": request.seen_signed_qty})
            agreed = True
        # (c) open orders: our protective orders no longer open are looked up once (triggered ->
        # 'filled' and their trades linked; cancelled/expired -> 'cancelled'); orphans on a flat
        # position are cancelled only when that flat position agrees with our trades
        ours = our_orders(self.broker.open_orders())
        self._resolve_closed_protection({o.client_id for o in ours}, now)
        plan = plan_open_orders(position, agreed, ours)
        for o in plan.cancel:
            self.broker.cancel(o.client_id, conditional=True)
            self._event(now, "orphan_order_cancelled", {"client_id": o.client_id})
            if self.store.intent_status(o.client_id) is not None:
                self.store.mark_intent(o.client_id, "cancelled", now, {"reason": "position flat"})
        if plan.without_stop:
            self._event(now, "position_without_stop", {"side": position.side, "qty_base": position.qty_base})
        return Reconciled(position, plan.protection, self.store.position_blocked(sym), plan.kept)

    def _resolve_closed_protection(self, open_ids: set[str], now: pd.Timestamp) -> None:
        """Look up each of our 'acked' stops and take-profits that the exchange no longer lists as
        open, and record what became of it (:meth:`record_snapshot`); one lookup each, since a
        resolved intent is no longer 'acked'. Not found: left as it is (asked again next bar)."""
        intents = self.store.intents(self.run_id, self.market_id)
        if not len(intents):
            return
        acked = intents[(intents["status"] == "acked") & intents["order_type"].isin(PROTECTIVE_TYPES)]
        for cid in acked["client_id"]:
            if cid in open_ids:
                continue
            snap = self.broker.lookup(cid, conditional=True)
            if snap is not None and protection_settled(snap):
                self.record_snapshot(snap, cid, now)
                self._event(now, "protection_resolved", {"client_id": cid, "status": snap.status,
                                                         "actual_order_id": snap.actual_order_id})

    def _report_closed_trades(self, records: list[ExchangeFillRecord], now: pd.Timestamp) -> None:
        for pnl in closed_trade_pnls(records):
            try:
                self.guard.record_closed_trade(now, float(pnl))  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - the guard fails closed on its own
                self._event(now, "guard_error", {"where": "record_closed_trade", "error": self._safe(repr(exc))[:500]})

    def adopt_exchange_position(self, pos: ExchangePosition, now: pd.Timestamp, kind: str,
                                detail: dict[str, Any]) -> None:
        """Write ``pos`` as the new 'baseline' (fills stored so far included) with a ``kind`` event."""
        self.store.record_position(self.run_id, self.market_id, now, pos.side, pos.qty_base, pos.entry_price,
                                   "baseline", self.store.last_trade_id(self.market_id),
                                   events=[EventRecord(self.run_id, now, kind,
                                                       {**detail, "signed_qty": pos.side * pos.qty_base})])

    def _local_view(self) -> LocalView:
        sym = self.market_id
        row = self.store.last_trusted_position(sym)
        trusted = None if row is None else PositionRef(row.side, row.qty_base, row.last_trade_id)
        stored = self.store.exchange_fills(sym)
        fills = tuple(FillRef(int(t), int(s), float(q)) for t, s, q in zip(
            stored["trade_id"], stored["side"], stored["qty_base"], strict=True))  # fmt: skip
        return LocalView(trusted, fills, self.store.position_blocked(sym))

    def sync_position(self, now: pd.Timestamp, *, crash: bool = False) -> tuple[ExchangePosition, bool]:
        """Store fills after the last seen trade id and the position, checked against them (one
        transaction); returns the exchange position and whether it agrees with our trades.

        Expected signed position = the last *trusted* position row ('baseline' or 'reconcile') +
        signed fills after its ``last_trade_id`` (:func:`serving.reconcile.expected_signed`, a pure
        function of stored rows, so a crash between any two calls changes nothing; an
        'unreconciled' row records what the exchange showed, never our expectation). A
        disagreement is read again (``reconcile_reads`` reads of trades then position,
        ``reconcile_read_spacing_s`` apart, doubling) before it is confirmed: a stop or take-profit
        that fills between the two reads shows in the next one. A confirmed disagreement writes an
        'unreconciled' row (trading refused); the next read that agrees writes a 'reconcile' row
        and clears it (``position_reconciled`` event). A read that fails or is malformed raises
        (:class:`serving.errors.RetryableError`): unknown is never taken for flat. With no row yet,
        our expectation is flat ('baseline' 0): a non-zero exchange position is 'unreconciled' (an
        external position is never adopted silently). ``crash``: pass the ``during_reconciliation``
        crash point after the first trades read.
        """
        sym = self.market_id
        last_tid = self.store.last_trade_id(sym)
        local = self._local_view()
        half_step = self.broker.rules.step_size_base / 2
        wait = self.config.reconcile_read_spacing_s
        reads = 0
        while True:
            fills = self.broker.fills_since(last_tid)
            if crash and reads == 0:
                self.crash_points.hit("during_reconciliation")
            position = self.broker.position()
            reads += 1
            view = ExchangeView(position, tuple(fills))
            check = check_position(local, view, reads=reads, max_reads=self.config.reconcile_reads,
                                   half_step=half_step)
            if not check.read_again:
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
        n_new = 0
        for row in check.rows:
            events = [EventRecord(self.run_id, now, n.kind, dict(n.detail)) for n in row.notices]
            n_new += self.store.record_position(self.run_id, sym, now, row.side, row.qty_base, row.entry_price,
                                                row.source, new_last_tid, fills=records if row.with_fills else (),
                                                events=events)
        if local.trusted is not None and n_new and self.guard is not None:
            self._report_closed_trades(records, now)
        return position, check.agreed
