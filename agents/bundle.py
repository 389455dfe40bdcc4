"""Policy bundle: a self-contained directory with everything serving needs, loaded without pickle.

Layout::

    manifest.json          schema hash, data span and SHA-256, config, versions, metrics, file hashes
    policy.safetensors     PPO actor weights (SB3 layer layout, see agents.actor)
    policy.json            architecture, observation normaliser, action and env configs
    features.json          market.features.FeatureConfig
    regime/hmm/            regime.hmm.RegimeHMM.save
    regime/transition/     regime.transition.RegimeTransitionModel.save
    signals/tcn/           signals.tcn.TCNSignalModel.save

:func:`load_bundle` verifies every file against the SHA-256 recorded in the manifest, loads each
model with its non-pickle loader, rebuilds the observation schema from the loaded configs and
refuses the bundle (``ModelLoadError``) if its hash differs from the manifest's.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from agents.actor import ActorNet, load_actor, save_actor
from agents.observation import ObsNormalizer, StackModels, market_obs_names, schema_hash
from envs import ENV_ID
from envs.trading_env import ACCOUNT_FEATURES, EnvConfig
from market import json_codec
from market.features import FeatureConfig
from regime.hmm import ModelLoadError, RegimeHMM
from regime.transition import RegimeTransitionModel
from signals.tcn import TCNSignalModel

MANIFEST = "manifest.json"
BUNDLE_FORMAT_VERSION = 1
_VERSIONED_PACKAGES = (
    "ats", "torch", "stable-baselines3", "gymnasium", "numpy", "pandas", "lightgbm", "hmmlearn", "ta-lib",
)


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a bundle depends on."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass(frozen=True)
class PolicyBundle:
    """A loaded bundle: the actor, the observation pipeline and the configs it was trained with."""

    path: Path
    manifest: dict[str, Any]
    actor: ActorNet
    normalizer: ObsNormalizer
    feature_config: FeatureConfig
    env_config: EnvConfig
    models: StackModels

    @property
    def market_obs_names(self) -> list[str]:
        """Names of the market-observation columns (features, then model outputs)."""
        return market_obs_names(self.feature_config, self.models.n_states)


def save_bundle(
    out_dir: Path,
    *,
    actor_tensors: dict,
    hidden: tuple[int, ...],
    activation: str,
    normalizer: ObsNormalizer,
    feature_config: FeatureConfig,
    env_config: EnvConfig,
    models: StackModels,
    run_config: dict[str, Any],
    data_info: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write a bundle directory (see module docstring) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = market_obs_names(feature_config, models.n_states)
    obs_dim = len(names) + len(ACCOUNT_FEATURES)
    save_actor(out_dir / "policy.safetensors", actor_tensors)
    policy_meta = {
        "obs_dim": obs_dim,
        "action_dim": 5,
        "hidden": list(hidden),
        "activation": activation,
        "normalizer": {"mean": normalizer.mean.tolist(), "std": normalizer.std.tolist(), "clip": normalizer.clip},
        "env_config": env_config.model_dump(mode="json"),
        "hmm_columns": list(models.hmm_columns),
    }
    (out_dir / "policy.json").write_text(json_codec.dumps(policy_meta, strict=False, indent=1))
    (out_dir / "features.json").write_text(feature_config.model_dump_json(indent=1))
    models.hmm.save(out_dir / "regime" / "hmm")
    models.transition.save(out_dir / "regime" / "transition")
    models.tcn.save(out_dir / "signals" / "tcn")
    files = {
        str(p.relative_to(out_dir)): sha256_file(p)
        for p in sorted(out_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "env_id": ENV_ID,
        "observation": {
            "market_obs_names": names,
            "account_features": list(ACCOUNT_FEATURES),
            "schema_hash": schema_hash(names, {"env_id": ENV_ID}),
        },
        "action": {"shape": [5], "low": -1.0, "high": 1.0, "config": env_config.actions.model_dump(mode="json")},
        "data": data_info,
        "config": run_config,
        "versions": package_versions(),
        "metrics": metrics,
        "files": files,
    }
    (out_dir / MANIFEST).write_text(json_codec.dumps(manifest, strict=False, indent=1))
    return out_dir


def load_bundle(path: Path, *, device: str = "cpu") -> PolicyBundle:
    """Load and verify a bundle.

    Raises
    ------
    ModelLoadError
        Missing manifest or file, a file whose SHA-256 differs from the manifest (truncated,
        corrupted or swapped), a model that fails to load, or an observation schema that does not
        match the manifest.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read bundle manifest {manifest_path}: {exc}") from exc
    if manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise ModelLoadError(f"{manifest_path}: unsupported bundle format {manifest.get('format_version')!r}")
    for rel, digest in manifest.get("files", {}).items():
        file = path / rel
        if not file.is_file():
            raise ModelLoadError(f"bundle file missing: {file}")
        if sha256_file(file) != digest:
            raise ModelLoadError(f"bundle file {file} does not match its SHA-256 in the manifest (corrupt or altered)")
    try:
        meta = json_codec.loads((path / "policy.json").read_text())
        feature_config = FeatureConfig.model_validate_json((path / "features.json").read_text())
        env_config = EnvConfig.model_validate(meta["env_config"])
        normalizer = ObsNormalizer(
            mean=np.asarray(meta["normalizer"]["mean"], dtype=np.float32),
            std=np.asarray(meta["normalizer"]["std"], dtype=np.float32),
            clip=float(meta["normalizer"]["clip"]),
        )
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"bundle {path}: invalid policy.json/features.json: {exc}") from exc
    models = StackModels(
        hmm=RegimeHMM.load(path / "regime" / "hmm"),
        transition=RegimeTransitionModel.load(path / "regime" / "transition"),
        tcn=TCNSignalModel.load(path / "signals" / "tcn", device=device),
        hmm_columns=tuple(meta["hmm_columns"]),
    )
    actor = load_actor(
        path / "policy.safetensors",
        obs_dim=int(meta["obs_dim"]),
        action_dim=int(meta["action_dim"]),
        hidden=tuple(meta["hidden"]),
        activation=meta["activation"],
    )
    names = market_obs_names(feature_config, models.n_states)
    expected = manifest["observation"]["schema_hash"]
    if schema_hash(names, {"env_id": ENV_ID}) != expected or manifest.get("env_id") != ENV_ID:
        raise ModelLoadError(
            f"bundle {path}: observation schema does not match this version's observation builder "
            f"(manifest {expected[:12]}, env {manifest.get('env_id')} vs {ENV_ID})"
        )
    if normalizer.mean.shape != (len(names),) or actor.obs_dim != len(names) + len(ACCOUNT_FEATURES):
        raise ModelLoadError(f"bundle {path}: normaliser/actor dimensions do not match the schema ({len(names)})")
    return PolicyBundle(path, manifest, actor, normalizer, feature_config, env_config, models)
