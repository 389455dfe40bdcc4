"""The store's rows (:mod:`serving.store_rows`): one definition per table, typed rows that round-trip
through the database, and a schema identical to the state files written before the split."""

from __future__ import annotations

import math
import sqlite3
from dataclasses import fields
from datetime import UTC, datetime

import pandas as pd
import pytest

from serving.intents import OrderIntent
from serving.store import (
    AcceptRequest,
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
    StateStore,
)
from serving.store_rows import from_row, table_of, to_row

T = pd.Timestamp("2024-03-01T10:00:00Z")
CREATED = datetime(2024, 3, 1, 10, 0, 5, tzinfo=UTC)

# the DDL of a state file written by the store before its tables were derived from the row classes
# (sqlite_master, ordered by name); the new definitions must create exactly this schema
SCHEMA_BEFORE = """CREATE TABLE decisions (
	id INTEGER NOT NULL, 
	run_id VARCHAR(128) NOT NULL, 
	bar_open_time VARCHAR(40) NOT NULL, 
	source VARCHAR(8) NOT NULL, 
	direction INTEGER NOT NULL, 
	leverage FLOAT NOT NULL, 
	size_frac FLOAT NOT NULL, 
	stop_atr FLOAT NOT NULL, 
	take_profit_atr FLOAT NOT NULL, 
	raw_action TEXT, 
	fallback_reason TEXT, 
	latency_ms FLOAT NOT NULL, 
	created_at VARCHAR(40) NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE equity (
	id INTEGER NOT NULL, 
	run_id VARCHAR(128) NOT NULL, 
	bar_open_time VARCHAR(40) NOT NULL, 
	equity_usdt FLOAT NOT NULL, 
	cash_usdt FLOAT NOT NULL, 
	position_side INTEGER NOT NULL, 
	position_qty_base FLOAT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE events (
	id INTEGER NOT NULL, 
	run_id VARCHAR(128) NOT NULL, 
	time VARCHAR(40) NOT NULL, 
	kind VARCHAR(64) NOT NULL, 
	detail TEXT, 
	PRIMARY KEY (id)
);
CREATE TABLE exchange_fills (
	id INTEGER NOT NULL, 
	run_id VARCHAR(128) NOT NULL, 
	symbol VARCHAR(32) NOT NULL, 
	trade_id BIGINT NOT NULL, 
	exchange_order_id VARCHAR(64), 
	client_id VARCHAR(64), 
	side INTEGER NOT NULL, 
	qty_base FLOAT NOT NULL, 
	price FLOAT NOT NULL, 
	fee_usdt FLOAT NOT NULL, 
	realized_pnl_usdt FLOAT NOT NULL, 
	time VARCHAR(40) NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_exchange_fills_trade UNIQUE (symbol, trade_id)
);
CREATE TABLE fills (
	id INTEGER NOT NULL, 
	run_id VARCHAR(128) NOT NULL, 
	bar_open_time VARCHAR(40) NOT NULL, 
	side INTEGER NOT NULL, 
	qty_base FLOAT NOT NULL, 
	price FLOAT NOT NULL, 
	fee_usdt FLOAT NOT NULL, 
	slippage_usdt FLOAT NOT NULL, 
	reason VARCHAR(32) NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE intent_status (
	id INTEGER NOT NULL, 
	client_id VARCHAR(36) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	time VARCHAR(40) NOT NULL, 
	detail TEXT, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_decisions_run_bar ON decisions (run_id, bar_open_time);
CREATE INDEX ix_equity_run_bar ON equity (run_id, bar_open_time);
CREATE INDEX ix_events_run_time ON events (run_id, time);
CREATE INDEX ix_fills_run_bar ON fills (run_id, bar_open_time);
CREATE INDEX ix_intent_status_client ON intent_status (client_id, id);
CREATE INDEX ix_order_intents_run_bar ON order_intents (run_id, bar_open_time);
CREATE INDEX ix_orders_client ON orders (client_id, id);
CREATE INDEX ix_positions_symbol ON positions (symbol, id);
CREATE INDEX ix_risk_state_scope ON risk_state (scope, id);
CREATE TABLE order_intents (
	id INTEGER NOT NULL, 
	run_id VARCHAR(128) NOT NULL, 
	client_id VARCHAR(36) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	symbol VARCHAR(32) NOT NULL, 
	bar_open_time VARCHAR(40) NOT NULL, 
	side VARCHAR(4) NOT NULL, 
	order_type VARCHAR(24) NOT NULL, 
	qty_base FLOAT, 
	trigger_price FLOAT, 
	reduce_only BOOLEAN NOT NULL, 
	close_position BOOLEAN NOT NULL, 
	created_at VARCHAR(40) NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (client_id)
);
CREATE TABLE orders (
	id INTEGER NOT NULL, 
	client_id VARCHAR(64) NOT NULL, 
	exchange_order_id VARCHAR(64), 
	status VARCHAR(24) NOT NULL, 
	filled_qty_base FLOAT NOT NULL, 
	avg_price FLOAT, 
	time VARCHAR(40) NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE positions (
	id INTEGER NOT NULL, 
	run_id VARCHAR(128) NOT NULL, 
	symbol VARCHAR(32) NOT NULL, 
	time VARCHAR(40) NOT NULL, 
	side INTEGER NOT NULL, 
	qty_base FLOAT NOT NULL, 
	entry_price FLOAT NOT NULL, 
	source VARCHAR(32) NOT NULL, 
	last_trade_id BIGINT, 
	PRIMARY KEY (id)
);
CREATE TABLE risk_state (
	id INTEGER NOT NULL, 
	scope VARCHAR(64) NOT NULL, 
	time VARCHAR(40) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	change VARCHAR(16) NOT NULL, 
	reasons TEXT NOT NULL, 
	tracker TEXT NOT NULL, 
	created_at VARCHAR(40) NOT NULL, 
	PRIMARY KEY (id)
);"""

