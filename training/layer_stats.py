"""The statistics of the layer diagnostics (:mod:`training.diagnostics`): pure functions on arrays.

Class prior, multi-class log-loss, one-vs-rest AUC (by ranks), balanced accuracy, a circular block bootstrap
(Politis & Romano 1992; blocks never span two series) and the three layer summaries: signal (TCN log-loss and
AUC against the class prior), regime transition (LightGBM h-ahead against "regime persists") and HMM regime
separation (next-bar return mean and volatility per filtered regime; Kruskal-Wallis and Brown-Forsythe p).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

if TYPE_CHECKING:
    from training.diagnostics import DiagSettings

N_CLASSES = 3
CLASS_NAMES = ("down", "timeout", "up")  # market.labels: LABEL_DOWN 0, LABEL_TIMEOUT 1, LABEL_UP 2
PROBA_EPS = 1e-15  # probabilities are clipped to [eps, 1] before the log (model and prior alike)


def class_prior(labels: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """Class frequencies of the defined labels (``>= 0``), float64 (n_classes,).

    Raises
    ------
    ValueError
        If there is no defined label.
    """
    y = np.asarray(labels)
    y = y[y >= 0].astype(np.int64)
    if y.size == 0:
        raise ValueError("no defined label to take a class prior from")
    return np.bincount(y, minlength=n_classes)[:n_classes] / y.size


def log_loss_rows(proba: np.ndarray, y: np.ndarray, eps: float = PROBA_EPS) -> np.ndarray:
    """Per-row multi-class log-loss ``-log p[y]`` (natural log), ``proba`` clipped to ``[eps, 1]`` and
    renormalised; float64 (n,)."""
    p = np.clip(np.asarray(proba, dtype=np.float64), eps, 1.0)
    p = p / p.sum(axis=1, keepdims=True)
    y = np.asarray(y, dtype=np.int64)
    return -np.log(p[np.arange(len(y)), y])


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the binary ``positive`` (Mann-Whitney U / (n_pos n_neg), ties counted 1/2;
    Hanley & McNeil 1982); NaN without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_one_vs_rest(proba: np.ndarray, y: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """One-vs-rest AUC of each class's probability column, float64 (n_classes,) (NaN where a class is absent)."""
    y = np.asarray(y)
    return np.array([roc_auc(proba[:, c], y == c) for c in range(n_classes)])


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes that occur in ``y_true`` (NaN if empty)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.size == 0:
        return float("nan")
    n = np.bincount(y_true, minlength=n_classes)
    hit = np.bincount(y_true[y_true == y_pred], minlength=n_classes)
    present = n > 0
    return float(np.mean(hit[present] / n[present]))


