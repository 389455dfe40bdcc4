"""Frozen copy of the former pure-Python ``envs.accounting`` (reference for the equivalence tests).

The product runs the compiled kernel (``envs.kernel``); ``tests/envs/test_kernel_equivalence.py``
proves it gives the same numbers as this implementation, bit for bit, over many random sequences.
Not used by the product. Extended since: the trailing-stop rule of ``Decision.new_stop_price`` (issue 8,
step 2b of :func:`step_bar`) and the one sizing rule of an entry (issue 18, :func:`_open_position`: margin at
the integer exchange leverage, max leverage, min/max market quantity), written independently of the kernel.

Timing (see ``market.decision``): a decision taken at the close of bar t is applied to bar t+1 by
``step_bar(state, decision, bar_{t+1}, atr_t, cfg)`` in four stages:

1. funding settlement at the open of bar t+1 (charged on the position held into it),
2. fills at the open (close the old position and/or open the new one, taker, adverse slippage),
3. intrabar exits from the bar's high/low (stop or liquidation first, then take-profit),
4. mark to market at the close.

Invariants (tested in ``tests/envs``): ``equity = cash + margin + side * qty * (mark - entry)``;
each fee is charged exactly once, at its fill; leverage multiplies PnL exactly once (``qty``
already contains it: ``qty = margin budget * leverage / price``; the margin is ``notional / ceil(leverage)``,
the integer exchange leverage); the position equals the signed sum of the fills since flat; a non-finite
input never produces a fill.

Sources
-------
* Binance, "How to Calculate Liquidation Price of USDⓈ-M Contracts" (isolated, one-way mode):
  ``LP = (WB + cum - s Q EP) / (Q MMR - s Q)``.
* Binance USDT-M funding: ``payment = position notional x funding rate`` every 8 h; with a
  positive rate longs pay and shorts receive.
* Binance USDT-M fee schedule (VIP0 taker 0.05 %), leverage-bracket endpoint
  (``GET /fapi/v1/leverageBracket``), BTCUSDT exchange filters (lot 0.001, tick 0.1, min notional 100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache

from envs.config import CostConfig
from market.decision import Decision, NonFiniteDecisionError, PositionView

FILL_REASONS: tuple[str, ...] = ("entry", "exit_signal", "stop", "take_profit", "liquidation")
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
    Per-trade fields (``entry_fee_usdt``, ``trade_funding_usdt``) accumulate over the open trade;
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

    ``fee_usdt`` is the taker fee charged (0 for a liquidation, whose clearance fee is reported in
    :attr:`BarResult.liquidation_fee_usdt`); ``slippage_usdt = qty * |price - reference price|`` is
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

    entry_time_ns: int
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


def maintenance_bracket(notional_usdt: float, cfg: CostConfig) -> tuple[float, float]:
    """Maintenance margin rate and maintenance amount of a position notional.

    Parameters
    ----------
    notional_usdt : float
        Position notional in USDT (>= 0).
    cfg : CostConfig
        Holds ``maintenance_brackets`` (Binance leverage-bracket table).

    Returns
    -------
    (mmr, cum) : tuple[float, float]
        Rate (fraction) and amount (USDT) of the first bracket whose cap >= ``notional_usdt``.

    Raises
    ------
    ValueError
        If the notional is negative/non-finite or above the largest bracket cap (the exchange
        would reject such a position).
    """
    if not (math.isfinite(notional_usdt) and notional_usdt >= 0):
        raise ValueError(f"notional_usdt must be finite and >= 0, got {notional_usdt!r}")
    for cap, mmr, cum in cfg.maintenance_brackets:
        if notional_usdt <= cap:
            return mmr, cum
    raise ValueError(
        f"notional {notional_usdt:.2f} USDT exceeds the largest maintenance bracket cap "
        f"{cfg.maintenance_brackets[-1][0]:.2f} USDT"
    )


def position_liquidation_price(side: int, qty: float, entry: float, wallet: float, cfg: CostConfig) -> float:
    """LP with the entry notional's bracket, recomputed with the bracket of ``qty * LP`` when that
    differs (Binance's rule for a liquidation price in another bracket)."""
    mmr, cum = maintenance_bracket(qty * entry, cfg)
    lp = liquidation_price(side, qty, entry, wallet, mmr, cum)
    if lp > 0:
        for cap, mmr_lp, cum_lp in cfg.maintenance_brackets:
            if qty * lp <= cap:
                if (mmr_lp, cum_lp) != (mmr, cum):
                    lp = liquidation_price(side, qty, entry, wallet, mmr_lp, cum_lp)
                break
    return lp


def liquidation_price(
    side: int,
    qty_base: float,
    entry_price: float,
    wallet_usdt: float,
    mmr: float,
    maintenance_amount_usdt: float,
) -> float:
    """Liquidation price of an isolated position, one-way mode.

    ``LP = (WB + cum - s Q EP) / (Q MMR - s Q)`` (Binance, "How to Calculate Liquidation Price of
    USDⓈ-M Contracts"); a long liquidates at ``(Q EP - WB - cum) / (Q (1 - MMR))``, a short at
    ``(Q EP + WB + cum) / (Q (1 + MMR))``. A long with a large margin may get LP <= 0 (never reached).

    Parameters
    ----------
    side : int
        +1 long, -1 short.
    qty_base : float
        Position size Q in base units, > 0.
    entry_price : float
        Entry price EP in USDT, > 0.
    wallet_usdt : float
        Isolated wallet balance WB (the position margin, after funding) in USDT.
    mmr : float
        Maintenance margin rate of the notional's bracket, in (0, 1).
    maintenance_amount_usdt : float
        Maintenance amount ``cum`` of the bracket, USDT.

    Raises
    ------
    ValueError
        If ``side`` is not +-1, or a value is non-finite or out of range.
    """
    if side not in (-1, 1):
        raise ValueError(f"side must be -1 or +1, got {side!r}")
    for name, value in (("qty_base", qty_base), ("entry_price", entry_price), ("wallet_usdt", wallet_usdt),
                        ("mmr", mmr), ("maintenance_amount_usdt", maintenance_amount_usdt)):  # fmt: skip
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    if qty_base <= 0 or entry_price <= 0 or not 0 < mmr < 1:
        raise ValueError(
            f"need qty_base > 0, entry_price > 0, 0 < mmr < 1; got {qty_base}, {entry_price}, {mmr}"
        )
    return (wallet_usdt + maintenance_amount_usdt - side * qty_base * entry_price) / (
        qty_base * mmr - side * qty_base
    )


def slippage_frac(atr_at_decision: float, ref_price: float, cfg: CostConfig) -> float:
    """Adverse slippage as a fraction of price.

    ``slip = (slippage_bps / 1e4 + slippage_atr_coef * atr / ref_price) * cost_multiplier``: a fixed
    part plus a part proportional to ATR% (volatility), scaled by the cost multiplier.

    Raises
    ------
    ValueError
        If ``atr_at_decision`` is non-finite or <= 0, or ``ref_price`` is non-finite or <= 0.
    """
    if not (math.isfinite(atr_at_decision) and atr_at_decision > 0):
        raise ValueError(f"atr_at_decision must be finite and > 0, got {atr_at_decision!r}")
    if not (math.isfinite(ref_price) and ref_price > 0):
        raise ValueError(f"ref_price must be finite and > 0, got {ref_price!r}")
    return (
        cfg.slippage_bps / 1e4 + cfg.slippage_atr_coef * atr_at_decision / ref_price
    ) * cfg.cost_multiplier


def is_funding_time(open_time_ns: int, funding_interval_hours: int) -> bool:
    """True if a bar opening at ``open_time_ns`` (UTC ns) opens at a funding settlement time
    (whole hour, ``hour % funding_interval_hours == 0``)."""
    seconds_of_day = (open_time_ns // _NS_PER_S) % 86_400
    return open_time_ns % _NS_PER_S == 0 and seconds_of_day % (3_600 * funding_interval_hours) == 0


@lru_cache(maxsize=64)
def _decimals(step: float) -> int:
    return max(0, math.ceil(-math.log10(step))) + 2


def _round_price(price: float, tick: float, mode: int) -> float:
    """Round to the tick: mode +1 up, -1 down, 0 nearest."""
    k = price / tick
    if mode > 0:
        n = math.ceil(k - 1e-9)
    elif mode < 0:
        n = math.floor(k + 1e-9)
    else:
        n = round(k)
    return round(n * tick, _decimals(tick))


def _adverse_fill(ref_price: float, trade_side: int, slip: float, tick: float) -> float:
    """Fill price of a market order of ``trade_side`` (+1 buy, -1 sell) at ``ref_price`` plus
    adverse slippage, rounded to the tick in the adverse direction (buy up, sell down)."""
    return _round_price(ref_price * (1.0 + trade_side * slip), tick, trade_side)


def _validate_bar(bar: Bar) -> None:
    o, h, lo, c = bar.open, bar.high, bar.low, bar.close
    for name, value in (("open", o), ("high", h), ("low", lo), ("close", c)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"bar at open_time_ns={bar.open_time_ns}: {name} must be finite and > 0, got {value!r}"
            )
    if not (lo <= o <= h and lo <= c <= h):
        raise ValueError(
            f"bar at open_time_ns={bar.open_time_ns} is not OHLC-consistent: open={o}, high={h}, low={lo}, close={c}"
        )


def _validate_opening(decision: Decision) -> None:
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
# The bar step
# ----------------------------------------------------------------------------------------------

_STATE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AccountState))


