"""Paper serving on live candles: ``ats serve --mode paper`` without ``--replay``.

A forward test of a bundle on the real market without keys and without orders: the loop polls
the exchange's public klines (ccxt ``binanceusdm`` ``fetch_ohlcv``, through
:class:`serving.exchange.BinanceFuturesBroker` used read-only; no API key) shortly after each bar
close and runs every new closed bar through :class:`serving.loop.PaperStepper`, the per-bar logic
of the replay (:func:`serving.loop.run_replay`): paper broker with the env's accounting, bundle ->
V1 -> flat, deadline, risk guard, quarantine, hot-swap, notifications, one decision row per bar.

One :meth:`PaperLiveLoop.step`:

1. **Clock.** Read the exchange time (``fetch_time``); ``clock_offset_ms = server - wall`` (the
   injected wall clock). The bar to decide is the last one *closed by the exchange clock*, so a
   jump of the local clock never skips or repeats a bar; an offset beyond
   ``max_clock_offset_ms`` is recorded (``clock_offset`` event) and only shifts the poll times:
   no order exists whose timing it could spoil.
2. **Candles.** The context window of that bar (and the candles of missed bars, at most
   :data:`MAX_MISSED_CANDLE_BARS`) from a rolling in-memory window
   (:class:`serving.candles.CandleCache`, shared with the live loop): paged at start and when
   catching up (ccxt serves at most 1,000 klines a request), otherwise one small request re-reading
   the last few bars; the still-open bar is never used. The funding history is joined as
   ``funding_rate`` (:func:`serving.candles.with_funding_column`).
3. **Missed bars.** Bars that closed after the last processed bar and before the bar to decide
   (the process could not poll: failed fetches, a suspended machine) can no longer be decided:
   each gets a decision row of source 'missed' (:meth:`serving.loop.PaperStepper.skip`: its candle
   still goes through the paper broker, so the decision already taken fills and stops,
   take-profits and liquidation apply as resting orders would; a candle the exchange does not
   serve is quarantined) and one ``bars_missed`` event per gap.
4. **Decide** the bar (:meth:`serving.loop.PaperStepper.step`). Its own candle is *quarantined*
   when invalid (:func:`serving.loop.row_problems`), missing (stale feed), when a page is
   malformed twice (a row that is not ``[time, o, h, l, c, v]``, duplicate, out-of-order or
   misaligned open times), or when the funding history cannot be fetched (``with_funding``). An
   invalid or missing row inside the context window follows the repair policy of
   :mod:`serving.candles`, as in the live loop: re-fetched once; if the exchange keeps serving it,
   the bars are *held* (no policy is asked; hold-or-flat; reason ``quarantine_window: ...``) for
   ``FeedConfig.bad_candle_hold_bars`` bars, then it is repaired as a gap (previous close, volume
   0; a ``candle_repaired`` event) and the policy decides again; a row the exchange later serves
   corrected replaces the repair. A window the exchange's history does not fill is held. No
   policy ever sees the open bar or an invalid row.

ATR: each bar's ATR (stop and take-profit distances, slippage) is computed over its context
window in the deciding policy's period (``atr_period_bars`` of the bundle's features or of V1,
else ``FeedConfig.atr_period_bars``); with the default 1,000 bars of context, Wilder's smoothing
has forgotten its seed, so it equals the full-history ATR of a replay to float noise.

Restart: the paper account lives in this process only. A store that already holds decisions of
the run id is refused (:class:`serving.errors.FatalError`) rather than resumed from a fresh
account, which would silently restart the equity curve inside the same run: start a new run
with a new ``--db`` (or another ``run_id``). ``ats status --db`` reads the finished run.

Failures (:meth:`PaperLiveLoop.run`): a retryable error (network, 5xx, 429 after the broker's
own retries) or a rejected request ends the step (``step_failed`` event) and it is retried after
``step_retry_initial_s`` (doubling, at most ``step_retry_max_s``, never past the next poll); bars
that pass meanwhile become 'missed'. A :class:`serving.errors.FatalError` or any other exception
is recorded (``fatal_error`` / ``internal_error`` with the traceback) and stops the loop.
SIGTERM/SIGINT stop it between bars. Every stop writes ``run_finished``.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import pandas as pd
from pydantic import Field, model_validator

from envs.accounting import Bar, is_funding_time
from envs.config import CostConfig
from market.config_base import StrictConfig
from market.decision import Policy
from market.features import atr as atr_indicator
from market.instruments import DEFAULT_CCXT_SYMBOL, resolve_spec
from market.store import symbol_file_stem
from serving.candles import (  # noqa: F401 - Page and parse_page re-exported
    MAX_CONTEXT_BARS,
    PAGE_BARS,
    CandleCache,
    CandleContext,
    Page,
    fetch_funding_since,
    parse_page,
    with_funding_column,
)
from serving.clock import last_closed_bar_ms, seconds_to_next_poll, stop_on_signals
from serving.errors import FatalError, RejectedError, RetryableError
from serving.hotswap import PolicySlot, SlotGroup
from serving.identity import bundle_identity
from serving.live import atr_period_of
from serving.live_config import TF_MS as _TF_MS
from serving.live_config import LiveConfig
from serving.loop import BarInput, PaperStepper, ReplaySummary, ServeConfig, row_problems
from serving.notify import Notifier
from serving.risk import RiskGuard
from serving.store import DecisionRecord, StateStore

if TYPE_CHECKING:
    from serving.account_risk import AccountGuard
    from serving.portfolio import PortfolioSummary

MAX_MISSED_CANDLE_BARS = 1_500  # missed bars before the window whose candles are still read


class FeedConfig(StrictConfig):
    """Where and when the live-candle paper loop reads candles (units in the names).

    ``ats serve`` fills it from the ``live`` section of the serve config (:meth:`from_live`), so
    paper and testnet forward tests poll alike.
    """

    symbol: str = Field(DEFAULT_CCXT_SYMBOL, description="Unified ccxt symbol.")
    timeframe: str = Field("1h", description="Bar length; one of 1m 5m 15m 30m 1h 4h.")
    close_delay_s: float = Field(3.0, ge=0, description="Wait after a bar close before polling its candle, s.")
    poll_interval_s: float = Field(1.0, gt=0, description="Minimum wait between two polls, s.")
    max_clock_offset_ms: float = Field(
        2_500.0, gt=0, description="|exchange - local| clock offset above which a clock_offset event is recorded, ms."
    )
    atr_period_bars: int = Field(
        14, ge=1, description="ATR period for the stops of a policy that does not state its own atr_period_bars."
    )
    step_retry_initial_s: float = Field(2.0, gt=0, description="First wait before retrying a failed poll, s.")
    step_retry_max_s: float = Field(60.0, gt=0, description="Longest wait between retries of a failed poll, s.")
    with_funding: bool = Field(
        True, description="Join the funding history as funding_rate (a failed fetch quarantines the bar)."
    )
    bad_candle_hold_bars: int = Field(
        2, ge=0, le=1000, description="Bars held (no policy, hold-or-flat) after an invalid or missing candle inside "
        "the context window is first seen and re-fetched in vain; then it is repaired as a gap (previous close, "
        "volume 0, candle_repaired event). The decided bar's own bad candle is always quarantined.")

    @model_validator(mode="after")
    def _known_timeframe(self) -> FeedConfig:
        if self.timeframe not in _TF_MS:
            raise ValueError(f"timeframe {self.timeframe!r} not supported; use one of {sorted(_TF_MS)}")
        return self

    @classmethod
    def from_live(cls, live: LiveConfig) -> FeedConfig:
        """The feed settings of a :class:`serving.live.LiveConfig` (same symbol, timeframe, timing)."""
        return cls(**{k: getattr(live, k) for k in cls.model_fields})


class CandleFeed(Protocol):
    """Public market data (:class:`serving.exchange.BinanceFuturesBroker` without keys)."""

    def load(self) -> Any:
        """Load the exchange's markets."""

    def server_time_ms(self) -> int:
        """The exchange's clock, ms since the Unix epoch."""

    def fetch_ohlcv(self, timeframe: str, since_ms: int | None, limit: int, until_ms: int | None = None
                    ) -> list[list[Any]]:  # fmt: skip
        """Klines ``[open_ms, o, h, l, c, v]`` from ``since_ms`` (ccxt's shape)."""

    def fetch_funding(self, since_ms: int, limit: int = 1000) -> list[tuple[int, float]]:
        """Funding settlements ``(time_ms, rate)`` from ``since_ms``."""


