"""RegimeHMM: forward filter correctness, causality, state order, persistence."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hmmlearn.hmm import GaussianHMM
from pydantic import ValidationError
from scipy.stats import multivariate_normal

from regime.config import RegimeConfig
from regime.hmm import (
    ModelLoadError,
    RegimeHMM,
    forward_filter,
    gaussian_log_density,
)
from tests.kit.candles import make_candles

# -- helpers ---------------------------------------------------------------------------------------


def _sample_hmm(rng, startprob, transmat, means, covars, n):
    states = np.empty(n, dtype=int)
    states[0] = rng.choice(len(startprob), p=startprob)
    for t in range(1, n):
        states[t] = rng.choice(len(startprob), p=transmat[states[t - 1]])
    X = np.stack([rng.multivariate_normal(means[s], covars[s]) for s in states])
    return X, states


def _regime_features(vols, n_bars_each, window=24):
    """[log return, log rolling std] of concatenated make_candles segments, warm-up rows dropped."""
    rets = []
    for i, v in enumerate(vols):
        close = make_candles(n_bars_each + 1, seed=100 + i, vol_per_bar=v)["close"].to_numpy()
        rets.append(np.diff(np.log(close)))
    r = np.concatenate(rets)
    vol = pd.Series(r).rolling(window).std().to_numpy()
    X = np.column_stack([r, np.log(vol)])
    return X[window - 1 :], window - 1  # rows dropped explicitly: rolling warm-up


def _hmmlearn_twin(startprob, transmat, means, covars):
    h = GaussianHMM(n_components=len(startprob), covariance_type="full")
    h.startprob_, h.transmat_, h.means_, h.covars_ = startprob, transmat, means, covars
    return h


TWO_STATE = {
    "startprob": np.array([0.6, 0.4]),
    "transmat": np.array([[0.95, 0.05], [0.10, 0.90]]),
    "means": np.array([[0.0, 0.0], [0.5, -0.5]]),
    "covars": np.array([[[1.0, 0.3], [0.3, 1.0]], [[4.0, -1.0], [-1.0, 2.0]]]),
}

THREE_STATE = {
    "startprob": np.array([0.5, 0.3, 0.2]),
    "transmat": np.array([[0.9, 0.07, 0.03], [0.05, 0.9, 0.05], [0.02, 0.08, 0.9]]),
    "means": np.array([[0.0, 1.0], [0.2, 0.0], [-0.3, -1.0]]),
    "covars": np.array([np.eye(2) * 0.5, [[1.0, 0.2], [0.2, 1.0]], np.eye(2) * 3.0]),
}


@pytest.fixture(scope="module")
def two_regime_data():
    return _regime_features([0.003, 0.03], 400)


@pytest.fixture(scope="module")
def fitted(two_regime_data):
    X, _ = two_regime_data
    return RegimeHMM(RegimeConfig(seed=0)).fit(X), X


# -- (1) correctness against independent computations ----------------------------------------------


def test_gaussian_log_density_matches_scipy():
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(50, 2))
    got = gaussian_log_density(Z, TWO_STATE["means"], TWO_STATE["covars"])
    for k in range(2):
        want = multivariate_normal(TWO_STATE["means"][k], TWO_STATE["covars"][k]).logpdf(Z)
        np.testing.assert_allclose(got[:, k], want, rtol=1e-12, atol=1e-12)


def test_two_state_filter_matches_naive_probability_space_forward_pass():
    rng = np.random.default_rng(7)
    X, _ = _sample_hmm(rng, **TWO_STATE, n=300)
    log_b = gaussian_log_density(X, TWO_STATE["means"], TWO_STATE["covars"])
    ours = np.exp(forward_filter(log_b, np.log(TWO_STATE["startprob"]), np.log(TWO_STATE["transmat"])))

    # Brute force: alpha in probability space with scipy densities, normalised every step.
    dens = np.column_stack(
        [multivariate_normal(TWO_STATE["means"][k], TWO_STATE["covars"][k]).pdf(X) for k in range(2)]
    )
    alpha = TWO_STATE["startprob"] * dens[0]
    naive = [alpha / alpha.sum()]
    for t in range(1, len(X)):
        alpha = (naive[-1] @ TWO_STATE["transmat"]) * dens[t]
        naive.append(alpha / alpha.sum())
    np.testing.assert_allclose(ours, np.array(naive), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("params", [TWO_STATE, THREE_STATE], ids=["K2", "K3"])
def test_filtered_equals_hmmlearn_posterior_at_the_last_row_of_each_prefix(params):
    # With no observation after t, the smoothed posterior at t IS the filtered probability at t.
    rng = np.random.default_rng(3)
    X, _ = _sample_hmm(rng, **params, n=120)
    twin = _hmmlearn_twin(**params)
    log_b = gaussian_log_density(X, params["means"], params["covars"])
    ours = np.exp(forward_filter(log_b, np.log(params["startprob"]), np.log(params["transmat"])))
    for t in (0, 1, 17, 60, 119):
        np.testing.assert_allclose(ours[t], twin.predict_proba(X[: t + 1])[-1], rtol=1e-9, atol=1e-12)


def test_model_class_with_known_params_matches_hmmlearn_prefix_posterior():
    rng = np.random.default_rng(5)
    X, _ = _sample_hmm(rng, **THREE_STATE, n=150)
    model = RegimeHMM.from_params(**THREE_STATE, x_mean=np.zeros(2), x_std=np.ones(2))
    twin = _hmmlearn_twin(**THREE_STATE)
    got = model.filtered_proba(X)
    for t in (0, 40, 149):
        np.testing.assert_allclose(got[t], twin.predict_proba(X[: t + 1])[-1], rtol=1e-9, atol=1e-12)


# -- (2) causality ----------------------------------------------------------------------------------


def test_filtered_proba_is_truncation_invariant_exactly(fitted):
    model, X = fitted
    full = model.filtered_proba(X)
    for t in np.random.default_rng(0).integers(0, len(X), size=15):
        assert np.array_equal(model.filtered_proba(X[: t + 1])[t], full[t])


def test_hmmlearn_predict_proba_is_not_truncation_invariant_on_the_same_data(fitted):
    model, X = fitted
    Z = (X - model.x_mean) / model.x_std
    twin = _hmmlearn_twin(model.startprob, model.transmat, model.means, model.covars)
    smoothed = twin.predict_proba(Z)
    gaps = [np.abs(twin.predict_proba(Z[: t + 1])[t] - smoothed[t]).max() for t in range(len(Z))]
    assert max(gaps) > 0.1  # smoothing used the future somewhere: unusable as a feature
    # ... while the last prefix rows agree with our filter (same parameters, standardised space).
    np.testing.assert_allclose(twin.predict_proba(Z[:200])[-1], model.filtered_proba(X[:200])[-1], atol=1e-10)


def test_step_by_step_equals_batch_exactly(fitted):
    model, X = fitted
    batch_log = model.filtered_log_proba(X)
    batch = model.filtered_proba(X)
    log_alpha = None
    for t in range(len(X)):
        log_alpha, proba = model.filtered_proba_step(log_alpha, X[t])
        assert np.array_equal(log_alpha, batch_log[t])
        assert np.array_equal(proba, batch[t])


def test_step_resumes_from_history(fitted):
    model, X = fitted
    hist = model.filtered_log_proba(X[:300])
    _, proba = model.filtered_proba_step(hist[-1], X[300])
    assert np.array_equal(proba, model.filtered_proba(X)[300])


# -- (3) state order by volatility ------------------------------------------------------------------


def test_states_are_ordered_by_volatility_and_labels_are_stable_across_seeds(two_regime_data):
    X, dropped = two_regime_data
    n_calm = 400 - dropped  # rows of the calm segment left after the rolling warm-up
    labels = []
    for seed in (0, 10, 20):
        model = RegimeHMM(RegimeConfig(seed=seed)).fit(X)
        ret_var = model.covars[:, 0, 0]
        assert np.all(np.diff(ret_var) > 0)  # state 0 calmest ... state K-1 most volatile
        states = model.filtered_proba(X).argmax(axis=1)
        calm, volatile = states[5:n_calm], states[n_calm + 30 :]
        assert np.mean(calm == 0) > 0.98
        assert np.all(volatile > 0)
        labels.append(states)
    assert np.mean(labels[0] == labels[1]) > 0.98
    assert np.mean(labels[0] == labels[2]) > 0.98


@pytest.mark.parametrize("order_by, vol_col", [("variance", 0), ("mean", 1)])
def test_three_volatility_levels_map_to_states_0_1_2(order_by, vol_col):
    n = 500
    X, dropped = _regime_features([0.003, 0.01, 0.03], n)
    model = RegimeHMM(RegimeConfig(seed=0, vol_col=vol_col, state_order_by=order_by)).fit(X)
    states = model.filtered_proba(X).argmax(axis=1)
    for k in range(3):
        segment = states[max(0, k * n - dropped) + 30 : (k + 1) * n - dropped]
        assert np.mean(segment == k) > 0.98


# -- (4) validity and bad input ---------------------------------------------------------------------


def test_rows_are_probabilities(fitted):
    model, X = fitted
    p = model.filtered_proba(X)
    assert p.shape == (len(X), 3) and p.dtype == np.float64
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)


def test_non_finite_row_raises_naming_the_row(fitted):
    model, X = fitted
    bad = X.copy()
    bad[17, 1] = np.nan
    with pytest.raises(ValueError, match="row index 17"):
        model.filtered_proba(bad)
    with pytest.raises(ValueError, match="row index 17"):
        RegimeHMM().fit(bad)
    with pytest.raises(ValueError):
        model.filtered_proba_step(None, np.array([np.inf, 0.0]))


def test_bad_shapes_and_constant_column_raise(fitted):
    model, X = fitted
    with pytest.raises(ValueError, match="columns"):
        model.filtered_proba(X[:, :1])
    const = X.copy()
    const[:, 1] = 2.0
    with pytest.raises(ValueError, match="constant"):
        RegimeHMM().fit(const)
    with pytest.raises(RuntimeError, match="not fitted"):
        RegimeHMM().filtered_proba(X)


def test_config_is_strict():
    with pytest.raises(ValidationError):
        RegimeConfig(n_states=2)
    with pytest.raises(ValidationError):
        RegimeConfig(n_states=5)
    with pytest.raises(ValidationError):
        RegimeConfig(n_state=3)  # typo is an error


# -- (5) persistence --------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_outputs(fitted, tmp_path):
    model, X = fitted
    model.save(tmp_path)
    loaded = RegimeHMM.load(tmp_path)
    assert loaded.cfg == model.cfg
    assert np.array_equal(loaded.filtered_proba(X), model.filtered_proba(X))
    with np.load(tmp_path / "regime_hmm.npz", allow_pickle=False) as npz:  # no object arrays inside
        assert set(npz.files) == {"startprob", "transmat", "means", "covars", "x_mean", "x_std"}


def test_corrupt_or_missing_files_raise_model_load_error(fitted, tmp_path):
    model, _ = fitted
    model.save(tmp_path)
    npz = tmp_path / "regime_hmm.npz"
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"regime_hmm\.npz"):
        RegimeHMM.load(tmp_path)

    model.save(tmp_path)
    (tmp_path / "regime_hmm.json").unlink()
    with pytest.raises(ModelLoadError, match=r"regime_hmm\.json"):
        RegimeHMM.load(tmp_path)


def test_wrong_shapes_in_file_raise_model_load_error(fitted, tmp_path):
    model, _ = fitted
    model.save(tmp_path)
    np.savez(
        tmp_path / "regime_hmm.npz",
        startprob=model.startprob,
        transmat=model.transmat[:2],  # wrong shape
        means=model.means,
        covars=model.covars,
        x_mean=model.x_mean,
        x_std=model.x_std,
    )
    with pytest.raises(ModelLoadError, match="transmat"):
        RegimeHMM.load(tmp_path)

    model.save(tmp_path)
    meta = json.loads((tmp_path / "regime_hmm.json").read_text())
    meta["config"]["n_states"] = 4  # disagrees with the arrays
    (tmp_path / "regime_hmm.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"regime_hmm\.npz"):
        RegimeHMM.load(tmp_path)


def test_pooled_sequences_fit_with_lengths():
    """Several sequences (one per symbol) fit with hmmlearn's ``lengths``; bad lengths are refused."""
    rng = np.random.default_rng(2)
    X = np.concatenate([rng.normal(0, 1, (200, 2)), rng.normal(0, 3, (200, 2))])
    cfg = RegimeConfig(n_iter=20)
    pooled = RegimeHMM(cfg).fit(X, [200, 200])
    assert pooled.is_fitted and np.allclose(pooled.filtered_proba(X[:50]).sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="sum to"):
        RegimeHMM(cfg).fit(X, [100, 100])