class _Work:
    """Mutable scratch copy of an :class:`AccountState`, private to one :func:`step_bar` call."""

    __slots__ = (*_STATE_FIELDS, "fills", "trades", "fees", "slippage", "funding", "liq_fee", "liquidated", "skipped")

    def __init__(self, state: AccountState) -> None:
        for name in _STATE_FIELDS:
            setattr(self, name, getattr(state, name))
        self.fills: list[Fill] = []
        self.trades: list[ClosedTrade] = []
        self.fees = 0.0
        self.slippage = 0.0
        self.funding = 0.0
        self.liq_fee = 0.0
        self.liquidated = False
        self.skipped = False

    def freeze(self) -> AccountState:
        return AccountState(*[getattr(self, name) for name in _STATE_FIELDS])

    def _flatten(self) -> None:
        self.side = 0
        self.qty_base = 0.0
        self.entry_price = 0.0
        self.margin_usdt = 0.0
        self.leverage = 1.0
        self.stop_price = None
        self.take_profit_price = None
        self.liquidation_price = None
        self.entry_time_ns = None
        self.bars_in_trade = 0
        self.entry_fee_usdt = 0.0
        self.trade_funding_usdt = 0.0

    def close(
        self, price: float, ref_price: float, reason: str, time_ns: int, bars_held: int, fee_rate: float
    ) -> None:
        """Close the whole position at ``price``, paying ``fee_rate`` of its notional."""
        side, qty = self.side, self.qty_base
        notional = qty * price
        fee = notional * fee_rate
        slip_usdt = qty * abs(price - ref_price)
        price_pnl = side * qty * (price - self.entry_price)
        self.cash_usdt += self.margin_usdt + price_pnl - fee
        self.fees_paid_usdt += fee
        self.slippage_paid_usdt += slip_usdt
        self.turnover_usdt += notional
        self.n_fills += 1
        self.fees += fee
        self.slippage += slip_usdt
        self.fills.append(Fill(time_ns, -side, qty, price, fee, slip_usdt, reason))
        pnl = price_pnl - self.entry_fee_usdt - fee - self.trade_funding_usdt
        self.trades.append(
            ClosedTrade(
                self.entry_time_ns, time_ns, side, qty, self.entry_price, price, pnl, reason, bars_held
            )
        )
        self._flatten()

    def liquidate(self, price: float, time_ns: int, bars_held: int) -> None:
        """Liquidation at ``price``: the isolated margin is lost, the remainder above zero goes to the
        insurance fund as the clearance fee, cash is unchanged."""
        side, qty = self.side, self.qty_base
        clearance = max(0.0, self.margin_usdt + side * qty * (price - self.entry_price))
        self.liquidation_fees_usdt += clearance
        self.turnover_usdt += qty * price
        self.n_fills += 1
        self.liq_fee += clearance
        self.liquidated = True
        self.fills.append(Fill(time_ns, -side, qty, price, 0.0, 0.0, "liquidation"))
        pnl = -self.margin_usdt - self.entry_fee_usdt - self.trade_funding_usdt
        self.trades.append(
            ClosedTrade(
                self.entry_time_ns, time_ns, side, qty, self.entry_price, price, pnl, "liquidation", bars_held
            )
        )
        self._flatten()


