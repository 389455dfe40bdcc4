"""Gymnasium environment for one USDT-M perpetual: the PPO agent's training and evaluation world.

At index t the agent sees ``market_obs[t]`` (features + regime probabilities + signal probabilities,
all computable from candles closed at or before t) and the account state marked at the close of
bar t. Its action, decoded as by :func:`envs.actions.decode_action`, is applied to bar t+1 by the
compiled bar step behind :func:`envs.accounting.step_bar` (``envs.kernel``) with the ATR of bar t,
so a decision at the close of t fills at the open of t+1. The reward is computed from the net
per-bar equity return (after fees, slippage and funding) with the forms of :mod:`envs.rewards`
(compiled in ``envs.kernel``, equal to the Python classes bit for bit; tested). The arrays it reads are an
:class:`envs.env_data.EnvData` (re-exported here).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
import pandas as pd
from gymnasium import spaces
from pydantic import Field

from envs import kernel as K
from envs.accounting import (
    AccountState,
    cost_params,
    events_from_arrays,
    is_decision_bar,
    raise_kernel_error,
    set_rules,
    state_from_arrays,
    validate_opening,
)
from envs.actions import ActionConfig, decode_action
from envs.config import CostConfig, TradingRulesConfig
from envs.env_data import EnvData
from envs.rewards import RewardConfig
from envs.sizing import ex_ante_vol_annual
from market.config_base import StrictConfig
from market.decision import Decision, NonFiniteDecisionError, PositionView

ACCOUNT_FEATURES: tuple[str, ...] = (
    "pos_side",
    "pos_exposure",
    "pos_leverage_frac",
    "upnl_frac",
    "bars_in_trade_frac",
    "drawdown_frac",
)
#: ``bars_in_trade_frac = min(bars_in_trade / BARS_IN_TRADE_SCALE, 1)``.
BARS_IN_TRADE_SCALE = 720


# ----------------------------------------------------------------------------------------------
# Config and account features
# ----------------------------------------------------------------------------------------------


class EnvConfig(StrictConfig):
    """Episode layout, termination rules, action decoding, reward and costs."""

    initial_equity_usdt: float = Field(10_000.0, gt=0.0, description="Account equity at reset, USDT.")
    episode_len_bars: int | None = Field(
        720, ge=1, description="Bars per episode (= steps with a decision every bar); None = to the end of the data."
    )
    random_start: bool = Field(True, description="Start at a uniform random bar (seeded) instead of index 0.")
    min_equity_frac: float = Field(
        0.3, ge=0.0, lt=1.0, description="Equity below this fraction of the initial equity terminates."
    )
    max_drawdown_frac: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Drawdown from the episode's peak equity above this fraction terminates.",
    )
    actions: ActionConfig = Field(default_factory=ActionConfig, description="Action decoding.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward form and shaping.")
    costs: CostConfig = Field(default_factory=CostConfig, description="Execution/cost model.")
    trading_rules: TradingRulesConfig = Field(
        default_factory=TradingRulesConfig,
        description="Decision interval, minimum holding period and rebalance band (envs.config).",
    )
    info_level: Literal["lean", "full"] = Field(
        "lean",
        description="lean: equity and reward components each step, totals at the episode's end (fast, "
        "for training); full: account, costs, fills and closed trades every step (backtests, reports).",
    )


def _account_values(
    side: int, qty_base: float, entry_price: float, leverage: float, bars_in_trade: int,
    mark_price: float, equity_usdt: float, peak_equity_usdt: float, max_leverage: float,
) -> tuple[float, float, float, float, float, float]:  # fmt: skip
    den = max(1e-09, equity_usdt)
    if side == 0:
        exposure = lev_frac = upnl = bars = 0.0
    else:
        exposure = side * qty_base * mark_price / den
        lev_frac = leverage / max_leverage
        upnl = side * qty_base * (mark_price - entry_price) / den
        bars = min(bars_in_trade / BARS_IN_TRADE_SCALE, 1.0)
    dd = max(0.0, 1.0 - equity_usdt / peak_equity_usdt) if peak_equity_usdt > 0 else 0.0
    return float(side), exposure, lev_frac, upnl, bars, dd


def account_features(
    position: PositionView | AccountState,
    *,
    mark_price: float,
    equity_usdt: float,
    peak_equity_usdt: float,
    config: EnvConfig,
) -> np.ndarray:
    """The account part of the observation, in the order of :data:`ACCOUNT_FEATURES`.

    The env and the serving policy both call this, so training and live observations agree.

    Parameters
    ----------
    position : PositionView | AccountState
        The open position (side, size in base units, entry price, leverage, bars in trade).
    mark_price : float
        Close of the current bar, USDT.
    equity_usdt : float
        Marked-to-market equity at that close, USDT.
    peak_equity_usdt : float
        Highest equity of the episode (or of the serving session) so far, USDT.
    config : EnvConfig
        Supplies ``actions.max_leverage``.

    Returns
    -------
    np.ndarray
        float32 (6,): ``pos_side`` (-1/0/+1); ``pos_exposure`` signed notional at ``mark_price`` /
        equity; ``pos_leverage_frac`` leverage / max_leverage (0 when flat); ``upnl_frac``
        unrealized PnL / equity; ``bars_in_trade_frac`` ``min(bars_in_trade / 720, 1)``;
        ``drawdown_frac`` ``1 - equity / peak`` (>= 0). Equity in a denominator is floored at 1e-9 USDT.
    """
    qty = position.qty_base if isinstance(position, AccountState) else position.quantity_base
    values = _account_values(
        position.side, qty, position.entry_price, position.leverage, position.bars_in_trade,
        mark_price, equity_usdt, peak_equity_usdt, config.actions.max_leverage,
    )  # fmt: skip
    return np.asarray(values, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# The env
# ----------------------------------------------------------------------------------------------


def env_params(config: EnvConfig) -> np.ndarray:
    """The compiled kernel's full parameter vector (``envs.kernel.P_*``) for ``config``.

    Returns
    -------
    np.ndarray
        float64, costs (:func:`envs.accounting.cost_params`), then reward, action decoding and
        episode rules; a fresh, writeable copy.
    """
    p = cost_params(config.costs).copy()
    rw, act = config.reward, config.actions
    p[K.P_RKIND] = K.REWARD_KINDS.index(rw.kind)
    p[K.P_ETA] = rw.eta
    p[K.P_WARMUP] = rw.warmup_bars
    p[K.P_FLOOR] = rw.downside_floor
    p[K.P_CLIP] = rw.clip
    p[K.P_TURNOVER_PEN] = rw.turnover_penalty
    p[K.P_DD_PEN] = rw.drawdown_penalty
    p[K.P_SCALE] = rw.scale
    p[K.P_DEAD_ZONE] = act.direction_dead_zone
    p[K.P_MAX_LEV] = act.max_leverage
    p[K.P_MAX_SIZE] = act.max_size_frac
    p[K.P_STOP_LO], p[K.P_STOP_HI] = act.stop_atr_range
    p[K.P_TP_LO], p[K.P_TP_HI] = act.take_profit_atr_range
    p[K.P_INITIAL_EQUITY] = config.initial_equity_usdt
    p[K.P_MIN_EQUITY_FRAC] = config.min_equity_frac
    p[K.P_MAX_DD] = config.max_drawdown_frac
    p[K.P_MAX_LEV_OBS] = act.max_leverage
    set_rules(p, config.trading_rules)
    p[K.P_SIZING_MODE] = K.SIZING_MODES.index(act.sizing_mode)
    p[K.P_TARGET_VOL] = act.target_vol_annual
    p[K.P_COST_PEN] = rw.cost_penalty_mult
    p[K.P_RW_VOL_TARGET] = 0.0 if rw.vol_scaling_target_annual is None else rw.vol_scaling_target_annual
    return p


def bar_interval_ns(data: EnvData) -> int:
    """The bar length of ``data`` in ns: the smallest step between open times (1 h when it has one bar)."""
    if len(data) < 2:
        return 3_600 * 1_000_000_000
    return int(np.diff(data.open_time_ns).min())


def needs_volatility(config: EnvConfig) -> bool:
    """True when vol-target sizing or the reward's volatility scaling reads the ex-ante volatility."""
    return config.actions.sizing_mode == "vol_target" or config.reward.vol_scaling_target_annual is not None


