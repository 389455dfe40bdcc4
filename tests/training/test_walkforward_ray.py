"""Walk-forward trainings as Ray tasks (issue 21): the executor (order, retries, failures, resources) on a local
Ray of 2 CPUs, and the smoke walk-forward run sequentially and on Ray giving the same report."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from training.fanout import RayResourceError, RaySettings, TaskFailedError, check_ray_address, run_tasks

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs (the machine's), no dashboard; shut down after the module's tests."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# -- the tasks the executor tests run (module level: Ray pickles them by reference) ---------------------------


def _square_slow_first(item: int, attempt: int) -> int:
    """Item 0 takes longest, so it finishes after the others."""
    if item == 0:
        time.sleep(1.5)
    return item * item


def _fails_first_attempt(item: int, attempt: int) -> tuple[int, int]:
    if item == 1 and attempt == 1:
        raise RuntimeError(f"injected failure of item {item}")
    return item, attempt


def _worker_dies_first_attempt(item: int, attempt: int) -> int:
    if item == 0 and attempt == 1:
        os._exit(3)  # the worker process dies: Ray reports a crashed worker, not an exception
    return item + 100


def _always_fails(item: int, attempt: int) -> int:
    if item == 2:
        raise ValueError(f"item {item} is broken (attempt {attempt})")
    return item


def _with_shared(item: int, attempt: int, table: dict) -> int:
    return table[item]


# -- executor ---------------------------------------------------------------------------------------------------


def test_results_follow_the_items_not_the_completion_order(local_ray):
    settings = RaySettings(address="local", num_cpus=1)
    results, report = run_tasks(_square_slow_first, [0, 1, 2, 3], labels=["a", "b", "c", "d"], ray=settings)
    assert results == [0, 1, 4, 9]
    ranks = [t.done_rank for t in report.tasks]
    assert sorted(ranks) == [0, 1, 2, 3] and ranks[0] == 3  # item 0 finished last, and still comes first
    assert report.backend == "ray" and report.n_tasks == 4 and report.retried == []
    assert all(t.attempts == 1 and t.host and t.wall_s is not None for t in report.tasks)
    assert report.cluster_resources["CPU"] == 2.0


def test_a_task_that_raises_is_retried_once_and_reported(local_ray):
    seen = []
    progress = []
    results, report = run_tasks(_fails_first_attempt, [0, 1, 2], labels=["t0", "t1", "t2"],
                                ray=RaySettings(num_cpus=1), log=seen.append,
                                on_progress=lambda d, n: progress.append((d, n)))
    assert results == [(0, 1), (1, 2), (2, 1)]  # item 1 succeeded on its second attempt
    [retried] = report.retried
    assert retried.label == "t1" and retried.attempts == 2
    assert retried.errors == ["RuntimeError: injected failure of item 1"]
    assert report.as_json()["retried"] == [{"label": "t1", "attempts": 2,
                                           "errors": ["RuntimeError: injected failure of item 1"]}]
    assert progress[0] == (0, 3) and progress[-1] == (3, 3) and len(progress) == 4
    assert any("t1" in line and "retrying" in line for line in seen)


def test_a_task_whose_worker_dies_is_retried(local_ray):
    results, report = run_tasks(_worker_dies_first_attempt, [0, 1], labels=["dies", "lives"],
                                ray=RaySettings(num_cpus=1))
    assert results == [100, 101]
    [retried] = report.retried
    assert retried.label == "dies" and retried.attempts == 2 and len(retried.errors) == 1


def test_a_task_failing_every_attempt_stops_the_run_and_names_the_task(local_ray):
    with pytest.raises(TaskFailedError, match=r"'variant base, fold 3/3, seed 7' failed 2 time") as info:
        run_tasks(_always_fails, [0, 1, 2], labels=["x", "y", "variant base, fold 3/3, seed 7"],
                  ray=RaySettings(num_cpus=1))
    rec = info.value.record
    assert rec.attempts == 2 and len(rec.errors) == 2 and all(e.startswith("ValueError: item 2 is broken")
                                                             for e in rec.errors)
    with pytest.raises(TaskFailedError, match="failed 1 time"):  # retries: 0 -> one attempt
        run_tasks(_always_fails, [2], labels=["z"], ray=RaySettings(num_cpus=1, retries=0))


def test_shared_inputs_and_resources(local_ray):
    results, _ = run_tasks(_with_shared, [1, 2], labels=["a", "b"], shared=({1: "one", 2: "two"},),
                           ray=RaySettings(num_cpus=0.5))
    assert results == ["one", "two"]
    with pytest.raises(RayResourceError, match="3 CPU"):
        run_tasks(_with_shared, [1], labels=["a"], shared=({1: 1},), ray=RaySettings(num_cpus=3))
    with pytest.raises(RayResourceError, match="1 GPU"):
        run_tasks(_with_shared, [1], labels=["a"], shared=({1: 1},), ray=RaySettings(num_cpus=1, num_gpus=1))


def test_sequential_runs_in_order_and_lets_errors_through_with_the_task_named():
    results, report = run_tasks(_fails_first_attempt, [0, 2], labels=["a", "b"])
    assert results == [(0, 1), (2, 1)] and report.backend == "sequential" and report.as_json()["retried"] == []
    with pytest.raises(RuntimeError, match="injected failure") as info:
        run_tasks(_fails_first_attempt, [0, 1], labels=["a", "fold 2/2, seed 1"])
    assert "in task 'fold 2/2, seed 1'" in info.value.__notes__
    with pytest.raises(ValueError, match="2 labels for 1 tasks"):
        run_tasks(_square_slow_first, [1], labels=["a", "b"])


def test_settings_and_addresses_are_checked():
    for good in ("auto", "local", "10.0.0.10:6379", "head.example:6379", "ray://10.0.0.10:10001"):
        assert check_ray_address(good) == good
    for bad in ("", "cluster", "10.0.0.10", "http://x:1", "a b:1"):
        with pytest.raises(ValueError, match="ray address"):
            check_ray_address(bad)
    with pytest.raises(ValueError, match="not both 0"):
        RaySettings(num_cpus=0)
    with pytest.raises(ValueError, match="retries"):
        RaySettings(retries=-1)


# -- the walk-forward config and CLI ------------------------------------------------------------------------


def test_walkforward_config_takes_ray_settings_and_keeps_them_out_of_the_study(tmp_path):
    from pydantic import ValidationError

    from training.config import ConfigError
    from training.walkforward import EXECUTION_FIELDS, load_walkforward, ray_settings

    cfg = REPO / "configs" / "walkforward_smoke.yaml"
    wf, base = load_walkforward(cfg)
    assert wf.ray_address is None and ray_settings(wf, base) is None
    wf, base = load_walkforward(cfg, ray_address="local", cpus_per_task=1)
    assert ray_settings(wf, base) == RaySettings(address="local", num_cpus=1.0, num_gpus=0.0, retries=1)
    wf, _ = load_walkforward(cfg, ray_address="auto")
    assert ray_settings(wf, base).num_cpus == base.torch_threads  # default: the run's torch threads
    assert not set(EXECUTION_FIELDS) & set(wf.study_dump())  # provenance and report describe the study only
    with pytest.raises(ConfigError, match="ray_address"):
        load_walkforward(cfg, ray_address="my-cluster")
    with pytest.raises(ConfigError, match="gpus_per_task"):
        load_walkforward(cfg, gpus_per_task=-1)
    wf, _ = load_walkforward(cfg, ray_address="auto", gpus_per_task=0.5)
    with pytest.raises(ConfigError, match="contradicts device cpu"):
        ray_settings(wf, base)  # smoke.yaml trains on cpu
    wf, _ = load_walkforward(cfg, ray_address="auto")
    with pytest.raises(ConfigError, match="gpus_per_task > 0"):
        ray_settings(wf, base.updated(device="cuda"))
    assert ray_settings(wf.model_copy(update={"gpus_per_task": 1.0}), base.updated(device="cuda")).num_gpus == 1.0
    with pytest.raises(ValidationError):
        type(wf).model_validate({**wf.model_dump(), "task_retries": -1})
    wf, _ = load_walkforward(cfg, cpus_per_task=2)  # a resource without Ray would be ignored: refused
    with pytest.raises(ConfigError, match="need ray_address"):
        ray_settings(wf, base)


def test_walkforward_cli_passes_ray_options_and_device(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import training.walkforward as wf_mod
    from ats_cli.main import app

    seen = {}

    def fake(wf, base, out, *, log, tuning, on_progress):
        seen.update(wf=wf, base=base)
        on_progress(0, 6)
        on_progress(6, 6)

    monkeypatch.setattr(wf_mod, "run_walkforward", fake)
    args = ["walkforward", "--config", str(REPO / "configs" / "walkforward_smoke.yaml"), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, [*args, "--ray-address", "local", "--cpus-per-task", "1", "--device", "auto"])
    assert res.exit_code == 0, res.output
    assert seen["wf"].ray_address == "local" and seen["wf"].cpus_per_task == 1.0 and seen["base"].device == "auto"
    assert "6/6 trainings" in res.output
    seen.clear()
    res = CliRunner().invoke(app, [*args, "--ray-address", "nowhere"])
    assert res.exit_code == 2 and seen == {} and "ray_address" in res.output


def test_walkforward_cli_reports_a_failed_training_and_exits_1(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import training.walkforward as wf_mod
    from ats_cli.main import app
    from training.fanout import TaskRecord

    def fake(wf, base, out, *, log, tuning, on_progress):
        raise TaskFailedError(TaskRecord(4, "fold 1/2, seed 2: train ...", attempts=2,
                                         errors=["RuntimeError: a", "RuntimeError: b"]))

    monkeypatch.setattr(wf_mod, "run_walkforward", fake)
    res = CliRunner().invoke(app, ["walkforward", "--config", str(REPO / "configs" / "walkforward_smoke.yaml"),
                                   "--out", str(tmp_path / "o"), "--ray-address", "local"])
    assert res.exit_code == 1
    assert "fold 1/2, seed 2" in res.output and "attempt 2: RuntimeError: b" in res.output


# -- sequential vs Ray: the same report ----------------------------------------------------------------------

#: metrics.json keys a Ray run adds and a sequential run lacks: where and how long the trainings ran (hosts, wall
#: times, per-task resources, retries). Nothing else may differ.
EXECUTION_KEYS = ("execution",)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # 2 x 6 smoke trainings on 2 shared cores
def test_sequential_and_ray_walkforward_reports_are_identical(tmp_path, local_ray, monkeypatch):
    """configs/walkforward_smoke.yaml (2 folds x 3 seeds) sequentially, then as 6 Ray tasks of 1 CPU on a local Ray
    of 2 CPUs (two run at once, so they finish out of order), into the same output path: metrics.json, folds.json
    and report.html are identical except the Ray run's ``execution`` block.

    The report's ``provenance.git_commit`` is read from the repository when the report is written; other sessions
    commit to this shared checkout while the test runs, so it is pinned to one value for both runs (it is the code
    version, the same code runs both)."""
    import training.provenance
    from training.walkforward import load_walkforward, run_walkforward

    commit = training.provenance.git_commit()
    monkeypatch.setattr(training.provenance, "git_commit", lambda repo_dir=None: commit)

    out = tmp_path / "out"
    wf, base = load_walkforward(REPO / "configs" / "walkforward_smoke.yaml")
    seq_summary = run_walkforward(wf, base, out, log=lambda s: None)
    shutil.move(out, tmp_path / "seq")
    wf_ray = wf.model_copy(update={"ray_address": "local", "cpus_per_task": 1.0})
    ray_summary = run_walkforward(wf_ray, base, out, log=lambda s: None)
    seq = json.loads((tmp_path / "seq" / "metrics.json").read_text())
    ray_metrics = json.loads((out / "metrics.json").read_text())
    assert "execution" not in seq and set(ray_metrics) - set(seq) == set(EXECUTION_KEYS)
    assert {k: v for k, v in ray_metrics.items() if k not in EXECUTION_KEYS} == seq
    assert seq_summary == seq and {k: v for k, v in ray_summary.items() if k not in EXECUTION_KEYS} == seq
    assert (out / "folds.json").read_bytes() == (tmp_path / "seq" / "folds.json").read_bytes()
    assert (out / "report.html").read_bytes() == (tmp_path / "seq" / "report.html").read_bytes()
    ex = ray_metrics["execution"]
    assert ex["backend"] == "ray" and ex["n_tasks"] == 6 and ex["num_cpus_per_task"] == 1.0 and ex["retried"] == []
    assert [t["label"][:16] for t in ex["tasks"]] == [f"fold {k}/2, seed {s}" for s in (0, 1, 2) for k in (1, 2)]
    assert sorted(t["done_rank"] for t in ex["tasks"]) == list(range(6))
    # the trainings themselves are the same, bit for bit (weights of every fold and seed)
    for k in (0, 1):
        for s in (0, 1, 2):
            rel = Path(f"fold{k}") / f"seed{s}" / "bundle" / "policy.safetensors"
            assert (out / rel).read_bytes() == (tmp_path / "seq" / rel).read_bytes(), rel


# -- ats sweep-v1 on Ray ------------------------------------------------------------------------------------------


def test_v1_sweep_on_ray_equals_the_sequential_sweep(local_ray, tmp_path):
    """The combinations' backtests as Ray tasks (candles shared once): the same tables and pooled result, plus an
    execution record; the CLI writes it to execution.json."""
    import pandas as pd
    from typer.testing import CliRunner

    from ats_cli.main import app
    from envs.trading_env import EnvConfig
    from training.v1_eval import load_v1_candles, walk_forward_sweep

    candles = load_v1_candles(None)
    args = (candles, pd.Timestamp("2023-01-01", tz="UTC"), pd.Timestamp("2023-05-01", tz="UTC"),
            {"breakout_k": [0.3, 0.8], "trigger_mode": ["breakout", "either"]}, EnvConfig())
    seq = walk_forward_sweep(*args, n_folds=2, min_train_trades=1)
    progress = []
    on_ray = walk_forward_sweep(*args, n_folds=2, min_train_trades=1, ray=RaySettings(num_cpus=1),
                                on_progress=lambda d, n: progress.append((d, n)))
    pd.testing.assert_frame_equal(seq["combos"], on_ray["combos"])
    pd.testing.assert_frame_equal(seq["folds"], on_ray["folds"])
    assert seq["walk_forward"] == on_ray["walk_forward"] and seq["execution"] is None
    assert on_ray["execution"]["n_tasks"] == 4 and on_ray["execution"]["retried"] == []
    assert progress[-1] == (4, 4)
    res = CliRunner().invoke(app, ["sweep-v1", "--period", "2023-01-01:2023-03-01", "--grid", "breakout_k=0.3,0.8",
                                   "--folds", "2", "--min-train-trades", "1", "--out", str(tmp_path / "v1"),
                                   "--ray-address", "local"])
    assert res.exit_code == 0, res.output
    ex = json.loads((tmp_path / "v1" / "execution.json").read_text())
    assert ex["backend"] == "ray" and [t["label"] for t in ex["tasks"]] == [
        "combination 1/2 {'breakout_k': 0.3}", "combination 2/2 {'breakout_k': 0.8}"]
    res = CliRunner().invoke(app, ["sweep-v1", "--period", "2023-01-01:2023-03-01", "--ray-address", "x"])
    assert res.exit_code == 2 and "ray address" in res.output
