"""Append-only state store of the serving loops (SQLAlchemy 2 Core; SQLite with WAL by default).

Tables, written only by inserts (each defined once, as a row dataclass, in :mod:`serving.store_rows`):

* ``decisions`` -- one row per bar and symbol (``symbol``: exchange id, e.g. ``BTCUSDT``): which policy decided (``source`` 'v2', 'v1', 'guard' when
  the loop itself imposed a safe decision, or 'missed' when the live loop made no decision at
  the bar's close and records that afterwards), the action, V2's raw action, the fallback reason
  and the decision latency (:class:`DecisionRecord`).
* ``fills`` -- every execution of the paper broker (:class:`FillRecord` of an
  :class:`envs.accounting.Fill`).
* ``equity`` -- one snapshot per processed bar and symbol, marked at its close (:class:`EquityRecord`);
  ``account_equity`` -- the whole account of a multi-symbol run per bar (:class:`AccountEquityRecord`).
* ``events`` -- anything worth an alert or an audit line (fallbacks, quarantines, ...;
  :class:`EventRecord`).
* ``risk_state`` -- the risk guard's history per scope (:class:`RiskStateRecord`); the latest row
  of a scope is its current state (kill switches survive restarts through it).
* live trading (:mod:`serving.store_live`): ``order_intents`` and ``intent_status`` (write-ahead
  intents and their life), ``orders`` (observations of exchange orders), ``exchange_fills``
  (exchange trades, unique trade id), ``positions`` (observed and trusted positions).

Times are stored as UTC ISO-8601 strings (``2024-01-01T00:00:00+00:00``), which sort correctly and
survive any SQL backend; reads return tz-aware pandas timestamps. JSON columns are text written by
the project's one codec, :mod:`market.json_codec`: non-finite floats are the strings ``"NaN"``,
``"Infinity"``, ``"-Infinity"`` (JSON has no NaN) and every read turns them back into floats
(``raw_action``, ``tracker``, ``detail``). Single rows are read back as the typed row dataclasses;
tables (for reports and tests) as pandas DataFrames.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

import pandas as pd
import sqlalchemy as sa

from market import json_codec
from serving.errors import FatalError
from serving.store_live import LiveTables
from serving.store_rows import (
    DECISION_SOURCES,
    INTENT_STATUSES,
    METADATA,
    RISK_CHANGES,
    RISK_STATES,
    SYMBOL_TABLES,
    AcceptRequest,
    AccountEquityRecord,
    DecisionRecord,
    EquityRecord,
    EventRecord,
    ExchangeFillRecord,
    FillRecord,
    IntentRecord,
    IntentStatusRecord,
    OrderRecord,
    PositionRecord,
    RiskStateRecord,
    dumps_json,
    from_row,
    is_null,
    loads_floats,
    table_of,
    to_row,
    to_utc_iso,
)

__all__ = [
    "DECISION_SOURCES", "INTENT_STATUSES", "RISK_CHANGES", "RISK_STATES", "AcceptRequest", "AccountEquityRecord",
    "DecisionRecord", "EquityRecord", "EventRecord", "ExchangeFillRecord", "FillRecord", "IntentRecord",
    "IntentStatusRecord", "OrderRecord", "PositionRecord", "RiskStateRecord", "StateStore", "StoreSchemaError",
    "dumps_json", "migrate_symbol_column", "to_utc_iso",
]  # fmt: skip


def _enable_sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()


class StoreSchemaError(FatalError):
    """The state database was written by an older version of the store (no ``symbol`` column); see
    :func:`migrate_symbol_column`."""


def _missing_symbol_column(engine: sa.engine.Engine) -> list[str]:
    """Tables of :data:`SYMBOL_TABLES` that exist in ``engine``'s database without a ``symbol`` column."""
    inspector = sa.inspect(engine)
    present = set(inspector.get_table_names())
    return [t for t in SYMBOL_TABLES
            if t in present and "symbol" not in {c["name"] for c in inspector.get_columns(t)}]


