"""Multi-symbol paper serving: several symbols on one paper account, decided bar by bar together.

:class:`AccountStepper` steps one :class:`serving.loop.PaperStepper` per symbol on one account (the per-bar logic
below); :func:`run_portfolio_replay` feeds it candle files, :class:`serving.paper_live.PaperLivePortfolio` the
exchange's live candles (``ats serve --mode paper --symbols A,B``). The replay drives one stepper per symbol (a *leg*: its candles, its
policies through the same fallback chain bundle -> V1 -> flat, its cost model and instrument spec, its trading
rules) on one clock:

* **Clock**: the union of the legs' open times. The first decided bar is the latest of the legs' first bars after
  their ``warmup_bars`` (each leg has its warm-up history by then). Bars of all symbols that open at the same time
  (close together) are decided together; a symbol with no candle at a time of the clock (its file stopped, or a
  hole) is **quarantined** for that bar, exactly as an invalid candle (:mod:`serving.loop`): no policy is asked,
  the pending decision is dropped, the position is held (stops are not checked without prices), its equity repeats
  its last mark, and its decision row (source 'guard', reason ``quarantine: missing_candle: ...``) is written. The
  other symbols trade on.
* **One account, equal sleeves**: the paper account's equity (``config.initial_equity_usdt``) is split equally
  between the N symbols at the start; each symbol's paper broker trades its sleeve (isolated margin, the env's
  accounting) and sizes its entries on the sleeve's equity; the account's equity is the sum of the sleeves. So a
  run of N symbols whose guards never bind equals, bar for bar, the sum of the N single-symbol runs started with
  ``initial_equity_usdt / N`` each (``tests/serving/test_portfolio.py``). Policies see their sleeve's equity and
  peak (what they size on).
* **Risk**: each symbol's own :class:`serving.risk.RiskGuard` (scope ``symbol:<SYMBOL>``; kill switches, entry
  caps; no daily-loss or drawdown limit, :func:`serving.account_risk.per_symbol_limits`) reviews its decision,
  then :class:`serving.account_risk.AccountGuard` (scope ``account``) reviews all of them together: exits and
  holds first, then entries, each in symbol order (its module docstring).
* **Store**: each symbol's decision, fills, equity (its sleeve) and events carry its ``symbol``; every event of a
  symbol's bar names it in its detail (notifications name the symbol); one ``account_equity`` row per bar. All
  rows of one bar, every symbol's and the account's, go to the store in one transaction.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from envs.accounting import Bar
from envs.config import CostConfig, TradingRulesConfig
from market.decision import Policy
from serving.account_risk import (
    ACCOUNT_SCOPE,
    AccountGuard,
    AccountRiskConfig,
    SymbolBook,
    per_symbol_limits,
    symbol_scope,
)
from serving.drift import DriftConfig
from serving.drift_watch import DriftWatch
from serving.errors import DataQualityError
from serving.hotswap import PolicySlot, SlotGroup
from serving.loop import (
    BarInput,
    PaperStepper,
    PendingBar,
    ReplaySummary,
    ServeConfig,
    _ReplayBars,
    _validate_candles,
)
from serving.notify import Notifier
from serving.risk import RiskConfig, RiskGuard
from serving.store import AccountEquityRecord, DecisionRecord, EventRecord, StateStore


@dataclass(frozen=True)
class Leg:
    """One symbol of a multi-symbol replay.

    Attributes
    ----------
    symbol : str
        Exchange id (``BTCUSDT``); must be ``costs.instrument.symbol`` (the spec its fills use).
    candles : pd.DataFrame
        Its candles (as :func:`serving.loop.run_replay` takes them).
    primary : Policy | PolicySlot | None
        Its V2 policy or slot (None: the bundle failed to load, ``primary_load_error`` says why). Give each leg its
        own instance: a policy may keep per-symbol state (its last raw action).
    fallback : Policy
        Its V1 policy.
    atr, fallback_atr : np.ndarray
        Shape (len(candles),): ATR of the primary's and of the fallback's period (price units); ``fallback_atr``
        None: ``atr``.
    costs : CostConfig
        Its cost model with its instrument spec.
    trading_rules : TradingRulesConfig | None
        The bundle env's trading rules (:mod:`serving.trading_rules`).
    primary_load_error : str | None
        Why ``primary`` is None.
    """

    symbol: str
    candles: pd.DataFrame
    primary: Policy | PolicySlot | None
    fallback: Policy
    atr: np.ndarray
    costs: CostConfig
    fallback_atr: np.ndarray | None = None
    trading_rules: TradingRulesConfig | None = None
    primary_load_error: str | None = None


@dataclass(frozen=True)
class PortfolioSummary:
    """Outcome of :func:`run_portfolio_replay`: ``bars`` times of the clock decided; ``legs`` each symbol's
    :class:`serving.loop.ReplaySummary` (its sleeve's money); ``final_equity_usdt`` the account's (sum of the
    sleeves, USDT); ``account_risk_state`` the account guard's state at the end (None without it);
    ``account_events`` the account-level events by kind."""

    run_id: str
    symbols: tuple[str, ...]
    bars: int
    legs: dict[str, ReplaySummary]
    initial_equity_usdt: float
    final_equity_usdt: float
    account_risk_state: str | None
    account_events: Counter[str] = field(default_factory=Counter)


def sleeve_equity_usdt(initial_equity_usdt: float, n_symbols: int) -> float:
    """Each symbol's share of the paper account at the start: ``initial_equity_usdt / n_symbols`` (USDT).

    Raises
    ------
    ValueError
        ``n_symbols`` < 1.
    """
    if n_symbols < 1:
        raise ValueError(f"a portfolio needs at least one symbol, got {n_symbols}")
    return float(initial_equity_usdt) / n_symbols


def _missing_bar(symbol: str, t: int, ts: pd.Timestamp) -> BarInput:
    nan = math.nan
    bar = Bar(open_time_ns=int(ts.value), open=nan, high=nan, low=nan, close=nan, funding_rate=nan,
              is_funding_time=False)
    return BarInput(t, ts, bar, None, nan, nan, problem=f"missing_candle: no {symbol} candle at {ts}")


class _LegRun:
    """A leg's stepper and its replayed rows."""

    def __init__(self, leg: Leg, stepper: PaperStepper, bars: _ReplayBars) -> None:
        self.leg, self.stepper, self.bars = leg, stepper, bars
        self.pos = {ts: i for i, ts in enumerate(leg.candles.index)}

    def bar_at(self, t: int, ts: pd.Timestamp) -> BarInput:
        i = self.pos.get(ts)
        if i is None:
            return _missing_bar(self.leg.symbol, t, ts)
        return dataclasses.replace(self.bars[i], t=t)


def _book(symbol: str, pending: PendingBar, last_close: float) -> SymbolBook:
    """The account guard's view of ``symbol`` at ``pending``'s close (its notional at ``last_close``, the last known
    close, or the entry price before any)."""
    state = pending.state
    mark = last_close if math.isfinite(last_close) else float(state.entry_price or 0.0)
    notional = float(state.qty_base) * mark if state.side != 0 else 0.0
    margin = float(state.margin_usdt) if state.side != 0 else 0.0
    return SymbolBook(symbol, pending.decision, int(state.side), notional, margin, float(pending.equity_usdt))


class AccountStepper:
    """Several symbols' :class:`serving.loop.PaperStepper` on one paper account, stepped bar by bar together (module
    docstring): the per-bar logic shared by the multi-symbol replay (:func:`run_portfolio_replay`) and paper on live
    candles with several symbols (:class:`serving.paper_live.PaperLivePortfolio`).

    Parameters
    ----------
    steppers : Sequence[PaperStepper]
        One per symbol (distinct ``stepper.symbol``; each trades its sleeve; processed in symbol order).
    store : StateStore
        Where every row goes.
    run_id : str
        The run's id.
    account_guard : AccountGuard | None
        The account's guard (None: none); told every symbol's closed trades.
    notifier : Notifier | None
        Receives the account-level events (the symbols' own go through their steppers).
    slot_group : SlotGroup | None
        Hot-swap of the run (:class:`serving.hotswap.SlotGroup` over the steppers' slots): polled once per decided
        bar before any symbol decides, so a candidate is swapped into every symbol at the same bar or into none;
        its events join each symbol's rows of the bar. None: no hot-swap (a slot still re-loads its own bundle
        after a load failure).

    Raises
    ------
    ValueError
        No stepper, a symbol given twice, or a slot group whose slots are not the steppers'.
    """

    def __init__(self, steppers: Sequence[PaperStepper], store: StateStore, run_id: str, *,
                 account_guard: AccountGuard | None = None, notifier: Notifier | None = None,
                 slot_group: SlotGroup | None = None) -> None:
        if not steppers:
            raise ValueError("an account needs at least one symbol")
        self.steppers = sorted(steppers, key=lambda s: s.symbol)
        self.symbols = [s.symbol for s in self.steppers]
        if len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"each symbol may be served once on an account, got {self.symbols}")
        if slot_group is not None and (list(slot_group.slots) != self.symbols or any(
                slot_group.slots[s.symbol] is not s.slot for s in self.steppers)):
            raise ValueError(f"the slot group must hold the slots of the steppers of {self.symbols}, got "
                             f"{list(slot_group.slots)}")
        self.slot_group = slot_group
        self.store, self.run_id, self.account_guard, self.notifier = store, run_id, account_guard, notifier
        for stepper in self.steppers:
            stepper.name_symbol_in_events = True
            if account_guard is not None:
                stepper.closed_trade_sinks.append(account_guard.record_closed_trade)
        #: the account guard's state (None without it)
        self.account_state: str | None = account_guard.state.value if account_guard is not None else None
        #: account-level events by kind
        self.account_events: Counter[str] = Counter()
        #: decided (or missed) bar times so far
        self.bars = 0
        self._last_close = {symbol: math.nan for symbol in self.symbols}  # each symbol's last valid close

    def start(self, time: pd.Timestamp, initial_equity_usdt: float, **detail: Any) -> None:
        """Write the run's ``run_started`` (``detail`` first; mode 'paper', the symbols, the account's and each
        sleeve's equity, the account guard's state, each symbol's primary and fallback) and a
        ``primary_unavailable`` per symbol whose slot holds no primary."""
        started = [EventRecord(self.run_id, time, "run_started", {
            **detail, "mode": "paper", "symbols": self.symbols, "initial_equity_usdt": initial_equity_usdt,
            "sleeve_equity_usdt": sleeve_equity_usdt(initial_equity_usdt, len(self.symbols)),
            "risk_state": self.account_state,
            "primary": {s.symbol: None if s.slot.policy is None else s.slot.policy.name for s in self.steppers},
            "fallback": {s.symbol: s.fallback.name for s in self.steppers},
        })]  # fmt: skip
        started += [EventRecord(self.run_id, time, "primary_unavailable", {"symbol": s.symbol, "error": s.slot.load_error})
                    for s in self.steppers if s.slot.policy is None]
        self._write_account_events(started)

    def step(self, time: pd.Timestamp, bars: Mapping[str, BarInput]) -> list[DecisionRecord]:
        """Decide the bar at ``time`` of every symbol together (``bars``: symbol -> its :class:`BarInput`, one per
        symbol): each processes and decides (:meth:`PaperStepper.begin`), its own guard reviews its decision, then
        the account's guard all of them (quarantined bars hold whatever it says); then each submits. Every
        symbol's rows and the ``account_equity`` row go to the store in one transaction. Returns the decision rows
        (symbol order).

        Raises
        ------
        ValueError
            ``bars`` does not name exactly the account's symbols; from a broker, a bar not later than its last.
        """
        self._check_symbols(bars)
        swaps = ({} if self.slot_group is None
                 else self.slot_group.poll({s.symbol: s._last_ctx for s in self.steppers}))  # before anyone decides
        pendings = []
        for stepper in self.steppers:
            bar = bars[stepper.symbol]
            pending = stepper.begin(bar)
            pending.events[:0] = [EventRecord(self.run_id, bar.time, kind, detail)
                                  for kind, detail in swaps.get(stepper.symbol, [])]
            pendings.append((stepper, pending))
        for stepper, pending in pendings:  # each symbol's own guard first
            if stepper.guard is not None and pending.bar.problem is None:
                stepper.review(pending, stepper.guard.review(pending.decision, stepper.snapshot(pending)))
        books = []
        for stepper, pending in pendings:
            if pending.bar.problem is None:
                self._last_close[stepper.symbol] = float(pending.bar.bar.close)
            books.append(_book(stepper.symbol, pending, self._last_close[stepper.symbol]))
        equity = float(sum(b.sizing_equity_usdt for b in books))
        account_rows: list[EventRecord] = []
        if self.account_guard is not None:
            verdicts = self.account_guard.review(time, equity, books)
            for stepper, pending in pendings:
                if pending.bar.problem is None:  # a quarantined bar holds whatever the account says
                    stepper.review(pending, verdicts[stepper.symbol], track_state=False)
            if self.account_guard.state.value != self.account_state:
                account_rows.append(EventRecord(self.run_id, time, "risk_state_changed", {
                    "scope": ACCOUNT_SCOPE, "from": self.account_state, "to": self.account_guard.state.value,
                    "reasons": list(self.account_guard.reasons)}))  # fmt: skip
                self.account_state = self.account_guard.state.value
        rows = [stepper.complete(pending, write=False)[1] for stepper, pending in pendings]
        account = AccountEquityRecord(self.run_id, time, equity, float(sum(b.position_notional_usdt for b in books)),
                                      float(sum(b.position_margin_usdt for b in books)),
                                      int(sum(1 for s in self.steppers if s.broker.state.side != 0)))
        self.store.append(decisions=[d for r in rows for d in r.decisions], fills=[f for r in rows for f in r.fills],
                          equity=[e for r in rows for e in r.equity],
                          events=[e for r in rows for e in r.events] + account_rows, account=[account])  # fmt: skip
        for (stepper, _), r in zip(pendings, rows, strict=True):
            stepper.publish(r)
        self._count_account_events(account_rows)
        self.bars += 1
        return [d for r in rows for d in r.decisions]

    def skip(self, time: pd.Timestamp, bars: Mapping[str, BarInput], reason: str) -> list[DecisionRecord]:
        """Record the bar at ``time``, which closed without a decision, for every symbol (:meth:`PaperStepper.skip`:
        a 'missed' row each, the candle still goes through its paper broker), then its ``account_equity`` row
        (each symbol's rows are stored as it is skipped, the account's after them). No guard reviews a missed bar.

        Raises
        ------
        ValueError
            As :meth:`step`.
        """
        self._check_symbols(bars)
        records = [stepper.skip(bars[stepper.symbol], reason) for stepper in self.steppers]
        notional = margin = 0.0
        for stepper in self.steppers:
            bar, state = bars[stepper.symbol], stepper.broker.state
            if bar.problem is None and math.isfinite(bar.bar.close):
                self._last_close[stepper.symbol] = float(bar.bar.close)
            if state.side != 0:
                last = self._last_close[stepper.symbol]
                notional += float(state.qty_base) * (last if math.isfinite(last) else float(state.entry_price or 0.0))
                margin += float(state.margin_usdt)
        equity = float(sum(s.broker.equity_usdt for s in self.steppers))
        open_positions = int(sum(1 for s in self.steppers if s.broker.state.side != 0))
        self.store.append(account=[AccountEquityRecord(self.run_id, time, equity, notional, margin, open_positions)])
        self.bars += 1
        return records

    def note(self, time: pd.Timestamp, kind: str, detail: dict[str, Any]) -> None:
        """Write one account-level event (stored, counted, notified)."""
        self._write_account_events([EventRecord(self.run_id, time, kind, detail)])

    def summary(self, initial_equity_usdt: float) -> PortfolioSummary:
        """The run so far (each symbol's :class:`serving.loop.ReplaySummary`, the account's equity and state)."""
        legs = {s.symbol: s.summary() for s in self.steppers}
        final = float(sum(v.final_equity_usdt for v in legs.values()))
        return PortfolioSummary(self.run_id, tuple(self.symbols), self.bars, legs, float(initial_equity_usdt), final,
                                self.account_state, Counter(self.account_events))

    def finish(self, time: pd.Timestamp, initial_equity_usdt: float, **detail: Any) -> PortfolioSummary:
        """Write ``run_finished`` at ``time`` (bars, symbols, the account's final equity and state, each symbol's
        totals, then ``detail``) and return the summary."""
        s = self.summary(initial_equity_usdt)
        self._write_account_events([EventRecord(self.run_id, time, "run_finished", {
            "bars": s.bars, "symbols": self.symbols, "final_equity_usdt": s.final_equity_usdt,
            "risk_state": self.account_state,
            "by_symbol": {sym: {"decisions_v2": v.decisions_v2, "decisions_v1": v.decisions_v1,
                                "decisions_guard": v.decisions_guard, "final_equity_usdt": v.final_equity_usdt,
                                "n_fills": v.n_fills, "n_quarantined": v.n_quarantined} for sym, v in s.legs.items()},
            **detail,
        })])  # fmt: skip
        return dataclasses.replace(s, account_events=Counter(self.account_events))

    def _check_symbols(self, bars: Mapping[str, BarInput]) -> None:
        if sorted(bars) != self.symbols:
            raise ValueError(f"a bar of the account needs one input per symbol {self.symbols}, got {sorted(bars)}")

    def _write_account_events(self, events: list[EventRecord]) -> None:
        self.store.append(events=events)
        self._count_account_events(events)

    def _count_account_events(self, events: list[EventRecord]) -> None:
        self.account_events.update(e.kind for e in events)
        if self.notifier is not None and events:
            self.notifier.publish(events, [])


