"""Binance USDⓈ-M futures broker over ccxt ``binanceusdm`` (testnet/sandbox or live).

What it does: isolated margin and integer leverage per symbol, market entries/exits, reduce-only
``closePosition`` STOP_MARKET / TAKE_PROFIT_MARKET orders (conditional "algo" orders on current
Binance: ccxt routes them to ``/fapi/v1/algoOrder`` and they are fetched/cancelled with
``params={"trigger": True}``), cancel and lookup by client id, positions, open orders, fills
(user trades), equity, server time and candles. Precision and limits come from
``load_markets`` (``exchangeInfo`` filters) as :class:`serving.intents.MarketRules`.

Every ccxt exception is mapped to a class of :mod:`serving.errors` by :func:`classify_error`
(following the ccxt Manual, "Error Handling", and ``../shared/reference/ccxt-notes.md``):

* ``AuthenticationError``, ``PermissionDenied``, ``AccountSuspended`` -> :class:`FatalError`;
* ``DDoSProtection`` / ``RateLimitExceeded`` (HTTP 429/418; siblings in ccxt 4.5) ->
  :class:`RateLimitedError` (a :class:`RetryableError` carrying ``Retry-After``), on reads and
  creates alike: the request was refused by the rate limiter, but the live loop still looks the
  client id up before it sends again;
* ``RequestTimeout``, other ``NetworkError`` (incl. ``ExchangeNotAvailable``) and
  ``OperationFailed`` (Binance -1000/-1001 in a 5xx body, not a ``NetworkError`` in ccxt) ->
  :class:`RetryableError` on reads, :class:`AmbiguousOutcomeError` on a create (it may have been
  accepted); any non-ccxt exception likewise;
* ``BadResponse`` (incl. ``NullResponse``: ccxt could not read the answer) ->
  :class:`serving.errors.MalformedResponseError` on reads, :class:`AmbiguousOutcomeError` on a create;
* ``InvalidOrder``, ``InsufficientFunds``, ``BadRequest``, ``BadSymbol``, other
  ``ExchangeError`` -> :class:`RejectedError` (deterministic for the same input).

**Malformed answers are unknown, not empty.** ccxt raises nothing for an HTTP 200 whose body is
truncated or empty (``ccxt-notes.md``): ``fetch_positions`` then returns ``[]``, which would read
as a flat position. The client keeps its last parsed body (``enableLastJsonResponse``), and every
read here checks that the answer was JSON of the promised shape and that each record has the
fields we act on; otherwise it raises :class:`serving.errors.MalformedResponseError` (retryable,
with the raw record) and nothing of it is used.

Reads are retried with tenacity (:meth:`BinanceFuturesBroker._read`), honouring ``Retry-After``
and otherwise with capped exponential backoff with jitter. **A create is never retried here**:
an ambiguous create must be resolved by :meth:`BinanceFuturesBroker.lookup` (client id) by the
caller (``serving.live``).

It is the exchange implementation of :class:`serving.broker.ExchangeBroker` (the :class:`serving.broker.Broker`
protocol plus clock, candles and account setup); :class:`serving.broker.OrderSnapshot` and
:class:`serving.broker.TradeFill` are importable from here too.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import ccxt
import pandas as pd
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from market.instruments import DEFAULT_CCXT_SYMBOL, InstrumentSpec, exchange_filters, spec_from_ccxt_market
from serving.broker import Balance, OrderSnapshot, TradeFill
from serving.errors import (
    AmbiguousOutcomeError,
    FatalError,
    MalformedResponseError,
    RejectedError,
    RetryableError,
    ServingError,
)
from serving.intents import ExchangePosition, MarketRules, OrderIntent
from serving.secrets import install_log_redaction

T = TypeVar("T")


class RateLimitedError(RetryableError):
    """HTTP 429/418: back off for ``retry_after_s`` seconds (from the ``Retry-After`` header) before any request."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = float(retry_after_s)


def _retry_after_s(client: Any, default_s: float = 1.0) -> float:
    headers = getattr(client, "last_response_headers", None) or {}
    for key, value in dict(headers).items():
        if str(key).lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                break
    return default_s


