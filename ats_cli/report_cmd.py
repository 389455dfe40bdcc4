"""``ats report --db S.sqlite --since 7d --out DIR``: an HTML report of a serving period, in the style of the
evaluation report (:func:`training.report.write_report`: notes, metrics table, equity and drawdown figure,
positions figure, monthly returns, tables, definitions).

What it holds (all read by :func:`serving.ops_data.read_period`; the window is defined there):

* the status table: the lines ``ats status`` prints for the database (the run's latest values, not the window's);
* metrics of the window: return, max drawdown, Sortino (MAR 0, annualised by the bar length; Sortino & Price
  1994, :func:`training.metric_stats.sortino_ratio`), closed trades, fees and slippage paid (the fills' own);
* equity (the account, from the window's anchor) and drawdown; positions per symbol over time;
* decisions by source (V2 / V1 / guard / missed) over the window and per UTC day (the fallback share), and why
  V1 or the guard decided (``fallback_reason`` counts);
* the trades (every fill of the window), the incidents (every event that is not bookkeeping:
  :data:`serving.ops_data.ROUTINE_EVENTS`) and the drift events when the run wrote any.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import typer
from rich.console import Console

console = Console()

REPORT_TITLE = "ats serving report"
"""Start of the report's title (the run id and the window follow)."""


def _metrics(period) -> dict[str, float]:
    from training import metric_stats as S

    curve = period.curve.to_numpy(dtype=np.float64)
    out: dict[str, float] = {"total_return": period.window_return, "max_drawdown": period.max_drawdown}
    if len(curve) >= 3 and period.bar_interval is not None and (curve > 0).all():
        out["sortino"] = S.sortino_ratio(S.returns_from_equity(curve), S.bars_per_year(period.bar_interval.total_seconds()))
    else:
        out["sortino"] = float("nan")
    fills = period.fills
    out["n_trades"] = float(period.closed_trades)
    out["fees_paid"] = float(fills.fee_usdt.sum()) if len(fills) else 0.0
    out["slippage_paid"] = float(fills.slippage_usdt.sum()) if len(fills) else 0.0
    out["n_bars"] = float(len(period.equity))
    return out


def _source_table(counts: pd.DataFrame) -> pd.DataFrame:
    """Counts and shares per row (the fallback share is the V1 + guard + missed share)."""
    total = counts.sum(axis=1)
    table = counts.copy()
    for col in counts.columns:
        table[f"{col} share"] = (counts[col] / total.where(total > 0)).map(
            lambda v: "n/a" if not np.isfinite(v) else f"{v:.1%}")
    fallback = counts.drop(columns=["v2"]).sum(axis=1) / total.where(total > 0)
    table["fallback share"] = fallback.map(lambda v: "n/a" if not np.isfinite(v) else f"{v:.1%}")
    table.insert(0, "bars", total)
    if isinstance(table.index, pd.DatetimeIndex):
        table.index = table.index.strftime("%Y-%m-%d")
    return table


