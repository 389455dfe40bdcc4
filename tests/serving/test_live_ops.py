"""Live loop operations on the fake Binance server: every bar has one decision (missed bars included),
the operator's accept-position command, and notifications (a failing webhook never stops the loop)."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from ats_cli.main import app
from market.decision import Decision
from serving.errors import RetryableError
from serving.exchange import BinanceFuturesBroker, make_client
from serving.live import MISSED_NO_STEP, LiveConfig, LiveLoop, fill_notices, missed_bars
from serving.notify import WebhookNotifier
from serving.status import read_status
from serving.store import ExchangeFillRecord, StateStore
from tests.kit.fake_binance import FakeBinance
from tests.serving.fakes import FlipPolicy, ScriptedFallback
from tests.serving.test_live import CANDLES, CONTEXT, FUNDING, LONG, T0, CountingPolicy, FakeGuard, Sleeps
from tests.serving.test_notify import _discord, _Server

H = 3_600_000
runner = CliRunner()
SHORT = Decision(direction=-1, leverage=2.0, size_frac=0.5)


@pytest.fixture
def fake():
    with FakeBinance(CANDLES, FUNDING, now_ms=T0) as server:
        yield server


class SimTime:
    """Monotonic clock and sleep that also move the exchange clock (no real waiting)."""

    def __init__(self, fake: FakeBinance) -> None:
        self.fake, self.t = fake, 0.0

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        self.fake.now_ms += int(seconds * 1000)


class RecordingNotifier:
    """Collects what the loop publishes; ``fail`` makes ``publish`` raise (it must never matter)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.kinds, self.fills, self.calls = fail, [], [], 0

    def publish(self, events, fills) -> None:
        self.calls += 1
        if self.fail:
            raise RuntimeError("notifier broken")
        self.kinds += [e.kind for e in events]
        self.fills += list(fills)

    def close(self, timeout_s: float = 5.0) -> None:
        pass


def _loop(fake, store, policy=None, *, notifier=None, guard=None, sim=None, **cfg):
    sleep = sim.sleep if sim is not None else Sleeps()
    client = make_client(api_key="k", secret="s", base_url=fake.url, timeout_ms=2_000, rate_limit=False)
    kw = {"monotonic_s": sim.monotonic} if sim is not None else {}
    return LiveLoop(BinanceFuturesBroker(client, read_attempts=3, sleep=sleep), store,
                    LiveConfig(context_bars=CONTEXT, **cfg), primary=policy or CountingPolicy(LONG),
                    fallback=ScriptedFallback(), guard=guard, wall_clock_s=lambda: fake.now_ms / 1000.0, sleep=sleep,
                    notifier=notifier, **kw)  # fmt: skip


def _raise(ctx):
    raise RuntimeError("model down")


