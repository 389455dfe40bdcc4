"""RegimeTransitionModel: targets, causality, learning, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from regime.config import RegimeConfig
from regime.hmm import ModelLoadError
from regime.transition import RegimeTransitionModel, build_targets

FAST = RegimeConfig(lgbm_n_estimators=40, lgbm_min_child_samples=20, lgbm_num_leaves=7, horizon_bars=3)


def _one_hot(states, k=3, noise_rng=None):
    p = np.full((len(states), k), 0.1)
    p[np.arange(len(states)), states] = 0.8
    return p


def _predictable(n, h, seed):
    """Regime at t + h is a (noisy) step function of feature 0 at t; feature 1 and 2 are noise."""
    rng = np.random.default_rng(seed)
    features = rng.uniform(0.0, 1.0, size=(n, 3)).astype(np.float32)
    future = np.digitize(features[:, 0], [0.5, 0.8])  # class sizes 50 / 30 / 20 %: majority = 0.5
    flip = rng.random(n) < 0.1
    future = np.where(flip, rng.integers(0, 3, n), future)
    states = np.empty(n, dtype=int)
    states[:h] = rng.integers(0, 3, h)
    states[h:] = future[: n - h]  # state at t + h is set by features at t
    return features, _one_hot(states), future[: n - h]


@pytest.fixture(scope="module")
def fitted():
    features, filtered, _ = _predictable(3000, FAST.horizon_bars, seed=0)
    return RegimeTransitionModel(FAST).fit(features, filtered), features


def test_targets_on_a_hand_example():
    filtered = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.1, 0.8, 0.1],
            [0.2, 0.2, 0.6],
            [0.5, 0.4, 0.1],
            [0.1, 0.1, 0.8],
        ]
    )
    assert build_targets(filtered, 2).tolist() == [2, 0, 2]  # argmax of rows 2, 3, 4
    assert build_targets(filtered, 1).tolist() == [1, 2, 0, 2]
    with pytest.raises(ValueError, match="no target"):
        build_targets(filtered, 5)
    bad = filtered.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="row index 3"):
        build_targets(bad, 1)


def test_predict_proba_shape_and_rows_sum_to_one(fitted):
    model, features = fitted
    p = model.predict_proba(features[:500])
    assert p.shape == (500, 3) and p.dtype == np.float64
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)


def test_predict_proba_is_truncation_invariant(fitted):
    model, features = fitted
    full = model.predict_proba(features)
    for t in np.random.default_rng(1).integers(0, len(features), size=10):
        assert np.array_equal(model.predict_proba(features[: t + 1])[t], full[t])
        assert np.array_equal(model.predict_proba(features[t : t + 1])[0], full[t])


def test_learns_a_predictable_future_regime_better_than_the_majority_class():
    h = FAST.horizon_bars
    features, filtered, _ = _predictable(3000, h, seed=0)
    model = RegimeTransitionModel(FAST).fit(features, filtered)
    test_features, _, test_future = _predictable(2000, h, seed=1)  # unseen data
    pred = model.predict_proba(test_features[: len(test_future)]).argmax(axis=1)
    accuracy = np.mean(pred == test_future)
    majority = np.bincount(test_future).max() / len(test_future)
    assert majority < 0.56
    assert accuracy > majority + 0.25  # ~0.93 reachable (10 % label noise)


def test_missing_class_gets_a_zero_column():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(400, 2)).astype(np.float32)
    states = (features[:, 0] > 0).astype(int)  # regime 2 never occurs
    model = RegimeTransitionModel(FAST).fit(features, _one_hot(states), horizon_bars=1)
    p = model.predict_proba(features)
    assert p.shape == (400, 3)
    assert np.all(p[:, 2] == 0.0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)


def test_single_class_is_a_constant_prediction_and_round_trips(tmp_path):
    features = np.random.default_rng(3).normal(size=(100, 2)).astype(np.float32)
    model = RegimeTransitionModel(FAST).fit(features, _one_hot(np.full(100, 1)), horizon_bars=2)
    assert np.array_equal(model.predict_proba(features[:3]), np.tile([0.0, 1.0, 0.0], (3, 1)))
    model.save(tmp_path)
    assert np.array_equal(
        RegimeTransitionModel.load(tmp_path).predict_proba(features), model.predict_proba(features)
    )


def test_same_seed_same_model():
    features, filtered, _ = _predictable(1500, FAST.horizon_bars, seed=4)
    a = RegimeTransitionModel(FAST).fit(features, filtered).predict_proba(features)
    b = RegimeTransitionModel(FAST).fit(features, filtered).predict_proba(features)
    assert np.array_equal(a, b)


def test_bad_inputs_raise(fitted):
    model, features = fitted
    bad = features.copy()
    bad[11, 1] = np.inf
    with pytest.raises(ValueError, match="row index 11"):
        model.predict_proba(bad)
    with pytest.raises(ValueError, match="columns"):
        model.predict_proba(features[:, :2])
    with pytest.raises(ValueError, match="shape"):
        RegimeTransitionModel(FAST).fit(features, np.ones((10, 3)) / 3)
    with pytest.raises(RuntimeError, match="not fitted"):
        RegimeTransitionModel(FAST).predict_proba(features)


def test_save_load_round_trip(fitted, tmp_path):
    model, features = fitted
    model.save(tmp_path)
    loaded = RegimeTransitionModel.load(tmp_path)
    assert loaded.horizon_bars == FAST.horizon_bars and loaded.cfg == model.cfg
    assert np.array_equal(loaded.predict_proba(features), model.predict_proba(features))


def test_corrupt_or_inconsistent_files_raise_model_load_error(fitted, tmp_path):
    model, _ = fitted
    model.save(tmp_path)
    txt = tmp_path / "regime_transition.txt"
    txt.write_text("this is not a LightGBM model\n")
    with pytest.raises(ModelLoadError, match=r"regime_transition\.txt"):
        RegimeTransitionModel.load(tmp_path)

    model.save(tmp_path)
    meta_path = tmp_path / "regime_transition.json"
    meta = json.loads(meta_path.read_text())
    meta["n_features"] = 5  # disagrees with the booster
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"regime_transition\.txt"):
        RegimeTransitionModel.load(tmp_path)

    model.save(tmp_path)
    txt.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        RegimeTransitionModel.load(tmp_path)

    meta_path.write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"regime_transition\.json"):
        RegimeTransitionModel.load(tmp_path)


def test_pooled_sequences_build_targets_within_each_sequence():
    """``lengths``: the regime h bars ahead is never taken from the next sequence (symbol); the fit equals a fit on
    the per-sequence rows and targets stacked by hand."""
    from regime.transition import build_targets

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 4)).astype(np.float32)
    filtered = rng.dirichlet(np.ones(3), size=300)
    cfg = RegimeConfig(n_states=3, horizon_bars=5, lgbm_n_estimators=10)
    pooled = RegimeTransitionModel(cfg).fit(feats, filtered, 5, lengths=[180, 120])
    X = np.concatenate([feats[:175], feats[180:295]])
    y = np.concatenate([build_targets(filtered[:180], 5), build_targets(filtered[180:], 5)])
    np.testing.assert_array_equal(y[175:], np.argmax(filtered[185:], axis=1))  # no target from across the seam
    by_hand = RegimeTransitionModel(cfg)
    import lightgbm as lgb

    classes = np.unique(y)
    booster = lgb.train(by_hand._lgb_params(int(classes.size)), lgb.Dataset(X, label=np.searchsorted(classes, y),
                        params={"verbosity": -1}), num_boost_round=cfg.lgbm_n_estimators)
    np.testing.assert_allclose(pooled.booster.predict(feats[:50]), booster.predict(feats[:50]))
    with pytest.raises(ValueError, match="sum to"):
        RegimeTransitionModel(cfg).fit(feats, filtered, 5, lengths=[100, 100])
