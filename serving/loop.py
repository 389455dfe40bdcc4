"""Bar-by-bar replay loop with V2 -> V1 fallback, on the paper broker, recorded in the state store.

The per-bar logic below is :class:`PaperStepper`; :func:`run_replay` feeds it the rows of a
DataFrame, :class:`serving.paper_live.PaperLiveLoop` the exchange's live closed candles.
For every bar t from ``warmup_bars`` on:

0. between bars, the primary's :class:`serving.hotswap.PolicySlot` may swap in a validated new
   bundle (watched directory or ``ats serve reload`` request) or re-load a bundle that failed;
   after the broker's step 1, the drift monitor (``drift_watch``, :mod:`serving.drift_watch`; optional)
   observes the bar, evaluates every ``every_bars`` bars and may roll the slot back or put V1 in charge
   (then the primary is not asked: V1 decides, reason ``drift: ...``);
1. the broker processes bar t with the decision taken at the close of bar t-1 (fills at the
   open, stops/take-profits/liquidation inside the bar, funding at settlement times); its fills
   and the equity marked at the close are recorded; closed round trips go to the risk guard;
2. a :class:`market.decision.DecisionContext` is built from the candles up to bar t;
3. the primary (V2) policy decides; if it is missing (bundle failed to load), backing off after
   a recent failure (``config.primary_backoff``), raises, answers something that is not a
   :class:`Decision`, builds a non-finite decision
   (:class:`market.decision.NonFiniteDecisionError`) or answers later than
   ``decision_timeout_ms`` (measured with the injected ``clock``; the late answer is discarded),
   the fallback (V1) policy decides instead and the reason is recorded (``backoff: ...`` on the
   bars the primary was not asked);
4. if the fallback fails too, the loop decides flat (close any position) and records an event;
   the risk guard (:class:`serving.risk.RiskGuard`, optional) reviews the decision;
5. the decision is submitted with ``atr[t]`` and its row is written; the notifier (optional)
   gets the bar's events and fills.

Every processed bar has exactly one decision row and one source ('v2', 'v1', or 'guard' when the
loop or the risk guard imposed the decision).

Trading rules (``trading_rules``: the bundle env's :class:`envs.config.TradingRulesConfig`, applied as
in the env, :mod:`serving.trading_rules`): the policy is asked only at decision bars (between them
the bar is a hold, source 'guard', reason ``not_decision_bar: ...``); a decision that would close or
flip a position held for fewer than ``min_hold_bars`` bars is a hold (source 'guard', reason
``min_hold: ...``, a ``min_hold`` event); the paper broker resizes within the rebalance band as the
kernel does. A hold the loop imposes is submitted as no decision; a decision the risk guard changes
is read whatever the rules (a kill switch is not held back).

All rows of one bar go to the store in one transaction. The loop never stops for a policy
failure. A candle row that fails validation (non-finite or non-positive price, negative or
non-finite volume, high/low not enclosing open and close) is *quarantined*: the broker skips the
bar (no fills on invalid prices; the pending decision is discarded and stops are not checked for
that bar), an event is recorded, the equity snapshot repeats the last mark, and the decision is
hold-or-flat only (an open position keeps its stop and take-profit, no new position). A decision
that would open a position while ``atr[t]`` is non-finite or <= 0 is replaced by flat (never
trade on a non-finite number).

No invalid row ever reaches a policy. The rule is the live loop's
(:func:`serving.live.validate_window`): a policy is asked only when *every* row of its context
window (the last ``context_bars`` rows up to t; the whole history when ``context_bars`` is None)
is valid. A valid bar whose window still contains a quarantined row is *held*: the broker
processes it normally (fills, stops, take-profits, liquidation: exits happen), the risk guard
reviews it (it can flatten), but no policy is asked and the decision is hold-or-flat (source
'guard', reason ``quarantine_window: ...`` naming the invalid row), so no entry is taken until
the bad row has left the window (``context_bars`` bars later). A ``context_window_invalid``
event marks the first held bar of each stretch.

In a live setting the deadline must also be enforced by running the policy in a worker; in a
replay the call runs to completion and a late answer is simply not used.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from envs.accounting import Bar, ClosedTrade, is_funding_time
from envs.config import CostConfig, TradingRulesConfig
from market.config_base import StrictConfig
from market.decision import Decision, DecisionContext, Policy, require_policy
from market.ohlc import row_problems  # re-exported: the quarantine rule of a candle row
from serving.choice import Choice as _Choice
from serving.choice import FallbackLedger, reason_kind  # noqa: F401 - reason_kind re-exported
from serving.choice import choose as _choose
from serving.drift import DriftConfig
from serving.drift_watch import DriftWatch
from serving.errors import DataQualityError
from serving.hotswap import BackoffConfig, PolicySlot
from serving.notify import Notifier
from serving.paper import PaperBroker
from serving.risk import AccountSnapshot, GuardVerdict, RiskGuard
from serving.store import DecisionRecord, EquityRecord, EventRecord, FillRecord, StateStore
from serving.trading_rules import decides_at, min_hold_reason, not_decision_bar_reason

_REQUIRED_COLUMNS = ("open", "high", "low", "close", "volume")


class ServeConfig(StrictConfig):
    """Settings of :func:`run_replay`."""

    initial_equity_usdt: float = Field(
        10_000.0, gt=0.0, description="Starting cash of the paper account, USDT."
    )
    decision_timeout_ms: float = Field(
        2_000.0,
        gt=0.0,
        description="Deadline of the primary policy's answer, ms; a later answer is discarded.",
    )
    warmup_bars: int = Field(
        600, ge=0, description="Bars only observed (history) before the first processed/decided bar."
    )
    run_id: str = Field(
        "paper", min_length=1, max_length=128, description="Key of this run's rows in the store."
    )
    context_bars: int | None = Field(
        1_000,
        ge=2,
        description="Trailing candles passed to the policies in the decision context (None: the whole "
        "history); must cover the fallback's history_bars.",
    )
    primary_backoff: BackoffConfig = Field(
        default_factory=BackoffConfig,
        description="Bars V1 decides without asking the primary after consecutive primary failures.",
    )


@dataclass(frozen=True)
class ReplaySummary:
    """Outcome of :func:`run_replay`.

    ``bars`` counts the bars processed (from ``warmup_bars`` on, quarantined ones included);
    ``decisions_*`` count decision rows by source ('guard': a flat/hold imposed by the loop or the
    risk guard); ``risk_state`` is the guard's state after the last bar (None without a guard);
    ``n_quarantined`` counts bars whose own row is invalid, ``n_window_held`` valid bars held
    because their context window still contains an invalid row (both decided 'guard');
    ``fallback_reasons`` counts, per reason kind (the text before the first ':', e.g.
    ``deadline_exceeded``), the bars on which the primary was not used; ``decisions_missed`` counts
    bars that closed without a decision (source 'missed': only the live-candle paper loop has
    them, see :meth:`PaperStepper.skip`). Money in USDT; costs are
    cumulative over the run (``funding_paid_usdt`` > 0: paid).
    """

    run_id: str
    bars: int
    decisions_v2: int
    decisions_v1: int
    decisions_guard: int
    fallback_reasons: Counter[str]
    n_quarantined: int
    final_equity_usdt: float
    n_fills: int
    n_trades: int
    fees_paid_usdt: float
    funding_paid_usdt: float
    slippage_paid_usdt: float
    liquidation_fees_usdt: float
    events: Counter[str] = field(default_factory=Counter)
    risk_state: str | None = None
    n_window_held: int = 0
    decisions_missed: int = 0


def _validate_candles(candles: pd.DataFrame) -> None:
    if not isinstance(candles, pd.DataFrame):
        raise DataQualityError(f"candles must be a pandas DataFrame, got {type(candles).__name__}")
    missing = [c for c in _REQUIRED_COLUMNS if c not in candles.columns]
    if missing:
        raise DataQualityError(f"candles lack required columns {missing}")
    idx = candles.index
    if not isinstance(idx, pd.DatetimeIndex) or idx.tz is None or str(idx.tz) != "UTC":
        raise DataQualityError("candles must be indexed by a UTC DatetimeIndex of open times")
    if not idx.is_unique:
        dup = idx[idx.duplicated()][0]
        raise DataQualityError(f"candles have duplicate open times, first at {dup}")
    if not idx.is_monotonic_increasing:
        pos = int(np.argmax(np.diff(idx.asi8) < 0)) + 1
        raise DataQualityError(
            f"candles are not sorted by open time: row {pos} ({idx[pos]}) goes back in time"
        )


def last_invalid_row(problems: list[str | None]) -> np.ndarray:
    """Per row t, the index of the last invalid row at or before t (-1 when there is none).

    ``problems`` is the output of :func:`row_problems`. Returns an int64 array of the same length;
    the context window ``[start, t]`` of bar t contains an invalid row iff ``out[t] >= start``.
    """
    bad = np.fromiter((p is not None for p in problems), dtype=bool, count=len(problems))
    idx = np.where(bad, np.arange(len(problems), dtype=np.int64), -1)
    return np.maximum.accumulate(idx) if len(idx) else idx


def window_start(t: int, context_bars: int | None) -> int:
    """First row of the context window of bar t (``context_bars`` rows ending at t, or the whole history)."""
    return 0 if context_bars is None else max(0, t + 1 - context_bars)


def _window_reason(index: pd.DatetimeIndex, bad: int, context_bars: int | None) -> str:
    """Decision reason of a bar held because its context window contains the invalid row ``bad``."""
    if context_bars is None:
        until = "it never leaves the window (context_bars=None: the whole history)"
    elif bad + context_bars < len(index):
        until = f"no policy is asked before {index[bad + context_bars]}"
    else:
        until = "it stays in the window to the end of the candles"
    return f"quarantine_window: the context window holds the invalid row {index[bad]}; {until}"


def _hold(side: int) -> Decision:
    return Decision(direction=side) if side != 0 else Decision.flat()


def _decision_detail(d: Decision | None) -> dict[str, Any] | None:
    return None if d is None else asdict(d)


def _account_snapshot(ts: pd.Timestamp, equity_usdt: float, state: Any, close: float) -> AccountSnapshot:
    return AccountSnapshot(
        time=ts, equity_usdt=float(equity_usdt), position_side=int(state.side), position_qty_base=float(state.qty_base),
        position_notional_usdt=float(state.qty_base) * float(close), leverage=float(state.leverage),
    )  # fmt: skip


@dataclass(frozen=True)
class WindowTaint:
    """Why a bar whose own row is valid is still *held*: its context window holds a flaw.

    ``key`` identifies the flaw (the first bar held by a new key gets a ``context_window_invalid``
    event with ``detail``); ``reason`` is the decision row's reason (``quarantine_window: ...``).
    """

    key: str
    reason: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class BarInput:
    """One bar as :class:`PaperStepper` takes it.

    Attributes
    ----------
    t : int
        Bar counter of the primary's backoff and hot-swap (replay: the row; live candles: open
        time in ms // bar length in ms).
    time : pd.Timestamp
        UTC open time of the bar.
    bar : Bar
        The candle (prices in USDT, funding rate settled in it, NaN if none); not used when
        ``problem`` is set.
    window : pd.DataFrame | None
        The context window (candles up to and including this bar) handed to the policies; may be
        None when the bar is not decided (``problem`` or ``taint`` set).
    atr, fallback_atr : float
        ATR of this bar in price units (USDT), in the primary's and in the fallback's period; NaN
        when unknown.
    problem : str | None
        The bar's own candle is invalid or missing (quarantined): why.
    taint : WindowTaint | None
        The bar is valid but its context window is not (held); ignored when ``problem`` is set.
    """

    t: int
    time: pd.Timestamp
    bar: Bar
    window: pd.DataFrame | None
    atr: float
    fallback_atr: float
    problem: str | None = None
    taint: WindowTaint | None = None


@dataclass(frozen=True)
class BarRows:
    """The rows of one symbol's bar, as stored in one transaction."""

    decisions: list[DecisionRecord]
    fills: list[FillRecord]
    equity: list[EquityRecord]
    events: list[EventRecord]


