"""Run independent research tasks one after another or as Ray tasks, with the same results in the same order.

A *task* is a picklable item and a module-level function ``fn(item, attempt, *shared) -> result`` (``attempt``
counts from 1; ``shared`` are large read-only inputs every task needs, sent to a Ray cluster once through the
object store). :func:`run_tasks` returns the results in the order of ``items`` whatever order they finish in,
plus an :class:`ExecutionReport` (where each task ran, its wall time, attempts and errors).

* Sequential (``ray=None``): ``fn`` runs in this process, in order; an exception propagates unchanged (with a
  note naming the task), as a plain loop would.
* Ray (:class:`RaySettings`): every item is a Ray remote task with the declared ``num_cpus`` / ``num_gpus``
  (Ray's logical resources: the scheduler starts a task only where they are free, and sets
  ``CUDA_VISIBLE_DEVICES`` to the GPUs it granted). Ray's own retries are off (``max_retries=0``); a task that
  raises or whose worker dies is resubmitted here, ``retries`` times (default once), and every failed attempt
  is logged and listed in the report. A task that fails every attempt cancels the others and raises
  :class:`TaskFailedError` naming it; nothing is dropped silently.

Ray addresses: ``"local"`` starts a Ray on this machine (``local_num_cpus`` CPUs, all when None, no
dashboard); ``"auto"`` joins the cluster started on this node by ``ray start``; ``HOST:PORT`` joins the head
node at that address (``ray://HOST:PORT``: through Ray Client). When Ray is already initialised in this
process (a test, a notebook) that Ray is used and left running.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
Log = Callable[[str], None]
#: ``on_progress(done, total)`` after every finished task (and ``(0, total)`` before the first).
Progress = Callable[[int, int], None]

RAY_ADDRESS = re.compile(r"(auto|local|(ray://)?[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5})")


def check_ray_address(address: str) -> str:
    """``address`` if it is ``auto``, ``local``, ``HOST:PORT`` or ``ray://HOST:PORT``.

    Raises
    ------
    ValueError
        Otherwise, with the accepted forms.
    """
    if not isinstance(address, str) or not RAY_ADDRESS.fullmatch(address.strip()):
        raise ValueError(f"ray address must be auto, local, HOST:PORT or ray://HOST:PORT, got {address!r}")
    return address.strip()


@dataclass(frozen=True)
class RaySettings:
    """Where and with what resources the tasks run on Ray.

    ``num_cpus`` / ``num_gpus``: Ray logical CPUs / GPUs reserved per task (fractions allowed; a GPU fraction
    lets several tasks share one GPU). ``retries``: resubmissions of a failed task (0: none). ``local_num_cpus``:
    CPUs of the Ray started for ``address="local"`` (None: every CPU of the machine).

    Raises
    ------
    ValueError
        On an address of another form, negative resources or retries, or ``num_cpus`` of 0 with ``num_gpus`` 0.
    """

    address: str = "local"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    retries: int = 1
    local_num_cpus: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", check_ray_address(self.address))
        if self.num_cpus < 0 or self.num_gpus < 0 or self.num_cpus + self.num_gpus <= 0:
            raise ValueError(f"a task needs num_cpus >= 0 and num_gpus >= 0, not both 0; got {self.num_cpus}, "
                             f"{self.num_gpus}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.local_num_cpus is not None and self.local_num_cpus < 1:
            raise ValueError(f"local_num_cpus must be >= 1, got {self.local_num_cpus}")


@dataclass
class TaskRecord:
    """How one task ran: its label, the host and process of the attempt that succeeded, its wall time (s), the
    number of attempts, the error of each failed attempt (``"ExcType: message"``) and ``done_rank``, its place
    in the order the tasks finished (0: first)."""

    index: int
    label: str
    attempts: int = 0
    host: str | None = None
    pid: int | None = None
    wall_s: float | None = None
    errors: list[str] = field(default_factory=list)
    done_rank: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class ExecutionReport:
    """Where a set of tasks ran: ``backend`` ``sequential`` or ``ray``, the Ray address and per-task resources,
    the total wall time (s), the hosts used, and one :class:`TaskRecord` per task (in the order of the items)."""

    backend: str
    n_tasks: int
    wall_s: float
    tasks: list[TaskRecord]
    ray_address: str | None = None
    num_cpus_per_task: float | None = None
    num_gpus_per_task: float | None = None
    retries_allowed: int = 0
    cluster_resources: dict[str, float] | None = None

    @property
    def retried(self) -> list[TaskRecord]:
        """The tasks that failed at least once (and then succeeded: a task that failed every attempt raises)."""
        return [t for t in self.tasks if t.errors]

    def as_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (``retried`` lists the labels and errors of retried tasks)."""
        return {"backend": self.backend, "ray_address": self.ray_address, "n_tasks": self.n_tasks,
                "num_cpus_per_task": self.num_cpus_per_task, "num_gpus_per_task": self.num_gpus_per_task,
                "retries_allowed": self.retries_allowed, "cluster_resources": self.cluster_resources,
                "wall_s": self.wall_s, "hosts": sorted({t.host for t in self.tasks if t.host}),
                "retried": [{"label": t.label, "attempts": t.attempts, "errors": t.errors} for t in self.retried],
                "tasks": [t.as_json() for t in self.tasks]}


