"""What the operations views read from a serving state database: one run over a time window.

Used by ``ats report`` (the weekly HTML report), ``ats dashboard`` (the read-only web page) and the paper
protection of ``ats gate`` (the realised figures of a paper run). Everything is read through the store's own
read functions (:meth:`serving.store.StateStore.decisions`, ``equity``, ``fills``, ``events``,
``account_equity``) and :func:`serving.status.read_status`, so the figures are the ones ``ats status`` shows.

Definitions
-----------
* **Account equity** per bar (USDT, marked at the bar's close): the ``account_equity`` rows of the run when it
  has any (a multi-symbol paper run: the sum of the symbols' sleeves); otherwise the ``equity`` rows, the last
  row of each bar (one row per bar in a single-symbol run; on an exchange every symbol's row is the same
  account's equity).
* **Window**: bars whose open time is at or after ``since`` (all bars when ``since`` is None). The window's
  *anchor* is the last equity before the window (the run's initial equity from ``run_started`` when the window
  starts at the run's start); the window's return is the last equity over the anchor, minus 1.
* **Drawdown** (fraction, <= 0): equity over its running peak (the anchor included), minus 1.
* **Closed trades** of a paper run: fills that reduce or close a position (``exit_signal``, ``stop``,
  ``take_profit``, ``liquidation``, and a ``rebalance`` against the side held at the previous bar), as the env
  counts them (:func:`envs.accounting` ``FILL_REASONS``).
* **Decision sources**: 'v2', 'v1', 'guard', 'missed' (:data:`serving.store.DECISION_SOURCES`).

A ``symbol`` column, when the rows carry one (multi-symbol serving), is kept and grouped by; rows without one
are the run's single symbol.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pandas as pd

from serving.status import ServeStatus, read_status
from serving.store import DECISION_SOURCES, StateStore

__all__ = [
    "CLOSING_REASONS",
    "DRIFT_EVENT",
    "ROUTINE_EVENTS",
    "ServingPeriod",
    "SinceError",
    "closing_fills",
    "parse_since",
    "read_period",
    "resolve_since",
    "status_rows",
]

CLOSING_REASONS: frozenset[str] = frozenset({"exit_signal", "stop", "take_profit", "liquidation"})
"""Fill reasons that close (part of) a position; a ``rebalance`` closes only against the held side."""

DRIFT_EVENT = "drift"
"""Kind of the events the drift monitor writes (:mod:`serving.drift`)."""

ROUTINE_EVENTS: frozenset[str] = frozenset({
    "run_started", "run_finished", "live_started", "min_hold", "plan_notes", "guard_verdict", "equity_recorded_late",
    "bundle_identity",
})  # fmt: skip
"""Event kinds that are bookkeeping, not incidents (the report lists every other kind as an incident)."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$", re.IGNORECASE)
_UNIT = {"m": "min", "h": "h", "d": "D", "w": "W"}


class SinceError(ValueError):
    """A ``--since`` value that is neither a duration (``7d``, ``24h``, ``30m``, ``2w``) nor an ISO date."""


def parse_since(text: str) -> pd.Timedelta | pd.Timestamp:
    """Parse ``--since``: a duration ``N`` + ``m``/``h``/``d``/``w`` (minutes, hours, days, weeks; e.g. ``7d``,
    ``24h``, ``1.5d``) or an ISO-8601 date/time (``2025-01-01``, ``2025-01-01T12:00``; naive means UTC).

    Returns
    -------
    pandas.Timedelta | pandas.Timestamp
        A positive duration (resolved against the last bar by :func:`resolve_since`) or a tz-aware UTC time.

    Raises
    ------
    SinceError
        Empty text, a zero duration, an unknown unit or an unparseable date (the message shows the accepted forms).
    """
    forms = "a duration such as 7d, 24h, 30m, 2w, or an ISO date such as 2025-01-01 or 2025-01-01T12:00 (UTC)"
    if not isinstance(text, str) or not text.strip():
        raise SinceError(f"--since is empty: give {forms}")
    m = _DURATION.match(text)
    if m:
        delta = pd.Timedelta(float(m.group(1)), unit=_UNIT[m.group(2).lower()])
        if delta <= pd.Timedelta(0):
            raise SinceError(f"--since {text!r} is a zero duration: give {forms}")
        return delta
    if re.match(r"^\s*\d+(?:\.\d+)?\s*[a-zA-Z]+\s*$", text):
        raise SinceError(f"--since {text!r}: unknown duration unit (m, h, d or w); give {forms}")
    try:
        ts = pd.Timestamp(text.strip())
    except (ValueError, TypeError) as exc:
        raise SinceError(f"--since {text!r} is not {forms}") from exc
    if pd.isna(ts):
        raise SinceError(f"--since {text!r} is not {forms}")
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def resolve_since(since: pd.Timedelta | pd.Timestamp | None, last_bar: pd.Timestamp | None,
                  bar_interval: pd.Timedelta | None) -> pd.Timestamp | None:
    """The first bar open time of the window: a duration counts back from the close of the last recorded bar
    (``last_bar + bar_interval``; the last bar's open when the interval is unknown), so ``7d`` of a replay is its
    last 7 days, not the wall clock's; a time is used as given; None is the whole run."""
    if since is None or isinstance(since, pd.Timestamp):
        return since
    if last_bar is None:
        return None
    end = last_bar + (bar_interval if bar_interval is not None else pd.Timedelta(0))
    return end - since


