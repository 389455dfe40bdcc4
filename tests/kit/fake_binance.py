"""A local Binance USDⓈ-M REST server (127.0.0.1) for testing the real ccxt client without internet.

**Several symbols.** ``candles`` and ``funding`` are one symbol's frame and series (``BTCUSDT``: every test written
before multi-symbol serving) or mappings symbol -> frame / series (the first symbol is the *primary*: the one the
single-symbol helpers below mean when no ``symbol`` is named). Every market-data and trading endpoint below answers
per symbol (its ``symbol`` parameter: klines, funding, orders, conditional orders, trades, positions, leverage and
margin type), as unkindly for each as for one: request caps, query lag, malformed answers and faults (a fault queued
with ``symbol=`` meets only that symbol's requests; without it, the next request to the path, whatever its symbol).
One account (one wallet, one-way mode) holds every symbol's position; ``account``/``balance`` total them. A bare
frame answers any symbol's requests from it (records naming BTCUSDT), as the single-symbol fake always did.

It serves, from fixture data (rows of the bundled BTCUSDT files, or any fixture frames):

* ``GET /fapi/v1/exchangeInfo``: the perpetuals of ``markets`` (default :data:`DEFAULT_MARKETS`: BTCUSDT and
  XRPUSDT, enough for ccxt ``load_markets``, plus the :data:`KNOWN_MARKETS` entry of every other served symbol);
  :meth:`FakeBinance.set_filter` changes a filter value; an order below a market's ``MIN_NOTIONAL`` (-4164) or a
  trigger off its tick (-4014) is refused;
* ``GET /fapi/v1/time``: the server clock (``now_ms``, set by the test);
* ``GET /fapi/v1/klines``: candles from ``startTime`` (and up to ``endTime``), at most ``limit``
  (default 500, capped at 1500, as Binance), only bars that opened at or before ``now_ms``; the bar
  containing ``now_ms`` is served **still open** (its close, high, low and volume differ from the
  final fixture values), as the exchange does;
* ``GET /fapi/v1/fundingRate``: funding settlements from ``startTime`` up to ``endTime``, at most
  ``limit`` (default 100, capped at 1000), only those at or before ``now_ms``.

Faults are scripted per path with :meth:`FakeBinance.add_fault` and consumed in order, one per
request to that path: ``status_429`` (with ``Retry-After``), ``html_5xx`` (plain 503 page),
``json_5xx`` (500 with Binance code -1000), ``delay`` (answer after ``delay_s``, past the client's
timeout), ``overlap`` (the page starts ``bars`` earlier than asked), ``duplicate`` (every row twice),
``reverse`` (rows out of order), ``null_rows`` (a 200 page of ``null`` values) and ``past_end``
(klines: ``endTime`` ignored, so the page runs up to the still-open bar). Every request is
recorded in :attr:`FakeBinance.requests` as ``(path, params)``.

Trading (signed endpoints; signatures are not checked), one account in one-way mode, USDT margin:

* ``POST /fapi/v1/leverage``, ``POST /fapi/v1/marginType`` (-4046 when already set);
* ``POST|GET|DELETE /fapi/v1/order`` (MARKET only; by ``orderId`` or ``origClientOrderId``),
  ``GET /fapi/v1/openOrders``, ``GET /fapi/v1/allOrders``;
* ``POST|GET|DELETE /fapi/v1/algoOrder`` (conditional STOP_MARKET / TAKE_PROFIT_MARKET, by
  ``algoId`` or ``clientAlgoId``), ``GET /fapi/v1/openAlgoOrders``, ``GET /fapi/v1/allAlgoOrders``;
* ``GET /fapi/v1/positionSide/dual`` (hedge mode flag), ``GET /fapi/v1/leverageBracket``,
* ``GET /fapi/v1/userTrades`` (``fromId``/``startTime``), ``GET /fapi/v2|v3/positionRisk``,
  ``GET /fapi/v2|v3/account``, ``GET /fapi/v2|v3/balance``.

Matching model: a market order fills at once at the *current price* (the open of the bar that
contains ``now_ms``), taker fee ``fee_rate`` of the notional; a reduce-only order is capped at the
position (-2022 when flat). Conditional orders trigger when the clock is moved
(:attr:`now_ms` setter) past the close of a bar whose low/high crosses them (stop checked before
take-profit), and fill at the trigger price; ``closePosition`` orders close whatever is open.

**Kernel fills** (``kernel_fills=KernelFills(...)``, off by default): the env kernel
(:func:`envs.accounting.step_bar`) fills a market order at the open with adverse slippage
``slip = (slippage_bps / 1e4 + slippage_atr_coef * ATR / open) * cost_multiplier`` (ATR of the bar
before), rounded to the tick adversely, and a stop / take-profit at its level (at the open when the
bar gapped through it) with the same slippage, the take-profit first when the open gapped through
it, then the stop, then the take-profit inside the bar. A real exchange has no such formula: its
fills are the order book's. The plain model above fills at the open or the trigger exactly, so a
simulation against it would differ from the paper broker by the slippage alone; with
:class:`KernelFills` the fake fills where the kernel would, so a sim/exchange parity test compares
the serving paths (sizing, timing, protection, accounting), not two slippage models.
**Funding** (``settle_funding=True``, off by default): when the clock passes a settlement of the
fixture funding, an open position pays ``position_amt * price * rate`` from the wallet (``price``:
the open of the bar starting at the settlement, the kernel's; Binance uses the mark price); the
payments are listed in :attr:`FakeBinance.funding_payments`.
Client ids are unique only among OPEN orders (-4116), as on Binance, so a filled market order can
be re-sent with the same id: :meth:`FakeBinance.orders_by_client_id` shows such duplicates.
Extra fault kinds for trading endpoints: ``accept_then_delay`` (the order is applied, the answer
comes after ``delay_s``, past the client timeout), ``drop`` (the order is applied, the connection
is closed without an answer), ``partial_fill`` (the next market order fills ``fill_ratio`` of
its quantity, the rest expires), ``auth_error`` (401, Binance code -2015), ``echo_key`` (a 400 whose message quotes the
``X-MBX-APIKEY`` header, to test redaction); for klines also
``nan_close`` (the last closed bar's close is ``"NaN"``, if the page holds it) and ``gap`` (a row in the middle is
missing). Persistent bad candles, as an exchange whose history holds a bad row: :meth:`FakeBinance.corrupt_candle`
(served with other values on every request), :meth:`FakeBinance.drop_candle` (never served: a gap) and
:meth:`FakeBinance.restore_candle` (served correctly again). With ``state_path`` the trading state is loaded from that JSON
file at start and written after every change, so a restarted server sees the same exchange.

Unkind like Binance, for every endpoint: ``truncated_json`` (HTTP 200, the first half of the JSON
body: ccxt raises nothing), ``empty_body`` (HTTP 200, no body), and ``before`` (run
``Fault.action`` -- e.g. move the clock so a take-profit fills -- then answer normally: a fill that
lands between two reads of the client), ``mutate`` (answer ``Fault.transform(body)``: a record with a
missing or wrong field). :meth:`FakeBinance.trigger_now` fills a resting stop or take-profit at
once, as a price touch would. **Query lag**: an order accepted at server time ``t`` is
invisible to lookups and listings (``GET /fapi/v1/order``, ``openOrders``, ``allOrders`` and
their algo twins answer ``-2013 Order does not exist`` / leave it out) until ``now_ms >= t +
query_lag_ms``, as Binance's order queries lag its matching engine; trades and positions are
not lagged. A triggered conditional order carries ``actualOrderId``: the id of the market order
it placed, which its trade carries.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pytest

FaultKind = Literal[
    "status_429", "html_5xx", "json_5xx", "delay", "overlap", "duplicate", "reverse", "null_rows", "past_end",
    "accept_then_delay", "drop", "partial_fill", "auth_error", "nan_close", "gap", "echo_key",
    "truncated_json", "empty_body", "before", "mutate",
]

KLINES = "/fapi/v1/klines"
FUNDING = "/fapi/v1/fundingRate"
ORDER = "/fapi/v1/order"
ALGO_ORDER = "/fapi/v1/algoOrder"

_TF_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "1h": 3_600_000, "4h": 14_400_000, "1d": 86_400_000}


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour (see the module docstring)."""

    kind: FaultKind
    retry_after_s: int = 1
    delay_s: float = 1.0
    bars: int = 3
    fill_ratio: float = 0.5
    action: Callable[[], None] | None = field(default=None, compare=False)  # kind "before"
    transform: Callable[[Any], Any] | None = field(default=None, compare=False)  # kind "mutate"


