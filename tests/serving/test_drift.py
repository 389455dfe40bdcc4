"""Drift detection: PSI, regime occupancy and the performance CUSUM against hand-computed values, a replay of
real features with a planted volatility shift, the bundle's training distribution at export, an old bundle
without it, and the ``drift`` line of ``ats status``."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agents.bundle import MANIFEST, load_bundle, save_bundle
from agents.drift_reference import REFERENCE_FILE, bin_index, fit_reference, read_reference
from ats_cli.main import app
from market.features import FeatureConfig, compute_features, drop_warmup
from serving.drift import (
    DRIFT_EVENT,
    DriftConfig,
    cusum_lower,
    drift_status_line,
    evaluate_drift,
    occupancy_distance,
    population_stability_index,
)
from serving.store import EventRecord, StateStore
from tests.kit.candles import make_candles
from tests.serving import bundle_kit as kit
from tests.serving.ops_kit import paper_replay_db
from training.gate import expected_bar_return

N_TRAIN, WINDOW, N_CANDLES = 2_600, 168, 3_200
SHIFT = 10.0  # planted: log moves 10 x larger


def test_psi_against_hand_computed_values():
    # two bins split at 0; reference 50/50
    values = np.array([1.0, 2.0, 3.0, -1.0])  # window 25 % / 75 %
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert population_stability_index([0.0], [0.5, 0.5], values) == pytest.approx(expected, rel=1e-12)
    # an empty bin uses the floor, not log(0)
    floor = 1e-4
    expected = (floor - 0.5) * math.log(floor / 0.5) + (1 - 0.5) * math.log(1 / 0.5)
    assert population_stability_index([0.0], [0.5, 0.5], np.array([1.0, 2.0]), floor) == pytest.approx(expected)
    assert population_stability_index([0.0], [0.5, 0.5], np.array([-1.0, 1.0])) == 0.0
    assert math.isnan(population_stability_index([0.0], [0.5, 0.5], np.array([np.nan])))
    with pytest.raises(ValueError, match="3 reference shares for 1 edges"):
        population_stability_index([0.0], [0.2, 0.3, 0.5], values)
    # the value on an edge belongs to the lower bin, in the reference and in the window alike
    assert bin_index(np.array([0.0, 1.0]), np.array([-5.0, 0.0, 0.5, 1.0, 7.0])).tolist() == [0, 0, 1, 1, 2]


def test_occupancy_distance_and_cusum_by_hand():
    assert occupancy_distance([0.5, 0.5, 0.0], np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="3 reference states"):
        occupancy_distance([0.5, 0.3, 0.2], np.ones((4, 2)) / 2)
    # mean 0, std 1, k 0.5: S = min(0, S + r + 0.5)
    path = cusum_lower(np.array([-1.0, -2.0, 1.0, 3.0, -0.5]), 0.0, 1.0, 0.5)
    assert path.tolist() == [-0.5, -2.0, -0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="standard deviation"):
        cusum_lower(np.zeros(3), 0.0, 0.0, 0.5)


def test_reference_deciles_and_constant_features():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=10_000), "c": np.ones(10_000)})
    ref = fit_reference(frame, rng.dirichlet([1, 1, 1], size=10_000))
    assert len(ref["features"]["x"]["edges"]) == 9 and np.allclose(ref["features"]["x"]["freqs"], 0.1, atol=1e-3)
    assert {k: v for k, v in ref["features"]["c"].items() if k != "window_psi"} == {
        "edges": [1.0], "freqs": [1.0, 0.0], "n_nonfinite": 0}
    # calibration: iid data, so a 168-row window's PSI is sampling noise, well under the customary 0.25
    cal = ref["features"]["x"]["window_psi"]
    assert cal["window_bars"] == 168 and cal["n_windows"] == 10_000 // 168 and 0 < cal["q95"] <= cal["max"] < 0.25
    assert ref["occupancy_window_tv"]["n_windows"] == 10_000 // 168 and ref["occupancy_window_tv"]["max"] < 0.2
    assert sum(ref["occupancy"]) == pytest.approx(1.0)
    same = population_stability_index(ref["features"]["x"]["edges"], ref["features"]["x"]["freqs"],
                                      rng.normal(size=2_000))
    assert same < 0.02  # the same distribution: no drift
    with pytest.raises(ValueError, match="no finite training value"):
        fit_reference(pd.DataFrame({"x": [np.nan, np.nan]}))


def _shifted(candles: pd.DataFrame, start: int, scale: float) -> pd.DataFrame:
    """Prices whose log moves are ``scale`` times larger from row ``start`` on (OHLC order kept)."""
    out = candles.copy()
    cols = ["open", "high", "low", "close"]
    base = np.log(candles.close.iloc[start - 1])
    logp = np.log(candles[cols].to_numpy()[start:])
    out.loc[out.index[start:], cols] = np.exp(base + scale * (logp - base))
    return out


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """A kit bundle's real models and features: the reference of the first N_TRAIN rows, and the features of a
    later window without and with a planted volatility shift (x3 log moves)."""
    bundle_dir = kit.build_bundle(tmp_path_factory.mktemp("drift") / "bundle")
    bundle = load_bundle(bundle_dir)
    candles = make_candles(N_CANDLES, seed=0)  # the kit bundle's candles (its first 1,600) and more
    cols = list(bundle.models.hmm_columns)

    def feats(c):
        f, _ = drop_warmup(compute_features(c, FeatureConfig()))
        return f

    base = feats(candles)
    proba = bundle.models.hmm.filtered_proba(base[cols].to_numpy(np.float64))
    ref = fit_reference(base.iloc[:N_TRAIN], proba[:N_TRAIN])
    shift_row = len(candles) - WINDOW - 100
    shifted = feats(_shifted(candles, shift_row, SHIFT))
    shifted_proba = bundle.models.hmm.filtered_proba(shifted[cols].to_numpy(np.float64))
    return {"ref": ref, "calm": (base.iloc[-WINDOW:], proba[-WINDOW:]),
            "shifted": (shifted.iloc[-WINDOW:], shifted_proba[-WINDOW:]), "bundle": bundle_dir}


def test_planted_volatility_shift_breaches_feature_and_regime_drift(replay):
    cfg = DriftConfig()
    calm = evaluate_drift(cfg, replay["ref"], features=replay["calm"][0], regime_proba=replay["calm"][1],
                          bar_returns=np.array([]), expected_bar_return=None)
    shifted = evaluate_drift(cfg, replay["ref"], features=replay["shifted"][0], regime_proba=replay["shifted"][1],
                             bar_returns=np.array([]), expected_bar_return=None)
    by = {s.name: s for s in calm.statistics}
    assert not by["feature_psi"].breach and not by["regime_occupancy"].breach and calm.action is None
    sh = {s.name: s for s in shifted.statistics}
    assert sh["feature_psi"].breach and sh["regime_occupancy"].breach, (sh, by)
    assert sh["feature_psi"].value > 2 * by["feature_psi"].value
    assert sh["regime_occupancy"].value > 2 * by["regime_occupancy"].value
    assert "rvol_24b" in shifted.detail["features_over"]  # a volatility feature drifted
    assert not sh["pnl_cusum"].available and not sh["pnl_cusum"].breach  # no expectation: unavailable


@pytest.mark.parametrize("action", ["alert", "rollback", "v1"])
def test_a_breach_asks_for_the_configured_action(replay, action):
    cfg = DriftConfig(action=action)
    v = evaluate_drift(cfg, replay["ref"], features=replay["shifted"][0], regime_proba=replay["shifted"][1],
                       bar_returns=np.array([]), expected_bar_return=None)
    assert v.action == action and set(v.breached) == {"feature_psi", "regime_occupancy"}
    details = {d["statistic"]: d for d in v.event_details()}
    assert details["feature_psi"]["action"] == action and details["pnl_cusum"]["action"] == "none"


def test_performance_cusum_holds_at_expectation_and_breaches_on_a_planted_loss():
    rng = np.random.default_rng(3)
    mean, std = 2e-4, 4e-3
    cfg = DriftConfig()
    expected = rng.normal(mean, std, size=2_000)
    ok = evaluate_drift(cfg, None, features=pd.DataFrame(), regime_proba=None, bar_returns=expected,
                        expected_bar_return=(mean, std))
    cusum = {s.name: s for s in ok.statistics}["pnl_cusum"]
    assert cusum.available and not cusum.breach and ok.action is None
    losing = np.concatenate([expected[:500], rng.normal(mean - std, std, size=40)])  # one sd worse per bar
    bad = evaluate_drift(cfg, None, features=pd.DataFrame(), regime_proba=None, bar_returns=losing,
                         expected_bar_return=(mean, std))
    assert bad.breached == ("pnl_cusum",) and bad.action == "alert"


def test_an_old_bundle_without_reference_reports_unavailable(replay, tmp_path):
    old = kit.build_bundle(tmp_path / "old")  # the kit exports without a reference, as bundles did before
    assert read_reference(old) is None
    v = evaluate_drift(DriftConfig(action="rollback"), read_reference(old), features=replay["shifted"][0],
                       regime_proba=replay["shifted"][1], bar_returns=np.array([]), expected_bar_return=None)
    assert v.action is None and all(not s.available for s in v.statistics)
    assert "exported before it existed" in v.statistics[0].note


def test_export_writes_the_reference_into_the_hashed_bundle(replay, tmp_path):
    src = load_bundle(replay["bundle"])
    policy = json.loads((replay["bundle"] / "policy.json").read_text())
    out = save_bundle(tmp_path / "with_ref", actor_tensors=dict(src.actor.state_dict()), hidden=tuple(policy["hidden"]),
                      activation=policy["activation"], normalizer=src.normalizer, feature_config=src.feature_config,
                      env_config=src.env_config, models=src.models, run_config=src.manifest["config"],
                      data_info={"synthetic": True}, metrics={}, drift_reference=replay["ref"])  # fmt: skip
    manifest = json.loads((out / MANIFEST).read_text())
    assert REFERENCE_FILE in manifest["files"] and read_reference(out) == replay["ref"]
    load_bundle(out)  # verified against the manifest, the reference included
    (out / REFERENCE_FILE).write_text(json.dumps({**replay["ref"], "occupancy": [1.0, 0.0, 0.0]}))
    with pytest.raises(Exception, match=REFERENCE_FILE):
        load_bundle(out)  # a changed reference is a tampered bundle


def test_pipeline_reference_uses_training_rows_only(replay):
    from training.pipeline import PreparedData, _drift_reference

    candles = make_candles(N_CANDLES, seed=0)
    feats, _ = drop_warmup(compute_features(candles, FeatureConfig()))
    prep = PreparedData(candles=candles.loc[feats.index], features=feats, atr=np.ones(len(feats)),
                        labels=np.zeros(len(feats), dtype=np.int8), val_row=N_TRAIN, test_row=N_TRAIN + 200)
    models = load_bundle(replay["bundle"]).models
    ref = _drift_reference([prep], models)
    assert ref["n_rows"] == N_TRAIN and ref == {**replay["ref"], "source": ref["source"]}
    # the test rows changed: the reference does not move
    later = feats.copy()
    later.iloc[N_TRAIN:] *= 10.0
    assert _drift_reference([PreparedData(candles=prep.candles, features=later, atr=prep.atr, labels=prep.labels,
                                          val_row=N_TRAIN, test_row=N_TRAIN + 200)], models)["features"] == ref["features"]


def test_gate_records_the_expected_bar_return_for_the_cusum():
    report = {"stitched": {"ppo": {"total_return": 0.21, "n_bars": 1000}}, "deflated_sharpe": {"sr_per_bar": 0.05}}
    e = expected_bar_return(report)
    assert e["mean"] == pytest.approx(1.21 ** (1 / 1000) - 1) and e["std"] == pytest.approx(e["mean"] / 0.05)
    assert expected_bar_return({"stitched": {"ppo": {"total_return": 0.2, "n_bars": 10}}}) is None


def test_status_shows_the_latest_drift_evaluation(replay, tmp_path):
    db, _ = paper_replay_db(tmp_path / "run", bars=30, seed=12)
    runner = CliRunner()
    r = runner.invoke(app, ["status", "--db", str(db)], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "no drift evaluation recorded" in r.output, r.output
    v = evaluate_drift(DriftConfig(action="rollback"), replay["ref"], features=replay["shifted"][0],
                       regime_proba=replay["shifted"][1], bar_returns=np.array([]), expected_bar_return=None)
    store = StateStore.sqlite(db)
    t = store.equity().bar_open_time.iloc[-1]
    store.append(events=[EventRecord("paper", t, DRIFT_EVENT, d) for d in v.event_details()])
    line = drift_status_line(store.events("paper"))
    assert "feature_psi" in line and "BREACH -> rollback" in line and "pnl_cusum unavailable" in line
    r = runner.invoke(app, ["status", "--db", str(db)], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "BREACH -> rollback" in r.output and "regime_occupancy" in r.output, r.output
