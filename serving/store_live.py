"""The live-trading tables of :class:`serving.store.StateStore`: write-ahead intents and their
statuses, exchange order observations, exchange fills and positions (rows in :mod:`serving.store_rows`).

``order_intents`` rows are written BEFORE the order is sent (unique client id); their life is the
append-only ``intent_status`` log (latest row = current status). ``orders`` holds one row per
observation of an exchange order; ``exchange_fills`` one row per exchange trade (unique (symbol,
trade id), so a fill seen twice is stored once); ``positions`` one row per observed position. An
operator's accept-position request is an event (``position_accept_requested``, :class:`AcceptRequest`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd
import sqlalchemy as sa

from market import json_codec
from serving.store_rows import (
    AcceptRequest,
    DecisionRecord,
    EventRecord,
    ExchangeFillRecord,
    IntentRecord,
    IntentStatusRecord,
    OrderRecord,
    PositionRecord,
    from_row,
    table_of,
    to_row,
    to_utc_iso,
)

_UNRESOLVED = ("written", "sent", "unknown", "not_found")


class LiveTables:
    """Methods of :class:`serving.store.StateStore` over the live-trading tables (module docstring)."""

    # provided by serving.store.StateStore
    _engine: sa.engine.Engine
    append_event: Callable[..., None]
    _read: Callable[..., pd.DataFrame]

    # -- intents ---------------------------------------------------------------------------------

    def write_intents(
        self,
        run_id: str,
        intents: Iterable[Any],
        time: pd.Timestamp,
        *,
        decisions: Iterable[DecisionRecord] = (),
        events: Iterable[EventRecord] = (),
    ) -> list[str]:
        """Durably record order intents (status 'written') BEFORE they are sent; one transaction.

        ``intents`` are :class:`serving.intents.OrderIntent`. An intent whose client id is
        already stored is not written again (the id is the idempotency key); the decision and
        event rows given are written in the same transaction.

        Returns
        -------
        list[str]
            The client ids newly written.

        Raises
        ------
        sqlalchemy.exc.SQLAlchemyError
            On a database error; then nothing of this call is written and nothing may be sent.
        """
        to_utc_iso(time)  # a naive or NaT time fails before anything is written
        t = table_of(IntentRecord)
        new: list[str] = []
        with self._engine.begin() as conn:
            for it in intents:
                if conn.execute(sa.select(t.c.id).where(t.c.client_id == it.client_id)).first() is not None:
                    continue
                conn.execute(sa.insert(t), [to_row(IntentRecord.from_intent(run_id, it, time))])
                conn.execute(sa.insert(table_of(IntentStatusRecord)),
                             [to_row(IntentStatusRecord(it.client_id, "written", time))])
                new.append(it.client_id)
            for cls, records in ((DecisionRecord, decisions), (EventRecord, events)):
                rows = [to_row(r) for r in records]
                if rows:
                    conn.execute(sa.insert(table_of(cls)), rows)
        return new

    def mark_intent(
        self, client_id: str, status: str, time: pd.Timestamp, detail: dict[str, Any] | None = None
    ) -> None:
        """Append a status row for the intent ``client_id`` (one of ``INTENT_STATUSES``).

        Raises
        ------
        ValueError
            Unknown status.
        KeyError
            No intent with that client id.
        """
        record = IntentStatusRecord(client_id, status, time, detail)
        t = table_of(IntentRecord)
        with self._engine.begin() as conn:
            if conn.execute(sa.select(t.c.id).where(t.c.client_id == client_id)).first() is None:
                raise KeyError(f"no order intent with client id {client_id!r}")
            conn.execute(sa.insert(table_of(IntentStatusRecord)), [to_row(record)])

    def intents(self, run_id: str | None = None, symbol: str | None = None) -> pd.DataFrame:
        """All order intents (of ``run_id`` / ``symbol`` if given) in insertion order, with their latest ``status``."""
        df = self._read(table_of(IntentRecord), run_id, ("bar_open_time", "created_at"), symbol)
        latest = self._latest_intent_status()
        df["status"] = pd.Series([latest.get(c) for c in df["client_id"]], index=df.index, dtype=object)
        return df

    def _latest_intent_status(self) -> dict[str, str]:
        t = table_of(IntentStatusRecord)
        sub = sa.select(t.c.client_id, sa.func.max(t.c.id).label("mid")).group_by(t.c.client_id).subquery()
        stmt = sa.select(t.c.client_id, t.c.status).join(sub, t.c.id == sub.c.mid)
        with self._engine.connect() as conn:
            return {r.client_id: r.status for r in conn.execute(stmt)}

    def intent_status(self, client_id: str) -> str | None:
        """Latest status of the intent ``client_id`` (None when there is no such intent)."""
        t = table_of(IntentStatusRecord)
        stmt = sa.select(t.c.status).where(t.c.client_id == client_id).order_by(t.c.id.desc()).limit(1)
        with self._engine.connect() as conn:
            return conn.execute(stmt).scalar()

    def last_status_time(self, client_id: str, status: str) -> pd.Timestamp | None:
        """When the intent ``client_id`` last entered ``status`` (UTC; None if it never did)."""
        t = table_of(IntentStatusRecord)
        stmt = sa.select(t.c.time).where((t.c.client_id == client_id) & (t.c.status == status))
        with self._engine.connect() as conn:
            value = conn.execute(stmt.order_by(t.c.id.desc()).limit(1)).scalar()
        return None if value is None else pd.Timestamp(value).tz_convert("UTC")

    def intent_history(self, client_id: str) -> list[str]:
        """Every status the intent went through, oldest first."""
        t = table_of(IntentStatusRecord)
        stmt = sa.select(t.c.status).where(t.c.client_id == client_id).order_by(t.c.id)
        with self._engine.connect() as conn:
            return list(conn.execute(stmt).scalars())

    def bar_intents(self, run_id: str, bar_open_time: pd.Timestamp, symbol: str | None = None) -> list[IntentRecord]:
        """The intents of one bar (of ``symbol`` if given; insertion order), each with its latest ``status``."""
        t = table_of(IntentRecord)
        stmt = sa.select(t).where((t.c.run_id == run_id) & (t.c.bar_open_time == to_utc_iso(bar_open_time)))
        if symbol is not None:
            stmt = stmt.where(t.c.symbol == symbol)
        with self._engine.connect() as conn:
            rows = conn.execute(stmt.order_by(t.c.id)).mappings().all()
        return [from_row(IntentRecord, r, status=self.intent_status(r["client_id"])) for r in rows]

    def unresolved_intents(self, run_id: str, symbol: str | None = None) -> list[IntentRecord]:
        """Intents of ``run_id`` (of ``symbol`` if given) whose latest status is 'written', 'sent', 'unknown' or
        'not_found'."""
        latest = self._latest_intent_status()
        t = table_of(IntentRecord)
        stmt = sa.select(t).where(t.c.run_id == run_id)
        if symbol is not None:
            stmt = stmt.where(t.c.symbol == symbol)
        with self._engine.connect() as conn:
            rows = conn.execute(stmt.order_by(t.c.id)).mappings().all()
        return [from_row(IntentRecord, r, status=latest.get(r["client_id"])) for r in rows
                if latest.get(r["client_id"]) in _UNRESOLVED]

    # -- orders ----------------------------------------------------------------------------------

    def record_order(
        self,
        client_id: str,
        exchange_order_id: str | None,
        status: str,
        filled_qty_base: float,
        avg_price: float | None,
        time: pd.Timestamp,
    ) -> None:
        """Append one observation of an exchange order (ack, fill, cancel, lookup result)."""
        row = to_row(OrderRecord(client_id, exchange_order_id, status, filled_qty_base, avg_price, time))
        with self._engine.begin() as conn:
            conn.execute(sa.insert(table_of(OrderRecord)), [row])

    def orders(self) -> pd.DataFrame:
        """Every recorded order observation, in insertion order."""
        return self._read(table_of(OrderRecord), None, ("time",))

    def latest_order(self, client_id: str) -> OrderRecord | None:
        """The latest recorded observation of the order ``client_id`` (None when never seen)."""
        t = table_of(OrderRecord)
        stmt = sa.select(t).where(t.c.client_id == client_id).order_by(t.c.id.desc()).limit(1)
        with self._engine.connect() as conn:
            row = conn.execute(stmt).mappings().first()
        return None if row is None else from_row(OrderRecord, row)

    def client_id_of_order(self, exchange_order_id: str) -> str | None:
        """Our client id of an exchange order id, from the recorded observations."""
        t = table_of(OrderRecord)
        stmt = sa.select(t.c.client_id).where(t.c.exchange_order_id == str(exchange_order_id)).limit(1)
        with self._engine.connect() as conn:
            return conn.execute(stmt).scalar()

    # -- exchange fills --------------------------------------------------------------------------

    def _insert_new_fills(self, conn: sa.Connection, fills: Iterable[ExchangeFillRecord]) -> int:
        t, n = table_of(ExchangeFillRecord), 0
        for f in fills:
            seen = conn.execute(sa.select(t.c.id).where((t.c.symbol == f.symbol) & (t.c.trade_id == int(f.trade_id))))
            if seen.first() is None:
                conn.execute(sa.insert(t), [to_row(f)])
                n += 1
        return n

    def add_exchange_fills(self, fills: Iterable[ExchangeFillRecord]) -> int:
        """Insert exchange trades not stored yet (dedup on (symbol, trade id)); returns how many were new."""
        with self._engine.begin() as conn:
            return self._insert_new_fills(conn, fills)

    def link_fills(self, exchange_order_id: str, client_id: str) -> int:
        """Give the stored trades of ``exchange_order_id`` that have no client id the client id
        ``client_id`` (a stop or take-profit whose triggered order id was learnt later); returns
        how many rows were linked."""
        t = table_of(ExchangeFillRecord)
        with self._engine.begin() as conn:
            result = conn.execute(sa.update(t).where(
                (t.c.exchange_order_id == str(exchange_order_id)) & t.c.client_id.is_(None)).values(client_id=client_id))
        return int(result.rowcount or 0)

    def exchange_fills(self, symbol: str | None = None) -> pd.DataFrame:
        """Stored exchange trades (of ``symbol`` if given) ordered by trade id."""
        df = self._read(table_of(ExchangeFillRecord), None, ("time",))
        if symbol is not None:
            df = df[df["symbol"] == symbol]
        return df.sort_values("trade_id", kind="stable").reset_index(drop=True)

    def exchange_fills_after(self, symbol: str, after_id: int) -> tuple[list[ExchangeFillRecord], int]:
        """Exchange trades of ``symbol`` stored with row id > ``after_id`` and the largest id seen."""
        t = table_of(ExchangeFillRecord)
        stmt = sa.select(t).where((t.c.symbol == symbol) & (t.c.id > after_id)).order_by(t.c.id)
        with self._engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        return [from_row(ExchangeFillRecord, r) for r in rows], max([after_id, *(int(r["id"]) for r in rows)])

    def last_trade_id(self, symbol: str) -> int | None:
        """Largest stored trade id of ``symbol`` (None before the first fill)."""
        t = table_of(ExchangeFillRecord)
        with self._engine.connect() as conn:
            value = conn.execute(sa.select(sa.func.max(t.c.trade_id)).where(t.c.symbol == symbol)).scalar()
        return None if value is None else int(value)

    # -- positions -------------------------------------------------------------------------------

    def record_position(
        self, run_id: str, symbol: str, time: pd.Timestamp, side: int, qty_base: float, entry_price: float,
        source: str, last_trade_id: int | None = None, *, fills: Iterable[ExchangeFillRecord] = (),
        events: Iterable[EventRecord] = (),
    ) -> int:
        """Append one observation of the position of ``symbol`` and, in the same transaction, new fills.

        ``source`` says who saw it ('baseline': the reference the loop reconciles against,
        'reconcile': matched the fills, 'unreconciled': the exchange disagreed with the fills);
        ``last_trade_id`` is the last exchange trade the row accounts for. Fills already stored
        (same symbol and trade id) are skipped. Returns the number of new fills.
        """
        row = PositionRecord(run_id, symbol, time, side, qty_base, entry_price, source, last_trade_id)
        with self._engine.begin() as conn:
            n = self._insert_new_fills(conn, fills)
            conn.execute(sa.insert(table_of(PositionRecord)), [to_row(row)])
            rows = [to_row(r) for r in events]
            if rows:
                conn.execute(sa.insert(table_of(EventRecord)), rows)
        return n

    def positions(self) -> pd.DataFrame:
        """Every recorded position observation, in insertion order."""
        return self._read(table_of(PositionRecord), None, ("time",))

    def _last_position_row(self, symbol: str, sources: tuple[str, ...] | None = None) -> Any:
        t = table_of(PositionRecord)
        stmt = sa.select(t).where(t.c.symbol == symbol)
        if sources is not None:
            stmt = stmt.where(t.c.source.in_(sources))
        with self._engine.connect() as conn:
            return conn.execute(stmt.order_by(t.c.id.desc()).limit(1)).mappings().first()

    def last_position(self, symbol: str) -> PositionRecord | None:
        """Latest stored position row of ``symbol`` (None when none was recorded)."""
        row = self._last_position_row(symbol)
        return None if row is None else from_row(PositionRecord, row)

    def last_trusted_position(self, symbol: str) -> PositionRecord | None:
        """Latest 'baseline' or 'reconcile' row of ``symbol`` (the loop's expectation; an
        'unreconciled' row records what the exchange showed, not what we expect). None when none."""
        row = self._last_position_row(symbol, ("baseline", "reconcile"))
        return None if row is None else from_row(PositionRecord, row)

    def position_blocked(self, symbol: str) -> bool:
        """True when the latest position row of ``symbol`` is 'unreconciled': the last reconciliation
        confirmed a mismatch. A later read that agrees again (a 'reconcile' row) or an accepted
        position (a 'baseline' row) clears it."""
        last = self.last_position(symbol)
        return last is not None and last.source == "unreconciled"

    def _latest_position_id(self, symbol: str, source: str) -> int:
        t = table_of(PositionRecord)
        with self._engine.connect() as conn:
            value = conn.execute(sa.select(sa.func.max(t.c.id)).where(
                (t.c.symbol == symbol) & (t.c.source == source))).scalar()  # fmt: skip
        return int(value or 0)

    def blocked_symbols(self) -> list[str]:
        """Symbols whose position is unreconciled now (:meth:`position_blocked`), sorted."""
        with self._engine.connect() as conn:
            symbols = conn.execute(sa.select(table_of(PositionRecord).c.symbol).distinct()).scalars().all()
        return sorted(s for s in symbols if self.position_blocked(s))

    # -- operator: accept the exchange position --------------------------------------------------

    def request_position_accept(self, symbol: str, note: str, time: pd.Timestamp) -> AcceptRequest:
        """Operator request (``ats serve accept-position``): adopt the exchange position of ``symbol``.

        Appends a ``position_accept_requested`` event (run of the latest unreconciled row) whose
        detail names the symbol, the note, the exchange position last seen and the id of the
        current 'baseline' row. The live loop applies it at its next reconciliation
        (:meth:`pending_position_accept`); a request is tied to the discrepancy present when it
        was made, so it never adopts a later one. Returns the request written.

        Raises
        ------
        ValueError
            If the position of ``symbol`` is not unreconciled (nothing to accept) or ``note`` is blank.
        """
        if not note.strip():
            raise ValueError("a note (who accepts and why) is required")
        if not self.position_blocked(symbol):
            raise ValueError(f"the position of {symbol} is not unreconciled: nothing to accept")
        row = self._last_position_row(symbol, ("unreconciled",))
        if row is None:  # blocked implies an unreconciled row
            raise ValueError(f"the position of {symbol} has no unreconciled row")
        seen = from_row(PositionRecord, row)
        request = AcceptRequest(symbol, note.strip(), self._latest_position_id(symbol, "baseline"),
                                float(seen.side) * float(seen.qty_base), row["time"])
        self.append_event(seen.run_id, time, "position_accept_requested", request.detail())
        return request

    def pending_position_accept(self, symbol: str) -> AcceptRequest | None:
        """The operator's request to adopt the exchange position of ``symbol``, if one applies now.

        A request applies while the position is unreconciled and no 'baseline' row was written
        since the request was made; ``request_id`` is its event id. None when none applies.
        """
        if not self.position_blocked(symbol):
            return None
        baseline_id = self._latest_position_id(symbol, "baseline")
        t = table_of(EventRecord)
        stmt = sa.select(t.c.id, t.c.detail).where(t.c.kind == "position_accept_requested").order_by(t.c.id.desc())
        with self._engine.connect() as conn:
            for event_id, text in conn.execute(stmt):
                detail = json_codec.loads(text) if text else {}
                if detail.get("symbol") == symbol and detail.get("baseline_id") == baseline_id:
                    return AcceptRequest.from_detail(detail, int(event_id))
        return None