def classify_error(exc: BaseException, *, during_create: bool, client: Any = None) -> ServingError:
    """Map an exception raised by a ccxt call to a :mod:`serving.errors` class (module table).

    Parameters
    ----------
    exc : BaseException
        What the ccxt call raised (a non-ccxt exception during a create is ambiguous too: the
        request may have left).
    during_create : bool
        True for ``create_order``: a network/timeout/5xx outcome is then ambiguous.
    client : ccxt.Exchange | None
        Used to read the ``Retry-After`` header of a 429.
    """
    msg = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, (ccxt.AuthenticationError, ccxt.PermissionDenied, ccxt.AccountSuspended)):
        return FatalError(msg)
    if isinstance(exc, (ccxt.DDoSProtection, ccxt.RateLimitExceeded)):
        return RateLimitedError(msg, _retry_after_s(client))
    if isinstance(exc, (ccxt.NetworkError, ccxt.OperationFailed)):
        return AmbiguousOutcomeError(msg) if during_create else RetryableError(msg)
    if isinstance(exc, ccxt.BadResponse):
        return AmbiguousOutcomeError(msg) if during_create else MalformedResponseError(msg)
    if during_create and ("-4116" in str(exc) or "duplicate" in str(exc).lower()):
        # Binance -4116 "ClientOrderId is duplicated": an open order already has this id, i.e. an
        # earlier attempt did reach the exchange. Not a rejection of the intent: look it up.
        return AmbiguousOutcomeError(f"duplicate client order id, the order exists: {msg}")
    if isinstance(exc, (ccxt.InvalidOrder, ccxt.InsufficientFunds, ccxt.BadRequest, ccxt.BadSymbol,
                        ccxt.ArgumentsRequired, ccxt.ExchangeError)):  # fmt: skip
        return RejectedError(msg)
    return AmbiguousOutcomeError(msg) if during_create else RetryableError(msg)


def _finite(name: str, value: Any, where: str, record: Any = None) -> float:
    """``value`` as a finite float, else :class:`MalformedResponseError` naming ``where`` and ``name``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise MalformedResponseError(f"{where}: field {name!r} is not a number: {value!r}", record) from None
    if not math.isfinite(x):
        raise MalformedResponseError(f"{where}: field {name!r} is not finite: {value!r}", record)
    return x


def _integer(name: str, value: Any, where: str, record: Any) -> int:
    """``value`` as an int (an integral number or digit string), else :class:`MalformedResponseError`."""
    if isinstance(value, bool) or value is None:
        raise MalformedResponseError(f"{where}: field {name!r} is missing or not an integer: {value!r}", record)
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise MalformedResponseError(f"{where}: field {name!r} is not an integer: {value!r}", record) from None
    if not math.isfinite(x) or x != int(x):
        raise MalformedResponseError(f"{where}: field {name!r} is not an integer: {value!r}", record)
    return int(x)


def _given(fields: dict[str, float | None], name: str) -> float:
    """``fields[name]`` as a float; ValueError when the exchange's filters do not give it."""
    value = fields[name]
    if value is None:
        raise ValueError(f"{name} missing")
    return float(value)


def _list_of_dicts(value: Any, where: str) -> list[dict[str, Any]]:
    """``value`` when it is a list of dicts, else :class:`MalformedResponseError`."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise MalformedResponseError(f"{where}: expected a list of records", value)
    return value


def _redirect_urls(urls: Any, base_url: str) -> Any:
    """Copy of a ccxt ``urls`` tree with every http(s) URL's scheme+host replaced by ``base_url``."""
    base = base_url.rstrip("/")
    if isinstance(urls, dict):
        return {k: _redirect_urls(v, base) for k, v in urls.items()}
    if isinstance(urls, list):
        return [_redirect_urls(v, base) for v in urls]
    if isinstance(urls, str) and urls.startswith(("http://", "https://")):
        parts = urlsplit(urls)
        return base + parts.path
    return urls


