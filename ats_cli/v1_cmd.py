"""``ats sweep-v1``: walk-forward parameter sweep of the V1 rule engine (registered by ``ats_cli.main``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ats_cli.progress import counting_progress

app = typer.Typer(add_completion=False, no_args_is_help=True, help="V1 rule engine tools")
console = Console()


@app.callback()
def _group() -> None:
    """V1 rule engine tools (``sweep``; registered in ``ats`` as ``sweep-v1``)."""


def _configs(config: Path | None):
    from envs.trading_env import EnvConfig
    from fallback.config import V1Config

    if config is None:
        return EnvConfig(), V1Config()
    from training.config import load_config

    cfg = load_config(config)
    return cfg.env, cfg.v1


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def _table(title: str, df) -> Table:
    t = Table(title=title)
    for col in df.columns:
        t.add_column(str(col))
    for row in df.itertuples(index=False):
        cells = []
        for col, v in zip(df.columns, row, strict=True):
            if col == "chosen":  # JSON in the CSV; k=v in the terminal
                v = " ".join(f"{k}={x}" for k, x in json.loads(v).items())
            cells.append(_fmt(v))
        t.add_row(*cells)
    return t


@app.command("sweep")
def sweep(
    data: Path = typer.Option(None, "--data", help="candles parquet <SYMBOL>-<tf>.parquet (default: the bundled 1h "
                              "candles + funding)"),
    symbol: str = typer.Option(None, "--symbol", help="the data's symbol (default: from the file name)"),
    instrument_spec: Path = typer.Option(None, "--instrument-spec", help="instrument spec file (JSON/YAML) of the "
                                         "data's symbol (default: SYMBOL.spec.json next to the data, else the "
                                         "bundled table)"),
    period: str = typer.Option(
        ..., "--period", help="START:END (UTC, END exclusive), e.g. 2021-01-01:2025-07-01"
    ),
    grid: str = typer.Option(
        "breakout_k=0.3,0.6;stop_atr_mult=1.0,2.0;trigger_mode=breakout,either",
        "--grid",
        help="key=v1,v2;key2=... over V1Config fields",
    ),
    folds: int = typer.Option(
        3, "--folds", min=1, help="walk-forward test folds (expanding training windows)"
    ),
    select: str = typer.Option("profit_factor", "--select", help="training score: profit_factor or sortino"),
    min_train_trades: int = typer.Option(
        10, "--min-train-trades", min=0, help="fewer training trades: not eligible"
    ),
    config: Path = typer.Option(None, "--config", help="run config YAML whose env and v1 sections are used"),
    out: Path = typer.Option(None, "--out", help="folder for combos.csv, folds.csv, walk_forward.json"),
    ray_address: str = typer.Option(None, "--ray-address", help="backtest the combinations as Ray tasks: local (Ray "
                                    "on this machine), auto (the cluster this node joined), HOST:PORT; default: one "
                                    "after another"),
    cpus_per_task: float = typer.Option(1.0, "--cpus-per-task", min=0.01, help="Ray: CPUs reserved per combination"),
) -> None:
    """Choose V1's parameters on expanding training folds; report each choice out of sample."""
    from training import metrics as M
    from training.fanout import RayResourceError, RaySettings, TaskFailedError
    from training.v1_eval import (
        SelectBy,
        data_instrument,
        load_v1_candles,
        parse_grid,
        parse_period,
        walk_forward_sweep,
    )

    try:
        start, end = parse_period(period)
        grid_values = parse_grid(grid)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if select not in ("profit_factor", "sortino"):
        raise typer.BadParameter(f"--select must be profit_factor or sortino, got {select!r}")
    env, base = _configs(config)
    candles = load_v1_candles(data)
    resolved = data_instrument(data, candles, symbol=symbol, spec_path=instrument_spec)
    env = env.updated(costs=env.costs.with_instrument(resolved.spec))
    console.print(f"[dim]{resolved.describe()}[/]")
    select_by: SelectBy = "sortino" if select == "sortino" else "profit_factor"
    try:
        ray = None if ray_address is None else RaySettings(address=ray_address, num_cpus=cpus_per_task)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--ray-address") from exc
    with counting_progress(console) as progress:
        bar = progress.add_task("V1 sweep", total=None, unit="backtests")
        try:
            res = walk_forward_sweep(candles, start, end, grid_values, env, base=base, n_folds=folds,
                                     select_by=select_by, min_train_trades=min_train_trades,
                                     log=lambda s: console.print(f"[dim]{s}[/]"), ray=ray,
                                     on_progress=lambda d, n: progress.update(bar, completed=d, total=n))
        except RayResourceError as exc:
            raise typer.BadParameter(str(exc), param_hint="--cpus-per-task") from exc
        except TaskFailedError as exc:
            console.print(f"[bold red]sweep stopped[/]: {exc}")
            raise typer.Exit(1) from exc
    console.print(_table("out-of-sample result of every combination, per fold", res["combos"]))
    console.print(_table(f"walk-forward: parameters chosen by training {select}", res["folds"]))
    wf = res["walk_forward"]
    console.print(
        f"walk-forward out of sample: profit factor {wf['profit_factor']:.3f}, win rate {wf['win_rate']:.3f}, "
        f"Sortino {wf['sortino']:.3f}, trades {wf['n_trades']:.0f}, return {wf['total_return']:+.2%}"
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        res["combos"].to_csv(out / "combos.csv", index=False)
        res["folds"].to_csv(out / "folds.csv", index=False)
        (out / "walk_forward.json").write_text(json.dumps(M.to_jsonable(wf), indent=1, allow_nan=False))
        written = [out / "combos.csv", out / "folds.csv", out / "walk_forward.json"]
        if res["execution"] is not None:  # Ray: where each combination ran and what was retried
            (out / "execution.json").write_text(json.dumps(M.to_jsonable(res["execution"]), indent=1,
                                                           allow_nan=False))
            written.append(out / "execution.json")
        console.print(f"written: {', '.join(map(str, written))}")
    if res["execution"] is not None and res["execution"]["retried"]:
        console.print("[yellow]retried[/]: " + "; ".join(f"{r['label']} ({r['attempts']} attempts: "
                                                         f"{' | '.join(r['errors'])})" for r in res["execution"]["retried"]))
