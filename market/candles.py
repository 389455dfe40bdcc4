"""Candles and funding rates: loading, validation, funding join, slicing.

The canonical candle frame (used by every package):

* index ``open_time``: ``DatetimeIndex``, tz UTC, unit ns, the bar's **open** time, unique, strictly
  increasing, regularly spaced (one bar interval apart, no gaps);
* columns ``open high low close volume`` (float64; prices in quote units, e.g. USDT, volume in base
  units, e.g. BTC) and optionally ``funding_rate`` (float64, the rate settled at that bar's open time,
  e.g. 0.0001 = 0.01 %, NaN on bars with no settlement).

Validation never repairs or drops rows: bad data raises :class:`~market.errors.DataValidationError`
naming the rule and the offending open times.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from market.errors import DataValidationError
from market.ohlc import (
    HIGH_BELOW_LOW,
    NEGATIVE_VOLUME,
    NON_FINITE_PRICE,
    NON_FINITE_VOLUME,
    NON_POSITIVE_PRICE,
    OUTSIDE_RANGE,
    describe_row,
    ohlc_codes,
)

OHLCV_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume")
"""Required candle columns, in canonical order."""
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
FUNDING_COLUMN = "funding_rate"
"""Optional candle column: funding rate settled at the bar's open time (NaN where none)."""
GAP_COLUMN = "is_gap"
"""Column added by :func:`fill_gaps`: 1.0 on a bar filled in for a missing candle, 0.0 on a real one."""
GapPolicy = Literal["error", "mark"]
"""What loading does with missing bars: ``error`` raises, ``mark`` fills them with :func:`fill_gaps`."""
OPEN_TIME = "open_time"
FUNDING_TIME = "funding_time"
_TIME_COLUMNS: tuple[str, ...] = ("timestamp", OPEN_TIME)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _to_timedelta(interval: pd.Timedelta | str) -> pd.Timedelta:
    try:
        td = pd.Timedelta(interval)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"interval {interval!r} is not a time span (examples: '1h', '15min')") from exc
    if pd.isna(td) or td <= pd.Timedelta(0):
        raise ValueError(f"interval must be a positive time span, got {interval!r}")
    return td


def _to_utc_timestamp(value: pd.Timestamp | str, name: str) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    if pd.isna(ts):
        raise ValueError(f"{name} is not a time: {value!r}")
    # A naive time is read as UTC (all market data is UTC); an aware one is converted.
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _is_utc_datetime_index(index: pd.Index) -> bool:
    return isinstance(index, pd.DatetimeIndex) and index.tz is not None and str(index.tz) == "UTC"


def _ns(index: pd.DatetimeIndex) -> np.ndarray:
    """Times as int64 nanoseconds since the epoch, whatever the index's unit (s, ms, us, ns)."""
    return index.as_unit("ns").asi8


def _describe_index(index: pd.Index) -> str:
    if isinstance(index, pd.DatetimeIndex):
        return f"DatetimeIndex with tz={index.tz}"
    return f"{type(index).__name__} of dtype {index.dtype}"


def _source_name(path: str | PathLike[str]) -> str:
    return Path(path).name


def _read_parquet(path: Path, *, what: str) -> pd.DataFrame:
    """``pd.read_parquet(path)``; a file that is not readable parquet (truncated, empty, another format)
    fails rule ``parquet_file``. A file the user may not read still raises :class:`PermissionError`."""
    try:
        return pd.read_parquet(path)
    except PermissionError:
        raise
    except (OSError, ValueError) as exc:  # pyarrow: ArrowInvalid is a ValueError, a bad footer an OSError
        raise DataValidationError(
            "parquet_file", source=_source_name(path), what=what, detail=f"not a readable parquet file ({exc})"
        ) from exc


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_time_index(index: pd.Index, *, source: str | None, what: str) -> None:
    """Rules ``utc_datetime_index``, ``unique_<label>``, ``monotonic_<label>``."""
    label = OPEN_TIME if what == "candles" else FUNDING_TIME
    if not _is_utc_datetime_index(index):
        raise DataValidationError(
            "utc_datetime_index",
            source=source,
            what=what,
            detail=f"the index must be a tz-aware UTC DatetimeIndex of {label}s, got {_describe_index(index)}",
        )
    if index.hasnans:
        raise DataValidationError(
            "utc_datetime_index",
            [f"position {i}" for i in np.flatnonzero(index.isna())],
            source=source,
            what=what,
            detail=f"missing ({label} is NaT)",
        )
    dup = index.duplicated(keep="first")
    if dup.any():
        raise DataValidationError(
            f"unique_{label}", index[dup], source=source, what=what, detail=f"duplicate {label}s"
        )
    values = _ns(index)
    back = np.flatnonzero(values[1:] < values[:-1]) + 1
    if back.size:
        raise DataValidationError(
            f"monotonic_{label}",
            index[back],
            source=source,
            what=what,
            detail=f"{label} earlier than the previous row's",
        )