def migrate_symbol_column(target: str | Path, symbol: str) -> list[str]:
    """Add the ``symbol`` column to a state database of schema 1 (single-symbol serving), recording every existing
    row of ``decisions``, ``fills`` and ``equity`` as ``symbol`` (the exchange id the old runs traded, e.g.
    ``BTCUSDT``); ``target`` is a SQLite file path or a SQLAlchemy URL. Idempotent.

    Returns
    -------
    list[str]
        The tables altered (empty when the database was already of schema 2).

    Raises
    ------
    ValueError
        ``symbol`` is not an exchange id (letters and digits, e.g. ``BTCUSDT``).
    FileNotFoundError
        ``target`` is a path to no file.
    """
    if not (isinstance(symbol, str) and symbol.isalnum() and symbol.upper() == symbol):
        raise ValueError(f"symbol must be an exchange id in capitals such as 'BTCUSDT', got {symbol!r}")
    text = str(target)
    if "://" not in text and not Path(text).expanduser().is_file():
        raise FileNotFoundError(f"no state database at {text}")
    url = text if "://" in text else sa.engine.URL.create(
        "sqlite", database=str(Path(text).expanduser().resolve())).render_as_string(hide_password=False)
    engine = sa.create_engine(url, future=True)
    try:
        todo = _missing_symbol_column(engine)
        with engine.begin() as conn:
            for name in todo:  # symbol is validated above: alphanumeric, so the literal is safe
                conn.exec_driver_sql(f"ALTER TABLE {name} ADD COLUMN symbol VARCHAR(32) NOT NULL DEFAULT '{symbol}'")
        return todo
    finally:
        engine.dispose()


