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
    r = runner.invoke(app, [*base, "--mode", "testnet", "--testnet-data"])
    assert r.exit_code != 0 and "paper on live candles" in r.output
    assert not (tmp_path / "s.sqlite").exists()


@pytest.mark.parametrize("url", ["http://example.com", "http://10.0.0.1:8080", "ftp://127.0.0.1", "127.0.0.1:9",
                                 "https://", "http://localhost.example.com", "http://user:pw@127.0.0.1:9"])
@pytest.mark.parametrize("mode", ["testnet", "live"])
def test_testnet_and_live_refuse_a_base_url_that_is_neither_https_nor_loopback(tmp_path, mode, url):
    r = runner.invoke(app, ["serve", "--mode", mode, "--live", "--bundle", str(tmp_path), "--db",
                            str(tmp_path / "s.sqlite"), "--base-url", url], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "--base-url" in r.output and "Traceback" not in r.output, r.output
    assert "loopback" in r.output or "user name or password" in r.output
    assert not (tmp_path / "s.sqlite").exists()


@pytest.mark.parametrize("url", ["https://fapi.example.com", "http://127.0.0.1:9", "http://127.8.9.10:9",
                                 "http://localhost:9", "http://[::1]:9"])
def test_testnet_accepts_an_https_or_loopback_base_url(tmp_path, monkeypatch, url):
    """The URL passes the CLI: the command goes on to the next check (here the key file, which is missing)."""
    import json

    for var in ("ATS_BINANCE_API_KEY", "ATS_BINANCE_API_SECRET"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "manifest.json").write_text(json.dumps({"gate": {"verdict": "PASS"}}))
    r = runner.invoke(app, ["serve", "--mode", "testnet", "--bundle", str(tmp_path), "--db", str(tmp_path / "s.sqlite"),
                            "--base-url", url, "--env-file", str(tmp_path / "missing.env")])
    assert r.exit_code == 2 and "missing.env" in r.output and "--base-url" not in r.output, r.output


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


def test_testnet_through_a_local_base_url_is_shown_at_start_up_and_in_status(tmp_path, monkeypatch):
    """``ats serve --mode testnet --base-url`` against the fake exchange on loopback: the start-up line and
    ``ats status`` name the URL the keys were sent to."""
    import json

    from tests.kit.candles import make_candles
    from tests.kit.fake_binance import FakeBinance

    monkeypatch.setenv("ATS_BINANCE_API_KEY", "clikey1234")
    monkeypatch.setenv("ATS_BINANCE_API_SECRET", "clisecret5678")
    for var in ("ATS_DISCORD_WEBHOOK_URL", "ATS_TELEGRAM_BOT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    candles = make_candles(1_000, seed=3)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"gate": {"verdict": "HOLD"}}))
    db = tmp_path / "t.sqlite"
    now_ms = int(candles.index[900].value // 1_000_000) + 60_000
    with FakeBinance(candles, candles["funding_rate"].dropna(), now_ms=now_ms) as fake:
        r = runner.invoke(app, ["serve", "--mode", "testnet", "--bundle", str(bundle), "--db", str(db), "--force-gate",
                                "--max-bars", "1", "--base-url", fake.url], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert f"on testnet at {fake.url};" in r.output and "clikey1234" not in r.output
    status = runner.invoke(app, ["status", "--db", str(db)], env={"COLUMNS": "250"})
    assert status.exit_code == 0 and "exchange URL" in status.output and fake.url in status.output, status.output
