"""Reconciliation of the live loop, pure: what we know and what the exchange shows in, actions out.

No I/O here: :class:`serving.reconciler.Reconciler` reads the exchange and the store, builds the
views below, calls these functions and applies what they return (rows, events, cancels, status
changes). Every input and output is a frozen dataclass, so each rule is testable with a table of
hand-written cases (``tests/serving/test_reconcile.py``).

The rules (the live loop's module docstring tells the whole story):

* **Expected position** (:func:`expected_signed`): the last *trusted* position row ('baseline' or
  'reconcile') plus the signed trades after its trade id: those stored and those just read and
  not stored yet. Without a trusted row our expectation is flat.
* **Agreement** (:func:`check_position`): the exchange's signed position equals the expected one
  within half a lot step. A disagreement is read again (up to ``max_reads`` reads) before it is
  confirmed; with no trusted row (a new store) one read decides. The confirmed result becomes
  position rows with their events (:class:`PositionRow`): 'reconcile' when agreed, 'unreconciled'
  (trading refused) when not; on a new store a flat 'baseline' first, then an 'unreconciled' row
  if the exchange holds a position (an external position is never adopted silently).
* **Open orders** (:func:`plan_open_orders`): our stop-market and take-profit-market orders left
  open on a flat position are cancelled only when that flat position agrees with our trades;
  the open protection of the position is the last stop and the last take-profit still open; a
  position without a stop is reported.
* **Order snapshots** (:func:`intent_update`): the intent status an exchange order shows; a stop
  or take-profit that triggered (Binance ``actualOrderId``) is 'filled'.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from serving.exchange import OrderSnapshot, TradeFill
from serving.intents import ExchangePosition, OpenProtection, parse_client_order_id

PROTECTIVE_TYPES: tuple[str, ...] = ("stop_market", "take_profit_market")
"""Order types of our stops and take-profits (conditional orders)."""

UNRESOLVED_STATUSES: tuple[str, ...] = ("written", "sent", "unknown", "not_found")
"""Intent statuses whose outcome on the exchange is not known yet."""

PositionSource = Literal["baseline", "reconcile", "unreconciled"]


# ---------------------------------------------------------------------------------------------
# views in, actions out
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PositionRef:
    """A trusted position row: ``side`` -1/0/+1, ``qty_base`` >= 0, ``last_trade_id`` the last
    exchange trade it accounts for (None: none)."""

    side: int
    qty_base: float
    last_trade_id: int | None


@dataclass(frozen=True, slots=True)
class FillRef:
    """A stored exchange trade: ``side`` +1 buy / -1 sell, ``qty_base`` > 0."""

    trade_id: int
    side: int
    qty_base: float


@dataclass(frozen=True, slots=True)
class LocalView:
    """What the store knows about one symbol.

    ``trusted``: the latest 'baseline' or 'reconcile' row (None on a new store); ``stored_fills``:
    the stored trades of the symbol (any order); ``blocked``: the latest position row is
    'unreconciled' (trading refused).
    """

    trusted: PositionRef | None
    stored_fills: tuple[FillRef, ...] = ()
    blocked: bool = False


@dataclass(frozen=True, slots=True)
class ExchangeView:
    """One read of the exchange: the position and the trades after the last stored trade id."""

    position: ExchangePosition
    new_fills: tuple[TradeFill, ...] = ()

    @property
    def signed_qty(self) -> float:
        """The exchange position in signed base units."""
        return self.position.side * self.position.qty_base


@dataclass(frozen=True, slots=True)
class Notice:
    """An event to record: ``kind`` and its JSON-able ``detail``."""

    kind: str
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PositionRow:
    """A position row to write, with the events written in the same transaction; ``with_fills``:
    the trades just read are stored in that transaction too."""

    source: PositionSource
    side: int
    qty_base: float
    entry_price: float
    notices: tuple[Notice, ...]
    with_fills: bool


@dataclass(frozen=True, slots=True)
class PositionCheck:
    """The outcome of one read (:func:`check_position`).

    ``expected_signed`` / ``exchange_signed``: base units; ``agreed``: within half a lot step;
    ``read_again``: a disagreement not confirmed yet (read the exchange again before writing
    anything; ``rows`` is empty then); ``rows``: the position rows to write, in order.
    """

    expected_signed: float
    exchange_signed: float
    agreed: bool
    read_again: bool
    rows: tuple[PositionRow, ...]


@dataclass(frozen=True, slots=True)
class OpenOrdersPlan:
    """What to do with our open orders (:func:`plan_open_orders`).

    ``cancel``: orphan stops and take-profits to cancel (flat position that agrees); ``kept``: our
    open orders after those cancels; ``protection``: the position's open stop and take-profit;
    ``without_stop``: a position is held with no stop open.
    """

    cancel: tuple[OrderSnapshot, ...]
    kept: tuple[OrderSnapshot, ...]
    protection: OpenProtection
    without_stop: bool


@dataclass(frozen=True, slots=True)
class IntentUpdate:
    """The intent status an exchange order shows (:func:`intent_update`), with the status row's
    detail; ``triggered``: a stop or take-profit that placed an order (its trades carry that id)."""

    status: str
    detail: Mapping[str, Any]
    triggered: bool


# ---------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------


def expected_signed(local: LocalView, new_fills: Iterable[TradeFill]) -> float:
    """Signed position we expect (base units): the trusted row + stored trades after its trade id +
    ``new_fills`` not stored yet; 0.0 (flat) without a trusted row."""
    trusted = local.trusted
    if trusted is None:
        return 0.0
    after = trusted.last_trade_id or 0
    known = [f for f in local.stored_fills if f.trade_id > after]
    known_ids = {f.trade_id for f in known}
    stored = float(np.asarray([f.side * f.qty_base for f in known], dtype=np.float64).sum())
    expected = trusted.side * trusted.qty_base + stored
    return expected + sum(f.side * f.qty_base for f in new_fills if f.trade_id not in known_ids)


def check_position(local: LocalView, exchange: ExchangeView, *, reads: int, max_reads: int,
                   half_step: float) -> PositionCheck:
    """Compare the ``reads``-th read of the exchange with our trades (module docstring).

    A disagreement asks for another read while ``reads`` < ``max_reads`` (1 without a trusted
    row); once agreed or confirmed, ``rows`` holds the position rows (and their events) to write.
    """
    expected = expected_signed(local, exchange.new_fills)
    signed = exchange.signed_qty
    agreed = abs(expected - signed) <= half_step
    limit = 1 if local.trusted is None else max_reads
    if not agreed and reads < limit:
        return PositionCheck(expected, signed, agreed, True, ())
    return PositionCheck(expected, signed, agreed, False, _position_rows(local, exchange, expected, agreed, reads))


def _position_rows(local: LocalView, exchange: ExchangeView, expected: float, agreed: bool,
                   reads: int) -> tuple[PositionRow, ...]:
    pos, signed = exchange.position, exchange.signed_qty
    notices: list[Notice] = []
    if exchange.new_fills:
        notices.append(Notice("fills_recorded", {"trade_ids": [f.trade_id for f in exchange.new_fills]}))
    if local.trusted is None:
        notices.append(Notice("position_baseline", {"signed_qty": 0.0, "exchange_signed_qty": signed}))
        rows = [PositionRow("baseline", 0, 0.0, 0.0, tuple(notices), True)]
        if not agreed:
            rows.append(PositionRow("unreconciled", pos.side, pos.qty_base, pos.entry_price, (Notice(
                "position_unreconciled", {"exchange_signed_qty": signed, "expected_signed_qty": 0.0,
                                          "why": "external position"}),), False))  # fmt: skip
        return tuple(rows)
    if reads > 1:
        notices.append(Notice("position_read_again", {
            "reads": reads, "agreed": agreed, "exchange_signed_qty": signed, "expected_signed_qty": expected}))
    if agreed and local.blocked:
        notices.append(Notice("position_reconciled", {
            "signed_qty": signed, "why": "a later read agrees with our trades"}))
    if not agreed:
        notices.append(Notice("position_unreconciled", {
            "exchange_signed_qty": signed, "expected_signed_qty": expected, "reads": reads}))
    source: PositionSource = "reconcile" if agreed else "unreconciled"
    return (PositionRow(source, pos.side, pos.qty_base, pos.entry_price, tuple(notices), True),)


def our_orders(open_orders: Iterable[OrderSnapshot]) -> tuple[OrderSnapshot, ...]:
    """The open orders placed by this project (client ids of :func:`serving.intents.client_order_id`)."""
    return tuple(o for o in open_orders if parse_client_order_id(o.client_id) is not None)


def plan_open_orders(position: ExchangePosition, agreed: bool, ours: Sequence[OrderSnapshot]) -> OpenOrdersPlan:
    """Orphan cancels and the open protection of ``position`` (module docstring); ``ours`` in the
    exchange's order, ``agreed``: the position agrees with our trades (or was just accepted)."""
    cancel: tuple[OrderSnapshot, ...] = ()
    kept = tuple(ours)
    if position.side == 0 and agreed:
        cancel = tuple(o for o in kept if o.conditional)
        kept = tuple(o for o in kept if not o.conditional)
    stops = [o for o in kept if o.conditional and o.order_type == "stop_market"]
    tps = [o for o in kept if o.conditional and o.order_type == "take_profit_market"]
    protection = OpenProtection(
        stops[-1].client_id if stops else None, stops[-1].trigger_price if stops else None,
        tps[-1].client_id if tps else None, tps[-1].trigger_price if tps else None,
    )  # fmt: skip
    return OpenOrdersPlan(cancel, kept, protection, position.side != 0 and not stops)


