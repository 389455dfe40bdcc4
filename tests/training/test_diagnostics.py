"""Layer diagnostics (training/diagnostics.py): hand-checked statistics, out-of-fold rows only, and the
observation ablation on the smoke config."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from agents.observation import SIGNAL_COLUMNS, model_output_names
from market import json_codec
from training import diagnostics as D
from training import layer_stats as S
from training.config import load_config

REPO = Path(__file__).resolve().parents[2]
K = 3


def _settings(**kw) -> D.DiagSettings:
    return D.DiagSettings(**{"block_bars": 12, "n_boot": 200, "alpha": 0.05, "seed": 0, "purge_bars": 0,
                             "regime_horizon_bars": 1, **kw})


def _labels(n: int, p=(0.3, 0.4, 0.3), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(3, size=n, p=p)


# ------------------------------------------------------------------ signal layer


def test_perfect_predictions_beat_the_prior_and_the_prior_equals_its_baseline():
    y = _labels(3000)
    prior = D.class_prior(y[:1000])  # "training" labels
    ev = y[1000:]
    prior_rows = np.tile(prior, (len(ev), 1))
    perfect = np.eye(3)[ev] * 0.98 + 0.01
    s = D.signal_diagnostics(perfect, ev, prior_rows, [len(ev)], _settings())
    assert s["log_loss_model"] < s["log_loss_prior"]
    assert s["log_loss_diff_ci95"][1] < 0
    assert s["auc_macro"] == pytest.approx(1.0)
    same = D.signal_diagnostics(prior_rows.copy(), ev, prior_rows, [len(ev)], _settings())
    assert same["log_loss_model"] == same["log_loss_prior"]
    assert same["log_loss_diff"] == 0.0 and same["log_loss_diff_ci95"] == [0.0, 0.0]
    assert same["auc_macro"] == pytest.approx(0.5)  # a constant score ranks nothing
    # the prior's own log-loss is the cross-entropy of the evaluated class shares under the prior
    share = np.bincount(ev, minlength=3) / len(ev)
    assert same["log_loss_prior"] == pytest.approx(-(share * np.log(prior)).sum())


def test_auc_of_random_scores_is_one_half_and_matches_sklearn():
    rng = np.random.default_rng(1)
    y = _labels(40_000, seed=2)
    scores = rng.dirichlet(np.ones(3), size=len(y))
    auc = S.auc_one_vs_rest(scores, y)
    assert np.all(np.abs(auc - 0.5) < 0.015)
    from sklearn.metrics import roc_auc_score

    tied = np.round(scores[:500, 0], 1)  # ties counted 1/2, as sklearn does
    assert S.roc_auc(tied, y[:500] == 0) == pytest.approx(roc_auc_score(y[:500] == 0, tied))
    assert np.isnan(S.roc_auc(np.arange(5.0), np.zeros(5, bool)))


def test_block_bootstrap_resamples_within_segments():
    idx = S.block_indices([5, 3], 2, np.random.default_rng(0))
    assert len(idx) == 8 and set(idx[:5]) <= set(range(5)) and set(idx[5:]) <= {5, 6, 7}


# ------------------------------------------------------------------ regime transition


def _stack(states: np.ndarray, ahead: np.ndarray | None = None, labels: np.ndarray | None = None,
           close: np.ndarray | None = None, signal: np.ndarray | None = None) -> D.StackPredictions:
    n = len(states)
    filt = np.eye(K)[states] * 0.8 + 0.2 / K
    ah = filt if ahead is None else np.eye(K)[ahead] * 0.8 + 0.2 / K
    sig = np.full((n, 3), 1 / 3) if signal is None else signal
    out = pd.DataFrame(np.column_stack([filt, ah, sig]), columns=model_output_names(K),
                       index=pd.date_range("2024-01-01", periods=n, freq="h", tz="UTC"))
    lab = np.ones(n, np.int64) if labels is None else labels
    c = np.full(n, 100.0) if close is None else close
    return D.StackPredictions(lab, c, out)


def test_persistence_baseline_accuracy_by_hand():
    states = np.array([0, 0, 1, 1, 1, 0, 0, 2])
    ahead = np.array([0, 1, 1, 0, 0, 0, 2, 2])
    sp = _stack(states, ahead)
    arr = D.block_arrays(sp, D.OofBlock("b", 1, 1, 8), _settings())
    # block rows 1..7, h = 1: decision rows t = 1..6; targets s[2:8] = 1 1 1 0 0 2
    # persistence s[1:7] = 0 1 1 1 0 0 -> hits at t = 2, 3, 5 -> 3/6; model a[1:7] = 1 1 0 0 0 2 -> misses t = 3 -> 5/6
    t = D.transition_diagnostics(arr.ahead, arr.persist, arr.target, K, [len(arr.target)], _settings(block_bars=2))
    assert t["n"] == 6
    assert t["accuracy_persist"] == pytest.approx(3 / 6)
    assert t["accuracy_model"] == pytest.approx(5 / 6)
    full = D.block_arrays(sp, D.OofBlock("b", 1, 1, 8), _settings(regime_horizon_bars=2))
    assert len(full.target) == 5 and list(full.target) == [1, 1, 0, 0, 2]
    # balanced accuracy: mean recall over the target classes present
    assert S.balanced_accuracy(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3) == pytest.approx((0.5 + 1 + 0) / 3)


def test_persistence_on_the_whole_sequence_by_hand():
    states = np.array([0, 0, 1, 1, 1, 0, 0, 2])
    sp = _stack(states, np.array([0, 1, 1, 0, 0, 0, 2, 2]))
    arr = D.block_arrays(sp, D.OofBlock("b", 1, 1, 8), _settings())
    assert list(arr.persist) == [0, 1, 1, 1, 0, 0] and list(arr.target) == [1, 1, 1, 0, 0, 2]


# ------------------------------------------------------------------ HMM regime separation


def test_regime_stats_recover_two_known_regimes():
    rng = np.random.default_rng(3)
    n_seg, seg = 40, 150
    states = np.repeat(np.arange(n_seg) % 2, seg)  # persistent regimes, 6,000 bars
    mu, sd = np.array([0.002, -0.001]), np.array([0.005, 0.02])
    r = rng.normal(mu[states], sd[states])
    close = 100 * np.exp(np.concatenate([[0.0], np.cumsum(r)]))  # r[t] = log(close[t+1] / close[t])
    sp = _stack(np.concatenate([states, [0]]), close=close)
    arr = D.block_arrays(sp, D.OofBlock("b", 1, 1, len(close)), _settings())
    np.testing.assert_allclose(arr.ret, r[1:], atol=1e-12)
    h = D.regime_separation(arr.ret, arr.regime, K, [len(arr.ret)], _settings(n_boot=300))
    for s in (0, 1):
        row = h["by_regime"][s]
        assert row["n_bars"] == (arr.regime == s).sum()
        assert row["mean_ci95"][0] <= mu[s] <= row["mean_ci95"][1]
        assert row["vol_ci95"][0] <= sd[s] <= row["vol_ci95"][1]
    assert h["by_regime"][0]["vol_ci95"][1] < h["by_regime"][1]["vol_ci95"][0]  # volatilities separate
    assert h["brown_forsythe_p"] < 1e-6
    assert h["by_regime"][2]["n_bars"] == 0 and np.isnan(h["by_regime"][2]["mean"])


# ------------------------------------------------------------------ out of fold only


def _fake_prep(labels: np.ndarray, n_val: int, n_test: int, close: np.ndarray | None = None):
    n = len(labels)
    idx = pd.date_range("2024-01-01", periods=n, freq="h", tz="UTC")
    c = np.full(n, 100.0) if close is None else close
    return SimpleNamespace(features=pd.DataFrame({"ret_1": np.zeros(n)}, index=idx), labels=labels,
                           candles=pd.DataFrame({"close": c}, index=idx), val_row=n - n_val - n_test,
                           val_stop=n - n_test, test_row=n - n_test, n_rows=n)


def test_diagnostics_use_out_of_fold_rows_only():
    """In-sample rows carry a planted label leak (perfect TCN and regime-ahead outputs); out-of-fold rows carry the
    training prior and a blind regime guess. Diagnostics must see no skill; reading the in-sample rows would."""
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    settings = D.DiagSettings.of(cfg)
    purge, h = settings.purge_bars, settings.regime_horizon_bars
    n, fit_end = 3000, 1500
    labels = _labels(n, seed=4)
    labels[:fit_end] = _labels(fit_end, p=(0.2, 0.5, 0.3), seed=5)  # training class mix differs from later rows
    prior = D.class_prior(labels[: fit_end - purge])
    states = np.repeat(np.arange(n // 50) % K, 50)
    signal = np.tile(prior, (n, 1))
    signal[:fit_end] = np.eye(3)[labels[:fit_end]] * 0.97 + 0.01  # the leak, in sample
    ahead = (states + 1) % K  # out of fold: wrong most of the time
    ahead[: fit_end - h] = states[h:fit_end]  # the leak: the exact future regime, in sample
    sp = _stack(states, ahead, labels, signal=signal)
    folds = [{"fold": 0, "fit_rows": [0, fit_end], "predict_rows": [fit_end, 2400]}]
    prep = _fake_prep(labels, 300, 300)
    res = D.diagnose_stack(prep, sp.outputs, folds, cfg)
    s0 = res["per_block"]["fold0"]["signal"]
    assert s0["log_loss_diff"] == pytest.approx(0.0, abs=1e-12)  # the training prior, not the fold's own shares
    assert s0["n"] == 900 and s0["prior"]["down"] == pytest.approx(prior[0])
    t0 = res["per_block"]["fold0"]["regime_ahead"]
    assert t0["accuracy_model"] < t0["accuracy_persist"]
    assert res["pooled"]["oof_training"]["blocks"] == ["fold0"]
    # what an in-sample evaluation would have reported: a block over the leaked rows is rejected outright ...
    with pytest.raises(ValueError, match="in-sample"):
        D.OofBlock("leak", fit_end, 0, fit_end)
    # ... and evaluating those rows (fit_end pretended earlier) shows the leak, so the check above has teeth
    leak = D.block_arrays(sp, D.OofBlock("leak", 100, 100, fit_end), settings)
    sl = D.signal_diagnostics(leak.proba, leak.y, np.tile(prior, (len(leak.y), 1)), [len(leak.y)], settings)
    assert sl["log_loss_diff"] < -0.5
    # a block whose rows were never predicted is an error, not a silent in-sample read
    partial = sp.outputs.copy()
    partial.iloc[fit_end : fit_end + 10] = np.nan
    with pytest.raises(ValueError, match="missing model outputs"):
        D.block_arrays(D.StackPredictions(labels, sp.close, partial), D.OofBlock("f", fit_end, fit_end, 2400), settings)


def test_prior_comes_from_purged_training_labels():
    labels = np.array([0] * 50 + [2] * 10 + [1] * 40)
    sp = _stack(np.zeros(100, np.int64), labels=labels)
    arr = D.block_arrays(sp, D.OofBlock("f", 60, 60, 100), _settings(purge_bars=10))
    np.testing.assert_allclose(arr.prior, [1.0, 0.0, 0.0])  # labels 50..59 purged


def test_walkforward_shaped_result_is_json_safe_and_renders():
    rng = np.random.default_rng(6)
    n = 600
    states = np.repeat(np.arange(n // 30) % K, 30)
    labels = _labels(n, seed=7)
    sig = rng.dirichlet(np.ones(3), size=n)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    sp = _stack(states, labels=labels, close=close, signal=sig)
    st = _settings(n_boot=50)
    a = {p: D.block_arrays(sp, D.OofBlock(p, 300, s, e), st)
         for p, s, e in (("validation", 300, 450), ("test", 450, 600))}
    diag = {"definition": "x", "seed": 0, "reading": D.layer_reading(D.layer_summary([a["test"]], st), "test"),
            "per_fold": [{"fold": 0, "symbol": "BTCUSDT", **{p: D.layer_summary([a[p]], st) for p in a}}],
            "pooled": {p: D.layer_summary([a[p]], st) for p in a},
            "ablation": {"runs": {"fold0/seed0": {"variants": {"market": {"validation_sortino": float("nan")}}}},
                         "mean_validation_sortino": {"market": float("nan")}}}
    text = json_codec.dumps(diag)
    json.loads(text)  # strict JSON
    back = json_codec.loads(text)
    frag = D.diagnostics_html(back)
    assert frag.startswith('<section class="layer-diagnostics">') and "TCN vs class prior" in frag
    assert "observation ablation" in frag and len(D.diagnostics_tables(back)) == 5


# ------------------------------------------------------------------ ablation


def test_observation_groups_select_columns_before_the_env():
    feats = ["ret_1", "atr_pct"]
    names = feats + model_output_names(K)
    groups = D.column_groups(names, feats)
    assert groups["regime"] == [f"regime_p{k}" for k in range(K)] + [f"regime_ahead_p{k}" for k in range(K)]
    assert groups["signal"] == list(SIGNAL_COLUMNS)
    assert D.ObservationGroups(groups=("market", "signal")).columns(names, feats) == feats + list(SIGNAL_COLUMNS)
    assert D.ObservationGroups().columns(names, feats) == names
    with pytest.raises(ValueError):
        D.column_groups([*names, "mystery"], feats)
    with pytest.raises(ValueError):
        D.AblationConfig(variants=("market", "signal only"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ablation_on_the_smoke_config_returns_four_sortinos(tmp_path):
    """Stack once, then four PPO runs of one 128-step rollout each: ~5-30 s on an idle 2-core machine (the
    first call in a process compiles the kernel), about a minute under other load."""
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    cfg = cfg.updated(ppo=cfg.ppo.updated(n_steps=64, batch_size=64, n_epochs=1))
    res = D.observation_ablation(cfg, total_timesteps=128, run_dir=tmp_path,
                                 dcfg=D.DiagnosticsConfig(bootstrap_samples=50))
    assert list(res["variants"]) == list(D.ABLATION_VARIANTS)
    n_cols = {k: v["n_obs_columns"] for k, v in res["variants"].items()}
    assert n_cols["market+regime+signal"] == n_cols["market"] + 2 * K + 3
    assert n_cols["market+signal"] == n_cols["market"] + 3 and n_cols["market+regime"] == n_cols["market"] + 2 * K
    assert all(np.isfinite(v["validation_sortino"]) for v in res["variants"].values())
    stack = res["stack"]["BTCUSDT"]
    assert set(stack["per_block"]) == {"fold0", "fold1", "validation", "test"}
    json.loads(json_codec.dumps(res))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_walkforward_diagnostics_from_run_directories_with_the_ablation(tmp_path):
    """A tiny trained run stands for one walk-forward fold: its bundle's models predict its validation and test
    windows; the ablation flag trains the four observation variants on that fold's config (~50 s on an idle
    2-core machine)."""
    from training.pipeline import train_run

    cfg = load_config(REPO / "configs" / "smoke.yaml")
    cfg = cfg.updated(ppo=cfg.ppo.updated(n_steps=64, batch_size=64, n_epochs=1, total_timesteps=128,
                                          eval_every_steps=128))
    run_dir = tmp_path / "fold0" / "seed1"
    train_run(cfg, run_dir, log=lambda s: None)
    records = [{"fold": 0, "seed": 1, "run_dir": str(run_dir)}]
    off = D.walkforward_diagnostics(records, D.DiagnosticsConfig(bootstrap_samples=50))
    assert off["ablation"] is None and [f["fold"] for f in off["per_fold"]] == [0]
    assert set(off["pooled"]) == {"validation", "test"} and off["seed"] == 1
    assert D.walkforward_diagnostics(records, D.DiagnosticsConfig(enabled=False)) is None
    dcfg = D.DiagnosticsConfig(bootstrap_samples=50,
                               ablation=D.AblationConfig(enabled=True, total_timesteps=128))
    on = D.walkforward_diagnostics(records, dcfg, out=tmp_path)
    assert list(on["ablation"]["runs"]["fold0/seed1"]["variants"]) == list(D.ABLATION_VARIANTS)
    assert off["per_fold"] == on["per_fold"]  # the ablation does not touch the layer diagnostics
    json.loads(json.dumps(on, allow_nan=False))  # already JSON-safe
    assert "observation ablation" in D.diagnostics_html(on)
