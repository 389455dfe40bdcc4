"""The bar-aligned arrays an env reads (:class:`EnvData`), validated on construction.

Built from candle, ATR, funding and market-observation frames by :meth:`EnvData.from_frames`; read by
:class:`envs.trading_env.TradingEnv`, the batched and multi-symbol envs and the backtests. Re-exported by
:mod:`envs.trading_env` (``envs.trading_env.EnvData`` stays the spelling callers use).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from market.ohlc import describe_row, ohlc_codes

_PRICE_COLUMNS = ("open", "high", "low", "close")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _row_label(open_time_ns: np.ndarray, i: int) -> str:
    try:
        return f"row {i} ({pd.Timestamp(int(open_time_ns[i]), tz='UTC')})"
    except (IndexError, ValueError, OverflowError):
        return f"row {i}"


def _first_bad(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)[:5]]


@dataclass(frozen=True)
class EnvData:
    """Bar-aligned arrays the env reads (length T along the first axis).

    Attributes
    ----------
    open_time_ns : np.ndarray
        int64 (T,), UTC open times in ns, strictly increasing.
    open, high, low, close : np.ndarray
        float64 (T,), prices in USDT, finite and > 0.
    atr : np.ndarray
        float64 (T,), ATR in price units at each bar (finite, > 0).
    funding_rate : np.ndarray
        float64 (T,), rate settled at each open time, NaN where none.
    is_funding_time : np.ndarray
        bool (T,), open time is a funding settlement time.
    market_obs : np.ndarray
        float32 (T, F): features + regime probabilities + signal probabilities, finite.
    market_obs_names : tuple[str, ...]
        F column names.

    Raises
    ------
    ValueError
        On construction, if shapes disagree or a value is non-finite / out of range; the message
        names the first offending rows (index and open time) and the column.
    """

    open_time_ns: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    atr: np.ndarray
    funding_rate: np.ndarray
    is_funding_time: np.ndarray
    market_obs: np.ndarray
    market_obs_names: tuple[str, ...]

    def __post_init__(self) -> None:
        coerce = {
            "open_time_ns": np.int64, "open": np.float64, "high": np.float64, "low": np.float64,
            "close": np.float64, "atr": np.float64, "funding_rate": np.float64, "is_funding_time": np.bool_,
            "market_obs": np.float32,
        }  # fmt: skip
        for name, dtype in coerce.items():
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))
        object.__setattr__(self, "market_obs_names", tuple(str(n) for n in self.market_obs_names))
        t = self.open_time_ns
        if t.ndim != 1 or len(t) < 1:
            raise ValueError(f"open_time_ns must be a non-empty 1-D array, got shape {t.shape}")
        n = len(t)
        for name in ("open", "high", "low", "close", "atr", "funding_rate", "is_funding_time"):
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({n},) to align with open_time_ns")
        if self.market_obs.ndim != 2 or self.market_obs.shape[0] != n:
            raise ValueError(f"market_obs has shape {self.market_obs.shape}, expected ({n}, F)")
        if len(self.market_obs_names) != self.market_obs.shape[1]:
            raise ValueError(
                f"market_obs_names has {len(self.market_obs_names)} names for {self.market_obs.shape[1]} columns"
            )
        if n > 1 and not (np.diff(t) > 0).all():
            bad = _first_bad(np.diff(t) <= 0)
            raise ValueError(
                f"open_time_ns must be strictly increasing; violated at {[_row_label(t, i + 1) for i in bad]}"
            )
        codes = ohlc_codes(self.open, self.high, self.low, self.close)  # the OHLC row rule (market.ohlc)
        if codes.any():
            bad = _first_bad(codes != 0)
            rows = "; ".join(describe_row(int(codes[i]), _row_label(t, i), self.open[i], self.high[i], self.low[i],
                                          self.close[i]) for i in bad)  # fmt: skip
            raise ValueError(f"candles break the OHLC rule at {int((codes != 0).sum())} rows: {rows}")
        bad_mask = ~(np.isfinite(self.atr) & (self.atr > 0))
        if bad_mask.any():
            raise ValueError(f"column 'atr' must be finite and > 0; bad at {[_row_label(t, i) for i in _first_bad(bad_mask)]}")
        if np.isinf(self.funding_rate).any():
            raise ValueError(
                f"column 'funding_rate' is infinite at {[_row_label(t, i) for i in _first_bad(np.isinf(self.funding_rate))]}"
            )
        finite_obs = np.isfinite(self.market_obs)
        if not finite_obs.all():
            bad_rows, bad_cols = np.nonzero(~finite_obs)
            where = [
                f"{_row_label(t, int(r))}, column {self.market_obs_names[int(c)]!r}"
                for r, c in zip(bad_rows[:5], bad_cols[:5], strict=True)
            ]
            raise ValueError(f"market_obs must be finite (as float32); bad at {where}")

    def __len__(self) -> int:
        return len(self.open_time_ns)

    @classmethod
    def from_frames(
        cls,
        candles: pd.DataFrame,
        market_obs: pd.DataFrame,
        atr: np.ndarray | pd.Series,
        *,
        funding_interval_hours: int = 8,
    ) -> EnvData:
        """Build aligned arrays from candles, the market observation frame and an ATR series.

        Parameters
        ----------
        candles : pd.DataFrame
            Index: UTC open times (DatetimeIndex, tz UTC), columns ``open high low close`` (float,
            USDT), optional ``funding_rate`` (NaN where no settlement).
        market_obs : pd.DataFrame
            (T, F) on the same index; cast to float32.
        atr : np.ndarray | pd.Series
            ATR in price units, length T (a Series must have the same index).
        funding_interval_hours : int
            Funding settles at open times with ``hour % funding_interval_hours == 0`` and minute 0.

        Raises
        ------
        TypeError
            If ``candles`` or ``market_obs`` is not a DataFrame.
        ValueError
            If the indexes differ (names the first differing row), a column is missing, or a value is
            non-finite / out of range (names the rows and the column).
        """
        if not isinstance(candles, pd.DataFrame) or not isinstance(market_obs, pd.DataFrame):
            raise TypeError("candles and market_obs must be pandas DataFrames")
        idx = candles.index
        if not isinstance(idx, pd.DatetimeIndex) or idx.tz is None or str(idx.tz) != "UTC":
            raise ValueError(
                f"candles must be indexed by a UTC DatetimeIndex, got {type(idx).__name__} tz={getattr(idx, 'tz', None)}"
            )
        missing = [c for c in _PRICE_COLUMNS if c not in candles.columns]
        if missing:
            raise ValueError(f"candles lack columns {missing}")
        if not market_obs.index.equals(idx):
            if len(market_obs.index) != len(idx):
                raise ValueError(
                    f"market_obs has {len(market_obs)} rows, candles {len(idx)}: indexes must be identical"
                )
            diff = np.flatnonzero(np.asarray(market_obs.index != idx))
            i = int(diff[0]) if len(diff) else 0
            raise ValueError(
                f"market_obs index differs from the candles index at row {i}: {market_obs.index[i]} != {idx[i]}"
            )
        if isinstance(atr, pd.Series):
            if not atr.index.equals(idx):
                raise ValueError("atr Series index differs from the candles index")
            atr_arr = atr.to_numpy(dtype=np.float64)
        else:
            atr_arr = np.asarray(atr, dtype=np.float64)
            if atr_arr.shape != (len(idx),):
                raise ValueError(f"atr has shape {atr_arr.shape}, expected ({len(idx)},)")
        if "funding_rate" in candles.columns:
            funding = candles["funding_rate"].to_numpy(dtype=np.float64)
        else:
            funding = np.full(len(idx), np.nan)
        is_funding = np.asarray(
            (idx.hour % funding_interval_hours == 0) & (idx.minute == 0) & (idx.second == 0) & (idx.nanosecond == 0)
            & (idx.microsecond == 0)
        )  # fmt: skip
        return cls(
            open_time_ns=idx.as_unit("ns").asi8.copy(),
            open=candles["open"].to_numpy(dtype=np.float64),
            high=candles["high"].to_numpy(dtype=np.float64),
            low=candles["low"].to_numpy(dtype=np.float64),
            close=candles["close"].to_numpy(dtype=np.float64),
            atr=atr_arr,
            funding_rate=funding,
            is_funding_time=is_funding,
            market_obs=market_obs.to_numpy(dtype=np.float32),
            market_obs_names=tuple(str(c) for c in market_obs.columns),
        )

    def slice(self, start: int, end: int) -> EnvData:
        """Rows ``[start, end)`` (views of the same arrays).

        Raises
        ------
        ValueError
            Unless ``0 <= start < end <= len(self)``.
        """
        n = len(self)
        if not 0 <= start < end <= n:
            raise ValueError(f"slice [{start}, {end}) is not a non-empty span of {n} rows")
        arrays = {name: getattr(self, name)[start:end] for name in (
            "open_time_ns", "open", "high", "low", "close", "atr", "funding_rate", "is_funding_time", "market_obs")}  # fmt: skip
        return replace(self, **arrays)