ROWS = [
    DecisionRecord("r", T, "v2", 1, 3.0, 0.5, 2.0, 4.0, (0.1, math.nan, -math.inf), None, 12.5, CREATED, "BTCUSDT"),
    DecisionRecord("r", T, "missed", 0, 1.0, 0.1, 2.0, 3.0, None, "missed: no step", 0.0, CREATED, "ETHUSDT"),
    FillRecord("r", T, -1, 0.01, 60_000.0, 0.3, 0.1, "stop", "BTCUSDT"),
    EquityRecord("r", T, 1_000.0, 990.0, 1, 0.01, "BTCUSDT"),
    EventRecord("r", T, "quarantine", {"problems": ["gap"], "x": math.nan}),
    EventRecord("r", T, "live_started"),
    RiskStateRecord("default", T, "HALTED", "transition", ("drawdown", "daily loss"), {"peak": 1.0, "n": math.inf},
                    CREATED),
    IntentRecord("r", "ats-BTCUSDT-1709287200-entry", "entry", "BTCUSDT", T, "buy", "market", 0.01, None, False,
                 False, T),
    IntentStatusRecord("ats-BTCUSDT-1709287200-entry", "unknown", T, {"error": "timeout"}),
    OrderRecord("ats-BTCUSDT-1709287200-entry", "123", "closed", 0.01, 60_010.0, T),
    ExchangeFillRecord("r", "BTCUSDT", 2**40, "123", None, 1, 0.01, 60_010.0, 0.3, -1.5, T),
    PositionRecord("r", "BTCUSDT", T, -1, 0.02, 59_000.0, "unreconciled", None),
]  # fmt: skip


