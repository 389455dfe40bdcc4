"""Optional notifications (Discord or Telegram webhook via httpx) that can never stop the loop.

The loop calls :meth:`Notifier.publish` after each bar's rows are stored. :class:`WebhookNotifier`
turns the events and fills worth a human's attention into short texts and puts them on a bounded
queue; one daemon thread posts them with a short timeout. A webhook that fails (HTTP error,
timeout, refused connection) is counted in ``failed``; a full queue (webhook hanging while
messages pile up) drops the new message and counts it in ``dropped``. ``publish`` never raises
and never waits on the network.

Sent: entries and exits (fills), ``fallback_engaged`` / ``primary_recovered`` /
``fallback_failed``, kill switches and every other ``risk_state_changed``, bundle swaps and
rejections, liquidations, quarantined bars, drift breaches and drift-mode changes (V1 in charge, reset;
:mod:`serving.drift_watch`) and run start/finish; from the live loop also its
start/stop, errors (``step_failed``, ``internal_error``, ``fatal_error``, ``guard_error``,
``order_rejected``), an unreconciled or accepted position, a stop the exchange refused, and
missed bars (:data:`DEFAULT_KINDS`).

Settings: environment variables only (they hold secrets, which ``configs/*.yaml`` must not):
``ATS_DISCORD_WEBHOOK_URL``, or ``ATS_TELEGRAM_BOT_TOKEN`` with ``ATS_TELEGRAM_CHAT_ID``
(:func:`notify_config_from_env`); none set: notifications off.

Endpoints: Discord ``POST <webhook_url>`` with ``{"content": text}`` (Discord "Execute Webhook");
Telegram ``POST <api_base_url>/bot<token>/sendMessage`` with ``{"chat_id", "text"}`` (Telegram Bot
API). The URL and token are secrets: they are never put in a message, an exception text or a log
line (``repr`` of the config hides them).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import httpx
from pydantic import Field, SecretStr, model_validator

from market.config_base import StrictConfig
from serving.store import EventRecord, FillRecord

DEFAULT_KINDS: tuple[str, ...] = (
    "run_started", "run_finished", "fallback_engaged", "primary_recovered", "fallback_failed",
    "risk_state_changed", "bundle_swapped", "bundle_rejected", "liquidation", "quarantine",
    "primary_unavailable", "guard_error", "drift_breach", "drift_mode",
    # live loop (serving.live)
    "live_started", "live_stopped", "step_failed", "internal_error", "fatal_error", "order_rejected",
    "position_unreconciled", "position_accepted", "position_baseline_reset", "stop_rejected_closing",
    "bars_missed",
)  # fmt: skip


class Notifier(Protocol):
    """What the loops call; implementations must never raise from ``publish``."""

    def publish(self, events: Sequence[EventRecord], fills: Sequence[FillRecord]) -> None:
        """Send what is worth sending of a bar's events and fills; never raises."""

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush pending messages, waiting at most ``timeout_s`` seconds."""


class NotifyConfig(StrictConfig):
    """Where and what to notify."""

    service: Literal["discord", "telegram"] = Field(..., description="Webhook flavour.")
    webhook_url: SecretStr | None = Field(None, description="Discord webhook URL (secret).")
    telegram_bot_token: SecretStr | None = Field(None, description="Telegram bot token (secret).")
    telegram_chat_id: str | None = Field(None, description="Telegram chat id.")
    api_base_url: str = Field("https://api.telegram.org", description="Telegram Bot API base URL.")
    timeout_s: float = Field(2.0, gt=0.0, le=30.0, description="HTTP timeout of one post, seconds.")
    queue_max: int = Field(100, ge=1, description="Messages waiting at most; more are dropped.")
    kinds: tuple[str, ...] = Field(DEFAULT_KINDS, description="Event kinds sent (fills are always sent).")
    prefix: str = Field("[ats]", description="Start of every message.")

    @model_validator(mode="after")
    def _check_service(self) -> NotifyConfig:
        if self.service == "discord" and self.webhook_url is None:
            raise ValueError("notify: service 'discord' needs webhook_url")
        if self.service == "telegram" and (self.telegram_bot_token is None or not self.telegram_chat_id):
            raise ValueError("notify: service 'telegram' needs telegram_bot_token and telegram_chat_id")
        return self


def notify_config_from_env(env: Mapping[str, str] | None = None) -> NotifyConfig | None:
    """Config from ``ATS_DISCORD_WEBHOOK_URL`` or ``ATS_TELEGRAM_BOT_TOKEN`` + ``ATS_TELEGRAM_CHAT_ID``.

    Returns None when neither is set (notifications off).
    """
    env = os.environ if env is None else env
    if env.get("ATS_DISCORD_WEBHOOK_URL"):
        return NotifyConfig(service="discord", webhook_url=env["ATS_DISCORD_WEBHOOK_URL"])
    if env.get("ATS_TELEGRAM_BOT_TOKEN"):
        return NotifyConfig(
            service="telegram", telegram_bot_token=env["ATS_TELEGRAM_BOT_TOKEN"],
            telegram_chat_id=env.get("ATS_TELEGRAM_CHAT_ID"),
        )  # fmt: skip
    return None


def _short(detail: Any, limit: int = 300) -> str:
    text = ", ".join(f"{k}={v}" for k, v in detail.items()) if isinstance(detail, dict) else str(detail)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def messages(
    events: Iterable[EventRecord], fills: Iterable[FillRecord], kinds: Sequence[str], prefix: str = "[ats]"
) -> list[str]:
    """The texts to send for a bar's ``events`` (only ``kinds``) and ``fills`` (entries and exits)."""
    out = []
    for f in fills:
        what = {"entry": "entry", "external": "external fill"}.get(f.reason, f"exit ({f.reason})")
        side = "buy" if f.side > 0 else "sell"
        out.append(
            f"{prefix} {f.run_id} {f.bar_open_time}: {what} {side} {f.qty_base:.6g} @ {f.price:.2f} USDT"
        )
    wanted = set(kinds)
    for e in events:
        if e.kind in wanted:
            out.append(f"{prefix} {e.run_id} {e.time}: {e.kind} {_short(e.detail)}")
    return out


