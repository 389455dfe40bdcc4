"""TCN signal model: causality, truncation invariance, determinism, learning, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from regime.hmm import ModelLoadError
from signals.config import SignalConfig
from signals.tcn import TCN, TCNSignalModel, train_tcn
from tests.kit.candles import make_candles

SMALL = SignalConfig(channels=8, levels=2, kernel_size=3, window_bars=16, epochs=2, batch_size=64)


def _candle_features(n_bars: int, seed: int = 0) -> np.ndarray:
    """(T, 3) float32: log return, log range, log volume of make_candles (no warm-up needed)."""
    c = make_candles(n_bars + 1, seed=seed)
    ret = np.diff(np.log(c["close"].to_numpy()))
    rng_ = np.log(c["high"] / c["low"]).to_numpy()[1:]
    vol = np.log(c["volume"].to_numpy())[1:]
    return np.column_stack([ret, rng_, vol]).astype(np.float32)


def _learnable(n: int, seed: int):
    """Label at t is a deterministic function of x[t, 0] and x[t − 2, 1] (inside the window)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    s = x[:, 0] + np.concatenate([[0.0, 0.0], x[:-2, 1]])
    labels = np.where(s > 0.6, 2, np.where(s < -0.6, 0, 1)).astype(np.int8)
    labels[:2] = -1
    return x, labels


def _random_labels(n: int, seed: int) -> np.ndarray:
    labels = np.random.default_rng(seed).integers(0, 3, n).astype(np.int8)
    labels[-5:] = -1  # the last bars have no label yet
    return labels


@pytest.fixture(scope="module")
def trained():
    features = _candle_features(600)
    return train_tcn(features, _random_labels(600, 1), SMALL), features


# -- network ---------------------------------------------------------------------------------------


def test_receptive_field_hand_numbers():
    assert SignalConfig().receptive_field() == 61  # 1 + 2*(3-1)*(1+2+4+8)
    assert TCN(5, SignalConfig()).receptive_field() == 61
    assert SMALL.receptive_field() == 13  # 1 + 2*2*(1+2)
    with pytest.raises(ValidationError, match="receptive field"):
        SignalConfig(levels=5, window_bars=64)  # receptive field 125
    with pytest.raises(ValidationError):
        SignalConfig(chanels=16)  # typo is an error


def test_network_is_causal_and_sees_exactly_its_receptive_field():
    torch.manual_seed(0)
    net = TCN(4, SMALL).eval()
    rf = net.receptive_field()
    x = torch.randn(2, 4, 40)
    t = 25
    with torch.inference_mode():
        base = net.sequence_logits(x)
        future = x.clone()
        future[:, :, t + 1 :] += 5.0 * torch.randn(2, 4, 40 - t - 1)
        after = net.sequence_logits(future)
        assert torch.equal(after[:, :, : t + 1], base[:, :, : t + 1])  # the past is untouched
        assert not torch.allclose(after[:, :, t + 1 :], base[:, :, t + 1 :])  # the perturbation mattered

        oldest_seen = x.clone()
        oldest_seen[:, :, t - rf + 1] += 10.0
        assert not torch.equal(net.sequence_logits(oldest_seen)[:, :, t], base[:, :, t])
        too_old = x.clone()
        too_old[:, :, : t - rf + 1] += 10.0
        assert torch.equal(net.sequence_logits(too_old)[:, :, t], base[:, :, t])
        # forward() is the last column of sequence_logits
        torch.testing.assert_close(net(x), base[:, :, -1])


# -- inference ---------------------------------------------------------------------------------------


def test_probabilities_shape_warmup_nan_and_sum_to_one(trained):
    model, features = trained
    p = model.predict_proba(features)
    W = SMALL.window_bars
    assert p.shape == (len(features), 3) and p.dtype == np.float32
    assert np.isnan(p[: W - 1]).all()
    assert np.isfinite(p[W - 1 :]).all() and np.all(p[W - 1 :] >= 0)
    np.testing.assert_allclose(p[W - 1 :].sum(axis=1), 1.0, atol=1e-5)
    assert np.isnan(model.predict_proba(features[: W - 1])).all()


def test_predict_proba_is_truncation_invariant(trained):
    model, features = trained
    full = model.predict_proba(features, batch_size=128)
    W = SMALL.window_bars
    for t in np.random.default_rng(2).integers(W - 1, len(features), size=12):
        np.testing.assert_allclose(
            model.predict_proba(features[: t + 1], batch_size=128)[t], full[t], atol=1e-6, rtol=0
        )
        # serving passes only the last window
        np.testing.assert_allclose(
            model.predict_proba(features[t - W + 1 : t + 1])[-1], full[t], atol=1e-6, rtol=0
        )


