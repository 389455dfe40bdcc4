"""Bar-by-bar replay loop with V2 -> V1 fallback, on the paper broker, recorded in the state store.

For every bar t from ``warmup_bars`` on:

0. between bars, the primary's :class:`serving.hotswap.PolicySlot` may swap in a validated new
   bundle (watched directory or ``ats serve reload`` request) or re-load a bundle that failed;
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

from envs.accounting import Bar, is_funding_time
from envs.config import CostConfig
from market.config_base import StrictConfig
from market.decision import Decision, DecisionContext, Policy
from serving.choice import Choice as _Choice
from serving.choice import choose as _choose
from serving.choice import reason_kind
from serving.errors import DataQualityError
from serving.hotswap import BackoffConfig, PolicySlot
from serving.notify import Notifier
from serving.paper import PaperBroker
from serving.risk import AccountSnapshot, RiskGuard
from serving.store import DecisionRecord, EquityRecord, EventRecord, FillRecord, StateStore

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
    ``deadline_exceeded``), the bars on which the primary was not used. Money in USDT; costs are
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


def row_problems(candles: pd.DataFrame) -> list[str | None]:
    """Per row, the first validation rule it breaks (None when valid).

    Rules: open/high/low/close finite and > 0; volume finite and >= 0;
    ``low <= min(open, close)`` and ``high >= max(open, close)``.
    """
    o, h, lo, c, v = (candles[k].to_numpy(np.float64) for k in _REQUIRED_COLUMNS)
    out: list[str | None] = [None] * len(candles)
    with np.errstate(invalid="ignore"):
        checks = [
            (~(np.isfinite(o) & np.isfinite(h) & np.isfinite(lo) & np.isfinite(c)), "non-finite price"),
            (~np.isfinite(v), "non-finite volume"),
            ((o <= 0) | (h <= 0) | (lo <= 0) | (c <= 0), "non-positive price"),
            (v < 0, "negative volume"),
            (h < lo, "high < low"),
            ((lo > np.minimum(o, c)) | (h < np.maximum(o, c)), "open/close outside [low, high]"),
        ]
    for mask, rule in checks:
        for i in np.flatnonzero(mask):
            if out[i] is None:
                out[i] = (
                    f"{rule} at {candles.index[i]}: open={o[i]!r} high={h[i]!r} low={lo[i]!r} "
                    f"close={c[i]!r} volume={v[i]!r}"
                )
    return out


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
        in a slot with ``config.primary_backoff`` and no hot-swap. The policy may expose
        ``last_raw_action`` (its raw action vector): it is reset to None before each call and
        stored in the decision row (also when the primary failed or was overruled).
    fallback : Policy
        The V1 policy. If it has ``history_bars``, ``config.context_bars`` must cover it.
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
    """
    _validate_candles(candles)
    n = len(candles)
    atr_arr = np.asarray(atr, dtype=np.float64)
    if atr_arr.shape != (n,):
        raise ValueError(f"atr must have shape ({n},) like candles, got {atr_arr.shape}")
    fb_atr_arr = atr_arr if fallback_atr is None else np.asarray(fallback_atr, dtype=np.float64)
    if fb_atr_arr.shape != (n,):
        raise ValueError(f"fallback_atr must have shape ({n},) like candles, got {fb_atr_arr.shape}")
    need = int(getattr(fallback, "history_bars", 0) or 0)
    if config.context_bars is not None and config.context_bars < need:
        raise ValueError(
            f"config.context_bars={config.context_bars} is shorter than the fallback's history_bars={need}"
        )
    slot = (
        primary
        if isinstance(primary, PolicySlot)
        else PolicySlot(primary, load_error=primary_load_error, backoff=config.primary_backoff)
    )

    run_id = config.run_id
    broker = PaperBroker(config.initial_equity_usdt, costs)
    problems = row_problems(candles)
    last_bad = last_invalid_row(problems)
    index = candles.index
    o, h, lo, c = (candles[k].to_numpy(np.float64) for k in ("open", "high", "low", "close"))
    funding = (
        candles["funding_rate"].to_numpy(np.float64)
        if "funding_rate" in candles.columns
        else np.full(n, np.nan)
    )
    counts: Counter[str] = Counter()
    fallback_reasons: Counter[str] = Counter()
    event_counts: Counter[str] = Counter()
    n_quarantined = 0
    n_window_held = 0
    held_by: int | None = None  # the invalid row holding the current stretch of bars (None: none)
    last_valid_atr = {"primary": math.nan, "fallback": math.nan}  # by whose ATR period
    last_kind: str | None = None  # reason kind of the previous decided bar (None: primary used)
    last_ctx: DecisionContext | None = None
    risk_state = guard.state.value if guard is not None else None

    start_events = [EventRecord(run_id, index[0] if n else pd.Timestamp(0, tz="UTC"), "run_started", {
        "bars": n, "warmup_bars": config.warmup_bars, "primary": getattr(slot.policy, "name", None),
        "fallback": getattr(fallback, "name", None), "initial_equity_usdt": config.initial_equity_usdt,
        "risk_state": risk_state, "mode": "paper",
    })]  # fmt: skip
    if slot.policy is None:
        start_events.append(
            EventRecord(run_id, start_events[0].time, "primary_unavailable", {"error": slot.load_error})
        )
    store.append(events=start_events)
    for e in start_events:
        event_counts[e.kind] += 1
    if notifier is not None:
        notifier.publish(start_events, [])

    for t in range(config.warmup_bars, n):
        ts = index[t]
        fills: list[FillRecord] = []
        events: list[EventRecord] = []
        problem = problems[t]

        # (0) between bars: hot-swap / reload of the primary
        for kind, detail in slot.poll(t, last_ctx):
            events.append(EventRecord(run_id, ts, kind, detail))

        # (1) the broker processes bar t with the decision taken at the close of t-1
        closed_trades: tuple = ()
        if problem is not None:
            n_quarantined += 1
            discarded = broker.cancel_pending()
            events.append(EventRecord(run_id, ts, "quarantine", {
                "problem": problem, "discarded_decision": _decision_detail(discarded),
            }))  # fmt: skip
            equity_usdt = broker.equity_usdt
        else:
            bar = Bar(
                open_time_ns=int(ts.value), open=float(o[t]), high=float(h[t]), low=float(lo[t]),
                close=float(c[t]), funding_rate=float(funding[t]),
                is_funding_time=is_funding_time(int(ts.value), costs.funding_interval_hours),
            )  # fmt: skip
            result = broker.on_bar(bar)
            fills = [FillRecord.from_fill(run_id, f) for f in result.fills]
            closed_trades = result.closed_trades
            if result.liquidated:
                events.append(
                    EventRecord(
                        run_id, ts, "liquidation", {"liquidation_fee_usdt": result.liquidation_fee_usdt}
                    )
                )
            if result.skipped_min_notional:
                events.append(EventRecord(run_id, ts, "skipped_min_notional", {}))
            equity_usdt = result.equity_usdt
        state = broker.state
        equity_row = EquityRecord(run_id, ts, float(equity_usdt), state.cash_usdt, state.side, state.qty_base)
        if guard is not None:
            for trade in closed_trades:
                guard.record_closed_trade(ts, trade.pnl_usdt)

        # (2)-(4) decide
        start = window_start(t, config.context_bars)
        tainted = problem is None and last_bad[t] >= start
        if problem is not None:
            choice = _Choice(_hold(state.side), "guard", f"quarantine: {problem}", None, 0.0, [])
        elif tainted:
            bad = int(last_bad[t])
            n_window_held += 1
            choice = _Choice(_hold(state.side), "guard", _window_reason(index, bad, config.context_bars), None, 0.0, [])
            if held_by != bad:
                choice.events.append(("context_window_invalid", {"invalid_row": str(index[bad]),
                                                                 "problem": problems[bad]}))
        else:
            ctx = DecisionContext(
                bar_open_time=ts,
                candles=candles.iloc[start : t + 1],
                position=broker.position_view(),
                equity_usdt=float(equity_usdt),
            )
            last_ctx = ctx
            policy, unavailable = slot.acquire(t)
            choice = _choose(ctx, policy, fallback, unavailable, config.decision_timeout_ms, clock)
            if policy is not None:
                choice.events.extend(slot.record(t, choice.primary_failure))
            if choice.source != "v2" and choice.reason is not None:
                kind = reason_kind(choice.reason)
                fallback_reasons[kind] += 1
                if last_kind is None:
                    choice.events.append(("fallback_engaged", {"reason": choice.reason}))
                last_kind = kind
            else:
                if last_kind is not None:
                    choice.events.append(("primary_recovered", {"previous_reason_kind": last_kind}))
                last_kind = None

        held_by = int(last_bad[t]) if tainted else None
        # the ATR in whose units the deciding policy meant its stop and take-profit distances
        for key, arr in (("primary", atr_arr), ("fallback", fb_atr_arr)):
            if problem is None and math.isfinite(arr[t]) and arr[t] > 0:
                last_valid_atr[key] = float(arr[t])
        atr_key = "fallback" if choice.source == "v1" else "primary"
        atr_t = float((fb_atr_arr if atr_key == "fallback" else atr_arr)[t])
        atr_ok = problem is None and math.isfinite(atr_t) and atr_t > 0
        decision = choice.decision
        opens = decision.direction != 0 and decision.direction != state.side
        if opens and not atr_ok:
            choice.events.append(
                ("entry_blocked_atr", {"atr": atr_t, "decision": _decision_detail(decision)})
            )
            decision = Decision.flat()
            choice = _Choice(
                decision, "guard",
                f"{choice.reason + '; ' if choice.reason else ''}atr_invalid: atr[t]={atr_t!r}, no new position",
                choice.raw_action, choice.latency_ms, choice.events,
            )  # fmt: skip

        # (4b) the risk guard (independent of the policy)
        if guard is not None and problem is None:
            verdict = guard.review(decision, _account_snapshot(ts, equity_usdt, state, c[t]))
            if verdict.state != risk_state:
                choice.events.append(("risk_state_changed", {
                    "from": risk_state, "to": verdict.state, "reasons": list(verdict.reasons),
                }))  # fmt: skip
                risk_state = verdict.state
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

        # (5) submit and record
        broker.submit(decision, atr_t if atr_ok else last_valid_atr[atr_key])
        counts[choice.source] += 1
        for kind, detail in choice.events:
            events.append(EventRecord(run_id, ts, kind, detail))
        for e in events:
            event_counts[e.kind] += 1
        record = DecisionRecord.from_decision(
            run_id, ts, choice.source, decision, raw_action=choice.raw_action,
            fallback_reason=choice.reason, latency_ms=choice.latency_ms, created_at=now(),
        )  # fmt: skip
        store.append(decisions=[record], fills=fills, equity=[equity_row], events=events)
        if notifier is not None:
            notifier.publish(events, fills)
        if progress is not None:
            progress(t + 1, n)

    final = broker.state
    summary = ReplaySummary(
        run_id=run_id,
        bars=max(0, n - config.warmup_bars),
        decisions_v2=counts["v2"],
        decisions_v1=counts["v1"],
        decisions_guard=counts["guard"],
        fallback_reasons=fallback_reasons,
        n_quarantined=n_quarantined,
        final_equity_usdt=broker.equity_usdt,
        n_fills=final.n_fills,
        n_trades=final.n_trades,
        fees_paid_usdt=final.fees_paid_usdt,
        funding_paid_usdt=final.funding_paid_usdt,
        slippage_paid_usdt=final.slippage_paid_usdt,
        liquidation_fees_usdt=final.liquidation_fees_usdt,
        events=event_counts,
        risk_state=risk_state,
        n_window_held=n_window_held,
    )
    end_time = index[-1] if n else pd.Timestamp(0, tz="UTC")
    end_events = [EventRecord(run_id, end_time, "run_finished", {
        "bars": summary.bars, "decisions_v2": summary.decisions_v2, "decisions_v1": summary.decisions_v1,
        "decisions_guard": summary.decisions_guard, "fallback_reasons": dict(fallback_reasons),
        "final_equity_usdt": summary.final_equity_usdt, "n_fills": summary.n_fills, "risk_state": risk_state,
        "n_quarantined": n_quarantined, "n_window_held": n_window_held,
    })]  # fmt: skip
    store.append(events=end_events)
    if notifier is not None:
        notifier.publish(end_events, [])
    summary.events["run_finished"] += 1
    return summary
