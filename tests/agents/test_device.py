"""GPU-ready training and CPU serving (issue 21): a bundle's weights carry no device, load onto the CPU and serve
there whatever trained them; with CUDA present, TCN and PPO (SB3 and RLlib learners) train on ``cuda`` and their
bundle serves on a CPU-only process.

The CUDA tests run when ``torch.cuda.is_available()`` and skip with that reason otherwise (this project's CI
machines have no GPU)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from agents.actor import ActorNet, load_actor, save_actor
from agents.bundle import load_bundle
from agents.policy import FrozenPPOPolicy
from market.decision import DecisionContext, PositionView
from signals.config import SignalConfig
from signals.tcn import TCN, TCNSignalModel
from tests.kit.candles import make_candles
from tests.serving import bundle_kit as kit

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: torch.cuda.is_available() is False on this machine")


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then the header)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def _raw_action(bundle, candles: pd.DataFrame) -> np.ndarray:
    """The actor's 5 numbers for the last bar of ``candles`` (the serving path: features, regime, TCN, actor)."""
    policy = FrozenPPOPolicy(bundle)
    policy.decide(DecisionContext(candles.index[-1], candles, PositionView(), 10_000.0))
    return np.asarray(policy.last_raw_action, np.float64)


def _every_tensor_device(bundle) -> set[str]:
    tensors = [*bundle.actor.parameters(), *bundle.actor.buffers(), *bundle.models.tcn.net.parameters(),
               *bundle.models.tcn.net.buffers()]
    return {t.device.type for t in tensors} | {bundle.models.tcn.device.type}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return kit.build_bundle(tmp_path_factory.mktemp("device") / "bundle")


def test_bundle_weight_files_record_no_device(bundle_dir):
    """safetensors stores dtype, shape and byte offsets per tensor and nothing else: the file written from CUDA
    tensors is the file written from their CPU copies, so where a bundle was trained cannot reach the loader."""
    files = sorted(bundle_dir.rglob("*.safetensors"))
    assert {p.name for p in files} == {"policy.safetensors", "tcn.safetensors"}
    for path in files:
        header = _header(path)
        header.pop("__metadata__", None)
        assert header and all(set(entry) == {"dtype", "shape", "data_offsets"} for entry in header.values()), path
    assert not [p for p in bundle_dir.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".pickle")]  # no pickles


def test_bundle_loads_and_serves_on_the_cpu(bundle_dir):
    bundle = load_bundle(bundle_dir)  # device defaults to cpu
    assert _every_tensor_device(bundle) == {"cpu"}
    action = _raw_action(bundle, make_candles(1_100, seed=3))
    assert action.shape == (5,) and np.isfinite(action).all()


def test_loader_places_tensors_on_the_cpu_like_map_location(tmp_path):
    """Our loader (safetensors ``load_file(device="cpu")``) puts tensors where ``torch.load(map_location="cpu")``
    would, with equal values; non-contiguous, grad-tracking tensors (what a trainer hands over) are saved as well."""
    net = ActorNet(7, 5, (8, 8), "tanh")
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    w = state["policy_net.0.weight"]  # (8, 7): store a transposed view's transpose, non-contiguous
    state["policy_net.0.weight"] = w.t().contiguous().t().requires_grad_(True)
    assert not state["policy_net.0.weight"].is_contiguous()
    with pytest.raises(ValueError, match="contiguous"):  # safetensors alone refuses it; save_actor normalises
        save_file(state, str(tmp_path / "raw.safetensors"))
    save_actor(tmp_path / "policy.safetensors", state)
    torch.save({k: v.detach() for k, v in state.items()}, tmp_path / "state.pt")
    mapped = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)
    ours = load_file(str(tmp_path / "policy.safetensors"), device="cpu")
    assert set(ours) == set(mapped)
    for k in ours:
        assert ours[k].device.type == mapped[k].device.type == "cpu"
        assert torch.equal(ours[k], mapped[k]), k
    actor = load_actor(tmp_path / "policy.safetensors", obs_dim=7, action_dim=5, hidden=(8, 8), activation="tanh")
    assert {p.device.type for p in actor.parameters()} == {"cpu"}
    obs = np.linspace(-1, 1, 7).astype(np.float32)
    np.testing.assert_array_equal(actor.act(obs), np.clip(net(torch.from_numpy(obs)[None])[0].detach().numpy(), -1, 1))


