"""Seeded synthetic candle factory for tests (real data lives in ``market/bundled``)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def make_candles(
    n_bars: int = 500,
    *,
    seed: int = 0,
    start: str = "2021-01-01",
    freq: str = "1h",
    start_price: float = 30_000.0,
    vol_per_bar: float = 0.01,
    with_funding: bool = True,
) -> pd.DataFrame:
    """Return OHLC-consistent candles from a seeded geometric random walk.

    Index: UTC open times (``open_time``); columns ``open high low close volume`` float64 and,
    if ``with_funding``, ``funding_rate`` (the rate settled at bars opening at 00/08/16 UTC,
    NaN elsewhere).
    """
    rng = np.random.default_rng(seed)
    log_ret = rng.normal(0.0, vol_per_bar, n_bars)
    close = start_price * np.exp(np.cumsum(log_ret))
    open_ = np.concatenate([[start_price], close[:-1]])
    span = np.abs(rng.normal(0.0, vol_per_bar, n_bars)) * close
    high = np.maximum(open_, close) + 0.5 * span
    low = np.minimum(open_, close) - 0.5 * span
    volume = rng.lognormal(mean=5.0, sigma=0.5, size=n_bars)
    index = pd.date_range(start, periods=n_bars, freq=freq, tz="UTC", name="open_time")
    df = pd.DataFrame(
        {"open": open_, "high": high, "low": low, "close": close, "volume": volume}, index=index
    )
    if with_funding:
        is_funding = (index.hour % 8 == 0) & (index.minute == 0)
        df["funding_rate"] = np.where(is_funding, rng.normal(1e-4, 1e-4, n_bars), np.nan)
    return df
