"""Walk-forward folds and an end-to-end walk-forward on the bundled data (smoke config, 3 seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.walkforward import WalkForwardConfig, fold_windows

REPO = Path(__file__).resolve().parents[2]
H = pd.Timedelta(hours=1)


def _wf(**kw) -> WalkForwardConfig:
    base = dict(base_config="smoke.yaml", data_start="2022-01-01", start="2022-07-01", end="2022-07-11",
                folds=2, train_bars=1000, val_bars=48)
    return WalkForwardConfig(**{**base, **kw})


def test_fold_windows_tile_the_span_and_train_before_validation_before_test():
    ws = fold_windows(_wf(), H)
    # 10 days = 240 bars -> two test windows of 120 bars
    assert [w.test_start for w in ws] == [pd.Timestamp("2022-07-01", tz="UTC"), pd.Timestamp("2022-07-06", tz="UTC")]
    assert ws[-1].test_end == pd.Timestamp("2022-07-11", tz="UTC") and ws[0].test_end == ws[1].test_start
    for w in ws:
        assert w.train_start == pd.Timestamp("2022-01-01", tz="UTC")  # expanding
        assert w.val_start == w.test_start - 48 * H
    rolling = fold_windows(_wf(scheme="rolling"), H)
    assert all(w.val_start - w.train_start == 1000 * H for w in rolling)


def test_embargo_leaves_a_gap_before_each_test_window():
    ws = fold_windows(_wf(embargo_bars=12), H)
    assert all(w.test_start - w.val_start == (48 + 12) * H for w in ws)


def test_too_short_training_window_is_an_error():
    with pytest.raises(ValueError, match="train_bars"):
        fold_windows(_wf(data_start="2022-06-20"), H)


def test_walkforward_smoke_end_to_end(tmp_path):
    from training.gate import GateConfig, ReportMismatchError, apply_gate
    from training.provenance import report_mismatches
    from training.walkforward import load_walkforward, run_walkforward

    wf, base = load_walkforward(REPO / "configs" / "walkforward_smoke.yaml")
    assert wf.seeds == (0, 1, 2)
    summary = run_walkforward(wf, base, tmp_path / "out", log=lambda s: None)
    folds = json.loads((tmp_path / "out" / "folds.json").read_text())
    assert len(folds) == 6 and {f["seed"] for f in folds} == {0, 1, 2}
    assert [f["random_policy_seed"] for f in folds if f["seed"] == 0] == [0, 1]
    for f in folds:
        assert f["train_start"] < f["val_start"] < f["test_start"] < f["test_end"] and f["data_sha256"]
    all_strategies = {"ppo", "v1", "buy_and_hold", "tsmom", "flat", "random"}
    assert set(summary["stitched"]) == all_strategies and set(summary["per_fold"]) == all_strategies
    assert summary["stitched"]["flat"]["total_return"] == 0.0
    # the random policy trades, and every strategy is charged under the same cost model
    assert summary["stitched"]["random"]["n_trades"] > 0 and summary["stitched"]["random"]["fees_paid"] > 0
    assert summary["deflated_sharpe"]["n_trials"] == 3
    assert summary["pbo"] is None or summary["pbo"]["configs"] == ["ppo seed 0", "ppo seed 1", "ppo seed 2", "v1"]
    # provenance ties the report to the strategy: a fold's bundle has the same strategy config and schema
    prov = summary["provenance"]
    assert prov["git_commit"] and prov["versions"]["numpy"] and prov["walkforward_config"]["folds"] == 2
    fold_bundle = tmp_path / "out" / "fold0" / "seed1" / "bundle"
    manifest = json.loads((fold_bundle / "manifest.json").read_text())
    assert report_mismatches(prov, manifest) == []
    gate = apply_gate(fold_bundle, tmp_path / "out", GateConfig())
    assert gate["report_kind"] == "walkforward" and len(gate["report_sha256"]) == 64
    other = json.loads(json.dumps(manifest))
    other["config"]["ppo"]["learning_rate"] = 0.123  # another strategy: the gate refuses the report
    (fold_bundle / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(ReportMismatchError, match="strategy_config_sha256"):
        apply_gate(fold_bundle, tmp_path / "out", GateConfig())
    html = (tmp_path / "out" / "report.html").read_text()
    assert "run config" in html and "strategy config sha256" in html and "funding is charged" in html
    from tests.kit.chromium import CHROMIUM, render

    if CHROMIUM is not None:  # the walk-forward report renders in headless Chromium without console errors
        page = render(tmp_path / "out" / "report.html", tmp_path)
        assert "ats walk-forward" in page.dom and "deflated" in page.dom.lower()
        assert page.console == [] and page.screenshot_bytes > 20_000
    # regime slices and cost sensitivity of the stitched curves
    for name in ("ppo", "v1", "buy_and_hold", "tsmom", "random"):
        shares = [p["share_of_bars"] for p in summary["regime_slices"][name].values()]
        assert sum(shares) == pytest.approx(1.0)
    sens = summary["cost_sensitivity"]
    assert sens["v1 costs x0"]["fees_paid"] == 0.0 and sens["v1 costs x2"]["fees_paid"] > sens["v1 costs x1"]["fees_paid"]
    assert sens["v1 costs x1"]["total_return"] == pytest.approx(summary["stitched"]["v1"]["total_return"])
    assert "avg_leverage" in summary["stitched"]["random"]
    assert sens["tsmom costs x0"]["fees_paid"] == 0.0
    assert sens["tsmom costs x1"]["total_return"] == pytest.approx(summary["stitched"]["tsmom"]["total_return"])
    # exits by reason over the folds: the counts sum to the stitched closed trades; a position open at the end
    # of each of the 2 windows counts once per window
    exits = summary["exits_by_reason"]
    assert set(exits) == all_strategies
    for name, s in exits.items():
        assert sum(v["count"] for v in s["by_reason"].values()) == summary["stitched"][name]["n_trades"], name
    assert exits["buy_and_hold"]["end_of_period"]["count"] == 2.0 and exits["flat"]["end_of_period"]["count"] == 0.0
    assert "exits by reason" in html and "tsmom" in html
    assert (tmp_path / "out" / "report.html").read_text().count("data:image/png;base64,") >= 1


def test_embargo_sets_val_end_so_validation_stops_before_the_gap():
    from training.config import load_config
    from training.walkforward import fold_run_config

    ws = fold_windows(_wf(embargo_bars=12), H)
    base = load_config(REPO / "configs" / "smoke.yaml")
    for w in ws:
        assert w.val_end == w.test_start - 12 * H and w.val_start == w.val_end - 48 * H
        data = fold_run_config(base, w, 0, H).data
        assert data.ts("val_end") == w.val_end and data.ts("test_start") == w.test_start
    assert all(w.val_end is None for w in fold_windows(_wf(), H))


def _result(equity, sides, notional, trades=(), fees=0.0):
    from training.backtest import BacktestResult

    idx = pd.date_range("2022-01-01", periods=len(equity), freq="h", tz="UTC")
    return BacktestResult("x", pd.Series(equity, index=idx), np.asarray(sides, np.int8), tuple(trades), fees, 0.0,
                          0.0, 0.0, 0.0, 0, False, np.asarray(notional, np.float64))


def test_stitch_results_compounds_windows_as_one_account():
    from envs.accounting import ClosedTrade
    from training.walkforward import stitch_results

    t = ClosedTrade(entry_time_ns=0, exit_time_ns=1, side=1, qty_base=1.0, entry_price=1.0, exit_price=2.0,
                    pnl_usdt=50.0, exit_reason="signal", bars_held=1)
    a = _result([1000.0, 1100.0, 1210.0], [1, 1], [1000.0, 1100.0], fees=2.0)
    b = _result([500.0, 450.0], [-1], [250.0], trades=[t], fees=1.0)
    # second window starts from the first window's end (1210): factor 1210 / 500 = 2.42
    s = stitch_results([a, b], 1000.0)
    assert s.equity.to_numpy() == pytest.approx([1000.0, 1100.0, 1210.0, 1089.0])
    assert s.position_notional_usdt == pytest.approx([1000.0, 1100.0, 605.0])
    assert s.trades[0].pnl_usdt == pytest.approx(121.0) and s.fees_paid_usdt == pytest.approx(2.0 + 2.42)
    assert list(s.position_side) == [1, 1, -1]
    with pytest.raises(ValueError, match="no backtests"):
        stitch_results([], 1000.0)


def test_regime_slices_assign_returns_and_trades_to_the_regime_at_decision_time():
    from envs.accounting import ClosedTrade
    from training.evaluate import regime_slices

    hour_ns = 3_600_000_000_000
    t0 = pd.Timestamp("2022-01-01", tz="UTC").value
    # a trade decided at bar 2 (regime 1) fills at the open of bar 3
    trade = ClosedTrade(entry_time_ns=t0 + 3 * hour_ns, exit_time_ns=t0 + 4 * hour_ns, side=1, qty_base=1.0,
                        entry_price=1.0, exit_price=1.1, pnl_usdt=10.0, exit_reason="signal", bars_held=1)
    res = _result([100.0, 110.0, 99.0, 99.0, 108.9], [1, 1, 0, 1], [200.0, 220.0, 0.0, 99.0], trades=[trade])
    out = regime_slices(res, np.array([0, 0, 1, 1]), 3600.0)
    # regime 0: bars 0-1, returns +10 %, -10 %; regime 1: bars 2-3, returns 0, +10 %
    assert out["regime_0"]["total_return"] == pytest.approx(1.1 * 0.9 - 1)
    assert out["regime_1"]["total_return"] == pytest.approx(0.1)
    assert out["regime_0"]["avg_leverage"] == pytest.approx((200 / 110 + 220 / 99) / 2)
    assert out["regime_1"]["n_trades"] == 1 and out["regime_0"]["n_trades"] == 0
    assert out["regime_0"]["max_drawdown"] == pytest.approx(0.1)


def test_rerun_with_the_same_config_and_seed_reproduces_the_metrics(tmp_path):
    """The issue's reproducibility promise: same config, seeds and data -> the same metrics.json."""
    from training.walkforward import load_walkforward, run_walkforward

    wf, base = load_walkforward(REPO / "configs" / "walkforward_smoke.yaml")
    # one seed keeps this test short (model_copy skips the validator that asks real studies for 3)
    wf = wf.model_copy(update={"seeds": (3,)})
    first = run_walkforward(wf, base, tmp_path / "a", log=lambda s: None)
    second = run_walkforward(wf, base, tmp_path / "b", log=lambda s: None)
    assert first["stitched"] == second["stitched"]
    assert first["per_fold"] == second["per_fold"]
    strip = lambda folds: [{k: v for k, v in f.items() if k != "run_dir"} for f in folds]  # noqa: E731
    assert strip(json.loads((tmp_path / "a" / "folds.json").read_text())) == strip(
        json.loads((tmp_path / "b" / "folds.json").read_text()))
    # the smoke PPO stays flat on its test windows, so compare what training produced, bit for bit
    for fold in ("fold0", "fold1"):
        for name in ("policy.safetensors", "signals", "regime"):
            a, b = (tmp_path / run / fold / "seed3" / "bundle" / name for run in ("a", "b"))
            files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()) if a.is_dir() else [None]
            for rel in files_a:
                fa, fb = (a, b) if rel is None else (a / rel, b / rel)
                assert fa.read_bytes() == fb.read_bytes(), f"{fold}/{name}/{rel or ''} differs between reruns"


