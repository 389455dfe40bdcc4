"""Append-only state store of the serving loop (SQLAlchemy 2 Core; SQLite with WAL by default).

Four tables, written only by inserts:

* ``decisions`` -- one row per bar: which policy decided (``source`` 'v2', 'v1', 'guard' when
  the loop itself imposed a safe decision, or 'missed' when the live loop made no decision at
  the bar's close and records that afterwards), the action, V2's raw action, the fallback reason
  and the decision latency.
* ``fills`` -- every execution of the broker (:class:`envs.accounting.Fill`).
* ``equity`` -- one snapshot per processed bar, marked at its close.
* ``events`` -- anything worth an alert or an audit line (fallbacks, quarantines, ...).
* ``risk_state`` -- the risk guard's history per scope (:class:`RiskStateRecord`); the latest row
  of a scope is its current state (kill switches survive restarts through it).

Times are stored as UTC ISO-8601 strings (``2024-01-01T00:00:00+00:00``), which sort correctly and
survive any SQL backend; the read helpers return them as tz-aware pandas timestamps. JSON columns
are text written by the project's one codec, :mod:`market.json_codec`: non-finite floats are the
strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (JSON has no NaN) and every read helper turns them
back into floats (``raw_action``, ``tracker``, ``detail``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import pandas as pd
import sqlalchemy as sa

from envs.accounting import Fill
from market import json_codec
from market.decision import Decision

DECISION_SOURCES: tuple[str, ...] = ("v2", "v1", "guard", "missed")

_metadata = sa.MetaData()

decisions_table = sa.Table(
    "decisions",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("bar_open_time", sa.String(40), nullable=False),
    sa.Column("source", sa.String(8), nullable=False),
    sa.Column("direction", sa.Integer, nullable=False),
    sa.Column("leverage", sa.Float, nullable=False),
    sa.Column("size_frac", sa.Float, nullable=False),
    sa.Column("stop_atr", sa.Float, nullable=False),
    sa.Column("take_profit_atr", sa.Float, nullable=False),
    sa.Column("raw_action", sa.Text, nullable=True),
    sa.Column("fallback_reason", sa.Text, nullable=True),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Index("ix_decisions_run_bar", "run_id", "bar_open_time"),
)

fills_table = sa.Table(
    "fills",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("bar_open_time", sa.String(40), nullable=False),
    sa.Column("side", sa.Integer, nullable=False),
    sa.Column("qty_base", sa.Float, nullable=False),
    sa.Column("price", sa.Float, nullable=False),
    sa.Column("fee_usdt", sa.Float, nullable=False),
    sa.Column("slippage_usdt", sa.Float, nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Index("ix_fills_run_bar", "run_id", "bar_open_time"),
)

equity_table = sa.Table(
    "equity",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("bar_open_time", sa.String(40), nullable=False),
    sa.Column("equity_usdt", sa.Float, nullable=False),
    sa.Column("cash_usdt", sa.Float, nullable=False),
    sa.Column("position_side", sa.Integer, nullable=False),
    sa.Column("position_qty_base", sa.Float, nullable=False),
    sa.Index("ix_equity_run_bar", "run_id", "bar_open_time"),
)

events_table = sa.Table(
    "events",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("time", sa.String(40), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Index("ix_events_run_time", "run_id", "time"),
)

risk_state_table = sa.Table(
    "risk_state",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("scope", sa.String(64), nullable=False),
    sa.Column("time", sa.String(40), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("change", sa.String(16), nullable=False),
    sa.Column("reasons", sa.Text, nullable=False),
    sa.Column("tracker", sa.Text, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Index("ix_risk_state_scope", "scope", "id"),
)


# -- live trading (exchange broker): write-ahead intents, order snapshots, exchange fills, positions --
#
# ``order_intents`` rows are written BEFORE the order is sent (unique client id); their life is
# the append-only ``intent_status`` log (latest row = current status). ``orders`` holds one row
# per observation of an exchange order; ``exchange_fills`` one row per exchange trade (unique
# trade id, so a fill seen twice is stored once); ``positions`` one row per observed position.

INTENT_STATUSES: tuple[str, ...] = (
    "written", "sent", "acked", "filled", "not_found", "unknown", "rejected", "abandoned", "cancelled",
)  # fmt: skip

order_intents_table = sa.Table(
    "order_intents",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("client_id", sa.String(36), nullable=False, unique=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("symbol", sa.String(32), nullable=False),
    sa.Column("bar_open_time", sa.String(40), nullable=False),
    sa.Column("side", sa.String(4), nullable=False),
    sa.Column("order_type", sa.String(24), nullable=False),
    sa.Column("qty_base", sa.Float, nullable=True),
    sa.Column("trigger_price", sa.Float, nullable=True),
    sa.Column("reduce_only", sa.Boolean, nullable=False),
    sa.Column("close_position", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Index("ix_order_intents_run_bar", "run_id", "bar_open_time"),
)

intent_status_table = sa.Table(
    "intent_status",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("client_id", sa.String(36), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("time", sa.String(40), nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Index("ix_intent_status_client", "client_id", "id"),
)

orders_table = sa.Table(
    "orders",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("client_id", sa.String(64), nullable=False),
    sa.Column("exchange_order_id", sa.String(64), nullable=True),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("filled_qty_base", sa.Float, nullable=False),
    sa.Column("avg_price", sa.Float, nullable=True),
    sa.Column("time", sa.String(40), nullable=False),
    sa.Index("ix_orders_client", "client_id", "id"),
)

exchange_fills_table = sa.Table(
    "exchange_fills",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("symbol", sa.String(32), nullable=False),
    sa.Column("trade_id", sa.BigInteger, nullable=False),
    sa.Column("exchange_order_id", sa.String(64), nullable=True),
    sa.Column("client_id", sa.String(64), nullable=True),
    sa.Column("side", sa.Integer, nullable=False),
    sa.Column("qty_base", sa.Float, nullable=False),
    sa.Column("price", sa.Float, nullable=False),
    sa.Column("fee_usdt", sa.Float, nullable=False),
    sa.Column("realized_pnl_usdt", sa.Float, nullable=False),
    sa.Column("time", sa.String(40), nullable=False),
    sa.UniqueConstraint("symbol", "trade_id", name="uq_exchange_fills_trade"),
)

positions_table = sa.Table(
    "positions",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("symbol", sa.String(32), nullable=False),
    sa.Column("time", sa.String(40), nullable=False),
    sa.Column("side", sa.Integer, nullable=False),
    sa.Column("qty_base", sa.Float, nullable=False),
    sa.Column("entry_price", sa.Float, nullable=False),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("last_trade_id", sa.BigInteger, nullable=True),
    sa.Index("ix_positions_symbol", "symbol", "id"),
)


@dataclass(frozen=True, slots=True)
class ExchangeFillRecord:
    """One exchange trade: ``side`` +1 buy / -1 sell, ``qty_base`` > 0, prices and money in USDT."""

    run_id: str
    symbol: str
    trade_id: int
    exchange_order_id: str | None
    client_id: str | None
    side: int
    qty_base: float
    price: float
    fee_usdt: float
    realized_pnl_usdt: float
    time: pd.Timestamp


def _exchange_fill_row(f: ExchangeFillRecord) -> dict[str, Any]:
    return {
        "run_id": f.run_id, "symbol": f.symbol, "trade_id": int(f.trade_id), "exchange_order_id": f.exchange_order_id,
        "client_id": f.client_id, "side": int(f.side), "qty_base": float(f.qty_base), "price": float(f.price),
        "fee_usdt": float(f.fee_usdt), "realized_pnl_usdt": float(f.realized_pnl_usdt), "time": to_utc_iso(f.time),
    }  # fmt: skip



# ----------------------------------------------------------------------------------------------
# Encoding helpers
# ----------------------------------------------------------------------------------------------


def to_utc_iso(time: pd.Timestamp | datetime | str) -> str:
    """UTC ISO-8601 text of a tz-aware time (``2024-01-01T00:00:00+00:00``).

    Raises
    ------
    ValueError
        If the time is naive (no time zone) or NaT.
    """
    ts = pd.Timestamp(time)
    if ts is pd.NaT or pd.isna(ts):
        raise ValueError("time is NaT")
    if ts.tzinfo is None:
        raise ValueError(f"time {time!r} is naive; the store needs tz-aware (UTC) times")
    return ts.tz_convert("UTC").isoformat()


def dumps_json(value: Any) -> str | None:
    """Strict JSON text of ``value`` by :mod:`market.json_codec` (non-finite floats as strings, other
    unknown types as ``str``); None stays None."""
    if value is None:
        return None
    return json_codec.dumps(value, strict=False, sort_keys=True)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _loads_raw_action(text: str | None) -> list[float] | None:
    if _is_null(text):
        return None
    return [json_codec.to_float(v) for v in json.loads(text)]


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One row of ``decisions``. ``source`` is one of :data:`DECISION_SOURCES`; ``latency_ms`` in ms."""

    run_id: str
    bar_open_time: pd.Timestamp
    source: str
    direction: int
    leverage: float
    size_frac: float
    stop_atr: float
    take_profit_atr: float
    raw_action: tuple[float, ...] | None
    fallback_reason: str | None
    latency_ms: float
    created_at: datetime

    def __post_init__(self) -> None:
        if self.source not in DECISION_SOURCES:
            raise ValueError(f"decision source must be one of {DECISION_SOURCES}, got {self.source!r}")

    @classmethod
    def from_decision(
        cls,
        run_id: str,
        bar_open_time: pd.Timestamp,
        source: str,
        decision: Decision,
        *,
        raw_action: Sequence[float] | None,
        fallback_reason: str | None,
        latency_ms: float,
        created_at: datetime,
    ) -> DecisionRecord:
        """Build the row of a :class:`market.decision.Decision`."""
        raw = None if raw_action is None else tuple(float(x) for x in raw_action)
        return cls(
            run_id, bar_open_time, source, int(decision.direction), float(decision.leverage),
            float(decision.size_frac), float(decision.stop_atr), float(decision.take_profit_atr),
            raw, fallback_reason, float(latency_ms), created_at,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class FillRecord:
    """One row of ``fills``: ``side`` +1 buy / -1 sell, ``qty_base`` > 0, ``price`` in USDT."""

    run_id: str
    bar_open_time: pd.Timestamp
    side: int
    qty_base: float
    price: float
    fee_usdt: float
    slippage_usdt: float
    reason: str

    @classmethod
    def from_fill(cls, run_id: str, fill: Fill) -> FillRecord:
        """Build the row of an :class:`envs.accounting.Fill` (its ``open_time_ns`` is the bar's open)."""
        return cls(
            run_id, pd.Timestamp(fill.open_time_ns, unit="ns", tz="UTC"), int(fill.side), float(fill.qty_base),
            float(fill.price), float(fill.fee_usdt), float(fill.slippage_usdt), fill.reason,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class EquityRecord:
    """One row of ``equity``: the account marked at the close of ``bar_open_time`` (USDT)."""

    run_id: str
    bar_open_time: pd.Timestamp
    equity_usdt: float
    cash_usdt: float
    position_side: int
    position_qty_base: float


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One row of ``events``: ``time`` (UTC), a short ``kind`` and a JSON-able ``detail`` dict."""

    run_id: str
    time: pd.Timestamp
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)


RISK_STATES: tuple[str, ...] = ("ACTIVE", "REDUCING", "HALTED")
RISK_CHANGES: tuple[str, ...] = ("transition", "update", "reset", "error")


@dataclass(frozen=True, slots=True)
class RiskStateRecord:
    """One row of ``risk_state`` (append-only; the latest row of a ``scope`` is its current state).

    ``state`` is 'ACTIVE', 'REDUCING' or 'HALTED'; ``change`` says why the row was written
    ('transition': the state or its reasons changed, 'update': only the tracker moved, 'reset': an
    explicit human reset, 'error': the guard failed and closed itself); ``reasons`` explain the
    state; ``tracker`` is the JSON-able bookkeeping of :class:`serving.risk.RiskTracker`.
    ``time`` is the bar (or account) time the row refers to, ``created_at`` the wall clock.
    """

    scope: str
    time: pd.Timestamp
    state: str
    change: str
    reasons: tuple[str, ...]
    tracker: dict[str, Any]
    created_at: datetime

    def __post_init__(self) -> None:
        if self.state not in RISK_STATES:
            raise ValueError(f"risk state must be one of {RISK_STATES}, got {self.state!r}")
        if self.change not in RISK_CHANGES:
            raise ValueError(f"risk change must be one of {RISK_CHANGES}, got {self.change!r}")


def _risk_state_row(r: RiskStateRecord) -> dict[str, Any]:
    return {
        "scope": r.scope, "time": to_utc_iso(r.time), "state": r.state, "change": r.change,
        "reasons": dumps_json(list(r.reasons)), "tracker": dumps_json(r.tracker),
        "created_at": to_utc_iso(r.created_at),
    }  # fmt: skip


def _decision_row(r: DecisionRecord) -> dict[str, Any]:
    return {
        "run_id": r.run_id, "bar_open_time": to_utc_iso(r.bar_open_time), "source": r.source,
        "direction": r.direction, "leverage": r.leverage, "size_frac": r.size_frac, "stop_atr": r.stop_atr,
        "take_profit_atr": r.take_profit_atr, "raw_action": dumps_json(r.raw_action),
        "fallback_reason": r.fallback_reason, "latency_ms": r.latency_ms, "created_at": to_utc_iso(r.created_at),
    }  # fmt: skip


def _fill_row(r: FillRecord) -> dict[str, Any]:
    return {
        "run_id": r.run_id, "bar_open_time": to_utc_iso(r.bar_open_time), "side": r.side, "qty_base": r.qty_base,
        "price": r.price, "fee_usdt": r.fee_usdt, "slippage_usdt": r.slippage_usdt, "reason": r.reason,
    }  # fmt: skip


def _equity_row(r: EquityRecord) -> dict[str, Any]:
    return {
        "run_id": r.run_id, "bar_open_time": to_utc_iso(r.bar_open_time), "equity_usdt": r.equity_usdt,
        "cash_usdt": r.cash_usdt, "position_side": r.position_side, "position_qty_base": r.position_qty_base,
    }  # fmt: skip


def _event_row(r: EventRecord) -> dict[str, Any]:
    return {"run_id": r.run_id, "time": to_utc_iso(r.time), "kind": r.kind, "detail": dumps_json(r.detail)}


# ----------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------


def _enable_sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()


class StateStore:
    """Append-only store over any SQLAlchemy URL; creates its tables if missing.

    For SQLite every connection is switched to ``PRAGMA journal_mode=WAL`` (readers never block
    the writer; an in-memory database reports ``memory`` instead) with a 5 s busy timeout.

    Parameters
    ----------
    url : str
        SQLAlchemy database URL, e.g. ``sqlite:////abs/path/state.db`` or ``sqlite://`` (memory).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine = sa.create_engine(url, future=True)
        if self._engine.dialect.name == "sqlite":
            sa.event.listen(self._engine, "connect", _enable_sqlite_wal)
        _metadata.create_all(self._engine)

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
    ) -> None:
        """Insert the given rows in ONE transaction (all or nothing).

        Raises
        ------
        ValueError
            If a time is naive/NaT; ``sqlalchemy.exc.SQLAlchemyError`` on a database error (then
            nothing of this call is written).
        """
        batches = (
            (decisions_table, [_decision_row(r) for r in decisions]),
            (fills_table, [_fill_row(r) for r in fills]),
            (equity_table, [_equity_row(r) for r in equity]),
            (events_table, [_event_row(r) for r in events]),
        )
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

    def _read(self, table: sa.Table, run_id: str | None, time_columns: tuple[str, ...]) -> pd.DataFrame:
        stmt = sa.select(table).order_by(table.c.id)
        if run_id is not None:
            stmt = stmt.where(table.c.run_id == run_id)
        with self._engine.connect() as conn:
            result = conn.execute(stmt)
            df = pd.DataFrame(result.fetchall(), columns=list(result.keys()), dtype=object)
        df = df.infer_objects()
        for col in ("raw_action", "fallback_reason", "detail"):
            if col in df.columns:
                df[col] = pd.Series(
                    [None if _is_null(x) else x for x in df[col]], index=df.index, dtype=object
                )
        for col in time_columns:
            df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
        return df

    def decisions(self, run_id: str | None = None) -> pd.DataFrame:
        """All decisions (of ``run_id`` if given) in insertion order; ``raw_action`` as lists of floats."""
        df = self._read(decisions_table, run_id, ("bar_open_time", "created_at"))
        df["raw_action"] = pd.Series(
            [_loads_raw_action(x) for x in df["raw_action"]], index=df.index, dtype=object
        )
        return df

    def fills(self, run_id: str | None = None) -> pd.DataFrame:
        """All fills (of ``run_id`` if given) in insertion order."""
        return self._read(fills_table, run_id, ("bar_open_time",))

    def equity(self, run_id: str | None = None) -> pd.DataFrame:
        """All equity snapshots (of ``run_id`` if given) in insertion order."""
        return self._read(equity_table, run_id, ("bar_open_time",))

    def append_risk_state(self, record: RiskStateRecord) -> None:
        """Insert one ``risk_state`` row in its own transaction.

        Raises
        ------
        ValueError
            If a time is naive/NaT; ``sqlalchemy.exc.SQLAlchemyError`` on a database error.
        """
        with self._engine.begin() as conn:
            conn.execute(sa.insert(risk_state_table), [_risk_state_row(record)])

    def latest_risk_state(self, scope: str, change: str | None = None) -> RiskStateRecord | None:
        """The current (latest) risk-state row of ``scope`` (of that ``change`` kind if given), or None."""
        t = risk_state_table
        stmt = sa.select(t).where(t.c.scope == scope)
        if change is not None:
            stmt = stmt.where(t.c.change == change)
        stmt = stmt.order_by(t.c.id.desc()).limit(1)
        with self._engine.connect() as conn:
            row = conn.execute(stmt).mappings().first()
        if row is None:
            return None
        return RiskStateRecord(
            scope=row["scope"], time=pd.Timestamp(row["time"]).tz_convert("UTC"), state=row["state"],
            change=row["change"], reasons=tuple(json.loads(row["reasons"])),
            tracker=json_codec.loads(row["tracker"]),
            created_at=pd.Timestamp(row["created_at"]).tz_convert("UTC").to_pydatetime(),
        )  # fmt: skip

    def latest_risk_state_id(self, scope: str, change: str | None = None) -> int | None:
        """Row id of the latest ``risk_state`` row of ``scope`` (of that ``change`` if given); cheap to poll."""
        t = risk_state_table
        stmt = sa.select(sa.func.max(t.c.id)).where(t.c.scope == scope)
        if change is not None:
            stmt = stmt.where(t.c.change == change)
        with self._engine.connect() as conn:
            value = conn.execute(stmt).scalar()
        return None if value is None else int(value)

    def risk_states(self, scope: str | None = None) -> pd.DataFrame:
        """The ``risk_state`` history (of ``scope`` if given) in insertion order; JSON columns decoded."""
        stmt = sa.select(risk_state_table).order_by(risk_state_table.c.id)
        if scope is not None:
            stmt = stmt.where(risk_state_table.c.scope == scope)
        with self._engine.connect() as conn:
            result = conn.execute(stmt)
            df = pd.DataFrame(result.fetchall(), columns=list(result.keys()), dtype=object).infer_objects()
        for col in ("reasons", "tracker"):
            df[col] = pd.Series([json_codec.loads(x) for x in df[col]], index=df.index, dtype=object)
        for col in ("time", "created_at"):
            df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
        return df

    def events(self, run_id: str | None = None) -> pd.DataFrame:
        """All events (of ``run_id`` if given) in insertion order; ``detail`` decoded to dicts."""
        df = self._read(events_table, run_id, ("time",))
        df["detail"] = pd.Series(
            [None if _is_null(x) else json_codec.loads(x) for x in df["detail"]], index=df.index, dtype=object
        )
        return df

    # -- live trading: write-ahead intents, orders, exchange fills, positions ---------------------

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
        t_iso = to_utc_iso(time)
        new: list[str] = []
        with self._engine.begin() as conn:
            for it in intents:
                exists = conn.execute(
                    sa.select(order_intents_table.c.id).where(order_intents_table.c.client_id == it.client_id)
                ).first()
                if exists is not None:
                    continue
                conn.execute(sa.insert(order_intents_table), [{
                    "run_id": run_id, "client_id": it.client_id, "kind": it.kind, "symbol": it.symbol,
                    "bar_open_time": to_utc_iso(it.bar_open_time), "side": it.side, "order_type": it.order_type,
                    "qty_base": it.qty_base, "trigger_price": it.trigger_price, "reduce_only": bool(it.reduce_only),
                    "close_position": bool(it.close_position), "created_at": t_iso,
                }])  # fmt: skip
                conn.execute(sa.insert(intent_status_table), [
                    {"client_id": it.client_id, "status": "written", "time": t_iso, "detail": None}
                ])
                new.append(it.client_id)
            rows = [_decision_row(r) for r in decisions]
            if rows:
                conn.execute(sa.insert(decisions_table), rows)
            rows = [_event_row(r) for r in events]
            if rows:
                conn.execute(sa.insert(events_table), rows)
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
        if status not in INTENT_STATUSES:
            raise ValueError(f"intent status must be one of {INTENT_STATUSES}, got {status!r}")
        with self._engine.begin() as conn:
            exists = conn.execute(
                sa.select(order_intents_table.c.id).where(order_intents_table.c.client_id == client_id)
            ).first()
            if exists is None:
                raise KeyError(f"no order intent with client id {client_id!r}")
            conn.execute(sa.insert(intent_status_table), [
                {"client_id": client_id, "status": status, "time": to_utc_iso(time), "detail": dumps_json(detail)}
            ])  # fmt: skip

    def intents(self, run_id: str | None = None) -> pd.DataFrame:
        """All order intents (of ``run_id`` if given) in insertion order, with their latest ``status``."""
        df = self._read(order_intents_table, run_id, ("bar_open_time", "created_at"))
        latest = self._latest_intent_status()
        df["status"] = pd.Series([latest.get(c) for c in df["client_id"]], index=df.index, dtype=object)
        return df

    def _latest_intent_status(self) -> dict[str, str]:
        t = intent_status_table
        sub = sa.select(t.c.client_id, sa.func.max(t.c.id).label("mid")).group_by(t.c.client_id).subquery()
        stmt = sa.select(t.c.client_id, t.c.status).join(sub, t.c.id == sub.c.mid)
        with self._engine.connect() as conn:
            return {r.client_id: r.status for r in conn.execute(stmt)}

    def intent_status(self, client_id: str) -> str | None:
        """Latest status of the intent ``client_id`` (None when there is no such intent)."""
        t = intent_status_table
        stmt = sa.select(t.c.status).where(t.c.client_id == client_id).order_by(t.c.id.desc()).limit(1)
        with self._engine.connect() as conn:
            return conn.execute(stmt).scalar()

    def last_status_time(self, client_id: str, status: str) -> pd.Timestamp | None:
        """When the intent ``client_id`` last entered ``status`` (UTC; None if it never did)."""
        t = intent_status_table
        stmt = sa.select(t.c.time).where((t.c.client_id == client_id) & (t.c.status == status))
        with self._engine.connect() as conn:
            value = conn.execute(stmt.order_by(t.c.id.desc()).limit(1)).scalar()
        return None if value is None else pd.Timestamp(value).tz_convert("UTC")

    def intent_history(self, client_id: str) -> list[str]:
        """Every status the intent went through, oldest first."""
        t = intent_status_table
        stmt = sa.select(t.c.status).where(t.c.client_id == client_id).order_by(t.c.id)
        with self._engine.connect() as conn:
            return list(conn.execute(stmt).scalars())

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
        with self._engine.begin() as conn:
            conn.execute(sa.insert(orders_table), [{
                "client_id": client_id, "exchange_order_id": exchange_order_id, "status": status,
                "filled_qty_base": float(filled_qty_base), "avg_price": avg_price, "time": to_utc_iso(time),
            }])  # fmt: skip

    def orders(self) -> pd.DataFrame:
        """Every recorded order observation, in insertion order."""
        return self._read(orders_table, None, ("time",))

    def add_exchange_fills(self, fills: Iterable[ExchangeFillRecord]) -> int:
        """Insert exchange trades not stored yet (dedup on (symbol, trade id)); returns how many were new."""
        n = 0
        with self._engine.begin() as conn:
            for f in fills:
                seen = conn.execute(sa.select(exchange_fills_table.c.id).where(
                    (exchange_fills_table.c.symbol == f.symbol) & (exchange_fills_table.c.trade_id == int(f.trade_id))
                )).first()  # fmt: skip
                if seen is not None:
                    continue
                conn.execute(sa.insert(exchange_fills_table), [_exchange_fill_row(f)])
                n += 1
        return n

    def link_fills(self, exchange_order_id: str, client_id: str) -> int:
        """Give the stored trades of ``exchange_order_id`` that have no client id the client id
        ``client_id`` (a stop or take-profit whose triggered order id was learnt later); returns
        how many rows were linked."""
        t = exchange_fills_table
        with self._engine.begin() as conn:
            result = conn.execute(sa.update(t).where(
                (t.c.exchange_order_id == str(exchange_order_id)) & t.c.client_id.is_(None)).values(client_id=client_id))
        return int(result.rowcount or 0)

    def exchange_fills(self, symbol: str | None = None) -> pd.DataFrame:
        """Stored exchange trades (of ``symbol`` if given) ordered by trade id."""
        df = self._read(exchange_fills_table, None, ("time",))
        if symbol is not None:
            df = df[df["symbol"] == symbol]
        return df.sort_values("trade_id", kind="stable").reset_index(drop=True)

    def last_trade_id(self, symbol: str) -> int | None:
        """Largest stored trade id of ``symbol`` (None before the first fill)."""
        t = exchange_fills_table
        with self._engine.connect() as conn:
            value = conn.execute(sa.select(sa.func.max(t.c.trade_id)).where(t.c.symbol == symbol)).scalar()
        return None if value is None else int(value)

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
        n = 0
        with self._engine.begin() as conn:
            for f in fills:
                seen = conn.execute(sa.select(exchange_fills_table.c.id).where(
                    (exchange_fills_table.c.symbol == f.symbol) & (exchange_fills_table.c.trade_id == int(f.trade_id))
                )).first()  # fmt: skip
                if seen is None:
                    conn.execute(sa.insert(exchange_fills_table), [_exchange_fill_row(f)])
                    n += 1
            conn.execute(sa.insert(positions_table), [{
                "run_id": run_id, "symbol": symbol, "time": to_utc_iso(time), "side": int(side),
                "qty_base": float(qty_base), "entry_price": float(entry_price), "source": source,
                "last_trade_id": None if last_trade_id is None else int(last_trade_id),
            }])  # fmt: skip
            rows = [_event_row(r) for r in events]
            if rows:
                conn.execute(sa.insert(events_table), rows)
        return n

    def last_position(self, symbol: str) -> dict[str, Any] | None:
        """Latest stored position row of ``symbol`` as a dict (None when none was recorded)."""
        t = positions_table
        stmt = sa.select(t).where(t.c.symbol == symbol).order_by(t.c.id.desc()).limit(1)
        with self._engine.connect() as conn:
            row = conn.execute(stmt).mappings().first()
        return None if row is None else dict(row)

    def last_trusted_position(self, symbol: str) -> dict[str, Any] | None:
        """Latest 'baseline' or 'reconcile' row of ``symbol`` (the loop's expectation; an
        'unreconciled' row records what the exchange showed, not what we expect). None when none."""
        t = positions_table
        stmt = sa.select(t).where((t.c.symbol == symbol) & t.c.source.in_(("baseline", "reconcile")))
        with self._engine.connect() as conn:
            row = conn.execute(stmt.order_by(t.c.id.desc()).limit(1)).mappings().first()
        return None if row is None else dict(row)

    def peak_equity(self, run_id: str) -> float | None:
        """Highest recorded equity of ``run_id`` (USDT; None before its first equity row)."""
        t = equity_table
        with self._engine.connect() as conn:
            value = conn.execute(sa.select(sa.func.max(t.c.equity_usdt)).where(t.c.run_id == run_id)).scalar()
        return None if value is None else float(value)

    def has_equity(self, run_id: str, bar_open_time: pd.Timestamp) -> bool:
        """Whether an equity row exists for (run, bar)."""
        t = equity_table
        stmt = sa.select(t.c.id).where((t.c.run_id == run_id) & (t.c.bar_open_time == to_utc_iso(bar_open_time)))
        with self._engine.connect() as conn:
            return conn.execute(stmt.limit(1)).first() is not None

    def positions(self) -> pd.DataFrame:
        """Every recorded position observation, in insertion order."""
        return self._read(positions_table, None, ("time",))

    def has_decision(self, run_id: str, bar_open_time: pd.Timestamp) -> bool:
        """Whether a decision row exists for (run, bar)."""
        t = decisions_table
        stmt = sa.select(t.c.id).where((t.c.run_id == run_id) & (t.c.bar_open_time == to_utc_iso(bar_open_time)))
        with self._engine.connect() as conn:
            return conn.execute(stmt.limit(1)).first() is not None

    def last_decision_bar(self, run_id: str) -> pd.Timestamp | None:
        """Open time of the latest decided bar of ``run_id`` (None when none)."""
        t = decisions_table
        with self._engine.connect() as conn:
            value = conn.execute(sa.select(sa.func.max(t.c.bar_open_time)).where(t.c.run_id == run_id)).scalar()
        return None if value is None else pd.Timestamp(value).tz_convert("UTC")

    def bar_intents(self, run_id: str, bar_open_time: pd.Timestamp) -> list[dict[str, Any]]:
        """The intents of one bar (insertion order) as dicts, each with its latest ``status``."""
        t = order_intents_table
        stmt = sa.select(t).where((t.c.run_id == run_id) & (t.c.bar_open_time == to_utc_iso(bar_open_time)))
        with self._engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(stmt.order_by(t.c.id)).mappings()]
        for r in rows:
            r["status"] = self.intent_status(r["client_id"])
            r["bar_open_time"] = pd.Timestamp(r["bar_open_time"]).tz_convert("UTC")
        return rows

    def unresolved_intents(self, run_id: str) -> list[dict[str, Any]]:
        """Intents of ``run_id`` whose latest status is 'written', 'sent', 'unknown' or 'not_found'."""
        latest = self._latest_intent_status()
        t = order_intents_table
        with self._engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(sa.select(t).where(t.c.run_id == run_id).order_by(t.c.id)).mappings()]
        out = []
        for r in rows:
            r["status"] = latest.get(r["client_id"])
            if r["status"] in ("written", "sent", "unknown", "not_found"):
                r["bar_open_time"] = pd.Timestamp(r["bar_open_time"]).tz_convert("UTC")
                out.append(r)
        return out

    def latest_order(self, client_id: str) -> dict[str, Any] | None:
        """The latest recorded observation of the order ``client_id`` (None when never seen)."""
        t = orders_table
        stmt = sa.select(t).where(t.c.client_id == client_id).order_by(t.c.id.desc()).limit(1)
        with self._engine.connect() as conn:
            row = conn.execute(stmt).mappings().first()
        return None if row is None else dict(row)

    def client_id_of_order(self, exchange_order_id: str) -> str | None:
        """Our client id of an exchange order id, from the recorded observations."""
        t = orders_table
        stmt = sa.select(t.c.client_id).where(t.c.exchange_order_id == str(exchange_order_id)).limit(1)
        with self._engine.connect() as conn:
            return conn.execute(stmt).scalar()

    def position_blocked(self, symbol: str) -> bool:
        """True when the latest position row of ``symbol`` is 'unreconciled': the last reconciliation
        confirmed a mismatch. A later read that agrees again (a 'reconcile' row) or an accepted
        position (a 'baseline' row) clears it."""
        last = self.last_position(symbol)
        return last is not None and last["source"] == "unreconciled"

    def _latest_position_id(self, symbol: str, source: str) -> int:
        t = positions_table
        with self._engine.connect() as conn:
            value = conn.execute(sa.select(sa.func.max(t.c.id)).where(
                (t.c.symbol == symbol) & (t.c.source == source))).scalar()  # fmt: skip
        return int(value or 0)

    def blocked_symbols(self) -> list[str]:
        """Symbols whose position is unreconciled now (:meth:`position_blocked`), sorted."""
        with self._engine.connect() as conn:
            symbols = conn.execute(sa.select(positions_table.c.symbol).distinct()).scalars().all()
        return sorted(s for s in symbols if self.position_blocked(s))

    def request_position_accept(self, symbol: str, note: str, time: pd.Timestamp) -> dict[str, Any]:
        """Operator request (``ats serve accept-position``): adopt the exchange position of ``symbol``.

        Appends a ``position_accept_requested`` event (run of the latest unreconciled row) whose
        detail names the symbol, the note, the exchange position last seen and the id of the
        current 'baseline' row. The live loop applies it at its next reconciliation
        (:meth:`pending_position_accept`); a request is tied to the discrepancy present when it
        was made, so it never adopts a later one.

        Returns
        -------
        dict
            The event detail written.

        Raises
        ------
        ValueError
            If the position of ``symbol`` is not unreconciled (nothing to accept) or ``note`` is blank.
        """
        if not note.strip():
            raise ValueError("a note (who accepts and why) is required")
        if not self.position_blocked(symbol):
            raise ValueError(f"the position of {symbol} is not unreconciled: nothing to accept")
        t = positions_table
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(t).where((t.c.symbol == symbol) & (t.c.source == "unreconciled"))
                               .order_by(t.c.id.desc()).limit(1)).mappings().first()  # fmt: skip
        assert row is not None  # blocked implies an unreconciled row
        detail = {"symbol": symbol, "note": note.strip(), "baseline_id": self._latest_position_id(symbol, "baseline"),
                  "seen_signed_qty": float(row["side"]) * float(row["qty_base"]), "seen_at": row["time"]}
        self.append_event(str(row["run_id"]), time, "position_accept_requested", detail)
        return detail

    def pending_position_accept(self, symbol: str) -> dict[str, Any] | None:
        """The operator's request to adopt the exchange position of ``symbol``, if one applies now.

        A request applies while the position is unreconciled and no 'baseline' row was written
        since the request was made. Returns its detail plus ``request_id`` (the event id), or None.
        """
        if not self.position_blocked(symbol):
            return None
        baseline_id = self._latest_position_id(symbol, "baseline")
        t = events_table
        stmt = sa.select(t.c.id, t.c.detail).where(t.c.kind == "position_accept_requested").order_by(t.c.id.desc())
        with self._engine.connect() as conn:
            for event_id, text in conn.execute(stmt):
                detail = json_codec.loads(text) if text else {}
                if detail.get("symbol") == symbol and detail.get("baseline_id") == baseline_id:
                    return {**detail, "request_id": int(event_id)}
        return None

    def max_ids(self) -> tuple[int, int]:
        """(largest ``events`` id, largest ``exchange_fills`` id); 0 for an empty table."""
        with self._engine.connect() as conn:
            ev = conn.execute(sa.select(sa.func.max(events_table.c.id))).scalar()
            fi = conn.execute(sa.select(sa.func.max(exchange_fills_table.c.id))).scalar()
        return int(ev or 0), int(fi or 0)

    def events_after(self, run_id: str, after_id: int) -> tuple[list[EventRecord], int]:
        """Events of ``run_id`` with id > ``after_id`` (insertion order) and the largest id seen."""
        t = events_table
        stmt = sa.select(t).where((t.c.run_id == run_id) & (t.c.id > after_id)).order_by(t.c.id)
        with self._engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        out = [EventRecord(r["run_id"], pd.Timestamp(r["time"]).tz_convert("UTC"), r["kind"],
                           json_codec.loads(r["detail"]) if r["detail"] else {}) for r in rows]  # fmt: skip
        return out, max([after_id, *(int(r["id"]) for r in rows)])

    def exchange_fills_after(self, symbol: str, after_id: int) -> tuple[list[ExchangeFillRecord], int]:
        """Exchange trades of ``symbol`` stored with row id > ``after_id`` and the largest id seen."""
        t = exchange_fills_table
        stmt = sa.select(t).where((t.c.symbol == symbol) & (t.c.id > after_id)).order_by(t.c.id)
        with self._engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        out = [ExchangeFillRecord(r["run_id"], r["symbol"], int(r["trade_id"]), r["exchange_order_id"], r["client_id"],
                                  int(r["side"]), float(r["qty_base"]), float(r["price"]), float(r["fee_usdt"]),
                                  float(r["realized_pnl_usdt"]), pd.Timestamp(r["time"]).tz_convert("UTC"))
               for r in rows]  # fmt: skip
        return out, max([after_id, *(int(r["id"]) for r in rows)])

    def decision_at(self, run_id: str, bar_open_time: pd.Timestamp) -> dict[str, Any] | None:
        """The decision row of (run, bar) as a dict, None when the bar was not decided."""
        t = decisions_table
        stmt = sa.select(t).where((t.c.run_id == run_id) & (t.c.bar_open_time == to_utc_iso(bar_open_time)))
        with self._engine.connect() as conn:
            row = conn.execute(stmt.order_by(t.c.id).limit(1)).mappings().first()
        return None if row is None else dict(row)
