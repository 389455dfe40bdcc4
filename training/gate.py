"""``ats gate``: a promotion gate that writes PASS, HOLD or REJECT, with reasons, into a bundle's manifest.

Each criterion is *passed*, *failed* or *missing* (the report does not hold the number). Verdict:
any failed criterion -> ``REJECT``; otherwise any missing one -> ``HOLD``; otherwise ``PASS``. The
report is either a walk-forward directory (``metrics.json`` with ``stitched``, ``deflated_sharpe``,
``pbo``) or an ``ats evaluate`` report (``metrics.json`` keyed by strategy; it has no DSR or PBO,
so a bundle judged on it alone is at best ``HOLD``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field

from market import json_codec
from market.config_base import StrictConfig
from training.provenance import report_mismatches

VERDICTS = ("PASS", "HOLD", "REJECT")


class GateConfig(StrictConfig):
    """Promotion thresholds."""

    min_dsr: float = Field(0.95, ge=0.0, le=1.0, description="minimum deflated Sharpe ratio")
    max_pbo: float = Field(0.5, ge=0.0, le=1.0, description="maximum probability of backtest overfitting")
    require_beat_v1: bool = Field(True, description="test Sortino of PPO must exceed V1's")
    max_drawdown_frac: float = Field(0.35, gt=0.0, le=1.0, description="maximum test drawdown of PPO")


@dataclass(frozen=True)
class Criterion:
    """One gate criterion's outcome: ``status`` passed, failed or missing, and the numbers behind it."""

    name: str
    status: str  # "passed" | "failed" | "missing"
    detail: str


class ReportMismatchError(ValueError):
    """The report was not computed for this bundle (see :func:`training.provenance.report_mismatches`)."""


def _num(value: Any) -> float | None:
    """A finite or infinite number from the report (:mod:`market.json_codec` writes +-inf as strings), else
    None (also for ``nan``: a statistic that could not be computed is missing)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = json_codec.to_float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def evaluate_criteria(report: dict[str, Any], cfg: GateConfig) -> list[Criterion]:
    """Judge a report's numbers against the thresholds (pure)."""
    strategies = report.get("stitched", report)
    ppo, v1 = strategies.get("ppo", {}), strategies.get("v1", {})
    out = []
    dsr = _num((report.get("deflated_sharpe") or {}).get("dsr"))
    out.append(Criterion("deflated_sharpe", "missing" if dsr is None else ("passed" if dsr >= cfg.min_dsr else "failed"),
                         "no DSR in the report" if dsr is None else f"DSR {dsr:.3f} vs minimum {cfg.min_dsr}"))
    pbo = _num((report.get("pbo") or {}).get("pbo"))
    out.append(Criterion("pbo", "missing" if pbo is None else ("passed" if pbo <= cfg.max_pbo else "failed"),
                         "no PBO in the report" if pbo is None else f"PBO {pbo:.3f} vs maximum {cfg.max_pbo}"))
    if cfg.require_beat_v1:
        s_ppo, s_v1 = _num(ppo.get("sortino")), _num(v1.get("sortino"))
        if s_ppo is None or s_v1 is None:
            out.append(Criterion("beats_v1", "missing", "PPO or V1 Sortino missing"))
        else:
            out.append(Criterion("beats_v1", "passed" if s_ppo > s_v1 else "failed",
                                 f"test Sortino PPO {s_ppo:.3f} vs V1 {s_v1:.3f}"))
    dd = _num(ppo.get("max_drawdown"))
    out.append(Criterion("max_drawdown", "missing" if dd is None else ("passed" if dd <= cfg.max_drawdown_frac else "failed"),
                         "no PPO drawdown" if dd is None else f"max drawdown {dd:.1%} vs limit {cfg.max_drawdown_frac:.0%}"))
    return out


def verdict_of(criteria: list[Criterion]) -> str:
    """REJECT if any criterion failed, else HOLD if any is missing, else PASS."""
    statuses = {c.status for c in criteria}
    return "REJECT" if "failed" in statuses else ("HOLD" if "missing" in statuses else "PASS")


def apply_gate(bundle_dir: Path, report_dir: Path, cfg: GateConfig, *,
               now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> dict[str, Any]:
    """Judge ``report_dir/metrics.json`` and record the verdict in ``bundle_dir/manifest.json`` (atomic rewrite).

    The report must describe this bundle: its ``provenance`` must match the bundle's file table
    (an ``ats evaluate`` report) or its strategy config and observation schema (an ``ats
    walkforward`` report); see :mod:`training.provenance`. The verdict records the report's
    path and the SHA-256 of its ``metrics.json``.

    Raises
    ------
    FileNotFoundError
        Missing report metrics or bundle manifest.
    ReportMismatchError
        The report was computed for another bundle or configuration (nothing is written).
    """
    metrics_path = Path(report_dir) / "metrics.json"
    raw = metrics_path.read_bytes()
    report = json.loads(raw)
    manifest_path = Path(bundle_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    mismatches = report_mismatches(report.get("provenance"), manifest)
    if mismatches:
        raise ReportMismatchError(f"{metrics_path} does not describe the bundle {bundle_dir}: " + "; ".join(mismatches))
    criteria = evaluate_criteria(report, cfg)
    gate = {
        "verdict": verdict_of(criteria),
        "reasons": [f"{c.name}: {c.status} ({c.detail})" for c in criteria],
        "thresholds": cfg.model_dump(),
        "report": str(Path(report_dir).resolve()),
        "report_sha256": hashlib.sha256(raw).hexdigest(),
        "report_kind": "evaluate" if "bundle" in report["provenance"] else "walkforward",
        "decided_at": now().isoformat(),
    }
    manifest["gate"] = gate
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json_codec.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    return gate


def require_pass(manifest: dict[str, Any], *, force: bool = False) -> None:
    """Refuse a bundle whose recorded verdict is not PASS (for testnet and live serving) unless ``force``.

    Raises
    ------
    PermissionError
        The bundle has no gate verdict or its verdict is HOLD or REJECT.
    """
    verdict = (manifest.get("gate") or {}).get("verdict")
    if verdict != "PASS" and not force:
        raise PermissionError(f"bundle gate verdict is {verdict or 'absent'}; run `ats gate` or pass --force")
