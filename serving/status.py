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

A multi-symbol run (its decisions name several symbols) shows one line per symbol (:class:`SymbolStatus`: its
latest position, its book's equity, its decisions by source, its own guard's state, scope ``symbol:<SYMBOL>``) and
the account line: the account's equity (the latest ``account_equity`` row; without one, the latest equity row,
which on an exchange is the account's), today's PnL on it, its notional and open positions, and the account
guard's state (scope ``account``). Every read goes through :class:`serving.store.StateStore` methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from serving.account_risk import ACCOUNT_SCOPE, symbol_scope
from serving.risk import DEFAULT_SCOPE
from serving.store import StateStore


@dataclass(frozen=True)
class SymbolStatus:
    """One symbol of a multi-symbol run: its latest position (side -1/0/+1, base units) and book equity (USDT; the
    sleeve in paper, the account on an exchange), decision rows by source, and its own guard's state."""

    symbol: str
    last_bar: pd.Timestamp | None
    position_side: int
    position_qty_base: float
    equity_usdt: float | None
    bars: int
    decided_v2: int
    decided_v1: int
    decided_guard: int
    decided_missed: int
    risk_state: str


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
    symbols: tuple[SymbolStatus, ...] = ()
    gross_notional_usdt: float | None = None
    n_positions: int | None = None

    def share(self, source: str) -> float:
        """Share of the run's bars decided by ``source`` ('v2', 'v1', 'guard', 'missed'); NaN without bars."""
        n = {"v2": self.decided_v2, "v1": self.decided_v1, "guard": self.decided_guard,
             "missed": self.decided_missed}[source]
        return n / self.bars if self.bars else float("nan")


def _risk(store: StateStore, scope: str) -> tuple[str, tuple[str, ...], pd.Timestamp | None]:
    """(state, reasons, since) of the guard of ``scope`` (ACTIVE when it never wrote a row)."""
    risk = store.latest_risk_state(scope)
    if risk is None:
        return "ACTIVE", (), None
    hist = store.risk_states(scope)
    changes = hist[hist.change != "update"]  # 'update' rows only move the tracker
    return risk.state, tuple(risk.reasons), changes.time.iloc[-1] if len(changes) else hist.time.iloc[0]


def _counts(decisions: pd.DataFrame) -> pd.Series:
    return decisions.source.value_counts() if len(decisions) else pd.Series(dtype=int)


def _today_pnl(times: pd.Series, values: pd.Series, initial: float | None) -> tuple[float | None, str | None]:
    """Latest value minus the last one before its UTC day (else ``initial``), and that day (ISO)."""
    if not len(values):
        return None, None
    day_start = times.iloc[-1].normalize()
    before = values[times < day_start]
    anchor = float(before.iloc[-1]) if len(before) else (None if initial is None else float(initial))
    return (None if anchor is None else float(values.iloc[-1]) - anchor), day_start.date().isoformat()


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
    counts = _counts(decisions)
    symbols = store.symbols(run_id) if run_id is not None else []
    if len(symbols) > 1:
        return _portfolio_status(store, str(run_id), decisions, equity, counts, symbols, mode, base_url, initial)
    last_bar = equity_usdt = today_pnl = day = None
    side, qty = 0, 0.0
    if len(equity):
        last = equity.iloc[-1]
        last_bar = last.bar_open_time
        equity_usdt = float(last.equity_usdt)
        side, qty = int(last.position_side), float(last.position_qty_base)
        today_pnl, day = _today_pnl(equity.bar_open_time, equity.equity_usdt, initial)
    state, reasons, since = _risk(store, scope)
    return ServeStatus(
        run_id=run_id, mode=mode, last_bar=last_bar, position_side=side, position_qty_base=qty,
        equity_usdt=equity_usdt, today_pnl_usdt=today_pnl, day=day, risk_state=state, risk_reasons=reasons,
        risk_since=since, bars=len(decisions), decided_v2=int(counts.get("v2", 0)),
        decided_v1=int(counts.get("v1", 0)), decided_guard=int(counts.get("guard", 0)),
        decided_missed=int(counts.get("missed", 0)), base_url=base_url,
    )  # fmt: skip


def _portfolio_status(store: StateStore, run_id: str, decisions: pd.DataFrame, equity: pd.DataFrame,
                      counts: pd.Series, symbols: list[str], mode: str | None, base_url: str | None,
                      initial: float | None) -> ServeStatus:
    """The status of a multi-symbol run: a line per symbol and the account's (module docstring)."""
    lines = []
    for symbol in symbols:
        mine, book = decisions[decisions.symbol == symbol], equity[equity.symbol == symbol]
        c = _counts(mine)
        last = book.iloc[-1] if len(book) else None
        lines.append(SymbolStatus(
            symbol, None if last is None else last.bar_open_time, 0 if last is None else int(last.position_side),
            0.0 if last is None else float(last.position_qty_base), None if last is None else float(last.equity_usdt),
            len(mine), int(c.get("v2", 0)), int(c.get("v1", 0)), int(c.get("guard", 0)), int(c.get("missed", 0)),
            _risk(store, symbol_scope(symbol))[0],
        ))  # fmt: skip
    account = store.account_equity(run_id)
    gross = n_open = None
    if len(account):
        times, values = account.bar_open_time, account.equity_usdt
        gross, n_open = float(account.gross_notional_usdt.iloc[-1]), int(account.n_positions.iloc[-1])
    else:  # on an exchange every symbol's row carries the account's equity
        times, values = equity.bar_open_time, equity.equity_usdt
    today_pnl, day = _today_pnl(times, values, initial)
    state, reasons, since = _risk(store, ACCOUNT_SCOPE)
    return ServeStatus(
        run_id=run_id, mode=mode, last_bar=times.iloc[-1] if len(times) else None, position_side=0,
        position_qty_base=0.0, equity_usdt=float(values.iloc[-1]) if len(values) else None, today_pnl_usdt=today_pnl,
        day=day, risk_state=state, risk_reasons=reasons, risk_since=since, bars=len(decisions),
        decided_v2=int(counts.get("v2", 0)), decided_v1=int(counts.get("v1", 0)),
        decided_guard=int(counts.get("guard", 0)), decided_missed=int(counts.get("missed", 0)), base_url=base_url,
        symbols=tuple(lines), gross_notional_usdt=gross,
        n_positions=n_open if n_open is not None else sum(1 for x in lines if x.position_side != 0),
    )  # fmt: skip
