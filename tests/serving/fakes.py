"""Fakes for the serving tests: scripted policies and a manual clock (no sleeps)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from market.decision import Decision, DecisionContext, StatelessPolicy


class FakeClock:
    """Monotonic clock in seconds that only moves when told to."""

    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


class FixedPolicy(StatelessPolicy):
    """Returns the same decision every bar and exposes a fresh raw action."""

    name = "v2"

    def __init__(self, decision: Decision, raw: tuple[float, ...] = (0.9, 0.5, 0.4, 0.3, 0.2)) -> None:
        self.decision = decision
        self.raw = raw
        self.last_raw_action: np.ndarray | None = None
        self.calls = 0

    def decide(self, ctx: DecisionContext) -> Decision:
        self.calls += 1
        self.last_raw_action = np.array(self.raw, dtype=np.float32)
        return self.decision


class FlipPolicy(StatelessPolicy):
    """Long on bars whose open hour is even, short on odd hours (reverses every bar)."""

    name = "flip"

    def decide(self, ctx: DecisionContext) -> Decision:
        direction = 1 if ctx.bar_open_time.hour % 2 == 0 else -1
        return Decision(direction=direction, leverage=3.0, size_frac=0.5, stop_atr=1.0, take_profit_atr=1.5)


class RaisingPolicy(StatelessPolicy):
    name = "v2"

    def __init__(self, exc: Exception | None = None) -> None:
        self.exc = exc if exc is not None else RuntimeError("boom")

    def decide(self, ctx: DecisionContext) -> Decision:
        raise self.exc


class NanLeveragePolicy(StatelessPolicy):
    """Maps a raw action with a NaN to a Decision, which raises NonFiniteDecisionError."""

    name = "v2"

    def __init__(self) -> None:
        self.last_raw_action: np.ndarray | None = None

    def decide(self, ctx: DecisionContext) -> Decision:
        self.last_raw_action = np.array([0.8, np.nan, 0.5, 0.3, 0.2])
        return Decision(direction=1, leverage=float(self.last_raw_action[1]), size_frac=0.5)


class SlowPolicy(StatelessPolicy):
    """Answers a fixed decision after ``seconds`` on the fake clock."""

    name = "v2"

    def __init__(self, clock: FakeClock, seconds: float, decision: Decision) -> None:
        self.clock, self.seconds, self.decision = clock, seconds, decision

    def decide(self, ctx: DecisionContext) -> Decision:
        self.clock.advance(self.seconds)
        return self.decision


class WrongTypePolicy(StatelessPolicy):
    name = "v2"

    def decide(self, ctx: DecisionContext):  # type: ignore[no-untyped-def]
        return {"direction": 1}


class ScriptedFallback(StatelessPolicy):
    """Deterministic stand-in for V1: always flat (or raises when ``fail``)."""

    name = "v1"
    def history_bars(self, bar_interval: pd.Timedelta) -> int:
        return 10

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls = 0

    def decide(self, ctx: DecisionContext) -> Decision:
        self.calls += 1
        if self.fail:
            raise ValueError("fallback broken")
        return Decision.flat()


class ValidatingPolicy(StatelessPolicy):
    """Records every window it is asked on, and each one holding an invalid candle row.

    Invalid: any rule of :func:`serving.loop.row_problems` (non-finite or non-positive price,
    bad volume, high/low not enclosing open/close). The loop turns an exception of a policy into a
    fallback, so a violation is recorded in ``violations`` (tests assert it stays empty) rather
    than raised. Answers ``decision`` (default flat).
    """

    def history_bars(self, bar_interval: pd.Timedelta) -> int:

        return 10

    def __init__(self, decision: Decision | None = None, name: str = "v2") -> None:
        self.decision = decision if decision is not None else Decision.flat()
        self.name = name
        self.seen: list[object] = []
        self.violations: list[str] = []

    def decide(self, ctx: DecisionContext) -> Decision:
        from serving.loop import row_problems

        self.seen.append(ctx.bar_open_time)
        self.violations += [p for p in row_problems(ctx.candles) if p is not None]
        return self.decision
