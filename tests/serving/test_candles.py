"""Candles for serving at production size (issue 17): paging past ccxt's 1,000-kline cap, the rolling
window, and the bad-candle repair policy, for the live loop and paper on live candles.

The fake exchange serves the bundled BTCUSDT 1h candles and funding; the client is the real ccxt
``binanceusdm`` (which caps ``fetch_ohlcv``'s ``limit`` at 1,000); the context is the demo bundle's
1,010 bars (``history + 10``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from envs.config import CostConfig
from market.bundled import bundled_candles_path, bundled_funding_path
from market.candles import fill_gaps, load_candles, load_funding
from market.decision import Decision, DecisionContext, StatelessPolicy
from serving.candles import (
    MAX_CONTEXT_BARS,
    PAGE_BARS,
    REFRESH_BARS,
    find_flaws,
    merge_rows,
    page_requests,
    repair_gaps,
)
from serving.exchange import BinanceFuturesBroker, make_client
from serving.hotswap import BackoffConfig
from serving.live import LiveConfig, LiveLoop
from serving.loop import ServeConfig, row_problems
from serving.paper_live import FeedConfig, PaperLiveLoop
from serving.store import StateStore
from tests.kit.fake_binance import KLINES, FakeBinance
from tests.serving.fakes import ScriptedFallback

H = 3_600_000
COLS = ["open", "high", "low", "close", "volume"]
CONTEXT = 1_010  # the demo bundle: history 1,000 + 10
HOLD = 2
_ALL = load_candles(bundled_candles_path())
CANDLES = _ALL.iloc[20_000:22_600]  # 2021-04-14 .. : 2,600 real bars, no gap
FUNDING = load_funding(bundled_funding_path())
FUNDING = FUNDING[(FUNDING.index >= CANDLES.index[0]) & (FUNDING.index <= CANDLES.index[-1])]
FIRST = 1_200  # the last closed bar at T0 (row of CANDLES)
T0 = int(CANDLES.index[FIRST + 1].value // 1_000_000) + 60_000  # one minute into the next bar


def _ms(i: int) -> int:
    return int(CANDLES.index[i].value // 1_000_000)


class WindowPolicy(StatelessPolicy):
    """Records every context window (V2); answers flat (no orders: the candles are the subject)."""

    name = "v2"

    def __init__(self) -> None:
        self.contexts: list[DecisionContext] = []

    def decide(self, ctx: DecisionContext) -> Decision:
        self.contexts.append(ctx)
        return Decision.flat()


def _assert_window(ctx: DecisionContext, last: int, *, repaired: tuple[int, ...] = ()) -> None:
    """The window of bar ``last`` (row of CANDLES): 1,010 closed, gapless, valid rows equal to the
    exchange's, except ``repaired`` rows (previous close, volume 0, is_gap 1)."""
    w = ctx.candles
    assert ctx.bar_open_time == CANDLES.index[last] and len(w) == CONTEXT
    assert w.index[0] == CANDLES.index[last - CONTEXT + 1] and w.index.is_unique
    assert (np.diff(w.index.as_unit("ms").asi8) == H).all()
    assert all(p is None for p in row_problems(w)) and "funding_rate" in w.columns
    expected = CANDLES.iloc[last - CONTEXT + 1 : last + 1][COLS].copy()
    for i in repaired:
        prev = float(CANDLES.close.iloc[i - 1])
        expected.loc[CANDLES.index[i]] = [prev, prev, prev, prev, 0.0]
    assert np.array_equal(w[COLS].to_numpy(), expected.to_numpy())
    if repaired:
        assert list(w.index[w["is_gap"] == 1.0]) == [CANDLES.index[i] for i in repaired]
    else:
        assert "is_gap" not in w.columns or (w["is_gap"] == 0.0).all()


def _klines(fake: FakeBinance, since: int = 0) -> list[dict[str, str]]:
    """Parameters of the klines requests from number ``since`` on."""
    return [p for path, p in fake.requests if path == KLINES][since:]


@pytest.fixture
def fake():
    with FakeBinance(CANDLES, FUNDING, now_ms=T0) as server:
        yield server


# -- pure helpers -----------------------------------------------------------------------------------


