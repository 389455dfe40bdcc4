"""Statistics against self-deception: probabilistic and deflated Sharpe ratios, and the probability
of backtest overfitting by combinatorially symmetric cross-validation (CSCV).

Sharpe ratios here are per observation (not annualised): divide an annualised Sharpe by
``sqrt(periods_per_year)`` before passing it in.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

EULER_GAMMA = 0.5772156649015329


def _check_returns(returns: np.ndarray, name: str = "returns") -> np.ndarray:
    r = np.asarray(returns, dtype=np.float64)
    if r.ndim != 1 or len(r) < 3:
        raise ValueError(f"{name} must be 1-d with at least 3 observations, got shape {r.shape}")
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        raise ValueError(f"{name} has non-finite values at indices {bad[:5].tolist()}")
    return r


def probabilistic_sharpe_ratio(sr: float, sr_benchmark: float, n_obs: int, skew: float, kurtosis: float) -> float:
    """Probability that the true Sharpe ratio exceeds ``sr_benchmark`` (Bailey & López de Prado 2012).

    ``PSR = Φ( (SR̂ − SR*) √(T − 1) / √(1 − γ̂₃ SR̂ + (γ̂₄ − 1)/4 · SR̂²) )``

    Parameters
    ----------
    sr, sr_benchmark : float
        Observed and benchmark Sharpe ratios, per observation.
    n_obs : int
        Number of returns T (>= 2).
    skew : float
        Skewness γ̂₃ of the returns.
    kurtosis : float
        Kurtosis γ̂₄ of the returns (not excess: 3 for a normal distribution).

    Raises
    ------
    ValueError
        If ``n_obs < 2`` or the variance term is not positive (extreme skew/kurtosis for this SR).
    """
    if n_obs < 2:
        raise ValueError(f"n_obs must be >= 2, got {n_obs}")
    var_term = 1.0 - skew * sr + (kurtosis - 1.0) / 4.0 * sr * sr
    if not var_term > 0:
        raise ValueError(f"non-positive variance term {var_term} (skew={skew}, kurtosis={kurtosis}, sr={sr})")
    return float(stats.norm.cdf((sr - sr_benchmark) * math.sqrt(n_obs - 1) / math.sqrt(var_term)))


def sharpe_sampling_variance(sr: float, n_obs: int, skew: float, kurtosis: float) -> float:
    """Variance of the Sharpe-ratio estimator, ``(1 − γ₃ SR + (γ₄ − 1)/4 · SR²) / (T − 1)``
    (Mertens 2002; Bailey & López de Prado 2012, "The Sharpe Ratio Efficient Frontier", eq. 4),
    per-bar SR, ``kurtosis`` not excess.

    Under the null of the deflated Sharpe ratio (every trial has true Sharpe 0) this is the spread of
    the trials' estimated Sharpe ratios, so it stands in for ``V[SR_n]`` when too few trials were
    recorded to estimate their cross-sectional variance.

    Raises
    ------
    ValueError
        If ``n_obs < 2`` or the variance term is not positive.
    """
    if n_obs < 2:
        raise ValueError(f"n_obs must be >= 2, got {n_obs}")
    var_term = 1.0 - skew * sr + (kurtosis - 1.0) / 4.0 * sr * sr
    if not var_term > 0:
        raise ValueError(f"non-positive variance term {var_term} (skew={skew}, kurtosis={kurtosis}, sr={sr})")
    return float(var_term / (n_obs - 1))


def expected_max_sharpe(n_trials: int, sr_variance: float) -> float:
    """Expected maximum Sharpe ratio of ``n_trials`` independent trials with true Sharpe 0.

    ``SR₀ = √V · ((1 − γ) Φ⁻¹(1 − 1/N) + γ Φ⁻¹(1 − 1/(N e)))`` (Bailey & López de Prado 2014,
    *J. Portfolio Management* 40(5), eq. for E[max]), γ the Euler–Mascheroni constant. One trial
    gives 0 (no selection).

    Raises
    ------
    ValueError
        If ``n_trials < 1`` or ``sr_variance < 0``.
    """
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if sr_variance < 0:
        raise ValueError(f"sr_variance must be >= 0, got {sr_variance}")
    if n_trials == 1:
        return 0.0
    z1 = stats.norm.ppf(1.0 - 1.0 / n_trials)
    z2 = stats.norm.ppf(1.0 - 1.0 / (n_trials * math.e))
    return float(math.sqrt(sr_variance) * ((1.0 - EULER_GAMMA) * z1 + EULER_GAMMA * z2))


@dataclass(frozen=True)
class DeflatedSharpe:
    """Deflated Sharpe ratio of a selected strategy and its inputs (per-observation Sharpe units)."""

    dsr: float
    sr: float
    sr0: float
    n_obs: int
    n_trials: int
    sr_variance: float
    skew: float
    kurtosis: float

    def reading(self) -> str:
        """One-line plain reading of the DSR."""
        if self.dsr >= 0.95:
            return (f"Deflated Sharpe ratio (DSR) {self.dsr:.2f}: the Sharpe ratio survives {self.n_trials} "
                    "trials at 95 % confidence")
        return (f"Deflated Sharpe ratio (DSR) {self.dsr:.2f}: not significant after {self.n_trials} trials "
                "(the Sharpe ratio is explainable by selection among trials and non-normal returns)")


def deflated_sharpe_ratio(returns: np.ndarray, *, n_trials: int, sr_variance: float) -> DeflatedSharpe:
    """Deflated Sharpe ratio (Bailey & López de Prado 2014) of the selected strategy's returns.

    ``DSR = PSR(SR₀)`` with ``SR₀ = expected_max_sharpe(n_trials, sr_variance)``, and skewness and
    kurtosis (not excess) of ``returns``.

    Parameters
    ----------
    returns : np.ndarray
        Per-bar returns of the selected strategy, float (T,), T >= 3, finite.
    n_trials : int
        Every configuration and seed tried (tuning runs included).
    sr_variance : float
        Variance of the per-observation Sharpe ratios across those trials.

    Raises
    ------
    ValueError
        Non-finite or too few returns, zero return dispersion, or invalid trial inputs.
    """
    r = _check_returns(returns)
    sd = r.std(ddof=1)
    if not sd > 0:
        raise ValueError("returns have zero dispersion: the Sharpe ratio is undefined")
    sr = float(r.mean() / sd)
    skew = float(stats.skew(r, bias=False))
    kurt = float(stats.kurtosis(r, fisher=False, bias=False))
    sr0 = expected_max_sharpe(n_trials, sr_variance)
    dsr = probabilistic_sharpe_ratio(sr, sr0, len(r), skew, kurt)
    return DeflatedSharpe(dsr, sr, sr0, len(r), n_trials, float(sr_variance), skew, kurt)


@dataclass(frozen=True)
class PBOResult:
    """Outcome of CSCV: the PBO and the logits of every split."""

    pbo: float
    logits: np.ndarray  # float (C(S, S/2),)
    n_blocks: int
    n_configs: int

    def reading(self) -> str:
        """One-line plain reading of the PBO."""
        verdict = "likely overfit" if self.pbo > 0.5 else ("some overfitting" if self.pbo > 0.2 else "little evidence of overfitting")
        return f"PBO {self.pbo:.2f} over {len(self.logits)} splits of {self.n_blocks} blocks: {verdict}"


def _block_sharpe(block: np.ndarray) -> np.ndarray:
    sd = block.std(axis=0, ddof=1)
    mean = block.mean(axis=0)
    return np.where(sd > 0, mean / np.where(sd > 0, sd, 1.0), 0.0)


def probability_of_backtest_overfitting(performance: np.ndarray, n_blocks: int = 8) -> PBOResult:
    """Probability of backtest overfitting by CSCV (Bailey, Borwein, López de Prado & Zhu 2015).

    The T × N matrix of per-bar returns (rows time, columns configurations) is cut into ``n_blocks``
    contiguous blocks of equal length (trailing rows that do not fill a block are left out, which is
    stated in the result's block count). For every choice of half the blocks as in-sample: pick the
    configuration with the best in-sample Sharpe ratio, take its relative rank ω̄ among the
    out-of-sample Sharpe ratios (rank / (N + 1), rank 1 = worst), and the logit ``λ = ln(ω̄/(1 − ω̄))``.
    PBO is the share of splits with λ <= 0.

    Raises
    ------
    ValueError
        ``n_blocks`` odd or < 2, fewer than 2 configurations, blocks shorter than 2 rows, or
        non-finite returns.
    """
    m = np.asarray(performance, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] < 2:
        raise ValueError(f"performance must be T x N with N >= 2 configurations, got shape {m.shape}")
    if n_blocks < 2 or n_blocks % 2:
        raise ValueError(f"n_blocks must be even and >= 2, got {n_blocks}")
    block_len = m.shape[0] // n_blocks
    if block_len < 2:
        raise ValueError(f"{m.shape[0]} rows are too few for {n_blocks} blocks")
    if not np.isfinite(m).all():
        rows = np.flatnonzero(~np.isfinite(m).all(axis=1))[:5].tolist()
        raise ValueError(f"performance has non-finite values in rows {rows}")
    blocks = [m[i * block_len : (i + 1) * block_len] for i in range(n_blocks)]
    n = m.shape[1]
    logits = []
    for is_idx in itertools.combinations(range(n_blocks), n_blocks // 2):
        oos_idx = [i for i in range(n_blocks) if i not in is_idx]
        sr_is = _block_sharpe(np.concatenate([blocks[i] for i in is_idx]))
        sr_oos = _block_sharpe(np.concatenate([blocks[i] for i in oos_idx]))
        best = int(np.argmax(sr_is))
        rank = stats.rankdata(sr_oos, method="average")[best]  # 1 = worst out of sample
        omega = rank / (n + 1.0)
        logits.append(math.log(omega / (1.0 - omega)))
    logits_arr = np.asarray(logits)
    return PBOResult(pbo=float((logits_arr <= 0).mean()), logits=logits_arr, n_blocks=n_blocks, n_configs=n)