@dataclass(frozen=True)
class KernelFills:
    """Fill prices of the env kernel (module docstring, "Kernel fills"); units as :class:`envs.config.CostConfig`.

    ``atr``: ATR (price units) by bar open time; the ATR of bar t prices the slippage of every fill in bar t+1,
    as the paper broker's ``atr_at_decision``. ``tick``: the symbol's tick (adverse rounding).
    """

    atr: pd.Series
    tick: float
    slippage_bps: float = 1.0
    slippage_atr_coef: float = 0.05
    cost_multiplier: float = 1.0

    @classmethod
    def from_costs(cls, costs: Any, atr: pd.Series) -> KernelFills:
        """The kernel's fill model of an :class:`envs.config.CostConfig` and an ATR series."""
        return cls(atr=atr, tick=costs.instrument.tick_size_usdt, slippage_bps=costs.slippage_bps,
                   slippage_atr_coef=costs.slippage_atr_coef, cost_multiplier=costs.cost_multiplier)

    def slip(self, open_ms: int, tf_ms: int, open_price: float) -> float:
        """Slippage fraction of the fills in the bar opening at ``open_ms`` (the kernel's expression)."""
        atr = float(self.atr.get(pd.Timestamp(open_ms - tf_ms, unit="ms", tz="UTC"), np.nan))
        return (self.slippage_bps / 1e4 + self.slippage_atr_coef * atr / open_price) * self.cost_multiplier

    def price(self, ref: float, trade_side: int, slip: float) -> float:
        """``ref`` moved against ``trade_side`` (+1 buy, -1 sell) by ``slip``, rounded to the tick adversely."""
        from envs.sizing import round_to_tick

        return round_to_tick(ref * (1.0 + trade_side * slip), self.tick, trade_side)


#: The markets the fake lists by default (test fixture values; the bundled instrument table never reads them):
#: exchangeInfo filters and leverage brackets by market id. BTCUSDT's are the values the serving tests were written
#: against; XRPUSDT is a low-priced perpetual (tick 0.0001, step 0.1, min notional 5) for multi-symbol tests.
DEFAULT_MARKETS: dict[str, dict[str, Any]] = {
    "BTCUSDT": {
        "base": "BTC", "pricePrecision": 2, "quantityPrecision": 3,
        "filters": [
            {"filterType": "PRICE_FILTER", "maxPrice": "4529764", "minPrice": "556.80", "tickSize": "0.10"},
            {"filterType": "LOT_SIZE", "maxQty": "1000", "minQty": "0.001", "stepSize": "0.001"},
            {"filterType": "MARKET_LOT_SIZE", "maxQty": "120", "minQty": "0.001", "stepSize": "0.001"},
            {"filterType": "MIN_NOTIONAL", "notional": "100"},
        ],
        "brackets": [{"bracket": 1, "initialLeverage": 125, "notionalCap": 10_000_000, "notionalFloor": 0,
                      "maintMarginRatio": 0.004, "cum": 0.0}],
    },
    "XRPUSDT": {
        "base": "XRP", "pricePrecision": 4, "quantityPrecision": 1,
        "filters": [
            {"filterType": "PRICE_FILTER", "maxPrice": "10000", "minPrice": "0.0143", "tickSize": "0.0001"},
            {"filterType": "LOT_SIZE", "maxQty": "10000000", "minQty": "0.1", "stepSize": "0.1"},
            {"filterType": "MARKET_LOT_SIZE", "maxQty": "2000000", "minQty": "0.1", "stepSize": "0.1"},
            {"filterType": "MIN_NOTIONAL", "notional": "5"},
        ],
        "brackets": [
            {"bracket": 1, "initialLeverage": 75, "notionalCap": 5_000, "notionalFloor": 0,
             "maintMarginRatio": 0.005, "cum": 0.0},
            {"bracket": 2, "initialLeverage": 50, "notionalCap": 50_000, "notionalFloor": 5_000,
             "maintMarginRatio": 0.01, "cum": 25.0},
        ],
    },
}


#: Markets the fake can list besides the defaults (added when their symbol is served). ETHUSDT: the bundled
#: instrument table's published filters (tick 0.01, step 0.001, min notional 5; test fixture values here).
KNOWN_MARKETS: dict[str, dict[str, Any]] = {
    **DEFAULT_MARKETS,
    "ETHUSDT": {
        "base": "ETH", "pricePrecision": 2, "quantityPrecision": 3,
        "filters": [
            {"filterType": "PRICE_FILTER", "maxPrice": "306177", "minPrice": "39.86", "tickSize": "0.01"},
            {"filterType": "LOT_SIZE", "maxQty": "10000", "minQty": "0.001", "stepSize": "0.001"},
            {"filterType": "MARKET_LOT_SIZE", "maxQty": "2000", "minQty": "0.001", "stepSize": "0.001"},
            {"filterType": "MIN_NOTIONAL", "notional": "5"},
        ],
        "brackets": [{"bracket": 1, "initialLeverage": 125, "notionalCap": 50_000, "notionalFloor": 0,
                      "maintMarginRatio": 0.004, "cum": 0.0}],
    },
}


def _exchange_info(now_ms: int, markets: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    markets = DEFAULT_MARKETS if markets is None else markets
    symbols = [{
        "symbol": sym, "pair": sym, "contractType": "PERPETUAL", "deliveryDate": 4133404800000,
        "onboardDate": 1569398400000, "status": "TRADING", "maintMarginPercent": "2.5000",
        "requiredMarginPercent": "5.0000", "baseAsset": m["base"], "quoteAsset": "USDT", "marginAsset": "USDT",
        "pricePrecision": m["pricePrecision"], "quantityPrecision": m["quantityPrecision"], "baseAssetPrecision": 8,
        "quotePrecision": 8, "underlyingType": "COIN", "underlyingSubType": [], "triggerProtect": "0.0500",
        "liquidationFee": "0.012500", "marketTakeBound": "0.05",
        "filters": [dict(f) for f in m["filters"]],
        "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET"],
        "timeInForce": ["GTC", "IOC", "FOK", "GTX"],
    } for sym, m in markets.items()]  # fmt: skip
    return {
        "timezone": "UTC", "serverTime": now_ms, "futuresType": "U_MARGINED", "rateLimits": [],
        "exchangeFilters": [], "assets": [{"asset": "USDT", "marginAvailable": True}], "symbols": symbols,
    }


