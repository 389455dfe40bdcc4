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

A seed ensemble (``ats ensemble``, :mod:`agents.ensemble`) is a bundle too: its manifest has an
``ensemble`` block and its files are the member bundles, copied verbatim under ``members/m{i}/``;
:func:`load_bundle` verifies them against the ensemble's manifest, then loads each member with itself
and returns one :class:`PolicyBundle` whose actor combines the members' actions.
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

from agents.actor import Actor, load_actor, save_actor
from agents.observation import ObsNormalizer, StackModels, market_obs_names, schema_hash
from envs import ENV_ID
from envs.actions import ActionConfig
from envs.trading_env import ACCOUNT_FEATURES, EnvConfig
from market import json_codec
from market.features import FeatureConfig, feature_names
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
    """A loaded bundle: the actor, the observation pipeline and the configs it was trained with.

    ``actor`` is an :class:`agents.actor.ActorNet`, or for a seed ensemble an
    :class:`agents.ensemble.EnsembleActor` (``normalizer`` is then the identity and ``models`` an
    :class:`agents.ensemble.EnsembleModels`: see :mod:`agents.ensemble`).
    """

    path: Path
    manifest: dict[str, Any]
    actor: Actor
    normalizer: ObsNormalizer
    feature_config: FeatureConfig
    env_config: EnvConfig
    models: StackModels

    @property
    def market_obs_names(self) -> list[str]:
        """Names of the market-observation columns (features, then model outputs: ``models.output_names``)."""
        return list(feature_names(self.feature_config)) + self.models.output_names


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
    drift_reference: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle directory (see module docstring) and return its path. ``drift_reference``
    (:func:`agents.drift_reference.fit_reference` of the training rows) is written as ``drift_reference.json``
    before the manifest, so the manifest hashes it; None writes none (the drift monitor then reports feature
    and regime drift as unavailable)."""
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
    if drift_reference is not None:
        from agents.drift_reference import write_reference

        write_reference(out_dir, drift_reference)
    write_manifest(out_dir, market_obs_names=names, action_config=env_config.actions, data_info=data_info,
                   run_config=run_config, metrics=metrics)
    return out_dir


def write_manifest(
    out_dir: Path,
    *,
    market_obs_names: list[str],
    action_config: ActionConfig,
    data_info: dict[str, Any],
    run_config: dict[str, Any],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/manifest.json`` over the files already in ``out_dir`` and return it.

    The manifest holds the format version, env id, observation schema (``market_obs_names``, the
    account features and their :func:`agents.observation.schema_hash`), the action box and
    ``action_config``, ``data_info``, ``run_config``, the installed package versions, ``metrics``,
    ``files`` (the SHA-256 of every other file under ``out_dir``, by relative path, subfolders
    included) and then the entries of ``extra`` (a seed ensemble's ``ensemble`` block).
    """
    out_dir = Path(out_dir)
    files = {
        p.relative_to(out_dir).as_posix(): sha256_file(p)
        for p in sorted(out_dir.rglob("*"))
        if p.is_file() and p.relative_to(out_dir).as_posix() != MANIFEST
    }
    manifest = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "env_id": ENV_ID,
        "observation": {
            "market_obs_names": list(market_obs_names),
            "account_features": list(ACCOUNT_FEATURES),
            "schema_hash": schema_hash(market_obs_names, {"env_id": ENV_ID}),
        },
        "action": {"shape": [5], "low": -1.0, "high": 1.0, "config": action_config.model_dump(mode="json")},
        "data": data_info,
        "config": run_config,
        "versions": package_versions(),
        "metrics": metrics,
        "files": files,
        **(extra or {}),
    }
    (out_dir / MANIFEST).write_text(json_codec.dumps(manifest, strict=False, indent=1))
    return manifest


def load_bundle(path: Path, *, device: str = "cpu") -> PolicyBundle:
    """Load and verify a bundle.

    Raises
    ------
    ModelLoadError
        Missing manifest or file, a file whose SHA-256 differs from the manifest (truncated,
        corrupted or swapped), a model that fails to load, or an observation schema that does not
        match the manifest; for a seed ensemble also a member that fails these checks or members
        that do not fit together (:class:`agents.ensemble.EnsembleError`, a subclass).
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
    if "ensemble" in manifest:  # a seed ensemble: its files (the members) are verified above
        from agents.ensemble import load_ensemble

        return load_ensemble(path, manifest, device=device)
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
