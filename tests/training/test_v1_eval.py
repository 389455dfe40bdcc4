"""V1-only evaluation under the env's cost model, the walk-forward sweep and their commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ats_cli import v1_cmd
from ats_cli.main import app as main_app
from envs.accounting import ClosedTrade
from envs.trading_env import EnvConfig
from fallback.config import V1Config
from fallback.v1 import V1Policy
from market.features import atr as atr_indicator
from training.backtest import BacktestResult, run_backtest
from training.v1_eval import (
    evaluate_v1,
    grid_configs,
    load_v1_candles,
    parse_grid,
    parse_period,
    v1_env_data,
    walk_forward_sweep,
    window_stats,
)

T0, T1 = pd.Timestamp("2023-03-01", tz="UTC"), pd.Timestamp("2023-04-01", tz="UTC")


@pytest.fixture(scope="module")
def candles() -> pd.DataFrame:
    return load_v1_candles(None)


def test_evaluate_v1_equals_the_per_bar_policy_backtest(candles: pd.DataFrame) -> None:
    cfg, env = V1Config(), EnvConfig()
    fast = evaluate_v1(candles, T0, T1, cfg, env)
    a, b = (int(np.searchsorted(candles.index, t)) for t in (T0, T1))
    atr = atr_indicator(candles.iloc[:b], cfg.atr_period_bars)
    slow = run_backtest(V1Policy(cfg), v1_env_data(candles.iloc[a:b], atr[a:b]), candles.iloc[:b], env, offset=a,
                        history_bars=cfg.history_bars)  # fmt: skip
    assert len(fast.equity) == b - a == 744  # 31 days of 1h bars: 743 decisions + the initial mark
    assert fast.equity.index[0] == T0
    np.testing.assert_array_equal(fast.equity.to_numpy(), slow.equity.to_numpy())
    assert fast.trades == slow.trades and len(fast.trades) > 3
    assert fast.fees_paid_usdt > 0 and "funding_rate" in candles.columns  # costs on, funding joined


def test_report_v1_baseline_uses_v1s_atr_period_like_evaluate_v1(candles: pd.DataFrame) -> None:
    """Issue 8: with a feature ATR period != V1's, the report's V1 backtest (span_backtests, used by
    ``ats evaluate`` and ``ats walkforward``) places stops at V1's own ATR, exactly as evaluate_v1 does."""
    from training.evaluate import EvalSpan, span_backtests

    v1, env = V1Config(atr_period_bars=7), EnvConfig()
    a, b = (int(np.searchsorted(candles.index, t)) for t in (T0, T1))
    hist = candles.iloc[:b]
    feature_atr = atr_indicator(hist, 30)  # the feature config's period differs from V1's
    span = EvalSpan(hist, pd.DataFrame(index=hist.index), feature_atr, a, b)
    report = span_backtests(None, span, env, v1, strategies=("v1",))["v1"]
    alone = evaluate_v1(candles, T0, T1, v1, env)
    np.testing.assert_array_equal(report.equity.to_numpy(), alone.equity.to_numpy())
    assert report.trades == alone.trades and len(alone.trades) > 3
    # the check is sensitive: stops at the feature ATR (the old baseline) trade differently
    at_feature_atr = run_backtest(V1Policy(v1), v1_env_data(hist.iloc[a:b], feature_atr[a:b]), hist, env, offset=a,
                                  history_bars=v1.history_bars)  # fmt: skip
    assert at_feature_atr.trades != alone.trades


def test_span_backtests_without_a_bundle_only_runs_v1(candles: pd.DataFrame) -> None:
    from training.evaluate import EvalSpan, span_backtests

    hist = candles.iloc[:800]
    span = EvalSpan(hist, pd.DataFrame(index=hist.index), atr_indicator(hist, 14), 700, 800)
    with pytest.raises(ValueError, match="need a bundle"):
        span_backtests(None, span, EnvConfig(), V1Config(), strategies=("v1", "flat"))


def test_evaluate_v1_rejects_an_empty_period(candles: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="holds 0 bars"):
        evaluate_v1(candles, pd.Timestamp("2030-01-01", tz="UTC"), pd.Timestamp("2030-02-01", tz="UTC"),
                    V1Config(), EnvConfig())  # fmt: skip


