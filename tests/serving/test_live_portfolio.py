"""Several symbols on one exchange account in one process (issue 19, 2-3): :class:`serving.live_portfolio.
LivePortfolio` against the fake exchange serving BTCUSDT and ETHUSDT: both decided per bar close and recorded, equal
shares, the account's guard in front of entries, an unreconciled symbol frozen alone, a symbol whose reads fail
retried alone, and kill -9 at every crash point with both positions open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from market.decision import StatelessPolicy
from serving.account_risk import AccountRiskConfig
from serving.crash import CRASH_POINTS
from serving.status import read_status
from serving.store import StateStore
from tests.kit.fake_binance import KLINES, ORDER, FakeBinance, Fault, assert_consistent
from tests.serving.portfolio_kit import BTC, ETH, SYMBOLS, H, live_portfolio, two_symbol_fake

REPO = Path(__file__).resolve().parents[2]


def _wall(fake: FakeBinance):
    return lambda: fake.now_ms / 1000.0


def _price(frame: pd.DataFrame, ms: int) -> float:
    """The open of the bar containing ``ms`` (what a market order fills at on the fake)."""
    return float(frame["open"].loc[pd.Timestamp((ms // H) * H, unit="ms", tz="UTC")])


def test_two_symbols_decided_together_recorded_and_shown_by_status(tmp_path):
    store = StateStore.sqlite(tmp_path / "s.sqlite")
    with two_symbol_fake() as fake:
        pf = live_portfolio(fake.url, store, wall_clock_s=_wall(fake))
        bars = []
        for k in range(3):
            results = pf.step()
            assert set(results) == set(SYMBOLS)
            assert all(r.bar_open_time is not None and r.sent for r in results.values()), results
            bars.append(results["BTCUSDT"].bar_open_time)
            assert results["ETHUSDT"].bar_open_time == bars[-1]  # closed together, decided together
            assert all(r.bar_open_time is None for r in pf.step().values())  # the same bar again: nothing new
            if k == 0:  # equal shares: each symbol sizes on half the account (0.5 size x 3x leverage x 5,000)
                for sym, frame in (("BTCUSDT", BTC), ("ETHUSDT", ETH)):
                    notional = abs(fake.position(sym)[0]) * _price(frame, fake.now_ms)
                    assert notional == pytest.approx(7_500.0, rel=0.02), sym
            fake.now_ms += H
        for sym in SYMBOLS:
            assert_consistent(fake, store, sym)
        d = store.decisions("live")
        assert d.groupby("symbol").size().to_dict() == {"BTCUSDT": 3, "ETHUSDT": 3}
        for sym in SYMBOLS:
            assert list(d[d["symbol"] == sym]["bar_open_time"]) == bars
            ids = store.intents("live", sym)["client_id"]
            assert len(ids) and all(cid.startswith(f"ats-{sym}-") for cid in ids)  # client ids per symbol
            stops = [a for a in fake.trading.algo_orders if a["symbol"] == sym and a["algoStatus"] == "NEW"]
            assert sorted(a["orderType"] for a in stops) == ["STOP_MARKET", "TAKE_PROFIT_MARKET"]
        events = store.events("live")
        assert len(events[events["kind"] == "live_started"]) == 2
        named = {kind: det.get("symbol") for kind, det in zip(events["kind"], events["detail"], strict=True)}
        assert all(s in {*SYMBOLS, *SYMBOLS.values()} for s in named.values()), named  # every event names its symbol
        account = store.account_equity("live")
        assert list(account["bar_open_time"]) == bars and set(account["n_positions"]) == {2}
        status = read_status(store)
        assert [s.symbol for s in status.symbols] == ["BTCUSDT", "ETHUSDT"]
    store.close()


def test_account_guard_clips_the_second_entry_where_each_symbol_alone_fits(tmp_path):
    store = StateStore.sqlite(tmp_path / "s.sqlite")
    limits = AccountRiskConfig(max_same_direction_notional_usdt=10_000.0, oversize_action="clip")
    with two_symbol_fake() as fake:
        pf = live_portfolio(fake.url, store, wall_clock_s=_wall(fake), account_risk=limits)
        pf.step()  # FlipPolicy: both symbols enter the same side, 7,500 USDT each wanted; BTCUSDT is weighed first
        btc = abs(fake.position("BTCUSDT")[0]) * _price(BTC, fake.now_ms)
        eth = abs(fake.position("ETHUSDT")[0]) * _price(ETH, fake.now_ms)
        assert btc == pytest.approx(7_500.0, rel=0.02)
        assert eth == pytest.approx(10_000.0 - 7_500.0, rel=0.03)  # clipped to the room left
        verdicts = [e for e in store.events("live").itertuples() if e.kind == "guard_verdict"]
        assert [v.detail["symbol"] for v in verdicts] == ["ETHUSDT"]
        assert verdicts[0].detail["scope"] == "account" and "account_notional_clipped" in verdicts[0].detail["reasons"][0]
        for sym in SYMBOLS:
            assert_consistent(fake, store, sym)
    store.close()


def test_an_unreconciled_symbol_is_frozen_alone_while_the_other_trades(tmp_path):
    store = StateStore.sqlite(tmp_path / "s.sqlite")
    with two_symbol_fake() as fake:
        pf = live_portfolio(fake.url, store, wall_clock_s=_wall(fake))
        pf.step()
        amt, entry = fake.position("ETHUSDT")
        fake.set_position(amt * 2, entry, "ETHUSDT")  # an external trade: the exchange differs from our fills
        before = {sym: fake.position(sym)[0] for sym in SYMBOLS}
        fake.now_ms += H
        results = pf.step()
        assert results["ETHUSDT"].sent == [] and "position_unreconciled" in results["ETHUSDT"].entries_blocked
        assert results["BTCUSDT"].sent and fake.position("BTCUSDT")[0] == pytest.approx(-before["BTCUSDT"], rel=0.05)
        assert fake.position("ETHUSDT")[0] == before["ETHUSDT"]  # nothing sent for it, not even an exit
        assert store.position_blocked("ETHUSDT") and not store.position_blocked("BTCUSDT")
        d = store.decisions("live")
        assert d.groupby("symbol").size().to_dict() == {"BTCUSDT": 2, "ETHUSDT": 2}  # both decisions recorded
        refused = [e.detail for e in store.events("live").itertuples() if e.kind == "trading_refused"]
        assert refused and {r["symbol"] for r in refused} == {"ETHUSDT"}
        fake.now_ms += H
        pf.step()  # still frozen; BTCUSDT trades on
        assert fake.position("ETHUSDT")[0] == before["ETHUSDT"] and store.position_blocked("ETHUSDT")
        assert_consistent(fake, store, "BTCUSDT")
    store.close()


def test_a_symbol_whose_reads_fail_is_retried_alone_within_the_bar(tmp_path):
    store = StateStore.sqlite(tmp_path / "s.sqlite")
    with two_symbol_fake() as fake:
        pf = live_portfolio(fake.url, store, wall_clock_s=_wall(fake))
        pf.step()
        fake.now_ms += H
        fake.add_fault(KLINES, Fault("json_5xx"), times=3, symbol="ETHUSDT")  # every read attempt of ETH's candles
        results = pf.step()
        assert set(results) == {"BTCUSDT"} and results["BTCUSDT"].sent
        assert pf.failures == {"BTCUSDT": 0, "ETHUSDT": 1}
        failed = [e.detail for e in store.events("live").itertuples() if e.kind == "step_failed"]
        assert [f["symbol"] for f in failed] == ["ETHUSDT"]
        assert len(store.account_equity("live")) == 1  # the bar's account row waits for every symbol
        again = pf.step()  # the retry within the bar: ETH decides it, BTC has nothing new
        assert again["ETHUSDT"].bar_open_time == results["BTCUSDT"].bar_open_time and again["ETHUSDT"].sent
        assert again["BTCUSDT"].bar_open_time is None
        assert pf.failures == {"BTCUSDT": 0, "ETHUSDT": 0} and len(store.account_equity("live")) == 2
        for sym in SYMBOLS:
            assert_consistent(fake, store, sym)
    store.close()


class _Failing(StatelessPolicy):
    name = "v2"

    def decide(self, ctx):
        raise FloatingPointError("NaN output")


def test_one_symbols_bundle_failing_falls_back_while_the_other_trades(tmp_path):
    store = StateStore.sqlite(tmp_path / "s.sqlite")
    with two_symbol_fake() as fake:
        pf = live_portfolio(fake.url, store, wall_clock_s=_wall(fake), policies={"ETHUSDT": _Failing()})
        results = pf.step()
        assert results["ETHUSDT"].source == "v1" and results["BTCUSDT"].source == "v2"
        assert fake.position("ETHUSDT")[0] == 0 and fake.position("BTCUSDT")[0] != 0
        assert store.decisions("live").groupby("symbol").size().to_dict() == {"BTCUSDT": 1, "ETHUSDT": 1}
    store.close()


CHILD = """
import sys
from serving.crash import NO_CRASH, KillAt
from serving.exchange import make_client
from serving.store import StateStore
from tests.serving.portfolio_kit import live_portfolio

