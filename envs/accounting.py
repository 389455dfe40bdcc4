"""The one execution/cost model: fills, fees, slippage, funding and isolated-margin liquidation.

The training env (``envs.trading_env``), the batched env (``envs.vector_env``), the backtester and
the serving paper broker all run the same compiled bar step (:func:`envs.kernel.bar_step`):
:func:`step_bar` is its thin wrapper over frozen dataclasses (validate, convert to arrays, run,
convert back), and the envs call the kernel directly. So a result in training, in a backtest and on
paper is charged identically. No I/O, no globals, no clock.

Timing (see ``market.decision``): a decision taken at the close of bar t is applied to bar t+1 by
``step_bar(state, decision, bar_{t+1}, atr_t, cfg)`` in four stages:

1. funding settlement at the open of bar t+1 (charged on the position held into it),
2. trailing: on a hold, ``decision.new_stop_price`` moves the stop if it tightens it (tick-rounded
   conservatively); then fills at the open (close the old position and/or open the new one, taker,
   adverse slippage; with ``CostConfig.entry_order = "limit"`` the new one is a limit order at the open, filled
   during the bar only if the bar trades through it, maker fee),
3. intrabar exits from the bar's high/low (stop or liquidation first, then take-profit),
4. mark to market at the close.

Invariants (tested in ``tests/envs``): ``equity = cash + margin + side * qty * (mark - entry)``;
each fee is charged exactly once, at its fill; leverage multiplies PnL exactly once (``qty``
already contains it: ``qty = margin budget * leverage / price``, the one sizing rule of
:mod:`envs.sizing`; the isolated margin is ``notional / ceil(leverage)``, the integer leverage the
exchange applies); the position equals the signed sum of the fills since flat; a non-finite input
never produces a fill.

Sources
-------
* Binance, "How to Calculate Liquidation Price of USDⓈ-M Contracts" (isolated, one-way mode):
  ``LP = (WB + cum - s Q EP) / (Q MMR - s Q)``.
* Binance USDT-M funding: ``payment = position notional x funding rate`` every 8 h; with a
  positive rate longs pay and shorts receive.
* Binance USDT-M fee schedule (VIP0 taker 0.05 %), leverage-bracket endpoint
  (``GET /fapi/v1/leverageBracket``) and exchange filters (lot step, tick, min notional) of the traded symbol,
  from its :class:`market.instruments.InstrumentSpec` (``cfg.instrument``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from envs import kernel as K
from envs.config import CostConfig, TradingRulesConfig
from envs.sizing import SizingRules, decimals_pow10
from market.decision import Decision, NonFiniteDecisionError, PositionView
from market.ohlc import describe_row, ohlc_code

FILL_REASONS: tuple[str, ...] = ("entry", "exit_signal", "stop", "take_profit", "liquidation", "rebalance")
"""Why a fill happened (index = the kernel's reason code). ``rebalance``: a resize of the open position in its
direction (only with ``TradingRulesConfig.rebalance_band_frac`` set): an add, or a reduction, which is also a
closed trade of the reduced quantity."""
_NS_PER_S = 1_000_000_000


def _as_float(value: object) -> float:
    """``float(value)``, or NaN when it is not a real number (so that it fails the finiteness checks)."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------------------------
# Data types
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bar:
    """One closed candle as the execution layer sees it.

    Attributes
    ----------
    open_time_ns : int
        UTC open time, nanoseconds since the epoch.
    open, high, low, close : float
        Prices in USDT (finite, > 0, ``low <= open, close <= high``).
    funding_rate : float
        Funding rate settled at this bar's open time (fraction, e.g. 0.0001), NaN if none known.
    is_funding_time : bool
        True if the open time is a funding settlement time.
    """

    open_time_ns: int
    open: float
    high: float
    low: float
    close: float
    funding_rate: float
    is_funding_time: bool


@dataclass(frozen=True, slots=True)
class AccountState:
    """Account with at most one isolated-margin position (one-way mode), all amounts in USDT.

    ``equity(mark) = cash_usdt + margin_usdt + side * qty_base * (mark - entry_price)``.
    ``leverage`` is the leverage the decision requested (it sized the notional; the policy observes it);
    ``margin_usdt`` is the isolated margin at the integer exchange leverage ``ceil(leverage)``
    (:mod:`envs.sizing`). Per-trade fields (``entry_fee_usdt``, ``trade_funding_usdt``) accumulate over the open trade;
    ``*_paid_usdt``, ``liquidation_fees_usdt``, ``turnover_usdt`` and the ``n_*`` counters are
    cumulative since :meth:`initial`. ``n_trades`` counts positions opened (entries).
    Funding paid is positive, funding received negative.
    """

    cash_usdt: float
    side: int
    qty_base: float
    entry_price: float
    margin_usdt: float
    leverage: float
    stop_price: float | None
    take_profit_price: float | None
    liquidation_price: float | None
    entry_time_ns: int | None
    bars_in_trade: int
    entry_fee_usdt: float
    trade_funding_usdt: float
    fees_paid_usdt: float
    funding_paid_usdt: float
    slippage_paid_usdt: float
    liquidation_fees_usdt: float
    turnover_usdt: float
    n_fills: int
    n_trades: int
    n_skipped_min_notional: int
    n_fallback_funding: int

    @classmethod
    def initial(cls, equity_usdt: float) -> AccountState:
        """Flat account holding ``equity_usdt`` of cash.

        Raises
        ------
        ValueError
            If ``equity_usdt`` is not finite and > 0.
        """
        value = _as_float(equity_usdt)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"initial equity_usdt must be finite and > 0, got {equity_usdt!r}")
        return cls(
            cash_usdt=value, side=0, qty_base=0.0, entry_price=0.0, margin_usdt=0.0,
            leverage=1.0, stop_price=None, take_profit_price=None, liquidation_price=None,
            entry_time_ns=None, bars_in_trade=0, entry_fee_usdt=0.0, trade_funding_usdt=0.0,
            fees_paid_usdt=0.0, funding_paid_usdt=0.0, slippage_paid_usdt=0.0,
            liquidation_fees_usdt=0.0, turnover_usdt=0.0, n_fills=0, n_trades=0,
            n_skipped_min_notional=0, n_fallback_funding=0,
        )  # fmt: skip

    def equity(self, mark_price: float) -> float:
        """Marked-to-market equity in USDT: ``cash + margin + side * qty * (mark - entry)``."""
        return self.cash_usdt + self.margin_usdt + self.side * self.qty_base * (mark_price - self.entry_price)

    def position_view(self) -> PositionView:
        """The open position as a :class:`market.decision.PositionView`."""
        return PositionView(
            side=self.side,
            quantity_base=self.qty_base,
            entry_price=self.entry_price,
            leverage=self.leverage,
            bars_in_trade=self.bars_in_trade,
            stop_price=self.stop_price,
            take_profit_price=self.take_profit_price,
        )


