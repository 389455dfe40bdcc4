"""Webhook notifications against a local HTTP server: delivered when it works, harmless when it fails."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
import talib

from envs.config import CostConfig
from serving.hotswap import BackoffConfig
from serving.loop import ServeConfig, run_replay
from serving.notify import NotifyConfig, WebhookNotifier, messages, notify_config_from_env
from serving.store import EventRecord, FillRecord, StateStore
from tests.kit.candles import make_candles
from tests.serving.fakes import FlipPolicy, RaisingPolicy, ScriptedFallback

T = pd.Timestamp("2025-01-01", tz="UTC")
SECRET = "SENTINEL-TOKEN-7f3a"


class _Server:
    """127.0.0.1 webhook: ``mode`` 'ok' (200), '500', or 'hang' (answers after ``hang_s``)."""

    def __init__(self, mode: str, hang_s: float = 3.0) -> None:
        self.mode, self.hang_s, self.bodies, self.paths = mode, hang_s, [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.paths.append(self.path)
                outer.bodies.append(json.loads(body))
                if outer.mode == "hang":
                    time.sleep(outer.hang_s)
                code = 500 if outer.mode == "500" else 204
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request):
    s = _Server(request.param)
    yield s
    s.close()


def _discord(url: str, **kw) -> NotifyConfig:
    return NotifyConfig(service="discord", webhook_url=f"{url}/api/webhooks/1/{SECRET}", **kw)


EVENTS = [
    EventRecord("r", T, "fallback_engaged", {"reason": "exception: boom"}),
    EventRecord(
        "r", T, "risk_state_changed", {"from": "ACTIVE", "to": "HALTED", "reasons": ["fast_kill: 3"]}
    ),
    EventRecord("r", T, "skipped_min_notional", {}),  # not a notified kind
]
FILLS = [
    FillRecord("r", T, 1, 0.5, 30_000.0, 6.0, 1.0, "entry", "BTCUSDT"),
    FillRecord("r", T, -1, 0.5, 29_000.0, 6.0, 1.0, "stop", "BTCUSDT"),
]


def test_messages_cover_entries_exits_fallbacks_and_kill_switches() -> None:
    texts = messages(EVENTS, FILLS, NotifyConfig(service="discord", webhook_url="http://x").kinds)
    assert texts[0] == "[ats] r 2025-01-01 00:00:00+00:00: entry buy 0.5 @ 30000.00 USDT"
    assert texts[1] == "[ats] r 2025-01-01 00:00:00+00:00: exit (stop) sell 0.5 @ 29000.00 USDT"
    assert "fallback_engaged reason=exception: boom" in texts[2]
    assert "risk_state_changed from=ACTIVE, to=HALTED" in texts[3]
    assert len(texts) == 4


@pytest.mark.parametrize("server", ["ok"], indirect=True)
def test_discord_delivery(server) -> None:
    n = WebhookNotifier(_discord(server.url))
    n.publish(EVENTS, FILLS)
    n.close()
    assert n.sent == 4 and n.failed == 0
    assert server.paths == [f"/api/webhooks/1/{SECRET}"] * 4
    assert server.bodies[0] == {"content": "[ats] r 2025-01-01 00:00:00+00:00: entry buy 0.5 @ 30000.00 USDT"}


@pytest.mark.parametrize("server", ["ok"], indirect=True)
def test_telegram_delivery(server) -> None:
    cfg = NotifyConfig(
        service="telegram", telegram_bot_token=SECRET, telegram_chat_id="42", api_base_url=server.url
    )
    n = WebhookNotifier(cfg)
    n.publish(EVENTS[:1], [])
    n.close()
    assert n.sent == 1 and server.paths == [f"/bot{SECRET}/sendMessage"]
    assert server.bodies[0]["chat_id"] == "42" and "fallback_engaged" in server.bodies[0]["text"]
    assert SECRET not in repr(cfg)  # the token is a SecretStr


@pytest.mark.parametrize("server", ["500"], indirect=True)
def test_failing_webhook_is_counted_not_raised(server) -> None:
    n = WebhookNotifier(_discord(server.url))
    n.publish(EVENTS, FILLS)
    n.close()
    assert n.sent == 0 and n.failed == 4 and n.last_error == "HTTP 500"


def test_unreachable_webhook_hides_the_secret() -> None:
    n = WebhookNotifier(_discord("http://127.0.0.1:9", timeout_s=0.5))  # discard port: refused
    n.publish(EVENTS[:1], [])
    n.close()
    assert n.failed == 1 and SECRET not in (n.last_error or "")


@pytest.mark.parametrize("server", ["hang"], indirect=True)
def test_hanging_webhook_never_blocks_publish(server) -> None:
    n = WebhookNotifier(_discord(server.url, timeout_s=0.3, queue_max=2))
    t0 = time.perf_counter()
    for _ in range(5):
        n.publish(EVENTS[:1], [])
    assert time.perf_counter() - t0 < 0.1  # never waits on the network
    n.close(timeout_s=3.0)
    assert n.failed >= 1 and n.dropped >= 1 and n.sent + n.failed + n.dropped == 5


@pytest.mark.parametrize("server", ["hang", "500"], indirect=True)
def test_loop_finishes_with_a_broken_webhook(server) -> None:
    candles = make_candles(120, seed=3)
    atr = talib.ATR(candles.high.to_numpy(), candles.low.to_numpy(), candles.close.to_numpy(), 14)
    n = WebhookNotifier(_discord(server.url, timeout_s=0.2, queue_max=5))
    store = StateStore("sqlite://")
    t0 = time.perf_counter()
    summary = run_replay(
        candles, primary=FlipPolicy(), fallback=ScriptedFallback(), atr=atr, costs=CostConfig(), store=store,
        config=ServeConfig(warmup_bars=40, context_bars=50, primary_backoff=BackoffConfig(initial_bars=0)), notifier=n,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    n.close(timeout_s=1.0)
    assert summary.bars == 80 and len(store.decisions()) == 80
    assert summary.n_fills > 50  # FlipPolicy trades every bar: many messages
    assert n.sent == 0 and n.failed + n.dropped > 50
    assert elapsed < 10.0


@pytest.mark.parametrize("server", ["ok"], indirect=True)
def test_loop_sends_fallback_and_fills(server) -> None:
    candles = make_candles(60, seed=3)
    atr = talib.ATR(candles.high.to_numpy(), candles.low.to_numpy(), candles.close.to_numpy(), 14)
    n = WebhookNotifier(_discord(server.url))
    run_replay(
        candles, primary=RaisingPolicy(), fallback=ScriptedFallback(), atr=atr, costs=CostConfig(),
        store=StateStore("sqlite://"), config=ServeConfig(warmup_bars=40, context_bars=50), notifier=n,
    )  # fmt: skip
    n.close()
    texts = [b["content"] for b in server.bodies]
    assert any("run_started" in t for t in texts) and any("run_finished" in t for t in texts)
    assert sum("fallback_engaged" in t for t in texts) == 1


def test_config_from_env_and_validation() -> None:
    assert notify_config_from_env({}) is None
    cfg = notify_config_from_env({"ATS_DISCORD_WEBHOOK_URL": "http://h/x"})
    assert cfg is not None and cfg.service == "discord"
    cfg = notify_config_from_env({"ATS_TELEGRAM_BOT_TOKEN": "t", "ATS_TELEGRAM_CHAT_ID": "1"})
    assert cfg is not None and cfg.service == "telegram"
    with pytest.raises(ValueError, match="needs telegram_bot_token and telegram_chat_id"):
        notify_config_from_env({"ATS_TELEGRAM_BOT_TOKEN": "t"})
    with pytest.raises(ValueError, match="needs webhook_url"):
        NotifyConfig(service="discord")