def _trade(exit_ns: int, pnl: float) -> ClosedTrade:
    return ClosedTrade(0, exit_ns, 1, 1.0, 100.0, 100.0, pnl, "stop", 1)


def test_window_stats_by_hand() -> None:
    idx = pd.date_range("2024-01-01", periods=5, freq="1h", tz="UTC")
    eq = pd.Series([100.0, 110.0, 99.0, 99.0, 108.9], index=idx)
    ns = idx.asi8
    trades = (_trade(ns[1], 10.0), _trade(ns[2], -11.0), _trade(ns[4], 9.9), _trade(ns[4], -2.0))
    res = BacktestResult("v1", eq, np.zeros(4, np.int8), trades, 0.0, 0.0, 0.0, 0.0, 0.0, 0, False)
    # window = bar closes at idx[2..4]: returns 99/110 - 1, 0, 0.1; trades exiting at idx[2], idx[4]
    st = window_stats(res, int(ns[2]), int(ns[4]) + 1, 8760.0)
    assert st.n_trades == 3
    assert st.profit_factor == pytest.approx(9.9 / 13.0)
    assert st.win_rate == pytest.approx(1 / 3)
    assert st.total_return == pytest.approx(108.9 / 110.0 - 1.0)
    r = np.array([99 / 110 - 1, 0.0, 0.1])
    assert st.sortino == pytest.approx(r.mean() / math.sqrt(np.mean(np.minimum(r, 0) ** 2)) * math.sqrt(8760))


def test_parsers() -> None:
    assert parse_period("2024-01-01:2024-02-01") == (pd.Timestamp("2024-01-01", tz="UTC"),
                                                      pd.Timestamp("2024-02-01", tz="UTC"))  # fmt: skip
    with pytest.raises(ValueError, match="START must be before END"):
        parse_period("2024-02-01:2024-01-01")
    with pytest.raises(ValueError, match="START:END"):
        parse_period("2024-01-01")
    assert parse_grid("breakout_k=0.3,1; trigger_mode=breakout,either;trailing_enabled=false") == {
        "breakout_k": [0.3, 1],
        "trigger_mode": ["breakout", "either"],
        "trailing_enabled": [False],
    }
    with pytest.raises(ValueError, match="key=v1"):
        parse_grid("breakout_k")
    with pytest.raises(ValueError, match="not V1Config fields"):
        grid_configs(V1Config(), {"breakout": [1.0]})
    assert len(grid_configs(V1Config(), {"breakout_k": [0.3, 0.6], "stop_atr_mult": [1.0, 2.0]})) == 4


@pytest.fixture(scope="module")
def sweep(candles: pd.DataFrame) -> dict:
    grid = {"breakout_k": [0.3, 0.8]}
    return walk_forward_sweep(candles, pd.Timestamp("2023-01-01", tz="UTC"), pd.Timestamp("2023-05-01", tz="UTC"),
                              grid, EnvConfig(), n_folds=2, min_train_trades=1)  # fmt: skip


def test_walk_forward_chooses_on_training_windows_only(sweep: dict) -> None:
    combos, folds = sweep["combos"], sweep["folds"]
    assert len(combos) == 4 and len(folds) == 2
    for k in (1, 2):
        rows = combos[combos["fold"] == k]
        best = rows.loc[rows["train_profit_factor"].idxmax()]
        chosen = folds[folds["fold"] == k].iloc[0]
        assert json.loads(chosen["chosen"]) == {"breakout_k": best["breakout_k"]}
        assert chosen["test_profit_factor"] == best["test_profit_factor"]  # reported out of sample
    assert (
        folds["train"].iloc[1].split("..")[1] == folds["test"].iloc[1].split("..")[0]
    )  # expanding, adjacent
    assert folds["train"].iloc[0].split("..")[0] == folds["train"].iloc[1].split("..")[0]
    wf = sweep["walk_forward"]
    assert wf["n_trades"] == folds["test_trades"].sum()
    assert math.isfinite(wf["sortino"]) and 0.0 <= wf["win_rate"] <= 1.0


