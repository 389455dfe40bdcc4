"""``ats report``: the HTML report of a serving period, on a real paper replay database; its status figures are
those ``ats status`` prints, its window figures are recomputed here from the stored rows."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime

import pandas as pd
import pytest
from typer.testing import CliRunner

from ats_cli.main import app
from serving.ops_data import SinceError, parse_since, read_period, resolve_since
from serving.store import DecisionRecord, EquityRecord, EventRecord, StateStore
from tests.kit.chromium import CHROMIUM, render
from tests.serving.ops_kit import paper_replay_db

WIDE = {"COLUMNS": "200"}
runner = CliRunner()


@pytest.fixture(scope="module")
def replay_db(tmp_path_factory):
    db, _ = paper_replay_db(tmp_path_factory.mktemp("report") / "run", bars=200, seed=12)
    return db


def status_fields(db) -> dict[str, str]:
    """The (field -> value) lines of ``ats status``'s table."""
    r = runner.invoke(app, ["status", "--db", str(db)], env=WIDE)
    assert r.exit_code == 0, r.output
    out = {}
    for line in r.output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 2 and cells[0]:
            out[cells[0]] = cells[1]
    return out


def test_since_parses_durations_and_dates_with_one_parser():
    assert parse_since("7d") == pd.Timedelta(days=7) and parse_since("24h") == pd.Timedelta(hours=24)
    assert parse_since(" 30m ") == pd.Timedelta(minutes=30) and parse_since("2W") == pd.Timedelta(weeks=2)
    assert parse_since("1.5d") == pd.Timedelta(hours=36)
    assert parse_since("2025-01-01") == pd.Timestamp("2025-01-01", tz="UTC")
    assert parse_since("2025-01-01T12:00+02:00") == pd.Timestamp("2025-01-01T10:00", tz="UTC")
    for bad, says in (("7x", "unknown duration unit"), ("0d", "zero duration"), ("", "empty"),
                      ("last week", "is not a duration"), ("2025-13-45", "is not a duration")):
        with pytest.raises(SinceError, match=says):
            parse_since(bad)
    last = pd.Timestamp("2025-01-08 23:00", tz="UTC")  # a duration counts back from the last bar's close
    assert resolve_since(pd.Timedelta(days=7), last, pd.Timedelta(hours=1)) == pd.Timestamp("2025-01-02", tz="UTC")
    assert resolve_since(None, last, None) is None


def test_report_shows_the_status_figures_and_the_window(replay_db, tmp_path):
    out = tmp_path / "weekly"
    r = runner.invoke(app, ["report", "--db", str(replay_db), "--since", "3d", "--out", str(out)], env=WIDE)
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text()
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    status = status_fields(replay_db)
    # the same figures ats status prints: equity, position, today's PnL, risk state, the shares
    for field in ("equity", "position", "bars decided", "decided by V2", "decided by V1", "decided by guard"):
        assert status[field] in text, (field, status[field])
    pnl_field = next(k for k in status if k.startswith("today's PnL"))
    assert status[pnl_field] in text and status["risk state"].split(" since ")[0] in text
    assert status["decided by guard"] != "0 (0.0%)"  # the guard decided bars: the fallback share is not trivial
    # window figures recomputed from the rows: 3 days of 1h bars back from the last close
    store = StateStore.sqlite(replay_db)
    eq = store.equity()
    start = eq.bar_open_time.iloc[-1] + pd.Timedelta(hours=1) - pd.Timedelta(days=3)
    inside, before = eq[eq.bar_open_time >= start], eq[eq.bar_open_time < start]
    assert f"({len(inside)} bars of 60 min)" in text
    ret = inside.equity_usdt.iloc[-1] / before.equity_usdt.iloc[-1] - 1
    assert f"{ret * 100:.2f}%" in text
    d = store.decisions()
    d = d[d.bar_open_time >= start]
    guard_share = (d.source == "guard").mean()
    assert f"{guard_share:.1%}" in text  # the window's fallback share (V1 0 here: guard only)
    per_day = d.groupby(d.bar_open_time.dt.floor("D")).size()
    assert len(per_day) == 3 and all(f"{day:%Y-%m-%d}" in text for day in per_day.index)
    fills = store.fills()
    assert f"Trades: every fill of the window ({(fills.bar_open_time >= start).sum()})" in text
    assert "risk_state_changed" in text  # the REDUCING transition is an incident
    assert "no drift event in the window" in text
    assert (out / "equity.png").stat().st_size > 10_000


