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

Shaping terms (all off by default; the reward is then the form above minus the turnover and drawdown
penalties, times ``scale``), per bar:

* ``turnover_penalty * traded notional / equity_{t-1}`` and ``drawdown_penalty * increase of the drawdown``.
* Transaction-cost term (Zhang, Zohren & Roberts 2020, "Deep Reinforcement Learning for Trading", J. Financial
  Data Science 2(2), arXiv:1911.10107, their reward: ``R_t = mu [A_{t-1} (sigma_tgt / sigma_{t-1}) r_t - bp p_{t-1}
  |(sigma_tgt / sigma_{t-1}) A_{t-1} - (sigma_tgt / sigma_{t-2}) A_{t-2}|]``): ``cost_penalty_mult * k *
  (fees + slippage paid this bar) / equity_{t-1}``. ZZR charge ``bp`` per unit of the change in the (scaled)
  position; here the charge is what the execution model really paid for that change (fees and slippage of
  every fill of the bar, funding excluded), so ``cost_penalty_mult = 1`` counts each cost once more on top of
  the net return the reward already sees: frictions shape learning, as ZZR intend.
* Volatility scaling (ZZR, the ``sigma_tgt / sigma_{t-1}`` factor): with ``vol_scaling_target_annual`` set,
  the net return fed to the form is ``k r_t`` and the cost term is multiplied by the same
  ``k = vol_scaling_target_annual / sigma_{t-1}``, sigma the ex-ante annualised volatility at the decision bar
  (:func:`envs.sizing.ex_ante_vol_annual`; k = 1 while no estimate exists). It makes a 1 % move in a calm market
  count as much as a 2 % move in a market twice as volatile. ``bar_return`` in the env's info stays unscaled.

With a decision interval of k bars (``envs.config.TradingRulesConfig``) the step's reward is the sum of
its bars' rewards; the estimates are updated every bar.

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
    cost_penalty_mult: float = Field(
        0.0,
        ge=0.0,
        description="Penalty per unit of (fees + slippage paid this bar) / equity at the previous close "
        "(Zhang, Zohren & Roberts 2020's transaction-cost term with the costs actually paid); 0 = off.",
    )
    vol_scaling_target_annual: float | None = Field(
        None,
        gt=0.0,
        description="Volatility scaling (Zhang, Zohren & Roberts 2020): the return and the cost term are "
        "multiplied by this target / the ex-ante annualised volatility at the decision bar; None = off.",
    )