def validate_candles(df: pd.DataFrame, *, interval: pd.Timedelta | str, source: str | None = None) -> None:
    """Check that ``df`` is a canonical candle frame; raise on the first broken rule.

    Rules, checked in this order (the ``rule`` attribute of the error):

    1. ``missing_columns`` / ``column_dtype``: ``open high low close volume`` present and float64
       (``funding_rate`` too, when present);
    2. ``utc_datetime_index``: the index is a tz-aware UTC ``DatetimeIndex`` without NaT;
    3. ``unique_open_time``: no open time repeats (rows = the repeats);
    4. ``monotonic_open_time``: open times increase (rows = those earlier than their predecessor);
    5. ``regular_interval``: consecutive open times are exactly ``interval`` apart (rows = the open
       times *after which* a gap or irregular step occurs; the detail gives each step's size);
    6. ``finite_values``: no NaN/inf in the OHLCV columns;
    7. ``positive_prices``: open, high, low, close > 0;
    8. ``non_negative_volume``: volume >= 0 (zero volume is allowed: exchange halts);
    9. ``ohlc_consistency``: ``high >= low``, ``high >= max(open, close)``, ``low <= min(open, close)``;
    10. ``finite_funding``: ``funding_rate``, when present, is finite or NaN (never +-inf).

    Rules 6-9 are the OHLC row rule of :mod:`market.ohlc` (each row's first broken rule); the detail
    of the error describes the first offending row and its values.

    An empty frame fails rule ``non_empty``.

    Parameters
    ----------
    df : pandas.DataFrame
        Candles, shape (T, 5) or (T, 6).
    interval : pandas.Timedelta or str
        Expected bar interval, e.g. ``"1h"``, ``"15min"``.
    source : str, optional
        Name of the data source, used in the error message.

    Raises
    ------
    DataValidationError
        With ``rule`` set as above and ``rows`` listing the offending open times (first 10).
    ValueError
        If ``interval`` is not a positive time span.
    """
    step = _to_timedelta(interval)
    missing = [c for c in OHLCV_COLUMNS if c not in df.columns]
    if missing:
        raise DataValidationError(
            "missing_columns", source=source, detail=f"missing columns {missing}, have {list(df.columns)}"
        )
    checked = [*OHLCV_COLUMNS, *([FUNDING_COLUMN] if FUNDING_COLUMN in df.columns else [])]
    wrong = {c: str(df[c].dtype) for c in checked if df[c].dtype != np.float64}
    if wrong:
        raise DataValidationError(
            "column_dtype", source=source, detail=f"columns must be float64, got {wrong}"
        )
    if len(df) == 0:
        raise DataValidationError("non_empty", source=source, detail="no rows")
    index = df.index
    _check_time_index(index, source=source, what="candles")

    steps = np.diff(_ns(index))
    bad_step = np.flatnonzero(steps != step.value)
    if bad_step.size:
        gaps = "; ".join(
            f"{index[i]} -> {index[i + 1]} (step {pd.Timedelta(int(steps[i]))})" for i in bad_step[:10]
        )
        raise DataValidationError(
            "regular_interval",
            index[bad_step],
            source=source,
            detail=f"expected every {step}; {gaps}",
        )

    ohlcv = df[list(OHLCV_COLUMNS)].to_numpy(dtype=np.float64)
    codes = ohlc_codes(*ohlcv.T)
    if codes.any():
        not_finite = ~np.isfinite(ohlcv)
        cols = [c for c, bad in zip(OHLCV_COLUMNS, not_finite.any(axis=0), strict=True) if bad]
        for rule, group, detail in (
            ("finite_values", (NON_FINITE_PRICE, NON_FINITE_VOLUME), f"NaN or inf in columns {cols}"),
            ("positive_prices", (NON_POSITIVE_PRICE,), "a price <= 0"),
            ("non_negative_volume", (NEGATIVE_VOLUME,), "volume < 0"),
            ("ohlc_consistency", (HIGH_BELOW_LOW, OUTSIDE_RANGE),
             "need high >= low, high >= max(open, close), low <= min(open, close)"),
        ):  # fmt: skip
            rows = np.isin(codes, group)
            if rows.any():
                i = int(np.argmax(rows))
                first = describe_row(int(codes[i]), f"row {i}", *ohlcv[i])  # the rows list names its time
                raise DataValidationError(rule, index[rows], source=source, detail=f"{detail}; first: {first}")
    if FUNDING_COLUMN in df.columns:
        rows = np.isinf(df[FUNDING_COLUMN].to_numpy())
        if rows.any():
            raise DataValidationError(
                "finite_funding", index[rows], source=source, detail="funding_rate is +-inf"
            )