@dataclass(frozen=True)
class ServingPeriod:
    """One run of a state database over a window (money in USDT, times tz-aware UTC bar open times).

    Attributes
    ----------
    status : ServeStatus
        What ``ats status`` shows for the run (the whole run, not the window).
    since : pandas.Timestamp | None
        First bar of the window (None: the whole run); ``until`` the last bar recorded.
    bar_interval : pandas.Timedelta | None
        The median spacing of the run's bars (None with fewer than 2 bars).
    equity : pandas.Series
        Account equity per bar of the window (float64, USDT, index = bar open time); see the module docstring.
    anchor_equity_usdt : float | None
        The equity the window starts from (last before the window, else the run's initial equity).
    decisions, fills, events : pandas.DataFrame
        The run's rows of the window, as the store returns them (``symbol`` column kept when present); ``fills``
        has one more boolean column ``closes`` (:func:`closing_fills`).
    equity_rows : pandas.DataFrame
        The run's per-symbol ``equity`` rows of the window (positions over time).
    positions : pandas.DataFrame
        The latest equity row of each symbol of the run: ``symbol, bar_open_time, position_side,
        position_qty_base, equity_usdt``.
    symbols : tuple[str, ...]
        The run's symbols (from the rows' ``symbol`` column, else the run_started event's, else empty).
    start_detail : dict
        The ``detail`` of the run's last ``run_started``/``live_started`` event (empty when none).
    """

    status: ServeStatus
    since: pd.Timestamp | None
    until: pd.Timestamp | None
    bar_interval: pd.Timedelta | None
    equity: pd.Series
    anchor_equity_usdt: float | None
    decisions: pd.DataFrame
    fills: pd.DataFrame
    events: pd.DataFrame
    equity_rows: pd.DataFrame
    positions: pd.DataFrame
    symbols: tuple[str, ...]
    start_detail: dict

    @property
    def run_id(self) -> str | None:
        """The run shown."""
        return self.status.run_id

    @property
    def candles(self) -> str:
        """Where the run's candles came from: 'live' (paper on live candles), 'exchange' (testnet/live trading),
        'replay' (a candle file)."""
        if self.start_detail.get("candles") == "live":
            return "live"
        if self.status.mode in ("testnet", "live"):
            return "exchange"
        return "replay"

    @property
    def window_return(self) -> float:
        """Last equity over the anchor, minus 1 (NaN without equity or anchor)."""
        if self.equity.empty or not self.anchor_equity_usdt:
            return math.nan
        return float(self.equity.iloc[-1]) / self.anchor_equity_usdt - 1.0

    @property
    def curve(self) -> pd.Series:
        """The anchor followed by the window's equity (the anchor at ``since`` minus one bar, or at the first bar's
        time minus one bar): the curve returns and drawdowns are computed on."""
        if self.equity.empty:
            return self.equity
        if self.anchor_equity_usdt is None:
            return self.equity
        step = self.bar_interval if self.bar_interval is not None else pd.Timedelta(0)
        t0 = self.equity.index[0] - step
        if t0 in self.equity.index:  # no interval known: keep the index unique
            return self.equity
        return pd.concat([pd.Series([self.anchor_equity_usdt], index=[t0]), self.equity]).astype("float64")

    @property
    def drawdown(self) -> pd.Series:
        """Drawdown per bar of :attr:`curve` (fraction <= 0)."""
        c = self.curve
        return c / c.cummax() - 1.0 if len(c) else c

    @property
    def max_drawdown(self) -> float:
        """Largest drawdown of the window as a positive fraction (0 without equity)."""
        dd = self.drawdown
        return float(-dd.min()) if len(dd) else 0.0

    def source_counts(self, freq: str | None = None) -> pd.DataFrame:
        """Decisions of the window by source: one row (``freq`` None) or one row per period of ``freq``
        (``"D"``: UTC day, ``"h"``: hour), columns :data:`DECISION_SOURCES` (+ ``symbol`` grouping when the run
        has several symbols: a MultiIndex of (period, symbol) rows)."""
        d = self.decisions
        cols = list(DECISION_SOURCES)
        if d.empty:
            return pd.DataFrame(columns=cols, dtype="int64")
        keys = []
        if freq is not None:
            keys.append(d.bar_open_time.dt.tz_convert("UTC").dt.floor(freq).rename("period"))
        if "symbol" in d.columns and d.symbol.nunique() > 1:
            keys.append(d.symbol)
        if not keys:
            counts = d.source.value_counts()
            return pd.DataFrame([[int(counts.get(c, 0)) for c in cols]], columns=cols, index=["all"])
        table = d.groupby([*keys, d.source]).size().unstack("source", fill_value=0)
        return table.reindex(columns=cols, fill_value=0).astype("int64")

    @property
    def closed_trades(self) -> int:
        """Number of closed trades in the window (module docstring)."""
        return int(self.fills.closes.sum()) if len(self.fills) else 0

    def position_history(self) -> pd.DataFrame:
        """Signed position (base units, short < 0) per bar of the window: rows = bar open time, columns = symbols
        (one column named after the run's symbol, or ``position``, for a run whose rows carry no symbol)."""
        e = self.equity_rows
        if e.empty:
            return pd.DataFrame(index=pd.DatetimeIndex([], tz="UTC"))
        key = e.symbol if "symbol" in e.columns else pd.Series(self.symbols[0] if self.symbols else "position",
                                                               index=e.index)
        signed = (e.position_side * e.position_qty_base).astype("float64")
        frame = pd.DataFrame({"t": e.bar_open_time, "symbol": key, "q": signed})
        return frame.pivot_table(index="t", columns="symbol", values="q", aggfunc="last").rename_axis(
            index="bar_open_time", columns=None)

    def drift_events(self) -> pd.DataFrame:
        """The window's drift events (``kind == 'drift'``), insertion order."""
        e = self.events
        return e[e.kind == DRIFT_EVENT] if len(e) else e

    def incidents(self) -> pd.DataFrame:
        """The window's events that are not routine bookkeeping (:data:`ROUTINE_EVENTS`)."""
        e = self.events
        return e[~e.kind.isin(ROUTINE_EVENTS)] if len(e) else e


