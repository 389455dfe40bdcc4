"""What ``ats status --db STATE`` shows: read-only summary of a serving state database.

Everything is derived from the append-only tables of :class:`serving.store.StateStore`:

* run: the run of the latest decision row (or the one asked for); its mode from the ``mode`` of
  its ``run_started`` (paper/replay loop; ``paper`` when absent) or ``live_started`` (testnet/live
  loop) event, and so is the exchange ``base_url`` when the run was pointed at one (``--base-url``);
* position and equity: its latest ``equity`` snapshot (marked at that bar's close);
* today's PnL: latest equity minus the equity at the end of the previous UTC day (the last
  snapshot before the day of the latest snapshot; the run's initial equity if the run started
  that day). "Today" is the UTC day of the latest *bar*, not of the wall clock, so a replay
  reports its last replayed day;
* risk state: the latest ``risk_state`` row of the scope (ACTIVE when the guard never wrote one),
  "since" the last row that changed the state or its reasons;
* share of bars decided by V2, V1 and the guard, and of bars 'missed' (no decision at the bar's
  close, recorded afterwards by the live loop): decision rows by ``source`` / all rows of the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from serving.risk import DEFAULT_SCOPE
from serving.store import StateStore


@dataclass(frozen=True)
class ServeStatus:
    """Summary of one run in a state database (money in USDT, shares in [0, 1])."""

    run_id: str | None
    mode: str | None
    last_bar: pd.Timestamp | None
    position_side: int
    position_qty_base: float
    equity_usdt: float | None
    today_pnl_usdt: float | None
    day: str | None
    risk_state: str
    risk_reasons: tuple[str, ...]
    risk_since: pd.Timestamp | None
    bars: int
    decided_v2: int
    decided_v1: int
    decided_guard: int
    decided_missed: int = 0
    base_url: str | None = None

    def share(self, source: str) -> float:
        """Share of the run's bars decided by ``source`` ('v2', 'v1', 'guard', 'missed'); NaN without bars."""
        n = {"v2": self.decided_v2, "v1": self.decided_v1, "guard": self.decided_guard,
             "missed": self.decided_missed}[source]
        return n / self.bars if self.bars else float("nan")


def read_status(store: StateStore, run_id: str | None = None, *, scope: str = DEFAULT_SCOPE) -> ServeStatus:
    """Summarise ``run_id`` (default: the run of the latest decision) in ``store``.

    Raises
    ------
    ValueError
        If ``run_id`` is given but has no rows.
    """
    decisions = store.decisions(run_id)
    if run_id is None and len(decisions):
        run_id = str(decisions.run_id.iloc[-1])
        decisions = decisions[decisions.run_id == run_id]
    elif run_id is not None and not len(decisions):
        raise ValueError(f"run {run_id!r} has no decisions in {store.url}")
    equity = store.equity(run_id) if run_id is not None else store.equity().iloc[0:0]
    events = store.events(run_id) if run_id is not None else store.events().iloc[0:0]
    # the replay/paper loop writes run_started, the testnet/live loop live_started
    started = events[events.kind.isin(["run_started", "live_started"])]
    mode = base_url = None
    initial = None
    if len(started):
        detail = started.detail.iloc[-1] or {}
        mode = detail.get("mode", "paper" if started.kind.iloc[-1] == "run_started" else None)
        initial = detail.get("initial_equity_usdt")
        base_url = detail.get("base_url")
    last_bar = equity_usdt = today_pnl = day = None
    side, qty = 0, 0.0
    if len(equity):
        last = equity.iloc[-1]
        last_bar = last.bar_open_time
        equity_usdt = float(last.equity_usdt)
        side, qty = int(last.position_side), float(last.position_qty_base)
        day_start = last_bar.normalize()
        before = equity[equity.bar_open_time < day_start]
        anchor = (
            float(before.equity_usdt.iloc[-1])
            if len(before)
            else (None if initial is None else float(initial))
        )
        today_pnl = None if anchor is None else equity_usdt - anchor
        day = day_start.date().isoformat()
    risk = store.latest_risk_state(scope)
    risk_since = None
    if risk is not None:
        hist = store.risk_states(scope)
        changes = hist[hist.change != "update"]  # 'update' rows only move the tracker
        risk_since = changes.time.iloc[-1] if len(changes) else hist.time.iloc[0]
    counts = decisions.source.value_counts() if len(decisions) else pd.Series(dtype=int)
    return ServeStatus(
        run_id=run_id, mode=mode, last_bar=last_bar, position_side=side, position_qty_base=qty,
        equity_usdt=equity_usdt, today_pnl_usdt=today_pnl, day=day,
        risk_state="ACTIVE" if risk is None else risk.state,
        risk_reasons=() if risk is None else tuple(risk.reasons),
        risk_since=risk_since,
        bars=len(decisions), decided_v2=int(counts.get("v2", 0)), decided_v1=int(counts.get("v1", 0)),
        decided_guard=int(counts.get("guard", 0)), decided_missed=int(counts.get("missed", 0)), base_url=base_url,
    )  # fmt: skip