def make_client(
    *,
    api_key: str | None,
    secret: str | None,
    sandbox: bool = True,
    base_url: str | None = None,
    timeout_ms: int = 10_000,
    rate_limit: bool = True,
) -> ccxt.binanceusdm:
    """A configured ccxt ``binanceusdm`` client (one per key: it owns the rate limiter).

    ``sandbox=True`` switches to the Binance futures testnet (``set_sandbox_mode(True)`` is called
    before any request). ``base_url`` (tests) redirects every URL group, including ``test`` and
    ``demo``, to a local server and applies the USDⓈ-M error-code table to it. The key and
    secret are scrubbed from the ccxt/urllib3 loggers (:func:`serving.secrets.install_log_redaction`). ``rate_limit``
    (ccxt's own request throttle) stays on except against a local test server.
    """
    if api_key or secret:
        install_log_redaction([api_key or "", secret or ""])  # ccxt logs request headers at DEBUG
    client = ccxt.binanceusdm({
        "apiKey": api_key or "", "secret": secret or "", "enableRateLimit": bool(rate_limit),
        "timeout": int(timeout_ms),
        "options": {"fetchCurrencies": False, "adjustForTimeDifference": False,
                    "fetchOpenOrders": {"warnWithoutSymbol": False}},
        # keep the parsed body of the last answer: a read checks that it was JSON (module docstring)
        "enableLastJsonResponse": True,
    })  # fmt: skip
    if base_url is not None:
        for group in ("api", "test", "demo"):
            if group in client.urls:
                client.urls[group] = _redirect_urls(client.urls[group], base_url)
        linear = client.exceptions.get("linear", {})
        client.exceptions["exact"] = {**client.exceptions.get("exact", {}), **linear.get("exact", {})}
        client.exceptions["broad"] = {**client.exceptions.get("broad", {}), **linear.get("broad", {})}
    if sandbox:
        client.set_sandbox_mode(True)
    return client


def _default_wait(state: RetryCallState, base_s: float, cap_s: float) -> float:
    exc = state.outcome.exception() if state.outcome is not None else None
    if isinstance(exc, RateLimitedError):
        return exc.retry_after_s
    return min(cap_s, base_s * 2 ** (state.attempt_number - 1)) * (0.5 + random.random() / 2)


