"""``ats serve``: run the serving loop (paper replay, testnet, live), plus ``reload`` and ``reset-risk``.

``ats serve --mode paper --bundle B --db STATE``                   live candles (public klines), paper broker
``ats serve --mode paper --symbols BTCUSDT,ETHUSDT ...``           live candles, several symbols on one paper account
``ats serve --mode paper --replay CANDLES --bundle B --db STATE``   replay candles on a paper broker
``ats serve --mode testnet --bundle B --db STATE``                 Binance USDⓈ-M testnet (ccxt sandbox)
``ats serve --mode testnet --base-url URL ...``                    the same through a local simulator or proxy
``ats serve --mode testnet --symbols BTCUSDT,ETHUSDT ...``         several symbols on one account, one process
``ats serve --mode live --live --bundle B --db STATE``             real orders (PASS gate + arming phrase)
``ats serve reload --db STATE --bundle NEW``                       hot-swap request to a running loop
``ats serve reset-risk --db STATE --note "..."``                   leave a kill switch (the only way)
``ats serve accept-position --db STATE --note "..."``              adopt the exchange position (unreconciled)
``ats serve migrate-db --db STATE --symbol BTCUSDT``               a state file of before multi-symbol serving
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ats_cli import drift_cmd, status_cmd
from ats_cli.errors import report
from ats_cli.progress import counting_progress

app = typer.Typer(add_completion=False, help="serve a bundle bar by bar (V1 fallback, risk guard, durable state)")
console = Console()


class Mode(str, Enum):
    """Where orders go: the paper broker, the Binance testnet or Binance."""

    paper = "paper"
    testnet = "testnet"
    live = "live"


def _log(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}")


@app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    mode: Annotated[Mode, typer.Option(
        "--mode", help="paper (paper broker on the exchange's live candles, or on --replay candles) | testnet | live",
    )] = Mode.paper,
    bundle: Annotated[Path | None, typer.Option("--bundle", help="policy bundle directory")] = None,
    db: Annotated[Path | None, typer.Option(
        "--db", help="SQLite state file (decisions, intents, orders, fills, equity, events)")] = None,
    db_url: Annotated[str | None, typer.Option(
        "--db-url", help="testnet/live: keep the state in this SQLAlchemy database (e.g. postgresql+psycopg://"
        "user@host/ats) instead of the --db SQLite file; --db still names the reload-request file")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="serve YAML: paper/live/risk sections (see configs/serve.yaml)")] = None,
    replay: Annotated[list[str] | None, typer.Option(
        "--replay", help="paper: replay this candles parquet bar by bar instead of polling the exchange's live "
        "candles; repeat it for several symbols on one account (the symbol from the file name, BTCUSDT-1h.parquet, "
        "or given as SYMBOL=PATH)")] = None,
    allow_transfer: Annotated[bool, typer.Option(
        "--allow-transfer", help="several --replay or --symbols: serve symbols the bundle was not trained on (logged)")] = False,
    warmup_bars: Annotated[int | None, typer.Option(
        "--warmup-bars", min=0, help="paper --replay: bars observed before the first decision")] = None,
    max_bars: Annotated[int, typer.Option(
        "--max-bars", min=0, help="stop after this many decided bars (0 = no limit)")] = 0,
    initial_equity: Annotated[float | None, typer.Option(
        "--initial-equity", min=0, help="paper: account equity, USDT")] = None,
    watch_dir: Annotated[Path | None, typer.Option(
        "--watch-dir", help="directory watched for new bundles (hot-swap)")] = None,
    no_risk: Annotated[bool, typer.Option("--no-risk", help="paper only: run without the risk guard")] = False,
    symbol: Annotated[str | None, typer.Option(
        "--symbol", help="testnet/live and paper on live candles: unified ccxt symbol (default BTC/USDT:USDT); "
        "--replay: the replayed symbol's instrument spec when the bundle's manifest cannot say, or which symbol of a "
        "pooled bundle is served (its spec)")] = None,
    symbols: Annotated[str | None, typer.Option(
        "--symbols", help="live candles (paper, testnet, live): several symbols on one account in one process, comma-separated "
        "(BTCUSDT,ETHUSDT); overrides serve.symbols of --config")] = None,
    timeframe: Annotated[str | None, typer.Option(
        "--timeframe", help="testnet/live and paper on live candles: bar length (default 1h)")] = None,
    testnet_data: Annotated[bool, typer.Option(
        "--testnet-data", help="paper on live candles: poll the Binance futures testnet's public candles")] = False,
    base_url: Annotated[str | None, typer.Option(
        "--base-url", help="exchange REST base URL (a local exchange simulator, an egress proxy); testnet/live: "
        "https:// or http:// to a loopback host (localhost, 127.0.0.0/8, [::1]) only")] = None,
    env_file: Annotated[Path | None, typer.Option(
        "--env-file", help="testnet/live: .env with the API key (chmod 600)")] = None,
    live: Annotated[bool, typer.Option("--live", help="live: confirm that real orders are intended")] = False,
    force_gate: Annotated[bool, typer.Option(
        "--force-gate", help="testnet/live: serve a bundle whose gate verdict is not PASS (and accept such hot-swaps)",
    )] = False,
) -> None:
    """Serve the bundle bar by bar: V2 if it answers in time with finite outputs, else V1, else flat;
    every bar has one recorded decision. Stop with Ctrl-C (between bars)."""
    if ctx.invoked_subcommand is not None:
        return
    from serving.errors import FatalError
    from serving.settings import load_serve_settings

    if bundle is None or db is None:
        raise typer.BadParameter("--bundle and --db are required")
    try:
        settings = load_serve_settings(config)
    except FatalError as exc:
        raise typer.BadParameter(str(exc)) from exc
    watch = watch_dir if watch_dir is not None else settings.watch_dir
    if db_url is not None and mode is Mode.paper:
        raise typer.BadParameter("--db-url is for testnet/live; paper serving keeps its state in the --db file")
    if mode is Mode.paper and replay is not None and symbols is not None:
        raise typer.BadParameter("--symbols is for live candles (paper, testnet, live): paper replays take one "
                                 "--replay per symbol")
    if mode is Mode.paper and replay is None:
        if warmup_bars is not None:
            raise typer.BadParameter("--warmup-bars is for --replay; on live candles the context comes from the exchange")
        served = [s.strip() for s in symbols.split(",") if s.strip()] if symbols is not None else list(settings.symbols)
        if len(served) > 1:
            _serve_paper_live_multi(ctx, settings, symbols=served, bundle=bundle, db=db, symbol=symbol,
                                    timeframe=timeframe, max_bars=max_bars, initial_equity=initial_equity,
                                    watch_dir=watch, no_risk=no_risk, testnet_data=testnet_data, base_url=base_url,
                                    allow_transfer=allow_transfer)
            return
        if len(served) == 1 and symbol is None:
            from ats_cli.serve_live import unified_symbol

            try:
                symbol = unified_symbol(served[0])
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--symbols") from exc
        _serve_paper_live(ctx, settings, bundle=bundle, db=db, symbol=symbol, timeframe=timeframe, max_bars=max_bars,
                          initial_equity=initial_equity, watch_dir=watch, no_risk=no_risk, testnet_data=testnet_data,
                          base_url=base_url)
        return
    if mode is Mode.paper and replay is not None:  # paper without --replay returned above
        replays = _replay_files(replay)
        if len(replays) > 1:
            if symbol is not None:
                raise typer.BadParameter("several --replay files name their symbols themselves (no --symbol)")
            _serve_paper_multi(ctx, settings, replays=replays, bundle=bundle, db=db, warmup_bars=warmup_bars,
                               max_bars=max_bars, initial_equity=initial_equity, no_risk=no_risk,
                               allow_transfer=allow_transfer, watch_dir=watch)
            return
        named, path = next(iter(replays.items()))
        _serve_paper(settings, replay=path, bundle=bundle, db=db, warmup_bars=warmup_bars, max_bars=max_bars,
                     initial_equity=initial_equity, watch_dir=watch, no_risk=no_risk,
                     symbol=symbol if symbol is not None else (named if "=" in replay[0] else None))
        return
    if testnet_data:
        raise typer.BadParameter("--testnet-data is for paper on live candles")
    if base_url is not None:
        from ats_cli.serve_live import check_base_url

        try:
            check_base_url(base_url)
        except FatalError as exc:
            raise typer.BadParameter(str(exc), param_hint="--base-url") from exc
    if no_risk or settings.risk is None:
        raise typer.BadParameter("the risk guard cannot be disabled on testnet or live")
    if replay is not None:
        raise typer.BadParameter("--replay is for --mode paper; testnet/live poll the exchange's closed candles")
    served = [s for s in symbols.split(",") if s.strip()] if symbols is not None else list(settings.symbols)
    if len(served) > 1:
        _serve_live_multi(ctx, settings, mode=mode.value, symbols=served, bundle=bundle, db=db, db_url=db_url,
                          env_file=env_file, live=live, force_gate=force_gate, max_bars=max_bars, symbol=symbol,
                          timeframe=timeframe, base_url=base_url, watch=watch, allow_transfer=allow_transfer)
        return
    if len(served) == 1 and symbol is None:
        symbol = served[0]
    from pydantic import ValidationError

    from ats_cli.serve_live import serve_live
    from serving.live import LiveConfig

    updates = {k: v for k, v in {"symbol": symbol, "timeframe": timeframe}.items() if v is not None}
    try:
        live_cfg = LiveConfig.model_validate({**settings.live.model_dump(), **updates})
    except ValidationError as exc:
        raise typer.BadParameter(_validation_message(exc)) from exc
    try:
        bars = serve_live(mode=mode.value, bundle_dir=bundle, db_path=db, db_url=db_url, env_file=env_file, live=live,
                          force_gate=force_gate, max_bars=max_bars or None, live_config=live_cfg, risk=settings.risk,
                          watch_dir=watch, log=_log, base_url=base_url, drift=settings.drift)
    except ValueError as exc:  # a bad setting (arming, credentials, exchange set-up: FatalError, see ats_cli.errors)
        report(exc, ctx)
    console.print(f"\n[bold]stopped[/] after {bars} bars; state database: {db} (`ats status --db {db}`)")


def _serve_live_multi(ctx: typer.Context, settings, *, mode: str, symbols: list[str], bundle: Path, db: Path,
                      db_url: str | None, env_file: Path | None, live: bool, force_gate: bool, max_bars: int,
                      symbol: str | None, timeframe: str | None, base_url: str | None, watch: Path | None,
                      allow_transfer: bool) -> None:
    """``ats serve --mode testnet|live --symbols A,B``: several symbols on one account in one process."""
    from pydantic import ValidationError

    from ats_cli.serve_live import serve_live_multi
    from serving.live import LiveConfig

    if symbol is not None:
        raise typer.BadParameter("--symbols names the symbols itself (no --symbol)")
    try:
        live_cfg = LiveConfig.model_validate({**settings.live.model_dump(),
                                              **({"timeframe": timeframe} if timeframe else {})})
    except ValidationError as exc:
        raise typer.BadParameter(_validation_message(exc)) from exc
    bars = 0
    try:
        bars = serve_live_multi(mode=mode, symbols=symbols, bundle_dir=bundle, db_path=db, db_url=db_url,
                                env_file=env_file, live=live, force_gate=force_gate, max_bars=max_bars or None,
                                log=_log, base_url=base_url, live_config=live_cfg, risk=settings.risk,
                                account_risk=settings.account_risk, allow_transfer=allow_transfer,
                                drift=settings.drift, watch_dir=watch)  # fmt: skip
    except ValueError as exc:  # a bad setting, arming, credentials, exchange set-up (FatalError), a foreign symbol
        report(exc, ctx)
    console.print(f"\n[bold]stopped[/] after {bars} bars; state database: {db} (`ats status --db {db}`)")


def _serve_paper(settings, *, replay: Path, bundle: Path, db: Path, warmup_bars: int | None, max_bars: int,
                 initial_equity: float | None, watch_dir: Path | None, no_risk: bool,
                 symbol: str | None = None) -> None:
    from pydantic import ValidationError

    from serving.app import serve_replay

    try:
        summary = serve_replay(
            replay=replay, bundle_dir=bundle, db_path=db, config=settings.paper, warmup_bars=warmup_bars,
            initial_equity_usdt=initial_equity, max_bars=max_bars, risk=None if no_risk else settings.risk,
            watch_dir=watch_dir, log=_log, progress_factory=lambda: counting_progress(console), symbol=symbol,
            drift=settings.drift,
        )
    except ValidationError as exc:  # an option outside its range (e.g. --initial-equity 0)
        raise typer.BadParameter(_validation_message(exc)) from exc
    _print_summary(summary, db)


def replay_symbol(item: str) -> tuple[str, Path]:
    """(symbol, path) of one ``--replay`` value: ``SYMBOL=PATH``, or ``PATH`` whose file name starts with the
    symbol (``BTCUSDT-1h.parquet``, ``ETHUSDT_1h.parquet``, ``SOLUSDT.parquet``).

    Raises
    ------
    typer.BadParameter
        The symbol cannot be told (not letters and digits).
    """
    from market.store import symbol_file_stem

    if "=" in item:
        name, _, path = item.partition("=")
    else:
        path = item
        name = Path(item).name.split(".")[0].split("-")[0].split("_")[0]
    try:
        symbol = symbol_file_stem(name.strip()).upper()
    except ValueError:
        symbol = ""
    if not symbol or not symbol.isalnum():
        raise typer.BadParameter(f"cannot tell the symbol of {item!r}: name it SYMBOL=PATH (e.g. BTCUSDT=candles.parquet)",
                                 param_hint="--replay")
    return symbol, Path(path)


def _replay_files(items: list[str]) -> dict[str, Path]:
    """``--replay`` values as symbol -> path (in the order given).

    Raises
    ------
    typer.BadParameter
        A symbol given twice, or one that cannot be told (several files must each name their symbol).
    """
    if len(items) == 1 and "=" not in items[0]:
        return {"": Path(items[0])}  # one file: the symbol need not be in its name (the bundle's spec, --symbol)
    out: dict[str, Path] = {}
    for item in items:
        symbol, path = replay_symbol(item)
        if symbol in out:
            raise typer.BadParameter(f"{symbol} is replayed twice ({out[symbol]} and {path})", param_hint="--replay")
        out[symbol] = path
    return out


def _serve_paper_multi(ctx: typer.Context, settings, *, replays: dict[str, Path], bundle: Path, db: Path,
                       warmup_bars: int | None, max_bars: int, initial_equity: float | None, no_risk: bool,
                       allow_transfer: bool, watch_dir: Path | None = None) -> None:
    """``ats serve --mode paper --replay A --replay B ...``: several symbols on one paper account."""
    from pydantic import ValidationError

    from serving.app import serve_replay_multi

    try:
        summary = serve_replay_multi(
            replays=replays, bundle_dir=bundle, db_path=db, config=settings.paper, warmup_bars=warmup_bars,
            max_bars=max_bars, initial_equity_usdt=initial_equity, risk=None if no_risk else settings.risk,
            account_risk=None if no_risk else settings.account_risk, allow_transfer=allow_transfer, log=_log,
            drift=settings.drift, watch_dir=watch_dir,
            progress_factory=lambda: counting_progress(console),
        )
    except ValidationError as exc:
        raise typer.BadParameter(_validation_message(exc)) from exc
    except ValueError as exc:  # a bad setting or a refused transfer (FatalError, see ats_cli.errors)
        report(exc, ctx)
    _print_portfolio_summary(summary, db)


def _serve_paper_live(ctx: typer.Context, settings, *, bundle: Path, db: Path, symbol: str | None,
                      timeframe: str | None, max_bars: int, initial_equity: float | None, watch_dir: Path | None,
                      no_risk: bool, testnet_data: bool, base_url: str | None) -> None:
    """``ats serve --mode paper`` without ``--replay``: the paper broker on the exchange's live candles."""
    from pydantic import ValidationError

    from serving.app import serve_paper_live
    from serving.paper_live import FeedConfig

    updates = {k: v for k, v in {"symbol": symbol, "timeframe": timeframe}.items() if v is not None}
    try:
        feed = FeedConfig.model_validate({**FeedConfig.from_live(settings.live).model_dump(), **updates})
        summary = serve_paper_live(
            bundle_dir=bundle, db_path=db, feed=feed, config=settings.paper, initial_equity_usdt=initial_equity,
            max_bars=max_bars or None, risk=None if no_risk else settings.risk, watch_dir=watch_dir,
            testnet_data=testnet_data, base_url=base_url, log=_log, drift=settings.drift,
        )
    except ValidationError as exc:
        raise typer.BadParameter(_validation_message(exc)) from exc
    except ValueError as exc:  # a bad setting (a DB holding the run, an unknown symbol: FatalError, see ats_cli.errors)
        report(exc, ctx)
    _print_summary(summary, db)