_SIDE = {1: "long", -1: "short", 0: "flat"}


def status_rows(s: ServeStatus) -> list[tuple[str, str]]:
    """The (field, value) lines of ``ats status`` as plain text, formatted as the command formats them (money
    ``9,192.51 USDT``, shares ``70.8%``, position ``short 0.369``): the report and the dashboard show these."""

    def money(x: float | None) -> str:
        return "n/a" if x is None else f"{x:,.2f} USDT"

    def pct(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.1%}"

    rows = [("run", str(s.run_id)), ("mode", str(s.mode))]
    if s.base_url:
        rows.append(("exchange URL", s.base_url))
    rows += [
        ("last bar", str(s.last_bar)),
        ("position", f"{_SIDE[s.position_side]} {s.position_qty_base:.6g}" if s.position_side else "flat"),
        ("equity", money(s.equity_usdt)),
        (f"today's PnL ({s.day} UTC)", money(s.today_pnl_usdt)),
        ("risk state", s.risk_state + (f" since {s.risk_since}" if s.risk_since is not None else "")),
    ]
    rows += [("risk reason", r) for r in s.risk_reasons]
    rows += [
        ("bars decided", str(s.bars)),
        ("decided by V2", f"{s.decided_v2} ({pct(s.share('v2'))})"),
        ("decided by V1", f"{s.decided_v1} ({pct(s.share('v1'))})"),
        ("decided by guard", f"{s.decided_guard} ({pct(s.share('guard'))})"),
    ]
    if s.decided_missed:
        rows.append(("missed (no decision)", f"{s.decided_missed} ({pct(s.share('missed'))})"))
    return rows