def test_non_finite_feature_row_raises_naming_the_row(trained):
    model, features = trained
    bad = features.copy()
    bad[123, 2] = np.nan
    with pytest.raises(ValueError, match="row 123"):
        model.predict_proba(bad)
    with pytest.raises(ValueError, match="columns"):
        model.predict_proba(features[:, :2])


# -- training ----------------------------------------------------------------------------------------


def test_same_seed_gives_identical_weights_and_leaves_global_rng_alone():
    features = _candle_features(300)
    labels = _random_labels(300, 3)
    state_before = torch.get_rng_state()
    a = train_tcn(features, labels, SMALL)
    assert torch.equal(torch.get_rng_state(), state_before)
    b = train_tcn(features, labels, SMALL)
    c = train_tcn(features, labels, SMALL.model_copy(update={"seed": 1}))
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_learns_a_deterministic_function_of_recent_inputs_better_than_chance():
    cfg = SignalConfig(
        channels=16, levels=2, kernel_size=3, window_bars=16, epochs=4, batch_size=64, dropout=0.0
    )
    x, labels = _learnable(3000, seed=0)
    model = train_tcn(x, labels, cfg)
    x_test, labels_test = _learnable(1000, seed=1)
    pred = model.predict_proba(x_test)[cfg.window_bars - 1 :].argmax(axis=1)
    truth = labels_test[cfg.window_bars - 1 :]
    majority = np.bincount(truth).max() / truth.size
    assert np.mean(pred == truth) > majority + 0.2


def test_standardisation_uses_training_window_rows_only():
    features = _candle_features(400)
    features[300:] += 1000.0  # a later period the model must not see
    labels = _random_labels(400, 4)
    mask = np.zeros(400, dtype=bool)
    mask[50:200] = True  # sample ends 50..199 -> windows cover rows 35..199
    model = train_tcn(features, labels, SMALL, valid_mask=mask)
    rows = features[35:200].astype(np.float64)
    np.testing.assert_allclose(model.feature_mean, rows.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(model.feature_std, rows.std(axis=0), rtol=1e-5)


def test_subsampling_is_seeded():
    features = _candle_features(400)
    labels = _random_labels(400, 5)
    cfg = SMALL.model_copy(update={"max_train_samples": 100})
    a, b = train_tcn(features, labels, cfg), train_tcn(features, labels, cfg)
    assert all(torch.equal(a.net.state_dict()[k], b.net.state_dict()[k]) for k in a.net.state_dict())


def test_training_input_errors():
    features = _candle_features(200)
    labels = _random_labels(200, 6)
    bad = features.copy()
    bad[70, 0] = np.inf
    with pytest.raises(ValueError, match="row 70"):
        train_tcn(bad, labels, SMALL)
    with pytest.raises(ValueError, match="labels must be in"):
        train_tcn(features, np.full(200, 3, dtype=np.int8), SMALL)
    with pytest.raises(ValueError, match="no training sample"):
        train_tcn(features, labels, SMALL, valid_mask=np.zeros(200, dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        train_tcn(features, labels[:-1], SMALL)
    # a non-finite row outside every training window is fine (e.g. an excluded warm-up row)
    warm = features.copy()
    warm[0] = np.nan
    mask = np.ones(200, dtype=bool)
    mask[:40] = False
    train_tcn(warm, labels, SMALL.model_copy(update={"epochs": 1}), valid_mask=mask)


# -- persistence --------------------------------------------------------------------------------------


def test_save_load_round_trip(trained, tmp_path):
    model, features = trained
    model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tcn.json", "tcn.safetensors"]
    loaded = TCNSignalModel.load(tmp_path)
    assert loaded.config == model.cfg and loaded.n_features == 3
    assert np.array_equal(loaded.predict_proba(features), model.predict_proba(features), equal_nan=True)


def test_truncated_or_inconsistent_files_raise_model_load_error(trained, tmp_path):
    model, _ = trained
    model.save(tmp_path)
    weights = tmp_path / "tcn.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match=r"tcn\.safetensors"):
        TCNSignalModel.load(tmp_path)

    model.save(tmp_path)
    meta = json.loads((tmp_path / "tcn.json").read_text())
    meta["n_features"] = 4
    meta["feature_mean"].append(0.0)
    meta["feature_std"].append(1.0)
    (tmp_path / "tcn.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"tcn\.safetensors"):  # shapes do not match
        TCNSignalModel.load(tmp_path)

    weights.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        TCNSignalModel.load(tmp_path)
    (tmp_path / "tcn.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tcn\.json"):
        TCNSignalModel.load(tmp_path)
