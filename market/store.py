"""Parquet store of downloaded market data: layout, reading, merging and atomic writes.

Layout (the same as the shared data folder)::

    STORE/<market dir>/<SYMBOL>-<timeframe>.parquet     candles
    STORE/<market dir>/<SYMBOL>-funding.parquet         funding-rate history

``<market dir>`` is ``binance_usdm`` for the ccxt exchange id ``binanceusdm`` and ``binance_spot`` for
``binance`` (other ids are used as they are); ``<SYMBOL>`` is the exchange's market id without
separators (``BTC/USDT:USDT`` -> ``BTCUSDT``).

File schema: a ``timestamp`` column (``timestamp[ns, tz=UTC]``: candle open time, or funding time)
followed by float64 columns (``open high low close volume``, or ``funding_rate``); sorted, unique
timestamps; parquet with zstd compression and no index. A file is always replaced whole: written to a
temporary file in the same folder, flushed to disk, then renamed over the old one (``os.replace``), so
a reader (or a killed download) only ever sees the old or the new complete file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from market.candles import FUNDING_COLUMN, OHLCV_COLUMNS
from market.errors import DataValidationError

TIME_COLUMN = "timestamp"
"""Name of the time column in store files."""

_MARKET_DIRS: dict[str, str] = {"binanceusdm": "binance_usdm", "binance": "binance_spot"}


def market_dir_name(exchange_id: str) -> str:
    """Folder of an exchange inside the store (``binanceusdm`` -> ``binance_usdm``)."""
    if not exchange_id or "/" in exchange_id or exchange_id.startswith("."):
        raise ValueError(f"exchange id {exchange_id!r} cannot name a store folder")
    return _MARKET_DIRS.get(exchange_id, exchange_id)


def symbol_file_stem(symbol: str) -> str:
    """File-name form of a unified ccxt symbol: ``BTC/USDT:USDT`` -> ``BTCUSDT``, ``BTCUSDT`` unchanged.

    Raises
    ------
    ValueError
        If nothing usable is left (empty symbol) or the symbol contains characters other than
        letters, digits, ``/``, ``:``, ``-`` and ``_``.
    """
    base = symbol.split(":", 1)[0]
    stem = base.replace("/", "").replace("-", "").replace("_", "")
    if not stem or not stem.isalnum():
        raise ValueError(f"symbol {symbol!r} cannot name a store file (expected e.g. 'BTC/USDT:USDT')")
    return stem.upper()


def candles_path(store: str | os.PathLike[str], exchange_id: str, symbol: str, timeframe: str) -> Path:
    """``STORE/<market dir>/<SYMBOL>-<timeframe>.parquet``."""
    return Path(store) / market_dir_name(exchange_id) / f"{symbol_file_stem(symbol)}-{timeframe}.parquet"


def funding_path(store: str | os.PathLike[str], exchange_id: str, symbol: str) -> Path:
    """``STORE/<market dir>/<SYMBOL>-funding.parquet``."""
    return Path(store) / market_dir_name(exchange_id) / f"{symbol_file_stem(symbol)}-funding.parquet"


def empty_frame(columns: tuple[str, ...]) -> pd.DataFrame:
    """An empty store frame: UTC ns ``DatetimeIndex`` named ``timestamp``, float64 ``columns``."""
    index = pd.DatetimeIndex([], dtype="datetime64[ns, UTC]", name=TIME_COLUMN)
    return pd.DataFrame({c: np.array([], dtype=np.float64) for c in columns}, index=index)


def read_store_file(path: str | os.PathLike[str], columns: tuple[str, ...]) -> pd.DataFrame:
    """Read a store file into a frame indexed by UTC time; an absent file gives an empty frame.

    Only the layout is checked here (columns, dtypes, sorted unique times), not the market rules
    (see :mod:`market.quality`): the store may hold exchange-side gaps.

    Parameters
    ----------
    path : path-like
        Parquet file.
    columns : tuple of str
        Expected value columns (``OHLCV_COLUMNS`` or ``("funding_rate",)``).

    Returns
    -------
    pandas.DataFrame
        Index ``timestamp`` (UTC, ns), float64 ``columns``, shape (T, len(columns)).

    Raises
    ------
    DataValidationError
        Rule ``store_layout`` naming the file when the columns, dtypes or time order are not the
        store schema (the file was not written by this module; fix or move it, it is never
        overwritten silently).
    """
    path = Path(path)
    if not path.is_file():
        return empty_frame(columns)
    raw = pd.read_parquet(path)
    expected = [TIME_COLUMN, *columns]
    if list(raw.columns) != expected:
        raise DataValidationError(
            "store_layout", source=str(path), detail=f"columns {list(raw.columns)}, expected {expected}"
        )
    times = raw[TIME_COLUMN]
    if not isinstance(times.dtype, pd.DatetimeTZDtype) or str(times.dt.tz) != "UTC":
        raise DataValidationError("store_layout", source=str(path), detail=f"timestamp is {times.dtype}, not UTC")
    wrong = {c: str(raw[c].dtype) for c in columns if raw[c].dtype != np.float64}
    if wrong:
        raise DataValidationError("store_layout", source=str(path), detail=f"columns must be float64, got {wrong}")
    df = raw.set_index(TIME_COLUMN)
    df.index = df.index.as_unit("ns")
    if not df.index.is_monotonic_increasing or df.index.has_duplicates:
        raise DataValidationError(
            "store_layout", source=str(path), detail="timestamps are not strictly increasing"
        )
    return df


def merge_rows(existing: pd.DataFrame, new: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """Upsert ``new`` rows into ``existing``: union of times, ``new`` wins where both have a time.

    Rows of ``new`` may be unsorted and may repeat a time (overlapping pages); the last occurrence
    of a time wins, as it is the most recent answer of the exchange.

    Parameters
    ----------
    existing, new : pandas.DataFrame
        Store frames with the same columns, UTC ``DatetimeIndex``.

    Returns
    -------
    (pandas.DataFrame, int, int)
        The merged frame (sorted, unique times), the number of times added and the number of
        existing times whose values were replaced by different ones.

    Raises
    ------
    ValueError
        If the frames do not have the same columns.
    """
    if list(existing.columns) != list(new.columns):
        raise ValueError(f"cannot merge columns {list(new.columns)} into {list(existing.columns)}")
    new = new[~new.index.duplicated(keep="last")]
    overlap = new.index.intersection(existing.index)
    changed = 0
    if len(overlap):
        a = existing.loc[overlap].to_numpy()
        b = new.loc[overlap].to_numpy()
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        changed = int((~same.all(axis=1)).sum())
    added = len(new.index.difference(existing.index))
    kept = existing.loc[~existing.index.isin(new.index)]
    merged = pd.concat([kept, new]).sort_index(kind="stable")
    merged.index.name = TIME_COLUMN
    return merged.astype(np.float64), added, changed


def write_store_file(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a store frame atomically: temporary file in the same folder, fsync, ``os.replace``.

    Parameters
    ----------
    df : pandas.DataFrame
        UTC ``DatetimeIndex`` (sorted, unique) and float64 columns.
    path : path-like
        Destination; its folder is created if needed.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If the index is not a sorted, unique UTC ``DatetimeIndex`` or a column is not float64
        (nothing is written).
    """
    path = Path(path)
    index = df.index
    if not isinstance(index, pd.DatetimeIndex) or str(index.tz) != "UTC":
        raise ValueError(f"{path.name}: index must be a UTC DatetimeIndex, got {type(index).__name__}")
    if not index.is_monotonic_increasing or index.has_duplicates:
        raise ValueError(f"{path.name}: times must be strictly increasing")
    wrong = {c: str(df[c].dtype) for c in df.columns if df[c].dtype != np.float64}
    if wrong:
        raise ValueError(f"{path.name}: columns must be float64, got {wrong}")
    table = df.copy()
    table.index = index.as_unit("ns")
    table.index.name = TIME_COLUMN
    table = table.reset_index()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            table.to_parquet(fh, index=False, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


CANDLE_COLUMNS: tuple[str, ...] = OHLCV_COLUMNS
FUNDING_COLUMNS: tuple[str, ...] = (FUNDING_COLUMN,)
