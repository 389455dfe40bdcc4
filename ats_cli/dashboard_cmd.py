"""``ats dashboard --db S.sqlite [--port 8050] [--host 127.0.0.1]``: the read-only web page of a serving state
database (:mod:`serving.dashboard`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()


def dashboard(
    db: str = typer.Option(..., "--db", help="serving state database: a SQLite file or a SQLAlchemy URL"),
    port: int = typer.Option(8050, "--port", min=0, max=65535, help="TCP port (0: any free port)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (loopback unless --allow-remote)"),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="allow a non-loopback --host (the page has no "
                                      "login: anyone who reaches the port sees positions and equity)"),
    refresh_s: int = typer.Option(30, "--refresh-s", min=1, help="reload period of the page while the run goes, s"),
    run_id: str = typer.Option(None, "--run-id", help="run to show (default: the latest)"),
) -> None:
    """Serve a read-only web dashboard of a serving database: equity and drawdown, positions, decisions by source,
    risk state and kill switches, drift, last events (Ctrl-C stops it)."""
    from serving.dashboard import Dashboard, RemoteBindError, make_dashboard_server

    if "://" not in db and not Path(db).is_file():
        console.print(f"[red]no state database at {db}[/]")
        raise typer.Exit(code=2)
    try:
        server = make_dashboard_server(Dashboard(db, run_id=run_id, refresh_s=refresh_s), host, port,
                                       allow_remote=allow_remote)
    except RemoteBindError as exc:
        raise typer.BadParameter(str(exc), param_hint="--host") from exc
    except OSError as exc:
        console.print(f"[red]cannot listen on {host}:{port}: {exc}[/]")
        raise typer.Exit(code=2) from exc
    shown = f"[{host}]" if ":" in host else host
    console.print(f"dashboard of {db}: http://{shown}:{server.server_port}/  (read-only; Ctrl-C stops it)")
    if allow_remote:
        console.print(f"[yellow]listening on {host}: anyone who reaches this port sees the page (no login)[/]")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