def check_candles(df: pd.DataFrame, *, source: str | None = None) -> None:
    """Validate candles against the interval inferred from their own spacing.

    Same rules as :func:`validate_candles`, with ``interval = interval_of(df)`` (median spacing);
    a frame of a single row has no spacing to check. Used by feature and label builders, which
    accept any bar interval but refuse gaps and bad values.

    Raises
    ------
    DataValidationError
        As :func:`validate_candles`.
    """
    if len(df) >= 2 and _is_utc_datetime_index(df.index) and not df.index.hasnans:
        interval = pd.Timedelta(int(np.median(np.diff(_ns(df.index)))))
        if interval <= pd.Timedelta(0):
            interval = pd.Timedelta(1)  # unsorted/duplicated index: the index rules will name the rows
    else:
        interval = pd.Timedelta(1)  # vacuous: no consecutive pair to compare, or the index rule fails
    validate_candles(df, interval=interval, source=source)


def validate_funding(funding: pd.Series, *, source: str | None = None) -> None:
    """Check a funding-rate series.

    Rules: ``column_dtype`` (float64), ``non_empty``, ``utc_datetime_index``, ``unique_funding_time``,
    ``monotonic_funding_time``, ``finite_values`` (no NaN or inf: every row is a settlement).

    Parameters
    ----------
    funding : pandas.Series
        Funding rates (fraction per funding interval, 0.0001 = 0.01 %), indexed by UTC funding time.
    source : str, optional
        Name of the data source, used in the error message.

    Raises
    ------
    DataValidationError
        With ``what="funding"``, the failed rule and the offending funding times.
    """
    if funding.dtype != np.float64:
        raise DataValidationError(
            "column_dtype",
            source=source,
            what="funding",
            detail=f"funding_rate must be float64, got {funding.dtype}",
        )
    if len(funding) == 0:
        raise DataValidationError("non_empty", source=source, what="funding", detail="no rows")
    _check_time_index(funding.index, source=source, what="funding")
    rows = ~np.isfinite(funding.to_numpy())
    if rows.any():
        raise DataValidationError(
            "finite_values",
            funding.index[rows],
            source=source,
            what="funding",
            detail="NaN or inf funding_rate",
        )


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _frame_with_time_index(raw: pd.DataFrame, *, source: str, what: str, index_name: str) -> pd.DataFrame:
    time_cols = [c for c in _TIME_COLUMNS if c in raw.columns]
    if len(time_cols) > 1:
        raise DataValidationError(
            "time_column", source=source, what=what, detail=f"ambiguous time columns {time_cols}"
        )
    if time_cols:
        df = raw.set_index(time_cols[0])
    elif isinstance(raw.index, pd.DatetimeIndex):
        df = raw
    else:
        raise DataValidationError(
            "time_column",
            source=source,
            what=what,
            detail=f"need a 'timestamp' column or a DatetimeIndex, got columns {list(raw.columns)}",
        )
    if isinstance(df.index, pd.DatetimeIndex) and df.index.tz is not None and df.index.unit != "ns":
        df.index = df.index.as_unit("ns")
    df.index.name = index_name
    return df


