"""The live loop's executor: send a bar's intents, look them up, cancel, protect, repair (phase 5).

Every order is written as an intent (status 'written') before it is sent, and it is never sent
twice: an intent that may have reached the exchange ('sent': the process stopped during the
request; 'unknown': the create timed out, dropped, answered 5xx or -4116) is looked up by client
id first, ``lookup_attempts`` times, spaced (:meth:`OrderExecutor.lookup_spaced`: Binance's order
queries lag its matching engine). A filled market order frees its client id, so a **market**
order none finds is re-sent (same id) only when, ``create_settle_s`` after its send, one more
lookup misses it, no trade of an unknown order has appeared since and the position agrees with
our trades (:meth:`OrderExecutor.settle_unknown`); otherwise it is held (``resend_withheld``)
and the next reconciliation finds its trades. A stop or take-profit none finds is re-sent at
once (the exchange refuses a second open order with the same id, -4116). A rate-limited create
waits the exchange's Retry-After (at most ``rate_limit_max_wait_s``), looks up once and sends.

After an entry fills, its stop and take-profit are written and sent; a stop the exchange refuses
closes the position at once (``unprot`` intent, :meth:`OrderExecutor.close_unprotected`). A held
position found without its stop or take-profit gets them again
(:meth:`OrderExecutor.repair_protection`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from market.decision import Decision
from serving.broker import Broker, OrderSnapshot
from serving.crash import NO_CRASH, CrashPoints
from serving.errors import AmbiguousOutcomeError, RejectedError
from serving.exchange import RateLimitedError
from serving.intents import (
    ExchangePosition,
    OrderIntent,
    client_order_id,
    parse_client_order_id,
    protective_intents,
)
from serving.live_config import LiveConfig
from serving.reconcile import PROTECTIVE_TYPES
from serving.reconciler import Reconciler
from serving.store import EventRecord, StateStore


@dataclass
class StepResult:
    """What one :meth:`serving.live.LiveLoop.step` did. ``bar_open_time`` None: no new closed bar yet;
    ``sent``: client ids sent in this step; ``events``: what the executor met (``found_by_client_id:<id>``,
    ``resend_withheld:<id>``)."""

    bar_open_time: pd.Timestamp | None
    source: str | None = None
    decision: Decision | None = None
    quarantined: bool = False
    entries_blocked: tuple[str, ...] = ()
    sent: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)


def intent_from_row(r: dict[str, Any]) -> OrderIntent:
    """The :class:`OrderIntent` of a stored intent row (:meth:`serving.store.StateStore.bar_intents`)."""
    return OrderIntent(r["client_id"], r["kind"], r["symbol"], pd.Timestamp(r["bar_open_time"]), r["side"],
                       r["order_type"], r["qty_base"], r["trigger_price"], bool(r["reduce_only"]),
                       bool(r["close_position"]))


class OrderExecutor:
    """Sends, looks up and cancels the orders of one run (module docstring).

    Parameters
    ----------
    broker, store, config
        The venue (:class:`serving.broker.Broker`), the state store and the loop's settings (``lookup_attempts``,
        ``lookup_spacing_s``, ``create_settle_s``, ``rate_limit_max_wait_s``).
    reconciler : Reconciler
        Records order snapshots and re-reads trades and position (:meth:`settle_unknown`).
    leverage_of : Callable[[Decision], int]
        The exchange leverage to set before the entry of a decision.
    now, sleep, safe
        The loop's wall clock (UTC), its sleep (s) and its redaction of error texts.
    crash_points : CrashPoints
        ``after_send``, ``after_ack`` and ``after_fill`` are passed here.
    """

    def __init__(self, broker: Broker, store: StateStore, config: LiveConfig, reconciler: Reconciler,
                 *, leverage_of: Callable[[Decision], int], now: Callable[[], pd.Timestamp],
                 sleep: Callable[[float], None], safe: Callable[[str], str],
                 crash_points: CrashPoints = NO_CRASH) -> None:
        self.broker, self.store, self.config, self.reconciler = broker, store, config, reconciler
        self._leverage_of = leverage_of
        self._now, self._sleep, self._safe = now, sleep, safe
        self.crash_points = crash_points

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

    # -- one order ------------------------------------------------------------------------------
    def ensure_sent(self, intent: OrderIntent, result: StepResult) -> OrderSnapshot | None:
        """Send ``intent`` unless the exchange already has it; returns the exchange's view (None: not placed).

        Never twice (module docstring): 'acked'/'filled' returns the recorded observation;
        'rejected'/'abandoned'/'cancelled' returns None; 'sent'/'unknown' is looked up (spaced)
        and a market order not found is re-sent only when :meth:`settle_unknown` proves it absent;
        'not_found' is looked up once. At most three creates.
        """
        cid = intent.client_id
        conditional = intent.order_type in PROTECTIVE_TYPES
        status = self.store.intent_status(cid)
        if status in ("acked", "filled"):
            row = self.store.latest_order(cid)
            if row is None:
                return None
            return OrderSnapshot(cid, row.exchange_order_id or "", row.status, intent.side, intent.order_type,
                                 intent.qty_base or 0.0, row.filled_qty_base, row.avg_price,
                                 intent.trigger_price, conditional, intent.reduce_only)
        if status in ("rejected", "abandoned", "cancelled"):
            return None
        ambiguous = status in ("sent", "unknown")  # may have reached the exchange
        look_first = status == "not_found"
        for _attempt in range(3):
            now = self._now()
            if ambiguous or look_first:
                snap = self.lookup_spaced(cid, conditional, spaced=ambiguous)  # never send twice
                if snap is not None:
                    self.reconciler.record_snapshot(snap, cid, self._now())
                    result.events.append(f"found_by_client_id:{cid}")
                    return snap
                if ambiguous and not conditional:  # a filled market order frees its id: prove it absent
                    snap, absent = self.settle_unknown(cid)
                    if snap is not None:
                        result.events.append(f"found_by_client_id:{cid}")
                        return snap
                    if not absent:
                        self._event(self._now(), "resend_withheld", {
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
                self.store.mark_intent(cid, "unknown", self._now(), {"error": self._safe(str(exc))[:500]})
                self._event(self._now(), "ambiguous_create", {"client_id": cid, "error": self._safe(str(exc))[:500]})
                ambiguous, look_first = True, False
                continue  # next attempt starts with a lookup
            except RateLimitedError as exc:
                wait = min(exc.retry_after_s, self.config.rate_limit_max_wait_s)
                self._event(self._now(), "rate_limited", {"client_id": cid, "retry_after_s": exc.retry_after_s})
                self._sleep(wait)
                ambiguous, look_first = False, True  # refused by the limiter: one lookup, then send
                continue
            except RejectedError as exc:
                self.store.mark_intent(cid, "rejected", self._now(), {"error": self._safe(str(exc))[:500]})
                self._event(self._now(), "order_rejected", {"client_id": cid, "error": self._safe(str(exc))[:500]})
                return None
            self.crash_points.hit("after_send")
            self.reconciler.record_snapshot(snap, cid, self._now())
            result.sent.append(cid)
            self.crash_points.hit("after_ack")
            return snap
        self._event(self._now(), "intent_unresolved", {"client_id": cid})
        return None

    def settle_unknown(self, cid: str) -> tuple[OrderSnapshot | None, bool]:
        """What became of the market order ``cid`` that lookups did not find: ``(snapshot, absent)``.

        Waits until ``create_settle_s`` after its last send (longer than the exchange's query
        lag) and looks it up once more: found -> ``(snapshot, False)``, recorded. Otherwise reads
        trades and position (:meth:`serving.reconciler.Reconciler.sync_position`): ``absent``
        (proven not executed) when no trade of an order we do not know has appeared since the send
        and the position agrees with our trades. A read that fails raises (the step is retried;
        nothing is sent meanwhile).
        """
        sent = self.store.last_status_time(cid, "sent")
        if sent is not None:
            left = self.config.create_settle_s - (self._now() - sent).total_seconds()
            if left > 0:
                self._sleep(left)
        snap = self.broker.lookup(cid, conditional=False)
        if snap is not None:
            self.reconciler.record_snapshot(snap, cid, self._now())
            return snap, False
        _position, agreed = self.reconciler.sync_position(self._now())
        fills = self.store.exchange_fills(self.market_id)
        if sent is not None and len(fills):
            fills = fills[fills["time"] >= sent - pd.Timedelta(seconds=1)]
        unknown = fills[fills["client_id"].isna()] if len(fills) else fills
        return None, bool(agreed and not len(unknown))

    def lookup_spaced(self, cid: str, conditional: bool, *, spaced: bool) -> OrderSnapshot | None:
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

    def cancel_protection(self, open_orders: Sequence[OrderSnapshot], kinds: tuple[str, ...],
                          bar: pd.Timestamp) -> None:
        """Cancel our open protective orders of intent kinds ``kinds`` placed before ``bar``."""
        now = self._now()
        for o in open_orders:
            parsed = parse_client_order_id(o.client_id)
            if not o.conditional or parsed is None or parsed[2] not in kinds:
                continue
            if pd.Timestamp(parsed[1], unit="s", tz="UTC") >= bar:
                continue  # this bar's own protective orders stay
            self.broker.cancel(o.client_id, conditional=True)
            if self.store.intent_status(o.client_id) is not None:
                self.store.mark_intent(o.client_id, "cancelled", now, {"reason": "replaced"})

    # -- a bar's orders -------------------------------------------------------------------------
    def execute(self, bar: pd.Timestamp, orders: Sequence[OrderIntent], open_orders: Sequence[OrderSnapshot],
                result: StepResult, atr_t: float) -> None:
        """Send the bar's ``orders`` in order: an exit after cancelling our earlier stop, take-profit
        and stop move; a stop move after cancelling the earlier stop; an entry after setting the
        exchange leverage of ``result.decision``. Once the entry has a fill, its stop and take-profit
        (``atr_t`` ATR in price units, from the average fill price) are written and sent; a refused
        stop closes the position (:meth:`close_unprotected`)."""
        entry_snap: OrderSnapshot | None = None
        entry_intent: OrderIntent | None = None
        for intent in orders:
            if intent.kind == "exit":
                self.cancel_protection(open_orders, ("stop", "tp", "stopmv"), bar)
            elif intent.kind == "stopmv":
                self.cancel_protection(open_orders, ("stop", "stopmv"), bar)
            elif intent.kind == "entry":
                self.broker.set_leverage(self._leverage_of(result.decision or Decision.flat()))
            snap = self.ensure_sent(intent, result)
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
        self.store.write_intents(self.run_id, [stop, tp], self._now())
        for intent in (stop, tp):
            self.ensure_sent(intent, result)
        if self.store.intent_status(stop.client_id) == "rejected":
            self.close_unprotected(bar, result)

    def repair_protection(self, bar: pd.Timestamp, position: ExchangePosition, missing: Sequence[str],
                          atr_t: float, opening: Decision, result: StepResult) -> None:
        """Place the ``missing`` ('stop', 'tp') protective orders of a held position again: ``opening``'s
        ``stop_atr`` / ``take_profit_atr`` times ``atr_t`` (price units) from the exchange's entry
        price, ids of ``bar`` (``protection_repaired`` event). A stop the exchange refuses closes the
        position (``unprot``)."""
        stop, tp = protective_intents(self.market_id, bar, position.side, position.entry_price, atr_t, opening,
                                      self.broker.rules)
        todo = [i for i in (stop, tp) if i.kind in missing]
        self.store.write_intents(self.run_id, todo, self._now(), events=[EventRecord(
            self.run_id, bar, "protection_repaired", {"missing": list(missing), "atr": atr_t})])
        for intent in todo:
            self.ensure_sent(intent, result)
        if "stop" in missing and self.store.intent_status(stop.client_id) == "rejected":
            self.close_unprotected(bar, result)

    def close_unprotected(self, bar: pd.Timestamp, result: StepResult) -> None:
        """The exchange refused the stop of a new position: close it (reduce-only market, own intent)."""
        position = self.broker.position()
        if position.side == 0:
            return
        intent = OrderIntent(client_order_id(self.market_id, bar, "unprot"), "unprot", self.market_id, bar,
                             "sell" if position.side > 0 else "buy", "market", position.qty_base, None, True, False)
        self.store.write_intents(self.run_id, [intent], self._now(), events=[EventRecord(
            self.run_id, bar, "stop_rejected_closing", {"signed_qty": position.side * position.qty_base})])
        self.ensure_sent(intent, result)
        for o in self.broker.open_orders():  # its take-profit is now an orphan
            if o.conditional and parse_client_order_id(o.client_id) is not None:
                self.broker.cancel(o.client_id, conditional=True)
                if self.store.intent_status(o.client_id) is not None:
                    self.store.mark_intent(o.client_id, "cancelled", self._now(), {"reason": "stop rejected"})
