"""Gymnasium TradingEnv, the one execution/cost model (``envs.accounting``) and the rewards.

Importing this package registers the env under :data:`ENV_ID`, so that
``gymnasium.make(ENV_ID, data=..., config=...)`` works (re-import is harmless).
"""

from __future__ import annotations

import gymnasium

ENV_ID = "ats/TradingEnv-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(ENV_ID, entry_point="envs.trading_env:TradingEnv")

__all__ = ["ENV_ID"]