def test_seeds_must_be_at_least_three():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="seeds"):
        _wf(seeds=(0, 1))


def _trials_json(directory: Path, n_trials) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "trials.json").write_text(json.dumps({"n_trials": n_trials, "n_completed": 1, "backend": "sb3"}))
    return directory


def test_tuning_dir_trials_join_the_deflated_sharpe_count(tmp_path):
    """Issue 7: ``--tuning-dir`` adds the search's n_trials to the DSR's trial count, which deflates more."""
    from training.stats import deflated_sharpe_ratio
    from training.walkforward import dsr_trial_count, load_tuning_record

    record = load_tuning_record(_trials_json(tmp_path / "tune", 12))
    assert record.n_trials == 12 and record.trials_json == str((tmp_path / "tune" / "trials.json").resolve())
    assert len(record.sha256) == 64
    assert dsr_trial_count(3, 2) == {"seeds": 3, "variants": 1, "variant_seed_trials": 3, "tuning_trials_config": 2,
                                     "tuning_dir": 0, "total": 5}
    counted = dsr_trial_count(3, 2, record)
    assert counted == {"seeds": 3, "variants": 1, "variant_seed_trials": 3, "tuning_trials_config": 2,
                       "tuning_dir": 12, "total": 17}
    assert dsr_trial_count(3, 2, record, n_variants=2)["total"] == 2 * 3 + 2 + 12  # every variant x seed is a trial
    returns = np.random.default_rng(0).normal(2e-3, 1e-2, 2000)
    without, with_search = (deflated_sharpe_ratio(returns, n_trials=n, sr_variance=1e-3) for n in (5, counted["total"]))
    assert with_search.n_trials == 17 and with_search.dsr < without.dsr


