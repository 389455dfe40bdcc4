"""The venue a serving loop trades on: the :class:`Broker` protocol and its typed inputs and outputs.

Two implementations, one contract (``tests/serving/test_broker_conformance.py`` runs the same scenarios on
both):

* :class:`serving.exchange.BinanceFuturesBroker`: Binance USDⓈ-M through ccxt (testnet, live, or the local
  fake exchange of the tests). A market order fills when the exchange matches it, at once.
* :class:`serving.paper.PaperBroker`: the simulated account of the env kernel. Its fills come from
  :func:`envs.accounting.step_bar`, the function the training env and the backtests run, so it charges fees,
  slippage, funding and liquidation exactly as in training. A market order fills at the **next bar's open**
  (the kernel's timing), when the caller advances the paper venue with ``open_bar``; its stop and take-profit
  orders act from then on, inside the bar, until ``close_bar`` marks it at the close.

What a loop needs from a venue (:class:`Broker`): the symbol's trading rules (:class:`MarketRules`: tick,
step, min quantity / notional), the exchange leverage for the next entry, placing an entry, an exit or a
protective (stop / take-profit, ``closePosition``) order (:class:`serving.intents.OrderIntent`), looking an
order up and cancelling it by client id, the open orders, the position (:class:`ExchangePosition`), the
account's trades (:class:`TradeFill`) and its balance (:class:`Balance`). The live loop also needs the
exchange's clock, candles, funding and account setup: :class:`ExchangeBroker`, which only the ccxt broker is.

Errors (:mod:`serving.errors`), the same on both: a refused order raises :class:`serving.errors.RejectedError`
(below the min notional or min quantity, a reduce-only order with nothing to reduce, a stop that would trigger
at once, insufficient margin); only the exchange raises the retryable and ambiguous classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import pandas as pd

from serving.intents import ExchangePosition, MarketRules, OrderIntent

__all__ = ["Balance", "Broker", "ExchangeBroker", "ExchangePosition", "MarketRules", "OrderIntent", "OrderSnapshot",
           "TradeFill"]  # fmt: skip


@dataclass(frozen=True, slots=True)
class OrderSnapshot:
    """An order as the venue sees it now.

    ``status``: ccxt unified ('open', 'closed', 'canceled', 'expired', 'rejected');
    ``filled_base`` / ``amount_base`` in base units (``amount_base`` may be 0 for closePosition
    orders); ``average_price`` USDT or None before any fill; ``conditional``: a stop/take-profit
    (algo) order; ``actual_order_id``: for a conditional order that triggered, the id of the
    order it placed in the matching engine (Binance ``actualOrderId``; the trades of the stop or
    take-profit carry this id), else None.
    """

    client_id: str
    exchange_id: str
    status: str
    side: str
    order_type: str
    amount_base: float
    filled_base: float
    average_price: float | None
    trigger_price: float | None
    conditional: bool
    reduce_only: bool
    actual_order_id: str | None = None


@dataclass(frozen=True, slots=True)
class TradeFill:
    """One user trade: ``side`` +1 buy / -1 sell, ``qty_base`` > 0, money in USDT, ``time`` UTC.

    ``realized_pnl_usdt``: the price PnL the trade realised (Binance ``realizedPnl``: fees and funding not
    included; 0 for a trade that opens or adds).
    """

    trade_id: int
    exchange_order_id: str
    side: int
    qty_base: float
    price: float
    fee_usdt: float
    realized_pnl_usdt: float
    time: pd.Timestamp


@dataclass(frozen=True, slots=True)
class Balance:
    """The account in USDT: ``wallet_usdt`` (deposits + realised PnL - fees - funding; Binance
    ``totalWalletBalance``), ``unrealized_pnl_usdt`` of the open position at the venue's current price
    (``totalUnrealizedProfit``) and ``equity_usdt`` (``totalMarginBalance``: their sum)."""

    wallet_usdt: float
    unrealized_pnl_usdt: float
    equity_usdt: float


@runtime_checkable
class Broker(Protocol):
    """What the serving loops need from a venue (module docstring); one symbol, one-way mode, isolated margin.

    Members
    -------
    market_id : str
        The venue's symbol, e.g. ``BTCUSDT`` (client order ids carry it).
    rules : MarketRules
        Tick, step, min/max quantity, min notional and max leverage of the symbol (sizing, rounding).
    set_leverage(leverage)
        Integer exchange leverage (1..max) of the next entry; sets the isolated margin it takes.
    create(intent) -> OrderSnapshot
        Place ``intent`` once: a market order (``qty_base``; reduce-only for an exit) or a ``closePosition``
        stop-market / take-profit-market order at ``trigger_price``. The quantity is truncated to the step and
        a trigger rounded to the tick, as ccxt does. Raises :class:`serving.errors.RejectedError` when refused.
    lookup(client_id, conditional=...) -> OrderSnapshot | None
        The order with that client id (the latest if reused), None when the venue has none.
    cancel(client_id, conditional=...) -> OrderSnapshot | None
        Cancel an open order ('canceled' snapshot); None when it is not open (filled, gone, unknown).
    open_orders() -> list[OrderSnapshot]
        Open market and conditional orders of the symbol.
    position() -> ExchangePosition
        Side, quantity and entry price of the one-way position.
    fills_since(last_trade_id, since_ms=None) -> list[TradeFill]
        Trades with id > ``last_trade_id`` (all recent ones when None), oldest first.
    balance() -> Balance
        Wallet, unrealised PnL and equity.
    """

    @property
    def market_id(self) -> str:
        """The venue's symbol."""
        ...

    @property
    def rules(self) -> MarketRules:
        """Trading rules of the symbol."""
        ...

    def set_leverage(self, leverage: int) -> None:
        """Integer exchange leverage of the next entry."""
        ...

    def create(self, intent: OrderIntent) -> OrderSnapshot:
        """Place ``intent`` once."""
        ...

    def lookup(self, client_id: str, *, conditional: bool) -> OrderSnapshot | None:
        """The order with ``client_id``, None if the venue has none."""
        ...

    def cancel(self, client_id: str, *, conditional: bool) -> OrderSnapshot | None:
        """Cancel the open order ``client_id``; None if it is not open."""
        ...

    def open_orders(self) -> list[OrderSnapshot]:
        """Open orders of the symbol."""
        ...

    def position(self) -> ExchangePosition:
        """The one-way position."""
        ...

    def fills_since(self, last_trade_id: int | None, since_ms: int | None = None) -> list[TradeFill]:
        """Trades after ``last_trade_id``, oldest first."""
        ...

    def balance(self) -> Balance:
        """Wallet, unrealised PnL and equity (USDT)."""
        ...


