"""Seed ensembles: several trained PPO bundles written as one bundle (issue 16, "an ensemble of seeds as one bundle").

``ats ensemble --bundle B1 --bundle B2 [...] --mode mean|majority --out E`` (:func:`build_ensemble`) writes a
bundle that :func:`agents.bundle.load_bundle` loads like any other, so ``ats evaluate --bundle E``, ``ats serve
--bundle E``, hot-swap and ``ats gate`` take it unchanged. Each member decides with its own observation
normaliser, signal model and actor (its deterministic action, clipped to [-1, 1] as ``ActorNet.act`` does);
the ensemble's raw action combines the members' (:func:`combine_actions`):

* ``mean``: the component-wise mean of the members' raw actions (then decoded as one action);
* ``majority``: the direction is the sign of the sum of the members' directions (each decoded with the env's
  ``direction_dead_zone``, as :func:`envs.actions.decode_action` does; a tie, 0, is flat); every component is the
  mean over the members whose direction is the chosen one (their ``a0`` all lie in that direction's interval, so
  the mean does too). A tie of longs and shorts with no flat member: ``a0 = 0`` and the other components the mean
  over all members (a flat decision does not read them; they are kept in ``last_raw_action``).

Sources: averaging the outputs of models trained from different random seeds is the plain ensemble of
Dietterich (2000, "Ensemble Methods in Machine Learning"), which reduces the variance that seeds add; a vote
of directions is Breiman's (1996, "Bagging Predictors") plurality vote for a classification output.

What the members must share, and what each keeps
------------------------------------------------
A run's seed seeds PPO and the signal model (the TCN's seed is the run seed + 100 for the final models,
``training.pipeline``) but not the regime models (``regime.seed``). The seeds of one walk-forward fold or variant
therefore have byte-identical ``features.json`` and ``regime/`` files (the HMM and the LightGBM regime-ahead model)
and different ``signals/tcn/`` files, normalisers and actors (checked on a 3-seed walk-forward fold: the same
regime files, three different TCNs). So:

* every member keeps its own actor, normaliser and TCN: each sees exactly the observation it was trained and
  validated on. The ensemble's market observation is the members' features and regime columns once, then each
  member's signal columns (``m{i}_signal_p_down``, ``m{i}_signal_p_timeout``, ``m{i}_signal_p_up``,
  :func:`ensemble_output_names`); its normaliser is the identity and its actor
  (:class:`EnsembleActor`) standardises each member's columns with that member's normaliser;
* the feature config and the regime layer must be the same files (their SHA-256 in the members' manifests): one
  regime filter (which serving advances bar by bar) and one regime read-out for reports and V1's regime
  adjustments. Members whose regime layer differs (another regime seed, other data) are refused, as are members
  that differ in observation schema hash, env config (action config first), symbol(s), data (span, files,
  hashes), or run config other than ``name``, ``seed``, ``device`` and ``torch_threads`` (:func:`check_members`):
  the ensemble records one config, and ``ats evaluate`` reads V1's and tsmom's from it.

Layout of an ensemble bundle::

    manifest.json     a bundle manifest (the ensemble's observation schema, member 0's action, data and config
                      with ``name`` and ``seed`` = the members' seeds) + ``ensemble``: mode, rule and, per member,
                      its folder, source path, manifest SHA-256, name, seed, validation metrics, selected step
    members/m{i}/     member i's bundle files and manifest, copied verbatim

Its ``files`` table covers every member file (member manifests included), so the loader's hash check detects a
corrupted or swapped member file; each member is then loaded and checked with :func:`agents.bundle.load_bundle`
itself, and the members are checked against each other again. The ensemble's own ``metrics`` has no validation
numbers: it was not validated as a whole (its members were, and their numbers are in ``ensemble.members``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.actor import Actor
from agents.bundle import MANIFEST, PolicyBundle, load_bundle, sha256_file, write_manifest
from agents.observation import SIGNAL_COLUMNS, ObsNormalizer, StackModels, model_output_names, schema_hash
from envs import ENV_ID
from market.features import feature_names
from regime.hmm import ModelLoadError
from signals.tcn import TCNSignalModel

MODES = ("mean", "majority")
"""How the members' raw actions are combined (:func:`combine_actions`)."""

