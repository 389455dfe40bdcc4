"""Flat-array layouts of :mod:`envs.kernel`: the indices of the state, parameter, output, event and bar arrays,
the return codes, the decision modes and the numba options of the compiled functions.

Constants only (no compiled code). :mod:`envs.kernel` re-exports every name: ``envs.kernel.F_CASH`` etc. stay the
spelling the callers use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

(F_CASH, F_QTY, F_ENTRY, F_MARGIN, F_LEV, F_STOP, F_TP, F_LIQ, F_ENTRY_FEE, F_TRADE_FUNDING,
 F_FEES, F_FUNDING, F_SLIP, F_LIQ_FEES, F_TURNOVER) = range(15)  # fmt: skip
N_ACCOUNT_FLOAT = 15
# Env fields appended to the account's float state.
(E_EQUITY, E_PEAK, E_DRAWDOWN, E_T, E_START, E_END, E_RW_A, E_RW_B, E_RW_N) = range(15, 24)  # fmt: skip
N_ENV_FLOAT = 24

(I_SIDE, I_ENTRY_TIME, I_BARS, I_FILLS, I_TRADES, I_SKIPPED, I_FALLBACK, I_MISSED) = range(8)  # fmt: skip
N_INT = 8
# I_MISSED: limit entries the bar did not trade through (CostConfig.entry_order "limit"); not an AccountState field.
NO_TIME = np.iinfo(np.int64).min

# Parameters.
(P_FEE_RATE, P_SLIP_BPS, P_SLIP_ATR, P_COST_MULT, P_FUND_FALLBACK, P_LOT, P_TICK, P_MIN_NOTIONAL,
 P_LOT_POW10, P_TICK_POW10,
 P_RKIND, P_ETA, P_WARMUP, P_FLOOR, P_CLIP, P_TURNOVER_PEN, P_DD_PEN, P_SCALE,
 P_DEAD_ZONE, P_MAX_LEV, P_MAX_SIZE, P_STOP_LO, P_STOP_HI, P_TP_LO, P_TP_HI,
 P_INITIAL_EQUITY, P_MIN_EQUITY_FRAC, P_MAX_DD, P_MAX_LEV_OBS, P_N_BRACKETS,
 P_MAKER_FEE_RATE, P_TP_LIMIT, P_MIN_QTY, P_MAX_QTY, P_MAX_EXCH_LEV,
 P_MIN_HOLD, P_REBALANCE, P_BAND, P_SIZING_MODE, P_TARGET_VOL, P_COST_PEN, P_RW_VOL_TARGET,
 P_ENTRY_LIMIT, P_ENTRY_OFFSET) = range(44)  # fmt: skip
# P_MIN_HOLD .. P_BAND: envs.config.TradingRulesConfig (P_REBALANCE 1.0 when rebalance_band_frac is set);
# P_SIZING_MODE 1.0 = "vol_target" (envs.actions.ActionConfig); P_COST_PEN, P_RW_VOL_TARGET (0 = off):
# envs.rewards.RewardConfig. All 0 in cost_params: today's rules. P_ENTRY_LIMIT 1.0 = CostConfig.entry_order
# "limit", P_ENTRY_OFFSET its offset as a fraction of the open (entry_limit_offset_bps / 1e4); 0: market entries.
P_BRACKETS = 44
SIZING_MODES: tuple[str, ...] = ("equity_fraction", "vol_target")
REWARD_KINDS: tuple[str, ...] = ("sortino", "differential_sharpe", "log_return")

# Per-bar outputs ``out`` (float64, N_OUT).
# (O_EQUITY .. O_COST_PEN are adjacent, in this order: the env reads them with one slice.)
# (O_FEES .. O_N_EVENTS are reset together at a step's first bar; O_MISSED: 1.0 when a limit entry was missed.)
(O_FEES, O_SLIP, O_FUNDING, O_LIQ_FEE, O_LIQUIDATED, O_SKIPPED, O_MISSED, O_N_EVENTS, O_ERR_VALUE, O_R,
 O_EQUITY, O_REWARD, O_BASE, O_TURNOVER_PEN, O_DD_PEN, O_COST_PEN) = range(16)  # fmt: skip
N_OUT = 16

# Events of one bar: ``ev`` float64 (MAX_EVENTS, N_EV): reason code (index into
# envs.accounting.FILL_REASONS), fill side, qty, price, fee, slippage, trade entry price, trade net PnL;
# ``evi`` int64 (MAX_EVENTS, N_EVI): trade entry time ns, bars held, trade side, open time ns of the bar of the fill.
# An env step of several bars (decision interval) appends the events of its bars: at most 4 (the first bar's
# close, entry or resize and intrabar exit, then one exit of the position held through the later bars).
(EV_REASON, EV_SIDE, EV_QTY, EV_PRICE, EV_FEE, EV_SLIP, EV_ENTRY, EV_PNL) = range(8)  # fmt: skip
N_EV = 8
(EVI_ENTRY_TIME, EVI_BARS, EVI_SIDE, EVI_TIME) = range(4)  # fmt: skip
N_EVI = 4
MAX_EVENTS = 4
R_ENTRY, R_EXIT_SIGNAL, R_STOP, R_TAKE_PROFIT, R_LIQUIDATION, R_REBALANCE = range(6)

# Bar data columns ``bars`` float64 (T, N_BAR): OHLC, ATR, funding rate and flag, the ex-ante annualised
# volatility at the close (NaN when not needed or not known yet; envs.sizing.ex_ante_vol_annual) and the decision
# bar flag (1.0: the agent acts at this bar's close; envs.accounting.is_decision_bar).
(B_OPEN, B_HIGH, B_LOW, B_CLOSE, B_ATR, B_FUNDING_RATE, B_IS_FUNDING, B_VOL, B_DECISION) = range(9)  # fmt: skip
N_BAR = 9

# Return codes.
OK = 0
ERR_BRACKET = 1  # notional above the largest maintenance bracket (value in out[O_ERR_VALUE])
ERR_ACTION = 2  # non-finite action component (index in out[O_ERR_VALUE])
ERR_RETURN = 3  # non-finite per-bar return (value in out[O_ERR_VALUE])

#: Columns of ``final_stats`` in :func:`batch_step` (episode totals captured before the autoreset).
FINAL_STATS: tuple[str, ...] = (
    "equity_usdt", "fees_paid_usdt", "funding_paid_usdt", "slippage_paid_usdt", "liquidation_fees_usdt",
    "turnover_usdt", "n_trades", "n_fills", "n_skipped_min_notional", "n_fallback_funding", "n_missed_entries",
)  # fmt: skip

# Decision modes of the env step.
MODE_ACTION = 0  # decode the 5-d action
MODE_DECISION = 1  # ``action`` holds (direction, leverage, size_frac, stop_atr, take_profit_atr[, new_stop_price])
MODE_HOLD = 2  # no decision: keep everything as is

# No array is allocated in compiled code, so reference counting (NRT) is off: it would cost an
# atomic incref/decref per array argument of every call.
_NUMBA_OPTS: dict[str, Any] = {"cache": True, "nogil": True, "boundscheck": False, "_nrt": False}
# The per-step functions are inlined into their callers at numba-IR level. A call between compiled
# functions passes every array as an exploded struct (pointer, shape, strides, ...) and checks a
# status code; with ~10 calls per env step that was about half of the batched step's time (measured:
# benchmarks/env_throughput.py). Inlining changes no arithmetic (no fastmath): results are identical
# (tests/envs/test_kernel_equivalence.py, test_vector_env.py). Cost: longer first compilation
# (cached on disk by ``cache=True``).
_INLINE_OPTS: dict[str, Any] = {**_NUMBA_OPTS, "inline": "always"}
