"""Time-series momentum baseline (tsmom) and exits by reason: causality, sizing, the shared cost path, and the
exit counts against the kernel's event log, on synthetic and bundled real BTCUSDT 1h data."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from agents.baselines import BuyAndHoldPolicy, RandomPolicy
from envs.actions import ActionConfig, decode_action
from envs.config import CostConfig, TradingRulesConfig
from envs.trading_env import EnvConfig, TradingEnv
from fallback.config import V1Config
from market.decision import Decision, DecisionContext
from market.features import atr as atr_indicator
from market.trade_stats import exits_by_reason
from training.backtest import BacktestResult, run_backtest
from training.baselines import (
    BaselinesConfig,
    TsmomConfig,
    TsmomPolicy,
    ewma_vol,
    exposure_decision,
    max_exposure,
    tsmom_target,
)
from training.evaluate import EvalSpan, span_backtests, span_rule_env_data
from training.exits import exit_summary, exits_table, open_bars_at_end
from training.v1_eval import load_v1_candles, v1_env_data

H = 3600.0


@pytest.fixture(scope="module")
def candles() -> pd.DataFrame:
    return load_v1_candles(None)


def _span(candles: pd.DataFrame, start: str, days: int) -> EvalSpan:
    t0 = pd.Timestamp(start, tz="UTC")
    a, b = (int(np.searchsorted(candles.index, t)) for t in (t0, t0 + pd.Timedelta(days=days)))
    hist = candles.iloc[:b]
    return EvalSpan(hist, pd.DataFrame(index=hist.index), atr_indicator(hist, 14), a, b)


# ------------------------------------------------------------------------------------------------------
# The rule
# ------------------------------------------------------------------------------------------------------


def test_ewma_vol_is_pandas_ewm_std() -> None:
    r = np.random.default_rng(0).normal(0.0, 0.01, 500)
    want = pd.Series(r).ewm(span=60, adjust=True).std(bias=True).iloc[-1]
    assert ewma_vol(r, 60) == pytest.approx(want, rel=1e-10)


def test_sign_follows_the_trailing_return_on_a_synthetic_trend() -> None:
    cfg = TsmomConfig(lookback_bars=48, vol_span_bars=24)
    noise = np.random.default_rng(1).normal(0.0, 0.002, 300)
    up = 100.0 * np.cumprod(1.0 + 0.001 + noise)
    down = 100.0 * np.cumprod(1.0 - 0.001 + noise)
    assert tsmom_target(up, cfg, H)[0] == 1
    assert tsmom_target(down, cfg, H)[0] == -1
    # a turn: up for 200 bars, then down for 40: the 48-bar trailing return is negative, the 230-bar one not
    turn = np.concatenate([up[:200], up[199] * np.cumprod(1.0 - 0.003 + noise[:40])])
    assert turn[-1] < turn[-49] and turn[-1] > turn[-231]
    assert tsmom_target(turn, cfg, H)[0] == -1
    assert tsmom_target(turn, TsmomConfig(lookback_bars=230, vol_span_bars=24), H)[0] == 1
    # not enough history for the lookback: flat
    assert tsmom_target(up[:48], cfg, H) == (0, 0.0)


def test_exposure_scales_inversely_with_volatility_and_is_capped() -> None:
    cfg = TsmomConfig(lookback_bars=24, vol_span_bars=48, target_vol_annual=0.4)
    r = 0.0005 + np.random.default_rng(2).normal(0.0, 0.005, 400)
    d1, e1 = tsmom_target(100.0 * np.cumprod(1.0 + r), cfg, H)
    d2, e2 = tsmom_target(100.0 * np.cumprod(1.0 + 2.0 * r), cfg, H)  # every return doubled: vol x 2
    assert d1 == d2 == 1
    assert e2 == pytest.approx(e1 / 2.0, rel=1e-9)
    sigma = ewma_vol(r[-2 * 48 :], 48) * math.sqrt(
        365 * 24
    )  # the weights stop after 2 spans (VOL_WINDOW_SPANS)
    assert e1 == pytest.approx(0.4 / sigma, rel=1e-9)
    # the decision stays in the agent's action bounds; above them it is capped at max_leverage x max_size_frac
    actions = ActionConfig(max_leverage=3.0, max_size_frac=0.5)
    small = exposure_decision(1, 0.3, actions)
    assert (small.leverage, small.size_frac) == (1.0, pytest.approx(0.3))
    mid = exposure_decision(-1, 1.2, actions)
    assert mid.direction == -1 and mid.size_frac == 0.5 and mid.leverage == pytest.approx(2.4)
    capped = exposure_decision(1, 50.0, actions)
    assert capped.leverage == 3.0 and capped.size_frac == 0.5 and max_exposure(actions) == 1.5
    calm = 100.0 * np.cumprod(1.0 + 1e-3 * np.sign(r + 1.0) * 0.05)  # a near-riskless climb: tiny vol
    d, e = tsmom_target(calm, cfg, H)
    assert d == 1 and e > 1.5
    assert exposure_decision(d, e, actions).leverage * exposure_decision(
        d, e, actions
    ).size_frac == pytest.approx(1.5)
    assert exposure_decision(0, 1.0, actions) == Decision.flat()


def test_config_section_is_typed_and_strict() -> None:
    from pydantic import ValidationError

    from training.config import RunConfig

    data = {
        "load_start": "2022-01-01",
        "train_start": "2022-02-01",
        "val_start": "2022-03-01",
        "test_start": "2022-04-01",
        "test_end": "2022-05-01",
    }
    cfg = RunConfig.model_validate({"data": data, "baselines": {"tsmom": {"lookback_bars": 168}}})
    assert cfg.baselines.tsmom.lookback_bars == 168 and cfg.baselines.tsmom.target_vol_annual == 0.4
    assert RunConfig.model_validate({"data": data}).baselines == BaselinesConfig()
    with pytest.raises(ValidationError):
        RunConfig.model_validate({"data": data, "baselines": {"tsmom": {"lookback_days": 30}}})
    with pytest.raises(ValidationError):
        TsmomConfig(target_vol_annual=0.0)


@dataclass
class _Recorder:
    """Wraps a policy and records its decision at each bar open time."""

    inner: object
    name: str = "tsmom"

    def __post_init__(self) -> None:
        self.decisions: dict[pd.Timestamp, Decision] = {}

    def decide(self, ctx: DecisionContext) -> Decision:
        d = self.inner.decide(ctx)
        self.decisions[ctx.bar_open_time] = d
        return d


def test_tsmom_is_causal_on_real_data(candles: pd.DataFrame) -> None:
    """Changing the bars after t changes no decision taken at or before t (nor the equity up to t)."""
    span = _span(candles, "2023-03-01", 20)
    cfg = TsmomConfig(rebalance_interval_bars=6)  # more decision points in a short span
    n = span.end_row - span.start_row
    cut = span.start_row + n // 2  # bars after ``cut`` are rewritten: a crash to half the price
    fake = span.candles.copy()
    fake.iloc[cut + 1 :, fake.columns.get_indexer(["open", "high", "low", "close"])] *= 0.5
    fake_span = EvalSpan(fake, span.features, atr_indicator(fake, 14), span.start_row, span.end_row)
    env = EnvConfig(trading_rules=cfg.trading_rules())
    runs = []
    for s in (span, fake_span):
        rec = _Recorder(TsmomPolicy(cfg, env.actions, H))
        res = run_backtest(rec, span_rule_env_data(s), s.candles, env, offset=s.start_row,
                           history_bars=cfg.history_bars)  # fmt: skip
        runs.append((rec.decisions, res))
    (dec_a, res_a), (dec_b, res_b) = runs
    t_cut = span.candles.index[cut]
    before = [t for t in dec_a if t <= t_cut]
    assert len(before) == n // 2 + 1
    assert [dec_a[t] for t in before] == [dec_b[t] for t in before]
    k = cut - span.start_row  # equity[k] is marked at the close of bar ``cut``
    np.testing.assert_array_equal(res_a.equity.to_numpy()[: k + 1], res_b.equity.to_numpy()[: k + 1])
    # and the rewrite did matter afterwards
    assert any(dec_a[t] != dec_b[t] for t in dec_a if t > t_cut)


def test_tsmom_goes_through_the_shared_cost_path(candles: pd.DataFrame) -> None:
    """One long entry held through the span: equity = initial - fees - funding - slippage + qty x (last close -
    entry open), to the micro-USDT, with the costs the backtest reports; costs x 0 leave only the funding."""
    span = _span(candles, "2023-10-20", 10)
    cfg = TsmomConfig(rebalance_band_frac=None)  # no resize: one trade held to the end
    env = EnvConfig()
    runs = {m: span_backtests(None, span, env, V1Config(), strategies=("tsmom",), tsmom_cfg=cfg,
                              cost_multiplier=m)["tsmom"] for m in (0.0, 1.0)}  # fmt: skip
    last_close = float(span.candles["close"].iloc[span.end_row - 1])
    for mult, res in runs.items():
        held = np.flatnonzero(res.position_side)
        assert res.trades == () and (res.position_side[held[0] :] == 1).all()
        assert 0 < held[0] < 24  # the first decision bar closes at 00:00 UTC
        entry_open = float(span.candles["open"].iloc[span.start_row + held[0] + 1])
        qty = res.position_notional_usdt[-1] / last_close
        want = (env.initial_equity_usdt - res.fees_paid_usdt - res.funding_paid_usdt - res.slippage_paid_usdt
                + qty * (last_close - entry_open))  # fmt: skip
        assert res.equity.iloc[-1] == pytest.approx(want, abs=1e-6), mult
        assert res.funding_paid_usdt > 0  # long through positive funding in a rally
    assert runs[0.0].fees_paid_usdt == runs[0.0].slippage_paid_usdt == 0.0
    assert runs[1.0].fees_paid_usdt > 0 and runs[1.0].slippage_paid_usdt > 0
    # the same accounting as buy-and-hold: capped at 1x with all equity as margin and deciding every bar,
    # tsmom *is* buy-and-hold here, to the last bit
    ones = ActionConfig(max_leverage=1.0, max_size_frac=1.0)
    big = TsmomConfig(target_vol_annual=100.0, rebalance_band_frac=None, rebalance_interval_bars=1)
    for mult in (0.0, 1.0):
        t = span_backtests(None, span, EnvConfig(actions=ones), V1Config(), strategies=("tsmom",), tsmom_cfg=big,
                           cost_multiplier=mult)["tsmom"]  # fmt: skip
        bh = run_backtest(BuyAndHoldPolicy(), span_rule_env_data(span), span.candles,
                          EnvConfig(actions=ones, costs=CostConfig(cost_multiplier=mult)), offset=span.start_row)
        np.testing.assert_array_equal(t.equity.to_numpy(), bh.equity.to_numpy())
        assert (t.fees_paid_usdt, t.funding_paid_usdt) == (bh.fees_paid_usdt, bh.funding_paid_usdt)


def test_tsmom_rebalances_only_at_rebalance_bars_and_outside_the_band(candles: pd.DataFrame) -> None:
    span = _span(candles, "2022-05-01", 60)  # a volatile spring: flips and resizes
    cfg = TsmomConfig(rebalance_band_frac=0.2)
    res = span_backtests(None, span, EnvConfig(), V1Config(), strategies=("tsmom",), tsmom_cfg=cfg)["tsmom"]
    reasons = [t.exit_reason for t in res.trades]
    assert set(reasons) == {"exit_signal", "rebalance"}  # flips and partial closes; no stop, no target
    for t in res.trades:  # every exit fills at the open after a rebalance bar (its close at 00:00 UTC)
        assert pd.Timestamp(t.exit_time_ns, tz="UTC").hour == 0
    # without a band the size is set once at entry: only flips, at the same bars
    fixed = span_backtests(None, span, EnvConfig(), V1Config(), strategies=("tsmom",),
                           tsmom_cfg=TsmomConfig(rebalance_band_frac=None))["tsmom"]  # fmt: skip
    assert {t.exit_reason for t in fixed.trades} == {"exit_signal"}
    assert [t.exit_time_ns for t in res.trades if t.exit_reason == "exit_signal"] == [
        t.exit_time_ns for t in fixed.trades]  # fmt: skip
    # the agent's levers do not change tsmom: it trades under its own rules
    lever = EnvConfig(trading_rules=TradingRulesConfig(decision_interval_bars=4, min_hold_bars=48))
    again = span_backtests(None, span, lever, V1Config(), strategies=("tsmom",), tsmom_cfg=cfg)["tsmom"]
    np.testing.assert_array_equal(again.equity.to_numpy(), res.equity.to_numpy())


# ------------------------------------------------------------------------------------------------------
# Exits by reason
# ------------------------------------------------------------------------------------------------------


def test_exits_by_reason_by_hand() -> None:
    out = exits_by_reason(
        ["stop", "take_profit", "stop", "exit_signal", "liquidation", "funky"],
        [-10.0, 30.0, -20.0, 5.0, -100.0, 1.0],
        [2, 4, 6, 8, 10, 1],
    )
    assert out["stop"] == {
        "count": 2.0,
        "share": pytest.approx(2 / 6),
        "mean_pnl_usdt": -15.0,
        "total_pnl_usdt": -30.0,
        "mean_bars_held": 4.0,
    }
    assert out["signal"]["count"] == 1.0 and out["signal"]["mean_pnl_usdt"] == 5.0
    assert out["funky"]["count"] == 1.0  # a reason the kernel may add later is kept, not dropped
    assert sum(v["count"] for v in out.values()) == 6 and sum(
        v["share"] for v in out.values()
    ) == pytest.approx(1.0)
    empty = exits_by_reason([], [], [])
    assert set(empty) == {"signal", "stop", "take_profit", "liquidation", "rebalance"}
    assert empty["stop"]["count"] == 0.0 and math.isnan(empty["stop"]["share"])
    with pytest.raises(ValueError):
        exits_by_reason(["stop"], [1.0, 2.0], [1])


def test_open_bars_at_end() -> None:
    idx = pd.date_range("2024-01-01", periods=7, freq="1h", tz="UTC")
    eq = pd.Series(100.0, index=idx)

    def res(sides):
        return BacktestResult("x", eq, np.asarray(sides, np.int8), (), 0.0, 0.0, 0.0, 0.0, 0.0, 0, False)

    assert open_bars_at_end(res([0, 1, 1, 0, -1, -1])) == 2
    assert open_bars_at_end(res([1, 1, -1, -1, -1, -1])) == 4
    assert open_bars_at_end(res([1, 1, 1, 1, 1, 1])) == 6
    assert open_bars_at_end(res([1, 1, 1, 1, 1, 0])) is None
    s = exit_summary([res([1, 1, 1, 1, 1, 0]), res([0, 0, 0, 1, 1, 1])])
    assert s["end_of_period"] == {"count": 1.0, "mean_bars_held": 3.0} and s["n_closed_trades"] == 0.0


def test_exits_match_the_kernels_event_log_on_real_data(candles: pd.DataFrame) -> None:
    """A random policy on two weeks of real BTCUSDT 1h bars: stops, targets and signal exits; the counts by
    reason equal the exit fills of the env's event log, and sum to the closed trades."""
    span = _span(candles, "2024-03-01", 14)
    env_cfg = EnvConfig()
    data = v1_env_data(
        span.candles.iloc[span.start_row : span.end_row], span.atr[span.start_row : span.end_row]
    )
    policy = RandomPolicy(lambda x: decode_action(x, env_cfg.actions), seed=4)
    env = TradingEnv(
        data,
        EnvConfig(
            episode_len_bars=None,
            random_start=False,
            min_equity_frac=0.0,
            max_drawdown_frac=1.0,
            info_level="full",
        ),
    )
    obs, info = env.reset(options={"start_index": 0, "end_index": len(data.close) - 1})
    fills, done = [], False
    while not done:
        t = span.start_row + env.current_index
        ctx = DecisionContext(
            bar_open_time=span.candles.index[t],
            candles=span.candles.iloc[t - 10 : t + 1],
            position=env.position_view(),
            equity_usdt=env.equity_usdt,
            observation=obs,
        )
        obs, _, term, trunc, info = env.step_decision(policy.decide(ctx))
        fills.extend(info["fills"])
        done = term or trunc
    log = pd.Series([f.reason for f in fills if f.reason != "entry"]).value_counts().to_dict()
    res = run_backtest(
        RandomPolicy(lambda x: decode_action(x, env_cfg.actions), seed=4),
        data,
        span.candles,
        env_cfg,
        offset=span.start_row,
        history_bars=11,
    )
    s = exit_summary(res)
    names = {
        "exit_signal": "signal",
        "stop": "stop",
        "take_profit": "take_profit",
        "liquidation": "liquidation",
    }
    assert {names[k]: float(v) for k, v in log.items()} == {
        k: v["count"] for k, v in s["by_reason"].items() if v["count"] > 0
    }
    assert sum(v["count"] for v in s["by_reason"].values()) == s["n_closed_trades"] == len(res.trades)
    assert s["by_reason"]["stop"]["count"] > 0 and s["by_reason"]["take_profit"]["count"] > 0
    assert s["by_reason"]["signal"]["count"] > 0
    assert s["avg_holding_bars"] == pytest.approx(np.mean([t.bars_held for t in res.trades]))
    for reason, v in s["by_reason"].items():
        pnl = [t.pnl_usdt for t in res.trades if names.get(t.exit_reason) == reason]
        assert v["total_pnl_usdt"] == pytest.approx(sum(pnl))
    table = exits_table({"random": s})
    assert table.loc["all closed", "random"].startswith(f"{len(res.trades)} (100%), mean ")
    assert table.loc["liquidation", "random"] == "0" or s["by_reason"]["liquidation"]["count"] > 0


