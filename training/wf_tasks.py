"""One walk-forward training as a self-contained task: (variant, seed, fold) in, picklable results out.

:func:`run_fold_task` is what ``ats walkforward`` runs for every variant x seed x fold, in this process or as a
Ray task (:mod:`training.fanout`): it trains the fold's run (:func:`training.pipeline.train_run` into
``task.run_dir``), loads the bundle, trades the fold's test window with PPO (and, for the first variant's first
seed, every seed-independent strategy), re-trades the cost-sensitive strategies with fees and slippage x 0 and
x 2, reads the test window's HMM regimes and the validation Sortino of the chosen checkpoint, and returns all of
it as a :class:`FoldResult`. It reads only its inputs and the data files the config names, and writes only under
``task.run_dir``; the gathering and the statistics over folds and seeds are in :mod:`training.walkforward`.

Torch runs with the run config's ``torch_threads`` threads in every process (restored afterwards), so a
training gives the same numbers in the driver and in a Ray worker (Ray sets ``OMP_NUM_THREADS`` to the task's
CPUs; float reductions can depend on the thread count).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from training.backtest import BacktestResult
from training.config import ConfigError, RunConfig
from training.evaluate import (
    COST_MULTIPLIERS,
    COST_SENSITIVE,
    STRATEGIES,
    pooled_test_backtests,
    portfolio_of,
    test_period_backtests,
)
from training.fanout import RaySettings

if TYPE_CHECKING:
    from training.walkforward import FoldWindow, WalkForwardConfig


@dataclass(frozen=True)
class FoldTask:
    """The inputs of one walk-forward training (picklable).

    ``cfg``: the fold's run config (:func:`training.walkforward.fold_run_config`: the variant's config with the
    fold's periods and the seed). ``strategies``: what to trade on the test window (``STRATEGIES`` for the first
    variant's first seed, so the seed-independent strategies are traded once per fold; else ``("ppo",)``).
    ``cost_multipliers``: the fee-and-slippage multipliers to re-trade besides x 1. ``pooled``: several symbols.
    ``run_dir``: as the study names it (recorded as is in folds.json and the report).
    """

    variant: str
    seed: int
    window: FoldWindow
    cfg: RunConfig
    run_dir: str
    strategies: tuple[str, ...]
    cost_multipliers: tuple[float, ...]
    pooled: bool
    n_folds: int
    several_variants: bool
    base_dir: str = "."  # the driver's working directory: a relative run_dir is resolved against it on any worker

    @property
    def run_path(self) -> Path:
        """Where the run is written: ``run_dir``, relative to ``base_dir`` when it is relative."""
        return Path(self.base_dir) / self.run_dir

    @property
    def trades_baselines(self) -> bool:
        """Whether this training also trades the seed-independent strategies (V1, tsmom, ...) of its fold."""
        return self.strategies != ("ppo",)

    @property
    def label(self) -> str:
        """``variant V, fold k/K, seed s: train a..b, test c..d`` (the variant only when there are several)."""
        w = self.window
        return (f"{f'variant {self.variant}, ' if self.several_variants else ''}fold {w.fold + 1}/{self.n_folds}, "
                f"seed {self.seed}: train {w.train_start:%Y-%m-%d}..{w.val_start:%Y-%m-%d}, "
                f"test {w.test_start:%Y-%m-%d}..{w.test_end:%Y-%m-%d}")


@dataclass(frozen=True)
class FoldResult:
    """What one training gives the study (picklable).

    ``results``: test-window backtests at costs x 1, by strategy (a pooled run's equal-weight portfolio);
    ``per_symbol``: a pooled run's ``{symbol: {strategy: result}}`` (None for one symbol); ``regimes``: int
    (n_decisions,) HMM state at each decision bar of the test window (the chosen bundle's fold models);
    ``sens``: ``{multiplier: {strategy: result}}`` for the cost-sensitive strategies traded;
    ``val_sortino``: validation Sortino of the chosen checkpoint (NaN when the manifest has none);
    ``record``: the run's ``folds.json`` entry.
    """

    results: dict[str, BacktestResult]
    per_symbol: dict[str, dict[str, BacktestResult]] | None
    regimes: np.ndarray
    sens: dict[float, dict[str, BacktestResult]]
    val_sortino: float
    record: dict[str, Any]


def fold_backtests(cfg: RunConfig, bundle, prep, preps, *, random_seed: int, strategies: tuple[str, ...],
                   cost_multiplier: float = 1.0) -> tuple[dict[str, BacktestResult], dict | None]:
    """One fold's test-window backtests: a single-symbol run's (and None), or a pooled run's equal-weight portfolio
    (:func:`training.evaluate.portfolio_of`) and its per-symbol results ``{symbol: {strategy: result}}``."""
    if preps is None:
        return test_period_backtests(cfg, bundle, prep, random_seed=random_seed, strategies=strategies,
                                     cost_multiplier=cost_multiplier), None
    per_symbol = pooled_test_backtests(cfg, bundle, preps, cost_multiplier=cost_multiplier, strategies=strategies,
                                       random_seed=random_seed)
    return portfolio_of(per_symbol), per_symbol


def run_fold_task(task: FoldTask, attempt: int = 1) -> FoldResult:
    """Train ``task``'s run into ``task.run_dir`` and trade its test window (see the module docstring).

    ``attempt`` > 1 (a retry) first deletes what a failed attempt left in ``task.run_dir``.

    Raises
    ------
    Exception
        Whatever training or the backtests raise (data, config, model errors); nothing is caught here.
    """
    import torch

    from agents.bundle import load_bundle
    from training.evaluate import test_period_regimes
    from training.pipeline import prepare_data, prepare_symbols, train_run

    run_dir = task.run_path
    if attempt > 1 and run_dir.exists():
        shutil.rmtree(run_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(task.cfg.torch_threads)
    try:
        cfg, k = task.cfg, task.window.fold
        bundle = load_bundle(train_run(cfg, run_dir, log=lambda s: None))
        prep = prepare_data(cfg)
        preps = prepare_symbols(cfg) if task.pooled else None
        results, per_symbol = fold_backtests(cfg, bundle, prep, preps, random_seed=k, strategies=task.strategies)
        n_decisions = len(results["ppo"].position_side)  # the window's last bar decides nothing
        regimes = test_period_regimes(bundle, prep)[:n_decisions]
        sensitive = tuple(n for n in COST_SENSITIVE if n in task.strategies)
        sens = {}
        for mult in task.cost_multipliers:
            again, _ = fold_backtests(cfg, bundle, prep, preps, cost_multiplier=mult, random_seed=k,
                                      strategies=sensitive)
            sens[mult] = {name: again[name] for name in sensitive}
        v = bundle.manifest["metrics"]["validation"].get("sortino")
        record = {**task.window.as_json(), "seed": task.seed, "random_policy_seed": k, "run_dir": task.run_dir,
                  "data_sha256": prep.info["candles_sha256"],
                  "schema_hash": bundle.manifest["observation"]["schema_hash"], "variant": task.variant}
        return FoldResult(results, per_symbol, regimes, sens,
                          float(v) if isinstance(v, (int, float)) else float("nan"), record)
    finally:
        torch.set_num_threads(threads)


def fold_tasks(wf: WalkForwardConfig, base: RunConfig, out: Path, bar: pd.Timedelta) -> list[FoldTask]:
    """Every training of the study as a :class:`training.wf_tasks.FoldTask`, in the sequential order: variant
    (``wf.variants`` order), then seed, then fold. Run directories: ``OUT/fold{k}/seed{s}`` (one variant) or
    ``OUT/variants/{name}/fold{k}/seed{s}``. The first variant's first seed also trades the seed-independent
    strategies (once per fold).

    Raises
    ------
    ValueError
        From :func:`fold_windows` (a training window too short).
    training.config.ConfigError
        A variant's merged config is invalid.
    """
    from training.walkforward import fold_run_config, fold_windows, variant_config

    windows = fold_windows(wf, bar)
    pooled = len(base.data.sources()) > 1
    several = len(wf.variants) > 1
    mults = tuple(m for m in COST_MULTIPLIERS if m != 1.0)
    tasks = []
    for vi, vname in enumerate(wf.variants):
        vcfg = variant_config(wf, base, vname)
        vout = out / "variants" / vname if several else out
        for seed in wf.seeds:
            first_seed = vi == 0 and seed == wf.seeds[0]
            for w in windows:
                tasks.append(FoldTask(vname, seed, w, fold_run_config(vcfg, w, seed, bar),
                                      str(vout / f"fold{w.fold}" / f"seed{seed}"),
                                      STRATEGIES if first_seed else ("ppo",), mults, pooled, wf.folds, several,
                                      base_dir=str(Path.cwd())))
    return tasks


def study_bar(wf: WalkForwardConfig, base: RunConfig) -> pd.Timedelta:
    """The bar interval of the study's data (read from the first variant's candles over the whole span)."""
    from training.pipeline import prepare_data
    from training.walkforward import FoldWindow, fold_run_config, variant_config

    vcfg = variant_config(wf, base, next(iter(wf.variants)))
    bar = pd.Timedelta(seconds=3600)  # only places the probe's load margin; the data's interval is returned
    probe = fold_run_config(vcfg, FoldWindow(0, wf.data_start, wf.start - bar * wf.val_bars, wf.start, wf.end),
                            wf.seeds[0], bar)
    return pd.Timedelta(seconds=prepare_data(probe).info["bar_interval_s"])


def ray_settings(wf: WalkForwardConfig, base: RunConfig) -> RaySettings | None:
    """The Ray settings of the study's trainings (None: run them one after another in this process).

    ``cpus_per_task`` None reserves the base config's ``torch_threads`` CPUs per training.

    Raises
    ------
    training.config.ConfigError
        ``cpus_per_task`` or ``gpus_per_task`` set without ``ray_address`` (they would be ignored);
        ``device: cuda`` in the base config with ``gpus_per_task`` 0 (a Ray task sees only the GPUs it
        reserves), or ``gpus_per_task`` > 0 with ``device: cpu`` (contradictory).
    """
    if wf.ray_address is None:
        if wf.cpus_per_task is not None or wf.gpus_per_task > 0:
            raise ConfigError("cpus_per_task and gpus_per_task reserve Ray resources: they need ray_address (local, "
                              "auto or HOST:PORT); without it the trainings run one after another in this process")
        return None
    if base.device == "cuda" and wf.gpus_per_task <= 0:
        raise ConfigError("device cuda with ray_address: a Ray task sees only the GPUs it reserves; set "
                          "gpus_per_task > 0 (or use device auto)")
    if base.device == "cpu" and wf.gpus_per_task > 0:
        raise ConfigError(f"gpus_per_task={wf.gpus_per_task:g} contradicts device cpu (use device auto or cuda)")
    cpus = float(base.torch_threads if wf.cpus_per_task is None else wf.cpus_per_task)
    return RaySettings(address=wf.ray_address, num_cpus=cpus, num_gpus=wf.gpus_per_task, retries=wf.task_retries)
