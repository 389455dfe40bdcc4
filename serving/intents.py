r"""Order intents: what the live loop must send this bar, derived by pure functions.

An *intent* is one order the loop has decided to send, with a **deterministic client order id**
built from (symbol, bar open time, intent kind). Written to the store before it is sent, the id
lets a restarted process find out whether the order already reached the exchange (Binance
enforces ``newClientOrderId`` uniqueness only among *open* orders, so a filled market order can
be sent twice with the same id: the loop must look it up first, see ``serving.live``).

Binance rule for ``newClientOrderId`` (USDⓈ-M "New Order (TRADE)" endpoint documentation):
``^[\.A-Z\:/a-z0-9_\-]{1,36}$``.

Mapping from a :class:`market.decision.Decision` to intents (same semantics as the env, see
``market.decision``):

* hold (``direction`` == current non-zero side): no market order; a ``new_stop_price`` that,
  rounded to the tick conservatively (long: down, short: up), tightens the current stop gives a
  ``stopmv`` intent (cancel the old stop, place the new one);
* change of side: an ``exit`` (market, reduce-only, the whole position) if a position is open,
  the cancel of its stop/take-profit, then, if ``direction != 0`` and entries are allowed, an
  ``entry`` (market) sized by the one sizing rule of the env kernel (:func:`envs.sizing.size_entry`:
  ``floor(min(size_frac * equity, equity / (1 + L * fee)) * L / price, step)`` base units with
  ``L = min(leverage, max_leverage)``, capped at the max market quantity; none below the min
  quantity or the min notional), the exchange leverage set before it being ``ceil(L)``
  (:func:`exchange_leverage`). The live loop sizes it as the kernel would if the next open equalled the last
  close (:func:`next_open_entry`): at the modelled fill (the kernel's adverse slippage and tick rounding,
  :func:`modelled_fill_price`) and, on a flip, with the equity left after the modelled exit's fee and slippage;
* after the entry fill, :func:`protective_intents` gives the ``stop`` (STOP_MARKET) and ``tp``
  (TAKE_PROFIT_MARKET) orders, both ``closePosition`` (they close whatever is open, so a partial
  fill is covered), ``stop_atr`` / ``take_profit_atr`` ATRs from the average fill price, rounded
  to the nearest tick by the rule the env kernel applies at an entry
  (:func:`envs.sizing.protective_prices`), so that live, paper and backtest positions carry the
  same stop and take-profit (at most half a tick from the ATR distance asked);
* ``unprot``: a reduce-only market close of a position whose stop the exchange refused (see
  ``serving.live``): a position is never left open without its stop.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from envs import kernel as K
from envs import sizing
from envs.accounting import cost_params
from envs.config import CostConfig
from market.decision import Decision
from market.instruments import InstrumentSpec

IntentKind = Literal["entry", "exit", "stop", "tp", "stopmv", "unprot"]
INTENT_KINDS: tuple[str, ...] = ("entry", "exit", "stop", "tp", "stopmv", "unprot")
OrderType = Literal["market", "stop_market", "take_profit_market"]
CLIENT_ID_PATTERN = re.compile(r"^[\.A-Z\:/a-z0-9_\-]{1,36}$")
CLIENT_ID_PREFIX = "ats"
#: Taker fee rate (fraction of notional) the entry sizing reserves when the caller gives none: the cost model's
#: default (:class:`envs.config.CostConfig`, Binance VIP0 USDT-M taker 0.05 %), so that live sizes as the env.
DEFAULT_TAKER_FEE_RATE = CostConfig.model_fields["taker_fee_bps"].default / 1e4


class IntentError(ValueError):
    """Bad input to an intent function (non-finite price, unknown kind, bad market rules)."""


@dataclass(frozen=True, slots=True)
class MarketRules:
    """Trading rules of one symbol: the order-sizing part of a :class:`market.instruments.InstrumentSpec`.

    ``tick_size_usdt`` (PRICE_FILTER.tickSize), ``step_size_base`` (MARKET_LOT_SIZE, else LOT_SIZE, stepSize),
    ``min_qty_base`` / ``max_qty_base`` (MARKET_LOT_SIZE or LOT_SIZE), ``min_notional_usdt``
    (MIN_NOTIONAL.notional). All finite and > 0 (``max_qty_base`` may be ``inf``); ``max_leverage`` the largest
    leverage (integer, the spec's first bracket; :data:`envs.sizing.BINANCE_MAX_LEVERAGE` when the exchange's
    filters do not say). The one sizing rule (:mod:`envs.sizing`) reads them. Built with :meth:`from_spec`
    (from a spec, e.g. the one the paper broker and the backtests use) or by the live broker from the exchange's
    filters through the same parser as a downloaded spec (:func:`market.instruments.exchange_filters`), so paper
    and live size alike; :meth:`spec_fields` converts back.
    """

    symbol: str
    tick_size_usdt: float
    step_size_base: float
    min_qty_base: float
    min_notional_usdt: float
    max_qty_base: float = math.inf
    max_leverage: int = sizing.BINANCE_MAX_LEVERAGE

    def __post_init__(self) -> None:
        try:
            sizing.check_rules(self)
        except sizing.SizingError as exc:
            raise IntentError(f"MarketRules of {self.symbol!r}: {exc}") from None

    @classmethod
    def from_spec(cls, spec: InstrumentSpec) -> MarketRules:
        """The rules of an instrument spec (``max_market_qty_base`` None -> ``inf``)."""
        mx = spec.max_market_qty_base
        return cls(symbol=spec.symbol, tick_size_usdt=spec.tick_size_usdt, step_size_base=spec.lot_step_base,
                   min_qty_base=spec.min_qty_base, min_notional_usdt=spec.min_notional_usdt,
                   max_qty_base=math.inf if mx is None else mx, max_leverage=spec.max_leverage)  # fmt: skip

    def spec_fields(self) -> dict[str, float | None]:
        """The :class:`market.instruments.InstrumentSpec` fields these rules set (``inf`` max quantity -> None)."""
        return {"tick_size_usdt": self.tick_size_usdt, "lot_step_base": self.step_size_base,
                "min_qty_base": self.min_qty_base, "min_notional_usdt": self.min_notional_usdt,
                "max_market_qty_base": None if math.isinf(self.max_qty_base) else self.max_qty_base}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ExchangePosition:
    """The exchange's view of the position: ``side`` -1/0/+1, ``qty_base`` >= 0, ``entry_price`` USDT."""

    side: int = 0
    qty_base: float = 0.0
    entry_price: float = 0.0


