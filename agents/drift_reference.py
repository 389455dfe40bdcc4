"""The training distribution a bundle carries for drift detection (``drift_reference.json`` in the bundle).

Written at export from the training rows only (never validation or test): per feature, the inner bin edges at
the deciles of the training values and the share of training rows in each bin; and the regime occupancy (the
mean forward-filtered HMM state probability over the training rows). A bundle exported before this file existed
has none: :func:`read_reference` returns None and the drift monitor reports feature and regime drift as
'unavailable' (:mod:`serving.drift`).

Binning: with inner edges ``e_1 < ... < e_k`` a value x falls in bin ``i`` = the number of edges strictly below x
(:func:`bin_index`: ``(-inf, e_1]`` is bin 0, ``(e_k, inf)`` bin k), so the reference and the serving window are
binned by one function. Non-finite values are not binned (they are counted apart as ``n_nonfinite``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["REFERENCE_FILE", "REFERENCE_VERSION", "bin_index", "fit_reference", "psi_of", "read_reference", "write_reference"]

REFERENCE_FILE = "drift_reference.json"
"""File name of the reference inside a bundle (hashed in the manifest like every bundle file)."""

REFERENCE_VERSION = 1
"""Format version of the reference."""

DEFAULT_BINS = 10
"""Bins per feature (deciles of the training values)."""


def bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bin of each value for inner edges ``edges`` (ascending, shape (k,)): ints in [0, k], shape of ``values``."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(values, dtype=np.float64), side="left")


def psi_of(edges: Any, freqs: Any, values: np.ndarray, floor: float = 1e-4) -> float:
    """Population stability index of ``values`` against reference bins (see :mod:`serving.drift`); NaN without a
    finite value."""
    e = np.asarray(freqs, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    a = np.bincount(bin_index(np.asarray(edges), x), minlength=e.size) / x.size
    a, e = np.maximum(a, floor), np.maximum(e, floor)
    return float(np.sum((a - e) * np.log(a / e)))


def _calibrate(features: pd.DataFrame, out: dict[str, Any], window: int, *, floor: float) -> None:
    """Per feature, the PSI of each non-overlapping ``window``-bar stretch of the training rows against the whole
    training reference: its 95th percentile and maximum (how much an ordinary window of the training period moves
    by itself: features built on rolling windows are autocorrelated, so a short window never looks like the whole
    period)."""
    starts = range(0, len(features) - window + 1, window)
    for name in features.columns:
        ref = out[str(name)]
        vals = [psi_of(ref["edges"], ref["freqs"], features[name].to_numpy(dtype=np.float64)[i:i + window], floor)
                for i in starts]
        vals = [v for v in vals if np.isfinite(v)]
        ref["window_psi"] = ({"window_bars": window, "n_windows": len(vals), "q95": float(np.quantile(vals, 0.95)),
                              "max": float(max(vals))} if vals else None)  # fmt: skip


def fit_reference(features: pd.DataFrame, regime_proba: np.ndarray | None = None, *, n_bins: int = DEFAULT_BINS,
                  source: str = "training rows", calibration_window_bars: int | None = 168,
                  psi_floor: float = 1e-4) -> dict[str, Any]:  # fmt: skip
    """The reference of ``features`` (training rows x features, float) and ``regime_proba`` (training rows x
    states, forward-filtered probabilities; optional).

    Returns
    -------
    dict
        ``{"version", "source", "n_rows", "n_bins", "features": {name: {"edges", "freqs", "n_nonfinite",
        "window_psi"}}, "occupancy": [p_0, ..., p_{K-1}] | None}``; ``freqs`` sum to 1 over the finite values; a
        constant feature has one edge (its value) and all rows in bin 0. ``window_psi`` (with
        ``calibration_window_bars``): ``{"window_bars", "n_windows", "q95", "max"}`` of the PSI of the training
        period's own non-overlapping windows against the reference (None with fewer rows than one window).
        ``occupancy_window_tv``: ``{"window_bars", "n_windows", "max"}`` of the total variation distance of those
        windows' mean regime probabilities from the occupancy (None without probabilities or a full window).

    Raises
    ------
    ValueError
        No rows, ``n_bins`` < 2, a feature with no finite value, or ``regime_proba`` not 2-D / not finite.
    """
    if len(features) == 0:
        raise ValueError("fit_reference: no training rows")
    if n_bins < 2:
        raise ValueError(f"fit_reference: n_bins must be >= 2, got {n_bins}")
    out: dict[str, Any] = {}
    quantiles = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    for name in features.columns:
        x = features[name].to_numpy(dtype=np.float64)
        finite = x[np.isfinite(x)]
        if finite.size == 0:
            raise ValueError(f"fit_reference: feature {name!r} has no finite training value")
        edges = np.unique(np.quantile(finite, quantiles))
        counts = np.bincount(bin_index(edges, finite), minlength=edges.size + 1)
        out[str(name)] = {"edges": edges.tolist(), "freqs": (counts / finite.size).tolist(),
                          "n_nonfinite": int(x.size - finite.size)}
    if calibration_window_bars is not None:
        _calibrate(features, out, calibration_window_bars, floor=psi_floor)
    occupancy = occupancy_tv = None
    if regime_proba is not None:
        p = np.asarray(regime_proba, dtype=np.float64)
        if p.ndim != 2 or not np.isfinite(p).all() or len(p) == 0:
            raise ValueError(f"fit_reference: regime_proba must be a finite (rows, states) array, got shape {p.shape}")
        occupancy = p.mean(axis=0).tolist()
        if calibration_window_bars is not None and len(p) >= calibration_window_bars:
            w = calibration_window_bars
            tvs = [0.5 * float(np.abs(p[i:i + w].mean(axis=0) - p.mean(axis=0)).sum())
                   for i in range(0, len(p) - w + 1, w)]
            occupancy_tv = {"window_bars": w, "n_windows": len(tvs), "max": max(tvs)}
    return {"version": REFERENCE_VERSION, "source": source, "n_rows": len(features), "n_bins": n_bins,
            "features": out, "occupancy": occupancy, "occupancy_window_tv": occupancy_tv}


def write_reference(out_dir: Path, reference: dict[str, Any]) -> Path:
    """Write ``reference`` to ``out_dir/drift_reference.json`` (before the manifest is written, so it is hashed)."""
    path = Path(out_dir) / REFERENCE_FILE
    path.write_text(json.dumps(reference, indent=1, allow_nan=False))
    return path


def read_reference(bundle_dir: Path) -> dict[str, Any] | None:
    """The bundle's reference, or None for a bundle exported without one.

    Raises
    ------
    ValueError
        The file exists but is not a reference of a known version.
    """
    path = Path(bundle_dir) / REFERENCE_FILE
    if not path.is_file():
        return None
    ref = json.loads(path.read_text())
    if not isinstance(ref, dict) or ref.get("version") != REFERENCE_VERSION or "features" not in ref:
        raise ValueError(f"{path}: not a drift reference of version {REFERENCE_VERSION}")
    return ref