@needs_cuda
def test_weights_saved_from_cuda_load_on_the_cpu_unchanged(tmp_path):
    net = ActorNet(7, 5, (8, 8), "tanh").to("cuda")
    state = {k: v.detach() for k, v in net.state_dict().items()}
    assert {v.device.type for v in state.values()} == {"cuda"}
    save_actor(tmp_path / "policy.safetensors", state)
    actor = load_actor(tmp_path / "policy.safetensors", obs_dim=7, action_dim=5, hidden=(8, 8), activation="tanh")
    for (k, a), b in zip(actor.state_dict().items(), state.values(), strict=True):
        assert a.device.type == "cpu" and torch.equal(a, b.cpu()), k
    cfg = SignalConfig(channels=4, levels=2, window_bars=16)
    tcn = TCNSignalModel(TCN(6, cfg), cfg, np.zeros(6, np.float32), np.ones(6, np.float32)).to("cuda")
    tcn.save(tmp_path / "tcn")
    back = TCNSignalModel.load(tmp_path / "tcn")
    assert back.device.type == "cpu"
    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    np.testing.assert_allclose(back.predict_proba(x)[20:], tcn.predict_proba(x)[20:], rtol=0, atol=1e-5)


def _cuda_config(tmp_path: Path, backend: str) -> Path:
    import yaml

    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    raw.update(device="cuda", backend=backend)
    raw["ppo"].update(total_timesteps=1024, eval_every_steps=512)
    if backend == "rllib":
        raw["rllib"] = {"num_env_runners": 0, "num_gpus_per_learner": 1}
    path = tmp_path / f"smoke_cuda_{backend}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sb3", "rllib"])
def test_training_on_cuda_gives_a_bundle_that_serves_on_a_cpu_only_process(tmp_path, backend):
    """TCN and PPO (the SB3 policy, or the RLlib learner with one GPU) train on cuda; the bundle then loads and
    decides in a process that sees no GPU (``CUDA_VISIBLE_DEVICES=""``), as a CPU serving host would."""
    from training.config import load_config
    from training.pipeline import train_run

    cfg = load_config(_cuda_config(tmp_path, backend))
    bundle_dir = train_run(cfg, tmp_path / "run", log=lambda s: None)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["config"]["device"] == "cuda" and manifest["config"]["backend"] == backend
    script = (
        "import sys, json, torch; from agents.bundle import load_bundle; from agents.policy import FrozenPPOPolicy; "
        "from market.decision import DecisionContext, PositionView; from tests.kit.candles import make_candles; "
        "assert not torch.cuda.is_available(); b = load_bundle(sys.argv[1]); c = make_candles(1100, seed=3); "
        "p = FrozenPPOPolicy(b); p.decide(DecisionContext(c.index[-1], c, PositionView(), 10000.0)); "
        "print(json.dumps({'devices': sorted({t.device.type for t in [*b.actor.parameters(), "
        "*b.models.tcn.net.parameters()]}), 'action': [float(x) for x in p.last_raw_action]}))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", script, str(bundle_dir)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert served["devices"] == ["cpu"] and len(served["action"]) == 5 and np.isfinite(served["action"]).all()
    # the same decision as the bundle loaded in this (GPU) process, on the CPU
    np.testing.assert_allclose(_raw_action(load_bundle(bundle_dir), make_candles(1_100, seed=3)), served["action"],
                               rtol=0, atol=1e-6)