@dataclass(frozen=True, slots=True)
class OpenProtection:
    """The open protective orders of the position (client ids and trigger prices), None when absent."""

    stop_client_id: str | None = None
    stop_price: float | None = None
    tp_client_id: str | None = None
    tp_price: float | None = None


@dataclass(frozen=True, slots=True)
class OrderIntent:
    """One order to send.

    ``side`` 'buy'/'sell'; ``qty_base`` > 0 for market orders, None for ``close_position``
    orders; ``trigger_price`` (USDT, tick-rounded) for stop/take-profit orders, else None.
    """

    client_id: str
    kind: str
    symbol: str
    bar_open_time: pd.Timestamp
    side: str
    order_type: str
    qty_base: float | None
    trigger_price: float | None
    reduce_only: bool
    close_position: bool


@dataclass(frozen=True, slots=True)
class BarPlan:
    """What :func:`plan_bar` decided for one bar.

    ``cancels``: client ids of protective orders to cancel first; ``orders``: market/stop orders to
    send in this order; ``entry_side``: side of the new position when an entry is in ``orders``
    (its stop/take-profit follow from :func:`protective_intents` after the fill), else 0;
    ``notes``: why something asked for was not done (e.g. below min notional).
    """

    cancels: tuple[str, ...]
    orders: tuple[OrderIntent, ...]
    entry_side: int
    notes: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# ids and rounding
# ---------------------------------------------------------------------------------------------


