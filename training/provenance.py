"""What a report was computed from: the strategy config's hash, the bundle's identity, code and packages.

A promotion gate must judge the bundle that the report measured, not any bundle. Two kinds of report:

* ``ats evaluate`` measures one bundle: its report records :func:`bundle_identity` (observation
  schema hash, the hash of the manifest's file table, which covers the weights and every model
  file, and the strategy-config hash).
* ``ats walkforward`` measures a *configuration*: each fold refits the pipeline, so no fold's bundle
  is the one that will serve. Its report records the :func:`strategy_config_sha256` of the base
  run config and the observation schema hash; a bundle trained with the same config (any data
  period, seed or name) matches it.

:func:`report_mismatches` compares a report's provenance with a bundle manifest (pure).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

#: Run-config keys that say *where and how* a run ran, not *what strategy* it trained.
_NON_STRATEGY_KEYS = ("name", "seed", "device", "torch_threads")
#: Data keys that only place the periods (each walk-forward fold moves them).
_PERIOD_KEYS = ("load_start", "train_start", "val_start", "val_end", "test_start", "test_end", "candles_path",
                "funding_path")


def _canonical_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def strategy_config_sha256(run_config: dict[str, Any]) -> str:
    """SHA-256 of a run config (``RunConfig.model_dump(mode="json")``) without its name, seed,
    device, thread count, data periods and file paths (symbol and gap policy stay): equal for a walk-forward fold and a final training
    of the same strategy.

    Raises
    ------
    TypeError, ValueError
        ``run_config`` is not JSON-serialisable (non-finite floats included).
    """
    cfg = {k: v for k, v in run_config.items() if k not in _NON_STRATEGY_KEYS}
    if isinstance(cfg.get("data"), dict):
        cfg["data"] = {k: v for k, v in cfg["data"].items() if k not in _PERIOD_KEYS}
    return _canonical_sha256(cfg)


def bundle_identity(manifest: dict[str, Any]) -> dict[str, str]:
    """Schema hash, file-table hash and strategy-config hash of a bundle manifest.

    Raises
    ------
    KeyError
        The manifest lacks ``observation.schema_hash``, ``files`` or ``config``.
    """
    return {
        "schema_hash": manifest["observation"]["schema_hash"],
        "files_sha256": _canonical_sha256(manifest["files"]),
        "strategy_config_sha256": strategy_config_sha256(manifest["config"]),
    }


def git_commit(repo_dir: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the code (plus ``-dirty`` with uncommitted changes), or
    ``"unknown"`` outside a git checkout."""
    cwd = Path(repo_dir) if repo_dir else Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def report_mismatches(provenance: dict[str, Any] | None, manifest: dict[str, Any]) -> list[str]:
    """Why a report does not describe this bundle (empty list: it does).

    A report with ``provenance.bundle`` (``ats evaluate``) must match the bundle's file table; one
    with ``provenance.strategy_config_sha256`` (``ats walkforward``) must match the bundle's strategy
    config and observation schema. A report without provenance matches nothing.
    """
    if not provenance:
        return ["the report records no provenance (made by an older version?); re-run it"]
    try:
        ident = bundle_identity(manifest)
    except KeyError as exc:
        return [f"the bundle manifest lacks {exc}"]
    out = []
    if "bundle" in provenance:
        want = provenance["bundle"]
        for key in ("files_sha256", "schema_hash"):
            if want.get(key) != ident[key]:
                out.append(f"{key}: report {str(want.get(key))[:12]} != bundle {ident[key][:12]}")
        return out
    for key in ("strategy_config_sha256", "schema_hash"):
        if provenance.get(key) != ident[key]:
            out.append(f"{key}: report {str(provenance.get(key))[:12]} != bundle {ident[key][:12]}")
    return out


def _versions() -> dict[str, str]:
    from agents.bundle import package_versions  # the same list a bundle manifest records

    return package_versions()


def provenance_record(run_config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The ``provenance`` block of a report's ``metrics.json``: strategy-config hash, the config
    itself, git commit, package versions, plus ``extra`` (e.g. ``bundle=bundle_identity(...)``,
    ``schema_hash=...``, ``data_sha256=[...]``)."""
    return {"strategy_config_sha256": strategy_config_sha256(run_config), "config": run_config,
            "git_commit": git_commit(), "versions": _versions(), **extra}  # fmt: skip


def flatten_config(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config as ``{"a.b.c": "value"}`` rows for the report's config table."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


def provenance_note(prov: dict[str, Any]) -> str:
    """One report line: code commit, strategy-config hash and the main package versions."""
    v = prov.get("versions", {})
    pkgs = ", ".join(f"{k} {v[k]}" for k in ("python", "ats", "torch", "stable-baselines3", "numpy", "pandas") if k in v)
    return (f"Code {prov.get('git_commit', 'unknown')}; strategy config sha256 {prov['strategy_config_sha256'][:16]} "
            f"(full config in the table 'run config'); {pkgs}.")
