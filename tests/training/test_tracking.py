"""W&B tracking: offline without an API key, mirrors TensorBoard scalars, never required."""

from __future__ import annotations

import pytest

from training.tracking import wandb_mode, wandb_tracking


def test_mode_is_offline_without_a_key_and_respects_wandb_mode():
    assert wandb_mode({}) == "offline"
    assert wandb_mode({"WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode({"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}) == "disabled"


def test_disabled_tracking_yields_none_and_writes_nothing(tmp_path):
    with wandb_tracking(False, config={"a": 1}, run_dir=tmp_path, name="t") as run:
        assert run is None
    assert not any(tmp_path.iterdir())


def test_offline_run_directory_holds_config_and_tensorboard_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logs = []
    with wandb_tracking(True, config={"ppo": {"learning_rate": 3e-4}}, run_dir=tmp_path / "run", name="t",
                        log=logs.append) as run:
        assert run is not None, logs
        assert run.config["ppo"]["learning_rate"] == 3e-4
        writer = SummaryWriter(str(tmp_path / "run" / "tb" / "PPO_1"))
        for step in range(3):
            writer.add_scalar("episode/sortino", 0.1 * step, step * 100)
        writer.close()
        run_dir = run.dir
    offline = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and str(offline[0]) in run_dir
    record = next(offline[0].glob("run-*.wandb")).read_bytes()
    assert b"episode/sortino" in record  # the scalar under its TensorBoard tag, no directory prefix
    assert b"PPO_1/episode/sortino" not in record
    assert list(offline[0].rglob("events.out.tfevents*"))  # the event file is saved with the run


def test_two_runs_in_one_process_both_track(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for i in range(2):
        with wandb_tracking(True, config={"i": i}, run_dir=tmp_path / f"run{i}", name=f"t{i}") as run:
            assert run is not None
    assert len(list((tmp_path / "wb" / "wandb").glob("offline-run-*"))) == 2


@pytest.fixture
def tensorboard_unpatched():
    """Leave W&B's process-global TensorBoard patch as the test found it (unpatched), even on failure."""
    wandb = pytest.importorskip("wandb")
    assert wandb.patched["tensorboard"] == []
    yield wandb
    if wandb.patched["tensorboard"]:
        wandb.tensorboard.unpatch()


def test_failed_init_undoes_the_tensorboard_patch_and_a_later_run_tracks(tmp_path, monkeypatch, tensorboard_unpatched):
    wandb = tensorboard_unpatched
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")

    def failing_init(**kwargs):
        assert wandb.patched["tensorboard"], "the patch precedes init"
        raise RuntimeError("wandb init failed")

    logs = []
    with wandb_tracking(True, config={}, run_dir=tmp_path / "run0", name="t0", log=logs.append,
                        init=failing_init) as run:  # fmt: skip
        assert run is None
        assert wandb.patched["tensorboard"] == []  # undone at once, not left for the block
    with wandb_tracking(True, config={}, run_dir=tmp_path / "run1", name="t1", log=logs.append) as run:
        assert run is not None, logs  # not "Tensorboard already patched"
    assert wandb.patched["tensorboard"] == []
