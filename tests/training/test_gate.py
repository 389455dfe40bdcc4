"""Promotion gate: criteria, verdicts and the manifest record."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from training.gate import GateConfig, apply_gate, evaluate_criteria, require_pass, verdict_of

WF_REPORT = {
    "stitched": {"ppo": {"sortino": 1.2, "max_drawdown": 0.2}, "v1": {"sortino": 0.4, "max_drawdown": 0.1}},
    "deflated_sharpe": {"dsr": 0.97},
    "pbo": {"pbo": 0.3},
}


def _status(report, cfg=GateConfig()):
    return {c.name: c.status for c in evaluate_criteria(report, cfg)}


def test_all_criteria_met_is_pass():
    assert _status(WF_REPORT) == {"deflated_sharpe": "passed", "pbo": "passed", "beats_v1": "passed", "max_drawdown": "passed"}
    assert verdict_of(evaluate_criteria(WF_REPORT, GateConfig())) == "PASS"


@pytest.mark.parametrize("path, value, name", [
    (("deflated_sharpe", "dsr"), 0.90, "deflated_sharpe"),
    (("pbo", "pbo"), 0.6, "pbo"),
    (("stitched", "ppo", "sortino"), 0.3, "beats_v1"),
    (("stitched", "ppo", "max_drawdown"), 0.5, "max_drawdown"),
])
def test_each_failed_criterion_rejects(path, value, name):
    report = json.loads(json.dumps(WF_REPORT))
    node = report
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert _status(report)[name] == "failed"
    assert verdict_of(evaluate_criteria(report, GateConfig())) == "REJECT"


def test_evaluate_report_without_dsr_and_pbo_is_at_best_hold():
    report = {"ppo": {"sortino": 1.0, "max_drawdown": 0.1}, "v1": {"sortino": 0.5}}
    assert _status(report)["deflated_sharpe"] == "missing"
    assert verdict_of(evaluate_criteria(report, GateConfig())) == "HOLD"


def test_thresholds_are_live_config():
    assert _status(WF_REPORT, GateConfig(min_dsr=0.99))["deflated_sharpe"] == "failed"
    assert _status(WF_REPORT, GateConfig(max_pbo=0.2))["pbo"] == "failed"
    assert _status(WF_REPORT, GateConfig(max_drawdown_frac=0.1))["max_drawdown"] == "failed"
    assert "beats_v1" not in _status({**WF_REPORT}, GateConfig(require_beat_v1=False))


def test_apply_gate_writes_the_verdict_into_the_manifest(tmp_path):
    bundle, report = tmp_path / "bundle", tmp_path / "report"
    bundle.mkdir()
    report.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"format_version": 1, "files": {}}))
    (report / "metrics.json").write_text(json.dumps(WF_REPORT))
    gate = apply_gate(bundle, report, GateConfig(), now=lambda: datetime(2026, 1, 2, tzinfo=UTC))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["gate"] == gate and gate["verdict"] == "PASS" and gate["decided_at"].startswith("2026-01-02")
    assert manifest["format_version"] == 1  # the rest of the manifest is kept
    require_pass(manifest)
    manifest["gate"]["verdict"] = "HOLD"
    with pytest.raises(PermissionError, match="HOLD"):
        require_pass(manifest)
    require_pass(manifest, force=True)
    with pytest.raises(PermissionError, match="absent"):
        require_pass({})
