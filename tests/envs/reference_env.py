"""The pure-Python TradingEnv as it was before the compiled kernel (frozen reference for equivalence tests).

Identical to the former ``envs.trading_env.TradingEnv`` except that it charges costs through
:mod:`tests.envs.reference_accounting` (the former pure-Python ``envs.accounting``) and always
returns the full info dict. Not used by the product.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import pandas as pd
from gymnasium import spaces

from envs.actions import decode_action
from envs.trading_env import ACCOUNT_FEATURES, EnvConfig, EnvData, _account_values
from market.decision import Decision, PositionView
from tests.envs.reference_accounting import AccountState, Bar, step_bar
from tests.envs.reference_rewards import compose_reward, make_reward


class ReferenceTradingEnv(gym.Env):
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
            equity <= 0.0 or equity < cfg.min_equity_frac * cfg.initial_equity_usdt or drawdown > cfg.max_drawdown_frac
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
