"""Crash points of the live loop: named places where a test may kill the serving process.

The live loop (:class:`serving.live.LiveLoop`) calls ``crash_points.hit(name)`` at each point of
:data:`CRASH_POINTS`; the object is injected (keyword ``crash_points``), never read from the
environment. Production uses :data:`NO_CRASH` (every call only checks the name). The crash-recovery
tests inject :class:`KillAt`, which sends SIGKILL to the process at the N-th pass through one point,
so the restart must recover from exactly that state:

* ``after_intent_written``: the bar's decision and intents are stored, nothing was sent;
* ``after_send``: the exchange accepted an order, its answer is not recorded;
* ``after_ack``: the answer is recorded;
* ``after_fill``: an order filled (its trades not read yet);
* ``during_reconciliation``: the trades were read, the position not yet.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Protocol

CRASH_POINTS: tuple[str, ...] = (
    "after_intent_written", "after_send", "after_ack", "after_fill", "during_reconciliation",
)  # fmt: skip


def check_point(name: str) -> str:
    """``name`` if it is one of :data:`CRASH_POINTS`.

    Raises
    ------
    ValueError
        An unknown point (a typo in a test must not pass silently).
    """
    if name not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {name!r}; expected one of {CRASH_POINTS}")
    return name


class CrashPoints(Protocol):
    """What the live loop calls at each crash point."""

    def hit(self, name: str) -> None:
        """The loop passes the point ``name`` (one of :data:`CRASH_POINTS`)."""


@dataclass(frozen=True, slots=True)
class NoCrash:
    """Crash points that never fire (production); an unknown name still raises ``ValueError``."""

    def hit(self, name: str) -> None:
        """Check ``name``; nothing else."""
        check_point(name)


NO_CRASH = NoCrash()


@dataclass(slots=True)
class KillAt:
    """SIGKILL this process at the ``nth`` pass (1 = first) through the point ``point`` (test hook).

    Raises
    ------
    ValueError
        ``point`` is not one of :data:`CRASH_POINTS` or ``nth`` < 1.
    """

    point: str
    nth: int = 1
    passes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        check_point(self.point)
        if self.nth < 1:
            raise ValueError(f"nth must be >= 1, got {self.nth}")

    @classmethod
    def parse(cls, spec: str) -> KillAt:
        """``"name"`` (first pass) or ``"name:N"`` (N-th pass)."""
        point, _, nth = spec.partition(":")
        return cls(point, int(nth) if nth else 1)

    def hit(self, name: str) -> None:
        """Count a pass through ``name``; kill the process (SIGKILL) at the ``nth`` pass through ``point``."""
        if check_point(name) != self.point:
            return
        self.passes += 1
        if self.passes >= self.nth:
            os.kill(os.getpid(), signal.SIGKILL)