def _bar(candles: pd.DataFrame, ts: pd.Timestamp, funding_interval_hours: int) -> Bar:
    """The :class:`Bar` of row ``ts`` of ``candles`` (NaN prices when the row is absent)."""
    ns = int(ts.value)
    if ts in candles.index:
        row = candles.loc[ts]
        o, h, lo, c = (float(row[k]) for k in ("open", "high", "low", "close"))
        funding = float(row["funding_rate"]) if "funding_rate" in candles.columns else math.nan
    else:
        o = h = lo = c = funding = math.nan
    return Bar(ns, o, h, lo, c, funding, is_funding_time(ns, funding_interval_hours))


MISSED_REASON = ("missed: the bar closed while the loop could not poll (failed fetches, or the process was not "
                 "running); nothing was decided, its candle went through the paper broker with the position held")


S = TypeVar("S")


def refuse_resumed_paper_run(store: StateStore, run_id: str) -> None:
    """Refuse a state database that already holds decisions of paper run ``run_id``.

    Raises
    ------
    FatalError
        The store has a decided bar of ``run_id``: a paper account cannot be resumed after a restart.
    """
    last = store.last_decision_bar(run_id)
    if last is not None:
        raise FatalError(
            f"the state database already holds paper run {run_id!r} (last bar {last}); a paper account "
            "cannot be resumed after a restart: use a new --db (or another run_id) for a new forward test"
        )


