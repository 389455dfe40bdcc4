"""Walk-forward throughput: trainings per hour run one after another and as local Ray tasks, on the same config.

Usage::

    python -m benchmarks.walkforward_throughput [--config configs/walkforward_smoke.yaml] [--ray-cpus 2]
                                                [--cpus-per-task 1] [--json PATH]

Runs the whole study twice through the production entry point (:func:`training.walkforward.run_walkforward`, as
``ats walkforward`` does), into the same output path so the reports can be compared byte for byte:

* ``sequential``: every (variant, seed, fold) training in this process, one after another;
* ``ray``: the same trainings as Ray tasks on a local Ray started here with ``--ray-cpus`` CPUs, each task
  reserving ``--cpus-per-task`` CPUs (so ``ray_cpus / cpus_per_task`` trainings run at once). Ray's start-up
  (``ray_init_s``) is timed apart and included in the Ray study's wall time.

For each: the study's wall time (trainings, backtests, statistics, report), ``trainings_per_hour`` = trainings /
wall hours, and the wall time of each training (sequential: between progress calls; Ray: measured inside each
task, from metrics.json ``execution``). ``identical_report``: the two metrics.json are equal once the Ray run's
``execution`` block is left out. Torch runs with the base config's ``torch_threads`` in every training, so with
more trainings at once than cores the threads oversubscribe the CPUs: on a small machine the Ray figure measures
what a cluster buys only in the overlap of one training's serial parts with another's. The machine may be shared:
the load average is printed with the table. Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from market.json_codec import dumps as json_dumps


def _study(config: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """Run the walk-forward of ``config`` into ``out``; wall time, per-training times, trainings per hour."""
    from training.walkforward import load_walkforward, run_walkforward

    wf, base = load_walkforward(config, **overrides)
    marks: list[float] = []
    t0 = time.perf_counter()
    summary = run_walkforward(wf, base, out, log=lambda s: None, on_progress=lambda d, n: marks.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    n = len(marks) - 1
    execution = summary.get("execution")
    per = ([t["wall_s"] for t in execution["tasks"]] if execution else
           [b - a for a, b in itertools.pairwise(marks)])
    return {"n_trainings": n, "wall_s": wall, "trainings_per_hour": n / (wall / 3600.0), "per_training_s": per,
            "median_training_s": sorted(per)[len(per) // 2],
            "hosts": execution["hosts"] if execution else [os.uname().nodename]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/walkforward_smoke.yaml"))
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray")
    parser.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs reserved per training task")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.config.is_file():
        print(f"config {args.config} not found: run from the repository root or pass --config", file=sys.stderr)
        raise SystemExit(2)
    import ray

    result: dict[str, Any] = {"config": str(args.config), "cpu_count": os.cpu_count(),
                              "load_avg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        result["sequential"] = _study(args.config, out)
        shutil.move(out, Path(tmp) / "sequential")
        t0 = time.perf_counter()
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t0
        try:
            on_ray = _study(args.config, out, ray_address="local", cpus_per_task=args.cpus_per_task)
        finally:
            ray.shutdown()
        on_ray["wall_s"] += init_s
        on_ray["trainings_per_hour"] = on_ray["n_trainings"] / (on_ray["wall_s"] / 3600.0)
        result["ray"] = {**on_ray, "ray_init_s": init_s, "ray_cpus": args.ray_cpus,
                         "cpus_per_task": args.cpus_per_task,
                         "concurrent_trainings": int(args.ray_cpus // args.cpus_per_task)}
        seq = json.loads((Path(tmp) / "sequential" / "metrics.json").read_text())
        ray_metrics = json.loads((out / "metrics.json").read_text())
        ray_metrics.pop("execution", None)
        result["identical_report"] = seq == ray_metrics
    result["speedup"] = result["ray"]["trainings_per_hour"] / result["sequential"]["trainings_per_hour"]
    result["load_avg_after"] = os.getloadavg()
    s, r = result["sequential"], result["ray"]
    print(f"\n{args.config}: {s['n_trainings']} trainings")
    print(f"{'mode':<44}{'wall s':>9}{'trainings/h':>13}{'median training s':>19}")
    print(f"{'sequential (one process)':<44}{s['wall_s']:>9.1f}{s['trainings_per_hour']:>13.0f}"
          f"{s['median_training_s']:>19.1f}")
    label = f"local Ray, {args.ray_cpus} CPUs, {args.cpus_per_task:g} CPU/task"
    print(f"{label:<44}{r['wall_s']:>9.1f}{r['trainings_per_hour']:>13.0f}{r['median_training_s']:>19.1f}")
    print(f"speed-up {result['speedup']:.2f} x (Ray start-up {r['ray_init_s']:.1f} s included); reports identical: "
          f"{result['identical_report']}")
    print(f"load average {result['load_avg_before'][0]:.2f} before, {result['load_avg_after'][0]:.2f} after, on "
          f"{result['cpu_count']} CPUs (shared machine: compare within one run)")
    if args.json:
        args.json.write_text(json_dumps(result, strict=False, indent=1))
    return result


if __name__ == "__main__":
    main()