def _open_position(
    w: _Work, decision: Decision, bar: Bar, atr: float, slip: float, fee_rate: float, cfg: CostConfig
) -> None:
    """Open at the next open with the sizing rule of issue 18 (``envs.sizing``, written here independently):
    leverage capped at the instrument's max, notional from that (requested) leverage, margin at the integer
    exchange leverage ``ceil(L)``, quantity capped at the max market quantity, no trade below the min quantity
    or the min notional, stop/take-profit to the nearest tick, liquidation price from the real margin."""
    direction = decision.direction
    spec = cfg.instrument
    lev = min(float(decision.leverage), float(spec.max_leverage))
    lev_x = math.ceil(lev)  # Binance takes an integer leverage: the smallest integer >= L
    cash = w.cash_usdt  # flat here, so equity == cash
    fill = _adverse_fill(bar.open, direction, slip, cfg.tick_size_quote)
    margin_budget = min(decision.size_frac * cash, cash / (1.0 + lev * fee_rate)) if cash > 0 else 0.0
    lot = cfg.lot_size_base
    notional_budget = margin_budget * lev
    n_lots = math.floor(notional_budget / fill / lot + 1e-9)
    while n_lots > 0 and n_lots * lot * fill > notional_budget * (1.0 + 1e-12):
        n_lots -= 1
    if spec.max_market_qty_base is not None:
        n_lots = min(n_lots, math.floor(spec.max_market_qty_base / lot + 1e-9))
    qty = round(n_lots * lot, _decimals(lot))
    notional = qty * fill
    if (margin_budget <= 0 or qty <= 0 or qty < spec.min_qty_base - 1e-9 * lot
            or notional < cfg.min_notional_usdt):  # fmt: skip
        w.n_skipped_min_notional += 1
        w.skipped = True
        return
    margin = notional / lev_x
    fee = notional * fee_rate
    slip_usdt = qty * abs(fill - bar.open)
    w.cash_usdt -= margin + fee
    w.side = direction
    w.qty_base = qty
    w.entry_price = fill
    w.margin_usdt = margin
    w.leverage = float(decision.leverage)
    tick = cfg.tick_size_quote
    w.stop_price = _round_price(fill - direction * decision.stop_atr * atr, tick, 0)
    w.take_profit_price = _round_price(fill + direction * decision.take_profit_atr * atr, tick, 0)
    w.liquidation_price = position_liquidation_price(direction, qty, fill, margin, cfg)
    w.entry_time_ns = bar.open_time_ns
    w.bars_in_trade = 0
    w.entry_fee_usdt = fee
    w.trade_funding_usdt = 0.0
    w.fees_paid_usdt += fee
    w.slippage_paid_usdt += slip_usdt
    w.turnover_usdt += notional
    w.n_fills += 1
    w.n_trades += 1
    w.fees += fee
    w.slippage += slip_usdt
    w.fills.append(Fill(bar.open_time_ns, direction, qty, fill, fee, slip_usdt, "entry"))


