"""The Policy protocol (issue 18, 2): every policy of the product declares what its callers read -- the
history it needs, the ATR period of its stops, its raw output, the state it carries across bars -- and
that state (:class:`market.decision.PolicyState`) is explicit: a policy restored from another's state
decides as the one it replaces."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from agents.baselines import BuyAndHoldPolicy, FlatPolicy, RandomPolicy
from agents.bundle import load_bundle
from agents.policy import FrozenPPOPolicy, SB3ActorPolicy
from agents.ppo_rllib import ActorPolicy
from envs.actions import ActionConfig, decode_action
from fallback.config import V1Config
from fallback.v1 import V1Policy, V1SeriesPolicy
from market.decision import (
    POLICY_MEMBERS,
    Decision,
    DecisionContext,
    Policy,
    PolicyState,
    PositionView,
    StatelessPolicy,
    missing_policy_members,
    require_policy,
)
from tests.kit.candles import make_candles
from tests.serving import bundle_kit as kit
from training.baselines import TsmomConfig, TsmomPolicy

H = pd.Timedelta("1h")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(kit.build_bundle(tmp_path_factory.mktemp("protocol") / "bundle"))


@pytest.fixture(scope="module")
def candles() -> pd.DataFrame:
    return make_candles(1_100, seed=3)


def _every_policy(bundle, candles) -> dict[str, Policy]:
    actions = ActionConfig()
    v1 = V1Config()
    return {
        "FrozenPPOPolicy": FrozenPPOPolicy(bundle),
        "SB3ActorPolicy": SB3ActorPolicy(None, actions),
        "ActorPolicy": ActorPolicy(None, actions),  # type: ignore[arg-type]
        "V1Policy": V1Policy(v1),
        "V1SeriesPolicy": V1SeriesPolicy(candles, v1),
        "FlatPolicy": FlatPolicy(),
        "BuyAndHoldPolicy": BuyAndHoldPolicy(),
        "RandomPolicy": RandomPolicy(lambda a: decode_action(a, actions), seed=1),
        "TsmomPolicy": TsmomPolicy(TsmomConfig(), actions, 3_600.0),
    }


def test_every_policy_of_the_product_satisfies_the_protocol(bundle, candles) -> None:
    policies = _every_policy(bundle, candles)
    for label, policy in policies.items():
        assert isinstance(policy, Policy), label
        assert missing_policy_members(policy) == [], label
        assert require_policy(policy, "test") is policy
        assert isinstance(policy.name, str) and policy.name, label
        assert policy.atr_period_bars is None or (isinstance(policy.atr_period_bars, int) and policy.atr_period_bars > 0)
        history = policy.history_bars(H)
        assert isinstance(history, int) and history >= 1, label
        assert isinstance(policy.state, PolicyState), label
        assert policy.last_raw_action is None, label  # nothing decided yet
    # what each declares
    assert policies["FrozenPPOPolicy"].atr_period_bars == bundle.feature_config.atr_period_bars
    assert policies["FrozenPPOPolicy"].history_bars(H) == 1_000
    assert policies["V1Policy"].atr_period_bars == policies["V1SeriesPolicy"].atr_period_bars == V1Config().atr_period_bars
    assert policies["V1Policy"].history_bars(H) == policies["V1SeriesPolicy"].history_bars(H) == V1Config().history_bars
    assert policies["TsmomPolicy"].history_bars(H) == TsmomConfig().history_bars
    assert policies["SB3ActorPolicy"].atr_period_bars is None  # stops in the env's ATR


def test_a_policy_missing_a_member_is_refused_by_name() -> None:
    class Bare:
        name = "bare"

        def decide(self, ctx: DecisionContext) -> Decision:
            return Decision.flat()

    assert not isinstance(Bare(), Policy)
    assert missing_policy_members(Bare()) == ["atr_period_bars", "last_raw_action", "state", "history_bars",
                                              "restore"]  # fmt: skip
    with pytest.raises(TypeError, match=r"fallback Bare is not a Policy: it lacks atr_period_bars, .*restore"):
        require_policy(Bare(), "fallback")
    assert set(POLICY_MEMBERS) == {"name", "atr_period_bars", "last_raw_action", "state", "history_bars", "restore",
                                   "decide"}  # fmt: skip


def _ctx(equity: float, peak: float | None = None) -> DecisionContext:
    t = pd.Timestamp("2024-01-01", tz="UTC")
    return DecisionContext(t, pd.DataFrame(), PositionView(), equity, peak_equity_usdt=peak)


@pytest.mark.parametrize(
    ("before", "equity", "stated", "after"),
    [
        (None, 100.0, None, 100.0),  # first bar: the equity shown
        (120.0, 100.0, None, 120.0),  # running maximum
        (120.0, 130.0, None, 130.0),
        (None, 100.0, 150.0, 150.0),  # the run's record wins (restart: a fresh instance)
        (200.0, 100.0, 150.0, 150.0),  # ... also over a higher memory of another run
        (None, 160.0, 150.0, 160.0),  # the current equity above the record
        (120.0, math.nan, None, 120.0),  # a non-finite equity changes nothing
        (None, math.nan, None, None),
        (120.0, math.inf, 150.0, 150.0),
    ],
)
def test_policy_state_advances_by_one_rule(before, equity, stated, after) -> None:
    assert PolicyState(before).advanced(_ctx(equity, stated)) == PolicyState(after)


def test_a_stateless_policy_carries_nothing() -> None:
    policy = FlatPolicy()
    policy.restore(PolicyState(123.0))
    assert policy.state == PolicyState() and isinstance(policy, StatelessPolicy)


def test_random_policy_depends_on_the_bar_only(candles) -> None:
    """The random baseline holds no generator state: a bar's action is the same whatever came before."""
    actions = ActionConfig()
    ctxs = [DecisionContext(t, candles.iloc[:1], PositionView(), 1_000.0) for t in candles.index[:20]]
    a, b = (RandomPolicy(lambda x: decode_action(x, actions), seed=7) for _ in range(2))
    forward = [(a.decide(c), a.last_raw_action.copy()) for c in ctxs]
    backward = [(b.decide(c), b.last_raw_action.copy()) for c in reversed(ctxs)][::-1]
    for (d1, r1), (d2, r2) in zip(forward, backward, strict=True):
        assert d1 == d2
        np.testing.assert_array_equal(r1, r2)
    assert len({tuple(r) for _, r in forward}) == len(ctxs)  # different bars, different draws
    other = RandomPolicy(lambda x: decode_action(x, actions), seed=8)
    other.decide(ctxs[0])
    assert not np.array_equal(other.last_raw_action, forward[0][1])


