"""Baseline policies traded under the same cost model as the agent: flat, buy-and-hold, seeded random."""

from __future__ import annotations

import numpy as np

from market.decision import Decision, DecisionContext

# Stop and take-profit distances so far away that they never trigger (buy-and-hold has no exits).
_NEVER_ATR = 1e9


class FlatPolicy:
    """Never holds a position (the zero-cost, zero-return reference)."""

    name = "flat"

    def decide(self, ctx: DecisionContext) -> Decision:
        return Decision.flat()


class BuyAndHoldPolicy:
    """Goes long at the first decision with all equity as margin at 1x leverage and holds to the end."""

    name = "buy_and_hold"

    def decide(self, ctx: DecisionContext) -> Decision:
        return Decision(direction=1, leverage=1.0, size_frac=1.0, stop_atr=_NEVER_ATR, take_profit_atr=_NEVER_ATR)


class RandomPolicy:
    """Uniform random 5-d actions from a seeded generator, decoded like the agent's actions."""

    name = "random"

    def __init__(self, decode, seed: int = 0):
        self._decode = decode
        self._rng = np.random.default_rng(seed)

    def decide(self, ctx: DecisionContext) -> Decision:
        return self._decode(self._rng.uniform(-1.0, 1.0, size=5).astype(np.float32))
