"""Compiled core (numba) of the one execution/cost model, the rewards and the env step.

Everything that moves money lives here, once: :func:`envs.accounting.step_bar` (backtests, the
serving paper broker), :class:`envs.trading_env.TradingEnv` and :class:`envs.vector_env.BatchedTradingEnv`
all run :func:`bar_step`. The Python layers only convert between frozen dataclasses / configs and the
flat arrays below, validate inputs and raise readable errors.

State layout (all arrays owned by the caller, updated in place)
-----------------------------------------------------------------
``fs`` float64, at least :data:`N_ACCOUNT_FLOAT` entries (``F_*`` indices): cash, position quantity,
entry price, isolated margin (at the integer exchange leverage), requested leverage, stop / take-profit / liquidation price (NaN = none), entry fee
and funding of the open trade, then the cumulative fees, funding, slippage, liquidation fees and
turnover (USDT). An env appends its own fields (``E_*``: equity, peak, drawdown, bar index, span,
reward estimates) after them, so one row holds an env's whole float state.

``is_`` int64 (``I_*``): side (-1/0/+1), entry open time in ns (:data:`NO_TIME` = none), bars in
trade, number of fills, trades, skipped entries (no margin budget, min quantity or min notional),
funding fallbacks and missed limit entries (``I_MISSED``: the bar did not trade through the limit; not a field of
:class:`envs.accounting.AccountState`, which ``step_bar`` converts, so the env counts them).

``p`` float64 parameters (``P_*``): costs and the instrument's rules (tick, step, min / max quantity,
min notional, max leverage), reward, action ranges, episode rules, then the maintenance-bracket table (``p[P_N_BRACKETS]`` rows of cap, mmr, cum from ``P_BRACKETS``).

Formulas and their sources are those of :mod:`envs.accounting` (Binance liquidation price, funding,
fees), :mod:`envs.sizing` (the one sizing rule of an entry: quantity, margin, exchange leverage,
stop and take-profit, shared with the live intents), :mod:`envs.rewards` (Moody & Saffell 2001) and :mod:`envs.actions`; the arithmetic is written
in the same order, so the results equal the pure-Python reference implementation bit for bit (tested
against it in ``tests/envs``).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

# The layouts (indices, codes, numba options) and the rewards / observation live in their own modules. Every
# name is re-exported here: callers read the kernel as one module (``from envs import kernel as K``).
# isort: off
from envs.kernel_layout import (
    F_CASH, F_QTY, F_ENTRY, F_MARGIN, F_LEV, F_STOP, F_TP, F_LIQ, F_ENTRY_FEE, F_TRADE_FUNDING, F_FEES,
    F_FUNDING, F_SLIP, F_LIQ_FEES, F_TURNOVER, E_EQUITY, E_PEAK, E_DRAWDOWN, E_T, E_START, E_END,
    N_ENV_FLOAT, I_SIDE, I_ENTRY_TIME, I_BARS, I_FILLS, I_TRADES, I_SKIPPED, I_FALLBACK, I_MISSED, N_INT, NO_TIME,
    P_FEE_RATE, P_SLIP_BPS, P_SLIP_ATR, P_COST_MULT, P_FUND_FALLBACK, P_LOT, P_TICK, P_MIN_NOTIONAL,
    P_LOT_POW10, P_TICK_POW10, P_TURNOVER_PEN, P_DD_PEN, P_SCALE, P_DEAD_ZONE, P_MAX_LEV, P_MAX_SIZE,
    P_STOP_LO, P_STOP_HI, P_TP_LO, P_TP_HI, P_INITIAL_EQUITY, P_MIN_EQUITY_FRAC, P_MAX_DD, P_N_BRACKETS,
    P_MAKER_FEE_RATE, P_TP_LIMIT, P_MIN_QTY, P_MAX_QTY, P_MAX_EXCH_LEV, P_MIN_HOLD, P_REBALANCE, P_BAND,
    P_SIZING_MODE, P_TARGET_VOL, P_COST_PEN, P_RW_VOL_TARGET, P_ENTRY_LIMIT, P_ENTRY_OFFSET, P_BRACKETS, O_FEES,
    O_SLIP, O_FUNDING, O_LIQ_FEE, O_LIQUIDATED, O_SKIPPED, O_MISSED, O_N_EVENTS, O_ERR_VALUE, O_R, O_EQUITY, O_REWARD, O_BASE,
    O_TURNOVER_PEN, O_DD_PEN, O_COST_PEN, EV_REASON, EV_SIDE, EV_QTY, EV_PRICE, EV_FEE, EV_SLIP, EV_ENTRY,
    EV_PNL, EVI_ENTRY_TIME, EVI_BARS, EVI_SIDE, EVI_TIME, R_ENTRY, R_EXIT_SIGNAL, R_STOP, R_TAKE_PROFIT,
    R_LIQUIDATION, R_REBALANCE, B_OPEN, B_HIGH, B_LOW, B_CLOSE, B_ATR, B_FUNDING_RATE, B_IS_FUNDING, B_VOL,
    B_DECISION, OK, ERR_BRACKET, ERR_ACTION, ERR_RETURN, MODE_ACTION, MODE_DECISION, MODE_HOLD,
    _NUMBA_OPTS, _INLINE_OPTS,
)
from envs.kernel_layout import (  # re-exported
    N_ACCOUNT_FLOAT as N_ACCOUNT_FLOAT, E_RW_A as E_RW_A, E_RW_B as E_RW_B, E_RW_N as E_RW_N,
    P_RKIND as P_RKIND, P_ETA as P_ETA, P_WARMUP as P_WARMUP, P_FLOOR as P_FLOOR, P_CLIP as P_CLIP,
    P_MAX_LEV_OBS as P_MAX_LEV_OBS, SIZING_MODES as SIZING_MODES, REWARD_KINDS as REWARD_KINDS,
    N_OUT as N_OUT, N_EV as N_EV, N_EVI as N_EVI, MAX_EVENTS as MAX_EVENTS, N_BAR as N_BAR,
    FINAL_STATS as FINAL_STATS,
)
from envs.kernel_reward import _clip as _clip, _log_return as _log_return, _unit_clip as _unit_clip
from envs.kernel_reward import reward_step, write_observation
# isort: on
from envs.sizing import (
    SIZE_BAD_INPUT,
    SIZE_OK,
    entry_size,
    round_decimals,
    round_price,
    size_position,
    vol_target_decision,
)

# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

#: In :func:`batch_step`, the data rows of env ``k + PREFETCH_AHEAD`` are prefetched while env k steps.
PREFETCH_AHEAD = 8


@intrinsic
def _prefetch(typingctx, address):  # pragma: no cover - compiled
    """Hint the CPU to fetch the cache line at ``address`` (an integer) for reading (``llvm.prefetch``).

    A hint only: no result, no fault, no effect on any value. The N envs of a batch read N rows
    scattered over the data, one stream per env, too many for the hardware prefetchers to follow.
    """

    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        ptr = builder.inttoptr(args[0], i8p)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read (0), high temporal locality (3), data cache (1)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(address), codegen



@njit(**_INLINE_OPTS)
def adverse_fill(ref_price, trade_side, slip, tick, pow10):  # pragma: no cover - compiled
    """Market fill of ``trade_side`` (+1 buy / -1 sell) at ``ref_price`` with adverse slippage,
    rounded to the tick adversely (buy up, sell down)."""
    return round_price(ref_price * (1.0 + trade_side * slip), tick, trade_side, pow10)


@njit(**_INLINE_OPTS)
def liq_price(side, qty, entry, wallet, mmr, cum):  # pragma: no cover - compiled
    """Binance isolated one-way liquidation price ``(WB + cum - s Q EP) / (Q MMR - s Q)``."""
    return (wallet + cum - side * qty * entry) / (qty * mmr - side * qty)


@njit(**_INLINE_OPTS)
def _bracket_row(notional, p):  # pragma: no cover - compiled
    """Index of the first bracket whose cap >= notional, or -1 above the largest cap."""
    nb = int(p[P_N_BRACKETS])
    for k in range(nb):
        if notional <= p[P_BRACKETS + 3 * k]:
            return k
    return -1


@njit(**_INLINE_OPTS)
def position_liq_price(side, qty, entry, wallet, row, p):  # pragma: no cover - compiled
    """Liquidation price with the bracket of the notional *at the liquidation price*: computed with
    bracket ``row`` (the entry notional's), then, if ``qty * LP`` falls in another bracket, recomputed
    with that one (Binance, "How to Calculate Liquidation Price": "if your position calculated at the
    liquidation price and at the opening price are of different levels, substitute the maintenance
    margin rate and amount of the level at the liquidation price")."""
    lp = liq_price(side, qty, entry, wallet, p[P_BRACKETS + 3 * row + 1], p[P_BRACKETS + 3 * row + 2])
    if lp > 0.0:
        row_lp = _bracket_row(qty * lp, p)
        if row_lp >= 0 and row_lp != row:
            lp = liq_price(side, qty, entry, wallet, p[P_BRACKETS + 3 * row_lp + 1], p[P_BRACKETS + 3 * row_lp + 2])
    return lp


@njit(**_INLINE_OPTS)
def _event(ev, evi, out, reason, fill_side, qty, price, fee, slip, entry, pnl, entry_time, bars, trade_side):  # pragma: no cover
    k = int(out[O_N_EVENTS])
    if k < ev.shape[0]:
        ev[k, EV_REASON] = reason
        ev[k, EV_SIDE] = fill_side
        ev[k, EV_QTY] = qty
        ev[k, EV_PRICE] = price
        ev[k, EV_FEE] = fee
        ev[k, EV_SLIP] = slip
        ev[k, EV_ENTRY] = entry
        ev[k, EV_PNL] = pnl
        evi[k, EVI_ENTRY_TIME] = entry_time
        evi[k, EVI_BARS] = bars
        evi[k, EVI_SIDE] = trade_side
    out[O_N_EVENTS] = k + 1


@njit(**_INLINE_OPTS)
def _flatten(fs, is_):  # pragma: no cover - compiled
    is_[I_SIDE] = 0
    fs[F_QTY] = 0.0
    fs[F_ENTRY] = 0.0
    fs[F_MARGIN] = 0.0
    fs[F_LEV] = 1.0
    fs[F_STOP] = np.nan
    fs[F_TP] = np.nan
    fs[F_LIQ] = np.nan
    is_[I_ENTRY_TIME] = NO_TIME
    is_[I_BARS] = 0
    fs[F_ENTRY_FEE] = 0.0
    fs[F_TRADE_FUNDING] = 0.0


@njit(**_INLINE_OPTS)
def _close(fs, is_, price, ref_price, reason, bars_held, fee_rate, ev, evi, out):  # pragma: no cover
    """Close the whole position with a taker order at ``price``."""
    side = is_[I_SIDE]
    qty = fs[F_QTY]
    notional = qty * price
    fee = notional * fee_rate
    slip_usdt = qty * abs(price - ref_price)
    price_pnl = side * qty * (price - fs[F_ENTRY])
    fs[F_CASH] += fs[F_MARGIN] + price_pnl - fee
    fs[F_FEES] += fee
    fs[F_SLIP] += slip_usdt
    fs[F_TURNOVER] += notional
    is_[I_FILLS] += 1
    out[O_FEES] += fee
    out[O_SLIP] += slip_usdt
    pnl = price_pnl - fs[F_ENTRY_FEE] - fee - fs[F_TRADE_FUNDING]
    _event(ev, evi, out, reason, -side, qty, price, fee, slip_usdt, fs[F_ENTRY], pnl,
           is_[I_ENTRY_TIME], bars_held, side)  # fmt: skip
    _flatten(fs, is_)


@njit(**_INLINE_OPTS)
def _liquidate(fs, is_, price, bars_held, ev, evi, out):  # pragma: no cover - compiled
    """Liquidation at ``price``: the isolated margin is lost; what is left of it above zero is the
    clearance (liquidation) fee; cash is unchanged."""
    side = is_[I_SIDE]
    qty = fs[F_QTY]
    clearance = max(0.0, fs[F_MARGIN] + side * qty * (price - fs[F_ENTRY]))
    fs[F_LIQ_FEES] += clearance
    fs[F_TURNOVER] += qty * price
    is_[I_FILLS] += 1
    out[O_LIQ_FEE] += clearance
    out[O_LIQUIDATED] = 1.0
    pnl = -fs[F_MARGIN] - fs[F_ENTRY_FEE] - fs[F_TRADE_FUNDING]
    _event(ev, evi, out, R_LIQUIDATION, -side, qty, price, 0.0, 0.0, fs[F_ENTRY], pnl,
           is_[I_ENTRY_TIME], bars_held, side)  # fmt: skip
    _flatten(fs, is_)


@njit(**_INLINE_OPTS)
def _open(fs, is_, direction, lev, size_frac, stop_atr, tp_atr, o, h, lo, time_ns, atr, slip, fee_rate, p,
          ev, evi, out):  # pragma: no cover - compiled  # fmt: skip
    """Open ``direction`` at the next open, sized by the one sizing rule (:func:`envs.sizing.size_position`:
    quantity from the requested leverage, margin at the integer exchange leverage ``ceil(lev)``, stop /
    take-profit to the nearest tick); the liquidation price uses that margin. ``fs[F_LEV]`` keeps the requested
    leverage (what the policy chose and observes).

    A market entry (default) fills at the open ``o`` with adverse slippage, taker fee. A limit entry
    (``p[P_ENTRY_LIMIT]``, :class:`envs.config.CostConfig` ``entry_order = "limit"``) rests at
    ``o * (1 - direction * p[P_ENTRY_OFFSET])`` rounded to the tick away from the market (buy down, sell up), is
    sized at that price with the maker fee rate, and fills at it, maker fee, no slippage, only if the bar trades
    through it (long: ``lo < limit``; short: ``h > limit``); otherwise no position and a missed entry
    (``is_[I_MISSED]``, ``out[O_MISSED]``). An entry the sizing rule skips (no budget, minimums) is a skip, not
    a miss (no order would be placed)."""
    tick = p[P_TICK]
    tick_pow = p[P_TICK_POW10]
    cash = fs[F_CASH]  # flat here, so equity == cash
    limit = p[P_ENTRY_LIMIT] > 0.0
    if limit:
        fill = round_price(o * (1.0 - direction * p[P_ENTRY_OFFSET]), tick, -direction, tick_pow)
        fee_rate = p[P_MAKER_FEE_RATE]
    else:
        fill = adverse_fill(o, direction, slip, tick, tick_pow)
    code, qty, notional, margin, _lev_x, stop, tp = size_position(
        cash, size_frac, lev, fill, fee_rate, atr, stop_atr, tp_atr, direction, tick, p[P_LOT], p[P_MIN_QTY],
        p[P_MAX_QTY], p[P_MIN_NOTIONAL], p[P_MAX_EXCH_LEV], tick_pow, p[P_LOT_POW10])  # fmt: skip
    if code == SIZE_BAD_INPUT:  # never a trade on a non-finite or out-of-range number
        out[O_ERR_VALUE] = 0.0
        return ERR_ACTION
    if code != SIZE_OK:  # no margin budget, below the min quantity or the min notional
        is_[I_SKIPPED] += 1
        out[O_SKIPPED] = 1.0
        return OK
    if limit and not (lo < fill if direction > 0 else h > fill):  # the bar did not trade through the limit
        is_[I_MISSED] += 1
        out[O_MISSED] = 1.0
        return OK
    row = _bracket_row(notional, p)
    if row < 0:
        out[O_ERR_VALUE] = notional
        return ERR_BRACKET
    fee = notional * fee_rate
    slip_usdt = 0.0 if limit else qty * abs(fill - o)
    fs[F_CASH] -= margin + fee
    is_[I_SIDE] = direction
    fs[F_QTY] = qty
    fs[F_ENTRY] = fill
    fs[F_MARGIN] = margin
    fs[F_LEV] = lev
    fs[F_STOP] = stop
    fs[F_TP] = tp
    fs[F_LIQ] = position_liq_price(direction, qty, fill, margin, row, p)
    is_[I_ENTRY_TIME] = time_ns
    is_[I_BARS] = 0
    fs[F_ENTRY_FEE] = fee
    fs[F_TRADE_FUNDING] = 0.0
    fs[F_FEES] += fee
    fs[F_SLIP] += slip_usdt
    fs[F_TURNOVER] += notional
    is_[I_FILLS] += 1
    is_[I_TRADES] += 1
    out[O_FEES] += fee
    out[O_SLIP] += slip_usdt
    _event(ev, evi, out, R_ENTRY, direction, qty, fill, fee, slip_usdt, 0.0, 0.0, time_ns, 0, direction)
    return OK


@njit(**_INLINE_OPTS)
def _intrabar_exit(fs, is_, o, h, lo, slip, fee_rate, p, ev, evi, out):  # pragma: no cover - compiled
    s = is_[I_SIDE]
    stop = fs[F_STOP]
    liq = fs[F_LIQ]
    tp = fs[F_TP]
    has_stop = not math.isnan(stop)
    has_liq = not math.isnan(liq)
    has_tp = not math.isnan(tp)
    bars_held = is_[I_BARS] + 1
    tick = p[P_TICK]
    tick_pow = p[P_TICK_POW10]
    extreme_adv = lo if s > 0 else h
    extreme_fav = h if s > 0 else lo
    if has_tp and s * (o - tp) >= 0:  # the open gapped through the take-profit: it fills first, at the open
        _take_profit(fs, is_, o, o, slip, fee_rate, p, bars_held, ev, evi, out)
        return
    liq_first = has_liq and ((not has_stop) or s * (liq - stop) >= 0)
    adv_level = liq if liq_first else stop
    has_adv = has_liq if liq_first else has_stop
    if has_adv and s * (adv_level - extreme_adv) >= 0:
        if has_liq and s * (liq - o) >= 0:  # gap through the liquidation price
            _liquidate(fs, is_, o, bars_held, ev, evi, out)
            return
        if liq_first:  # liquidation price reached intrabar before the stop
            _liquidate(fs, is_, liq, bars_held, ev, evi, out)
            return
        ref = o if s * (stop - o) >= 0 else stop  # gap through the stop fills at the open
        price = adverse_fill(ref, -s, slip, tick, tick_pow)
        if has_liq and s * (liq - price) >= 0:  # stop fill would lie past LP: liquidated first
            _liquidate(fs, is_, liq, bars_held, ev, evi, out)
            return
        _close(fs, is_, price, ref, R_STOP, bars_held, fee_rate, ev, evi, out)
        return
    if has_tp and s * (extreme_fav - tp) >= 0:
        _take_profit(fs, is_, o, tp, slip, fee_rate, p, bars_held, ev, evi, out)


@njit(**_INLINE_OPTS)
def _take_profit(fs, is_, o, ref, slip, fee_rate, p, bars_held, ev, evi, out):  # pragma: no cover - compiled
    """Close at the take-profit: ``ref`` is the level, or the open when the bar gapped through it.
    A take-profit-market order fills as taker with adverse slippage; a resting limit order
    (``p[P_TP_LIMIT]``) fills at ``ref`` without slippage and pays the maker fee."""
    if p[P_TP_LIMIT] > 0.0:
        _close(fs, is_, ref, ref, R_TAKE_PROFIT, bars_held, p[P_MAKER_FEE_RATE], ev, evi, out)
    else:
        price = adverse_fill(ref, -is_[I_SIDE], slip, p[P_TICK], p[P_TICK_POW10])
        _close(fs, is_, price, ref, R_TAKE_PROFIT, bars_held, fee_rate, ev, evi, out)


@njit(**_NUMBA_OPTS)  # not inlined: a rare call, and inlining its code slowed every step (icache)
def _resize(fs, is_, size_frac, lev, o, slip, fee_rate, p, ev, evi, out):  # pragma: no cover - compiled
    """Rebalance the open position towards the aim of a decision in its direction (``TradingRulesConfig``).

    The aim is the quantity of the one sizing rule (:func:`envs.sizing.entry_size`) for the account's equity
    marked at the open ``o`` (cash + margin + unrealised PnL), the decision's ``size_frac`` and ``lev``, priced at
    ``o``. No trade when the aim is not a tradable order (no budget, below the min quantity or notional) or
    ``|aim - qty| < band * qty``. Else, at the open with adverse slippage, taker fee:

    * add ``min(aim - qty, the most the free cash buys)`` (that most by the same rule: equity = cash, size 1, the
      position's leverage), skipped below the min quantity or notional; margin ``notional / ceil(leverage)``
      from cash; the entry price becomes the quantity-weighted mean; the fee joins the trade's entry fee;
    * or reduce by ``qty - aim`` (skipped below the min quantity): the reduced part is a closed trade (reason
      ``rebalance``) with its share of the margin, entry fee and funding.

    Stop and take-profit stay; the liquidation price is recomputed. Returns OK or ERR_BRACKET."""
    s = is_[I_SIDE]
    qty = fs[F_QTY]
    step = p[P_LOT]
    step_pow = p[P_LOT_POW10]
    equity = fs[F_CASH] + fs[F_MARGIN] + s * qty * (o - fs[F_ENTRY])
    code, aim, _n, _m, _lx = entry_size(equity, size_frac, lev, o, fee_rate, step, p[P_MIN_QTY], p[P_MAX_QTY],
                                        p[P_MIN_NOTIONAL], p[P_MAX_EXCH_LEV], step_pow)  # fmt: skip
    if code != SIZE_OK:
        return OK
    dq = round_decimals(aim - qty, step_pow)
    if dq == 0.0 or abs(dq) < p[P_BAND] * qty:
        return OK
    tick = p[P_TICK]
    tick_pow = p[P_TICK_POW10]
    if dq > 0.0:
        fill = adverse_fill(o, s, slip, tick, tick_pow)
        code, q_max, _n, _m, lev_x = entry_size(fs[F_CASH], 1.0, fs[F_LEV], fill, fee_rate, step, p[P_MIN_QTY],
                                                p[P_MAX_QTY], p[P_MIN_NOTIONAL], p[P_MAX_EXCH_LEV], step_pow)  # fmt: skip
        if code != SIZE_OK:
            return OK
        q = min(dq, q_max)
        notional = q * fill
        if q < p[P_MIN_QTY] - 1e-9 * step or notional < p[P_MIN_NOTIONAL]:
            return OK
        new_qty = round_decimals(qty + q, step_pow)
        new_entry = (qty * fs[F_ENTRY] + q * fill) / new_qty
        row = _bracket_row(new_qty * new_entry, p)
        if row < 0:
            out[O_ERR_VALUE] = new_qty * new_entry
            return ERR_BRACKET
        fee = notional * fee_rate
        slip_usdt = q * abs(fill - o)
        margin = notional / lev_x
        fs[F_CASH] -= margin + fee
        fs[F_QTY] = new_qty
        fs[F_ENTRY] = new_entry
        fs[F_MARGIN] += margin
        fs[F_ENTRY_FEE] += fee
        _event(ev, evi, out, R_REBALANCE, s, q, fill, fee, slip_usdt, new_entry, 0.0, is_[I_ENTRY_TIME],
               is_[I_BARS], s)  # fmt: skip
    else:
        q = -dq
        if q < p[P_MIN_QTY] - 1e-9 * step:
            return OK
        fill = adverse_fill(o, -s, slip, tick, tick_pow)
        notional = q * fill
        fee = notional * fee_rate
        slip_usdt = q * abs(fill - o)
        frac = q / qty
        m_rel = fs[F_MARGIN] * frac
        entry_fee = fs[F_ENTRY_FEE] * frac
        funding = fs[F_TRADE_FUNDING] * frac
        price_pnl = s * q * (fill - fs[F_ENTRY])
        fs[F_CASH] += m_rel + price_pnl - fee
        fs[F_MARGIN] -= m_rel
        fs[F_ENTRY_FEE] -= entry_fee
        fs[F_TRADE_FUNDING] -= funding
        fs[F_QTY] = round_decimals(qty - q, step_pow)
        row = _bracket_row(fs[F_QTY] * fs[F_ENTRY], p)
        if row < 0:  # pragma: no cover - a smaller notional than before
            out[O_ERR_VALUE] = fs[F_QTY] * fs[F_ENTRY]
            return ERR_BRACKET
        _event(ev, evi, out, R_REBALANCE, -s, q, fill, fee, slip_usdt, fs[F_ENTRY],
               price_pnl - entry_fee - fee - funding, is_[I_ENTRY_TIME], is_[I_BARS], s)  # fmt: skip
    fs[F_FEES] += fee
    fs[F_SLIP] += slip_usdt
    fs[F_TURNOVER] += notional
    is_[I_FILLS] += 1
    out[O_FEES] += fee
    out[O_SLIP] += slip_usdt
    fs[F_LIQ] = position_liq_price(s, fs[F_QTY], fs[F_ENTRY], fs[F_MARGIN], row, p)
    return OK


# ---------------------------------------------------------------------------------------------
# The bar step
# ---------------------------------------------------------------------------------------------


@njit(**_INLINE_OPTS)
def move_stop(fs, is_, new_stop, p):  # pragma: no cover - compiled
    """Trailing: move the stop of the open position to ``new_stop`` if that tightens it.

    ``new_stop`` (USDT; NaN = no request) is rounded to the tick conservatively, i.e. away from the
    market on the position's adverse side (long: down, short: up), and applied only if the rounded
    level tightens the stop (long: higher, short: lower; any level when no stop is set).
    Non-finite or non-positive requests are ignored. Returns True if the stop moved.
    """
    s = is_[I_SIDE]
    if s == 0 or not (math.isfinite(new_stop) and new_stop > 0.0):
        return False
    level = round_price(new_stop, p[P_TICK], -s, p[P_TICK_POW10])
    cur = fs[F_STOP]
    if math.isnan(cur) or s * (level - cur) > 0:
        fs[F_STOP] = level
        return True
    return False


@njit(**_INLINE_OPTS)
def bar_step(fs, is_, has_decision, direction, lev, size_frac, stop_atr, tp_atr, new_stop,
             time_ns, o, h, lo, c, funding_rate, is_funding, atr, p, ev, evi, out):  # pragma: no cover  # fmt: skip
    """Apply the decision taken at the close of bar t to bar t+1, in place.

    Same contract and order of events as :func:`envs.accounting.step_bar` (funding at the open,
    liquidation at the open, trailing-stop move of a held position, fills at the open,
    stop/liquidation before take-profit intrabar, mark at the close). ``new_stop`` is the
    decision's ``new_stop_price`` (NaN = none), honoured only on a hold (``has_decision`` and
    ``direction`` equal to the non-zero side still open after the liquidation check) through
    :func:`move_stop`; an open already through the moved stop fills at the open (gap rule of
    the intrabar exit). Inputs are assumed validated (finite OHLC, ATR > 0 when a fill can happen,
    decision fields in range). ``out[:O_N_EVENTS + 1]`` is reset here.

    Returns
    -------
    int
        :data:`OK`, or :data:`ERR_BRACKET` (the state may then be partly updated: callers work on a
        copy or stop).
    """
    for k in range(O_N_EVENTS + 1):
        out[k] = 0.0
    return bar_apply(fs, is_, has_decision, direction, lev, size_frac, stop_atr, tp_atr, new_stop, time_ns, o, h,
                     lo, c, funding_rate, is_funding, atr, p, ev, evi, out)  # fmt: skip


@njit(**_INLINE_OPTS)
def bar_apply(fs, is_, has_decision, direction, lev, size_frac, stop_atr, tp_atr, new_stop,
              time_ns, o, h, lo, c, funding_rate, is_funding, atr, p, ev, evi, out):  # pragma: no cover  # fmt: skip
    """:func:`bar_step` without resetting ``out``: this bar's costs are added to ``out`` and its events appended
    (an env step over several bars sums them). Each event's ``evi[:, EVI_TIME]`` is set to ``time_ns``.

    The trading rules of ``p`` act here: a decision that would close or flip a position held for fewer than
    ``p[P_MIN_HOLD]`` bars is read as no decision (a hold's stop move still applies), and with
    ``p[P_REBALANCE]`` a decision in the held direction resizes the position (:func:`_resize`) unless the
    position is that young. With ``p[P_ENTRY_LIMIT]`` an opening (from flat or after a flip's market close) is a
    limit order filled only on a trade-through (:func:`_open`), and the intrabar exits of its fill bar see the
    path after the fill (2d).
    """
    n_events0 = int(out[O_N_EVENTS])
    side0 = is_[I_SIDE]
    locked = side0 != 0 and is_[I_BARS] < p[P_MIN_HOLD]
    if has_decision and locked and direction != side0:
        has_decision = False
    changes_side = has_decision and direction != side0
    opening = changes_side and direction != 0
    if changes_side or side0 != 0:
        slip = (p[P_SLIP_BPS] / 1e4 + p[P_SLIP_ATR] * atr / o) * p[P_COST_MULT]
    else:
        slip = 0.0
    fee_rate = p[P_FEE_RATE]
    o_x = o  # the path of the bar the intrabar exits see (2d changes it after a limit entry's fill)
    h_x = h
    lo_x = lo
    # 1. Funding on the position held into the settlement.
    if is_funding and is_[I_SIDE] != 0:
        rate = funding_rate
        if not math.isfinite(rate):
            rate = p[P_FUND_FALLBACK]
            is_[I_FALLBACK] += 1
        payment = is_[I_SIDE] * fs[F_QTY] * o * rate
        fs[F_MARGIN] -= payment
        fs[F_FUNDING] += payment
        fs[F_TRADE_FUNDING] += payment
        out[O_FUNDING] += payment
        row = _bracket_row(fs[F_QTY] * fs[F_ENTRY], p)
        if row < 0:
            out[O_ERR_VALUE] = fs[F_QTY] * fs[F_ENTRY]
            return ERR_BRACKET
        fs[F_LIQ] = position_liq_price(is_[I_SIDE], fs[F_QTY], fs[F_ENTRY], fs[F_MARGIN], row, p)
    # 2. Fills at the open; an open at or beyond the liquidation price liquidates first.
    s = is_[I_SIDE]
    if s != 0 and not math.isnan(fs[F_LIQ]) and s * (fs[F_LIQ] - o) >= 0:
        _liquidate(fs, is_, o, is_[I_BARS], ev, evi, out)
    # 2b. Trailing stop of a held position (after funding and the liquidation check at the open).
    if has_decision and not changes_side and is_[I_SIDE] != 0 and not math.isnan(new_stop):
        move_stop(fs, is_, new_stop, p)
    if changes_side:
        if is_[I_SIDE] != 0:
            price = adverse_fill(o, -is_[I_SIDE], slip, p[P_TICK], p[P_TICK_POW10])
            _close(fs, is_, price, o, R_EXIT_SIGNAL, is_[I_BARS], fee_rate, ev, evi, out)
        if opening:
            code = _open(fs, is_, direction, lev, size_frac, stop_atr, tp_atr, o, h, lo, time_ns, atr, slip,
                         fee_rate, p, ev, evi, out)  # fmt: skip
            if code != OK:
                return code
            if p[P_ENTRY_LIMIT] > 0.0 and is_[I_SIDE] != 0:
                # 2d. A limit entry filled during the bar, not at its open: of the bar's path after the fill only
                # the adverse extreme (the low of a long, the high of a short: the trade-through came before it)
                # and the close are known. So its stop / liquidation are checked against that extreme, its
                # take-profit against the close only (a high before the fill must not take profit), and the
                # gap-at-the-open rules see the fill price as the open (the position did not exist at the open).
                o_x = fs[F_ENTRY]
                if is_[I_SIDE] > 0:
                    h_x = c
                else:
                    lo_x = c
    elif has_decision and p[P_REBALANCE] > 0.0 and not locked and direction != 0 and is_[I_SIDE] == direction:
        # 2c. Rebalance a position held in the decided direction (after the stop move).
        code = _resize(fs, is_, size_frac, lev, o, slip, fee_rate, p, ev, evi, out)
        if code != OK:
            return code
    # 3. Intrabar exits of the position held after the open (after a limit entry's fill: 2d).
    if is_[I_SIDE] != 0:
        _intrabar_exit(fs, is_, o_x, h_x, lo_x, slip, fee_rate, p, ev, evi, out)
    # 4. Mark to market at the close.
    if is_[I_SIDE] != 0:
        is_[I_BARS] += 1
    for k in range(n_events0, min(int(out[O_N_EVENTS]), ev.shape[0])):
        evi[k, EVI_TIME] = time_ns
    out[O_EQUITY] = fs[F_CASH] + fs[F_MARGIN] + is_[I_SIDE] * fs[F_QTY] * (c - fs[F_ENTRY])
    return OK


# ---------------------------------------------------------------------------------------------
# The env step
# ---------------------------------------------------------------------------------------------


@njit(**_NUMBA_OPTS)
def reset_env(fs, is_, start, end, p):  # pragma: no cover - compiled
    """Flat account at the initial equity, episode span ``[start, end]``, fresh reward estimates."""
    fs[F_CASH] = p[P_INITIAL_EQUITY]
    for k in range(F_QTY, N_ENV_FLOAT):
        fs[k] = 0.0
    fs[F_LEV] = 1.0
    fs[F_STOP] = np.nan
    fs[F_TP] = np.nan
    fs[F_LIQ] = np.nan
    for k in range(N_INT):
        is_[k] = 0
    is_[I_ENTRY_TIME] = NO_TIME
    fs[E_EQUITY] = fs[F_CASH]
    fs[E_PEAK] = fs[F_CASH]
    fs[E_T] = start
    fs[E_START] = start
    fs[E_END] = end


@njit(**_INLINE_OPTS)
def env_step(mode, action, fs, is_, bars, times, market_obs, p, obs, ev, evi, out):  # pragma: no cover  # fmt: skip
    """One env step: decode the action (or take the decision), run :func:`bar_step` on bar t+1,
    compute the reward, move to t+1 and write its observation into ``obs``.

    In :data:`MODE_DECISION` ``action`` holds (direction, leverage, size_frac, stop_atr,
    take_profit_atr) and optionally a 6th value, the requested stop price of a hold (NaN = none);
    in :data:`MODE_ACTION` no stop move is possible (the 5-d action has no such component).

    Decision interval (``bars[:, B_DECISION]``): in :data:`MODE_ACTION` the action is read at bar t and the
    step runs bar after bar (holds) until the close of the next decision bar, the end of the episode or a
    termination; each bar funds, marks, fills stops / take-profits / liquidations and updates the reward
    estimates, and the step's reward (and each reward component) is the sum over its bars, its costs and
    events those of all its bars, ``out[O_R]`` the step's return. In :data:`MODE_DECISION` one bar is run and
    the decision is read only when bar t is a decision bar (else a hold). With every bar a decision bar (the
    default) both run one bar, as before.

    Vol-target sizing (``p[P_SIZING_MODE] == 1``, MODE_ACTION only): the size component u = (a2 + 1) / 2 and
    the ex-ante volatility ``bars[t, B_VOL]`` give the leverage and size fraction
    (:func:`envs.sizing.vol_target_decision`); the leverage component is not read.

    Reward (per bar, :mod:`envs.rewards`): the base form consumes ``k r`` with ``k = p[P_RW_VOL_TARGET] /
    bars[t', B_VOL]`` (the bar's decision-time volatility; k = 1 when off or no estimate), minus the turnover,
    drawdown and cost penalties, the cost penalty ``p[P_COST_PEN] * k * (fees + slippage of the bar) /
    equity at the previous close``; everything times ``p[P_SCALE]``.

    Returns
    -------
    (code, terminated, truncated) : tuple[int, bool, bool]
        The reward and its components are in ``out[O_R:O_COST_PEN + 1]``.
    """
    has_decision = mode != MODE_HOLD
    direction = 0
    lev = 1.0
    size = 0.0
    stop_atr = 1.0
    tp_atr = 1.0
    new_stop = np.nan
    t = int(fs[E_T])
    if mode == MODE_ACTION:
        a0 = np.float64(action[0])
        a1 = np.float64(action[1])
        a2 = np.float64(action[2])
        a3 = np.float64(action[3])
        a4 = np.float64(action[4])
        if not (math.isfinite(a0) and math.isfinite(a1) and math.isfinite(a2) and math.isfinite(a3)
                and math.isfinite(a4)):  # fmt: skip
            out[O_ERR_VALUE] = 0.0
            return ERR_ACTION, False, False
        a0 = _unit_clip(a0)
        a1 = _unit_clip(a1)
        a2 = _unit_clip(a2)
        a3 = _unit_clip(a3)
        a4 = _unit_clip(a4)
        dz = p[P_DEAD_ZONE]
        direction = 1 if a0 > dz else (-1 if a0 < -dz else 0)
        if p[P_SIZING_MODE] > 0.0:
            lev, size = vol_target_decision((a2 + 1.0) * 0.5, p[P_TARGET_VOL], bars[t, B_VOL], p[P_MAX_LEV])
        else:
            lev = 1.0 + (a1 + 1.0) * 0.5 * (p[P_MAX_LEV] - 1.0)
            size = 0.0 + (a2 + 1.0) * 0.5 * (p[P_MAX_SIZE] - 0.0)
        stop_atr = p[P_STOP_LO] + (a3 + 1.0) * 0.5 * (p[P_STOP_HI] - p[P_STOP_LO])
        tp_atr = p[P_TP_LO] + (a4 + 1.0) * 0.5 * (p[P_TP_HI] - p[P_TP_LO])
    elif mode == MODE_DECISION:
        direction = int(action[0])
        lev = float(action[1])
        size = float(action[2])
        stop_atr = float(action[3])
        tp_atr = float(action[4])
        if action.shape[0] > 5:
            new_stop = float(action[5])
        if bars[t, B_DECISION] == 0.0:  # not a decision bar: the decision is not read
            has_decision = False
    equity_start = fs[E_EQUITY]
    first = True
    terminated = False
    truncated = False
    base_sum = 0.0
    turnover_sum = 0.0
    dd_sum = 0.0
    cost_sum = 0.0
    reward_sum = 0.0
    sc = p[P_SCALE]
    while True:
        i = t + 1
        turnover_prev = fs[F_TURNOVER]
        costs_prev = fs[F_FEES] + fs[F_SLIP]
        if first:  # bar_step's reset; a later bar of the step adds its costs and events to the step's
            for k in range(O_N_EVENTS + 1):
                out[k] = 0.0
        code = bar_apply(fs, is_, has_decision, direction, lev, size, stop_atr, tp_atr, new_stop, times[i],
                         bars[i, B_OPEN], bars[i, B_HIGH], bars[i, B_LOW], bars[i, B_CLOSE],
                         bars[i, B_FUNDING_RATE], bars[i, B_IS_FUNDING] != 0.0, bars[t, B_ATR], p, ev, evi, out)  # fmt: skip
        has_decision = False  # bars between two decisions hold
        if code != OK:
            return code, False, False
        equity_prev = fs[E_EQUITY]
        equity = out[O_EQUITY]
        r = equity / equity_prev - 1.0 if equity_prev > 0 else 0.0
        if not math.isfinite(r):
            out[O_ERR_VALUE] = r
            return ERR_RETURN, False, False
        k_vol = 1.0
        r_in = r
        if p[P_RW_VOL_TARGET] > 0.0:
            vol = bars[t, B_VOL]
            if math.isfinite(vol) and vol > 0.0:
                k_vol = p[P_RW_VOL_TARGET] / vol
            r_in = k_vol * r
        base = reward_step(fs, r_in, p)
        peak = max(fs[E_PEAK], equity)
        drawdown = max(0.0, 1.0 - equity / peak) if peak > 0 else 0.0
        denom = equity_prev if equity_prev > 0 else 1.0
        turnover = p[P_TURNOVER_PEN] * (fs[F_TURNOVER] - turnover_prev) / denom
        dd_pen = p[P_DD_PEN] * max(0.0, drawdown - fs[E_DRAWDOWN])
        base_s = sc * base
        turnover_s = sc * turnover
        dd_s = sc * dd_pen
        reward = base_s - turnover_s - dd_s
        cost_s = 0.0
        if p[P_COST_PEN] > 0.0:
            cost_s = sc * (p[P_COST_PEN] * k_vol * (fs[F_FEES] + fs[F_SLIP] - costs_prev) / denom)
            reward = reward - cost_s
        if first:
            base_sum = base_s
            turnover_sum = turnover_s
            dd_sum = dd_s
            cost_sum = cost_s
            reward_sum = reward
        else:
            base_sum += base_s
            turnover_sum += turnover_s
            dd_sum += dd_s
            cost_sum += cost_s
            reward_sum += reward
        fs[E_T] = i
        fs[E_EQUITY] = equity
        fs[E_PEAK] = peak
        fs[E_DRAWDOWN] = drawdown
        terminated = equity <= 0.0 or equity < p[P_MIN_EQUITY_FRAC] * p[P_INITIAL_EQUITY] or drawdown > p[P_MAX_DD]
        truncated = (not terminated) and i >= fs[E_END]
        t = i
        if first:
            out[O_R] = r
        else:
            out[O_R] = equity / equity_start - 1.0 if equity_start > 0 else 0.0
        first = False
        if terminated or truncated or mode != MODE_ACTION or bars[i, B_DECISION] != 0.0:
            break
    out[O_BASE] = base_sum
    out[O_TURNOVER_PEN] = turnover_sum
    out[O_DD_PEN] = dd_sum
    out[O_COST_PEN] = cost_sum
    out[O_REWARD] = reward_sum
    write_observation(fs, is_, bars, market_obs, p, obs)
    return OK, terminated, truncated


@njit(**_NUMBA_OPTS)
def batch_step(actions, fs, is_, bars, times, market_obs, p, obs, rewards, terminated, truncated,
               final_obs, final_stats, equity, starts, cursor, ev, evi, out):  # pragma: no cover  # fmt: skip
    """Step N envs (rows of ``fs``, ``is_``, ``obs``) with ``actions`` (N, 5) by :func:`env_step`.

    ``equity[k]`` receives each env's equity at the close. An env whose episode ends is reset at
    once (same-step autoreset): its last observation goes to ``final_obs[k]``, its episode totals to
    ``final_stats[k]`` (:data:`FINAL_STATS` order), and ``obs[k]`` becomes the first observation of
    the next episode, which starts at ``starts[cursor[0]]`` (drawn by the caller's seeded generator;
    ``cursor[0]`` advances) and ends ``cursor[1]`` bars later (0: at the end of the data), capped at
    the last index ``cursor[2]``.

    Returns
    -------
    (code, value) : tuple[int, int]
        :data:`OK` and the number of envs whose episode ended, or the error code and the index of
        the env that failed (its ``out`` row says more).
    """
    n = actions.shape[0]
    n_done = 0
    length = cursor[1]
    last = cursor[2]
    obs_base = market_obs.ctypes.data
    obs_row = market_obs.strides[0]
    bars_base = bars.ctypes.data
    bars_row = bars.strides[0]
    for k in range(n):
        ahead = k + PREFETCH_AHEAD
        if ahead < n:  # the rows env k + PREFETCH_AHEAD will read at its next bar
            t_next = int(fs[ahead, E_T]) + 1
            if t_next < bars.shape[0]:
                for off in range(0, obs_row + 64, 64):
                    _prefetch(obs_base + t_next * obs_row + off)  # type: ignore[call-arg]  # numba passes typingctx
                _prefetch(bars_base + t_next * bars_row)  # type: ignore[call-arg]  # numba passes typingctx
                _prefetch(bars_base + t_next * bars_row + bars_row - 8)
        code, term, trunc = env_step(MODE_ACTION, actions[k], fs[k], is_[k], bars, times, market_obs, p,
                                     obs[k], ev[k], evi[k], out[k])  # fmt: skip
        if code != OK:
            return code, k
        rewards[k] = out[k, O_REWARD]
        terminated[k] = term
        truncated[k] = trunc
        equity[k] = fs[k, E_EQUITY]
        if term or trunc:
            n_done += 1
            for j in range(obs.shape[1]):
                final_obs[k, j] = obs[k, j]
            row = fs[k]
            irow = is_[k]
            final_stats[k, 0] = row[E_EQUITY]
            final_stats[k, 1] = row[F_FEES]
            final_stats[k, 2] = row[F_FUNDING]
            final_stats[k, 3] = row[F_SLIP]
            final_stats[k, 4] = row[F_LIQ_FEES]
            final_stats[k, 5] = row[F_TURNOVER]
            final_stats[k, 6] = irow[I_TRADES]
            final_stats[k, 7] = irow[I_FILLS]
            final_stats[k, 8] = irow[I_SKIPPED]
            final_stats[k, 9] = irow[I_FALLBACK]
            final_stats[k, 10] = irow[I_MISSED]
            start = starts[cursor[0]]
            cursor[0] += 1
            end = last if length <= 0 else min(start + length, last)
            reset_env(fs[k], is_[k], start, end, p)
            write_observation(fs[k], is_[k], bars, market_obs, p, obs[k])
    return OK, n_done