class RayResourceError(ValueError):
    """The Ray cluster has fewer CPUs or GPUs in all than one task asks for: no task could ever start."""


class TaskFailedError(RuntimeError):
    """A task failed every attempt (Ray); the message names the task and gives each attempt's error."""

    def __init__(self, record: TaskRecord) -> None:
        self.record = record
        errors = "; ".join(f"attempt {i + 1}: {e}" for i, e in enumerate(record.errors))
        super().__init__(f"task {record.label!r} failed {record.attempts} time(s), the study stops: {errors}")


def _eta_text(done: int, total: int, elapsed_s: float, unit: str) -> str:
    if not done:
        return ""
    return (f"; {done}/{total} {unit} done in {elapsed_s / 60:.1f} min, "
            f"ETA {elapsed_s / done * (total - done) / 60:.0f} min")


def _call(fn: Callable[..., R], item: Any, attempt: int, *shared: Any) -> tuple[R, str, int, float]:
    """Run one task and say where and how long (the Ray remote body; also the sequential one)."""
    t0 = time.perf_counter()
    value = fn(item, attempt, *shared)
    return value, socket.gethostname(), os.getpid(), time.perf_counter() - t0


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # RayTaskError wraps the task's exception
    inner = cause if isinstance(cause, BaseException) else exc
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[-1] if text else ''}"[:500]


def run_tasks(
    fn: Callable[..., R],
    items: Sequence[Any],
    *,
    labels: Sequence[str],
    shared: tuple[Any, ...] = (),
    ray: RaySettings | None = None,
    log: Log = lambda s: None,
    on_progress: Progress | None = None,
    unit: str = "tasks",
) -> tuple[list[R], ExecutionReport]:
    """Run ``fn(item, attempt, *shared)`` for every item; results in the order of ``items``.

    Parameters
    ----------
    fn : callable
        A module-level function (Ray pickles it by reference).
    items : sequence
        Picklable task inputs.
    labels : sequence of str
        One label per item (logs, progress, errors, the report).
    ray : RaySettings, optional
        None: run sequentially in this process.
    unit : str
        What a task is, for the log (``"trainings"``).

    Raises
    ------
    ValueError
        If ``labels`` and ``items`` differ in length.
    TaskFailedError
        Ray: a task failed ``1 + ray.retries`` times.
    Exception
        Sequential: whatever ``fn`` raised, with a note naming the task.
    """
    if len(labels) != len(items):
        raise ValueError(f"{len(labels)} labels for {len(items)} tasks")
    records = [TaskRecord(i, str(lab)) for i, lab in enumerate(labels)]
    if on_progress:
        on_progress(0, len(items))
    t0 = time.monotonic()
    if ray is None:
        results = []
        for i, item in enumerate(items):
            log(labels[i] + _eta_text(i, len(items), time.monotonic() - t0, unit))
            records[i].attempts = 1
            try:
                value, host, pid, wall = _call(fn, item, 1, *shared)
            except Exception as exc:
                exc.add_note(f"in task {labels[i]!r}")
                raise
            records[i].host, records[i].pid, records[i].wall_s, records[i].done_rank = host, pid, wall, i
            results.append(value)
            if on_progress:
                on_progress(i + 1, len(items))
        return results, ExecutionReport("sequential", len(items), time.monotonic() - t0, records)
    return _run_ray(fn, items, records, shared, ray, log, on_progress, unit, t0)


