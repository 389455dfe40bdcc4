"""Deflated Sharpe ratio and PBO against worked numbers and independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from training.stats import (
    deflated_sharpe_ratio,
    expected_max_sharpe,
    probabilistic_sharpe_ratio,
    probability_of_backtest_overfitting,
    sharpe_sampling_variance,
)


def test_dsr_worked_example_of_bailey_lopez_de_prado_2014():
    # The paper's numerical example: 100 trials, variance of the (annualised) trial Sharpe ratios
    # 0.5, selected annualised SR 2.5, T = 1250 daily returns, skewness -3, kurtosis 10.
    # SR0 (annualised) = sqrt(0.5) * ((1 - γ) Φ⁻¹(0.99) + γ Φ⁻¹(1 - 1/(100 e)))
    #                  = 0.70711 * (0.42278 * 2.32635 + 0.57722 * 2.68087) = 1.7894;
    # per day: SR0 ≈ 1.7894 / sqrt(250) ≈ 0.1132 and SR ≈ 2.5 / sqrt(250) ≈ 0.1581.
    sr0_annual = expected_max_sharpe(100, 0.5)
    assert sr0_annual == pytest.approx(1.7894, abs=2e-4)
    sr, sr0 = 2.5 / math.sqrt(250), sr0_annual / math.sqrt(250)
    assert sr0 == pytest.approx(0.1132, abs=1e-4)
    # DSR = Φ(0.0449 * sqrt(1249) / sqrt(1 + 3*0.1581 + 9/4*0.1581^2)) ≈ Φ(1.28) ≈ 0.90 (paper: 0.9004)
    dsr = probabilistic_sharpe_ratio(sr, sr0, 1250, skew=-3.0, kurtosis=10.0)
    assert dsr == pytest.approx(0.9004, abs=1e-3)


def test_expected_max_sharpe_matches_monte_carlo():
    # Independent check of the approximation: the mean of the maximum of N iid N(0, V) draws.
    rng = np.random.default_rng(0)
    for n_trials, var in ((10, 1.0), (100, 0.25), (1000, 0.04)):
        draws = rng.normal(0.0, math.sqrt(var), size=(20_000, n_trials)).max(axis=1).mean()
        assert expected_max_sharpe(n_trials, var) == pytest.approx(draws, rel=0.03)
    assert expected_max_sharpe(1, 0.3) == 0.0


def test_psr_with_zero_benchmark_and_normal_returns_is_the_sharpe_t_test():
    # For normal returns (skew 0, kurtosis 3): PSR(0) = Φ(SR sqrt(T-1) / sqrt(1 + SR²/2)).
    sr, t = 0.1, 500
    expected = stats.norm.cdf(sr * math.sqrt(t - 1) / math.sqrt(1 + sr * sr / 2))
    assert probabilistic_sharpe_ratio(sr, 0.0, t, 0.0, 3.0) == pytest.approx(expected, rel=1e-12)


def test_deflated_sharpe_from_returns_uses_sample_moments():
    rng = np.random.default_rng(1)
    r = rng.standard_t(df=5, size=2000) * 0.01 + 0.001
    out = deflated_sharpe_ratio(r, n_trials=20, sr_variance=0.002)
    assert out.sr == pytest.approx(r.mean() / r.std(ddof=1))
    assert out.kurtosis == pytest.approx(stats.kurtosis(r, fisher=False, bias=False))
    assert out.sr0 == pytest.approx(expected_max_sharpe(20, 0.002))
    assert out.dsr == pytest.approx(probabilistic_sharpe_ratio(out.sr, out.sr0, 2000, out.skew, out.kurtosis))
    # more trials can only lower the DSR
    assert deflated_sharpe_ratio(r, n_trials=200, sr_variance=0.002).dsr < out.dsr
    with pytest.raises(ValueError, match="non-finite"):
        deflated_sharpe_ratio(np.array([0.1, np.nan, 0.2, 0.3]), n_trials=2, sr_variance=0.1)


def test_pbo_hand_computed_small_matrix():
    # 4 blocks of 2 rows, 3 configurations: config 0 is good in blocks 0-1 and bad in 2-3, config 1
    # the reverse, config 2 earns a small steady return everywhere.
    good, bad, mid = [0.02, 0.03], [-0.02, -0.01], [0.001, 0.002]
    m = np.array([
        [good[0], bad[0], mid[0]], [good[1], bad[1], mid[1]],
        [good[0], bad[0], mid[0]], [good[1], bad[1], mid[1]],
        [bad[0], good[0], mid[0]], [bad[1], good[1], mid[1]],
        [bad[0], good[0], mid[0]], [bad[1], good[1], mid[1]],
    ])
    res = probability_of_backtest_overfitting(m, n_blocks=4)
    # Splits in itertools order (IS blocks): (0,1) (0,2) (0,3) (1,2) (1,3) (2,3).
    # (0,1): config 0 wins in sample (all good rows) and is the worst out of sample (blocks 2,3):
    #        rank 1 of 3 -> ω̄ = 1/4 -> λ = ln(1/3). (2,3): the same with config 1.
    # Mixed splits: configs 0 and 1 see good and bad rows (mean 0.005, sd 0.024, SR 0.21) while
    #        config 2 has mean 0.0015, sd 0.00058, SR 2.6: it wins in sample and is also the best out
    #        of sample: rank 3 -> ω̄ = 3/4 -> λ = ln 3.
    # PBO = share of λ <= 0 = 2/6.
    assert len(res.logits) == 6
    np.testing.assert_allclose(res.logits, [-math.log(3), math.log(3), math.log(3), math.log(3), math.log(3), -math.log(3)])
    assert res.pbo == pytest.approx(2 / 6)


def test_pbo_is_zero_for_a_dominant_configuration_and_near_half_for_noise():
    rng = np.random.default_rng(2)
    noise = rng.normal(0, 0.01, size=(1600, 10))
    dominant = noise.copy()
    dominant[:, 3] += 0.02  # best in every block, in and out of sample
    assert probability_of_backtest_overfitting(dominant, n_blocks=8).pbo == 0.0
    pbo_noise = np.mean([
        probability_of_backtest_overfitting(rng.normal(0, 0.01, size=(800, 10)), n_blocks=8).pbo for _ in range(10)
    ])
    assert 0.3 < pbo_noise < 0.7


def test_pbo_input_errors():
    with pytest.raises(ValueError, match="even"):
        probability_of_backtest_overfitting(np.zeros((100, 3)), n_blocks=5)
    with pytest.raises(ValueError, match="N >= 2"):
        probability_of_backtest_overfitting(np.zeros((100, 1)))
    bad = np.zeros((100, 3))
    bad[7, 1] = np.inf
    with pytest.raises(ValueError, match="rows \\[7\\]"):
        probability_of_backtest_overfitting(bad, n_blocks=4)


def test_sharpe_sampling_variance_matches_the_spread_of_simulated_sharpe_estimates():
    # Independent check: the variance of SR estimates over many simulated samples of length T.
    rng = np.random.default_rng(3)
    t, mu, sd = 500, 0.05, 1.0
    samples = rng.normal(mu, sd, size=(20_000, t))
    srs = samples.mean(axis=1) / samples.std(axis=1, ddof=1)
    assert sharpe_sampling_variance(mu / sd, t, 0.0, 3.0) == pytest.approx(srs.var(), rel=0.05)
    # fat tails and negative skew widen it (the paper's example: skew -3, kurtosis 10)
    assert sharpe_sampling_variance(0.1581, 1250, -3.0, 10.0) > sharpe_sampling_variance(0.1581, 1250, 0.0, 3.0)
    with pytest.raises(ValueError, match="n_obs"):
        sharpe_sampling_variance(0.1, 1, 0.0, 3.0)