@dataclass
class PendingBar:
    """A bar of :class:`PaperStepper` processed and decided but not yet reviewed by the guard nor submitted
    (:meth:`PaperStepper.begin`). ``decision`` is the one to submit (the guard may change it), ``wanted`` the
    loop's before the guard; ``equity_usdt`` this book's equity marked at the bar's close (USDT); ``state`` the
    broker's account after the bar; ``loop_hold``: a hold the loop imposed (submitted as no decision)."""

    bar: BarInput
    events: list[EventRecord]
    fills: list[FillRecord]
    equity_usdt: float
    equity_row: EquityRecord
    state: Any
    choice: _Choice
    decision: Decision
    wanted: Decision
    loop_hold: bool
    atr_t: float
    atr_ok: bool
    atr_key: str


class PaperStepper:
    """The per-bar logic of paper serving (module docstring, steps 0-5), with its state.

    Shared by :func:`run_replay` (bars of a DataFrame) and the live-candle paper loop
    (:class:`serving.paper_live.PaperLiveLoop`), so both charge through one paper broker
    (:class:`serving.paper.PaperBroker`, the env's accounting) and decide by the same rules.
    Usage: :meth:`start` once, then, in open-time order, :meth:`step` for every bar to decide or
    :meth:`skip` for a bar that closed without a decision (source 'missed'), then :meth:`finish`.

    Parameters are those of :func:`run_replay`; ``slot`` is the primary's
    :class:`serving.hotswap.PolicySlot`; ``bar_interval`` the bar length (None: unknown, e.g. a
    replay of fewer than two candles; the history check is then skipped; needed with a decision
    interval > 1).

    Raises
    ------
    TypeError
        If ``fallback`` is not a :class:`market.decision.Policy`.
    ValueError
        If ``config.context_bars`` is shorter than the fallback's ``history_bars(bar_interval)``, or
        ``trading_rules`` has a decision interval > 1 and ``bar_interval`` is None.
    """

    def __init__(
        self,
        *,
        slot: PolicySlot,
        fallback: Policy,
        costs: CostConfig,
        store: StateStore,
        config: ServeConfig,
        guard: RiskGuard | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.perf_counter,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        bar_interval: pd.Timedelta | None = None,
        trading_rules: TradingRulesConfig | None = None,
    ) -> None:
        fallback = require_policy(fallback, "fallback")
        need = 0 if bar_interval is None else int(fallback.history_bars(bar_interval))
        if config.context_bars is not None and config.context_bars < need:
            raise ValueError(
                f"config.context_bars={config.context_bars} is shorter than the fallback's history_bars={need}"
            )
        self.slot, self.fallback, self.costs, self.store, self.config = slot, fallback, costs, store, config
        self.guard, self.notifier, self._clock, self._now = guard, notifier, clock, now
        self.run_id = config.run_id
        self.bar_interval, self.trading_rules = bar_interval, trading_rules
        self.broker = self._new_broker()
        self.counts: Counter[str] = Counter()  # decision rows by source
        #: fallback_engaged / primary_recovered events and the bars decided per fallback reason kind
        self.fallback_ledger = FallbackLedger()
        self.event_counts: Counter[str] = Counter()
        self.bars = self.n_quarantined = self.n_window_held = 0
        self.risk_state: str | None = guard.state.value if guard is not None else None
        self._held_by: str | None = None  # key of the flaw holding the current stretch of bars
        self._last_valid_atr = {"primary": math.nan, "fallback": math.nan}  # by whose ATR period
        #: highest equity of the run so far (USDT): the drawdown input every policy is shown, kept here
        #: (not in a policy instance) so a hot-swapped bundle sees the run's drawdown
        self._peak_equity_usdt = float(config.initial_equity_usdt)
        self._last_ctx: DecisionContext | None = None
        #: also told every closed round trip (time, net PnL in USDT), after the guard
        self.closed_trade_sinks: list[Callable[[pd.Timestamp, float], None]] = []
        #: add ``symbol`` to the detail of every event of a bar (set in multi-symbol runs: notifications name it)
        self.name_symbol_in_events = False
        #: the drift monitor (:mod:`serving.drift_watch`): observes every bar before the policies decide; None: off
        self.drift_watch: DriftWatch | None = None

    @property
    def symbol(self) -> str:
        """The traded symbol (exchange id of ``costs.instrument``, e.g. ``BTCUSDT``): the ``symbol`` of its rows."""
        return self.costs.instrument.symbol

    def use_costs(self, costs: CostConfig) -> None:
        """Trade under ``costs`` (e.g. the exchange's instrument spec, read at start) instead of the bundle's.

        Raises
        ------
        RuntimeError
            If a bar was already processed (the paper account cannot change its rules mid-run).
        """
        if self.bars:
            raise RuntimeError("use_costs must be called before the first bar")
        self.costs = costs
        self.broker = self._new_broker()

    def use_trading_rules(self, rules: TradingRulesConfig | None) -> None:
        """Trade under ``rules`` (the bundle's ``env_config.trading_rules``; module docstring of
        :mod:`serving.trading_rules`) instead of those given at construction.

        Raises
        ------
        RuntimeError
            If a bar was already processed.
        ValueError
            A decision interval > 1 without the bar length.
        """
        if self.bars:
            raise RuntimeError("use_trading_rules must be called before the first bar")
        self.trading_rules = rules
        self.broker = self._new_broker()

    def _new_broker(self) -> PaperBroker:
        """The paper account of the run: its costs and trading rules (decision bars, holding period, band)."""
        ns = None if self.bar_interval is None else int(pd.Timedelta(self.bar_interval).value)
        return PaperBroker(self.config.initial_equity_usdt, self.costs, trading_rules=self.trading_rules,
                           bar_interval_ns=ns)  # fmt: skip

    # -- run boundaries ---------------------------------------------------------------------------
    def start(self, time: pd.Timestamp, **detail: Any) -> None:
        """Write ``run_started`` at ``time`` (``detail`` first in its detail; mode 'paper'), and
        ``primary_unavailable`` when the slot holds no primary."""
        events = [EventRecord(self.run_id, time, "run_started", {
            **detail, "primary": None if self.slot.policy is None else self.slot.policy.name, "fallback": self.fallback.name,
            "initial_equity_usdt": self.config.initial_equity_usdt, "risk_state": self.risk_state, "mode": "paper",
        })]  # fmt: skip
        if self.slot.policy is None:
            events.append(EventRecord(self.run_id, time, "primary_unavailable", {"error": self.slot.load_error}))
        self.store.append(events=events)
        self._publish(events, [])

    def summary(self) -> ReplaySummary:
        """The run so far (:class:`ReplaySummary`; ``events`` is the live event counter)."""
        final = self.broker.state
        return ReplaySummary(
            run_id=self.run_id, bars=self.bars, decisions_v2=self.counts["v2"], decisions_v1=self.counts["v1"],
            decisions_guard=self.counts["guard"], fallback_reasons=self.fallback_ledger.reasons,
            n_quarantined=self.n_quarantined, final_equity_usdt=self.broker.equity_usdt, n_fills=final.n_fills,
            n_trades=final.n_trades, fees_paid_usdt=final.fees_paid_usdt, funding_paid_usdt=final.funding_paid_usdt,
            slippage_paid_usdt=final.slippage_paid_usdt, liquidation_fees_usdt=final.liquidation_fees_usdt,
            events=self.event_counts, risk_state=self.risk_state, n_window_held=self.n_window_held,
            decisions_missed=self.counts["missed"],
        )  # fmt: skip

    def finish(self, time: pd.Timestamp, **detail: Any) -> ReplaySummary:
        """Write ``run_finished`` at ``time`` (run totals, then ``detail``) and return the summary."""
        s = self.summary()
        events = [EventRecord(self.run_id, time, "run_finished", {
            "bars": s.bars, "decisions_v2": s.decisions_v2, "decisions_v1": s.decisions_v1,
            "decisions_guard": s.decisions_guard, "fallback_reasons": dict(s.fallback_reasons),
            "final_equity_usdt": s.final_equity_usdt, "n_fills": s.n_fills, "risk_state": s.risk_state,
            "n_quarantined": s.n_quarantined, "n_window_held": s.n_window_held, **detail,
        })]  # fmt: skip
        self.store.append(events=events)
        self._publish(events, [])  # counts run_finished in s.events (the live counter)
        return s

    # -- one bar ----------------------------------------------------------------------------------
    def step(self, bar: BarInput) -> DecisionRecord:
        """Process and decide ``bar`` (module docstring, steps 0-5); returns its decision row (stored).

        The same as :meth:`begin`, the guard's review (:meth:`review`) and :meth:`complete`; the multi-symbol
        paper loop (:mod:`serving.portfolio`) calls them apart to review every symbol of a bar together.

        Raises
        ------
        ValueError
            From the broker, if ``bar`` is not later than the previous bar.
        """
        pending = self.begin(bar)
        if self.guard is not None and bar.problem is None:
            self.review(pending, self.guard.review(pending.decision, self.snapshot(pending)))
        record, _ = self.complete(pending)
        return record

    def begin(self, bar: BarInput) -> PendingBar:
        """Steps 0-4 of ``bar`` without the guard: hot-swap, the broker processes the bar, the policies decide.
        Nothing is stored or submitted before :meth:`complete`.

        Raises
        ------
        ValueError
            From the broker, if ``bar`` is not later than the previous bar.
        """
        events = [EventRecord(self.run_id, bar.time, kind, detail) for kind, detail in self.slot.poll(bar.t, self._last_ctx)]
        fills, equity_usdt, equity_row = self._process(bar, events)
        self._watch_drift(bar, equity_usdt, events)
        state = self.broker.state
        choice, loop_hold = self._decide(bar, state, equity_usdt)
        self._held_by = bar.taint.key if bar.problem is None and bar.taint is not None else None
        for key, value in (("primary", bar.atr), ("fallback", bar.fallback_atr)):
            if bar.problem is None and math.isfinite(value) and value > 0:
                self._last_valid_atr[key] = float(value)
        # the ATR in whose units the deciding policy meant its stop and take-profit distances
        atr_key = "fallback" if choice.source == "v1" else "primary"
        atr_t = float(bar.fallback_atr if atr_key == "fallback" else bar.atr)
        atr_ok = bar.problem is None and math.isfinite(atr_t) and atr_t > 0
        decision = choice.decision
        if decision.direction != 0 and decision.direction != state.side and not atr_ok:
            choice.events.append(("entry_blocked_atr", {"atr": atr_t, "decision": _decision_detail(decision)}))
            decision = Decision.flat()
            choice = _Choice(
                decision, "guard",
                f"{choice.reason + '; ' if choice.reason else ''}atr_invalid: atr[t]={atr_t!r}, no new position",
                choice.raw_action, choice.latency_ms, choice.events,
            )  # fmt: skip
        return PendingBar(bar, events, fills, equity_usdt, equity_row, state, choice, decision, decision, loop_hold,
                          atr_t, atr_ok, atr_key)

    def snapshot(self, pending: PendingBar) -> AccountSnapshot:
        """The book of ``pending`` as a risk guard sees it (this symbol's equity and position at the bar's close)."""
        return _account_snapshot(pending.bar.time, pending.equity_usdt, pending.state, pending.bar.bar.close)

    def review(self, pending: PendingBar, verdict: GuardVerdict, *, track_state: bool = True) -> None:
        """Step 4b: apply a risk guard's ``verdict`` on ``pending.decision`` (this symbol's guard, then in a
        multi-symbol run the account's): a changed direction makes the row's source 'guard' (reason ``risk: ...``),
        a clipped size adds a ``risk_clipped`` event; a change of this symbol's guard state is a
        ``risk_state_changed`` event (``track_state``; the account's state is tracked by its caller)."""
        pending.choice, pending.decision = self._review(pending.bar, pending.choice, pending.decision, verdict,
                                                        track_state)

    def complete(self, pending: PendingBar, *, write: bool = True) -> tuple[DecisionRecord, BarRows]:
        """Step 5: submit ``pending.decision`` to the broker and record the bar; returns its decision row and all
        its rows. ``write=False``: the rows are not stored nor published (the caller stores several symbols' rows
        in one transaction, then calls :meth:`publish`)."""
        imposed = pending.decision.direction != pending.wanted.direction  # the guard's: read whatever the rules
        # a hold the loop imposed is no decision (the env's bars between decisions; with a band a hold would resize)
        self.broker.submit(None if pending.loop_hold and not imposed else pending.decision,
                           pending.atr_t if pending.atr_ok else self._last_valid_atr[pending.atr_key],
                           imposed=imposed)  # fmt: skip
        return self._record(pending.bar, pending.choice, pending.decision, pending.fills, pending.events,
                            pending.equity_row, write=write)

    def skip(self, bar: BarInput, reason: str) -> DecisionRecord:
        """Record ``bar``, which closed without a decision: a decision row of source 'missed'.

        The broker still processes the bar as an exchange would treat resting orders: the
        decision of the last decided bar fills at its open, stops, take-profits, liquidation and
        funding apply (unless ``bar.problem`` is set: then it is quarantined, the pending decision
        discarded). Nothing is submitted, so the position is held into the next bar. The row's
        direction is the side after the bar, its reason ``reason``. Returns the row (stored).
        """
        events: list[EventRecord] = []
        fills, equity_usdt, equity_row = self._process(bar, events)
        self._watch_drift(bar, equity_usdt, events)
        decision = _hold(self.broker.state.side)
        record, _ = self._record(bar, _Choice(decision, "missed", reason, None, 0.0, []), decision, fills, events,
                                 equity_row)
        return record

    def _watch_drift(self, bar: BarInput, equity_usdt: float, events: list[EventRecord]) -> None:
        """The drift monitor observes ``bar`` (its valid context window, the equity marked at its close); its events
        (``drift``, a breach's action) join the bar's rows; a rollback swaps the slot's primary before the decision."""
        if self.drift_watch is None:
            return
        window = bar.window if bar.problem is None and bar.taint is None else None
        events.extend(EventRecord(self.run_id, bar.time, kind, detail)
                      for kind, detail in self.drift_watch.observe(bar.time, window, equity_usdt, self.slot))

    def _process(self, bar: BarInput, events: list[EventRecord]) -> tuple[list[FillRecord], float, EquityRecord]:
        """Step 1: the broker processes ``bar`` with the pending decision (or quarantines it); closed
        round trips go to the guard. Returns (fills, equity marked at the close in USDT, equity row)."""
        ts, fills = bar.time, []
        closed_trades: tuple[ClosedTrade, ...] = ()
        if bar.problem is not None:
            self.n_quarantined += 1
            discarded = self.broker.cancel_pending()
            events.append(EventRecord(self.run_id, ts, "quarantine", {
                "problem": bar.problem, "discarded_decision": _decision_detail(discarded),
            }))  # fmt: skip
            equity_usdt = self.broker.equity_usdt
        else:
            result = self.broker.on_bar(bar.bar)
            fills = [FillRecord.from_fill(self.run_id, f, self.symbol) for f in result.fills]
            closed_trades = result.closed_trades
            if result.liquidated:
                events.append(EventRecord(self.run_id, ts, "liquidation",
                                          {"liquidation_fee_usdt": result.liquidation_fee_usdt}))
            if result.skipped_min_notional:
                events.append(EventRecord(self.run_id, ts, "skipped_min_notional", {}))
            equity_usdt = result.equity_usdt
        state = self.broker.state
        row = EquityRecord(self.run_id, ts, float(equity_usdt), state.cash_usdt, state.side, state.qty_base, self.symbol)
        for trade in closed_trades:
            if self.guard is not None:
                self.guard.record_closed_trade(ts, trade.pnl_usdt)
            for sink in self.closed_trade_sinks:  # e.g. the account guard of a multi-symbol run
                sink(ts, trade.pnl_usdt)
        return fills, float(equity_usdt), row

    def _decide(self, bar: BarInput, state: Any, equity_usdt: float) -> tuple[_Choice, bool]:
        """Steps 2-4: hold on a quarantined or held bar and between decision bars, else bundle -> V1 -> flat, whose
        close or flip of a position younger than the minimum holding period is a hold (:mod:`serving.trading_rules`).
        Returns the choice and whether it is a hold the loop imposed (submitted as no decision)."""
        if bar.problem is not None:
            return _Choice(_hold(state.side), "guard", f"quarantine: {bar.problem}", None, 0.0, []), True
        self._peak_equity_usdt = max(self._peak_equity_usdt, float(equity_usdt))  # every marked bar, as the env
        if bar.taint is not None:
            self.n_window_held += 1
            choice = _Choice(_hold(state.side), "guard", bar.taint.reason, None, 0.0, [])
            if self._held_by != bar.taint.key:
                choice.events.append(("context_window_invalid", dict(bar.taint.detail)))
            return choice, True
        rules = self.trading_rules
        if rules is not None and not decides_at(bar.time, self.bar_interval, rules):
            return _Choice(_hold(state.side), "guard", not_decision_bar_reason(rules), None, 0.0, []), True
        ctx = DecisionContext(bar_open_time=bar.time, candles=bar.window, position=self.broker.position_view(),
                              equity_usdt=float(equity_usdt), peak_equity_usdt=self._peak_equity_usdt)  # fmt: skip
        self._last_ctx = ctx
        policy, unavailable = self.slot.acquire(bar.t)
        if self.drift_watch is not None:  # the drift monitor's v1 mode: V1 decides (reason 'drift: ...')
            policy, unavailable = self.drift_watch.gate(policy, unavailable)
        choice = _choose(ctx, policy, self.fallback, unavailable, self.config.decision_timeout_ms, self._clock)
        if policy is not None:
            choice.events.extend(self.slot.record(bar.t, choice.primary_failure))
        choice.events.extend(self.fallback_ledger.observe(choice.source, choice.reason))
        held = min_hold_reason(choice.decision.direction, state.side, state.bars_in_trade, rules)
        if held is not None:
            choice.events.append(("min_hold", {"decision": _decision_detail(choice.decision),
                                               "bars_in_trade": int(state.bars_in_trade)}))  # fmt: skip
            reason = f"{choice.reason}; {held}" if choice.reason else held
            return _Choice(_hold(state.side), "guard", reason, choice.raw_action, choice.latency_ms, choice.events), True
        return choice, False

    def _review(self, bar: BarInput, choice: _Choice, decision: Decision, verdict: GuardVerdict,
                track_state: bool = True) -> tuple[_Choice, Decision]:
        """Step 4b: apply the risk guard's verdict on ``decision`` (the guard is independent of the policy)."""
        if track_state and verdict.state != self.risk_state:
            choice.events.append(("risk_state_changed", {
                "from": self.risk_state, "to": verdict.state, "reasons": list(verdict.reasons),
            }))  # fmt: skip
            self.risk_state = verdict.state
        if verdict.decision != decision:
            if verdict.decision.direction != decision.direction:
                why = "; ".join(verdict.reasons)
                choice = _Choice(
                    verdict.decision, "guard", f"{choice.reason + '; ' if choice.reason else ''}risk: {why}",
                    choice.raw_action, choice.latency_ms, choice.events,
                )  # fmt: skip
            else:
                choice.events.append(("risk_clipped", {
                    "reasons": list(verdict.reasons), "requested": _decision_detail(decision),
                }))  # fmt: skip
            decision = verdict.decision
        return choice, decision

    def _record(self, bar: BarInput, choice: _Choice, decision: Decision, fills: list[FillRecord],
                events: list[EventRecord], equity_row: EquityRecord, *, write: bool = True
                ) -> tuple[DecisionRecord, BarRows]:
        """Step 5: the bar's decision row, fills, equity and events in one transaction, then notify (``write``)."""
        self.bars += 1
        self.counts[choice.source] += 1
        events.extend(EventRecord(self.run_id, bar.time, kind, detail) for kind, detail in choice.events)
        if self.name_symbol_in_events:
            events = [EventRecord(e.run_id, e.time, e.kind, {**e.detail, "symbol": self.symbol}) for e in events]
        record = DecisionRecord.from_decision(
            self.run_id, bar.time, choice.source, decision, raw_action=choice.raw_action,
            fallback_reason=choice.reason, latency_ms=choice.latency_ms, created_at=self._now(), symbol=self.symbol,
        )  # fmt: skip
        rows = BarRows([record], fills, [equity_row], events)
        if write:
            self.store.append(decisions=rows.decisions, fills=rows.fills, equity=rows.equity, events=rows.events)
            self.publish(rows)
        return record, rows

    def publish(self, rows: BarRows) -> None:
        """Count the events of ``rows`` and hand them and its fills to the notifier (after they are stored)."""
        self._publish(rows.events, rows.fills)

    def note(self, time: pd.Timestamp, kind: str, detail: dict[str, Any]) -> None:
        """Write one event of the run outside a bar's transaction (stored, counted, notified)."""
        events = [EventRecord(self.run_id, time, kind, detail)]
        self.store.append(events=events)
        self._publish(events, [])

    def _publish(self, events: list[EventRecord], fills: list[FillRecord]) -> None:
        for e in events:
            self.event_counts[e.kind] += 1
        if self.notifier is not None:
            self.notifier.publish(events, fills)


