"""Backtest any :class:`market.decision.Policy` through the env's execution model.

Every strategy (PPO, V1, buy-and-hold, flat, random) is stepped bar by bar through the same
``TradingEnv`` (hence the same ``envs.accounting`` cost model): decision at the close of bar t,
fill at the open of t+1, stops/targets against the bar's high/low, funding and liquidation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from envs.accounting import ClosedTrade
from envs.trading_env import EnvConfig, EnvData, TradingEnv
from market.decision import DecisionContext, Policy


@dataclass(frozen=True)
class BacktestResult:
    """Outcome of one policy over one span.

    ``equity`` holds the initial equity at the close of the first decision bar, then the equity
    marked at the close of each following bar (length n_steps + 1), indexed by bar open time.
    An open position at the end is marked to market, not closed.
    """

    name: str
    equity: pd.Series
    position_side: np.ndarray  # int8 (n_steps,), side held at the close of each bar
    trades: tuple[ClosedTrade, ...]
    fees_paid_usdt: float
    funding_paid_usdt: float
    slippage_paid_usdt: float
    liquidation_fees_usdt: float
    turnover_usdt: float
    n_skipped_min_notional: int
    terminated: bool
    position_notional_usdt: np.ndarray | None = None  # float64 (n_steps,), |notional| at each bar close, USDT
    n_missed_entries: int = 0  # limit entries the fill bar did not trade through (CostConfig.entry_order "limit")

    @property
    def bar_open_times(self) -> pd.DatetimeIndex:
        """Open times of the backtested bars."""
        return pd.DatetimeIndex(self.equity.index)


def run_backtest(
    policy: Policy,
    data: EnvData,
    candles: pd.DataFrame,
    env_config: EnvConfig,
    *,
    offset: int = 0,
    history_bars: int = 600,
    regime_proba: np.ndarray | None = None,
) -> BacktestResult:
    """Trade ``policy`` over the whole of ``data``.

    ``candles.iloc[offset : offset + len(data)]`` must be the bars of ``data``; earlier rows are
    closed history a policy may read (V1 needs ``history_bars`` of it to decide at the first bar).
    ``regime_proba`` (float (len(data), K), optional): forward-filtered HMM state probabilities at
    each bar, given to the policy as ``DecisionContext.regime_proba`` (V1's regime-conditional
    thresholds).

    The training-time episode rules that end an episode early (equity floor, drawdown limit) are
    switched off here, so a report always covers the whole span; the drawdown shows in the metrics.

    Raises
    ------
    ValueError
        If ``candles`` and ``data`` are not aligned (different length or open times).
    """
    n = len(data.close)
    window = candles.iloc[offset : offset + n]
    if len(window) != n or not np.array_equal(window.index.as_unit("ns").asi8, np.asarray(data.open_time_ns, dtype=np.int64)):
        raise ValueError(f"candles[{offset}:{offset + n}] ({len(window)} rows) and env data ({n} rows) are not aligned")
    if regime_proba is not None and (np.ndim(regime_proba) != 2 or len(regime_proba) != n):
        raise ValueError(f"regime_proba must have shape ({n}, K), got {np.shape(regime_proba)}")
    cfg = env_config.model_copy(
        update={"episode_len_bars": None, "random_start": False, "min_equity_frac": 0.0, "max_drawdown_frac": 1.0,
                "info_level": "full"}
    )
    env = TradingEnv(data, cfg)
    obs, info = env.reset(options={"start_index": 0, "end_index": len(data.close) - 1})
    equity = [info["equity_usdt"]]
    times = [window.index[0]]
    sides: list[int] = []
    notionals: list[float] = []
    trades: list[ClosedTrade] = []
    terminated = truncated = False
    while not (terminated or truncated):
        t = env.current_index
        g = offset + t  # row of bar t in ``candles``
        ctx = DecisionContext(
            bar_open_time=window.index[t],
            candles=candles.iloc[max(0, g - history_bars + 1) : g + 1],
            position=env.position_view(),
            equity_usdt=env.equity_usdt,
            observation=obs,
            regime_proba=None if regime_proba is None else regime_proba[t],
        )
        obs, _, terminated, truncated, info = env.step_decision(policy.decide(ctx))
        equity.append(info["equity_usdt"])
        times.append(window.index[env.current_index])
        sides.append(int(info["position_side"]))
        notionals.append(abs(float(info["position_notional_usdt"])))
        trades.extend(info["closed_trades"])
    return BacktestResult(
        name=policy.name,
        equity=pd.Series(equity, index=pd.DatetimeIndex(times), name=policy.name),
        position_side=np.asarray(sides, dtype=np.int8),
        trades=tuple(trades),
        fees_paid_usdt=float(info["fees_paid_usdt"]),
        funding_paid_usdt=float(info["funding_paid_usdt"]),
        slippage_paid_usdt=float(info["slippage_paid_usdt"]),
        liquidation_fees_usdt=float(info.get("liquidation_fees_usdt", 0.0)),
        turnover_usdt=float(info["turnover_usdt"]),
        n_skipped_min_notional=int(info.get("n_skipped_min_notional", 0)),
        terminated=bool(terminated),
        position_notional_usdt=np.asarray(notionals, dtype=np.float64),
        n_missed_entries=int(info.get("n_missed_entries", 0)),
    )
