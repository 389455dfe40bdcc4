"""Drift detection (pure): is the market, or the model's performance, drifting away from training?

Three statistics over the last ``window_bars`` bars, each against a threshold of :class:`DriftConfig`
(``configs/serve.yaml``, section ``drift``):

* **feature_psi**: the share of features whose population stability index between the bundle's training
  distribution (:mod:`agents.drift_reference`) and the window exceeds the feature's limit:
  ``max(psi_threshold, psi_calibration_margin x`` the largest PSI of the training period's own windows of the
  same length``)``. The calibration matters: features built on rolling windows are autocorrelated, so a week of
  ordinary market has a large PSI against a year of training (on BTCUSDT 1h, a 2022 reference and the weeks of
  2023-H1 2024, 60 % of the features exceed the customary 0.25 in a median week; with the calibrated limit the
  share of drifted features stayed at or below 4.3 % in every week).
  ``PSI = sum_i (a_i - e_i) ln(a_i / e_i)`` over the reference bins, ``e`` the training shares, ``a`` the window's,
  each floored at ``psi_floor`` (Siddiqi 2006, *Credit Risk Scorecards*, ch. 8; Yurdakul 2018, "Statistical
  properties of population stability index"; 0.1 / 0.25 are the customary "some" / "significant" shift levels).
* **regime_occupancy**: the total variation distance ``0.5 * sum_k |q_k - p_k|`` between the window's mean
  forward-filtered regime probabilities ``q`` and the training occupancy ``p`` (in [0, 1]); its limit is
  ``max(occupancy_tv_threshold, psi_calibration_margin x`` the largest distance of the training windows``)``
  (regimes last days, so a week often sits in one of them).
* **pnl_cusum**: a one-sided lower CUSUM (Page 1954, "Continuous inspection schemes", Biometrika 41) of the
  realised per-bar returns standardised by the walk-forward's expectation (mean, std per bar):
  ``S_t = min(0, S_{t-1} + (r_t - mean) / std + k)``; breach when ``S_t <= -h`` (``k`` =
  ``cusum_allowance_sd``, ``h`` = ``cusum_threshold_sd``, both in standard deviations). Its value is the
  lowest S of the window.

A statistic without its reference (a bundle exported before the reference existed, no regime probabilities, no
walk-forward expectation) is *unavailable*, never a breach. Any breach asks for ``action``: ``alert`` (record and
notify), ``rollback`` (to the previous bundle that passed the gate, kept by the hot-swap slot) or ``v1`` (V1
decides until an operator resets). Carrying out the action belongs to the serving loop; this module returns the
verdict and the ``drift`` event rows (:meth:`DriftVerdict.event_details`), and reads them back for ``ats status``
(:func:`drift_status_line`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from agents.drift_reference import psi_of
from market.config_base import StrictConfig

__all__ = [
    "DRIFT_ACTIONS",
    "DRIFT_EVENT",
    "DriftConfig",
    "DriftStatistic",
    "DriftVerdict",
    "cusum_lower",
    "drift_status_line",
    "evaluate_drift",
    "occupancy_distance",
    "population_stability_index",
]

DRIFT_EVENT = "drift"
"""Event kind of a drift evaluation (one event per statistic, all at the bar evaluated)."""

DRIFT_ACTIONS = ("alert", "rollback", "v1")
"""What a breach triggers (module docstring)."""


class DriftConfig(StrictConfig):
    """Drift thresholds (``configs/serve.yaml`` ``drift:``); units in the names."""

    enabled: bool = Field(True, description="evaluate drift at all")
    window_bars: int = Field(168, ge=24, description="bars of the evaluated window (168 = one week of 1h bars)")
    every_bars: int = Field(24, ge=1, description="evaluate once per this many bars")
    psi_threshold: float = Field(0.25, gt=0, description="PSI above which a feature may count as drifted (the floor of "
                                                         "its calibrated threshold)")
    psi_calibration_margin: float = Field(1.5, gt=0, description="a feature drifts when its PSI exceeds this multiple "
                                          "of the largest PSI of the training period's own windows of the same length")
    psi_feature_share: float = Field(0.1, gt=0, le=1, description="breach when at least this share of features drift")
    psi_floor: float = Field(1e-4, gt=0, lt=0.01, description="floor of a bin share in the PSI (no log of 0)")
    occupancy_tv_threshold: float = Field(0.3, gt=0, le=1, description="breach when the regime-occupancy total "
                                                                       "variation distance reaches this")
    cusum_allowance_sd: float = Field(0.5, ge=0, description="CUSUM allowance k, standard deviations per bar")
    cusum_threshold_sd: float = Field(8.0, gt=0, description="CUSUM decision interval h, standard deviations")
    action: Literal["alert", "rollback", "v1"] = Field("alert", description="what a breach triggers")

    @model_validator(mode="after")
    def _every(self) -> DriftConfig:
        if self.every_bars > self.window_bars:
            raise ValueError(f"drift.every_bars ({self.every_bars}) must be <= drift.window_bars ({self.window_bars})")
        return self


@dataclass(frozen=True)
class DriftStatistic:
    """One statistic of an evaluation: ``value`` against ``threshold`` (None when unavailable, with ``note``)."""

    name: str
    value: float | None
    threshold: float
    breach: bool
    note: str = ""

    @property
    def available(self) -> bool:
        """Whether the statistic could be computed."""
        return self.value is not None


@dataclass(frozen=True)
class DriftVerdict:
    """The statistics of one evaluation and the action asked for (None without a breach)."""

    statistics: tuple[DriftStatistic, ...]
    action: str | None
    detail: Mapping[str, Any]

    @property
    def breached(self) -> tuple[str, ...]:
        """Names of the statistics in breach."""
        return tuple(s.name for s in self.statistics if s.breach)

    def event_details(self) -> list[dict[str, Any]]:
        """The ``detail`` of each ``drift`` event row (one per statistic): ``statistic, value, threshold, breach,
        action`` (the action taken: the configured one on a breach, else 'none'), ``note``."""
        return [{"statistic": s.name, "value": s.value, "threshold": s.threshold, "breach": s.breach,
                 "action": self.action if s.breach else "none", "note": s.note,
                 **({"features": dict(self.detail.get("features_over", {}))} if s.name == "feature_psi" else {})}
                for s in self.statistics]  # fmt: skip


def population_stability_index(edges: Sequence[float], ref_freqs: Sequence[float], values: np.ndarray,
                               floor: float = 1e-4) -> float:  # fmt: skip
    """PSI of ``values`` against the reference bins (inner ``edges``, shares ``ref_freqs``; module docstring);
    NaN when ``values`` has no finite value.

    Raises
    ------
    ValueError
        ``ref_freqs`` does not have ``len(edges) + 1`` entries.
    """
    if len(ref_freqs) != len(edges) + 1:
        raise ValueError(f"PSI: {len(ref_freqs)} reference shares for {len(edges)} edges (needs {len(edges) + 1})")
    return psi_of(edges, ref_freqs, values, floor)


def occupancy_distance(reference: Sequence[float], proba: np.ndarray) -> float:
    """Total variation distance between the mean of ``proba`` (rows x states) and ``reference`` (states).

    Raises
    ------
    ValueError
        The number of states differs, or ``proba`` is empty.
    """
    p = np.asarray(reference, dtype=np.float64)
    q = np.asarray(proba, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != p.size or len(q) == 0:
        raise ValueError(f"regime occupancy: probabilities of shape {q.shape} against {p.size} reference states")
    return float(0.5 * np.abs(q.mean(axis=0) - p).sum())


def cusum_lower(returns: np.ndarray, mean: float, std: float, allowance_sd: float) -> np.ndarray:
    """Path of the lower CUSUM ``S_t`` (module docstring) of ``returns``, starting at 0; shape of ``returns``.

    Raises
    ------
    ValueError
        ``std`` not positive and finite.
    """
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"CUSUM: the expected per-bar standard deviation must be > 0, got {std}")
    z = (np.asarray(returns, dtype=np.float64) - mean) / std + allowance_sd
    out = np.empty_like(z)
    s = 0.0
    for i, v in enumerate(z):
        s = min(0.0, s + v)
        out[i] = s
    return out


def evaluate_drift(cfg: DriftConfig, reference: Mapping[str, Any] | None, *, features: pd.DataFrame,
                   regime_proba: np.ndarray | None, bar_returns: np.ndarray,
                   expected_bar_return: tuple[float, float] | None) -> DriftVerdict:  # fmt: skip
    """Evaluate the three statistics on one window (module docstring).

    Parameters
    ----------
    cfg : DriftConfig
        Thresholds and the action.
    reference : Mapping | None
        The bundle's reference (:func:`agents.drift_reference.read_reference`); None: feature and regime drift
        unavailable.
    features : pandas.DataFrame
        The window's feature rows (bars x features, the bundle's feature names); features missing from the
        reference (or from the window) are skipped and counted in the detail.
    regime_proba : numpy.ndarray | None
        The window's forward-filtered regime probabilities (bars x states).
    bar_returns : numpy.ndarray
        Realised per-bar returns of the account since the monitor started (fractions, in order).
    expected_bar_return : tuple[float, float] | None
        The walk-forward's expected per-bar return (mean, std); None: the CUSUM is unavailable.
    """
    stats: list[DriftStatistic] = []
    detail: dict[str, Any] = {}
    ref_features = (reference or {}).get("features") or {}
    if not ref_features:
        stats.append(DriftStatistic("feature_psi", None, cfg.psi_feature_share, False,
                                    "unavailable: the bundle has no training distribution (exported before it existed)"))
    else:
        common = [c for c in features.columns if c in ref_features]
        psis = {c: population_stability_index(ref_features[c]["edges"], ref_features[c]["freqs"],
                                              features[c].to_numpy(), cfg.psi_floor) for c in common}  # fmt: skip
        finite = {c: v for c, v in psis.items() if math.isfinite(v)}
        limits = {c: _feature_limit(cfg, ref_features[c], len(features)) for c in finite}
        if not finite:
            stats.append(DriftStatistic("feature_psi", None, cfg.psi_feature_share, False,
                                        "unavailable: no feature of the window matches the reference"))
        else:
            over = {c: round(v, 4) for c, v in sorted(finite.items(), key=lambda kv: -kv[1]) if v > limits[c]}
            calibrated = sum(1 for c in finite if _calibration(ref_features[c], len(features)) is not None)
            share = len(over) / len(finite)
            detail["features_over"] = over
            detail["psi_max"] = max(finite.values())
            stats.append(DriftStatistic(
                "feature_psi", share, cfg.psi_feature_share, share >= cfg.psi_feature_share,
                f"{len(over)} of {len(finite)} features over their limit (PSI > max({cfg.psi_threshold:g}, "
                f"{cfg.psi_calibration_margin:g} x the training windows' largest); {calibrated} calibrated for "
                f"{len(features)}-bar windows; max PSI {max(finite.values()):.3f}; "
                f"{len(features.columns) - len(common)} not in the reference"))
    occ = (reference or {}).get("occupancy")
    if occ is None or regime_proba is None or len(regime_proba) == 0:
        stats.append(DriftStatistic("regime_occupancy", None, cfg.occupancy_tv_threshold, False,
                                    "unavailable: " + ("no training occupancy in the bundle" if occ is None
                                                       else "no regime probabilities in the window")))
    else:
        tv = occupancy_distance(occ, regime_proba)
        cal: Mapping[str, Any] = (reference or {}).get("occupancy_window_tv") or {}
        calibrated = bool(cal) and int(cal.get("window_bars", -1)) == len(regime_proba)
        limit = max(cfg.occupancy_tv_threshold, cfg.psi_calibration_margin * float(cal["max"])) if calibrated \
            else cfg.occupancy_tv_threshold
        stats.append(DriftStatistic("regime_occupancy", tv, limit, tv >= limit,
                                    "total variation distance of the mean filtered probabilities"
                                    + (" (limit calibrated on the training windows)" if calibrated else "")))
    r = np.asarray(bar_returns, dtype=np.float64)
    r = r[np.isfinite(r)]
    if expected_bar_return is None or r.size == 0:
        stats.append(DriftStatistic("pnl_cusum", None, -cfg.cusum_threshold_sd, False,
                                    "unavailable: " + ("no walk-forward expectation recorded" if expected_bar_return is None
                                                       else "no realised return yet")))
    else:
        mean, std = expected_bar_return
        low = float(cusum_lower(r, mean, std, cfg.cusum_allowance_sd).min())
        stats.append(DriftStatistic("pnl_cusum", low, -cfg.cusum_threshold_sd, low <= -cfg.cusum_threshold_sd,
                                    f"lower CUSUM over {r.size} bars vs expected {mean:.3g} +- {std:.3g} per bar"))
    action = cfg.action if any(s.breach for s in stats) else None
    return DriftVerdict(tuple(stats), action, detail)


def _calibration(ref_feature: Mapping[str, Any], n_bars: int) -> float | None:
    """The largest PSI of the training period's own windows when they had ``n_bars`` bars, else None."""
    cal = ref_feature.get("window_psi")
    return float(cal["max"]) if cal and int(cal.get("window_bars", -1)) == n_bars else None


