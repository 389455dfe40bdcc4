"""Live bar loop for Binance USDⓈ-M (testnet or live): decide once per closed bar, never send twice.

One call of :meth:`LiveLoop.step` does, in this order (every phase is idempotent, so a process
killed anywhere and restarted carries on where it stopped):

1. **Clock**: read the exchange time; ``offset = server - wall`` (injected wall clock). The bar
   to decide is the last one *closed by the exchange clock*, so a jump of the local clock never
   skips or repeats a bar; an offset beyond ``max_clock_offset_ms`` blocks entries (event).
   **Missed bars**: every bar has exactly one decision row. The loop only ever decides the last
   closed bar, so a bar with no decision row when a later bar is reached can no longer be
   decided: it is recorded afterwards, once reconciliation has read the exchange, as source
   'missed' (:func:`missed_bar_records`), with the side of the reconciled exchange position as
   its direction (nothing was sent for it: the position and its exchange-side
   stop/take-profit were left as they were) and a reason saying
   why: every attempt of that bar failed in this process (attempt count and last error), or no
   step ran for it (process stopped, restarting, or failing before the bar was known). One
   ``bars_missed`` event per gap. A new run (no decision yet) has no gap.
2. **Reconcile** (:class:`serving.reconciler.Reconciler`, rules pure in :mod:`serving.reconcile`):
   unresolved intents of earlier bars are looked up by client id, new fills stored, the exchange
   position checked against ``last trusted position row + signed fills after its trade id``.
   **Unknown is not flat**: a read that fails or is malformed ends the step (retried within the
   bar); nothing is cancelled or sent. A confirmed difference is an 'unreconciled' row: the loop
   refuses to trade (no order at all, exits included; the decision is still recorded) until a
   later read agrees or an operator accepts the exchange position (``ats serve accept-position``,
   or :meth:`LiveLoop.reset_position_baseline` in-process). Our stops and take-profits no longer
   open are resolved; orphans on a flat position that agrees with our trades are cancelled.
3. **Candles**: the last ``context_bars`` closed bars from a rolling in-memory window
   (:class:`serving.candles.CandleCache`: paged at start and when catching up, ccxt serves at most
   1,000 klines a request; otherwise one small request re-reading the last few bars). The window
   must be complete, unique, sorted, gapless, finite and OHLC-consistent and end at the bar to
   decide. Otherwise the bar is **quarantined**: the policy is not asked (a 'guard' decision holds
   the position; stops stay on the exchange; entries are impossible). Bad candles
   (:mod:`serving.candles`, repair policy): a flawed row is re-fetched once; the bar's own flawed
   candle quarantines it; another flawed row holds the bars for ``bad_candle_hold_bars``, then is
   repaired as a gap (previous close, volume 0; ``candle_repaired`` event) so trading resumes.
   The funding history of the window is joined as ``funding_rate`` (:func:`with_funding_column`);
   if it cannot be fetched the bar is quarantined too.
4. **Decide** (only if the bar has no decision row yet): bundle -> V1 -> flat with
   :func:`serving.choice.choose` (one ``fallback_engaged`` event when V1 takes over, one
   ``primary_recovered`` when the bundle decides again: :class:`serving.choice.FallbackLedger`,
   shared with the paper loop); then the optional risk guard
   (``guard.review(decision, AccountSnapshot) -> GuardVerdict``; a guard that raises blocks
   entries: fail closed). The bundle env's trading rules (:mod:`serving.trading_rules`) act as in the
   env: the policy is asked only at decision bars (a hold between them, source 'guard'); a close or
   flip of a position younger than ``min_hold_bars`` (bars since our entry's fill) is a hold (source
   'guard', ``min_hold`` event; stops and take-profits still act, the guard may still flatten); a
   bundle with a rebalance band is refused (:class:`serving.trading_rules.UnservableBundleError`).
   An entry is sized as the env kernel would size it if the next open equalled the decided bar's
   close (:func:`serving.intents.next_open_entry`: the cost model's adverse slippage and fee, the
   equity after the modelled exit on a flip). The decision row and its intents
   (:func:`serving.intents.plan_bar`) are written in ONE transaction **before** anything is sent.
5. **Execute** the bar's intents (:class:`serving.executor.OrderExecutor`): exit (after cancelling
   our open protective orders), entry (after setting the exchange leverage), stop move; once the
   entry has a fill, its ``stop`` and ``tp`` (written, then sent); a refused stop closes the
   position at once (``unprot``); a held position found without its stop or take-profit gets
   them again (:meth:`LiveLoop._repair_protection`). Never twice: an intent that may have reached
   the exchange is looked up by client id before any resend, and a market order none finds is
   re-sent only once trades and position prove it absent (``create_settle_s`` after its send).
6. Record fills, position and an equity snapshot. A bar whose decision is recorded but whose
   equity row is not (stopped in between) gets it on the next step: at once within the bar, or
   with an ``equity_recorded_late`` event once the bar has passed.

Notifications (optional ``notifier``, :mod:`serving.notify`): after every step, successful or
not, the events of this run written since the last publish and the exchange fills stored since
(entries, exits, stops, take-profits, external fills) go to ``notifier.publish``; only the first
``step_failed`` of a streak is passed on. A notifier that raises is ignored: it never stops the
loop.

Failures (:meth:`LiveLoop.run`): a retryable, ambiguous or rejected error ends the step; it is
retried within the same bar after ``step_retry_initial_s`` (doubling, at most ``step_retry_max_s``
and never past the next bar close). Any other exception is recorded (redacted, with its
traceback) as ``internal_error`` and halts entries for the rest of the process (exits are still
sent); a :class:`FatalError` stops the loop.

Crash points (:mod:`serving.crash`): ``crash_points.hit(name)`` is called at each point of
:data:`serving.crash.CRASH_POINTS`; the object is injected (no-op by default) and shared with the
reconciler and the executor; ``tests/serving/test_crash_recovery.py`` injects
:class:`serving.crash.KillAt` to SIGKILL the process there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import pandas as pd

from envs.config import CostConfig, TradingRulesConfig
from market.decision import Decision, DecisionContext, Policy, PositionView
from market.features import atr as atr_indicator
from serving.broker import ExchangeBroker
from serving.candles import (
    CandleCache,
    CandleWindow,
    parse_ohlcv_row,
    validate_window,
    window_with_funding,
    with_funding_column,
)
from serving.choice import Choice, FallbackLedger, choose
from serving.clock import last_closed_bar_ms, seconds_to_next_poll, stop_on_signals
from serving.crash import NO_CRASH, CrashPoints
from serving.drift_watch import DriftWatch
from serving.errors import AmbiguousOutcomeError, FatalError, RejectedError, RetryableError
from serving.executor import OrderExecutor, StepResult
from serving.hotswap import PolicySlot
from serving.intents import (
    ExchangePosition,
    FillModel,
    OpenProtection,
    exchange_leverage,
    parse_client_order_id,
    plan_bar,
)
from serving.live_config import TF_MS, LiveConfig
from serving.notify import Notifier
from serving.reconcile import UNRESOLVED_STATUSES
from serving.reconciler import Reconciled, Reconciler
from serving.risk import AccountSnapshot
from serving.secrets import strip_url_queries
from serving.store import (
    DecisionRecord,
    EquityRecord,
    EventRecord,
    ExchangeFillRecord,
    FillRecord,
    StateStore,
)
from serving.trading_rules import (
    bundle_env_config,
    decides_at,
    min_hold_reason,
    not_decision_bar_reason,
    require_live_servable,
)

__all__ = [
    "MISSED_NO_STEP", "GuardLike", "LiveConfig", "LiveLoop", "StepResult", "atr_period_of", "fill_notices",
    "last_closed_bar_ms", "missed_bar_records", "missed_bars", "parse_ohlcv_row", "seconds_to_next_poll",
    "stop_on_signals", "validate_window", "with_funding_column",
]  # fmt: skip


class GuardLike(Protocol):
    """The risk guard interface (``serving.risk.RiskGuard``)."""

    def review(self, decision: Decision, account: Any) -> Any:
        """Mark ``account`` and gate ``decision`` (the guard's verdict); never raises."""

    def record_closed_trade(self, time: pd.Timestamp, pnl_usdt: float) -> None:
        """Count a closed trade's net PnL (USDT) in the guard's statistics."""


# ---------------------------------------------------------------------------------------------
# pure helpers of the loop
# ---------------------------------------------------------------------------------------------


def atr_period_of(policy: Policy | None, default_bars: int) -> int:
    """ATR period (bars) in whose units ``policy`` means its stop and take-profit distances: its
    ``atr_period_bars`` (the bundle's feature ATR for V2, V1's own), else ``default_bars``."""
    period = None if policy is None else policy.atr_period_bars
    return int(period) if period else int(default_bars)


def missed_bars(last_decided: pd.Timestamp | None, bar: pd.Timestamp, tf_ms: int) -> list[pd.Timestamp]:
    """Open times strictly between ``last_decided`` and ``bar`` (pure): bars that closed with no decision.

    Empty when ``last_decided`` is None (a new run) or not earlier than the bar before ``bar``.
    """
    if last_decided is None:
        return []
    step = pd.Timedelta(milliseconds=tf_ms)
    first = last_decided + step
    return list(pd.date_range(first, bar - step, freq=step)) if first < bar else []


def missed_bar_records(run_id: str, bars: Sequence[pd.Timestamp], side: int, reasons: dict[pd.Timestamp, str],
                       default_reason: str, created_at: pd.Timestamp, symbol: str) -> list[DecisionRecord]:
    """Decision rows (source 'missed') of ``symbol`` for ``bars`` (pure): direction ``side`` (the position left in
    place), default sizing, no raw action, latency 0, reason ``reasons.get(bar, default_reason)``."""
    decision = Decision(direction=int(side)) if side else Decision.flat()
    return [DecisionRecord.from_decision(run_id, b, "missed", decision, raw_action=None,
                                         fallback_reason=reasons.get(b, default_reason), latency_ms=0.0,
                                         created_at=created_at.to_pydatetime(), symbol=symbol) for b in bars]  # fmt: skip


def fill_notices(fills: Sequence[ExchangeFillRecord]) -> list[FillRecord]:
    """Exchange trades as :class:`FillRecord` for :func:`serving.notify.messages` (pure).

    ``reason`` is the intent kind of our client id ('entry', 'exit', 'stop', 'tp', 'unprot',
    'stopmv'), 'external' for a trade of an order we did not place; the bar is the trade time.
    """
    out = []
    for f in fills:
        parsed = parse_client_order_id(f.client_id) if f.client_id else None
        out.append(FillRecord(f.run_id, f.time, int(f.side), float(f.qty_base), float(f.price), float(f.fee_usdt),
                              0.0, parsed[2] if parsed else "external", f.symbol))
    return out


@functools.cache
def _default_costs() -> CostConfig:
    """The cost model's defaults (a run without a bundle: V1 alone, test policies)."""
    return CostConfig()


MISSED_NO_STEP = ("missed: no step ran for this bar before the next close (process stopped or restarting, or every "
                  "attempt failed before the bar was known); nothing was sent, the position was left as it was")


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PendingLiveBar:
    """A new bar decided up to its own guard's review (:meth:`LiveLoop.begin_bar`), not yet written or sent.

    ``decision`` (after the symbol's guard) is what :meth:`LiveLoop.complete_bar` plans; an account-wide guard may
    replace it and add to ``blocked`` (reasons entries are refused) and ``events`` before. ``candles``: the context
    window (None: quarantined); ``atr_t`` and ``price_usdt`` (the decided bar's close) in price units;
    ``equity_usdt``: what the symbol sizes on (its share of the account).
    """

    bar: pd.Timestamp
    state: Reconciled
    candles: pd.DataFrame | None
    choice: Choice
    decision: Decision
    blocked: list[str]
    events: list[EventRecord]
    atr_t: float
    price_usdt: float
    equity_usdt: float
    result: StepResult


class LiveLoop:
    """The live serving loop over an exchange (module docstring).

    Parameters
    ----------
    broker : ExchangeBroker
        The venue (:class:`serving.broker.ExchangeBroker`: :class:`serving.exchange.BinanceFuturesBroker`).
    store : StateStore
    config : LiveConfig
    primary : Policy | PolicySlot | None
        The V2 policy (None when its bundle failed to load; ``primary_load_error`` says why and is
        recorded as ``bundle_load_failed: <why>`` with every decision), or a
        :class:`serving.hotswap.PolicySlot` holding it: then failures back off (V1 decides the
        skipped bars) and new bundles (watched directory, ``ats serve reload``) are validated and
        swapped in between bars, exactly as in paper serving. A plain policy is wrapped in a slot
        without a loader (backoff only).
    fallback : Policy
        The V1 policy.
    guard : GuardLike | None
        Optional risk guard (``serving.risk.RiskGuard``); None = no guard.
    wall_clock_s : Callable[[], float]
        Local wall clock, seconds since the epoch (injected for clock-jump tests).
    monotonic_s : Callable[[], float]
        Monotonic clock for decision latency.
    sleep : Callable[[float], None]
        Used between steps and for Retry-After waits.
    redact : Callable[[str], str]
        Applied to every error text before it is recorded (e.g. ``ApiCredentials.redact``).
    notifier : Notifier | None
        Receives the run's new events and exchange fills after every step (module docstring);
        None: no notifications.
    crash_points : CrashPoints
        Called at each crash point (:mod:`serving.crash`); the default never fires. Tests inject
        :class:`serving.crash.KillAt`.
    costs : CostConfig | None
        The cost model entries are sized with (fee, slippage: :func:`serving.intents.next_open_entry`);
        None: the current primary bundle's ``env_config.costs`` (defaults without one).
    trading_rules : TradingRulesConfig | None
        Decision interval and minimum holding period (module docstring, phase 4); None: the current
        primary bundle's ``env_config.trading_rules`` (defaults without one).

    Raises
    ------
    serving.trading_rules.UnservableBundleError
        The trading rules (given, or the primary bundle's) set a rebalance band, or the costs (given, or the
        primary bundle's) set limit entries (``entry_order = "limit"``).
    """

    def __init__(
        self,
        broker: ExchangeBroker,
        store: StateStore,
        config: LiveConfig,
        *,
        primary: Policy | PolicySlot | None,
        fallback: Policy,
        primary_load_error: str | None = None,
        guard: GuardLike | None = None,
        wall_clock_s: Callable[[], float] = time.time,
        monotonic_s: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        redact: Callable[[str], str] = lambda text: text,
        notifier: Notifier | None = None,
        crash_points: CrashPoints = NO_CRASH,
        costs: CostConfig | None = None,
        trading_rules: TradingRulesConfig | None = None,
    ) -> None:
        if config.timeframe not in TF_MS:
            raise ValueError(f"timeframe {config.timeframe!r} not supported; use one of {sorted(TF_MS)}")
        self.broker, self.store, self.config = broker, store, config
        if primary is None and primary_load_error and not primary_load_error.startswith("bundle_load_failed"):
            primary_load_error = f"bundle_load_failed: {primary_load_error}"
        self.slot = primary if isinstance(primary, PolicySlot) else PolicySlot(primary, load_error=primary_load_error)
        self.fallback, self.primary_load_error = fallback, primary_load_error
        self._costs, self._trading_rules = costs, trading_rules
        require_live_servable(self.trading_rules, "the primary bundle" if trading_rules is None else "these rules")
        require_live_servable(None, "the primary bundle" if costs is None else "these costs", self.costs)
        self._last_ctx: DecisionContext | None = None
        self.guard = guard
        self.wall_clock_s, self.monotonic_s, self._sleep = wall_clock_s, monotonic_s, sleep
        self._safe = lambda text: redact(strip_url_queries(text))  # no secret, no signed URL is ever recorded
        self.tf_ms = TF_MS[config.timeframe]
        #: the rolling candle window (paging, flaws, repairs: :mod:`serving.candles`)
        self.candle_cache = CandleCache(config.timeframe, self.tf_ms, config.context_bars, config.bad_candle_hold_bars)
        self.stop_requested = threading.Event()
        self._started = False
        #: fallback_engaged / primary_recovered events, bars per fallback reason kind (shared with paper)
        self.fallback_ledger = FallbackLedger()
        self.clock_offset_ms: float = 0.0
        #: set by an unexpected exception in a step: entries stay halted for this process's life
        self.internal_error: str | None = None
        self.notifier = notifier
        #: phase 2 (:mod:`serving.reconciler`) and phase 5 (:mod:`serving.executor`)
        self.reconciler = Reconciler(broker, store, config, now=self._now_ts, sleep=sleep, safe=self._safe,
                                     guard=guard, crash_points=crash_points)
        self.executor = OrderExecutor(broker, store, config, self.reconciler, leverage_of=self._exchange_leverage,
                                      now=self._now_ts, sleep=sleep, safe=self._safe, crash_points=crash_points)
        self._crash_points = crash_points
        self._notified: tuple[int, int] | None = None  # (events id, exchange fills id) already published
        self._risk_state: str | None = None  # the guard's state at the last review
        self._attempt_bar: pd.Timestamp | None = None  # bar of the step in progress (None: not known yet)
        #: bar -> (failed attempts, last error) for bars whose steps failed in this process
        self._bar_failures: dict[pd.Timestamp, tuple[int, str]] = {}
        #: the share of the account's equity this symbol sizes its entries on and its policies see (1: the whole
        #: account; 1/N for each of N symbols on one account, the paper portfolio's equal sleeves)
        self.equity_share: float = 1.0
        #: the reconciled state of the last :meth:`begin_bar` (None before it)
        self.last_state: Reconciled | None = None
        #: the drift monitor (:mod:`serving.drift_watch`, the paper loop's): observes each decided bar; None: off
        self.drift_watch: DriftWatch | None = None

    # -- helpers --------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        """The serving run's id (from the config)."""
        return self.config.run_id

    @property
    def market_id(self) -> str:
        """The exchange's id of the traded market."""
        return self.broker.market_id

    def _event(self, time_: pd.Timestamp, kind: str, detail: dict[str, Any] | None = None) -> None:
        self.store.append_event(self.run_id, time_, kind, detail or {})

    def _now_ts(self) -> pd.Timestamp:
        return pd.Timestamp(int(self.wall_clock_s() * 1000), unit="ms", tz="UTC")

    def start(self) -> None:
        """Load market rules, require one-way position mode, set isolated margin (once per process)."""
        if self._started:
            return
        self.broker.load()
        self.broker.require_one_way_mode()
        self.broker.set_isolated_margin()
        self._started = True
        if self._notified is None:
            self._notified = self.store.max_ids()  # notify from now on, not the history
        self._event(self._now_ts(), "live_started", {"mode": self.config.mode, "symbol": self.config.symbol, "timeframe": self.config.timeframe,
                                                     "primary": None if self.primary is None else self.primary.name, "base_url": getattr(self.broker, "base_url", None)})

    @property
    def primary(self) -> Policy | None:
        """The current V2 policy (None while unavailable)."""
        return self.slot.policy

    @property
    def crash_points(self) -> CrashPoints:
        """The crash points injected at construction (:mod:`serving.crash`), shared by the reconciler and the
        executor."""
        return self._crash_points

    @property
    def costs(self) -> CostConfig:
        """The cost model entries are sized with: the one given, else the current primary bundle's, else defaults."""
        env = None if self._costs is not None else bundle_env_config(self.slot.policy)
        return self._costs if self._costs is not None else env.costs if env is not None else _default_costs()

    @property
    def trading_rules(self) -> TradingRulesConfig | None:
        """The trading rules decisions follow: the ones given, else the current primary bundle's (None: defaults)."""
        env = None if self._trading_rules is not None else bundle_env_config(self.slot.policy)
        return self._trading_rules if env is None else env.trading_rules

    def set_guard(self, guard: GuardLike | None) -> None:
        """Review decisions with ``guard`` and report closed trades to it from now on (the loop's and its
        reconciler's; a multi-symbol run's :class:`serving.live_portfolio.SymbolGuard`)."""
        self.guard = guard
        self.reconciler.guard = guard

    def _exchange_leverage(self, decision: Decision) -> int:
        """The integer leverage set on the exchange before the entry of ``decision``."""
        return exchange_leverage(decision.leverage, self.config.max_leverage)

    # -- reconciliation (serving.reconciler) ----------------------------------------------------
    def reconcile(self, current_bar: pd.Timestamp | None) -> Reconciled:
        """Bring the store in line with the exchange (module docstring, phase 2;
        :meth:`serving.reconciler.Reconciler.reconcile`)."""
        return self.reconciler.reconcile(current_bar)

    def reset_position_baseline(self) -> None:
        """Operator action in-process: accept the exchange position as the new reference (unblocks
        trading). From the command line: ``ats serve accept-position`` (module docstring)."""
        self.start()
        self.reconciler.adopt_exchange_position(self.broker.position(), self._now_ts(), "position_baseline_reset", {})

    # -- one bar --------------------------------------------------------------------------------
    def last_closed_bar_ms(self, server_ms: int) -> int:
        """Open time (ms) of the last bar closed at ``server_ms``."""
        return last_closed_bar_ms(server_ms, self.tf_ms)

    def step(self) -> StepResult:
        """Process the last closed bar if it is new or unfinished (module docstring); then publish the
        new events and fills to the notifier. Errors of the step propagate (see :meth:`run`)."""
        try:
            return self._step()
        finally:
            self.publish_notifications()

    def _step(self) -> StepResult:
        self._attempt_bar = None
        self.start()
        started = self.begin_bar(self.broker.server_time_ms())
        return started if isinstance(started, StepResult) else self.complete_bar(started)

    def begin_bar(self, server_ms: int) -> StepResult | PendingLiveBar:
        """Phases 1-4 of the last bar closed at ``server_ms`` (the exchange clock): reconcile, record late equity and
        missed bars, then resume a decided bar (its :class:`StepResult`) or decide a new one up to its own guard's
        review (a :class:`PendingLiveBar` for :meth:`complete_bar`; a multi-symbol run reviews the pending bars of
        every symbol together in between: :mod:`serving.live_portfolio`). Errors propagate as from :meth:`step`."""
        self.start()
        wall_ms = self.wall_clock_s() * 1000.0
        self.clock_offset_ms = server_ms - wall_ms
        bar_ms = self.last_closed_bar_ms(server_ms)
        bar = pd.Timestamp(bar_ms, unit="ms", tz="UTC")
        self._attempt_bar = bar
        state = self.reconciler.reconcile(bar)
        self.last_state = state
        self._record_late_equity(bar, state.position)
        self._record_missed(bar, state.position.side)
        decided = self.store.decision_at(self.run_id, bar, self.market_id)
        if decided is not None:
            return self._resume(bar, bar_ms, decided, state)
        return self._prepare(bar, bar_ms, state)

    def _resume(self, bar: pd.Timestamp, bar_ms: int, decided: DecisionRecord, state: Reconciled) -> StepResult:
        """The bar is decided already: finish its unresolved intents and protect its filled entry
        (``bar_resumed`` event), or record its missing equity row; ``StepResult(None)`` if nothing is left."""
        result = StepResult(bar)
        intents = self.store.bar_intents(self.run_id, bar, self.market_id)
        unfinished = any(i.status in UNRESOLVED_STATUSES for i in intents)
        entry = next((i for i in intents if i.kind == "entry"), None)
        needs_protection = entry is not None and entry.status in ("acked", "filled") and not any(
            i.kind in ("stop", "tp") for i in intents)
        if not unfinished and not needs_protection:
            if not self.store.has_equity(self.run_id, bar, self.market_id):  # stopped after its orders, before its equity
                self._finish(bar, state, result)
            return StepResult(None)  # nothing new
        result.source, result.decision = decided.source, decided.decision()
        self._event(bar, "bar_resumed", {
            "unfinished": [i.client_id for i in intents if i.status in UNRESOLVED_STATUSES]})
        window = self._fetch_window(bar_ms)
        atr_t = self._atr(window.candles, result.source)
        resumed = [i.intent() for i in intents if i.kind in ("exit", "entry", "stopmv", "unprot")]
        self.executor.execute(bar, resumed, state.open_orders, result, atr_t)
        self._finish(bar, state, result)
        return result

    def _prepare(self, bar: pd.Timestamp, bar_ms: int, state: Reconciled) -> PendingLiveBar:
        """Phases 3-4 of a new bar (module docstring) up to its own guard's review."""
        result = StepResult(bar)
        blocked: list[str] = []
        if abs(self.clock_offset_ms) > self.config.max_clock_offset_ms:
            blocked.append(f"clock_offset: {self.clock_offset_ms:.0f} ms")
        if state.blocked:
            blocked.append("position_unreconciled")
        if self.internal_error is not None:
            blocked.append(f"internal_error: {self.internal_error}")
        window = self._fetch_window(bar_ms)
        position = state.position
        equity = self.broker.equity_usdt() * self.equity_share  # the symbol's share of the account
        events: list[EventRecord] = []
        if window.candles is None:
            result.quarantined = True
            blocked.append("quarantine")
            hold = Decision(direction=position.side) if position.side != 0 else Decision.flat()
            choice = Choice(hold, "guard", f"quarantine: {'; '.join(window.problems)}"[:2000], None, 0.0)
            events.append(EventRecord(self.run_id, bar, "quarantine", {"problems": list(window.problems)}))
            atr_t = math.nan
        else:
            choice = self._choose(bar, bar_ms, window.candles, state, equity, events)
            atr_t = self._atr(window.candles, choice.source)  # in the deciding policy's ATR units
            age = self._bars_in_trade(position, bar)
            held = min_hold_reason(choice.decision.direction, position.side, age, self.trading_rules)
            if held is not None:  # the env reads it as a hold; stops and take-profits stay
                events.append(EventRecord(self.run_id, bar, "min_hold", {
                    "decision": dataclasses.asdict(choice.decision), "bars_in_trade": age}))  # fmt: skip
                why = f"{choice.reason}; {held}" if choice.reason else held
                choice = Choice(Decision(direction=position.side), "guard", why, choice.raw_action, choice.latency_ms)
        decision = choice.decision
        if not (math.isfinite(atr_t) and atr_t > 0):
            blocked.append(f"atr_invalid: {atr_t!r}")
        if not equity > 0:
            blocked.append(f"equity_not_positive: {equity!r}")
        # the close of the decided bar is the expected next open; on a quarantined bar there is none (no entry)
        price = float(window.candles["close"].iloc[-1]) if window.candles is not None else math.nan
        if self.guard is not None:
            decision, guard_blocks, guard_events = self._review(decision, bar, equity, position, price)
            blocked += guard_blocks
            events += guard_events
        return PendingLiveBar(bar, state, window.candles, choice, decision, blocked, events, atr_t, price, equity,
                              result)

    def complete_bar(self, pending: PendingLiveBar) -> StepResult:
        """Phases 4-6 of a bar :meth:`begin_bar` left pending: plan its intents from ``pending.decision``, write the
        decision row and intents in one transaction, send them, record fills, position and equity."""
        bar, state, choice, decision, atr_t, price = (pending.bar, pending.state, pending.choice, pending.decision,
                                                      pending.atr_t, pending.price_usdt)
        blocked, events, equity, result, position = (pending.blocked, pending.events, pending.equity_usdt,
                                                     pending.result, pending.state.position)
        source = choice.source
        # sized as the kernel would if the next open were this close (its slippage, fee and, on a flip, exit)
        fills = FillModel(self.costs, atr_t) if math.isfinite(atr_t) and atr_t > 0 else None
        plan = plan_bar(symbol=self.market_id, bar_open_time=bar, position=position, protection=state.protection,
                        decision=decision, price_usdt=price, equity_usdt=equity, rules=self.broker.rules,
                        allow_entry=not blocked, fills=fills)
        if plan.notes:
            events.append(EventRecord(self.run_id, bar, "plan_notes", {"notes": list(plan.notes), "blocked": blocked}))
        record = DecisionRecord.from_decision(
            self.run_id, bar, source, decision, raw_action=choice.raw_action, fallback_reason=choice.reason,
            latency_ms=choice.latency_ms, created_at=self._now_ts().to_pydatetime(), symbol=self.market_id,
        )  # fmt: skip
        orders = list(plan.orders)
        if state.blocked or self.internal_error is not None:
            # an unreconciled position (or an unexpected error earlier in this process): no order at
            # all, exits included, since their size would rest on a position we cannot vouch for
            why = "position_unreconciled" if state.blocked else f"internal_error: {self.internal_error}"
            if orders or state.blocked:
                events.append(EventRecord(self.run_id, bar, "trading_refused", {
                    "reason": why, "orders_not_sent": [o.client_id for o in orders]}))  # fmt: skip
            orders = [] if state.blocked else [o for o in orders if o.reduce_only]
        self.store.write_intents(self.run_id, orders, self._now_ts(), decisions=[record], events=events)
        self.crash_points.hit("after_intent_written")
        result.source, result.decision, result.entries_blocked = source, decision, tuple(blocked)
        self.executor.execute(bar, orders, state.open_orders, result, atr_t)
        if position.side != 0 and decision.direction == position.side and not state.blocked:
            self._repair_protection(bar, position, state.protection, pending.candles, result)
        self._finish(bar, state, result)
        return result

    def _choose(self, bar: pd.Timestamp, bar_ms: int, candles: pd.DataFrame, state: Reconciled, equity: float,
                events: list[EventRecord]) -> Choice:
        """Phase 4: swap in a new bundle between bars, then bundle -> V1 -> flat
        (:func:`serving.choice.choose`); the slot's, the choice's and the fallback events
        (:class:`serving.choice.FallbackLedger`) go to ``events``."""
        view = self._position_view(state.position, state.protection, bar)
        recorded_peak = self.store.peak_equity(self.run_id)  # the run's (the account's), not the policy instance's
        recorded_peak = None if recorded_peak is None else recorded_peak * self.equity_share  # as ``equity``
        ctx = DecisionContext(bar_open_time=bar, candles=candles, position=view, equity_usdt=equity,
                              peak_equity_usdt=max(equity, recorded_peak if recorded_peak is not None else equity))
        bar_index = bar_ms // self.tf_ms  # the slot's backoff counts bars
        for kind, detail in self.slot.poll(bar_index, self._last_ctx):  # hot-swap between bars
            events.append(EventRecord(self.run_id, bar, kind, detail))
        self._last_ctx = ctx
        if self.drift_watch is not None:  # may roll the slot back or put V1 in charge (serving.drift_watch)
            for kind, detail in self.drift_watch.observe(bar, candles, equity, self.slot):
                events.append(EventRecord(self.run_id, bar, kind, detail))
        rules = self.trading_rules
        if rules is not None and not decides_at(bar, pd.Timedelta(milliseconds=self.tf_ms), rules):
            return Choice(Decision(direction=view.side), "guard", not_decision_bar_reason(rules), None, 0.0)
        policy, unavailable = self.slot.acquire(bar_index)
        if self.drift_watch is not None:
            policy, unavailable = self.drift_watch.gate(policy, unavailable)
        choice = choose(ctx, policy, self.fallback, unavailable or self.primary_load_error,
                        self.config.decision_timeout_ms, self.monotonic_s)
        if policy is not None:
            for kind, detail in self.slot.record(bar_index, choice.primary_failure):
                events.append(EventRecord(self.run_id, bar, kind, detail))
        for kind, detail in choice.events:
            events.append(EventRecord(self.run_id, bar, kind, detail))
        for kind, detail in self.fallback_ledger.observe(choice.source, choice.reason):
            events.append(EventRecord(self.run_id, bar, kind, detail))
        return choice

    def _record_late_equity(self, bar: pd.Timestamp, position: ExchangePosition) -> None:
        """The last decided bar before ``bar`` has no equity row (the process stopped or failed between
        its orders and its equity snapshot, and the bar has passed): record one now, with the
        equity read now and ``position`` (this step's reconciled one), and an ``equity_recorded_late``
        event saying so."""
        last = self.store.last_decision_bar(self.run_id, self.market_id)
        if last is None or last >= bar or self.store.has_equity(self.run_id, last, self.market_id):
            return
        row = self.store.decision_at(self.run_id, last, self.market_id)
        if row is None or row.source == "missed":
            return
        equity = self.broker.equity_usdt()
        now = self._now_ts()
        self.store.append(equity=[EquityRecord(self.run_id, last, equity, equity, position.side, position.qty_base,
                                               self.market_id)],
                          events=[EventRecord(self.run_id, now, "equity_recorded_late", {
                              "bar": str(last), "equity_usdt": equity,
                              "why": "stopped before the bar's equity snapshot; equity read at the next step"})])

    def _record_missed(self, bar: pd.Timestamp, side: int) -> None:
        """Record the bars before ``bar`` that closed without a decision (source 'missed'; module
        docstring), with ``side``: the reconciled exchange position (what was left in place)."""
        gap = missed_bars(self.store.last_decision_bar(self.run_id, self.market_id), bar, self.tf_ms)
        if not gap:
            self._bar_failures = {b: v for b, v in self._bar_failures.items() if b >= bar}
            return
        reasons = {b: (f"missed: every attempt to process this bar failed before its decision was recorded ({n} "
                       f"attempts; last: {err}); nothing was sent, the position was left as it was")
                   for b, (n, err) in self._bar_failures.items()}  # fmt: skip
        side = int(side)
        now = self._now_ts()
        rows = missed_bar_records(self.run_id, gap, side, reasons, MISSED_NO_STEP, now, self.market_id)
        failed = [b for b in gap if b in self._bar_failures]
        self.store.append(decisions=rows, events=[EventRecord(self.run_id, now, "bars_missed", {
            "first": str(gap[0]), "last": str(gap[-1]), "count": len(gap), "failed_in_process": len(failed),
            "position_side": side, "symbol": self.market_id})])  # fmt: skip
        self._bar_failures = {b: v for b, v in self._bar_failures.items() if b >= bar}

    def record_internal_error(self, exc: Exception, effect: str) -> None:
        """Halt entries after an unforeseen exception (a bug): keep its text in ``internal_error``, count the bar's
        failed attempt and write an ``internal_error`` event (error, traceback, ``effect``). Call from ``except``."""
        self.internal_error = self._safe(f"{type(exc).__name__}: {exc}")[:300]
        self._note_failure(self.internal_error)
        self._event(self._now_ts(), "internal_error", {
            "error": self._safe(f"{type(exc).__name__}: {exc}")[:1000],
            "traceback": self._safe(traceback.format_exc())[-3000:], "effect": effect})

    def _note_failure(self, error: str) -> None:
        """Count a failed attempt of the bar in progress (its reason if it ends up missed)."""
        if self._attempt_bar is None:
            return
        n, _ = self._bar_failures.get(self._attempt_bar, (0, ""))
        self._bar_failures[self._attempt_bar] = (n + 1, error[:300])

    def publish_notifications(self) -> None:
        """Hand the run's events and fills stored since the last call to the notifier; never raises."""
        if self.notifier is None or self._notified is None:
            return
        try:
            events, ev_id = self.store.events_after(self.run_id, self._notified[0])
            fills, fill_id = self.store.exchange_fills_after(self.market_id, self._notified[1])
            self._notified = (ev_id, fill_id)
            events = [e for e in events if not (e.kind == "step_failed" and e.detail.get("consecutive", 1) > 1)]
            if events or fills:
                self.notifier.publish(events, fill_notices(fills))
        except Exception:  # noqa: BLE001 - a notification must never stop trading
            return

    def _repair_protection(self, bar: pd.Timestamp, position: ExchangePosition, protection: OpenProtection,
                           candles: pd.DataFrame | None, result: StepResult) -> None:
        """A held position without its stop (or take-profit): place the missing one(s) again
        (:meth:`serving.executor.OrderExecutor.repair_protection`).

        Levels: ``stop_atr`` / ``take_profit_atr`` of the decision that opened the position (defaults
        of :class:`Decision` for a position we did not open) times the ATR of this bar in the opening
        policy's period (:meth:`_atr_period`), from the exchange's entry price; ids of this bar.
        """
        missing = [k for k, present in (("stop", protection.stop_price), ("tp", protection.tp_price)) if present is None]
        if not missing or not position.entry_price > 0:
            return
        found = self._our_entry(position)
        atr_t = self._atr(candles, None if found is None else found[1].source)
        if not (math.isfinite(atr_t) and atr_t > 0):
            return
        opening = found[1].decision() if found is not None else Decision(direction=position.side)
        self.executor.repair_protection(bar, position, missing, atr_t, opening, result)

    def _our_entry(self, position: ExchangePosition) -> tuple[pd.Timestamp, DecisionRecord] | None:
        """(bar, decision row) of our latest filled entry on the side of ``position``; None if none."""
        if position.side == 0:
            return None
        intents = self.store.intents(self.run_id, self.market_id)
        side = "buy" if position.side > 0 else "sell"
        mine = intents[(intents["kind"] == "entry") & (intents["status"] == "filled") & (intents["side"] == side)]
        if not len(mine):
            return None
        entry_bar = mine["bar_open_time"].iloc[-1]
        row = self.store.decision_at(self.run_id, entry_bar, self.market_id)
        return None if row is None else (entry_bar, row)

    def _bars_in_trade(self, position: ExchangePosition, bar: pd.Timestamp) -> int | None:
        """Closes since our entry of ``position`` filled, at the close of ``bar`` (the entry of bar b fills at the
        open of b+1), the kernel's count; None for a position we did not open (or flat)."""
        found = self._our_entry(position)
        return None if found is None else max(0, int((bar - found[0]) / pd.Timedelta(milliseconds=self.tf_ms)))

    def _position_view(self, position: ExchangePosition, protection: OpenProtection, bar: pd.Timestamp
                       ) -> PositionView:
        """The position as the policies saw it in training: leverage of the deciding bar and closed bars
        since the fill (the entry of bar b fills at the open of b+1), from our latest filled entry of
        this side; an entry we did not make gives leverage 1 and 0 bars."""
        leverage, bars = 1.0, 0
        found = self._our_entry(position)
        if found is not None:
            entry_bar, row = found
            leverage = row.leverage
            bars = max(0, int((bar - entry_bar) / pd.Timedelta(milliseconds=self.tf_ms)))
        return PositionView(side=position.side, quantity_base=position.qty_base, entry_price=position.entry_price,
                            leverage=leverage, bars_in_trade=bars, stop_price=protection.stop_price,
                            take_profit_price=protection.tp_price)

    def _review(self, decision: Decision, bar: pd.Timestamp, equity: float, position: ExchangePosition,
                mark_usdt: float) -> tuple[Decision, list[str], list[EventRecord]]:
        if not math.isfinite(mark_usdt):
            mark_usdt = position.entry_price  # quarantined bar: no trusted close, mark at entry
        try:
            notional = position.qty_base * mark_usdt
            snap = AccountSnapshot(time=bar, equity_usdt=float(equity), position_side=position.side,
                                     position_qty_base=position.qty_base, position_notional_usdt=notional,
                                     # effective account leverage (the exchange reports none per position)
                                     leverage=1.0 if position.side == 0 else max(1.0, notional / equity))
            verdict = self.guard.review(decision, snap)  # type: ignore[union-attr]
            if not isinstance(verdict.decision, Decision):
                raise TypeError(f"guard returned {type(verdict.decision).__name__}")
        except Exception as exc:  # noqa: BLE001 - fail closed: no entries
            return (Decision(direction=position.side) if position.side else Decision.flat(), ["guard_error"],
                    [EventRecord(self.run_id, bar, "guard_error", {"error": self._safe(repr(exc))[:500]})])
        blocks = [] if verdict.state == "ACTIVE" else [f"guard_{verdict.state}"]
        events = [] if not verdict.reasons else [EventRecord(self.run_id, bar, "guard_verdict", {
            "state": verdict.state, "reasons": list(verdict.reasons)})]
        previous, self._risk_state = self._risk_state, str(verdict.state)
        if self._risk_state != previous and not (previous is None and self._risk_state == "ACTIVE"):
            events.append(EventRecord(self.run_id, bar, "risk_state_changed", {
                "from": previous, "to": self._risk_state, "reasons": list(verdict.reasons)}))  # fmt: skip
        return verdict.decision, blocks, events

    def _fetch_window(self, bar_ms: int) -> CandleWindow:
        """The context window of the bar opening at ``bar_ms`` from the rolling candle cache (module
        docstring, phase 3) with ``funding_rate`` joined (:func:`serving.candles.window_with_funding`);
        the cache's ``candle_repaired`` / ``candle_corrected`` events are recorded here.

        Raises
        ------
        RetryableError, RejectedError
            A klines request failed (the step fails and is retried).
        """
        ctx = self.candle_cache.context(self.broker, bar_ms)
        bar = pd.Timestamp(bar_ms, unit="ms", tz="UTC")
        for kind, detail in ctx.events:
            self._event(bar, kind, detail)
        return window_with_funding(ctx, self.broker if self.config.with_funding else None, bar_ms, self.tf_ms,
                                   self._safe)

    def _atr_period(self, source: str | None) -> int:
        """ATR period (bars) in whose units the decisions of ``source`` place stops: the deciding
        policy's ``atr_period_bars`` (V2: the bundle's feature ATR, V1: its own), else
        ``config.atr_period_bars``."""
        return atr_period_of({"v1": self.fallback, "v2": self.slot.policy}.get(source or ""),
                             self.config.atr_period_bars)

    def _atr(self, candles: pd.DataFrame | None, source: str | None) -> float:
        """ATR of the last bar of ``candles`` (price units) in ``source``'s period; NaN without candles."""
        if candles is None:
            return math.nan
        return float(atr_indicator(candles, self._atr_period(source))[-1])

    def _finish(self, bar: pd.Timestamp, state: Reconciled, result: StepResult) -> None:
        """Record fills and position; the bar's equity row (one per bar: a resumed bar keeps its first);
        then raise when an intent of the bar is still unresolved, so :meth:`run` resumes the bar
        within it (the resume looks the intent up again and protects a filled entry at once)
        instead of leaving it, and a position it may have opened without a stop, to the next bar.

        Raises
        ------
        RetryableError
            An intent of ``bar`` is still 'written', 'sent', 'unknown' or 'not_found'.
        """
        position, _agreed = self.reconciler.sync_position(self._now_ts())
        if not self.store.has_equity(self.run_id, bar, self.market_id):
            equity = self.broker.equity_usdt()
            self.store.append(equity=[EquityRecord(self.run_id, bar, equity, equity, position.side,
                                                   position.qty_base, self.market_id)])
        unresolved = [i.client_id for i in self.store.bar_intents(self.run_id, bar, self.market_id)
                      if i.status in UNRESOLVED_STATUSES]
        if unresolved:
            raise RetryableError(f"intents of bar {bar} unresolved: {unresolved}; the bar is resumed within it")

    # -- running --------------------------------------------------------------------------------
    def seconds_to_next_poll(self) -> float:
        """Seconds until ``close_delay_s`` after the next bar close, by the exchange-corrected wall clock."""
        return seconds_to_next_poll(self.wall_clock_s() * 1000.0 + self.clock_offset_ms, self.tf_ms,
                                    self.config.close_delay_s, self.config.poll_interval_s)

    def run(self, *, max_steps: int | None = None, install_signal_handlers: bool = True,
            poll_s: float | None = None) -> int:
        """Step until stopped (SIGTERM/SIGINT, :attr:`stop_requested`) or ``max_steps`` bars decided.

        A signal only sets :attr:`stop_requested`; the bar in progress finishes first. Retryable,
        ambiguous and rejected errors end the step (recorded as ``step_failed``; the next poll
        resumes the bar by client id); a :class:`FatalError` stops the loop (re-raised).
        Returns the number of bars processed.
        """
        with stop_on_signals(self.stop_requested, install=install_signal_handlers):
            return self._run(max_steps, poll_s)

    def _run(self, max_steps: int | None, poll_s: float | None) -> int:
        done = 0
        failures = 0  # consecutive failed steps: retried within the bar, with a doubling wait
        while not self.stop_requested.is_set():
            failed = False
            self._attempt_bar = None
            try:
                result = self.step()
                if result.bar_open_time is not None:
                    done += 1
            except (RetryableError, AmbiguousOutcomeError, RejectedError) as exc:
                failed = True
                self._note_failure(self._safe(f"{type(exc).__name__}: {exc}"))
                self._event(self._now_ts(), "step_failed", {"error": self._safe(f"{type(exc).__name__}: {exc}")[:1000],
                                                            "consecutive": failures + 1})  # fmt: skip
            except FatalError as exc:
                self._event(self._now_ts(), "fatal_error", {"error": self._safe(f"{type(exc).__name__}: {exc}")[:1000]})
                self.publish_notifications()
                raise
            except Exception as exc:  # noqa: BLE001 - a bug or unforeseen error: exits go on, entries stop
                failed = True
                self.record_internal_error(exc, "entries halted until restart; exits still sent")
            if failed:
                self.publish_notifications()
            failures = failures + 1 if failed else 0
            if max_steps is not None and done >= max_steps:
                break
            if failed and poll_s is None:
                retry = min(self.config.step_retry_initial_s * 2.0 ** (failures - 1), self.config.step_retry_max_s)
                wait = min(retry, self.seconds_to_next_poll())
            else:
                wait = self.seconds_to_next_poll() if poll_s is None else poll_s
            end = self.monotonic_s() + wait
            while not self.stop_requested.is_set() and self.monotonic_s() < end:
                self._sleep(min(1.0, max(0.0, end - self.monotonic_s())))  # 1 s slices: a signal stops promptly
        self._event(self._now_ts(), "live_stopped", {"bars": done})
        self.publish_notifications()
        return done
