"""Time-series momentum with volatility targeting (``tsmom``): the baseline a quant compares an agent with.

Rule (Moskowitz, Ooi & Pedersen 2012, "Time series momentum", J. Financial Economics 104(2), eq. (1) and
section 4; used as the "Sign(R)" baseline of Zhang, Zohren & Roberts 2020, "Deep Reinforcement Learning
for Trading", J. Financial Data Science 2(2), eq. (11)): at the close of bar t

* direction = sign of the trailing return ``close[t] / close[t - lookback_bars] - 1`` (flat when it is 0);
* exposure (|notional| / equity) = ``target_vol_annual / sigma_t``, where ``sigma_t`` is the ex-ante
  annualised volatility of 1-bar simple returns: an exponentially weighted standard deviation
  (pandas ``ewm(span=vol_span_bars, adjust=True)`` weights ``(1 - alpha) ** i``, ``alpha = 2 / (span + 1)``,
  returns demeaned by their EWMA mean, as MOP eq. (1)) of the returns up to and including bar t, times
  ``sqrt(bars per year)`` (8,760 for 1h: crypto trades 24/7);
* the exposure is capped at the agent's largest exposure (the action bounds, :func:`max_exposure`) and
  turned into a :class:`market.decision.Decision` in the agent's decision space (:func:`exposure_decision`).

Everything at bar t comes from closes at or before t (the candles a :class:`market.decision.DecisionContext`
holds), so the rule is causal; the decision fills at the open of t+1 through the same env kernel, sizing rule,
fees, slippage, funding and liquidation as every other strategy (``training.evaluate.span_backtests``). It
trades under its own trading rules (:meth:`TsmomConfig.trading_rules`, whatever the agent's levers are): the
kernel reads its decision only at its rebalance bars and resizes a held position (a partial close, reason
``rebalance``, or an add) when the aim leaves the no-trade band. It has no stop and no take-profit (like
buy-and-hold): it exits on a signal (a flip), a rebalance, or by liquidation.

Defaults, fixed before any test period was looked at (never tuned on it), for 1h bars:

* ``lookback_bars = 720`` (30 days). MOP's headline is a 12-month lookback on monthly data, and their
  Table 2 shows positive time-series momentum for every lookback from 1 to 12 months; in crypto, time-series
  momentum is documented at horizons of one to four weeks (Liu & Tsyvinski 2021, "Risks and Returns of
  Cryptocurrency", Review of Financial Studies 34(6)), and a month needs 30 days of history before the first
  decision instead of a year (the smoke and walk-forward test windows have a few months of history).
* ``target_vol_annual = 0.40``: MOP scale every instrument to 40 % ex-ante annualised volatility ("in line
  with the average volatility of an individual stock"); BTC's realised volatility is of that order, so the
  rule holds about 1x notional.
* ``vol_span_bars = 1440`` (60 days of 1h bars): ZZR 2020 use a 60-day exponentially weighted standard
  deviation (MOP: centre of mass 60 days). The weights are truncated after ``VOL_WINDOW_SPANS`` spans
  (2880 bars, the truncated tail holds ``exp(-4)`` ~ 1.8 % of the weight) and renormalised; with less
  history, every return available is used.
* ``rebalance_interval_bars = 24``: ZZR's baselines trade daily; the direction and size are read at the
  bars that close at a multiple of 24 bars since the Unix epoch (00:00 UTC for 1h bars;
  ``envs.accounting.is_decision_bar``, the rule of the agent's ``decision_interval_bars``), so the first
  entry of a period waits for the first such bar.
* ``rebalance_band_frac = 0.5``: a held position is resized to the target quantity only when
  ``|target - held| >= 0.5 * held`` (the kernel's no-trade band, ``TradingRulesConfig.rebalance_band_frac``;
  Davis & Norman 1990); ``None``: sized once at entry, never resized.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from envs.accounting import is_decision_bar
from envs.actions import ActionConfig
from envs.config import TradingRulesConfig
from market.config_base import StrictConfig
from market.decision import Decision, DecisionContext, StatelessPolicy

#: Stop and take-profit distances (ATRs) so far away that they never trigger (the rule has no stop/target).
NEVER_ATR = 1e9
#: The EWMA variance uses the last ``VOL_WINDOW_SPANS * vol_span_bars`` returns (see the module docstring).
VOL_WINDOW_SPANS = 2
SECONDS_PER_YEAR = 365.0 * 86_400.0


class TsmomConfig(StrictConfig):
    """Time-series momentum with volatility targeting; defaults and their sources in :mod:`training.baselines`."""

    lookback_bars: int = Field(
        720, ge=1, description="trailing return window for the direction, bars (720 = 30 days of 1h)"
    )
    target_vol_annual: float = Field(
        0.40, gt=0.0, description="target annualised volatility of the position (MOP 2012: 40 %)"
    )
    vol_span_bars: int = Field(
        1440, ge=2, description="EWMA span of the ex-ante volatility of 1-bar returns, bars (60 days of 1h)"
    )
    rebalance_interval_bars: int = Field(
        24,
        ge=1,
        description="direction and size re-read at bars closing at a multiple of this since the epoch",
    )
    rebalance_band_frac: float | None = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="resize to the target unless |target - held| < this x held; None: never",
    )

    def trading_rules(self) -> TradingRulesConfig:
        """The env's trading rules tsmom trades under: decisions read at its rebalance bars, no minimum holding,
        its no-trade band."""
        return TradingRulesConfig(decision_interval_bars=self.rebalance_interval_bars, min_hold_bars=0,
                                  rebalance_band_frac=self.rebalance_band_frac)  # fmt: skip

    @property
    def history_bars(self) -> int:
        """Closes one decision reads: the lookback's and the volatility window's, plus the current one."""
        return max(self.lookback_bars, VOL_WINDOW_SPANS * self.vol_span_bars) + 1


class BaselinesConfig(StrictConfig):
    """Settings of the rule baselines every report trades next to the agent (``baselines:`` in a run config)."""

    tsmom: TsmomConfig = TsmomConfig()


def ewma_vol(returns: np.ndarray, span_bars: int) -> float:
    """Exponentially weighted standard deviation of the last return (pandas ``ewm(span, adjust=True).std(bias=True)``).

    Parameters
    ----------
    returns : numpy.ndarray
        float64 (n,), 1-bar simple returns, oldest first; finite.
    span_bars : int
        EWMA span; weight of the return ``i`` bars before the last: ``(1 - alpha) ** i``, ``alpha = 2 / (span + 1)``.

    Returns
    -------
    float
        Per-bar volatility (same units as ``returns``), demeaned by the EWMA mean; ``nan`` when ``n == 0``.
    """
    r = np.asarray(returns, dtype=np.float64)
    if r.size == 0:
        return math.nan
    alpha = 2.0 / (span_bars + 1.0)
    w = (1.0 - alpha) ** np.arange(r.size - 1, -1, -1, dtype=np.float64)
    w /= w.sum()
    mean = float(w @ r)
    return math.sqrt(max(float(w @ (r - mean) ** 2), 0.0))


def tsmom_target(close: np.ndarray, cfg: TsmomConfig, bar_interval_s: float) -> tuple[int, float]:
    """Direction and target exposure at the last close of ``close``.

    Parameters
    ----------
    close : numpy.ndarray
        float64 (n,), closes up to and including the decision bar, USDT, oldest first; finite and > 0.
    cfg : TsmomConfig
    bar_interval_s : float
        Bar length in seconds (annualisation: ``365 * 86400 / bar_interval_s`` bars a year).

    Returns
    -------
    (int, float)
        Direction (-1, 0, +1) and exposure ``target_vol_annual / sigma_annual`` (|notional| / equity, not
        capped; ``inf`` when the volatility is 0). ``(0, 0.0)`` when fewer than ``lookback_bars + 1``
        closes are given or the trailing return is 0. Only the last ``cfg.history_bars`` closes are read.
    """
    c = np.asarray(close, dtype=np.float64)[-cfg.history_bars :]
    if c.size < cfg.lookback_bars + 1:
        return 0, 0.0
    trailing = c[-1] / c[-1 - cfg.lookback_bars] - 1.0
    direction = int(np.sign(trailing))
    if direction == 0:
        return 0, 0.0
    sigma = ewma_vol(c[1:] / c[:-1] - 1.0, cfg.vol_span_bars) * math.sqrt(SECONDS_PER_YEAR / bar_interval_s)
    if not math.isfinite(sigma):
        return 0, 0.0
    return direction, (math.inf if sigma == 0.0 else cfg.target_vol_annual / sigma)


def _max_margin_frac(actions: ActionConfig) -> float:
    return actions.max_size_frac if actions.sizing_mode == "equity_fraction" else 1.0


def max_exposure(actions: ActionConfig) -> float:
    """The agent's largest exposure (|notional| / equity at entry) under its action bounds: ``max_leverage *
    max_size_frac`` (``equity_fraction`` sizing) or ``max_leverage`` (``vol_target`` sizing, margin up to all
    the equity)."""
    return actions.max_leverage * _max_margin_frac(actions)


def exposure_decision(direction: int, exposure: float, actions: ActionConfig) -> Decision:
    """A decision that opens ``direction`` at ``exposure`` (|notional| / equity), within the action bounds.

    The exposure is capped at :func:`max_exposure`; margin ``size_frac = min(exposure, m)`` (m the largest
    margin fraction: ``max_size_frac``, or 1 under ``vol_target`` sizing, where this equals
    ``envs.sizing.vol_target_fields``) and ``leverage = exposure / size_frac`` (at least 1: no leverage while
    the exposure fits in the margin), so the position is no more levered than it must be (its liquidation price
    as far as the bounds allow). No stop and no take-profit (:data:`NEVER_ATR`). ``direction == 0`` or
    ``exposure <= 0``: flat.
    """
    e = min(float(exposure), max_exposure(actions))
    if direction == 0 or not e > 0.0:
        return Decision.flat()
    size = min(e, _max_margin_frac(actions))
    lev = min(max(1.0, e / size), actions.max_leverage)
    return Decision(
        direction=int(direction), leverage=lev, size_frac=size, stop_atr=NEVER_ATR, take_profit_atr=NEVER_ATR
    )


class TsmomPolicy(StatelessPolicy):
    """Time-series momentum with volatility targeting as a :class:`market.decision.Policy` (module docstring).

    At a rebalance bar (its close is a multiple of ``rebalance_interval_bars`` bars since the epoch) it answers
    the target: direction and exposure (:func:`exposure_decision`; flat without a signal). Traded under
    :meth:`TsmomConfig.trading_rules`, the env reads the answer only at those bars: a new direction flips, the
    held one resizes outside the band. At other bars it answers a hold (not read). ``ctx.candles`` must hold
    ``cfg.history_bars`` closes for the full volatility window (fewer: the rule uses what is there, and stays
    flat until ``lookback_bars + 1`` closes are available).
    """

    name = "tsmom"

    def __init__(self, cfg: TsmomConfig, actions: ActionConfig, bar_interval_s: float):
        if not (math.isfinite(bar_interval_s) and bar_interval_s > 0):
            raise ValueError(f"bar_interval_s must be finite and > 0, got {bar_interval_s!r}")
        self.cfg, self.actions, self.bar_interval_s = cfg, actions, float(bar_interval_s)
        self._bar_ns = round(self.bar_interval_s * 1e9)

    def history_bars(self, bar_interval) -> int:
        """Closes one decision reads (:attr:`TsmomConfig.history_bars`); no state, no stops (Policy protocol)."""
        return self.cfg.history_bars

    def is_rebalance_bar(self, bar_open_time) -> bool:
        """The bar opening at ``bar_open_time`` closes at a multiple of ``rebalance_interval_bars`` bars."""
        return bool(is_decision_bar(int(bar_open_time.value), self._bar_ns, self.cfg.rebalance_interval_bars))

    def decide(self, ctx: DecisionContext) -> Decision:
        """Hold between rebalance bars; on one, the target exposure of the trend over the history."""
        if not self.is_rebalance_bar(ctx.bar_open_time):
            return Decision(direction=ctx.position.side)  # hold
        direction, exposure = tsmom_target(
            ctx.candles["close"].to_numpy(np.float64), self.cfg, self.bar_interval_s
        )
        return exposure_decision(direction, exposure, self.actions)