def _feature_limit(cfg: DriftConfig, ref_feature: Mapping[str, Any], n_bars: int) -> float:
    """PSI above which the feature counts as drifted: ``max(psi_threshold, margin x calibration)``; the plain
    ``psi_threshold`` without a calibration for windows of ``n_bars`` bars."""
    cal = _calibration(ref_feature, n_bars)
    return cfg.psi_threshold if cal is None else max(cfg.psi_threshold, cfg.psi_calibration_margin * cal)


def drift_status_line(events: pd.DataFrame) -> str | None:
    """The ``drift`` line of ``ats status``: the latest evaluation's statistics (``name value vs threshold``, the
    breaches with their action) from the run's ``drift`` events; None when the run recorded none."""
    if events.empty:
        return None
    drift = events[events.kind == DRIFT_EVENT]
    if drift.empty:
        return None
    last = drift[drift.time == drift.time.iloc[-1]]
    parts = []
    for det in last.detail:
        det = det or {}
        name, value, thr = det.get("statistic", "?"), det.get("value"), det.get("threshold")
        if value is None:
            parts.append(f"{name} unavailable")
            continue
        text = f"{name} {float(value):.3g} (threshold {'?' if thr is None else format(float(thr), '.3g')})"
        if det.get("breach"):
            text += f" BREACH -> {det.get('action')}"
        parts.append(text)
    return f"{drift.time.iloc[-1]}: " + "; ".join(parts)
