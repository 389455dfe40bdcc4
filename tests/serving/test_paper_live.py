"""Paper serving on live candles against the fake Binance server (real ccxt client, no keys, no sleeps)."""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pandas as pd
import pytest

from envs.config import CostConfig
from market.decision import Decision, DecisionContext, StatelessPolicy
from serving.errors import FatalError
from serving.exchange import BinanceFuturesBroker, make_client
from serving.hotswap import BackoffConfig
from serving.loop import ServeConfig, row_problems, run_replay
from serving.paper_live import FeedConfig, PaperLiveLoop, _last_atr, parse_page
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.kit.fake_binance import KLINES, FakeBinance, Fault
from tests.serving.fakes import FlipPolicy, ScriptedFallback

H = 3_600_000
CANDLES = make_candles(300, seed=7)
FUNDING = CANDLES["funding_rate"].dropna()
FIRST = 99  # the last closed bar at T0
T0 = int(CANDLES.index[FIRST + 1].value // 1_000_000) + 60_000  # one minute into bar 100
CONTEXT = 40
COLS = ["open", "high", "low", "close", "volume"]
COSTS = CostConfig()
LONG = Decision(direction=1, leverage=3.0, size_frac=0.5, stop_atr=1.0, take_profit_atr=2.0)


class SeeingPolicy(StatelessPolicy):
    """Answers a fixed decision and records every context (asserting nothing invalid reaches it)."""

    name = "v2"

    def __init__(self, decision: Decision = LONG) -> None:
        self.decision = decision
        self.contexts: list[DecisionContext] = []

    def decide(self, ctx: DecisionContext) -> Decision:
        self.contexts.append(ctx)
        assert all(p is None for p in row_problems(ctx.candles))
        return self.decision


class FakeTime:
    """Wall and monotonic clock of a test: the fake exchange's clock; sleeping moves it (no real sleep)."""

    def __init__(self, fake: FakeBinance, on_sleep=None) -> None:
        self.fake, self.on_sleep, self.slept = fake, on_sleep, 0.0

    def __call__(self) -> float:
        return self.fake.now_ms / 1000.0

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.fake.now_ms += round(seconds * 1000)
        if self.on_sleep is not None:
            self.on_sleep(seconds)


@pytest.fixture
def fake():
    with FakeBinance(CANDLES, FUNDING, now_ms=T0) as server:
        yield server


def _loop(fake, policy=None, *, store=None, context=CONTEXT, clock=None, **feed):
    client = make_client(api_key=None, secret=None, sandbox=False, base_url=fake.url, timeout_ms=2_000,
                         rate_limit=False)  # fmt: skip
    source = BinanceFuturesBroker(client, read_attempts=2, sleep=lambda s: None)
    store = store if store is not None else StateStore("sqlite://")
    config = ServeConfig(run_id="p", context_bars=context, primary_backoff=BackoffConfig(initial_bars=0))
    clock = clock or FakeTime(fake)
    loop = PaperLiveLoop(source, store, config, FeedConfig(**feed), primary=policy or SeeingPolicy(),
                         fallback=ScriptedFallback(), costs=COSTS, wall_clock_s=clock, monotonic_s=clock,
                         sleep=clock.sleep)  # fmt: skip
    return loop, store


def _bar(i: int) -> pd.Timestamp:
    return CANDLES.index[i]


def test_each_closed_bar_gets_one_decision_and_no_policy_sees_the_open_bar(fake):
    policy = SeeingPolicy()
    loop, store = _loop(fake, policy)
    for _ in range(4):
        assert [r.source for r in loop.step()] == ["v2"]
        assert loop.step() == []  # same bar again: nothing new
        fake.now_ms += H
    d = store.decisions("p")
    assert list(d.bar_open_time) == [_bar(i) for i in range(FIRST, FIRST + 4)]
    assert list(store.equity("p").bar_open_time) == list(d.bar_open_time)
    for ctx in policy.contexts:
        window = ctx.candles
        assert window.index[-1] == ctx.bar_open_time and len(window) == CONTEXT
        # the final (closed) values, never the still-open bar's partial ones
        assert np.array_equal(window[COLS].to_numpy(), CANDLES.loc[window.index, COLS].to_numpy())
        assert (window.index[1:] - window.index[:-1] == pd.Timedelta(hours=1)).all()
        assert "funding_rate" in window.columns
    assert len(store.fills("p")) >= 1 and loop.summary().decisions_v2 == 4


def test_nan_candle_is_quarantined_and_never_reaches_a_policy(fake):
    policy = SeeingPolicy()
    loop, store = _loop(fake, policy)
    loop.step()
    fake.now_ms += H
    fake.add_fault(KLINES, Fault("nan_close"), times=2)  # the bar to decide has close "NaN", also when re-read
    (row,) = loop.step()
    assert row.source == "guard" and row.fallback_reason.startswith("quarantine: non-finite price")
    assert len(policy.contexts) == 1
    events = store.events("p")
    assert "quarantine" in set(events.kind)
    fake.now_ms += H
    (row,) = loop.step()  # the refresh re-reads that bar, now served corrected: the window is clean again
    assert row.source == "v2" and len(policy.contexts) == 2
    assert np.array_equal(policy.contexts[-1].candles[COLS].to_numpy(), CANDLES.iloc[FIRST - CONTEXT + 3 : FIRST + 3][
        COLS].to_numpy())  # fmt: skip


def test_a_nan_candle_served_once_is_read_again_and_decided(fake):
    policy = SeeingPolicy()
    loop, store = _loop(fake, policy)
    fake.add_fault(KLINES, Fault("nan_close"))  # only the first answer holds the NaN
    (row,) = loop.step()
    assert row.source == "v2" and len(policy.contexts) == 1 and fake.count(KLINES) == 2
    assert "quarantine" not in set(store.events("p").kind)


def test_gap_in_the_window_holds_the_bar_but_the_broker_still_runs(fake):
    policy = SeeingPolicy()
    loop, store = _loop(fake, policy)
    fake.drop_candle(int(_bar(FIRST - 10).value // 1_000_000))  # the exchange serves no candle there
    (row,) = loop.step()
    assert row.source == "guard" and row.fallback_reason.startswith("quarantine_window: the context window lacks 1")
    assert policy.contexts == [] and "context_window_invalid" in set(store.events("p").kind)
    assert len(store.equity("p")) == 1


@pytest.mark.parametrize("hold", [0, 2])
def test_invalid_row_in_the_exchange_history_holds_bars_then_is_repaired_as_a_gap(hold):
    # superseded the old rule "held until the row leaves the window (context_bars bars)"
    bad = FIRST - 5
    candles = CANDLES.copy()
    candles.iloc[bad, candles.columns.get_loc("close")] = math.nan
    context = 20
    with FakeBinance(candles, FUNDING, now_ms=T0) as fake:
        policy = SeeingPolicy()
        loop, store = _loop(fake, policy, context=context, bad_candle_hold_bars=hold)
        for _ in range(4):
            loop.step()
            fake.now_ms += H
    d = store.decisions("p").set_index("bar_open_time")
    assert list(d.source) == ["guard"] * hold + ["v2"] * (4 - hold)
    assert d.fallback_reason.iloc[:hold].str.startswith("quarantine_window: the context window holds the invalid "
                                                        f"row {_bar(bad)}").all()  # fmt: skip
    ev = store.events("p")
    (repaired,) = ev.detail[ev.kind == "candle_repaired"]
    assert repaired["bar"] == str(_bar(bad)) and math.isnan(repaired["original"]["close"])  # stored "NaN", read back
    prev_close = float(CANDLES.close.iloc[bad - 1])
    assert repaired["repaired"] == {"open": prev_close, "high": prev_close, "low": prev_close, "close": prev_close,
                                    "volume": 0.0}  # fmt: skip
    window = policy.contexts[0].candles
    assert window.loc[_bar(bad), "is_gap"] == 1.0 and window["is_gap"].sum() == 1.0
    assert (ev.kind == "context_window_invalid").sum() == (1 if hold else 0)


def test_missed_bars_are_recorded_and_their_candles_still_fill(fake):
    loop, store = _loop(fake, SeeingPolicy(LONG))
    loop.step()  # long decided at the close of bar 99: fills at the open of bar 100
    fake.now_ms += 3 * H  # bars 100 and 101 close while nobody polls
    rows = loop.step()
    assert [(r.bar_open_time, r.source) for r in rows] == [
        (_bar(FIRST + 1), "missed"), (_bar(FIRST + 2), "missed"), (_bar(FIRST + 3), "v2")]
    assert rows[0].direction == 1 and rows[0].fallback_reason.startswith("missed:")
    ev = store.events("p")
    (gap,) = ev.detail[ev.kind == "bars_missed"]
    assert gap["count"] == 2
    fills = store.fills("p")
    assert fills.bar_open_time.iloc[0] == _bar(FIRST + 1) and fills.price.iloc[0] > 0
    assert list(store.equity("p").bar_open_time) == [_bar(i) for i in range(FIRST, FIRST + 4)]
    assert loop.summary().decisions_missed == 2


@pytest.mark.parametrize("policy", [FlipPolicy(), SeeingPolicy(LONG)], ids=["flip", "long"])
def test_paper_equity_equals_the_replay_on_the_same_candles(fake, policy):
    n_bars = 12
    loop, store = _loop(fake, policy)
    for _ in range(n_bars):
        loop.step()
        fake.now_ms += H
    # the replay: the same closed candles, the first decided bar after CONTEXT - 1 warm-up rows,
    # each bar's ATR over its context window (as the live loop computes it)
    candles = CANDLES.iloc[FIRST - CONTEXT + 1 : FIRST + n_bars]
    atr = np.array([_last_atr(candles.iloc[max(0, t - CONTEXT + 1) : t + 1], 14) for t in range(len(candles))])
    replay_store = StateStore("sqlite://")
    summary = run_replay(
        candles, primary=type(policy)(*([LONG] if isinstance(policy, SeeingPolicy) else [])),
        fallback=ScriptedFallback(), atr=atr, costs=COSTS, store=replay_store,
        config=ServeConfig(run_id="p", warmup_bars=CONTEXT - 1, context_bars=CONTEXT,
                           primary_backoff=BackoffConfig(initial_bars=0)),
    )  # fmt: skip
    cols = ["bar_open_time", "equity_usdt", "cash_usdt", "position_side", "position_qty_base"]
    pd.testing.assert_frame_equal(store.equity("p")[cols], replay_store.equity("p")[cols], check_exact=True)
    fill_cols = ["bar_open_time", "side", "qty_base", "price", "fee_usdt", "slippage_usdt", "reason"]
    pd.testing.assert_frame_equal(store.fills("p")[fill_cols], replay_store.fills("p")[fill_cols], check_exact=True)
    assert len(store.fills("p")) >= 2
    assert loop.summary().final_equity_usdt == summary.final_equity_usdt


def test_a_store_holding_the_run_is_refused_not_resumed(fake):
    loop, store = _loop(fake)
    loop.step()
    again, _ = _loop(fake, store=store)
    with pytest.raises(FatalError, match="cannot be resumed"):
        again.step()
    assert len(store.decisions("p")) == 1


def test_run_polls_after_each_close_and_retries_a_failed_poll(fake):
    fake.add_fault(KLINES, Fault("html_5xx"), times=2)  # the first poll fails (both read attempts)
    loop, store = _loop(fake, close_delay_s=3.0)
    summary = loop.run(max_bars=3, install_signal_handlers=False)
    assert summary.bars == 3 and summary.decisions_v2 == 3
    assert list(store.decisions("p").bar_open_time) == [_bar(i) for i in range(FIRST, FIRST + 3)]
    kinds = list(store.events("p").kind)
    assert kinds.count("step_failed") == 1 and kinds[-1] == "run_finished" and "bars_missed" not in kinds
    # the last poll came close_delay_s after the close of the third bar (the open of the fourth)
    assert fake.now_ms == int(_bar(FIRST + 3).value // 1_000_000) + 3_000


def test_sigterm_stops_between_bars(fake):
    clock = FakeTime(fake, on_sleep=lambda s: os.kill(os.getpid(), signal.SIGTERM))
    loop, store = _loop(fake, clock=clock)
    before = signal.getsignal(signal.SIGTERM)
    summary = loop.run()
    assert summary.bars == 1 and loop.stop_requested.is_set()
    assert store.events("p").kind.iloc[-1] == "run_finished"
    assert signal.getsignal(signal.SIGTERM) is before


def test_parse_page_drops_the_open_bar_and_rejects_malformed_pages():
    rows = [[i * H, 1.0, 2.0, 0.5, 1.5, 3.0] for i in range(5)]
    page = parse_page(rows, 3 * H, H)
    assert page.problem is None and len(page.candles) == 4 and page.candles.index[-1] == pd.Timestamp(3 * H, unit="ms", tz="UTC")
    assert parse_page([*rows[:2], rows[1]], 3 * H, H).problem == "duplicate open times"
    assert "out of order" in parse_page([rows[1], rows[0]], 3 * H, H).problem
    assert "grid" in parse_page([[H + 5, 1, 2, 0.5, 1.5, 3]], 3 * H, H).problem
    assert "not [time" in parse_page([[0, 1, 2]], 3 * H, H).problem
    nan_row = parse_page([[0, None, 2, 0.5, 1.5, 3]], 3 * H, H)
    assert nan_row.problem is None and row_problems(nan_row.candles)[0].startswith("non-finite price")
