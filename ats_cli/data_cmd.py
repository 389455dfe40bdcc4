"""``ats data``: download candles and funding with ccxt into the parquet store, and check data files."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Market data: download (ccxt) and check.")
console = Console()


class GapPolicyOption(str, Enum):
    """What ``ats data`` does with missing bars: fail, or mark them as gaps."""

    error = "error"
    mark = "mark"


@app.command()
def download(
    symbol: str = typer.Option(..., "--symbol", help="unified ccxt symbol, e.g. BTC/USDT:USDT"),
    since: str = typer.Option(..., "--since", help="first open time wanted (UTC), e.g. 2019-01-01"),
    exchange: str = typer.Option("binanceusdm", "--exchange", help="ccxt exchange id (binanceusdm)"),
    timeframe: str = typer.Option("1h", "--timeframe", help="bar interval, e.g. 1m, 15m, 1h, 4h, 1d"),
    until: str = typer.Option(None, "--until", help="end (exclusive) of open times (UTC); default: now"),
    store: Path = typer.Option(Path("data"), "--store", help="root folder of the parquet store"),
    testnet: bool = typer.Option(False, "--testnet", help="use the exchange's testnet (ccxt sandbox mode)"),
    funding: bool = typer.Option(True, "--funding/--no-funding", help="also download the funding-rate history"),
    api_url: str = typer.Option(None, "--api-url", help="send every request to this base URL (a local test server)"),
    timeout_ms: int = typer.Option(10_000, "--timeout-ms", help="HTTP timeout per request, ms"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Fetch OHLCV and funding history into STORE/<market>/<SYMBOL>-<timeframe>.parquet (resumable)."""
    from pydantic import ValidationError

    from market.ingest import DownloadConfig, DownloadProgress, IngestError
    from market.ingest import download as run_download

    try:
        cfg = DownloadConfig(
            exchange_id=exchange, symbol=symbol, timeframe=timeframe, since=since, until=until,
            store_dir=str(store), testnet=testnet, api_url=api_url, funding=funding, timeout_ms=timeout_ms,
        )
    except ValidationError as exc:
        lines = [f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()]
        console.print("[bold red]invalid arguments[/]\n  " + "\n  ".join(lines))
        raise typer.Exit(2) from None

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[span]}"),
        TextColumn("{task.fields[rows]:,} rows"), TimeElapsedColumn(), console=console, disable=quiet,
    )
    tasks: dict[str, TaskID] = {}

    def on_progress(p: DownloadProgress) -> None:
        total = max((p.target_end - p.target_start).total_seconds(), 1.0)
        done = (p.last - p.target_start).total_seconds() if p.last is not None else 0.0
        if p.kind not in tasks:
            tasks[p.kind] = progress.add_task(f"{p.symbol} {p.kind}", total=total, span="", rows=0)
        span = f"{p.first:%Y-%m-%d %H:%M} .. {p.last:%Y-%m-%d %H:%M}" if p.first is not None else "-"
        progress.update(tasks[p.kind], completed=min(done, total), span=span, rows=p.rows)

    try:
        with progress:
            result = run_download(cfg, on_progress=on_progress)
    except (IngestError, ValueError) as exc:
        console.print(f"[bold red]download failed[/]: {exc}")
        raise typer.Exit(1) from None
    for name, series in (("candles", result.candles), ("funding", result.funding)):
        if series is None:
            continue
        span = f"{series.first} .. {series.last}" if series.first is not None else "nothing new"
        console.print(
            f"{name}: {series.path}  {series.rows_total:,} rows (+{series.rows_added:,} new, "
            f"{series.rows_replaced} replaced, {series.duplicate_rows} duplicates merged, "
            f"{series.open_rows_dropped} still-open dropped) fetched {span} in {series.pages} pages"
        )
    console.print(f"cut-off {result.cutoff}; {result.retries} retries")
    if result.spec_path is not None:
        console.print(f"instrument spec: {result.spec_path}")
    if result.spec_note:
        console.print(f"[yellow]{result.spec_note}[/]")


def _ts(t) -> str:
    import pandas as pd

    return f"{pd.Timestamp(t):%Y-%m-%d %H:%M}"


def _report_table(report, gap_policy: str) -> Table:
    status = "[bold green]OK[/]" if report.ok else "[bold red]FAIL[/]"
    table = Table(title=f"{report.source}  ({report.kind})  {status}", title_justify="left", show_lines=False)
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("rule")
    table.add_column("first rows / detail", overflow="fold")
    span = f"{_ts(report.first)} .. {_ts(report.last)} UTC" if report.first is not None else "-"
    table.add_row("span", span, "", "")
    interval = f"every {report.interval}" if report.interval is not None else ""
    table.add_row("rows", f"{report.rows:,}", "", interval)
    gap = report.largest_gap
    table.add_row(
        "largest gap", f"{gap.missing_bars:,} bars" if gap else "-", "",
        f"{_ts(gap.after)} -> {_ts(gap.before)}" if gap else "",
    )
    for f in report.findings:
        kind = "hard" if f.hard else "soft"
        mark = "[red]FAIL[/]" if f.failed else ("[yellow]warn[/]" if f.count else "ok")
        detail = ", ".join(_ts(e) if e[:1].isdigit() else e for e in f.examples)
        if f.detail and f.count:
            detail = f"{f.detail}; {detail}" if detail else f.detail
        table.add_row(f.rule, f"{f.count:,}", f"{kind} {mark}", detail)
    return table


@app.command()
def check(
    paths: list[Path] = typer.Argument(..., help="parquet files or store folders (searched recursively)"),
    gap_policy: GapPolicyOption = typer.Option(
        GapPolicyOption.error, "--gap-policy", help="error: gaps fail the check; mark: gaps are only reported"
    ),
    interval: str = typer.Option(None, "--interval", help="expected bar interval (default: inferred per file)"),
) -> None:
    """Report span, rows, gaps, duplicates, order, OHLC, prices, volume per file; exit 1 on a hard failure."""
    from market.quality import assess_file, data_files

    try:
        files = data_files(list(paths))
    except FileNotFoundError as exc:
        console.print(f"[bold red]{exc}[/]")
        raise typer.Exit(2) from None
    failed = []
    for path in files:
        report = assess_file(path, interval=interval, gap_policy=gap_policy.value)
        console.print(_report_table(report, gap_policy.value))
        if not report.ok:
            failed.append((path, [f.rule for f in report.failures]))
    console.print(f"\n{len(files)} files checked, {len(failed)} failed (gap policy {gap_policy.value})")
    for path, rules in failed:
        console.print(f"  [red]FAIL[/] {path}: {', '.join(rules)}")
    if failed:
        raise typer.Exit(1)
