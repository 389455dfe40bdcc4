"""Data-quality errors of the ``market`` package.

A :class:`DataValidationError` means the *data* is wrong (not the code, not the network): the caller
must fix or replace the data; retrying does not help. It names the rule that failed and the open
times of the offending rows, so the bad rows can be found in the source file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MAX_LISTED_ROWS = 10
"""How many offending row labels an error keeps and prints (the total count is always given)."""


class DataValidationError(ValueError):
    """Candles, funding rates or features broke a validation rule.

    Parameters
    ----------
    rule : str
        Name of the rule that failed, e.g. ``"ohlc_consistency"``, ``"regular_interval"``.
    rows : iterable, optional
        Labels (open times, funding times) of the offending rows; only the first
        :data:`MAX_LISTED_ROWS` are kept in :attr:`rows`, the total is :attr:`n_rows`.
    source : str, optional
        Where the data came from (a file name), shown in the message.
    detail : str, optional
        Extra explanation (the columns involved, gap sizes, ...), appended to the message.
    what : str, default "candles"
        The kind of data, first word of the message (``"candles"``, ``"funding"``, ``"features"``).

    Attributes
    ----------
    rule : str
    rows : list
        First offending row labels (at most :data:`MAX_LISTED_ROWS`).
    n_rows : int
        Total number of offending rows (0 for rules about the whole frame, e.g. missing columns).
    source : str | None
    detail : str

    Examples
    --------
    >>> str(DataValidationError("ohlc_consistency", ["2021-03-04 05:00:00+00:00"], source="x.parquet"))
    "candles x.parquet: rule 'ohlc_consistency' failed at 1 rows: 2021-03-04 05:00:00+00:00"
    """

    def __init__(
        self,
        rule: str,
        rows: Iterable[Any] | None = None,
        *,
        source: str | None = None,
        detail: str = "",
        what: str = "candles",
    ) -> None:
        all_rows = list(rows) if rows is not None else []
        self.rule = rule
        self.rows = all_rows[:MAX_LISTED_ROWS]
        self.n_rows = len(all_rows)
        self.source = source
        self.detail = detail
        self.what = what
        super().__init__(self._message())

    def _message(self) -> str:
        head = f"{self.what} {self.source}" if self.source else self.what
        text = f"{head}: rule '{self.rule}' failed"
        if self.n_rows:
            listed = ", ".join(str(r) for r in self.rows)
            more = ", ..." if self.n_rows > len(self.rows) else ""
            text += f" at {self.n_rows} rows: {listed}{more}"
        if self.detail:
            text += f" ({self.detail})" if self.n_rows else f": {self.detail}"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the error picklable (worker processes re-raise it in the parent).
        return (
            _rebuild,
            (self.rule, self.rows, self.n_rows, self.source, self.detail, self.what),
        )


def _rebuild(
    rule: str, rows: list[Any], n_rows: int, source: str | None, detail: str, what: str
) -> DataValidationError:
    err = DataValidationError(rule, rows, source=source, detail=detail, what=what)
    err.n_rows = n_rows
    err.args = (err._message(),)
    return err
