"""``ats serve`` command line: the settings file, and the refusals that protect testnet/live."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ats_cli.main import app
from serving.errors import FatalError
from serving.settings import ServeSettings, load_serve_settings

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_shipped_serve_config_is_the_documented_defaults():
    assert load_serve_settings(ROOT / "configs" / "serve.yaml") == ServeSettings()
    assert load_serve_settings(None) == ServeSettings()


def test_serve_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("risk:\n  max_leverag: 3\n")
    with pytest.raises(FatalError, match=r"risk\.max_leverag"):
        load_serve_settings(bad)
    bad.write_text("paper:\n  warmup_bars: -5\n")
    with pytest.raises(FatalError, match=r"paper\.warmup_bars"):
        load_serve_settings(bad)
    with pytest.raises(FatalError, match="not found"):
        load_serve_settings(tmp_path / "missing.yaml")


def test_risk_guard_cannot_be_disabled_on_testnet_or_live(tmp_path):
    no_risk = tmp_path / "serve.yaml"
    no_risk.write_text("risk: null\n")
    for args in (["--no-risk"], ["--config", str(no_risk)]):
        for mode in ("testnet", "live"):
            r = runner.invoke(app, ["serve", "--mode", mode, "--bundle", str(tmp_path), "--db",
                                    str(tmp_path / "s.sqlite"), *args])
            assert r.exit_code != 0 and "risk guard cannot be disabled" in r.output
    assert not (tmp_path / "s.sqlite").exists()


def test_live_without_the_flag_stops_before_touching_anything(tmp_path):
    r = runner.invoke(app, ["serve", "--mode", "live", "--bundle", str(tmp_path / "b"), "--db", str(tmp_path / "s.sqlite")])
    assert r.exit_code == 2 and "--live" in r.output
    assert not (tmp_path / "s.sqlite").exists()


def test_paper_needs_replay_and_required_options(tmp_path):
    r = runner.invoke(app, ["serve", "--bundle", str(tmp_path), "--db", str(tmp_path / "s.sqlite")])
    assert r.exit_code != 0 and "--replay" in r.output
    r = runner.invoke(app, ["serve", "--mode", "paper"])
    assert r.exit_code != 0 and "--bundle and --db are required" in r.output
