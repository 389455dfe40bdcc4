"""Baseline policies traded under the same cost model as the agent: flat, buy-and-hold, seeded random.

Each is a :class:`market.decision.Policy` with no state across bars (:class:`market.decision.StatelessPolicy`):
the random policy draws each bar's action from its seed and the bar's open time, so its decisions do not depend
on which bars it was asked before (a restart or a skipped bar changes nothing).
"""

from __future__ import annotations

import numpy as np

from market.decision import Decision, DecisionContext, StatelessPolicy

# Stop and take-profit distances so far away that they never trigger (buy-and-hold has no exits).
_NEVER_ATR = 1e9


class FlatPolicy(StatelessPolicy):
    """Never holds a position (the zero-cost, zero-return reference)."""

    name = "flat"

    def decide(self, ctx: DecisionContext) -> Decision:
        """Flat, whatever the context."""
        return Decision.flat()


class BuyAndHoldPolicy(StatelessPolicy):
    """Goes long at the first decision with all equity as margin at 1x leverage and holds to the end."""

    name = "buy_and_hold"

    def decide(self, ctx: DecisionContext) -> Decision:
        """Long with all equity at 1x, stops out of reach."""
        return Decision(direction=1, leverage=1.0, size_frac=1.0, stop_atr=_NEVER_ATR, take_profit_atr=_NEVER_ATR)


class RandomPolicy(StatelessPolicy):
    """Uniform random 5-d actions, decoded like the agent's actions.

    The action at a bar is drawn from a generator seeded with ``(seed, open time in ns)``: the same seed and
    bar give the same action whatever was asked before. ``last_raw_action`` is the drawn action.
    """

    name = "random"

    def __init__(self, decode, seed: int = 0):
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        self._decode = decode
        self.seed = int(seed)
        self.last_raw_action: np.ndarray | None = None

    def decide(self, ctx: DecisionContext) -> Decision:
        """Decode the action drawn for this bar (seed, open time); set ``last_raw_action``."""
        rng = np.random.default_rng((self.seed, int(ctx.bar_open_time.value) % 2**63))
        self.last_raw_action = rng.uniform(-1.0, 1.0, size=5).astype(np.float32)
        return self._decode(self.last_raw_action)