class StateStore(LiveTables):
    """Append-only store over any SQLAlchemy URL; creates its tables if missing.

    For SQLite every connection is switched to ``PRAGMA journal_mode=WAL`` (readers never block
    the writer; an in-memory database reports ``memory`` instead) with a 5 s busy timeout. The
    live-trading tables' methods come from :class:`serving.store_live.LiveTables`.

    Parameters
    ----------
    url : str
        SQLAlchemy database URL, e.g. ``sqlite:////abs/path/state.db`` or ``sqlite://`` (memory).

    Raises
    ------
    StoreSchemaError
        The database holds tables of schema 1 (no ``symbol`` column; :func:`migrate_symbol_column`).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine = sa.create_engine(url, future=True)
        if self._engine.dialect.name == "sqlite":
            sa.event.listen(self._engine, "connect", _enable_sqlite_wal)
        old = _missing_symbol_column(self._engine)
        if old:
            self._engine.dispose()
            shown = sa.engine.make_url(url).render_as_string(hide_password=True)
            raise StoreSchemaError(
                f"state database {shown} predates multi-symbol serving: its tables {', '.join(old)} have no 'symbol' "
                "column. Serve with a new --db, or migrate this one, naming the symbol its runs traded: "
                "`ats serve migrate-db --db <file or URL> --symbol BTCUSDT`")
        METADATA.create_all(self._engine)

    @classmethod
    def sqlite(cls, path: str | Path) -> StateStore:
        """Store in the SQLite file ``path`` (parent folders are created)."""
        p = Path(path).expanduser().resolve()
        p.parent.mkdir(parents=True, exist_ok=True)
        return cls(sa.engine.URL.create("sqlite", database=str(p)).render_as_string(hide_password=False))

    @classmethod
    def open(cls, target: str | Path) -> StateStore:
        """A SQLAlchemy URL (``postgresql+psycopg://user:pw@host/db``, ``sqlite:///abs.db``: anything
        with ``://``) or a SQLite file path."""
        text = str(target)
        return cls(text) if "://" in text else cls.sqlite(text)

    @property
    def display_url(self) -> str:
        """The URL with any password hidden (for logs and tables)."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def journal_mode(self) -> str:
        """The SQLite journal mode of a connection (``wal`` for a file store); '' on other backends."""
        if self._engine.dialect.name != "sqlite":
            return ""
        with self._engine.connect() as conn:
            return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar()).lower()

    def close(self) -> None:
        """Release every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ----------------------------------------------------------------------------------

    def append(
        self,
        *,
        decisions: Iterable[DecisionRecord] = (),
        fills: Iterable[FillRecord] = (),
        equity: Iterable[EquityRecord] = (),
        events: Iterable[EventRecord] = (),
        account: Iterable[AccountEquityRecord] = (),
    ) -> None:
        """Insert the given rows in ONE transaction (all or nothing).

        Raises
        ------
        ValueError
            If a time is naive/NaT; ``sqlalchemy.exc.SQLAlchemyError`` on a database error (then
            nothing of this call is written).
        """
        batches = [(table_of(cls), [to_row(r) for r in rows]) for cls, rows in (
            (DecisionRecord, decisions), (FillRecord, fills), (EquityRecord, equity), (EventRecord, events),
            (AccountEquityRecord, account))]
        with self._engine.begin() as conn:
            for table, rows in batches:
                if rows:
                    conn.execute(sa.insert(table), rows)

    def append_event(
        self, run_id: str, time: pd.Timestamp, kind: str, detail: dict[str, Any] | None = None
    ) -> None:
        """Insert one event in its own transaction."""
        self.append(events=[EventRecord(run_id, time, kind, detail or {})])

    # -- reads -----------------------------------------------------------------------------------

    def _read(self, table: sa.Table, run_id: str | None, time_columns: tuple[str, ...],
              symbol: str | None = None) -> pd.DataFrame:
        stmt = sa.select(table).order_by(table.c.id)
        if run_id is not None:
            stmt = stmt.where(table.c.run_id == run_id)
        if symbol is not None:
            stmt = stmt.where(table.c.symbol == symbol)
        with self._engine.connect() as conn:
            result = conn.execute(stmt)
            df = pd.DataFrame(result.fetchall(), columns=list(result.keys()), dtype=object)
        df = df.infer_objects()
        for col in ("raw_action", "fallback_reason", "detail"):
            if col in df.columns:
                df[col] = pd.Series(
                    [None if is_null(x) else x for x in df[col]], index=df.index, dtype=object
                )
        for col in time_columns:
            df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
        return df

    def decisions(self, run_id: str | None = None, symbol: str | None = None) -> pd.DataFrame:
        """All decisions (of ``run_id`` / ``symbol`` if given) in insertion order; ``raw_action`` as lists of
        floats."""
        df = self._read(table_of(DecisionRecord), run_id, ("bar_open_time", "created_at"), symbol)
        df["raw_action"] = pd.Series(
            [loads_floats(x) for x in df["raw_action"]], index=df.index, dtype=object
        )
        return df

    def fills(self, run_id: str | None = None, symbol: str | None = None) -> pd.DataFrame:
        """All paper fills (of ``run_id`` / ``symbol`` if given) in insertion order."""
        return self._read(table_of(FillRecord), run_id, ("bar_open_time",), symbol)

    def equity(self, run_id: str | None = None, symbol: str | None = None) -> pd.DataFrame:
        """All per-symbol equity snapshots (of ``run_id`` / ``symbol`` if given) in insertion order."""
        return self._read(table_of(EquityRecord), run_id, ("bar_open_time",), symbol)

    def account_equity(self, run_id: str | None = None) -> pd.DataFrame:
        """The account snapshots of multi-symbol runs (of ``run_id`` if given) in insertion order."""
        return self._read(table_of(AccountEquityRecord), run_id, ("bar_open_time",))

    def symbols(self, run_id: str) -> list[str]:
        """The symbols ``run_id`` decided (sorted; empty before its first decision)."""
        t = table_of(DecisionRecord)
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.symbol).where(t.c.run_id == run_id).distinct()).scalars().all()
        return sorted(str(s) for s in rows)

    def events(self, run_id: str | None = None) -> pd.DataFrame:
        """All events (of ``run_id`` if given) in insertion order; ``detail`` decoded to dicts."""
        df = self._read(table_of(EventRecord), run_id, ("time",))
        df["detail"] = pd.Series(
            [None if is_null(x) else json_codec.loads(x) for x in df["detail"]], index=df.index, dtype=object
        )
        return df

    def events_after(self, run_id: str, after_id: int) -> tuple[list[EventRecord], int]:
        """Events of ``run_id`` with id > ``after_id`` (insertion order) and the largest id seen."""
        t = table_of(EventRecord)
        stmt = sa.select(t).where((t.c.run_id == run_id) & (t.c.id > after_id)).order_by(t.c.id)
        with self._engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        return [from_row(EventRecord, r) for r in rows], max([after_id, *(int(r["id"]) for r in rows)])

    def max_ids(self) -> tuple[int, int]:
        """(largest ``events`` id, largest ``exchange_fills`` id); 0 for an empty table."""
        with self._engine.connect() as conn:
            ev = conn.execute(sa.select(sa.func.max(table_of(EventRecord).c.id))).scalar()
            fi = conn.execute(sa.select(sa.func.max(table_of(ExchangeFillRecord).c.id))).scalar()
        return int(ev or 0), int(fi or 0)

    @staticmethod
    def _where(t: sa.Table, run_id: str, symbol: str | None, bar_open_time: pd.Timestamp | None = None) -> Any:
        cond = t.c.run_id == run_id
        if symbol is not None:
            cond = cond & (t.c.symbol == symbol)
        if bar_open_time is not None:
            cond = cond & (t.c.bar_open_time == to_utc_iso(bar_open_time))
        return cond

    def peak_equity(self, run_id: str, symbol: str | None = None) -> float | None:
        """Highest recorded equity of ``run_id`` (of ``symbol``'s rows if given; USDT; None before its first
        equity row)."""
        t = table_of(EquityRecord)
        with self._engine.connect() as conn:
            value = conn.execute(sa.select(sa.func.max(t.c.equity_usdt)).where(self._where(t, run_id, symbol))).scalar()
        return None if value is None else float(value)

    def has_equity(self, run_id: str, bar_open_time: pd.Timestamp, symbol: str | None = None) -> bool:
        """Whether an equity row exists for (run, bar) (of ``symbol`` if given)."""
        t = table_of(EquityRecord)
        stmt = sa.select(t.c.id).where(self._where(t, run_id, symbol, bar_open_time))
        with self._engine.connect() as conn:
            return conn.execute(stmt.limit(1)).first() is not None

    def has_decision(self, run_id: str, bar_open_time: pd.Timestamp, symbol: str | None = None) -> bool:
        """Whether a decision row exists for (run, bar) (of ``symbol`` if given)."""
        t = table_of(DecisionRecord)
        stmt = sa.select(t.c.id).where(self._where(t, run_id, symbol, bar_open_time))
        with self._engine.connect() as conn:
            return conn.execute(stmt.limit(1)).first() is not None

    def decision_at(self, run_id: str, bar_open_time: pd.Timestamp, symbol: str | None = None) -> DecisionRecord | None:
        """The decision row of (run, bar) (of ``symbol`` if given; else the first of the bar), None when the bar was
        not decided."""
        t = table_of(DecisionRecord)
        stmt = sa.select(t).where(self._where(t, run_id, symbol, bar_open_time))
        with self._engine.connect() as conn:
            row = conn.execute(stmt.order_by(t.c.id).limit(1)).mappings().first()
        return None if row is None else from_row(DecisionRecord, row)

    def last_decision_bar(self, run_id: str, symbol: str | None = None) -> pd.Timestamp | None:
        """Open time of the latest decided bar of ``run_id`` (of ``symbol`` if given; None when none)."""
        t = table_of(DecisionRecord)
        with self._engine.connect() as conn:
            value = conn.execute(sa.select(sa.func.max(t.c.bar_open_time)).where(self._where(t, run_id, symbol))).scalar()
        return None if value is None else pd.Timestamp(value).tz_convert("UTC")

    # -- risk state ------------------------------------------------------------------------------

    def append_risk_state(self, record: RiskStateRecord) -> None:
        """Insert one ``risk_state`` row in its own transaction.

        Raises
        ------
        ValueError
            If a time is naive/NaT; ``sqlalchemy.exc.SQLAlchemyError`` on a database error.
        """
        with self._engine.begin() as conn:
            conn.execute(sa.insert(table_of(RiskStateRecord)), [to_row(record)])

    def latest_risk_state(self, scope: str, change: str | None = None) -> RiskStateRecord | None:
        """The current (latest) risk-state row of ``scope`` (of that ``change`` kind if given), or None."""
        t = table_of(RiskStateRecord)
        stmt = sa.select(t).where(t.c.scope == scope)
        if change is not None:
            stmt = stmt.where(t.c.change == change)
        stmt = stmt.order_by(t.c.id.desc()).limit(1)
        with self._engine.connect() as conn:
            row = conn.execute(stmt).mappings().first()
        return None if row is None else from_row(RiskStateRecord, row)

    def latest_risk_state_id(self, scope: str, change: str | None = None) -> int | None:
        """Row id of the latest ``risk_state`` row of ``scope`` (of that ``change`` if given); cheap to poll."""
        t = table_of(RiskStateRecord)
        stmt = sa.select(sa.func.max(t.c.id)).where(t.c.scope == scope)
        if change is not None:
            stmt = stmt.where(t.c.change == change)
        with self._engine.connect() as conn:
            value = conn.execute(stmt).scalar()
        return None if value is None else int(value)

    def risk_states(self, scope: str | None = None) -> pd.DataFrame:
        """The ``risk_state`` history (of ``scope`` if given) in insertion order; JSON columns decoded."""
        t = table_of(RiskStateRecord)
        stmt = sa.select(t).order_by(t.c.id)
        if scope is not None:
            stmt = stmt.where(t.c.scope == scope)
        with self._engine.connect() as conn:
            result = conn.execute(stmt)
            df = pd.DataFrame(result.fetchall(), columns=list(result.keys()), dtype=object).infer_objects()
        for col in ("reasons", "tracker"):
            df[col] = pd.Series([json_codec.loads(x) for x in df[col]], index=df.index, dtype=object)
        for col in ("time", "created_at"):
            df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
        return df
