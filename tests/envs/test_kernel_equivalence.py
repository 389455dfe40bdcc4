"""The compiled kernel (``envs.kernel``) equals the former pure-Python implementation, bit for bit.

``step_bar`` (now a wrapper of the kernel) is compared with the frozen pure-Python copy in
``tests/envs/reference_accounting.py`` and ``TradingEnv`` with ``tests/envs/reference_env.py`` over
many random sequences with gaps, high leverage (liquidations), stops, take-profits, funding with
missing rates and varied cost settings: every state field, fill, closed trade, cost, equity,
observation, reward and info value must be identical (``==``, no tolerance).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from envs import accounting
from envs.accounting import AccountState, Bar, step_bar
from envs.actions import ActionConfig
from envs.config import CostConfig
from envs.rewards import RewardConfig
from envs.trading_env import EnvConfig, TradingEnv
from market.decision import Decision
from market.instruments import InstrumentSpec, bundled_spec
from tests.envs import reference_accounting as ref
from tests.envs.helpers import HOUR_NS, T0_NS, make_env_data
from tests.envs.reference_env import ReferenceTradingEnv


def _random_bars(rng: np.random.Generator, n: int) -> list[tuple]:
    price = float(rng.uniform(5_000, 80_000))
    out = []
    for k in range(n):
        gap = rng.normal(0, 0.03) if rng.random() < 0.15 else rng.normal(0, 0.002)
        o = price * (1 + gap)
        c = o * (1 + rng.normal(0, 0.02))
        h = max(o, c) * (1 + abs(rng.normal(0, 0.015)))
        lo = min(o, c) * (1 - abs(rng.normal(0, 0.015)))
        rate = math.nan if rng.random() < 0.3 else float(rng.normal(0.0001, 0.002))
        t = T0_NS + k * HOUR_NS
        out.append((t, o, h, lo, c, rate, bool(rng.random() < 0.3)))
        price = c
    return out


def _random_decision(
    rng: np.random.Generator, state: AccountState | None = None, next_open: float | None = None
) -> Decision | None:
    """A random decision; with ``state`` holding a position, often a hold asking for a new stop:
    near the current stop (tighter or looser), or through the next open (gap rule)."""
    if state is not None and state.side != 0 and state.stop_price is not None and rng.random() < 0.5:
        s = state.side
        u = rng.random()
        if u < 0.6:
            level = state.stop_price * (1 + rng.uniform(-0.01, 0.02) * s)
        elif u < 0.8 and next_open is not None:
            level = next_open * (1 + s * rng.uniform(0.0, 0.01))  # at or through the open
        else:
            level = state.entry_price * (1 + rng.uniform(-0.03, 0.03))
        return Decision(s, new_stop_price=float(level))
    if rng.random() < 0.15:
        return None
    return Decision(
        int(rng.integers(-1, 2)),
        leverage=float(rng.choice([1.0, rng.uniform(1, 10), rng.uniform(10, 100)])),
        size_frac=float(rng.choice([0.0, 0.001, rng.uniform(0, 1), 1.0])),
        stop_atr=float(rng.uniform(0.1, 5)),
        take_profit_atr=float(rng.uniform(0.1, 8)),
    )


def _btc(**update: float) -> InstrumentSpec:
    """The bundled BTCUSDT spec with some values changed (a test instrument)."""
    return bundled_spec("BTCUSDT").model_copy(update=update)


def _run(module, state, decision, bar_args, atr, cfg):
    try:
        return module.step_bar(state, decision, module.Bar(*bar_args), atr, cfg), None
    except ValueError as exc:  # NonFiniteDecisionError is a ValueError
        return None, type(exc)


@pytest.mark.parametrize("seed", range(40))
def test_step_bar_equals_pure_python_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cfg = CostConfig(
        cost_multiplier=float(rng.choice([0.0, 1.0, 2.0])),
        instrument=_btc(min_notional_usdt=float(rng.choice([0.01, 100.0, 5_000.0]))),
        funding_fallback_rate=float(rng.choice([0.0, 0.0001, -0.0003])),
        slippage_atr_coef=float(rng.choice([0.0, 0.05, 0.3])),
        take_profit_order=str(rng.choice(["market", "limit"])),
    )
    equity = float(rng.choice([200.0, 10_000.0, 1e6, 5e7]))
    new_state, old_state = AccountState.initial(equity), ref.AccountState.initial(equity)
    n_compared = 0
    for bar_args in _random_bars(rng, 120):
        decision = _random_decision(rng, new_state, bar_args[1])
        atr = float(rng.choice([bar_args[1] * rng.uniform(0.002, 0.03), math.nan]) if rng.random() < 0.05
                    else bar_args[1] * rng.uniform(0.002, 0.03))  # fmt: skip
        got, got_err = _run(accounting, new_state, decision, bar_args, atr, cfg)
        want, want_err = _run(ref, old_state, decision, bar_args, atr, cfg)
        assert got_err == want_err
        if got is None:
            continue
        assert dataclasses.astuple(got) == dataclasses.astuple(want)
        new_state, old_state = got.state, want.state
        n_compared += 1
    assert n_compared > 50


def test_reference_sequences_cover_liquidations_stops_and_funding() -> None:
    """The random sequences above do reach every fill reason, the funding fallback, and stop-move
    requests that move the stop, that are ignored, and that the next open gaps through."""
    reasons: set[str] = set()
    fallbacks = moved = ignored = gapped = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        cfg = CostConfig()
        state = AccountState.initial(10_000.0)
        for bar_args in _random_bars(rng, 120):
            decision = _random_decision(rng, state, bar_args[1])
            try:
                res = step_bar(state, decision, Bar(*bar_args), bar_args[1] * 0.01, cfg)
            except ValueError:
                continue
            reasons.update(f.reason for f in res.fills)
            if decision is not None and decision.new_stop_price is not None:
                if res.fills and res.fills[0].reason == "stop" and state.side * (decision.new_stop_price - bar_args[1]) >= 0:
                    gapped += 1
                elif res.state.stop_price != state.stop_price and res.state.side == state.side:
                    moved += 1
                elif res.state.side == state.side:
                    ignored += 1
            state = res.state
        fallbacks += state.n_fallback_funding
    assert reasons == {"entry", "exit_signal", "stop", "take_profit", "liquidation"} and fallbacks > 0
    assert moved >= 10 and ignored >= 10 and gapped >= 10, (moved, ignored, gapped)


def _env_configs() -> list[EnvConfig]:
    base = {"info_level": "full", "actions": ActionConfig(max_leverage=50.0, max_size_frac=1.0)}
    return [
        EnvConfig(episode_len_bars=150, **base),
        EnvConfig(episode_len_bars=None, random_start=False, min_equity_frac=0.0, max_drawdown_frac=1.0,
                  reward=RewardConfig(kind="differential_sharpe", turnover_penalty=0.01, drawdown_penalty=0.5,
                                      warmup_bars=3), **base),
        EnvConfig(episode_len_bars=60, reward=RewardConfig(kind="log_return", scale=10.0),
                  costs=CostConfig(cost_multiplier=2.0, instrument=_btc(min_notional_usdt=3_000.0)), **base),
        EnvConfig(episode_len_bars=200, reward=RewardConfig(eta=0.1, warmup_bars=0, drawdown_penalty=1.0),
                  min_equity_frac=0.0, max_drawdown_frac=1.0, **base),
    ]


def _same(x, y) -> bool:
    if isinstance(x, np.ndarray):
        return np.array_equal(x, y)
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y, strict=True))
    if dataclasses.is_dataclass(x):
        return dataclasses.astuple(x) == dataclasses.astuple(y)
    return x == y


@pytest.mark.parametrize("config_index", range(4))
@pytest.mark.parametrize("seed", range(3))
def test_env_equals_pure_python_reference_env(config_index: int, seed: int) -> None:
    cfg = _env_configs()[config_index]
    data = make_env_data(400, seed=seed, vol_per_bar=0.03)
    new, old = TradingEnv(data, cfg), ReferenceTradingEnv(data, cfg)
    rng = np.random.default_rng(seed)
    obs_n, info_n = new.reset(seed=seed)
    obs_o, info_o = old.reset(seed=seed)
    assert np.array_equal(obs_n, obs_o) and info_n == info_o
    dtype = np.float32 if seed % 2 == 0 else np.float64
    for _ in range(400):
        action = rng.uniform(-1.3, 1.3, 5).astype(dtype)
        got, want = new.step(action), old.step(action)
        assert np.array_equal(got[0], want[0]) and got[1:4] == want[1:4]
        assert got[4].keys() == want[4].keys()
        assert all(_same(got[4][k], want[4][k]) for k in want[4]), [
            k for k in want[4] if not _same(got[4][k], want[4][k])
        ]
        assert dataclasses.astuple(new.account_state) == dataclasses.astuple(old.account_state)
        if got[2] or got[3]:
            obs_n, _ = new.reset()
            obs_o, _ = old.reset()
            assert np.array_equal(obs_n, obs_o)


@pytest.mark.parametrize("seed", range(3))
def test_env_step_decision_with_stop_moves_equals_reference_env(seed: int) -> None:
    """``TradingEnv.step_decision`` (kernel, 6-field decision) equals the reference env, trailing included."""
    cfg = _env_configs()[1]
    data = make_env_data(400, seed=seed, vol_per_bar=0.03)
    new, old = TradingEnv(data, cfg), ReferenceTradingEnv(data, cfg)
    rng = np.random.default_rng(100 + seed)
    new.reset(options={"start_index": 0, "end_index": 399})
    old.reset(options={"start_index": 0, "end_index": 399})
    moved = 0
    for _ in range(399):
        state = new.account_state
        decision = _random_decision(rng, state, float(data.open[new.current_index + 1]))
        if decision is not None and decision.direction != state.side and decision.direction != 0:
            decision = dataclasses.replace(decision, leverage=min(decision.leverage, 20.0))
        got, want = new.step_decision(decision), old.step_decision(decision)
        assert np.array_equal(got[0], want[0]) and got[1:4] == want[1:4]
        assert all(_same(got[4][k], want[4][k]) for k in want[4])
        after = new.account_state
        assert dataclasses.astuple(after) == dataclasses.astuple(old.account_state)
        moved += after.side == state.side != 0 and after.stop_price != state.stop_price
        if got[2] or got[3]:
            break
    assert moved >= 5