@dataclass(frozen=True, slots=True)
class Fill:
    """One execution. ``side`` +1 buy / -1 sell, ``qty_base`` > 0, ``price`` in USDT.

    ``fee_usdt`` is the fee charged: taker, or maker for a limit take-profit or a limit entry
    (``CostConfig.take_profit_order`` / ``entry_order``); 0 for a liquidation, whose clearance fee is reported in
    :attr:`BarResult.liquidation_fee_usdt`. ``slippage_usdt = qty * |price - reference price|`` is
    informational (already inside ``price``, never charged a second time). ``reason`` is one of
    :data:`FILL_REASONS`.
    """

    open_time_ns: int
    side: int
    qty_base: float
    price: float
    fee_usdt: float
    slippage_usdt: float
    reason: str


@dataclass(frozen=True, slots=True)
class ClosedTrade:
    """A round trip. ``pnl_usdt`` is net: price PnL - entry and exit fees - funding paid during the
    trade; for a liquidation ``-margin - entry fee - funding`` (the isolated margin is lost).
    ``bars_held`` counts the bars the position was open at a close, plus the exit bar for an intrabar exit.
    """

    entry_time_ns: int | None  # None: the kernel recorded no entry time (NO_TIME)
    exit_time_ns: int
    side: int
    qty_base: float
    entry_price: float
    exit_price: float
    pnl_usdt: float
    exit_reason: str
    bars_held: int


