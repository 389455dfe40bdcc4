"""End to end on three bundled symbols (configs/smoke_multi.yaml): pooled training, per-symbol test report with an
equal-weight portfolio line, a manifest listing every symbol and spec, and a pooled bundle serving one symbol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ats_cli.main import app
from market.instruments import BUNDLED_SPECS

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = ["BTCUSDT", "ETHUSDT", "XRPUSDT"]
STRATEGIES = {"ppo", "v1", "buy_and_hold", "tsmom", "flat", "random"}


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory) -> Path:
    """``ats train --config configs/smoke_multi.yaml --out RUN`` (the CLI the README documents)."""
    run = tmp_path_factory.mktemp("multi") / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(REPO / "configs" / "smoke_multi.yaml"), "--out", str(run)])
    assert result.exit_code == 0, result.output
    return run


def test_report_breaks_results_down_by_symbol_with_an_equal_weight_portfolio(multi_run):
    metrics = json.loads((multi_run / "report" / "metrics.json").read_text())
    assert list(metrics["by_symbol"]) == SYMBOLS
    for sym in SYMBOLS:
        assert set(metrics["by_symbol"][sym]) == STRATEGIES
        assert metrics["by_symbol"][sym]["flat"]["total_return"] == 0.0
        assert metrics["by_symbol"][sym]["buy_and_hold"]["fees_paid"] > 0
    assert metrics["portfolio"]["weighting"] == "equal" and metrics["portfolio"]["symbols"] == SYMBOLS
    # the top-level strategy lines are the equal-weight portfolio: one account per symbol, never rebalanced, so
    # the portfolio's return is the mean of the symbols' returns and its costs the mean of theirs
    for name in STRATEGIES:
        per = [metrics["by_symbol"][s][name] for s in SYMBOLS]
        assert metrics[name]["total_return"] == pytest.approx(np.mean([m["total_return"] for m in per]), abs=1e-12)
        assert metrics[name]["fees_paid"] == pytest.approx(np.mean([m["fees_paid"] for m in per]), abs=1e-9)
        assert metrics[name]["n_trades"] == sum(m["n_trades"] for m in per)
    # each symbol traded its own funding history: buy-and-hold's funding differs between symbols
    funding = [metrics["by_symbol"][s]["buy_and_hold"]["funding_paid"] for s in SYMBOLS]
    assert len(set(funding)) == 3
    assert [metrics["instruments"][s]["spec"]["symbol"] for s in SYMBOLS] == SYMBOLS
    assert set(metrics["regime_slices_by_symbol"]) == set(SYMBOLS)
    html = (multi_run / "report" / "report.html").read_text()
    assert "XRPUSDT: test-period metrics" in html and "equal-weight portfolio" in html


def test_manifest_lists_the_symbols_and_their_specs(multi_run):
    manifest = json.loads((multi_run / "bundle" / "manifest.json").read_text())
    data = manifest["data"]
    assert data["symbols"] == SYMBOLS and data["symbol"] == "BTCUSDT"
    specs = {s: data["instruments"][s] for s in SYMBOLS}
    assert all(specs[s]["origin"] == "bundled_table" for s in SYMBOLS)  # smoke_multi names no spec file
    assert [specs[s]["spec"] for s in SYMBOLS] == [BUNDLED_SPECS[s].model_dump(mode="json") for s in SYMBOLS]
    assert [specs[s]["spec"]["tick_size_usdt"] for s in SYMBOLS] == [0.1, 0.01, 0.0001]
    assert all(data["by_symbol"][s]["candles_sha256"] for s in SYMBOLS)
    assert len({data["by_symbol"][s]["candles_sha256"] for s in SYMBOLS}) == 3
    assert set(manifest["metrics"]["validation"]) >= {"sortino", *(f"sortino/{s}" for s in SYMBOLS)}
    folds = json.loads((multi_run / "folds.json").read_text())
    for f in folds:  # out-of-fold per symbol: the same predicted times, each fitted only on its rows before them
        assert set(f["by_symbol"]) == set(SYMBOLS) and f["purge_bars"] >= 12
        spans = {tuple(f["by_symbol"][s]["predict_span"]) for s in SYMBOLS}
        assert len(spans) == 1
        for s in SYMBOLS:
            assert f["by_symbol"][s]["fit_rows"][1] == f["by_symbol"][s]["predict_rows"][0]
    val = json.loads((multi_run / "validation_history.json").read_text())
    assert max(h["n_trades"] for h in val) > 0  # the smoke PPO trades on validation (dead zone 0.05)
    # the checkpoint is the one with the best equal-weight portfolio validation Sortino over all symbols
    best = max(val, key=lambda h: h["sortino"])
    assert manifest["metrics"]["selected_step"] == best["timesteps"]
    assert manifest["metrics"]["validation"]["sortino"] == best["sortino"]


def test_pooled_bundle_serves_one_of_its_symbols_with_that_symbols_spec(multi_run, tmp_path):
    from serving.app import _policies, serve_replay
    from serving.hotswap import BackoffConfig
    from serving.store import StateStore

    _, _, costs, _ = _policies(multi_run / "bundle", BackoffConfig(), None, tmp_path / "x.sqlite", lambda s: None,
                               "XRP/USDT:USDT")
    assert costs.instrument.symbol == "XRPUSDT" and costs.tick_size_quote == 0.0001
    db = tmp_path / "state.sqlite"
    summary = serve_replay(replay=multi_run / "replay" / "XRPUSDT" / "test_candles.parquet",
                           bundle_dir=multi_run / "bundle", db_path=db, warmup_bars=700, max_bars=20,
                           log=lambda s: None, symbol="XRPUSDT")
    assert summary.bars == 20
    decisions = StateStore.sqlite(db).decisions()
    assert (decisions["source"] == "v2").all(), decisions["fallback_reason"].dropna().unique()[:3]


def test_evaluating_a_pooled_bundle_on_one_of_its_symbols_is_not_a_transfer(multi_run, tmp_path):
    from market.bundled import bundled_candles_path
    from market.candles import load_candles
    from market.instruments import resolve_spec
    from training.evaluate import evaluate_bundle

    out = tmp_path / "eval"
    evaluate_bundle(multi_run / "bundle", load_candles(bundled_candles_path("XRPUSDT")).loc[:"2022-08-20"],
                    pd.Timestamp("2022-07-15", tz="UTC"), pd.Timestamp("2022-08-01", tz="UTC"), out,
                    data_label="bundled XRPUSDT", log=lambda s: None,
                    instrument=resolve_spec("XRPUSDT"))
    record = json.loads((out / "metrics.json").read_text())["instrument"]
    assert record["trained_on"] == "BTCUSDT+ETHUSDT+XRPUSDT" and not record["transfer"]
    assert "pooled over" in (out / "report.html").read_text()