def _same(a: object, b: object) -> bool:
    """Equal, NaN equal to NaN (inside tuples and dicts too)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)


def _assert_same_row(got: object, want: object) -> None:
    assert type(got) is type(want)
    for f in fields(want):  # type: ignore[arg-type]
        assert _same(getattr(got, f.name), getattr(want, f.name)), (f.name, getattr(got, f.name), getattr(want, f.name))


@pytest.mark.parametrize("row", ROWS, ids=[f"{type(r).__name__}-{i}" for i, r in enumerate(ROWS)])
def test_each_row_round_trips_through_its_table(row):
    store = StateStore("sqlite://")
    table = table_of(type(row))
    with store._engine.begin() as conn:
        conn.execute(table.insert(), [to_row(row)])
        stored = conn.execute(table.select()).mappings().one()
    assert set(stored) == {"id", *to_row(row)}  # one column per declared field, plus the id
    _assert_same_row(from_row(type(row), stored), row)


ACCOUNT_TABLE = """CREATE TABLE account_equity (
	id INTEGER NOT NULL, 
	run_id VARCHAR(128) NOT NULL, 
	bar_open_time VARCHAR(40) NOT NULL, 
	equity_usdt FLOAT NOT NULL, 
	gross_notional_usdt FLOAT NOT NULL, 
	margin_usdt FLOAT NOT NULL, 
	n_positions INTEGER NOT NULL, 
	PRIMARY KEY (id)
);
"""


def _schema_2() -> str:
    """SCHEMA_BEFORE with what multi-symbol serving added: ``symbol`` last in decisions, equity and fills, and the
    account_equity table with its index."""
    out = ACCOUNT_TABLE + SCHEMA_BEFORE
    for table, last in (("decisions", "created_at VARCHAR(40) NOT NULL, "), ("equity", "position_qty_base FLOAT NOT NULL, "),
                        ("fills", "reason VARCHAR(32) NOT NULL, ")):
        head = f"CREATE TABLE {table} ("
        start = out.index(head)
        at = out.index(last, start) + len(last)
        out = out[:at] + "\n\tsymbol VARCHAR(32) NOT NULL, " + out[at:]
    index = "CREATE INDEX ix_decisions_run_bar"
    return out.replace(index, "CREATE INDEX ix_account_equity_run_bar ON account_equity (run_id, bar_open_time);\n"
                       + index)


def test_the_tables_have_the_schema_of_the_state_files_written_before_plus_the_symbol_columns(tmp_path):
    StateStore.sqlite(tmp_path / "s.db").close()
    ddl = sqlite3.connect(tmp_path / "s.db").execute(
        "select sql from sqlite_master where sql is not null order by name").fetchall()
    text = "\n".join(sql + ";" for (sql,) in ddl)
    assert text == _schema_2()
    assert text.count("symbol VARCHAR(32) NOT NULL") == 6  # decisions, equity, fills + the three tables that had it


def _old_state_file(path):
    conn = sqlite3.connect(path)
    statements = [x.strip() for x in SCHEMA_BEFORE.split(";") if x.strip()]
    for sql in sorted(statements, key=lambda x: not x.startswith("CREATE TABLE")):  # tables before indexes
        conn.execute(sql)
    conn.commit()
    conn.close()


def test_a_state_file_without_symbol_columns_is_refused_with_the_migration_command(tmp_path):
    from serving.store import StoreSchemaError

    path = tmp_path / "old.db"
    _old_state_file(path)
    with pytest.raises(StoreSchemaError, match=r"decisions, fills, equity have no 'symbol' column.*migrate-db"):
        StateStore.sqlite(path)
    # nothing was created or changed by the refused open
    names = {r[0] for r in sqlite3.connect(path).execute("select name from sqlite_master where type='table'")}
    assert "account_equity" not in names


def test_migration_is_explicit_idempotent_and_gives_the_columns_of_a_new_file(tmp_path):
    from serving.store import migrate_symbol_column

    path = tmp_path / "old.db"
    _old_state_file(path)
    with pytest.raises(ValueError, match="exchange id"):
        migrate_symbol_column(path, "BTC/USDT:USDT")
    with pytest.raises(FileNotFoundError):
        migrate_symbol_column(tmp_path / "none.db", "BTCUSDT")
    assert migrate_symbol_column(path, "BTCUSDT") == ["decisions", "fills", "equity"]
    assert migrate_symbol_column(path, "BTCUSDT") == []
    StateStore.sqlite(path).close()
    StateStore.sqlite(tmp_path / "new.db").close()

    def columns(p, table):
        return [r[1] for r in sqlite3.connect(p).execute(f"pragma table_info({table})")]

    for table in ("decisions", "fills", "equity"):
        assert columns(path, table) == columns(tmp_path / "new.db", table)


def test_a_state_file_written_before_opens_after_migration_and_reads_as_typed_rows(tmp_path):
    """Rows inserted with the old schema's SQL (as the old code wrote them) read back as typed rows of the symbol
    named at the migration."""
    from serving.store import migrate_symbol_column

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    statements = [x.strip() for x in SCHEMA_BEFORE.split(";") if x.strip()]
    for sql in sorted(statements, key=lambda x: not x.startswith("CREATE TABLE")):  # tables before indexes
        conn.execute(sql)
    t = "2024-03-01T10:00:00+00:00"
    conn.execute("insert into decisions (run_id, bar_open_time, source, direction, leverage, size_frac, stop_atr, "
                 "take_profit_atr, raw_action, fallback_reason, latency_ms, created_at) values "
                 "('live', ?, 'v2', -1, 2.0, 0.5, 1.5, 3.0, '[0.25, \"NaN\"]', NULL, 4.0, ?)", (t, t))
    conn.execute("insert into order_intents (run_id, client_id, kind, symbol, bar_open_time, side, order_type, "
                 "qty_base, trigger_price, reduce_only, close_position, created_at) values "
                 "('live', 'ats-BTCUSDT-1709287200-stop', 'stop', 'BTCUSDT', ?, 'sell', 'stop_market', NULL, "
                 "59000.0, 1, 1, ?)", (t, t))
    conn.execute("insert into intent_status (client_id, status, time, detail) values "
                 "('ats-BTCUSDT-1709287200-stop', 'written', ?, NULL)", (t,))
    conn.execute("insert into positions (run_id, symbol, time, side, qty_base, entry_price, source, last_trade_id) "
                 "values ('live', 'BTCUSDT', ?, 1, 0.01, 60000.0, 'reconcile', 41)", (t,))
    conn.execute("insert into events (run_id, time, kind, detail) values ('live', ?, 'old', NULL)", (t,))
    conn.commit()
    conn.close()
    migrate_symbol_column(path, "BTCUSDT")
    store = StateStore.sqlite(path)
    decision = store.decision_at("live", T, "BTCUSDT")
    assert decision is not None and decision.decision().direction == -1 and decision.created_at == T.to_pydatetime()
    assert decision.symbol == "BTCUSDT" and store.decision_at("live", T, "ETHUSDT") is None
    assert decision.raw_action is not None and decision.raw_action[0] == 0.25 and math.isnan(decision.raw_action[1])
    (intent,) = store.unresolved_intents("live")
    assert intent.status == "written" and intent.intent() == OrderIntent(
        "ats-BTCUSDT-1709287200-stop", "stop", "BTCUSDT", T, "sell", "stop_market", None, 59_000.0, True, True)
    assert store.last_trusted_position("BTCUSDT") == PositionRecord("live", "BTCUSDT", T, 1, 0.01, 60_000.0,
                                                                    "reconcile", 41)
    events, last_id = store.events_after("live", 0)
    assert events == [EventRecord("live", T, "old", {})] and last_id == 1


def test_store_reads_return_typed_rows(tmp_path):
    store = StateStore.sqlite(tmp_path / "s.db")
    intent = OrderIntent("ats-BTCUSDT-1709287200-entry", "entry", "BTCUSDT", T, "buy", "market", 0.01, None, False,
                         False)
    store.write_intents("live", [intent], T)
    store.mark_intent(intent.client_id, "acked", T, {"exchange_id": "9"})
    store.record_order(intent.client_id, "9", "closed", 0.01, 60_000.0, T)
    (row,) = store.bar_intents("live", T)
    assert row.status == "acked" and row.intent() == intent and row.created_at == T
    assert store.latest_order(intent.client_id) == OrderRecord(intent.client_id, "9", "closed", 0.01, 60_000.0, T)
    fill = ExchangeFillRecord("live", "BTCUSDT", 7, "9", intent.client_id, 1, 0.01, 60_000.0, 0.3, 0.0, T)
    assert store.record_position("live", "BTCUSDT", T, 1, 0.01, 60_000.0, "reconcile", 7, fills=[fill, fill]) == 1
    assert store.exchange_fills_after("BTCUSDT", 0) == ([fill], 1)
    assert store.last_position("BTCUSDT") == PositionRecord("live", "BTCUSDT", T, 1, 0.01, 60_000.0, "reconcile", 7)
    store.record_position("live", "BTCUSDT", T, 1, 0.02, 60_000.0, "unreconciled", 7)
    request = store.request_position_accept("BTCUSDT", " ops: checked ", T)
    assert request == AcceptRequest("BTCUSDT", "ops: checked", 0, 0.02, "2024-03-01T10:00:00+00:00")
    pending = store.pending_position_accept("BTCUSDT")
    assert pending is not None and pending.request_id is not None and pending.detail() == request.detail()
    record = DecisionRecord.from_decision("live", T, "v1", store_decision(), raw_action=None, fallback_reason="x",
                                          latency_ms=1.0, created_at=CREATED, symbol="BTCUSDT")
    store.append(decisions=[record])
    assert store.decision_at("live", T) == record


def store_decision():
    from market.decision import Decision

    return Decision(direction=1, leverage=2.0, size_frac=0.25, stop_atr=1.5, take_profit_atr=3.0)


def test_rows_reject_values_outside_their_domain():
    with pytest.raises(ValueError, match="decision source"):
        DecisionRecord("r", T, "v3", 0, 1.0, 0.1, 1.0, 1.0, None, None, 0.0, CREATED, "BTCUSDT")
    with pytest.raises(ValueError, match="intent status"):
        IntentStatusRecord("c", "lost", T)
    with pytest.raises(ValueError, match="naive"):
        to_row(EquityRecord("r", pd.Timestamp("2024-01-01"), 1.0, 1.0, 0, 0.0, "BTCUSDT"))
