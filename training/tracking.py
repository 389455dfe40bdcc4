"""Optional Weights & Biases tracking of a training run (``ats train --wandb``).

W&B mirrors the run's TensorBoard scalars (``wandb.tensorboard.patch`` with the run's ``tb/PPO_1`` as
root: every ``SummaryWriter`` event the SB3 or RLlib backend writes there is logged under the same
tag, e.g. ``episode/sortino``, and the event files are saved with the W&B run)
and records the full run config. Without ``WANDB_API_KEY`` (and no ``WANDB_MODE`` set) the run is
written offline, to ``$WANDB_DIR/wandb/offline-run-*`` (``WANDB_DIR`` defaults to the run
directory); ``wandb sync`` uploads it later. W&B is never required: if it cannot start, the
failure is logged and training goes on without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def wandb_mode(env: Mapping[str, str] | None = None) -> str:
    """``WANDB_MODE`` when set, else ``online`` with a ``WANDB_API_KEY`` and ``offline`` without one."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    return "online" if env.get("WANDB_API_KEY") else "offline"


@contextmanager
def wandb_tracking(
    enabled: bool,
    *,
    config: Mapping[str, Any],
    run_dir: Path,
    name: str,
    project: str | None = None,
    log: Callable[[str], None] = print,
) -> Iterator[Any | None]:
    """Context manager: a W&B run mirroring TensorBoard while the block runs (None when disabled/failed).

    Must be entered *before* the backends create their TensorBoard writers (the sync patches them).
    """
    if not enabled:
        yield None
        return
    run = None
    try:
        import wandb

        directory = Path(os.environ.get("WANDB_DIR") or run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        # both backends write their events to tb/PPO_1: as the root, tags keep their TensorBoard names
        wandb.tensorboard.patch(root_logdir=str(Path(run_dir).resolve() / "tb" / "PPO_1"))
        run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT", "ats"),
            name=name,
            config=dict(config),
            dir=str(directory),
            mode=wandb_mode(),
        )
        log(f"W&B: {wandb_mode()} run {run.id} in {run.dir}")
    except Exception as exc:  # noqa: BLE001 -- W&B is optional: never fail a training run because of it
        log(f"[yellow]W&B disabled[/]: {type(exc).__name__}: {exc}")
        run = None
    try:
        yield run
    finally:
        if run is not None:
            run.finish()
            import wandb

            wandb.tensorboard.unpatch()  # a later run in this process patches with its own root