def build_report(db: str, out: Path, since_text: str | None, run_id: str | None = None) -> Path:
    """Write ``out/report.html`` (and ``out/equity.png``) for ``db``'s run ``run_id`` (default: the latest) over
    the window ``since_text`` (:func:`serving.ops_data.parse_since`; None: the whole run); returns the HTML path.

    Raises
    ------
    serving.ops_data.SinceError
        ``since_text`` is not a duration or a date.
    ValueError
        The database holds no decisions (or none of ``run_id``), or the window holds no bar.
    """
    from serving.ops_data import parse_since, read_period, status_rows
    from serving.store import StateStore
    from training.report import write_report

    since = parse_since(since_text) if since_text is not None else None
    with StateStore.open(db) as store:
        period = read_period(store, run_id, since)
        shown = store.display_url if "://" in db else db
    if period.equity.empty:
        raise ValueError(f"no bar of run {period.run_id!r} in the window since {period.since} (last bar {period.until})")
    status = period.status
    window = f"{period.equity.index[0]} .. {period.until}"
    notes = [
        f"State database {shown}, run {period.run_id!r}, mode {status.mode} ({period.candles} candles); "
        f"symbols: {', '.join(period.symbols) or 'not recorded'}.",
        f"Window: bars opening {window} ({len(period.equity)} bars"
        + (f" of {period.bar_interval.total_seconds() / 60:g} min" if period.bar_interval is not None else "") + ")"
        + (f", --since {since_text}" if since_text else ", the whole run") + "; a duration counts back from the "
        "close of the last recorded bar.",
        f"Equity: the account marked at each bar's close, starting from {period.anchor_equity_usdt:,.2f} USDT "
        "(the equity before the window, or the run's initial equity).",
        "The status table shows what `ats status` shows for this database (the run's latest values); the other "
        "figures are the window's.",
    ]
    curve = period.curve.rename("account")
    positions = period.position_history()
    extra: dict[str, pd.DataFrame] = {
        "Status (as `ats status` shows it)": pd.DataFrame(status_rows(status), columns=["field", "value"]).set_index("field"),
        "Decisions by source (window)": _source_table(period.source_counts()),
        "Decisions by source per UTC day": _source_table(period.source_counts("D")),
    }
    d = period.decisions
    if len(d):
        reasons = d[d.source != "v2"].fillna({"fallback_reason": "(none)"})
        if len(reasons):
            extra["Why V1, the guard or nobody decided (fallback_reason)"] = (
                reasons.groupby(["source", "fallback_reason"]).size().rename("bars").to_frame())
    pos = period.positions.copy()
    if len(pos):
        pos["position"] = [("long" if s > 0 else "short" if s < 0 else "flat") + (f" {q:.6g}" if s else "")
                           for s, q in zip(pos.position_side, pos.position_qty_base, strict=True)]
        extra["Positions per symbol (latest)"] = pos[["symbol", "bar_open_time", "position", "equity_usdt"]].set_index("symbol")
    fills = period.fills
    if len(fills):
        cols = [c for c in ("bar_open_time", "symbol", "side", "qty_base", "price", "fee_usdt", "slippage_usdt",
                            "reason", "closes") if c in fills.columns]
        extra[f"Trades: every fill of the window ({len(fills)})"] = fills[cols].reset_index(drop=True)
    incidents = period.incidents()
    if len(incidents):
        extra["Incidents by kind"] = incidents.kind.value_counts().rename("events").to_frame()
        extra[f"Incidents ({len(incidents)})"] = pd.DataFrame({
            "time": incidents.time.to_numpy(), "kind": incidents.kind.to_numpy(),
            "detail": [str(x)[:300] for x in incidents.detail]})
    else:
        extra["Incidents"] = pd.DataFrame({"events": ["none in the window"]})
    drift = period.drift_events()
    if len(drift):
        extra[f"Drift events ({len(drift)})"] = pd.DataFrame([{"time": t, **(det or {})} for t, det in
                                                              zip(drift.time, drift.detail, strict=True)])
    else:
        extra["Drift"] = pd.DataFrame({"drift": ["no drift event in the window (none recorded, or no monitor ran)"]})
    return write_report(
        out, title=f"{REPORT_TITLE}: run {period.run_id} ({window})", equity_curves={"account": curve},
        metrics={"serving window": _metrics(period)}, notes=notes, extra_tables=extra,
        positions={str(c): np.sign(positions[c].fillna(0.0)) for c in positions.columns} or None,
    )


def report(
    db: str = typer.Option(..., "--db", help="serving state database: a SQLite file or a SQLAlchemy URL"),
    out: Path = typer.Option(..., "--out", help="report folder (report.html, equity.png)"),
    since: str = typer.Option(None, "--since", help="window: a duration back from the last bar (7d, 24h, 30m, 2w) "
                              "or an ISO date (2025-01-01, UTC); default: the whole run"),
    run_id: str = typer.Option(None, "--run-id", help="run to report (default: the latest)"),
) -> None:
    """Write an HTML report of a serving period: equity, drawdown, trades, decisions by source (fallback share),
    incidents and drift (read-only)."""
    from serving.ops_data import SinceError

    if "://" not in db and not Path(db).is_file():
        console.print(f"[red]no state database at {db}[/]")
        raise typer.Exit(code=2)
    try:
        path = build_report(db, out, since, run_id)
    except SinceError as exc:
        raise typer.BadParameter(str(exc)) from exc
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc
    console.print(f"report: {path}")
