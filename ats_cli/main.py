"""``ats`` command line: train, evaluate, serve. Every command ends by printing where its outputs went."""

from __future__ import annotations

import resource
import time
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from ats_cli.errors import DEBUG_ENV, ExpectedErrorGroup, debug_requested
from ats_cli.progress import counting_progress

app = typer.Typer(add_completion=False, no_args_is_help=True, cls=ExpectedErrorGroup,
                  help="Adaptive Trading System (RL on USDT-M perpetuals)")
console = Console()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help=f"show the traceback of expected errors too (or {DEBUG_ENV}=1)"),
) -> None:
    """Adaptive Trading System (RL on USDT-M perpetuals)."""


class Device(str, Enum):
    """Torch device of the training run."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Backend(str, Enum):
    """PPO implementation: Stable-Baselines3 or Ray RLlib."""

    sb3 = "sb3"
    rllib = "rllib"


def _log(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}")


def _peak_rss_mb() -> float:
    """Peak resident memory of this process and its waited-for children, MiB (Linux ru_maxrss is KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


@app.command()
def train(
    config: Path = typer.Option(..., "--config", help="YAML run config (see configs/)"),
    out: Path = typer.Option(..., "--out", help="run directory to create"),
    device: Device = typer.Option(None, "--device", help="where torch runs (default: the config's)"),
    evaluate: bool = typer.Option(True, help="evaluate on the test period at the end"),
    backend: Backend = typer.Option(None, "--backend", help="PPO implementation (default: the config's, sb3)"),
    ray_address: str = typer.Option(None, "--ray-address", help="rllib: join this Ray cluster (auto | HOST:PORT)"),
    num_env_runners: int = typer.Option(None, "--num-env-runners", min=0, help="rllib: sampling processes"),
    num_gpus_per_learner: float = typer.Option(None, "--num-gpus-per-learner", min=0, help="rllib: GPUs per learner"),
    wandb: bool = typer.Option(False, "--wandb", help="also log to Weights & Biases (offline without WANDB_API_KEY)"),
    instrument_spec: Path = typer.Option(None, "--instrument-spec", help="instrument spec file (JSON/YAML) of the "
                                         "config's symbol; overrides data.instrument_spec (format: README)"),
) -> None:
    """Fit regime and signal models, train PPO, export the bundle, and evaluate on the test period."""
    import torch

    from agents.devices import torch_threads_for
    from training.config import load_config
    from training.evaluate import evaluate_run
    from training.pipeline import train_run
    from training.tracking import wandb_tracking

    t0 = time.perf_counter()
    cfg = load_config(config, device=device.value if device else None, backend=backend.value if backend else None,
                      instrument_spec=instrument_spec)
    rllib_updates = {"ray_address": ray_address, "num_env_runners": num_env_runners,
                     "num_gpus_per_learner": num_gpus_per_learner}
    rllib_updates = {k: v for k, v in rllib_updates.items() if v is not None}
    if rllib_updates and cfg.backend != "rllib":
        flags = ", ".join("--" + k.replace("_", "-") for k in rllib_updates)
        raise typer.BadParameter(f"{flags} only apply to --backend rllib (this run uses {cfg.backend})")
    if rllib_updates:
        cfg = cfg.updated(rllib=cfg.rllib.updated(**rllib_updates))
    torch.set_num_threads(torch_threads_for(cfg.backend, cfg.torch_threads, n_env_runners=cfg.rllib.num_env_runners,
                                            joins_cluster=bool(cfg.rllib.ray_address)))
    _log(f"backend: {cfg.backend}, torch threads: {torch.get_num_threads()}")
    with wandb_tracking(wandb, config=cfg.model_dump(mode="json"), run_dir=out, name=cfg.name, log=_log), \
            counting_progress(console) as progress:
        task = progress.add_task("PPO", total=cfg.ppo.total_timesteps, unit="env steps", visible=False)

        def on_ppo(step: int) -> None:
            progress.update(task, completed=min(step, cfg.ppo.total_timesteps), visible=True)

        bundle = train_run(cfg, out, log=_log, on_ppo_progress=on_ppo)
    if evaluate:
        evaluate_run(out, log=_log)
    console.print(f"\n[bold green]done[/] in {time.perf_counter() - t0:.0f} s, peak memory {_peak_rss_mb():.0f} MiB")
    console.print(f"  TensorBoard logs: {out / 'tb'}   (tensorboard --logdir {out / 'tb'})")
    console.print(f"  policy bundle:    {bundle}")
    if evaluate:
        console.print(f"  test report:      {out / 'report' / 'report.html'}  and  {out / 'report' / 'metrics.json'}")
    console.print(f"  replay candles:   {out / 'replay' / 'test_candles.parquet'}")


@app.command("evaluate")
def evaluate_cmd(
    run: Path = typer.Option(None, "--run", help="run directory written by `ats train` (all strategies)"),
    bundle: Path = typer.Option(None, "--bundle", help="an existing policy bundle, evaluated on --data/--period"),
    policy: str = typer.Option("all", "--policy", help="all: every strategy; v1: V1 alone on --data/--period"),
    data: Path = typer.Option(None, "--data", help="with --bundle or --policy v1: candles parquet <SYMBOL>-<tf>.parquet "
                              "(default: the bundled 1h candles; <SYMBOL>-funding.parquet next to it is joined if "
                              "present)"),
    symbol: str = typer.Option(None, "--symbol", help="with --data: the data's symbol (default: from the file name "
                               "SYMBOL-TF.parquet); its instrument spec sets tick, step, min notional and brackets"),
    instrument_spec: Path = typer.Option(None, "--instrument-spec", help="with --data: instrument spec file "
                                         "(JSON/YAML) of the data's symbol (default: SYMBOL.spec.json next to the "
                                         "data, else the bundled table)"),
    period: str = typer.Option(None, "--period", help="with --bundle or --policy v1: START:END (UTC, END exclusive)"),
    out: Path = typer.Option(None, "--out", help="with --bundle or --policy v1: report folder (metrics.json, report.html)"),
    config: Path = typer.Option(None, "--config", help="with --policy v1: run config YAML (env and v1 sections)"),
    seed: int = typer.Option(0, "--seed", help="with --bundle: seed of the random baseline"),
    regime: bool = typer.Option(False, "--regime", help="with --policy v1 --config: regime-conditional thresholds "
                                "from an HMM fitted before the period and forward-filtered through it"),
) -> None:
    """Evaluate PPO, V1, buy-and-hold, flat and random: a run's test period (--run), an existing bundle on any
    period of any candle file (--bundle --data --period --out), or V1 alone (--policy v1)."""
    if bundle is not None and policy == "all":
        from training.evaluate import evaluate_bundle
        from training.v1_eval import data_instrument, load_v1_candles, parse_period

        if period is None or out is None:
            raise typer.BadParameter("--bundle needs --period START:END and --out DIR (and optionally --data)")
        try:
            start, end = parse_period(period)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        candles = load_v1_candles(data)
        resolved = data_instrument(data, candles, symbol=symbol, spec_path=instrument_spec)
        evaluate_bundle(bundle, candles, start, end, out, data_label=str(data or f"bundled {resolved.spec.symbol} 1h"),
                        instrument=resolved, random_seed=seed, log=_log)
        console.print(f"report: {out / 'report.html'}\nmetrics: {out / 'metrics.json'}")
        return
    if policy == "v1":
        from training.v1_eval import (
            data_instrument,
            evaluate_v1,
            load_v1_candles,
            parse_period,
            write_v1_report,
        )

        if period is None or out is None:
            raise typer.BadParameter("--policy v1 needs --period START:END and --out DIR")
        try:
            start, end = parse_period(period)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        regime_kw: dict = {}
        if config is None:
            from envs.trading_env import EnvConfig
            from fallback.config import V1Config

            if regime:
                raise typer.BadParameter("--regime needs --config (its regime section and v1.regime_adjustments)")
            env_cfg, v1_cfg = EnvConfig(), V1Config()
        else:
            from training.config import load_config

            run_cfg = load_config(config)
            env_cfg, v1_cfg = run_cfg.env, run_cfg.v1
            if regime:
                regime_kw = {"fit_regime": run_cfg.regime, "regime_columns": run_cfg.regime_input_features}
        candles = load_v1_candles(data)
        resolved = data_instrument(data, candles, symbol=symbol, spec_path=instrument_spec)
        env_cfg = env_cfg.updated(costs=env_cfg.costs.with_instrument(resolved.spec))
        try:
            res = evaluate_v1(candles, start, end, v1_cfg, env_cfg, **regime_kw)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        bar_s = float((candles.index[1] - candles.index[0]).total_seconds())
        costs = env_cfg.costs
        notes = [
            (f"V1 alone on {data or 'the bundled ' + resolved.spec.symbol + ' 1h candles'}: bars opening in "
             f"[{start}, {end}) ({len(res.equity) - 1} decisions), bar interval {bar_s / 3600:g} h."),
            resolved.describe() + ".",
            ("Regime-conditional thresholds: HMM fitted on the bars before the period, forward-filtered "
             "through it." if regime else "Base thresholds (no regime input)."),
            (f"Costs: taker fee {costs.taker_fee_bps} bps per fill, slippage {costs.slippage_bps} bps + "
             f"{costs.slippage_atr_coef} x ATR%, {costs.funding_interval_hours}-hourly funding (history where the "
             "file has one), "
             "isolated-margin liquidation; decisions at bar close, fills at the next open."),
        ]
        metrics = write_v1_report(res, out, bar_interval_s=bar_s, notes=notes)["v1"]
        _log(f"v1: return {metrics['total_return']:+.2%}, Sortino {metrics['sortino']:.2f}, profit factor "
             f"{metrics['profit_factor']:.2f}, win rate {metrics['win_rate']:.2%}, trades {metrics['n_trades']:.0f}")
        console.print(f"report: {out / 'report.html'}\nmetrics: {out / 'metrics.json'}")
        return
    if policy != "all":
        raise typer.BadParameter(f"--policy must be all or v1, got {policy!r}")
    if run is None:
        raise typer.BadParameter("--run is required (or --bundle ... --period ... --out ..., or --policy v1 ...)")
    from training.evaluate import evaluate_run

    evaluate_run(run, log=_log)
    console.print(f"report: {run / 'report' / 'report.html'}\nmetrics: {run / 'report' / 'metrics.json'}")


@app.command()
def walkforward(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", help="walk-forward YAML (see configs/walkforward_smoke.yaml)"),
    out: Path = typer.Option(..., "--out", help="output directory"),
    folds: int = typer.Option(None, "--folds", help="override the number of folds"),
    scheme: str = typer.Option(None, "--scheme", help="override: expanding | rolling"),
    tuning_dir: Path = typer.Option(
        None, "--tuning-dir",
        help="output directory of the `ats tune` search that chose this config: its trials.json n_trials is "
        "added to the deflated Sharpe ratio's trial count (on top of tuning_trials) and recorded in provenance",
    ),
    ray_address: str = typer.Option(None, "--ray-address", help="run the trainings as Ray tasks: local (Ray on this "
                                    "machine), auto (the cluster this node joined), HOST:PORT; default: the "
                                    "config's ray_address, else one after another"),
    cpus_per_task: float = typer.Option(None, "--cpus-per-task", min=0.01, help="Ray: CPUs reserved per training "
                                        "(default: the config's, else the base config's torch_threads)"),
    gpus_per_task: float = typer.Option(None, "--gpus-per-task", min=0, help="Ray: GPUs reserved per training "
                                        "(default: the config's, else 0)"),
    device: Device = typer.Option(None, "--device", help="where torch trains (TCN, PPO) in every fold (default: the "
                                  "base config's)"),
) -> None:
    """Refit the pipeline on forward folds and judge the stitched out-of-sample result (DSR, PBO, seeds)."""
    from training.fanout import RayResourceError, TaskFailedError
    from training.walkforward import load_tuning_record, load_walkforward, run_walkforward

    try:
        tuning = None if tuning_dir is None else load_tuning_record(tuning_dir)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--tuning-dir") from exc
    wf, base = load_walkforward(config, folds=folds, scheme=scheme, ray_address=ray_address,
                                cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task)
    if device is not None:
        base = base.updated(device=device.value)
    t0 = time.perf_counter()
    with counting_progress(console) as progress:
        bar = progress.add_task("walk-forward", total=None, unit="trainings")

        def on_progress(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total)

        try:
            run_walkforward(wf, base, out, log=_log, tuning=tuning, on_progress=on_progress)
        except RayResourceError as exc:
            raise typer.BadParameter(str(exc), param_hint="--cpus-per-task/--gpus-per-task") from exc
        except TaskFailedError as exc:
            if debug_requested(ctx):
                raise
            console.print(f"[bold red]walk-forward stopped[/]: {exc}\n  the failed training's run directory and "
                          "Ray's worker logs (/tmp/ray/session_latest/logs on its node) say more")
            raise typer.Exit(1) from exc
    console.print(f"\n[bold green]done[/] in {time.perf_counter() - t0:.0f} s")
    console.print(f"  report: {out / 'report.html'}\n  metrics: {out / 'metrics.json'}\n  folds: {out / 'folds.json'}")


@app.command()
def gate(
    bundle: Path = typer.Option(..., "--bundle", help="policy bundle directory"),
    report: Path = typer.Option(None, "--report", help="walk-forward or evaluate report directory (metrics.json); "
                                "default: the report the bundle's last gate verdict recorded"),
    min_dsr: float = typer.Option(0.95, help="minimum deflated Sharpe ratio"),
    max_pbo: float = typer.Option(0.5, help="maximum probability of backtest overfitting"),
    max_drawdown: float = typer.Option(0.35, help="maximum PPO test drawdown (fraction)"),
    require_beat_v1: bool = typer.Option(True, help="PPO test Sortino must exceed V1's"),
    paper_db: str = typer.Option(None, "--paper-db", help="state database of the bundle's paper run on live candles "
                                 "(`ats serve --mode paper` without --replay): the paper protection's evidence"),
    paper_run_id: str = typer.Option(None, "--paper-run-id", help="run of --paper-db (default: the latest)"),
    protection_days: float = typer.Option(14.0, "--protection-days", min=0, help="days of paper trading on live "
                                          "candles before PASS (0: no paper protection)"),
) -> None:
    """Write PASS, HOLD or REJECT with reasons into the bundle's manifest (paper protection: README)."""
    from ats_cli.gate_cmd import paper_evidence, recorded_report
    from training.gate import GateConfig, ReportMismatchError, apply_gate

    cfg = GateConfig(min_dsr=min_dsr, max_pbo=max_pbo, max_drawdown_frac=max_drawdown, require_beat_v1=require_beat_v1,
                     paper_protection_days=protection_days)
    try:
        report = report if report is not None else recorded_report(bundle)
        paper = None if paper_db is None else paper_evidence(paper_db, paper_run_id)
        result = apply_gate(bundle, report, cfg, paper=paper)
    except (FileNotFoundError, ReportMismatchError, ValueError) as exc:
        console.print(f"[bold red]gate refused:[/] {exc}")
        raise typer.Exit(code=2) from exc
    colour = {"PASS": "green", "HOLD": "yellow", "REJECT": "red"}[result["verdict"]]
    console.print(f"[bold {colour}]{result['verdict']}[/]")
    for reason in result["reasons"]:
        console.print(f"  {reason}")
    console.print(f"  recorded in {bundle / 'manifest.json'}")


def _register_subcommands() -> None:
    """Sub-command groups that live in their own modules."""
    from ats_cli import check_cmd, data_cmd, ensemble_cmd, serve_cmd, status_cmd, tune_cmd, v1_cmd

    app.add_typer(data_cmd.app, name="data", help="market data: download (ccxt) and quality check")
    app.add_typer(check_cmd.app, name="check", help="checks: look-ahead (truncation) check of features and models")
    app.command("sweep-v1", help="walk-forward parameter sweep of the V1 rules")(v1_cmd.sweep)
    app.command("tune", help="Ray Tune search of PPO/reward parameters (validation folds)")(tune_cmd.tune)
    app.command("ensemble", help="several trained bundles (seeds) as one bundle: mean action or majority direction")(
        ensemble_cmd.ensemble)
    app.add_typer(serve_cmd.app, name="serve")
    app.command("status", help="serving state: mode, position, equity, today's PnL, risk, V2/V1 shares")(
        status_cmd.status
    )
    from ats_cli import report_cmd

    app.command("report", help="HTML report of a serving period (equity, trades, fallback share, incidents, drift)")(
        report_cmd.report
    )
    from ats_cli import dashboard_cmd

    app.command("dashboard", help="read-only web dashboard of a serving database (loopback by default)")(
        dashboard_cmd.dashboard
    )


_register_subcommands()

if __name__ == "__main__":
    app()