class BinanceFuturesBroker:
    """Orders, positions and fills of one USDⓈ-M perpetual on Binance via ccxt.

    Parameters
    ----------
    client : ccxt.binanceusdm
        From :func:`make_client` (keep one instance per key for the rate limiter).
    symbol : str
        Unified ccxt symbol, e.g. ``"BTC/USDT:USDT"``.
    read_attempts : int
        Tries of a read (fetch, cancel lookups) on a retryable error, >= 1.
    backoff_base_s, backoff_cap_s : float
        Exponential backoff with jitter: ``min(cap, base * 2**(n-1)) * U(0.5, 1)`` seconds;
        a 429 waits its ``Retry-After`` instead.
    sleep : Callable[[float], None]
        Injected for tests (``time.sleep`` by default).
    """

    def __init__(
        self,
        client: Any,
        symbol: str = DEFAULT_CCXT_SYMBOL,
        *,
        read_attempts: int = 4,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if read_attempts < 1:
            raise ValueError(f"read_attempts must be >= 1, got {read_attempts}")
        self.client = client
        self.symbol = symbol
        self.read_attempts = int(read_attempts)
        self.backoff_base_s, self.backoff_cap_s = float(backoff_base_s), float(backoff_cap_s)
        self._sleep = sleep
        self._rules: MarketRules | None = None
        self._market_id: str | None = None
        self._market: dict[str, Any] | None = None
        self.sleeps: list[float] = []  # every backoff slept, for audits and tests
        #: a redirected REST base URL (``ats serve --base-url``), recorded in the live_started event
        self.base_url: str | None = None

    # -- plumbing -------------------------------------------------------------------------------
    def _tracks_body(self) -> bool:
        return bool(getattr(self.client, "enableLastJsonResponse", False))

    def _call(self, fn: Callable[[], T], *, during_create: bool = False, where: str | None = None) -> T:
        """Run one ccxt call, mapping its errors (:func:`classify_error`). With ``where`` (a call that
        always sends a request), the answer must have been a JSON body, else
        :class:`MalformedResponseError` naming ``where``."""
        check = where is not None and self._tracks_body()
        if check:
            self.client.last_json_response = None
        try:
            out = fn()
        except Exception as exc:
            if check and not isinstance(exc, ccxt.BaseError) and self.client.last_json_response is None:
                # ccxt tripped over a body it could not parse: unknown, not a bug of ours
                raise MalformedResponseError(f"{where}: the answer is not JSON ({type(exc).__name__} in ccxt)",
                                             getattr(self.client, "last_http_response", None)) from exc
            raise classify_error(exc, during_create=during_create, client=self.client) from exc
        if check and self.client.last_json_response is None:
            raise MalformedResponseError(f"{where}: the answer is not JSON (truncated or empty body)",
                                         getattr(self.client, "last_http_response", None))
        return out

    def _read(self, fn: Callable[[], T], where: str | None = None) -> T:
        """Run a read with retries on :class:`RetryableError` (tenacity), re-raising the last error.

        ``where`` names the request for :meth:`_call`'s JSON-body check (None: no check, for calls
        that may be answered from ccxt's cache, such as ``load_markets``)."""

        def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)
            self._sleep(seconds)

        retrying = Retrying(
            retry=retry_if_exception_type(RetryableError),
            stop=stop_after_attempt(self.read_attempts),
            wait=lambda s: _default_wait(s, self.backoff_base_s, self.backoff_cap_s),
            sleep=sleep,
            reraise=True,
        )
        return retrying(lambda: self._call(fn, where=where))

    @property
    def rules(self) -> MarketRules:
        """Precision and limits of the symbol (after :meth:`load`)."""
        if self._rules is None:
            raise RuntimeError("call load() first")
        return self._rules

    @property
    def market_id(self) -> str:
        """Exchange symbol, e.g. ``BTCUSDT`` (after :meth:`load`)."""
        if self._market_id is None:
            raise RuntimeError("call load() first")
        return self._market_id

    # -- setup ----------------------------------------------------------------------------------
    def load(self) -> MarketRules:
        """Load markets and derive :class:`MarketRules` from the symbol's filters.

        Raises
        ------
        FatalError
            Unknown symbol or filters missing/non-finite (the loop cannot size orders).
        """
        markets = self._read(lambda: self.client.load_markets())
        if self.symbol not in markets:
            raise FatalError(f"symbol {self.symbol!r} not listed by the exchange")
        m = markets[self.symbol]
        try:
            f = exchange_filters(m.get("info") or {}, str(m.get("id")))
            mx = f["max_market_qty_base"]
            rules = MarketRules(
                symbol=str(m["id"]), tick_size_usdt=_given(f, "tick_size_usdt"), step_size_base=_given(f, "lot_step_base"),
                min_qty_base=_given(f, "min_qty_base"), max_qty_base=math.inf if mx is None else float(mx),
                min_notional_usdt=_given(f, "min_notional_usdt"),
            )
        except (KeyError, TypeError, ValueError) as exc:  # InstrumentSpecError is a ValueError
            raise FatalError(f"market {self.symbol!r}: cannot read precision/limits from exchangeInfo: {exc}") from exc
        self._rules, self._market_id, self._market = rules, str(m["id"]), m
        return rules

    def instrument_spec(self, fallback: InstrumentSpec | None) -> InstrumentSpec:
        """The symbol's :class:`market.instruments.InstrumentSpec` from the loaded market (after :meth:`load`): the
        exchange's filters, and the brackets and max leverage of ``fallback`` (a spec of the same symbol; the
        bracket endpoint needs API keys). Source and date say so.

        Raises
        ------
        market.instruments.InstrumentSpecError
            No ``fallback`` of the same symbol, or filters that do not make a valid spec.
        """
        if self._market is None:
            raise RuntimeError("call load() first")
        return spec_from_ccxt_market(self._market, None, fallback=fallback, exchange_label=f"exchange {self.symbol}")

    def set_isolated_margin(self) -> None:
        """Switch the symbol to isolated margin (already isolated is fine)."""
        try:
            self._read(lambda: self.client.set_margin_mode("isolated", self.symbol))
        except RejectedError as exc:
            if "MarginModeAlreadySet" in str(exc) or "-4046" in str(exc) or "No need to change" in str(exc):
                return
            raise

    def require_one_way_mode(self) -> None:
        """Refuse a hedge-mode account (positions are read and closed as one net position per symbol).

        Raises
        ------
        FatalError
            The account is in hedge (dual-side) mode.
        """
        mode = self._read(lambda: self.client.fetch_position_mode(self.symbol), "positionSide/dual")
        if (mode or {}).get("hedged"):
            raise FatalError("the account is in hedge (dual-side) position mode; switch it to one-way mode")

    def set_leverage(self, leverage: int) -> None:
        """Set integer leverage (1..125) on the symbol."""
        if not isinstance(leverage, int) or not 1 <= leverage <= 125:
            raise RejectedError(f"leverage must be an int in [1, 125], got {leverage!r}")
        self._read(lambda: self.client.set_leverage(leverage, self.symbol))

    # -- market data ----------------------------------------------------------------------------
    def server_time_ms(self) -> int:
        """Exchange clock, ms since the epoch."""
        value = self._read(lambda: self.client.fetch_time(), "time")
        if value is None:
            raise RetryableError("fetch_time returned no server time (malformed answer)")
        return int(value)

    def fetch_ohlcv(self, timeframe: str, since_ms: int | None, limit: int, until_ms: int | None = None
                    ) -> list[list[Any]]:  # fmt: skip
        """Raw ``[[open_ms, o, h, l, c, v], ...]`` rows as the exchange gave them (validate before use).

        At most ``limit`` rows opening at or after ``since_ms`` and, with ``until_ms``, at or before
        it (ms; ccxt ``params={"until": ...}``, Binance ``endTime``). ccxt ``binanceusdm`` caps
        ``limit`` at 1,000 (Binance serves 1,500): read longer ranges in pages
        (:func:`serving.candles.page_requests`).
        """
        params = {} if until_ms is None else {"until": int(until_ms)}
        rows = self._read(lambda: self.client.fetch_ohlcv(self.symbol, timeframe, since_ms, limit, params))
        if not isinstance(rows, list):
            raise RetryableError(f"fetch_ohlcv returned {type(rows).__name__}, not a list")
        return rows

    def fetch_funding(self, since_ms: int, limit: int = 1000) -> list[tuple[int, float]]:
        """Funding settlements ``(funding time ms, rate)`` from ``since_ms``, oldest first.

        Raises
        ------
        RetryableError
            A settlement without a time or with a non-numeric/non-finite rate (never used).
        """
        rows = _list_of_dicts(self._read(
            lambda: self.client.fetch_funding_rate_history(self.symbol, since_ms, limit), "fundingRate"), "funding")
        out: list[tuple[int, float]] = []
        for r in rows:
            ts = _integer("timestamp", r.get("timestamp"), "funding", r)
            out.append((ts, _finite("fundingRate", r.get("fundingRate"), "funding", r)))
        return sorted(out)

    # -- orders ---------------------------------------------------------------------------------
    def _snapshot(self, order: dict[str, Any], conditional: bool, where: str, *, read: bool = True) -> OrderSnapshot:
        """The :class:`OrderSnapshot` of a ccxt order. A record without an id is
        :class:`MalformedResponseError` on a read and :class:`AmbiguousOutcomeError` on a create
        (``read=False``: the order may exist all the same)."""
        if not isinstance(order, dict) or order.get("id") is None:
            if not read:
                raise AmbiguousOutcomeError(f"{where}: answer without an order id: {order!r}")
            raise MalformedResponseError(f"{where}: order record without an id", order)
        info = order.get("info") or {}
        actual = info.get("actualOrderId") if isinstance(info, dict) else None
        cid = order.get("clientOrderId") or info.get("clientOrderId") or info.get("clientAlgoId") or ""
        filled = order.get("filled")
        avg = order.get("average")
        trigger = order.get("triggerPrice") or order.get("stopPrice")
        return OrderSnapshot(
            client_id=str(cid), exchange_id=str(order["id"]), status=str(order.get("status") or "open"),
            side=str(order.get("side") or info.get("side") or "").lower(),
            order_type=str(info.get("orderType") or info.get("type") or order.get("type") or "").lower(),
            amount_base=float(order.get("amount") or 0.0),
            filled_base=0.0 if filled is None else _finite("filled", filled, where),
            average_price=None if not avg else _finite("average", avg, where),
            trigger_price=None if not trigger else _finite("triggerPrice", trigger, where),
            conditional=conditional, reduce_only=bool(order.get("reduceOnly") or info.get("closePosition")),
            actual_order_id=None if actual in (None, "", 0, "0") else str(actual),
        )  # fmt: skip

    def create(self, intent: OrderIntent) -> OrderSnapshot:
        """Send ``intent`` ONCE (never retried).

        Raises
        ------
        AmbiguousOutcomeError
            Timeout, network error, 5xx or a malformed answer: the order may exist; look it up by
            ``intent.client_id`` before anything else.
        RateLimitedError
            HTTP 429: not sent; wait ``retry_after_s``.
        RejectedError
            The exchange refused it (do not resend the same input).
        FatalError
            Authentication/permission.
        """
        conditional = intent.order_type in ("stop_market", "take_profit_market")
        params: dict[str, Any] = {"clientOrderId": intent.client_id}
        if conditional:
            params["triggerPrice"] = intent.trigger_price
            if intent.close_position:
                params["closePosition"] = True
            else:
                params["reduceOnly"] = True
            otype = "STOP_MARKET" if intent.order_type == "stop_market" else "TAKE_PROFIT_MARKET"
            amount = None if intent.close_position else intent.qty_base
        else:
            if intent.reduce_only:
                params["reduceOnly"] = True
            otype, amount = "market", intent.qty_base
        order = self._call(
            lambda: self.client.create_order(self.symbol, otype, intent.side, amount, None, params),
            during_create=True,
        )
        return self._snapshot(order, conditional, f"create {intent.client_id}", read=False)

    def lookup(self, client_id: str, *, conditional: bool) -> OrderSnapshot | None:
        """The order with ``client_id`` (latest one if reused), None if the exchange has none."""
        params: dict[str, Any] = {"origClientOrderId": client_id}
        if conditional:
            params["trigger"] = True

        def fetch() -> Any:
            try:
                return self.client.fetch_order(None, self.symbol, params)
            except ccxt.OrderNotFound:
                return None

        order = self._read(fetch, "algoOrder" if conditional else "order")
        return None if order is None else self._snapshot(order, conditional, f"lookup {client_id}")

    def cancel(self, client_id: str, *, conditional: bool) -> OrderSnapshot | None:
        """Cancel the order ``client_id``; None if it no longer exists or is no longer open."""
        params: dict[str, Any] = {"origClientOrderId": client_id}
        if conditional:
            params["trigger"] = True

        def cancel() -> Any:
            try:
                return self.client.cancel_order(None, self.symbol, params)
            except ccxt.OrderNotFound:
                return None

        order = self._read(cancel)
        if order is None:
            return None
        snap = self._snapshot(order, conditional, f"cancel {client_id}")
        return dataclasses.replace(snap, client_id=snap.client_id or client_id, status="canceled")

    def open_orders(self) -> list[OrderSnapshot]:
        """Open regular and conditional orders of the symbol."""
        regular = _list_of_dicts(self._read(lambda: self.client.fetch_open_orders(self.symbol), "openOrders"),
                                 "open orders")
        algo = _list_of_dicts(self._read(lambda: self.client.fetch_open_orders(self.symbol, None, None, {"trigger": True}),
                                         "openAlgoOrders"), "open conditional orders")
        return [self._snapshot(o, False, "open orders") for o in regular] + [
            self._snapshot(o, True, "open conditional orders") for o in algo
        ]

    # -- account --------------------------------------------------------------------------------
    def position(self) -> ExchangePosition:
        """The one-way position of the symbol (side, absolute quantity, entry price).

        An empty list is a flat position (the v3 ``positionRisk`` lists only symbols with a
        position or open orders) only when the answer was a JSON list; a row of the symbol
        without a finite ``positionAmt`` (or, when open, ``entryPrice``) is malformed.

        Raises
        ------
        MalformedResponseError
            The answer was not a JSON list of records, or a record of the symbol lacks those fields.
        """
        rows = _list_of_dicts(self._read(lambda: self.client.fetch_positions([self.symbol]), "positionRisk"),
                              "positions")
        amt, entry = 0.0, 0.0
        for p in rows:
            if p.get("symbol") != self.symbol:
                continue
            info = p.get("info")
            if not isinstance(info, dict):
                raise MalformedResponseError("positions: record without its exchange fields", p)
            row_amt = _finite("positionAmt", info.get("positionAmt"), "positions", info)
            amt += row_amt
            if row_amt != 0:
                entry = _finite("entryPrice", info.get("entryPrice"), "positions", info)
        if amt == 0:
            return ExchangePosition()
        return ExchangePosition(1 if amt > 0 else -1, abs(amt), entry)

    def balance(self) -> Balance:
        """Wallet, unrealised PnL and margin balance (equity) in USDT, from one account read.

        Binance's ``totalWalletBalance``, ``totalUnrealizedProfit`` and ``totalMarginBalance``; an answer without
        them (another venue) gives the USDT total as wallet and equity, with no unrealised PnL.

        Raises
        ------
        MalformedResponseError
            The answer is not a record, or a field read is not a finite number.
        """
        bal = self._read(lambda: self.client.fetch_balance(), "account")
        if not isinstance(bal, dict):
            raise MalformedResponseError("balance: not a record", bal)
        info = bal.get("info") or {}
        if "totalMarginBalance" in info:
            equity = _finite("totalMarginBalance", info["totalMarginBalance"], "balance")
            wallet = _finite("totalWalletBalance", info.get("totalWalletBalance", equity), "balance")
            upnl = _finite("totalUnrealizedProfit", info.get("totalUnrealizedProfit", equity - wallet), "balance")
            return Balance(wallet, upnl, equity)
        total = _finite("USDT total", (bal.get("USDT") or {}).get("total"), "balance")
        return Balance(total, 0.0, total)

    def equity_usdt(self) -> float:
        """Margin balance (wallet + unrealised PnL) in USDT: ``balance().equity_usdt``."""
        return self.balance().equity_usdt

    def fills_since(self, last_trade_id: int | None, since_ms: int | None = None) -> list[TradeFill]:
        """User trades with id > ``last_trade_id`` (all recent ones when None), oldest first."""
        params: dict[str, Any] = {}
        if last_trade_id is not None:
            params["fromId"] = int(last_trade_id) + 1
        since = None if last_trade_id is not None else since_ms
        trades = _list_of_dicts(self._read(
            lambda: self.client.fetch_my_trades(self.symbol, since, 1000, params), "userTrades"), "trades")
        out = [trade_fill(t) for t in trades]
        return sorted((f for f in out if last_trade_id is None or f.trade_id > last_trade_id),
                      key=lambda f: f.trade_id)


