"""Shared fixtures. ``smoke_run`` trains the smoke config end to end once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """Run directory of a full smoke training + evaluation on the bundled real data."""
    from training.config import load_config
    from training.evaluate import evaluate_run
    from training.pipeline import train_run

    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    train_run(cfg, run_dir, log=lambda s: None)
    evaluate_run(run_dir, log=lambda s: None)
    return run_dir
