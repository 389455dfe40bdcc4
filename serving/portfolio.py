"""Multi-symbol paper replay: several symbols on one paper account, decided bar by bar together.

:func:`run_portfolio_replay` drives one :class:`serving.loop.PaperStepper` per symbol (a *leg*: its candles, its
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
from collections.abc import Callable, Sequence
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
from serving.hotswap import PolicySlot
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
from serving.store import AccountEquityRecord, EventRecord, StateStore


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
    """A leg's stepper, its replayed rows and its last known close (its notional on a quarantined bar)."""

    def __init__(self, leg: Leg, stepper: PaperStepper, bars: _ReplayBars) -> None:
        self.leg, self.stepper, self.bars = leg, stepper, bars
        self.pos = {ts: i for i, ts in enumerate(leg.candles.index)}
        self.last_close = math.nan

    def bar_at(self, t: int, ts: pd.Timestamp) -> BarInput:
        i = self.pos.get(ts)
        if i is None:
            return _missing_bar(self.leg.symbol, t, ts)
        return dataclasses.replace(self.bars[i], t=t)


def _book(run: _LegRun, pending: PendingBar) -> SymbolBook:
    state = pending.state
    if pending.bar.problem is None:
        run.last_close = float(pending.bar.bar.close)
    mark = run.last_close if math.isfinite(run.last_close) else float(state.entry_price or 0.0)
    notional = float(state.qty_base) * mark if state.side != 0 else 0.0
    margin = float(state.margin_usdt) if state.side != 0 else 0.0
    return SymbolBook(run.leg.symbol, pending.decision, int(state.side), notional, margin, float(pending.equity_usdt))


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
        stepper.name_symbol_in_events = True
        if drift is not None:
            stepper.drift_watch = DriftWatch(drift, store, config.run_id, leg.symbol)
        if account_guard is not None:
            stepper.closed_trade_sinks.append(account_guard.record_closed_trade)
        runs.append(_LegRun(leg, stepper, _ReplayBars(leg.candles, atr, fb_atr, config.context_bars,
                                                      leg.costs.funding_interval_hours)))
    first = max(run.leg.candles.index[config.warmup_bars] for run in runs)
    union = runs[0].leg.candles.index
    for run in runs[1:]:
        union = union.union(run.leg.candles.index)
    times = union[union >= first]
    run_id = config.run_id
    account_state = account_guard.state.value if account_guard is not None else None
    account_events: Counter[str] = Counter()
    started = [EventRecord(run_id, times[0] if len(times) else first, "run_started", {
        **(detail or {}), "mode": "paper", "symbols": symbols, "initial_equity_usdt": config.initial_equity_usdt,
        "sleeve_equity_usdt": sleeve, "warmup_bars": config.warmup_bars, "risk_state": account_state,
        "primary": {r.leg.symbol: None if r.stepper.slot.policy is None else r.stepper.slot.policy.name for r in runs},
        "fallback": {r.leg.symbol: r.stepper.fallback.name for r in runs},
    })]  # fmt: skip
    started += [EventRecord(run_id, started[0].time, "primary_unavailable",
                            {"symbol": r.leg.symbol, "error": r.stepper.slot.load_error})
                for r in runs if r.stepper.slot.policy is None]
    store.append(events=started)
    account_events.update(e.kind for e in started)
    if notifier is not None:
        notifier.publish(started, [])
    offset = int(union.get_loc(times[0])) if len(times) else 0
    for k, ts in enumerate(times):
        t = offset + k
        pendings = [(run, run.stepper.begin(run.bar_at(t, ts))) for run in runs]
        for run, pending in pendings:  # each symbol's own guard first
            guard = run.stepper.guard
            if guard is not None and pending.bar.problem is None:
                run.stepper.review(pending, guard.review(pending.decision, run.stepper.snapshot(pending)))
        books = [_book(run, pending) for run, pending in pendings]
        equity = float(sum(b.sizing_equity_usdt for b in books))
        account_rows: list[EventRecord] = []
        if account_guard is not None:
            verdicts = account_guard.review(ts, equity, books)
            for run, pending in pendings:
                if pending.bar.problem is None:  # a quarantined bar holds whatever the account says
                    run.stepper.review(pending, verdicts[run.leg.symbol], track_state=False)
            if account_guard.state.value != account_state:
                account_rows.append(EventRecord(run_id, ts, "risk_state_changed", {
                    "scope": ACCOUNT_SCOPE, "from": account_state, "to": account_guard.state.value,
                    "reasons": list(account_guard.reasons)}))  # fmt: skip
                account_state = account_guard.state.value
        rows = [run.stepper.complete(pending, write=False)[1] for run, pending in pendings]
        states = [run.stepper.broker.state for run in runs]
        account = AccountEquityRecord(run_id, ts, equity, float(sum(b.position_notional_usdt for b in books)),
                                      float(sum(b.position_margin_usdt for b in books)),
                                      int(sum(1 for s in states if s.side != 0)))
        store.append(decisions=[d for r in rows for d in r.decisions], fills=[f for r in rows for f in r.fills],
                     equity=[e for r in rows for e in r.equity], events=[e for r in rows for e in r.events] + account_rows,
                     account=[account])  # fmt: skip
        for (run, _), r in zip(pendings, rows, strict=True):
            run.stepper.publish(r)
        account_events.update(e.kind for e in account_rows)
        if notifier is not None and account_rows:
            notifier.publish(account_rows, [])
        if progress is not None:
            progress(k + 1, len(times))
    summaries = {run.leg.symbol: run.stepper.summary() for run in runs}
    final = float(sum(s.final_equity_usdt for s in summaries.values()))
    end = times[-1] if len(times) else first
    finished = [EventRecord(run_id, end, "run_finished", {
        "bars": len(times), "symbols": symbols, "final_equity_usdt": final, "risk_state": account_state,
        "by_symbol": {s: {"decisions_v2": v.decisions_v2, "decisions_v1": v.decisions_v1,
                          "decisions_guard": v.decisions_guard, "final_equity_usdt": v.final_equity_usdt,
                          "n_fills": v.n_fills, "n_quarantined": v.n_quarantined} for s, v in summaries.items()},
    })]  # fmt: skip
    store.append(events=finished)
    account_events.update(e.kind for e in finished)
    if notifier is not None:
        notifier.publish(finished, [])
    return PortfolioSummary(run_id, tuple(symbols), len(times), summaries, float(config.initial_equity_usdt), final,
                            account_state, account_events)