@runtime_checkable
class ExchangeBroker(Broker, Protocol):
    """A :class:`Broker` the live loop (:class:`serving.live.LiveLoop`) can run on: an exchange with a clock,
    candles, funding and an account to set up. Implemented by :class:`serving.exchange.BinanceFuturesBroker`.

    Members (besides :class:`Broker`'s): ``load()`` (markets and rules, once), ``require_one_way_mode()``,
    ``set_isolated_margin()``, ``server_time_ms()``, ``fetch_ohlcv(timeframe, since_ms, limit, until_ms)`` (raw
    klines rows), ``fetch_funding(since_ms, limit)`` (``(time ms, rate)`` settlements) and ``equity_usdt()``
    (``balance().equity_usdt`` in one call).
    """

    def load(self) -> MarketRules:
        """Load the markets; the symbol's rules."""
        ...

    def require_one_way_mode(self) -> None:
        """Refuse a hedge-mode account."""
        ...

    def set_isolated_margin(self) -> None:
        """Isolated margin on the symbol."""
        ...

    def server_time_ms(self) -> int:
        """The exchange's clock, ms since the epoch."""
        ...

    def fetch_ohlcv(self, timeframe: str, since_ms: int | None, limit: int, until_ms: int | None = None
                    ) -> list[list[Any]]:  # fmt: skip
        """Raw klines rows."""
        ...

    def fetch_funding(self, since_ms: int, limit: int = 1000) -> list[tuple[int, float]]:
        """Funding settlements from ``since_ms``."""
        ...

    def equity_usdt(self) -> float:
        """Equity (USDT)."""
        ...
