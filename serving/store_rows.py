"""The state store's tables, one definition each: a frozen dataclass per table whose fields are its
columns; the SQLAlchemy table, the row written and the typed row read back are derived from it.

A field annotated ``Annotated[type, Col(sql_type, ...)]`` (:class:`Col`) is a column (its SQL
type, nullability and codec); any other field is not stored (e.g. an intent's current ``status``,
read from ``intent_status``). Every table has an autoincrement integer ``id`` primary key first;
:func:`table` builds it with the indexes and constraints given. Table and column names, types and order are those of the state files written
before (``tests/serving/test_store_rows.py`` checks the DDL), except what multi-symbol serving added (schema 2): a
``symbol`` column appended last to ``decisions``, ``fills`` and ``equity`` (:data:`SYMBOL_TABLES`) and the
``account_equity`` table. A state file of schema 1 is refused when opened, with the command that migrates it
(:func:`serving.store.migrate_symbol_column`).

Codecs (how a Python value is stored): numbers and booleans as themselves; times as UTC ISO-8601
text (``2024-01-01T00:00:00+00:00``, :func:`to_utc_iso`), which sorts correctly on any backend;
JSON columns as text written by the project's codec, :mod:`market.json_codec` (non-finite floats as
``"NaN"``, ``"Infinity"``, ``"-Infinity"``), read back with floats restored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Annotated, Any, Self, get_type_hints

import pandas as pd
import sqlalchemy as sa

from envs.accounting import Fill
from market import json_codec
from market.decision import Decision

METADATA = sa.MetaData()
"""The tables of :class:`serving.store.StateStore` (created if missing)."""

DECISION_SOURCES: tuple[str, ...] = ("v2", "v1", "guard", "missed")
RISK_STATES: tuple[str, ...] = ("ACTIVE", "REDUCING", "HALTED")
RISK_CHANGES: tuple[str, ...] = ("transition", "update", "reset", "error")
INTENT_STATUSES: tuple[str, ...] = (
    "written", "sent", "acked", "filled", "not_found", "unknown", "rejected", "abandoned", "cancelled",
)  # fmt: skip
POSITION_SOURCES: tuple[str, ...] = ("baseline", "reconcile", "unreconciled")


# ----------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------


SYMBOL_TABLES: tuple[str, ...] = ("decisions", "fills", "equity")
"""Tables that gained a ``symbol`` column for multi-symbol serving (schema 2); a state file without it predates
them (:func:`serving.store.migrate_symbol_column`)."""


def _check_symbol(symbol: str) -> None:
    if not isinstance(symbol, str) or not symbol.strip():
        raise ValueError(f"a row's symbol must be a non-empty exchange id such as 'BTCUSDT', got {symbol!r}")


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


def from_utc_iso(text: str) -> pd.Timestamp:
    """The UTC time of a stored ISO-8601 text."""
    return pd.Timestamp(text).tz_convert("UTC")


def dumps_json(value: Any) -> str | None:
    """Strict JSON text of ``value`` by :mod:`market.json_codec` (non-finite floats as strings, other
    unknown types as ``str``); None stays None."""
    if value is None:
        return None
    return json_codec.dumps(value, strict=False, sort_keys=True)


def is_null(value: Any) -> bool:
    """None or a float NaN (how pandas shows a SQL NULL)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def loads_floats(text: str | None) -> list[float] | None:
    """A stored JSON list of numbers as floats (non-finite ones restored); None for NULL."""
    if is_null(text):
        return None
    return [json_codec.to_float(v) for v in json.loads(text)]  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Codec:
    """How one column's Python value is written (``encode``) and read back (``decode``); None is NULL."""

    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


def _same(x: Any) -> Any:
    return x