def _ms(index: pd.DatetimeIndex) -> np.ndarray:
    return index.as_unit("ms").asi8


@dataclass
class _TradingState:
    """The account of the fake exchange (JSON-serialisable): one wallet, one position per symbol.

    ``positions``: symbol -> ``{"amt", "entry", "leverage", "margin_type"}``; ``position_amt``, ``entry_price``,
    ``leverage`` and ``margin_type`` read and set the ``primary`` symbol's (the single-symbol tests' view).
    """

    wallet_usdt: float = 10_000.0
    primary: str = "BTCUSDT"
    positions: dict[str, dict[str, Any]] = field(default_factory=dict)
    dual_side: bool = False
    next_order_id: int = 1000
    next_trade_id: int = 5000
    orders: list[dict[str, Any]] = field(default_factory=list)
    algo_orders: list[dict[str, Any]] = field(default_factory=list)
    trades: list[dict[str, Any]] = field(default_factory=list)

    def pos(self, symbol: str | None = None) -> dict[str, Any]:
        """The position record of ``symbol`` (the primary's when None), created flat at leverage 20, cross."""
        sym = self.primary if symbol is None else symbol
        return self.positions.setdefault(sym, {"amt": 0.0, "entry": 0.0, "leverage": 20, "margin_type": "CROSSED"})

    @property
    def position_amt(self) -> float:
        return float(self.pos()["amt"])

    @position_amt.setter
    def position_amt(self, value: float) -> None:
        self.pos()["amt"] = float(value)

    @property
    def entry_price(self) -> float:
        return float(self.pos()["entry"])

    @entry_price.setter
    def entry_price(self, value: float) -> None:
        self.pos()["entry"] = float(value)

    @property
    def leverage(self) -> int:
        return int(self.pos()["leverage"])

    @leverage.setter
    def leverage(self, value: int) -> None:
        self.pos()["leverage"] = int(value)

    @property
    def margin_type(self) -> str:
        return str(self.pos()["margin_type"])

    @margin_type.setter
    def margin_type(self, value: str) -> None:
        self.pos()["margin_type"] = str(value)


class _Series:
    """One symbol's fixture data: candle open times (ms) and OHLCV rows, funding times and rates, the candles served
    otherwise (:meth:`FakeBinance.corrupt_candle`) and its kernel fill model."""

    def __init__(self, candles: pd.DataFrame, funding: pd.Series, kernel_fills: KernelFills | None) -> None:
        self.times = _ms(candles.index)
        self.ohlcv = candles[["open", "high", "low", "close", "volume"]].to_numpy(dtype=np.float64)
        self.f_times = _ms(funding.index)
        self.f_rates = funding.to_numpy(dtype=np.float64)
        self.bad_candles: dict[int, dict[str, float] | None] = {}  # open ms -> values served instead (None: absent)
        self.kernel_fills = kernel_fills


