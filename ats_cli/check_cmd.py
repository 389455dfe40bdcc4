"""``ats check``: consistency checks of a run config. ``ats check lookahead --config CONFIG [--cuts N]``.

Exit codes: 0 no offender, 1 at least one column changed when later bars were cut off, 2 the
config could not be read.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Checks of features and models (look-ahead).")
console = Console()


@app.callback()
def _group() -> None:
    """Checks of features and models."""


@app.command()
def lookahead(
    config: Path = typer.Option(..., "--config", help="YAML run config (see configs/)"),
    cuts: int = typer.Option(20, "--cuts", min=1, help="number of random cut points"),
    seed: int = typer.Option(0, "--seed", help="seed of the cut points"),
) -> None:
    """Recompute every feature and model output on the series cut at random bars; list the columns that change.

    Models (HMM, LightGBM regime-ahead, TCN) are fitted once on the config's training period, on
    the CPU. Exit code 1 when any column's value at or before a cut differs from the full
    computation (the table names it and its first offending open time).
    """
    import torch

    from training.config import ConfigError, load_config
    from training.lookahead import lookahead_check

    try:
        cfg = load_config(config, device="cpu")
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc
    torch.set_num_threads(cfg.torch_threads)
    t0 = time.perf_counter()
    report = lookahead_check(
        cfg, cuts, np.random.default_rng(seed), device="cpu",
        log=lambda s: console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {s}"),
    )
    console.print(
        f"checked {len(report.columns)} columns at {len(report.cuts)} cuts over {report.n_rows} bars "
        f"({report.span[0]} .. {report.span[1]}); tolerance 0 except {report.atol} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    if not report.offenders:
        console.print("[bold green]0 offenders[/]: every feature and model output is causal at these cuts")
        return
    table = Table(title=f"{len(report.offenders)} offenders")
    for name in ("column", "first offending time", "cuts", "max |diff|"):
        table.add_column(name)
    for o in report.offenders:
        table.add_row(o.column, str(o.first_time), f"{o.n_cuts}/{len(report.cuts)}", f"{o.max_abs_diff:.3g}")
    console.print(table)
    raise typer.Exit(code=1)