class _ReplayBars:
    """The bars of a replayed DataFrame as :class:`BarInput` (row problems and windows precomputed)."""

    def __init__(self, candles: pd.DataFrame, atr: np.ndarray, fallback_atr: np.ndarray, context_bars: int | None,
                 funding_interval_hours: int) -> None:
        n = len(candles)
        self.candles, self.atr, self.fallback_atr, self.context_bars = candles, atr, fallback_atr, context_bars
        self.funding_interval_hours = funding_interval_hours
        self.problems = row_problems(candles)
        self.last_bad = last_invalid_row(self.problems)
        self.o, self.h, self.lo, self.c = (candles[k].to_numpy(np.float64) for k in ("open", "high", "low", "close"))
        self.funding = (candles["funding_rate"].to_numpy(np.float64) if "funding_rate" in candles.columns
                        else np.full(n, np.nan))  # fmt: skip

    def __getitem__(self, t: int) -> BarInput:
        ts = self.candles.index[t]
        ns = int(ts.value)
        bar = Bar(open_time_ns=ns, open=float(self.o[t]), high=float(self.h[t]), low=float(self.lo[t]),
                  close=float(self.c[t]), funding_rate=float(self.funding[t]),
                  is_funding_time=is_funding_time(ns, self.funding_interval_hours))  # fmt: skip
        problem = self.problems[t]
        start = window_start(t, self.context_bars)
        taint = None
        if problem is None and self.last_bad[t] >= start:
            bad = int(self.last_bad[t])
            index = self.candles.index
            taint = WindowTaint(str(bad), _window_reason(index, bad, self.context_bars),
                                {"invalid_row": str(index[bad]), "problem": self.problems[bad]})
        window = self.candles.iloc[start : t + 1] if problem is None and taint is None else None
        return BarInput(t, ts, bar, window, float(self.atr[t]), float(self.fallback_atr[t]), problem, taint)