RULES = {
    "mean": "raw action = component-wise mean of the members' deterministic raw actions (each clipped to [-1, 1])",
    "majority": ("direction = sign of the sum of the members' directions (ties flat); every component = mean over "
                 "the members with that direction (none: a0 = 0, the rest the mean over all members)"),
}
"""The rule of each mode, as recorded in the ensemble manifest."""

MEMBERS_DIR = "members"
"""Folder of the member bundles inside an ensemble bundle (``members/m{i}``)."""

PER_RUN_CONFIG_KEYS = ("name", "seed", "device", "torch_threads")
"""Run-config keys in which members may differ: which seed, and where and how a run ran."""


class EnsembleError(ModelLoadError):
    """Member bundles that cannot form an ensemble, or an ensemble bundle whose ``ensemble`` block is invalid.

    The message names the bundle and what differs. A :class:`regime.hmm.ModelLoadError`, so every caller of
    :func:`agents.bundle.load_bundle` treats it as a bundle that does not load.
    """


def ensemble_output_names(n_states: int, n_members: int) -> list[str]:
    """Model-output columns of an ensemble's observation: ``regime_p{k}``, ``regime_ahead_p{k}`` (k < n_states),
    then ``m{i}_signal_p_down``, ``m{i}_signal_p_timeout``, ``m{i}_signal_p_up`` for each member i."""
    shared = model_output_names(n_states)[: 2 * n_states]
    return shared + [f"m{i}_{c}" for i in range(n_members) for c in SIGNAL_COLUMNS]


@dataclass(frozen=True)
class EnsembleModels(StackModels):
    """The regime layer the members share (``hmm``, ``transition``, ``hmm_columns``) and each member's TCN.

    ``tcn`` is member 0's (its ``window_bars`` is every member's); ``member_tcns`` holds all of them in member
    order. :func:`agents.observation.model_outputs` and :func:`agents.observation.last_row_outputs` read them
    through :attr:`signal_models` and name the columns :attr:`output_names`.

    Raises
    ------
    ValueError
        No member TCN, ``tcn`` not ``member_tcns[0]``, or TCNs with different ``window_bars``.
    """

    member_tcns: tuple[TCNSignalModel, ...] = ()

    def __post_init__(self) -> None:
        if not self.member_tcns or self.member_tcns[0] is not self.tcn:
            raise ValueError("EnsembleModels: member_tcns must start with tcn (member 0's signal model)")
        windows = {m.window_bars for m in self.member_tcns}
        if len(windows) != 1:
            raise ValueError(f"EnsembleModels: the members' TCNs read different windows {sorted(windows)} bars")

    @property
    def signal_models(self) -> tuple[TCNSignalModel, ...]:
        """Every member's TCN, in member order."""
        return self.member_tcns

    @property
    def output_names(self) -> list[str]:
        """:func:`ensemble_output_names` of the regime states and the members."""
        return ensemble_output_names(self.n_states, len(self.member_tcns))


def action_direction(a0: float, dead_zone: float) -> int:
    """Direction of an action's first component: +1 above ``dead_zone``, -1 below ``-dead_zone``, else 0 (the rule
    of :func:`envs.actions.decode_action` on a clipped action)."""
    return 1 if a0 > dead_zone else (-1 if a0 < -dead_zone else 0)