url, db, crash = sys.argv[1], sys.argv[2], sys.argv[3]
clock = make_client(api_key="k", secret="s", base_url=url, timeout_ms=3000, rate_limit=False)
pf = live_portfolio(url, StateStore.sqlite(db), wall_clock_s=lambda: clock.fetch_time() / 1000.0,
                    crash_points=KillAt.parse(crash) if crash else NO_CRASH)
print("done", pf.run(max_steps=1, poll_s=0.02, install_signal_handlers=False))
"""


def _child(fake: FakeBinance, db: Path, crash: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", CHILD, fake.url, str(db), crash or ""], cwd=REPO, env=env,
                          check=False, capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize("crash", [
    "after_intent_written",
    "after_send",        # BTC's exit accepted, its answer never recorded
    "after_send:7",      # a later send of the bar (past BTCUSDT's orders), its answer never recorded
    "after_ack",
    "after_fill",        # BTC's exit filled, its entry not yet sent
    "after_fill:4",      # a later fill of the bar (past BTCUSDT's exit and entry)
    "during_reconciliation",
    "after_fill:2+partial",  # BTC's exit filled only in part, its entry filled, then kill -9
])  # fmt: skip
def test_kill9_at_each_crash_point_with_two_symbols_open(tmp_path, crash):
    assert crash.split(":")[0].removesuffix("+partial") in CRASH_POINTS
    db = tmp_path / "state.sqlite"
    with two_symbol_fake() as fake:
        store = StateStore.sqlite(db)
        first = live_portfolio(fake.url, store, wall_clock_s=_wall(fake)).step()  # bar B0: both open, protected
        b0 = first["BTCUSDT"].bar_open_time
        assert all(fake.position(sym)[0] != 0 for sym in SYMBOLS)
        store.close()
        fake.now_ms += H  # bar B1 closes: FlipPolicy reverses both (exit, entry, stop, tp each)
        partial = crash.endswith("+partial")
        if partial:
            crash = crash.removesuffix("+partial")
            fake.add_fault(f"POST {ORDER}", Fault("partial_fill", fill_ratio=0.6))
        died = _child(fake, db, crash)
        assert died.returncode == -signal.SIGKILL, (died.returncode, died.stdout, died.stderr[-3000:])

        store = StateStore.sqlite(db)  # restart: nothing in memory survives
        pf = live_portfolio(fake.url, store, wall_clock_s=_wall(fake))
        pf.step()
        b1 = b0 + pd.Timedelta(hours=1)
        decisions = store.decisions("live")
        for sym in SYMBOLS:
            assert_consistent(fake, store, sym)  # no duplicate order, the stored position == the exchange's
            assert list(decisions[decisions["symbol"] == sym]["bar_open_time"]) == [b0, b1]
            intents = [i for i in store.bar_intents("live", b1, sym)]
            assert {i.kind for i in intents} == {"exit", "entry", "stop", "tp"}, sym
            assert all(i.status in ("filled", "acked") for i in intents), [(i.kind, i.status) for i in intents]
            protective = [a for a in fake.trading.algo_orders if a["symbol"] == sym and a["algoStatus"] == "NEW"]
            assert sorted(a["clientAlgoId"].rsplit("-", 1)[1] for a in protective) == ["stop", "tp"], sym
            assert all(a["clientAlgoId"].split("-")[2] == str(int(b1.timestamp())) for a in protective)
        if partial:
            expired = [o for o in fake.trading.orders if o["status"] == "EXPIRED"]
            assert len(expired) == 1 and 0 < float(expired[0]["executedQty"]) < float(expired[0]["origQty"])
        fake.now_ms += H  # trading resumes within one bar, for both
        resumed = pf.step()
        assert all(r.bar_open_time == b1 + pd.Timedelta(hours=1) and r.sent for r in resumed.values())
        for sym in SYMBOLS:
            assert_consistent(fake, store, sym)
        store.close()


def test_ats_serve_testnet_with_two_symbols_against_the_fake_exchange(tmp_path, monkeypatch):
    """``ats serve --mode testnet --symbols BTCUSDT,ETHUSDT --base-url URL`` (the issue's 'done when'): both symbols
    decided and recorded in one run on one account, ``ats status`` shows both and the account line; a bundle that
    was not trained on them is refused without ``--allow-transfer``."""
    import json

    from typer.testing import CliRunner

    from ats_cli.main import app

    runner = CliRunner()
    monkeypatch.setenv("ATS_BINANCE_API_KEY", "clikey1234")
    monkeypatch.setenv("ATS_BINANCE_API_SECRET", "clisecret5678")
    for var in ("ATS_DISCORD_WEBHOOK_URL", "ATS_TELEGRAM_BOT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    bundle = tmp_path / "bundle"
    bundle.mkdir()  # no loadable bundle: V1 decides every bar of both symbols (the reason recorded with each)
    (bundle / "manifest.json").write_text(json.dumps({"gate": {"verdict": "HOLD"}, "data": {"symbol": "BTCUSDT"}}))
    db = tmp_path / "t.sqlite"
    args = ["serve", "--mode", "testnet", "--symbols", "BTCUSDT,ETHUSDT", "--bundle", str(bundle), "--db", str(db),
            "--force-gate", "--max-bars", "1"]
    with two_symbol_fake() as fake:
        refused = runner.invoke(app, [*args, "--base-url", fake.url], env={"COLUMNS": "250"})
        assert refused.exit_code != 0 and "ETHUSDT" in refused.output and not db.exists()
        r = runner.invoke(app, [*args, "--base-url", fake.url, "--allow-transfer"], env={"COLUMNS": "250"})
        assert r.exit_code == 0, r.output
        assert "serving BTCUSDT,ETHUSDT" in r.output and "clikey1234" not in r.output
        store = StateStore.sqlite(db)
        d = store.decisions("testnet")
        assert d.groupby("symbol").size().to_dict() == {"BTCUSDT": 1, "ETHUSDT": 1}
        assert set(d["source"]) == {"v1"} and d["bar_open_time"].nunique() == 1
        assert len(store.account_equity("testnet")) == 1
        kinds = set(store.events("testnet")["kind"])
        assert {"transfer_allowed", "live_started", "live_stopped"} <= kinds
        store.close()
    status = runner.invoke(app, ["status", "--db", str(db)], env={"COLUMNS": "250"})
    assert status.exit_code == 0, status.output
    assert "BTCUSDT" in status.output and "ETHUSDT" in status.output and "account" in status.output.lower()



def test_symbols_with_a_replay_is_refused_not_ignored(tmp_path):
    """Paper on live candles serves ``--symbols`` (``tests/serving/test_paper_live_portfolio.py``); a paper replay
    takes one ``--replay`` per symbol and refuses ``--symbols`` rather than ignoring it."""
    from typer.testing import CliRunner

    from ats_cli.main import app

    r = CliRunner().invoke(app, ["serve", "--mode", "paper", "--symbols", "BTCUSDT,ETHUSDT", "--replay",
                                 str(tmp_path / "c.parquet"), "--bundle", str(tmp_path), "--db",
                                 str(tmp_path / "s.sqlite")], env={"COLUMNS": "250"})  # fmt: skip
    assert r.exit_code != 0 and "one --replay per symbol" in r.output
    assert not (tmp_path / "s.sqlite").exists()
