"""Replay loop: V2 -> V1 fallback reasons, guard decisions, quarantine, store consistency."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
import talib

from envs.accounting import AccountState, Bar, is_funding_time, step_bar
from envs.config import CostConfig
from fallback.config import V1Config
from fallback.v1 import V1Policy
from market.decision import Decision, DecisionContext, PositionView, StatelessPolicy
from serving.errors import DataQualityError
from serving.hotswap import BackoffConfig
from serving.loop import ServeConfig, reason_kind, run_replay
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.serving.fakes import (
    FakeClock,
    FixedPolicy,
    FlipPolicy,
    NanLeveragePolicy,
    RaisingPolicy,
    ScriptedFallback,
    SlowPolicy,
    ValidatingPolicy,
    WrongTypePolicy,
)

COSTS = CostConfig()
N_BARS = 160
WARMUP = 40
LONG = Decision(direction=1, leverage=2.0, size_frac=0.5, stop_atr=1.0, take_profit_atr=1.5)
FIXED_NOW = datetime(2025, 1, 1, tzinfo=UTC)


def _atr(candles: pd.DataFrame) -> np.ndarray:
    return talib.ATR(candles.high.to_numpy(), candles.low.to_numpy(), candles.close.to_numpy(), 14)


def _run(primary, fallback=None, candles=None, atr=None, clock=None, primary_load_error=None, **cfg):
    candles = make_candles(N_BARS, seed=5) if candles is None else candles
    atr = _atr(candles) if atr is None else atr
    store = StateStore("sqlite://")
    # these tests check the per-bar fallback of every failure: backoff off unless a test sets it
    # (the backoff itself is tested in test_hotswap.py)
    cfg.setdefault("primary_backoff", BackoffConfig(initial_bars=0))
    config = ServeConfig(warmup_bars=WARMUP, run_id="t", context_bars=50, **cfg)
    kwargs = {k: v for k, v in (("clock", clock),) if v is not None}
    summary = run_replay(
        candles, primary=primary, fallback=fallback or ScriptedFallback(), atr=atr, costs=COSTS,
        store=store, config=config, primary_load_error=primary_load_error, now=lambda: FIXED_NOW, **kwargs,
    )  # fmt: skip
    return summary, store, candles, atr


def _direct_replay(store: StateStore, candles: pd.DataFrame, atr: np.ndarray, warmup: int):
    """Re-run the stored decisions through step_bar directly: the fills and equity it must give."""
    decisions = store.decisions().set_index("bar_open_time")
    state = AccountState.initial(10_000.0)
    pending: tuple[Decision | None, float] = (None, math.nan)
    fills, equity = [], []
    for t in range(warmup, len(candles)):
        ts, row = candles.index[t], candles.iloc[t]
        ns = int(ts.value)
        bar = Bar(ns, row.open, row.high, row.low, row.close, row.funding_rate, is_funding_time(ns, 8))
        result = step_bar(state, pending[0], bar, pending[1], COSTS)
        state = result.state
        fills += [
            (ts, f.side, f.qty_base, f.price, f.fee_usdt, f.slippage_usdt, f.reason) for f in result.fills
        ]
        equity.append((ts, result.equity_usdt, state.cash_usdt, state.side, state.qty_base))
        d = decisions.loc[ts]
        pending = (
            Decision(int(d.direction), d.leverage, d.size_frac, d.stop_atr, d.take_profit_atr),
            float(atr[t]),
        )
    return fills, equity, state


def _assert_store_consistent(summary, store: StateStore, candles: pd.DataFrame, atr: np.ndarray) -> None:
    expected_fills, expected_equity, final = _direct_replay(store, candles, atr, WARMUP)
    f = store.fills()
    got_fills = list(
        zip(f.bar_open_time, f.side, f.qty_base, f.price, f.fee_usdt, f.slippage_usdt, f.reason, strict=True)
    )
    assert got_fills == expected_fills
    e = store.equity()
    got_equity = list(
        zip(e.bar_open_time, e.equity_usdt, e.cash_usdt, e.position_side, e.position_qty_base, strict=True)
    )
    assert got_equity == expected_equity
    # one equity row and one decision row per processed bar, in bar order
    assert list(e.bar_open_time) == list(candles.index[WARMUP:])
    assert list(store.decisions().bar_open_time) == list(candles.index[WARMUP:])
    assert summary.bars == len(candles) - WARMUP
    assert summary.n_fills == len(f) == final.n_fills
    assert summary.final_equity_usdt == expected_equity[-1][1]
    assert summary.fees_paid_usdt == pytest.approx(f.fee_usdt.sum())


def test_fixed_primary_decides_every_bar() -> None:
    primary = FixedPolicy(LONG)
    summary, store, candles, atr = _run(primary, clock=FakeClock())
    d = store.decisions()
    assert set(d.source) == {"v2"} and d.fallback_reason.isna().all()
    assert summary.decisions_v2 == N_BARS - WARMUP and summary.decisions_v1 == 0
    assert not summary.fallback_reasons
    assert d.raw_action[0] == pytest.approx([0.9, 0.5, 0.4, 0.3, 0.2])
    assert (d.latency_ms == 0.0).all()  # fake clock never moved
    assert (d.created_at == pd.Timestamp(FIXED_NOW)).all()
    assert primary.calls == N_BARS - WARMUP
    assert summary.n_trades >= 3  # stop/take-profit exits and re-entries happened
    _assert_store_consistent(summary, store, candles, atr)


def test_reversing_primary_matches_direct_accounting() -> None:
    summary, store, candles, atr = _run(FlipPolicy())
    assert summary.n_fills > 100  # a reversal (two fills) on most bars
    _assert_store_consistent(summary, store, candles, atr)


@pytest.mark.parametrize(
    ("primary", "reason_start"),
    [
        (RaisingPolicy(), "exception: RuntimeError: boom"),
        (NanLeveragePolicy(), "non_finite_action: leverage must be a finite number, got nan"),
        (WrongTypePolicy(), "invalid_return: expected Decision, got dict"),
        (None, "bundle_load_failed: weights.safetensors missing"),
    ],
)
def test_primary_failures_fall_back_to_v1(primary, reason_start: str) -> None:
    fallback = ScriptedFallback()
    load_error = "weights.safetensors missing" if primary is None else None
    summary, store, candles, atr = _run(primary, fallback, primary_load_error=load_error)
    d = store.decisions()
    assert set(d.source) == {"v1"}
    assert all(r.startswith(reason_start) for r in d.fallback_reason)
    assert fallback.calls == N_BARS - WARMUP
    assert summary.decisions_v1 == N_BARS - WARMUP
    assert summary.fallback_reasons == {reason_kind(reason_start): N_BARS - WARMUP}
    kinds = list(store.events().kind)
    assert kinds.count("fallback_engaged") == 1  # one alert when the fallback engages, not per bar
    assert ("primary_unavailable" in kinds) == (primary is None)
    _assert_store_consistent(summary, store, candles, atr)


def test_non_finite_raw_action_is_recorded() -> None:
    _, store, _, _ = _run(NanLeveragePolicy())
    raw = store.decisions().raw_action[0]
    assert raw[0] == 0.8 and math.isnan(raw[1])


def test_late_answer_is_discarded() -> None:
    clock = FakeClock()
    summary, store, _, _ = _run(SlowPolicy(clock, 2.3, LONG), clock=clock)
    d = store.decisions()
    assert set(d.source) == {"v1"}
    assert set(d.fallback_reason) == {"deadline_exceeded: 2300 ms > 2000 ms"}
    assert d.latency_ms.to_numpy() == pytest.approx(2300.0)
    assert summary.n_fills == 0  # the long answers were never used; the fallback stayed flat


def test_answer_within_deadline_is_used() -> None:
    clock = FakeClock()
    summary, store, _, _ = _run(SlowPolicy(clock, 1.9, LONG), clock=clock)
    d = store.decisions()
    assert set(d.source) == {"v2"}
    assert d.latency_ms.to_numpy() == pytest.approx(1900.0)
    assert summary.n_fills > 0


def test_deadline_comes_from_config() -> None:
    clock = FakeClock()
    _, store, _, _ = _run(SlowPolicy(clock, 1.9, LONG), clock=clock, decision_timeout_ms=1_000.0)
    assert set(store.decisions().fallback_reason) == {"deadline_exceeded: 1900 ms > 1000 ms"}


def test_a_hung_primary_cannot_stall_the_bar() -> None:
    """The deadline is enforced in wall time, not only measured: a model that never answers is
    abandoned after decision_timeout_ms and V1 decides the same bar."""
    import threading
    import time

    from serving.choice import choose

    release = threading.Event()

    class Hung(StatelessPolicy):
        name = "v2"

        def decide(self, ctx):
            release.wait(30.0)
            return LONG

    candles = make_candles(300, seed=4)
    ctx = DecisionContext(candles.index[-1], candles, PositionView(), 10_000.0)
    fallback = V1Policy(V1Config())
    t0 = time.monotonic()
    choice = choose(ctx, Hung(), fallback, None, 150.0, time.monotonic)
    elapsed = time.monotonic() - t0
    release.set()
    assert choice.source == "v1" and choice.reason.startswith("deadline_exceeded: no answer within 150 ms")
    assert choice.primary_failure == choice.reason and choice.raw_action is None
    assert elapsed < 2.0  # not the 30 s the model would have taken


class _LongThenBroken(StatelessPolicy):
    """Long for the first ``n_ok`` calls, then raises."""

    name = "v2"

    def __init__(self, n_ok: int) -> None:
        self.n_ok, self.calls = n_ok, 0

    def decide(self, ctx: DecisionContext) -> Decision:
        self.calls += 1
        if self.calls > self.n_ok:
            raise RuntimeError("model crashed")
        return Decision(direction=1, leverage=2.0, size_frac=0.5, stop_atr=50.0, take_profit_atr=50.0)


def test_fallback_failure_decides_flat_and_closes() -> None:
    summary, store, candles, atr = _run(_LongThenBroken(5), ScriptedFallback(fail=True))
    d = store.decisions()
    assert list(d.source[:5]) == ["v2"] * 5 and set(d.source[5:]) == {"guard"}
    assert (d.direction[5:] == 0).all()
    assert (
        d.fallback_reason[5]
        == "exception: RuntimeError: model crashed; fallback_failed: ValueError: fallback broken"
    )
    assert summary.decisions_guard == N_BARS - WARMUP - 5
    assert summary.fallback_reasons == {"exception": N_BARS - WARMUP - 5}
    assert summary.events["fallback_failed"] == N_BARS - WARMUP - 5
    f = store.fills()
    assert list(f.reason) == ["entry", "exit_signal"]  # opened after bar 1's decision, closed by the guard
    assert f.bar_open_time[1] == candles.index[WARMUP + 6]
    assert (store.equity().position_side[7:] == 0).all()
    _assert_store_consistent(summary, store, candles, atr)


def test_fallback_ledger_one_event_when_the_fallback_engages_and_one_when_the_primary_recovers() -> None:
    from serving.choice import FallbackLedger

    ledger = FallbackLedger()
    seen = [ledger.observe(source, reason) for source, reason in [
        ("v2", None), ("v1", "exception: boom"), ("v1", "backoff: skipped"), ("guard", "exception: both"),
        ("v2", None), ("v2", None)]]  # fmt: skip
    assert seen == [[], [("fallback_engaged", {"reason": "exception: boom"})], [], [],
                    [("primary_recovered", {"previous_reason_kind": "exception"})], []]
    assert ledger.reasons == {"exception": 2, "backoff": 1} and ledger.current is None


def test_primary_recovery_is_recorded() -> None:
    class Flaky(StatelessPolicy):
        name = "v2"
        calls = 0

        def decide(self, ctx: DecisionContext) -> Decision:
            self.calls += 1
            if 3 <= self.calls <= 5:
                raise TimeoutError("feature service down")
            return Decision.flat()

    summary, store, _, _ = _run(Flaky())
    kinds = list(store.events().kind)
    assert kinds.count("fallback_engaged") == 1 and kinds.count("primary_recovered") == 1
    assert summary.decisions_v1 == 3 and summary.fallback_reasons == {"exception": 3}


def test_quarantined_rows_hold_the_position_and_skip_the_bar() -> None:
    candles = make_candles(N_BARS, seed=5)
    q1, q2 = WARMUP + 10, WARMUP + 20
    candles.iloc[q1, candles.columns.get_loc("close")] = np.nan
    hi, lo = candles.iloc[q2]["high"], candles.iloc[q2]["low"]
    candles.iloc[q2, candles.columns.get_loc("high")] = lo
    candles.iloc[q2, candles.columns.get_loc("low")] = hi  # high < low
    wide = Decision(direction=1, leverage=2.0, size_frac=0.5, stop_atr=50.0, take_profit_atr=50.0)
    summary, store, _, _ = _run(FixedPolicy(wide), candles=candles, atr=_atr(make_candles(N_BARS, seed=5)))
    assert summary.n_quarantined == 2 and summary.bars == N_BARS - WARMUP
    d = store.decisions().set_index("bar_open_time")
    for q in (q1, q2):
        ts = candles.index[q]
        assert d.loc[ts, "source"] == "guard" and d.loc[ts, "fallback_reason"].startswith("quarantine: ")
        assert d.loc[ts, "direction"] == 1  # hold the open long, nothing new
    assert "non-finite price" in d.loc[candles.index[q1], "fallback_reason"]
    assert "high < low" in d.loc[candles.index[q2], "fallback_reason"]
    ev = store.events()
    quarantine = ev[ev.kind == "quarantine"]
    assert list(quarantine.time) == [candles.index[q1], candles.index[q2]]
    assert quarantine.detail.iloc[0]["discarded_decision"]["direction"] == 1
    e = store.equity().set_index("bar_open_time")
    for q in (q1, q2):  # no processing: the snapshot repeats the previous mark
        assert e.loc[candles.index[q], "equity_usdt"] == e.loc[candles.index[q - 1], "equity_usdt"]
    f = store.fills()
    assert list(f.reason) == ["entry"]  # held through both bad rows
    assert set(store.equity().position_side[1:]) == {1}


def test_no_invalid_row_reaches_a_policy_and_entries_wait_until_it_leaves_the_window() -> None:
    candles = make_candles(N_BARS, seed=5)
    q = WARMUP + 10
    candles.iloc[q, candles.columns.get_loc("close")] = np.nan
    primary, fallback = ValidatingPolicy(LONG, "v2"), ValidatingPolicy(name="v1")
    # every third call of the primary fails, so V1 decides some bars too (and must never see the row)
    calls = {"n": 0}
    real = primary.decide

    def flaky(ctx):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("down")
        return real(ctx)

    primary.decide = flaky
    summary, store, _, _ = _run(primary, fallback=fallback, candles=candles, atr=_atr(make_candles(N_BARS, seed=5)))
    context = 50
    held = list(candles.index[q + 1 : q + context])  # windows of q+1 .. q+49 still hold row q
    assert primary.violations == [] and fallback.violations == []
    asked = set(primary.seen) | set(fallback.seen)
    assert asked.isdisjoint(held) and candles.index[q] not in asked
    assert candles.index[q + context] in asked  # the row has left the window: the policy decides again
    assert summary.n_quarantined == 1 and summary.n_window_held == len(held) == context - 1
    d = store.decisions().set_index("bar_open_time")
    assert (d.loc[held, "source"] == "guard").all()
    assert d.loc[held, "fallback_reason"].str.startswith("quarantine_window:").all()
    assert str(candles.index[q + context]) in d.loc[held[0], "fallback_reason"]
    e = store.equity().set_index("bar_open_time")
    assert (d.loc[held, "direction"] == e.loc[held, "position_side"]).all()  # hold what is open, nothing new
    ev = store.events()
    assert list(ev[ev.kind == "context_window_invalid"].time) == [held[0]]  # one event per stretch
    f = store.fills()
    assert not ((f.reason == "entry") & f.bar_open_time.isin([*held[1:], candles.index[q + context]])).any()


def test_exits_still_happen_while_the_window_holds_an_invalid_row() -> None:
    candles = make_candles(N_BARS, seed=5)
    q = WARMUP + 2
    candles.iloc[q, candles.columns.get_loc("volume")] = -1.0
    # entry filled at bar q-1; on the clean path its stop triggers at bar q+2
    tight = Decision(direction=1, leverage=2.0, size_frac=0.5, stop_atr=1.0, take_profit_atr=1.0)
    policy = ValidatingPolicy(tight)
    summary, store, _, _ = _run(policy, candles=candles)
    assert policy.violations == []
    held = set(candles.index[q + 1 : q + 50])
    f = store.fills()
    in_held = f[f.bar_open_time.isin(held)]
    assert summary.n_window_held == 49
    assert len(in_held) == 1 and in_held.reason.iloc[0] in ("stop", "take_profit")  # the position was closed
    assert not (in_held.reason == "entry").any()  # ... and not reopened while held


def test_non_finite_atr_blocks_entries() -> None:
    candles = make_candles(N_BARS, seed=5)
    atr = _atr(candles)
    atr[WARMUP:] = np.nan
    summary, store, _, _ = _run(FixedPolicy(LONG), candles=candles, atr=atr)
    d = store.decisions()
    assert set(d.source) == {"guard"} and (d.direction == 0).all()
    assert d.fallback_reason[0].startswith("atr_invalid: atr[t]=nan")
    assert summary.n_fills == 0 and summary.events["entry_blocked_atr"] == N_BARS - WARMUP


def test_mixed_failures_never_stop_the_loop() -> None:
    clock = FakeClock()

    class Chaos(StatelessPolicy):
        name = "v2"
        calls = 0

        def __init__(self) -> None:
            self.last_raw_action = None

        def decide(self, ctx: DecisionContext) -> Decision:
            self.calls += 1
            k = self.calls % 5
            if k == 1:
                raise KeyError("feature")
            if k == 2:
                return Decision(direction=1, leverage=float("inf"))
            if k == 3:
                clock.advance(5.0)
                return LONG
            if k == 4:
                return None  # type: ignore[return-value]
            return LONG

    summary, store, candles, atr = _run(Chaos(), clock=clock)
    n = N_BARS - WARMUP
    assert summary.decisions_v2 + summary.decisions_v1 == n
    assert summary.fallback_reasons == {
        "exception": n // 5, "non_finite_action": n // 5, "deadline_exceeded": n // 5, "invalid_return": n // 5,
    }  # fmt: skip
    _assert_store_consistent(summary, store, candles, atr)


def test_real_v1_fallback_end_to_end() -> None:
    cfg = V1Config(
        adx_period_bars=7, adx_min=15.0, bb_period_bars=10, bb_width_lookback_bars=50, volume_ma_bars=10,
        volume_min_ratio=0.5, ema_fast_bars=5, ema_mid_bars=10, ema_slow_bars=30, atr_period_bars=14,
        history_bars=80,
    )  # fmt: skip
    candles = make_candles(600, seed=2)
    atr = _atr(candles)
    store = StateStore("sqlite://")
    seen: list[tuple[int, int]] = []
    summary = run_replay(
        candles, primary=RaisingPolicy(), fallback=V1Policy(cfg), atr=atr, costs=COSTS, store=store,
        config=ServeConfig(warmup_bars=WARMUP, run_id="t", context_bars=80),
        progress=lambda i, n: seen.append((i, n)),
    )  # fmt: skip
    assert summary.decisions_v1 == 600 - WARMUP
    assert summary.n_trades > 0  # V1 traded at least once on this seeded walk
    assert seen[0] == (WARMUP + 1, 600) and seen[-1] == (600, 600) and len(seen) == 600 - WARMUP
    expected_fills, expected_equity, _ = _direct_replay(store, candles, atr, WARMUP)
    assert len(store.fills()) == len(expected_fills) == summary.n_fills
    assert store.equity().equity_usdt.iloc[-1] == expected_equity[-1][1]


def test_input_validation() -> None:
    candles = make_candles(100, seed=1)
    atr = _atr(candles)
    kw = {"primary": None, "fallback": ScriptedFallback(), "costs": COSTS, "store": StateStore("sqlite://")}
    with pytest.raises(DataQualityError, match="UTC"):
        run_replay(candles.tz_localize(None), atr=atr, config=ServeConfig(warmup_bars=10), **kw)
    with pytest.raises(DataQualityError, match="not sorted"):
        run_replay(candles.iloc[::-1], atr=atr, config=ServeConfig(warmup_bars=10), **kw)
    with pytest.raises(ValueError, match="shape"):
        run_replay(candles, atr=atr[:-1], config=ServeConfig(warmup_bars=10), **kw)
    with pytest.raises(ValueError, match="history_bars"):
        run_replay(candles, atr=atr, config=ServeConfig(warmup_bars=10, context_bars=5), **kw)


class _EvenHourPrimary(StatelessPolicy):
    """V2 stand-in: long on even open hours, raises on odd ones (so V1 decides those bars)."""

    name = "v2"

    def decide(self, ctx: DecisionContext) -> Decision:
        if ctx.bar_open_time.hour % 2:
            raise RuntimeError("odd hour")
        return LONG


class _ShortFallback(StatelessPolicy):
    name = "v1"
    def history_bars(self, bar_interval: pd.Timedelta) -> int:
        return 10

    def decide(self, ctx: DecisionContext) -> Decision:
        return Decision(direction=-1, leverage=2.0, size_frac=0.5, stop_atr=1.0, take_profit_atr=1.5)


def test_each_policy_stops_in_its_own_atr_units() -> None:
    """V1 sizes its risk with its own ATR period: the bars it decides are submitted with
    ``fallback_atr``, the primary's with ``atr`` (the two differ here by a factor 2.5)."""
    candles = make_candles(N_BARS, seed=5)
    atr = _atr(candles)
    fallback_atr = 2.5 * atr
    store = StateStore("sqlite://")
    config = ServeConfig(warmup_bars=WARMUP, run_id="t", context_bars=50,
                         primary_backoff=BackoffConfig(initial_bars=0))
    summary = run_replay(candles, primary=_EvenHourPrimary(), fallback=_ShortFallback(), atr=atr,
                         fallback_atr=fallback_atr, costs=COSTS, store=store, config=config, now=lambda: FIXED_NOW)
    sources = store.decisions().set_index("bar_open_time")["source"]
    assert set(sources) == {"v1", "v2"}
    used = atr.copy()
    is_v1 = np.zeros(len(candles), bool)
    is_v1[WARMUP:] = (sources.reindex(candles.index[WARMUP:]) == "v1").to_numpy()
    used[is_v1] = fallback_atr[is_v1]
    _assert_store_consistent(summary, store, candles, used)
    # and the choice mattered: with the primary's ATR for every bar the fills would differ
    assert _direct_replay(store, candles, atr, WARMUP)[0] != _direct_replay(store, candles, used, WARMUP)[0]


def test_fallback_atr_of_the_wrong_shape_is_refused() -> None:
    candles = make_candles(60, seed=1)
    with pytest.raises(ValueError, match="fallback_atr must have shape"):
        run_replay(candles, primary=None, fallback=ScriptedFallback(), atr=_atr(candles), fallback_atr=np.ones(3),
                   costs=COSTS, store=StateStore("sqlite://"), config=ServeConfig(warmup_bars=20, run_id="t"))
