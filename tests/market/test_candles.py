"""Validation, loading, funding join and slicing of candles (hand-made frames)."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from market.candles import (
    check_candles,
    interval_of,
    join_funding,
    load_candles,
    load_funding,
    slice_period,
    validate_candles,
    validate_funding,
)
from market.errors import DataValidationError
from tests.kit.candles import make_candles

T0 = pd.Timestamp("2021-03-04 00:00", tz="UTC")


def _flat(n: int = 8, start: pd.Timestamp = T0, freq: str = "1h") -> pd.DataFrame:
    """n well-formed bars: open 100, high 101, low 99, close 100, volume 10."""
    index = pd.date_range(start, periods=n, freq=freq, name="open_time")
    return pd.DataFrame(
        {"open": 100.0, "high": 101.0, "low": 99.0, "close": 100.0, "volume": 10.0}, index=index
    )


def _rule(df: pd.DataFrame, interval: str = "1h") -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        validate_candles(df, interval=interval, source="test.parquet")
    return info.value


def test_valid_frames_pass():
    validate_candles(_flat(), interval="1h")
    validate_candles(make_candles(300, seed=1), interval="1h")
    validate_candles(make_candles(50, seed=2, freq="15min"), interval="15min")
    check_candles(make_candles(50, seed=2, freq="15min"))


def test_nan_names_rule_row_and_column():
    df = _flat()
    df.loc[T0 + pd.Timedelta("3h"), "close"] = np.nan
    err = _rule(df)
    assert err.rule == "finite_values"
    assert err.rows == [T0 + pd.Timedelta("3h")]
    assert err.n_rows == 1
    assert "2021-03-04 03:00:00+00:00" in str(err)
    assert "test.parquet" in str(err) and "close" in str(err)


def test_inf_volume_is_not_finite():
    df = _flat()
    df.iloc[5, df.columns.get_loc("volume")] = np.inf
    err = _rule(df)
    assert (err.rule, err.rows) == ("finite_values", [df.index[5]])


def test_duplicate_open_time():
    df = _flat()
    df = pd.concat([df.iloc[:3], df.iloc[[2]], df.iloc[3:]])
    err = _rule(df)
    assert err.rule == "unique_open_time"
    assert err.rows == [T0 + pd.Timedelta("2h")]
    assert "2021-03-04 02:00:00+00:00" in str(err)


def test_non_monotonic_open_time():
    df = _flat()
    df = df.iloc[[0, 1, 3, 2, 4, 5, 6, 7]]
    err = _rule(df)
    assert err.rule == "monotonic_open_time"
    assert err.rows == [T0 + pd.Timedelta("2h")]


def test_gap_names_row_before_gap_and_size():
    df = _flat(10).drop(index=[T0 + pd.Timedelta("4h"), T0 + pd.Timedelta("5h")])
    err = _rule(df)
    assert err.rule == "regular_interval"
    assert err.rows == [T0 + pd.Timedelta("3h")]
    assert "0 days 03:00:00" in err.detail
    assert "2021-03-04 03:00:00+00:00" in str(err)


def test_wrong_interval_is_irregular():
    err = _rule(_flat(3), interval="15min")
    assert err.rule == "regular_interval"
    assert err.n_rows == 2


def test_negative_volume():
    df = _flat()
    df.iloc[6, df.columns.get_loc("volume")] = -1.0
    err = _rule(df)
    assert (err.rule, err.rows) == ("non_negative_volume", [df.index[6]])


def test_zero_volume_is_allowed():
    df = _flat()
    df["volume"] = 0.0
    validate_candles(df, interval="1h")


@pytest.mark.parametrize("value", [0.0, -5.0])
def test_non_positive_price(value):
    df = _flat()
    df.iloc[1, df.columns.get_loc("low")] = value
    err = _rule(df)
    assert (err.rule, err.rows) == ("positive_prices", [df.index[1]])


@pytest.mark.parametrize(
    "row",
    [
        {"high": 98.0},  # high < low
        {"close": 101.5},  # high < max(open, close)
        {"open": 98.5},  # low > min(open, close)
    ],
)
def test_ohlc_consistency(row):
    df = _flat()
    for col, value in row.items():
        df.iloc[4, df.columns.get_loc(col)] = value
    err = _rule(df)
    assert (err.rule, err.rows) == ("ohlc_consistency", [df.index[4]])
    assert "2021-03-04 04:00:00+00:00" in str(err)


def test_rules_are_checked_in_order():
    df = _flat()
    df.iloc[2, df.columns.get_loc("high")] = 50.0  # ohlc_consistency
    df.iloc[5, df.columns.get_loc("open")] = np.nan  # finite_values comes first
    assert _rule(df).rule == "finite_values"


def test_missing_column():
    err = _rule(_flat().drop(columns=["volume"]))
    assert err.rule == "missing_columns"
    assert "volume" in str(err)


def test_non_float_column():
    df = _flat()
    df["volume"] = 10
    assert _rule(df).rule == "column_dtype"


@pytest.mark.parametrize("tz", [None, "Europe/Paris"])
def test_non_utc_index(tz):
    df = _flat()
    df.index = df.index.tz_convert(tz) if tz else df.index.tz_localize(None)
    assert _rule(df).rule == "utc_datetime_index"


def test_integer_index_is_rejected():
    assert _rule(_flat().reset_index(drop=True)).rule == "utc_datetime_index"


def test_inf_funding_rate():
    df = _flat()
    df["funding_rate"] = np.nan
    df.iloc[0, df.columns.get_loc("funding_rate")] = np.inf
    assert _rule(df).rule == "finite_funding"


def test_empty_frame():
    assert _rule(_flat().iloc[:0]).rule == "non_empty"


def test_error_lists_at_most_ten_rows_and_pickles():
    df = _flat(30)
    df["volume"] = -1.0
    err = _rule(df)
    assert err.n_rows == 30 and len(err.rows) == 10
    assert "at 30 rows" in str(err) and str(err).count("+00:00") == 10
    back = pickle.loads(pickle.dumps(err))
    assert (back.rule, back.rows, back.n_rows, back.source, str(back)) == (
        err.rule,
        err.rows,
        err.n_rows,
        err.source,
        str(err),
    )


def test_check_candles_infers_interval():
    df = _flat(10, freq="15min").drop(index=[T0 + pd.Timedelta("30min")])
    with pytest.raises(DataValidationError) as info:
        check_candles(df)
    assert info.value.rule == "regular_interval"
    assert info.value.rows == [T0 + pd.Timedelta("15min")]
    check_candles(_flat(1))  # a single bar has no spacing to check


# ------------------------------------------------------------------ loading


def _write(df: pd.DataFrame, path) -> None:
    df.reset_index().rename(columns={"open_time": "timestamp"}).to_parquet(path, index=False)


def test_load_candles_roundtrip_canonical(tmp_path):
    src = make_candles(100, seed=3, with_funding=False)
    path = tmp_path / "X-1h.parquet"
    _write(src, path)
    df = load_candles(path)
    assert list(df.columns) == ["open", "high", "low", "close", "volume"]
    assert df.index.name == "open_time" and str(df.index.tz) == "UTC" and df.index.unit == "ns"
    assert (df.dtypes == np.float64).all()
    np.testing.assert_array_equal(df.to_numpy(), src.to_numpy())
    assert (df.index == src.index).all()


def test_load_candles_from_index_with_funding_and_int_volume(tmp_path):
    src = _flat(5)
    src["volume"] = np.arange(5)
    src["funding_rate"] = [1e-4, np.nan, np.nan, np.nan, np.nan]
    path = tmp_path / "x.parquet"
    src.to_parquet(path)
    df = load_candles(path, interval="1h")
    assert list(df.columns) == ["open", "high", "low", "close", "volume", "funding_rate"]
    assert df["volume"].dtype == np.float64 and df["volume"].iloc[4] == 4.0


def test_load_candles_rejects_extra_columns(tmp_path):
    src = _flat(5)
    src["trades"] = 3.0
    path = tmp_path / "x.parquet"
    _write(src, path)
    with pytest.raises(DataValidationError) as info:
        load_candles(path)
    assert info.value.rule == "unexpected_columns" and "trades" in str(info.value)


def test_load_candles_rejects_naive_times(tmp_path):
    src = _flat(5)
    src.index = src.index.tz_localize(None)
    path = tmp_path / "x.parquet"
    _write(src, path)
    with pytest.raises(DataValidationError) as info:
        load_candles(path)
    assert info.value.rule == "utc_datetime_index"


def test_load_candles_validates_with_given_interval(tmp_path):
    path = tmp_path / "BTC-1h.parquet"
    _write(_flat(5), path)
    with pytest.raises(DataValidationError) as info:
        load_candles(path, interval="4h")
    assert info.value.rule == "regular_interval" and info.value.source == "BTC-1h.parquet"


def test_load_candles_bad_row_in_file(tmp_path):
    src = _flat(6)
    src.iloc[3, src.columns.get_loc("high")] = 90.0
    path = tmp_path / "BTC-1h.parquet"
    _write(src, path)
    with pytest.raises(DataValidationError, match=r"candles BTC-1h.parquet: rule 'ohlc_consistency'") as info:
        load_candles(path)
    assert info.value.rows == [T0 + pd.Timedelta("3h")]


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet"):
        load_candles(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet"):
        load_funding(tmp_path / "nope.parquet")


def _funding(times: list[str], rates: list[float]) -> pd.Series:
    index = pd.DatetimeIndex(pd.to_datetime(times, utc=True), name="funding_time")
    return pd.Series(rates, index=index, name="funding_rate", dtype=np.float64)


def test_load_funding_roundtrip(tmp_path):
    src = _funding(["2021-03-04 00:00", "2021-03-04 08:00"], [1e-4, -2e-4])
    path = tmp_path / "f.parquet"
    src.rename_axis("timestamp").reset_index().to_parquet(path, index=False)
    s = load_funding(path)
    assert s.name == "funding_rate" and s.index.name == "funding_time" and s.dtype == np.float64
    assert str(s.index.tz) == "UTC"
    np.testing.assert_array_equal(s.to_numpy(), [1e-4, -2e-4])


def test_validate_funding_rules():
    with pytest.raises(DataValidationError) as info:
        validate_funding(_funding(["2021-03-04 00:00", "2021-03-04 08:00"], [1e-4, np.nan]))
    assert info.value.rule == "finite_values" and info.value.rows == [T0 + pd.Timedelta("8h")]
    with pytest.raises(DataValidationError) as info:
        validate_funding(_funding(["2021-03-04 08:00", "2021-03-04 08:00"], [1e-4, 1e-4]))
    assert info.value.rule == "unique_funding_time"
    with pytest.raises(DataValidationError) as info:
        validate_funding(_funding(["2021-03-04 08:00", "2021-03-04 00:00"], [1e-4, 1e-4]))
    assert info.value.rule == "monotonic_funding_time" and info.value.rows == [T0]


# ------------------------------------------------------------------ funding join


def test_join_funding_exact_match_nan_elsewhere_outside_ignored():
    candles = _flat(10)  # 00:00 .. 09:00
    funding = _funding(
        ["2021-03-03 16:00", "2021-03-04 00:00", "2021-03-04 08:00", "2021-03-04 16:00"],
        [9e-4, 1e-4, -3e-4, 7e-4],
    )
    out = join_funding(candles, funding)
    expected = np.full(10, np.nan)
    expected[0], expected[8] = 1e-4, -3e-4
    np.testing.assert_array_equal(out["funding_rate"].to_numpy(), expected)
    assert out["funding_rate"].dtype == np.float64
    assert "funding_rate" not in candles.columns  # input untouched
    pd.testing.assert_frame_equal(out.drop(columns="funding_rate"), candles)


def test_join_funding_misaligned_time_is_an_error():
    funding = _funding(["2021-03-04 00:00", "2021-03-04 04:30"], [1e-4, 2e-4])
    with pytest.raises(DataValidationError) as info:
        join_funding(_flat(10), funding)
    assert info.value.rule == "funding_alignment"
    assert info.value.rows == [pd.Timestamp("2021-03-04 04:30", tz="UTC")]


def test_join_funding_replaces_existing_column():
    candles = make_candles(24, seed=0)
    funding = _funding(["2021-01-01 08:00"], [5e-4])
    out = join_funding(candles, funding)
    assert out["funding_rate"].notna().sum() == 1
    assert out.loc[pd.Timestamp("2021-01-01 08:00", tz="UTC"), "funding_rate"] == 5e-4


# ------------------------------------------------------------------ slicing, interval


def test_slice_period_inclusive_start_exclusive_end():
    df = _flat(10)
    out = slice_period(df, "2021-03-04 02:00", pd.Timestamp("2021-03-04 05:00", tz="UTC"))
    assert list(out.index) == [T0 + pd.Timedelta(f"{h}h") for h in (2, 3, 4)]


def test_slice_period_empty_and_reversed():
    df = _flat(10)
    with pytest.raises(DataValidationError) as info:
        slice_period(df, "2022-01-01", "2022-02-01")
    assert info.value.rule == "empty_period"
    with pytest.raises(ValueError):
        slice_period(df, "2021-03-04 05:00", "2021-03-04 02:00")


def test_interval_of():
    assert interval_of(_flat(5)) == pd.Timedelta("1h")
    assert interval_of(make_candles(20, freq="15min")) == pd.Timedelta("15min")
    # median spacing: one gap does not change it
    assert interval_of(_flat(10).drop(index=[T0 + pd.Timedelta("4h")])) == pd.Timedelta("1h")
    with pytest.raises(DataValidationError) as info:
        interval_of(_flat(1))
    assert info.value.rule == "too_few_rows"