def _as_float64(df: pd.DataFrame, columns: list[str], *, source: str, what: str) -> pd.DataFrame:
    out = {}
    for col in columns:
        s = df[col]
        if not (
            pd.api.types.is_float_dtype(s) or pd.api.types.is_integer_dtype(s)
        ) or pd.api.types.is_bool_dtype(s):
            raise DataValidationError(
                "column_dtype", source=source, what=what, detail=f"column {col!r} is {s.dtype}, not numeric"
            )
        out[col] = s.astype(np.float64)
    return pd.DataFrame(out, index=df.index)


def load_candles(
    path: str | PathLike[str],
    *,
    interval: pd.Timedelta | str | None = None,
    gap_policy: GapPolicy = "error",
) -> pd.DataFrame:
    """Read a parquet candle file and return the validated canonical frame.

    The file has the open time either as a column ``timestamp`` (or ``open_time``) or as its index,
    which must be tz-aware UTC, and the columns ``open high low close volume`` (numeric; integer
    columns are converted to float64), optionally ``funding_rate``.

    Parameters
    ----------
    path : str or path-like
        Parquet file.
    interval : pandas.Timedelta or str, optional
        Expected bar interval (``"1h"``); if omitted, the median spacing of the open times.
    gap_policy : {"error", "mark"}, default "error"
        ``"error"``: a missing bar fails rule ``regular_interval``. ``"mark"``: missing bars (steps
        that are whole multiples of ``interval``) are filled by :func:`fill_gaps` and the frame
        gets the float64 column ``is_gap`` (always, 0.0 everywhere when nothing was missing); the
        number of filled rows is ``int(df["is_gap"].sum())``. Irregular steps (not a multiple of
        the interval) fail in both modes: they are not gaps but misaligned open times.

    Returns
    -------
    pandas.DataFrame
        Shape (T, 5) or (T, 6), plus ``is_gap`` with ``gap_policy="mark"``; index ``open_time``
        (UTC, ns); float64 columns in canonical order.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    DataValidationError
        Rule ``parquet_file`` (not a readable parquet file), ``time_column`` (no open time found), ``unexpected_columns`` (columns other than OHLCV
        and ``funding_rate``: they are never dropped silently), ``column_dtype``, ``too_few_rows``
        (interval inference needs two rows), or any rule of :func:`validate_candles`
        (``regular_interval`` names the rows after which a bar is missing, unless
        ``gap_policy="mark"``).
    ValueError
        If ``gap_policy`` is neither ``"error"`` nor ``"mark"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"candle file not found: {path}")
    source = _source_name(path)
    raw = _read_parquet(path, what="candles")
    df = _frame_with_time_index(raw, source=source, what="candles", index_name=OPEN_TIME)
    allowed = {*OHLCV_COLUMNS, FUNDING_COLUMN}
    extra = [c for c in df.columns if c not in allowed]
    if extra:
        raise DataValidationError(
            "unexpected_columns",
            source=source,
            detail=f"columns {extra} are not candle columns (allowed: {sorted(allowed)})",
        )
    missing = [c for c in OHLCV_COLUMNS if c not in df.columns]
    if missing:
        raise DataValidationError("missing_columns", source=source, detail=f"missing columns {missing}")
    columns = [*OHLCV_COLUMNS, *([FUNDING_COLUMN] if FUNDING_COLUMN in df.columns else [])]
    df = _as_float64(df, columns, source=source, what="candles")
    if interval is None:
        _check_time_index(df.index, source=source, what="candles")
        if len(df) < 2:
            raise DataValidationError(
                "too_few_rows",
                source=source,
                detail="need >= 2 rows to infer the bar interval; pass interval=",
            )
        interval = interval_of(df)
    if gap_policy == "mark":
        _check_time_index(df.index, source=source, what="candles")
        df, _ = fill_gaps(df, interval=interval, source=source)
    elif gap_policy != "error":
        raise ValueError(f"gap_policy must be 'error' or 'mark', got {gap_policy!r}")
    validate_candles(df, interval=interval, source=source)
    return df


def fill_gaps(
    candles: pd.DataFrame, *, interval: pd.Timedelta | str | None = None, source: str | None = None
) -> tuple[pd.DataFrame, int]:
    """Insert the missing bars of a candle frame and mark them (the ``mark`` gap policy).

    A missing bar gets ``open = high = low = close =`` the previous real bar's close and
    ``volume = 0`` (nothing traded that we know of); ``funding_rate``, when present, stays NaN
    (no settlement is invented). Column ``is_gap`` (float64) is 1.0 on filled bars and 0.0 on real
    ones, so a model can see them; it is added even when nothing is missing. Real rows are never
    changed or dropped. Nothing looks ahead: a filled bar only uses the close before it.

    Parameters
    ----------
    candles : pandas.DataFrame
        Candles, shape (T, 5) or (T, 6): UTC ``open_time`` index, unique and increasing.
    interval : pandas.Timedelta or str, optional
        Bar interval; if omitted, the median spacing of the open times (:func:`interval_of`).
    source : str, optional
        Name of the data source, used in error messages.

    Returns
    -------
    (pandas.DataFrame, int)
        The frame on the regular grid from the first to the last open time, shape (T + n, C + 1)
        with ``is_gap`` last, and ``n``, the number of bars filled.

    Raises
    ------
    DataValidationError
        Rule ``regular_interval`` if a step is not a whole multiple of ``interval`` (misaligned
        open times are not gaps), or any index rule (UTC, unique, increasing).
    ValueError
        If ``interval`` is not a positive time span.
    """
    _check_time_index(candles.index, source=source, what="candles")
    step = _to_timedelta(interval) if interval is not None else interval_of(candles)
    out = candles.copy()
    if len(out) < 2:
        out[GAP_COLUMN] = np.zeros(len(out), dtype=np.float64)
        return out, 0
    times = _ns(out.index)
    steps = np.diff(times)
    bad = np.flatnonzero(steps % step.value != 0)
    if bad.size:
        listed = "; ".join(
            f"{out.index[i]} -> {out.index[i + 1]} (step {pd.Timedelta(int(steps[i]))})" for i in bad[:10]
        )
        raise DataValidationError(
            "regular_interval",
            out.index[bad],
            source=source,
            detail=f"steps that are not a multiple of {step} cannot be filled as gaps; {listed}",
        )
    grid = pd.date_range(out.index[0], out.index[-1], freq=step, name=out.index.name).as_unit(out.index.unit)
    n_filled = len(grid) - len(out)
    if n_filled == 0:
        out[GAP_COLUMN] = np.zeros(len(out), dtype=np.float64)
        return out, 0
    full = out.reindex(grid)
    missing = ~grid.isin(out.index)
    prev_close = full["close"].ffill()
    for col in PRICE_COLUMNS:
        full[col] = np.where(missing, prev_close, full[col]).astype(np.float64)
    full["volume"] = np.where(missing, 0.0, full["volume"]).astype(np.float64)
    full[GAP_COLUMN] = missing.astype(np.float64)
    return full, int(n_filled)


def load_funding(path: str | PathLike[str]) -> pd.Series:
    """Read a parquet funding-rate file and return the validated series.

    The file has the funding time as a column ``timestamp`` (or as its index, tz-aware UTC) and one
    column ``funding_rate``.

    Returns
    -------
    pandas.Series
        float64 ``funding_rate`` (fraction per funding interval), index ``funding_time`` (UTC, ns).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    DataValidationError
        Rule ``parquet_file``, ``time_column``, ``missing_columns``, ``unexpected_columns``, ``column_dtype`` or any rule
        of :func:`validate_funding`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"funding file not found: {path}")
    source = _source_name(path)
    raw = _read_parquet(path, what="funding")
    df = _frame_with_time_index(raw, source=source, what="funding", index_name=FUNDING_TIME)
    if FUNDING_COLUMN not in df.columns:
        raise DataValidationError(
            "missing_columns", source=source, what="funding", detail=f"no column {FUNDING_COLUMN!r}"
        )
    extra = [c for c in df.columns if c != FUNDING_COLUMN]
    if extra:
        raise DataValidationError(
            "unexpected_columns",
            source=source,
            what="funding",
            detail=f"columns {extra} are not funding columns",
        )
    series = _as_float64(df, [FUNDING_COLUMN], source=source, what="funding")[FUNDING_COLUMN]
    validate_funding(series, source=source)
    return series


