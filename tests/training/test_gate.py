"""Promotion gate: criteria, verdicts and the manifest record."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest

from training.gate import (
    GateConfig,
    ReportMismatchError,
    apply_gate,
    evaluate_criteria,
    require_pass,
    verdict_of,
)
from training.provenance import bundle_identity, strategy_config_sha256

WF_REPORT = {
    "stitched": {"ppo": {"sortino": 1.2, "max_drawdown": 0.2}, "v1": {"sortino": 0.4, "max_drawdown": 0.1}},
    "deflated_sharpe": {"dsr": 0.97},
    "pbo": {"pbo": 0.3},
}


DEFAULT_GATE = GateConfig()


def _status(report, cfg=DEFAULT_GATE):
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


MANIFEST = {"format_version": 1, "files": {"policy.safetensors": "ab" * 32}, "observation": {"schema_hash": "s1"},
            "config": {"name": "final", "seed": 7, "ppo": {"learning_rate": 3e-4},
                       "data": {"symbol": "BTCUSDT", "train_start": "2021-01-01", "test_end": "2025-07-01"}}}


def _wf_report_for(manifest):
    fold_cfg = json.loads(json.dumps(manifest["config"]))
    fold_cfg.update(name="study-fold1-seed2", seed=2)
    fold_cfg["data"].update(train_start="2020-01-01", test_end="2024-01-01")  # another fold's periods
    return {**WF_REPORT, "provenance": {"strategy_config_sha256": strategy_config_sha256(fold_cfg),
                                        "schema_hash": manifest["observation"]["schema_hash"]}}


def _write(tmp_path, manifest, report):
    bundle, report_dir = tmp_path / "bundle", tmp_path / "report"
    bundle.mkdir(exist_ok=True)
    report_dir.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (report_dir / "metrics.json").write_text(json.dumps(report))
    return bundle, report_dir


@pytest.mark.parametrize("change, field", [
    (lambda m: m["config"]["ppo"].update(learning_rate=1e-3), "strategy_config_sha256"),
    (lambda m: m["config"]["data"].update(symbol="ETHUSDT"), "strategy_config_sha256"),
    (lambda m: m["observation"].update(schema_hash="s2"), "schema_hash"),
])
def test_gate_refuses_a_walkforward_report_of_another_strategy(tmp_path, change, field):
    other = json.loads(json.dumps(MANIFEST))
    change(other)
    bundle, report = _write(tmp_path, other, _wf_report_for(MANIFEST))
    with pytest.raises(ReportMismatchError, match=field):
        apply_gate(bundle, report, GateConfig())
    assert "gate" not in json.loads((bundle / "manifest.json").read_text())  # nothing written


def test_gate_ties_an_evaluate_report_to_the_exact_bundle_files(tmp_path):
    report = {"ppo": {"sortino": 1.0, "max_drawdown": 0.1}, "v1": {"sortino": 0.5},
              "provenance": {"bundle": bundle_identity(MANIFEST)}}
    bundle, report_dir = _write(tmp_path, MANIFEST, report)
    assert apply_gate(bundle, report_dir, GateConfig())["report_kind"] == "evaluate"
    retrained = {**MANIFEST, "files": {"policy.safetensors": "cd" * 32}}  # same config, other weights
    bundle, report_dir = _write(tmp_path, retrained, report)
    with pytest.raises(ReportMismatchError, match="files_sha256"):
        apply_gate(bundle, report_dir, GateConfig())
    bundle, report_dir = _write(tmp_path, MANIFEST, {k: v for k, v in report.items() if k != "provenance"})
    with pytest.raises(ReportMismatchError, match="no provenance"):
        apply_gate(bundle, report_dir, GateConfig())


def test_infinite_sortino_written_as_a_string_is_a_number_not_missing():
    report = {**WF_REPORT, "stitched": {"ppo": {"sortino": "inf", "max_drawdown": 0.0}, "v1": {"sortino": 0.4}}}
    assert _status(report)["beats_v1"] == "passed"


def test_apply_gate_writes_the_verdict_into_the_manifest(tmp_path):
    bundle, report = _write(tmp_path, MANIFEST, _wf_report_for(MANIFEST))
    gate = apply_gate(bundle, report, GateConfig(paper_protection_days=0), now=lambda: datetime(2026, 1, 2, tzinfo=UTC))
    assert gate["report_sha256"] == hashlib.sha256((report / "metrics.json").read_bytes()).hexdigest()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["gate"] == gate and gate["verdict"] == "PASS" and gate["decided_at"].startswith("2026-01-02")
    assert manifest["format_version"] == 1  # the rest of the manifest is kept
    assert gate["paper"] == {"disabled": True}
    # with the default paper protection (14 days) and no paper run: at best HOLD
    held = apply_gate(bundle, report, GateConfig())
    assert held["verdict"] == "HOLD" and held["reasons"][-1].startswith("paper_protection: missing")
    manifest["gate"] = gate
    require_pass(manifest)
    manifest["gate"]["verdict"] = "HOLD"
    with pytest.raises(PermissionError, match="HOLD"):
        require_pass(manifest)
    require_pass(manifest, force=True)
    with pytest.raises(PermissionError, match="absent"):
        require_pass({})