PLAIN = Codec(_same, _same)
INT = Codec(int, int)
FLOAT = Codec(float, float)
BOOL = Codec(bool, bool)
TIME = Codec(to_utc_iso, from_utc_iso)
"""A tz-aware ``pd.Timestamp`` as UTC ISO text."""
DATETIME = Codec(to_utc_iso, lambda text: from_utc_iso(text).to_pydatetime())
"""A tz-aware ``datetime`` as UTC ISO text."""
JSON = Codec(dumps_json, json_codec.loads)
"""A JSON-able value (dict) as JSON text."""
FLOATS = Codec(lambda v: dumps_json(list(v)), lambda text: tuple(loads_floats(text) or ()))
"""A tuple of floats as a JSON list (non-finite floats as strings)."""
STRINGS = Codec(lambda v: dumps_json(list(v)), lambda text: tuple(json.loads(text)))
"""A tuple of strings as a JSON list."""


@dataclass(frozen=True, slots=True)
class Col:
    """A column, declared in a row dataclass as ``name: Annotated[type, Col(sql_type, ...)]``: SQL
    type, nullability, uniqueness and codec (from the SQL type unless given)."""

    type: Any
    nullable: bool = False
    unique: bool = False
    codec: Codec | None = None

    def resolved_codec(self) -> Codec:
        """The codec: the one given, else by SQL type (boolean, integer, float, as is)."""
        if self.codec is not None:
            return self.codec
        if isinstance(self.type, sa.Boolean):
            return BOOL
        if isinstance(self.type, sa.Integer):  # BigInteger too
            return INT
        if isinstance(self.type, sa.Float):
            return FLOAT
        return PLAIN


def _declared_columns(cls: type) -> tuple[tuple[str, Col, Codec], ...]:
    hints = get_type_hints(cls, include_extras=True)
    out = []
    for f in fields(cls):
        hint = hints[f.name]
        spec = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Col)), None)
        if spec is not None:
            out.append((f.name, spec, spec.resolved_codec()))
    return tuple(out)


def table(name: str, *extras: Any) -> Callable[[type], type]:
    """Class decorator: build the SQLAlchemy table ``name`` of a row dataclass (``id`` primary key,
    then one column per :class:`Col` field in field order, then ``extras``: indexes and
    constraints), stored as the class attribute ``__table__``."""

    def build(cls: type) -> type:
        columns = _declared_columns(cls)
        cols = [sa.Column("id", sa.Integer, primary_key=True, autoincrement=True)]
        cols += [sa.Column(n, c.type, nullable=c.nullable, unique=c.unique) for n, c, _ in columns]
        cls.__columns__ = columns  # type: ignore[attr-defined]
        cls.__table__ = sa.Table(name, METADATA, *cols, *extras)  # type: ignore[attr-defined]
        return cls

    return build


def to_row(record: Any) -> dict[str, Any]:
    """The column values of ``record`` (a row dataclass) as written to its table."""
    out = {}
    for name, _col, codec in type(record).__columns__:
        value = getattr(record, name)
        out[name] = None if value is None else codec.encode(value)
    return out


def from_row(cls: type[Any], row: Mapping[Any, Any], **extra: Any) -> Any:
    """The row dataclass ``cls`` of a stored row (a mapping with at least its columns); ``extra``
    sets fields that are not columns."""
    values = {}
    for name, _col, codec in cls.__columns__:
        value = row[name]
        values[name] = None if is_null(value) else codec.decode(value)
    return cls(**values, **extra)


def table_of(cls: type[Any]) -> sa.Table:
    """The SQLAlchemy table of a row dataclass."""
    return cls.__table__


# ----------------------------------------------------------------------------------------------
# paper and live serving: decisions, fills, equity, events, risk state
# ----------------------------------------------------------------------------------------------