def client_order_id(symbol: str, bar_open_time: pd.Timestamp, kind: str) -> str:
    """Deterministic client order id ``ats-<SYMBOL>-<bar open, epoch s>-<kind>``.

    Symbols that would make the id longer than 36 characters are replaced by the first 8 hex digits
    of their SHA-1. Same inputs always give the same id; different (symbol, bar, kind) give
    different ids.

    Raises
    ------
    IntentError
        Unknown ``kind``, naive/NaT time, or a symbol with characters outside the Binance rule.
    """
    if kind not in INTENT_KINDS:
        raise IntentError(f"unknown intent kind {kind!r}; expected one of {INTENT_KINDS}")
    ts = pd.Timestamp(bar_open_time)
    if pd.isna(ts) or ts.tzinfo is None:
        raise IntentError(f"bar_open_time must be a tz-aware timestamp, got {bar_open_time!r}")
    secs = int(ts.tz_convert("UTC").value // 1_000_000_000)
    cid = f"{CLIENT_ID_PREFIX}-{symbol}-{secs}-{kind}"
    if len(cid) > 36:
        cid = f"{CLIENT_ID_PREFIX}-{hashlib.sha1(symbol.encode()).hexdigest()[:8]}-{secs}-{kind}"
    if not CLIENT_ID_PATTERN.fullmatch(cid):
        raise IntentError(f"client id {cid!r} (symbol {symbol!r}) breaks Binance's newClientOrderId rule")
    return cid


def parse_client_order_id(client_id: str) -> tuple[str, int, str] | None:
    """``(symbol or symbol hash, bar open epoch s, kind)`` of one of our ids, None for a foreign id."""
    parts = client_id.split("-")
    if len(parts) != 4 or parts[0] != CLIENT_ID_PREFIX or parts[3] not in INTENT_KINDS or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2]), parts[3]


def _check_finite_positive(name: str, value: float) -> float:
    x = float(value)
    if not math.isfinite(x) or x <= 0:
        raise IntentError(f"{name} must be finite and > 0, got {value!r}")
    return x


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------


def entry_quantity(
    equity_usdt: float,
    size_frac: float,
    leverage: float,
    price_usdt: float,
    rules: MarketRules,
    taker_fee_rate: float = DEFAULT_TAKER_FEE_RATE,
) -> tuple[float, str | None]:
    """Base quantity of a new position and, when it is 0, why: the quantity of the one sizing rule
    (:func:`envs.sizing.size_entry`, the env kernel's) at the reference price ``price_usdt``.

    Raises
    ------
    IntentError
        Non-finite equity/price/leverage/fee, leverage < 1, or ``size_frac`` outside [0, 1].
    """
    entry = _size(equity_usdt, size_frac, leverage, price_usdt, rules, taker_fee_rate)
    return entry.quantity_base, entry.skip_reason


def _size(equity_usdt: float, size_frac: float, leverage: float, price_usdt: float, rules: MarketRules,
          taker_fee_rate: float) -> sizing.EntrySize:  # fmt: skip
    try:  # side only orients the stop/take-profit, which are not asked for here
        return sizing.size_entry(side=1, equity_usdt=equity_usdt, size_frac=size_frac, leverage=leverage,
                                 price_usdt=price_usdt, fee_rate=taker_fee_rate, rules=rules)  # fmt: skip
    except sizing.SizingError as exc:
        raise IntentError(str(exc)) from None


