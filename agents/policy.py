"""The frozen PPO policy behind the :class:`market.decision.Policy` interface."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd

from agents.bundle import PolicyBundle
from agents.observation import last_row_outputs
from envs.actions import ActionConfig, decode_action
from envs.sizing import ex_ante_vol_annual
from envs.trading_env import account_features
from market.decision import Decision, DecisionContext, NonFiniteDecisionError, PolicyState, StatelessPolicy
from market.features import compute_features, drop_warmup, feature_names, min_history_bars, warmup_bars


def decision_vol_annual(candles: pd.DataFrame, cfg: ActionConfig) -> float | None:
    """The ``ex_ante_vol_annual`` input of :func:`envs.actions.decode_action` at the last bar of ``candles``.

    None unless ``cfg.sizing_mode == "vol_target"``; then :func:`envs.sizing.ex_ante_vol_annual` (the env's
    estimator, span ``cfg.vol_span_bars``, at least ``cfg.vol_min_bars`` returns) of the closes of ``candles``
    (causal: the decided bar and the ones before it), annualised with the bar length of its last two rows; NaN
    (no trade) with fewer than two candles or returns than ``cfg.vol_min_bars``. The env computes it over its
    whole data span, the caller over the candles it is given, so the two agree up to the exponential weights
    of the returns before the window.
    """
    if cfg.sizing_mode != "vol_target":
        return None
    if len(candles) < 2:
        return float("nan")
    bar_s = (candles.index[-1] - candles.index[-2]).total_seconds()
    close = candles["close"].to_numpy(np.float64)
    return float(ex_ante_vol_annual(close, bar_s, cfg.vol_span_bars, cfg.vol_min_bars)[-1])


class FrozenPPOPolicy:
    """Deterministic PPO actor from a bundle.

    ``decide`` uses ``ctx.observation`` when the caller already has it (the backtester's env);
    otherwise it builds the observation from ``ctx.candles`` exactly as training did: causal
    features on the candle history, forward-filtered regime probabilities, the regime-ahead and
    TCN outputs at the last bar, standardised with the bundle's normaliser, then the account
    features. ``last_raw_action`` keeps the actor's 5 numbers for the decision log (None after a call
    that failed before the actor answered).

    Carried state (:class:`market.decision.PolicyState`): the peak equity, the drawdown input of the
    account features. Each observation advances it (:meth:`PolicyState.advanced`: the run's peak when
    the context states it, as the serving loops do from the state store, else the running maximum of
    the equities shown); :meth:`restore` sets it (restart, hot swap).

    Bounded per-bar cost (serving): features are computed over the last ``history_bars`` candles
    only (``market.features.min_history_bars``: the history whose last feature row matches the batch
    computation; 1,000 1h bars by default), and the HMM filter is advanced by one
    ``RegimeHMM.filtered_proba_step`` per bar from the state kept for the previous bar. When the
    previous bar's state is unknown (first call, a skipped bar, a gap) the filter is run over the
    whole feature window instead, as the batch path does. Both give P(s_t | x_0..x_t) from the
    same recursion; they differ only in where the filter started, whose effect decays
    geometrically (the parity test against the evaluation's full-series observation bounds it).

    Raises
    ------
    NonFiniteDecisionError
        If the observation or the action is non-finite (the caller falls back to V1).
    ValueError
        If the candle history is too short to compute the observation.
    """

    name = "v2"

    def __init__(self, bundle: PolicyBundle, *, lgbm_threads: int = 1):
        """``lgbm_threads``: LightGBM threads for the one-row regime-ahead prediction of each bar.

        One thread gives the same numbers and is far faster for a single row: measured on the
        2-core dev machine, 0.03 ms per call with 1 thread vs ~8 ms with 2 (OpenMP start-up). The
        bundle's own model object is not modified (batch evaluation keeps its thread count).
        """
        self.bundle = bundle
        self.last_raw_action: np.ndarray | None = None
        self._state = PolicyState()
        transition = copy.copy(bundle.models.transition)
        transition.cfg = transition.cfg.updated(n_threads=int(lgbm_threads))
        self._models = dataclasses.replace(bundle.models, transition=transition)
        cols = list(bundle.models.hmm_columns)
        names = list(feature_names(bundle.feature_config))
        self._hmm_idx = np.array([names.index(c) for c in cols], dtype=np.intp)
        self._history_bars: dict[pd.Timedelta, int] = {}
        # filtered log-probabilities of the last two served feature rows: {open time: log alpha}
        self._filter_state: dict[pd.Timestamp, np.ndarray] = {}

    @property
    def state(self) -> PolicyState:
        """The carried state (peak equity)."""
        return self._state

    def restore(self, state: PolicyState) -> None:
        """Carry ``state`` on (the next observation advances it)."""
        self._state = state

    @property
    def atr_period_bars(self) -> int:
        """ATR period (bars) of the stop/take-profit distances: the env's ATR, i.e. the feature ATR
        period the agent was trained with (``bundle.feature_config.atr_period_bars``)."""
        return int(self.bundle.feature_config.atr_period_bars)

    def history_bars(self, bar_interval: pd.Timedelta) -> int:
        """Candles used for the features of one bar (``min_history_bars``, >= warm-up + TCN window)."""
        if bar_interval not in self._history_bars:
            cfg = self.bundle.feature_config
            self._history_bars[bar_interval] = max(
                min_history_bars(cfg, bar_interval),
                warmup_bars(cfg, bar_interval) + self.bundle.models.tcn.window_bars,
            )
        return self._history_bars[bar_interval]

    def _regime_proba(self, feats: pd.DataFrame) -> np.ndarray:
        """Filtered regime probabilities of the last feature row (incremental when possible)."""
        hmm = self._models.hmm
        t_last = feats.index[-1]
        prev = self._filter_state.get(feats.index[-2]) if len(feats) >= 2 else None
        if prev is not None:
            x_last = feats.iloc[-1].to_numpy(np.float64)[self._hmm_idx]
            log_alpha, proba = hmm.filtered_proba_step(prev, x_last)
        else:
            log_alpha = hmm.filtered_log_proba(feats.to_numpy(np.float64)[:, self._hmm_idx])[-1]
            proba = np.exp(log_alpha)
        state = {t_last: log_alpha}
        if prev is not None:  # kept so that the same bar may be asked again (probe, retry)
            state[feats.index[-2]] = prev
        self._filter_state = state
        return proba

    def observation(self, ctx: DecisionContext) -> np.ndarray:
        """Build the full observation (float32, (obs_dim,)) for the last bar of ``ctx.candles``."""
        b = self.bundle
        candles = self._window(ctx.candles)
        # The serving loops validated these candles (gaps, order, finite OHLCV) before building ctx;
        # anything non-finite that got here ends as a non-finite observation, refused in decide().
        # Once the HMM filter has the previous bar, only the rows the TCN reads are needed: the
        # trailing-window features of those rows are computed alone (identical values, ~5x faster).
        warm = len(candles) >= 2 and candles.index[-2] in self._filter_state
        tail = b.models.tcn.window_bars + 1 if warm else None
        feats, _ = drop_warmup(compute_features(candles, b.feature_config, validate=False, tail_rows=tail))
        if len(feats) == 0 or feats.index[-1] != ctx.candles.index[-1]:
            raise ValueError(f"no complete feature row for {ctx.bar_open_time}: history too short")
        outputs = last_row_outputs(feats, self._models, self._regime_proba(feats))
        market = np.concatenate([feats.to_numpy(np.float32)[-1], outputs])
        # the drawdown input: the run's peak when the caller states it (serving: restarts and hot
        # swaps keep it), else the running maximum of the equity this instance was shown
        self._state = self._state.advanced(ctx)
        peak = self._state.peak_equity_usdt
        account = account_features(
            ctx.position,
            equity_usdt=ctx.equity_usdt,
            peak_equity_usdt=0.0 if peak is None else peak,
            mark_price=float(ctx.candles["close"].iloc[-1]),
            config=b.env_config,
        )
        return np.concatenate([b.normalizer(market), account]).astype(np.float32)

    def decide(self, ctx: DecisionContext) -> Decision:
        """The actor's deterministic decision (see the class docstring); sets ``last_raw_action``."""
        self.last_raw_action = None
        obs = ctx.observation if ctx.observation is not None else self.observation(ctx)
        if not np.isfinite(obs).all():
            raise NonFiniteDecisionError(f"non-finite observation at {ctx.bar_open_time}")
        action = self.bundle.actor.act(obs)
        self.last_raw_action = action
        cfg = self.bundle.env_config.actions
        return decode_action(action, cfg, ex_ante_vol_annual=decision_vol_annual(self._window(ctx.candles), cfg))

    def _window(self, candles: pd.DataFrame) -> pd.DataFrame:
        """The last ``history_bars`` of ``candles`` (all when fewer): the window the observation is built from, so
        that every caller giving at least that history gets the same decision (backtest, paper, live)."""
        if len(candles) < 2:
            return candles
        keep = self.history_bars(candles.index[-1] - candles.index[-2])
        return candles.iloc[-keep:] if len(candles) > keep else candles


class SB3ActorPolicy(StatelessPolicy):
    """Adapter used during training: a live SB3 model's deterministic action, decoded.

    Reads ``ctx.observation`` only (the backtester's env builds it, drawdown included), so it carries
    no state, needs one candle and places stops in the env's ATR.
    """

    name = "ppo"

    def __init__(self, model, action_config):
        self.model = model
        self.action_config = action_config
        self.last_raw_action: np.ndarray | None = None

    def decide(self, ctx: DecisionContext) -> Decision:
        """The model's deterministic action on ``ctx.observation``, decoded; sets ``last_raw_action``."""
        self.last_raw_action = None
        action, _ = self.model.predict(ctx.observation, deterministic=True)
        self.last_raw_action = np.asarray(action, dtype=np.float32)
        vol = decision_vol_annual(ctx.candles, self.action_config)
        return decode_action(self.last_raw_action, self.action_config, ex_ante_vol_annual=vol)
