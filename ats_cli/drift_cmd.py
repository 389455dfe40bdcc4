"""``ats serve reset-drift --db STATE --note "..."``: end the drift monitor's ``v1`` mode (registered in
:mod:`ats_cli.serve_cmd`; :func:`serving.drift_watch.reset_drift`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()


def reset_drift(
    db: str = typer.Option(..., "--db", help="serving state database: a SQLite file or a SQLAlchemy URL"),
    note: str = typer.Option(..., "--note", help="who resets and why (recorded)"),
    run_id: str = typer.Option(None, "--run-id", help="the run (default: the one of the latest decision)"),
    symbol: str = typer.Option(None, "--symbol", help="one symbol (BTCUSDT); default: every symbol V1 serves for drift"),
) -> None:
    """Let the bundle decide again where a drift breach put V1 in charge (the only way out; recorded). A running
    loop reads the reset before its next decision; a loop started later starts on the bundle."""
    from serving.drift_watch import reset_drift as _reset
    from serving.store import StateStore

    if "://" not in db and not Path(db).is_file():
        console.print(f"[red]no state database at {db}[/]")
        raise typer.Exit(code=2)
    with StateStore.open(db) as store:
        if run_id is None:
            decisions = store.decisions()
            if not len(decisions):
                console.print(f"[red]{db} holds no run[/]")
                raise typer.Exit(code=2)
            run_id = str(decisions.run_id.iloc[-1])
        market = None if symbol is None else symbol.split(":")[0].replace("/", "").upper()
        try:
            done = _reset(store, run_id, note=note, symbol=market)
        except ValueError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(code=2) from exc
    if not done:
        console.print(f"run {run_id}: no symbol is in the drift monitor's V1 mode"
                      + (f" for {market}" if market else "") + ": nothing to reset")
        return
    console.print(f"run {run_id}: drift V1 mode reset for {', '.join(done)}; the bundle decides again")
