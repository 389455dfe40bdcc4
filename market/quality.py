"""Data-quality report of a candle or funding file (what ``ats data check`` prints).

Unlike :func:`market.candles.validate_candles`, which stops at the first broken rule, the report
counts every problem of a file and never raises on bad data. Its hard rules are the ones loading for
training enforces, so a file passes the check exactly when :func:`market.candles.load_candles`
(with the same gap policy) accepts it:

=====================  ======  ==========================================================================
rule                   kind    counted rows
=====================  ======  ==========================================================================
``schema``             hard    (whole file) missing/unexpected columns, non-numeric columns, no UTC time
``too_few_rows``       hard    (whole file) fewer than 2 rows: no bar interval to check
``missing_time``       hard    rows whose time is missing (NaT)
``duplicates``         hard    rows repeating an earlier time
``out_of_order``       hard    rows whose time is earlier than the previous row's
``misaligned``         hard    steps that are not a whole multiple of the bar interval
``gaps``               hard*   places where bars are missing (*soft with ``gap_policy="mark"``)
``non_finite``         hard    rows with NaN or inf in open/high/low/close/volume (funding: in the rate)
``non_positive_price`` hard    other rows with a price <= 0
``negative_volume``    hard    other rows with volume < 0
``ohlc``               hard    other rows with high < low, high < max(open, close) or low > min(open, close)
``infinite_funding``   hard    candle rows whose optional ``funding_rate`` is +-inf
``zero_volume``        soft    rows with volume == 0 (exchange halts; reported with the longest run)
=====================  ======  ==========================================================================

The four candle-row rules are the OHLC row rule of :mod:`market.ohlc`: each bad row is counted once, under
the first rule it breaks (in the order above), so their counts add up to the bad rows.

For funding files (``timestamp``, ``funding_rate``): ``schema``, ``missing_time``, ``duplicates``,
``out_of_order`` and ``non_finite`` are hard; ``gaps`` (settlements further apart than the usual
spacing) is soft, as exchanges change funding intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from market.candles import FUNDING_COLUMN, OHLCV_COLUMNS, GapPolicy
from market.ohlc import (
    HIGH_BELOW_LOW,
    NEGATIVE_VOLUME,
    NON_FINITE_PRICE,
    NON_FINITE_VOLUME,
    NON_POSITIVE_PRICE,
    OUTSIDE_RANGE,
    ohlc_codes,
)

MAX_EXAMPLES = 5
"""How many example times a finding keeps."""

_TIME_COLUMNS = ("timestamp", "open_time", "funding_time")


@dataclass(frozen=True)
class Finding:
    """One rule's result: how many rows (or places) break it, and the first few times."""

    rule: str
    count: int
    hard: bool
    examples: tuple[str, ...] = ()
    detail: str = ""

    @property
    def failed(self) -> bool:
        """True when a hard rule is broken."""
        return self.hard and self.count > 0


@dataclass(frozen=True)
class Gap:
    """Bars missing between two consecutive rows (``missing_bars`` = step / interval - 1)."""

    after: pd.Timestamp
    before: pd.Timestamp
    missing_bars: int


@dataclass(frozen=True)
class QualityReport:
    """Quality of one file. Times are UTC; ``interval`` is the bar (or funding) spacing used."""

    source: str
    kind: Literal["candles", "funding"]
    rows: int
    first: pd.Timestamp | None
    last: pd.Timestamp | None
    interval: pd.Timedelta | None
    gap_count: int
    missing_bars: int
    largest_gap: Gap | None
    zero_volume_runs: int
    longest_zero_volume_run: int
    findings: tuple[Finding, ...]

    @property
    def failures(self) -> tuple[Finding, ...]:
        """The broken hard rules."""
        return tuple(f for f in self.findings if f.failed)

    @property
    def ok(self) -> bool:
        """True when no hard rule is broken."""
        return not self.failures

    def count(self, rule: str) -> int:
        """Count of a rule (0 when the rule does not apply to this kind of file)."""
        return next((f.count for f in self.findings if f.rule == rule), 0)