_STOP = object()


class WebhookNotifier:
    """Posts messages from a background thread (see the module docstring).

    Parameters
    ----------
    config : NotifyConfig
        Service, secrets, timeout, queue size, kinds.
    client : httpx.Client | None
        HTTP client (tests inject one); by default one with ``config.timeout_s``.

    Attributes ``sent``, ``failed`` and ``dropped`` count messages.
    """

    def __init__(self, config: NotifyConfig, client: httpx.Client | None = None) -> None:
        self.config = config
        self._client = client if client is not None else httpx.Client(timeout=config.timeout_s)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_max)
        self.sent = self.failed = self.dropped = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="ats-notify", daemon=True)
        self._thread.start()

    def publish(self, events: Sequence[EventRecord], fills: Sequence[FillRecord]) -> None:
        """Queue the bar's messages; never raises, never blocks."""
        try:
            for text in messages(events, fills, self.config.kinds, self.config.prefix):
                self.send(text)
        except Exception as exc:  # noqa: BLE001 - a notification must never stop trading
            self.failed += 1
            self.last_error = f"format: {type(exc).__name__}"

    def send(self, text: str) -> None:
        """Queue one message (dropped and counted when the queue is full)."""
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the worker after the queued messages (waits at most ``timeout_s``)."""
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout_s)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._client.close()

    def _request(self, text: str) -> tuple[str, dict[str, Any]]:
        cfg = self.config
        if cfg.service == "discord":
            assert cfg.webhook_url is not None
            return cfg.webhook_url.get_secret_value(), {"content": text[:2000]}
        assert cfg.telegram_bot_token is not None
        url = f"{cfg.api_base_url.rstrip('/')}/bot{cfg.telegram_bot_token.get_secret_value()}/sendMessage"
        return url, {"chat_id": cfg.telegram_chat_id, "text": text[:4096]}

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                url, payload = self._request(item)
                response = self._client.post(url, json=payload, timeout=self.config.timeout_s)
                if response.status_code >= 300:
                    self.failed += 1
                    self.last_error = f"HTTP {response.status_code}"
                else:
                    self.sent += 1
            except Exception as exc:  # noqa: BLE001 - timeouts, refused connections, anything
                self.failed += 1
                self.last_error = type(exc).__name__  # no URL: it holds the secret


def make_notifier(config: NotifyConfig | None) -> WebhookNotifier | None:
    """A notifier for ``config`` (None: notifications off)."""
    return None if config is None else WebhookNotifier(config)