def intent_update(snap: OrderSnapshot) -> IntentUpdate:
    """The intent status the exchange order ``snap`` shows: a triggered stop or take-profit
    (``actual_order_id`` set) 'filled'; 'rejected'; cancelled or expired with nothing filled
    'cancelled'; closed, expired or cancelled with a fill 'filled'; otherwise 'acked'."""
    if snap.conditional and snap.actual_order_id is not None:
        return IntentUpdate("filled", {"exchange_id": snap.exchange_id, "actual_order_id": snap.actual_order_id},
                            True)
    if snap.status == "rejected":
        status = "rejected"
    elif snap.status in ("canceled", "expired") and snap.filled_base <= 0:
        status = "cancelled"
    elif snap.filled_base > 0 and snap.status in ("closed", "expired", "canceled"):
        status = "filled"
    else:
        status = "acked"
    return IntentUpdate(status, {"exchange_id": snap.exchange_id, "filled_base": snap.filled_base}, False)


def protection_settled(snap: OrderSnapshot | None) -> bool:
    """A looked-up stop or take-profit no longer listed as open has an outcome to record: it
    triggered or is not open any more (None: not found, asked again next bar)."""
    return snap is not None and (snap.actual_order_id is not None or snap.status != "open")


def closed_trade_pnls(fills: Iterable[Any]) -> list[float]:
    """Net PnL (USDT, realized PnL - fee) per exchange order of the trades that realized PnL, in
    first-trade order; ``fills`` have ``exchange_order_id``, ``trade_id``, ``realized_pnl_usdt``
    and ``fee_usdt`` (:class:`serving.store.ExchangeFillRecord`)."""
    by_order: dict[str, float] = {}
    for r in fills:
        if r.realized_pnl_usdt != 0.0:
            key = r.exchange_order_id or str(r.trade_id)
            by_order[key] = by_order.get(key, 0.0) + r.realized_pnl_usdt - r.fee_usdt
    return list(by_order.values())