class _Poller(Generic[S]):
    """Polling after each bar close, retries, signals and ``run_finished`` of the live-candle paper loops
    (:class:`PaperLiveLoop`, :class:`PaperLivePortfolio`; ``S`` the summary their ``run`` returns)."""

    feed_config: FeedConfig
    stop_requested: threading.Event
    clock_offset_ms: float
    tf_ms: int
    wall_clock_s: Callable[[], float]
    monotonic_s: Callable[[], float]
    _sleep: Callable[[float], None]
    _started: bool
    _failures: int
    _last_error: str | None

    def start(self) -> None:
        raise NotImplementedError

    def step(self) -> list[DecisionRecord]:
        raise NotImplementedError

    def _note(self, kind: str, detail: dict[str, Any], when: pd.Timestamp | None = None) -> None:
        raise NotImplementedError

    def _finish(self, time: pd.Timestamp, **detail: Any) -> S:
        raise NotImplementedError

    def _now_ts(self) -> pd.Timestamp:
        return pd.Timestamp(int(self.wall_clock_s() * 1000), unit="ms", tz="UTC")

    # -- running ----------------------------------------------------------------------------------
    def seconds_to_next_poll(self) -> float:
        """Seconds until ``close_delay_s`` after the next bar close, by the exchange-corrected wall
        clock, within [``poll_interval_s``, one bar]."""
        fc = self.feed_config
        return seconds_to_next_poll(self.wall_clock_s() * 1000.0 + self.clock_offset_ms, self.tf_ms,
                                    fc.close_delay_s, fc.poll_interval_s)

    def run(self, *, max_bars: int | None = None, install_signal_handlers: bool = True) -> S:
        """Poll until SIGTERM/SIGINT (:attr:`stop_requested`) or ``max_bars`` bars decided; returns
        the run's summary after writing ``run_finished``.

        A signal only sets :attr:`stop_requested`; the bar in progress finishes first.

        Raises
        ------
        FatalError
            From :meth:`start` (store holds the run, unknown symbol) or the exchange (recorded).
        Exception
            Any unexpected error of a step, recorded as ``internal_error`` with its traceback.
        """
        with stop_on_signals(self.stop_requested, install=install_signal_handlers):
            try:
                self.start()
                decided = self._run(max_bars)
                return self._finish(self._now_ts(), decided_bars=decided, stopped="max_bars"
                                    if max_bars is not None and decided >= max_bars else "signal")  # fmt: skip
            except BaseException as exc:
                if self._started:
                    self._finish(self._now_ts(), stopped=f"{type(exc).__name__}: {exc}"[:500])
                raise

    def _run(self, max_bars: int | None) -> int:
        decided = 0
        while not self.stop_requested.is_set():
            failed = False
            try:
                decided += 1 if self.step() else 0
            except (RetryableError, RejectedError) as exc:
                failed = True
                self._failures += 1
                self._last_error = f"{type(exc).__name__}: {exc}"[:300]
                self._note("step_failed", {"error": self._last_error, "consecutive": self._failures})
            except FatalError as exc:
                self._note("fatal_error", {"error": f"{type(exc).__name__}: {exc}"[:1000]})
                raise
            except Exception as exc:
                self._note("internal_error", {"error": f"{type(exc).__name__}: {exc}"[:1000],
                                              "traceback": traceback.format_exc()[-3000:]})  # fmt: skip
                raise
            if max_bars is not None and decided >= max_bars:
                break
            self._wait(failed)
        return decided

    def _wait(self, failed: bool) -> None:
        """Sleep until the next poll (a failed poll: the retry wait, doubling) in slices of at most
        1 s, so that a signal stops the loop promptly."""
        wait = self.seconds_to_next_poll()
        if failed:
            retry = self.feed_config.step_retry_initial_s * 2.0 ** (self._failures - 1)
            wait = min(retry, self.feed_config.step_retry_max_s, wait)
        end = self.monotonic_s() + wait
        while not self.stop_requested.is_set():
            left = end - self.monotonic_s()
            if left <= 0:
                return
            self._sleep(min(1.0, left))




