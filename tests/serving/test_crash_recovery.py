"""kill -9 of the live serving process at each named crash point, then restart: no duplicate order,
local position == exchange position, trading resumes within one bar.

The fake exchange runs in this (test) process; the live loop runs in a child process whose
injected crash points (:class:`serving.crash.KillAt`) make it SIGKILL itself at the named point
while it processes a reversal bar (exit, entry, stop, take-profit). The restarted loop (a second
child process for one case, a fresh loop object on a fresh store connection for the others) must
then finish that bar, and one more bar is decided to show that trading resumed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from serving.exchange import BinanceFuturesBroker, make_client
from serving.live import LiveConfig, LiveLoop
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.kit.fake_binance import ORDER, FakeBinance, Fault, assert_consistent
from tests.serving.fakes import FlipPolicy, ScriptedFallback

REPO = Path(__file__).resolve().parents[2]
H = 3_600_000
CANDLES = make_candles(1_400, seed=1)
FUNDING = CANDLES["funding_rate"].dropna()
T0 = int(CANDLES.index[1_100].value // 1_000_000) + 60_000
CONTEXT = 1_010  # the demo bundle's context (ccxt pages it: 1,000 klines a request)

CHILD = """
import sys
from serving.crash import NO_CRASH, KillAt
from serving.exchange import BinanceFuturesBroker, make_client
from serving.live import LiveConfig, LiveLoop
from serving.store import StateStore
from tests.serving.fakes import FlipPolicy, ScriptedFallback

url, db, steps, crash = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
client = make_client(api_key="k", secret="s", base_url=url, timeout_ms=3000, rate_limit=False)
broker = BinanceFuturesBroker(client, read_attempts=3, sleep=lambda s: None)
loop = LiveLoop(broker, StateStore.sqlite(db), LiveConfig(context_bars=CONTEXT), primary=FlipPolicy(),
                fallback=ScriptedFallback(), wall_clock_s=lambda: client.fetch_time() / 1000.0,
                crash_points=KillAt.parse(crash) if crash else NO_CRASH)
done = loop.run(max_steps=steps, poll_s=0.02)
print("done", done)
""".replace("CONTEXT", str(CONTEXT))


def _child(fake: FakeBinance, db: Path, tmp: Path, crash: str | None, steps: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", CHILD, fake.url, str(db), str(steps), crash or ""], cwd=REPO,
                          env=env, check=False, capture_output=True, text=True, timeout=60)


def _loop(fake: FakeBinance, db: Path) -> tuple[LiveLoop, StateStore]:
    client = make_client(api_key="k", secret="s", base_url=fake.url, timeout_ms=3000, rate_limit=False)
    store = StateStore.sqlite(db)
    loop = LiveLoop(BinanceFuturesBroker(client, read_attempts=3, sleep=lambda s: None), store,
                    LiveConfig(context_bars=CONTEXT), primary=FlipPolicy(), fallback=ScriptedFallback(),
                    wall_clock_s=lambda: fake.now_ms / 1000.0)
    return loop, store




@pytest.mark.parametrize("crash", [
    "after_intent_written",
    "after_send",        # the exit was accepted, its answer never recorded
    "after_send:3",      # the new stop was accepted, its answer never recorded
    "after_ack",
    "after_fill",        # the exit filled, the entry not yet sent
    "after_fill:2",      # the entry filled, its stop/take-profit not yet written
    "during_reconciliation",
    "after_fill:2+partial",  # the exit filled only in part, the entry filled, then kill -9
])  # fmt: skip
def test_kill9_at_crash_point_then_restart(tmp_path, crash):
    db = tmp_path / "state.sqlite"
    with FakeBinance(CANDLES, FUNDING, now_ms=T0) as fake:
        loop, store = _loop(fake, db)
        first = loop.step()  # bar B0: flat -> position with stop and take-profit
        assert first.sent and fake.position()[0] != 0
        store.close()
        fake.now_ms += H  # bar B1 closes: FlipPolicy reverses (exit, entry, stop, tp)

        partial = crash.endswith("+partial")
        if partial:
            crash = crash.removesuffix("+partial")
            fake.add_fault(f"POST {ORDER}", Fault("partial_fill", fill_ratio=0.6))
        died = _child(fake, db, tmp_path, crash)
        assert died.returncode == -signal.SIGKILL, (died.returncode, died.stdout, died.stderr[-3000:])

        # restart (a new process for one case, a fresh loop in this process for the others: nothing
        # in memory survives either way): it must finish bar B1 without duplicates
        if crash == "after_send":
            again = _child(fake, db, tmp_path, None)
            assert again.returncode == 0, again.stderr[-3000:]
            loop, store = _loop(fake, db)
        else:
            loop, store = _loop(fake, db)
            assert loop.step().bar_open_time == first.bar_open_time + pd.Timedelta(hours=1)
        assert_consistent(fake, store)
        b1 = first.bar_open_time + pd.Timedelta(hours=1)
        decisions = store.decisions("live")
        assert list(decisions["bar_open_time"]) == [first.bar_open_time, b1]  # one decision per bar
        intents = store.bar_intents("live", b1)
        assert {i.kind for i in intents} == {"exit", "entry", "stop", "tp"}
        assert all(i.status in ("filled", "acked") for i in intents), [(i.kind, i.status) for i in intents]
        open_protective = [a for a in fake.trading.algo_orders if a["algoStatus"] == "NEW"]
        assert sorted(a["clientAlgoId"].rsplit("-", 1)[1] for a in open_protective) == ["stop", "tp"]
        assert all(a["clientAlgoId"].split("-")[2] == str(int(b1.timestamp())) for a in open_protective)

        if partial:
            expired = [o for o in fake.trading.orders if o["status"] == "EXPIRED"]
            assert len(expired) == 1 and 0 < float(expired[0]["executedQty"]) < float(expired[0]["origQty"])

        fake.now_ms += H  # trading resumes within one bar
        resumed = loop.step()
        assert resumed.bar_open_time == b1 + pd.Timedelta(hours=1) and resumed.sent
        assert_consistent(fake, store)
        store.close()


def test_unknown_crash_point_is_an_error():
    from serving.crash import NO_CRASH, KillAt

    with pytest.raises(ValueError, match="unknown crash point"):
        NO_CRASH.hit("after_lunch")
    with pytest.raises(ValueError, match="unknown crash point"):
        KillAt.parse("after_lunch:2")


def test_kill_at_fires_only_at_the_nth_pass_of_its_point(monkeypatch):
    from serving import crash

    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(crash.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    points = crash.KillAt.parse("after_fill:2")
    points.hit("after_send")
    points.hit("after_fill")
    assert kills == []
    points.hit("after_send")
    points.hit("after_fill")
    assert kills == [(os.getpid(), signal.SIGKILL)]
