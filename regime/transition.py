"""Regime-ahead model: LightGBM predicts the HMM regime h bars ahead from the features at t.

Target: ``target[t] = argmax_k filtered_proba[t + h, k]``, the most likely *filtered* regime at
t + h (filtered, so the target itself never looks past t + h). The last h rows have no target and
are dropped explicitly. Prediction is row-wise (gradient-boosted trees, Ke et al. 2017, "LightGBM:
A highly efficient gradient boosting decision tree", NeurIPS): row t of the output depends only on
row t of the features, so the model is causal whenever its features are.

Because the targets of the last h training rows look h bars into the future, a split between a
training and a later period must leave a purge gap of at least h bars (López de Prado 2018, ch. 7).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from market import json_codec
from regime.config import RegimeConfig
from regime.hmm import ModelLoadError, _read_json

__all__ = ["RegimeTransitionModel", "build_targets"]

_FORMAT_VERSION = 1
_MODEL_NAME = "regime_transition.txt"
_JSON_NAME = "regime_transition.json"


def build_targets(filtered: np.ndarray, horizon_bars: int) -> np.ndarray:
    """Regime h bars ahead: ``target[t] = argmax filtered[t + h]`` for t = 0 .. T−h−1.

    Parameters
    ----------
    filtered : np.ndarray, shape (T, K)
        Filtered regime probabilities (rows of :meth:`regime.hmm.RegimeHMM.filtered_proba`).
    horizon_bars : int
        h >= 1.

    Returns
    -------
    np.ndarray, shape (T − h,), int64
        Targets for feature rows 0 .. T−h−1 (ties resolve to the lowest state, as ``np.argmax``).

    Raises
    ------
    ValueError
        If ``filtered`` is not 2-D or has a non-finite row, or h < 1 or h >= T.
    """
    filtered = np.asarray(filtered, dtype=np.float64)
    if filtered.ndim != 2:
        raise ValueError(f"filtered must be 2-D (T, K), got shape {filtered.shape}")
    if horizon_bars < 1:
        raise ValueError(f"horizon_bars must be >= 1, got {horizon_bars}")
    T = filtered.shape[0]
    if horizon_bars >= T:
        raise ValueError(f"horizon_bars={horizon_bars} leaves no target in {T} rows")
    bad = np.flatnonzero(~np.isfinite(filtered).all(axis=1))
    if bad.size:
        raise ValueError(f"filtered has non-finite values; first row index {int(bad[0])}")
    return np.argmax(filtered[horizon_bars:], axis=1).astype(np.int64)


def _check_features(features: np.ndarray, n_features: int | None = None) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (T, F), got shape {features.shape}")
    if n_features is not None and features.shape[1] != n_features:
        raise ValueError(f"features must have {n_features} columns (as fitted), got {features.shape[1]}")
    features = features.astype(np.float64, copy=False)
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad.size:
        raise ValueError(
            f"features has non-finite values in {bad.size} row(s); first row index {int(bad[0])}"
        )
    return features


class RegimeTransitionModel:
    """LightGBM multiclass model of the HMM regime ``horizon_bars`` ahead.

    Always outputs K columns (K = number of HMM states) even when some regime never occurs as a
    target in the training data: such columns are 0. If only one regime occurs, the model is the
    constant one-hot prediction of that regime (no booster).

    Parameters
    ----------
    cfg : RegimeConfig, optional
        Uses ``horizon_bars``, ``lgbm_*``, ``n_threads`` and ``seed``. Defaults to ``RegimeConfig()``.
    """

    def __init__(self, cfg: RegimeConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else RegimeConfig()
        self.booster: Any = None  # lightgbm.Booster | None (lightgbm is imported lazily)
        self.classes: np.ndarray | None = None  # (m,) int64: booster output j -> regime classes[j]
        self.n_states: int | None = None
        self.n_features: int | None = None
        self.horizon_bars: int | None = None

    @property
    def config(self) -> RegimeConfig:
        """The configuration (alias of ``cfg``)."""
        return self.cfg

    def _lgb_params(self, num_class: int) -> dict:
        return {
            "objective": "multiclass",
            "num_class": num_class,
            "num_leaves": self.cfg.lgbm_num_leaves,
            "learning_rate": self.cfg.lgbm_learning_rate,
            "min_data_in_leaf": self.cfg.lgbm_min_child_samples,
            "num_threads": self.cfg.n_threads,
            "seed": self.cfg.seed,
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }

    def fit(
        self,
        features: np.ndarray,
        filtered: np.ndarray,
        horizon_bars: int | None = None,
        lengths: list[int] | None = None,
    ) -> RegimeTransitionModel:
        """Fit on features at t and the filtered regime at t + h.

        Parameters
        ----------
        features : np.ndarray, shape (T, F), float32 (any float accepted)
            Causal features, row t computed from bars <= t; all rows finite.
        filtered : np.ndarray, shape (T, K)
            Filtered regime probabilities aligned with ``features`` (same bars).
        horizon_bars : int, optional
            h; defaults to ``cfg.horizon_bars``. The last h rows have no target and are dropped.
        lengths : list[int], optional
            The rows are several independent sequences (one per symbol of a pooled run) of these lengths, in
            order: targets are built within each, and each one's last h rows are dropped (a target never comes
            from another sequence). None = one sequence.

        Returns
        -------
        RegimeTransitionModel
            ``self``, fitted.

        Raises
        ------
        ValueError
            If shapes disagree, a row is non-finite (the first is named), or h >= T.
        """
        import lightgbm as lgb

        h = self.cfg.horizon_bars if horizon_bars is None else int(horizon_bars)
        features = _check_features(features)
        filtered = np.asarray(filtered)
        if filtered.ndim != 2 or filtered.shape[0] != features.shape[0]:
            raise ValueError(f"filtered must have shape (T={features.shape[0]}, K), got {filtered.shape}")
        if lengths is None:
            targets = build_targets(filtered, h)
            X = features[: features.shape[0] - h]  # the last h rows have no target: dropped explicitly
        else:
            if sum(lengths) != features.shape[0] or min(lengths) < 1:
                raise ValueError(f"lengths {list(lengths)} must be positive and sum to the {features.shape[0]} rows")
            spans = list(itertools.pairwise(np.cumsum([0, *lengths]).tolist()))
            targets = np.concatenate([build_targets(filtered[a:b], h) for a, b in spans])
            X = np.concatenate([features[a : b - h] for a, b in spans])
        K = int(filtered.shape[1])
        classes = np.unique(targets)
        self.n_states, self.n_features, self.horizon_bars = K, int(features.shape[1]), h
        self.classes = classes.astype(np.int64)
        if classes.size == 1:
            self.booster = None
            return self
        y = np.searchsorted(classes, targets)  # regime -> contiguous booster class index
        dataset = lgb.Dataset(X, label=y, params={"verbosity": -1})
        self.booster = lgb.train(
            self._lgb_params(int(classes.size)), dataset, num_boost_round=self.cfg.lgbm_n_estimators
        )
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probabilities of each regime h bars ahead, row by row.

        Parameters
        ----------
        features : np.ndarray, shape (T, F)
            Same columns as in :meth:`fit`; all rows finite.

        Returns
        -------
        np.ndarray, shape (T, K), float64
            Row t depends only on ``features[t]``; rows sum to 1.

        Raises
        ------
        RuntimeError
            If the model is not fitted.
        ValueError
            On a wrong number of columns or a non-finite row (the first is named).
        """
        if self.classes is None or self.n_states is None:
            raise RuntimeError("RegimeTransitionModel is not fitted; call fit() or load() first")
        features = _check_features(features, self.n_features)
        out = np.zeros((features.shape[0], self.n_states), dtype=np.float64)
        if self.booster is None:
            out[:, self.classes[0]] = 1.0
            return out
        raw = np.asarray(self.booster.predict(features, num_threads=self.cfg.n_threads), dtype=np.float64)
        out[:, self.classes] = raw.reshape(features.shape[0], self.classes.size)
        return out

    # -- persistence -----------------------------------------------------------------------------

    def save(self, dir: Path) -> None:
        """Write ``regime_transition.json`` and, if a booster exists, ``regime_transition.txt``.

        Raises
        ------
        RuntimeError
            If the model is not fitted.
        """
        if self.classes is None:
            raise RuntimeError("RegimeTransitionModel is not fitted; nothing to save")
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        if self.booster is not None:
            self.booster.save_model(str(dir / _MODEL_NAME))
        meta = {
            "format_version": _FORMAT_VERSION,
            "kind": "RegimeTransitionModel",
            "n_states": self.n_states,
            "n_features": self.n_features,
            "horizon_bars": self.horizon_bars,
            "classes": [int(c) for c in self.classes],
            "has_booster": self.booster is not None,
            "config": self.cfg.model_dump(mode="json"),
        }
        (dir / _JSON_NAME).write_text(json_codec.dumps(meta, strict=False, indent=2, sort_keys=True))

    @classmethod
    def load(cls, dir: Path) -> RegimeTransitionModel:
        """Load a model written by :meth:`save` (LightGBM text format, no pickle).

        Raises
        ------
        ModelLoadError
            If a file is missing or corrupt, or the booster disagrees with the description
            (number of features or classes); the message names the file.
        """
        import lightgbm as lgb

        dir = Path(dir)
        meta_path, model_path = dir / _JSON_NAME, dir / _MODEL_NAME
        meta = _read_json(meta_path)
        try:
            if meta.get("format_version") != _FORMAT_VERSION or meta.get("kind") != "RegimeTransitionModel":
                raise ValueError(
                    f"unsupported format_version/kind {meta.get('format_version')}/{meta.get('kind')}"
                )
            cfg = RegimeConfig.model_validate(meta["config"])
            n_states, n_features = int(meta["n_states"]), int(meta["n_features"])
            horizon_bars = int(meta["horizon_bars"])
            classes = np.asarray(meta["classes"], dtype=np.int64)
            has_booster = bool(meta["has_booster"])
            if classes.ndim != 1 or classes.size < 1 or (np.diff(classes) <= 0).any():
                raise ValueError("classes must be a non-empty increasing list")
            if classes[0] < 0 or classes[-1] >= n_states:
                raise ValueError(f"classes {classes.tolist()} out of range for n_states={n_states}")
            if has_booster != (classes.size > 1):
                raise ValueError("has_booster must be true exactly when more than one class was seen")
        except Exception as exc:
            raise ModelLoadError(f"{meta_path}: invalid model description: {exc}") from exc
        model = cls(cfg)
        model.n_states, model.n_features, model.horizon_bars = n_states, n_features, horizon_bars
        model.classes = classes
        if has_booster:
            if not model_path.is_file():
                raise ModelLoadError(f"{model_path}: file is missing")
            try:
                booster = lgb.Booster(model_file=str(model_path))
            except Exception as exc:  # lightgbm.basic.LightGBMError on a corrupt file
                raise ModelLoadError(f"{model_path}: cannot read LightGBM model: {exc}") from exc
            if booster.num_feature() != n_features or booster.num_model_per_iteration() != classes.size:
                raise ModelLoadError(
                    f"{model_path}: booster has {booster.num_feature()} features and "
                    f"{booster.num_model_per_iteration()} classes, expected {n_features} and {classes.size}"
                )
            model.booster = booster
        return model
