"""End to end on the bundled real data: train (smoke config), bundle, test report, paper serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agents.bundle import load_bundle
from ats_cli.main import app
from market import json_codec
from market.instruments import resolve_spec
from serving.app import serve_replay
from serving.store import StateStore

REQUIRED_METRICS = {
    "total_return", "sortino", "sharpe", "max_drawdown", "profit_factor", "win_rate",
    "turnover", "fees_paid", "funding_paid", "n_trades", "avg_leverage", "exposure",
}


def test_smoke_run_writes_bundle_and_report(smoke_run):
    bundle = smoke_run / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    for key in ("observation", "data", "config", "versions", "metrics", "files"):
        assert key in manifest
    assert len(manifest["observation"]["schema_hash"]) == 64
    assert manifest["data"]["candles_sha256"] and manifest["data"]["test"][2] > 0
    assert "sortino" in manifest["metrics"]["validation"]
    assert (bundle / "policy.safetensors").stat().st_size > 0
    assert any((smoke_run / "tb").rglob("events.out.tfevents*"))

    metrics = json.loads((smoke_run / "report" / "metrics.json").read_text())
    strategies = {"ppo", "v1", "buy_and_hold", "tsmom", "flat", "random"}
    assert set(metrics) == strategies | {"regime_slices", "cost_sensitivity", "exits_by_reason", "provenance",
                                         "instrument"}
    assert metrics["instrument"]["origin"] == "bundled_table" and metrics["instrument"]["spec"]["symbol"] == "BTCUSDT"
    assert manifest["data"]["instrument"]["spec"]["tick_size_usdt"] == 0.1 and not metrics["instrument"]["transfer"]
    # the report names the bundle it judged: its schema, file table and strategy config match the manifest
    from training.provenance import report_mismatches

    assert metrics["provenance"]["bundle"]["schema_hash"] == manifest["observation"]["schema_hash"]
    assert report_mismatches(metrics["provenance"], manifest) == []
    for name in strategies:
        assert REQUIRED_METRICS <= set(metrics[name]), name
    # flat never trades: exactly zero return, fees and trades under the same cost model
    assert metrics["flat"]["total_return"] == 0.0 and metrics["flat"]["n_trades"] == 0
    assert metrics["flat"]["fees_paid"] == 0.0
    # buy-and-hold pays one entry fee, so it must have paid fees, and funding is charged on it
    assert metrics["buy_and_hold"]["fees_paid"] > 0
    assert metrics["buy_and_hold"]["funding_paid"] != 0.0
    html = (smoke_run / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "buy_and_hold" in html


def test_bundle_loads_and_serves_with_v2(smoke_run, tmp_path):
    bundle = load_bundle(smoke_run / "bundle")
    assert bundle.actor.obs_dim == len(bundle.market_obs_names) + 6
    db = tmp_path / "state.sqlite"
    summary = serve_replay(
        replay=smoke_run / "replay" / "test_candles.parquet", bundle_dir=smoke_run / "bundle", db_path=db,
        warmup_bars=700, max_bars=40, log=lambda s: None,
    )
    assert summary.bars == 40
    decisions = StateStore.sqlite(db).decisions()
    assert len(decisions) == 40
    assert (decisions["source"] == "v2").all(), decisions["fallback_reason"].dropna().unique()[:3]
    raw = decisions["raw_action"].map(lambda s: json.loads(s) if isinstance(s, str) else s)
    assert all(len(a) == 5 and np.isfinite(a).all() for a in raw)


def test_corrupted_bundle_falls_back_to_v1_every_bar(smoke_run, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(smoke_run / "bundle", broken)
    weights = broken / "policy.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated weights file
    db = tmp_path / "state.sqlite"
    result = CliRunner().invoke(app, [
        "serve", "--mode", "paper", "--replay", str(smoke_run / "replay" / "test_candles.parquet"),
        "--bundle", str(broken), "--db", str(db), "--warmup-bars", "700", "--max-bars", "30",
    ])
    assert result.exit_code == 0, result.output
    decisions = StateStore.sqlite(db).decisions()
    assert len(decisions) == 30
    assert (decisions["source"] == "v1").all()
    assert decisions["fallback_reason"].str.contains("policy.safetensors").all()
    equity = StateStore.sqlite(db).equity()
    assert len(equity) >= 30 and np.isfinite(pd.to_numeric(equity["equity_usdt"])).all()


def test_serving_observation_matches_evaluation_observation(smoke_run):
    """Parity: the observation serving builds bar by bar from a 1,000-candle window equals the one
    the evaluation built on the full series (same bundle models), up to the effect of the finite
    window on recursive indicators (EMA/ATR/ADX seeds, HMM filter start)."""
    from agents.observation import model_outputs
    from agents.policy import FrozenPPOPolicy
    from market.candles import load_candles
    from market.decision import DecisionContext, PositionView
    from training.config import load_config
    from training.pipeline import prepare_data

    bundle = load_bundle(smoke_run / "bundle")
    cfg = load_config(smoke_run / "config.yaml")
    prep = prepare_data(cfg)
    a, b = prep.test_row, prep.n_rows
    market = pd.concat([prep.features.iloc[a:b], model_outputs(prep.features, bundle.models, start=a, end=b)], axis=1)
    expected = bundle.normalizer(market.to_numpy(np.float32))
    replay = load_candles(smoke_run / "replay" / "test_candles.parquet")
    policy = FrozenPPOPolicy(bundle)
    n_market = len(bundle.market_obs_names)
    worst = 0.0
    for i in (0, 50, 300, b - a - 1):
        t = replay.index.get_loc(market.index[i])
        ctx = DecisionContext(market.index[i], replay.iloc[max(0, t - 999) : t + 1], PositionView(), 10_000.0)
        got = policy.observation(ctx)
        worst = max(worst, float(np.abs(got[:n_market] - expected[i]).max()))
        np.testing.assert_array_equal(got[n_market:], np.zeros(6, np.float32))  # flat account, no drawdown
    # standardised units: 0.01 is 1 % of a feature's training standard deviation
    assert worst < 0.01, worst


def test_paper_serving_equity_equals_backtest_equity_for_v1(smoke_run, tmp_path):
    """One accounting: V1 replayed through the serving loop and paper broker over the whole test
    period gives, bar for bar, the equity of V1 backtested through the env."""
    from training.config import load_config
    from training.evaluate import test_period_backtests
    from training.pipeline import prepare_data

    cfg = load_config(smoke_run / "config.yaml")
    prep = prepare_data(cfg)
    backtest = test_period_backtests(cfg, load_bundle(smoke_run / "bundle"), prep)["v1"]
    db = tmp_path / "state.sqlite"
    summary = serve_replay(
        replay=smoke_run / "replay" / "test_candles.parquet", bundle_dir=tmp_path / "no-bundle", db_path=db,
        warmup_bars=1200, log=lambda s: None, symbol=cfg.data.symbol,  # no manifest: the replayed symbol's spec
    )
    assert summary.decisions_v2 == 0 and summary.decisions_v1 == summary.bars
    served = StateStore.sqlite(db).equity().set_index("bar_open_time")["equity_usdt"].astype(float)
    assert served.index[0] == backtest.equity.index[0]
    assert len(backtest.trades) > 0  # the comparison covers real fills
    np.testing.assert_allclose(served.to_numpy(), backtest.equity.to_numpy(), rtol=0, atol=1e-6)


def test_report_has_regime_slices_and_cost_sensitivity(smoke_run):
    slices = json.loads((smoke_run / "report" / "regime_slices.json").read_text())
    metrics = json.loads((smoke_run / "report" / "metrics.json").read_text())
    for name in ("ppo", "v1", "buy_and_hold", "flat"):
        parts = slices[name]
        assert abs(sum(p["share_of_bars"] for p in parts.values()) - 1.0) < 1e-9
        # compounding the regime slices gives back the whole period's return
        total = np.prod([1.0 + p["total_return"] for p in parts.values()]) - 1.0
        assert total == pytest.approx(metrics[name]["total_return"], abs=1e-9)
    sens = json.loads((smoke_run / "report" / "cost_sensitivity.json").read_text())
    assert sens["v1 costs x0"]["fees_paid"] == 0.0 and sens["v1 costs x0"]["slippage_paid"] == 0.0
    assert sens["v1 costs x2"]["fees_paid"] > sens["v1 costs x1"]["fees_paid"] > 0
    assert sens["v1 costs x1"]["total_return"] == pytest.approx(metrics["v1"]["total_return"])


def test_evaluate_bundle_on_a_user_period_reproduces_the_run_report(smoke_run, tmp_path):
    """`ats evaluate --bundle --data --period` on the run's own test period gives the run's numbers."""
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", "--bundle", str(smoke_run / "bundle"),
                                      "--period", "2022-07-15:2022-08-15", "--out", str(out),
                                      "--seed", "1"])  # the smoke config seeds its random baseline with 1
    assert result.exit_code == 0, result.output
    got = json_codec.loads((out / "metrics.json").read_text())
    want = json_codec.loads((smoke_run / "report" / "metrics.json").read_text())
    for name in ("ppo", "v1", "buy_and_hold", "tsmom", "flat", "random"):
        for key in ("total_return", "n_trades", "fees_paid", "avg_leverage"):
            assert got[name][key] == pytest.approx(want[name][key], rel=1e-9, nan_ok=True), (name, key)
    html = (out / "report.html").read_text()
    assert "NOT out of sample" not in html and "Out of sample" in html
    assert set(json.loads((out / "cost_sensitivity.json").read_text())) >= {"ppo costs x0", "v1 costs x2"}


def test_evaluate_bundle_says_when_the_period_is_in_sample(smoke_run, tmp_path):
    from training.evaluate import evaluate_bundle
    from training.v1_eval import load_v1_candles

    out = tmp_path / "insample"
    evaluate_bundle(smoke_run / "bundle", load_v1_candles(None), pd.Timestamp("2022-06-20", tz="UTC"),
                    pd.Timestamp("2022-06-25", tz="UTC"), out, data_label="bundled", log=lambda s: None,
                    instrument=resolve_spec("BTCUSDT"))
    assert "NOT out of sample" in (out / "report.html").read_text()


def test_evaluate_bundle_without_enough_history_names_what_is_missing(smoke_run, tmp_path):
    from market.errors import DataValidationError
    from training.evaluate import evaluate_bundle
    from training.v1_eval import load_v1_candles

    candles = load_v1_candles(None).loc["2022-07-01":"2022-09-01"]
    with pytest.raises(DataValidationError, match="warm-up bars"):
        evaluate_bundle(smoke_run / "bundle", candles, pd.Timestamp("2022-07-02", tz="UTC"),
                        pd.Timestamp("2022-07-20", tz="UTC"), tmp_path / "x", data_label="slice", log=lambda s: None,
                        instrument=resolve_spec("BTCUSDT"))


def test_cli_paper_serve_then_status_and_reset_risk(smoke_run, tmp_path):
    """The README's serving commands: `ats serve` (paper), `ats status`, `ats serve reset-risk`."""
    db = tmp_path / "state.sqlite"
    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--mode", "paper", "--replay", str(smoke_run / "replay" / "test_candles.parquet"),
                            "--bundle", str(smoke_run / "bundle"), "--db", str(db), "--warmup-bars", "700",
                            "--max-bars", "12"])
    assert r.exit_code == 0, r.output
    assert "served 12 bars" in r.output
    decisions = StateStore.sqlite(db).decisions()
    assert len(decisions) == 12 and decisions["bar_open_time"].is_unique
    r = runner.invoke(app, ["status", "--db", str(db)])
    assert r.exit_code == 0 and "risk state" in r.output and "decided by V2" in r.output
    r = runner.invoke(app, ["serve", "reset-risk", "--db", str(db), "--note", "test reset"])
    assert r.exit_code == 0 and "reset to" in r.output
    assert StateStore.sqlite(db).latest_risk_state("default").state == "ACTIVE"


def test_train_refuses_rllib_flags_with_the_sb3_backend(tmp_path):
    result = CliRunner().invoke(app, ["train", "--config", str(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"), "--out",
                                      str(tmp_path / "r"), "--num-env-runners", "2"])  # fmt: skip
    assert result.exit_code == 2 and "--num-env-runners only apply to --backend rllib" in result.output
    assert not (tmp_path / "r").exists()  # refused before anything ran
