"""A small but real policy bundle for the serving tests (seconds, no PPO training).

Every model is a real instance of the production class, saved with :func:`agents.bundle.save_bundle`
and loadable with :func:`agents.bundle.load_bundle`: an HMM and a LightGBM regime-ahead model fitted
on synthetic candles, a TCN with its initial weights (untrained) and an actor with random weights.
Also helpers that damage a bundle in the ways the serving loop must survive.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from agents.actor import ActorNet
from agents.bundle import MANIFEST, save_bundle, sha256_file
from agents.observation import ObsNormalizer, StackModels, model_outputs
from envs.trading_env import EnvConfig
from fallback.config import V1Config
from market.features import FeatureConfig, compute_features, drop_warmup
from regime.config import RegimeConfig
from regime.hmm import RegimeHMM
from regime.transition import RegimeTransitionModel
from signals.config import SignalConfig
from signals.tcn import TCN, TCNSignalModel
from tests.kit.candles import make_candles

HMM_COLUMNS = ("logret_1b", "rvol_24b")


def build_bundle(out_dir: Path, candles: pd.DataFrame | None = None, seed: int = 0, env: EnvConfig | None = None
                 ) -> Path:  # fmt: skip
    """Write a loadable bundle to ``out_dir`` fitted on ``candles`` (default: 1,600 synthetic 1h bars), with the env
    config ``env`` (default ``EnvConfig()``: its action decoding, costs and trading rules)."""
    torch.manual_seed(seed)
    candles = make_candles(1_600, seed=seed) if candles is None else candles
    fcfg = FeatureConfig()
    feats, _ = drop_warmup(compute_features(candles, fcfg))
    rcfg = RegimeConfig(n_states=3, horizon_bars=6, lgbm_n_estimators=5, n_threads=1)
    x_hmm = feats.loc[:, list(HMM_COLUMNS)].to_numpy(np.float64)
    # HMM from explicit parameters (3 volatility states around the data's own scale): no EM fit
    k = 3
    hmm = RegimeHMM.from_params(
        startprob=np.full(k, 1 / k), transmat=np.full((k, k), 0.05) + np.eye(k) * (1 - 0.05 * k),
        means=np.array([[0.0, -0.8], [0.0, 0.0], [0.0, 0.8]]), covars=np.stack([np.eye(2) * v for v in (0.5, 1.0, 2.0)]),
        x_mean=x_hmm.mean(axis=0), x_std=x_hmm.std(axis=0), cfg=rcfg,
    )  # fmt: skip
    x = feats.to_numpy(np.float32)
    transition = RegimeTransitionModel(rcfg).fit(x[:400], hmm.filtered_proba(x_hmm)[:400], rcfg.horizon_bars)
    scfg = SignalConfig(channels=4, levels=2, window_bars=16)
    tcn = TCNSignalModel(TCN(x.shape[1], scfg), scfg, x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6))
    models = StackModels(hmm=hmm, transition=transition, tcn=tcn, hmm_columns=HMM_COLUMNS)
    w = scfg.window_bars
    market = np.concatenate(
        [x[w - 1 :], model_outputs(feats, models, start=w - 1, end=len(feats)).to_numpy()], axis=1
    )
    normalizer = ObsNormalizer.fit(market, clip=10.0)
    env = EnvConfig() if env is None else env
    actor = ActorNet(market.shape[1] + 6, 5, (16, 16), "tanh")
    tensors = {k: v.detach().clone().contiguous() for k, v in actor.state_dict().items()}
    return save_bundle(
        out_dir, actor_tensors=tensors, hidden=(16, 16), activation="tanh", normalizer=normalizer,
        feature_config=fcfg, env_config=env, models=models,
        run_config={"v1": V1Config().model_dump(mode="json")}, data_info={"synthetic": True}, metrics={},
    )  # fmt: skip


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rehash(bundle: Path, rel: str) -> None:
    """Record the current SHA-256 of ``rel`` in the manifest (an attacker who also edits the manifest)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"][rel] = sha256_file(bundle / rel)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=1))


def truncate_weights(bundle: Path) -> None:
    w = bundle / "policy.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def tamper_manifest_hash(bundle: Path) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["policy.json"] = "0" * 64
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=1))


def nan_weights(bundle: Path) -> None:
    """Actor weights with NaN in the output layer, re-hashed so the bundle loads: its actions are NaN."""
    path = bundle / "policy.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.startswith("action_net.") and k.endswith("bias"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(path))
    rehash(bundle, "policy.safetensors")


class _Exploit:
    """Unpickling this writes ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def pickle_payload(bundle: Path, marker: Path) -> None:
    """Replace the actor weights with a pickle whose loading would write ``marker``; re-hashed."""
    (bundle / "policy.safetensors").write_bytes(pickle.dumps(_Exploit(marker), protocol=4))
    rehash(bundle, "policy.safetensors")


def make_it_trade(bundle: Path, gain: float = 40.0) -> Path:
    """Scale the direction row of the actor's output layer by ``gain`` (bias 0), re-hashed: the
    direction then follows the market features (a random but trading policy, with entries, exits
    and reversals) instead of staying in the flat dead zone. Returns ``bundle``."""
    path = bundle / "policy.safetensors"
    tensors = load_file(str(path))
    weight = next(k for k in tensors if k.startswith("action_net.") and k.endswith("weight"))
    bias = next(k for k in tensors if k.startswith("action_net.") and k.endswith("bias"))
    tensors[weight][0] *= gain
    tensors[bias][0] = 0.0
    save_file(tensors, str(path))
    rehash(bundle, "policy.safetensors")
    return bundle
