"""The serving loops' bar clock and process signals (pure functions and one context manager).

The bar to decide is the last one *closed by the exchange clock* (:func:`last_closed_bar_ms`), and a
loop polls ``close_delay_s`` after each bar close (:func:`seconds_to_next_poll`); SIGTERM and SIGINT
only ask the loop to stop after its bar (:func:`stop_on_signals`). Used by
:class:`serving.live.LiveLoop` and :class:`serving.paper_live.PaperLiveLoop`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


def last_closed_bar_ms(server_ms: int, tf_ms: int) -> int:
    """Open time (ms) of the last bar of ``tf_ms`` ms closed at exchange time ``server_ms`` (pure)."""
    return (server_ms // tf_ms) * tf_ms - tf_ms


def seconds_to_next_poll(now_ms: float, tf_ms: int, close_delay_s: float, poll_interval_s: float) -> float:
    """Seconds from ``now_ms`` (exchange-corrected wall clock, ms) until ``close_delay_s`` after the
    next bar close, within [``poll_interval_s``, one bar] (pure)."""
    next_close = (now_ms // tf_ms + 1) * tf_ms
    wait = (next_close - now_ms) / 1000.0 + close_delay_s
    return float(min(max(wait, poll_interval_s), tf_ms / 1000.0))


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, *, install: bool = True) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT only set ``stop`` (the loop finishes its bar first);
    the previous handlers come back afterwards. Nothing is installed outside the main thread or
    when ``install`` is False."""
    previous: dict[int, Any] = {}
    if install and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