def run_portfolio_replay(
    legs: Sequence[Leg],
    *,
    store: StateStore,
    config: ServeConfig,
    symbol_risk: RiskConfig | None = None,
    account_risk: AccountRiskConfig | None = None,
    notifier: Notifier | None = None,
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    detail: dict[str, Any] | None = None,
    drift: DriftConfig | None = None,
    slot_group: SlotGroup | None = None,
) -> PortfolioSummary:
    """Replay several symbols on one paper account (module docstring).

    Parameters
    ----------
    legs : Sequence[Leg]
        One per symbol (distinct symbols; order irrelevant: symbols are processed sorted).
    store : StateStore
        Where every row goes (``run_id`` of ``config``).
    config : ServeConfig
        The account's settings: ``initial_equity_usdt`` (split equally between the symbols), deadline, warm-up
        (per symbol), run id, context length, backoff.
    symbol_risk : RiskConfig | None
        Each symbol's guard (kill switches, entry caps; daily loss and drawdown are the account's); None: none.
    account_risk : AccountRiskConfig | None
        The account's guard; None: none.
    notifier, progress, clock, now
        As :func:`serving.loop.run_replay` (``progress``: clock times consumed, total).
    detail : dict | None
        Added to the ``run_started`` event (e.g. the replayed files).
    drift : DriftConfig | None
        The drift monitor of each symbol (:mod:`serving.drift_watch`: its own window, returns of its sleeve, action
        on its slot and its own ``v1`` mode); None: none.
    slot_group : SlotGroup | None
        Hot-swap over the legs' slots (each leg's ``primary`` the group's slot of its symbol): a candidate swapped
        into every symbol at the same bar or into none (:class:`AccountStepper`); None: none.

    Returns
    -------
    PortfolioSummary

    Raises
    ------
    ValueError
        No leg, a duplicate symbol, a leg whose symbol is not its instrument's, an ATR of the wrong shape.
    DataQualityError
        A leg's candles are not a sorted, unique, UTC-indexed frame with the required columns, or have no bar after
        the warm-up.
    """
    if not legs:
        raise ValueError("a portfolio replay needs at least one symbol")
    legs = sorted(legs, key=lambda leg: leg.symbol)
    symbols = [leg.symbol for leg in legs]
    if len(set(symbols)) != len(symbols):
        raise ValueError(f"each symbol may be replayed once, got {symbols}")
    sleeve = sleeve_equity_usdt(config.initial_equity_usdt, len(legs))
    leg_config = config.updated(initial_equity_usdt=sleeve)
    account_guard = AccountGuard(account_risk, store, now=now) if account_risk is not None else None
    runs: list[_LegRun] = []
    for leg in legs:
        if leg.costs.instrument.symbol != leg.symbol:
            raise ValueError(f"leg {leg.symbol} trades the instrument spec of {leg.costs.instrument.symbol}: give it "
                             f"the spec of {leg.symbol}")
        _validate_candles(leg.candles)
        n = len(leg.candles)
        if n <= config.warmup_bars:
            raise DataQualityError(f"{leg.symbol}: {n} candles, not more than the {config.warmup_bars} warm-up bars")
        atr = np.asarray(leg.atr, dtype=np.float64)
        fb_atr = atr if leg.fallback_atr is None else np.asarray(leg.fallback_atr, dtype=np.float64)
        for name, arr in (("atr", atr), ("fallback_atr", fb_atr)):
            if arr.shape != (n,):
                raise ValueError(f"{leg.symbol}: {name} must have shape ({n},) like its candles, got {arr.shape}")
        slot = (leg.primary if isinstance(leg.primary, PolicySlot)
                else PolicySlot(leg.primary, load_error=leg.primary_load_error, backoff=config.primary_backoff))
        guard = (RiskGuard(per_symbol_limits(symbol_risk), store, scope=symbol_scope(leg.symbol), now=now)
                 if symbol_risk is not None else None)
        interval = leg.candles.index[1] - leg.candles.index[0] if n >= 2 else None
        stepper = PaperStepper(slot=slot, fallback=leg.fallback, costs=leg.costs, store=store, config=leg_config,
                               guard=guard, notifier=notifier, clock=clock, now=now, bar_interval=interval,
                               trading_rules=leg.trading_rules)  # fmt: skip
        if drift is not None:
            stepper.drift_watch = DriftWatch(drift, store, config.run_id, leg.symbol)
        runs.append(_LegRun(leg, stepper, _ReplayBars(leg.candles, atr, fb_atr, config.context_bars,
                                                      leg.costs.funding_interval_hours)))
    account = AccountStepper([run.stepper for run in runs], store, config.run_id, account_guard=account_guard,
                             notifier=notifier, slot_group=slot_group)
    first = max(run.leg.candles.index[config.warmup_bars] for run in runs)
    union = runs[0].leg.candles.index
    for run in runs[1:]:
        union = union.union(run.leg.candles.index)
    times = union[union >= first]
    account.start(times[0] if len(times) else first, config.initial_equity_usdt,
                  **{**(detail or {}), "warmup_bars": config.warmup_bars})
    offset = int(union.get_loc(times[0])) if len(times) else 0
    for k, ts in enumerate(times):
        t = offset + k
        account.step(ts, {run.leg.symbol: run.bar_at(t, ts) for run in runs})
        if progress is not None:
            progress(k + 1, len(times))
    return account.finish(times[-1] if len(times) else first, config.initial_equity_usdt)
