"""Composition of the V2 market observation: features + regime probabilities + signal probabilities.

One function builds the market part of the observation for training (out-of-fold models),
evaluation and serving (the bundle's models), so the three cannot drift apart. The account part
(position, leverage, PnL, drawdown) is appended by the env (``envs.trading_env``).

Column order (the observation schema): feature columns (``market.features.feature_names``),
``regime_p{k}`` (forward-filtered HMM state probabilities, k = 0 calmest .. K-1 most volatile),
``regime_ahead_p{k}`` (LightGBM probability of the filtered state ``horizon_bars`` ahead),
``signal_p_down``, ``signal_p_timeout``, ``signal_p_up`` (TCN softmax over triple-barrier outcomes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from envs.trading_env import ACCOUNT_FEATURES
from market import json_codec
from market.features import FeatureConfig, feature_names
from regime.hmm import RegimeHMM
from regime.transition import RegimeTransitionModel
from signals.tcn import TCNSignalModel

SIGNAL_COLUMNS = ("signal_p_down", "signal_p_timeout", "signal_p_up")


@dataclass(frozen=True)
class StackModels:
    """The fitted regime and signal models whose outputs enter the observation."""

    hmm: RegimeHMM
    transition: RegimeTransitionModel
    tcn: TCNSignalModel
    hmm_columns: tuple[str, ...]

    @property
    def n_states(self) -> int:
        """Number of HMM regimes."""
        return int(self.hmm.cfg.n_states)

    @property
    def signal_models(self) -> tuple[TCNSignalModel, ...]:
        """The signal models whose outputs enter the observation, in column order: ``(tcn,)``.

        A seed ensemble (:class:`agents.ensemble.EnsembleModels`) has one per member, all with the
        ``window_bars`` of ``tcn``.
        """
        return (self.tcn,)

    @property
    def output_names(self) -> list[str]:
        """Names of the model-output columns, in order: :func:`model_output_names` of ``n_states``."""
        return model_output_names(self.n_states)


def model_output_names(n_states: int) -> list[str]:
    """Names of the model-output columns appended to the features, in order."""
    return (
        [f"regime_p{k}" for k in range(n_states)]
        + [f"regime_ahead_p{k}" for k in range(n_states)]
        + list(SIGNAL_COLUMNS)
    )


def market_obs_names(feature_cfg: FeatureConfig, n_states: int) -> list[str]:
    """The market-observation schema: feature names then model-output names."""
    return list(feature_names(feature_cfg)) + model_output_names(n_states)


def schema_hash(names: list[str] | tuple[str, ...], extra: dict | None = None) -> str:
    """SHA-256 of the observation schema (market names, account features, and ``extra``)."""
    payload = {"market_obs": list(names), "account": list(ACCOUNT_FEATURES), "extra": extra or {}}
    return hashlib.sha256(json_codec.dumps(payload, sort_keys=True).encode()).hexdigest()


def model_outputs(features: pd.DataFrame, models: StackModels, *, start: int, end: int) -> pd.DataFrame:
    """Model outputs for rows ``[start, end)`` of ``features`` (warm-up already dropped).

    Every output at row t uses feature rows <= t only: the HMM filter runs forward from row 0,
    the LightGBM model is row-wise, the TCN reads the window of rows ``t - window + 1 .. t``
    (each of ``models.signal_models`` in turn: one, or one per member of a seed ensemble).

    Returns
    -------
    pd.DataFrame
        float32, index ``features.index[start:end]``, columns ``models.output_names``
        (``model_output_names(K)`` for a single bundle's models).

    Raises
    ------
    ValueError
        If the span is empty, the TCN window does not fit before ``start``, or an output is non-finite.
    """
    if not 0 <= start < end <= len(features):
        raise ValueError(f"invalid row span [{start}, {end}) for {len(features)} feature rows")
    window = models.tcn.window_bars
    if start < window - 1:
        raise ValueError(f"start row {start} leaves fewer than window_bars={window} rows of history for the TCN")
    x_hmm = features.loc[:, list(models.hmm_columns)].to_numpy(np.float64)[:end]
    filtered = models.hmm.filtered_proba(x_hmm)[start:end]
    feats = features.to_numpy(np.float32)
    ahead = models.transition.predict_proba(feats[start:end])
    signal = [m.predict_proba(feats[start - window + 1 : end])[window - 1 :] for m in models.signal_models]
    out = np.concatenate([filtered, ahead, *signal], axis=1).astype(np.float32)
    if not np.isfinite(out).all():
        bad = np.where(~np.isfinite(out).all(axis=1))[0][:5]
        raise ValueError(f"non-finite model outputs at rows {[str(features.index[start + i]) for i in bad]}")
    return pd.DataFrame(out, index=features.index[start:end], columns=models.output_names)


def last_row_outputs(features: pd.DataFrame, models: StackModels, regime_proba: np.ndarray) -> np.ndarray:
    """Model outputs of the LAST row of ``features``, given its filtered regime probabilities.

    The serving twin of :func:`model_outputs` for one bar: the caller advances the HMM filter
    itself (``RegimeHMM.filtered_proba_step``, O(K^2) per bar instead of a pass over the history);
    the LightGBM model reads the last row and the TCN the last ``window_bars`` rows, exactly as
    :func:`model_outputs` does for that row.

    Parameters
    ----------
    features : pd.DataFrame
        Feature rows (warm-up dropped), the last being the bar to serve; >= ``window_bars`` rows.
    models : StackModels
        The bundle's models.
    regime_proba : np.ndarray
        (K,) forward-filtered state probabilities of the last row.

    Returns
    -------
    np.ndarray
        float32, shape (2K + 3 S,) with S = ``len(models.signal_models)`` (1 for a single bundle), in the
        order of ``models.output_names``.

    Raises
    ------
    ValueError
        If there are fewer than ``window_bars`` rows, ``regime_proba`` has the wrong shape, or an
        output is non-finite.
    """
    window = models.tcn.window_bars
    if len(features) < window:
        raise ValueError(f"{len(features)} feature rows < window_bars={window} for the TCN")
    k = models.n_states
    regime = np.asarray(regime_proba, dtype=np.float64).reshape(-1)
    if regime.shape != (k,):
        raise ValueError(f"regime_proba must have shape ({k},), got {regime.shape}")
    feats = features.to_numpy(np.float32)
    ahead = models.transition.predict_proba(feats[-1:])
    signal = [m.predict_proba(feats[-window:])[-1:] for m in models.signal_models]
    out = np.concatenate([regime[None, :], ahead, *signal], axis=1).astype(np.float32)[0]
    if not np.isfinite(out).all():
        raise ValueError(f"non-finite model outputs at {features.index[-1]}: {out.tolist()}")
    return out


@dataclass(frozen=True)
class ObsNormalizer:
    """Fixed standardisation of the market observation, fitted on the agent's training rows."""

    mean: np.ndarray  # float32 (F,)
    std: np.ndarray  # float32 (F,), floored at 1e-6
    clip: float

    @classmethod
    def fit(cls, market_obs: np.ndarray, clip: float) -> ObsNormalizer:
        """Normaliser with the column means and standard deviations (floored at 1e-6) of ``market_obs``."""
        mean = market_obs.mean(axis=0).astype(np.float32)
        std = np.maximum(market_obs.std(axis=0), 1e-6).astype(np.float32)
        return cls(mean=mean, std=std, clip=float(clip))

    def __call__(self, market_obs: np.ndarray) -> np.ndarray:
        """Standardised ``market_obs`` clipped to ``[-clip, clip]``, float32."""
        z = (np.asarray(market_obs, dtype=np.float32) - self.mean) / self.std
        return np.clip(z, -self.clip, self.clip).astype(np.float32)