def modelled_fill_price(reference_usdt: float, trade_side: int, atr_usdt: float, costs: CostConfig,
                        tick_size_usdt: float | None = None) -> float:  # fmt: skip
    """The env kernel's fill of a taker market order of ``trade_side`` (+1 buy / -1 sell) at an open of
    ``reference_usdt``: :func:`envs.kernel.adverse_fill` (the compiled function every kernel fill runs) with the
    kernel's slippage ``slip = (slippage_bps / 1e4 + slippage_atr_coef * atr / open) * cost_multiplier``, read
    from the kernel's parameter vector of ``costs`` (:func:`envs.accounting.cost_params`), rounded to the tick
    adversely (buy up, sell down).

    Parameters
    ----------
    reference_usdt : float
        The open the order fills at (USDT, finite > 0); live: the last close, its best estimate of the next open.
    trade_side : int
        +1 buy, -1 sell.
    atr_usdt : float
        ATR of the decided bar (USDT, finite >= 0), as the kernel's ``atr_at_decision``.
    costs : CostConfig
        The cost model (slippage, cost multiplier; the tick of its instrument unless ``tick_size_usdt`` is given).
    tick_size_usdt : float | None
        The traded market's tick (live: the exchange's filter); None: ``costs.instrument``'s.

    Raises
    ------
    IntentError
        A non-finite or non-positive reference price or tick, a negative or non-finite ATR, a side not +-1.
    """
    ref = _check_finite_positive("reference_usdt", reference_usdt)
    atr = float(atr_usdt)
    if not (math.isfinite(atr) and atr >= 0):
        raise IntentError(f"atr_usdt must be finite and >= 0, got {atr_usdt!r}")
    if trade_side not in (-1, 1) or isinstance(trade_side, bool):
        raise IntentError(f"trade_side must be -1 or +1, got {trade_side!r}")
    p = cost_params(costs)
    tick = p[K.P_TICK] if tick_size_usdt is None else _check_finite_positive("tick_size_usdt", tick_size_usdt)
    slip = (p[K.P_SLIP_BPS] / 1e4 + p[K.P_SLIP_ATR] * atr / ref) * p[K.P_COST_MULT]  # bar_apply's slippage
    return float(K.adverse_fill(ref, int(trade_side), slip, tick, sizing.decimals_pow10(tick)))


@dataclass(frozen=True, slots=True)
class FillModel:
    """How the live loop models the next open's fills when it sizes an entry (:func:`next_open_entry`).

    ``costs``: the cost model the policy was trained with (the bundle's ``env_config.costs``: taker fee, slippage
    bps and ATR coefficient, cost multiplier); ``atr_usdt``: the ATR of the decided bar (USDT) in the deciding
    policy's period, the kernel's ``atr_at_decision``.
    """

    costs: CostConfig
    atr_usdt: float

    @property
    def taker_fee_rate(self) -> float:
        """The kernel's taker fee rate (fraction of notional, cost multiplier included)."""
        return float(cost_params(self.costs)[K.P_FEE_RATE])

    def fill_price(self, reference_usdt: float, trade_side: int, tick_size_usdt: float) -> float:
        """:func:`modelled_fill_price` of this model."""
        return modelled_fill_price(reference_usdt, trade_side, self.atr_usdt, self.costs, tick_size_usdt)


@dataclass(frozen=True, slots=True)
class NextOpenEntry:
    """Result of :func:`next_open_entry`: the entry ``size`` (:class:`envs.sizing.EntrySize`), the modelled entry
    fill it was sized at (``fill_usdt``) and the equity that sized it (``equity_usdt``: after the modelled exit of
    the position held, on a flip)."""

    size: sizing.EntrySize
    fill_usdt: float
    equity_usdt: float


def next_open_entry(*, position: ExchangePosition, decision: Decision, reference_usdt: float, equity_usdt: float,
                    rules: MarketRules, fills: FillModel) -> NextOpenEntry:  # fmt: skip
    """The entry the env kernel would make for ``decision`` if the next open were ``reference_usdt``.

    The kernel (:func:`envs.kernel.bar_step`) closes the position held at the open, then sizes the new one with
    the cash left, at its fill. At decision time the next open is unknown; on a 24/7 market it is (nearly) the
    last close, so live takes ``reference_usdt`` = the last close for it and applies the kernel's rule:

    1. on a flip, the exit of ``position`` at the modelled fill ``X = fill_price(ref, -side)``; the sizing equity
       is ``equity - qty * |X - ref| - qty * X * fee``: equity less the modelled exit slippage and exit fee (the
       kernel's cash after the exit, equity marked at the open); from flat, ``equity`` itself;
    2. the entry fill ``P = fill_price(ref, direction)`` (adverse slippage, tick-rounded);
    3. :func:`envs.sizing.size_entry` at ``P`` with that equity and the model's taker fee.

    So whenever the next open equals the last close, live sends the kernel's quantity (tested:
    ``tests/serving/test_sim_exchange_parity.py``); a gap between them moves the kernel's fill, and the quantity
    can land a lot apart. Funding settled at that open on the position held is not modelled (the kernel takes it
    from the margin before the exit).

    Raises
    ------
    IntentError
        ``decision`` is not an entry (direction 0), non-finite equity or reference price, or the sizing rule's
        input errors.
    """
    if decision.direction not in (-1, 1):
        raise IntentError(f"next_open_entry needs an entry decision (direction +-1), got {decision.direction!r}")
    ref = _check_finite_positive("reference_usdt", reference_usdt)
    fee = fills.taker_fee_rate
    tick = rules.tick_size_usdt
    equity = float(equity_usdt)
    if position.side != 0 and position.side != decision.direction:
        exit_fill = fills.fill_price(ref, -position.side, tick)
        qty = float(position.qty_base)
        equity -= qty * abs(exit_fill - ref) + qty * exit_fill * fee
    fill = fills.fill_price(ref, decision.direction, tick)
    return NextOpenEntry(_size(equity, decision.size_frac, decision.leverage, fill, rules, fee), fill, equity)