def test_page_requests_cover_the_range_in_pages_of_at_most_1000_bars():
    pages = page_requests(0, 2_499 * H, H)
    assert [(s // H, (u + 1) // H - 1, n) for s, u, n in pages] == [(0, 999, 1000), (1000, 1999, 1000), (2000, 2499, 500)]
    assert all(u == s + n * H - 1 for s, u, n in pages)  # until: the close time of the page's last bar
    assert page_requests(5 * H, 5 * H, H) == [(5 * H, 6 * H - 1, 1)] and page_requests(6 * H, 5 * H, H) == []


def test_flaws_and_repairs_follow_the_feature_set_gap_policy():
    rows = CANDLES.iloc[:12][COLS].copy()
    rows.iloc[4, 3] = math.nan  # invalid row 4
    rows = rows.drop(rows.index[7])  # gap at row 7
    first, last = _ms(0), _ms(11)
    flaws = find_flaws(rows, first, last, H)
    assert list(flaws) == [CANDLES.index[4], CANDLES.index[7]]
    assert flaws[CANDLES.index[4]].startswith("non-finite price") and flaws[CANDLES.index[7]].startswith("missing")
    assert list(find_flaws(rows.iloc[:-1], first, last, H)) == [*flaws, CANDLES.index[11]]  # the last bar absent
    assert find_flaws(rows.iloc[3:], first - 50 * H, _ms(3), H) == {}  # before the first row: history, no flaw
    repaired = repair_gaps(rows, H)
    expected, _ = fill_gaps(rows.drop(rows.index[4]), interval=pd.Timedelta(hours=1))  # the same rule, reused
    pd.testing.assert_frame_equal(repaired, expected)
    assert list(repaired.index[repaired.is_gap == 1.0]) == [CANDLES.index[4], CANDLES.index[7]]
    assert (repaired.loc[CANDLES.index[4], COLS].to_numpy() == [*[CANDLES.close.iloc[3]] * 4, 0.0]).all()


def test_merge_rows_lets_the_latest_answer_win():
    old = CANDLES.iloc[:5][COLS].copy()
    new = CANDLES.iloc[3:8][COLS].copy()
    new.iloc[0, 3] = 1.0
    merged = merge_rows(old, new)
    assert list(merged.index) == list(CANDLES.index[:8]) and merged.close.iloc[3] == 1.0


# -- the live loop --------------------------------------------------------------------------------------


def _live(fake, policy, store=None, **config):
    client = make_client(api_key="k", secret="s", base_url=fake.url, timeout_ms=5_000, rate_limit=False)
    broker = BinanceFuturesBroker(client, read_attempts=2, sleep=lambda s: None)
    store = store if store is not None else StateStore("sqlite://")
    cfg = LiveConfig(context_bars=CONTEXT, bad_candle_hold_bars=HOLD, **config)
    loop = LiveLoop(broker, store, cfg, primary=policy, fallback=ScriptedFallback(),
                    wall_clock_s=lambda: fake.now_ms / 1000.0, sleep=lambda s: None)  # fmt: skip
    return loop, store


def test_live_first_bar_with_a_1010_bar_context_is_decided_by_the_policy(fake):
    policy = WindowPolicy()
    loop, store = _live(fake, policy)
    result = loop.step()
    assert result.source == "v2" and not result.quarantined, store.decisions("live").fallback_reason.iloc[-1]
    (ctx,) = policy.contexts
    _assert_window(ctx, FIRST)
    pages = _klines(fake)
    assert len(pages) == 2 and all(int(p["limit"]) <= PAGE_BARS for p in pages)  # paged past ccxt's cap
    assert sum(int(p["limit"]) for p in pages) == CONTEXT + 8  # the window and a small margin


def test_live_normal_bar_makes_one_small_klines_request(fake):
    policy = WindowPolicy()
    loop, _ = _live(fake, policy)
    loop.step()
    for k in range(1, 4):
        fake.now_ms += H
        before = len(_klines(fake))
        assert loop.step().source == "v2"
        (request,) = _klines(fake, before)
        assert int(request["limit"]) == REFRESH_BARS + 2  # the last cached bars again, and the new one
        assert int(request["startTime"]) == _ms(FIRST + k - 1 - REFRESH_BARS)
        _assert_window(policy.contexts[-1], FIRST + k)
    assert len(loop.candle_cache.rows) <= CONTEXT + 8 + REFRESH_BARS  # bounded memory


def test_live_catching_up_after_missed_bars_pages_again(fake):
    policy = WindowPolicy()
    loop, store = _live(fake, policy)
    loop.step()
    missed = 1_200  # more than a page closes while the loop is down
    fake.now_ms += (missed + 1) * H
    before = len(_klines(fake))
    assert loop.step().source == "v2"
    pages = _klines(fake, before)
    assert len(pages) >= 2 and all(int(p["limit"]) <= PAGE_BARS for p in pages)
    _assert_window(policy.contexts[-1], FIRST + missed + 1)
    d = store.decisions("live")
    assert (d.source == "missed").sum() == missed
    # a restarted process (empty cache) pages too
    restarted, _ = _live(fake, policy, store=store)
    fake.now_ms += H
    before = len(_klines(fake))
    assert restarted.step().source == "v2"
    assert len(_klines(fake, before)) == 2
    _assert_window(policy.contexts[-1], FIRST + missed + 2)


@pytest.mark.parametrize("flaw", ["corrupt", "drop"])
def test_live_persistent_bad_row_in_the_window_holds_then_is_repaired(fake, flaw):
    bad = FIRST - 500
    if flaw == "corrupt":
        fake.corrupt_candle(_ms(bad), volume=-1.0)
    else:
        fake.drop_candle(_ms(bad))
    policy = WindowPolicy()
    loop, store = _live(fake, policy)
    sources = []
    for _ in range(HOLD + 2):
        before = len(_klines(fake))
        sources.append(loop.step().source)
        if len(sources) <= HOLD:  # a held bar re-reads the flawed row once
            assert [int(p["limit"]) for p in _klines(fake, before)][-1] == 1
        fake.now_ms += H
    assert sources == ["guard"] * HOLD + ["v2", "v2"]
    d = store.decisions("live")
    reason = d.fallback_reason.iloc[0]
    assert reason.startswith("quarantine: the context window ") and str(CANDLES.index[bad]) in reason
    ev = store.events("live")
    (repaired,) = ev.detail[ev.kind == "candle_repaired"]  # once, not on every bar
    assert repaired["bar"] == str(CANDLES.index[bad]) and repaired["rule"].startswith("gap policy")
    assert repaired["original"] == (None if flaw == "drop" else {**CANDLES.iloc[bad][COLS].to_dict(), "volume": -1.0})
    assert repaired["decided_bar"] == str(CANDLES.index[FIRST + HOLD])
    for ctx, last in zip(policy.contexts, (FIRST + HOLD, FIRST + HOLD + 1), strict=True):
        _assert_window(ctx, last, repaired=(bad,))


def test_live_own_bad_candle_is_quarantined_and_a_later_correction_replaces_the_repair(fake):
    policy = WindowPolicy()
    loop, store = _live(fake, policy)
    loop.step()
    own = FIRST + 1
    fake.corrupt_candle(_ms(own), high=1.0)  # high below open/close
    fake.now_ms += H
    result = loop.step()
    assert result.quarantined and result.source == "guard" and len(policy.contexts) == 1
    assert str(CANDLES.index[own]) in store.decisions("live").fallback_reason.iloc[-1]
    sources = []
    for _ in range(HOLD):
        fake.now_ms += H
        sources.append(loop.step().source)
    assert sources == ["guard"] * (HOLD - 1) + ["v2"]  # held from the bar it was seen: trading resumes in HOLD bars
    _assert_window(policy.contexts[-1], own + HOLD, repaired=(own,))
    fake.restore_candle(_ms(own))  # the exchange corrects it, still within the refreshed bars
    fake.now_ms += H
    assert loop.step().source == "v2"
    _assert_window(policy.contexts[-1], own + HOLD + 1)
    kinds = list(store.events("live").kind)
    assert kinds.count("candle_repaired") == 1 and kinds.count("candle_corrected") == 1


# -- paper on live candles ------------------------------------------------------------------------------


def _paper(fake, policy, context=CONTEXT):
    client = make_client(api_key=None, secret=None, sandbox=False, base_url=fake.url, timeout_ms=5_000,
                         rate_limit=False)  # fmt: skip
    feed = BinanceFuturesBroker(client, read_attempts=2, sleep=lambda s: None)
    store = StateStore("sqlite://")
    config = ServeConfig(run_id="p", context_bars=context, primary_backoff=BackoffConfig(initial_bars=0))

    def clock() -> float:
        return fake.now_ms / 1000.0

    loop = PaperLiveLoop(feed, store, config, FeedConfig(bad_candle_hold_bars=HOLD), primary=policy,
                         fallback=ScriptedFallback(), costs=CostConfig(), wall_clock_s=clock, monotonic_s=clock,
                         sleep=lambda s: None)  # fmt: skip
    return loop, store


def test_paper_live_1010_bar_context_pages_then_one_small_request_per_bar(fake):
    policy = WindowPolicy()
    loop, store = _paper(fake, policy)
    (row,) = loop.step()
    assert row.source == "v2", row.fallback_reason
    _assert_window(policy.contexts[0], FIRST)
    pages = _klines(fake)
    assert len(pages) == 2 and all(int(p["limit"]) <= PAGE_BARS for p in pages)
    fake.now_ms += H
    before = len(_klines(fake))
    assert [r.source for r in loop.step()] == ["v2"]
    (request,) = _klines(fake, before)
    assert int(request["limit"]) == REFRESH_BARS + 2
    _assert_window(policy.contexts[-1], FIRST + 1)
    fake.now_ms += 1_100 * H  # catching up: pages again; the missed bars' candles still go to the broker
    before = len(_klines(fake))
    rows = loop.step()
    assert [r.source for r in rows] == ["missed"] * 1_099 + ["v2"]
    assert len(_klines(fake, before)) >= 2
    _assert_window(policy.contexts[-1], FIRST + 1_101)
    assert list(store.equity("p").bar_open_time) == list(CANDLES.index[FIRST : FIRST + 1_102])


def test_paper_live_bad_rows_follow_the_repair_policy(fake):
    inner, own = FIRST - 300, FIRST + 3
    fake.corrupt_candle(_ms(inner), close=float("nan"))
    fake.corrupt_candle(_ms(own), volume=-5.0)
    policy = WindowPolicy()
    loop, store = _paper(fake, policy)
    rows = []
    for _ in range(7):
        rows += loop.step()
        fake.now_ms += H
    d = pd.DataFrame([(r.bar_open_time, r.source, r.fallback_reason) for r in rows], columns=["bar", "source", "why"])
    # inner row: held HOLD bars, then repaired; own bad candle at FIRST + 3: quarantined, then held, then repaired
    assert list(d.source) == ["guard", "guard", "v2", "guard", "guard", "v2", "v2"]
    assert d.why[0].startswith(f"quarantine_window: the context window holds the invalid row {CANDLES.index[inner]}")
    assert d.why[3].startswith(f"quarantine: negative volume at {CANDLES.index[own]}")
    assert d.why[4].startswith(f"quarantine_window: the context window holds the invalid row {CANDLES.index[own]}")
    ev = store.events("p")
    repaired = list(ev.detail[ev.kind == "candle_repaired"])
    assert [e["bar"] for e in repaired] == [str(CANDLES.index[inner]), str(CANDLES.index[own])]
    assert (ev.kind == "quarantine").sum() == 1
    _assert_window(policy.contexts[-1], FIRST + 6, repaired=(inner, own))
    assert len(store.equity("p")) == 7  # the broker ran every bar


def test_paper_live_accepts_contexts_beyond_one_page_and_refuses_absurd_ones(fake):
    policy = WindowPolicy()
    loop, _ = _paper(fake, policy, context=2_000)
    (row,) = loop.step()  # at bar 1,200 the exchange holds 1,201 bars: held, nothing invented
    assert row.source == "guard" and row.fallback_reason.startswith("quarantine_window: the context window lacks 799")
    fake.now_ms = _ms(2_101) + 60_000
    (row,) = loop.step()[-1:]
    assert row.source == "v2" and len(policy.contexts[0].candles) == 2_000
    assert len(_klines(fake)) >= 3
    with pytest.raises(ValueError, match=f"context_bars must be an int <= {MAX_CONTEXT_BARS}"):
        _paper(fake, policy, context=MAX_CONTEXT_BARS + 1)