def run_replay(
    candles: pd.DataFrame,
    *,
    primary: Policy | PolicySlot | None,
    fallback: Policy,
    atr: np.ndarray,
    costs: CostConfig,
    store: StateStore,
    config: ServeConfig,
    fallback_atr: np.ndarray | None = None,
    primary_load_error: str | None = None,
    guard: RiskGuard | None = None,
    notifier: Notifier | None = None,
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    trading_rules: TradingRulesConfig | None = None,
    drift: DriftConfig | None = None,
) -> ReplaySummary:
    """Replay ``candles`` bar by bar through the paper broker with V2 -> V1 fallback.

    Parameters
    ----------
    candles : pd.DataFrame
        Index: strictly increasing UTC open times; columns ``open high low close volume``
        (float64) and optionally ``funding_rate`` (NaN where none; NaN at a funding time uses the
        cost model's fallback rate).
    primary : Policy | PolicySlot | None
        The V2 policy, a :class:`serving.hotswap.PolicySlot` holding it (backoff, hot-swap), or
        None when its bundle failed to load (see ``primary_load_error``). A bare policy is wrapped
        in a slot with ``config.primary_backoff`` and no hot-swap. Its ``last_raw_action`` (set by
        each ``decide``) is stored in the decision row (also when the primary failed or was overruled).
    fallback : Policy
        The V1 policy; ``config.context_bars`` must cover its ``history_bars`` at the candles' interval.
    atr : np.ndarray
        Shape (len(candles),), float: ATR of each bar in price units (USDT), NaN where unknown, of the
        primary's period (``primary.atr_period_bars``: a stop of ``stop_atr`` is ``stop_atr * atr[t]``
        from the fill). Used for every decision not made by the fallback.
    fallback_atr : np.ndarray | None
        Shape (len(candles),): the ATR of the fallback's own period (``fallback.atr_period_bars``),
        used for the bars the fallback decides, so V1 places its stops at the distance it sized its
        risk with; None: ``atr`` for every bar.
    costs : CostConfig
        The shared cost model (same as the env's).
    store : StateStore
        Where decisions, fills, equity snapshots and events are appended.
    config : ServeConfig
        Equity, deadline, warm-up, run id, context length, backoff.
    primary_load_error : str | None
        Why ``primary`` is None (recorded as ``bundle_load_failed: <text>``).
    guard : RiskGuard | None
        Risk guard reviewing every decided bar (not quarantined ones, whose decision is already
        hold-or-flat); None: no guard. A decision whose direction it changes is recorded with
        source 'guard' and reason ``risk: ...``; a clipped size keeps the policy's source and adds a
        ``risk_clipped`` event; each state change is a ``risk_state_changed`` event.
    notifier : Notifier | None
        Receives the bar's events and fills after they are stored (never raises, never blocks).
    progress : Callable[[int, int], None] | None
        Called after each processed bar with (bars consumed so far, total bars).
    clock : Callable[[], float]
        Monotonic seconds, used for decision latency (default ``time.perf_counter``).
    now : Callable[[], datetime]
        Wall clock (tz-aware) for ``created_at`` of decision rows.
    trading_rules : TradingRulesConfig | None
        The execution rules of the bundle's env (``bundle.env_config.trading_rules``): the policy is asked only at
        decision bars (a hold between them, source 'guard'), a close or flip of a position younger than
        ``min_hold_bars`` is a hold, the paper broker resizes in the band (:mod:`serving.trading_rules`). None: a
        decision every bar, no holding period, no resize.
    drift : DriftConfig | None
        The drift monitor's settings (:mod:`serving.drift_watch`: evaluated every ``every_bars`` bars, ``drift``
        events, the action on a breach; its ``v1`` mode read back from ``store`` for this run and symbol); None:
        no monitor.

    The ``latency_ms`` of a decision row runs from the start of the decision to the final answer
    (primary attempt plus fallback when one was needed); the deadline applies to the primary alone.

    Returns
    -------
    ReplaySummary

    Raises
    ------
    DataQualityError
        If ``candles`` is not a UTC-indexed, sorted, unique DataFrame with the required columns
        (row-level problems are quarantined instead).
    ValueError
        If ``atr`` or ``fallback_atr`` has the wrong shape, or ``context_bars`` is shorter than the fallback's history.
    TypeError
        If ``primary`` or ``fallback`` is not a :class:`market.decision.Policy`.
    """
    _validate_candles(candles)
    n = len(candles)
    atr_arr = np.asarray(atr, dtype=np.float64)
    if atr_arr.shape != (n,):
        raise ValueError(f"atr must have shape ({n},) like candles, got {atr_arr.shape}")
    fb_atr_arr = atr_arr if fallback_atr is None else np.asarray(fallback_atr, dtype=np.float64)
    if fb_atr_arr.shape != (n,):
        raise ValueError(f"fallback_atr must have shape ({n},) like candles, got {fb_atr_arr.shape}")
    slot = (
        primary
        if isinstance(primary, PolicySlot)
        else PolicySlot(primary, load_error=primary_load_error, backoff=config.primary_backoff)
    )
    interval = candles.index[1] - candles.index[0] if n >= 2 else None
    stepper = PaperStepper(slot=slot, fallback=fallback, costs=costs, store=store, config=config, guard=guard,
                           notifier=notifier, clock=clock, now=now, bar_interval=interval,
                           trading_rules=trading_rules)  # fmt: skip
    if drift is not None:
        stepper.drift_watch = DriftWatch(drift, store, config.run_id, stepper.symbol)
    bars = _ReplayBars(candles, atr_arr, fb_atr_arr, config.context_bars, costs.funding_interval_hours)
    epoch = pd.Timestamp(0, tz="UTC")
    stepper.start(candles.index[0] if n else epoch, bars=n, warmup_bars=config.warmup_bars)
    for t in range(config.warmup_bars, n):
        stepper.step(bars[t])
        if progress is not None:
            progress(t + 1, n)
    return stepper.finish(candles.index[-1] if n else epoch)