def _close_side(position_side: int) -> str:
    return "sell" if position_side > 0 else "buy"


def protective_intents(
    symbol: str,
    bar_open_time: pd.Timestamp,
    position_side: int,
    fill_price_usdt: float,
    atr_usdt: float,
    decision: Decision,
    rules: MarketRules,
) -> tuple[OrderIntent, OrderIntent]:
    """The ``stop`` and ``tp`` intents of a position just opened (see the module docstring).

    Raises
    ------
    IntentError
        ``position_side`` not +-1, non-finite/non-positive fill price or ATR, or a stop at or
        below zero.
    """
    if position_side not in (-1, 1):
        raise IntentError(f"position_side must be -1 or +1, got {position_side!r}")
    fill = _check_finite_positive("fill_price_usdt", fill_price_usdt)
    atr = _check_finite_positive("atr_usdt", atr_usdt)
    try:
        stop, tp = sizing.protective_prices(position_side, fill, atr, decision.stop_atr, decision.take_profit_atr,
                                            rules.tick_size_usdt)
    except sizing.SizingError as exc:
        raise IntentError(str(exc)) from None
    if stop <= 0 or tp <= 0:
        raise IntentError(f"protective prices must be > 0, got stop={stop} tp={tp} (fill {fill}, atr {atr})")
    side = _close_side(position_side)
    return (
        OrderIntent(client_order_id(symbol, bar_open_time, "stop"), "stop", symbol, bar_open_time, side,
                    "stop_market", None, stop, True, True),
        OrderIntent(client_order_id(symbol, bar_open_time, "tp"), "tp", symbol, bar_open_time, side,
                    "take_profit_market", None, tp, True, True),
    )  # fmt: skip


def tightened_stop(position_side: int, current_stop: float | None, requested: float, tick: float) -> float | None:
    """The tick-rounded ``requested`` stop if it tightens ``current_stop``, else None.

    Long: rounded down, must be higher than the current stop; short: rounded up, must be lower
    (the env kernel's trailing rule, :func:`envs.kernel.move_stop`, with its rounding).
    With no current stop any valid level is accepted.
    """
    level = sizing.round_to_tick(_check_finite_positive("requested stop", requested), tick, -1 if position_side > 0 else 1)
    if level <= 0:
        return None
    if current_stop is None:
        return level
    return level if (level > current_stop if position_side > 0 else level < current_stop) else None


