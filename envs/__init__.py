"""Gymnasium TradingEnv, the batched vector env, the one execution/cost model and the rewards.

``envs.kernel`` is the compiled (numba) core that moves the money; ``envs.accounting.step_bar``
(backtests, paper broker), ``envs.trading_env.TradingEnv``, ``envs.vector_env.BatchedTradingEnv``
and its SB3 adapter ``envs.sb3_vec.BatchedSB3VecEnv`` all run it.

Importing this package registers the env under :data:`ENV_ID`, so that
``gymnasium.make(ENV_ID, data=..., config=...)`` works (re-import is harmless).
"""

from __future__ import annotations

import gymnasium

# v1 (issue 18): entries follow the one sizing rule of envs.sizing: the isolated margin is taken at the
# integer exchange leverage ceil(leverage) (the notional stays sized by the requested leverage), so with a
# fractional leverage the margin is smaller and the liquidation price nearer the entry, as on the exchange
# (v0 used the fractional leverage and simulated a farther one than live had); entries also respect the instrument's
# min and max market quantity and max leverage. Same observation and action spaces, different dynamics:
# a policy (bundle) trained on v0 is refused (its manifest's schema hash names the env id).
ENV_ID = "ats/TradingEnv-v1"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(ENV_ID, entry_point="envs.trading_env:TradingEnv")

__all__ = ["ENV_ID"]
