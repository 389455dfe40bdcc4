"""The frozen PPO policy behind the :class:`market.decision.Policy` interface."""

from __future__ import annotations

import numpy as np

from agents.bundle import PolicyBundle
from agents.observation import model_outputs
from envs.actions import decode_action
from envs.trading_env import account_features
from market.decision import Decision, DecisionContext, NonFiniteDecisionError
from market.features import compute_features, drop_warmup


class FrozenPPOPolicy:
    """Deterministic PPO actor from a bundle.

    ``decide`` uses ``ctx.observation`` when the caller already has it (the backtester's env);
    otherwise it builds the observation from ``ctx.candles`` exactly as training did: causal
    features on the candle history, forward-filtered regime probabilities, the regime-ahead and
    TCN outputs at the last bar, standardised with the bundle's normaliser, then the account
    features. ``last_raw_action`` keeps the actor's 5 numbers for the decision log.

    Raises
    ------
    NonFiniteDecisionError
        If the observation or the action is non-finite (the caller falls back to V1).
    ValueError
        If the candle history is too short to compute the observation.
    """

    name = "v2"

    def __init__(self, bundle: PolicyBundle):
        self.bundle = bundle
        self.last_raw_action: np.ndarray | None = None
        self._peak_equity = 0.0

    def observation(self, ctx: DecisionContext) -> np.ndarray:
        """Build the full observation (float32, (obs_dim,)) for the last bar of ``ctx.candles``."""
        b = self.bundle
        feats, _ = drop_warmup(compute_features(ctx.candles, b.feature_config))
        if len(feats) == 0 or feats.index[-1] != ctx.candles.index[-1]:
            raise ValueError(f"no complete feature row for {ctx.bar_open_time}: history too short")
        n = len(feats)
        outputs = model_outputs(feats, b.models, start=n - 1, end=n)
        market = np.concatenate([feats.to_numpy(np.float32)[-1], outputs.to_numpy(np.float32)[0]])
        self._peak_equity = max(self._peak_equity, ctx.equity_usdt)
        account = account_features(
            ctx.position,
            equity_usdt=ctx.equity_usdt,
            peak_equity_usdt=self._peak_equity,
            mark_price=float(ctx.candles["close"].iloc[-1]),
            config=b.env_config,
        )
        return np.concatenate([b.normalizer(market), account]).astype(np.float32)

    def decide(self, ctx: DecisionContext) -> Decision:
        obs = ctx.observation if ctx.observation is not None else self.observation(ctx)
        if not np.isfinite(obs).all():
            raise NonFiniteDecisionError(f"non-finite observation at {ctx.bar_open_time}")
        action = self.bundle.actor.act(obs)
        self.last_raw_action = action
        return decode_action(action, self.bundle.env_config.actions)


class SB3ActorPolicy:
    """Adapter used during training: a live SB3 model's deterministic action, decoded."""

    name = "ppo"

    def __init__(self, model, action_config):
        self.model = model
        self.action_config = action_config
        self.last_raw_action: np.ndarray | None = None

    def decide(self, ctx: DecisionContext) -> Decision:
        action, _ = self.model.predict(ctx.observation, deterministic=True)
        self.last_raw_action = np.asarray(action, dtype=np.float32)
        return decode_action(self.last_raw_action, self.action_config)
