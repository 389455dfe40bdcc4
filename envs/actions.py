"""Map the agent's continuous action in ``Box(-1, 1, (5,))`` to a :class:`market.decision.Decision`.

Components: ``a[0]`` direction, ``a[1]`` leverage, ``a[2]`` size (fraction of equity as margin),
``a[3]`` stop distance (ATRs), ``a[4]`` take-profit distance (ATRs).

``sizing_mode = "vol_target"`` (issue 16) reads ``a[2]`` as ``u = (a2 + 1) / 2`` in [0, 1], the fraction of
``target_vol_annual`` the position should carry: exposure ``L = min(u * target_vol_annual / sigma,
max_leverage)`` with sigma the ex-ante annualised volatility at the decision bar, then ``leverage = max(1, L)``,
``size_frac = min(1, L)`` (:func:`envs.sizing.vol_target_fields`), sized by the one sizing rule; ``a[1]`` is not
read. Sources: Moskowitz, Ooi & Pedersen (2012) scale positions by ``target / ex-ante vol``; Zhang, Zohren &
Roberts (2020, "Deep Reinforcement Learning for Trading", J. Financial Data Science 2(2)) let the agent choose
direction and conviction and volatility-scale the position, not a raw equity fraction.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from envs.sizing import vol_target_fields
from market.config_base import StrictConfig
from market.decision import Decision, NonFiniteDecisionError

ACTION_NAMES: tuple[str, ...] = ("direction", "leverage", "size", "stop_atr", "take_profit_atr")


class ActionConfig(StrictConfig):
    """Ranges of the decoded action."""

    direction_dead_zone: float = Field(
        0.3, ge=0.0, lt=1.0, description="|a0| <= this -> flat; a0 > it -> long; a0 < -it -> short."
    )
    max_leverage: float = Field(5.0, ge=1.0, description="Leverage at a1 = +1 (leverage 1 at a1 = -1).")
    max_size_frac: float = Field(
        0.5, gt=0.0, le=1.0, description="Fraction of equity committed as margin at a2 = +1 (0 at a2 = -1)."
    )
    stop_atr_range: tuple[float, float] = Field(
        (0.5, 4.0), description="Stop distance in ATRs (price units) at a3 = -1 and a3 = +1."
    )
    take_profit_atr_range: tuple[float, float] = Field(
        (0.5, 8.0), description="Take-profit distance in ATRs at a4 = -1 and a4 = +1."
    )
    sizing_mode: Literal["equity_fraction", "vol_target"] = Field(
        "equity_fraction",
        description="equity_fraction: a2 is the margin fraction and a1 the leverage (as before); vol_target: a2 "
        "scales target_vol_annual into the exposure target_vol / ex-ante vol, capped at max_leverage (a1 and "
        "max_size_frac unused).",
    )
    target_vol_annual: float = Field(
        0.40,
        gt=0.0,
        description="vol_target: annualised volatility of the position at a2 = +1 (0.40 = 40 %, Moskowitz, "
        "Ooi & Pedersen 2012's per-instrument target).",
    )
    vol_span_bars: int = Field(
        1440,
        ge=1,
        description="EWMA span (bars) of the ex-ante volatility of 1-bar returns (1440 = 60 days of 1h, the "
        "tsmom baseline's); read by vol_target sizing and the reward's volatility scaling.",
    )
    vol_min_bars: int = Field(
        24, ge=1, description="Returns needed before the volatility estimate is used (no vol_target entry before)."
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> ActionConfig:
        for name in ("stop_atr_range", "take_profit_atr_range"):
            lo, hi = getattr(self, name)
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
                raise ValueError(f"{name} must satisfy 0 < low <= high (finite), got {(lo, hi)}")
        return self


def _lerp(u: float, lo: float, hi: float) -> float:
    """Map u in [-1, 1] linearly onto [lo, hi]."""
    return lo + (u + 1.0) * 0.5 * (hi - lo)


def _unlerp(x: float, lo: float, hi: float) -> float:
    """Inverse of :func:`_lerp` (u = -1 when the range is a single point)."""
    return -1.0 if hi == lo else 2.0 * (x - lo) / (hi - lo) - 1.0


def decode_action(action: np.ndarray, cfg: ActionConfig, *, ex_ante_vol_annual: float | None = None) -> Decision:
    """Decode a policy action into a decision.

    The action is clipped to [-1, 1] after a finiteness check, then
    ``direction = +1 if a0 > dz, -1 if a0 < -dz, else 0``;
    ``leverage = 1 + (a1 + 1) / 2 * (max_leverage - 1)``;
    ``size_frac = (a2 + 1) / 2 * max_size_frac``;
    ``stop_atr = lo + (a3 + 1) / 2 * (hi - lo)`` over ``stop_atr_range`` and likewise
    ``take_profit_atr`` over ``take_profit_atr_range``.

    Worked example (default config): ``a = [0.5, 0.0, 1.0, -1.0, 2.0]`` gives direction +1
    (0.5 > 0.3), leverage ``1 + 0.5 * 4 = 3.0``, size_frac ``1.0 * 0.5 = 0.5``, stop_atr ``0.5``,
    take_profit_atr ``8.0`` (a4 clipped to 1).

    With ``cfg.sizing_mode == "vol_target"``, leverage and size_frac are
    :func:`envs.sizing.vol_target_fields` of ``u = (a2 + 1) / 2``, ``cfg.target_vol_annual``,
    ``ex_ante_vol_annual`` and ``cfg.max_leverage`` (the env kernel runs the same compiled function).
    Example: u = 0.5, target 0.40, sigma 0.10 -> exposure 2.0 -> leverage 2.0, size_frac 1.0; sigma 0.20 ->
    exposure 1.0 -> leverage 1.0, size_frac 1.0; sigma 0.80 -> leverage 1.0, size_frac 0.25.

    Parameters
    ----------
    action : np.ndarray
        Shape (5,), any float dtype.
    cfg : ActionConfig
    ex_ante_vol_annual : float | None
        Ex-ante annualised volatility at the decision bar (:func:`envs.sizing.ex_ante_vol_annual` of the closes
        up to it, with ``cfg.vol_span_bars`` and ``cfg.vol_min_bars``); required by ``vol_target`` (NaN: no
        estimate yet, so no position), ignored otherwise.

    Returns
    -------
    Decision

    Raises
    ------
    ValueError
        If the action does not have 5 elements.
    NonFiniteDecisionError
        If a component is NaN or infinite (names the component).
    ValueError
        ``vol_target`` without ``ex_ante_vol_annual``.
    """
    values = np.asarray(action, dtype=np.float64).reshape(-1)
    if values.shape != (5,):
        raise ValueError(f"action must have shape (5,), got {np.shape(action)}")
    a = values.tolist()
    for name, value in zip(ACTION_NAMES, a, strict=True):
        if not math.isfinite(value):
            raise NonFiniteDecisionError(f"action component {name!r} is not finite: {value!r}")
    a0, a1, a2, a3, a4 = (min(1.0, max(-1.0, v)) for v in a)
    dz = cfg.direction_dead_zone
    direction = 1 if a0 > dz else (-1 if a0 < -dz else 0)
    if cfg.sizing_mode == "vol_target":
        if ex_ante_vol_annual is None:
            raise ValueError("sizing_mode 'vol_target' needs ex_ante_vol_annual (envs.sizing.ex_ante_vol_annual of "
                             "the closes up to the decision bar)")  # fmt: skip
        lev, size = vol_target_fields((a2 + 1.0) * 0.5, cfg.target_vol_annual, ex_ante_vol_annual, cfg.max_leverage)
    else:
        lev, size = _lerp(a1, 1.0, cfg.max_leverage), _lerp(a2, 0.0, cfg.max_size_frac)
    return Decision(
        direction=direction,
        leverage=lev,
        size_frac=size,
        stop_atr=_lerp(a3, *cfg.stop_atr_range),
        take_profit_atr=_lerp(a4, *cfg.take_profit_atr_range),
    )


def encode_decision(decision: Decision, cfg: ActionConfig, *, clip: bool = False) -> np.ndarray:
    """Inverse of :func:`decode_action` (for tests and rule-based baselines), in the ``equity_fraction``
    decoding (a vol-target decision has no single action: it depends on the volatility).

    The direction maps to ``0`` (flat) or ``+-(1 + dz) / 2`` (midway between the dead zone and the
    bound); the other fields invert the linear maps, so ``decode_action(encode_decision(d)) == d``
    up to float rounding for any ``d`` inside the configured ranges.

    Parameters
    ----------
    decision : Decision
    cfg : ActionConfig
    clip : bool
        If True, fields outside the configured ranges are clipped to the nearest representable
        value; if False (default) they raise.

    Returns
    -------
    np.ndarray
        float32, shape (5,), in [-1, 1].

    Raises
    ------
    ValueError
        If a field lies outside its configured range and ``clip`` is False.
    """
    dz = cfg.direction_dead_zone
    a0 = decision.direction * (1.0 + dz) / 2.0
    raw = [
        _unlerp(decision.leverage, 1.0, cfg.max_leverage),
        _unlerp(decision.size_frac, 0.0, cfg.max_size_frac),
        _unlerp(decision.stop_atr, *cfg.stop_atr_range),
        _unlerp(decision.take_profit_atr, *cfg.take_profit_atr_range),
    ]
    tol = 1e-9
    out = [a0]
    for name, u in zip(ACTION_NAMES[1:], raw, strict=True):
        if not clip and not -1.0 - tol <= u <= 1.0 + tol:
            raise ValueError(
                f"decision field {name!r} lies outside the configured action range (encoded {u:.6g})"
            )
        out.append(min(1.0, max(-1.0, u)))
    return np.asarray(out, dtype=np.float32)
