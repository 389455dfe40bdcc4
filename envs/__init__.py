"""Gymnasium TradingEnv, the batched vector env, the one execution/cost model and the rewards.

``envs.kernel`` is the compiled (numba) core that moves the money; ``envs.accounting.step_bar``
(backtests, paper broker), ``envs.trading_env.TradingEnv``, ``envs.vector_env.BatchedTradingEnv``
and its SB3 adapter ``envs.sb3_vec.BatchedSB3VecEnv`` all run it.

Importing this package registers the env under :data:`ENV_ID`, so that
``gymnasium.make(ENV_ID, data=..., config=...)`` works (re-import is harmless).
"""

from __future__ import annotations

import gymnasium

ENV_ID = "ats/TradingEnv-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(ENV_ID, entry_point="envs.trading_env:TradingEnv")

__all__ = ["ENV_ID"]
