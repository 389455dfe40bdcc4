"""Volatility-targeted decoding in the policies (issue 16): the ex-ante volatility ``decode_action`` needs is computed
causally from the candles the policy is given, with the env's estimator, on the window the observation uses."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from agents.bundle import load_bundle
from agents.policy import FrozenPPOPolicy, SB3ActorPolicy, decision_vol_annual
from envs.actions import ActionConfig, decode_action
from envs.sizing import ex_ante_vol_annual, vol_target_fields
from envs.trading_env import EnvConfig
from market.decision import DecisionContext, PositionView
from tests.kit.candles import make_candles
from tests.serving import bundle_kit as kit

VT = ActionConfig(sizing_mode="vol_target", vol_span_bars=200, vol_min_bars=24)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    env = EnvConfig(actions=VT)
    return load_bundle(kit.make_it_trade(kit.build_bundle(tmp_path_factory.mktemp("vt") / "bundle", env=env)))


@pytest.fixture(scope="module")
def candles() -> pd.DataFrame:
    return make_candles(1_300, seed=11)


def test_decision_vol_is_the_envs_estimator_at_the_last_close_and_causal(candles) -> None:
    assert decision_vol_annual(candles, ActionConfig()) is None  # equity_fraction sizing reads no volatility
    window = candles.iloc[:900]
    vol = decision_vol_annual(window, VT)
    expected = ex_ante_vol_annual(window["close"].to_numpy(), 3_600.0, VT.vol_span_bars, VT.vol_min_bars)[-1]
    assert vol == expected and 0.05 < vol < 5.0
    # causal: the env's value over the whole series at that bar (the same start), whatever comes after it
    full = ex_ante_vol_annual(candles["close"].to_numpy(), 3_600.0, VT.vol_span_bars, VT.vol_min_bars)
    assert full[899] == pytest.approx(vol, rel=1e-12)
    assert math.isnan(decision_vol_annual(candles.iloc[:10], VT))  # fewer returns than vol_min_bars: no estimate
    assert math.isnan(decision_vol_annual(candles.iloc[:1], VT))


def test_frozen_policy_sizes_by_the_volatility_of_its_history_window(bundle, candles) -> None:
    policy = FrozenPPOPolicy(bundle)
    history = policy.history_bars(pd.Timedelta("1h"))
    t = 1_250
    ctx = DecisionContext(candles.index[t], candles.iloc[t + 1 - history : t + 1], PositionView(), 10_000.0)
    decision = policy.decide(ctx)
    raw = np.asarray(policy.last_raw_action, dtype=np.float64)
    vol = decision_vol_annual(ctx.candles, VT)
    assert decision == decode_action(raw, VT, ex_ante_vol_annual=vol)
    if decision.direction != 0:
        u = (min(1.0, max(-1.0, raw[2])) + 1.0) / 2.0
        assert (decision.leverage, decision.size_frac) == vol_target_fields(u, VT.target_vol_annual, vol, VT.max_leverage)
    # more history than the policy's window: the same decision (backtest, paper and live give different lengths)
    longer = DecisionContext(candles.index[t], candles.iloc[: t + 1], PositionView(), 10_000.0)
    assert FrozenPPOPolicy(bundle).decide(longer) == decision


def test_actor_adapter_passes_the_volatility_too(candles) -> None:
    class Model:
        def predict(self, obs, deterministic):
            return np.array([0.9, 0.0, 0.2, 0.0, 0.0], dtype=np.float32), None

    ctx = DecisionContext(candles.index[600], candles.iloc[:601], PositionView(), 10_000.0, observation=np.zeros(3))
    decision = SB3ActorPolicy(Model(), VT).decide(ctx)
    vol = decision_vol_annual(ctx.candles, VT)
    u = (float(np.float32(0.2)) + 1.0) / 2.0
    assert decision.direction == 1
    assert (decision.leverage, decision.size_frac) == vol_target_fields(u, VT.target_vol_annual, vol, VT.max_leverage)
