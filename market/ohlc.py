"""The OHLC row rule, written once: what makes one candle (open, high, low, close, volume) valid.

A row is valid when, checked in this order (the *first* broken rule is the row's problem):

====  ============================  ===============================================================
code  rule (:data:`OHLC_RULES`)     broken when
====  ============================  ===============================================================
1     ``non_finite_price``          open, high, low or close is NaN or +-inf
2     ``non_finite_volume``         volume is NaN or +-inf
3     ``non_positive_price``        open, high, low or close <= 0
4     ``negative_volume``           volume < 0 (zero is allowed: exchange halts)
5     ``high_below_low``            high < low
6     ``open_close_outside_range``  low > min(open, close) or high < max(open, close)
====  ============================  ===============================================================

Code 0: valid. Without a volume column (the env's arrays, an execution bar) rules 2 and 4 do not apply.

Every place that refuses a bad candle asks this module: :func:`market.candles.validate_candles` (raises on
a stored frame), :func:`market.quality.assess_candles` (counts), :class:`envs.trading_env.EnvData` and
``envs.accounting.step_bar`` (the execution layer), ``serving.loop.row_problems`` and
``serving.candles.check_window`` (quarantine of live and replayed rows), ``market.ingest.parse_ohlcv_page``
(a downloaded page). Their messages name the row (open time) and its values (:func:`describe_row`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

OHLC_RULES: tuple[str, ...] = (
    "non_finite_price",
    "non_finite_volume",
    "non_positive_price",
    "negative_volume",
    "high_below_low",
    "open_close_outside_range",
)
"""Rule names; the code of ``OHLC_RULES[k]`` is ``k + 1`` (0: valid)."""

RULE_TEXT: dict[str, str] = {
    "non_finite_price": "non-finite price",
    "non_finite_volume": "non-finite volume",
    "non_positive_price": "non-positive price",
    "negative_volume": "negative volume",
    "high_below_low": "high < low",
    "open_close_outside_range": "open/close outside [low, high]",
}
"""How each rule reads in a message."""

VALID = 0
NON_FINITE_PRICE, NON_FINITE_VOLUME, NON_POSITIVE_PRICE, NEGATIVE_VOLUME, HIGH_BELOW_LOW, OUTSIDE_RANGE = range(1, 7)
_PRICES = ("open", "high", "low", "close")


def ohlc_codes(
    open_: Any, high: Any, low: Any, close: Any, volume: Any | None = None
) -> np.ndarray:
    """Return, per row, the code of the first OHLC rule it breaks (module docstring; 0: valid).

    Pure and vectorised.

    Parameters
    ----------
    open_, high, low, close : array-like
        Prices, shape (T,), any float dtype (read as float64).
    volume : array-like, optional
        Shape (T,); None: the volume rules do not apply.

    Returns
    -------
    np.ndarray
        int8, shape (T,).

    Raises
    ------
    ValueError
        If the arrays do not have one common shape (T,).
    """
    o, h, lo, c = (np.asarray(x, dtype=np.float64) for x in (open_, high, low, close))
    cols = [o, h, lo, c] + ([] if volume is None else [np.asarray(volume, dtype=np.float64)])
    if any(x.ndim != 1 or x.shape != o.shape for x in cols):
        raise ValueError(f"OHLC arrays must share one shape (T,), got {[x.shape for x in cols]}")
    with np.errstate(invalid="ignore"):
        masks = [~(np.isfinite(o) & np.isfinite(h) & np.isfinite(lo) & np.isfinite(c))]
        if volume is not None:
            v = cols[4]
            masks.append(~np.isfinite(v))
        masks.append((o <= 0) | (h <= 0) | (lo <= 0) | (c <= 0))
        if volume is not None:
            masks.append(v < 0)
        masks += [h < lo, (lo > np.minimum(o, c)) | (h < np.maximum(o, c))]
    codes = (
        (NON_FINITE_PRICE, NON_FINITE_VOLUME, NON_POSITIVE_PRICE, NEGATIVE_VOLUME, HIGH_BELOW_LOW, OUTSIDE_RANGE)
        if volume is not None
        else (NON_FINITE_PRICE, NON_POSITIVE_PRICE, HIGH_BELOW_LOW, OUTSIDE_RANGE)
    )
    return np.select(masks, codes, VALID).astype(np.int8)


def ohlc_code(open_: float, high: float, low: float, close: float, volume: float | None = None) -> int:
    """Return the code of the first OHLC rule one row breaks (0: valid): :func:`ohlc_codes` of one row."""
    prices = (open_, high, low, close)
    if not all(math.isfinite(p) for p in prices):
        return NON_FINITE_PRICE
    if volume is not None and not math.isfinite(volume):
        return NON_FINITE_VOLUME
    if min(prices) <= 0:
        return NON_POSITIVE_PRICE
    if volume is not None and volume < 0:
        return NEGATIVE_VOLUME
    if high < low:
        return HIGH_BELOW_LOW
    if low > min(open_, close) or high < max(open_, close):
        return OUTSIDE_RANGE
    return VALID


def rule_of(code: int) -> str:
    """Return the rule name of a non-zero code (``OHLC_RULES[code - 1]``)."""
    if not 1 <= int(code) <= len(OHLC_RULES):
        raise ValueError(f"not an OHLC rule code: {code!r}")
    return OHLC_RULES[int(code) - 1]


def describe_row(code: int, where: Any, open_: float, high: float, low: float, close: float,
                 volume: float | None = None) -> str:  # fmt: skip
    """Return the message of a row that breaks rule ``code``.

    It names the rule (with the offending price columns), the row ``where`` (an open time or a row label)
    and its values, e.g. ``"high < low at 2024-01-01 00:00:00+00:00: open=10.0 high=9.0 low=9.5 close=9.8
    volume=1.0"``.
    """
    rule = rule_of(code)
    text = RULE_TEXT[rule]
    prices = dict(zip(_PRICES, (float(open_), float(high), float(low), float(close)), strict=True))
    if code == NON_FINITE_PRICE:
        text += " (" + ", ".join(repr(k) for k, x in prices.items() if not math.isfinite(x)) + ")"
    elif code == NON_POSITIVE_PRICE:
        text += " (" + ", ".join(repr(k) for k, x in prices.items() if x <= 0) + ")"
    values = " ".join(f"{k}={x!r}" for k, x in prices.items())
    if volume is not None:
        values += f" volume={float(volume)!r}"
    return f"{text} at {where}: {values}"


def frame_codes(candles: pd.DataFrame) -> np.ndarray:
    """Return :func:`ohlc_codes` of a candle frame (``open high low close``, and ``volume`` when present)."""
    volume = candles["volume"] if "volume" in candles.columns else None
    return ohlc_codes(candles["open"], candles["high"], candles["low"], candles["close"], volume)


def row_problems(candles: pd.DataFrame) -> list[str | None]:
    """Return, per row of a candle frame, the message of the first OHLC rule it breaks (None: valid).

    The message is :func:`describe_row`'s, the row named by its open time.
    """
    codes = frame_codes(candles)
    out: list[str | None] = [None] * len(candles)
    if not codes.any():
        return out
    has_volume = "volume" in candles.columns
    cols = [candles[k].to_numpy(np.float64) for k in (*_PRICES, *(("volume",) if has_volume else ()))]
    for i in np.flatnonzero(codes):
        out[i] = describe_row(int(codes[i]), candles.index[i], *(x[i] for x in cols))
    return out
