"""The bundle env's trading rules in serving (:mod:`serving.trading_rules`): decision bars, the minimum holding
period and the rebalance band in the paper broker, the paper loop and the live loop (on the fake exchange).

Parity with the backtest under these rules (decisions and equity bar for bar) is
``tests/serving/test_vol_target_parity.py``; here: what each loop does with each rule, that the risk guard is not
held back by them, that they survive a restart (no counter), and that live refuses what it cannot trade.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from agents.bundle import load_bundle
from agents.policy import FrozenPPOPolicy
from ats_cli.serve_live import build_live_loop
from envs.accounting import Bar
from envs.config import CostConfig, TradingRulesConfig
from envs.trading_env import EnvConfig
from market.decision import Decision, DecisionContext, StatelessPolicy
from serving.exchange import BinanceFuturesBroker, make_client
from serving.hotswap import BundleRejected, PolicySlot, validate_candidate
from serving.live import LiveConfig, LiveLoop
from serving.loop import ServeConfig, run_replay
from serving.paper import PaperBroker
from serving.store import StateStore
from serving.trading_rules import (
    UnservableBundleError,
    decides_at,
    load_live_policy,
    min_hold_reason,
    refuse_unservable_bundle,
)
from tests.kit.candles import make_candles
from tests.kit.fake_binance import FakeBinance, assert_consistent
from tests.serving import bundle_kit as kit
from tests.serving.fakes import FlipPolicy, ScriptedFallback

H_MS = 3_600_000
HOUR = pd.Timedelta("1h")
CANDLES = make_candles(1_400, seed=1)
FUNDING = CANDLES["funding_rate"].dropna()
T0 = int(CANDLES.index[1_100].value // 1_000_000) + 60_000
EVERY_4 = TradingRulesConfig(decision_interval_bars=4)
HOLD_3 = TradingRulesConfig(min_hold_bars=3)
BAND = TradingRulesConfig(rebalance_band_frac=0.2)
LONG = Decision(direction=1, leverage=2.0, size_frac=0.5, stop_atr=3.0, take_profit_atr=6.0)


class Recording(StatelessPolicy):
    """Answers ``decide(ctx)`` of a function of the bar and records the bars it was asked."""

    name = "v2"

    def __init__(self, answer) -> None:
        self.answer, self.asked = answer, []

    def decide(self, ctx: DecisionContext) -> Decision:
        self.asked.append(ctx.bar_open_time)
        return self.answer(ctx)


def _bar(t: pd.Timestamp, price: float) -> Bar:
    return Bar(int(t.value), price, price * 1.001, price * 0.999, price, math.nan, False)


# -- the pure rules ------------------------------------------------------------------------------


def test_decision_bars_and_the_holding_period_are_pure_functions_of_the_bar_and_the_position() -> None:
    bars = pd.date_range("2024-01-01", periods=12, freq="1h", tz="UTC")
    assert [t.hour for t in bars if decides_at(t, HOUR, EVERY_4)] == [3, 7, 11]  # closing at 04:00, 08:00, 12:00
    assert all(decides_at(t, None, TradingRulesConfig()) for t in bars) and all(decides_at(t, HOUR, None) for t in bars)
    with pytest.raises(ValueError, match="bar length"):
        decides_at(bars[0], None, EVERY_4)
    assert min_hold_reason(-1, 1, 2, HOLD_3).startswith("min_hold")  # a flip of a 2-bar-old position
    assert min_hold_reason(0, 1, 2, HOLD_3) is not None  # a close too
    assert min_hold_reason(1, 1, 0, HOLD_3) is None and min_hold_reason(-1, 1, 3, HOLD_3) is None
    assert min_hold_reason(1, 0, 0, HOLD_3) is None and min_hold_reason(-1, 1, None, HOLD_3) is None  # unknown age


# -- paper ---------------------------------------------------------------------------------------


def test_paper_broker_reads_a_guard_decision_whatever_the_rules_and_no_decision_as_nothing() -> None:
    costs = CostConfig()
    t = pd.date_range("2024-01-01 00:00", periods=6, freq="1h", tz="UTC")
    rules = TradingRulesConfig(decision_interval_bars=4, min_hold_bars=5)
    broker = PaperBroker(10_000.0, costs, trading_rules=rules, bar_interval_ns=int(HOUR.value))
    broker.on_bar(_bar(t[3], 50_000.0))  # bar 03:00 closes at 04:00: a decision bar
    broker.submit(LONG, 500.0)
    broker.on_bar(_bar(t[4], 50_000.0))
    assert broker.state.side == 1
    broker.submit(Decision.flat(), 500.0)  # off a decision bar (04:00) and 1 bar old: not read
    broker.on_bar(_bar(t[5], 50_000.0))
    assert broker.state.side == 1
    broker.submit(None, math.nan)  # no decision: nothing changes; the last ATR prices the bar's exits
    assert broker.pending is not None and broker.pending[0] is None
    broker.on_bar(_bar(t[5] + HOUR, 50_000.0))
    assert broker.state.side == 1
    broker.submit(Decision.flat(), 500.0, imposed=True)  # the risk guard's flat: read anyway
    broker.on_bar(_bar(t[5] + 2 * HOUR, 50_000.0))
    assert broker.state.side == 0


def _replay(policy, rules, guard=None, bars: int = 60):
    candles = make_candles(400 + bars, seed=4)
    atr = np.full(len(candles), 300.0)
    store = StateStore("sqlite://")
    summary = run_replay(candles, primary=policy, fallback=ScriptedFallback(), atr=atr, costs=CostConfig(), store=store,
                         config=ServeConfig(warmup_bars=400, context_bars=50), trading_rules=rules, guard=guard)
    return summary, store.decisions("paper"), store.fills("paper")  # fmt: skip


def test_paper_loop_asks_the_policy_at_decision_bars_only() -> None:
    policy = Recording(lambda ctx: LONG if (ctx.bar_open_time.hour // 4) % 2 == 0 else Decision.flat())
    summary, rows, fills = _replay(policy, EVERY_4)
    assert policy.asked and all((t.hour + 1) % 4 == 0 for t in policy.asked) and len(policy.asked) == 15
    others = rows[~rows["bar_open_time"].isin(policy.asked)]
    assert (others["source"] == "guard").all() and others["fallback_reason"].str.startswith("not_decision_bar").all()
    assert summary.decisions_v2 == 15 and summary.fallback_reasons == {}  # not a fallback
    signal = fills[fills["reason"].isin(["entry", "exit_signal"])]  # stops and take-profits act at any bar
    assert len(signal) >= 4 and (pd.DatetimeIndex(signal["bar_open_time"]).hour % 4 == 0).all()


def test_paper_loop_holds_a_young_position_and_says_why() -> None:
    summary, rows, fills = _replay(FlipPolicy(), HOLD_3)  # reverses every bar
    held = rows[rows["fallback_reason"].fillna("").str.startswith("min_hold")]
    assert len(held) >= 10 and (held["source"] == "guard").all() and summary.events["min_hold"] == len(held)
    entries = fills[fills["reason"] == "entry"]["bar_open_time"].tolist()
    exits = fills[fills["reason"] == "exit_signal"]["bar_open_time"].tolist()
    for t in exits:  # every signal exit closes a position held for at least 3 bars
        assert t - max(e for e in entries if e < t) >= 3 * HOUR


def test_paper_stepper_keeps_its_rules_when_the_costs_change() -> None:
    from serving.loop import PaperStepper

    stepper = PaperStepper(slot=PolicySlot(FlipPolicy()), fallback=ScriptedFallback(), costs=CostConfig(),
                           store=StateStore("sqlite://"), config=ServeConfig(), bar_interval=HOUR,
                           trading_rules=EVERY_4)  # fmt: skip
    stepper.use_costs(CostConfig(taker_fee_bps=4.0))
    assert stepper.broker.trading_rules == EVERY_4
    stepper.use_trading_rules(HOLD_3)
    assert stepper.broker.trading_rules == HOLD_3
    with pytest.raises(ValueError, match="bar_interval_ns"):
        PaperStepper(slot=PolicySlot(FlipPolicy()), fallback=ScriptedFallback(), costs=CostConfig(),
                     store=StateStore("sqlite://"), config=ServeConfig(), trading_rules=EVERY_4)  # fmt: skip


# -- live ----------------------------------------------------------------------------------------


@pytest.fixture
def fake():
    with FakeBinance(CANDLES, FUNDING, now_ms=T0) as server:
        yield server


def _live(fake, policy, rules, store=None) -> tuple[LiveLoop, StateStore]:
    client = make_client(api_key="k", secret="s", base_url=fake.url, timeout_ms=2_000, rate_limit=False)
    broker = BinanceFuturesBroker(client, read_attempts=3, sleep=lambda s: None)
    store = store or StateStore("sqlite://")
    loop = LiveLoop(broker, store, LiveConfig(context_bars=1_010), primary=policy, fallback=ScriptedFallback(),
                    wall_clock_s=lambda: fake.now_ms / 1000.0, sleep=lambda s: None, trading_rules=rules)  # fmt: skip
    return loop, store


def test_live_decides_at_decision_bars_only_and_holds_between_them_across_a_restart(fake) -> None:
    policy = Recording(lambda ctx: LONG)
    loop, store = _live(fake, policy, EVERY_4)
    for k in range(9):
        fake.now_ms += H_MS if k else 0  # the next bar closes (its stops and take-profits trigger)
        if k == 5:  # a restart: a new process, the same store; no counter to lose
            loop, _ = _live(fake, policy, EVERY_4, store)
        loop.step()
    rows = store.decisions("live")
    assert len(rows) == 9 and policy.asked and all((t.hour + 1) % 4 == 0 for t in policy.asked)
    assert len(policy.asked) == sum((t.hour + 1) % 4 == 0 for t in rows["bar_open_time"])
    others = rows[~rows["bar_open_time"].isin(policy.asked)]
    assert (others["source"] == "guard").all() and others["fallback_reason"].str.startswith("not_decision_bar").all()
    entries = store.intents("live").query("kind == 'entry'")
    assert len(entries) == 1 and entries["bar_open_time"].iloc[0] == policy.asked[0]  # entered at a decision bar
    assert fake.position()[0] > 0 and {a["algoStatus"] for a in fake.trading.algo_orders} >= {"NEW"}  # protected
    assert_consistent(fake, store)


def test_live_holds_a_position_younger_than_the_holding_period(fake) -> None:
    loop, store = _live(fake, FlipPolicy(), HOLD_3)  # reverses every bar; stops 1 ATR away still act
    for k in range(14):
        fake.now_ms += H_MS if k else 0
        loop.step()
    rows = store.decisions("live")
    held = rows[rows["fallback_reason"].fillna("").str.contains("min_hold")]
    assert len(held) >= 3 and (held["source"] == "guard").all()
    assert (store.events("live")["kind"] == "min_hold").sum() == len(held)
    intents = store.intents("live")
    entries = intents[intents["kind"] == "entry"]["bar_open_time"].tolist()
    for t in intents[intents["kind"] == "exit"]["bar_open_time"]:  # a signal exit only once 3 bars old
        assert t - max(e for e in entries if e < t) >= 3 * HOUR
    assert_consistent(fake, store)


@pytest.fixture(scope="module")
def band_bundle(tmp_path_factory):
    return kit.build_bundle(tmp_path_factory.mktemp("band") / "bundle", env=EnvConfig(trading_rules=BAND))


def test_live_refuses_a_rebalance_band_at_load_and_as_a_hot_swap_candidate(fake, band_bundle, tmp_path) -> None:
    with pytest.raises(UnservableBundleError, match=r"rebalance_band_frac=0\.2"):
        _live(fake, FlipPolicy(), BAND)
    with pytest.raises(UnservableBundleError, match="no partial resize orders"):  # the bundle's own rules
        _live(fake, FrozenPPOPolicy(load_bundle(band_bundle)), None)
    with pytest.raises(UnservableBundleError, match="serve this bundle on paper"):
        refuse_unservable_bundle(band_bundle)
    client = make_client(api_key="k", secret="s", base_url=fake.url, timeout_ms=2_000, rate_limit=False)
    with pytest.raises(UnservableBundleError):  # ats serve --mode testnet|live
        build_live_loop(mode="testnet", bundle_dir=band_bundle, store=StateStore("sqlite://"),
                        broker=BinanceFuturesBroker(client), live_config=LiveConfig(), force_gate=True,
                        use_guard=False, log=lambda m: None)  # fmt: skip
    with pytest.raises(BundleRejected, match="rebalance_band_frac"):  # a hot-swap candidate: rejected, not served
        validate_candidate(band_bundle, load_live_policy, None)
    plain = kit.build_bundle(tmp_path / "plain")
    assert isinstance(validate_candidate(plain, load_live_policy, None), FrozenPPOPolicy)
    refuse_unservable_bundle(plain)
    refuse_unservable_bundle(tmp_path / "missing")  # unreadable: left to the loader to report


def test_live_trades_by_the_primary_bundles_costs_and_rules(fake, tmp_path) -> None:
    rules = TradingRulesConfig(decision_interval_bars=2, min_hold_bars=4)
    env = EnvConfig(trading_rules=rules, costs=CostConfig(slippage_bps=3.0))
    policy = FrozenPPOPolicy(load_bundle(kit.build_bundle(tmp_path / "b", env=env)))
    loop, _ = _live(fake, policy, None)
    assert loop.trading_rules == rules and loop.costs.slippage_bps == 3.0
    loop, _ = _live(fake, FlipPolicy(), None)  # not a bundle: the defaults
    assert loop.trading_rules is None and loop.costs == CostConfig()
    client = make_client(api_key="k", secret="s", base_url=fake.url, timeout_ms=2_000, rate_limit=False)
    explicit = LiveLoop(BinanceFuturesBroker(client), StateStore("sqlite://"), LiveConfig(), primary=policy,
                        fallback=ScriptedFallback(), trading_rules=EVERY_4, costs=CostConfig(slippage_bps=0.0))
    assert explicit.trading_rules == EVERY_4 and explicit.costs.slippage_bps == 0.0  # given ones win
