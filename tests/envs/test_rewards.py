"""Reward forms against hand-computed numbers (Moody & Saffell 2001 online estimates)."""

from __future__ import annotations

import math

import pytest

from envs.rewards import RewardConfig
from tests.envs.reference_rewards import (
    DifferentialDownsideDeviation,
    DifferentialSharpe,
    LogReturn,
    compose_reward,
    make_reward,
)


def test_differential_downside_deviation_four_steps() -> None:
    f = DifferentialDownsideDeviation(eta=0.5, warmup_bars=1, downside_floor=1e-4, clip=100.0)
    # step 1 (warm-up): log(1.01); then A = 0.5 * 0.01 = 0.005, DD2 = 0
    assert f.step(0.01) == pytest.approx(math.log(1.01), rel=1e-12)
    # step 2: r = -0.02 <= 0, DD = max(sqrt(0), 1e-4) = 1e-4 (floored), x = r - A/2 = -0.0225
    # D = (DD^2 x - A r^2 / 2) / DD^3 = (1e-8 * -0.0225 - 0.5 * 0.005 * 4e-4) / 1e-12 = -1000225
    # -> clipped to -100; then A = 0.005 + 0.5 * (-0.025) = -0.0075, DD2 = 0.5 * 4e-4 = 2e-4
    assert f.step(-0.02) == -100.0
    # step 3: r = 0.03 > 0: D = (0.03 + 0.0075 / 2) / sqrt(2e-4) = 0.03375 / 0.01414213562...
    # then A = -0.0075 + 0.5 * 0.0375 = 0.01125, DD2 = 2e-4 + 0.5 * (0 - 2e-4) = 1e-4
    assert f.step(0.03) == pytest.approx(0.03375 / math.sqrt(2e-4), rel=1e-12)
    # step 4: r = -0.01, DD = 0.01, x = -0.01 - 0.005625 = -0.015625
    # D = (1e-4 * -0.015625 - 0.5 * 0.01125 * 1e-4) / 1e-6 = (-1.5625e-6 - 5.625e-7) / 1e-6 = -2.125
    assert f.step(-0.01) == pytest.approx(-2.125, rel=1e-12)
    assert (f.a, f.dd2) == (
        pytest.approx(0.01125 + 0.5 * (-0.01 - 0.01125)),
        pytest.approx(0.5 * (1e-4 + 1e-4)),
    )


def test_differential_sharpe_three_steps() -> None:
    f = DifferentialSharpe(eta=0.5, warmup_bars=1, downside_floor=1e-4, clip=100.0)
    # step 1 (warm-up): log(1.01); A = 0.005, B = 0.5 * 1e-4 = 5e-5
    assert f.step(0.01) == pytest.approx(math.log(1.01), rel=1e-12)
    # step 2: r = -0.02: B - A^2 = 5e-5 - 2.5e-5 = 2.5e-5 (sd 0.005), dA = -0.025, dB = 4e-4 - 5e-5 = 3.5e-4
    # D = (5e-5 * -0.025 - 0.5 * 0.005 * 3.5e-4) / 2.5e-5^1.5 = -2.125e-6 / 1.25e-7 = -17
    # then A = -0.0075, B = 5e-5 + 0.5 * 3.5e-4 = 2.25e-4
    assert f.step(-0.02) == pytest.approx(-17.0, rel=1e-12)
    # step 3: r = 0.03: B - A^2 = 2.25e-4 - 5.625e-5 = 1.6875e-4, dA = 0.0375, dB = 9e-4 - 2.25e-4 = 6.75e-4
    # D = (2.25e-4 * 0.0375 + 0.5 * 0.0075 * 6.75e-4) / 1.6875e-4^1.5 = 1.096875e-5 / 2.19213e-6 = 5.0037...
    assert f.step(0.03) == pytest.approx(1.096875e-5 / 1.6875e-4**1.5, rel=1e-12)


def test_warmup_returns_log_return_and_reset_clears() -> None:
    f = DifferentialDownsideDeviation(eta=0.1, warmup_bars=3)
    outs = [f.step(r) for r in (0.01, -0.01, 0.02)]
    assert outs == pytest.approx([math.log1p(0.01), math.log1p(-0.01), math.log1p(0.02)], rel=1e-12)
    assert f.n == 3 and f.a != 0.0
    f.reset()
    assert (f.a, f.dd2, f.n) == (0.0, 0.0, 0)


def test_floor_and_clip() -> None:
    f = DifferentialDownsideDeviation(eta=0.1, warmup_bars=0, downside_floor=1e-3, clip=5.0)
    # no downside seen yet: DD floored at 1e-3, D = (0.002 - 0) / 1e-3 = 2
    assert f.step(0.002) == pytest.approx(2.0)
    g = DifferentialDownsideDeviation(eta=0.1, warmup_bars=0, downside_floor=1e-4, clip=5.0)
    assert g.step(0.002) == 5.0  # 0.002 / 1e-4 = 20 -> clipped


def test_log_return() -> None:
    f = LogReturn(clip=10.0)
    assert f.step(0.1) == pytest.approx(math.log(1.1))
    assert f.step(-1.5) == -10.0  # total loss
    with pytest.raises(ValueError, match="finite"):
        f.step(math.nan)


def test_make_reward_kinds() -> None:
    assert isinstance(make_reward(RewardConfig()), DifferentialDownsideDeviation)
    assert isinstance(make_reward(RewardConfig(kind="differential_sharpe")), DifferentialSharpe)
    assert isinstance(make_reward(RewardConfig(kind="log_return")), LogReturn)
    with pytest.raises(ValueError):
        RewardConfig(kind="sharpe")


def test_compose_reward_penalties_and_scale() -> None:
    cfg = RewardConfig(turnover_penalty=0.01, drawdown_penalty=2.0, scale=10.0)
    # turnover: 0.01 * 5000 / 10000 = 0.005; drawdown: 2 * (0.05 - 0.02) = 0.06
    # total = 10 * (0.5 - 0.005 - 0.06) = 4.35
    parts = compose_reward(0.5, 5_000.0, 10_000.0, 0.02, 0.05, cfg)
    assert parts.base == pytest.approx(5.0)
    assert parts.turnover_penalty == pytest.approx(0.05)
    assert parts.drawdown_penalty == pytest.approx(0.6)
    assert parts.total == pytest.approx(4.35)
    # a drawdown that shrinks is not penalised
    assert compose_reward(0.5, 0.0, 10_000.0, 0.05, 0.02, cfg).drawdown_penalty == 0.0
