"""Per-bar rewards computed online from the net equity return ``r_t = equity_t / equity_{t-1} - 1``.

``r_t`` is after fees, slippage and funding (it comes from ``envs.accounting`` equity).

Forms (Moody & Saffell 2001, "Learning to trade via direct reinforcement", IEEE Trans. Neural
Networks 12(4), 875-889), with exponential moving estimates of adaptation rate eta::

    A_t   = A_{t-1}   + eta (r_t      - A_{t-1})
    B_t   = B_{t-1}   + eta (r_t^2    - B_{t-1})
    DD2_t = DD2_{t-1} + eta (min(r_t, 0)^2 - DD2_{t-1})

* differential downside deviation ratio (the Sortino-like form; Sortino & Price 1994 for the
  downside deviation)::

      D_t = (r_t - A_{t-1}/2) / DD_{t-1}                                        if r_t > 0
      D_t = (DD2_{t-1} (r_t - A_{t-1}/2) - A_{t-1} r_t^2 / 2) / DD_{t-1}^3        otherwise

* differential Sharpe ratio::

      D_t = (B_{t-1} dA_t - A_{t-1} dB_t / 2) / (B_{t-1} - A_{t-1}^2)^{3/2},
      dA_t = r_t - A_{t-1},  dB_t = r_t^2 - B_{t-1}

* log return ``log(1 + r_t)``.

Choices: the estimates start at 0; for the first ``warmup_bars`` steps the reward is the log
return while the estimates are updated; the deviation in the denominator (``DD_{t-1}``, or
``sqrt(B - A^2)``) is floored at ``downside_floor``; every base reward is clipped to
``[-clip, clip]`` (a log return of a total loss, ``1 + r <= 0``, is ``-clip``).

The product computes these in the compiled kernel only (:mod:`envs.kernel`, reward step); this module
holds their configuration. A pure-Python reference of the same forms, used by the tests to pin
hand-computed numbers and to check the kernel, is ``tests/envs/reference_rewards.py``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from market.config_base import StrictConfig


class RewardConfig(StrictConfig):
    """Reward form and shaping terms."""

    kind: Literal["sortino", "differential_sharpe", "log_return"] = Field(
        "sortino",
        description="sortino = differential downside deviation ratio; differential_sharpe; log_return.",
    )
    eta: float = Field(
        0.01, gt=0.0, le=1.0, description="Adaptation (decay) rate of the moving estimates, per bar."
    )
    warmup_bars: int = Field(
        24, ge=0, description="Steps that return the log return while the estimates warm up."
    )
    downside_floor: float = Field(
        1e-4,
        gt=0.0,
        description="Floor on the deviation in the denominator (downside deviation or sqrt(B - A^2)).",
    )
    clip: float = Field(10.0, gt=0.0, description="Base reward clipped to [-clip, clip].")
    turnover_penalty: float = Field(
        0.0, ge=0.0, description="Penalty per unit of traded notional / equity at the previous close."
    )
    drawdown_penalty: float = Field(
        0.0, ge=0.0, description="Penalty per unit increase of the drawdown fraction from the episode's peak."
    )
    scale: float = Field(1.0, gt=0.0, description="Multiplies the whole reward (base minus penalties).")
