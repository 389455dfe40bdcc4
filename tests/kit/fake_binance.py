"""A local Binance USDⓈ-M REST server (127.0.0.1) for testing the real ccxt client without internet.

It serves, from fixture data (rows of the bundled BTCUSDT files):

* ``GET /fapi/v1/exchangeInfo``: one market, BTCUSDT perpetual (enough for ccxt ``load_markets``);
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
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Self
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd

FaultKind = Literal[
    "status_429", "html_5xx", "json_5xx", "delay", "overlap", "duplicate", "reverse", "null_rows", "past_end"
]

KLINES = "/fapi/v1/klines"
FUNDING = "/fapi/v1/fundingRate"

_TF_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "1h": 3_600_000, "4h": 14_400_000, "1d": 86_400_000}


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour (see the module docstring)."""

    kind: FaultKind
    retry_after_s: int = 1
    delay_s: float = 1.0
    bars: int = 3


def _exchange_info(now_ms: int) -> dict[str, Any]:
    symbol = {
        "symbol": "BTCUSDT", "pair": "BTCUSDT", "contractType": "PERPETUAL", "deliveryDate": 4133404800000,
        "onboardDate": 1569398400000, "status": "TRADING", "maintMarginPercent": "2.5000",
        "requiredMarginPercent": "5.0000", "baseAsset": "BTC", "quoteAsset": "USDT", "marginAsset": "USDT",
        "pricePrecision": 2, "quantityPrecision": 3, "baseAssetPrecision": 8, "quotePrecision": 8,
        "underlyingType": "COIN", "underlyingSubType": [], "triggerProtect": "0.0500",
        "liquidationFee": "0.012500", "marketTakeBound": "0.05",
        "filters": [
            {"filterType": "PRICE_FILTER", "maxPrice": "4529764", "minPrice": "556.80", "tickSize": "0.10"},
            {"filterType": "LOT_SIZE", "maxQty": "1000", "minQty": "0.001", "stepSize": "0.001"},
            {"filterType": "MARKET_LOT_SIZE", "maxQty": "120", "minQty": "0.001", "stepSize": "0.001"},
            {"filterType": "MIN_NOTIONAL", "notional": "100"},
        ],
        "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET"],
        "timeInForce": ["GTC", "IOC", "FOK", "GTX"],
    }
    return {
        "timezone": "UTC", "serverTime": now_ms, "futuresType": "U_MARGINED", "rateLimits": [],
        "exchangeFilters": [], "assets": [{"asset": "USDT", "marginAvailable": True}], "symbols": [symbol],
    }


def _ms(index: pd.DatetimeIndex) -> np.ndarray:
    return index.as_unit("ms").asi8


