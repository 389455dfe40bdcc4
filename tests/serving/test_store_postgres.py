"""The state store on PostgreSQL by URL (issue 6: "test on SQLite; Postgres must work by URL").

A throwaway server (:mod:`tests.kit.postgres`) holds one fresh database per test. The live loop
runs the same bars against the fake exchange with its state on SQLite and on Postgres; every table
must read back the same. The risk guard's kill switch persists across a restart on Postgres, and
``ats status --db-url`` reads it.
"""

from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from envs.accounting import Fill
from market.decision import Decision
from serving.exchange import BinanceFuturesBroker, make_client
from serving.live import LiveConfig, LiveLoop
from serving.risk import RiskConfig, RiskGuard, RiskState, reset_risk
from serving.store import DecisionRecord, EquityRecord, EventRecord, FillRecord, StateStore
from tests.kit.postgres import POSTGRES_UNAVAILABLE, temporary_postgres
from tests.serving.fakes import FlipPolicy, ScriptedFallback

pytestmark = pytest.mark.skipif(POSTGRES_UNAVAILABLE is not None, reason=f"no PostgreSQL: {POSTGRES_UNAVAILABLE}")

H = 3_600_000
_names = itertools.count()


@pytest.fixture(scope="module")
def server_url():
    with temporary_postgres() as url:
        yield url


@pytest.fixture
def pg_url(server_url):
    """URL of a new, empty database on the module's server."""
    name = f"ats_test_{next(_names)}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return sa.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)


def test_round_trip_on_postgres(pg_url):
    t0 = pd.Timestamp("2024-03-01 08:00", tz="UTC")
    store = StateStore(pg_url)
    decision = DecisionRecord.from_decision("r1", t0, "v2", Decision(1, 2.0, 0.25, 1.5, 3.0),
                                            raw_action=(0.5, math.nan, 1.0, 0.2, 0.1), fallback_reason=None,
                                            latency_ms=12.5, created_at=t0.to_pydatetime(), symbol="BTCUSDT")
    store.append(decisions=[decision], fills=[FillRecord.from_fill("r1", Fill(int(t0.value), -1, 0.123, 30_000.1,
                                                                              1.84, 0.37, "stop"), "BTCUSDT")],
                 equity=[EquityRecord("r1", t0, 10_050.5, 6_000.0, -1, 0.123, "BTCUSDT")],
                 events=[EventRecord("r1", t0, "quarantine", {"problem": "high < low", "x": math.inf})])
    again = StateStore(pg_url)  # another connection (a restarted process) reads the same rows
    d = again.decisions()
    assert d.loc[0, "bar_open_time"] == t0 and d.loc[0, "source"] == "v2" and d.loc[0, "leverage"] == 2.0
    raw = d.loc[0, "raw_action"]
    assert raw[0] == 0.5 and math.isnan(raw[1])
    assert again.fills().iloc[0][["side", "qty_base", "price", "reason"]].tolist() == [-1, 0.123, 30_000.1, "stop"]
    assert again.equity().iloc[0]["equity_usdt"] == 10_050.5
    assert again.events().loc[0, "detail"] == {"problem": "high < low", "x": math.inf}  # read back by market.json_codec
    assert "postgresql" in again.display_url


def _live_run(fake, store: StateStore) -> None:
    client = make_client(api_key="k", secret="s", base_url=fake.url, rate_limit=False)
    loop = LiveLoop(BinanceFuturesBroker(client, read_attempts=3, sleep=lambda s: None), store,
                    LiveConfig(context_bars=40), primary=FlipPolicy(), fallback=ScriptedFallback(),
                    wall_clock_s=lambda: fake.now_ms / 1000.0, monotonic_s=lambda: 0.0, sleep=lambda s: None)
    for _ in range(4):
        loop.step()
        fake.now_ms += H


def _comparable(frame: pd.DataFrame) -> list[dict]:
    drop = [c for c in frame.columns if c in ("id", "created_at", "recorded_at", "time_written", "written_at")]
    return frame.drop(columns=drop).astype(object).where(frame.drop(columns=drop).notna(), None).to_dict("records")


def test_live_loop_state_on_postgres_equals_sqlite(pg_url):
    from tests.kit.candles import make_candles
    from tests.kit.fake_binance import FakeBinance

    candles = make_candles(200, seed=1)
    t0 = int(candles.index[100].value // 1_000_000) + 60_000
    stores = {}
    for name, url in (("sqlite", "sqlite://"), ("postgres", pg_url)):
        with FakeBinance(candles, candles["funding_rate"].dropna(), now_ms=t0) as fake:
            store = StateStore(url)
            _live_run(fake, store)
            assert {k: v for k, v in fake.orders_by_client_id().items() if v != 1} == {}
            stores[name] = StateStore(url) if name == "postgres" else store
    a, b = stores["sqlite"], stores["postgres"]
    assert len(a.decisions("live")) == 4
    for read in ("decisions", "intents", "events", "equity"):
        assert _comparable(getattr(b, read)("live")) == _comparable(getattr(a, read)("live")), read
    for read in ("orders", "positions", "exchange_fills"):
        assert _comparable(getattr(b, read)()) == _comparable(getattr(a, read)()), read


def test_kill_switch_persists_across_restart_on_postgres(pg_url):
    from datetime import UTC, datetime

    from serving.risk import AccountSnapshot

    now = datetime(2025, 3, 1, tzinfo=UTC)
    t0 = pd.Timestamp(now)
    cfg = RiskConfig(max_leverage=100.0, max_notional_per_symbol_usdt=1e12, daily_loss_limit_frac=None,
                     max_drawdown_halt_frac=None, fast_kill_consecutive_losses=2, slow_kill_min_profit_factor=None,
                     flatten_on_halt=False)
    long = Decision(direction=1, leverage=3.0, size_frac=0.5, stop_atr=2.0, take_profit_atr=4.0)
    acct = AccountSnapshot(time=t0, equity_usdt=10_000.0, position_side=0, position_qty_base=0.0,
                           position_notional_usdt=0.0, leverage=1.0)
    g = RiskGuard(cfg, StateStore(pg_url), now=lambda: now)
    g.review(long, acct)
    g.record_closed_trade(t0, -1.0)
    g.record_closed_trade(t0, -1.0)
    assert g.state is RiskState.HALTED
    restarted = RiskGuard(cfg, StateStore(pg_url), now=lambda: now)  # a new process, same database
    assert restarted.state is RiskState.HALTED
    assert restarted.review(long, acct).decision == Decision.flat()

    from ats_cli.main import app

    out = CliRunner().invoke(app, ["status", "--db", pg_url])
    assert out.exit_code == 0, out.output
    assert "HALTED" in out.output
    reset_risk(StateStore(pg_url), note="checked by alice", now=lambda: now)
    assert RiskGuard(cfg, StateStore(pg_url), now=lambda: now).state is RiskState.ACTIVE