def _intrabar_exit(w: _Work, bar: Bar, slip: float, fee_rate: float, cfg: CostConfig) -> None:
    s = w.side
    o = bar.open
    stop, liq, tp = w.stop_price, w.liquidation_price, w.take_profit_price
    bars_held = w.bars_in_trade + 1
    tick = cfg.tick_size_quote
    # Signed distance "beyond" a level in the adverse direction: s * (level - price) >= 0.
    extreme_adv = bar.low if s > 0 else bar.high
    extreme_fav = bar.high if s > 0 else bar.low

    def beyond(price: float, level: float) -> bool:  # price at or past level, moving adversely
        return s * (level - price) >= 0

    def take_profit(ref: float) -> None:
        if cfg.take_profit_order == "limit":  # resting limit order: maker fee, no slippage
            w.close(ref, ref, "take_profit", bar.open_time_ns, bars_held,
                    cfg.maker_fee_bps / 1e4 * cfg.cost_multiplier)  # fmt: skip
        else:
            w.close(_adverse_fill(ref, -s, slip, tick), ref, "take_profit", bar.open_time_ns, bars_held, fee_rate)

    if tp is not None and s * (o - tp) >= 0:  # the open gapped through the take-profit: it fills first
        take_profit(o)
        return
    liq_first = liq is not None and (stop is None or s * (liq - stop) >= 0)
    adv_level = liq if liq_first else stop
    if adv_level is not None and beyond(extreme_adv, adv_level):
        if liq is not None and beyond(o, liq):  # gap through the liquidation price
            w.liquidate(o, bar.open_time_ns, bars_held)
            return
        if liq_first:  # liquidation price reached intrabar before the stop
            w.liquidate(liq, bar.open_time_ns, bars_held)
            return
        ref = o if beyond(o, stop) else stop  # gap through the stop fills at the open
        price = _adverse_fill(ref, -s, slip, tick)
        if liq is not None and beyond(price, liq):  # stop fill would lie past LP: liquidated first
            w.liquidate(liq, bar.open_time_ns, bars_held)
            return
        w.close(price, ref, "stop", bar.open_time_ns, bars_held, fee_rate)
        return
    if tp is not None and s * (extreme_fav - tp) >= 0:
        take_profit(tp)


