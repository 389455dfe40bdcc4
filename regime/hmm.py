"""Gaussian HMM regimes with *forward-filtered* state probabilities.

The HMM is fitted once with hmmlearn (Baum-Welch); after fitting, its parameters are copied into
plain numpy arrays and every probability the rest of the system sees comes from our own forward
filter (Rabiner 1989, "A tutorial on hidden Markov models and selected applications in speech
recognition", Proc. IEEE 77(2), eqs. 19-20, with the per-step scaling of section V.A):

    log α̂_0 = log π + log b(x_0)                       (then normalised to sum 1)
    log α̂_t = logsumexp_i(log α̂_{t-1}[i] + log A[i, :]) + log b(x_t)   (then normalised)

so ``α̂_t[k] = P(s_t = k | x_0..x_t)``: the filtered probability, which uses no observation after t.

Why not hmmlearn's ``predict_proba``: it returns the *smoothed* posterior P(s_t | x_0..x_T)
(forward-backward), which uses observations after t. Features built from it leak the future into
training and cannot be reproduced bar by bar in serving. Likewise the Viterbi path over a whole
series. The truncation test in ``tests/regime`` demonstrates both points.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from market import json_codec
from regime.config import RegimeConfig

__all__ = [
    "ModelLoadError",
    "RegimeHMM",
    "forward_filter",
    "forward_filter_step",
    "gaussian_log_density",
]

_FORMAT_VERSION = 1
_NPZ_NAME = "regime_hmm.npz"
_JSON_NAME = "regime_hmm.json"
_LOG_2PI = math.log(2.0 * math.pi)


class ModelLoadError(RuntimeError):
    """A saved model file is missing, corrupt, or inconsistent (wrong shapes, non-finite values).

    The message names the offending file. Serving treats it as a model failure and falls back to V1.
    """


# ---------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------


def _check_finite_rows(X: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{what} has non-finite values in {rows.size} row(s); first row index {int(rows[0])}"
            + (f" (rows {rows[:10].tolist()})" if rows.size > 1 else "")
        )


def _as_2d_float(X: np.ndarray, what: str, n_features: int | None = None) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{what} must be 2-D (T, d), got shape {X.shape}")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"{what} must have {n_features} columns (as fitted), got {X.shape[1]}")
    _check_finite_rows(X, what)
    return X


def _cholesky_all(covars: np.ndarray) -> np.ndarray:
    chol = np.empty_like(covars)
    for k in range(covars.shape[0]):
        chol[k] = np.linalg.cholesky(covars[k])  # raises LinAlgError if not positive definite
    return chol


def _log_density_from_chol(Z: np.ndarray, means: np.ndarray, chol: np.ndarray) -> np.ndarray:
    """Gaussian log-density, row by row with elementwise operations only.

    Forward substitution is written out over the d columns (no BLAS), so row t's value is the same
    bit pattern whatever the number of rows in ``Z``: the basis of the exact truncation invariance.
    """
    T, d = Z.shape
    K = means.shape[0]
    out = np.empty((T, K), dtype=np.float64)
    for k in range(K):
        L = chol[k]
        diff = Z - means[k]
        w = np.empty_like(diff)
        maha = np.zeros(T, dtype=np.float64)
        for i in range(d):
            acc = diff[:, i].copy()
            for j in range(i):
                acc -= L[i, j] * w[:, j]
            w[:, i] = acc / L[i, i]
            maha += w[:, i] * w[:, i]
        log_det = 2.0 * float(np.sum(np.log(np.diag(L))))
        out[:, k] = -0.5 * (d * _LOG_2PI + log_det + maha)
    return out


def gaussian_log_density(Z: np.ndarray, means: np.ndarray, covars: np.ndarray) -> np.ndarray:
    """Log-density of each row under each Gaussian emission.

    ``log b_k(z) = -½ (d log 2π + log det Σ_k + (z − μ_k)ᵀ Σ_k⁻¹ (z − μ_k))``.

    Parameters
    ----------
    Z : np.ndarray, shape (T, d), float64
        Observations (already standardised if the model was fitted on standardised data).
    means : np.ndarray, shape (K, d)
        Emission means μ_k.
    covars : np.ndarray, shape (K, d, d)
        Emission covariances Σ_k, symmetric positive definite.

    Returns
    -------
    np.ndarray, shape (T, K), float64

    Raises
    ------
    numpy.linalg.LinAlgError
        If a covariance is not positive definite.
    """
    return _log_density_from_chol(np.asarray(Z, dtype=np.float64), means, _cholesky_all(covars))


def _logsumexp_axis0(M: np.ndarray) -> np.ndarray:
    m = np.max(M, axis=0)
    safe_m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):  # a column of zeros gives log 0 = -inf, which is correct
        return safe_m + np.log(np.sum(np.exp(M - safe_m), axis=0))


def _normalise_log(v: np.ndarray) -> np.ndarray:
    m = np.max(v)
    if not np.isfinite(m):
        raise FloatingPointError("forward filter: every state has zero probability (degenerate model)")
    return v - (m + math.log(float(np.sum(np.exp(v - m)))))


def forward_filter_step(
    log_alpha_prev: np.ndarray | None,
    log_b_t: np.ndarray,
    log_startprob: np.ndarray,
    log_transmat: np.ndarray,
) -> np.ndarray:
    """One step of the normalised forward recursion in log space (Rabiner 1989, eqs. 19-20).

    Parameters
    ----------
    log_alpha_prev : np.ndarray of shape (K,) or None
        Normalised log α̂_{t−1} (log filtered probabilities of the previous bar); None at t = 0.
    log_b_t : np.ndarray, shape (K,)
        Emission log-likelihoods log b_k(x_t).
    log_startprob : np.ndarray, shape (K,)
        log π.
    log_transmat : np.ndarray, shape (K, K)
        log A, rows = from-state, columns = to-state.

    Returns
    -------
    np.ndarray, shape (K,), float64
        Normalised log α̂_t: ``logsumexp(log α̂_t) == 0``; ``exp`` gives P(s_t | x_0..x_t).

    Raises
    ------
    FloatingPointError
        If every state gets probability zero (a degenerate model).
    """
    if log_alpha_prev is None:
        pred = log_startprob
    else:
        pred = _logsumexp_axis0(log_alpha_prev[:, None] + log_transmat)
    return _normalise_log(pred + log_b_t)


def forward_filter(log_b: np.ndarray, log_startprob: np.ndarray, log_transmat: np.ndarray) -> np.ndarray:
    """Normalised log forward variables of a whole series (filtered, never smoothed).

    Row t is computed from ``log_b[:t+1]`` only, by repeated :func:`forward_filter_step`.

    Parameters
    ----------
    log_b : np.ndarray, shape (T, K)
        Emission log-likelihoods.
    log_startprob : np.ndarray, shape (K,)
    log_transmat : np.ndarray, shape (K, K)

    Returns
    -------
    np.ndarray, shape (T, K), float64
        log P(s_t = k | x_0..x_t).
    """
    out = np.empty_like(log_b, dtype=np.float64)
    prev: np.ndarray | None = None
    for t in range(log_b.shape[0]):
        prev = forward_filter_step(prev, log_b[t], log_startprob, log_transmat)
        out[t] = prev
    return out


def _log(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class RegimeHMM:
    """Gaussian HMM whose states are ordered by volatility and read by a forward filter.

    Fitting standardises the input with the mean and standard deviation of the fitted rows (stored
    and re-used on every later input), fits ``hmmlearn.hmm.GaussianHMM`` (``random_state=seed``;
    the best of ``n_restarts`` seeds by training log-likelihood), then relabels the states so that
    state 0 is the calmest regime and state K−1 the most volatile: by ascending emission variance of
    column ``cfg.vol_col`` (a return column; the default) or, with ``state_order_by="mean"``, by
    ascending emission mean of that column (a volatility-level column). Standardisation divides by a
    positive number, so it does not change either order. The relabelled ``startprob``
    (K,), ``transmat`` (K, K), ``means`` (K, d) and ``covars`` (K, d, d) are plain numpy arrays in
    standardised units; hmmlearn is not used after :meth:`fit`.

    Parameters
    ----------
    cfg : RegimeConfig, optional
        Defaults to ``RegimeConfig()``.
    """

    def __init__(self, cfg: RegimeConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else RegimeConfig()
        self.startprob: np.ndarray | None = None
        self.transmat: np.ndarray | None = None
        self.means: np.ndarray | None = None
        self.covars: np.ndarray | None = None
        self.x_mean: np.ndarray | None = None
        self.x_std: np.ndarray | None = None
        self._chol: np.ndarray | None = None
        self._log_startprob: np.ndarray | None = None
        self._log_transmat: np.ndarray | None = None

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_params(
        cls,
        startprob: np.ndarray,
        transmat: np.ndarray,
        means: np.ndarray,
        covars: np.ndarray,
        x_mean: np.ndarray,
        x_std: np.ndarray,
        cfg: RegimeConfig | None = None,
    ) -> RegimeHMM:
        """Build a fitted model from explicit parameters (standardised units), without relabelling.

        Parameters
        ----------
        startprob : (K,) ; transmat : (K, K) row-stochastic ; means : (K, d) ; covars : (K, d, d)
        x_mean, x_std : (d,)
            Standardisation applied to raw inputs: ``z = (x − x_mean) / x_std``.
        cfg : RegimeConfig, optional
            Its ``n_states`` must equal K; by default ``RegimeConfig(n_states=K)`` (so K is 3 or 4;
            the module-level :func:`forward_filter` works for any K).

        Raises
        ------
        ValueError
            On inconsistent shapes, non-finite values, non-stochastic rows, non-positive ``x_std``,
            or a covariance that is not positive definite.
        """
        cfg = cfg if cfg is not None else RegimeConfig(n_states=int(np.asarray(startprob).shape[0]))
        model = cls(cfg)
        model._set_params(startprob, transmat, means, covars, x_mean, x_std)
        return model

    def _set_params(
        self,
        startprob: np.ndarray,
        transmat: np.ndarray,
        means: np.ndarray,
        covars: np.ndarray,
        x_mean: np.ndarray,
        x_std: np.ndarray,
    ) -> None:
        arrays = {
            "startprob": np.asarray(startprob, dtype=np.float64),
            "transmat": np.asarray(transmat, dtype=np.float64),
            "means": np.asarray(means, dtype=np.float64),
            "covars": np.asarray(covars, dtype=np.float64),
            "x_mean": np.asarray(x_mean, dtype=np.float64),
            "x_std": np.asarray(x_std, dtype=np.float64),
        }
        K = self.cfg.n_states
        if arrays["means"].ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {arrays['means'].shape}")
        d = arrays["means"].shape[1]
        expected = {
            "startprob": (K,),
            "transmat": (K, K),
            "means": (K, d),
            "covars": (K, d, d),
            "x_mean": (d,),
            "x_std": (d,),
        }
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise ValueError(f"{name} must have shape {shape} (K={K}, d={d}), got {arrays[name].shape}")
            if not np.isfinite(arrays[name]).all():
                raise ValueError(f"{name} has non-finite values")
        if self.cfg.vol_col >= d:
            raise ValueError(f"cfg.vol_col={self.cfg.vol_col} is out of range for d={d} features")
        if (arrays["startprob"] < 0).any() or not np.isclose(arrays["startprob"].sum(), 1.0, atol=1e-8):
            raise ValueError("startprob must be non-negative and sum to 1")
        if (arrays["transmat"] < 0).any() or not np.allclose(arrays["transmat"].sum(axis=1), 1.0, atol=1e-8):
            raise ValueError("each row of transmat must be non-negative and sum to 1")
        if (arrays["x_std"] <= 0).any():
            raise ValueError("x_std must be > 0 in every column")
        try:
            chol = _cholesky_all(arrays["covars"])
        except np.linalg.LinAlgError as exc:
            raise ValueError("a covariance matrix is not positive definite") from exc
        self.startprob = arrays["startprob"]
        self.transmat = arrays["transmat"]
        self.means = arrays["means"]
        self.covars = arrays["covars"]
        self.x_mean = arrays["x_mean"]
        self.x_std = arrays["x_std"]
        self._chol = chol
        self._log_startprob = _log(self.startprob)
        self._log_transmat = _log(self.transmat)

    # -- fitting ---------------------------------------------------------------------------------

    @property
    def config(self) -> RegimeConfig:
        """The configuration (alias of ``cfg``)."""
        return self.cfg

    @property
    def is_fitted(self) -> bool:
        """True once parameters are set (by :meth:`fit`, :meth:`from_params` or :meth:`load`)."""
        return self.means is not None

    @property
    def n_features(self) -> int:
        """Number of input columns d (raises RuntimeError if not fitted)."""
        self._require_fitted()
        assert self.means is not None
        return int(self.means.shape[1])

    def fit(self, X: np.ndarray, lengths: list[int] | None = None) -> RegimeHMM:
        """Fit the HMM on ``X`` and relabel the states by volatility.

        Parameters
        ----------
        X : np.ndarray, shape (T, d), float
            Causal features of the training period only (e.g. log return, log rolling volatility).
        lengths : list[int] | None
            ``X`` is several independent sequences (e.g. one per symbol of a pooled run) of these lengths, in
            order (sum = T): Baum-Welch never links the last row of one to the first of the next (hmmlearn's
            ``lengths``); the standardisation uses all rows. None = one sequence.

        Returns
        -------
        RegimeHMM
            ``self``, fitted.

        Raises
        ------
        ValueError
            If X is not 2-D, has non-finite rows (the first is named), a constant column, fewer rows
            than 10·K, or ``cfg.vol_col`` is out of range.
        """
        from hmmlearn.hmm import GaussianHMM  # only needed for fitting

        X = _as_2d_float(X, "X")
        T, d = X.shape
        K = self.cfg.n_states
        if T < 10 * K:
            raise ValueError(f"X has {T} rows; fitting a {K}-state HMM needs at least {10 * K}")
        if self.cfg.vol_col >= d:
            raise ValueError(f"cfg.vol_col={self.cfg.vol_col} is out of range for d={d} features")
        x_mean = X.mean(axis=0)
        x_std = X.std(axis=0)
        const = np.flatnonzero(~(x_std > 0))
        if const.size:
            raise ValueError(f"X column(s) {const.tolist()} are constant; cannot standardise")
        Z = (X - x_mean) / x_std
        if lengths is not None and (sum(lengths) != T or min(lengths) < 1):
            raise ValueError(f"lengths {list(lengths)} must be positive and sum to the {T} rows of X")
        best, best_score = None, -np.inf
        for restart in range(self.cfg.n_restarts):
            hmm = GaussianHMM(
                n_components=K,
                covariance_type=self.cfg.covariance_type,
                n_iter=self.cfg.n_iter,
                random_state=self.cfg.seed + restart,
            )
            hmm.fit(Z, lengths)
            score = float(hmm.score(Z, lengths))
            if best is None or score > best_score:  # strict: ties keep the lower seed
                best, best_score = hmm, score
        assert best is not None  # n_restarts >= 1: the loop ran
        hmm = best
        covars = np.asarray(hmm.covars_, dtype=np.float64)  # (K, d, d) for both covariance types
        col = self.cfg.vol_col
        key = covars[:, col, col] if self.cfg.state_order_by == "variance" else np.asarray(hmm.means_)[:, col]
        order = np.argsort(key, kind="stable")
        self._set_params(
            startprob=np.asarray(hmm.startprob_)[order],
            transmat=np.asarray(hmm.transmat_)[np.ix_(order, order)],
            means=np.asarray(hmm.means_)[order],
            covars=covars[order],
            x_mean=x_mean,
            x_std=x_std,
        )
        return self

    def _require_fitted(self) -> None:
        if self.means is None:
            raise RuntimeError("RegimeHMM is not fitted; call fit() or load() first")

    # -- filtering ---------------------------------------------------------------------------------

    def emission_log_likelihood(self, X: np.ndarray) -> np.ndarray:
        """Emission log-likelihoods log b_k(z_t) of raw rows ``X`` (standardised internally).

        Parameters
        ----------
        X : np.ndarray, shape (T, d)

        Returns
        -------
        np.ndarray, shape (T, K), float64

        Raises
        ------
        ValueError
            If X has the wrong shape or a non-finite row (the first is named).
        """
        self._require_fitted()
        X = _as_2d_float(X, "X", self.n_features)
        Z = (X - self.x_mean) / self.x_std
        assert self.means is not None and self._chol is not None
        return _log_density_from_chol(Z, self.means, self._chol)

    def filtered_log_proba(self, X: np.ndarray) -> np.ndarray:
        """Log filtered probabilities log P(s_t = k | x_0..x_t), row t from rows 0..t only.

        Parameters
        ----------
        X : np.ndarray, shape (T, d)
            Raw (unstandardised) features; row 0 is the first bar of the filter.

        Returns
        -------
        np.ndarray, shape (T, K), float64

        Raises
        ------
        ValueError
            If X has the wrong shape or a non-finite row (the first is named).
        """
        log_b = self.emission_log_likelihood(X)
        assert self._log_startprob is not None and self._log_transmat is not None
        return forward_filter(log_b, self._log_startprob, self._log_transmat)

    def filtered_proba(self, X: np.ndarray) -> np.ndarray:
        """Forward-filtered state probabilities P(s_t = k | x_0..x_t) (Rabiner 1989).

        Not hmmlearn's ``predict_proba`` (smoothed, uses x_{t+1}..x_T): row t here depends only on
        rows 0..t, so ``filtered_proba(X[:t+1])[t] == filtered_proba(X)[t]`` exactly.

        Parameters
        ----------
        X : np.ndarray, shape (T, d)
            Raw (unstandardised) features.

        Returns
        -------
        np.ndarray, shape (T, K), float64
            Rows sum to 1; column k is state k (0 = calmest).

        Raises
        ------
        ValueError
            If X has the wrong shape or a non-finite row (the first is named).
        """
        log_alpha = self.filtered_log_proba(X)
        out = np.empty_like(log_alpha)
        for t in range(log_alpha.shape[0]):  # per row: same code path as filtered_proba_step
            out[t] = np.exp(log_alpha[t])
        return out

    def filtered_proba_step(
        self, log_alpha_prev: np.ndarray | None, x_t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Advance the filter by one bar (for serving, bar by bar).

        Parameters
        ----------
        log_alpha_prev : np.ndarray of shape (K,) or None
            The log filtered probabilities returned for the previous bar (or the last row of
            :meth:`filtered_log_proba` on the history); None for the first bar of the series.
        x_t : np.ndarray, shape (d,)
            Raw features of the bar that just closed.

        Returns
        -------
        log_alpha_t : np.ndarray, shape (K,), float64
            Pass it back on the next bar.
        proba_t : np.ndarray, shape (K,), float64
            P(s_t | x_0..x_t); equals the corresponding row of :meth:`filtered_proba` exactly.

        Raises
        ------
        ValueError
            If ``x_t`` has the wrong shape or is non-finite, or ``log_alpha_prev`` is not a finite-or-
            -inf vector of length K.
        """
        self._require_fitted()
        K = self.cfg.n_states
        x_t = np.asarray(x_t, dtype=np.float64)
        if x_t.ndim != 1:
            raise ValueError(f"x_t must be 1-D (d,), got shape {x_t.shape}")
        if log_alpha_prev is not None:
            log_alpha_prev = np.asarray(log_alpha_prev, dtype=np.float64)
            if log_alpha_prev.shape != (K,) or np.isnan(log_alpha_prev).any():
                raise ValueError(f"log_alpha_prev must be a (K={K},) vector without NaN")
        log_b = self.emission_log_likelihood(x_t[None, :])[0]
        assert self._log_startprob is not None and self._log_transmat is not None
        log_alpha = forward_filter_step(log_alpha_prev, log_b, self._log_startprob, self._log_transmat)
        return log_alpha, np.exp(log_alpha)

    # -- persistence -----------------------------------------------------------------------------

    def save(self, dir: Path) -> None:
        """Write ``regime_hmm.npz`` (arrays, no pickle) and ``regime_hmm.json`` (config) into ``dir``.

        Raises
        ------
        RuntimeError
            If the model is not fitted.
        """
        self._require_fitted()
        assert self.startprob is not None and self.transmat is not None and self.means is not None
        assert self.covars is not None and self.x_mean is not None and self.x_std is not None
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        np.savez(
            dir / _NPZ_NAME,
            startprob=self.startprob,
            transmat=self.transmat,
            means=self.means,
            covars=self.covars,
            x_mean=self.x_mean,
            x_std=self.x_std,
        )
        meta = {
            "format_version": _FORMAT_VERSION,
            "kind": "RegimeHMM",
            "n_states": self.cfg.n_states,
            "n_features": self.n_features,
            "config": self.cfg.model_dump(mode="json"),
        }
        (dir / _JSON_NAME).write_text(json_codec.dumps(meta, strict=False, indent=2, sort_keys=True))

    @classmethod
    def load(cls, dir: Path) -> RegimeHMM:
        """Load a model written by :meth:`save` (no pickle).

        Raises
        ------
        ModelLoadError
            If ``regime_hmm.json`` or ``regime_hmm.npz`` is missing, unreadable, corrupt, or holds
            arrays of the wrong shape or invalid values; the message names the file.
        """
        dir = Path(dir)
        meta_path = dir / _JSON_NAME
        npz_path = dir / _NPZ_NAME
        meta = _read_json(meta_path)
        try:
            if meta.get("format_version") != _FORMAT_VERSION or meta.get("kind") != "RegimeHMM":
                raise ValueError(
                    f"unsupported format_version/kind {meta.get('format_version')}/{meta.get('kind')}"
                )
            cfg = RegimeConfig.model_validate(meta["config"])
            n_features = int(meta["n_features"])
        except Exception as exc:
            raise ModelLoadError(f"{meta_path}: invalid model description: {exc}") from exc
        arrays = _read_npz(npz_path, ("startprob", "transmat", "means", "covars", "x_mean", "x_std"))
        model = cls(cfg)
        try:
            model._set_params(**arrays)
            if model.n_features != n_features:
                raise ValueError(f"means has {model.n_features} features, {meta_path.name} says {n_features}")
        except ValueError as exc:
            raise ModelLoadError(f"{npz_path}: {exc}") from exc
        return model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json_codec.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: file is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_npz(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [n for n in names if n not in npz.files]
            if missing:
                raise ModelLoadError(f"{path}: missing arrays {missing}")
            return {n: np.array(npz[n]) for n in names}
    except ModelLoadError:
        raise
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: file is missing") from exc
    except Exception as exc:  # corrupt zip, truncated member, object arrays (pickle refused), ...
        raise ModelLoadError(f"{path}: cannot read arrays: {type(exc).__name__}: {exc}") from exc