def plan_bar(
    *,
    symbol: str,
    bar_open_time: pd.Timestamp,
    position: ExchangePosition,
    protection: OpenProtection,
    decision: Decision,
    price_usdt: float,
    equity_usdt: float,
    rules: MarketRules,
    allow_entry: bool = True,
    taker_fee_rate: float = DEFAULT_TAKER_FEE_RATE,
    fills: FillModel | None = None,
) -> BarPlan:
    """Orders for this bar from the exchange position and the decision (module docstring).

    Parameters
    ----------
    price_usdt : float
        Reference price of the entry, finite > 0: with ``fills``, the expected next open (the live loop: the close
        of the decided bar); without, the price the entry is sized at as it is.
    equity_usdt : float
        Account equity (USDT), marked now.
    allow_entry : bool
        False on a quarantined bar, an unreconciled position, or a guard in REDUCING/HALTED:
        exits and stop moves are still planned, entries are not.
    taker_fee_rate : float
        Taker fee (fraction of notional) the entry sizing reserves without ``fills`` (:func:`entry_quantity`).
    fills : FillModel | None
        The modelled fills of the next open (the live loop's rule): the entry is sized as the kernel would size it
        if the next open were ``price_usdt`` (:func:`next_open_entry`: at the modelled entry fill, with the equity
        after the modelled exit on a flip, the model's fee). None: at ``price_usdt`` with ``equity_usdt``.

    Raises
    ------
    IntentError
        On a non-finite price/equity when an entry is sized, or an inconsistent position.
    """
    if position.side not in (-1, 0, 1) or (position.side != 0 and not position.qty_base > 0):
        raise IntentError(f"inconsistent position {position!r}")
    cancels: list[str] = []
    orders: list[OrderIntent] = []
    notes: list[str] = []
    side = position.side
    if decision.direction == side and side != 0:
        if decision.new_stop_price is not None:
            level = tightened_stop(side, protection.stop_price, decision.new_stop_price, rules.tick_size_usdt)
            if level is None:
                notes.append(f"new_stop_price {decision.new_stop_price} does not tighten stop {protection.stop_price}")
            else:
                if protection.stop_client_id is not None:
                    cancels.append(protection.stop_client_id)
                orders.append(OrderIntent(client_order_id(symbol, bar_open_time, "stopmv"), "stopmv", symbol,
                                          bar_open_time, _close_side(side), "stop_market", None, level, True, True))
        return BarPlan(tuple(cancels), tuple(orders), 0, tuple(notes))
    if decision.direction == side:  # flat and stays flat
        return BarPlan((), (), 0, ())
    if side != 0:
        cancels += [c for c in (protection.stop_client_id, protection.tp_client_id) if c is not None]
        orders.append(OrderIntent(client_order_id(symbol, bar_open_time, "exit"), "exit", symbol, bar_open_time,
                                  _close_side(side), "market", float(position.qty_base), None, True, False))
    entry_side = 0
    if decision.direction != 0:
        if not allow_entry:
            notes.append("entry blocked")
        else:
            if fills is None:
                qty, why = entry_quantity(equity_usdt, decision.size_frac, decision.leverage, price_usdt, rules,
                                          taker_fee_rate)  # fmt: skip
            else:
                size = next_open_entry(position=position, decision=decision, reference_usdt=price_usdt,
                                       equity_usdt=equity_usdt, rules=rules, fills=fills).size  # fmt: skip
                qty, why = size.quantity_base, size.skip_reason
            if why is not None:
                notes.append(f"entry skipped: {why}")
            else:
                entry_side = decision.direction
                orders.append(OrderIntent(client_order_id(symbol, bar_open_time, "entry"), "entry", symbol,
                                          bar_open_time, "buy" if entry_side > 0 else "sell", "market", qty, None,
                                          False, False))
    return BarPlan(tuple(cancels), tuple(orders), entry_side, tuple(notes))


def exchange_leverage(decision_leverage: float, max_leverage: int = sizing.BINANCE_MAX_LEVERAGE) -> int:
    """Integer leverage to set on the exchange before an entry: ``ceil(min(leverage, max_leverage))``, the
    exchange leverage of the one sizing rule (:func:`envs.sizing.exchange_leverage`). The entry's notional is
    sized with the requested leverage, so the isolated margin is ``notional / ceil(leverage)`` <= the budget.

    Raises
    ------
    IntentError
        Non-finite leverage or < 1, or ``max_leverage`` not an integer >= 1.
    """
    try:
        return sizing.exchange_leverage(decision_leverage, int(max_leverage))
    except (sizing.SizingError, TypeError, ValueError) as exc:
        raise IntentError(str(exc)) from None
