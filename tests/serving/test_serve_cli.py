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


def test_paper_required_options_and_flags_of_the_other_source(tmp_path):
    r = runner.invoke(app, ["serve", "--mode", "paper"])
    assert r.exit_code != 0 and "--bundle and --db are required" in r.output
    base = ["serve", "--bundle", str(tmp_path), "--db", str(tmp_path / "s.sqlite")]
    r = runner.invoke(app, [*base, "--warmup-bars", "10"])  # live candles: the context comes from the exchange
    assert r.exit_code != 0 and "--warmup-bars is for --replay" in r.output
    r = runner.invoke(app, [*base, "--mode", "testnet", "--base-url", "http://127.0.0.1:9"])
    assert r.exit_code != 0 and "paper on live candles" in r.output
    assert not (tmp_path / "s.sqlite").exists()


def test_paper_without_replay_serves_live_candles_and_refuses_to_reuse_its_db(tmp_path, monkeypatch):
    """``ats serve --mode paper`` (no --replay) against the fake exchange: one live bar decided by V1
    (the bundle does not load), no key needed; a second start on the same database is refused."""
    import json

    from serving.status import read_status
    from serving.store import StateStore
    from tests.kit.candles import make_candles
    from tests.kit.fake_binance import FakeBinance

    for var in ("ATS_BINANCE_API_KEY", "ATS_BINANCE_API_SECRET", "ATS_DISCORD_WEBHOOK_URL", "ATS_TELEGRAM_BOT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    candles = make_candles(1_100, seed=3)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"gate": {"verdict": "HOLD"}}))
    db = tmp_path / "paper.sqlite"
    now_ms = int(candles.index[1_050].value // 1_000_000) + 60_000
    args = ["serve", "--mode", "paper", "--bundle", str(bundle), "--db", str(db), "--max-bars", "1"]
    with FakeBinance(candles, candles["funding_rate"].dropna(), now_ms=now_ms) as fake:
        r = runner.invoke(app, [*args, "--base-url", fake.url])
        assert r.exit_code == 0, r.output
        again = runner.invoke(app, [*args, "--base-url", fake.url])
    assert again.exit_code == 2 and "cannot be resumed" in again.output
    store = StateStore.sqlite(db)
    d = store.decisions("paper")
    assert list(d.bar_open_time) == [candles.index[1_049]] and d.source.iloc[0] == "v1"
    assert d.fallback_reason.iloc[0].startswith("bundle_load_failed")
    assert read_status(store).mode == "paper"


def test_readme_testnet_example_passes_the_gate_check_of_an_ungated_bundle(tmp_path, monkeypatch):
    """The README's testnet line must get past the PASS-gate check with the demo bundle (no PASS verdict):
    run with the paths swapped for temporary ones, it stops at the (missing) key file, not at the gate."""
    import json
    import shlex

    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith("ats serve --mode testnet"))
    args = shlex.split(line.split("#")[0])[1:]
    swap = {"runs/demo/bundle": str(tmp_path / "bundle"), "runs/testnet.sqlite": str(tmp_path / "t.sqlite"),
            ".env": str(tmp_path / "missing.env")}
    args = [swap.get(a, a) for a in args]
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text(json.dumps({"gate": {"verdict": "HOLD"}}))
    for var in ("ATS_BINANCE_API_KEY", "ATS_BINANCE_API_SECRET", "ATS_DISCORD_WEBHOOK_URL", "ATS_TELEGRAM_BOT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "not PASS" not in r.output and "missing.env" in r.output, r.output
    without = runner.invoke(app, [a for a in args if a != "--force-gate"])
    assert without.exit_code == 2 and "not PASS" in without.output  # the gate itself is unchanged