def _examples(times: pd.DatetimeIndex, mask: np.ndarray) -> tuple[str, ...]:
    return tuple(str(t) for t in times[np.flatnonzero(mask)[:MAX_EXAMPLES]])


def _schema_failure(source: str, kind: Literal["candles", "funding"], detail: str, rows: int) -> QualityReport:
    return QualityReport(
        source=source, kind=kind, rows=rows, first=None, last=None, interval=None, gap_count=0, missing_bars=0,
        largest_gap=None, zero_volume_runs=0, longest_zero_volume_run=0,
        findings=(Finding("schema", 1, True, (), detail),),
    )


def _times(raw: pd.DataFrame) -> tuple[pd.DatetimeIndex | None, pd.DataFrame, str]:
    """Split a raw frame into its time index and value columns; a problem is described in the string."""
    cols = [c for c in _TIME_COLUMNS if c in raw.columns]
    if len(cols) > 1:
        return None, raw, f"ambiguous time columns {cols}"
    if cols:
        values = raw.drop(columns=cols)
        times = raw[cols[0]]
        if not isinstance(times.dtype, pd.DatetimeTZDtype):
            return None, values, f"time column {cols[0]!r} is {times.dtype}, not tz-aware UTC"
        index = pd.DatetimeIndex(times)
    elif isinstance(raw.index, pd.DatetimeIndex):
        values, index = raw, raw.index
        if index.tz is None:
            return None, values, "time index is not tz-aware UTC"
    else:
        return None, raw, f"no time column ({'/'.join(_TIME_COLUMNS)}) and no DatetimeIndex"
    if str(index.tz) != "UTC":
        index = index.tz_convert("UTC")
    return index.as_unit("ns"), values, ""


def _order_findings(index: pd.DatetimeIndex) -> tuple[list[Finding], np.ndarray]:
    """``missing_time``, ``duplicates``, ``out_of_order``; returns them and the sorted unique times (ns)."""
    nat = np.asarray(index.isna())
    valid = index[~nat]
    ns = valid.asi8
    dup = np.asarray(valid.duplicated(keep="first"))
    back = np.zeros(len(ns), dtype=bool)
    back[1:] = ns[1:] < ns[:-1]
    findings = [
        Finding("missing_time", int(nat.sum()), True, tuple(f"position {i}" for i in np.flatnonzero(nat)[:MAX_EXAMPLES])),
        Finding("duplicates", int(dup.sum()), True, _examples(valid, dup)),
        Finding("out_of_order", int(back.sum()), True, _examples(valid, back)),
    ]
    return findings, np.unique(ns)


def _spacing(sorted_ns: np.ndarray, interval: pd.Timedelta | None) -> pd.Timedelta | None:
    if interval is not None:
        return pd.Timedelta(interval)
    steps = np.diff(sorted_ns)
    steps = steps[steps > 0]
    return pd.Timedelta(int(np.median(steps))) if steps.size else None


