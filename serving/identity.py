"""Which bundle a serving run trades: the identity recorded in its ``run_started`` event (``detail['bundle']``), so
that evidence read from a state database (``ats gate --paper-db``) can be tied to the bundle it judges."""

from __future__ import annotations

from typing import Any

__all__ = ["bundle_identity"]


def bundle_identity(slot: Any) -> dict[str, Any]:
    """The identity of the primary a :class:`serving.hotswap.PolicySlot` holds: ``{"path", "loaded", "schema_hash",
    "files"}`` with ``files`` the manifest's file table (relative path -> SHA-256; the table the gate compares to
    the bundle's manifest) when the slot holds a bundle's policy; ``loaded`` False (and ``error``) when the primary
    failed to load, so V1 decides."""
    policy = getattr(slot, "policy", None)
    source = getattr(slot, "source", None)
    bundle = getattr(policy, "bundle", None)
    manifest = getattr(bundle, "manifest", None)
    if not isinstance(manifest, dict):
        return {"path": None if source is None else str(source), "loaded": False,
                "error": getattr(slot, "load_error", None)}
    return {"path": None if source is None else str(source), "loaded": True,
            "schema_hash": (manifest.get("observation") or {}).get("schema_hash"),
            "files": dict(manifest.get("files") or {})}
