"""Device placement and CPU thread counts for training (pure functions; no torch/ray import needed).

``--device auto|cpu|cuda`` is resolved by :func:`agents.ppo_sb3.resolve_device` (``auto`` -> ``cuda``
when torch sees a GPU). The TCN and the SB3 policy go to that device; the RLlib learner gets GPUs
through :func:`rllib_num_gpus`. On CPU, :func:`torch_threads_for` keeps the learner's torch threads
from competing with the env-runner processes for the same cores.
"""

from __future__ import annotations

import os


def rllib_num_gpus(device: str, requested: float | None) -> float:
    """GPUs per RLlib learner: ``requested`` when given, else 1 for ``device == "cuda"`` and 0 for ``cpu``.

    Raises
    ------
    ValueError
        If ``requested`` < 0, ``requested`` > 0 while ``device == "cpu"`` (contradictory), or the
        device is not a resolved ``cpu``/``cuda``.
    """
    if requested is not None and requested < 0:
        raise ValueError(f"num_gpus_per_learner must be >= 0, got {requested}")
    if device == "cpu":
        if requested:
            raise ValueError(f"num_gpus_per_learner={requested} contradicts device=cpu")
        return 0.0
    if device != "cuda":
        raise ValueError(f"device must be cpu or cuda after resolution, got {device!r}")
    return 1.0 if requested is None else float(requested)


def default_torch_threads(n_env_workers: int, n_cpus: int | None = None) -> int:
    """Torch intra-op threads for a learner that shares this machine with ``n_env_workers`` env processes.

    Each RLlib env runner is its own process holding one CPU (``num_cpus_per_env_runner=1``; Ray sets
    ``OMP_NUM_THREADS=1`` in it), so the learner gets the CPUs left over:
    ``max(1, n_cpus - n_env_workers)``; ``n_cpus`` defaults to ``os.cpu_count()``.

    Raises
    ------
    ValueError
        If ``n_env_workers`` < 0.
    """
    if n_env_workers < 0:
        raise ValueError(f"n_env_workers must be >= 0, got {n_env_workers}")
    n = (os.cpu_count() or 1) if n_cpus is None else n_cpus
    return max(1, int(n) - int(n_env_workers))


def torch_threads_for(
    backend: str, configured: int, *, n_env_runners: int = 0, joins_cluster: bool = False, n_cpus: int | None = None
) -> int:
    """Torch threads of the training process on CPU.

    SB3 steps its envs in-process between updates, so the configured count is used as is. A local
    RLlib run with ``n_env_runners`` sampling processes caps it at :func:`default_torch_threads`;
    when joining a cluster the runners may live on other nodes, so the configured count is kept.
    """
    if configured < 1:
        raise ValueError(f"torch threads must be >= 1, got {configured}")
    if backend == "rllib" and not joins_cluster:
        return min(configured, default_torch_threads(n_env_runners, n_cpus))
    return configured