def step_bar(
    state: AccountState, decision: Decision | None, bar: Bar, atr_at_decision: float, cfg: CostConfig
) -> BarResult:
    """Apply the decision taken at the close of bar t to bar t+1 (``bar``).

    Order of events: (1) funding at the open if ``bar.is_funding_time`` and a position is open
    (``payment = side * qty * open * rate``, positive = paid, taken from the isolated margin; a NaN
    rate is replaced by ``cfg.funding_fallback_rate`` and counted); (2) fills at the open: a
    position whose liquidation price the open has reached is liquidated at the open first (the
    decision is then applied as if from flat, except that a "hold" stays flat); when
    ``decision.direction != state.side``: close at ``open * (1 - side * slip)``, then open
    ``direction`` at ``open * (1 + direction * slip)`` (tick-rounded adversely) with the margin budget
    ``size_frac * cash`` (reduced so that margin + fee <= cash) times the leverage (capped at the instrument's max)
    as notional, ``qty`` floored to the lot and capped at the max market quantity, margin ``notional / ceil(L)``,
    stop/take-profit ``stop_atr``/``take_profit_atr`` ATRs from the fill, liquidation price from
    :func:`liquidation_price`; below the min quantity or ``min_notional_usdt`` the entry is skipped and counted;
    (3) intrabar exits: the stop or the liquidation price (whichever lies first in the adverse
    direction) before the take-profit; a gap through a level fills at the open; stop and
    take-profit fills pay adverse slippage; a liquidation loses the whole isolated margin;
    (4) mark to market at the close, ``bars_in_trade += 1`` if a position is open.
    ``slip = slippage_frac(atr_at_decision, bar.open, cfg)``; fees are
    ``notional * taker_fee_bps / 1e4 * cost_multiplier`` per fill.

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

    Returns
    -------
    BarResult
        New state, fills and closed trades of this bar, this bar's costs, equity at the close.

    Raises
    ------
    ValueError
        If the bar is non-finite/inconsistent, ``atr_at_decision`` is non-finite or <= 0 when a fill
        can happen, or the decision opening a position has a non-finite/out-of-range field
        (:class:`market.decision.NonFiniteDecisionError`). Raised before any change: no partial fill.
    """
    _validate_bar(bar)
    changes_side = decision is not None and decision.direction != state.side
    opening = changes_side and decision.direction != 0  # type: ignore[union-attr]
    if opening:
        _validate_opening(decision)  # type: ignore[arg-type]
    atr = _as_float(atr_at_decision)
    if changes_side or state.side != 0:
        if not (math.isfinite(atr) and atr > 0):
            raise ValueError(
                f"atr_at_decision must be finite and > 0 for a possible fill at open_time_ns={bar.open_time_ns}, "
                f"got {atr_at_decision!r}"
            )
        slip = slippage_frac(atr, bar.open, cfg)
    else:
        slip = 0.0
    fee_rate = cfg.taker_fee_bps / 1e4 * cfg.cost_multiplier
    w = _Work(state)

    # 1. Funding on the position held into the settlement.
    if bar.is_funding_time and w.side != 0:
        rate = bar.funding_rate
        if not math.isfinite(rate):
            rate = cfg.funding_fallback_rate
            w.n_fallback_funding += 1
        payment = w.side * w.qty_base * bar.open * rate
        w.margin_usdt -= payment
        w.funding_paid_usdt += payment
        w.trade_funding_usdt += payment
        w.funding += payment
        w.liquidation_price = position_liquidation_price(w.side, w.qty_base, w.entry_price, w.margin_usdt, cfg)

    # 2. Fills at the open. An open at or beyond the liquidation price (a gap, or funding that ate
    # the margin) liquidates the position first: the liquidation engine acts before any order.
    if w.side != 0 and w.liquidation_price is not None and w.side * (w.liquidation_price - bar.open) >= 0:
        w.liquidate(bar.open, bar.open_time_ns, w.bars_in_trade)
    # 2b. Trailing (market.decision): on a hold of the open side, a requested stop is rounded to the
    # tick away from the market (long down, short up) and kept only if it tightens the stop.
    if (decision is not None and not changes_side and w.side != 0
            and decision.new_stop_price is not None):  # fmt: skip
        level = _round_price(decision.new_stop_price, cfg.tick_size_quote, -w.side)
        if w.stop_price is None or w.side * (level - w.stop_price) > 0:
            w.stop_price = level
    if changes_side:
        if w.side != 0:
            price = _adverse_fill(bar.open, -w.side, slip, cfg.tick_size_quote)
            w.close(price, bar.open, "exit_signal", bar.open_time_ns, w.bars_in_trade, fee_rate)
        if opening:
            _open_position(w, decision, bar, atr, slip, fee_rate, cfg)  # type: ignore[arg-type]

    # 3. Intrabar exits of the position held after the open.
    if w.side != 0:
        _intrabar_exit(w, bar, slip, fee_rate, cfg)

    # 4. Mark to market at the close.
    if w.side != 0:
        w.bars_in_trade += 1
    new_state = w.freeze()
    return BarResult(
        state=new_state,
        fills=tuple(w.fills),
        closed_trades=tuple(w.trades),
        fees_usdt=w.fees,
        slippage_usdt=w.slippage,
        funding_usdt=w.funding,
        liquidation_fee_usdt=w.liq_fee,
        liquidated=w.liquidated,
        skipped_min_notional=w.skipped,
        equity_usdt=new_state.equity(bar.close),
    )
