"""``ats tune``: hyperparameter search over PPO and reward parameters with Ray Tune (see training.tune)."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

console = Console()


class TuneBackend(str, Enum):
    """PPO implementation of the trials."""

    sb3 = "sb3"
    rllib = "rllib"


class Scheduler(str, Enum):
    """Early stopping of trials: ASHA, median stopping, or none."""

    asha = "asha"
    median = "median"
    none = "none"


class Search(str, Enum):
    """How configurations are drawn: Optuna (TPE) or at random."""

    optuna = "optuna"
    random = "random"


def tune(
    config: Path = typer.Option(..., "--config", help="YAML run config (see configs/)"),
    trials: int = typer.Option(8, "--trials", min=1, help="configurations to try"),
    out: Path = typer.Option(..., "--out", help="output directory (results.csv, best_config.yaml, trials.json)"),
    backend: TuneBackend = typer.Option(TuneBackend.sb3, "--backend", help="PPO implementation of every trial"),
    folds: int = typer.Option(
        2, "--folds", min=1, help="walk-forward folds before test_start (only their validation windows are scored)"
    ),
    val_bars: int = typer.Option(None, "--val-bars", min=24, help="validation bars per fold (default: fold length)"),
    scheduler: Scheduler = typer.Option(Scheduler.asha, "--scheduler", help="early stopping of bad trials"),
    search: Search = typer.Option(Search.optuna, "--search", help="optuna (TPE) or random"),
    max_concurrent: int = typer.Option(1, "--max-concurrent", min=1, help="trials at once (1 CPU each)"),
    gpus_per_trial: float = typer.Option(0.0, "--gpus-per-trial", min=0, help="GPUs reserved per trial"),
    ray_address: str = typer.Option(None, "--ray-address", help="join this Ray cluster (auto | HOST:PORT)"),
    storage_path: str = typer.Option(
        None, "--storage-path",
        help="Ray Tune results/checkpoints: a folder every node can reach (NFS) or s3://, gs:// (multi-node); "
        "default OUT/ray_results on the driver",
    ),
) -> None:
    """Search PPO and reward parameters; objective: mean validation Sortino over walk-forward folds."""
    from training.config import load_config
    from training.tune import TuneConfig, run_tune

    def log(msg: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}")

    import torch

    t0 = time.perf_counter()
    base = load_config(config)
    torch.set_num_threads(base.torch_threads)  # driver: regime/signal fits; each trial uses 1 thread
    tcfg = TuneConfig(trials=trials, folds=folds, val_bars=val_bars, backend=backend.value, scheduler=scheduler.value,
                      search=search.value, max_concurrent=max_concurrent, gpus_per_trial=gpus_per_trial,
                      seed=base.seed)
    summary = run_tune(base, tcfg, out, ray_address=ray_address, storage_path=storage_path, log=log)
    console.print(f"\n[bold green]done[/] in {time.perf_counter() - t0:.0f} s: {summary['n_trials']} trials")
    console.print(f"  results table: {out / 'results.csv'}")
    console.print(f"  best config:   {out / 'best_config.yaml'}   (ats train --config {out / 'best_config.yaml'} ...)")
    console.print(f"  trial count:   {out / 'trials.json'}   (n_trials={summary['n_trials']}: "
                  f"ats walkforward ... --tuning-dir {out} counts them)")
