"""Hand-built candle sequences for the V1 tests (explicit, no randomness).

The base sequence is an additive uptrend of 600 hourly bars: each bar opens at the previous close
and moves by ``step x (1 + 0.6 sin(2 pi i / 37))`` (a volatility cycle, so the Bollinger width has
a spread to be ranked against), every 5th bar is a pullback of the same size, wicks add
``wick`` above the body high and below the body low, volume rises linearly (100 + 0.1 i).
The last bar is the breakout bar: it closes ``breakout`` above its open on ``last_volume_mult``
times the trend volume.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def trend_candles(
    n_bars: int = 600,
    *,
    step: float = 0.5,
    wick: float = 1.5,
    base: float = 1_000.0,
    breakout: float = 4.0,
    last_volume_mult: float = 1.5,
    reverse_bars: tuple[int, int] | None = None,
    flat_bars: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Return the base uptrend; ``reverse_bars=(a, b)`` flips the moves of bars a..b-1 (a pullback),
    ``flat_bars=(a, b)`` sets them to 0 (a pause: the EMAs catch up with the price)."""
    i = np.arange(n_bars)
    moves = step * (1.0 + 0.6 * np.sin(2.0 * np.pi * i / 37.0))
    moves[i % 5 == 4] *= -1.0
    if reverse_bars is not None:
        moves[reverse_bars[0] : reverse_bars[1]] *= -1.0
    if flat_bars is not None:
        moves[flat_bars[0] : flat_bars[1]] = 0.0
    close = base + np.cumsum(moves)
    open_ = np.concatenate([[base], close[:-1]])
    close[-1] = open_[-1] + breakout
    high = np.maximum(open_, close) + wick
    low = np.minimum(open_, close) - wick
    volume = 100.0 + 0.1 * i
    volume[-1] *= last_volume_mult
    index = pd.date_range("2024-01-01", periods=n_bars, freq="1h", tz="UTC", name="open_time")
    return pd.DataFrame(
        {"open": open_, "high": high, "low": low, "close": close, "volume": volume}, index=index
    )


def mirror(candles: pd.DataFrame, centre: float = 1_500.0) -> pd.DataFrame:
    """Reflect prices p -> 2 centre - p (high and low swap); volume unchanged."""
    out = candles.copy()
    out["open"] = 2 * centre - candles["open"]
    out["close"] = 2 * centre - candles["close"]
    out["high"] = 2 * centre - candles["low"]
    out["low"] = 2 * centre - candles["high"]
    return out


def with_last_bar(
    candles: pd.DataFrame, *, open_: float, high: float, low: float, close: float
) -> pd.DataFrame:
    """A copy with the last bar's prices replaced (volume kept)."""
    out = candles.copy()
    out.iloc[-1, out.columns.get_indexer(["open", "high", "low", "close"])] = [open_, high, low, close]
    return out


def pullback_candles(low_above_mid_atr: float = 0.0) -> pd.DataFrame:
    """The base uptrend whose last bar dips to ``EMA_mid + low_above_mid_atr x ATR`` and closes up.

    Bars 555..598 pause (no move, so the fast and mid EMAs approach the price while +DI stays above
    -DI; the Bollinger width is then at the bottom of its history, so tests open that filter). The
    last bar opens at the previous close and closes 1.5 above it (less than 0.5 x the previous
    range: no breakout); its low is placed relative to the mid EMA (50) and the ATR (14) of the
    series (fixed-point iteration: the low moves the ATR a little).
    """
    import talib

    c = trend_candles(breakout=1.5, flat_bars=(555, 599))
    o = float(c["open"].iloc[-1])
    close = o + 1.5
    ema_mid = float(talib.EMA(c["close"].to_numpy()[-600:], 50)[-1])
    low = ema_mid
    for _ in range(20):
        c = with_last_bar(c, open_=o, high=close + 0.2, low=low, close=close)
        a = c.iloc[-600:]
        atr = float(talib.ATR(a["high"].to_numpy(), a["low"].to_numpy(), a["close"].to_numpy(), 14)[-1])
        low = ema_mid + low_above_mid_atr * atr
    return with_last_bar(c, open_=o, high=close + 0.2, low=low, close=close)