@table("decisions", sa.Index("ix_decisions_run_bar", "run_id", "bar_open_time"))
@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One row of ``decisions``: the decision of ``symbol`` (exchange id, e.g. ``BTCUSDT``) at the close of
    ``bar_open_time``. ``source`` is one of :data:`DECISION_SOURCES`; ``latency_ms`` in ms."""

    run_id: Annotated[str, Col(sa.String(128))]
    bar_open_time: Annotated[pd.Timestamp, Col(sa.String(40), codec=TIME)]
    source: Annotated[str, Col(sa.String(8))]
    direction: Annotated[int, Col(sa.Integer)]
    leverage: Annotated[float, Col(sa.Float)]
    size_frac: Annotated[float, Col(sa.Float)]
    stop_atr: Annotated[float, Col(sa.Float)]
    take_profit_atr: Annotated[float, Col(sa.Float)]
    raw_action: Annotated[tuple[float, ...] | None, Col(sa.Text, nullable=True, codec=FLOATS)]
    fallback_reason: Annotated[str | None, Col(sa.Text, nullable=True)]
    latency_ms: Annotated[float, Col(sa.Float)]
    created_at: Annotated[datetime, Col(sa.String(40), codec=DATETIME)]
    symbol: Annotated[str, Col(sa.String(32))]

    def __post_init__(self) -> None:
        _check_symbol(self.symbol)
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
        raw_action: tuple[float, ...] | list[float] | None,
        fallback_reason: str | None,
        latency_ms: float,
        created_at: datetime,
        symbol: str,
    ) -> DecisionRecord:
        """Build the row of a :class:`market.decision.Decision` of ``symbol`` (exchange id, e.g. ``BTCUSDT``)."""
        raw = None if raw_action is None else tuple(float(x) for x in raw_action)
        return cls(
            run_id, bar_open_time, source, int(decision.direction), float(decision.leverage),
            float(decision.size_frac), float(decision.stop_atr), float(decision.take_profit_atr),
            raw, fallback_reason, float(latency_ms), created_at, symbol,
        )  # fmt: skip

    def decision(self) -> Decision:
        """The :class:`market.decision.Decision` this row records."""
        return Decision(int(self.direction), float(self.leverage), float(self.size_frac), float(self.stop_atr),
                        float(self.take_profit_atr))


@table("fills", sa.Index("ix_fills_run_bar", "run_id", "bar_open_time"))
@dataclass(frozen=True, slots=True)
class FillRecord:
    """One row of ``fills`` (a paper fill of ``symbol``): ``side`` +1 buy / -1 sell, ``qty_base`` > 0, ``price`` in
    USDT."""

    run_id: Annotated[str, Col(sa.String(128))]
    bar_open_time: Annotated[pd.Timestamp, Col(sa.String(40), codec=TIME)]
    side: Annotated[int, Col(sa.Integer)]
    qty_base: Annotated[float, Col(sa.Float)]
    price: Annotated[float, Col(sa.Float)]
    fee_usdt: Annotated[float, Col(sa.Float)]
    slippage_usdt: Annotated[float, Col(sa.Float)]
    reason: Annotated[str, Col(sa.String(32))]
    symbol: Annotated[str, Col(sa.String(32))]

    def __post_init__(self) -> None:
        _check_symbol(self.symbol)

    @classmethod
    def from_fill(cls, run_id: str, fill: Fill, symbol: str) -> FillRecord:
        """Build the row of an :class:`envs.accounting.Fill` of ``symbol`` (its ``open_time_ns`` is the bar's open)."""
        return cls(
            run_id, pd.Timestamp(fill.open_time_ns, unit="ns", tz="UTC"), int(fill.side), float(fill.qty_base),
            float(fill.price), float(fill.fee_usdt), float(fill.slippage_usdt), fill.reason, symbol,
        )  # fmt: skip


@table("equity", sa.Index("ix_equity_run_bar", "run_id", "bar_open_time"))
@dataclass(frozen=True, slots=True)
class EquityRecord:
    """One row of ``equity``: the book of ``symbol`` marked at the close of ``bar_open_time`` (USDT).

    ``equity_usdt`` / ``cash_usdt`` are the equity and cash the symbol trades with: the whole account in a
    single-symbol run and on an exchange (testnet/live: the account's equity), the symbol's sleeve of the paper
    account in a multi-symbol paper run (:mod:`serving.portfolio`; the account is then the sum of the sleeves, also
    written to ``account_equity``). ``position_side`` / ``position_qty_base``: the symbol's position.
    """

    run_id: Annotated[str, Col(sa.String(128))]
    bar_open_time: Annotated[pd.Timestamp, Col(sa.String(40), codec=TIME)]
    equity_usdt: Annotated[float, Col(sa.Float)]
    cash_usdt: Annotated[float, Col(sa.Float)]
    position_side: Annotated[int, Col(sa.Integer)]
    position_qty_base: Annotated[float, Col(sa.Float)]
    symbol: Annotated[str, Col(sa.String(32))]

    def __post_init__(self) -> None:
        _check_symbol(self.symbol)


@table("account_equity", sa.Index("ix_account_equity_run_bar", "run_id", "bar_open_time"))
@dataclass(frozen=True, slots=True)
class AccountEquityRecord:
    """One row of ``account_equity``: the whole account of a multi-symbol run marked at the close of
    ``bar_open_time`` (USDT): ``equity_usdt`` (cash + unrealized PnL of every symbol), ``gross_notional_usdt``
    (sum of ``|qty| * close`` over the symbols), ``margin_usdt`` (initial margin of the open positions) and
    ``n_positions`` (symbols with an open position)."""

    run_id: Annotated[str, Col(sa.String(128))]
    bar_open_time: Annotated[pd.Timestamp, Col(sa.String(40), codec=TIME)]
    equity_usdt: Annotated[float, Col(sa.Float)]
    gross_notional_usdt: Annotated[float, Col(sa.Float)]
    margin_usdt: Annotated[float, Col(sa.Float)]
    n_positions: Annotated[int, Col(sa.Integer)]


@table("events", sa.Index("ix_events_run_time", "run_id", "time"))
@dataclass(frozen=True, slots=True)
class EventRecord:
    """One row of ``events``: ``time`` (UTC), a short ``kind`` and a JSON-able ``detail`` dict."""

    run_id: Annotated[str, Col(sa.String(128))]
    time: Annotated[pd.Timestamp, Col(sa.String(40), codec=TIME)]
    kind: Annotated[str, Col(sa.String(64))]
    detail: Annotated[dict[str, Any], Col(sa.Text, nullable=True, codec=JSON)] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.detail is None:  # no detail is an empty one (a NULL detail reads back as {})
            object.__setattr__(self, "detail", {})


@table("risk_state", sa.Index("ix_risk_state_scope", "scope", "id"))
@dataclass(frozen=True, slots=True)
class RiskStateRecord:
    """One row of ``risk_state`` (append-only; the latest row of a ``scope`` is its current state).

    ``state`` is 'ACTIVE', 'REDUCING' or 'HALTED'; ``change`` says why the row was written
    ('transition': the state or its reasons changed, 'update': only the tracker moved, 'reset': an
    explicit human reset, 'error': the guard failed and closed itself); ``reasons`` explain the
    state; ``tracker`` is the JSON-able bookkeeping of :class:`serving.risk.RiskTracker`.
    ``time`` is the bar (or account) time the row refers to, ``created_at`` the wall clock.
    """

    scope: Annotated[str, Col(sa.String(64))]
    time: Annotated[pd.Timestamp, Col(sa.String(40), codec=TIME)]
    state: Annotated[str, Col(sa.String(16))]
    change: Annotated[str, Col(sa.String(16))]
    reasons: Annotated[tuple[str, ...], Col(sa.Text, codec=STRINGS)]
    tracker: Annotated[dict[str, Any], Col(sa.Text, codec=JSON)]
    created_at: Annotated[datetime, Col(sa.String(40), codec=DATETIME)]

    def __post_init__(self) -> None:
        if self.state not in RISK_STATES:
            raise ValueError(f"risk state must be one of {RISK_STATES}, got {self.state!r}")
        if self.change not in RISK_CHANGES:
            raise ValueError(f"risk change must be one of {RISK_CHANGES}, got {self.change!r}")


# ----------------------------------------------------------------------------------------------
# live trading: write-ahead intents, their statuses, order observations, exchange fills, positions
# ----------------------------------------------------------------------------------------------
#
# ``order_intents`` rows are written BEFORE the order is sent (unique client id); their life is
# the append-only ``intent_status`` log (latest row = current status). ``orders`` holds one row
# per observation of an exchange order; ``exchange_fills`` one row per exchange trade (unique
# trade id, so a fill seen twice is stored once); ``positions`` one row per observed position.


@table("order_intents", sa.Index("ix_order_intents_run_bar", "run_id", "bar_open_time"))
@dataclass(frozen=True, slots=True)
class IntentRecord:
    """One row of ``order_intents`` (:class:`serving.intents.OrderIntent` of a run, written at
    ``created_at``) and, read back, its latest ``status`` (None: not read; not a column)."""

    run_id: Annotated[str, Col(sa.String(128))]
    client_id: Annotated[str, Col(sa.String(36), unique=True)]
    kind: Annotated[str, Col(sa.String(16))]
    symbol: Annotated[str, Col(sa.String(32))]
    bar_open_time: Annotated[pd.Timestamp, Col(sa.String(40), codec=TIME)]
    side: Annotated[str, Col(sa.String(4))]
    order_type: Annotated[str, Col(sa.String(24))]
    qty_base: Annotated[float | None, Col(sa.Float, nullable=True, codec=PLAIN)]
    trigger_price: Annotated[float | None, Col(sa.Float, nullable=True, codec=PLAIN)]
    reduce_only: Annotated[bool, Col(sa.Boolean)]
    close_position: Annotated[bool, Col(sa.Boolean)]
    created_at: Annotated[pd.Timestamp, Col(sa.String(40), codec=TIME)]
    status: str | None = None

    @classmethod
    def from_intent(cls, run_id: str, intent: Any, created_at: pd.Timestamp) -> IntentRecord:
        """The row of an :class:`serving.intents.OrderIntent`."""
        return cls(run_id, intent.client_id, intent.kind, intent.symbol, intent.bar_open_time, intent.side,
                   intent.order_type, intent.qty_base, intent.trigger_price, bool(intent.reduce_only),
                   bool(intent.close_position), created_at)

    def intent(self) -> Any:
        """The :class:`serving.intents.OrderIntent` of this row."""
        from serving.intents import OrderIntent

        return OrderIntent(self.client_id, self.kind, self.symbol, self.bar_open_time, self.side, self.order_type,
                           self.qty_base, self.trigger_price, self.reduce_only, self.close_position)


@table("intent_status", sa.Index("ix_intent_status_client", "client_id", "id"))
@dataclass(frozen=True, slots=True)
class IntentStatusRecord:
    """One row of ``intent_status``: the intent ``client_id`` entered ``status`` (one of
    :data:`INTENT_STATUSES`) at ``time``, with an optional JSON-able ``detail``."""

    client_id: Annotated[str, Col(sa.String(36))]
    status: Annotated[str, Col(sa.String(16))]
    time: Annotated[pd.Timestamp, Col(sa.String(40), codec=TIME)]
    detail: Annotated[dict[str, Any] | None, Col(sa.Text, nullable=True, codec=JSON)] = None

    def __post_init__(self) -> None:
        if self.status not in INTENT_STATUSES:
            raise ValueError(f"intent status must be one of {INTENT_STATUSES}, got {self.status!r}")


@table("orders", sa.Index("ix_orders_client", "client_id", "id"))
@dataclass(frozen=True, slots=True)
class OrderRecord:
    """One row of ``orders``: an observation of our order ``client_id`` on the exchange (ack, fill,
    cancel, lookup result); ``avg_price`` USDT (None before a fill)."""

    client_id: Annotated[str, Col(sa.String(64))]
    exchange_order_id: Annotated[str | None, Col(sa.String(64), nullable=True)]
    status: Annotated[str, Col(sa.String(24))]
    filled_qty_base: Annotated[float, Col(sa.Float)]
    avg_price: Annotated[float | None, Col(sa.Float, nullable=True, codec=PLAIN)]
    time: Annotated[pd.Timestamp, Col(sa.String(40), codec=TIME)]


@table("exchange_fills", sa.UniqueConstraint("symbol", "trade_id", name="uq_exchange_fills_trade"))
@dataclass(frozen=True, slots=True)
class ExchangeFillRecord:
    """One exchange trade: ``side`` +1 buy / -1 sell, ``qty_base`` > 0, prices and money in USDT."""

    run_id: Annotated[str, Col(sa.String(128))]
    symbol: Annotated[str, Col(sa.String(32))]
    trade_id: Annotated[int, Col(sa.BigInteger)]
    exchange_order_id: Annotated[str | None, Col(sa.String(64), nullable=True)]
    client_id: Annotated[str | None, Col(sa.String(64), nullable=True)]
    side: Annotated[int, Col(sa.Integer)]
    qty_base: Annotated[float, Col(sa.Float)]
    price: Annotated[float, Col(sa.Float)]
    fee_usdt: Annotated[float, Col(sa.Float)]
    realized_pnl_usdt: Annotated[float, Col(sa.Float)]
    time: Annotated[pd.Timestamp, Col(sa.String(40), codec=TIME)]


@table("positions", sa.Index("ix_positions_symbol", "symbol", "id"))
@dataclass(frozen=True, slots=True)
class PositionRecord:
    """One row of ``positions``: the position of ``symbol`` seen at ``time`` (``side`` -1/0/+1,
    ``qty_base`` >= 0, ``entry_price`` USDT). ``source``: 'baseline' (the reference the loop
    reconciles against), 'reconcile' (matched our trades) or 'unreconciled' (the exchange disagreed);
    ``last_trade_id``: the last exchange trade the row accounts for."""

    run_id: Annotated[str, Col(sa.String(128))]
    symbol: Annotated[str, Col(sa.String(32))]
    time: Annotated[pd.Timestamp, Col(sa.String(40), codec=TIME)]
    side: Annotated[int, Col(sa.Integer)]
    qty_base: Annotated[float, Col(sa.Float)]
    entry_price: Annotated[float, Col(sa.Float)]
    source: Annotated[str, Col(sa.String(32))]
    last_trade_id: Annotated[int | None, Col(sa.BigInteger, nullable=True)]

    @property
    def signed_qty(self) -> float:
        """The position in signed base units."""
        return self.side * self.qty_base


@dataclass(frozen=True, slots=True)
class AcceptRequest:
    """An operator's request to adopt the exchange position of ``symbol`` (the detail of a
    ``position_accept_requested`` event; ``request_id`` its event id, None before it is stored).

    ``baseline_id``: the 'baseline' position row current when it was made (the request applies
    only while no newer baseline exists); ``seen_signed_qty`` / ``seen_at``: the exchange position
    of the unreconciled row it answers (base units; stored ISO time text).
    """

    symbol: str
    note: str
    baseline_id: int
    seen_signed_qty: float
    seen_at: str
    request_id: int | None = None

    def detail(self) -> dict[str, Any]:
        """The event detail (without ``request_id``)."""
        return {"symbol": self.symbol, "note": self.note, "baseline_id": self.baseline_id,
                "seen_signed_qty": self.seen_signed_qty, "seen_at": self.seen_at}

    @classmethod
    def from_detail(cls, detail: Mapping[str, Any], request_id: int) -> Self:
        """The request of a stored event detail."""
        return cls(str(detail["symbol"]), str(detail.get("note", "")), int(detail["baseline_id"]),
                   float(detail["seen_signed_qty"]), str(detail.get("seen_at", "")), request_id)
