"""``ats status --db STATE`` (mode, position, equity, today's PnL, risk state, V2/V1 shares), and the
``ats serve reset-risk``, ``ats serve accept-position`` and ``ats serve reload`` commands (registered
in :mod:`ats_cli.serve_cmd`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()

_SIDE = {1: "long", -1: "short", 0: "flat"}


def status(
    db: str = typer.Option(..., "--db", help="serving state database: a SQLite file or a SQLAlchemy URL"),
    run_id: str = typer.Option(None, "--run-id", help="run to show (default: the latest)"),
) -> None:
    """Print the state of a serving database (read-only)."""
    from serving.status import read_status
    from serving.store import StateStore

    if "://" not in db and not Path(db).is_file():
        console.print(f"[red]no state database at {db}[/]")
        raise typer.Exit(code=2)
    with StateStore.open(db) as store:
        try:
            s = read_status(store, run_id)
        except ValueError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(code=2) from exc
        shown = store.display_url if "://" in db else db
        drift = _drift_line(store, s.run_id)
    table = Table(title=f"ats status: {shown}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")

    def money(x: float | None) -> str:
        return "n/a" if x is None else f"{x:,.2f} USDT"

    def pct(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.1%}"

    risk_style = {"ACTIVE": "green", "REDUCING": "yellow", "HALTED": "bold red"}.get(s.risk_state, "")
    table.add_row("run", str(s.run_id))
    table.add_row("mode", str(s.mode))
    if s.base_url:
        table.add_row("exchange URL", s.base_url)
    table.add_row("last bar", str(s.last_bar))
    if s.symbols:  # a multi-symbol run: one line per symbol, then the account
        for x in s.symbols:
            pos = f"{_SIDE[x.position_side]} {x.position_qty_base:.6g}" if x.position_side else "flat"
            table.add_row(f"{x.symbol}", f"{pos}; book {money(x.equity_usdt)}; {x.bars} bars (V2 {x.decided_v2}, "
                          f"V1 {x.decided_v1}, guard {x.decided_guard}" + (f", missed {x.decided_missed}"
                          if x.decided_missed else "") + f"); risk {x.risk_state}")
        table.add_row("account", f"equity {money(s.equity_usdt)}; {s.n_positions} open position(s)"
                      + (f"; notional {money(s.gross_notional_usdt)}" if s.gross_notional_usdt is not None else ""))
    else:
        table.add_row(
            "position", f"{_SIDE[s.position_side]} {s.position_qty_base:.6g}" if s.position_side else "flat"
        )
        table.add_row("equity", money(s.equity_usdt))
    table.add_row(f"today's PnL ({s.day} UTC)", money(s.today_pnl_usdt))
    table.add_row(
        "account risk state" if s.symbols else "risk state",
        f"[{risk_style}]{s.risk_state}[/]" + (f" since {s.risk_since}" if s.risk_since is not None else ""),
    )
    for r in s.risk_reasons:
        table.add_row("", r)
    table.add_row("bars decided", str(s.bars))
    table.add_row("decided by V2", f"{s.decided_v2} ({pct(s.share('v2'))})")
    table.add_row("decided by V1", f"{s.decided_v1} ({pct(s.share('v1'))})")
    table.add_row("decided by guard", f"{s.decided_guard} ({pct(s.share('guard'))})")
    if s.decided_missed:
        table.add_row("missed (no decision)", f"{s.decided_missed} ({pct(s.share('missed'))})")
    table.add_row("drift", drift)
    console.print(table)


def _drift_line(store, run_id: str | None) -> str:
    """The latest drift evaluation of the run (statistic, threshold, action taken; :mod:`serving.drift`)."""
    from serving.drift import drift_status_line

    line = None if run_id is None else drift_status_line(store.events(run_id))
    return "no drift evaluation recorded" if line is None else line


def reset_risk(
    db: str = typer.Option(..., "--db", help="serving state database: a SQLite file or a SQLAlchemy URL"),
    scope: str = typer.Option("default", "--scope", help="risk-guard scope (account/symbol)"),
    note: str = typer.Option(..., "--note", help="who resets and why (recorded)"),
) -> None:
    """Reset a HALTED/REDUCING risk guard to ACTIVE (the only way out of a kill switch)."""
    from serving.risk import reset_risk as _reset
    from serving.store import StateStore

    if "://" not in db and not Path(db).is_file():
        console.print(f"[red]no state database at {db}[/]")
        raise typer.Exit(code=2)
    with StateStore.open(db) as store:
        before = store.latest_risk_state(scope)
        _reset(store, scope=scope, note=note)
    if before is None:
        was = "ACTIVE (no history)"
    else:
        was = before.state + (f": {'; '.join(before.reasons)}" if before.reasons else "")
    console.print(f"risk guard [bold]{scope}[/] reset to [green]ACTIVE[/] (was {was})")


def _market_id(symbol: str) -> str:
    """``BTC/USDT:USDT`` or ``BTCUSDT`` -> ``BTCUSDT`` (the id the position rows are stored under)."""
    return symbol.split(":")[0].replace("/", "").upper()


def accept_position(
    db: str = typer.Option(..., "--db", help="serving state database: a SQLite file or a SQLAlchemy URL"),
    note: str = typer.Option(..., "--note", help="who accepts and why (recorded)"),
    symbol: str = typer.Option(None, "--symbol", help="symbol (BTC/USDT:USDT or BTCUSDT); default: the one blocked"),
) -> None:
    """Accept the exchange's position of an unreconciled symbol: the live loop adopts it as its new
    reference at its next bar (or next start), recorded with the note, and trading resumes."""
    from datetime import UTC, datetime

    import pandas as pd

    from serving.store import StateStore

    if "://" not in db and not Path(db).is_file():
        console.print(f"[red]no state database at {db}[/]")
        raise typer.Exit(code=2)
    with StateStore.open(db) as store:
        blocked = store.blocked_symbols()
        if symbol is None and len(blocked) != 1:
            console.print("[red]no unreconciled position: nothing to accept[/]" if not blocked else
                          f"[red]several unreconciled symbols {blocked}: choose one with --symbol[/]")
            raise typer.Exit(code=2)
        target = _market_id(symbol) if symbol is not None else blocked[0]
        try:
            request = store.request_position_accept(target, note, pd.Timestamp(datetime.now(UTC)))
        except ValueError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(code=2) from exc
    console.print(f"accept requested for [bold]{target}[/] (exchange position last seen: {request.seen_signed_qty:+.6g} "
                  "base); the live loop adopts the exchange position at its next bar or start")


def migrate_db(
    db: str = typer.Option(..., "--db", help="serving state database: a SQLite file or a SQLAlchemy URL"),
    symbol: str = typer.Option(..., "--symbol", help="the symbol its runs traded (BTC/USDT:USDT or BTCUSDT): every "
                               "existing decision, fill and equity row is recorded as this symbol"),
) -> None:
    """Add the per-symbol columns to a state database written before multi-symbol serving (schema 1)."""
    from serving.store import migrate_symbol_column

    try:
        altered = migrate_symbol_column(db, _market_id(symbol))
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc
    if altered:
        console.print(f"migrated {db}: tables {', '.join(altered)} now have a symbol column (rows: {_market_id(symbol)})")
    else:
        console.print(f"{db} already has the symbol columns: nothing to do")


def reload(
    db: Annotated[Path, typer.Option("--db", help="state database of the running `ats serve`")],
    bundle: Annotated[Path, typer.Option("--bundle", help="bundle directory to validate and swap in")],
) -> None:
    """Ask the running serving loop to validate ``--bundle`` and swap it in between bars."""
    from serving.hotswap import reload_request_path, request_reload

    try:
        path = request_reload(reload_request_path(db), bundle)
    except FileNotFoundError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc
    console.print(f"reload requested: {bundle} (request file {path}); the loop validates it before the next bar")