def _serve_paper_live_multi(ctx: typer.Context, settings, *, symbols: list[str], bundle: Path, db: Path,
                            symbol: str | None, timeframe: str | None, max_bars: int, initial_equity: float | None,
                            watch_dir: Path | None, no_risk: bool, testnet_data: bool, base_url: str | None,
                            allow_transfer: bool) -> None:
    """``ats serve --mode paper --symbols A,B`` without ``--replay``: several symbols' live candles on one paper
    account."""
    from pydantic import ValidationError

    from ats_cli.serve_live import unified_symbol
    from serving.app import serve_paper_live_multi
    from serving.errors import FatalError
    from serving.paper_live import FeedConfig

    if symbol is not None:
        raise typer.BadParameter("--symbols names the symbols itself (no --symbol)")
    try:
        unified = [unified_symbol(s) for s in symbols]
    except FatalError as exc:
        raise typer.BadParameter(str(exc), param_hint="--symbols") from exc
    summary = None
    try:
        feed = FeedConfig.model_validate({**FeedConfig.from_live(settings.live).model_dump(),
                                          **({"timeframe": timeframe} if timeframe else {})})
        summary = serve_paper_live_multi(
            symbols=unified, bundle_dir=bundle, db_path=db, feed=feed, config=settings.paper,
            initial_equity_usdt=initial_equity, max_bars=max_bars or None, risk=None if no_risk else settings.risk,
            account_risk=None if no_risk else settings.account_risk, allow_transfer=allow_transfer,
            testnet_data=testnet_data, base_url=base_url, log=_log, drift=settings.drift, watch_dir=watch_dir,
        )
    except ValidationError as exc:
        raise typer.BadParameter(_validation_message(exc)) from exc
    except ValueError as exc:  # a bad setting, a DB holding the run, an unknown symbol, a refused transfer
        report(exc, ctx)
    if summary is not None:
        _print_portfolio_summary(summary, db)


