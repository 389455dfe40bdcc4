"""Per-bar policy selection shared by the serving loops: primary (V2 bundle) -> fallback (V1) -> flat.

Extracted so that the live loop (``serving.live``) can use it without importing the paper replay
loop (and, through it, torch); the paper loop (``serving.loop``) uses it too. The rules:

* the primary is used only if it exists, does not raise, returns a :class:`Decision` (whose
  constructor rejects non-finite values: :class:`NonFiniteDecisionError`) and answers within
  ``timeout_ms``. The deadline is enforced: the primary runs in a worker thread that the bar
  waits for at most ``timeout_ms`` (wall time), so a hung model cannot stall the bar (Python
  cannot kill the thread: it finishes in the background and its answer is discarded; the
  caller's backoff keeps a failing primary from being asked every bar). Latency is also measured
  with the injected ``clock`` and a late answer discarded (deterministic tests use a fake clock);
* otherwise the fallback decides the same bar and the reason is returned
  (``bundle_load_failed: ...``, ``exception: ...``, ``non_finite_action: ...``,
  ``deadline_exceeded: ...``, ``invalid_return: ...``);
* if the fallback fails too, the decision is flat with source 'guard' and a ``fallback_failed``
  event.

The raw output recorded with a decision is the primary's ``last_raw_action`` (a member of
:class:`market.decision.Policy`, set by every ``decide``), read only when the primary answered
(an abandoned worker may still write it).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from market.decision import Decision, DecisionContext, NonFiniteDecisionError, Policy


def reason_kind(reason: str) -> str:
    """The kind of a fallback reason: the text before the first ':' (``"deadline_exceeded"``)."""
    return reason.split(":", 1)[0].strip()


@dataclass
class FallbackLedger:
    """Fallback bookkeeping shared by the paper and live loops: which fallback reason kind is in
    force (``current``, None while the primary decides) and how many bars each kind decided
    (``reasons``).

    :meth:`observe` returns the events of a change: one ``fallback_engaged`` (detail ``reason``)
    when the fallback takes over, none while it stays engaged (even if the reason kind changes, e.g.
    ``exception`` then ``backoff``), one ``primary_recovered`` (detail ``previous_reason_kind``)
    when the primary decides again.
    """

    reasons: Counter[str] = field(default_factory=Counter)
    current: str | None = None

    def observe(self, source: str, reason: str | None) -> list[tuple[str, dict[str, Any]]]:
        """Record who decided a bar (``source`` 'v2', 'v1' or 'guard'; ``reason`` the fallback reason,
        None when the primary decided); returns the ``(kind, detail)`` events to record."""
        if source != "v2" and reason is not None:
            kind = reason_kind(reason)
            self.reasons[kind] += 1
            events = [] if self.current is not None else [("fallback_engaged", {"reason": reason})]
            self.current = kind
            return events
        events = [] if self.current is None else [("primary_recovered", {"previous_reason_kind": self.current})]
        self.current = None
        return events


def raw_action(policy: Policy) -> tuple[float, ...] | None:
    """The policy's ``last_raw_action`` as a tuple of floats (None when it has none or it is not numeric)."""
    raw = policy.last_raw_action
    if raw is None:
        return None
    try:
        return tuple(float(x) for x in np.asarray(raw, dtype=np.float64).ravel())
    except (TypeError, ValueError):
        return None


def call_with_deadline(fn: Callable[[Any], Any], arg: Any, timeout_s: float) -> tuple[bool, Any, BaseException | None]:
    """Run ``fn(arg)`` in a daemon thread and wait at most ``timeout_s`` seconds.

    Returns ``(answered, result, error)``: ``answered`` False when the deadline passed (the thread
    is left to finish on its own); ``error`` the exception ``fn`` raised (``result`` None then).
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = fn(arg)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    worker = threading.Thread(target=work, name="ats-primary-decide", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return False, None, None
    return True, box.get("result"), box.get("error")


@dataclass
class Choice:
    """Outcome of :func:`choose`. ``source`` is 'v2', 'v1' or 'guard'; ``latency_ms`` in ms;
    ``events`` are ``(kind, detail)`` pairs to record; ``primary_failure`` is the reason when the
    primary was asked and its answer not used."""

    decision: Decision
    source: str
    reason: str | None
    raw_action: tuple[float, ...] | None
    latency_ms: float
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    primary_failure: str | None = None


def choose(
    ctx: DecisionContext,
    primary: Policy | None,
    fallback: Policy,
    unavailable_reason: str | None,
    timeout_ms: float,
    clock: Callable[[], float],
) -> Choice:
    """Ask the primary, else the fallback, else decide flat (module docstring). Never raises for a
    policy failure. ``unavailable_reason`` is the fallback reason when ``primary`` is None."""
    t0 = clock()
    reason: str | None
    raw: tuple[float, ...] | None = None
    if primary is None:
        reason = unavailable_reason or "bundle_load_failed: no primary policy"
    else:
        answered, answer, error = call_with_deadline(primary.decide, ctx, timeout_ms / 1_000.0)
        if not answered:
            reason = f"deadline_exceeded: no answer within {timeout_ms:.0f} ms (worker abandoned)"
        elif isinstance(error, NonFiniteDecisionError):
            reason = f"non_finite_action: {error}"
        elif error is not None:  # any model failure means fallback
            reason = f"exception: {type(error).__name__}: {error}"
        else:
            reason = None
        latency_ms = (clock() - t0) * 1_000.0
        raw = raw_action(primary) if answered else None
        if reason is None:
            if latency_ms > timeout_ms:
                reason = f"deadline_exceeded: {latency_ms:.0f} ms > {timeout_ms:.0f} ms"
            elif not isinstance(answer, Decision):
                reason = f"invalid_return: expected Decision, got {type(answer).__name__}"
            else:
                return Choice(answer, "v2", None, raw, latency_ms, [])
    try:
        answer = fallback.decide(ctx)
        if not isinstance(answer, Decision):
            raise TypeError(f"fallback returned {type(answer).__name__}, not a Decision")
    except Exception as exc:  # noqa: BLE001 - the loop must go on: decide flat
        fallback_error = f"{type(exc).__name__}: {exc}"
        latency_ms = (clock() - t0) * 1_000.0
        event = ("fallback_failed", {"primary_reason": reason, "fallback_error": fallback_error})
        return Choice(
            Decision.flat(), "guard", f"{reason}; fallback_failed: {fallback_error}", raw, latency_ms, [event],
            reason if primary is not None else None,
        )
    latency_ms = (clock() - t0) * 1_000.0
    return Choice(answer, "v1", reason, raw, latency_ms, [], reason if primary is not None else None)
