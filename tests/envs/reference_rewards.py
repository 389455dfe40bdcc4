"""Pure-Python reference of the reward forms of :mod:`envs.rewards` (moved out of the product: test-only).

The product computes rewards only in the compiled kernel (:func:`envs.kernel`'s reward step). These online
classes are the hand-checkable reference that ``tests/envs/test_rewards.py`` pins to worked numbers and
``tests/envs/reference_env.py`` uses, so the kernel-equivalence tests compare the kernel with them. Forms,
warm-up, floor and clip: the docstring of :mod:`envs.rewards`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from envs.rewards import RewardConfig


class RewardFunction(Protocol):
    """Online reward: ``reset()`` clears the estimates, ``step(r)`` consumes one net return."""

    def reset(self) -> None: ...

    def step(self, r: float) -> float: ...


def _check_return(r: float) -> float:
    value = float(r)
    if not math.isfinite(value):
        raise ValueError(f"per-bar return must be finite, got {r!r}")
    return value


def _clip(x: float, bound: float) -> float:
    return bound if x > bound else (max(x, -bound))


def log_return_reward(r: float, clip: float) -> float:
    """``log(1 + r)`` clipped to ``[-clip, clip]``; ``-clip`` when ``1 + r <= 0``.

    Raises
    ------
    ValueError
        If ``r`` is non-finite.
    """
    r = _check_return(r)
    if r <= -1.0:
        return -clip
    return _clip(math.log1p(r), clip)


class LogReturn:
    """Reward ``log(1 + r_t)``, clipped (stateless; ``reset`` is a no-op)."""

    def __init__(self, clip: float = 10.0) -> None:
        self.clip = clip

    def reset(self) -> None:
        """Nothing to reset."""

    def step(self, r: float) -> float:
        """Return the clipped log return of ``r`` (a fraction, e.g. 0.01 for +1 %)."""
        return log_return_reward(r, self.clip)


class DifferentialDownsideDeviation:
    """Differential downside deviation ratio (Moody & Saffell 2001, eq. for DDR; the Sortino-like form).

    State: ``A`` (EMA of r), ``DD2`` (EMA of ``min(r, 0)^2``), both starting at 0, and the step count.
    See the module docstring for the formula, warm-up, floor and clip.
    """

    def __init__(
        self, eta: float = 0.01, warmup_bars: int = 24, downside_floor: float = 1e-4, clip: float = 10.0
    ):
        self.eta = eta
        self.warmup_bars = warmup_bars
        self.downside_floor = downside_floor
        self.clip = clip
        self.reset()

    def reset(self) -> None:
        """Zero the moving estimates and the step count."""
        self.a = 0.0
        self.dd2 = 0.0
        self.n = 0

    def step(self, r: float) -> float:
        """Consume the net return ``r`` of one bar; return the reward (log return during warm-up).

        Raises
        ------
        ValueError
            If ``r`` is non-finite.
        """
        r = _check_return(r)
        if self.n < self.warmup_bars:
            out = log_return_reward(r, self.clip)
        else:
            dd = max(math.sqrt(self.dd2), self.downside_floor)
            x = r - 0.5 * self.a
            if r > 0:
                out = _clip(x / dd, self.clip)
            else:
                out = _clip((dd * dd * x - 0.5 * self.a * r * r) / (dd * dd * dd), self.clip)
        self.a += self.eta * (r - self.a)
        neg = min(r, 0.0)
        self.dd2 += self.eta * (neg * neg - self.dd2)
        self.n += 1
        return out


class DifferentialSharpe:
    """Differential Sharpe ratio (Moody & Saffell 2001).

    State: ``A`` (EMA of r), ``B`` (EMA of r^2), both starting at 0, and the step count; the
    denominator's deviation ``sqrt(B - A^2)`` is floored at ``downside_floor``.
    """

    def __init__(
        self, eta: float = 0.01, warmup_bars: int = 24, downside_floor: float = 1e-4, clip: float = 10.0
    ):
        self.eta = eta
        self.warmup_bars = warmup_bars
        self.downside_floor = downside_floor
        self.clip = clip
        self.reset()

    def reset(self) -> None:
        """Zero the moving estimates and the step count."""
        self.a = 0.0
        self.b = 0.0
        self.n = 0

    def step(self, r: float) -> float:
        """Consume the net return ``r`` of one bar; return the reward (log return during warm-up).

        Raises
        ------
        ValueError
            If ``r`` is non-finite.
        """
        r = _check_return(r)
        if self.n < self.warmup_bars:
            out = log_return_reward(r, self.clip)
        else:
            sd = max(math.sqrt(max(self.b - self.a * self.a, 0.0)), self.downside_floor)
            d_a = r - self.a
            d_b = r * r - self.b
            out = _clip((self.b * d_a - 0.5 * self.a * d_b) / (sd * sd * sd), self.clip)
        self.a += self.eta * (r - self.a)
        self.b += self.eta * (r * r - self.b)
        self.n += 1
        return out


def make_reward(cfg: RewardConfig) -> RewardFunction:
    """Build the base reward of ``cfg.kind`` (fresh estimates)."""
    if cfg.kind == "sortino":
        return DifferentialDownsideDeviation(cfg.eta, cfg.warmup_bars, cfg.downside_floor, cfg.clip)
    if cfg.kind == "differential_sharpe":
        return DifferentialSharpe(cfg.eta, cfg.warmup_bars, cfg.downside_floor, cfg.clip)
    return LogReturn(cfg.clip)


@dataclass(frozen=True, slots=True)
class RewardParts:
    """A composed reward: ``total = base - turnover_penalty - drawdown_penalty`` (each already scaled)."""

    total: float
    base: float
    turnover_penalty: float
    drawdown_penalty: float


def compose_reward(
    base: float,
    traded_notional_usdt: float,
    equity_prev_usdt: float,
    drawdown_prev_frac: float,
    drawdown_now_frac: float,
    cfg: RewardConfig,
) -> RewardParts:
    """Apply the shaping terms and the scale to a base reward.

    ``turnover = turnover_penalty * traded_notional / equity_prev``,
    ``drawdown = drawdown_penalty * max(0, dd_now - dd_prev)``,
    ``total = scale * (base - turnover - drawdown)``.

    Parameters
    ----------
    base : float
        Output of the base reward for this bar.
    traded_notional_usdt : float
        Sum of fill notionals this bar (USDT, >= 0).
    equity_prev_usdt : float
        Equity at the previous close (USDT); if <= 0 the turnover term uses 1 USDT.
    drawdown_prev_frac, drawdown_now_frac : float
        Drawdown from the episode's peak equity before and after the bar (fractions, >= 0).
    cfg : RewardConfig
    """
    denom = equity_prev_usdt if equity_prev_usdt > 0 else 1.0
    turnover = cfg.turnover_penalty * traded_notional_usdt / denom
    drawdown = cfg.drawdown_penalty * max(0.0, drawdown_now_frac - drawdown_prev_frac)
    s = cfg.scale
    base_s, turnover_s, drawdown_s = s * base, s * turnover, s * drawdown
    return RewardParts(total=base_s - turnover_s - drawdown_s, base=base_s, turnover_penalty=turnover_s,
                       drawdown_penalty=drawdown_s)  # fmt: skip