def test_report_refuses_what_it_cannot_show(replay_db, tmp_path):
    r = runner.invoke(app, ["report", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "o")], env=WIDE)
    assert r.exit_code == 2 and "no state database" in r.output
    r = runner.invoke(app, ["report", "--db", str(replay_db), "--since", "7 parsecs", "--out", str(tmp_path / "o")],
                      env=WIDE)
    assert r.exit_code == 2 and "unknown duration unit" in r.output
    r = runner.invoke(app, ["report", "--db", str(replay_db), "--since", "2030-01-01", "--out", str(tmp_path / "o")],
                      env=WIDE)
    assert r.exit_code == 2 and "no bar of run 'paper' in the window" in r.output
    assert not (tmp_path / "o").exists()


def test_whole_run_report_renders_in_chromium_without_console_messages(replay_db, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium not installed (CI installs it in .ci/run)")
    r = runner.invoke(app, ["report", "--db", str(replay_db), "--out", str(tmp_path / "all")], env=WIDE)
    assert r.exit_code == 0, r.output
    page = render(tmp_path / "all" / "report.html", tmp_path)
    assert "ats serving report" in page.dom and page.console == []
    assert "(200 bars of 60 min)" in page.dom and ", the whole run;" in page.dom


def _two_symbol_store(tmp_path) -> StateStore:
    store = StateStore.sqlite(tmp_path / "multi.sqlite")
    now = datetime(2025, 1, 1, tzinfo=UTC)
    t0 = pd.Timestamp("2025-01-01", tz="UTC")
    decisions, equity = [], []
    for i in range(6):
        t = t0 + pd.Timedelta(hours=i)
        for sym, src, side in (("BTCUSDT", "v2", 1), ("ETHUSDT", "v1" if i % 2 else "guard", -1 if i > 2 else 0)):
            decisions.append(DecisionRecord(run_id="m", bar_open_time=t, source=src, direction=side, leverage=1.0,
                                            size_frac=0.5, stop_atr=2.0, take_profit_atr=3.0, raw_action=None,
                                            fallback_reason=None if src == "v2" else "x", latency_ms=1.0,
                                            created_at=now, symbol=sym))
            equity.append(EquityRecord(run_id="m", bar_open_time=t, equity_usdt=5000.0 + i, cash_usdt=5000.0,
                                       position_side=side, position_qty_base=0.1 * abs(side), symbol=sym))
    store.append(decisions=decisions, equity=equity,
                 events=[EventRecord("m", t0, "run_started", {"mode": "testnet", "initial_equity_usdt": 5000.0})])
    return store


def test_rows_of_several_symbols_are_grouped_by_symbol(tmp_path):
    period = read_period(_two_symbol_store(tmp_path))
    assert period.symbols == ("BTCUSDT", "ETHUSDT")
    by_symbol = period.source_counts()
    assert by_symbol.loc["BTCUSDT", "v2"] == 6 and by_symbol.loc["ETHUSDT", "v1"] == 3
    assert by_symbol.loc["ETHUSDT", "guard"] == 3 and by_symbol.loc["ETHUSDT", "v2"] == 0
    hist = period.position_history()
    assert list(hist.columns) == ["BTCUSDT", "ETHUSDT"]
    assert hist.ETHUSDT.tolist() == pytest.approx([0, 0, 0, -0.1, -0.1, -0.1])
    assert period.positions.set_index("symbol").position_side.to_dict() == {"BTCUSDT": 1, "ETHUSDT": -1}
    # testnet rows are each the account's equity: one account point per bar
    assert len(period.equity) == 6 and period.equity.iloc[-1] == 5005.0