# ------------------------------------------------------------------------------------------------------
# The smoke run's report
# ------------------------------------------------------------------------------------------------------


def test_smoke_report_has_tsmom_and_exits_by_reason(smoke_run) -> None:
    metrics = json.loads((smoke_run / "report" / "metrics.json").read_text())
    assert "tsmom" in metrics and metrics["tsmom"]["n_bars"] == metrics["buy_and_hold"]["n_bars"]
    assert metrics["tsmom"]["fees_paid"] > 0 and metrics["tsmom"]["funding_paid"] != 0.0
    assert {"tsmom costs x0", "tsmom costs x1", "tsmom costs x2"} <= set(metrics["cost_sensitivity"])
    assert "tsmom" in metrics["regime_slices"]
    exits = metrics["exits_by_reason"]
    assert set(exits) == {"ppo", "v1", "buy_and_hold", "tsmom", "flat", "random"}
    for name, s in exits.items():
        assert (
            sum(v["count"] for v in s["by_reason"].values())
            == s["n_closed_trades"]
            == metrics[name]["n_trades"]
        )
    assert exits["buy_and_hold"]["end_of_period"]["count"] == 1.0
    html = (smoke_run / "report" / "report.html").read_text()
    assert "tsmom" in html and "exits by reason" in html and "Moskowitz" in html
