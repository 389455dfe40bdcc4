"""Pooled multi-symbol env: every episode trades one symbol with that symbol's own data, funding and spec."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agents.ppo_sb3 import make_vec_env
from envs.multi_env import MultiSymbolEnv
from envs.trading_env import EnvConfig, EnvData, TradingEnv
from market.instruments import bundled_spec
from tests.envs.helpers import simple_atr
from tests.kit.candles import make_candles
from tests.kit.instruments import xrp_test_spec


def _legs() -> list[tuple[str, EnvData, EnvConfig]]:
    """Two symbols on the same price path and observations; they differ only in funding and instrument spec:
    BTCUSDT (bundled spec, 8-hourly funding at +0.01 %) and a XRPUSDT-named spec with another tick, step, min
    notional and brackets, 4-hourly funding at -0.3 % (so a long is paid, not charged)."""
    candles = make_candles(400, seed=3, start_price=50.0, vol_per_bar=0.004)
    obs = pd.DataFrame(np.random.default_rng(4).normal(size=(400, 3)).astype(np.float32), index=candles.index,
                       columns=["a", "b", "c"])
    atr = simple_atr(candles)
    btc = candles.assign(funding_rate=np.where(candles.index.hour % 8 == 0, 0.0001, np.nan))
    xrp = candles.assign(funding_rate=np.where(candles.index.hour % 4 == 0, -0.003, np.nan))
    base = EnvConfig(episode_len_bars=120)
    spec_x = xrp_test_spec(funding_interval_hours=4, lot_step_base=1.0, min_qty_base=1.0, min_notional_usdt=400.0)
    return [
        ("BTCUSDT", EnvData.from_frames(btc, obs, atr, funding_interval_hours=8),
         base.model_copy(update={"costs": base.costs.with_instrument(bundled_spec("BTCUSDT"))})),
        ("XRPUSDT", EnvData.from_frames(xrp, obs, atr, funding_interval_hours=4),
         base.model_copy(update={"costs": base.costs.with_instrument(spec_x)})),
    ]


def _actions(n: int) -> np.ndarray:
    rng = np.random.default_rng(11)
    a = rng.uniform(-1, 1, size=(n, 5)).astype(np.float32)
    a[:, 0] = np.where(np.arange(n) % 30 < 20, 0.9, 0.0)  # long most of the time, flat now and then
    a[:, 2] = np.where(np.arange(n) % 7 == 0, -0.97, a[:, 2])  # some entries too small for one spec's minimum
    return a


def _trajectory(env, options) -> tuple[list[float], dict]:
    env.reset(seed=0, options=options)
    equity, info = [], {}
    for a in _actions(100):
        _, _, term, trunc, info = env.step(a)
        equity.append(info["equity_usdt"])
        if term or trunc:
            break
    return equity, info


def test_each_symbols_episode_uses_its_own_funding_and_spec():
    """Fails if the legs shared one spec or one funding series: each symbol's episode equals a one-symbol env on
    that symbol's own data and config, and the two symbols' episodes differ (funding sign, interval, rounding)."""
    legs = _legs()
    multi = MultiSymbolEnv(legs)
    got = {}
    for sym, data, cfg in legs:
        opts = {"start_index": 10, "end_index": 110}
        eq_multi, info_multi = _trajectory(multi, {**opts, "symbol": sym})
        eq_single, info_single = _trajectory(TradingEnv(data, cfg), opts)
        assert info_multi["symbol"] == sym and multi.env.config.costs.instrument.symbol == sym
        assert eq_multi == eq_single, sym
        for key in ("funding_paid_usdt", "fees_paid_usdt", "n_skipped_min_notional", "n_trades"):
            assert info_multi[key] == info_single[key], (sym, key)
        got[sym] = info_multi
    # the specs and funding really differ in what they do
    assert got["BTCUSDT"]["funding_paid_usdt"] > 0 > got["XRPUSDT"]["funding_paid_usdt"]
    assert got["XRPUSDT"]["n_skipped_min_notional"] > got["BTCUSDT"]["n_skipped_min_notional"]


def test_random_resets_draw_every_symbol_reproducibly():
    legs = _legs()
    draws = []
    for _ in range(2):
        env = MultiSymbolEnv(legs)
        env.reset(seed=5)
        seq = []
        for _ in range(40):
            _, info = env.reset()
            seq.append((info["symbol"], env.env.episode_span))
        draws.append(seq)
    assert draws[0] == draws[1]
    assert {s for s, _ in draws[0]} == {"BTCUSDT", "XRPUSDT"}


def test_pooled_vec_env_trains_on_every_symbol():
    venv = make_vec_env(_legs(), EnvConfig(), n_envs=2, seed=1)
    venv.reset()
    seen = set()
    for _ in range(400):
        _, _, dones, infos = venv.step(np.tile(_actions(1), (2, 1)))
        seen |= {i["symbol"] for i, d in zip(infos, dones, strict=True) if d}
    assert seen == {"BTCUSDT", "XRPUSDT"}


def test_legs_must_share_the_observation_columns():
    (s, d, c), (s2, _, c2) = _legs()
    other = EnvData.from_frames(make_candles(50, seed=1), pd.DataFrame(
        np.zeros((50, 2), np.float32), index=make_candles(50, seed=1).index, columns=["x", "y"]),
        simple_atr(make_candles(50, seed=1)))
    with pytest.raises(ValueError, match="observation columns"):
        MultiSymbolEnv([(s, d, c), (s2, other, c2)])
    with pytest.raises(ValueError, match="unknown symbol"):
        MultiSymbolEnv([(s, d, c)]).reset(options={"symbol": "ETHUSDT"})
