"""Closed candles for the serving loops: parsing, window checks, paging, a rolling cache, repairs.

The live loop (:class:`serving.live.LiveLoop`) and paper serving on live candles
(:class:`serving.paper_live.PaperLiveLoop`) both take the context window of the bar they decide
from a :class:`CandleCache`. Raw ccxt rows are parsed here (:func:`parse_ohlcv_row`,
:func:`parse_page`) and a window is checked here (:func:`check_window`, :func:`validate_window`).

**Paging.** ccxt's ``binanceusdm.fetch_ohlcv`` caps ``limit`` at 1,000 rows (ccxt 4.5; Binance
itself serves 1,500 on ``/fapi/v1/klines``), so a longer context is read in pages of at most
:data:`PAGE_BARS` bars (:func:`page_requests`): each request names ``since`` (startTime), ``until``
(endTime, ccxt ``params={"until": ms}``: the close time of the page's last bar, so the still-open
bar is not served) and ``limit`` = the bars in between. Rows after the bar to decide (an exchange
ignoring endTime) are dropped.

**Rolling window.** When the cache is empty or does not reach back to the window (start,
restart, a paper poll asking for older missed bars), it pages from :data:`MARGIN_BARS` bars before
the context window up to the bar to decide. Otherwise one request reads from
:data:`REFRESH_BARS` bars before the last cached bar up to the bar to decide (a normal bar: one
request of ``REFRESH_BARS + 1`` rows; after missed bars, as many pages as needed), so a row the
exchange corrects shortly after serving it replaces the cached one. Older rows are dropped: the
cache holds ``context_bars + MARGIN_BARS`` rows (plus the missed bars a paper poll asked for).

**Malformed pages.** A page with a row that is not ``[time, o, h, l, c, v]``, or with duplicated,
out-of-order or off-grid open times, is fetched once more; malformed again, the bar is
quarantined (``CandleContext.problem``) and the cache keeps what it had.

**Bad candles (repair policy).** A *flaw* is a row of the context window that is invalid
(:func:`serving.loop.row_problems`: non-finite or non-positive price, non-finite or negative
volume, high/low not enclosing open/close) or missing between served rows (a gap).

1. Each poll re-fetches, once, the range from the first to the last flaw not yet due for repair
   (a transient error of the exchange is healed there).
2. The decided bar's own candle flawed: the bar is **quarantined** (no policy; never repaired for
   itself: the broker would fill on an invented price).
3. Another flaw, first seen (after its re-fetch) when bar B was polled: the bars before
   B + ``hold_bars`` are **held** (a :class:`serving.loop.WindowTaint`: no policy is asked, hold-or-flat); from
   then on the window goes to the policy with every flawed row **repaired** as a gap under the
   feature set's gap policy (:func:`market.candles.fill_gaps`: open = high = low = close = the
   previous real close, volume 0, ``is_gap`` 1.0), and a ``candle_repaired`` event (the row, its
   original values, the rule) is recorded the first time each row is repaired. Trading resumes
   at most ``hold_bars`` bars after a flaw is seen.
4. The cache keeps the exchange's values; repairs are applied to the window handed out, so a row
   the exchange serves valid later (the refresh of the last bars, paging after a restart)
   replaces the repair (``candle_corrected`` event).
5. Bars before the first candle the exchange serves (not that much history) are not flaws and
   are never invented: the bar is held until the window is complete.

Flaw state lives in this process: after a restart a flaw is held again before it is repaired.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from market.candles import fill_gaps
from market.ohlc import describe_row, ohlc_codes
from serving.errors import RetryableError
from serving.loop import WindowTaint, row_problems

PAGE_BARS = 1_000  # ccxt binanceusdm caps fetch_ohlcv's limit at 1,000 (Binance serves 1,500)
REFRESH_BARS = 3  # cached bars re-read on every poll (late corrections replace them)
MARGIN_BARS = 8  # bars kept before the context window (previous closes for repairs)
MAX_CONTEXT_BARS = 10_000  # a sane bound: ten pages to fill the window
FUNDING_PAGE_ROWS = 1_000  # Binance's largest fundingRate page
COLUMNS = ["open", "high", "low", "close", "volume"]
REPAIR_RULE = ("gap policy of the feature set (market.candles.fill_gaps): open = high = low = close = the "
               "previous real close, volume 0, is_gap 1")  # fmt: skip


class OhlcvFeed(Protocol):
    """Public klines (:class:`serving.exchange.BinanceFuturesBroker`)."""

    def fetch_ohlcv(self, timeframe: str, since_ms: int | None, limit: int, until_ms: int | None = None
                    ) -> list[list[Any]]:  # fmt: skip
        """Klines ``[open_ms, o, h, l, c, v]`` from ``since_ms`` (ccxt's shape)."""


class FundingFeed(Protocol):
    """Public funding history (:class:`serving.exchange.BinanceFuturesBroker`)."""

    def fetch_funding(self, since_ms: int, limit: int = 1000) -> list[tuple[int, float]]:
        """Funding settlements ``(time_ms, rate)`` from ``since_ms``."""


def _ts(ms: int) -> pd.Timestamp:
    return pd.Timestamp(int(ms), unit="ms", tz="UTC")


def _ms(ts: pd.Timestamp) -> int:
    return int(ts.value // 1_000_000)


# ---------------------------------------------------------------------------------------------
# parsing and checks (pure)
# ---------------------------------------------------------------------------------------------


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def parse_ohlcv_row(i: int, row: Any) -> tuple[int, list[float]] | str:
    """``(open time ms, [o, h, l, c, v])`` of raw ccxt OHLCV row number ``i`` (pure; values NaN where
    not numbers), or why the row is malformed: not a list of at least 6 values, or an open time
    that is not an integer."""
    if not isinstance(row, (list, tuple)) or len(row) < 6:
        return f"row {i} is not [time, o, h, l, c, v]: {row!r}"
    t = _num(row[0])
    if not math.isfinite(t) or t != int(t):
        return f"row {i} has a bad open time {row[0]!r}"
    return int(t), [_num(x) for x in row[1:6]]


@dataclass(frozen=True)
class CandleWindow:
    """Result of :func:`validate_window`: ``candles`` (None when quarantined) and the problems found."""

    candles: pd.DataFrame | None
    problems: tuple[str, ...]


def check_window(times_ms: np.ndarray, values: np.ndarray, last_closed_open_ms: int, tf_ms: int,
                 context_bars: int) -> list[str]:
    """Why the closed-candle window ``times_ms`` (int64 open times, ms) / ``values`` (float64,
    shape (T, 5): ``open high low close volume``) may not go to a policy (pure; empty: it may).

    Problems: duplicate or out-of-order open times, a gap (a step other than ``tf_ms``), no row
    for the bar ``last_closed_open_ms`` (stale feed), fewer than ``context_bars`` rows, and, in the
    last ``context_bars`` rows, a row breaking the OHLC row rule (:mod:`market.ohlc`: a non-finite or
    non-positive price, a negative or non-finite volume, or high/low not enclosing open/close; at most
    three such rows are named, with their values).
    """
    t_arr = np.asarray(times_ms, dtype=np.int64)
    problems: list[str] = []
    if len(t_arr) and len(np.unique(t_arr)) != len(t_arr):
        values_, counts = np.unique(t_arr, return_counts=True)
        problems.append(f"duplicate open times ({len(t_arr) - len(values_)} extra rows, first at "
                        f"{_ts(int(values_[counts > 1][0]))})")  # fmt: skip
    if len(t_arr) > 1 and np.any(np.diff(t_arr) < 0):
        problems.append("rows out of order (open time goes back)")
    if problems:
        return problems
    if len(t_arr) > 1 and np.any(np.diff(t_arr) != tf_ms):
        k = int(np.flatnonzero(np.diff(t_arr) != tf_ms)[0])
        problems.append(f"gap after {_ts(int(t_arr[k]))}: next bar at {_ts(int(t_arr[k + 1]))}")
    if not len(t_arr) or t_arr[-1] != last_closed_open_ms:
        last = "none" if not len(t_arr) else str(_ts(int(t_arr[-1])))
        problems.append(f"stale feed: last closed bar {_ts(last_closed_open_ms)} missing (latest row {last})")
    if len(t_arr) < context_bars:
        problems.append(f"only {len(t_arr)} closed bars, {context_bars} needed")
    v = np.asarray(values, dtype=np.float64).reshape(-1, 5)[-context_bars:]
    if len(v):
        codes = ohlc_codes(*v.T)
        for k in np.flatnonzero(codes)[:3]:
            problems.append("invalid candle: " + describe_row(int(codes[k]), _ts(int(t_arr[-len(v):][k])), *v[k]))
    return problems


def validate_window(rows: Sequence[Sequence[Any]], last_closed_open_ms: int, tf_ms: int, context_bars: int) -> CandleWindow:
    """Check the closed-candle window ending at ``last_closed_open_ms`` (pure).

    ``rows`` are raw ccxt OHLCV rows ``[open_ms, o, h, l, c, v]``; rows opening after
    ``last_closed_open_ms`` (the still-open bar) are ignored. Problems (any one quarantines the
    bar): a row that is not 6 values, a non-integer open time, then :func:`check_window`'s.

    Returns
    -------
    CandleWindow
        ``candles``: UTC open-time index, float64 ``open high low close volume`` (exactly the last
        ``context_bars`` rows) when there is no problem, else None.
    """
    problems: list[str] = []
    times: list[int] = []
    values: list[list[float]] = []
    for i, r in enumerate(rows):
        parsed = parse_ohlcv_row(i, r)
        if isinstance(parsed, str):
            problems.append(parsed)
        elif parsed[0] <= last_closed_open_ms:
            times.append(parsed[0])
            values.append(parsed[1])
    if problems:
        return CandleWindow(None, tuple(problems))
    t_arr = np.asarray(times, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64).reshape(-1, 5)
    problems = check_window(t_arr, v, last_closed_open_ms, tf_ms, context_bars)
    if problems:
        return CandleWindow(None, tuple(problems))
    idx = pd.DatetimeIndex(pd.to_datetime(t_arr[-context_bars:], unit="ms", utc=True), name="open_time")
    return CandleWindow(pd.DataFrame(v[-context_bars:], index=idx, columns=COLUMNS, dtype=np.float64), ())


@dataclass(frozen=True)
class Page:
    """Closed candles of one klines page (:func:`parse_page`).

    ``candles``: float64 ``open high low close volume`` (NaN where a value is missing or not a
    number) indexed by UTC open time, sorted and unique; ``problem``: why the whole page is not
    trusted (None when it is; then ``candles`` is empty).
    """

    candles: pd.DataFrame
    problem: str | None = None


def empty_candles() -> pd.DataFrame:
    """An empty candle frame: UTC ``open_time`` index, float64 ``open high low close volume``."""
    return pd.DataFrame(columns=COLUMNS, index=pd.DatetimeIndex([], tz="UTC", name="open_time"), dtype=np.float64)


def parse_page(rows: Sequence[Any], last_closed_open_ms: int, tf_ms: int) -> Page:
    """Closed candles of a raw ccxt OHLCV page ``[[open_ms, o, h, l, c, v], ...]`` (pure).

    Rows opening after ``last_closed_open_ms`` (the still-open bar) are dropped. Row *values* are
    not judged here (a NaN or an inconsistent high/low stays, for :func:`serving.loop.row_problems`
    to flag); the page is rejected (``problem`` set) when a row is not at least 6 values or has a
    non-integer open time, or when open times are duplicated, out of order or not multiples of
    ``tf_ms`` (ms).
    """
    times: list[int] = []
    values: list[list[float]] = []
    for i, r in enumerate(rows):
        parsed = parse_ohlcv_row(i, r)
        if isinstance(parsed, str):
            return Page(empty_candles(), parsed[:300])
        if parsed[0] <= last_closed_open_ms:
            times.append(parsed[0])
            values.append(parsed[1])
    t_arr = np.asarray(times, dtype=np.int64)
    if len(t_arr) > 1 and np.any(np.diff(t_arr) == 0):
        return Page(empty_candles(), "duplicate open times")
    if len(t_arr) > 1 and np.any(np.diff(t_arr) < 0):
        return Page(empty_candles(), "rows out of order (open time goes back)")
    if np.any(t_arr % tf_ms):
        return Page(empty_candles(), f"open times not on the {tf_ms} ms bar grid")
    idx = pd.DatetimeIndex(pd.to_datetime(t_arr, unit="ms", utc=True), name="open_time")
    return Page(pd.DataFrame(np.asarray(values, dtype=np.float64).reshape(-1, 5), index=idx, columns=COLUMNS))


# ---------------------------------------------------------------------------------------------
# paging, merging, flaws, repairs (pure)
# ---------------------------------------------------------------------------------------------


def page_requests(first_ms: int, last_ms: int, tf_ms: int, page_bars: int = PAGE_BARS) -> list[tuple[int, int, int]]:
    """``(since_ms, until_ms, limit)`` of the klines requests that read the bars opening at
    ``first_ms`` .. ``last_ms`` (both on the ``tf_ms`` grid, included), oldest first, at most
    ``page_bars`` bars each (pure). ``until_ms`` is the close time of the page's last bar (its open
    + ``tf_ms`` - 1), so the next bar is never served; empty when ``first_ms > last_ms``."""
    out: list[tuple[int, int, int]] = []
    since = int(first_ms)
    while since <= last_ms:
        last = min(int(last_ms), since + (page_bars - 1) * tf_ms)
        out.append((since, last + tf_ms - 1, (last - since) // tf_ms + 1))
        since = last + tf_ms
    return out


def merge_rows(cached: pd.DataFrame, fresh: pd.DataFrame) -> pd.DataFrame:
    """``cached`` with the rows of ``fresh`` added; a row of ``fresh`` replaces the cached row of the
    same open time (the exchange's latest answer wins). Sorted by open time (pure)."""
    if not len(fresh):
        return cached
    kept = cached[~cached.index.isin(fresh.index)]
    return pd.concat([kept, fresh]).sort_index() if len(kept) else fresh.sort_index()


def find_flaws(rows: pd.DataFrame, first_ms: int, last_ms: int, tf_ms: int) -> dict[pd.Timestamp, str]:
    """``{open time: why}`` for the flawed bars of ``rows`` opening in ``first_ms`` .. ``last_ms``
    (pure), oldest first: invalid rows (:func:`serving.loop.row_problems`), bar-grid times with no
    row (gaps) and the bar ``last_ms`` itself when absent. Other times before the first row of
    ``rows`` are not flaws (history not served)."""
    missing = "missing: the exchange serves no candle at {}"
    lo = max(int(first_ms), _ms(rows.index[0])) if len(rows) else int(last_ms)
    grid = pd.date_range(_ts(lo), _ts(last_ms), freq=pd.Timedelta(milliseconds=tf_ms))
    if not len(grid):
        grid = pd.DatetimeIndex([_ts(last_ms)])
    part = rows.loc[grid[0] : grid[-1]]
    out: dict[pd.Timestamp, str] = {t: missing.format(t) for t in grid.difference(part.index)}
    for t, problem in zip(part.index, row_problems(part), strict=True):
        if problem is not None:
            out[t] = problem
    return dict(sorted(out.items()))


def repair_gaps(rows: pd.DataFrame, tf_ms: int) -> pd.DataFrame:
    """``rows`` with every invalid row dropped and every bar missing between the remaining rows
    filled by the feature set's gap policy, :func:`market.candles.fill_gaps` (open = high = low =
    close = the previous real close, volume 0); column ``is_gap`` (float64) is 1.0 on the filled
    bars (pure). Bars before the first valid row stay absent."""
    valid = rows[[p is None for p in row_problems(rows)]]
    filled, _ = fill_gaps(valid, interval=pd.Timedelta(milliseconds=tf_ms))
    return filled


def fetch_funding_since(feed: FundingFeed, since_ms: int, until_ms: int,
                        page_rows: int = FUNDING_PAGE_ROWS) -> list[tuple[int, float]]:
    """Funding settlements ``(time ms, rate)`` from ``since_ms`` to ``until_ms`` (ms, included),
    read in pages of ``page_rows`` (a window longer than one page of settlements is complete).

    Raises
    ------
    RetryableError
        From the feed.
    """
    out: list[tuple[int, float]] = []
    since = int(since_ms)
    while True:
        page = feed.fetch_funding(since, page_rows)
        out += [(int(t), float(r)) for t, r in page if since <= t <= until_ms]
        if len(page) < page_rows or page[-1][0] >= until_ms or page[-1][0] < since:
            return sorted(set(out))
        since = int(page[-1][0]) + 1


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CandleContext:
    """The candles of one poll (:meth:`CandleCache.context`).

    Attributes
    ----------
    raw : pandas.DataFrame
        The exchange's rows as served (flawed rows included, gaps absent) from the poll's first
        wanted bar up to the bar to decide: float64 ``open high low close volume``, UTC index.
    candles : pandas.DataFrame | None
        The window for the policy: exactly ``context_bars`` rows ending at the bar to decide,
        every check of :func:`check_window` passed, repairs applied (then with an ``is_gap``
        column); None when the bar is quarantined or held.
    problem : str | None
        Why the bar is quarantined: its own candle is invalid or missing, or a page was malformed.
    page_problem : str | None
        The malformed page's problem (then every bar of the poll is untrusted), else None.
    hold : serving.loop.WindowTaint | None
        Why the window is held (the bar's own candle is valid); None when not held.
    events : tuple
        ``(kind, detail)`` to record: ``candle_repaired``, ``candle_corrected``.
    """

    raw: pd.DataFrame
    candles: pd.DataFrame | None
    problem: str | None = None
    page_problem: str | None = None
    hold: WindowTaint | None = None
    events: tuple[tuple[str, dict[str, Any]], ...] = field(default_factory=tuple)


def _values(rows: pd.DataFrame, t: pd.Timestamp) -> dict[str, float] | None:
    """The ``open high low close volume`` of row ``t`` (None when absent)."""
    if t not in rows.index:
        return None
    return {k: float(rows.at[t, k]) for k in COLUMNS}


class CandleCache:
    """The rolling window of one market's closed candles and the flaws seen in it (module docstring).

    Parameters
    ----------
    timeframe : str
        ccxt timeframe of the klines, e.g. ``"1h"``.
    tf_ms : int
        Bar length, ms.
    context_bars : int
        Rows of the window handed to a policy, 1 .. :data:`MAX_CONTEXT_BARS`.
    hold_bars : int
        Bars a flaw of the window (not the decided bar's own candle) holds before it is repaired,
        counted from the bar at which it was first seen; >= 0.

    Raises
    ------
    ValueError
        ``context_bars`` or ``hold_bars`` out of range.
    """

    def __init__(self, timeframe: str, tf_ms: int, context_bars: int, hold_bars: int) -> None:
        if not 1 <= int(context_bars) <= MAX_CONTEXT_BARS:
            raise ValueError(f"context_bars must be 1 .. {MAX_CONTEXT_BARS} (read in pages of {PAGE_BARS} bars), "
                             f"got {context_bars!r}")  # fmt: skip
        if int(hold_bars) < 0:
            raise ValueError(f"hold_bars must be >= 0, got {hold_bars!r}")
        self.timeframe, self.tf_ms = timeframe, int(tf_ms)
        self.context_bars, self.hold_bars = int(context_bars), int(hold_bars)
        #: the exchange's rows as last served, UTC open-time index, float64 COLUMNS
        self.rows = empty_candles()
        self._synced: tuple[int, int] | None = None  # open times (ms) read without a hole: [from, to]
        self._first_seen: dict[pd.Timestamp, int] = {}  # flawed row -> bar (ms) of the poll that first saw it
        self._repaired: dict[pd.Timestamp, str] = {}  # row repaired (event recorded) -> its flaw

    def window_start_ms(self, bar_ms: int) -> int:
        """Open time (ms) of the first bar of the context window of ``bar_ms``."""
        return int(bar_ms) - (self.context_bars - 1) * self.tf_ms

    def context(self, feed: OhlcvFeed, bar_ms: int, *, first_ms: int | None = None) -> CandleContext:
        """Bring the cache up to the bar opening at ``bar_ms`` (the last closed bar) and judge its
        context window (module docstring: paging, rolling window, repair policy).

        ``first_ms``: an earlier open time the caller also needs rows from (a paper poll's missed
        bars); ``raw`` then starts there.

        Raises
        ------
        RetryableError, RejectedError
            A request failed (the cache keeps the pages merged so far; the next poll reads again).
        """
        bar_ms = int(bar_ms)
        start = self.window_start_ms(bar_ms)
        keep_from = start - MARGIN_BARS * self.tf_ms
        if first_ms is not None:
            keep_from = min(keep_from, int(first_ms))
        problem = self._sync(feed, keep_from, bar_ms)
        if problem is None:
            problem = self._refetch_flaws(feed, keep_from, start, bar_ms)
        self._trim(keep_from)
        raw = self.rows.loc[_ts(keep_from) : _ts(bar_ms)].copy()
        if problem is not None:
            return CandleContext(raw, None, f"candle page rejected: {problem}", problem)
        flaws = find_flaws(self.rows, start, bar_ms, self.tf_ms)
        events = self._track(flaws, start, bar_ms)
        bar = _ts(bar_ms)
        if bar in flaws:
            why = flaws[bar]
            if why.startswith("missing"):
                latest = "none" if not len(raw) else str(raw.index[-1])
                why = f"stale feed: last closed bar {bar} missing (latest row {latest})"
            return CandleContext(raw, None, why, events=tuple(events))
        hold = self._hold(flaws, bar_ms)
        if hold is not None:
            return CandleContext(raw, None, hold=hold, events=tuple(events))
        window = self.rows.loc[_ts(start) : bar]
        if flaws:
            window = repair_gaps(self.rows.loc[:bar], self.tf_ms).loc[_ts(start) :]
        if len(window) < self.context_bars:
            return CandleContext(raw, None, hold=self._history_hold(window, bar), events=tuple(events))
        problems = check_window(window.index.as_unit("ms").asi8, window[COLUMNS].to_numpy(np.float64), bar_ms,
                                self.tf_ms, self.context_bars)  # fmt: skip
        if problems:  # never expected: the cache's own checks missed something
            return CandleContext(raw, None, "; ".join(problems)[:2000], events=tuple(events))
        events += self._repair_events(flaws, window, bar)
        return CandleContext(raw, window.copy(), events=tuple(events))

    # -- reading ----------------------------------------------------------------------------------
    def _sync(self, feed: OhlcvFeed, keep_from: int, bar_ms: int) -> str | None:
        """Read the bars the cache lacks up to ``bar_ms`` (and the last ``REFRESH_BARS`` again);
        the problem of a page malformed twice, else None."""
        since, continuing = keep_from, False
        if self._synced is not None and self._synced[0] <= keep_from <= self._synced[1] + self.tf_ms:
            last = min(self._synced[1], _ms(self.rows.index[-1])) if len(self.rows) else keep_from
            since, continuing = max(keep_from, last - REFRESH_BARS * self.tf_ms), True
        since = min(since, bar_ms)
        for s, until, limit in page_requests(since, bar_ms, self.tf_ms):
            problem = self._read(feed, s, until, limit, bar_ms)
            if problem is not None:
                return problem
        first_read = self._synced[0] if continuing and self._synced is not None else since
        self._synced = (first_read, bar_ms)
        return None

    def _refetch_flaws(self, feed: OhlcvFeed, keep_from: int, start: int, bar_ms: int) -> str | None:
        """Re-read, once, the range from the first to the last flaw of the window that is not due
        for repair yet (new ones, held ones, the bar's own), from ``keep_from`` when the cache does
        not reach back to the window (an empty or short answer; or not that much history)."""
        due = bar_ms - self.hold_bars * self.tf_ms
        todo = [_ms(t) for t in find_flaws(self.rows, start, bar_ms, self.tf_ms)
                if _ms(t) == bar_ms or self._first_seen.get(t, bar_ms + 1) > due]  # fmt: skip
        first_row = _ms(self.rows.index[0]) if len(self.rows) else bar_ms + self.tf_ms
        if first_row > start:
            todo += [keep_from, min(first_row - self.tf_ms, bar_ms)]
        if not todo:
            return None
        for s, until, limit in page_requests(min(todo), max(todo), self.tf_ms):
            problem = self._read(feed, s, until, limit, bar_ms)
            if problem is not None:
                return problem
        return None

    def _read(self, feed: OhlcvFeed, since: int, until: int, limit: int, bar_ms: int) -> str | None:
        """One klines page merged into the cache (a malformed page is read once more); the problem
        of a page malformed twice, else None."""
        page = Page(empty_candles(), "not read")
        for _ in range(2):
            page = parse_page(feed.fetch_ohlcv(self.timeframe, since, limit, until_ms=until), bar_ms, self.tf_ms)
            if page.problem is None:
                self.rows = merge_rows(self.rows, page.candles)
                return None
        return page.problem

    def _trim(self, keep_from: int) -> None:
        """Drop rows (and flaw records) opening before ``keep_from``: memory stays bounded."""
        first = _ts(keep_from)
        if len(self.rows) and self.rows.index[0] < first:
            self.rows = self.rows.loc[first:]
        if self._synced is not None:
            self._synced = (max(self._synced[0], keep_from), self._synced[1])
        self._first_seen = {t: b for t, b in self._first_seen.items() if t >= first}
        self._repaired = {t: p for t, p in self._repaired.items() if t >= first}

    # -- judging ----------------------------------------------------------------------------------
    def _track(self, flaws: dict[pd.Timestamp, str], start: int, bar_ms: int) -> list[tuple[str, dict[str, Any]]]:
        """Note when each flaw was first seen; forget flaws that are gone (``candle_corrected`` for
        a repaired row the exchange now serves valid inside the window)."""
        events: list[tuple[str, dict[str, Any]]] = []
        for t in [t for t in self._first_seen if t not in flaws]:
            del self._first_seen[t]
            was = self._repaired.pop(t, None)
            if was is not None and t >= _ts(start) and t in self.rows.index:
                events.append(("candle_corrected", {"bar": str(t), "was": was, "values": _values(self.rows, t),
                                                    "seen_at_bar": str(_ts(bar_ms))}))  # fmt: skip
        for t in flaws:
            self._first_seen.setdefault(t, bar_ms)
        return events

    def _hold(self, flaws: dict[pd.Timestamp, str], bar_ms: int) -> WindowTaint | None:
        """The hold of the flaws not yet due for repair (None when there is none)."""
        due = bar_ms - self.hold_bars * self.tf_ms
        held = {t: p for t, p in flaws.items() if self._first_seen[t] > due}
        if not held:
            return None
        latest = max(held)
        until = _ts(max(self._first_seen[t] for t in held) + self.hold_bars * self.tf_ms)
        missing = [t for t, p in held.items() if p.startswith("missing")]
        if latest in missing:
            what = f"the context window lacks {len(missing)} of its {self.context_bars} bars (latest missing {latest})"
        else:
            what = f"the context window holds the invalid row {latest} ({held[latest]})"
        reason = (f"{what}; no policy is asked before {until}, then the flawed rows are repaired as gaps (previous "
                  "close, volume 0) unless the exchange serves them corrected")  # fmt: skip
        detail = {"flawed_rows": len(held), "latest": str(latest), "problem": held[latest],
                  "missing_rows": len(missing), "repair_from_bar": str(until), "hold_bars": self.hold_bars}
        return WindowTaint(f"flaw:{latest}", reason, detail)

    def _history_hold(self, window: pd.DataFrame, bar: pd.Timestamp) -> WindowTaint:
        """The hold of a window the exchange's history does not fill."""
        lacking = self.context_bars - len(window)
        first = "none" if not len(window) else str(window.index[0])
        reason = (f"the context window lacks {lacking} of its {self.context_bars} bars: the exchange serves no "
                  f"candle before {first} (not that much history)")  # fmt: skip
        return WindowTaint(f"history:{first}", reason, {"missing_bars": lacking, "first_served": first,
                                                       "context_bars": self.context_bars})  # fmt: skip

    def _repair_events(self, flaws: dict[pd.Timestamp, str], window: pd.DataFrame, bar: pd.Timestamp
                       ) -> list[tuple[str, dict[str, Any]]]:
        """``candle_repaired`` for each flawed row of ``window`` repaired for the first time."""
        events: list[tuple[str, dict[str, Any]]] = []
        for t, problem in flaws.items():
            if t in self._repaired:
                continue
            self._repaired[t] = problem
            events.append(("candle_repaired", {
                "bar": str(t), "original": _values(self.rows, t), "problem": problem, "rule": REPAIR_RULE,
                "repaired": _values(window, t), "first_seen_at_bar": str(_ts(self._first_seen[t])),
                "decided_bar": str(bar)}))  # fmt: skip
        return events


# ---------------------------------------------------------------------------------------------
# funding
# ---------------------------------------------------------------------------------------------


def with_funding_column(candles: pd.DataFrame, funding: Sequence[tuple[int, float]], tf_ms: int) -> pd.DataFrame:
    """``candles`` plus a float64 ``funding_rate`` column: the rate settled in each bar (funding time
    floored to the bar's open time, as the training data), NaN in bars without a settlement.
    Settlements outside the window are ignored (pure)."""
    out = candles.copy()
    col = np.full(len(out), np.nan)
    pos = {int(t.value // 1_000_000): i for i, t in enumerate(out.index)}
    for t_ms, rate in funding:
        i = pos.get((int(t_ms) // tf_ms) * tf_ms)
        if i is not None:
            col[i] = float(rate)
    out["funding_rate"] = col
    return out


def window_with_funding(ctx: CandleContext, funding: FundingFeed | None, bar_ms: int, tf_ms: int,
                        safe: Callable[[str], str] = lambda text: text) -> CandleWindow:
    """The policy's window of one poll (:meth:`CandleCache.context`) with the funding history of its
    span joined as ``funding_rate`` (:func:`with_funding_column`; ``funding`` None: not joined).

    ``candles`` None (quarantine) with the problems when the bar's own candle is bad or missing, a
    page is malformed, the window is held for a flawed row or lacks history, or the funding history
    cannot be fetched (a :class:`serving.errors.RetryableError`, its text passed through ``safe``).

    Raises
    ------
    RejectedError
        From the funding feed.
    """
    if ctx.candles is None:
        why = ctx.problem if ctx.problem is not None else ctx.hold.reason if ctx.hold is not None else "no window"
        return CandleWindow(None, (why,))
    if funding is None:
        return CandleWindow(ctx.candles, ())
    try:
        rates = fetch_funding_since(funding, int(ctx.candles.index[0].value // 1_000_000), bar_ms)
    except RetryableError as exc:
        return CandleWindow(None, (f"funding history unavailable: {safe(str(exc))[:300]}",))
    return CandleWindow(with_funding_column(ctx.candles, rates, tf_ms), ())
