"""The one JSON codec of the project: every file or column of results or state is written through it.

How numbers are written
-----------------------
* finite floats are JSON numbers (numpy scalars become Python ones, shortest round-trip repr);
* ``nan`` is the string ``"NaN"``, ``+inf`` the string ``"Infinity"``, ``-inf`` the string ``"-Infinity"``;
* ``None`` is JSON ``null``.

Why: JSON has no NaN or infinity, and the output must be strict JSON (``allow_nan=False``) so that
any reader (jq, JavaScript, pandas, a database's JSON type) can parse it. ``nan`` is not written as
``null`` because that is lossy: a profit factor of 0/0 (``nan``) and a value that is absent
(``None``) would read back the same, and state written by the serving loop (raw actions, risk
tracker) must round-trip exactly, so sim and live read back what they wrote. The three strings are
the tokens Python's ``json`` writes when it is allowed to break the standard, and exactly the
spellings that Python's ``float()`` and JavaScript's ``Number()`` both parse.

Reading: :func:`loads` turns the three strings back into floats wherever they appear, so
``loads(dumps(x)) == x`` for NaN (as NaN), +-inf and None. They are therefore reserved: a *text*
value spelled exactly ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` reads back as a float. Files
written before this codec existed stay readable: reports wrote ``nan`` as ``null`` and infinities as
``"inf"``/``"-inf"``; :func:`loads` accepts ``"inf"``/``"-inf"`` too, and :func:`to_float` reads
``null`` in a number slot as ``nan``.

Other values: bools, ints, strings pass through; mappings become objects (keys must be strings,
or with ``strict=False`` are converted with ``str``); tuples, lists and numpy arrays become arrays;
tz-aware times become UTC ISO-8601 text, naive ones ISO-8601. With ``strict=True`` any other type is
an error; with ``strict=False`` it is written as ``str(value)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

import numpy as np
import pandas as pd

NAN_TEXT = "NaN"
POS_INF_TEXT = "Infinity"
NEG_INF_TEXT = "-Infinity"

_TEXT_TO_FLOAT = {NAN_TEXT: math.nan, POS_INF_TEXT: math.inf, NEG_INF_TEXT: -math.inf,
                  "inf": math.inf, "-inf": -math.inf}  # fmt: skip
"""Strings read back as floats: the codec's three, plus the legacy report spellings ``"inf"``/``"-inf"``."""


def encode_float(x: float | np.floating) -> float | str:
    """One float as the codec writes it: itself if finite, else ``"NaN"``/``"Infinity"``/``"-Infinity"``."""
    x = float(x)
    if math.isnan(x):
        return NAN_TEXT
    if math.isinf(x):
        return POS_INF_TEXT if x > 0 else NEG_INF_TEXT
    return x


def to_jsonable(value: Any, *, strict: bool = True) -> Any:
    """A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` accepts (see the module docstring).

    Raises
    ------
    TypeError
        With ``strict=True``: a mapping key is not a string or a value has an unsupported type.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return encode_float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                if strict:
                    raise TypeError(f"JSON object keys must be strings, got {k!r}")
                k = str(k)
            out[k] = to_jsonable(v, strict=strict)
        return out
    if isinstance(value, np.ndarray):
        return [to_jsonable(v, strict=strict) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, strict=strict) for v in value]
    if isinstance(value, (pd.Timestamp, datetime)):
        if value.tzinfo is not None:
            return pd.Timestamp(value).tz_convert("UTC").isoformat()
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if strict:
        raise TypeError(f"unsupported type {type(value).__name__} for JSON: {value!r}")
    return str(value)


def dumps(value: Any, *, strict: bool = True, **kwargs: Any) -> str:
    """Strict JSON text of ``value`` (:func:`to_jsonable`, then ``json.dumps(..., allow_nan=False)``).

    ``kwargs`` go to :func:`json.dumps` (``indent``, ``sort_keys``, ``separators``).
    """
    return json.dumps(to_jsonable(value, strict=strict), allow_nan=False, **kwargs)


def from_jsonable(value: Any) -> Any:
    """Inverse of :func:`to_jsonable` for numbers: ``"NaN"``/``"Infinity"``/``"-Infinity"`` (and legacy
    ``"inf"``/``"-inf"``) strings become floats, recursively through lists and objects."""
    if isinstance(value, str):
        return _TEXT_TO_FLOAT.get(value, value)
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: from_jsonable(v) for k, v in value.items()}
    return value


def loads(text: str | bytes) -> Any:
    """Parse JSON text written by :func:`dumps` (or before it, see the module docstring)."""
    return from_jsonable(json.loads(text))


def to_float(value: Any) -> float:
    """A number slot read back as a float: ``None`` (a legacy ``nan``) -> ``nan``, the reserved strings
    -> their floats, numbers -> ``float``.

    Raises
    ------
    ValueError
        For any other string.
    TypeError
        For a bool.
    """
    if value is None:
        return math.nan
    if isinstance(value, bool):
        raise TypeError(f"not a number: {value!r}")
    if isinstance(value, str):
        if value not in _TEXT_TO_FLOAT:
            raise ValueError(f"not a number: {value!r}")
        return _TEXT_TO_FLOAT[value]
    return float(value)