def _gap_findings(
    sorted_ns: np.ndarray, step: pd.Timedelta, *, hard_gaps: bool
) -> tuple[list[Finding], int, int, Gap | None]:
    steps = np.diff(sorted_ns)
    misaligned = steps % step.value != 0
    is_gap = (steps > step.value) & ~misaligned
    missing = np.where(is_gap, steps // step.value - 1, 0)
    largest = None
    if is_gap.any():
        i = int(np.argmax(missing))
        largest = Gap(pd.Timestamp(int(sorted_ns[i]), tz="UTC"), pd.Timestamp(int(sorted_ns[i + 1]), tz="UTC"), int(missing[i]))
    after = sorted_ns[:-1]
    findings = [
        Finding(
            "misaligned", int(misaligned.sum()), True,
            tuple(str(pd.Timestamp(int(t), tz="UTC")) for t in after[misaligned][:MAX_EXAMPLES]),
            f"steps not a multiple of {step}",
        ),
        Finding(
            "gaps", int(is_gap.sum()), hard_gaps,
            tuple(str(pd.Timestamp(int(t), tz="UTC")) for t in after[is_gap][:MAX_EXAMPLES]),
            f"{int(missing.sum())} missing bars",
        ),
    ]
    return findings, int(is_gap.sum()), int(missing.sum()), largest


def _runs(mask: np.ndarray) -> tuple[int, int]:
    """Number of runs of True and the longest run length."""
    if not mask.any():
        return 0, 0
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.diff(padded)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return int(starts.size), int((ends - starts).max())


def assess_candles(
    raw: pd.DataFrame,
    *,
    source: str = "candles",
    interval: pd.Timedelta | str | None = None,
    gap_policy: GapPolicy = "error",
) -> QualityReport:
    """Count every candle-quality problem of a frame as read from a file (see the module table).

    Parameters
    ----------
    raw : pandas.DataFrame
        The file's frame: a ``timestamp`` (or ``open_time``) column of tz-aware times, or a
        ``DatetimeIndex``; columns ``open high low close volume`` (numeric), optionally
        ``funding_rate``. Rows in any order.
    source : str
        Name shown in the report.
    interval : pandas.Timedelta or str, optional
        Bar interval; default the median positive spacing of the sorted unique times (what
        :func:`market.candles.load_candles` infers).
    gap_policy : {"error", "mark"}
        ``mark`` makes gaps a soft rule (they would be filled and marked on load).

    Returns
    -------
    QualityReport
    """
    index, values, problem = _times(raw)
    if index is None:
        return _schema_failure(source, "candles", problem, len(raw))
    missing = [c for c in OHLCV_COLUMNS if c not in values.columns]
    extra = [c for c in values.columns if c not in (*OHLCV_COLUMNS, FUNDING_COLUMN)]
    non_numeric = [
        c for c in values.columns
        if not (pd.api.types.is_float_dtype(values[c]) or pd.api.types.is_integer_dtype(values[c]))
        or pd.api.types.is_bool_dtype(values[c])
    ]
    if missing or extra or non_numeric:
        detail = "; ".join(
            s for s in (
                f"missing columns {missing}" if missing else "",
                f"unexpected columns {extra}" if extra else "",
                f"non-numeric columns {non_numeric}" if non_numeric else "",
            ) if s
        )
        return _schema_failure(source, "candles", detail, len(raw))

    order, sorted_ns = _order_findings(index)
    findings = list(order)
    step = pd.Timedelta(interval) if interval is not None else None
    gap_count = missing_bars = 0
    largest = None
    if len(index) < 2 and interval is None:
        findings.append(Finding("too_few_rows", 1, True, (), f"{len(index)} rows: need >= 2 to check spacing"))
    step = _spacing(sorted_ns, step)
    if step is not None and step > pd.Timedelta(0) and sorted_ns.size >= 2:
        found, gap_count, missing_bars, largest = _gap_findings(sorted_ns, step, hard_gaps=gap_policy != "mark")
        findings.extend(found)

    ohlcv = values[list(OHLCV_COLUMNS)].to_numpy(dtype=np.float64)
    codes = ohlc_codes(*ohlcv.T)
    non_finite = np.isin(codes, (NON_FINITE_PRICE, NON_FINITE_VOLUME))
    non_positive = codes == NON_POSITIVE_PRICE
    negative_volume = codes == NEGATIVE_VOLUME
    ohlc = np.isin(codes, (HIGH_BELOW_LOW, OUTSIDE_RANGE))
    zero_volume = ohlcv[:, 4] == 0.0
    findings += [
        Finding("non_finite", int(non_finite.sum()), True, _examples(index, non_finite)),
        Finding("non_positive_price", int(non_positive.sum()), True, _examples(index, non_positive)),
        Finding("negative_volume", int(negative_volume.sum()), True, _examples(index, negative_volume)),
        Finding("ohlc", int(ohlc.sum()), True, _examples(index, ohlc)),
    ]
    if FUNDING_COLUMN in values.columns:
        inf = np.isinf(values[FUNDING_COLUMN].to_numpy(dtype=np.float64))
        findings.append(Finding("infinite_funding", int(inf.sum()), True, _examples(index, inf)))
    order_idx = np.argsort(index.asi8, kind="stable")
    runs, longest = _runs(zero_volume[order_idx])
    findings.append(
        Finding("zero_volume", int(zero_volume.sum()), False, _examples(index, zero_volume),
                f"{runs} runs, longest {longest} bars")
    )
    valid = index[~np.asarray(index.isna())]
    return QualityReport(
        source=source, kind="candles", rows=len(raw),
        first=valid.min() if len(valid) else None, last=valid.max() if len(valid) else None,
        interval=step, gap_count=gap_count, missing_bars=missing_bars, largest_gap=largest,
        zero_volume_runs=runs, longest_zero_volume_run=longest, findings=tuple(findings),
    )


def assess_funding(raw: pd.DataFrame, *, source: str = "funding") -> QualityReport:
    """Count the problems of a funding-rate frame (``timestamp`` + ``funding_rate``; see the module docstring)."""
    index, values, problem = _times(raw)
    if index is None:
        return _schema_failure(source, "funding", problem, len(raw))
    if list(values.columns) != [FUNDING_COLUMN] or not pd.api.types.is_numeric_dtype(values[FUNDING_COLUMN]):
        return _schema_failure(
            source, "funding", f"expected one numeric column {FUNDING_COLUMN!r}, got {dict(values.dtypes.astype(str))}",
            len(raw),
        )
    order, sorted_ns = _order_findings(index)
    findings = list(order)
    rate = values[FUNDING_COLUMN].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(rate)
    findings.append(Finding("non_finite", int(bad.sum()), True, _examples(index, bad)))
    step = _spacing(sorted_ns, None)
    gap_count = missing = 0
    largest = None
    if step is not None and sorted_ns.size >= 2:
        steps = np.diff(sorted_ns)
        is_gap = steps > step.value
        gap_count = int(is_gap.sum())
        missing = int(np.where(is_gap, steps // step.value - 1, 0).sum())
        if gap_count:
            i = int(np.argmax(steps))
            largest = Gap(pd.Timestamp(int(sorted_ns[i]), tz="UTC"), pd.Timestamp(int(sorted_ns[i + 1]), tz="UTC"),
                          int(steps[i] // step.value - 1))
        findings.append(Finding("gaps", gap_count, False,
                                tuple(str(pd.Timestamp(int(t), tz="UTC")) for t in sorted_ns[:-1][is_gap][:MAX_EXAMPLES]),
                                f"settlements further apart than {step}"))
    valid = index[~np.asarray(index.isna())]
    return QualityReport(
        source=source, kind="funding", rows=len(raw),
        first=valid.min() if len(valid) else None, last=valid.max() if len(valid) else None,
        interval=step, gap_count=gap_count, missing_bars=missing, largest_gap=largest,
        zero_volume_runs=0, longest_zero_volume_run=0, findings=tuple(findings),
    )


def assess_file(
    path: str | PathLike[str], *, interval: pd.Timedelta | str | None = None, gap_policy: GapPolicy = "error"
) -> QualityReport:
    """Read a parquet file and assess it as funding (a ``funding_rate`` column and no OHLC) or candles.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        raw = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is a schema failure to report, not a crash
        return _schema_failure(str(path), "candles", f"not a readable parquet file: {exc}", 0)
    is_funding = FUNDING_COLUMN in raw.columns and not any(c in raw.columns for c in OHLCV_COLUMNS)
    if is_funding:
        return assess_funding(raw, source=str(path))
    return assess_candles(raw, source=str(path), interval=interval, gap_policy=gap_policy)


def data_files(paths: list[str | PathLike[str]]) -> list[Path]:
    """Expand files and folders (recursively, ``*.parquet``, sorted) into a list of files.

    Raises
    ------
    FileNotFoundError
        A path does not exist, or a folder holds no parquet file.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.parquet") if not q.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"no .parquet file under {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return out