# --------------------------------------------------------------------------------------------
# transformations
# --------------------------------------------------------------------------------------------


def join_funding(candles: pd.DataFrame, funding: pd.Series) -> pd.DataFrame:
    """Attach funding rates to candles by exact open-time match.

    Binance USDT-M settles funding at fixed times (00:00, 08:00, 16:00 UTC for most symbols); the
    rate settled at time T is put on the bar whose open time is T (Binance USDⓈ-M funding rules,
    see ``reference/formulas.md``). Bars with no settlement at their open time get NaN.

    Funding rows *outside* the candle span (before the first or after the last open time) are
    ignored: they concern bars that are not in the frame. A funding time *inside* the span that
    matches no open time is an error (the bar interval does not line up with the funding schedule,
    or the candles lack that bar).

    Parameters
    ----------
    candles : pandas.DataFrame
        Canonical candles, shape (T, 5) or (T, 6); an existing ``funding_rate`` column is replaced.
    funding : pandas.Series
        float64 funding rates indexed by UTC funding time (as from :func:`load_funding`).

    Returns
    -------
    pandas.DataFrame
        A copy of ``candles`` with float64 column ``funding_rate``, shape (T, 6).

    Raises
    ------
    DataValidationError
        Rule ``funding_alignment`` naming the unmatched funding times, or any rule of
        :func:`validate_funding`.
    """
    validate_funding(funding)
    if not _is_utc_datetime_index(candles.index):
        raise DataValidationError(
            "utc_datetime_index", detail=f"candles index is {_describe_index(candles.index)}"
        )
    out = candles.copy()
    if len(out) == 0:
        out[FUNDING_COLUMN] = np.array([], dtype=np.float64)
        return out
    first, last = out.index[0], out.index[-1]
    inside = funding[(funding.index >= first) & (funding.index <= last)]
    unmatched = ~inside.index.isin(out.index)
    if unmatched.any():
        raise DataValidationError(
            "funding_alignment",
            inside.index[unmatched],
            what="funding",
            detail="funding time inside the candle span matches no bar open time",
        )
    out[FUNDING_COLUMN] = inside.reindex(out.index).to_numpy(dtype=np.float64)
    return out


