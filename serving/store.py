"""Append-only state store of the serving loop (SQLAlchemy 2 Core; SQLite with WAL by default).

Four tables, written only by inserts:

* ``decisions`` -- one row per decided bar: which policy decided (``source`` 'v2', 'v1' or
  'guard' when the loop itself imposed a safe decision), the action, V2's raw action, the
  fallback reason and the decision latency.
* ``fills`` -- every execution of the broker (:class:`envs.accounting.Fill`).
* ``equity`` -- one snapshot per processed bar, marked at its close.
* ``events`` -- anything worth an alert or an audit line (fallbacks, quarantines, ...).

Times are stored as UTC ISO-8601 strings (``2024-01-01T00:00:00+00:00``), which sort correctly and
survive any SQL backend; the read helpers return them as tz-aware pandas timestamps. JSON columns
are text; non-finite floats are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
(JSON has no NaN) and ``raw_action`` reads them back as floats.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import sqlalchemy as sa

from envs.accounting import Fill
from market.decision import Decision

DECISION_SOURCES: tuple[str, ...] = ("v2", "v1", "guard")

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


# ----------------------------------------------------------------------------------------------
# Encoding helpers
# ----------------------------------------------------------------------------------------------

_NONFINITE_TO_TEXT = {math.inf: "Infinity", -math.inf: "-Infinity"}
_TEXT_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


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


def _json_safe(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return _NONFINITE_TO_TEXT[x]
        return x
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (pd.Timestamp, datetime)):
        return to_utc_iso(value) if value.tzinfo is not None else value.isoformat()
    return value


def dumps_json(value: Any) -> str | None:
    """Strict JSON text of ``value`` (non-finite floats as strings); None stays None."""
    if value is None:
        return None
    return json.dumps(_json_safe(value), allow_nan=False, sort_keys=True, default=str)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _loads_raw_action(text: str | None) -> list[float] | None:
    if _is_null(text):
        return None
    return [_TEXT_TO_NONFINITE.get(v, v) if isinstance(v, str) else float(v) for v in json.loads(text)]


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One row of ``decisions``. ``source`` is 'v2', 'v1' or 'guard'; ``latency_ms`` in milliseconds."""

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

    def events(self, run_id: str | None = None) -> pd.DataFrame:
        """All events (of ``run_id`` if given) in insertion order; ``detail`` decoded to dicts."""
        df = self._read(events_table, run_id, ("time",))
        df["detail"] = pd.Series(
            [None if _is_null(x) else json.loads(x) for x in df["detail"]], index=df.index, dtype=object
        )
        return df