def combine_actions(actions: np.ndarray, mode: str, dead_zone: float) -> np.ndarray:
    """The ensemble's raw action from its members' raw actions (see the module docstring for the rules).

    Parameters
    ----------
    actions : np.ndarray
        (M, 5) float, M >= 1 members' deterministic actions, each in [-1, 1].
    mode : str
        ``mean`` or ``majority``.
    dead_zone : float
        The env's ``ActionConfig.direction_dead_zone`` (majority: each member's direction).

    Returns
    -------
    np.ndarray
        float32 (5,), in [-1, 1]; means taken in float64. Majority example (dead zone 0.3): members
        ``[0.8, ...]``, ``[0.5, ...]``, ``[-0.9, ...]`` vote +1, +1, -1: direction +1, the action is the mean of
        the first two (``a0 = 0.65``); ``[0.8, ...]``, ``[-0.9, ...]`` tie: flat, ``a0 = 0``.

    Raises
    ------
    ValueError
        Wrong shape, non-finite values or an unknown mode.
    """
    a = np.asarray(actions, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] != 5:
        raise ValueError(f"member actions must have shape (M >= 1, 5), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"non-finite member action: {a.tolist()}")
    if mode == "mean":
        return a.mean(axis=0).astype(np.float32)
    if mode != "majority":
        raise ValueError(f"ensemble mode must be one of {MODES}, got {mode!r}")
    votes = np.array([action_direction(float(x), dead_zone) for x in a[:, 0]])
    direction = int(np.sign(votes.sum()))
    agree = votes == direction
    # no member agrees: longs and shorts tie and no member is flat
    out = a[agree].mean(axis=0) if agree.any() else np.concatenate([[0.0], a[:, 1:].mean(axis=0)])
    out32 = out.astype(np.float32)
    if action_direction(float(out32[0]), dead_zone) != direction:  # the interval of a direction is convex
        raise AssertionError(f"majority action {out32.tolist()} does not decode to direction {direction}")
    return out32


def identity_normalizer(n_columns: int) -> ObsNormalizer:
    """The ensemble's observation normaliser: mean 0, std 1 and the float32 range as clip, so the market columns
    reach :class:`EnsembleActor` unchanged (each member then applies its own normaliser, which clips)."""
    return ObsNormalizer(mean=np.zeros(n_columns, np.float32), std=np.ones(n_columns, np.float32),
                         clip=float(np.finfo(np.float32).max))


class EnsembleActor:
    """The actor of an ensemble bundle: every member's actor on its own view of the observation, combined.

    The observation (float32, ``(obs_dim,)``) is the ensemble's market columns, unstandardised (the ensemble's
    normaliser is :func:`identity_normalizer`), then the account features. Member i reads the market columns
    ``member_columns[i]`` (the shared features and regime columns, then its own signal columns), standardised
    with its normaliser, followed by the account features: exactly the observation it would build alone.
    ``last_member_actions`` keeps the members' actions of the last call, float32 (M, 5).
    """

    def __init__(self, actors: Sequence[Actor], normalizers: Sequence[ObsNormalizer],
                 member_columns: Sequence[np.ndarray], *, n_market: int, n_account: int, mode: str,
                 dead_zone: float) -> None:
        if not len(actors) == len(normalizers) == len(member_columns) or len(actors) < 2:
            raise ValueError("EnsembleActor needs one normaliser and one column index per actor, and >= 2 actors")
        if mode not in MODES:
            raise ValueError(f"ensemble mode must be one of {MODES}, got {mode!r}")
        for actor, cols in zip(actors, member_columns, strict=True):
            if actor.obs_dim != len(cols) + n_account or actor.action_dim != 5:
                raise ValueError(f"member actor reads {actor.obs_dim} inputs, its columns give {len(cols) + n_account}")
        self.actors = tuple(actors)
        self.normalizers = tuple(normalizers)
        self.member_columns = tuple(np.asarray(c, dtype=np.intp) for c in member_columns)
        self.n_market = int(n_market)
        self.mode = mode
        self.dead_zone = float(dead_zone)
        self._obs_dim = self.n_market + int(n_account)
        self.last_member_actions: np.ndarray | None = None

    @property
    def obs_dim(self) -> int:
        """Length of the ensemble observation: market columns + account features."""
        return self._obs_dim

    @property
    def action_dim(self) -> int:
        """5: direction, leverage, size, stop, take-profit."""
        return 5

    def member_observations(self, obs: np.ndarray) -> list[np.ndarray]:
        """Each member's observation (float32, its own ``obs_dim``) from the ensemble observation ``obs``.

        Raises
        ------
        ValueError
            If ``obs`` does not have ``obs_dim`` elements.
        """
        x = np.asarray(obs, dtype=np.float32).reshape(-1)
        if x.shape != (self.obs_dim,):
            raise ValueError(f"ensemble observation must have {self.obs_dim} elements, got {x.shape}")
        market, account = x[: self.n_market], x[self.n_market :]
        return [np.concatenate([norm(market[cols]), account]).astype(np.float32)
                for norm, cols in zip(self.normalizers, self.member_columns, strict=True)]

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The combined action (:func:`combine_actions`), float32 (5,); sets ``last_member_actions``.

        A member action that is not finite makes the whole action NaN, as a single actor's NaN output is
        returned as it is: decoding it raises :class:`market.decision.NonFiniteDecisionError` (the caller falls
        back) and the hot-swap probe rejects such a bundle.

        Raises
        ------
        ValueError
            Wrong observation length.
        """
        self.last_member_actions = None
        acts = np.stack([actor.act(o) for actor, o in zip(self.actors, self.member_observations(obs), strict=True)])
        self.last_member_actions = acts.astype(np.float32)
        if not np.isfinite(acts).all():
            return np.full(self.action_dim, np.nan, dtype=np.float32)
        return combine_actions(acts, self.mode, self.dead_zone)


def _differences(a: Any, b: Any, prefix: str = "", limit: int = 4) -> list[str]:
    """Up to ``limit`` dotted paths where the JSON-like values ``a`` and ``b`` differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key, "<absent>") != b.get(key, "<absent>"):
                out += _differences(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{prefix}{key}.", limit)
            if len(out) >= limit:
                break
        return out[:limit]

    def text(v: Any) -> str:
        r = repr(v)
        return r[:60] + "..." if len(r) > 63 else r

    return [f"{prefix.rstrip('.') or 'value'}: {text(b)} vs {text(a)}"]


def _is_shared_layer_file(rel: str) -> bool:
    """Whether a bundle file is one the members must share: the feature config or a regime model file."""
    return rel == "features.json" or rel.startswith("regime/")


def check_members(bundles: Sequence[PolicyBundle]) -> None:
    """Refuse member bundles that cannot form one ensemble (see the module docstring); member 0 is the reference.

    Raises
    ------
    EnsembleError
        Fewer than 2 members, a member that is itself an ensemble, the same bundle twice (the same file table),
        or a member that differs from member 0 in (checked in this order): observation schema hash; symbol(s);
        data (span, files, hashes); env action config; the rest of the env config; run config other than
        :data:`PER_RUN_CONFIG_KEYS`; feature config or regime model files (SHA-256); regime input columns; the TCN
        window. The message names the member, member 0 and the first differences ("member value vs member 0
        value").
    """
    if len(bundles) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 member bundles, got {len(bundles)}")
    for b in bundles:
        if "ensemble" in b.manifest:
            raise EnsembleError(f"{b.path} is itself an ensemble: give its member bundles instead")
    for i, b in enumerate(bundles):
        for other in bundles[:i]:
            if b.manifest["files"] == other.manifest["files"]:
                raise EnsembleError(f"{b.path} has the same files as {other.path}: the same bundle twice would "
                                    "count one seed twice")  # fmt: skip
    ref = bundles[0]

    def refuse(b: PolicyBundle, what: str, diffs: list[str], why: str, verb: str = "differs") -> EnsembleError:
        detail = f" ({'; '.join(diffs)})" if diffs else ""
        return EnsembleError(f"ensemble member {b.path}: {what} {verb} from member {ref.path}'s{detail}; {why}")

    seeds = "members must be seeds of one run config on the same data"
    for b in bundles[1:]:
        ha, hb = ref.manifest["observation"]["schema_hash"], b.manifest["observation"]["schema_hash"]
        if ha != hb:
            raise refuse(b, "observation schema hash", [f"{hb[:12]} vs {ha[:12]}"], seeds)
        da, db = ref.manifest.get("data") or {}, b.manifest.get("data") or {}
        sym_a = {k: da.get(k) for k in ("symbol", "symbols")}
        sym_b = {k: db.get(k) for k in ("symbol", "symbols")}
        if sym_a != sym_b:
            raise refuse(b, "symbol(s)", _differences(sym_a, sym_b), seeds)
        if da != db:
            raise refuse(b, "data (span, files or hashes)", _differences(da, db), seeds)
        aa, ab = ref.env_config.actions.model_dump(mode="json"), b.env_config.actions.model_dump(mode="json")
        if aa != ab:
            raise refuse(b, "env action config", _differences(aa, ab), seeds)
        ea, eb = ref.env_config.model_dump(mode="json"), b.env_config.model_dump(mode="json")
        if ea != eb:
            raise refuse(b, "env config", _differences(ea, eb), seeds)
        ca = {k: v for k, v in (ref.manifest.get("config") or {}).items() if k not in PER_RUN_CONFIG_KEYS}
        cb = {k: v for k, v in (b.manifest.get("config") or {}).items() if k not in PER_RUN_CONFIG_KEYS}
        if ca != cb:
            raise refuse(b, "run config", _differences(ca, cb),
                         f"members may differ only in {', '.join(PER_RUN_CONFIG_KEYS)} (the ensemble records one config)")
        la = {k: v for k, v in ref.manifest["files"].items() if _is_shared_layer_file(k)}
        lb = {k: v for k, v in b.manifest["files"].items() if _is_shared_layer_file(k)}
        if la != lb:
            files = sorted(k for k in set(la) | set(lb) if la.get(k) != lb.get(k))
            raise refuse(b, "feature config or regime model files (SHA-256)", [", ".join(files)],
                         "an ensemble shares one feature config and one regime layer (each member keeps its own "
                         "signal model, normaliser and actor): members must come from runs of one config, data "
                         "and regime seed", verb="differ")
        if b.models.hmm_columns != ref.models.hmm_columns:
            raise refuse(b, "regime input columns", [f"{b.models.hmm_columns} vs {ref.models.hmm_columns}"], seeds)
        if b.models.tcn.window_bars != ref.models.tcn.window_bars:
            raise refuse(b, "signal model window", [f"{b.models.tcn.window_bars} vs {ref.models.tcn.window_bars}"],
                         seeds)


def _assemble(path: Path, manifest: dict[str, Any], bundles: Sequence[PolicyBundle], mode: str) -> PolicyBundle:
    """The ensemble's :class:`PolicyBundle` from its loaded, checked members."""
    ref = bundles[0]
    models = EnsembleModels(hmm=ref.models.hmm, transition=ref.models.transition, tcn=ref.models.tcn,
                            hmm_columns=ref.models.hmm_columns, member_tcns=tuple(b.models.tcn for b in bundles))
    features = list(feature_names(ref.feature_config))
    names = features + models.output_names
    n_shared = len(features) + 2 * models.n_states
    columns = []
    for i, b in enumerate(bundles):
        cols = np.concatenate([np.arange(n_shared), n_shared + 3 * i + np.arange(3)])
        if b.market_obs_names != names[:n_shared] + list(SIGNAL_COLUMNS):
            raise EnsembleError(f"ensemble member {b.path}: its observation columns are not the ensemble's shared "
                                "columns followed by the three signal columns")  # fmt: skip
        columns.append(cols)
    n_account = len(ref.manifest["observation"]["account_features"])
    actor = EnsembleActor([b.actor for b in bundles], [b.normalizer for b in bundles], columns,
                          n_market=len(names), n_account=n_account, mode=mode,
                          dead_zone=ref.env_config.actions.direction_dead_zone)
    return PolicyBundle(path, manifest, actor, identity_normalizer(len(names)), ref.feature_config, ref.env_config,
                        models)


def _member_record(b: PolicyBundle, rel_dir: str, manifest_sha256: str) -> dict[str, Any]:
    """What the ensemble manifest records of a member."""
    config, metrics = b.manifest.get("config") or {}, b.manifest.get("metrics") or {}
    return {"dir": rel_dir, "source": str(Path(b.path).resolve()), "manifest_sha256": manifest_sha256,
            "name": config.get("name"), "seed": config.get("seed"), "validation": metrics.get("validation"),
            "selected_step": metrics.get("selected_step"), "gate_verdict": (b.manifest.get("gate") or {}).get("verdict")}


def build_ensemble(member_dirs: Sequence[Path], out: Path, mode: str, *, device: str = "cpu") -> Path:
    """Write the ensemble bundle of ``member_dirs`` to ``out`` (a new folder) and return ``out``.

    Each member is loaded and verified with :func:`agents.bundle.load_bundle`, the members are checked against
    each other (:func:`check_members`), their bundle files (those of their manifests, and the manifests) are
    copied to ``members/m{i}/``, the manifest is written by :func:`agents.bundle.write_manifest`, and the result is
    loaded once more through :func:`agents.bundle.load_bundle` before it is moved into place (written to a
    hidden sibling folder first, so ``out`` never holds a half-written bundle).

    Raises
    ------
    EnsembleError
        Unknown ``mode``, ``out`` exists, or members that cannot form an ensemble (see :func:`check_members`).
    regime.hmm.ModelLoadError
        A member bundle that does not load (the message names it).
    """
    if mode not in MODES:
        raise EnsembleError(f"ensemble mode must be one of {', '.join(MODES)}, got {mode!r}")
    out = Path(out)
    if out.exists():
        raise EnsembleError(f"--out {out} exists: the ensemble is written to a new folder")
    bundles = [load_bundle(Path(d), device=device) for d in member_dirs]
    check_members(bundles)
    ref = bundles[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        records = []
        for i, b in enumerate(bundles):
            rel_dir = f"{MEMBERS_DIR}/m{i}"
            for rel in [*b.manifest["files"], MANIFEST]:
                dst = tmp / rel_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(b.path) / rel, dst)
            records.append(_member_record(b, rel_dir, sha256_file(tmp / rel_dir / MANIFEST)))
        names = list(feature_names(ref.feature_config)) + ensemble_output_names(ref.models.n_states, len(bundles))
        config = dict(ref.manifest.get("config") or {})
        config["name"] = f"{config.get('name') or 'bundle'} ({mode} ensemble of {len(bundles)})"
        config["seed"] = [r["seed"] for r in records]
        write_manifest(
            tmp, market_obs_names=names, action_config=ref.env_config.actions, data_info=ref.manifest.get("data") or {},
            run_config=config,
            metrics={"note": "the ensemble was not validated as a whole; each member's validation metrics are in "
                             "ensemble.members"},
            extra={"ensemble": {"mode": mode, "rule": RULES[mode], "members": records,
                                "shared_files": {k: v for k, v in ref.manifest["files"].items()
                                                 if _is_shared_layer_file(k)},
                                "per_member": "actor (policy.safetensors), observation normaliser (policy.json) and "
                                              "signal model (signals/tcn/); member i's signal outputs are the "
                                              "observation columns m{i}_signal_p_*"}},
        )  # fmt: skip
        load_bundle(tmp, device=device)  # the normal loader accepts what was written
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_ensemble(path: Path, manifest: dict[str, Any], *, device: str = "cpu") -> PolicyBundle:
    """Load an ensemble bundle whose files :func:`agents.bundle.load_bundle` has verified against ``manifest``.

    Each member is loaded with :func:`agents.bundle.load_bundle` (its own file hashes and schema check), its
    manifest's SHA-256 must be the one recorded in ``ensemble.members``, the members are checked against each
    other (:func:`check_members`), and the observation schema rebuilt from them must match the manifest's.

    Raises
    ------
    EnsembleError
        An invalid ``ensemble`` block (mode, member folders), a member manifest that is not the recorded one, or
        members that do not fit together.
    regime.hmm.ModelLoadError
        A member that does not load, or an observation schema that differs from the manifest's.
    """
    path = Path(path)
    block = manifest.get("ensemble")
    mode = block.get("mode") if isinstance(block, dict) else None
    members = block.get("members") if isinstance(block, dict) else None
    if mode not in MODES or not isinstance(members, list) or len(members) < 2:
        raise EnsembleError(f"ensemble bundle {path}: its manifest's ensemble block needs a mode in {MODES} and "
                            ">= 2 members")  # fmt: skip
    bundles = []
    for i, m in enumerate(members):
        rel_dir = f"{MEMBERS_DIR}/m{i}"
        if not isinstance(m, dict) or m.get("dir") != rel_dir:
            raise EnsembleError(f"ensemble bundle {path}: member {i} must live in {rel_dir}, the manifest says "
                                f"{m.get('dir') if isinstance(m, dict) else m!r}")  # fmt: skip
        if sha256_file(path / rel_dir / MANIFEST) != m.get("manifest_sha256"):
            raise EnsembleError(f"ensemble bundle {path}: {rel_dir}/{MANIFEST} is not the member manifest the "
                                "ensemble recorded (SHA-256 differs)")  # fmt: skip
        bundles.append(load_bundle(path / rel_dir, device=device))
    check_members(bundles)
    bundle = _assemble(path, manifest, bundles, mode)
    expected = manifest["observation"]["schema_hash"]
    rebuilt = schema_hash(bundle.market_obs_names, {"env_id": ENV_ID})  # as agents.bundle.write_manifest records it
    if rebuilt != expected:
        raise ModelLoadError(f"ensemble bundle {path}: the observation schema rebuilt from its members "
                             f"({rebuilt[:12]}) does not match the manifest ({expected[:12]})")  # fmt: skip
    return bundle