def init_ray(settings: RaySettings) -> bool:
    """Start or join Ray per ``settings.address`` unless this process already has Ray; True if this call did
    (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if settings.address == "local":
        ray.init(num_cpus=settings.local_num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=settings.address, log_to_driver=False)
    return True


def _run_ray(fn, items, records: list[TaskRecord], shared, settings: RaySettings, log: Log,
             on_progress: Progress | None, unit: str, t0: float) -> tuple[list, ExecutionReport]:
    import ray
    from ray.exceptions import RayError

    started = init_ray(settings)
    try:
        resources = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
        if settings.num_cpus > resources.get("CPU", 0.0) or settings.num_gpus > resources.get("GPU", 0.0):
            raise RayResourceError(
                f"each task asks for {settings.num_cpus:g} CPU and {settings.num_gpus:g} GPU but the Ray cluster at "
                f"{settings.address} has {resources.get('CPU', 0):g} CPU and {resources.get('GPU', 0):g} GPU in all: "
                "no task could ever start")
        remote = ray.remote(_call).options(num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, max_retries=0,
                                           retry_exceptions=False)
        shared_refs = [ray.put(x) for x in shared]
        pending: dict[Any, int] = {}

        def submit(i: int) -> None:
            records[i].attempts += 1
            pending[remote.remote(fn, items[i], records[i].attempts, *shared_refs)] = i

        for i in range(len(items)):
            submit(i)
        log(f"{len(items)} {unit} submitted to Ray ({settings.address}; {settings.num_cpus:g} CPU, "
            f"{settings.num_gpus:g} GPU each; cluster {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU)")
        results: list[Any] = [None] * len(items)
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            rec = records[i]
            try:
                value, host, pid, wall = ray.get(ready[0])
            except RayError as exc:
                rec.errors.append(_error_text(exc))
                if rec.attempts <= settings.retries:
                    log(f"{rec.label}: attempt {rec.attempts} failed ({rec.errors[-1]}); retrying")
                    submit(i)
                    continue
                log(f"{rec.label}: attempt {rec.attempts} failed ({rec.errors[-1]}); no retry left, cancelling "
                    f"{len(pending)} other task(s)")
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise TaskFailedError(rec) from exc
            results[i] = value
            rec.host, rec.pid, rec.wall_s, rec.done_rank = host, pid, wall, done
            done += 1
            retried = f" after {rec.attempts - 1} failed attempt(s)" if rec.errors else ""
            log(f"{rec.label}: done on {host} in {wall:.0f} s{retried}"
                + _eta_text(done, len(items), time.monotonic() - t0, unit))
            if on_progress:
                on_progress(done, len(items))
        return results, ExecutionReport(
            "ray", len(items), time.monotonic() - t0, records, ray_address=settings.address,
            num_cpus_per_task=settings.num_cpus, num_gpus_per_task=settings.num_gpus, retries_allowed=settings.retries,
            cluster_resources=resources)
    finally:
        if started:
            ray.shutdown()
