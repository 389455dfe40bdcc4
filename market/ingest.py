"""Download candles and funding rates with ccxt and upsert them into the parquet store.

What a run does (:func:`download`):

1. builds **one** ccxt client (rate limiter on; ``--testnet`` = ccxt sandbox mode), loads the markets
   and reads the exchange's clock;
2. computes what is missing from the store (before the first stored bar, after the last one);
   a second run over the same span fetches nothing it already has;
3. pages through ``fetch_ohlcv`` by ``since`` (at most the exchange's page limit per request, up to
   ``until``), validates every page, keeps only **closed** candles (a bar whose close time
   ``open + timeframe`` is after the cut-off ``min(exchange time, local clock)`` is still forming
   and is dropped, and counted), merges overlapping, duplicated or unordered pages (the latest answer
   wins for a repeated open time), and writes the store file atomically every few pages, so an
   interrupted run leaves a readable, consistent file that the next run completes;
4. the same for ``fetch_funding_rate_history`` (``...-funding.parquet``);
5. (right after loading the markets) writes the instrument spec ``<SYMBOL>.spec.json`` next to the candles
   (:func:`write_instrument_spec`: exchangeInfo filters, and the leverage brackets when API keys are set),
   refreshed on every run so that a changed filter is picked up.

Retries (tenacity; exponential backoff ``min(max, initial * 2**(n-1))`` plus uniform jitter from an
injected RNG; HTTP 429 waits what ``Retry-After`` asks): every ccxt ``NetworkError``, which in ccxt
4.5 covers ``RequestTimeout``, ``ExchangeNotAvailable`` (a plain 5xx page, maintenance),
``DDoSProtection`` (what a 429 raises; a sibling of ``RateLimitExceeded``) and ``RateLimitExceeded``;
and the bare ``OperationFailed`` that ccxt raises for Binance codes -1000/-1001 ("unknown error",
"internal error; try again"): every request here is an idempotent read, so repeating it is safe.
Not retried: ``BadResponse``/``NullResponse`` and malformed pages (a broken answer is not expected to
heal), and every ``ExchangeError`` (bad symbol, bad request, authentication): they stop the run with
an :class:`IngestError` naming the request.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ccxt
import numpy as np
import pandas as pd
import tenacity
from pydantic import Field, field_validator

from market.config_base import StrictConfig
from market.instruments import (
    BUNDLED_SPECS,
    InstrumentSpecError,
    load_spec_file,
    spec_file_path,
    spec_from_ccxt_market,
    write_spec_file,
)
from market.ohlc import describe_row, ohlc_codes
from market.store import (
    CANDLE_COLUMNS,
    FUNDING_COLUMNS,
    TIME_COLUMN,
    candles_path,
    funding_path,
    merge_rows,
    read_store_file,
    write_store_file,
)

# --------------------------------------------------------------------------------------------
# errors and configuration
# --------------------------------------------------------------------------------------------


class IngestError(RuntimeError):
    """A download stopped: a non-retryable exchange error, retries exhausted, or a malformed answer.

    The message names the request (method, symbol, timeframe, ``since``) and the cause; data
    already written to the store stays valid (a re-run resumes from it).
    """


class MalformedResponseError(IngestError):
    """An exchange answer that cannot be acted on (rows of None, non-finite numbers, bad shape)."""


class RetryConfig(StrictConfig):
    """Retry policy for one request (tenacity)."""

    max_attempts: int = Field(6, ge=1, description="attempts per request, the first included")
    backoff_initial_s: float = Field(1.0, gt=0, description="wait before the 2nd attempt, seconds")
    backoff_max_s: float = Field(60.0, gt=0, description="cap of the exponential wait, seconds")
    jitter_s: float = Field(1.0, ge=0, description="uniform jitter added to each backoff, seconds")
    retry_after_max_s: float = Field(300.0, gt=0, description="cap on a Retry-After wait, seconds")


class DownloadConfig(StrictConfig):
    """One ``ats data download`` run."""

    exchange_id: Literal["binanceusdm"] = Field("binanceusdm", description="ccxt exchange id")
    symbol: str = Field(..., description="unified ccxt symbol, e.g. BTC/USDT:USDT")
    timeframe: str = Field("1h", description="ccxt timeframe, e.g. 1m, 15m, 1h, 4h, 1d")
    since: str = Field(..., description="first open time wanted (UTC), e.g. 2019-01-01")
    until: str | None = Field(None, description="end (exclusive) of open times wanted (UTC); None = now")
    store_dir: str = Field(..., description="root of the parquet store")
    testnet: bool = Field(False, description="use the exchange's sandbox (ccxt set_sandbox_mode)")
    api_url: str | None = Field(None, description="override every API URL group, e.g. http://127.0.0.1:8080")
    funding: bool = Field(True, description="also download the funding-rate history")
    page_limit_bars: int = Field(1000, ge=1, le=1000, description="candles per request (ccxt caps Binance at 1000)")
    funding_page_limit: int = Field(1000, ge=1, le=1000, description="funding rows per request (Binance max 1000)")
    timeout_ms: int = Field(10_000, ge=1, description="HTTP timeout per request, ms")
    rate_limit_ms: int | None = Field(None, ge=0, description="ccxt rateLimit (ms per unit cost); None = ccxt's")
    flush_every_pages: int = Field(10, ge=1, description="write the store file every N pages (and at the end)")
    retry: RetryConfig = RetryConfig()

    @field_validator("since", "until")
    @classmethod
    def _utc_time(cls, value: str | None) -> str | None:
        if value is not None:
            _utc_ms(value, "time")
        return value

    @field_validator("timeframe")
    @classmethod
    def _known_timeframe(cls, value: str) -> str:
        timeframe_ms(value)
        return value


@dataclass(frozen=True)
class DownloadProgress:
    """One progress report: after each page (``kind`` ``candles`` or ``funding``)."""

    kind: str
    symbol: str
    first: pd.Timestamp | None
    """Earliest time fetched in this run so far (None before the first row)."""
    last: pd.Timestamp | None
    """Latest time fetched in this run so far."""
    rows: int
    """Rows fetched in this run so far (after dropping open candles and rows outside the span)."""
    target_start: pd.Timestamp
    target_end: pd.Timestamp
    """Span being filled (``[target_start, target_end)``)."""


@dataclass(frozen=True)
class SeriesResult:
    """What a run did to one store file."""

    path: Path
    rows_total: int
    rows_added: int
    rows_replaced: int
    """Stored rows whose values the exchange now reports differently (new values kept)."""
    pages: int
    duplicate_rows: int
    """Rows received more than once (overlapping or duplicated pages), merged."""
    outside_rows: int
    """Rows received outside the requested span (not stored)."""
    open_rows_dropped: int
    """Still-forming candles (close time after the cut-off), not stored."""
    first: pd.Timestamp | None
    last: pd.Timestamp | None


@dataclass(frozen=True)
class DownloadResult:
    """Summary of a download run."""

    candles: SeriesResult
    funding: SeriesResult | None
    cutoff: pd.Timestamp
    """Candles closing after this time (and settlements after it) were not stored."""
    retries: int
    spec_path: Path | None = None
    """The instrument spec written next to the candles (``<SYMBOL>.spec.json``), None if none could be made."""
    spec_note: str | None = None
    """Why no spec was written, or where its brackets came from when they were not read."""


ProgressCallback = Callable[[DownloadProgress], None]

# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------

_MIN_FUNDING_INTERVAL_MS = 3_600_000
"""Binance USDⓈ-M settles funding at most hourly: the next settlement after a stored one is >= 1 h later."""

_TF_UNITS_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def timeframe_ms(timeframe: str) -> int:
    """Length of a ccxt timeframe in ms (``"15m"`` -> 900000). Months are refused (not fixed length).

    Raises
    ------
    ValueError
        If the timeframe is not ``<n><m|h|d|w>`` with n >= 1.
    """
    unit = timeframe[-1:] if timeframe else ""
    count = timeframe[:-1]
    if unit not in _TF_UNITS_MS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"timeframe {timeframe!r} is not <n><m|h|d|w>, e.g. '1h' or '15m'")
    return int(count) * _TF_UNITS_MS[unit]


def _utc_ms(value: str | pd.Timestamp, name: str) -> int:
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} {value!r} is not a time (e.g. 2019-01-01 or 2019-01-01T08:00Z)") from exc
    if pd.isna(ts):
        raise ValueError(f"{name} {value!r} is not a time")
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return int(ts.value // 1_000_000)


def _ts(ms: int) -> pd.Timestamp:
    return pd.Timestamp(int(ms), unit="ms", tz="UTC")


def _number(value: Any) -> float:
    if value is None or isinstance(value, bool):
        raise TypeError("missing")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError("not finite")
    return out


def _time_ms(value: Any) -> int:
    if value is None or isinstance(value, bool) or not float(value).is_integer():
        raise TypeError("not an integer time")
    return int(value)


def parse_ohlcv_page(rows: Any, *, request: str, tf_ms: int) -> pd.DataFrame:
    """Turn a ``fetch_ohlcv`` answer into a store frame, refusing anything not fully valid.

    Parameters
    ----------
    rows : list of [ms, open, high, low, close, volume]
        The ccxt answer (ms since the epoch, prices in quote currency, volume in base currency).
    request : str
        Description of the request, used in error messages.
    tf_ms : int
        Timeframe in ms; every open time must be a multiple of it (Binance aligns bars on the epoch
        for intervals up to 1 day).

    Returns
    -------
    pandas.DataFrame
        Index ``timestamp`` (UTC, ns), float64 ``open high low close volume``, in the order received
        (may be unsorted or repeat times; :func:`market.store.merge_rows` resolves that).

    Raises
    ------
    MalformedResponseError
        Not a list, a row that is not 6 values, a None, a non-numeric or non-finite value, a row that
        breaks the OHLC row rule (:mod:`market.ohlc`: a price <= 0, volume < 0, high/low not enclosing
        open/close), or a misaligned open time; the message names the request and the row.
    """
    if not isinstance(rows, (list, tuple)):
        raise MalformedResponseError(f"{request}: expected a list of candles, got {type(rows).__name__}")
    times = np.empty(len(rows), dtype=np.int64)
    values = np.empty((len(rows), 5), dtype=np.float64)
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, (list, tuple)) or len(row) < 6:
                raise TypeError("not a row of 6 values")
            times[i] = _time_ms(row[0])
            values[i] = [_number(v) for v in row[1:6]]
        except (TypeError, ValueError) as exc:
            raise MalformedResponseError(f"{request}: candle {i} is invalid ({exc}): {row!r}") from None
    codes = ohlc_codes(*values.T)
    if codes.any():
        i = int(np.argmax(codes != 0))
        raise MalformedResponseError(
            f"{request}: {int((codes != 0).sum())} candles break the OHLC rule, first candle {i}: "
            f"{describe_row(int(codes[i]), _ts(int(times[i])), *values[i])}"
        )
    if tf_ms <= 86_400_000:
        misaligned = np.flatnonzero(times % tf_ms != 0)
        if misaligned.size:
            raise MalformedResponseError(
                f"{request}: open times not on the {tf_ms} ms grid: {[str(_ts(t)) for t in times[misaligned][:5]]}"
            )
    index = pd.DatetimeIndex(pd.to_datetime(times, unit="ms", utc=True), name=TIME_COLUMN).as_unit("ns")
    return pd.DataFrame(values, index=index, columns=list(CANDLE_COLUMNS))


def check_raw_page(raw: Any, *, request: str, kind: str) -> None:
    """Validate the exchange's raw JSON page (Binance USDⓈ-M) before trusting ccxt's parsed rows.

    ccxt silently drops rows whose time is missing or before ``since`` while parsing, so an answer of
    ``null`` rows would look like "no more data". Each raw kline must be a list whose open time is an
    integer and whose open/high/low/close/volume parse as finite numbers; each raw funding row a
    mapping with an integer ``fundingTime`` and a finite ``fundingRate``.

    Raises
    ------
    MalformedResponseError
        Naming the request and the first bad row.
    """
    if not isinstance(raw, list):
        raise MalformedResponseError(f"{request}: expected a JSON list, got {type(raw).__name__}: {str(raw)[:200]}")
    for i, row in enumerate(raw):
        try:
            if kind == "candles":
                if not isinstance(row, list) or len(row) < 6:
                    raise TypeError("not a kline array")
                _time_ms(row[0])
                for v in row[1:6]:
                    _number(v)
            else:
                if not isinstance(row, dict):
                    raise TypeError("not a mapping")
                _time_ms(row.get("fundingTime"))
                _number(row.get("fundingRate"))
        except (TypeError, ValueError) as exc:
            raise MalformedResponseError(f"{request}: raw row {i} is invalid ({exc}): {str(row)[:200]}") from None


def parse_funding_page(rows: Any, *, request: str) -> pd.DataFrame:
    """Turn a ``fetch_funding_rate_history`` answer into a store frame.

    Binance reports funding times with a few ms of jitter (e.g. 08:00:00.004); times are rounded to
    the nearest whole second so they match bar open times.

    Returns
    -------
    pandas.DataFrame
        Index ``timestamp`` (UTC, ns), float64 ``funding_rate`` (fraction per funding interval).

    Raises
    ------
    MalformedResponseError
        Not a list of mappings with a ``timestamp`` and a finite ``fundingRate``.
    """
    if not isinstance(rows, (list, tuple)):
        raise MalformedResponseError(f"{request}: expected a list of funding rates, got {type(rows).__name__}")
    times = np.empty(len(rows), dtype=np.int64)
    rates = np.empty(len(rows), dtype=np.float64)
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise TypeError("not a mapping")
            times[i] = (_time_ms(row.get("timestamp")) + 500) // 1000 * 1000
            rates[i] = _number(row.get("fundingRate"))
        except (TypeError, ValueError) as exc:
            shown = {k: row.get(k) for k in ("timestamp", "fundingRate")} if isinstance(row, dict) else row
            raise MalformedResponseError(f"{request}: funding row {i} is invalid ({exc}): {shown!r}") from None
    index = pd.DatetimeIndex(pd.to_datetime(times, unit="ms", utc=True), name=TIME_COLUMN).as_unit("ns")
    return pd.DataFrame({"funding_rate": rates}, index=index)


def missing_spans(stored: pd.DatetimeIndex, start_ms: int, end_ms: int, step_ms: int) -> list[tuple[int, int]]:
    """Half-open spans ``[a, b)`` (ms) of ``[start_ms, end_ms)`` not covered by the stored times.

    Only the head (before the first stored time) and the tail (after the last one) are missing:
    holes inside the stored span are the exchange's own gaps, which asking again does not fill.
    ``step_ms`` is the spacing after the last stored time where the next row is expected (the bar
    interval for candles, 1 ms for funding).

    Examples
    --------
    >>> missing_spans(pd.DatetimeIndex([]), 0, 10, 1)
    [(0, 10)]
    """
    if start_ms >= end_ms:
        return []
    if len(stored) == 0:
        return [(start_ms, end_ms)]
    first = int(stored[0].value // 1_000_000)
    last = int(stored[-1].value // 1_000_000)
    spans = []
    if start_ms < first:
        spans.append((start_ms, min(first, end_ms)))
    tail_start = max(start_ms, last + step_ms)
    if tail_start < end_ms:
        spans.append((tail_start, end_ms))
    return spans


def funding_step_ms(stored: pd.DatetimeIndex) -> int:
    """Expected time from the last stored settlement to the next one, ms.

    The median spacing of the last 30 stored settlements (8 h for most Binance symbols), or 1 h
    (Binance's shortest funding interval) with fewer than two. If a symbol's interval shrinks, the
    new settlements are fetched one old interval later; none is skipped.
    """
    if len(stored) < 2:
        return _MIN_FUNDING_INTERVAL_MS
    steps = np.diff(stored[-31:].as_unit("ms").asi8)
    return max(int(np.median(steps)), _MIN_FUNDING_INTERVAL_MS)


def retry_wait_s(
    exc: BaseException | None, attempt: int, cfg: RetryConfig, rng: random.Random, retry_after_s: float | None
) -> float:
    """Seconds to wait before attempt ``attempt + 1``.

    A rate-limit answer (``DDoSProtection``/``RateLimitExceeded``) with a ``Retry-After`` waits
    exactly that (capped at ``retry_after_max_s``); otherwise exponential backoff
    ``min(backoff_max_s, backoff_initial_s * 2**(attempt - 1)) + U(0, jitter_s)``
    ("exponential backoff and jitter", AWS Architecture Blog, 2015).
    """
    rate_limited = isinstance(exc, (ccxt.DDoSProtection, ccxt.RateLimitExceeded))
    if rate_limited and retry_after_s is not None:
        return min(max(retry_after_s, 0.0), cfg.retry_after_max_s)
    backoff = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2.0 ** (attempt - 1))
    return backoff + rng.uniform(0.0, cfg.jitter_s)


def is_retryable(exc: BaseException) -> bool:
    """True for ccxt ``NetworkError`` (timeouts, 5xx pages, 429) and the bare ``OperationFailed`` (-1000/-1001)."""
    return isinstance(exc, ccxt.NetworkError) or type(exc) is ccxt.OperationFailed


def _retry_after_s(exchange: Any) -> float | None:
    headers = getattr(exchange, "last_response_headers", None) or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    if value is None:
        value = next((v for k, v in dict(headers).items() if str(k).lower() == "retry-after"), None)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP-date Retry-After: fall back to backoff


# --------------------------------------------------------------------------------------------
# I/O: the client, retries, paging
# --------------------------------------------------------------------------------------------


def point_at(exchange: Any, base_url: str) -> None:
    """Send every request of a ccxt Binance client to ``base_url`` (keeping each URL's path).

    Overrides every group of ``urls["api"]``, ``urls["test"]`` and ``urls["demo"]`` (spot ``sapi``
    included), so nothing can leave for the real exchange.
    """
    base = base_url.rstrip("/")
    for key in ("api", "test", "demo"):
        groups = exchange.urls.get(key)
        if isinstance(groups, dict):
            for name, url in groups.items():
                if isinstance(url, str):
                    path = url.split("/", 3)[3] if url.count("/") >= 3 else ""
                    groups[name] = f"{base}/{path}"


def make_exchange(cfg: DownloadConfig) -> Any:
    """The ccxt client of a run: rate limiter on, no currency endpoints, sandbox if ``testnet``."""
    options: dict[str, Any] = {
        "enableRateLimit": True,
        "enableLastJsonResponse": True,
        "enableLastResponseHeaders": True,
        "timeout": cfg.timeout_ms,
        "options": {"fetchCurrencies": False},
    }
    if cfg.rate_limit_ms is not None:
        options["rateLimit"] = cfg.rate_limit_ms
    exchange = getattr(ccxt, cfg.exchange_id)(options)
    if cfg.api_url:
        point_at(exchange, cfg.api_url)
    if cfg.testnet:
        exchange.set_sandbox_mode(True)
    return exchange


class _Caller:
    """Runs exchange calls under the retry policy and counts retries."""

    def __init__(self, exchange: Any, cfg: RetryConfig, sleep: Callable[[float], None], rng: random.Random):
        self.exchange, self.cfg, self.sleep, self.rng = exchange, cfg, sleep, rng
        self.retries = 0

    def __call__(self, what: str, fn: Callable[[], Any]) -> Any:
        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return retry_wait_s(exc, state.attempt_number, self.cfg, self.rng, _retry_after_s(self.exchange))

        def count(state: tenacity.RetryCallState) -> None:
            self.retries += 1

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_retryable),
            stop=tenacity.stop_after_attempt(self.cfg.max_attempts),
            wait=wait,
            sleep=self.sleep,
            before_sleep=count,
            reraise=True,
        )
        try:
            return retrying(fn)
        except ccxt.BaseError as exc:
            tried = f" after {self.cfg.max_attempts} attempts" if is_retryable(exc) else " (not retried)"
            raise IngestError(f"{what} failed{tried}: {type(exc).__name__}: {exc}") from exc


@dataclass
class _Pager:
    """Paging state of one series: rows received, pending rows, periodic atomic writes to the store."""

    path: Path
    stored: pd.DataFrame
    flush_every: int
    pending: list[pd.DataFrame]
    pages: int = 0
    kept: int = 0
    outside: int = 0
    open_dropped: int = 0
    added: int = 0
    replaced: int = 0

    def take(self, page: pd.DataFrame) -> None:
        self.pages += 1
        self.kept += len(page)
        if len(page):
            self.pending.append(page)
        if self.pages % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        new = pd.concat(self.pending)
        self.pending = []
        merged, added, replaced = merge_rows(self.stored, new)
        self.added += added
        self.replaced += replaced
        write_store_file(merged, self.path)
        self.stored = merged

    def result(self, seen: set[int]) -> SeriesResult:
        self.flush()
        return SeriesResult(
            path=self.path,
            rows_total=len(self.stored),
            rows_added=self.added,
            rows_replaced=self.replaced,
            pages=self.pages,
            duplicate_rows=self.kept - len(seen),
            outside_rows=self.outside,
            open_rows_dropped=self.open_dropped,
            first=_ts(min(seen)) if seen else None,
            last=_ts(max(seen)) if seen else None,
        )


def _page_loop(
    *,
    kind: str,
    symbol: str,
    spans: Sequence[tuple[int, int]],
    fetch: Callable[[int, int], pd.DataFrame],
    pager: _Pager,
    next_cursor: Callable[[int], int],
    closed: Callable[[np.ndarray], np.ndarray],
    target: tuple[int, int],
    on_progress: ProgressCallback | None,
) -> set[int]:
    """Fetch every span page by page (``fetch(cursor, stop)`` returns one validated page).

    Rows outside ``target`` and rows ``closed`` rejects are counted, not stored. A span ends when a
    page has nothing at or after the cursor. Returns the set of times received (ms).
    """
    seen: set[int] = set()
    for start, stop in spans:
        cursor = start
        while cursor < stop:
            page = fetch(cursor, stop)
            page_ms = page.index.as_unit("ms").asi8
            is_closed = closed(page_ms)
            inside = (page_ms >= target[0]) & (page_ms < target[1])
            pager.open_dropped += int((~is_closed).sum())
            pager.outside += int((is_closed & ~inside).sum())
            keep = inside & is_closed
            page, page_ms = page.loc[keep], page_ms[keep]
            seen.update(page_ms.tolist())
            pager.take(page)
            if on_progress is not None:
                on_progress(
                    DownloadProgress(
                        kind=kind, symbol=symbol,
                        first=_ts(min(seen)) if seen else None, last=_ts(max(seen)) if seen else None,
                        rows=len(seen), target_start=_ts(target[0]), target_end=_ts(target[1]),
                    )
                )
            fresh = page_ms[page_ms >= cursor]
            if fresh.size == 0:
                break  # nothing at or after the cursor: the exchange has no more data in this span
            cursor = next_cursor(int(fresh.max()))
    return seen


def download(
    cfg: DownloadConfig,
    *,
    exchange: Any | None = None,
    clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    on_progress: ProgressCallback | None = None,
) -> DownloadResult:
    """Fetch what the store lacks of ``[since, until)`` and upsert it (see the module docstring).

    Parameters
    ----------
    cfg : DownloadConfig
        Symbol, timeframe, span, store, client settings.
    exchange : ccxt.Exchange, optional
        The client to use (one per run); default :func:`make_exchange` ``(cfg)``.
    clock_ms : callable
        Local clock, ms since the epoch; the cut-off for closed candles is
        ``min(clock_ms(), exchange time)``.
    sleep : callable
        Used for retry waits (tests inject a recorder).
    rng : random.Random, optional
        Source of the backoff jitter (default seeded 0, so waits are reproducible).
    on_progress : callable, optional
        Called with a :class:`DownloadProgress` after every page.

    Returns
    -------
    DownloadResult

    Raises
    ------
    IngestError
        A non-retryable error, retries exhausted, a malformed answer (:class:`MalformedResponseError`)
        or a symbol the exchange does not list; the store keeps everything written before.
    ValueError
        ``since`` is not before ``until``.
    DataValidationError
        An existing store file does not have the store layout (it is not overwritten).
    """
    exchange = exchange if exchange is not None else make_exchange(cfg)
    exchange.enableLastJsonResponse = True  # pages are checked raw (see check_raw_page)
    exchange.enableLastResponseHeaders = True  # Retry-After
    call = _Caller(exchange, cfg.retry, sleep, rng if rng is not None else random.Random(0))
    tf_ms = timeframe_ms(cfg.timeframe)
    since_ms = _utc_ms(cfg.since, "since")
    until_ms = _utc_ms(cfg.until, "until") if cfg.until is not None else None
    if until_ms is not None and until_ms <= since_ms:
        raise ValueError(f"since {cfg.since} must be before until {cfg.until}")

    call(f"load_markets ({cfg.exchange_id})", exchange.load_markets)
    if cfg.symbol not in exchange.markets:
        listed = sorted(s for s in exchange.markets if s.endswith(":USDT"))[:10]
        raise IngestError(f"{cfg.exchange_id} does not list {cfg.symbol!r} (e.g. {listed})")
    market_id = exchange.market(cfg.symbol)["id"]
    spec_path, spec_note = write_instrument_spec(exchange, cfg, market_id, call)
    server_ms = call(f"fetch_time ({cfg.exchange_id})", exchange.fetch_time)
    if isinstance(server_ms, bool) or not isinstance(server_ms, (int, float)) or not server_ms > 0:
        raise MalformedResponseError(f"fetch_time ({cfg.exchange_id}): no server time in the answer: {server_ms!r}")
    cutoff_ms = min(int(clock_ms()), int(server_ms))
    last_closed_end = cutoff_ms // tf_ms * tf_ms  # bars opening before this have closed by the cut-off
    end_ms = min(until_ms, last_closed_end) if until_ms is not None else last_closed_end

    # ---- candles: bars opening in [since, end) that closed by the cut-off
    c_path = candles_path(cfg.store_dir, cfg.exchange_id, market_id, cfg.timeframe)
    c_pager = _Pager(c_path, read_store_file(c_path, CANDLE_COLUMNS), cfg.flush_every_pages, [])

    def fetch_candles(cursor: int, stop: int) -> pd.DataFrame:
        what = (
            f"fetch_ohlcv({cfg.symbol}, {cfg.timeframe}, since={_ts(cursor).isoformat()}, "
            f"limit={cfg.page_limit_bars})"
        )
        rows = call(what, lambda: exchange.fetch_ohlcv(
            cfg.symbol, cfg.timeframe, since=cursor, limit=cfg.page_limit_bars, params={"until": stop - 1}
        ))
        check_raw_page(exchange.last_json_response, request=what, kind="candles")
        return parse_ohlcv_page(rows, request=what, tf_ms=tf_ms)

    def candle_closed(open_ms: np.ndarray) -> np.ndarray:
        return open_ms + tf_ms <= cutoff_ms

    seen = _page_loop(
        kind="candles", symbol=cfg.symbol,
        spans=missing_spans(c_pager.stored.index, since_ms, end_ms, tf_ms),
        fetch=fetch_candles, pager=c_pager, next_cursor=lambda last: last + tf_ms, closed=candle_closed,
        target=(since_ms, end_ms), on_progress=on_progress,
    )
    candles_result = c_pager.result(seen)

    # ---- funding: settlements in [since, end) at or before the cut-off
    funding_result = None
    if cfg.funding:
        f_path = funding_path(cfg.store_dir, cfg.exchange_id, market_id)
        f_pager = _Pager(f_path, read_store_file(f_path, FUNDING_COLUMNS), cfg.flush_every_pages, [])
        f_end = min(until_ms, cutoff_ms + 1) if until_ms is not None else cutoff_ms + 1

        def fetch_funding(cursor: int, stop: int) -> pd.DataFrame:
            what = (
                f"fetch_funding_rate_history({cfg.symbol}, since={_ts(cursor).isoformat()}, "
                f"limit={cfg.funding_page_limit})"
            )
            rows = call(what, lambda: exchange.fetch_funding_rate_history(
                cfg.symbol, since=cursor, limit=cfg.funding_page_limit, params={"until": stop - 1}
            ))
            check_raw_page(exchange.last_json_response, request=what, kind="funding")
            return parse_funding_page(rows, request=what)

        def settled(times_ms: np.ndarray) -> np.ndarray:
            return times_ms <= cutoff_ms

        seen = _page_loop(
            kind="funding", symbol=cfg.symbol,
            spans=missing_spans(f_pager.stored.index, since_ms, f_end, funding_step_ms(f_pager.stored.index)),
            fetch=fetch_funding, pager=f_pager, next_cursor=lambda last: last + 1, closed=settled,
            target=(since_ms, f_end), on_progress=on_progress,
        )
        funding_result = f_pager.result(seen)

    return DownloadResult(candles=candles_result, funding=funding_result, cutoff=_ts(cutoff_ms), retries=call.retries,
                          spec_path=spec_path, spec_note=spec_note)


def write_instrument_spec(exchange: Any, cfg: DownloadConfig, market_id: str, call: Any) -> tuple[Path | None, str | None]:
    """Write ``<SYMBOL>.spec.json`` next to the candles from the loaded market (exchangeInfo filters) and, when API
    keys are in the environment (``ATS_BINANCE_API_KEY`` / ``ATS_BINANCE_API_SECRET``), the leverage brackets
    (``GET /fapi/v1/leverageBracket``, signed). Without keys the brackets and max leverage are kept from the
    previous spec file of the symbol, else from the bundled table; with neither, no spec is written.

    Returns ``(path written or None, note)``: the note says why nothing was written, or where the brackets
    came from when they were not read. Refreshed on every download, so a changed filter is picked up.
    """
    c_path = candles_path(cfg.store_dir, cfg.exchange_id, market_id, cfg.timeframe)
    path = spec_file_path(c_path, market_id)
    brackets = None
    key, secret = os.environ.get(API_KEY_ENV), os.environ.get(API_SECRET_ENV)
    if key and secret:
        exchange.apiKey, exchange.secret = key, secret
        rows = call(f"leverage brackets ({market_id})",
                    lambda: exchange.fapiPrivateGetLeverageBracket({"symbol": market_id}))
        for row in rows if isinstance(rows, list) else [rows]:
            if isinstance(row, dict) and row.get("symbol") == market_id:
                brackets = row.get("brackets")
    fallback = None
    if brackets is None:
        if path.is_file():
            fallback = load_spec_file(path)
        elif market_id in BUNDLED_SPECS:
            fallback = BUNDLED_SPECS[market_id]
    try:
        spec = spec_from_ccxt_market(exchange.market(cfg.symbol), brackets, fallback=fallback,
                                     exchange_label=cfg.exchange_id + (" testnet" if cfg.testnet else ""))
    except InstrumentSpecError as exc:
        return None, f"no instrument spec written: {exc}"
    write_spec_file(spec, path)
    note = None if brackets is not None else (
        f"leverage brackets not read (no {API_KEY_ENV}/{API_SECRET_ENV}): kept from {fallback.source if fallback else '?'}")
    return path, note


API_KEY_ENV = "ATS_BINANCE_API_KEY"
"""Environment variable of the API key (the same as serving's); with the secret, the download reads the brackets."""
API_SECRET_ENV = "ATS_BINANCE_API_SECRET"

__all__ = [
    "DownloadConfig",
    "DownloadProgress",
    "DownloadResult",
    "IngestError",
    "MalformedResponseError",
    "RetryConfig",
    "SeriesResult",
    "check_raw_page",
    "download",
    "funding_step_ms",
    "is_retryable",
    "make_exchange",
    "missing_spans",
    "parse_funding_page",
    "parse_ohlcv_page",
    "point_at",
    "retry_wait_s",
    "timeframe_ms",
]
