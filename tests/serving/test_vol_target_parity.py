"""Backtest/paper parity of a bundle with volatility-targeted sizing and trading rules (issues 16 and 18).

A bundle whose env decodes the size action as a fraction of a target volatility (``ActionConfig.sizing_mode =
"vol_target"``: the exposure is ``u * target / sigma``, sigma the ex-ante volatility at the decided bar) and trades
by rules (a decision every 4 bars, and a minimum holding period of 6 bars or a rebalance band of 20 %) is traded over
the same candles by the backtester (:func:`training.backtest.run_backtest`: the env reads the decisions at its
decision bars, the kernel holds young positions and resizes outside the band) and by paper serving
(:func:`serving.loop.run_replay` with the bundle's trading rules: the policy asked at decision bars only, a young
position's close or flip read as a hold, the paper broker's kernel resizing).

The policy computes sigma from the candles it is given (:func:`agents.policy.decision_vol_annual`, the last
``history_bars`` of them), so both give it at least that history and it decides the same in both. The backtest's
observation is the one paper serving builds from the candles (a fresh policy per decision bar: serving asks only at
decision bars, so its HMM filter starts from the window each time), so the comparison is of the decision path and
the accounting: the same decisions at every decision bar and the same equity at every close.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from agents.bundle import load_bundle
from agents.policy import FrozenPPOPolicy, decision_vol_annual
from envs.actions import ActionConfig
from envs.config import TradingRulesConfig
from envs.trading_env import EnvConfig, EnvData
from market.decision import Decision, DecisionContext, PositionView, StatelessPolicy
from market.features import atr as atr_indicator
from serving.loop import ServeConfig, run_replay
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.serving import bundle_kit as kit
from training.backtest import run_backtest

RULES = {
    "min_hold": TradingRulesConfig(decision_interval_bars=4, min_hold_bars=6),
    "band": TradingRulesConfig(decision_interval_bars=4, rebalance_band_frac=0.2),
}
START, END = 1_100, 1_260  # the traded rows of the candles (160 bars after 1,100 of history)


class Flat(StatelessPolicy):
    name = "v1"

    def decide(self, ctx: DecisionContext) -> Decision:
        return Decision.flat()


class Recording(FrozenPPOPolicy):
    """The bundle policy, recording its decisions by bar."""

    def __init__(self, bundle) -> None:
        super().__init__(bundle)
        self.decisions: dict[pd.Timestamp, Decision] = {}

    def decide(self, ctx: DecisionContext) -> Decision:
        decision = super().decide(ctx)
        self.decisions[ctx.bar_open_time] = decision
        return decision


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    env = EnvConfig(actions=ActionConfig(sizing_mode="vol_target"))
    bundle = load_bundle(kit.make_it_trade(kit.build_bundle(tmp_path_factory.mktemp("vt") / "bundle", env=env)))
    candles = make_candles(END, seed=5)
    atr = atr_indicator(candles, bundle.feature_config.atr_period_bars)
    history = FrozenPPOPolicy(bundle).history_bars(pd.Timedelta("1h"))
    n_market = len(bundle.market_obs_names)
    # the market observation paper serving builds at each bar (cold filter, as at its decision bars)
    obs = np.stack([FrozenPPOPolicy(bundle).observation(DecisionContext(
        candles.index[t], candles.iloc[t + 1 - history : t + 1], PositionView(), 10_000.0))[:n_market]
        for t in range(START, END)])  # fmt: skip
    data = EnvData.from_frames(candles.iloc[START:END], pd.DataFrame(obs, index=candles.index[START:END]),
                               atr[START:END])  # fmt: skip
    return bundle, candles, atr, history, data


@pytest.mark.parametrize("rules", sorted(RULES))
def test_vol_target_bundle_decides_the_same_in_backtest_and_paper(setup, rules):
    base, candles, atr, history, data = setup
    bundle = dataclasses.replace(base, env_config=base.env_config.updated(trading_rules=RULES[rules]))
    backtest_policy = Recording(bundle)
    backtest = run_backtest(backtest_policy, data, candles, bundle.env_config, offset=START, history_bars=history)

    store = StateStore("sqlite://")
    paper_policy = Recording(bundle)
    summary = run_replay(candles, primary=paper_policy, fallback=Flat(), atr=atr, costs=bundle.env_config.costs,
                         store=store, trading_rules=bundle.env_config.trading_rules,
                         config=ServeConfig(warmup_bars=START, context_bars=history, decision_timeout_ms=600_000,
                                            initial_equity_usdt=bundle.env_config.initial_equity_usdt))  # fmt: skip

    # asked at decision bars only (bars closing at a multiple of 4 h), the same decisions as in the backtest
    times = candles.index[START:END]
    decision_bars = [t for t in times if (t.hour + 1) % 4 == 0]
    assert sorted(paper_policy.decisions) == decision_bars
    # a decision bar's close or flip of a position held for fewer than 6 bars is a hold (source 'guard')
    assert (summary.events["min_hold"] >= 1) == (rules == "min_hold")
    assert summary.decisions_v2 + summary.events["min_hold"] == len(decision_bars)
    assert set(decision_bars) - set(backtest_policy.decisions) <= {times[-1]}  # the backtest ends at the last bar
    for t in decision_bars:
        if t in backtest_policy.decisions:
            assert paper_policy.decisions[t] == backtest_policy.decisions[t], t
    # sized by the volatility: the leverage and margin fraction vary with it
    entries = [d for d in paper_policy.decisions.values() if d.direction != 0]
    assert len({round(d.leverage * d.size_frac, 6) for d in entries}) > 5
    vols = [decision_vol_annual(candles.loc[:t].iloc[-history:], bundle.env_config.actions) for t in decision_bars]
    assert np.isfinite(vols).all() and min(vols) > 0
    rows = store.decisions("paper").set_index("bar_open_time")
    held = rows[rows["source"] == "guard"]["fallback_reason"]
    assert held.str.startswith("not_decision_bar").sum() == len(times) - len(decision_bars)
    assert held.str.contains("min_hold").sum() == summary.events["min_hold"]

    # the same account: equity at every close, trades
    served = store.equity("paper").set_index("bar_open_time")["equity_usdt"].astype(float)
    assert served.index.equals(backtest.equity.index) and len(backtest.trades) >= 4
    np.testing.assert_allclose(served.to_numpy(), backtest.equity.to_numpy(), rtol=0, atol=1e-6)
    fills = store.fills("paper")
    assert ("rebalance" in set(fills["reason"])) == (rules == "band")  # the band resizes held positions