def test_tuning_record_errors(tmp_path):
    from training.walkforward import load_tuning_record

    with pytest.raises(FileNotFoundError):
        load_tuning_record(tmp_path / "missing")
    for bad in (-1, "12", None, True):
        with pytest.raises(ValueError, match="n_trials"):
            load_tuning_record(_trials_json(tmp_path / f"bad{bad}", bad))
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "trials.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"trials\.json"):
        load_tuning_record(tmp_path / "notjson")


def test_walkforward_cli_passes_the_tuning_record(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import training.walkforward as wf_mod
    from ats_cli.main import app

    seen = {}
    monkeypatch.setattr(wf_mod, "run_walkforward", lambda wf, base, out, *, log, tuning, **_: seen.update(tuning=tuning))
    args = ["walkforward", "--config", str(REPO / "configs" / "walkforward_smoke.yaml"), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, [*args, "--tuning-dir", str(_trials_json(tmp_path / "tune", 7))])
    assert res.exit_code == 0, res.output
    assert seen["tuning"].n_trials == 7
    seen.clear()
    res = CliRunner().invoke(app, [*args, "--tuning-dir", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and seen == {}  # refused before any fold is trained


def test_walkforward_accepts_a_symbol_list(tmp_path):
    """A pooled base config: every fold trains on both symbols; the stitched lines are the equal-weight portfolio
    and the summary breaks them down by symbol."""
    import yaml

    from training.walkforward import load_walkforward, run_walkforward

    base = yaml.safe_load((REPO / "configs" / "smoke_multi.yaml").read_text())
    base["data"]["symbols"] = ["BTCUSDT", "XRPUSDT"]
    base["ppo"].update({"total_timesteps": 512, "eval_every_steps": 512})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    wf_raw = yaml.safe_load((REPO / "configs" / "walkforward_smoke.yaml").read_text())
    wf_raw.update({"base_config": "base.yaml", "folds": 1, "end": "2022-08-15", "bootstrap_samples": 50})
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(wf_raw))
    wf, cfg = load_walkforward(tmp_path / "wf.yaml")
    assert cfg.data.symbol_names == ("BTCUSDT", "XRPUSDT")
    summary = run_walkforward(wf, cfg, tmp_path / "out", log=lambda s: None)
    assert set(summary["by_symbol"]) == {"BTCUSDT", "XRPUSDT"}
    assert summary["portfolio"]["symbols"] == ["BTCUSDT", "XRPUSDT"]
    for name in ("ppo", "v1", "buy_and_hold", "tsmom", "flat", "random"):
        per = [summary["by_symbol"][s][name]["total_return"] for s in ("BTCUSDT", "XRPUSDT")]
        assert summary["stitched"][name]["total_return"] == pytest.approx(np.mean(per), abs=1e-12)
    assert set(summary["exits_by_reason_by_symbol"]["XRPUSDT"]) == set(summary["by_symbol"]["XRPUSDT"])
    manifest = json.loads((tmp_path / "out" / "fold0" / "seed0" / "bundle" / "manifest.json").read_text())
    assert manifest["data"]["symbols"] == ["BTCUSDT", "XRPUSDT"]
