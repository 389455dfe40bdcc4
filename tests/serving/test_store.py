"""StateStore: round trip, WAL, atomic per-call transactions, run filters."""

from __future__ import annotations

import math
import sqlite3
from datetime import UTC, datetime

import pandas as pd
import pytest
import sqlalchemy as sa

from envs.accounting import Fill
from market.decision import Decision
from serving.store import DecisionRecord, EquityRecord, EventRecord, FillRecord, StateStore

T0 = pd.Timestamp("2024-03-01 08:00", tz="UTC")
CREATED = datetime(2024, 3, 1, 9, 0, 1, tzinfo=UTC)


def _decision(run_id: str = "r1", source: str = "v2", raw=(0.5, math.nan, 1.0, 0.2, 0.1), reason=None):
    return DecisionRecord.from_decision(
        run_id, T0, source, Decision(1, 2.0, 0.25, 1.5, 3.0),
        raw_action=raw, fallback_reason=reason, latency_ms=12.5, created_at=CREATED, symbol="BTCUSDT",
    )  # fmt: skip


def test_round_trip(tmp_path) -> None:
    store = StateStore.sqlite(tmp_path / "state.db")
    fill = Fill(int(T0.value), -1, 0.123, 30_000.1, 1.84, 0.37, "stop")
    store.append(
        decisions=[_decision(), _decision(source="v1", raw=None, reason="exception: RuntimeError: boom")],
        fills=[FillRecord.from_fill("r1", fill, "BTCUSDT")],
        equity=[EquityRecord("r1", T0, 10_050.5, 6_000.0, -1, 0.123, "BTCUSDT")],
        events=[EventRecord("r1", T0, "quarantine", {"problem": "high < low", "n": 3, "x": math.inf})],
    )
    d = store.decisions()
    assert list(d["source"]) == ["v2", "v1"]
    assert d.loc[0, "bar_open_time"] == T0
    assert d.loc[0, "created_at"] == pd.Timestamp(CREATED)
    assert (d.loc[0, "direction"], d.loc[0, "leverage"], d.loc[0, "size_frac"]) == (1, 2.0, 0.25)
    assert (d.loc[0, "stop_atr"], d.loc[0, "take_profit_atr"], d.loc[0, "latency_ms"]) == (1.5, 3.0, 12.5)
    raw = d.loc[0, "raw_action"]
    assert raw[0] == 0.5 and math.isnan(raw[1]) and raw[2:] == [1.0, 0.2, 0.1]
    assert d.loc[1, "raw_action"] is None and d.loc[1, "fallback_reason"] == "exception: RuntimeError: boom"
    assert d.loc[0, "fallback_reason"] is None

    f = store.fills()
    assert len(f) == 1
    row = f.iloc[0]
    assert (row["bar_open_time"], row["side"], row["qty_base"], row["price"]) == (T0, -1, 0.123, 30_000.1)
    assert (row["fee_usdt"], row["slippage_usdt"], row["reason"]) == (1.84, 0.37, "stop")

    e = store.equity()
    assert e.iloc[0][["equity_usdt", "cash_usdt", "position_side", "position_qty_base"]].tolist() == [
        10_050.5, 6_000.0, -1, 0.123,
    ]  # fmt: skip
    ev = store.events()
    assert ev.loc[0, "kind"] == "quarantine"
    assert ev.loc[0, "detail"] == {"problem": "high < low", "n": 3, "x": math.inf}  # read back by market.json_codec
    store.close()


def test_sqlite_file_is_in_wal_mode(tmp_path) -> None:
    path = tmp_path / "sub" / "state.db"
    store = StateStore.sqlite(path)
    assert store.journal_mode() == "wal"
    store.close()
    with sqlite3.connect(path) as raw:  # WAL is persistent in the file itself
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_append_is_one_transaction(tmp_path) -> None:
    store = StateStore.sqlite(tmp_path / "state.db")
    bad_event = EventRecord("r1", T0, None, {})  # type: ignore[arg-type]  # NOT NULL violation, inserted last
    with pytest.raises(sa.exc.IntegrityError):
        store.append(
            decisions=[_decision()], equity=[EquityRecord("r1", T0, 1.0, 1.0, 0, 0.0, "BTCUSDT")], events=[bad_event]
        )
    assert store.decisions().empty and store.equity().empty and store.events().empty


