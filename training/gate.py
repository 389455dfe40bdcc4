"""``ats gate``: a promotion gate that writes PASS, HOLD or REJECT, with reasons, into a bundle's manifest.

Each criterion is *passed*, *failed* or *missing* (the report does not hold the number). Verdict:
any failed criterion -> ``REJECT``; otherwise any missing one -> ``HOLD``; otherwise ``PASS``. The
report is either a walk-forward directory (``metrics.json`` with ``stitched``, ``deflated_sharpe``,
``pbo``) or an ``ats evaluate`` report (``metrics.json`` keyed by strategy; it has no DSR or PBO,
so a bundle judged on it alone is at best ``HOLD``).

**Paper protection** (``ats gate --paper-db P``): a bundle passes for testnet/live only after
``paper_protection_days`` (default 14) of paper trading on live candles (``ats serve --mode paper`` without
``--replay``) whose realised figures lie inside the walk-forward's intervals (:func:`paper_intervals`):

* Sortino (annualised, MAR 0; Sortino & Price 1994) inside the walk-forward's 95 % block-bootstrap interval of
  the stitched out-of-sample Sortino (``sortino_ci95.ppo``);
* max drawdown at most the worst test window's (``per_fold.ppo[*].max_drawdown``; the stitched one without
  folds);
* closed trades per day inside [lowest, highest] of the test windows' rates (``n_trades`` over the window's
  days), widened by ``paper_trade_rate_tolerance_frac`` on each side.

The paper run must have traded this bundle (the file table its ``run_started`` recorded equals the manifest's)
without a hot-swap. Days are counted from the first paper bar's open to the earlier of the last bar's close and
``now`` (injected). Too few days, a replay, another bundle or a missing interval is *missing* (HOLD: wait, or
serve the right run); a figure outside its interval is *failed* (REJECT). ``paper_protection_days`` 0 turns the
protection off (the verdict says so).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
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
    paper_protection_days: float = Field(
        14.0, ge=0.0, description="days of paper trading on live candles required before PASS (0: no protection)")
    paper_trade_rate_tolerance_frac: float = Field(
        0.5, ge=0.0, description="the walk-forward's trade-rate interval is widened by this fraction on each side")


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


@dataclass(frozen=True)
class PaperEvidence:
    """What a paper run realised, read from its state database (``ats_cli`` builds it with
    :mod:`serving.ops_data`).

    Attributes
    ----------
    source : str
        Where it was read (database and run id), for the record.
    candles : str
        'live' (paper on live candles), 'replay' (a candle file) or 'exchange' (testnet/live orders).
    first_bar, last_bar : datetime
        Open times (UTC) of the first and last decided bars.
    bar_interval_s : float
        Bar length, seconds.
    equity_usdt : tuple[float, ...]
        Account equity: the run's initial equity, then one mark per bar close (USDT, > 0).
    n_closed_trades : int
        Closed trades of the run (all symbols).
    bundle_files : dict[str, str] | None
        The file table (path -> SHA-256) of the bundle the run started with; None when not recorded.
    n_swaps : int
        Hot-swaps of the primary during the run.
    """

    source: str
    candles: str
    first_bar: datetime
    last_bar: datetime
    bar_interval_s: float
    equity_usdt: tuple[float, ...]
    n_closed_trades: int
    bundle_files: dict[str, str] | None
    n_swaps: int = 0


def paper_intervals(report: dict[str, Any], cfg: GateConfig) -> dict[str, tuple[float, float] | None]:
    """The walk-forward's intervals the paper figures must lie in (module docstring): ``sortino``,
    ``max_drawdown`` (0, worst window) and ``trades_per_day``; None where the report lacks the numbers."""
    out: dict[str, tuple[float, float] | None] = {}
    ci = (report.get("sortino_ci95") or {}).get("ppo")
    lo, hi = (_num(ci[0]), _num(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)
    out["sortino"] = None if lo is None or hi is None else (lo, hi)
    folds = [f for f in ((report.get("per_fold") or {}).get("ppo") or []) if isinstance(f, dict)]
    dds = [d for d in (_num(f.get("max_drawdown")) for f in folds) if d is not None]
    if not dds:
        stitched = _num(((report.get("stitched") or {}).get("ppo") or {}).get("max_drawdown"))
        dds = [] if stitched is None else [stitched]
    out["max_drawdown"] = (0.0, max(dds)) if dds else None
    windows = {}
    for w in report.get("windows") or []:
        try:
            windows[int(w["fold"])] = (datetime.fromisoformat(str(w["test_end"])) -
                                       datetime.fromisoformat(str(w["test_start"]))).total_seconds() / 86_400
        except (KeyError, TypeError, ValueError):
            continue
    rates = []
    for k, f in enumerate(folds):
        n, days = _num(f.get("n_trades")), windows.get(k)
        if n is not None and days:
            rates.append(n / days)
    tol = cfg.paper_trade_rate_tolerance_frac
    out["trades_per_day"] = (min(rates) * (1 - tol) if tol < 1 else 0.0, max(rates) * (1 + tol)) if rates else None
    return out


def paper_figures(evidence: PaperEvidence, now: datetime) -> dict[str, float]:
    """The paper run's ``days`` (first bar's open to the earlier of the last close and ``now``), ``sortino``
    (annualised by the bar length), ``max_drawdown`` (fraction) and ``trades_per_day``.

    Raises
    ------
    ValueError
        Fewer than 2 equity marks, a non-positive bar length, or a non-positive equity.
    """
    from training import metric_stats as S

    eq = np.asarray(evidence.equity_usdt, dtype=np.float64)
    if eq.size < 2 or evidence.bar_interval_s <= 0 or not (eq > 0).all():
        raise ValueError(f"paper evidence {evidence.source}: needs >= 2 positive equity marks and a bar length "
                         f"> 0 (got {eq.size} marks, bar {evidence.bar_interval_s} s)")
    end = min(evidence.last_bar + timedelta(seconds=evidence.bar_interval_s), now)
    days = max(0.0, (end - evidence.first_bar).total_seconds() / 86_400)
    ppy = S.bars_per_year(evidence.bar_interval_s)
    return {
        "days": days,
        "sortino": S.sortino_ratio(S.returns_from_equity(eq), ppy),
        "max_drawdown": S.max_drawdown(eq),
        "trades_per_day": evidence.n_closed_trades / days if days > 0 else math.nan,
    }


def evaluate_paper(evidence: PaperEvidence | None, report: dict[str, Any], manifest: dict[str, Any],
                   cfg: GateConfig, now: datetime) -> tuple[list[Criterion], dict[str, Any]]:
    """Judge the paper protection (module docstring; pure). Returns the criteria and the evidence record
    (figures, intervals, source) written into the manifest."""
    days_needed = cfg.paper_protection_days
    if days_needed == 0:
        return [], {"disabled": True}
    if evidence is None:
        return [Criterion("paper_protection", "missing",
                          f"no paper run given: serve the bundle with `ats serve --mode paper` (live candles) for "
                          f"{days_needed:g} days, then `ats gate ... --paper-db DB`")], {"given": False}
    intervals = paper_intervals(report, cfg)
    record: dict[str, Any] = {"source": evidence.source, "candles": evidence.candles,
                              "first_bar": evidence.first_bar.isoformat(), "last_bar": evidence.last_bar.isoformat(),
                              "intervals": {k: None if v is None else list(v) for k, v in intervals.items()},
                              "required_days": days_needed}  # fmt: skip
    out: list[Criterion] = []
    if evidence.candles != "live":
        out.append(Criterion("paper_live_candles", "missing", f"the paper run traded {evidence.candles} candles: "
                             "protection needs `ats serve --mode paper` on the exchange's live candles"))
    else:
        out.append(Criterion("paper_live_candles", "passed", "paper on live candles"))
    files = manifest.get("files")
    if evidence.bundle_files is None:
        out.append(Criterion("paper_bundle", "missing", "the paper run recorded no bundle identity"))
    elif evidence.bundle_files != files:
        out.append(Criterion("paper_bundle", "missing", "the paper run traded another bundle (its file table "
                             "differs from this manifest's)"))
    elif evidence.n_swaps:
        out.append(Criterion("paper_bundle", "missing", f"the paper run hot-swapped its bundle {evidence.n_swaps} "
                             "time(s): the evidence must come from this bundle alone"))
    else:
        out.append(Criterion("paper_bundle", "passed", "the paper run traded this bundle's files"))
    figures = paper_figures(evidence, now)
    record["figures"] = figures
    d = figures["days"]
    out.append(Criterion("paper_days", "passed" if d >= days_needed else "missing",
                         f"{d:.2f} of {days_needed:g} days of paper trading"))

    def inside(name: str, value: float, fmt: str) -> None:
        iv = intervals[name]
        if iv is None:
            out.append(Criterion(f"paper_{name}", "missing", f"the walk-forward report holds no {name} interval"))
        elif math.isnan(value):
            out.append(Criterion(f"paper_{name}", "missing", f"paper {name} undefined"))
        else:
            ok = iv[0] <= value <= iv[1]
            out.append(Criterion(f"paper_{name}", "passed" if ok else "failed",
                                 f"paper {name} {value:{fmt}} vs walk-forward interval [{iv[0]:{fmt}}, {iv[1]:{fmt}}]"))

    inside("sortino", figures["sortino"], ".3f")
    inside("max_drawdown", figures["max_drawdown"], ".1%")
    inside("trades_per_day", figures["trades_per_day"], ".3f")
    return out, record


def expected_bar_return(report: dict[str, Any]) -> dict[str, float] | None:
    """The walk-forward's expected per-bar return of PPO, for the drift monitor's performance CUSUM
    (:mod:`serving.drift`): ``mean`` = the stitched total return compounded per bar, ``(1 + R)^(1/n) - 1``, and
    ``std`` = ``|mean / SR|`` with SR the per-bar Sharpe ratio of the deflated-Sharpe record (``sr_per_bar``).
    None when the report lacks them or SR is 0 (an ``ats evaluate`` report has no per-bar Sharpe)."""
    ppo = (report.get("stitched") or {}).get("ppo") or {}
    total, n = _num(ppo.get("total_return")), _num(ppo.get("n_bars"))
    sr = _num((report.get("deflated_sharpe") or {}).get("sr_per_bar"))
    if total is None or n is None or n < 1 or sr is None or abs(sr) < 1e-9 or total <= -1:
        return None
    mean = (1.0 + total) ** (1.0 / n) - 1.0
    std = abs(mean / sr)
    return {"mean": mean, "std": std} if std > 0 and math.isfinite(std) else None


def apply_gate(bundle_dir: Path, report_dir: Path, cfg: GateConfig, *,
               now: Callable[[], datetime] = lambda: datetime.now(UTC),
               paper: PaperEvidence | None = None) -> dict[str, Any]:
    """Judge ``report_dir/metrics.json`` and record the verdict in ``bundle_dir/manifest.json`` (atomic rewrite).

    With ``cfg.paper_protection_days`` > 0 the paper protection is judged too (module docstring): ``paper``
    is the paper run's evidence (None: the criterion is missing, so the verdict is at best HOLD); the
    evidence, its figures and the intervals are recorded under ``gate.paper``.

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
    decided = now()
    paper_criteria, paper_record = evaluate_paper(paper, report, manifest, cfg, decided)
    criteria += paper_criteria
    gate = {
        "verdict": verdict_of(criteria),
        "reasons": [f"{c.name}: {c.status} ({c.detail})" for c in criteria],
        "thresholds": cfg.model_dump(),
        "report": str(Path(report_dir).resolve()),
        "report_sha256": hashlib.sha256(raw).hexdigest(),
        "report_kind": "evaluate" if "bundle" in report["provenance"] else "walkforward",
        "decided_at": decided.isoformat(),
        "paper": paper_record,
        "expected_bar_return": expected_bar_return(report),
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