def _bar(k: int) -> pd.Timestamp:
    """Open time of the bar closed k hours after T0's last closed bar."""
    return pd.Timestamp((T0 // H) * H - H + k * H, unit="ms", tz="UTC")


# -- every bar has exactly one decision --------------------------------------------------------


def test_missed_bars_is_the_gap_between_decisions():
    b = _bar(0)
    assert missed_bars(None, b, H) == []
    assert missed_bars(b - pd.Timedelta(hours=1), b, H) == []
    assert missed_bars(b, b, H) == []
    assert missed_bars(b - pd.Timedelta(hours=4), b, H) == [b - pd.Timedelta(hours=k) for k in (3, 2, 1)]


def test_bars_missed_while_the_process_was_down_are_recorded_on_restart(fake):
    store = StateStore("sqlite://")
    _loop(fake, store).step()  # bar 0: enters long
    fake.now_ms += 3 * H  # down for bars 1 and 2
    restarted = _loop(fake, store, CountingPolicy(LONG))
    assert restarted.step().source == "v2"  # bar 3
    d = store.decisions("live")
    assert list(d.bar_open_time) == [_bar(k) for k in range(4)]  # one row per bar, in order
    missed = d[d.source == "missed"]
    assert list(missed.bar_open_time) == [_bar(1), _bar(2)]
    assert (missed.fallback_reason == MISSED_NO_STEP).all()
    assert (missed.direction == 1).all()  # the long was left in place
    assert not any(f"-{int(_bar(k).timestamp())}-" in cid for cid in fake.orders_by_client_id() for k in (1, 2))
    ev = store.events("live")
    gap = ev[ev.kind == "bars_missed"].detail.tolist()
    assert gap == [{"first": str(_bar(1)), "last": str(_bar(2)), "count": 2, "failed_in_process": 0,
                    "position_side": 1, "symbol": "BTCUSDT"}]  # fmt: skip
    restarted.step()  # same bar again: nothing more recorded
    assert len(store.decisions("live")) == 4
    s = read_status(store)
    assert s.decided_missed == 2 and s.share("missed") == pytest.approx(0.5)


def test_a_bar_whose_steps_fail_until_the_next_close_is_recorded_missed_with_the_error(fake):
    store, sim = StateStore("sqlite://"), SimTime(fake)
    loop = _loop(fake, store, sim=sim, step_retry_initial_s=60.0, step_retry_max_s=600.0)
    loop.step()  # bar 0
    fake.now_ms += H  # bar 1 closes; its candles cannot be fetched until bar 2 has closed too
    real = loop.broker.fetch_ohlcv

    def fetch(*args, **kwargs):
        if loop._attempt_bar == _bar(1):
            raise RetryableError("exchange 503 on klines")
        return real(*args, **kwargs)

    loop.broker.fetch_ohlcv = fetch
    assert loop.run(max_steps=1, install_signal_handlers=False) == 1
    d = store.decisions("live").set_index("bar_open_time")
    assert list(d.index) == [_bar(0), _bar(1), _bar(2)]
    assert d.loc[_bar(1), "source"] == "missed" and d.loc[_bar(2), "source"] == "v2"
    reason = d.loc[_bar(1), "fallback_reason"]
    n_failed = int((store.events("live").kind == "step_failed").sum())
    assert n_failed >= 2 and reason.startswith(
        f"missed: every attempt to process this bar failed before its decision was recorded ({n_failed} attempts")
    assert "RetryableError: exchange 503 on klines" in reason
    ev = store.events("live")
    assert ev[ev.kind == "bars_missed"].detail.iloc[0]["failed_in_process"] == 1


# -- operator: accept the exchange position -----------------------------------------------------


def test_accept_position_command_lets_the_loop_adopt_the_exchange_position(fake, tmp_path):
    db = tmp_path / "state.sqlite"
    store = StateStore.sqlite(db)
    r = runner.invoke(app, ["serve", "accept-position", "--db", str(db), "--note", "alice"])
    assert r.exit_code == 2 and "nothing to accept" in r.output  # nothing is blocked yet
    fake.set_position(0.3, 29_000.0)  # opened by hand on the exchange
    policy = CountingPolicy(SHORT)
    assert "position_unreconciled" in _loop(fake, store, policy).step().entries_blocked
    assert fake.orders_by_client_id() == {}
    r = runner.invoke(app, ["serve", "accept-position", "--db", str(db), "--note", "  "])
    assert r.exit_code == 2 and "note" in r.output
    r = runner.invoke(app, ["serve", "accept-position", "--db", str(db), "--symbol", "BTC/USDT:USDT",
                            "--note", "alice: manual long is ours now"])
    assert r.exit_code == 0, r.output
    assert store.position_blocked("BTCUSDT")  # nothing changes until the loop applies it
    fake.now_ms += H
    result = _loop(fake, store, policy).step()  # next start: adopted, and this bar trades
    assert result.entries_blocked == () and fake.position()[0] < 0
    ev = store.events("live")
    accepted = ev[ev.kind == "position_accepted"].detail.tolist()
    assert len(accepted) == 1 and accepted[0]["note"] == "alice: manual long is ours now"
    assert accepted[0]["signed_qty"] == pytest.approx(0.3) and accepted[0]["seen_signed_qty"] == pytest.approx(0.3)
    assert not store.position_blocked("BTCUSDT")


def test_an_accept_request_never_adopts_a_later_discrepancy(fake):
    store = StateStore("sqlite://")
    fake.set_position(0.3, 29_000.0)
    loop = _loop(fake, store, CountingPolicy(Decision.flat()))
    loop.step()
    store.request_position_accept("BTCUSDT", "bob", _bar(0))
    loop.reset_position_baseline()  # resolved another way before the loop saw the request
    assert store.pending_position_accept("BTCUSDT") is None
    fake.set_position(0.5, 29_000.0)  # a new, different discrepancy
    fake.now_ms += H
    assert "position_unreconciled" in loop.step().entries_blocked
    assert store.pending_position_accept("BTCUSDT") is None and store.position_blocked("BTCUSDT")
    with pytest.raises(ValueError, match="note"):
        store.request_position_accept("BTCUSDT", " ", _bar(0))
    with pytest.raises(ValueError, match="not unreconciled"):
        store.request_position_accept("ETHUSDT", "x", _bar(0))


# -- notifications -------------------------------------------------------------------------------


def test_fallback_bookkeeping_is_the_paper_loops_one_event_each_way(fake):
    """serving.choice.FallbackLedger, shared with the paper loop: one fallback_engaged when V1 takes
    over (none when the reason changes from exception to backoff), one primary_recovered after."""
    store = StateStore("sqlite://")
    policy = CountingPolicy(Decision.flat())
    loop = _loop(fake, store, policy)
    loop.step()
    policy.decide = _raise  # the bundle fails once: V1 decides, then the slot backs off
    fake.now_ms += H
    loop.step()
    del policy.decide
    for _ in range(4):
        fake.now_ms += H
        loop.step()
    d = store.decisions("live")
    assert list(d.source) == ["v2", "v1", "v1", "v2", "v2", "v2"]
    assert [r.split(":")[0] for r in d.fallback_reason[1:3]] == ["exception", "backoff"]
    ev = store.events("live")
    assert list(ev[ev.kind.isin(["fallback_engaged", "primary_recovered"])].kind) == [
        "fallback_engaged", "primary_recovered"]
    assert ev[ev.kind == "primary_recovered"].detail.iloc[0] == {"previous_reason_kind": "backoff"}
    assert loop.fallback_ledger.reasons == {"exception": 1, "backoff": 1}


def test_live_loop_notifies_entries_exits_fallbacks_kill_switches_and_errors(fake):
    store, sim, notifier = StateStore("sqlite://"), SimTime(fake), RecordingNotifier()
    policy = CountingPolicy(LONG)
    guard = FakeGuard()
    loop = _loop(fake, store, policy, notifier=notifier, guard=guard, sim=sim)
    loop.step()  # entry
    assert [f.reason for f in notifier.fills] == ["entry"] and "live_started" in notifier.kinds
    fake.now_ms += H
    policy.decision = Decision.flat()
    loop.step()  # exit
    assert [f.reason for f in notifier.fills] == ["entry", "exit"]
    fake.now_ms += H
    policy.decide = _raise  # the bundle fails: V1 decides
    guard.state = "HALTED"  # a kill switch trips
    loop.step()
    assert {"fallback_engaged", "risk_state_changed"} <= set(notifier.kinds)
    real, calls = loop.step, {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] <= 3:
            raise RetryableError("exchange 502")
        return real()

    loop.step = failing_step
    fake.now_ms += H
    assert loop.run(max_steps=1, install_signal_handlers=False) == 1
    assert notifier.kinds.count("step_failed") == 1  # the first of a streak only
    assert notifier.kinds[-1] == "live_stopped"
    published = [k for k in store.events("live").kind if k != "step_failed"] + ["step_failed"]
    assert sorted(notifier.kinds) == sorted(published)  # every event once, none twice


def test_a_notifier_that_raises_never_stops_the_loop(fake):
    store, notifier = StateStore("sqlite://"), RecordingNotifier(fail=True)
    loop = _loop(fake, store, FlipPolicy(), notifier=notifier)  # trades every bar
    for _ in range(3):
        assert loop.step().bar_open_time is not None
        fake.now_ms += H
    assert notifier.calls == 3 and len(store.decisions("live")) == 3 and fake.position()[0] != 0


@pytest.fixture(params=["500", "ok"])
def webhook(request):
    s = _Server(request.param)
    yield s
    s.close()


def test_live_loop_with_a_real_webhook(fake, webhook):
    server = webhook
    store = StateStore("sqlite://")
    notifier = WebhookNotifier(_discord(server.url, timeout_s=0.5))
    loop = _loop(fake, store, notifier=notifier)
    for _ in range(2):
        assert loop.step().bar_open_time is not None
        fake.now_ms += H
    notifier.close(timeout_s=3.0)
    assert len(store.decisions("live")) == 2 and fake.position()[0] > 0
    if server.mode == "500":
        assert notifier.sent == 0 and notifier.failed >= 2
    else:
        texts = [b["content"] for b in server.bodies]
        assert any("live_started" in t for t in texts)
        assert any(": entry buy " in t for t in texts)


def test_fill_notices_name_the_intent_kind():
    t = _bar(0)
    rows = [ExchangeFillRecord("live", "BTCUSDT", 1, "9", f"ats-BTCUSDT-{int(t.timestamp())}-entry", 1, 0.1, 30_000.0,
                               0.1, 0.0, t),
            ExchangeFillRecord("live", "BTCUSDT", 2, "10", f"ats-BTCUSDT-{int(t.timestamp())}-stop", -1, 0.1, 29_000.0,
                               0.1, -100.0, t),
            ExchangeFillRecord("live", "BTCUSDT", 3, "11", None, 1, 0.2, 29_500.0, 0.1, 0.0, t)]  # fmt: skip
    assert [f.reason for f in fill_notices(rows)] == ["entry", "stop", "external"]