def test_walk_forward_rejects_too_many_folds(candles: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="too few"):
        walk_forward_sweep(
            candles, T0, T0 + pd.Timedelta(hours=5), {"breakout_k": [0.5]}, EnvConfig(), n_folds=3
        )


def test_evaluate_command_for_v1_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "v1"
    r = CliRunner().invoke(main_app, ["evaluate", "--policy", "v1", "--period", "2023-03-01:2023-03-15",
                                      "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["v1"]["n_bars"] == 14 * 24 - 1
    assert (out / "report.html").is_file()
    bad = CliRunner().invoke(main_app, ["evaluate", "--policy", "v1", "--out", str(out)])
    assert bad.exit_code != 0
    assert (
        CliRunner().invoke(main_app, ["evaluate"]).exit_code != 0
    )  # --run still required for the run report


def test_sweep_command_writes_tables(tmp_path: Path) -> None:
    r = CliRunner().invoke(v1_cmd.app, ["sweep", "--period", "2023-01-01:2023-03-01", "--grid", "breakout_k=0.5",
                                        "--folds", "1", "--min-train-trades", "0", "--out", str(tmp_path)])  # fmt: skip
    assert r.exit_code == 0, r.output
    folds = pd.read_csv(tmp_path / "folds.csv")
    assert len(folds) == 1 and json.loads(folds["chosen"].iloc[0]) == {"breakout_k": 0.5}
    assert set(json.loads((tmp_path / "walk_forward.json").read_text())) >= {
        "profit_factor",
        "win_rate",
        "sortino",
    }


# ---------------------------------------------------------------------------------------------
# Regime input (causal HMM) for V1's regime-conditional thresholds
# ---------------------------------------------------------------------------------------------

def _fast_hmm():  # -> RegimeConfig (imported lazily)
    from regime.config import RegimeConfig

    return RegimeConfig(n_restarts=1, n_iter=20)


def test_causal_regime_proba_uses_no_later_bar(candles: pd.DataFrame) -> None:
    from training.v1_eval import causal_regime_proba

    window = candles.loc["2022-10-01":"2023-04-01"]
    cut = int(np.searchsorted(window.index, T0))
    short = causal_regime_proba(window.iloc[: cut + 200], T0, _fast_hmm())
    full = causal_regime_proba(window, T0, _fast_hmm())
    assert short.shape == (cut + 200, 3)
    # appending bars after the cut changes neither the fit (bars before T0) nor the filter up to the cut
    np.testing.assert_array_equal(short, full[: cut + 200])
    ok = np.isfinite(full).all(axis=1)
    assert ok[cut:].all() and not ok[0]  # warm-up rows are NaN, the evaluated period is covered
    np.testing.assert_allclose(full[ok].sum(axis=1), 1.0, atol=1e-12)
    # a different fitting span gives different probabilities (the fit really ends at fit_end)
    other = causal_regime_proba(window, T0 - pd.Timedelta(days=60), _fast_hmm())
    assert not np.array_equal(other[cut:], full[cut:])


def test_evaluate_v1_with_a_fitted_regime_applies_the_adjustments(candles: pd.DataFrame) -> None:
    from fallback.config import RegimeAdjustment

    window = candles.loc["2022-06-01":"2023-04-01"]
    base = V1Config()
    # raise the ADX bar by 100 points in the two volatile states only
    adj = (RegimeAdjustment(), RegimeAdjustment(adx_min_delta=100.0), RegimeAdjustment(adx_min_delta=100.0))
    cfg = base.model_copy(update={"regime_adjustments": adj})
    plain = evaluate_v1(window, T0, T1, cfg, EnvConfig())  # no regime input: base thresholds
    fitted = evaluate_v1(window, T0, T1, cfg, EnvConfig(), fit_regime=_fast_hmm())
    assert len(fitted.trades) < len(plain.trades)
    blocked = cfg.model_copy(update={"regime_adjustments": (RegimeAdjustment(adx_min_delta=100.0),) * 3})
    assert evaluate_v1(window, T0, T1, blocked, EnvConfig(), fit_regime=_fast_hmm()).trades == ()


def test_per_bar_v1_backtest_reads_regime_proba_from_the_context(candles: pd.DataFrame) -> None:
    """The path reports and walk-forwards use (run_backtest with V1Policy) applies the regime
    adjustments from DecisionContext.regime_proba, and equals the vectorised evaluate_v1."""
    from fallback.config import RegimeAdjustment
    from training.v1_eval import causal_regime_proba

    window = candles.loc["2022-06-01":"2023-04-01"]
    adj = (RegimeAdjustment(), RegimeAdjustment(adx_min_delta=100.0), RegimeAdjustment(adx_min_delta=100.0))
    cfg = V1Config(regime_adjustments=adj)
    a, b = (int(np.searchsorted(window.index, t)) for t in (T0, T1))
    proba = causal_regime_proba(window.iloc[:b], T0, _fast_hmm())
    atr = atr_indicator(window.iloc[:b], cfg.atr_period_bars)
    data = v1_env_data(window.iloc[a:b], atr[a:b])
    with_regime = run_backtest(V1Policy(cfg), data, window.iloc[:b], EnvConfig(), offset=a,
                               history_bars=cfg.history_bars, regime_proba=proba[a:b])  # fmt: skip
    without = run_backtest(V1Policy(cfg), data, window.iloc[:b], EnvConfig(), offset=a, history_bars=cfg.history_bars)
    assert len(with_regime.trades) < len(without.trades)
    fast = evaluate_v1(window, T0, T1, cfg, EnvConfig(), regime_proba=proba)
    np.testing.assert_array_equal(fast.equity.to_numpy(), with_regime.equity.to_numpy())
    with pytest.raises(ValueError, match="regime_proba must have shape"):
        run_backtest(V1Policy(cfg), data, window.iloc[:b], EnvConfig(), offset=a, regime_proba=proba[a : b - 1])


def test_evaluate_v1_fit_regime_errors(candles: pd.DataFrame) -> None:
    window = candles.loc["2022-06-01":"2023-04-01"]
    with pytest.raises(ValueError, match="regime_adjustments holds 0"):
        evaluate_v1(window, T0, T1, V1Config(), EnvConfig(), fit_regime=_fast_hmm())
    from fallback.config import RegimeAdjustment

    cfg = V1Config(regime_adjustments=(RegimeAdjustment(),) * 3)
    with pytest.raises(ValueError, match="not both"):
        evaluate_v1(window, T0, T1, cfg, EnvConfig(), regime_proba=np.ones((len(window), 3)) / 3,
                    fit_regime=_fast_hmm())  # fmt: skip
    from training.v1_eval import causal_regime_proba

    with pytest.raises(ValueError, match="the HMM needs at least 30"):
        causal_regime_proba(window, window.index[30], _fast_hmm())


def test_cli_v1_with_regime_thresholds(tmp_path) -> None:
    """`ats evaluate --policy v1 --config C --regime`: the HMM is fitted before the period, and refused
    without a config or without one adjustment per state."""
    import yaml
    from typer.testing import CliRunner

    from ats_cli.main import app

    root = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((root / "configs" / "smoke.yaml").read_text())
    raw["v1"] = {"regime_adjustments": [{}, {"adx_min_delta": 5.0}, {"adx_min_delta": 100.0}]}
    cfg = tmp_path / "v1_regime.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    args = ["evaluate", "--policy", "v1", "--period", "2022-07-15:2022-08-15"]
    r = runner.invoke(app, [*args, "--config", str(cfg), "--regime", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "Regime-conditional thresholds" in (tmp_path / "r" / "report.html").read_text()
    r = runner.invoke(app, [*args, "--regime", "--out", str(tmp_path / "r2")])
    assert r.exit_code != 0 and "--regime needs --config" in r.output
    raw["v1"] = {"regime_adjustments": [{}]}
    cfg.write_text(yaml.safe_dump(raw))
    r = runner.invoke(app, [*args, "--config", str(cfg), "--regime", "--out", str(tmp_path / "r3")])
    assert r.exit_code != 0 and "regime_adjustments" in r.output
