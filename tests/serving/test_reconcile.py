"""The pure reconciliation rules (:mod:`serving.reconcile`): typed views in, typed actions out, one
table row per case, no exchange and no store."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pytest

from serving.exchange import OrderSnapshot, TradeFill
from serving.intents import ExchangePosition, OpenProtection, client_order_id
from serving.reconcile import (
    ExchangeView,
    FillRef,
    LocalView,
    Notice,
    PositionRef,
    PositionRow,
    check_position,
    closed_trade_pnls,
    expected_signed,
    intent_update,
    our_orders,
    plan_open_orders,
    protection_settled,
)

BAR = pd.Timestamp("2024-03-01T10:00:00Z")
HALF_STEP = 0.0005  # BTCUSDT: lot step 0.001
FLAT = ExchangePosition()
LONG = ExchangePosition(1, 0.010, 60_000.0)


def trade(trade_id: int, side: int, qty: float, *, order: str = "o1", pnl: float = 0.0, fee: float = 0.0) -> TradeFill:
    return TradeFill(trade_id, order, side, qty, 60_000.0, fee, pnl, BAR)


def order(kind: str, *, trigger: float | None = None, cid: str | None = None, status: str = "open") -> OrderSnapshot:
    conditional = kind in ("stop", "tp")
    order_type = {"stop": "stop_market", "tp": "take_profit_market"}.get(kind, "market")
    return OrderSnapshot(cid or client_order_id("BTCUSDT", BAR, kind), "x-" + kind, status, "sell", order_type,
                         0.0, 0.0, None, trigger, conditional, True)


# -- position: expected vs exchange, re-reads, rows ---------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    local: LocalView
    exchange: ExchangeView
    reads: int
    agreed: bool
    read_again: bool
    rows: tuple[PositionRow, ...]


TRUSTED_LONG = LocalView(PositionRef(1, 0.010, 7), (FillRef(7, 1, 0.010),))
CASES = [
    Case("agreed flat", LocalView(PositionRef(0, 0.0, None)), ExchangeView(FLAT), 1, True, False,
         (PositionRow("reconcile", 0, 0.0, 0.0, (), True),)),
    Case("agreed long: stored fills up to the trusted trade id are in the row already", TRUSTED_LONG,
         ExchangeView(LONG), 1, True, False, (PositionRow("reconcile", 1, 0.010, 60_000.0, (), True),)),
    Case("mismatch, first read: read again before it counts", TRUSTED_LONG, ExchangeView(FLAT), 1, False, True, ()),
    Case("mismatch confirmed on the last read: unreconciled (trading refused)", TRUSTED_LONG, ExchangeView(FLAT), 3,
         False, False, (PositionRow("unreconciled", 0, 0.0, 0.0, (
             Notice("position_read_again", {"reads": 3, "agreed": False, "exchange_signed_qty": 0.0,
                                            "expected_signed_qty": 0.010}),
             Notice("position_unreconciled", {"exchange_signed_qty": 0.0, "expected_signed_qty": 0.010, "reads": 3}),
         ), True),)),
    Case("re-read agrees: the take-profit's trade arrived between the two reads", TRUSTED_LONG,
         ExchangeView(FLAT, (trade(8, -1, 0.010),)), 2, True, False, (PositionRow("reconcile", 0, 0.0, 0.0, (
             Notice("fills_recorded", {"trade_ids": [8]}),
             Notice("position_read_again", {"reads": 2, "agreed": True, "exchange_signed_qty": 0.0,
                                            "expected_signed_qty": 0.0}),
         ), True),)),
    Case("blocked, a later read agrees: reconciled again",
         LocalView(PositionRef(1, 0.010, 7), (), blocked=True), ExchangeView(LONG), 1, True, False,
         (PositionRow("reconcile", 1, 0.010, 60_000.0, (Notice("position_reconciled", {
             "signed_qty": 0.010, "why": "a later read agrees with our trades"}),), True),)),
    Case("new store, flat exchange: a flat baseline", LocalView(None), ExchangeView(FLAT), 1, True, False,
         (PositionRow("baseline", 0, 0.0, 0.0, (Notice("position_baseline", {
             "signed_qty": 0.0, "exchange_signed_qty": 0.0}),), True),)),
    Case("new store, external position: one read decides, never adopted silently", LocalView(None),
         ExchangeView(LONG), 1, False, False, (
             PositionRow("baseline", 0, 0.0, 0.0, (Notice("position_baseline", {
                 "signed_qty": 0.0, "exchange_signed_qty": 0.010}),), True),
             PositionRow("unreconciled", 1, 0.010, 60_000.0, (Notice("position_unreconciled", {
                 "exchange_signed_qty": 0.010, "expected_signed_qty": 0.0, "why": "external position"}),), False),
         )),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_check_position(case: Case):
    check = check_position(case.local, case.exchange, reads=case.reads, max_reads=3, half_step=HALF_STEP)
    assert (check.agreed, check.read_again) == (case.agreed, case.read_again)
    assert check.rows == case.rows


def test_expected_position_is_the_trusted_row_plus_later_stored_and_new_trades_each_once():
    local = LocalView(PositionRef(1, 0.010, 7), (FillRef(6, 1, 0.5), FillRef(7, 1, 0.010), FillRef(9, -1, 0.004)))
    assert expected_signed(local, ()) == pytest.approx(0.006)  # trade 9 after the row; 6 and 7 before it
    new = (trade(9, -1, 0.004), trade(10, 1, 0.002))  # 9 is stored already: counted once
    assert expected_signed(local, new) == pytest.approx(0.008)
    assert expected_signed(LocalView(None, (FillRef(1, 1, 1.0),)), new) == 0.0  # no trusted row: flat


def test_a_difference_within_half_a_lot_step_agrees():
    local = LocalView(PositionRef(1, 0.010, None))
    near = ExchangeView(ExchangePosition(1, 0.0104, 60_000.0))
    far = ExchangeView(ExchangePosition(1, 0.011, 60_000.0))
    assert check_position(local, near, reads=1, max_reads=1, half_step=HALF_STEP).agreed
    assert not check_position(local, far, reads=1, max_reads=1, half_step=HALF_STEP).agreed


# -- open orders: orphan protection is cancelled on an agreed flat position only ------------------


STOP, TP, ENTRY = order("stop", trigger=59_000.0), order("tp", trigger=62_000.0), order("entry")
OPEN = (ENTRY, STOP, TP)


@pytest.mark.parametrize(("position", "agreed", "cancel", "protection", "without_stop"), [
    (FLAT, True, (STOP, TP), OpenProtection(), False),
    (FLAT, False, (), OpenProtection(STOP.client_id, 59_000.0, TP.client_id, 62_000.0), False),
    (LONG, True, (), OpenProtection(STOP.client_id, 59_000.0, TP.client_id, 62_000.0), False),
    (LONG, False, (), OpenProtection(STOP.client_id, 59_000.0, TP.client_id, 62_000.0), False),
], ids=["agreed flat: orphans cancelled", "unreconciled flat: nothing cancelled", "agreed long: protection kept",
        "unreconciled long: protection kept"])  # fmt: skip
def test_plan_open_orders(position, agreed, cancel, protection, without_stop):
    plan = plan_open_orders(position, agreed, OPEN)
    assert plan.cancel == cancel and plan.protection == protection and plan.without_stop == without_stop
    assert plan.kept == tuple(o for o in OPEN if o not in cancel)


def test_a_held_position_without_a_stop_is_reported_and_the_last_open_stop_counts():
    assert plan_open_orders(LONG, True, (ENTRY, TP)).without_stop
    newer = order("stop", trigger=59_500.0, cid=client_order_id("BTCUSDT", BAR + pd.Timedelta(hours=1), "stop"))
    assert plan_open_orders(LONG, True, (STOP, newer)).protection.stop_price == 59_500.0


def test_foreign_orders_are_not_ours():
    foreign = order("stop", trigger=1.0, cid="web_12345")
    assert our_orders((foreign, STOP)) == (STOP,)


# -- order snapshots -----------------------------------------------------------------------------


def _snap(status: str, filled: float, *, conditional: bool = False, actual: str | None = None) -> OrderSnapshot:
    return OrderSnapshot("ats-BTCUSDT-1-stop", "9", status, "sell", "market", 0.01, filled, None, None, conditional,
                         True, actual)


@pytest.mark.parametrize(("snap", "status", "triggered"), [
    (_snap("open", 0.0), "acked", False),
    (_snap("closed", 0.01), "filled", False),
    (_snap("expired", 0.006), "filled", False),  # a partial fill that expired: its trades count
    (_snap("canceled", 0.0), "cancelled", False),
    (_snap("expired", 0.0), "cancelled", False),
    (_snap("rejected", 0.0), "rejected", False),
    (_snap("closed", 0.0, conditional=True, actual="77"), "filled", True),  # a stop that triggered
    (_snap("open", 0.0, conditional=True), "acked", False),
])  # fmt: skip
def test_intent_update(snap, status, triggered):
    update = intent_update(snap)
    assert (update.status, update.triggered) == (status, triggered)


def test_protection_settled_only_when_found_and_triggered_or_not_open():
    assert not protection_settled(None)
    assert not protection_settled(_snap("open", 0.0, conditional=True))
    assert protection_settled(_snap("canceled", 0.0, conditional=True))
    assert protection_settled(_snap("open", 0.0, conditional=True, actual="77"))


def test_closed_trade_pnls_are_net_of_fees_per_order():
    fills = [trade(1, 1, 0.01), trade(2, -1, 0.004, order="a", pnl=5.0, fee=0.5),
             trade(3, -1, 0.006, order="a", pnl=7.0, fee=0.5), trade(4, 1, 0.01, order="b", pnl=-2.0, fee=0.1)]
    assert closed_trade_pnls(fills) == pytest.approx([11.0, -2.1])
