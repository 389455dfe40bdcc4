"""Base class of every typed configuration, and the typed values configs share.

- :class:`StrictConfig`: frozen, unknown keys rejected, and :meth:`StrictConfig.updated`, the one way to
  derive a changed copy (it validates again, unlike pydantic's ``model_copy(update=...)``, which skips
  field constraints, model validators and the unknown-key check).
- :data:`UtcTime`: a bar time in UTC (``pd.Timestamp``, tz UTC); read from a date or date-time string
  (naive means UTC; an offset is converted), written back as ISO 8601.
- :data:`Timeframe`: the bar lengths the product trades.
- :func:`check_periods`: the one rule for period boundaries (strictly increasing, none after the data
  the project may use).
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Annotated, Any, Literal, Self

import pandas as pd
from pydantic import BaseModel, ConfigDict, PlainSerializer, PlainValidator, WithJsonSchema

DATA_END = pd.Timestamp("2025-07-01", tz="UTC")
"""End (exclusive) of the candles this project may train and choose on; later data is withheld for
evaluation (``../shared/data/README.md``), so no configured period may reach past it."""

Timeframe = Literal["1m", "5m", "15m", "30m", "1h", "4h"]
"""Bar length (ccxt / Binance kline interval names)."""


def to_utc(value: object) -> pd.Timestamp:
    """Parse a date or date-time into a UTC ``pd.Timestamp``.

    Parameters
    ----------
    value : str | datetime.date | datetime.datetime | pd.Timestamp
        ``"2024-01-01"``, ``"2024-01-01 06:00"``, ``"2024-01-01T06:00:00+02:00"``, ... A value without a
        time zone is taken as UTC; one with a time zone is converted to UTC.

    Raises
    ------
    ValueError
        ``value`` is not a date/time (a number, ``None``, an unparsable string, NaT); the message shows it.
    """
    if not isinstance(value, str | dt.date | pd.Timestamp) or isinstance(value, bool):
        # ValueError, not TypeError: pydantic turns only ValueError into a ValidationError naming the field
        raise ValueError(f"expected a date or date-time (e.g. '2024-01-01'), got {value!r}")
    try:
        t = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a date or date-time: {value!r} ({exc})") from None
    if pd.isna(t):
        raise ValueError(f"not a date or date-time: {value!r}")
    return t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")


UtcTime = Annotated[
    pd.Timestamp,
    PlainValidator(to_utc),
    PlainSerializer(lambda t: t.isoformat(), return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""A bar open time in UTC (``pd.Timestamp`` with tz UTC); configs accept any form :func:`to_utc` reads."""


def check_periods(boundaries: dict[str, pd.Timestamp | None]) -> None:
    """The rule for period boundaries, in their given order: strictly increasing, none after :data:`DATA_END`.

    ``None`` entries (optional boundaries) are skipped.

    Raises
    ------
    ValueError
        Two consecutive boundaries are not strictly increasing (both are named), or the last one is after
        :data:`DATA_END`.
    """
    named = [(k, v) for k, v in boundaries.items() if v is not None]
    for (ka, a), (kb, b) in itertools.pairwise(named):
        if b <= a:
            raise ValueError(f"periods must be strictly increasing: {kb}={b} is not after {ka}={a}")
    if named and named[-1][1] > DATA_END:
        k, v = named[-1]
        raise ValueError(f"{k}={v} is after {DATA_END.date()}: later data is withheld for evaluation")


class StrictConfig(BaseModel):
    """Frozen pydantic model that rejects unknown keys (a typo is an error, never a silent default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def updated(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied, validated again as a whole (field constraints, validators, keys).

        Nested sections are given as config objects (``cfg.updated(env=cfg.env.updated(...))``) or as
        mappings.

        Raises
        ------
        pydantic.ValidationError
            A changed value breaks a constraint or a model validator, or a key is not a field.
        """
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**fields, **changes})