def slice_period(df: pd.DataFrame, start: pd.Timestamp | str, end: pd.Timestamp | str) -> pd.DataFrame:
    """Rows with ``start <= open_time < end`` (inclusive start, exclusive end).

    Naive ``start``/``end`` are read as UTC.

    Returns
    -------
    pandas.DataFrame
        A copy of the selected rows, same columns.

    Raises
    ------
    ValueError
        If ``start >= end``.
    DataValidationError
        Rule ``empty_period`` if no bar opens in ``[start, end)``.
    """
    t0 = _to_utc_timestamp(start, "start")
    t1 = _to_utc_timestamp(end, "end")
    if t0 >= t1:
        raise ValueError(f"start {t0} must be before end {t1}")
    if not _is_utc_datetime_index(df.index):
        raise DataValidationError("utc_datetime_index", detail=f"index is {_describe_index(df.index)}")
    mask = (df.index >= t0) & (df.index < t1)
    if not mask.any():
        span = f"data spans {df.index[0]} .. {df.index[-1]}" if len(df) else "data is empty"
        raise DataValidationError("empty_period", detail=f"no bar opens in [{t0}, {t1}); {span}")
    return df.loc[mask].copy()


def interval_of(df: pd.DataFrame | pd.Series) -> pd.Timedelta:
    """Bar interval: the median spacing of consecutive open times.

    Raises
    ------
    DataValidationError
        Rule ``too_few_rows`` for fewer than 2 rows, ``utc_datetime_index`` for a non-UTC index,
        ``regular_interval`` if the median spacing is not positive (unsorted index).
    """
    if not _is_utc_datetime_index(df.index):
        raise DataValidationError("utc_datetime_index", detail=f"index is {_describe_index(df.index)}")
    if len(df) < 2:
        raise DataValidationError(
            "too_few_rows", detail=f"need >= 2 rows to infer the interval, got {len(df)}"
        )
    td = pd.Timedelta(int(np.median(np.diff(_ns(df.index)))))
    if td <= pd.Timedelta(0):
        raise DataValidationError("regular_interval", detail=f"median spacing {td} is not positive")
    return td