def _print_portfolio_summary(summary, db: Path) -> None:
    console.print(f"\n[bold green]served[/] {len(summary.symbols)} symbols over {summary.bars} bars on one account; "
                  f"final equity {summary.final_equity_usdt:,.2f} USDT (from {summary.initial_equity_usdt:,.2f})")
    for symbol, leg in summary.legs.items():
        console.print(f"  {symbol}: {leg.decisions_v2} decided by V2, {leg.decisions_v1} by V1, {leg.decisions_guard} "
                      f"by the guard" + (f", {leg.decisions_missed} missed" if leg.decisions_missed else "")
                      + f"; sleeve equity {leg.final_equity_usdt:,.2f} USDT")
    if summary.account_risk_state not in (None, "ACTIVE"):
        console.print(f"  [yellow]account risk guard {summary.account_risk_state}[/] (reset: `ats serve reset-risk "
                      f"--db {db} --scope account --note ...`)")
    console.print(f"  state database: {db} (`ats status --db {db}`)")


def _validation_message(exc) -> str:
    """One line naming each setting a pydantic ``ValidationError`` refused."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def _print_summary(summary, db: Path) -> None:
    console.print(
        f"\n[bold green]served[/] {summary.bars} bars: {summary.decisions_v2} decided by V2, {summary.decisions_v1} "
        f"by V1, {summary.decisions_guard} by the guard"
        + (f", {summary.decisions_missed} missed" if summary.decisions_missed else "")
        + f"; final equity {summary.final_equity_usdt:,.2f} USDT"
    )
    if summary.risk_state not in (None, "ACTIVE"):
        console.print(f"  [yellow]risk guard {summary.risk_state}[/] (reset: `ats serve reset-risk --db {db} --note ...`)")
    for reason, count in summary.fallback_reasons.most_common(5):
        console.print(f"  fallback x{count}: {reason}")
    console.print(f"  state database: {db} (`ats status --db {db}`)")


app.command("reload", help="validate a bundle and swap it into the running loop between bars")(status_cmd.reload)
app.command("reset-risk", help="reset a HALTED/REDUCING risk guard to ACTIVE (recorded)")(status_cmd.reset_risk)
app.command("reset-drift", help="end the drift monitor's V1 mode: the bundle decides again (recorded)")(
    drift_cmd.reset_drift)
app.command("accept-position", help="adopt the exchange's position of an unreconciled symbol at the next bar (recorded)")(
    status_cmd.accept_position
)
app.command("migrate-db", help="add the per-symbol columns to a state database written before multi-symbol serving")(
    status_cmd.migrate_db
)
