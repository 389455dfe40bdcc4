"""Data-quality report, the gap policy (fill_gaps, load_candles gap_policy) and `ats data check`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ats_cli import data_cmd
from market.bundled import bundled_candles_path, bundled_funding_path
from market.candles import fill_gaps, load_candles
from market.errors import DataValidationError
from market.quality import assess_candles, assess_file, assess_funding, data_files
from training.config import DataConfig

T0 = pd.Timestamp("2021-03-04 00:00", tz="UTC")
H = pd.Timedelta("1h")


def _flat(n: int = 10) -> pd.DataFrame:
    """n good bars in file form: timestamp column, open 100, high 101, low 99, close 100, volume 10."""
    return pd.DataFrame(
        {
            "timestamp": pd.date_range(T0, periods=n, freq="1h"),
            "open": 100.0, "high": 101.0, "low": 99.0, "close": 100.0, "volume": 10.0,
        }
    )


def _write(df: pd.DataFrame, path) -> object:
    df.to_parquet(path, index=False)
    return path


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def test_bundled_files_pass_with_exact_counts():
    candles = assess_file(bundled_candles_path())
    assert candles.ok and candles.kind == "candles"
    assert candles.rows == 48_192
    assert candles.first == pd.Timestamp("2020-01-01", tz="UTC")
    assert candles.last == pd.Timestamp("2025-06-30 23:00", tz="UTC")
    assert candles.interval == H and candles.gap_count == 0 and candles.largest_gap is None
    funding = assess_file(bundled_funding_path())
    assert funding.ok and funding.kind == "funding" and funding.rows == 6_024
    assert funding.interval == pd.Timedelta("8h")


def test_every_rule_is_counted_with_its_rows():
    df = _flat(12)
    df.loc[2, "close"] = np.nan  # non_finite
    df.loc[3, "low"] = -1.0  # non_positive_price (and not counted as ohlc? low <= min: fine)
    df.loc[4, "high"] = 99.5  # ohlc: high < max(open, close) = 100
    df.loc[5, "volume"] = -2.0  # negative_volume
    df.loc[[7, 8, 10], "volume"] = 0.0  # zero volume: 3 rows in 2 runs, longest 2
    rep = assess_candles(df, source="x")
    counts = {f.rule: f.count for f in rep.findings}
    assert counts == {
        "missing_time": 0, "duplicates": 0, "out_of_order": 0, "misaligned": 0, "gaps": 0,
        "non_finite": 1, "non_positive_price": 1, "negative_volume": 1, "ohlc": 1, "zero_volume": 3,
    }
    assert (rep.zero_volume_runs, rep.longest_zero_volume_run) == (2, 2)
    assert {f.rule for f in rep.failures} == {"non_finite", "non_positive_price", "negative_volume", "ohlc"}
    ohlc = next(f for f in rep.findings if f.rule == "ohlc")
    assert ohlc.examples == (str(T0 + 4 * H),)


def test_zero_volume_alone_is_soft():
    df = _flat(6)
    df.loc[1:4, "volume"] = 0.0
    rep = assess_candles(df)
    assert rep.ok and rep.count("zero_volume") == 4 and rep.longest_zero_volume_run == 4


def test_duplicates_out_of_order_and_gaps():
    df = _flat(10)
    dup = pd.concat([df.iloc[:3], df.iloc[[2]], df.iloc[3:]], ignore_index=True)  # t2 twice
    rep = assess_candles(dup)
    assert (rep.count("duplicates"), rep.count("out_of_order")) == (1, 0)
    swapped = df.iloc[[0, 1, 3, 2, 4, 5, 6, 7, 8, 9]]
    rep = assess_candles(swapped)
    assert (rep.count("duplicates"), rep.count("out_of_order"), rep.count("gaps")) == (0, 1, 0)
    holes = df.drop(index=[3, 4, 7])  # 2 missing after t2, 1 after t6
    rep = assess_candles(holes)
    assert (rep.gap_count, rep.missing_bars) == (2, 3)
    assert rep.largest_gap.after == T0 + 2 * H and rep.largest_gap.before == T0 + 5 * H
    assert rep.largest_gap.missing_bars == 2
    assert not rep.ok and [f.rule for f in rep.failures] == ["gaps"]
    assert assess_candles(holes, gap_policy="mark").ok  # gaps are soft under the mark policy


def test_misaligned_step_is_hard_in_both_policies():
    df = _flat(6)
    df.loc[5, "timestamp"] = df.loc[4, "timestamp"] + pd.Timedelta("30min")
    for policy in ("error", "mark"):
        rep = assess_candles(df, gap_policy=policy)
        assert rep.count("misaligned") == 1 and not rep.ok


def test_schema_problems_are_hard():
    df = _flat(4).drop(columns=["volume"])
    assert [f.rule for f in assess_candles(df).failures] == ["schema"]
    naive = _flat(4)
    naive["timestamp"] = naive["timestamp"].dt.tz_localize(None)
    assert [f.rule for f in assess_candles(naive).failures] == ["schema"]
    assert [f.rule for f in assess_candles(_flat(4).assign(extra=1.0)).failures] == ["schema"]


def test_funding_report():
    times = pd.date_range(T0, periods=6, freq="8h")
    raw = pd.DataFrame({"timestamp": times, "funding_rate": [1e-4, 2e-4, np.nan, 1e-4, 1e-4, 1e-4]})
    raw = raw.drop(index=[4])  # one settlement missing: soft
    rep = assess_funding(raw)
    assert rep.count("non_finite") == 1 and rep.count("gaps") == 1
    assert [f.rule for f in rep.failures] == ["non_finite"]


# ---------------------------------------------------------------------------------------------
# the report agrees with load_candles (the hard rules are the loading rules)
# ---------------------------------------------------------------------------------------------

_MUTATIONS = ["none", "dup", "swap", "drop", "nan", "neg_price", "ohlc", "neg_vol", "zero_vol", "misalign"]


def _mutate(df: pd.DataFrame, kind: str, i: int) -> pd.DataFrame:
    df = df.copy()
    if kind == "dup":
        return pd.concat([df, df.iloc[[i]]], ignore_index=True)
    if kind == "swap" and i + 1 < len(df):
        order = list(range(len(df)))
        order[i], order[i + 1] = order[i + 1], order[i]
        return df.iloc[order].reset_index(drop=True)
    if kind == "drop" and 0 < i < len(df) - 1:
        return df.drop(index=[i]).reset_index(drop=True)
    if kind == "nan":
        df.loc[i, "open"] = np.nan
    elif kind == "neg_price":
        df.loc[i, ["open", "low"]] = -5.0
    elif kind == "ohlc":
        df.loc[i, "low"] = 100.5
    elif kind == "neg_vol":
        df.loc[i, "volume"] = -1.0
    elif kind == "zero_vol":
        df.loc[i, "volume"] = 0.0
    elif kind == "misalign" and i > 0:
        df.loc[i, "timestamp"] = df.loc[i - 1, "timestamp"] + pd.Timedelta("20min")
    return df


@settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    muts=st.lists(st.tuples(st.sampled_from(_MUTATIONS), st.integers(0, 11)), max_size=3),
    policy=st.sampled_from(["error", "mark"]),
)
def test_check_fails_exactly_when_loading_fails(tmp_path, muts, policy):
    df = _flat(12)
    for kind, i in muts:
        df = _mutate(df, kind, min(i, len(df) - 1))
    path = _write(df, tmp_path / "c.parquet")
    rep = assess_file(path, gap_policy=policy)
    try:
        load_candles(path, gap_policy=policy)
        loaded = True
    except DataValidationError:
        loaded = False
    assert rep.ok == loaded, (muts, policy, [f.rule for f in rep.failures])


# ---------------------------------------------------------------------------------------------
# gap policy
# ---------------------------------------------------------------------------------------------


def _with_gap() -> pd.DataFrame:
    index = pd.DatetimeIndex([T0, T0 + H, T0 + 4 * H, T0 + 5 * H], name="open_time")
    return pd.DataFrame(
        {
            "open": [1.0, 2.0, 3.0, 4.0], "high": [2.0, 3.0, 4.0, 5.0], "low": [0.5, 1.0, 2.0, 3.0],
            "close": [1.5, 2.5, 3.5, 4.5], "volume": [1.0, 2.0, 3.0, 4.0],
            "funding_rate": [1e-4, np.nan, np.nan, 2e-4],
        },
        index=index,
    )


def test_fill_gaps_hand_computed():
    filled, n = fill_gaps(_with_gap(), interval="1h")
    assert n == 2
    assert list(filled.index) == [T0 + k * H for k in range(6)]
    assert filled["is_gap"].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    for col in ("open", "high", "low", "close"):
        assert filled[col].tolist()[2:4] == [2.5, 2.5]  # previous close carried
    assert filled["volume"].tolist() == [1.0, 2.0, 0.0, 0.0, 3.0, 4.0]
    assert np.isnan(filled["funding_rate"].to_numpy()[2:4]).all()  # no settlement invented
    real = filled.loc[filled["is_gap"] == 0.0].drop(columns="is_gap")
    pd.testing.assert_frame_equal(real, _with_gap(), check_freq=False)  # real rows untouched
    assert (filled.dtypes == np.float64).all()


def test_fill_gaps_without_gaps_adds_zero_column():
    df = _with_gap().iloc[:2]
    filled, n = fill_gaps(df, interval="1h")
    assert n == 0 and filled["is_gap"].tolist() == [0.0, 0.0]


def test_fill_gaps_refuses_misaligned_steps():
    df = _with_gap()
    df.index = pd.DatetimeIndex([T0, T0 + H, T0 + pd.Timedelta("3h30min"), T0 + 5 * H], name="open_time")
    with pytest.raises(DataValidationError) as info:
        fill_gaps(df, interval="1h")
    assert info.value.rule == "regular_interval"


def test_load_candles_gap_policies(tmp_path):
    path = tmp_path / "gap.parquet"
    _with_gap().drop(columns="funding_rate").reset_index().rename(columns={"open_time": "timestamp"}).to_parquet(path)
    with pytest.raises(DataValidationError) as info:
        load_candles(path, interval="1h")  # default policy: error
    assert info.value.rule == "regular_interval" and info.value.rows == [T0 + H]
    marked = load_candles(path, interval="1h", gap_policy="mark")
    assert len(marked) == 6 and marked["is_gap"].sum() == 2.0
    bundled = load_candles(bundled_candles_path(), gap_policy="mark")
    assert bundled["is_gap"].sum() == 0.0 and len(bundled) == 48_192
    with pytest.raises(ValueError, match="gap_policy"):
        load_candles(path, interval="1h", gap_policy="fill")


def test_data_config_gap_policy():
    base = {"load_start": "2021-01-01", "train_start": "2021-02-01", "val_start": "2022-01-01",
                "test_start": "2023-01-01", "test_end": "2024-01-01"}
    assert DataConfig(**base).gap_policy == "error"
    assert DataConfig(**base, gap_policy="mark").gap_policy == "mark"
    with pytest.raises(ValueError):
        DataConfig(**base, gap_policy="fill")


# ---------------------------------------------------------------------------------------------
# ats data check
# ---------------------------------------------------------------------------------------------


def test_cli_check_bundled_passes():
    result = CliRunner().invoke(data_cmd.app, ["check", str(bundled_candles_path().parent)])
    assert result.exit_code == 0, result.output


def test_cli_check_exit_codes(tmp_path):
    good = _write(_flat(10), tmp_path / "good.parquet")
    gap = _write(_flat(10).drop(index=[4]), tmp_path / "gap.parquet")
    bad = _flat(10)
    bad.loc[3, "high"] = 50.0
    bad = _write(bad, tmp_path / "bad.parquet")
    runner = CliRunner()
    assert runner.invoke(data_cmd.app, ["check", str(good)]).exit_code == 0
    assert runner.invoke(data_cmd.app, ["check", str(gap)]).exit_code == 1
    assert runner.invoke(data_cmd.app, ["check", str(gap), "--gap-policy", "mark"]).exit_code == 0
    assert runner.invoke(data_cmd.app, ["check", str(bad), "--gap-policy", "mark"]).exit_code == 1
    assert runner.invoke(data_cmd.app, ["check", str(tmp_path)]).exit_code == 1  # the folder holds bad files
    assert runner.invoke(data_cmd.app, ["check", str(tmp_path / "missing.parquet")]).exit_code == 2


def test_data_files_expands_folders(tmp_path):
    (tmp_path / "a").mkdir()
    _write(_flat(3), tmp_path / "a" / "x.parquet")
    _write(_flat(3), tmp_path / "y.parquet")
    assert [p.name for p in data_files([tmp_path])] == ["x.parquet", "y.parquet"]
    with pytest.raises(FileNotFoundError):
        data_files([tmp_path / "a" / "nope"])


def test_training_data_gap_policy(tmp_path):
    """prepare_data refuses a file with missing bars by default and fills + counts them with `mark`."""
    from training.config import load_config
    from training.pipeline import prepare_data

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml")
    raw = pd.read_parquet(bundled_candles_path())
    inside = raw.index[raw["timestamp"] == cfg.data.train_start][0] + 100
    path = _write(raw.drop(index=[inside, inside + 1, inside + 7]), tmp_path / "BTCUSDT-1h.parquet")

    def with_data(**kw):
        return cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"candles_path": str(path), "funding_path": str(bundled_funding_path()), **kw})})

    with pytest.raises(DataValidationError) as info:
        prepare_data(with_data())
    assert info.value.rule == "regular_interval"
    prep = prepare_data(with_data(gap_policy="mark"))
    assert prep.info["gap_policy"] == "mark" and prep.info["gap_rows_filled"] == 3
    assert prep.candles["is_gap"].sum() == 3.0
