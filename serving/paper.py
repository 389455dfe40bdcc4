"""Paper broker: the serving-side wrapper of the one accounting module.

It owns no cost model of its own: every bar goes through :func:`envs.accounting.step_bar`, the
same function the training env and the backtester call, so paper results are charged exactly as
in training (fees, slippage, funding, isolated-margin liquidation), and its entries are sized by the
one sizing rule (:mod:`envs.sizing`, run by the kernel) that the live intents use too.

Two ways to drive it (do not mix them on one account):

* **Decisions** (the paper loop, :class:`serving.loop.PaperStepper`): ``on_bar(bar_t)`` applies the
  decision submitted at the close of bar t-1, then ``submit(decision_t, atr_t)`` queues the next one. The
  execution rules of the bundle's env (``trading_rules``: decision interval, minimum holding period,
  rebalance band; :class:`envs.config.TradingRulesConfig`) act as in the env: ``step_bar(rules=...)``, and a
  decision taken at a bar that is not a decision bar is not read (a hold), as ``TradingEnv.step_decision``;
  ``submit(None, atr)`` is no decision (the env's bars between decisions), and a decision the risk guard imposes
  (``submit(..., imposed=True)``) is read whatever the rules.
* **Orders** (the :class:`serving.broker.Broker` protocol, the live loop's venue operations): ``create`` a
  market order (entry, reduce-only exit) or a ``closePosition`` stop / take-profit, ``lookup``, ``cancel``,
  ``open_orders``, ``position``, ``fills_since``, ``balance``. The venue moves bar by bar, in two halves:
  ``open_bar(bar, atr)`` settles funding and fills the queued market orders at the bar's open (the kernel's
  timing: a decision at the close of bar t fills at the open of t+1); the caller may then place the new
  position's stop and take-profit; ``close_bar()`` runs the bar's range (stop before take-profit, gaps at
  the open, liquidation) and marks the account at the close. Both halves are ``step_bar`` calls: the first
  on the bar's open alone (high = low = close = open), the second on the whole bar with no decision and no
  funding. With the stop and take-profit the kernel would have set, the two halves give the fills and
  equity of one ``step_bar`` of the decision (tested). An entry of ``qty`` is the kernel's entry of a
  decision whose ``size_frac`` sizes exactly ``qty`` at the kernel's fill (the set leverage, the cash of the
  flat account); its own stop and take-profit are replaced by the venue's open orders (none until placed).

Differences from an exchange, by design: market orders fill at the next bar's open, not at once (the
snapshot ``create`` returns is 'open'; it can be cancelled until then); one position, entered from flat and
closed whole (no adds, no partial or net-flipping orders; refused); stops and take-profits close the whole
position (``closePosition``). Refusals raise :class:`serving.errors.RejectedError`, as the exchange's do.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pandas as pd

from envs.accounting import AccountState, Bar, BarResult, Fill, is_decision_bar, step_bar
from envs.config import CostConfig, TradingRulesConfig
from envs.sizing import round_to_tick
from market.decision import Decision, PositionView
from serving.broker import Balance, OrderSnapshot, TradeFill
from serving.errors import RejectedError
from serving.intents import ExchangePosition, MarketRules, OrderIntent, modelled_fill_price

#: ATR multiple of the stop and take-profit of a venue entry's decision: the kernel sets them, the venue
#: replaces them with its open orders right after the fill; so far away that they never act before that.
_FAR_ATR = 1e6


@dataclass
class _Order:
    """One order of the paper venue (mutable; :meth:`snapshot` is what callers see)."""

    client_id: str
    exchange_id: str
    side: str
    order_type: str
    amount: float
    trigger: float | None
    conditional: bool
    reduce_only: bool
    status: str = "open"
    filled: float = 0.0
    average: float | None = None
    actual_order_id: str | None = None

    def snapshot(self) -> OrderSnapshot:
        return OrderSnapshot(self.client_id, self.exchange_id, self.status, self.side, self.order_type, self.amount,
                             self.filled, self.average, self.trigger, self.conditional, self.reduce_only,
                             self.actual_order_id)  # fmt: skip


class PaperBroker:
    """Simulated USDT-M account filled by :func:`envs.accounting.step_bar` (module docstring).

    Usage per bar (decisions): ``on_bar(bar_t)`` applies the decision submitted at the close of bar t-1,
    then ``submit(decision_t, atr_t)`` queues the decision for bar t+1. Orders: ``create``/``cancel``
    between bars, ``open_bar`` and ``close_bar`` to move on (module docstring).

    Parameters
    ----------
    initial_equity_usdt : float
        Starting cash in USDT (finite, > 0).
    costs : CostConfig
        The shared cost model (and the symbol's spec, ``costs.instrument``).
    trading_rules : TradingRulesConfig | None
        The execution rules of the bundle's env (``bundle.env_config.trading_rules``); None: the defaults
        (a decision every bar, no holding period, no resize). Decisions only; orders are not subject to them.
    bar_interval_ns : int | None
        Bar length in ns; needed when ``trading_rules.decision_interval_bars`` > 1.
    leverage : int
        Exchange leverage of the next venue entry until :meth:`set_leverage` (20: a new Binance account's).

    Raises
    ------
    ValueError
        If ``initial_equity_usdt`` is not finite and > 0, or a decision interval > 1 without ``bar_interval_ns``.
    """

    def __init__(self, initial_equity_usdt: float, costs: CostConfig, *,
                 trading_rules: TradingRulesConfig | None = None, bar_interval_ns: int | None = None,
                 leverage: int = 20) -> None:  # fmt: skip
        self._state = AccountState.initial(initial_equity_usdt)
        self._costs = costs
        # The venue's orders are market orders whatever the bundle's entry_order (a limit entry is a decision-mode
        # rule of the kernel; the live loop, which drives the venue, refuses limit-entry bundles).
        self._venue_costs = costs if costs.entry_order == "market" else costs.updated(entry_order="market",
                                                                                       entry_limit_offset_bps=0.0)
        self._trading_rules = trading_rules
        if trading_rules is not None and trading_rules.decision_interval_bars > 1 and not (bar_interval_ns or 0) > 0:
            raise ValueError("a decision interval > 1 bar needs bar_interval_ns (the bar length) to find decision bars")
        self._bar_ns = None if bar_interval_ns is None else int(bar_interval_ns)
        self._equity = float(initial_equity_usdt)
        self._pending: tuple[Decision | None, float] | None = None
        self._imposed = False  # the pending decision is read whatever the trading rules (submit(imposed=True))
        self._last_atr = math.nan
        self._last_time_ns: int | None = None
        # the order venue (Broker protocol)
        self._rules = MarketRules.from_spec(costs.instrument)
        self._leverage = int(leverage)
        self._mark: float | None = None  # the venue's current price: last open or close seen
        self._open_bar: tuple[Bar, float] | None = None  # bar opened by open_bar, not closed yet, and its ATR
        self._orders: dict[str, _Order] = {}  # market orders by client id (the latest of an id)
        self._algo: dict[str, _Order] = {}  # stop / take-profit orders by client id
        self._queue: list[_Order] = []  # market orders waiting for the next open
        self._trades: list[TradeFill] = []
        self._next_id = 1000

    # -- decisions --------------------------------------------------------------------------------
    @property
    def state(self) -> AccountState:
        """The account after the last processed bar."""
        return self._state

    @property
    def equity_usdt(self) -> float:
        """Equity marked at the close of the last processed bar (the initial equity before any)."""
        return self._equity

    @property
    def pending(self) -> tuple[Decision | None, float] | None:
        """The queued ``(decision, atr_at_decision)`` for the next bar (decision None: no decision), or None."""
        return self._pending

    @property
    def trading_rules(self) -> TradingRulesConfig | None:
        """The execution rules decisions follow (None: the defaults)."""
        return self._trading_rules

    def position_view(self) -> PositionView:
        """The open position as policies see it."""
        return self._state.position_view()

    def submit(self, decision: Decision | None, atr_at_decision: float, *, imposed: bool = False) -> None:
        """Queue ``decision`` (taken at the close of the current bar) for the next bar's open.

        Parameters
        ----------
        decision : Decision | None
            Target position; None: no decision (the position and its orders stay as they are, as the env's
            bars between decision bars; with a rebalance band a hold *decision* would resize).
        atr_at_decision : float
            ATR of the decision bar in price units (USDT); it sets the stop/take-profit distances
            and the volatility part of slippage.
        imposed : bool
            The decision is imposed by the risk guard: it is read whatever the trading rules (off a decision bar
            and within the minimum holding period too; a kill switch is not held back by them).

        Raises
        ------
        TypeError
            If ``decision`` is neither a :class:`Decision` nor None.
        ValueError
            If a decision is already pending, or ``atr_at_decision`` is non-finite or <= 0 while a
            fill may follow (a position is open or the decision changes the side).
        """
        if decision is not None and not isinstance(decision, Decision):
            raise TypeError(f"submit expects a Decision, got {type(decision).__name__}")
        if self._pending is not None:
            raise ValueError("a decision is already pending for the next bar; call cancel_pending() first")
        atr = float(atr_at_decision)
        direction = self._state.side if decision is None else decision.direction
        needs_atr = decision is not None and (direction != self._state.side or self._state.side != 0)
        if needs_atr and not (math.isfinite(atr) and atr > 0):
            raise ValueError(
                f"atr_at_decision must be finite and > 0 when a fill may follow, got {atr_at_decision!r} "
                f"(decision direction {direction}, position side {self._state.side})"
            )
        self._pending, self._imposed = (decision, atr), bool(imposed and decision is not None)

    def cancel_pending(self) -> Decision | None:
        """Drop the queued decision and return it (None if there was none)."""
        pending, self._pending, self._imposed = self._pending, None, False
        return None if pending is None else pending[0]

    def reads_decision(self, bar: Bar) -> bool:
        """Whether the decision taken at the close of the bar before ``bar`` is read: that bar closes at a
        multiple of ``trading_rules.decision_interval_bars`` bars since the epoch
        (:func:`envs.accounting.is_decision_bar`); always with an interval of 1."""
        k = 1 if self._trading_rules is None else self._trading_rules.decision_interval_bars
        if k == 1 or self._bar_ns is None:  # __init__ refuses an interval > 1 without the bar length
            return True
        return bool(is_decision_bar(bar.open_time_ns - self._bar_ns, self._bar_ns, k))

    def on_bar(self, bar: Bar) -> BarResult:
        """Process the next bar with the pending decision (None: keep the position and its orders).

        Without a pending decision the ATR of the last submitted decision is used for the
        slippage of stop/take-profit fills. A decision taken at a bar that is not a decision bar
        (:meth:`reads_decision`) is not read: the bar is a hold, as in the env.

        Raises
        ------
        ValueError
            If the bar is not later than the last processed bar, if orders of the venue are queued or a bar
            is open (:meth:`open_bar`), or from :func:`envs.accounting.step_bar` (invalid bar, non-finite ATR
            when a fill may happen). The account and the pending decision are unchanged when it raises.
        """
        self._check_time(bar)
        if self._queue or self._open_bar is not None:
            raise ValueError("orders are queued or a bar is open on the order venue; use open_bar/close_bar")
        decision, atr = self._pending if self._pending is not None else (None, self._last_atr)
        if not math.isfinite(atr):
            atr = self._last_atr  # no decision was submitted with an ATR: the last one prices stop slippage
        imposed = self._imposed
        if decision is not None and not imposed and not self.reads_decision(bar):
            decision = None
        result = step_bar(self._state, decision, bar, atr, self._costs, rules=None if imposed else self._trading_rules)
        self._state = result.state
        self._equity = result.equity_usdt
        self._last_time_ns = bar.open_time_ns
        self._mark = bar.close
        if math.isfinite(atr) and atr > 0:
            self._last_atr = atr
        self._pending, self._imposed = None, False
        return result

    def _check_time(self, bar: Bar) -> None:
        if self._last_time_ns is not None and bar.open_time_ns <= self._last_time_ns:
            raise ValueError(
                f"bar open_time_ns={bar.open_time_ns} is not after the last processed bar ({self._last_time_ns})"
            )

    # -- the order venue (serving.broker.Broker) ------------------------------------------------------
    @property
    def market_id(self) -> str:
        """The symbol of ``costs.instrument``, e.g. ``BTCUSDT``."""
        return self._costs.instrument.symbol

    @property
    def rules(self) -> MarketRules:
        """The trading rules of ``costs.instrument``."""
        return self._rules

    def set_leverage(self, leverage: int) -> None:
        """Exchange leverage of the next entry (its isolated margin is notional / leverage).

        Raises
        ------
        RejectedError
            Not an int in [1, ``rules.max_leverage``].
        """
        if isinstance(leverage, bool) or not isinstance(leverage, int) or not 1 <= leverage <= self._rules.max_leverage:
            raise RejectedError(f"leverage must be an int in [1, {self._rules.max_leverage}], got {leverage!r}")
        self._leverage = leverage

    def _new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def _side_after_queue(self) -> int:
        side = self._state.side
        for o in self._queue:
            side = 0 if o.reduce_only else (1 if o.side == "buy" else -1)
        return side

    def create(self, intent: OrderIntent) -> OrderSnapshot:
        """Accept ``intent`` (module docstring): a market order is queued for the next open ('open'
        snapshot); a stop or take-profit rests ('open') and acts from now on.

        Quantities are truncated to the step and triggers rounded to the nearest tick, as ccxt does
        (``amount_to_precision``, ``price_to_precision``).

        Raises
        ------
        RejectedError
            No price yet (no bar seen), a quantity of 0 after truncation, below the min quantity or above the max,
            a notional below the min notional (at the current price), insufficient margin for the notional at the
            set leverage plus the taker fee, a reduce-only order with no position to close or smaller than it, an
            entry while a position is (or stays) open, a stop or take-profit that is not ``closePosition``, whose
            side would not close the position, that would trigger at once, or a second one of its kind.
        """
        if self._mark is None:
            raise RejectedError(f"{intent.client_id}: no price yet (the venue has seen no bar)")
        if intent.order_type in ("stop_market", "take_profit_market"):
            return self._create_conditional(intent)
        if intent.order_type != "market":
            raise RejectedError(f"{intent.client_id}: order type {intent.order_type!r} not supported")
        r = self._rules
        qty = float(intent.qty_base) if intent.qty_base is not None else math.nan
        if not (math.isfinite(qty) and qty > 0):
            raise RejectedError(f"{intent.client_id}: quantity must be finite and > 0, got {intent.qty_base!r}")
        qty = round(math.floor(qty / r.step_size_base + 1e-9) * r.step_size_base, 12)
        if qty <= 0:
            raise RejectedError(f"{intent.client_id}: quantity {intent.qty_base} is below the step {r.step_size_base}")
        side = 1 if intent.side == "buy" else -1
        held = self._side_after_queue()
        if intent.reduce_only:
            if held == 0 or held == side:
                raise RejectedError(f"{intent.client_id}: reduce-only order with no position to reduce (-2022)")
            if qty < self._state.qty_base - 1e-9 * r.step_size_base:
                raise RejectedError(f"{intent.client_id}: the paper venue closes whole positions only "
                                    f"({qty} < {self._state.qty_base})")  # fmt: skip
        else:
            if held != 0:
                raise RejectedError(f"{intent.client_id}: the paper venue enters from flat only (position {held})")
            if qty < r.min_qty_base - 1e-9 * r.step_size_base or qty > r.max_qty_base:
                raise RejectedError(f"{intent.client_id}: quantity {qty} outside [{r.min_qty_base}, {r.max_qty_base}]")
            notional = qty * self._mark
            if notional < r.min_notional_usdt:
                raise RejectedError(f"{intent.client_id}: notional {notional:.2f} USDT below the minimum "
                                    f"{r.min_notional_usdt} (-4164)")  # fmt: skip
            need = notional / self._leverage + notional * self._fee_rate()
            if need > self._free_cash_after_queue():
                raise RejectedError(f"{intent.client_id}: margin insufficient: {need:.2f} USDT needed (-2019)")
        order = _Order(intent.client_id, self._new_id(), intent.side, "market", qty, None, False,
                       bool(intent.reduce_only))  # fmt: skip
        self._orders[intent.client_id] = order
        self._queue.append(order)
        return order.snapshot()

    def _fee_rate(self) -> float:
        return self._costs.taker_fee_bps / 1e4 * self._costs.cost_multiplier

    def _free_cash_after_queue(self) -> float:
        """Cash of the account once the queued orders close the position (at the current price, no costs)."""
        s = self._state
        if any(o.reduce_only for o in self._queue) and s.side != 0 and self._mark is not None:
            return s.cash_usdt + s.margin_usdt + s.side * s.qty_base * (self._mark - s.entry_price)
        return s.cash_usdt

    def _create_conditional(self, intent: OrderIntent) -> OrderSnapshot:
        if not intent.close_position:
            raise RejectedError(f"{intent.client_id}: the paper venue's stops and take-profits are closePosition")
        trigger = float(intent.trigger_price) if intent.trigger_price is not None else math.nan
        if not (math.isfinite(trigger) and trigger > 0):
            raise RejectedError(f"{intent.client_id}: trigger price must be finite and > 0, got {trigger!r}")
        trigger = round_to_tick(trigger, self._rules.tick_size_usdt, 0)
        is_stop = intent.order_type == "stop_market"
        sell = intent.side == "sell"
        held = self._state.side
        if held != 0 and (held > 0) != sell:
            raise RejectedError(f"{intent.client_id}: a {intent.side} stop/take-profit does not close a position "
                                f"of side {held}")  # fmt: skip
        m = float(self._mark)  # type: ignore[arg-type]  # create checked it
        if (trigger >= m if is_stop else trigger <= m) if sell else (trigger <= m if is_stop else trigger >= m):
            raise RejectedError(f"{intent.client_id}: order would immediately trigger ({trigger} vs {m}) (-2021)")
        if any(o.status == "open" and o.order_type == intent.order_type and o.side == intent.side
               for o in self._algo.values()):  # fmt: skip
            raise RejectedError(f"{intent.client_id}: the position already has an open {intent.order_type}")
        order = _Order(intent.client_id, self._new_id(), intent.side, intent.order_type, 0.0, trigger, True, True)
        self._algo[intent.client_id] = order
        return order.snapshot()

    def lookup(self, client_id: str, *, conditional: bool) -> OrderSnapshot | None:
        """The order ``client_id`` (None if the venue has none)."""
        order = (self._algo if conditional else self._orders).get(client_id)
        return None if order is None else order.snapshot()

    def cancel(self, client_id: str, *, conditional: bool) -> OrderSnapshot | None:
        """Cancel the open order ``client_id`` (a queued market order too); None if it is not open."""
        order = (self._algo if conditional else self._orders).get(client_id)
        if order is None or order.status != "open":
            return None
        order.status = "canceled"
        if order in self._queue:
            self._queue.remove(order)
        return order.snapshot()

    def open_orders(self) -> list[OrderSnapshot]:
        """Queued market orders and resting stops / take-profits."""
        return [o.snapshot() for o in (*self._orders.values(), *self._algo.values()) if o.status == "open"]

    def position(self) -> ExchangePosition:
        """The account's position (side, quantity, entry price)."""
        s = self._state
        return ExchangePosition() if s.side == 0 else ExchangePosition(s.side, s.qty_base, s.entry_price)

    def fills_since(self, last_trade_id: int | None, since_ms: int | None = None) -> list[TradeFill]:
        """Trades with id > ``last_trade_id`` (all of them, from ``since_ms`` if given, when None), oldest first."""
        if last_trade_id is not None:
            return [t for t in self._trades if t.trade_id > last_trade_id]
        since = None if since_ms is None else pd.Timestamp(since_ms, unit="ms", tz="UTC")
        return [t for t in self._trades if since is None or t.time >= since]

    def balance(self) -> Balance:
        """Wallet (cash + isolated margin), unrealised PnL at the current price and equity (USDT)."""
        s = self._state
        wallet = s.cash_usdt + s.margin_usdt
        mark = s.entry_price if self._mark is None else self._mark
        upnl = s.side * s.qty_base * (mark - s.entry_price) if s.side else 0.0
        return Balance(wallet, upnl, wallet + upnl)

    # -- the venue's bars -----------------------------------------------------------------------------
    def _sync_protection(self) -> None:
        """The kernel's stop and take-profit are the open orders that close the position (none when absent)."""
        s = self._state
        stop = tp = None
        if s.side != 0:
            closing = "sell" if s.side > 0 else "buy"
            for o in self._algo.values():
                if o.status == "open" and o.side == closing:
                    if o.order_type == "stop_market":
                        stop = o.trigger
                    else:
                        tp = o.trigger
        if (stop, tp) != (s.stop_price, s.take_profit_price):
            self._state = dataclasses.replace(s, stop_price=stop, take_profit_price=tp)

    def open_bar(self, bar: Bar, atr_usdt: float) -> list[TradeFill]:
        """Open ``bar`` on the venue: funding at its open, then the queued market orders fill at the open
        in the order they were placed (adverse slippage of ``atr_usdt``, the ATR of the bar before, as the
        kernel's); a stop or take-profit the open gapped through fills at the open; a position the open
        liquidates is liquidated. Returns the trades made.

        Raises
        ------
        ValueError
            If a bar is already open, ``bar`` is not after the last bar, a decision is pending, or from
            :func:`envs.accounting.step_bar` (invalid bar or ATR). Nothing changes when it raises.
        """
        if self._open_bar is not None:
            raise ValueError("a bar is open; close_bar() first")
        if self._pending is not None:
            raise ValueError("a decision is pending (decision mode); the order venue does not mix with it")
        self._check_time(bar)
        self._sync_protection()
        s0 = self._state
        o = bar.open
        state, trades, funding = s0, [], bar.is_funding_time
        for order in [*self._queue, None]:  # None: funding and the open's checks when no order filled
            if order is None and not funding:
                break
            decision = None if order is None else self._order_decision(order, state, o, atr_usdt)
            if order is not None and decision is None:  # cannot fill now (e.g. liquidated at the open)
                order.status = "expired" if order.status == "open" else order.status
                continue
            opening = Bar(bar.open_time_ns, o, o, o, o, bar.funding_rate, funding)
            result = step_bar(state, decision, opening, atr_usdt, self._venue_costs)
            trades += self._record(result.fills, order, state, bar.open_time_ns)
            state, funding = result.state, False
            if order is not None and order.status == "open":
                order.status = "expired"  # the kernel skipped it (below the minimums at the fill)
        if state.side != 0:  # the range half adds this bar; a held position keeps its count
            same = s0.side != 0 and state.entry_time_ns == s0.entry_time_ns
            state = dataclasses.replace(state, bars_in_trade=s0.bars_in_trade if same else 0)
        self._state, self._queue = state, []
        self._open_bar, self._mark = (bar, float(atr_usdt)), o
        self._sync_protection()
        self._equity = self.balance().equity_usdt
        return trades

    def close_bar(self) -> list[TradeFill]:
        """Run the open bar's range (stop or liquidation before take-profit) and mark the account at its
        close. Returns the trades made.

        Raises
        ------
        ValueError
            If no bar is open, or from :func:`envs.accounting.step_bar`.
        """
        if self._open_bar is None:
            raise ValueError("no bar is open; open_bar() first")
        bar, atr = self._open_bar
        self._sync_protection()
        before = self._state
        rest = Bar(bar.open_time_ns, bar.open, bar.high, bar.low, bar.close, bar.funding_rate, False)
        result = step_bar(before, None, rest, atr, self._costs)
        trades = self._record(result.fills, None, before, bar.open_time_ns)
        self._state, self._equity = result.state, result.equity_usdt
        self._open_bar, self._mark, self._last_time_ns = None, bar.close, bar.open_time_ns
        if math.isfinite(atr) and atr > 0:
            self._last_atr = atr
        return trades

    def _order_decision(self, order: _Order, state: AccountState, o: float, atr: float) -> Decision | None:
        """The kernel decision that fills ``order`` at the open ``o``: flat for a reduce-only order that closes
        the position; for an entry from flat, the direction with the set leverage and the ``size_frac`` whose
        sizing at the kernel's fill gives the order's quantity (None: the order cannot fill now)."""
        side = 1 if order.side == "buy" else -1
        if order.reduce_only:
            ok = state.side == -side and order.amount >= state.qty_base - 1e-9 * self._rules.step_size_base
            return Decision.flat() if ok else None
        if state.side != 0:
            return None
        fill = modelled_fill_price(o, side, atr, self._costs, self._rules.tick_size_usdt)  # the kernel's fill
        lev, cash = float(self._leverage), state.cash_usdt
        budget = cash / (1.0 + lev * self._fee_rate())  # the sizing rule's cap: margin + fee <= cash
        if order.amount * fill / lev > budget:
            order.status = "rejected"  # margin insufficient at the fill (Binance: -2019 at the send)
            return None
        frac = min(1.0, (order.amount + 0.5 * self._rules.step_size_base) * fill / (lev * cash))
        return Decision(direction=side, leverage=lev, size_frac=frac, stop_atr=_FAR_ATR, take_profit_atr=_FAR_ATR)

    def _record(self, fills: tuple[Fill, ...], order: _Order | None, before: AccountState,
                open_time_ns: int) -> list[TradeFill]:  # fmt: skip
        """Trades of the kernel's ``fills`` (``order``: the market order being filled; ``before``: the account
        before them), with the orders they fill."""
        out = []
        entry, pos_side = before.entry_price, before.side
        for f in fills:
            owner: _Order | None
            if f.reason in ("entry", "exit_signal") and order is not None:
                owner = order
            elif f.reason in ("stop", "take_profit"):
                kind = "stop_market" if f.reason == "stop" else "take_profit_market"
                owner = next((a for a in self._algo.values() if a.status == "open" and a.order_type == kind
                              and a.side == ("buy" if f.side > 0 else "sell")), None)  # fmt: skip
            else:  # liquidation: the exchange's own order
                owner = None
            oid = self._new_id() if owner is None or owner.conditional else owner.exchange_id
            if owner is not None:
                owner.filled, owner.average, owner.status = f.qty_base, f.price, "closed"
                if owner.conditional:
                    owner.actual_order_id = oid
            closing = f.reason != "entry"
            realized = pos_side * f.qty_base * (f.price - entry) if closing else 0.0
            if f.reason == "entry":
                entry, pos_side = f.price, f.side
            else:
                pos_side = 0
            self._next_id += 1
            trade = TradeFill(self._next_id, oid, f.side, f.qty_base, f.price, f.fee_usdt, realized,
                              pd.Timestamp(open_time_ns, unit="ns", tz="UTC"))  # fmt: skip
            self._trades.append(trade)
            out.append(trade)
        return out