def trade_fill(t: dict[str, Any]) -> TradeFill:
    """A ccxt trade record as a :class:`TradeFill` (pure).

    Raises
    ------
    MalformedResponseError
        A field we act on is missing or invalid: ``id`` and ``timestamp`` (integers), ``order``
        (present), ``side`` ('buy' or 'sell'), ``amount`` > 0 and ``price`` > 0 (finite), fee cost
        and ``realizedPnl`` (finite when present; absent counts as 0). The error carries the record.
    """
    where = "trades"
    info: dict[str, Any] = t["info"] if isinstance(t.get("info"), dict) else {}
    tid = _integer("id", t.get("id"), where, t)
    if t.get("order") in (None, ""):
        raise MalformedResponseError(f"{where}: trade {tid} without an order id", t)
    side = t.get("side")
    if side not in ("buy", "sell"):
        raise MalformedResponseError(f"{where}: trade {tid} has side {side!r}", t)
    qty, price = _finite("amount", t.get("amount"), where, t), _finite("price", t.get("price"), where, t)
    if qty <= 0 or price <= 0:
        raise MalformedResponseError(f"{where}: trade {tid} has amount {qty!r} and price {price!r}", t)
    fee = (t.get("fee") or {}).get("cost") or 0.0
    return TradeFill(
        trade_id=tid, exchange_order_id=str(t["order"]), side=1 if side == "buy" else -1, qty_base=qty, price=price,
        fee_usdt=_finite("fee", fee, where, t), realized_pnl_usdt=_finite("realizedPnl", info.get("realizedPnl", 0.0),
                                                                         where, t),
        time=pd.Timestamp(_integer("timestamp", t.get("timestamp"), where, t), unit="ms", tz="UTC"),
    )  # fmt: skip