class FakeBinance:
    """Threaded HTTP server on 127.0.0.1 (a free port) speaking the Binance USDⓈ-M market-data API.

    Parameters
    ----------
    candles : pandas.DataFrame
        Fixture candles (UTC open-time index, ``open high low close volume``), e.g. a slice of the
        bundled BTCUSDT 1h file.
    funding : pandas.Series
        Fixture funding rates indexed by UTC funding time.
    now_ms : int
        Server clock, ms since the epoch; later bars and settlements do not exist yet.
    timeframe : str, default "1h"
        The only interval served (others answer 400).

    Use as a context manager; :attr:`url` is ``http://127.0.0.1:<port>``.
    """

    def __init__(self, candles: pd.DataFrame, funding: pd.Series, *, now_ms: int, timeframe: str = "1h") -> None:
        self.timeframe = timeframe
        self.tf_ms = _TF_MS[timeframe]
        self.now_ms = int(now_ms)
        self._times = _ms(candles.index)
        self._ohlcv = candles[["open", "high", "low", "close", "volume"]].to_numpy(dtype=np.float64)
        self._f_times = _ms(funding.index)
        self._f_rates = funding.to_numpy(dtype=np.float64)
        self._faults: dict[str, deque[Fault]] = {}
        self._lock = threading.Lock()
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
    def add_fault(self, path: str, fault: Fault, times: int = 1) -> None:
        """Apply ``fault`` to the next ``times`` requests to ``path`` (after the faults already queued)."""
        with self._lock:
            self._faults.setdefault(path, deque()).extend([fault] * times)

    def count(self, path: str) -> int:
        """Number of requests received for ``path``."""
        return sum(1 for p, _ in self.requests if p == path)

    def _next_fault(self, path: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.popleft() if queue else None

    # -- responses -------------------------------------------------------------------------------
    def _klines(self, params: dict[str, str], fault: Fault | None) -> list[list[Any]]:
        if params.get("interval") != self.timeframe:
            raise _BadRequest(-1120, f"invalid interval {params.get('interval')!r}")
        limit = min(int(params.get("limit", 500)), 1500)
        start = int(params["startTime"]) if "startTime" in params else None
        end = min(int(params.get("endTime", self.now_ms)), self.now_ms)
        if fault is not None and fault.kind == "past_end":
            end = self.now_ms
        if fault is not None and fault.kind == "overlap" and start is not None:
            start -= fault.bars * self.tf_ms
        mask = self._times <= end
        if start is not None:
            mask &= self._times >= start
        pos = np.flatnonzero(mask)
        pos = pos[:limit] if start is not None else pos[-limit:]
        rows = []
        for i in pos:
            t = int(self._times[i])
            o, h, low, c, v = (float(x) for x in self._ohlcv[i])
            if t + self.tf_ms > self.now_ms:  # still open: partial values
                c = o
                h, low, v = max(o, c), min(o, c), v / 7.0
            rows.append([t, repr(o), repr(h), repr(low), repr(c), repr(v), t + self.tf_ms - 1,
                         "0", 0, "0", "0", "0"])
        if fault is not None and fault.kind == "duplicate":
            rows = [r for r in rows for _ in (0, 1)]
        if fault is not None and fault.kind == "reverse":
            rows = rows[::-1]
        if fault is not None and fault.kind == "null_rows":
            rows = [[None] * 12 for _ in rows]
        return rows

    def _funding(self, params: dict[str, str], fault: Fault | None) -> list[dict[str, Any]]:
        limit = min(int(params.get("limit", 100)), 1000)
        start = int(params.get("startTime", 0))
        end = min(int(params.get("endTime", self.now_ms)), self.now_ms)
        pos = np.flatnonzero((self._f_times >= start) & (self._f_times <= end))[:limit]
        rows = [
            {"symbol": "BTCUSDT", "fundingTime": int(self._f_times[i]), "fundingRate": repr(float(self._f_rates[i])),
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
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout fault)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                path = parts.path
                with fake._lock:
                    fake.requests.append((path, params))
                fault = fake._next_fault(path)
                if fault is not None:
                    if fault.kind == "status_429":
                        body = json.dumps({"code": -1003, "msg": "Too many requests; current limit is 2400."})
                        return self._send(429, body, headers={"Retry-After": str(fault.retry_after_s)})
                    if fault.kind == "html_5xx":
                        return self._send(503, "<html><body>503 Service Unavailable</body></html>", "text/html")
                    if fault.kind == "json_5xx":
                        body = json.dumps({"code": -1000, "msg": "An unknown error occurred while processing."})
                        return self._send(500, body)
                    if fault.kind == "delay":
                        fake._release.wait(fault.delay_s)
                try:
                    if path == "/fapi/v1/time":
                        body: Any = {"serverTime": fake.now_ms}
                    elif path == "/fapi/v1/exchangeInfo":
                        body = _exchange_info(fake.now_ms)
                    elif path == KLINES:
                        body = fake._klines(params, fault)
                    elif path == FUNDING:
                        body = fake._funding(params, fault)
                    else:
                        return self._send(404, json.dumps({"code": -1, "msg": f"no route {path}"}))
                except _BadRequest as exc:
                    return self._send(400, json.dumps({"code": exc.code, "msg": exc.msg}))
                self._send(200, json.dumps(body))

        return Handler


class _BadRequest(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code, self.msg = code, msg
