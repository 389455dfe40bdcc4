"""Gymnasium environment for one USDT-M perpetual: the PPO agent's training and evaluation world.

At index t the agent sees ``market_obs[t]`` (features + regime probabilities + signal probabilities,
all computable from candles closed at or before t) and the account state marked at the close of
bar t. Its action, decoded by :func:`envs.actions.decode_action`, is applied to bar t+1 by
:func:`envs.accounting.step_bar` with the ATR of bar t, so a decision at the close of t fills at the
open of t+1. The reward is computed from the net per-bar equity return (after fees, slippage and
funding) by :mod:`envs.rewards`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import pandas as pd
from gymnasium import spaces
from pydantic import Field

from envs.accounting import AccountState, Bar, step_bar
from envs.actions import ActionConfig, decode_action
from envs.config import CostConfig
from envs.rewards import RewardConfig, compose_reward, make_reward
from market.config_base import StrictConfig
from market.decision import Decision, PositionView

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
_PRICE_COLUMNS = ("open", "high", "low", "close")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _row_label(open_time_ns: np.ndarray, i: int) -> str:
    try:
        return f"row {i} ({pd.Timestamp(int(open_time_ns[i]), tz='UTC')})"
    except (IndexError, ValueError, OverflowError):
        return f"row {i}"


def _first_bad(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)[:5]]


@dataclass(frozen=True)
class EnvData:
    """Bar-aligned arrays the env reads (length T along the first axis).

    Attributes
    ----------
    open_time_ns : np.ndarray
        int64 (T,), UTC open times in ns, strictly increasing.
    open, high, low, close : np.ndarray
        float64 (T,), prices in USDT, finite and > 0.
    atr : np.ndarray
        float64 (T,), ATR in price units at each bar (finite, > 0).
    funding_rate : np.ndarray
        float64 (T,), rate settled at each open time, NaN where none.
    is_funding_time : np.ndarray
        bool (T,), open time is a funding settlement time.
    market_obs : np.ndarray
        float32 (T, F): features + regime probabilities + signal probabilities, finite.
    market_obs_names : tuple[str, ...]
        F column names.

    Raises
    ------
    ValueError
        On construction, if shapes disagree or a value is non-finite / out of range; the message
        names the first offending rows (index and open time) and the column.
    """

    open_time_ns: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    atr: np.ndarray
    funding_rate: np.ndarray
    is_funding_time: np.ndarray
    market_obs: np.ndarray
    market_obs_names: tuple[str, ...]

    def __post_init__(self) -> None:
        coerce = {
            "open_time_ns": np.int64, "open": np.float64, "high": np.float64, "low": np.float64,
            "close": np.float64, "atr": np.float64, "funding_rate": np.float64, "is_funding_time": np.bool_,
            "market_obs": np.float32,
        }  # fmt: skip
        for name, dtype in coerce.items():
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))
        object.__setattr__(self, "market_obs_names", tuple(str(n) for n in self.market_obs_names))
        t = self.open_time_ns
        if t.ndim != 1 or len(t) < 1:
            raise ValueError(f"open_time_ns must be a non-empty 1-D array, got shape {t.shape}")
        n = len(t)
        for name in ("open", "high", "low", "close", "atr", "funding_rate", "is_funding_time"):
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({n},) to align with open_time_ns")
        if self.market_obs.ndim != 2 or self.market_obs.shape[0] != n:
            raise ValueError(f"market_obs has shape {self.market_obs.shape}, expected ({n}, F)")
        if len(self.market_obs_names) != self.market_obs.shape[1]:
            raise ValueError(
                f"market_obs_names has {len(self.market_obs_names)} names for {self.market_obs.shape[1]} columns"
            )
        if n > 1 and not (np.diff(t) > 0).all():
            bad = _first_bad(np.diff(t) <= 0)
            raise ValueError(
                f"open_time_ns must be strictly increasing; violated at {[_row_label(t, i + 1) for i in bad]}"
            )
        for name in (*_PRICE_COLUMNS, "atr"):
            arr = getattr(self, name)
            bad_mask = ~(np.isfinite(arr) & (arr > 0))
            if bad_mask.any():
                rows = [_row_label(t, i) for i in _first_bad(bad_mask)]
                raise ValueError(f"column {name!r} must be finite and > 0; bad at {rows}")
        bad_mask = ~(
            (self.low <= np.minimum(self.open, self.close)) & (self.high >= np.maximum(self.open, self.close))
        )
        if bad_mask.any():
            raise ValueError(f"OHLC inconsistent (low/high do not bound open/close) at "
                             f"{[_row_label(t, i) for i in _first_bad(bad_mask)]}")  # fmt: skip
        if np.isinf(self.funding_rate).any():
            raise ValueError(
                f"column 'funding_rate' is infinite at {[_row_label(t, i) for i in _first_bad(np.isinf(self.funding_rate))]}"
            )
        finite_obs = np.isfinite(self.market_obs)
        if not finite_obs.all():
            rows, cols = np.nonzero(~finite_obs)
            where = [
                f"{_row_label(t, int(r))}, column {self.market_obs_names[int(c)]!r}"
                for r, c in zip(rows[:5], cols[:5])
            ]
            raise ValueError(f"market_obs must be finite (as float32); bad at {where}")

    def __len__(self) -> int:
        return len(self.open_time_ns)

    @classmethod
    def from_frames(
        cls,
        candles: pd.DataFrame,
        market_obs: pd.DataFrame,
        atr: np.ndarray | pd.Series,
        *,
        funding_interval_hours: int = 8,
    ) -> EnvData:
        """Build aligned arrays from candles, the market observation frame and an ATR series.

        Parameters
        ----------
        candles : pd.DataFrame
            Index: UTC open times (DatetimeIndex, tz UTC), columns ``open high low close`` (float,
            USDT), optional ``funding_rate`` (NaN where no settlement).
        market_obs : pd.DataFrame
            (T, F) on the same index; cast to float32.
        atr : np.ndarray | pd.Series
            ATR in price units, length T (a Series must have the same index).
        funding_interval_hours : int
            Funding settles at open times with ``hour % funding_interval_hours == 0`` and minute 0.

        Raises
        ------
        TypeError
            If ``candles`` or ``market_obs`` is not a DataFrame.
        ValueError
            If the indexes differ (names the first differing row), a column is missing, or a value is
            non-finite / out of range (names the rows and the column).
        """
        if not isinstance(candles, pd.DataFrame) or not isinstance(market_obs, pd.DataFrame):
            raise TypeError("candles and market_obs must be pandas DataFrames")
        idx = candles.index
        if not isinstance(idx, pd.DatetimeIndex) or idx.tz is None or str(idx.tz) != "UTC":
            raise ValueError(
                f"candles must be indexed by a UTC DatetimeIndex, got {type(idx).__name__} tz={getattr(idx, 'tz', None)}"
            )
        missing = [c for c in _PRICE_COLUMNS if c not in candles.columns]
        if missing:
            raise ValueError(f"candles lack columns {missing}")
        if not market_obs.index.equals(idx):
            if len(market_obs.index) != len(idx):
                raise ValueError(
                    f"market_obs has {len(market_obs)} rows, candles {len(idx)}: indexes must be identical"
                )
            diff = np.flatnonzero(np.asarray(market_obs.index != idx))
            i = int(diff[0]) if len(diff) else 0
            raise ValueError(
                f"market_obs index differs from the candles index at row {i}: {market_obs.index[i]} != {idx[i]}"
            )
        if isinstance(atr, pd.Series):
            if not atr.index.equals(idx):
                raise ValueError("atr Series index differs from the candles index")
            atr_arr = atr.to_numpy(dtype=np.float64)
        else:
            atr_arr = np.asarray(atr, dtype=np.float64)
            if atr_arr.shape != (len(idx),):
                raise ValueError(f"atr has shape {atr_arr.shape}, expected ({len(idx)},)")
        if "funding_rate" in candles.columns:
            funding = candles["funding_rate"].to_numpy(dtype=np.float64)
        else:
            funding = np.full(len(idx), np.nan)
        is_funding = np.asarray(
            (idx.hour % funding_interval_hours == 0) & (idx.minute == 0) & (idx.second == 0) & (idx.nanosecond == 0)
            & (idx.microsecond == 0)
        )  # fmt: skip
        return cls(
            open_time_ns=idx.as_unit("ns").asi8.copy(),
            open=candles["open"].to_numpy(dtype=np.float64),
            high=candles["high"].to_numpy(dtype=np.float64),
            low=candles["low"].to_numpy(dtype=np.float64),
            close=candles["close"].to_numpy(dtype=np.float64),
            atr=atr_arr,
            funding_rate=funding,
            is_funding_time=is_funding,
            market_obs=market_obs.to_numpy(dtype=np.float32),
            market_obs_names=tuple(str(c) for c in market_obs.columns),
        )

    def slice(self, start: int, end: int) -> EnvData:
        """Rows ``[start, end)`` (views of the same arrays).

        Raises
        ------
        ValueError
            Unless ``0 <= start < end <= len(self)``.
        """
        n = len(self)
        if not 0 <= start < end <= n:
            raise ValueError(f"slice [{start}, {end}) is not a non-empty span of {n} rows")
        arrays = {name: getattr(self, name)[start:end] for name in (
            "open_time_ns", "open", "high", "low", "close", "atr", "funding_rate", "is_funding_time", "market_obs")}  # fmt: skip
        return replace(self, **arrays)


# ----------------------------------------------------------------------------------------------
# Config and account features
# ----------------------------------------------------------------------------------------------


class EnvConfig(StrictConfig):
    """Episode layout, termination rules, action decoding, reward and costs."""

    initial_equity_usdt: float = Field(10_000.0, gt=0.0, description="Account equity at reset, USDT.")
    episode_len_bars: int | None = Field(
        720, ge=1, description="Steps per episode; None = run to the end of the data."
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


class TradingEnv(gym.Env):
    """One-symbol USDT-M perpetual trading env with a 5-dimensional continuous action.

    Observation: float32 ``(F + 6,)`` = ``market_obs[t]`` then :data:`ACCOUNT_FEATURES`.
    Action: float32 ``Box(-1, 1, (5,))`` decoded by :func:`envs.actions.decode_action`.
    Episode: from a start index (random when ``random_start``, or ``options["start_index"]``) for
    ``episode_len_bars`` steps or until ``options["end_index"]`` / the last bar; ``truncated`` at the
    end of the span, ``terminated`` when equity falls below ``min_equity_frac`` of the initial equity
    or the drawdown exceeds ``max_drawdown_frac``.

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

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 4}

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
        # Python lists: scalar access in step() without numpy-scalar overhead.
        self._time = data.open_time_ns.tolist()
        self._open = data.open.tolist()
        self._high = data.high.tolist()
        self._low = data.low.tolist()
        self._close = data.close.tolist()
        self._atr = data.atr.tolist()
        self._funding = data.funding_rate.tolist()
        self._is_funding = data.is_funding_time.tolist()
        self._obs_buf = np.zeros(self.observation_space.shape, dtype=np.float32)
        self._reward_fn = make_reward(self.config.reward)
        self._state = AccountState.initial(self.config.initial_equity_usdt)
        self._t = 0
        self._start = 0
        self._end = 0
        self._equity = self.config.initial_equity_usdt
        self._peak = self._equity
        self._drawdown = 0.0
        self._done = True  # reset() required before step()

    # -- properties ------------------------------------------------------------------------------

    @property
    def equity_usdt(self) -> float:
        """Equity marked at the close of the current bar (USDT)."""
        return self._equity

    @property
    def current_index(self) -> int:
        """Index into the data of the bar whose close the agent is deciding at."""
        return self._t

    @property
    def account_state(self) -> AccountState:
        """The current account state (frozen)."""
        return self._state

    @property
    def episode_span(self) -> tuple[int, int]:
        """(start index, end index) of the current episode; it runs ``end - start`` steps."""
        return self._start, self._end

    def position_view(self) -> PositionView:
        """The open position as seen by a policy."""
        return self._state.position_view()

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
            return start, last
        if length >= last:
            return 0, last
        start = int(self.np_random.integers(0, last - length + 1)) if self.config.random_start else 0
        return start, start + length

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode.

        Parameters
        ----------
        seed : int | None
            Seeds ``self.np_random`` (random start); same seed -> same episode.
        options : dict | None
            ``{"start_index": s, "end_index": e}`` runs the deterministic span: the first observation
            is bar s, the last bar e, exactly ``e - s`` steps (``0 <= s < e <= T - 1``). Without
            ``end_index`` the span is ``episode_len_bars`` long (or to the end of the data).

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
        self._start, self._end, self._t = start, end, start
        self._state = AccountState.initial(self.config.initial_equity_usdt)
        self._equity = self._state.cash_usdt
        self._peak = self._equity
        self._drawdown = 0.0
        self._reward_fn.reset()
        self._done = False
        return self._observation(), {"equity_usdt": self._equity, "bar_open_time_ns": self._time[start]}

    def step(self, action):
        """Decode ``action`` (shape (5,), in [-1, 1]) and apply it; see :meth:`step_decision`.

        Raises
        ------
        market.decision.NonFiniteDecisionError
            If the action holds a NaN or infinite component.
        """
        return self.step_decision(decode_action(action, self.config.actions))

    def step_decision(self, decision: Decision | None):
        """Apply a decision taken at the close of bar t to bar t+1, then move to t+1.

        Returns
        -------
        (observation, reward, terminated, truncated, info); see the module docs for ``info`` keys.

        Raises
        ------
        RuntimeError
            If called before :meth:`reset` or after the episode ended.
        """
        if self._done:
            raise RuntimeError("step called before reset() or after the episode ended; call reset()")
        t = self._t
        i = t + 1
        bar = Bar(self._time[i], self._open[i], self._high[i], self._low[i], self._close[i],
                  self._funding[i], self._is_funding[i])  # fmt: skip
        prev_state = self._state
        res = step_bar(prev_state, decision, bar, self._atr[t], self.config.costs)
        state = res.state
        equity_prev = self._equity
        equity = res.equity_usdt
        r = equity / equity_prev - 1.0 if equity_prev > 0 else 0.0
        base = self._reward_fn.step(r)
        peak = max(self._peak, equity)
        drawdown = max(0.0, 1.0 - equity / peak) if peak > 0 else 0.0
        parts = compose_reward(
            base,
            state.turnover_usdt - prev_state.turnover_usdt,
            equity_prev,
            self._drawdown,
            drawdown,
            self.config.reward,
        )
        self._state, self._t, self._equity, self._peak, self._drawdown = state, i, equity, peak, drawdown
        cfg = self.config
        terminated = (
            equity < cfg.min_equity_frac * cfg.initial_equity_usdt or drawdown > cfg.max_drawdown_frac
        )
        truncated = (not terminated) and i >= self._end
        self._done = terminated or truncated
        close = bar.close
        info = {
            "equity_usdt": equity,
            "cash_usdt": state.cash_usdt,
            "margin_usdt": state.margin_usdt,
            "position_side": state.side,
            "position_qty_base": state.qty_base,
            "position_entry_price": state.entry_price,
            "position_notional_usdt": state.qty_base * close,
            "fees_usdt": res.fees_usdt,
            "slippage_usdt": res.slippage_usdt,
            "funding_usdt": res.funding_usdt,
            "liquidation_fee_usdt": res.liquidation_fee_usdt,
            "fees_paid_usdt": state.fees_paid_usdt,
            "funding_paid_usdt": state.funding_paid_usdt,
            "slippage_paid_usdt": state.slippage_paid_usdt,
            "liquidation_fees_usdt": state.liquidation_fees_usdt,
            "turnover_usdt": state.turnover_usdt,
            "n_trades": state.n_trades,
            "n_fills": state.n_fills,
            "n_skipped_min_notional": state.n_skipped_min_notional,
            "n_fallback_funding": state.n_fallback_funding,
            "fills": res.fills,
            "closed_trades": res.closed_trades,
            "liquidated": res.liquidated,
            "skipped_min_notional": res.skipped_min_notional,
            "bar_open_time_ns": bar.open_time_ns,
            "bar_return": r,
            "drawdown_frac": drawdown,
            "reward_base": parts.base,
            "reward_turnover_penalty": parts.turnover_penalty,
            "reward_drawdown_penalty": parts.drawdown_penalty,
        }
        return self._observation(), parts.total, terminated, truncated, info

    def _observation(self) -> np.ndarray:
        t = self._t
        buf = self._obs_buf
        buf[: self._n_market] = self.data.market_obs[t]
        st = self._state
        buf[self._n_market :] = _account_values(
            st.side, st.qty_base, st.entry_price, st.leverage, st.bars_in_trade,
            self._close[t], self._equity, self._peak, self.config.actions.max_leverage,
        )  # fmt: skip
        return buf.copy()

    def render(self) -> str | None:
        """In "ansi" mode, one line: bar time, equity, position."""
        if self.render_mode != "ansi":
            return None
        s = self._state
        when = pd.Timestamp(self._time[self._t], tz="UTC")
        return (f"{when} equity={self._equity:.2f} side={s.side:+d} qty={s.qty_base:.6g} "
                f"entry={s.entry_price:.2f} fees={s.fees_paid_usdt:.2f} funding={s.funding_paid_usdt:.2f}")  # fmt: skip
