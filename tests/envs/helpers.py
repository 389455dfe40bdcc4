"""Shared builders for the envs tests (synthetic data only; nothing under /work/shared is read)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from envs.accounting import Bar, is_funding_time
from envs.trading_env import EnvData
from tests.kit.candles import make_candles

HOUR_NS = 3_600 * 1_000_000_000
# 2024-01-01 00:00 UTC: a funding settlement time.
T0_NS = int(pd.Timestamp("2024-01-01 00:00", tz="UTC").value)


def bar(hour: int, o: float, h: float, lo: float, c: float, rate: float = math.nan) -> Bar:
    """A 1h bar opening ``hour`` hours after 2024-01-01 00:00 UTC (funding at hours 0, 8, 16, ...)."""
    t = T0_NS + hour * HOUR_NS
    return Bar(t, o, h, lo, c, rate, is_funding_time(t, 8))


def simple_atr(candles: pd.DataFrame, window: int = 14) -> np.ndarray:
    """Rolling mean of high - low, back-filled with its first finite value."""
    return (candles["high"] - candles["low"]).rolling(window).mean().bfill().to_numpy()


def make_env_data(
    n_bars: int = 300, *, seed: int = 0, n_features: int = 4, vol_per_bar: float = 0.01
) -> EnvData:
    """EnvData from ``make_candles`` with a simple ATR and random float32 market observations."""
    candles = make_candles(n_bars, seed=seed, vol_per_bar=vol_per_bar)
    rng = np.random.default_rng(seed + 1)
    obs = pd.DataFrame(
        rng.normal(size=(n_bars, n_features)).astype(np.float32),
        index=candles.index,
        columns=[f"f{i}" for i in range(n_features)],
    )
    return EnvData.from_frames(candles, obs, simple_atr(candles))
