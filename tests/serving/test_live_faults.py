"""The live loop against the faults an outside crash sweep found on Binance (issue 17).

Each test drives the real ccxt client against the local fake exchange with one fault Binance
really produces: a malformed HTTP 200 answer, a take-profit that fills between two reads, a
malformed trade record, an accepted order that order queries do not show for a while (-2013),
a stop that fills while the process is down, an error between a bar's orders and its equity row,
and a 5xx whose error text quotes the signed request URL.
"""

from __future__ import annotations

import pytest

from market.decision import Decision, StatelessPolicy
from serving.errors import MalformedResponseError
from serving.exchange import BinanceFuturesBroker, make_client, trade_fill
from serving.live import LiveConfig, LiveLoop
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.kit.fake_binance import ORDER, FakeBinance, Fault, assert_consistent
from tests.serving.fakes import ScriptedFallback

H = 3_600_000
CANDLES = make_candles(1_400, seed=1)
FUNDING = CANDLES["funding_rate"].dropna()
T0 = int(CANDLES.index[1_100].value // 1_000_000) + 60_000
CONTEXT = 1_010  # the demo bundle's context (ccxt pages it: 1,000 klines a request)
POSITION_RISK = "/fapi/v3/positionRisk"
USER_TRADES = "/fapi/v1/userTrades"
LONG = Decision(direction=1, leverage=3.0, size_frac=0.5, stop_atr=1.0, take_profit_atr=2.0)


class Fixed(StatelessPolicy):
    """A policy answering a fixed (settable) decision."""

    name = "v2"

    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    def decide(self, ctx):
        return self.decision


class ExchangeClock:
    """Sleeps move the fake exchange's clock (and so the loop's wall clock): a wait inside a bar lets
    the exchange's query lag run out, as real time would."""

    def __init__(self, fake: FakeBinance) -> None:
        self.fake, self.sleeps, self.t = fake, [], 0.0

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
        self.fake.now_ms += round(seconds * 1000)

    def monotonic(self) -> float:
        return self.t


@pytest.fixture
def fake():
    with FakeBinance(CANDLES, FUNDING, now_ms=T0) as server:
        yield server


def _loop(fake, policy, *, store=None, timeout_ms=2_000, **cfg):
    clock = ExchangeClock(fake)
    client = make_client(api_key="k", secret="s", base_url=fake.url, timeout_ms=timeout_ms, rate_limit=False)
    broker = BinanceFuturesBroker(client, read_attempts=3, sleep=clock.sleep)
    store = store or StateStore("sqlite://")
    loop = LiveLoop(broker, store, LiveConfig(context_bars=CONTEXT, **cfg), primary=policy,
                    fallback=ScriptedFallback(), wall_clock_s=lambda: fake.now_ms / 1000.0,
                    monotonic_s=clock.monotonic, sleep=clock.sleep)
    return loop, store, clock


def _next_bar(fake):
    """Move to 60 s after the next bar's open (conditional orders of the bar that closed trigger)."""
    fake.now_ms = (fake.now_ms // H + 1) * H + 60_000




def _open_protection(fake):
    return {a["orderType"]: a["clientAlgoId"] for a in fake.trading.algo_orders if a["algoStatus"] == "NEW"}


def _kinds(store):
    return list(store.events()["kind"])


# -- finding 2: a malformed positionRisk answer is unknown, never flat --------------------------------


@pytest.mark.parametrize("kind", ["truncated_json", "empty_body"])
def test_one_malformed_position_answer_keeps_protection_and_trading(fake, kind):
    loop, store, _ = _loop(fake, Fixed(LONG))
    loop.step()
    protection = _open_protection(fake)
    assert fake.position()[0] > 0 and set(protection) == {"STOP_MARKET", "TAKE_PROFIT_MARKET"}
    _next_bar(fake)
    fake.add_fault(POSITION_RISK, Fault(kind))
    result = loop.step()
    assert result.source == "v2" and result.entries_blocked == ()
    assert _open_protection(fake) == protection  # nothing cancelled as an "orphan"
    kinds = _kinds(store)
    assert "orphan_order_cancelled" not in kinds and "position_unreconciled" not in kinds
    assert_consistent(fake, store)


def test_a_position_read_malformed_on_every_try_holds_the_bar_and_keeps_protection(fake):
    loop, store, _ = _loop(fake, Fixed(LONG))
    loop.step()
    protection = _open_protection(fake)
    _next_bar(fake)
    fake.add_fault(POSITION_RISK, Fault("truncated_json"), times=3)  # every read attempt of the broker
    with pytest.raises(MalformedResponseError, match="positionRisk"):
        loop.step()
    assert _open_protection(fake) == protection and fake.position()[0] > 0
    assert "position_unreconciled" not in _kinds(store)
    assert loop.step().source == "v2"  # the next attempt of the same bar decides it
    assert_consistent(fake, store)


# -- finding 3: a take-profit filling between the trades read and the position read -----------------


def test_take_profit_filling_between_the_two_reads_does_not_block_trading(fake):
    policy = Fixed(LONG)
    loop, store, _ = _loop(fake, policy)
    loop.step()
    tp = _open_protection(fake)["TAKE_PROFIT_MARKET"]
    _next_bar(fake)
    # userTrades is read first; the take-profit fills just before positionRisk answers
    fake.add_fault(POSITION_RISK, Fault("before", action=lambda: fake.trigger_now(tp)))
    result = loop.step()
    assert "position_unreconciled" not in _kinds(store)
    assert "position_read_again" in _kinds(store)
    assert result.entries_blocked == () and fake.position()[0] > 0  # flat after the TP, long again
    fills = store.exchange_fills("BTCUSDT")
    assert tp in set(fills["client_id"])  # the take-profit's trade is ours, linked by its actualOrderId
    assert store.intent_status(tp) == "filled"
    assert_consistent(fake, store)


def test_a_confirmed_mismatch_clears_when_a_later_read_agrees(fake):
    loop, store, _ = _loop(fake, Fixed(LONG), reconcile_reads=1)
    loop.step()
    tp = _open_protection(fake)["TAKE_PROFIT_MARKET"]
    _next_bar(fake)
    fake.add_fault(POSITION_RISK, Fault("before", action=lambda: fake.trigger_now(tp)))
    loop.reconcile(None)  # one read only: the race is confirmed as a mismatch
    assert store.position_blocked("BTCUSDT")
    loop.step()  # the next read sees the take-profit's trade: agreed again, no operator needed
    assert "position_reconciled" in _kinds(store)
    assert not store.position_blocked("BTCUSDT") and fake.position()[0] > 0
    assert_consistent(fake, store)


def test_an_external_position_stays_unreconciled_until_accepted(fake):
    fake.set_position(0.3, 29_000.0)
    loop, _store, _ = _loop(fake, Fixed(LONG))
    assert "position_unreconciled" in loop.step().entries_blocked
    _next_bar(fake)
    assert "position_unreconciled" in loop.step().entries_blocked  # agreement never comes by itself
    assert fake.orders_by_client_id() == {}


# -- finding 4: a malformed trade record -----------------------------------------------------------


def _null_first_id(body):
    if body:
        body[0]["id"] = None
    return body


def test_trade_record_without_id_is_a_typed_error_with_the_record():
    with pytest.raises(MalformedResponseError, match="'id'") as err:
        trade_fill({"id": None, "order": "1", "side": "buy", "amount": 0.1, "price": 100.0, "timestamp": 1})
    assert "'order': '1'" in err.value.raw
    for bad in ({"side": "long"}, {"amount": "nan"}, {"price": 0}, {"order": None}, {"timestamp": "x"}):
        record = {"id": 7, "order": "1", "side": "buy", "amount": 0.1, "price": 100.0, "timestamp": 1, **bad}
        with pytest.raises(MalformedResponseError):
            trade_fill(record)


def test_a_malformed_trade_record_is_retried_and_never_halts_entries(fake):
    policy = Fixed(LONG)
    loop, store, _ = _loop(fake, policy)
    loop.step()
    _next_bar(fake)
    policy.decision = Decision(direction=-1, leverage=2.0, size_frac=0.5)
    fake.add_fault(USER_TRADES, Fault("mutate", transform=_null_first_id), times=3)  # every read attempt
    assert loop.run(max_steps=1, install_signal_handlers=False) == 1
    ev = store.events()
    failed = ev[ev.kind == "step_failed"].detail.tolist()
    assert failed and "MalformedResponseError" in failed[0]["error"] and "'id': None" in failed[0]["error"]
    assert "internal_error" not in set(ev.kind) and loop.internal_error is None
    assert fake.position()[0] < 0  # the bar was decided on the retry and the reversal traded
    assert_consistent(fake, store)


# -- finding 5: an accepted order invisible to lookups (Binance -2013 query lag) ---------------------


@pytest.mark.parametrize("lag_s", [2, 5, 20, 45, 300])
def test_no_duplicate_market_order_whatever_the_query_lag(fake, lag_s):
    fake.query_lag_ms = lag_s * 1000
    loop, store, _clock = _loop(fake, Fixed(LONG), timeout_ms=400)
    fake.add_fault(f"POST {ORDER}", Fault("accept_then_delay", delay_s=1.0))  # accepted, answer too late
    bar_end = (fake.now_ms // H + 1) * H
    assert loop.run(max_steps=1, install_signal_handlers=False) == 1
    entry = next(o for o in fake.trading.orders if o["clientOrderId"].endswith("-entry"))
    assert fake.count(f"POST {ORDER}") == 1, "the accepted entry was sent again"
    assert fake.position()[0] == pytest.approx(float(entry["origQty"]))
    if lag_s > loop.config.create_settle_s:
        assert "resend_withheld" in _kinds(store)  # its trade proved it executed: held, not re-sent
    # found once the lag ran out, still within its bar, and protected there (not a bar later)
    assert store.intent_status(entry["clientOrderId"]) == "filled"
    stop = next(a for a in fake.trading.algo_orders if a["orderType"] == "STOP_MARKET")
    assert stop["createTime"] < bar_end
    _next_bar(fake)
    loop.step()
    assert fake.count(f"POST {ORDER}") == 1
    assert_consistent(fake, store)


def test_an_ambiguous_create_that_never_arrived_is_resent_once_after_the_settle_time(fake):
    fake.query_lag_ms = 10_000
    loop, store, clock = _loop(fake, Fixed(LONG))
    fake.add_fault(f"POST {ORDER}", Fault("html_5xx"))  # refused before the matching engine
    loop.step()
    assert fake.count(f"POST {ORDER}") == 2 and fake.position()[0] > 0  # resent exactly once
    assert sum(clock.sleeps) >= loop.config.create_settle_s  # not before the settle time
    assert_consistent(fake, store)


# -- finding 6: equity row, missed rows' side, protective fills, signed URLs ------------------------


def _fail_finish_once(loop):
    real, calls = loop._finish, {"n": 0}

    def finish(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("process died here")
        return real(*args, **kwargs)

    loop._finish = finish


def test_a_bar_stopped_before_its_equity_row_gets_one_on_resume(fake):
    loop, store, _ = _loop(fake, Fixed(LONG))
    _fail_finish_once(loop)
    with pytest.raises(ConnectionError):
        loop.step()
    bar = store.last_decision_bar("live")
    assert not store.has_equity("live", bar) and fake.position()[0] > 0
    assert loop.step().bar_open_time is None  # nothing left to send
    assert store.has_equity("live", bar)


def test_a_passed_bar_without_equity_row_is_recorded_late_with_an_event(fake):
    loop, store, _ = _loop(fake, Fixed(LONG))
    _fail_finish_once(loop)
    with pytest.raises(ConnectionError):
        loop.step()
    bar = store.last_decision_bar("live")
    _next_bar(fake)
    loop.step()
    assert store.has_equity("live", bar)
    late = store.events().query("kind == 'equity_recorded_late'").detail.tolist()
    assert late and late[0]["bar"] == str(bar)


def test_missed_rows_carry_the_reconciled_side_and_stop_fills_are_linked(fake):
    loop, store, _ = _loop(fake, Fixed(LONG))
    loop.step()
    stop = _open_protection(fake)["STOP_MARKET"]
    fake.trigger_now(stop)  # the stop fills; then the process is down for three bars
    for _ in range(3):
        _next_bar(fake)
    loop.slot.policy.decision = Decision.flat()
    loop.step()
    d = store.decisions("live")
    missed = d[d["source"] == "missed"]
    assert len(missed) == 2 and set(missed["direction"]) == {0}  # flat: the stop closed it
    fills = store.exchange_fills("BTCUSDT")
    assert stop in set(fills["client_id"]) and fills["client_id"].notna().all()
    assert store.intent_status(stop) == "filled"
    tp = next(c for c in store.intents("live")["client_id"] if c.endswith("-tp"))
    assert store.intent_status(tp) != "acked"  # resolved, not acked forever
    assert_consistent(fake, store)


def test_recorded_errors_never_keep_the_signed_request_url(fake):
    loop, store, _ = _loop(fake, Fixed(LONG))
    fake.add_fault(POSITION_RISK, Fault("html_5xx"), times=3)  # every read attempt of one step
    assert loop.run(max_steps=1, install_signal_handlers=False) == 1
    ev = store.events()
    failed = ev[ev.kind == "step_failed"].detail.tolist()
    assert failed and "positionRisk" in failed[0]["error"]
    text = " ".join(str(d) for d in ev.detail)
    assert "signature=" not in text and "timestamp=" not in text
    assert "<query removed>" in failed[0]["error"]


def test_unresolved_protective_lookup_is_not_needed_for_a_resting_stop(fake):
    """A resting (open) stop is never looked up one by one: reconciliation lists open orders only."""
    loop, store, _ = _loop(fake, Fixed(LONG))
    loop.step()
    _next_bar(fake)
    before = fake.count("/fapi/v1/algoOrder")
    loop.step()
    assert fake.count("/fapi/v1/algoOrder") == before
    assert store.intent_status(_open_protection(fake)["STOP_MARKET"]) == "acked"
