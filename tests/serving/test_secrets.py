"""Credentials: sources, file permissions, redaction; a sentinel key never reaches logs or the database."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
from typer.testing import CliRunner

from ats_cli.main import app
from serving.errors import FatalError
from serving.exchange import BinanceFuturesBroker, make_client
from serving.live import LiveConfig, LiveLoop
from serving.notify import DEFAULT_KINDS, messages
from serving.secrets import ENV_API_KEY, ENV_API_SECRET, Secret, check_private_file, load_credentials, redact
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.kit.fake_binance import ORDER, FakeBinance, Fault
from tests.serving.test_live import LONG, CountingPolicy

KEY = "SENTINELKEY0123456789abcdefKEY"
SECRET = "SENTINELSECRET9876543210zyxSECRET"


def _env_file(tmp_path, mode=0o600, body=None):
    path = tmp_path / ".env"
    path.write_text(body if body is not None else f"{ENV_API_KEY}={KEY}\n{ENV_API_SECRET}={SECRET}\n")
    os.chmod(path, mode)
    return path


def test_env_variables_win_and_values_are_hidden():
    creds = load_credentials(env={ENV_API_KEY: KEY, ENV_API_SECRET: SECRET})
    assert creds.source == "env"
    assert creds.api_key.reveal() == KEY and creds.api_secret.reveal() == SECRET
    shown = " ".join([repr(creds), str(creds), f"{creds.api_key}", repr(creds.api_key), str(creds.api_secret)])
    assert KEY not in shown and SECRET not in shown and "***" in shown
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(creds.api_key)


def test_env_file_private_only(tmp_path):
    creds = load_credentials(env={}, env_file=_env_file(tmp_path))
    assert creds.api_key.reveal() == KEY and creds.source.endswith(".env")
    for mode in (0o640, 0o604, 0o660, 0o644):
        path = _env_file(tmp_path, mode)
        with pytest.raises(FatalError, match=f"{mode:04o}.*chmod 600") as info:
            load_credentials(env={}, env_file=path)
        assert KEY not in str(info.value)
    assert KEY not in os.environ.get(ENV_API_KEY, "")  # the file is not exported


def test_missing_or_incomplete_credentials(tmp_path):
    with pytest.raises(FatalError, match=ENV_API_KEY):
        load_credentials(env={})
    with pytest.raises(FatalError, match="does not define both"):
        load_credentials(env={}, env_file=_env_file(tmp_path, body=f"{ENV_API_KEY}={KEY}\n"))
    with pytest.raises(FatalError, match="cannot be read"):
        check_private_file(tmp_path / "nope.env")
    with pytest.raises(FatalError, match="empty"):
        Secret("  ")


def test_redact():
    assert redact(f"a {KEY} b {SECRET} c {KEY}", [KEY, SECRET]) == "a *** b *** c ***"
    assert redact("abc", ["", "ab"]) == "abc"  # too short to redact safely


class _TextNotifier:
    """Keeps the texts a webhook would have received."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def publish(self, events, fills) -> None:
        self.texts += messages(events, fills, DEFAULT_KINDS)

    def close(self, timeout_s: float = 5.0) -> None:
        pass


def test_sentinel_key_never_in_logs_or_database(tmp_path, caplog, capsys):
    creds = load_credentials(env={}, env_file=_env_file(tmp_path))
    candles = make_candles(200, seed=1)
    t0 = int(candles.index[100].value // 1_000_000) + 60_000
    db = tmp_path / "state.sqlite"
    caplog.set_level(logging.DEBUG)
    with FakeBinance(candles, candles["funding_rate"].dropna(), now_ms=t0) as fake:
        client = make_client(api_key=creds.api_key.reveal(), secret=creds.api_secret.reveal(), base_url=fake.url,
                             timeout_ms=2000, rate_limit=False)
        store = StateStore.sqlite(db)
        notifier = _TextNotifier()
        loop = LiveLoop(BinanceFuturesBroker(client, read_attempts=2, sleep=lambda s: None), store,
                        LiveConfig(context_bars=40), primary=CountingPolicy(LONG), fallback=CountingPolicy(LONG),
                        wall_clock_s=lambda: fake.now_ms / 1000.0, redact=creds.redact, notifier=notifier)
        fake.add_fault(f"POST {ORDER}", Fault("echo_key"))  # the venue quotes the key in an error
        loop.step()
        fake.now_ms += 3_600_000
        fake.add_fault("/fapi/v3/positionRisk", Fault("auth_error"), times=5)
        with pytest.raises(FatalError):
            loop.run(max_steps=1, install_signal_handlers=False, poll_s=0.0)
        store.close()
    rejected = [e for e in StateStore.sqlite(db).events()["detail"] if e and "API-key" in str(e.get("error", ""))]
    assert rejected, "the echoed error must have been recorded (redacted)"
    status = CliRunner().invoke(app, ["status", "--db", str(db)])
    assert status.exit_code == 0 and "testnet" in status.output, status.output  # the status table was printed
    # every file the run wrote in its directory (database, WAL, reload requests, reports...), not the key file
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".env"]
    assert any(p.name.startswith("state.sqlite") for p in written)
    blobs = b"".join(p.read_bytes() for p in written)
    out = capsys.readouterr()
    for sentinel in (KEY, SECRET):
        assert sentinel.encode() not in blobs
        assert sentinel not in caplog.text and sentinel not in out.out and sentinel not in out.err
        assert sentinel not in status.output
        assert sentinel not in " ".join(notifier.texts)