def kernel_arrays(data: EnvData, config: EnvConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(bars, times, market_obs)`` as the kernel reads them: float64 (T, 9) with the ``B_*``
    columns (open, high, low, close, ATR, funding rate, funding flag, ex-ante annualised volatility, decision
    bar flag), int64 (T,) open times, float32 (T, F) market observations; C-contiguous and writeable (copies
    where needed).

    The volatility column is :func:`envs.sizing.ex_ante_vol_annual` of ``data.close`` (span and minimum bars
    of ``config.actions``) when :func:`needs_volatility`, else NaN; the decision flag is
    :func:`envs.accounting.is_decision_bar` with ``config.trading_rules.decision_interval_bars`` (every bar when
    it is 1 or ``config`` is None)."""
    bars = np.empty((len(data), K.N_BAR), dtype=np.float64)
    bars[:, K.B_OPEN] = data.open
    bars[:, K.B_HIGH] = data.high
    bars[:, K.B_LOW] = data.low
    bars[:, K.B_CLOSE] = data.close
    bars[:, K.B_ATR] = data.atr
    bars[:, K.B_FUNDING_RATE] = data.funding_rate
    bars[:, K.B_IS_FUNDING] = data.is_funding_time
    bars[:, K.B_VOL] = np.nan
    bars[:, K.B_DECISION] = 1.0
    if config is not None:
        bar_ns = bar_interval_ns(data)
        if needs_volatility(config):
            act = config.actions
            bars[:, K.B_VOL] = ex_ante_vol_annual(data.close, bar_ns / 1e9, act.vol_span_bars, act.vol_min_bars)
        k = config.trading_rules.decision_interval_bars
        if k > 1:
            bars[:, K.B_DECISION] = is_decision_bar(data.open_time_ns, bar_ns, k)
    times = np.require(data.open_time_ns, np.int64, ["C", "W"])
    market_obs = np.require(data.market_obs, np.float32, ["C", "W"])
    return bars, times, market_obs


def align_starts(starts: np.ndarray, bars: np.ndarray, last: int) -> np.ndarray:
    """Each start moved forward to the first decision bar at or after it (``bars[:, B_DECISION]``), so that an
    episode's first observation is a decision bar; a start with no decision bar before ``last`` stays. Identity
    when every bar is a decision bar. int64, same shape as ``starts``."""
    starts = np.asarray(starts, dtype=np.int64)
    flags = bars[:last, K.B_DECISION] != 0.0
    if flags.all():
        return starts
    idx = np.flatnonzero(flags)
    if len(idx) == 0:
        return starts
    pos = np.searchsorted(idx, starts)
    ok = pos < len(idx)
    return np.where(ok, idx[np.minimum(pos, len(idx) - 1)], starts).astype(np.int64)


def episode_summary(fs: np.ndarray, is_: np.ndarray) -> dict[str, Any]:
    """Cumulative cost and activity totals of an episode (added to ``info`` at its last step)."""
    f = fs.tolist()
    i = is_.tolist()
    return {
        "fees_paid_usdt": f[K.F_FEES],
        "funding_paid_usdt": f[K.F_FUNDING],
        "slippage_paid_usdt": f[K.F_SLIP],
        "liquidation_fees_usdt": f[K.F_LIQ_FEES],
        "turnover_usdt": f[K.F_TURNOVER],
        "n_trades": i[K.I_TRADES],
        "n_fills": i[K.I_FILLS],
        "n_skipped_min_notional": i[K.I_SKIPPED],
        "n_fallback_funding": i[K.I_FALLBACK],
    }


_SHAPE_5 = (5,)
_MODE_ACTION = K.MODE_ACTION
_O_EQUITY = K.O_EQUITY
_O_REWARD = K.O_REWARD
_O_DD_PEN = K.O_DD_PEN
if K.O_REWARD != K.O_EQUITY + 1:
    raise RuntimeError("envs.kernel output layout changed: TradingEnv.step reads O_EQUITY, O_REWARD as one slice")
_env_step = K.env_step


class TradingEnv(gym.Env):
    """One-symbol USDT-M perpetual trading env with a 5-dimensional continuous action.

    Observation: float32 ``(F + 6,)`` = ``market_obs[t]`` then :data:`ACCOUNT_FEATURES`.
    Action: float32 ``Box(-1, 1, (5,))`` decoded as in :func:`envs.actions.decode_action`
    (direction with a dead zone, leverage, size as the fraction of equity committed as margin, stop
    and take-profit distances in ATRs; see its docstring for the worked example).
    Episode: from a start index (random when ``random_start``, or ``options["start_index"]``) for
    ``episode_len_bars`` steps or until ``options["end_index"]`` / the last bar; ``truncated`` at the
    end of the span, ``terminated`` when equity falls below ``min_equity_frac`` of the initial equity
    (or to 0, whatever the fraction) or the drawdown exceeds ``max_drawdown_frac`` (a liquidation that wipes the account does both).
    The end of the data only ever truncates.

    Each step runs the compiled :func:`envs.kernel.env_step` (the same bar step as
    :func:`envs.accounting.step_bar`); the state lives in flat arrays and :attr:`account_state`
    builds the frozen :class:`~envs.accounting.AccountState` on demand.

    Levers (issue 16; every default keeps the behaviour above): ``config.trading_rules``
    (:class:`envs.config.TradingRulesConfig`): with ``decision_interval_bars`` k > 1 the agent acts only at
    decision bars (:func:`envs.accounting.is_decision_bar`): :meth:`step` reads the action and runs every bar
    up to the next decision bar (funding, marks, stops, take-profits and liquidations every bar; the reward is
    the sum of the per-bar rewards; the full info's costs, fills and closed trades cover all the bars), and a
    random or default episode start is moved to the first decision bar at or after it (spans given by options
    are kept); :meth:`step_decision` runs one bar and reads its decision only at a decision bar.
    ``min_hold_bars`` and ``rebalance_band_frac`` act in the bar step (:func:`envs.accounting.step_bar`).
    ``config.actions.sizing_mode = "vol_target"`` decodes the size component as a fraction of a target
    volatility (:func:`envs.actions.decode_action`); ``config.reward`` has the cost penalty and volatility
    scaling (:mod:`envs.rewards`). With ``reward.cost_penalty_mult > 0`` the info also holds
    ``reward_cost_penalty`` (subtracted like the other penalties). ``config.costs.entry_order = "limit"``
    (:class:`envs.config.CostConfig`) opens positions with limit orders at the open filled only on a
    trade-through; a bar that does not trade through leaves the account flat (a missed entry): the full info
    then also holds ``missed_entry`` (this step) and ``n_missed_entries`` (the episode's count), and the lean
    info ``n_missed_entries`` at the episode's last step (the batched env's ``final_info`` always has it).

    ``info`` (``config.info_level``): ``"lean"`` (default, for training: SB3's ``DummyVecEnv``
    deep-copies every info dict) holds every step ``equity_usdt`` and the reward's components
    ``reward_base`` (the selected reward before penalties), ``reward_turnover_penalty`` and
    ``reward_drawdown_penalty``, each already multiplied by ``reward.scale``, so that
    ``reward = reward_base - reward_turnover_penalty - reward_drawdown_penalty`` (see
    :mod:`envs.rewards`) and, at the last step of an episode, the cumulative totals of
    :func:`episode_summary`; ``"full"`` adds every step the account (cash, margin, position), this
    bar's costs, fills and closed trades, the cumulative totals, the bar time, return and drawdown
    (see :meth:`full_info`, which a lean env can also call after a step).

    Parameters
    ----------
    data : EnvData
        At least 2 bars.
    config : EnvConfig
    render_mode : str | None
        None or "ansi".

    Raises
    ------
    TypeError
        If ``data`` is not an :class:`EnvData`.
    ValueError
        If ``data`` has fewer than 2 bars or ``render_mode`` is unsupported.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 4}  # type: ignore[misc]  # gymnasium annotates it per instance; it is a class constant

    def __init__(
        self, data: EnvData, config: EnvConfig | None = None, render_mode: str | None = None
    ) -> None:
        super().__init__()
        if not isinstance(data, EnvData):
            raise TypeError(f"data must be an EnvData, got {type(data).__name__}")
        if len(data) < 2:
            raise ValueError(f"data needs at least 2 bars, got {len(data)}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        self.data = data
        self.config = config if config is not None else EnvConfig()
        self.render_mode = render_mode
        n_market = data.market_obs.shape[1]
        self._n_market = n_market
        self.observation_space = spaces.Box(-np.inf, np.inf, (n_market + len(ACCOUNT_FEATURES),), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (5,), np.float32)
        self._bars, self._times, self._mobs = kernel_arrays(data, self.config)
        self._p = env_params(self.config)
        self._full = self.config.info_level == "full"
        self._cost_info = self.config.reward.cost_penalty_mult > 0.0
        self._resizes = self.config.trading_rules.rebalance_band_frac is not None
        self._limit_entries = self.config.costs.entry_order == "limit"
        self._fs = np.zeros(K.N_ENV_FLOAT, dtype=np.float64)
        self._is = np.zeros(K.N_INT, dtype=np.int64)
        self._ev = np.zeros((K.MAX_EVENTS, K.N_EV), dtype=np.float64)
        self._evi = np.zeros((K.MAX_EVENTS, K.N_EVI), dtype=np.int64)
        self._out = np.zeros(K.N_OUT, dtype=np.float64)
        self._dec = np.zeros(6, dtype=np.float64)  # decision fields + new_stop_price (NaN = none)
        self._obs_buf = np.zeros(self.observation_space.shape, dtype=np.float32)
        K.reset_env(self._fs, self._is, 0, 0, self._p)
        self._done = True  # reset() required before step()

    # -- properties ------------------------------------------------------------------------------

    @property
    def equity_usdt(self) -> float:
        """Equity marked at the close of the current bar (USDT)."""
        return float(self._fs[K.E_EQUITY])

    @property
    def current_index(self) -> int:
        """Index into the data of the bar whose close the agent is deciding at."""
        return int(self._fs[K.E_T])

    @property
    def account_state(self) -> AccountState:
        """The current account state (a frozen snapshot built from the kernel's arrays)."""
        return state_from_arrays(self._fs, self._is)

    @property
    def episode_span(self) -> tuple[int, int]:
        """(start index, end index) of the current episode; it runs ``end - start`` steps."""
        return int(self._fs[K.E_START]), int(self._fs[K.E_END])

    @property
    def ex_ante_vol_annual(self) -> float:
        """Ex-ante annualised volatility at the close of the current bar (the value vol-target sizing and the
        reward's volatility scaling read; NaN when neither is configured or before ``vol_min_bars`` returns)."""
        return float(self._bars[self.current_index, K.B_VOL])

    def is_decision_bar(self) -> bool:
        """True when the agent's decision at the close of the current bar is read."""
        return bool(self._bars[self.current_index, K.B_DECISION] != 0.0)

    def position_view(self) -> PositionView:
        """The open position as seen by a policy."""
        return self.account_state.position_view()

    # -- gymnasium API ---------------------------------------------------------------------------

    def _span(self, options: dict[str, Any] | None) -> tuple[int, int]:
        last = len(self.data) - 1
        length = self.config.episode_len_bars
        if options:
            unknown = set(options) - {"start_index", "end_index"}
            if unknown:
                raise ValueError(f"unknown reset options {sorted(unknown)}; allowed: start_index, end_index")
        if options and ("start_index" in options or "end_index" in options):
            start = int(options.get("start_index", 0))
            if options.get("end_index") is not None:
                end = int(options["end_index"])
            else:
                end = last if length is None else min(start + length, last)
            if not 0 <= start < end <= last:
                raise ValueError(
                    f"evaluation span needs 0 <= start_index < end_index <= {last}, got ({start}, {end})"
                )
            return start, end
        if length is None:
            start = int(self.np_random.integers(0, last)) if self.config.random_start else 0
            return self._align(start, last), last
        if length >= last:
            return self._align(0, last), last
        start = int(self.np_random.integers(0, last - length + 1)) if self.config.random_start else 0
        start = self._align(start, last)
        return start, min(start + length, last)

    def _align(self, start: int, last: int) -> int:
        if self.config.trading_rules.decision_interval_bars == 1:
            return start
        return int(align_starts(np.array([start]), self._bars, last)[0])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode.

        Parameters
        ----------
        seed : int | None
            Seeds ``self.np_random`` (random start); same seed -> same episode.
        options : dict | None
            ``{"start_index": s, "end_index": e}`` runs the deterministic span: the first observation
            is bar s, the last bar e, exactly ``e - s`` bars (``0 <= s < e <= T - 1``; as many steps when
            every bar is a decision bar). Without ``end_index`` the span is ``episode_len_bars`` long (or to
            the end of the data).

        Returns
        -------
        (observation, info) with info ``{"equity_usdt", "bar_open_time_ns"}``.

        Raises
        ------
        ValueError
            On unknown option keys or an invalid span.
        """
        super().reset(seed=seed)
        start, end = self._span(options)
        K.reset_env(self._fs, self._is, start, end, self._p)
        K.write_observation(self._fs, self._is, self._bars, self._mobs, self._p, self._obs_buf)
        self._done = False
        return self._obs_buf.copy(), {"equity_usdt": float(self._fs[K.E_EQUITY]),
                                      "bar_open_time_ns": int(self._times[start])}  # fmt: skip

    def step(self, action):
        """Decode ``action`` (shape (5,), in [-1, 1]) and apply it to the next bar (with a decision interval
        k > 1: to every bar up to the next decision bar, the reward summed over them; class docstring).

        Returns
        -------
        (observation, reward, terminated, truncated, info); see the class docstring for ``info``.

        Raises
        ------
        market.decision.NonFiniteDecisionError
            If the action holds a NaN or infinite component (no order is placed, the state is unchanged).
        ValueError
            If the action does not have 5 elements.
        RuntimeError
            If called before :meth:`reset` or after the episode ended.
        """
        # Fast path: a C-contiguous float32/float64 vector of 5 goes to the kernel as is (the two
        # compiled signatures); anything else is converted to float64 first.
        if (
            action.__class__ is not np.ndarray
            or action.shape != _SHAPE_5
            or action.dtype.char not in "fd"
            or not action.flags.c_contiguous
        ):
            action = np.ascontiguousarray(np.asarray(action, dtype=np.float64).reshape(-1))
            if action.shape != _SHAPE_5:
                raise ValueError(f"action must have shape (5,), got {action.shape}")
        if self._done:
            raise RuntimeError("step called before reset() or after the episode ended; call reset()")
        out = self._out
        code, terminated, truncated = _env_step(
            _MODE_ACTION, action, self._fs, self._is, self._bars, self._times, self._mobs, self._p,
            self._obs_buf, self._ev, self._evi, out,
        )  # fmt: skip
        if code:
            self._raise(code, action)
        if terminated or truncated:
            self._done = True
        if self._full:
            return self._obs_buf.copy(), float(out[_O_REWARD]), terminated, truncated, self.full_info()
        e, r, base, turnover_pen, dd_pen = out[_O_EQUITY : _O_DD_PEN + 1].tolist()  # adjacent in the kernel
        info = {"equity_usdt": e, "reward_base": base, "reward_turnover_penalty": turnover_pen,
                "reward_drawdown_penalty": dd_pen}  # fmt: skip
        if self._cost_info:
            info["reward_cost_penalty"] = float(out[K.O_COST_PEN])
        if self._done:
            info.update(episode_summary(self._fs, self._is))
            if self._limit_entries:
                info["n_missed_entries"] = int(self._is[K.I_MISSED])
        return self._obs_buf.copy(), r, terminated, truncated, info

    def step_decision(self, decision: Decision | None):
        """Apply a decision taken at the close of bar t to bar t+1, then move to t+1.

        Same semantics as :func:`envs.accounting.step_bar`, ``decision.new_stop_price`` included
        (on a hold it moves the stop if, tick-rounded conservatively, it tightens it).

        Returns
        -------
        (observation, reward, terminated, truncated, info); see the class docstring for ``info``.

        Raises
        ------
        RuntimeError
            If called before :meth:`reset` or after the episode ended.
        market.decision.NonFiniteDecisionError
            If a decision that opens a position has a non-finite or out-of-range field.
        """
        if decision is None:
            return self._step(K.MODE_HOLD, self._dec)
        if decision.direction != 0 and (self._resizes or decision.direction != int(self._is[K.I_SIDE])):
            validate_opening(decision)
        dec = self._dec
        dec[0] = decision.direction
        dec[1] = decision.leverage
        dec[2] = decision.size_frac
        dec[3] = decision.stop_atr
        dec[4] = decision.take_profit_atr
        dec[5] = np.nan if decision.new_stop_price is None else decision.new_stop_price
        return self._step(K.MODE_DECISION, dec)

    def _step(self, mode: int, action: np.ndarray):
        if self._done:
            raise RuntimeError("step called before reset() or after the episode ended; call reset()")
        fs, out = self._fs, self._out
        code, terminated, truncated = K.env_step(
            mode, action, fs, self._is, self._bars, self._times, self._mobs, self._p, self._obs_buf,
            self._ev, self._evi, out,
        )  # fmt: skip
        if code != K.OK:
            self._raise(code, action)
        self._done = terminated or truncated
        if self._full:
            info = self.full_info()
        else:  # the same lean info as step()
            e, _, base, turnover_pen, dd_pen = out[K.O_EQUITY : K.O_DD_PEN + 1].tolist()
            info = {"equity_usdt": e, "reward_base": base, "reward_turnover_penalty": turnover_pen,
                    "reward_drawdown_penalty": dd_pen}  # fmt: skip
            if self._cost_info:
                info["reward_cost_penalty"] = float(out[K.O_COST_PEN])
            if self._done:
                info.update(episode_summary(fs, self._is))
                if self._limit_entries:
                    info["n_missed_entries"] = int(self._is[K.I_MISSED])
        return self._obs_buf.copy(), float(out[K.O_REWARD]), terminated, truncated, info

    def _raise(self, code: int, action: np.ndarray) -> None:
        if code == K.ERR_ACTION:
            decode_action(action, self.config.actions)  # raises NonFiniteDecisionError naming the component
            raise NonFiniteDecisionError(f"action {action!r} is not finite")
        self._done = True
        raise_kernel_error(code, self._out, self.config.costs, f"TradingEnv.step at index {self.current_index}")

    def full_info(self) -> dict[str, Any]:
        """Everything about the last step: the ``"full"`` info (also callable on a lean env).

        Keys: ``equity_usdt cash_usdt margin_usdt position_side position_qty_base
        position_entry_price position_notional_usdt`` (at the close), this bar's ``fees_usdt
        slippage_usdt funding_usdt liquidation_fee_usdt fills closed_trades liquidated
        skipped_min_notional``, the cumulative totals of :func:`episode_summary`,
        ``bar_open_time_ns bar_return drawdown_frac`` and the reward components. Valid right after a
        step (the bar-level fields describe the last bar stepped). A :meth:`step` over several bars (decision
        interval) gives the costs, fills and closed trades of all its bars (each fill at its own bar's time),
        the return over the step as ``bar_return`` and the last bar's time and account.
        """
        fs, is_, out = self._fs, self._is, self._out
        t = int(fs[K.E_T])
        time_ns = int(self._times[t])
        fills, trades = events_from_arrays(self._ev, self._evi, int(out[K.O_N_EVENTS]), time_ns)
        qty = float(fs[K.F_QTY])
        info: dict[str, Any] = {
            "equity_usdt": float(out[K.O_EQUITY]),
            "cash_usdt": float(fs[K.F_CASH]),
            "margin_usdt": float(fs[K.F_MARGIN]),
            "position_side": int(is_[K.I_SIDE]),
            "position_qty_base": qty,
            "position_entry_price": float(fs[K.F_ENTRY]),
            "position_notional_usdt": qty * float(self._bars[t, K.B_CLOSE]),
            "fees_usdt": float(out[K.O_FEES]),
            "slippage_usdt": float(out[K.O_SLIP]),
            "funding_usdt": float(out[K.O_FUNDING]),
            "liquidation_fee_usdt": float(out[K.O_LIQ_FEE]),
        }
        info.update(episode_summary(fs, is_))
        info.update({
            "fills": fills,
            "closed_trades": trades,
            "liquidated": bool(out[K.O_LIQUIDATED]),
            "skipped_min_notional": bool(out[K.O_SKIPPED]),
            "bar_open_time_ns": time_ns,
            "bar_return": float(out[K.O_R]),
            "drawdown_frac": float(fs[K.E_DRAWDOWN]),
            "reward_base": float(out[K.O_BASE]),
            "reward_turnover_penalty": float(out[K.O_TURNOVER_PEN]),
            "reward_drawdown_penalty": float(out[K.O_DD_PEN]),
        })  # fmt: skip
        if self._cost_info:
            info["reward_cost_penalty"] = float(out[K.O_COST_PEN])
        if self._limit_entries:
            info["missed_entry"] = bool(out[K.O_MISSED])
            info["n_missed_entries"] = int(is_[K.I_MISSED])
        return info

    def render(self) -> str | None:  # type: ignore[override]  # gymnasium's RenderFrame is an unbound TypeVar; ansi renders a str
        """In "ansi" mode, one line: bar time, equity, position."""
        if self.render_mode != "ansi":
            return None
        s = self.account_state
        when = pd.Timestamp(int(self._times[self.current_index]), tz="UTC")
        return (f"{when} equity={self.equity_usdt:.2f} side={s.side:+d} qty={s.qty_base:.6g} "
                f"entry={s.entry_price:.2f} fees={s.fees_paid_usdt:.2f} funding={s.funding_paid_usdt:.2f}")  # fmt: skip
