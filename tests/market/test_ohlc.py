"""The OHLC row rule (market.ohlc), written once: one table of rows and the first rule each breaks; the
vectorised and the scalar form agree; and every site that refuses candles still refuses each bad row with
a message naming the row and its values."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from envs.accounting import AccountState, Bar, step_bar
from envs.config import CostConfig
from envs.trading_env import EnvData
from market.candles import validate_candles
from market.errors import DataValidationError
from market.ingest import MalformedResponseError, parse_ohlcv_page
from market.ohlc import OHLC_RULES, describe_row, ohlc_code, ohlc_codes, row_problems, rule_of
from market.quality import assess_candles
from serving.candles import check_window
from tests.kit.candles import make_candles

NAN, INF = math.nan, math.inf

# (open, high, low, close, volume) -> the first rule broken (None: valid)
TABLE: list[tuple[tuple[float, float, float, float, float], str | None]] = [
    ((10.0, 11.0, 9.0, 10.5, 5.0), None),
    ((10.0, 10.0, 10.0, 10.0, 0.0), None),  # a flat bar, zero volume (exchange halt): valid
    ((10.0, 11.0, 9.0, 11.0, 5.0), None),  # close at the high
    ((9.0, 11.0, 9.0, 10.0, 5.0), None),  # open at the low
    ((NAN, 11.0, 9.0, 10.5, 5.0), "non_finite_price"),
    ((10.0, INF, 9.0, 10.5, 5.0), "non_finite_price"),
    ((10.0, 11.0, 9.0, -INF, 5.0), "non_finite_price"),
    ((NAN, 11.0, 9.0, 10.5, -1.0), "non_finite_price"),  # before the volume rules
    ((10.0, 11.0, 9.0, 10.5, NAN), "non_finite_volume"),
    ((10.0, 11.0, 9.0, 10.5, INF), "non_finite_volume"),
    ((-1.0, 11.0, 9.0, 10.5, NAN), "non_finite_volume"),  # before the positive prices
    ((10.0, 11.0, 0.0, 10.5, 5.0), "non_positive_price"),
    ((10.0, 11.0, -9.0, 10.5, -5.0), "non_positive_price"),  # before the volume sign
    ((10.0, 11.0, 9.0, 10.5, -0.1), "negative_volume"),
    ((10.0, 8.0, 9.0, 10.5, -0.1), "negative_volume"),  # before the high/low rules
    ((10.0, 9.0, 11.0, 10.5, 5.0), "high_below_low"),
    ((10.0, 9.5, 9.6, 9.55, 5.0), "high_below_low"),
    ((10.0, 10.4, 9.0, 10.5, 5.0), "open_close_outside_range"),  # close above the high
    ((12.0, 11.0, 9.0, 10.5, 5.0), "open_close_outside_range"),  # open above the high
    ((10.0, 11.0, 9.0, 8.5, 5.0), "open_close_outside_range"),  # close below the low
    ((8.0, 11.0, 9.0, 10.5, 5.0), "open_close_outside_range"),  # open below the low
]


def _name(code: int) -> str | None:
    return None if code == 0 else rule_of(code)


@pytest.mark.parametrize(("row", "rule"), TABLE)
def test_the_first_broken_rule_of_a_row(row, rule) -> None:
    assert _name(ohlc_code(*row)) == rule
    assert _name(int(ohlc_codes(*([x] for x in row))[0])) == rule


def test_vectorised_equals_scalar_on_the_table_and_on_random_rows() -> None:
    rows = np.array([r for r, _ in TABLE], dtype=np.float64)
    rng = np.random.default_rng(0)
    pool = np.array([NAN, INF, -INF, -1.0, 0.0, 1.0, 2.0, 3.0])
    rows = np.vstack([rows, rng.choice(pool, size=(2_000, 5))])
    codes = ohlc_codes(*rows.T)
    assert codes.dtype == np.int8 and codes.shape == (len(rows),)
    assert codes.tolist() == [ohlc_code(*r) for r in rows]
    assert {_name(c) for c in codes} == {None, *OHLC_RULES}  # every rule seen
    # without a volume the volume rules do not apply
    assert ohlc_codes(*rows[:, :4].T).tolist() == [ohlc_code(*r[:4]) for r in rows]
    assert ohlc_code(10.0, 11.0, 9.0, 10.5) == 0 and ohlc_code(10.0, 11.0, 9.0, 10.5, -1.0) != 0


def test_arrays_of_different_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="one shape"):
        ohlc_codes([1.0, 2.0], [1.0], [1.0, 2.0], [1.0, 2.0])


def test_the_message_names_the_rule_the_row_and_the_values() -> None:
    t = pd.Timestamp("2024-01-01", tz="UTC")
    assert describe_row(ohlc_code(10.0, 9.0, 11.0, 10.5, 5.0), t, 10.0, 9.0, 11.0, 10.5, 5.0) == (
        "high < low at 2024-01-01 00:00:00+00:00: open=10.0 high=9.0 low=11.0 close=10.5 volume=5.0"
    )
    assert describe_row(1, "row 3", NAN, 11.0, 9.0, INF) == (
        "non-finite price ('open', 'close') at row 3: open=nan high=11.0 low=9.0 close=inf"
    )
    with pytest.raises(ValueError):
        rule_of(0)


# ------------------------------------------------------------------------------------------------
# every site refuses each bad row, naming it
# ------------------------------------------------------------------------------------------------

BAD = [(row, rule) for row, rule in TABLE if rule is not None]
K = 7  # the row made bad


def _candles_with(row) -> pd.DataFrame:
    c = make_candles(20, seed=1)
    c.iloc[K, :5] = row
    return c


@pytest.mark.parametrize(("row", "rule"), BAD)
def test_row_problems_names_the_open_time_and_values(row, rule) -> None:
    c = _candles_with(row)
    problems = row_problems(c)
    assert [i for i, p in enumerate(problems) if p is not None] == [K]
    assert problems[K] == describe_row(ohlc_code(*row), c.index[K], *row)


@pytest.mark.parametrize(("row", "rule"), BAD)
def test_validate_candles_and_quality(row, rule) -> None:
    c = _candles_with(row)
    with pytest.raises(DataValidationError) as info:
        validate_candles(c, interval="1h")
    assert info.value.rows == [c.index[K]] and f"row {K}" in str(info.value)
    expected = {"non_finite_price": "finite_values", "non_finite_volume": "finite_values",
                "non_positive_price": "positive_prices", "negative_volume": "non_negative_volume",
                "high_below_low": "ohlc_consistency", "open_close_outside_range": "ohlc_consistency"}  # fmt: skip
    assert info.value.rule == expected[rule]
    report = assess_candles(c.rename_axis("timestamp").reset_index(), interval="1h")
    failed = [f for f in report.findings if f.failed]
    assert len(failed) == 1 and failed[0].count == 1 and failed[0].examples == (str(c.index[K]),)


@pytest.mark.parametrize(("row", "rule"), BAD)
def test_env_data_and_the_execution_bar(row, rule) -> None:
    c = _candles_with(row)
    obs = pd.DataFrame({"x": np.zeros(len(c))}, index=c.index)
    if ohlc_code(*row[:4]) == 0:  # a volume problem only: the execution layer reads no volume
        EnvData.from_frames(c, obs, np.ones(len(c)))
        return
    with pytest.raises(ValueError, match=rf"OHLC rule at 1 rows: .* at row {K} \({re.escape(str(c.index[K]))}\): open="):
        EnvData.from_frames(c, obs, np.ones(len(c)))
    o, h, lo, cl = row[:4]
    bar = Bar(int(c.index[K].as_unit("ns").value), o, h, lo, cl, NAN, False)
    with pytest.raises(ValueError, match=rf"OHLC rule: .* at open_time_ns={bar.open_time_ns}: open="):
        step_bar(AccountState.initial(1_000.0), None, bar, 1.0, CostConfig())


@pytest.mark.parametrize(("row", "rule"), BAD)
def test_live_window_and_downloaded_page(row, rule) -> None:
    c = _candles_with(row)
    times_ms = c.index.as_unit("ms").asi8.astype(np.int64)
    values = c[["open", "high", "low", "close", "volume"]].to_numpy()
    problems = check_window(times_ms, values, int(times_ms[-1]), 3_600_000, len(c))
    assert problems == [f"invalid candle: {describe_row(ohlc_code(*row), c.index[K], *row)}"]
    page = [[int(t), *v] for t, v in zip(times_ms, values.tolist(), strict=True)]
    if rule.startswith("non_finite"):  # refused while parsing, before the rule (a malformed answer)
        with pytest.raises(MalformedResponseError, match=f"candle {K} is invalid"):
            parse_ohlcv_page(page, request="fetch_ohlcv(X)", tf_ms=3_600_000)
        return
    with pytest.raises(MalformedResponseError, match=rf"fetch_ohlcv\(X\): 1 candles break the OHLC rule, first "
                                                     rf"candle {K}: .* at {re.escape(str(c.index[K]))}: open="):  # fmt: skip
        parse_ohlcv_page(page, request="fetch_ohlcv(X)", tf_ms=3_600_000)