class PaperLiveLoop(_Poller[ReplaySummary]):
    """The live-candle paper loop (module docstring).

    Parameters
    ----------
    feed : CandleFeed
        Public market data, e.g. ``BinanceFuturesBroker(make_client(api_key=None, secret=None,
        sandbox=False))``.
    store : StateStore
        Where the run's decisions, fills, equity and events go; must not hold the run id yet.
    config : ServeConfig
        Paper settings (equity, deadline, ``run_id``, ``context_bars``: an int of at most
        :data:`serving.candles.MAX_CONTEXT_BARS` (10,000; read in pages), backoff); ``warmup_bars``
        is not used (the context comes from the exchange).
    feed_config : FeedConfig
        Symbol, timeframe, poll timing, clock-offset limit, funding, bad-candle hold.
    primary, fallback, costs, guard, notifier
        As :func:`serving.loop.run_replay`.
    wall_clock_s : Callable[[], float]
        Local wall clock, seconds since the epoch (tests inject it).
    monotonic_s : Callable[[], float]
        Monotonic seconds: decision latency and the waits between polls.
    sleep : Callable[[float], None]
        Sleeps the given seconds (tests inject one that moves their clocks).
    now : Callable[[], datetime]
        Wall clock for ``created_at`` of decision rows (default: ``wall_clock_s``).

    Raises
    ------
    ValueError
        If ``config.context_bars`` is None or above :data:`serving.candles.MAX_CONTEXT_BARS`, or shorter than the
        fallback's ``history_bars``.
    """

    def __init__(
        self,
        feed: CandleFeed,
        store: StateStore,
        config: ServeConfig,
        feed_config: FeedConfig,
        *,
        primary: Policy | PolicySlot | None,
        fallback: Policy,
        costs: CostConfig,
        primary_load_error: str | None = None,
        guard: RiskGuard | None = None,
        notifier: Notifier | None = None,
        wall_clock_s: Callable[[], float] = time.time,
        monotonic_s: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        n = config.context_bars
        if n is None or n > MAX_CONTEXT_BARS:
            raise ValueError(f"context_bars must be an int <= {MAX_CONTEXT_BARS} on live candles (read in pages of "
                             f"{PAGE_BARS} klines), got {n!r}")  # fmt: skip
        slot = primary if isinstance(primary, PolicySlot) else PolicySlot(
            primary, load_error=primary_load_error, backoff=config.primary_backoff)  # fmt: skip
        self.wall_clock_s, self.monotonic_s, self._sleep = wall_clock_s, monotonic_s, sleep
        now = now or (lambda: datetime.fromtimestamp(self.wall_clock_s(), UTC))
        self.stepper = PaperStepper(slot=slot, fallback=fallback, costs=costs, store=store, config=config,
                                    guard=guard, notifier=notifier, clock=monotonic_s, now=now,
                                    bar_interval=pd.Timedelta(milliseconds=_TF_MS[feed_config.timeframe]))  # fmt: skip
        self.feed, self.store, self.config, self.feed_config = feed, store, config, feed_config
        self.costs = costs
        self.tf_ms = _TF_MS[feed_config.timeframe]
        #: the rolling candle window (paging, flaws, repairs: :mod:`serving.candles`)
        self.candle_cache = CandleCache(feed_config.timeframe, self.tf_ms, n, feed_config.bad_candle_hold_bars)
        self.stop_requested = threading.Event()
        self.clock_offset_ms = 0.0
        self.last_bar: pd.Timestamp | None = None  # the last bar decided or recorded as missed
        self._started = False
        self._offset_flagged = False
        self._failures = 0  # consecutive failed polls
        self._last_error: str | None = None

    @property
    def run_id(self) -> str:
        """The serving run's id (from the config)."""
        return self.config.run_id

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Refuse a store holding this run, load the market (symbol check), write ``run_started``.

        Raises
        ------
        FatalError
            The store already holds decisions of ``config.run_id`` (module docstring: Restart),
            or the exchange does not list the symbol.
        """
        if self._started:
            return
        refuse_resumed_paper_run(self.store, self.run_id)
        self.feed.load()
        fc = self.feed_config
        instrument = self._exchange_instrument()
        self.stepper.start(self._now_ts(), candles="live", symbol=fc.symbol, timeframe=fc.timeframe,
                           context_bars=self.config.context_bars, instrument=instrument,
                           bundle=bundle_identity(self.stepper.slot))  # fmt: skip  # (ats gate --paper-db reads it)
        self._started = True

    def _exchange_instrument(self) -> dict[str, Any]:
        """Trade the paper account under the exchange's filters of the fed symbol (as the live broker sizes).

        The filters come from the loaded market; the brackets and max leverage from the bundle's spec when it is
        of the same symbol, else from :func:`market.instruments.resolve_spec` of the symbol (bundled table). The
        paper costs switch to that spec before the first bar; returns its record for ``run_started``.

        Raises
        ------
        market.instruments.InstrumentSpecError
            No spec of the fed symbol is known for the brackets (the message names it and the ways to give one).
        """
        spec_of = getattr(self.feed, "instrument_spec", None)
        if spec_of is None:  # a feed without exchange filters (tests): the configured costs stand
            return {"origin": "configured", "spec": self.costs.instrument.model_dump(mode="json")}
        symbol = str(getattr(self.feed, "market_id", self.costs.instrument.symbol))
        fallback = self.costs.instrument if self.costs.instrument.symbol == symbol else resolve_spec(symbol).spec
        spec = spec_of(fallback)
        self.costs = self.costs.with_instrument(spec)
        self.stepper.use_costs(self.costs)
        return {"origin": "exchange", "spec": spec.model_dump(mode="json")}

    def summary(self) -> ReplaySummary:
        """The run so far (see :class:`serving.loop.ReplaySummary`)."""
        return self.stepper.summary()

    def _note(self, kind: str, detail: dict[str, Any], when: pd.Timestamp | None = None) -> None:
        self.stepper.note(when if when is not None else self._now_ts(), kind, detail)

    def _finish(self, time: pd.Timestamp, **detail: Any) -> ReplaySummary:
        return self.stepper.finish(time, **detail)

    # -- one poll ---------------------------------------------------------------------------------
    def last_closed_bar_ms(self, server_ms: int) -> int:
        """Open time (ms) of the last bar closed at exchange time ``server_ms`` (ms)."""
        return last_closed_bar_ms(server_ms, self.tf_ms)

    def step(self) -> list[DecisionRecord]:
        """Process every bar closed since the last poll (module docstring); returns the decision rows
        written (missed bars first, the decided bar last; empty when no new bar has closed).

        Raises
        ------
        RetryableError, RejectedError
            A fetch failed (nothing of this poll was recorded; the next poll retries).
        FatalError
            From :meth:`start`.
        """
        self.start()
        server_ms = int(self.feed.server_time_ms())
        self._check_offset(server_ms)
        bar_ms = self.last_closed_bar_ms(server_ms)
        last_ms = None if self.last_bar is None else int(self.last_bar.value // 1_000_000)
        if last_ms is not None and bar_ms <= last_ms:
            return []
        missed = [] if last_ms is None else list(range(last_ms + self.tf_ms, bar_ms, self.tf_ms))
        ctx, funding_problem = self._fetch(bar_ms, missed)
        rows = [self._skip(ctx, ms) for ms in missed]
        if missed:
            self._note("bars_missed", {"first": str(rows[0].bar_open_time), "last": str(rows[-1].bar_open_time),
                                       "count": len(missed), "last_error": self._last_error})  # fmt: skip
        bar = pd.Timestamp(bar_ms, unit="ms", tz="UTC")
        for kind, detail in ctx.events:
            self._note(kind, detail, bar)
        rows.append(self.stepper.step(self._decided_input(ctx, bar_ms, funding_problem)))
        self.last_bar = pd.Timestamp(bar_ms, unit="ms", tz="UTC")
        self._failures, self._last_error = 0, None
        return rows

    def _check_offset(self, server_ms: int) -> None:
        """Record a ``clock_offset`` event when |exchange - local| crosses ``max_clock_offset_ms``."""
        self.clock_offset_ms = server_ms - self.wall_clock_s() * 1000.0
        large = abs(self.clock_offset_ms) > self.feed_config.max_clock_offset_ms
        if large != self._offset_flagged:
            self._note("clock_offset", {"offset_ms": round(self.clock_offset_ms, 1), "large": large,
                                        "limit_ms": self.feed_config.max_clock_offset_ms})  # fmt: skip
        self._offset_flagged = large

    def _fetch(self, bar_ms: int, missed: list[int]) -> tuple[CandleContext, str | None]:
        """The candles of this poll from the rolling window: the context of ``bar_ms`` and the rows of
        the ``missed`` bars (open times, ms; at most :data:`MAX_MISSED_CANDLE_BARS` before the
        window), with ``funding_rate`` joined to ``raw`` and ``candles``; and why funding is unknown
        (None when joined or not wanted)."""
        first = None
        if missed:
            first = max(missed[0], self.candle_cache.window_start_ms(bar_ms) - MAX_MISSED_CANDLE_BARS * self.tf_ms)
        ctx = self.candle_cache.context(self.feed, bar_ms, first_ms=first)
        if ctx.page_problem is not None or not self.feed_config.with_funding or not len(ctx.raw):
            return ctx, None
        try:
            funding = fetch_funding_since(self.feed, int(ctx.raw.index[0].value // 1_000_000), bar_ms)
        except RetryableError as exc:
            return ctx, f"funding history unavailable: {exc}"[:300]
        window = None if ctx.candles is None else with_funding_column(ctx.candles, funding, self.tf_ms)
        return replace(ctx, raw=with_funding_column(ctx.raw, funding, self.tf_ms), candles=window), None

    def _problem(self, ctx: CandleContext, ts: pd.Timestamp) -> str | None:
        """Why the candle of the missed bar ``ts`` is not usable (None when it is)."""
        if ctx.page_problem is not None:
            return f"candle page rejected: {ctx.page_problem}"
        if ts not in ctx.raw.index:
            return f"no candle at {ts}: missing from the exchange's candles (gap or stale feed)"
        return row_problems(ctx.raw.loc[[ts]])[0]

    def _skip(self, ctx: CandleContext, ms: int) -> DecisionRecord:
        return self.stepper.skip(self._missed_input(ctx, ms), self._missed_reason())

    def _missed_input(self, ctx: CandleContext, ms: int) -> BarInput:
        """The :class:`BarInput` of the missed bar opening at ``ms`` (its candle as served; no window, no ATR)."""
        ts = pd.Timestamp(ms, unit="ms", tz="UTC")
        return BarInput(ms // self.tf_ms, ts, _bar(ctx.raw, ts, self.costs.funding_interval_hours), None,
                        math.nan, math.nan, self._problem(ctx, ts))  # fmt: skip

    def _missed_reason(self) -> str:
        reason = MISSED_REASON if self._last_error is None else f"{MISSED_REASON}; last error: {self._last_error}"
        return reason[:2000]

    def _decided_input(self, ctx: CandleContext, bar_ms: int, funding_problem: str | None) -> BarInput:
        """The :class:`BarInput` of the bar to decide: its own candle (as served), the context window
        (repairs applied; None when quarantined or held), ATRs over the window, problem, taint."""
        ts = pd.Timestamp(bar_ms, unit="ms", tz="UTC")
        problem = ctx.problem or funding_problem
        hold = None if problem is not None else ctx.hold
        taint = None if hold is None else replace(hold, reason=f"quarantine_window: {hold.reason}")
        window = ctx.candles
        if window is None:  # ATRs of a held bar: over the rows as served
            window = ctx.raw.loc[pd.Timestamp(self.candle_cache.window_start_ms(bar_ms), unit="ms", tz="UTC") : ts]
        primary_period = atr_period_of(self.stepper.slot.policy, self.feed_config.atr_period_bars)
        fallback_period = atr_period_of(self.stepper.fallback, self.feed_config.atr_period_bars)
        return BarInput(bar_ms // self.tf_ms, ts, _bar(ctx.raw, ts, self.costs.funding_interval_hours),
                        ctx.candles if problem is None and taint is None else None, _last_atr(window, primary_period),
                        _last_atr(window, fallback_period), problem, taint)  # fmt: skip


class PaperLivePortfolio(_Poller["PortfolioSummary"]):
    """Paper on live candles for several symbols on one paper account (``ats serve --mode paper --symbols A,B``).

    One :class:`PaperLiveLoop` per symbol reads its candles (its feed, its rolling window, its repairs and holds:
    the module docstring); the account steps them together exactly as the multi-symbol replay does
    (:class:`serving.portfolio.AccountStepper`: equal sleeves, each symbol's guard then the account's, one decision
    row per symbol, one ``account_equity`` row per bar, all of a bar's rows in one transaction). So the run equals,
    bar for bar, :func:`serving.portfolio.run_portfolio_replay` of the same closed candles
    (``tests/serving/test_paper_live_portfolio.py``).

    One :meth:`step`: the exchange clock (read through the first symbol's feed) says which bar to decide, the same
    for every symbol (one timeframe); every symbol's candles and funding are read *before anything is written*, so
    a failed read of any symbol ends the whole poll (``step_failed``) and the next poll retries all of them (within
    the bar: the bar is still decided for all symbols together; after it: missed for all). Missed bars
    (:meth:`serving.portfolio.AccountStepper.skip`) get a 'missed' row per symbol and an ``account_equity`` row; one
    ``bars_missed`` event per gap names the symbols. A symbol whose own candle is invalid or absent is quarantined
    for the bar while the others are decided. Candle events (repairs, holds) name their symbol.

    Restart, failures and signals as :class:`PaperLiveLoop` (a store holding the run is refused; ``run_finished``
    with the account's totals and each symbol's).

    Parameters
    ----------
    loops : Sequence[PaperLiveLoop]
        One per symbol, built on ``store`` with ``config`` whose ``initial_equity_usdt`` is the symbol's sleeve
        (:func:`serving.portfolio.sleeve_equity_usdt`), the same run id and timeframe; each stepper's costs of its
        feed's symbol, its own symbol guard (if any) as the stepper's ``guard``. The first loop's clocks, sleep and
        poll timing drive the run.
    store : StateStore
        The run's store (the loops').
    config : ServeConfig
        The account's settings: ``initial_equity_usdt`` (the whole account), ``run_id``.
    account_guard : serving.account_risk.AccountGuard | None
        The account's guard; None: none.
    notifier : Notifier | None
        Receives the account-level events.
    slot_group : serving.hotswap.SlotGroup | None
        Hot-swap over the loops' slots (a candidate swapped into every symbol at the same bar or into none:
        :class:`serving.portfolio.AccountStepper`); None: none.

    Raises
    ------
    ValueError
        No loop; a slot group not over the loops' slots; loops of different run ids, timeframes or stores; a sleeve that is not ``initial_equity_usdt / N``;
        a stepper whose costs are not of its feed's symbol; a symbol given twice.
    """

    def __init__(self, loops: Sequence[PaperLiveLoop], store: StateStore, config: ServeConfig, *,
                 account_guard: AccountGuard | None = None, notifier: Notifier | None = None,
                 slot_group: SlotGroup | None = None) -> None:
        from serving.portfolio import AccountStepper, sleeve_equity_usdt

        if not loops:
            raise ValueError("paper on live candles needs at least one symbol")
        sleeve = sleeve_equity_usdt(config.initial_equity_usdt, len(loops))
        for loop in loops:
            fed = symbol_file_stem(loop.feed_config.symbol)
            if loop.stepper.symbol != fed:
                raise ValueError(f"the loop fed {fed} trades the instrument spec of {loop.stepper.symbol}: give it "
                                 f"the costs of {fed}")
            if loop.run_id != config.run_id or loop.store is not store:
                raise ValueError(f"the loop of {fed} writes run {loop.run_id!r} to another store or run than the "
                                 f"account's ({config.run_id!r})")
            if loop.feed_config.timeframe != loops[0].feed_config.timeframe:
                raise ValueError(f"every symbol must be served on one timeframe, got {loop.feed_config.timeframe} "
                                 f"({fed}) and {loops[0].feed_config.timeframe}")
            if not math.isclose(loop.config.initial_equity_usdt, sleeve, rel_tol=1e-12):
                raise ValueError(f"the loop of {fed} trades {loop.config.initial_equity_usdt} USDT; each of the "
                                 f"{len(loops)} sleeves of a {config.initial_equity_usdt} USDT account is {sleeve}")
        self.loops = sorted(loops, key=lambda loop: loop.stepper.symbol)
        self.account = AccountStepper([loop.stepper for loop in self.loops], store, config.run_id,
                                      account_guard=account_guard, notifier=notifier, slot_group=slot_group)
        lead = self.loops[0]
        self.store, self.config, self.feed_config = store, config, lead.feed_config
        self.wall_clock_s, self.monotonic_s, self._sleep = lead.wall_clock_s, lead.monotonic_s, lead._sleep
        self.tf_ms = lead.tf_ms
        self.stop_requested = threading.Event()
        self.clock_offset_ms = 0.0
        self.last_bar: pd.Timestamp | None = None
        self._started = False
        self._failures = 0
        self._last_error: str | None = None

    @property
    def run_id(self) -> str:
        """The serving run's id."""
        return self.config.run_id

    @property
    def symbols(self) -> list[str]:
        """The served symbols (exchange ids, sorted)."""
        return list(self.account.symbols)

    def start(self) -> None:
        """Refuse a store holding this run, load every symbol's market (its exchange filters), write ``run_started``.

        Raises
        ------
        FatalError
            As :meth:`PaperLiveLoop.start`.
        """
        if self._started:
            return
        refuse_resumed_paper_run(self.store, self.run_id)
        instruments = {}
        for loop in self.loops:
            loop.feed.load()
            instruments[loop.stepper.symbol] = loop._exchange_instrument()
            loop._started = True
        if [loop.stepper.symbol for loop in self.loops] != self.account.symbols:
            raise FatalError(f"the exchange's instrument specs name other symbols than {self.account.symbols}")
        fc = self.feed_config
        self.account.start(self._now_ts(), self.config.initial_equity_usdt, candles="live",
                           feeds={loop.stepper.symbol: loop.feed_config.symbol for loop in self.loops},
                           timeframe=fc.timeframe, context_bars=self.config.context_bars, instrument=instruments,
                           bundle=bundle_identity(self.loops[0].stepper.slot))  # fmt: skip
        self._started = True

    def summary(self) -> PortfolioSummary:
        """The run so far (:class:`serving.portfolio.PortfolioSummary`)."""
        return self.account.summary(self.config.initial_equity_usdt)

    def _note(self, kind: str, detail: dict[str, Any], when: pd.Timestamp | None = None) -> None:
        self.account.note(when if when is not None else self._now_ts(), kind, detail)

    def _finish(self, time: pd.Timestamp, **detail: Any) -> PortfolioSummary:
        return self.account.finish(time, self.config.initial_equity_usdt, **detail)

    def step(self) -> list[DecisionRecord]:
        """Process every bar closed since the last poll for every symbol (class docstring); returns the decision
        rows written (missed bars first, symbol order within a bar; empty when no new bar has closed).

        Raises
        ------
        RetryableError, RejectedError
            A symbol's fetch failed (nothing of this poll was recorded; the next poll retries).
        FatalError
            From :meth:`start`.
        """
        self.start()
        lead = self.loops[0]
        server_ms = int(lead.feed.server_time_ms())
        lead._check_offset(server_ms)
        self.clock_offset_ms = lead.clock_offset_ms
        bar_ms = last_closed_bar_ms(server_ms, self.tf_ms)
        last_ms = None if self.last_bar is None else int(self.last_bar.value // 1_000_000)
        if last_ms is not None and bar_ms <= last_ms:
            return []
        missed = [] if last_ms is None else list(range(last_ms + self.tf_ms, bar_ms, self.tf_ms))
        polled = [(loop, *loop._fetch(bar_ms, missed)) for loop in self.loops]  # every read before any write
        rows: list[DecisionRecord] = []
        for loop in self.loops:
            loop._last_error = self._last_error
        for ms in missed:
            ts = pd.Timestamp(ms, unit="ms", tz="UTC")
            rows += self.account.skip(ts, {loop.stepper.symbol: loop._missed_input(ctx, ms) for loop, ctx, _ in polled},
                                      lead._missed_reason())
        if missed:
            self._note("bars_missed", {"first": str(rows[0].bar_open_time), "last": str(rows[-1].bar_open_time),
                                       "count": len(missed), "symbols": self.symbols, "last_error": self._last_error})
        bar = pd.Timestamp(bar_ms, unit="ms", tz="UTC")
        for loop, ctx, _ in polled:
            for kind, detail in ctx.events:
                loop._note(kind, {**detail, "symbol": loop.stepper.symbol}, bar)
        rows += self.account.step(bar, {loop.stepper.symbol: loop._decided_input(ctx, bar_ms, funding_problem)
                                        for loop, ctx, funding_problem in polled})
        self.last_bar = bar
        for loop in self.loops:
            loop.last_bar = bar
        self._failures, self._last_error = 0, None
        return rows


def _last_atr(window: pd.DataFrame, period_bars: int) -> float:
    """ATR (price units) of the last row of ``window`` in ``period_bars``; NaN when too short or empty."""
    if len(window) <= period_bars:
        return math.nan
    return float(atr_indicator(window, int(period_bars))[-1])
