"""Expected errors of the ``ats`` command line: one message (what, where, what to do), exit code 2, no
traceback; ``--debug`` / ``ATS_DEBUG=1`` show the traceback; unexpected exceptions keep theirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ats_cli.errors import expected_hint, format_error
from ats_cli.main import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
WIDE = {"COLUMNS": "250", "ATS_DEBUG": ""}


def _expected(result, *fragments: str) -> None:
    """``result`` ended on an expected error: exit code 2, every fragment in its output, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    assert "Traceback" not in result.output and "most recent call last" not in result.output
    assert "ats --debug" in result.output  # says how to see the traceback


@pytest.fixture()
def no_keys(monkeypatch):
    for var in ("ATS_BINANCE_API_KEY", "ATS_BINANCE_API_SECRET", "ATS_DISCORD_WEBHOOK_URL", "ATS_TELEGRAM_BOT_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def _bundle(tmp_path: Path, verdict: str = "PASS") -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_text(json.dumps({"gate": {"verdict": verdict}}))
    return bundle


def _replay(tmp_path: Path, candles_file: Path):
    return runner.invoke(app, ["serve", "--mode", "paper", "--replay", str(candles_file), "--bundle",
                               str(tmp_path / "nobundle"), "--db", str(tmp_path / "s.sqlite")], env=WIDE)


def test_missing_config(tmp_path):
    r = runner.invoke(app, ["train", "--config", "nope.yaml", "--out", str(tmp_path / "run")], env=WIDE)
    _expected(r, "config file not found: nope.yaml", "configs/*.yaml", "ConfigError")
    assert not (tmp_path / "run").exists()


def test_invalid_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nppo:\n  total_timestepz: 10\n")
    r = runner.invoke(app, ["train", "--config", str(bad), "--out", str(tmp_path / "run")], env=WIDE)
    _expected(r, f"{bad}: invalid config", "ppo.total_timestepz")
    bad.write_text("name: [unclosed\n")
    _expected(runner.invoke(app, ["walkforward", "--config", str(bad), "--out", str(tmp_path / "wf")], env=WIDE),
              "invalid YAML")


def test_missing_candle_file(tmp_path):
    _expected(_replay(tmp_path, tmp_path / "missing.parquet"), f"candle file not found: {tmp_path / 'missing.parquet'}",
              "check the path")
    assert not (tmp_path / "s.sqlite").exists()


def test_unreadable_candle_file(tmp_path):
    text = tmp_path / "notes.parquet"
    text.write_text("not parquet at all")
    _expected(_replay(tmp_path, text), "candles notes.parquet: rule 'parquet_file' failed: not a readable parquet file",
              "ats data check FILE")
    if os.geteuid() != 0:  # root reads anything
        from tests.kit.candles import make_candles

        locked = tmp_path / "locked.parquet"
        make_candles(50, seed=1).to_parquet(locked)
        locked.chmod(0)
        _expected(_replay(tmp_path, locked), "Permission denied", "permissions")


def test_candles_that_break_a_rule(tmp_path):
    from tests.kit.candles import make_candles

    candles = make_candles(300, seed=2)
    candles.iloc[7, candles.columns.get_loc("high")] = candles["low"].iloc[7] * 0.5
    bad = tmp_path / "bad.parquet"
    candles.to_parquet(bad)
    _expected(_replay(tmp_path, bad), "candles bad.parquet: rule 'ohlc_consistency' failed at 1 rows",
              str(candles.index[7]), "DataValidationError")


def test_bundle_that_does_not_load(tmp_path):
    r = runner.invoke(app, ["evaluate", "--bundle", str(tmp_path / "nobundle"), "--period", "2024-01-01:2024-02-01",
                            "--out", str(tmp_path / "report")], env=WIDE)
    _expected(r, "cannot read bundle manifest", str(tmp_path / "nobundle"), "RUN/bundle", "ModelLoadError")


def test_missing_credentials_and_exposed_env_file(tmp_path, no_keys):
    bundle = _bundle(tmp_path)
    args = ["serve", "--mode", "testnet", "--bundle", str(bundle), "--db", str(tmp_path / "s.sqlite")]
    _expected(runner.invoke(app, args, env=WIDE), "no API credentials", "FatalError")
    env_file = tmp_path / ".env"
    env_file.write_text("ATS_BINANCE_API_KEY=k1234567\nATS_BINANCE_API_SECRET=s1234567\n")
    env_file.chmod(0o644)
    _expected(runner.invoke(app, [*args, "--env-file", str(env_file)], env=WIDE), f"chmod 600 {env_file}")
    assert not (tmp_path / "s.sqlite").exists()


def test_exchange_setup_error(tmp_path, no_keys, monkeypatch):
    from tests.kit.candles import make_candles
    from tests.kit.fake_binance import FakeBinance

    monkeypatch.setenv("ATS_BINANCE_API_KEY", "setupkey1234")
    monkeypatch.setenv("ATS_BINANCE_API_SECRET", "setupsecret5678")
    candles = make_candles(1_000, seed=3)
    now_ms = int(candles.index[900].value // 1_000_000) + 60_000
    with FakeBinance(candles, candles["funding_rate"].dropna(), now_ms=now_ms) as fake:
        r = runner.invoke(app, ["serve", "--mode", "testnet", "--bundle", str(_bundle(tmp_path)), "--db",
                                str(tmp_path / "s.sqlite"), "--max-bars", "1", "--symbol", "ETH/USDT:USDT",
                                "--base-url", fake.url], env=WIDE)
    _expected(r, "'ETH/USDT:USDT' not listed by the exchange")


def test_debug_flag_and_environment_show_the_traceback():
    args = ["train", "--config", "nope.yaml", "--out", "unused"]
    from training.config import ConfigError

    for r in (runner.invoke(app, ["--debug", *args]), runner.invoke(app, args, env={"ATS_DEBUG": "1"})):
        assert isinstance(r.exception, ConfigError) and r.exit_code == 1  # raised on: typer prints its traceback
    assert runner.invoke(app, args, env={"ATS_DEBUG": "0"}).exit_code == 2


def test_unexpected_exceptions_keep_their_traceback(monkeypatch):
    import training.config

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(training.config, "load_config", broken)
    r = runner.invoke(app, ["train", "--config", "nope.yaml", "--out", "unused"], env=WIDE)
    assert isinstance(r.exception, RuntimeError) and r.exit_code == 1 and "ats --debug" not in r.output


def test_classification_table():
    from market.errors import DataValidationError
    from regime.hmm import ModelLoadError
    from serving.errors import FatalError, RetryableError
    from serving.hotswap import BundleRejected
    from training.config import ConfigError

    expected = [ConfigError("c"), DataValidationError("rule"), ModelLoadError("m"), BundleRejected("b"),
                FatalError("f"), FileNotFoundError("x"), PermissionError("p"), IsADirectoryError("d"),
                NotADirectoryError("n")]
    for exc in expected:
        assert expected_hint(exc) is not None, exc
    for exc in (RuntimeError("r"), ValueError("v"), KeyError("k"), RetryableError("t"), OSError("o"), TypeError("t")):
        assert expected_hint(exc) is None, exc
    text = format_error(FileNotFoundError("candle file not found: [x].parquet"))
    assert "\\[x]" in text  # rich markup in the message is escaped, not interpreted


def _ats(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ATS_DEBUG"}
    return subprocess.run([sys.executable, "-m", "ats_cli.main", *args], cwd=REPO, env=env, capture_output=True,
                          check=False, text=True, timeout=300)


def test_the_installed_command_prints_no_traceback_unless_asked(tmp_path):
    """The real entry point (typer's pretty traceback hook included), as a user runs it."""
    quiet = _ats("train", "--config", "nope.yaml", "--out", str(tmp_path / "run"))
    assert quiet.returncode == 2
    assert "config file not found: nope.yaml" in quiet.stderr and "Traceback" not in quiet.stderr + quiet.stdout
    loud = _ats("--debug", "train", "--config", "nope.yaml", "--out", str(tmp_path / "run"))
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "config file not found" in loud.stderr