@dataclass(frozen=True, slots=True)
class BarResult:
    """Outcome of :func:`step_bar` for one bar; cost fields cover this bar only (USDT)."""

    state: AccountState
    fills: tuple[Fill, ...]
    closed_trades: tuple[ClosedTrade, ...]
    fees_usdt: float
    slippage_usdt: float
    funding_usdt: float
    liquidation_fee_usdt: float
    liquidated: bool
    skipped_min_notional: bool
    equity_usdt: float


# ----------------------------------------------------------------------------------------------
# Small pure helpers
# ----------------------------------------------------------------------------------------------


def is_funding_time(open_time_ns: int, funding_interval_hours: int) -> bool:
    """True if a bar opening at ``open_time_ns`` (UTC ns) opens at a funding settlement time
    (whole hour, ``hour % funding_interval_hours == 0``)."""
    seconds_of_day = (open_time_ns // _NS_PER_S) % 86_400
    return open_time_ns % _NS_PER_S == 0 and seconds_of_day % (3_600 * funding_interval_hours) == 0


@lru_cache(maxsize=64)
def cost_params(cfg: CostConfig) -> np.ndarray:
    """The cost part of the compiled kernel's parameter vector (``envs.kernel.P_*``), cached per config.

    Returns
    -------
    np.ndarray
        float64 ``(P_BRACKETS + 3 * n_brackets,)``; the reward/action/episode slots are 0 (the env
        fills them in its own copy). Treat as read-only.
    """
    brackets = np.asarray(cfg.maintenance_brackets, dtype=np.float64).reshape(-1)
    p = np.zeros(K.P_BRACKETS + len(brackets), dtype=np.float64)
    p[K.P_FEE_RATE] = cfg.taker_fee_bps / 1e4 * cfg.cost_multiplier
    p[K.P_SLIP_BPS] = cfg.slippage_bps
    p[K.P_SLIP_ATR] = cfg.slippage_atr_coef
    p[K.P_COST_MULT] = cfg.cost_multiplier
    p[K.P_FUND_FALLBACK] = cfg.funding_fallback_rate
    rules = SizingRules.from_spec(cfg.instrument)  # what the one sizing rule (envs.sizing) reads
    p[K.P_LOT] = rules.step_size_base
    p[K.P_TICK] = rules.tick_size_usdt
    p[K.P_MIN_NOTIONAL] = rules.min_notional_usdt
    p[K.P_MIN_QTY] = rules.min_qty_base
    p[K.P_MAX_QTY] = rules.max_qty_base
    p[K.P_MAX_EXCH_LEV] = rules.max_leverage
    p[K.P_LOT_POW10] = decimals_pow10(rules.step_size_base)
    p[K.P_TICK_POW10] = decimals_pow10(rules.tick_size_usdt)
    p[K.P_MAKER_FEE_RATE] = cfg.maker_fee_bps / 1e4 * cfg.cost_multiplier
    p[K.P_TP_LIMIT] = 1.0 if cfg.take_profit_order == "limit" else 0.0
    p[K.P_ENTRY_LIMIT] = 1.0 if cfg.entry_order == "limit" else 0.0
    p[K.P_ENTRY_OFFSET] = cfg.entry_limit_offset_bps / 1e4 if cfg.entry_order == "limit" else 0.0
    p[K.P_N_BRACKETS] = len(cfg.maintenance_brackets)
    p[K.P_BRACKETS :] = brackets
    return p


def is_decision_bar(open_time_ns: int | np.ndarray, bar_interval_ns: int, decision_interval_bars: int):
    """True for a bar whose close is a multiple of ``decision_interval_bars`` bars since the Unix epoch: the
    bars at whose close the agent acts (``TradingRulesConfig.decision_interval_bars``; with 1h bars and 4, the
    bars closing at 00:00, 04:00, ... UTC). The same rule as the ``tsmom`` baseline's rebalance bars.

    Parameters
    ----------
    open_time_ns : int | np.ndarray
        UTC open time(s) in ns (an int64 array gives a bool array).
    bar_interval_ns : int
        Bar length in ns, > 0.
    decision_interval_bars : int
        >= 1; 1: every bar.

    Raises
    ------
    ValueError
        A bar interval <= 0 or a decision interval < 1.
    """
    if bar_interval_ns <= 0 or decision_interval_bars < 1:
        raise ValueError(f"need bar_interval_ns > 0 and decision_interval_bars >= 1, got {bar_interval_ns}, "
                         f"{decision_interval_bars}")  # fmt: skip
    return (np.asarray(open_time_ns, dtype=np.int64) + bar_interval_ns) % (bar_interval_ns * decision_interval_bars) == 0


def rules_params(cfg: CostConfig, rules: TradingRulesConfig | None) -> np.ndarray:
    """:func:`cost_params` with the execution rules of ``rules`` (min holding period, rebalance band) in their
    slots; ``rules`` None or the default: :func:`cost_params` itself (today's rules). Treat as read-only."""
    if rules is None or rules == _DEFAULT_RULES:
        return cost_params(cfg)
    return _rules_params(cfg, rules)


_DEFAULT_RULES = TradingRulesConfig()


@lru_cache(maxsize=64)
def _rules_params(cfg: CostConfig, rules: TradingRulesConfig) -> np.ndarray:
    p = cost_params(cfg).copy()
    set_rules(p, rules)
    return p


def set_rules(p: np.ndarray, rules: TradingRulesConfig) -> None:
    """Write the kernel slots of ``rules`` (``P_MIN_HOLD``, ``P_REBALANCE``, ``P_BAND``) into ``p``, in place."""
    p[K.P_MIN_HOLD] = rules.min_hold_bars
    p[K.P_REBALANCE] = 0.0 if rules.rebalance_band_frac is None else 1.0
    p[K.P_BAND] = 0.0 if rules.rebalance_band_frac is None else rules.rebalance_band_frac


def _validate_bar(bar: Bar) -> None:
    """Raise ``ValueError`` naming the bar and its prices unless it keeps the OHLC row rule (:mod:`market.ohlc`)."""
    code = ohlc_code(bar.open, bar.high, bar.low, bar.close)
    if code:
        where = f"open_time_ns={bar.open_time_ns}"
        raise ValueError(f"bar breaks the OHLC rule: {describe_row(code, where, bar.open, bar.high, bar.low, bar.close)}")


def validate_opening(decision: Decision) -> None:
    """Check the fields of a decision that opens a position.

    Raises
    ------
    NonFiniteDecisionError
        If leverage, size_frac, stop_atr or take_profit_atr is non-finite or out of range
        (leverage >= 1, size_frac in [0, 1], distances > 0).
    """
    for name in ("leverage", "size_frac", "stop_atr", "take_profit_atr"):
        value = getattr(decision, name)
        if not math.isfinite(value):
            raise NonFiniteDecisionError(f"decision.{name} must be finite, got {value!r}")
    if decision.leverage < 1.0 or not 0.0 <= decision.size_frac <= 1.0:
        raise NonFiniteDecisionError(
            f"decision out of range: leverage={decision.leverage} (>= 1), size_frac={decision.size_frac} (in [0, 1])"
        )
    if decision.stop_atr <= 0 or decision.take_profit_atr <= 0:
        raise NonFiniteDecisionError(
            f"decision.stop_atr and take_profit_atr must be > 0, got {decision.stop_atr}, {decision.take_profit_atr}"
        )


# ----------------------------------------------------------------------------------------------
# Conversions between AccountState and the kernel's arrays
# ----------------------------------------------------------------------------------------------


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def state_to_arrays(state: AccountState, fs: np.ndarray, is_: np.ndarray) -> None:
    """Write ``state`` into the kernel's float (``F_*``) and int (``I_*``) state arrays, in place."""
    fs[K.F_CASH] = state.cash_usdt
    fs[K.F_QTY] = state.qty_base
    fs[K.F_ENTRY] = state.entry_price
    fs[K.F_MARGIN] = state.margin_usdt
    fs[K.F_LEV] = state.leverage
    fs[K.F_STOP] = _nan_if_none(state.stop_price)
    fs[K.F_TP] = _nan_if_none(state.take_profit_price)
    fs[K.F_LIQ] = _nan_if_none(state.liquidation_price)
    fs[K.F_ENTRY_FEE] = state.entry_fee_usdt
    fs[K.F_TRADE_FUNDING] = state.trade_funding_usdt
    fs[K.F_FEES] = state.fees_paid_usdt
    fs[K.F_FUNDING] = state.funding_paid_usdt
    fs[K.F_SLIP] = state.slippage_paid_usdt
    fs[K.F_LIQ_FEES] = state.liquidation_fees_usdt
    fs[K.F_TURNOVER] = state.turnover_usdt
    is_[K.I_SIDE] = state.side
    is_[K.I_ENTRY_TIME] = K.NO_TIME if state.entry_time_ns is None else state.entry_time_ns
    is_[K.I_BARS] = state.bars_in_trade
    is_[K.I_FILLS] = state.n_fills
    is_[K.I_TRADES] = state.n_trades
    is_[K.I_SKIPPED] = state.n_skipped_min_notional
    is_[K.I_FALLBACK] = state.n_fallback_funding
    is_[K.I_MISSED] = 0  # missed limit entries are counted by the env (not an AccountState field)


def state_from_arrays(fs: np.ndarray, is_: np.ndarray) -> AccountState:
    """The :class:`AccountState` held in the kernel's state arrays (inverse of :func:`state_to_arrays`)."""
    f = fs[: K.N_ACCOUNT_FLOAT].tolist()
    i = is_.tolist()
    entry_time = i[K.I_ENTRY_TIME]
    return AccountState(
        cash_usdt=f[K.F_CASH], side=i[K.I_SIDE], qty_base=f[K.F_QTY], entry_price=f[K.F_ENTRY],
        margin_usdt=f[K.F_MARGIN], leverage=f[K.F_LEV], stop_price=_none_if_nan(f[K.F_STOP]),
        take_profit_price=_none_if_nan(f[K.F_TP]), liquidation_price=_none_if_nan(f[K.F_LIQ]),
        entry_time_ns=None if entry_time == K.NO_TIME else entry_time, bars_in_trade=i[K.I_BARS],
        entry_fee_usdt=f[K.F_ENTRY_FEE], trade_funding_usdt=f[K.F_TRADE_FUNDING],
        fees_paid_usdt=f[K.F_FEES], funding_paid_usdt=f[K.F_FUNDING], slippage_paid_usdt=f[K.F_SLIP],
        liquidation_fees_usdt=f[K.F_LIQ_FEES], turnover_usdt=f[K.F_TURNOVER], n_fills=i[K.I_FILLS],
        n_trades=i[K.I_TRADES], n_skipped_min_notional=i[K.I_SKIPPED], n_fallback_funding=i[K.I_FALLBACK],
    )  # fmt: skip


def events_from_arrays(
    ev: np.ndarray, evi: np.ndarray, n_events: int, time_ns: int
) -> tuple[tuple[Fill, ...], tuple[ClosedTrade, ...]]:
    """Fills and closed trades from the kernel's event buffers.

    Each event carries the open time of its bar (``evi[:, EVI_TIME]``, written by the kernel); ``time_ns`` is
    used only where that is missing (an ``evi`` without the column). An env step over several bars (decision
    interval) holds the events of all its bars, in order. An entry, or a rebalance that adds to the position, is
    a fill only; every other fill also closes a trade (of the reduced quantity for a rebalance)."""
    fills: list[Fill] = []
    trades: list[ClosedTrade] = []
    has_time = evi.shape[-1] > K.EVI_TIME
    for k in range(min(n_events, ev.shape[0])):
        reason_code, side, qty, price, fee, slip, entry, pnl = ev[k].tolist()
        row = evi[k].tolist()
        entry_time, bars_held, trade_side = row[:3]
        t = row[K.EVI_TIME] if has_time else time_ns
        reason = FILL_REASONS[int(reason_code)]
        fills.append(Fill(t, int(side), qty, price, fee, slip, reason))
        if reason != "entry" and not (reason == "rebalance" and int(side) == trade_side):
            entry_ns = None if entry_time == K.NO_TIME else entry_time
            trades.append(ClosedTrade(entry_ns, t, trade_side, qty, entry, price, pnl, reason, bars_held))
    return tuple(fills), tuple(trades)


def raise_kernel_error(code: int, out: np.ndarray, cfg: CostConfig, where: str) -> None:
    """Turn a kernel error code into the exception the pure-Python contract promises."""
    if code == K.ERR_BRACKET:
        raise ValueError(
            f"{where}: notional {out[K.O_ERR_VALUE]:.2f} USDT exceeds the largest maintenance bracket cap "
            f"{cfg.maintenance_brackets[-1][0]:.2f} USDT"
        )
    if code == K.ERR_RETURN:
        raise ValueError(f"{where}: per-bar return must be finite, got {out[K.O_ERR_VALUE]!r}")
    raise RuntimeError(f"{where}: accounting kernel returned error code {code}")


# ----------------------------------------------------------------------------------------------
# The bar step
# ----------------------------------------------------------------------------------------------


def step_bar(
    state: AccountState,
    decision: Decision | None,
    bar: Bar,
    atr_at_decision: float,
    cfg: CostConfig,
    *,
    rules: TradingRulesConfig | None = None,
) -> BarResult:
    """Apply the decision taken at the close of bar t to bar t+1 (``bar``).

    A thin wrapper: validates, converts to arrays and runs the compiled :func:`envs.kernel.bar_step`,
    the same code the env and the batched env run.

    Order of events: (1) funding at the open if ``bar.is_funding_time`` and a position is open
    (``payment = side * qty * open * rate``, positive = paid, taken from the isolated margin; a NaN
    rate is replaced by ``cfg.funding_fallback_rate`` and counted); (2) fills at the open: a
    position whose liquidation price the open has reached is liquidated at the open first (the
    decision is then applied as if from flat, except that a "hold" stays flat); on a hold
    (``decision.direction == state.side != 0``) a ``decision.new_stop_price`` moves the stop to that
    level rounded to the tick conservatively (long: down, short: up) if it tightens the stop (long:
    higher, short: lower), otherwise it is ignored (also on a side change, when flat, or after a
    liquidation at the open); an open already through the moved stop fills it at the open (3.); when
    ``decision.direction != state.side``: close at ``open * (1 - side * slip)``, then open
    ``direction`` at ``open * (1 + direction * slip)`` (tick-rounded adversely), sized by the one
    sizing rule (:mod:`envs.sizing`) at that fill: ``qty = floor(min(size_frac * cash, cash / (1 +
    L * fee)) * L / fill, step)`` with ``L = min(leverage, max_leverage)``, capped at the max market
    quantity, margin ``qty * fill / ceil(L)`` (the integer exchange leverage), stop/take-profit
    ``stop_atr``/``take_profit_atr`` ATRs from the fill rounded to the nearest tick, liquidation price
    ``LP = (WB + cum - s Q EP) / (Q MMR - s Q)`` with WB that margin and the bracket of the notional
    at LP (:func:`envs.kernel.position_liq_price`); with no margin budget, below the min quantity or
    below ``min_notional_usdt`` the entry is skipped and counted;
    (3) intrabar exits: the stop or the liquidation price (whichever lies first in the adverse
    direction) before the take-profit; a gap through a level fills at the open; stop and
    take-profit fills pay adverse slippage; a liquidation loses the whole isolated margin;
    (4) mark to market at the close, ``bars_in_trade += 1`` if a position is open.
    ``slip = (slippage_bps / 1e4 + slippage_atr_coef * atr_at_decision / bar.open) * cost_multiplier``; fees are
    ``notional * taker_fee_bps / 1e4 * cost_multiplier`` per fill.
    With ``cfg.entry_order = "limit"`` the opening in (2) is a limit order at the open (less
    ``cfg.entry_limit_offset_bps``), sized at that price with the maker fee rate, filled at it (maker fee, no
    slippage) only if the bar trades through it (long: ``bar.low < limit``, short: ``bar.high > limit``); else
    no position (a missed entry: neither a fill nor ``skipped_min_notional``; the env counts it). In its fill
    bar (3) checks the stop against the bar's adverse extreme and the take-profit against the close only
    (:class:`envs.config.CostConfig`).

    Parameters
    ----------
    state : AccountState
        Account after the close of bar t.
    decision : Decision | None
        Target position decided at the close of bar t; None keeps everything as is.
    bar : Bar
        Bar t+1.
    atr_at_decision : float
        ATR of bar t in price units (USDT); must be finite and > 0 whenever a fill can happen at
        this bar (a position is open, or the decision changes the side).
    cfg : CostConfig
        Costs and exchange rules.
    rules : TradingRulesConfig | None
        Execution rules of the decision (``min_hold_bars``: a close or flip of a position held for fewer bars
        is a hold; ``rebalance_band_frac``: a decision in the held direction resizes the position to its aim
        outside the band, :func:`envs.kernel._resize`). None (default): no holding period, no resize. The
        decision interval is not applied here: the caller asks for a decision only at decision bars
        (:func:`is_decision_bar`), as the env does.

    Returns
    -------
    BarResult
        New state, fills and closed trades of this bar, this bar's costs, equity at the close.

    Raises
    ------
    ValueError
        If the bar is non-finite/inconsistent, ``atr_at_decision`` is non-finite or <= 0 when a fill
        can happen, a position notional exceeds the largest maintenance bracket, or the decision
        opening a position has a non-finite/out-of-range field
        (:class:`market.decision.NonFiniteDecisionError`). Raised before any change: no partial fill.
    """
    _validate_bar(bar)
    changes_side = decision is not None and decision.direction != state.side
    opening = changes_side and decision.direction != 0  # type: ignore[union-attr]
    if opening:
        validate_opening(decision)  # type: ignore[arg-type]
    atr = _as_float(atr_at_decision)
    if (changes_side or state.side != 0) and not (math.isfinite(atr) and atr > 0):
        raise ValueError(
            f"atr_at_decision must be finite and > 0 for a possible fill at open_time_ns={bar.open_time_ns}, "
            f"got {atr_at_decision!r}"
        )
    fs = np.empty(K.N_ACCOUNT_FLOAT, dtype=np.float64)
    is_ = np.empty(K.N_INT, dtype=np.int64)
    state_to_arrays(state, fs, is_)
    ev = np.zeros((K.MAX_EVENTS, K.N_EV), dtype=np.float64)
    evi = np.zeros((K.MAX_EVENTS, K.N_EVI), dtype=np.int64)
    out = np.zeros(K.N_OUT, dtype=np.float64)
    if decision is None:
        has, direction, lev, size, stop, tp, new_stop = False, 0, 1.0, 0.0, 1.0, 1.0, math.nan
    else:
        has, direction = True, int(decision.direction)
        lev, size = float(decision.leverage), float(decision.size_frac)
        stop, tp = float(decision.stop_atr), float(decision.take_profit_atr)
        new_stop = math.nan if decision.new_stop_price is None else float(decision.new_stop_price)
    code = K.bar_step(
        fs, is_, has, direction, lev, size, stop, tp, new_stop, int(bar.open_time_ns), float(bar.open),
        float(bar.high), float(bar.low), float(bar.close), float(bar.funding_rate),
        bool(bar.is_funding_time), atr if math.isfinite(atr) else 1.0, rules_params(cfg, rules), ev, evi, out,
    )  # fmt: skip
    if code != K.OK:
        raise_kernel_error(code, out, cfg, f"step_bar at open_time_ns={bar.open_time_ns}")
    fills, trades = events_from_arrays(ev, evi, int(out[K.O_N_EVENTS]), bar.open_time_ns)
    new_state = state_from_arrays(fs, is_)
    return BarResult(
        state=new_state,
        fills=fills,
        closed_trades=trades,
        fees_usdt=float(out[K.O_FEES]),
        slippage_usdt=float(out[K.O_SLIP]),
        funding_usdt=float(out[K.O_FUNDING]),
        liquidation_fee_usdt=float(out[K.O_LIQ_FEE]),
        liquidated=bool(out[K.O_LIQUIDATED]),
        skipped_min_notional=bool(out[K.O_SKIPPED]),
        equity_usdt=float(out[K.O_EQUITY]),
    )
