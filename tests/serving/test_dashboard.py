"""``ats dashboard``: a read-only page served on loopback; in headless Chromium it loads with no console message
and shows the figures ``ats status`` prints for the same database."""

from __future__ import annotations

import html
import re
import subprocess
import threading

import httpx
import pytest
from typer.testing import CliRunner

from ats_cli.main import app
from serving.dashboard import Dashboard, RemoteBindError, check_host, make_dashboard_server
from serving.store import EventRecord, StateStore
from tests.kit.chromium import CHROMIUM, FLAGS
from tests.serving.ops_kit import paper_replay_db

WIDE = {"COLUMNS": "200"}


@pytest.fixture(scope="module")
def replay_db(tmp_path_factory):
    db, _ = paper_replay_db(tmp_path_factory.mktemp("dash") / "run", bars=200, seed=11)
    return db


@pytest.fixture()
def served(replay_db):
    server = make_dashboard_server(Dashboard(str(replay_db), refresh_s=5), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def status_fields(db) -> dict[str, str]:
    r = CliRunner().invoke(app, ["status", "--db", str(db)], env=WIDE)
    assert r.exit_code == 0, r.output
    out = {}
    for line in r.output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 2 and cells[0]:
            out[cells[0]] = cells[1]
    return out


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def test_only_loopback_unless_allowed():
    for ok in ("127.0.0.1", "127.8.9.1", "::1", "localhost"):
        assert check_host(ok) == ok
    for bad in ("0.0.0.0", "192.168.1.10", "::", "example.org"):
        with pytest.raises(RemoteBindError, match="--allow-remote"):
            check_host(bad)
    assert check_host("0.0.0.0", allow_remote=True) == "0.0.0.0"
    r = CliRunner().invoke(app, ["dashboard", "--db", __file__, "--host", "0.0.0.0"], env=WIDE)
    assert r.exit_code == 2 and "loopback only" in r.output


def test_no_write_endpoint(served):
    with httpx.Client(base_url=served, timeout=30) as client:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            for path in ("/", "/chart/equity.png", "/status.json"):
                assert client.request(method, path).status_code == 405, (method, path)
        assert client.get("/nope").status_code == 404
        head = client.head("/")
        assert head.status_code == 200 and head.content == b""


def test_page_and_charts_show_the_status_figures(served, replay_db):
    with httpx.Client(base_url=served, timeout=60) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        text = _text(page.text)
        for chart in ("/chart/equity.png", "/chart/sources.png"):
            r = client.get(chart)
            assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n" and len(r.content) > 5_000
        as_json = client.get("/status.json").json()
    status = status_fields(replay_db)
    for field in ("equity", "position", "last bar", "risk state", "bars decided", "decided by V2", "decided by guard"):
        assert f"{field} {status[field]}" in text, field
        assert as_json[field] == status[field]
    assert status["position"].startswith("short ")  # an open position, not the trivial "flat"
    last = StateStore.sqlite(replay_db).decisions().iloc[-1]
    assert f"Last decision bar {last.bar_open_time} symbol {last.symbol} source {last.source}" in text
    assert "run finished: not reloading" in text and 'http-equiv="refresh"' not in page.text


def test_page_reloads_while_the_run_goes_and_lists_drift_and_events(tmp_path, replay_db):
    db = tmp_path / "copy.sqlite"
    db.write_bytes(replay_db.read_bytes())
    store = StateStore.sqlite(db)
    t = store.equity().bar_open_time.iloc[-1]
    store.append(events=[
        EventRecord("paper", t, "run_started", {"mode": "paper"}),  # a new start with no finish: the run goes
        EventRecord("paper", t, "drift", {"statistic": "psi:logret_1b", "value": 0.41, "threshold": 0.25,
                                          "breach": True, "action": "alert"}),
        EventRecord("paper", t, "kill_switch_test", {"note": "<script>alert(1)</script>"}),
    ])
    page = Dashboard(str(db), refresh_s=7).render(*_period(db))
    assert '<meta http-equiv="refresh" content="7">' in page and "reloads every 7 s" in page
    assert "psi:logret_1b" in page and "0.41" in page and "0.25" in page
    assert "kill_switch_test" in page and "<script>" not in page  # event text is escaped


def _period(db):
    from serving.ops_data import read_period

    store = StateStore.sqlite(db)
    return read_period(store), store


def _dump_dom(url: str, workdir) -> tuple[str, list[str]]:
    """Load ``url`` in headless Chromium; return the DOM after load and every console message."""
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={workdir / 'profile'}", "--enable-logging=stderr",
                           "--v=0", "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    console = [m.group(1) for m in map(re.compile(r":CONSOLE[:(]\d+\)?\] (.*)").search, done.stderr.splitlines()) if m]
    return done.stdout, console


def test_page_loads_in_headless_chromium_without_console_messages(served, replay_db, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium not installed (CI installs it in .ci/run)")
    dom, console = _dump_dom(served + "/", tmp_path)
    assert console == []
    text = _text(dom)
    status = status_fields(replay_db)
    for field in ("equity", "position", "decided by V2"):
        assert f"{field} {status[field]}" in text, field
    assert "Risk state and kill switches" in text and "Decisions by source over time" in text
