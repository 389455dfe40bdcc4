"""market.json_codec: the one JSON codec (NaN/inf/None round trip, strict JSON, legacy files)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from market import json_codec


def test_nan_inf_none_round_trip_as_documented() -> None:
    value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "none": None, "x": 1.5, "n": 3,
             "np": [np.float64(np.nan), np.float32(np.inf), np.int64(2), np.bool_(True)],
             "nested": {"arr": np.array([1.0, -np.inf])}, "t": (0.25, "text")}  # fmt: skip
    text = json_codec.dumps(value, sort_keys=True)
    raw = json.loads(text)  # strict JSON: any parser reads it
    assert (raw["nan"], raw["inf"], raw["-inf"], raw["none"]) == ("NaN", "Infinity", "-Infinity", None)
    assert raw["np"] == ["NaN", "Infinity", 2, True] and raw["nested"]["arr"] == [1.0, "-Infinity"]
    back = json_codec.loads(text)
    assert math.isnan(back["nan"]) and back["inf"] == math.inf and back["-inf"] == -math.inf
    assert back["none"] is None and back["x"] == 1.5 and back["n"] == 3
    assert math.isnan(back["np"][0]) and back["np"][1:] == [math.inf, 2, True]
    assert back["nested"]["arr"] == [1.0, -math.inf] and back["t"] == [0.25, "text"]


def test_output_is_strict_json() -> None:
    text = json_codec.dumps([math.nan, math.inf])
    assert "NaN" in text and json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == [
        "NaN", "Infinity",
    ]  # fmt: skip


def test_the_strings_match_python_and_javascript_number_parsers() -> None:
    for x in (math.inf, -math.inf):
        assert float(json_codec.encode_float(x)) == x
    assert math.isnan(float(json_codec.encode_float(math.nan)))
    assert json_codec.encode_float(0.1) == 0.1


def test_legacy_report_spellings_are_read() -> None:
    # reports written before the codec: nan as null, infinities as "inf"/"-inf"
    old = json_codec.loads('{"sortino": "inf", "worst": "-inf", "profit_factor": null}')
    assert old["sortino"] == math.inf and old["worst"] == -math.inf and old["profit_factor"] is None
    assert math.isnan(json_codec.to_float(old["profit_factor"]))
    assert json_codec.to_float("Infinity") == math.inf and json_codec.to_float(2) == 2.0
    with pytest.raises(ValueError, match="not a number"):
        json_codec.to_float("abc")
    with pytest.raises(TypeError):
        json_codec.to_float(True)


def test_strict_and_lenient_modes() -> None:
    with pytest.raises(TypeError, match="keys must be strings"):
        json_codec.to_jsonable({1: 2})
    with pytest.raises(TypeError, match="unsupported type"):
        json_codec.to_jsonable({"x": object()})
    assert json_codec.to_jsonable({1: pd.Timestamp("2024-01-01", tz="Europe/Paris")}, strict=False) == {
        "1": "2023-12-31T23:00:00+00:00"
    }
    assert json_codec.to_jsonable({"p": json_codec}, strict=False)["p"].startswith("<module")