def test_frozen_policy_restored_from_the_state_sees_the_uninterrupted_observation(bundle) -> None:
    """Without a stated peak (a backtest-style caller) the drawdown input comes from the carried state: a new
    instance restored from the old one's state builds the same observation; one that is not, another."""
    candles = make_candles(1_030, seed=11)
    equities = [10_000.0, 10_400.0, 10_100.0, 9_900.0, 10_050.0, 9_800.0]
    ctxs = [DecisionContext(candles.index[t], candles.iloc[t - 999: t + 1], PositionView(), e)
            for t, e in zip(range(1_020, 1_026), equities, strict=True)]  # fmt: skip
    uninterrupted = FrozenPPOPolicy(bundle)
    reference = [uninterrupted.observation(c) for c in ctxs]
    assert uninterrupted.state == PolicyState(10_400.0)
    first = FrozenPPOPolicy(bundle)
    for c in ctxs[:3]:
        first.observation(c)
    restored, forgetful = FrozenPPOPolicy(bundle), FrozenPPOPolicy(bundle)
    restored.restore(first.state)
    n_market = len(bundle.market_obs_names)
    for c, ref in zip(ctxs[3:], reference[3:], strict=True):
        got = restored.observation(c)
        np.testing.assert_allclose(got[:n_market], ref[:n_market], rtol=0, atol=1e-4)  # HMM filter cold start
        np.testing.assert_array_equal(got[n_market:], ref[n_market:])  # the account features: exact
        assert not np.array_equal(forgetful.observation(c)[n_market:], ref[n_market:])  # the state matters
    assert restored.state == uninterrupted.state


def test_last_raw_action_is_reset_by_a_failed_call(bundle, candles) -> None:
    policy = FrozenPPOPolicy(bundle)
    ctx = DecisionContext(candles.index[-1], candles.iloc[-1_000:], PositionView(), 10_000.0)
    policy.decide(ctx)
    assert policy.last_raw_action is not None and np.isfinite(policy.last_raw_action).all()
    with pytest.raises(ValueError, match="too little history"):
        policy.decide(DecisionContext(candles.index[-1], candles.iloc[-5:], PositionView(), 10_000.0))
    assert policy.last_raw_action is None