class FakeBinance:
    """Threaded HTTP server on 127.0.0.1 (a free port) speaking the Binance USDⓈ-M market-data API.

    Parameters
    ----------
    candles : pandas.DataFrame | Mapping[str, pandas.DataFrame]
        Fixture candles (UTC open-time index, ``open high low close volume``), e.g. a slice of the
        bundled BTCUSDT 1h file: one frame (served as BTCUSDT) or one per symbol (the first is the primary).
    funding : pandas.Series | Mapping[str, pandas.Series]
        Fixture funding rates indexed by UTC funding time (one series, or one per symbol of ``candles``).
    now_ms : int
        Server clock, ms since the epoch; later bars and settlements do not exist yet.
    timeframe : str, default "1h"
        The only interval served (others answer 400).
    kernel_fills : KernelFills | Mapping[str, KernelFills] | None
        Fill market, stop and take-profit orders at the env kernel's prices (module docstring; the primary's, or
        one per symbol); None: at the open / the trigger price.
    settle_funding : bool
        Charge funding on open positions at the fixture's settlements (module docstring).

    Use as a context manager; :attr:`url` is ``http://127.0.0.1:<port>``.

    Raises
    ------
    ValueError
        ``funding`` (or ``kernel_fills``) names other symbols than ``candles``, or no symbol is given.
    """

    def __init__(
        self,
        candles: pd.DataFrame | Mapping[str, pd.DataFrame],
        funding: pd.Series | Mapping[str, pd.Series],
        *,
        now_ms: int,
        timeframe: str = "1h",
        wallet_usdt: float = 10_000.0,
        fee_rate: float = 0.0004,
        state_path: str | Path | None = None,
        query_lag_ms: int = 0,
        markets: dict[str, dict[str, Any]] | None = None,
        kernel_fills: KernelFills | Mapping[str, KernelFills] | None = None,
        settle_funding: bool = False,
    ) -> None:
        frames = {"BTCUSDT": candles} if isinstance(candles, pd.DataFrame) else dict(candles)
        rates = {"BTCUSDT": funding} if isinstance(funding, pd.Series) else dict(funding)
        if not frames or set(rates) != set(frames):
            raise ValueError(f"funding must be given for exactly the symbols of candles: candles {sorted(frames)}, "
                             f"funding {sorted(rates)}")
        primary = next(iter(frames))
        fills = ({primary: kernel_fills} if isinstance(kernel_fills, KernelFills)
                 else dict(kernel_fills or {}))  # fmt: skip
        if set(fills) - set(frames):
            raise ValueError(f"kernel_fills names symbols not served: {sorted(set(fills) - set(frames))}")
        #: the served symbols (exchange ids), the primary first
        self.symbols: tuple[str, ...] = tuple(frames)
        #: one bare frame: every symbol asked for is answered from it, as the BTCUSDT-only fake did (its records
        #: name BTCUSDT); a mapping: a symbol not in it is refused (-1121)
        self.any_symbol = isinstance(candles, pd.DataFrame)
        self.primary = primary
        self._series = {sym: _Series(frames[sym], rates[sym], fills.get(sym)) for sym in frames}
        self.timeframe = timeframe
        if markets is None:
            markets = {**DEFAULT_MARKETS, **{s: KNOWN_MARKETS[s] for s in frames if s in KNOWN_MARKETS}}
        missing = [s for s in frames if s not in markets]
        if missing:
            raise ValueError(f"served symbols without a market (exchangeInfo filters): {missing}")
        #: exchangeInfo filters and leverage brackets by market id (a copy: :meth:`set_filter` changes it)
        self.markets = json.loads(json.dumps(markets))
        self.query_lag_ms = int(query_lag_ms)  # order queries see an order this long after its accept
        self.tf_ms = _TF_MS[timeframe]
        self._now_ms = int(now_ms)
        self.fee_rate = float(fee_rate)
        self.settle_funding = bool(settle_funding)
        #: ``(settlement ms, position_amt, price, rate, payment)`` of every funding paid (``settle_funding``), every
        #: symbol's in settlement order; :attr:`funding_by_symbol` splits them by symbol
        self.funding_payments: list[tuple[int, float, float, float, float]] = []
        self.funding_by_symbol: dict[str, list[tuple[int, float, float, float, float]]] = {s: [] for s in frames}
        #: called as ``bar_closed(open_ms, fake)`` when the clock passes a bar's close, after its stops and
        #: take-profits, before the funding at the next open (a test's equity snapshot at the close)
        self.bar_closed: Callable[[int, FakeBinance], None] | None = None
        self.state_path = None if state_path is None else Path(state_path)
        self.trading = _TradingState(wallet_usdt=float(wallet_usdt), primary=primary)
        if self.state_path is not None and self.state_path.exists():
            self.trading = _TradingState(**json.loads(self.state_path.read_text()))
        for sym in frames:
            self.trading.pos(sym)
        self._faults: dict[tuple[str, str | None], deque[Fault]] = {}
        self._lock = threading.Lock()
        self._tlock = threading.RLock()
        self._release = threading.Event()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-binance", daemon=True
        )

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()  # wake delayed handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- scripting -------------------------------------------------------------------------------
    def set_filter(self, symbol: str, filter_type: str, **values: str) -> None:
        """Change the exchangeInfo filter ``filter_type`` of market ``symbol`` (e.g. ``tickSize="0.001"``), as an
        exchange revising a symbol's rules; later ``exchangeInfo`` requests serve the new values."""
        with self._lock:
            for f in self.markets[symbol]["filters"]:
                if f["filterType"] == filter_type:
                    f.update(values)
                    return
            raise KeyError(f"{symbol} has no filter {filter_type}")

    def _market(self, symbol: str | None) -> _Series:
        """The fixture data of ``symbol`` (the primary's when None); 400 -1121 for a symbol not served."""
        return self._series[self._sym(symbol)]

    def corrupt_candle(self, open_ms: int, symbol: str | None = None, **values: float) -> None:
        """Serve ``symbol``'s candle (the primary's when None) opening at ``open_ms`` with ``values`` (any of ``open
        high low close volume``, e.g. ``close=float("nan")``, ``volume=-1.0``) in place of the fixture's, on every
        klines request from now on, as an exchange whose history holds a bad row (until
        :meth:`restore_candle`)."""
        unknown = set(values) - {"open", "high", "low", "close", "volume"}
        if unknown:
            raise ValueError(f"not candle fields: {sorted(unknown)}")
        with self._lock:
            self._market(symbol).bad_candles[int(open_ms)] = {k: float(v) for k, v in values.items()}

    def drop_candle(self, open_ms: int, symbol: str | None = None) -> None:
        """Leave ``symbol``'s candle (the primary's when None) opening at ``open_ms`` out of every klines answer from
        now on (a gap in the exchange's history, until :meth:`restore_candle`)."""
        with self._lock:
            self._market(symbol).bad_candles[int(open_ms)] = None

    def restore_candle(self, open_ms: int, symbol: str | None = None) -> None:
        """Serve ``symbol``'s candle (the primary's when None) opening at ``open_ms`` as the fixture has it again
        (the exchange corrected its history)."""
        with self._lock:
            self._market(symbol).bad_candles.pop(int(open_ms), None)

    def add_fault(self, path: str, fault: Fault, times: int = 1, symbol: str | None = None) -> None:
        """Apply ``fault`` to the next ``times`` requests to ``path`` (after the faults already queued); with
        ``symbol``, to the next requests to ``path`` for that symbol only (queued before the path's own)."""
        with self._lock:
            self._faults.setdefault((path, symbol), deque()).extend([fault] * times)

    def pending_faults(self) -> int:
        """Faults queued that no request has met yet."""
        with self._lock:
            return sum(len(q) for q in self._faults.values())

    def count(self, path: str) -> int:
        """Number of requests received for ``path``."""
        return sum(1 for p, _ in self.requests if p == path)

    def _next_fault(self, path: str, symbol: str | None = None) -> Fault | None:
        with self._lock:
            for key in ((path, symbol), (path, None)) if symbol is not None else ((path, None),):
                queue = self._faults.get(key)
                if queue:
                    return queue.popleft()
            return None

    # -- trading ---------------------------------------------------------------------------------
    @property
    def now_ms(self) -> int:
        """Server clock (ms since the epoch). Setting it later triggers conditional orders of the bars closed."""
        return self._now_ms

    @now_ms.setter
    def now_ms(self, value: int) -> None:
        with self._tlock:
            old, self._now_ms = self._now_ms, int(value)
            if self._now_ms > old:
                self._trigger_conditionals(old, self._now_ms)

    def current_price(self, symbol: str | None = None) -> float:
        """Price ``symbol``'s (the primary's when None) market orders fill at: the open of the bar containing
        ``now_ms`` (else the last close)."""
        m = self._market(symbol)
        i = int(np.searchsorted(m.times, self._now_ms, side="right")) - 1
        if i < 0:
            raise _BadRequest(-1121, "no price yet")
        if m.times[i] + self.tf_ms > self._now_ms:
            return float(m.ohlcv[i, 0])
        return float(m.ohlcv[i, 3])

    def orders_by_client_id(self) -> dict[str, int]:
        """How many orders (regular and conditional, any status) the server holds per client id."""
        with self._tlock:
            out: dict[str, int] = {}
            for o in self.trading.orders:
                if not o.get("triggered_by"):
                    out[o["clientOrderId"]] = out.get(o["clientOrderId"], 0) + 1
            for a in self.trading.algo_orders:
                out[a["clientAlgoId"]] = out.get(a["clientAlgoId"], 0) + 1
            return out

    def position(self, symbol: str | None = None) -> tuple[float, float]:
        """``(signed position quantity in base units, entry price)`` of ``symbol`` (the primary when None)."""
        with self._tlock:
            pos = self.trading.pos(self._sym(symbol))
            return float(pos["amt"]), float(pos["entry"])

    def set_position(self, amt: float, entry_price: float, symbol: str | None = None) -> None:
        """Force ``symbol``'s position (the primary's when None): an 'external' trade the client does not know
        about."""
        with self._tlock:
            pos = self.trading.pos(self._sym(symbol))
            pos["amt"], pos["entry"] = float(amt), float(entry_price)
            self._save()

    def _sym(self, symbol: str | None) -> str:
        """``symbol`` if served (the primary when None), else 400 -1121."""
        sym = self.primary if symbol is None or self.any_symbol else symbol
        if sym not in self._series:
            raise _BadRequest(-1121, f"Invalid symbol {sym!r}.")
        return sym

    def _min_notional(self, symbol: str) -> float:
        return next((float(f["notional"]) for f in self.markets[symbol]["filters"] if f["filterType"] == "MIN_NOTIONAL"),
                    0.0)

    def _tick(self, symbol: str) -> float:
        return next(float(f["tickSize"]) for f in self.markets[symbol]["filters"] if f["filterType"] == "PRICE_FILTER")

    def _save(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.trading)))
        os.replace(tmp, self.state_path)

    def _apply_fill(self, side: str, qty: float, price: float, order: dict[str, Any]) -> None:
        st = self.trading
        sym = str(order["symbol"])
        rec = st.pos(sym)
        signed = qty if side == "BUY" else -qty
        pos, entry = float(rec["amt"]), float(rec["entry"])
        realized = 0.0
        if pos == 0 or (pos > 0) == (signed > 0):
            new = pos + signed
            entry = (abs(pos) * entry + qty * price) / abs(new)
        else:
            closed = min(abs(pos), qty)
            realized = closed * (price - entry) * (1 if pos > 0 else -1)
            new = pos + signed
            if abs(new) < 1e-12:
                new, entry = 0.0, 0.0
            elif (new > 0) != (pos > 0):
                entry = price
        fee = qty * price * self.fee_rate
        rec["amt"], rec["entry"] = round(new, 8), entry
        st.wallet_usdt += realized - fee
        st.next_trade_id += 1
        st.trades.append({
            "buyer": side == "BUY", "commission": repr(fee), "commissionAsset": "USDT", "id": st.next_trade_id,
            "maker": False, "orderId": order["orderId"], "price": repr(price), "qty": repr(qty),
            "quoteQty": repr(qty * price), "realizedPnl": repr(realized), "side": side, "positionSide": "BOTH",
            "symbol": sym, "time": self._now_ms,
        })
        executed = float(order["executedQty"]) + qty
        cum = float(order["cumQuote"]) + qty * price
        order.update(executedQty=repr(round(executed, 8)), cumQuote=repr(cum), avgPrice=repr(cum / executed),
                     updateTime=self._now_ms)

    def _new_market_order(self, p: dict[str, str], fault: Fault | None, triggered_by: str | None = None,
                          close_position: bool = False, side: str | None = None) -> dict[str, Any]:
        st = self.trading
        sym = self._sym(p.get("symbol"))
        side = side or p.get("side", "").upper()
        if side not in ("BUY", "SELL"):
            raise _BadRequest(-1102, "side is mandatory")
        otype = p.get("type", "MARKET").upper()
        if otype != "MARKET":
            raise _BadRequest(-1116, f"order type {otype} not supported by the fake (use algoOrder)")
        cid = p.get("newClientOrderId") or f"fake-{st.next_order_id + 1}"
        if any(o["clientOrderId"] == cid and o["status"] in ("NEW", "PARTIALLY_FILLED") for o in st.orders):
            raise _BadRequest(-4116, "ClientOrderId is duplicated.")
        reduce_only = p.get("reduceOnly", "false").lower() == "true" or close_position
        pos = float(st.pos(sym)["amt"])
        if close_position:
            qty = abs(pos)
        else:
            try:
                qty = float(p["quantity"])
            except (KeyError, ValueError):
                raise _BadRequest(-1102, "quantity is mandatory") from None
            if not np.isfinite(qty) or qty <= 0:
                raise _BadRequest(-1111, "bad quantity")
        if reduce_only:
            closing = (pos > 0 and side == "SELL") or (pos < 0 and side == "BUY")
            if not closing or pos == 0:
                raise _BadRequest(-2022, "ReduceOnly Order is rejected.")
            qty = min(qty, abs(pos))
        price = self.current_price(sym) if triggered_by is None else float(p["fill_price"])
        kernel = self._series[sym].kernel_fills
        if triggered_by is None and kernel is not None:
            open_ms = (self._now_ms // self.tf_ms) * self.tf_ms
            price = kernel.price(price, 1 if side == "BUY" else -1, kernel.slip(open_ms, self.tf_ms, price))
        floor = self._min_notional(sym)
        if not reduce_only and qty * price < floor:
            raise _BadRequest(-4164, f"Order's notional must be no smaller than {floor:g}")
        st.next_order_id += 1
        order = {
            "orderId": st.next_order_id, "symbol": sym, "status": "NEW", "clientOrderId": cid, "price": "0",
            "avgPrice": "0", "origQty": repr(qty), "executedQty": "0", "cumQuote": "0", "timeInForce": "GTC",
            "type": "MARKET", "reduceOnly": reduce_only, "closePosition": close_position, "side": side,
            "positionSide": "BOTH", "stopPrice": "0", "workingType": "CONTRACT_PRICE", "priceProtect": False,
            "origType": "MARKET", "time": self._now_ms, "updateTime": self._now_ms, "triggered_by": triggered_by,
            "accepted_ms": self._now_ms,
        }
        st.orders.append(order)
        fill_qty = qty
        if fault is not None and fault.kind == "partial_fill":
            fill_qty = float(np.floor(qty * fault.fill_ratio * 1000) / 1000)
        if fill_qty > 0:
            self._apply_fill(side, fill_qty, price, order)
        order["status"] = "FILLED" if fill_qty >= qty else "EXPIRED"
        return order

    def _new_algo_order(self, p: dict[str, str]) -> dict[str, Any]:
        st = self.trading
        sym = self._sym(p.get("symbol"))
        otype = p.get("type", "").upper()
        if otype not in ("STOP_MARKET", "TAKE_PROFIT_MARKET"):
            raise _BadRequest(-1116, f"algo order type {otype!r} not supported by the fake")
        side = p.get("side", "").upper()
        try:
            trigger = float(p["triggerPrice"])
        except (KeyError, ValueError):
            raise _BadRequest(-1102, "triggerPrice is mandatory") from None
        tick = self._tick(sym)
        if abs(round(trigger / tick) * tick - trigger) > tick * 1e-5 or trigger <= 0:
            raise _BadRequest(-4014, "Price not increased by tick size.")
        cid = p.get("clientAlgoId") or f"fakealgo-{st.next_order_id + 1}"
        if any(a["clientAlgoId"] == cid and a["algoStatus"] == "NEW" for a in st.algo_orders):
            raise _BadRequest(-4116, "ClientOrderId is duplicated.")
        price = self.current_price(sym)
        is_stop = otype == "STOP_MARKET"
        immediate = (side == "SELL" and (trigger >= price if is_stop else trigger <= price)) or (
            side == "BUY" and (trigger <= price if is_stop else trigger >= price)
        )
        if immediate:
            raise _BadRequest(-2021, "Order would immediately trigger.")
        close_position = p.get("closePosition", "false").lower() == "true"
        st.next_order_id += 1
        algo = {
            "algoId": st.next_order_id, "clientAlgoId": cid, "algoType": "CONDITIONAL", "orderType": otype,
            "symbol": sym, "side": side, "positionSide": "BOTH", "timeInForce": "GTC",
            "quantity": p.get("quantity", "0"), "algoStatus": "NEW", "triggerPrice": repr(trigger), "price": "0",
            "icebergQuantity": None, "selfTradePreventionMode": "NONE", "workingType": "CONTRACT_PRICE",
            "priceMatch": "NONE", "closePosition": close_position,
            "priceProtect": False, "reduceOnly": p.get("reduceOnly", "false").lower() == "true",
            "createTime": self._now_ms, "updateTime": self._now_ms, "triggerTime": 0, "goodTillDate": 0,
            "actualOrderId": "", "actualPrice": "", "accepted_ms": self._now_ms,
        }
        st.algo_orders.append(algo)
        return algo

    def trigger_now(self, client_algo_id: str) -> None:
        """Trigger the open conditional order ``client_algo_id`` now and fill it at its trigger price
        (a price touch inside the current bar), as :meth:`_trigger_conditionals` would."""
        with self._tlock:
            a = next(a for a in self.trading.algo_orders if a["clientAlgoId"] == client_algo_id
                     and a["algoStatus"] == "NEW")  # fmt: skip
            self._fire(a, self._now_ms)
            self._save()

    def _fire(self, a: dict[str, Any], when_ms: int, fill_price: float | None = None) -> None:
        """Trigger the conditional order ``a`` at ``when_ms``: a market order at ``fill_price`` (default its
        trigger price) when it closes the position, else it expires."""
        st = self.trading
        a["triggerTime"] = a["updateTime"] = int(when_ms)
        pos = float(st.pos(a["symbol"])["amt"])
        sell = a["side"] == "SELL"
        if not ((pos > 0 and sell) or (pos < 0 and not sell)):
            a["algoStatus"] = "EXPIRED"
            return
        a["algoStatus"] = "FINISHED"
        price = a["triggerPrice"] if fill_price is None else repr(float(fill_price))
        params = {"newClientOrderId": a["clientAlgoId"], "quantity": a["quantity"], "fill_price": price,
                  "reduceOnly": "true", "symbol": a["symbol"]}
        placed = self._new_market_order(params, None, triggered_by=a["clientAlgoId"],
                                        close_position=bool(a["closePosition"]), side=a["side"])
        a["actualOrderId"], a["actualPrice"] = str(placed["orderId"]), placed["avgPrice"]

    def _trigger_conditionals(self, old_ms: int, new_ms: int) -> None:
        """The stops and take-profits of the bars that closed in ``(old_ms, new_ms]``, bar time by bar time (every
        symbol's bar of a time, in symbol order), then :attr:`bar_closed`, then the funding at the next open."""
        st = self.trading
        closing = {sym: np.flatnonzero((m.times + self.tf_ms > old_ms) & (m.times + self.tf_ms <= new_ms))
                   for sym, m in self._series.items()}  # fmt: skip
        opens = sorted({int(self._series[sym].times[i]) for sym, idx in closing.items() for i in idx})
        changed = False
        for open_ms in opens:
            for sym, idx in closing.items():
                m = self._series[sym]
                hits = idx[m.times[idx] == open_ms]
                if not len(hits):
                    continue
                i = int(hits[0])
                _, high, low, _, _ = m.ohlcv[i]
                if m.kernel_fills is not None:
                    changed = self._kernel_exit(sym, i) or changed
                for kind in ("STOP_MARKET", "TAKE_PROFIT_MARKET"):  # stop first, as the env
                    for a in st.algo_orders:
                        if a["algoStatus"] != "NEW" or a["orderType"] != kind or a["symbol"] != sym:
                            continue
                        trig = float(a["triggerPrice"])
                        sell = a["side"] == "SELL"
                        hit = (low <= trig if sell else high >= trig) if kind == "STOP_MARKET" else (
                            high >= trig if sell else low <= trig)
                        if not hit:
                            continue
                        changed = True
                        self._fire(a, open_ms + self.tf_ms)
            if self.bar_closed is not None:
                self.bar_closed(open_ms, self)
            if self.settle_funding:
                for sym in self._series:
                    changed = self._settle_funding(sym, open_ms + self.tf_ms) or changed
        if changed:
            self._save()

    def _kernel_exit(self, symbol: str, i: int) -> bool:
        """The stop or take-profit ``symbol``'s bar ``i`` fills, in the kernel's order and at its price (module
        docstring): take-profit gapped at the open, stop (at the open when gapped), take-profit inside the bar. The
        other orders are left to the plain model (which expires them: no position any more)."""
        pos = float(self.trading.pos(symbol)["amt"])
        if pos == 0:
            return False
        m = self._series[symbol]
        s = 1 if pos > 0 else -1
        o, high, low, _, _ = (float(x) for x in m.ohlcv[i])
        closing = "SELL" if s > 0 else "BUY"
        mine = [a for a in self.trading.algo_orders
                if a["algoStatus"] == "NEW" and a["side"] == closing and a["symbol"] == symbol]  # fmt: skip
        stops = [a for a in mine if a["orderType"] == "STOP_MARKET"]
        tps = [a for a in mine if a["orderType"] == "TAKE_PROFIT_MARKET"]
        worst, best = (low, high) if s > 0 else (high, low)
        hit: tuple[dict[str, Any], float] | None = None
        for a in tps:  # the open gapped through the take-profit: it fills first, at the open
            if s * (o - float(a["triggerPrice"])) >= 0:
                hit = (a, o)
                break
        for a in stops if hit is None else ():
            trig = float(a["triggerPrice"])
            if s * (trig - worst) >= 0:
                hit = (a, o if s * (trig - o) >= 0 else trig)
                break
        for a in tps if hit is None else ():
            trig = float(a["triggerPrice"])
            if s * (best - trig) >= 0:
                hit = (a, trig)
                break
        if hit is None:
            return False
        open_ms = int(m.times[i])
        model = m.kernel_fills
        assert model is not None
        price = model.price(hit[1], -s, model.slip(open_ms, self.tf_ms, o))
        self._fire(hit[0], open_ms + self.tf_ms, fill_price=price)
        return True

    def _settle_funding(self, symbol: str, at_ms: int) -> bool:
        """Funding of ``symbol``'s settlement at ``at_ms`` (if its fixture has one) on its open position, from the
        wallet."""
        st = self.trading
        m = self._series[symbol]
        amt = float(st.pos(symbol)["amt"])
        k = int(np.searchsorted(m.f_times, at_ms))
        if amt == 0 or k >= len(m.f_times) or int(m.f_times[k]) != at_ms:
            return False
        j = int(np.searchsorted(m.times, at_ms))
        if j >= len(m.times) or int(m.times[j]) != at_ms:
            return False
        price, rate = float(m.ohlcv[j, 0]), float(m.f_rates[k])
        payment = amt * price * rate
        st.wallet_usdt -= payment
        self.funding_payments.append((at_ms, amt, price, rate, payment))
        self.funding_by_symbol[symbol].append((at_ms, amt, price, rate, payment))
        return True

    def _visible(self, order: dict[str, Any]) -> bool:
        """Whether order queries show ``order`` yet (query lag after the accept)."""
        return self._now_ms >= int(order.get("accepted_ms", 0)) + self.query_lag_ms

    def _find(self, items: list[dict[str, Any]], p: dict[str, str], id_key: str, cid_keys: tuple[str, ...],
              cid_field: str, *, lagged: bool = False) -> dict[str, Any]:
        if lagged:
            items = [o for o in items if self._visible(o)]
        if id_key in p:
            hits = [o for o in items if str(o[id_key]) == p[id_key]]
        else:
            cid = next((p[k] for k in cid_keys if k in p), None)
            if cid is None:
                raise _BadRequest(-1102, f"{id_key} or {cid_keys[0]} is mandatory")
            hits = [o for o in items if o[cid_field] == cid and not o.get("triggered_by")]
        if not hits:
            raise _BadRequest(-2013, "Order does not exist.")
        return hits[-1]  # the latest order with that client id, as Binance

    @staticmethod
    def _public(order: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in order.items() if k not in ("triggered_by", "accepted_ms")}

    def _account(self) -> dict[str, Any]:
        st = self.trading
        rows = self._position_risk(None)
        upnl = sum(float(r["unRealizedProfit"]) for r in rows)
        margin = sum(float(r["initialMargin"]) for r in rows)
        asset = {
            "asset": "USDT", "walletBalance": repr(st.wallet_usdt), "unrealizedProfit": repr(upnl),
            "marginBalance": repr(st.wallet_usdt + upnl), "maintMargin": "0", "initialMargin": repr(margin),
            "positionInitialMargin": repr(margin), "openOrderInitialMargin": "0", "crossWalletBalance": "0",
            "crossUnPnl": "0", "availableBalance": repr(st.wallet_usdt - margin),
            "maxWithdrawAmount": repr(st.wallet_usdt - margin), "marginAvailable": True, "updateTime": self._now_ms,
        }
        return {
            "totalInitialMargin": repr(margin), "totalMaintMargin": "0", "totalWalletBalance": repr(st.wallet_usdt),
            "totalUnrealizedProfit": repr(upnl), "totalMarginBalance": repr(st.wallet_usdt + upnl),
            "totalPositionInitialMargin": repr(margin), "totalOpenOrderInitialMargin": "0",
            "totalCrossWalletBalance": "0", "totalCrossUnPnl": "0", "availableBalance": repr(st.wallet_usdt - margin),
            "maxWithdrawAmount": repr(st.wallet_usdt - margin), "canTrade": True, "assets": [asset],
            "positions": rows,
        }

    def _position_risk(self, symbol: str | None) -> list[dict[str, Any]]:
        """One row per served symbol (only ``symbol``'s when given), flat ones included."""
        st = self.trading
        out = []
        for sym in ([self._sym(symbol)] if symbol is not None else list(self._series)):
            rec = st.pos(sym)
            amt, entry, lev = float(rec["amt"]), float(rec["entry"]), int(rec["leverage"])
            price = self.current_price(sym)
            upnl = amt * (price - entry) if amt else 0.0
            notional = amt * price
            margin = repr(abs(notional) / max(lev, 1))
            out.append({
                "symbol": sym, "positionSide": "BOTH", "positionAmt": repr(amt),
                "entryPrice": repr(entry), "breakEvenPrice": repr(entry), "markPrice": repr(price),
                "unRealizedProfit": repr(upnl), "unrealizedProfit": repr(upnl), "liquidationPrice": "0",
                "isolatedMargin": margin, "notional": repr(notional),
                "marginAsset": "USDT", "isolatedWallet": margin,
                "initialMargin": margin, "maintMargin": "0",
                "positionInitialMargin": margin, "openOrderInitialMargin": "0",
                "adl": 0, "bidNotional": "0", "askNotional": "0", "updateTime": self._now_ms,
                "leverage": str(lev), "marginType": str(rec["margin_type"]).lower(),
                "isolated": rec["margin_type"] == "ISOLATED", "maxNotionalValue": "1000000", "isAutoAddMargin": "false",
            })  # fmt: skip
        return out

    def _trading_route(self, method: str, path: str, p: dict[str, str], fault: Fault | None) -> Any:
        """Answer a trading request (under the trading lock); None when ``path`` is not a trading route."""
        st = self.trading
        wanted_sym = p.get("symbol")  # None: every symbol (listings), the primary (single-symbol lookups)
        if method == "POST" and path == "/fapi/v1/leverage":
            sym = self._sym(wanted_sym)
            lev = int(p.get("leverage", "0"))
            if not 1 <= lev <= 125:
                raise _BadRequest(-4028, f"Leverage {lev} is not valid")
            st.pos(sym)["leverage"] = lev
            return {"leverage": lev, "maxNotionalValue": "1000000", "symbol": sym}
        if method == "POST" and path == "/fapi/v1/marginType":
            rec = st.pos(self._sym(wanted_sym))
            mt = p.get("marginType", "").upper()
            if mt not in ("ISOLATED", "CROSSED"):
                raise _BadRequest(-1102, "bad marginType")
            if mt == rec["margin_type"]:
                raise _BadRequest(-4046, "No need to change margin type.")
            rec["margin_type"] = mt
            return {"code": 200, "msg": "success"}

        def of_symbol(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return items if wanted_sym is None else [o for o in items if o["symbol"] == self._sym(wanted_sym)]
        if path == ORDER:
            if method == "POST":
                return self._public(self._new_market_order(p, fault))
            order = self._find(of_symbol(st.orders), p, "orderId", ("origClientOrderId",), "clientOrderId",
                               lagged=method == "GET")
            if method == "DELETE":
                if order["status"] not in ("NEW", "PARTIALLY_FILLED"):
                    raise _BadRequest(-2011, "Unknown order sent.")
                order["status"] = "CANCELED"
            return self._public(order)
        if path == ALGO_ORDER:
            if method == "POST":
                return self._public(self._new_algo_order(p))
            algo = self._find(of_symbol(st.algo_orders), p, "algoId", ("clientAlgoId", "origClientOrderId"),
                              "clientAlgoId", lagged=method == "GET")
            if method == "DELETE":
                if algo["algoStatus"] != "NEW":
                    raise _BadRequest(-2011, "Unknown order sent.")
                algo["algoStatus"] = "CANCELED"
                algo["updateTime"] = self._now_ms
                return {"algoId": algo["algoId"], "clientAlgoId": algo["clientAlgoId"], "code": "200",
                        "msg": "success"}
            return self._public(algo)
        if method != "GET":
            return None
        if path == "/fapi/v1/positionSide/dual":
            return {"dualSidePosition": st.dual_side}
        if path == "/fapi/v1/leverageBracket":
            wanted = [p["symbol"]] if p.get("symbol") else list(self.markets)
            return [{"symbol": sym, "notionalCoef": 1.0, "brackets": [dict(b) for b in self.markets[sym]["brackets"]]}
                    for sym in wanted if sym in self.markets]
        if path == "/fapi/v1/openOrders":
            return [self._public(o) for o in of_symbol(st.orders)
                    if o["status"] in ("NEW", "PARTIALLY_FILLED") and self._visible(o)]  # fmt: skip
        if path == "/fapi/v1/allOrders":
            return [self._public(o) for o in of_symbol(st.orders) if self._visible(o)][-int(p.get("limit", 500)):]
        if path in ("/fapi/v1/openAlgoOrders", "/fapi/v1/algoOpenOrders"):
            return [self._public(a) for a in of_symbol(st.algo_orders) if a["algoStatus"] == "NEW" and self._visible(a)]
        if path in ("/fapi/v1/allAlgoOrders", "/fapi/v1/algoOrders"):
            return [self._public(a) for a in of_symbol(st.algo_orders)
                    if self._visible(a)][-int(p.get("limit", 500)):]  # fmt: skip
        if path == "/fapi/v1/userTrades":
            trades = of_symbol(st.trades)
            if "fromId" in p:
                trades = [t for t in trades if t["id"] >= int(p["fromId"])]
            elif "startTime" in p:
                trades = [t for t in trades if t["time"] >= int(p["startTime"])]
            return trades[: int(p.get("limit", 500))]
        if path in ("/fapi/v2/positionRisk", "/fapi/v3/positionRisk"):
            return self._position_risk(wanted_sym)
        if path in ("/fapi/v2/account", "/fapi/v3/account"):
            return self._account()
        if path in ("/fapi/v2/balance", "/fapi/v3/balance"):
            acc = self._account()["assets"][0]
            return [{"accountAlias": "fake", "asset": "USDT", "balance": acc["walletBalance"],
                     "crossWalletBalance": "0", "crossUnPnl": "0", "availableBalance": acc["availableBalance"],
                     "maxWithdrawAmount": acc["maxWithdrawAmount"], "marginAvailable": True,
                     "updateTime": self._now_ms}]
        return None

    # -- responses -------------------------------------------------------------------------------
    def _klines(self, params: dict[str, str], fault: Fault | None) -> list[list[Any]]:
        if params.get("interval") != self.timeframe:
            raise _BadRequest(-1120, f"invalid interval {params.get('interval')!r}")
        m = self._market(params.get("symbol"))
        limit = min(int(params.get("limit", 500)), 1500)
        start = int(params["startTime"]) if "startTime" in params else None
        end = min(int(params.get("endTime", self.now_ms)), self.now_ms)
        if fault is not None and fault.kind == "past_end":
            end = self.now_ms
        if fault is not None and fault.kind == "overlap" and start is not None:
            start -= fault.bars * self.tf_ms
        with self._lock:
            bad = dict(m.bad_candles)
        mask = m.times <= end
        if start is not None:
            mask &= m.times >= start
        dropped = [t for t, values in bad.items() if values is None]
        if dropped:
            mask &= ~np.isin(m.times, dropped)
        pos = np.flatnonzero(mask)
        pos = pos[:limit] if start is not None else pos[-limit:]
        rows = []
        for i in pos:
            t = int(m.times[i])
            o, h, low, c, v = (float(x) for x in m.ohlcv[i])
            if t + self.tf_ms > self.now_ms:  # still open: partial values
                c = o
                h, low, v = max(o, c), min(o, c), v / 7.0
            if bad.get(t):
                o, h, low, c, v = (bad[t].get(k, x) for k, x in zip(("open", "high", "low", "close", "volume"),
                                                                     (o, h, low, c, v), strict=True))
            rows.append([t, repr(o), repr(h), repr(low), repr(c), repr(v), t + self.tf_ms - 1,
                         "0", 0, "0", "0", "0"])
        if fault is not None and fault.kind == "duplicate":
            rows = [r for r in rows for _ in (0, 1)]
        if fault is not None and fault.kind == "reverse":
            rows = rows[::-1]
        if fault is not None and fault.kind == "null_rows":
            rows = [[None] * 12 for _ in rows]
        if fault is not None and fault.kind == "nan_close":
            last_closed = (self.now_ms // self.tf_ms) * self.tf_ms - self.tf_ms
            for r in rows:
                if r[0] == last_closed:
                    r[4] = "NaN"
        if fault is not None and fault.kind == "gap" and len(rows) > 4:
            del rows[len(rows) // 2]
        return rows

    def _funding(self, params: dict[str, str], fault: Fault | None) -> list[dict[str, Any]]:
        sym = self._sym(params.get("symbol"))
        m = self._series[sym]
        limit = min(int(params.get("limit", 100)), 1000)
        start = int(params.get("startTime", 0))
        end = min(int(params.get("endTime", self.now_ms)), self.now_ms)
        pos = np.flatnonzero((m.f_times >= start) & (m.f_times <= end))[:limit]
        rows = [
            {"symbol": sym, "fundingTime": int(m.f_times[i]), "fundingRate": repr(float(m.f_rates[i])),
             "markPrice": "0"}
            for i in pos
        ]
        if fault is not None and fault.kind == "duplicate":
            rows = [r for r in rows for _ in (0, 1)]
        if fault is not None and fault.kind == "reverse":
            rows = rows[::-1]
        return rows

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: str, ctype: str = "application/json", headers: dict | None = None):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeout fault)
                    self.wfile.write(data)

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_POST(self) -> None:
                self._dispatch("POST")

            def do_DELETE(self) -> None:
                self._dispatch("DELETE")

            def _dispatch(self, method: str) -> None:
                parts = urlsplit(self.path)
                params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    body_text = self.rfile.read(length).decode()
                    params.update({k: v[-1] for k, v in parse_qs(body_text).items()})
                path = parts.path
                with fake._lock:
                    fake.requests.append((path if method == "GET" else f"{method} {path}", params))
                sym = params.get("symbol")
                fault = fake._next_fault(f"{method} {path}", sym) or (
                    fake._next_fault(path, sym) if method == "GET" else None)
                if fault is not None:
                    if fault.kind == "status_429":
                        body = json.dumps({"code": -1003, "msg": "Too many requests; current limit is 2400."})
                        return self._send(429, body, headers={"Retry-After": str(fault.retry_after_s)})
                    if fault.kind == "html_5xx":
                        return self._send(503, "<html><body>503 Service Unavailable</body></html>", "text/html")
                    if fault.kind == "json_5xx":
                        body = json.dumps({"code": -1000, "msg": "An unknown error occurred while processing."})
                        return self._send(500, body)
                    if fault.kind == "echo_key":  # a careless venue error quoting the API key
                        key = self.headers.get("X-MBX-APIKEY", "")
                        body = json.dumps({"code": -1111, "msg": f"Invalid order for API-key {key}"})
                        return self._send(400, body)
                    if fault.kind == "auth_error":
                        body = json.dumps({"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."})
                        return self._send(401, body)
                    if fault.kind == "delay":
                        fake._release.wait(fault.delay_s)
                    if fault.kind == "before" and fault.action is not None:
                        fault.action()
                try:
                    if path == "/fapi/v1/time":
                        body: Any = {"serverTime": fake.now_ms}
                    elif path == "/fapi/v1/exchangeInfo":
                        with fake._lock:
                            body = _exchange_info(fake.now_ms, fake.markets)
                    elif path == KLINES:
                        body = fake._klines(params, fault)
                    elif path == FUNDING:
                        body = fake._funding(params, fault)
                    else:
                        with fake._tlock:
                            body = fake._trading_route(method, path, params, fault)
                            if body is not None and method != "GET":
                                fake._save()
                        if body is None:
                            return self._send(404, json.dumps({"code": -1, "msg": f"no route {method} {path}"}))
                except _BadRequest as exc:
                    return self._send(400, json.dumps({"code": exc.code, "msg": exc.msg}))
                if fault is not None and fault.kind == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(2)  # socket.SHUT_RDWR: no answer at all
                    return None
                if fault is not None and fault.kind == "accept_then_delay":
                    fake._release.wait(fault.delay_s)
                if fault is not None and fault.kind == "mutate" and fault.transform is not None:
                    body = fault.transform(json.loads(json.dumps(body)))  # a copy: the exchange's record stays
                text = json.dumps(body)
                if fault is not None and fault.kind == "truncated_json":
                    text = text[: max(1, len(text) // 2)]
                if fault is not None and fault.kind == "empty_body":
                    text = ""
                self._send(200, text)

        return Handler


def assert_consistent(fake: FakeBinance, store: Any, symbol: str = "BTCUSDT") -> None:
    """The invariants of a serving run against ``fake`` (test helper): no client id placed twice, the
    stored position of ``symbol`` equal to the exchange's, and not blocked (``store``: a
    :class:`serving.store.StateStore`; its latest events are shown when blocked)."""
    dup = {k: v for k, v in fake.orders_by_client_id().items() if v != 1}
    assert dup == {}, f"duplicate orders on the exchange: {dup}"
    amt, _ = fake.position(symbol)
    last = store.last_position(symbol)
    assert last.side * last.qty_base == pytest.approx(amt, abs=1e-9)
    assert not store.position_blocked(symbol), store.events()[["kind", "detail"]].tail(8)


class _BadRequest(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code, self.msg = code, msg
