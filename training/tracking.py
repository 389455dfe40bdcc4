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
from contextlib import contextmanager, suppress
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
    init: Callable[..., Any] | None = None,
) -> Iterator[Any | None]:
    """Context manager: a W&B run mirroring TensorBoard while the block runs (None when disabled/failed).

    Must be entered *before* the backends create their TensorBoard writers (the sync patches them).
    ``init`` starts the run (default ``wandb.init``; tests inject one). The TensorBoard patch is
    process-global and must precede ``init`` (W&B's rule for ``root_logdir``), so it is undone on every
    exit: after the block, and at once when ``init`` fails (otherwise every later run in the process
    would find TensorBoard "already patched" and lose its W&B mirror). Never raises for a W&B failure.
    """
    if not enabled:
        yield None
        return
    run, patched = None, False
    try:
        import wandb

        directory = Path(os.environ.get("WANDB_DIR") or run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        # both backends write their events to tb/PPO_1: as the root, tags keep their TensorBoard names
        # wandb sets its tensorboard submodule on import; its type stubs do not declare it
        wandb.tensorboard.patch(root_logdir=str(Path(run_dir).resolve() / "tb" / "PPO_1"))  # type: ignore[attr-defined]
        patched = True
        run = (init or wandb.init)(
            project=project or os.environ.get("WANDB_PROJECT", "ats"),
            name=name,
            config=dict(config),
            dir=str(directory),
            mode=wandb_mode(),  # type: ignore[arg-type]  # WANDB_MODE as set; wandb.init validates it
        )
        log(f"W&B: {wandb_mode()} run {run.id} in {run.dir}")
    except Exception as exc:  # noqa: BLE001 -- W&B is optional: never fail a training run because of it
        log(f"[yellow]W&B disabled[/]: {type(exc).__name__}: {exc}")
        with suppress(Exception):  # the patch is undone even if finishing the half-started run fails
            _close(run, patched)
        run, patched = None, False
    try:
        yield run
    finally:
        _close(run, patched)


def _close(run: Any | None, patched: bool) -> None:
    """Finish ``run`` (when one started), then undo the TensorBoard patch (when applied) even if finishing
    raised, so a later run in this process can patch with its own root."""
    try:
        if run is not None:
            run.finish()
    finally:
        if patched:
            import wandb

            wandb.tensorboard.unpatch()  # type: ignore[attr-defined]  # see patch above