def test_filters_by_run_and_reopens(tmp_path) -> None:
    path = tmp_path / "state.db"
    store = StateStore.sqlite(path)
    store.append(decisions=[_decision("a"), _decision("b"), _decision("a")])
    store.append_event("b", T0, "run_started", {"bars": 3})
    store.close()
    again = StateStore(f"sqlite:///{path}")
    assert len(again.decisions()) == 3
    assert len(again.decisions(run_id="a")) == 2
    assert list(again.events(run_id="b")["kind"]) == ["run_started"]
    assert again.events(run_id="a").empty


def test_in_memory_store_works() -> None:
    store = StateStore("sqlite://")
    store.append(decisions=[_decision()])
    assert len(store.decisions()) == 1


def test_rejects_bad_records() -> None:
    with pytest.raises(ValueError, match="source"):
        _decision(source="v3")
    store = StateStore("sqlite://")
    with pytest.raises(ValueError, match="naive"):
        store.append(equity=[EquityRecord("r", pd.Timestamp("2024-01-01"), 1.0, 1.0, 0, 0.0, "BTCUSDT")])


def test_reads_of_one_symbol_see_only_its_rows(tmp_path) -> None:
    """Two symbols of one run at the same bars: every per-symbol read keeps them apart, the run-wide reads see both."""
    from serving.intents import OrderIntent

    store = StateStore.sqlite(tmp_path / "state.db")
    t1 = T0 + pd.Timedelta(hours=1)

    def row(symbol: str, t: pd.Timestamp, direction: int) -> DecisionRecord:
        return DecisionRecord.from_decision("r", t, "v2", Decision(direction, 1.0, 0.5, 1.5, 3.0), raw_action=None,
                                            fallback_reason=None, latency_ms=1.0, created_at=CREATED, symbol=symbol)

    store.append(decisions=[row("BTCUSDT", T0, 1), row("ETHUSDT", T0, -1), row("ETHUSDT", t1, 0)],
                 equity=[EquityRecord("r", T0, 5_000.0, 5_000.0, 1, 0.1, "BTCUSDT"),
                         EquityRecord("r", T0, 6_000.0, 6_000.0, -1, 2.0, "ETHUSDT")])
    for symbol, direction in (("BTCUSDT", 1), ("ETHUSDT", -1)):
        d = store.decision_at("r", T0, symbol)
        assert d is not None and d.symbol == symbol and d.direction == direction
    assert store.last_decision_bar("r", "BTCUSDT") == T0 and store.last_decision_bar("r", "ETHUSDT") == t1
    assert store.last_decision_bar("r") == t1
    assert store.has_equity("r", T0, "ETHUSDT") and not store.has_equity("r", t1, "ETHUSDT")
    assert not store.has_decision("r", t1, "BTCUSDT") and store.has_decision("r", t1, "ETHUSDT")
    assert store.peak_equity("r", "BTCUSDT") == 5_000.0 and store.peak_equity("r") == 6_000.0
    assert store.symbols("r") == ["BTCUSDT", "ETHUSDT"]
    assert list(store.decisions("r", "ETHUSDT")["direction"]) == [-1, 0]
    assert list(store.equity("r", "BTCUSDT")["position_qty_base"]) == [0.1]
    intents = [OrderIntent(f"ats-{s}-1709280000-entry", "entry", s, T0, "buy", "market", 0.1, None, False, False)
               for s in ("BTCUSDT", "ETHUSDT")]
    store.write_intents("r", intents, T0)
    assert [i.symbol for i in store.bar_intents("r", T0, "ETHUSDT")] == ["ETHUSDT"]
    assert [i.symbol for i in store.unresolved_intents("r", "BTCUSDT")] == ["BTCUSDT"]
    assert len(store.unresolved_intents("r")) == 2
    assert list(store.intents("r", "ETHUSDT")["symbol"]) == ["ETHUSDT"]
