"""``ats ensemble``: several trained PPO bundles (the seeds of one run config) written as one bundle.

``ats ensemble --bundle B1 --bundle B2 [--bundle B3 ...] --mode mean|majority --out E``; the rules and what the
members must share are in :mod:`agents.ensemble`. E is then used like any bundle (``ats evaluate --bundle E``,
``ats serve --bundle E``, hot-swap, ``ats gate``).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


class Mode(str, Enum):
    """How the members' raw actions are combined."""

    mean = "mean"
    majority = "majority"


def ensemble(
    bundle: Annotated[list[Path], typer.Option(
        "--bundle", help="a member policy bundle (repeat: at least 2, e.g. the seeds of one walk-forward fold)")],
    out: Annotated[Path, typer.Option("--out", help="the ensemble bundle folder to create (must not exist)")],
    mode: Annotated[Mode, typer.Option(
        "--mode", help="mean: mean of the members' raw actions; majority: majority direction (ties flat), the "
        "other components averaged over the members that agree")] = Mode.mean,
) -> None:
    """Combine several trained PPO bundles into one bundle (mean action or majority direction).

    Members must share the observation schema, feature config and regime model files, env config, symbol(s),
    data and run config (all but name, seed, device, threads); each keeps its own actor, normaliser and signal
    model. A mismatch, a member that does not load or an existing --out ends with one message and exit code 2.
    """
    from agents.ensemble import build_ensemble

    path = build_ensemble(bundle, out, mode.value)
    console.print(f"ensemble of {len(bundle)} bundles ({mode.value}): {path}\n"
                  f"  use it like any bundle: ats evaluate --bundle {path} ... | ats serve --bundle {path} ...")