def block_indices(lengths: Sequence[int], block_len: int, rng: np.random.Generator) -> np.ndarray:
    """One circular moving-block bootstrap replicate of the concatenation of segments of ``lengths``:
    each segment is resampled on its own (blocks of ``min(block_len, length)`` consecutive rows wrapping
    around the segment's end, Politis & Romano 1992) and the segments are concatenated; int64 (sum(lengths),)."""
    parts, offset = [], 0
    for n in lengths:
        n = int(n)
        if n > 0:
            b = max(1, min(int(block_len), n))
            starts = rng.integers(0, n, size=-(-n // b))
            parts.append(((starts[:, None] + np.arange(b)[None, :]) % n).ravel()[:n] + offset)
        offset += n
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def block_bootstrap(stat: Callable[[np.ndarray], Any], lengths: Sequence[int], *, block_len: int, n_boot: int,
                    alpha: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of ``stat(indices)`` (a float or a 1-D array) over ``n_boot`` replicates of
    :func:`block_indices`; NaN replicates are ignored (an entry NaN in every replicate gives NaN)."""
    rng = np.random.default_rng(seed)
    reps = np.array([np.atleast_1d(np.asarray(stat(block_indices(lengths, block_len, rng)), np.float64))
                     for _ in range(n_boot)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo = np.nanquantile(reps, alpha / 2, axis=0, method="inverted_cdf")
        hi = np.nanquantile(reps, 1 - alpha / 2, axis=0, method="inverted_cdf")
    return lo, hi


def _ci(lo: Any, hi: Any) -> list[float]:
    return [float(lo), float(hi)]


def signal_diagnostics(proba: np.ndarray, y: np.ndarray, prior_proba: np.ndarray, lengths: Sequence[int],
                       settings: DiagSettings) -> dict[str, Any]:
    """TCN against the class prior on evaluated rows.

    Parameters
    ----------
    proba : (n, 3) float
        The TCN's out-of-fold softmax (down, time-out, up).
    y : (n,) int
        Triple-barrier labels in {0, 1, 2} (undefined rows already removed).
    prior_proba : (n, 3) float
        Each row's class prior (the training-label frequencies of the models that predicted that row).
    lengths : sequence of int
        Segment (block) lengths summing to n, for the bootstrap.

    Returns ``n``, ``log_loss_model``, ``log_loss_prior``, ``log_loss_diff`` (model - prior; < 0 = better than
    the prior) and its ``log_loss_diff_ci95``, ``skill`` (1 - model / prior), ``auc_ovr`` per class,
    ``auc_macro`` (mean of the defined ones) and its ``auc_macro_ci95``, ``accuracy_model`` (argmax) and
    ``accuracy_prior`` (the prior's argmax), ``class_share`` of the evaluated labels.
    """
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    if n == 0:
        return {"n": 0}
    ll_m = log_loss_rows(proba, y)
    ll_p = log_loss_rows(prior_proba, y)
    diff = ll_m - ll_p

    def stat(idx: np.ndarray) -> list[float]:
        auc = auc_one_vs_rest(proba[idx], y[idx])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return [float(diff[idx].mean()), float(np.nanmean(auc))]

    lo, hi = block_bootstrap(stat, lengths, block_len=settings.block_bars, n_boot=settings.n_boot,
                             alpha=settings.alpha, seed=settings.seed)
    auc = auc_one_vs_rest(proba, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        auc_macro = float(np.nanmean(auc))
    return {
        "n": n,
        "class_share": dict(zip(CLASS_NAMES, (np.bincount(y, minlength=N_CLASSES) / n).tolist(), strict=True)),
        "log_loss_model": float(ll_m.mean()),
        "log_loss_prior": float(ll_p.mean()),
        "log_loss_diff": float(diff.mean()),
        "log_loss_diff_ci95": _ci(lo[0], hi[0]),
        "skill": float(1.0 - ll_m.mean() / ll_p.mean()) if ll_p.mean() > 0 else float("nan"),
        "auc_ovr": dict(zip(CLASS_NAMES, auc.tolist(), strict=True)),
        "auc_macro": auc_macro,
        "auc_macro_ci95": _ci(lo[1], hi[1]),
        "accuracy_model": float(np.mean(np.argmax(proba, axis=1) == y)),
        "accuracy_prior": float(np.mean(np.argmax(prior_proba, axis=1) == y)),
    }


def transition_diagnostics(pred: np.ndarray, persist: np.ndarray, target: np.ndarray, n_states: int,
                           lengths: Sequence[int], settings: DiagSettings) -> dict[str, Any]:
    """Regime-ahead model against "regime persists" on evaluated rows.

    ``pred``: argmax of the LightGBM probabilities at t; ``persist``: argmax filtered regime at t; ``target``:
    argmax filtered regime at t + h (all int (m,)). Returns ``n``, accuracies and balanced accuracies of both,
    their differences (model - persist) with ``*_ci95``, and the target's ``regime_share``.
    """
    target = np.asarray(target, dtype=np.int64)
    m = len(target)
    if m == 0:
        return {"n": 0}
    hit_m = (pred == target).astype(np.float64)
    hit_p = (persist == target).astype(np.float64)

    def stat(idx: np.ndarray) -> list[float]:
        t = target[idx]
        return [float(hit_m[idx].mean() - hit_p[idx].mean()),
                balanced_accuracy(t, pred[idx], n_states) - balanced_accuracy(t, persist[idx], n_states)]

    lo, hi = block_bootstrap(stat, lengths, block_len=settings.block_bars, n_boot=settings.n_boot,
                             alpha=settings.alpha, seed=settings.seed)
    bal_m = balanced_accuracy(target, pred, n_states)
    bal_p = balanced_accuracy(target, persist, n_states)
    return {
        "n": m,
        "horizon_bars": settings.regime_horizon_bars,
        "regime_share": (np.bincount(target, minlength=n_states)[:n_states] / m).tolist(),
        "accuracy_model": float(hit_m.mean()),
        "accuracy_persist": float(hit_p.mean()),
        "accuracy_diff": float(hit_m.mean() - hit_p.mean()),
        "accuracy_diff_ci95": _ci(lo[0], hi[0]),
        "balanced_accuracy_model": bal_m,
        "balanced_accuracy_persist": bal_p,
        "balanced_accuracy_diff": bal_m - bal_p,
        "balanced_accuracy_diff_ci95": _ci(lo[1], hi[1]),
    }


def _regime_moments(ret: np.ndarray, regime: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.bincount(regime, minlength=k)[:k].astype(np.float64)
    s1 = np.bincount(regime, weights=ret, minlength=k)[:k]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        dev = ret - mean[regime]
        var = np.bincount(regime, weights=dev * dev, minlength=k)[:k] / (n - 1)
    mean = np.where(n > 0, mean, np.nan)
    vol = np.where(n > 1, np.sqrt(np.maximum(var, 0.0)), np.nan)
    return n, mean, vol


def regime_separation(ret: np.ndarray, regime: np.ndarray, n_states: int, lengths: Sequence[int],
                      settings: DiagSettings) -> dict[str, Any]:
    """Next-bar log return by filtered regime.

    ``ret``: float (q,) next-bar log returns; ``regime``: int (q,) filtered regime at the decision bar.
    Returns ``n`` and ``by_regime`` (per state: ``n_bars``, ``share``, ``mean``, ``mean_ci95``, ``vol``,
    ``vol_ci95``; per bar, log-return units), ``kruskal_p`` (returns by regime, location) and
    ``brown_forsythe_p`` (scale), over regimes with >= 2 bars (NaN with fewer than two such regimes).
    """
    ret = np.asarray(ret, dtype=np.float64)
    regime = np.asarray(regime, dtype=np.int64)
    q = len(ret)
    if q == 0:
        return {"n": 0, "by_regime": []}
    n, mean, vol = _regime_moments(ret, regime, n_states)
    lo, hi = block_bootstrap(lambda idx: np.concatenate(_regime_moments(ret[idx], regime[idx], n_states)[1:]),
                             lengths, block_len=settings.block_bars, n_boot=settings.n_boot, alpha=settings.alpha,
                             seed=settings.seed)
    k = n_states
    groups = [ret[regime == s] for s in range(k) if (regime == s).sum() >= 2]
    kw = bf = float("nan")
    if len(groups) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.suppress(ValueError):  # all values identical: kw stays NaN
                kw = float(stats.kruskal(*groups).pvalue)
            bf = float(stats.levene(*groups, center="median").pvalue)
    return {
        "n": q,
        "by_regime": [{"regime": s, "n_bars": int(n[s]), "share": float(n[s] / q), "mean": float(mean[s]),
                       "mean_ci95": _ci(lo[s], hi[s]), "vol": float(vol[s]), "vol_ci95": _ci(lo[k + s], hi[k + s])}
                      for s in range(k)],
        "kruskal_p": kw,
        "brown_forsythe_p": bf,
    }