def closing_fills(fills: pd.DataFrame) -> pd.Series:
    """Boolean mask of the fills that close (part of) a position: the closing reasons (:data:`CLOSING_REASONS`),
    plus each ``rebalance`` against the side held before it (the signed position is rebuilt per symbol from the
    fills in order, so ``fills`` must hold the run's fills from its start)."""
    mask = fills.reason.isin(CLOSING_REASONS) if len(fills) else pd.Series(dtype=bool)
    if fills.empty or "rebalance" not in set(fills.reason):
        return mask
    sym = fills.symbol if "symbol" in fills.columns else pd.Series("", index=fills.index)
    held: dict[str, float] = {}
    out = mask.copy()
    for i, s, side, qty, reason in zip(fills.index, sym, fills.side, fills.qty_base, fills.reason, strict=True):
        before = held.get(s, 0.0)
        if reason == "rebalance" and before != 0.0 and (side > 0) != (before > 0):
            out.loc[i] = True
        after = before + float(side) * float(qty)
        held[s] = 0.0 if abs(after) < 1e-12 else after
    return out


def _account_equity(store: StateStore, run_id: str, equity_rows: pd.DataFrame) -> pd.Series:
    account = store.account_equity(run_id) if hasattr(store, "account_equity") else pd.DataFrame()
    rows = account if len(account) else equity_rows
    if rows.empty:
        return pd.Series(dtype="float64", index=pd.DatetimeIndex([], tz="UTC"))
    per_bar = rows.groupby("bar_open_time", sort=True).equity_usdt.last()
    per_bar.index.name = "bar_open_time"
    return per_bar.astype("float64")


def read_period(store: StateStore, run_id: str | None = None, since: pd.Timedelta | pd.Timestamp | None = None
                ) -> ServingPeriod:  # fmt: skip
    """Read run ``run_id`` (default: the run of the latest decision, as ``ats status``) over the window ``since``
    (:func:`parse_since`'s value; None: the whole run).

    Raises
    ------
    ValueError
        ``run_id`` has no decisions, or the database holds no decisions at all (nothing to show).
    """
    status = read_status(store, run_id)
    if status.run_id is None:
        raise ValueError(f"{store.display_url} holds no decisions: nothing has been served yet")
    rid = status.run_id
    decisions, fills, events = store.decisions(rid), store.fills(rid), store.events(rid)
    fills = fills.assign(closes=closing_fills(fills).astype(bool)) if len(fills) else fills.assign(closes=False)
    equity_rows = store.equity(rid)
    equity_all = _account_equity(store, rid, equity_rows)
    spacing = equity_all.index.to_series().diff().dropna() if len(equity_all) > 1 else pd.Series(dtype=object)
    bar_interval = pd.Timedelta(spacing.median()) if len(spacing) else None
    start = resolve_since(since, equity_all.index[-1] if len(equity_all) else status.last_bar, bar_interval)
    started = events[events.kind.isin(["run_started", "live_started"])] if len(events) else events
    start_detail = dict(started.detail.iloc[-1] or {}) if len(started) else {}
    initial = start_detail.get("initial_equity_usdt")
    if start is None:
        window, anchor = equity_all, (None if initial is None else float(initial))
    else:
        window = equity_all[equity_all.index >= start]
        before = equity_all[equity_all.index < start]
        anchor = float(before.iloc[-1]) if len(before) else (None if initial is None else float(initial))
    if anchor is None and len(window):
        anchor = float(window.iloc[0])

    def clip(df: pd.DataFrame, col: str) -> pd.DataFrame:
        return df if start is None or df.empty else df[df[col] >= start]

    if len(equity_rows):
        key = equity_rows.symbol if "symbol" in equity_rows.columns else pd.Series("", index=equity_rows.index)
        last = equity_rows.groupby(key, sort=True).tail(1)
        positions = last.assign(symbol=key.loc[last.index].to_numpy())[
            ["symbol", "bar_open_time", "position_side", "position_qty_base", "equity_usdt"]].reset_index(drop=True)
    else:
        positions = pd.DataFrame(columns=["symbol", "bar_open_time", "position_side", "position_qty_base",
                                          "equity_usdt"])
    if "symbol" in decisions.columns and len(decisions):
        symbols = tuple(sorted(str(s) for s in decisions.symbol.unique()))
    else:
        one = start_detail.get("symbol")
        symbols = () if one is None else (str(one),)
    return ServingPeriod(
        status=status, since=start, until=equity_all.index[-1] if len(equity_all) else status.last_bar,
        bar_interval=bar_interval, equity=window, anchor_equity_usdt=anchor,
        decisions=clip(decisions, "bar_open_time"), fills=clip(fills, "bar_open_time"), events=clip(events, "time"),
        equity_rows=clip(equity_rows, "bar_open_time"), positions=positions, symbols=symbols, start_detail=start_detail,
    )
