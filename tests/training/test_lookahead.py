"""Look-ahead check: the core catches planted leaks; shipped features and model outputs have none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ats_cli import check_cmd
from market.bundled import bundled_candles_path, bundled_funding_path
from market.candles import join_funding, load_candles, load_funding
from market.features import FeatureConfig, compute_features, warmup_bars
from tests.kit.candles import make_candles
from training.lookahead import Offender, random_cuts, truncation_offenders

REPO = Path(__file__).resolve().parents[2]


def _planted(candles: pd.DataFrame) -> pd.DataFrame:
    close = candles["close"]
    return pd.DataFrame(
        {
            "trailing_mean": close.rolling(5).mean(),  # causal
            "centred_mean": close.rolling(5, center=True).mean(),  # uses the 2 next bars
            "full_sample_z": (close - close.mean()) / close.std(),  # normalised on the whole series
        },
        index=candles.index,
    )


def test_planted_leaks_are_caught_with_their_first_offending_time():
    candles = make_candles(300, seed=3)
    cuts = [100, 150, 220]
    offenders = truncation_offenders(_planted, candles, cuts)
    by_col = {o.column: o for o in offenders}
    assert set(by_col) == {"centred_mean", "full_sample_z"}
    # cut after row 100: rows 99 and 100 lose their centred window (NaN vs a value)
    assert by_col["centred_mean"] == Offender("centred_mean", candles.index[99], 3, np.inf)
    assert by_col["full_sample_z"].first_time == candles.index[0] and by_col["full_sample_z"].n_cuts == 3
    assert offenders[0].first_time <= offenders[1].first_time  # ordered by first offending time


def test_tolerance_is_per_column_and_absolute():
    candles = make_candles(200, seed=4)

    def jitter(c: pd.DataFrame) -> pd.DataFrame:  # a value that moves by 1e-9 x the series length
        return pd.DataFrame({"a": np.full(len(c), 1e-9 * len(c)), "b": np.zeros(len(c))}, index=c.index)

    assert [o.column for o in truncation_offenders(jitter, candles, [50])] == ["a"]
    assert truncation_offenders(jitter, candles, [50], atol=1e-6) == []
    assert truncation_offenders(jitter, candles, [50], atol={"a": 1e-6}) == []
    with pytest.raises(ValueError, match=r"unknown|does not produce"):
        truncation_offenders(jitter, candles, [50], atol={"nope": 1.0})
    with pytest.raises(ValueError, match="outside"):
        truncation_offenders(jitter, candles, [200])


def test_dropped_rows_and_changing_columns():
    candles = make_candles(120, seed=5)

    def drops_last(c: pd.DataFrame) -> pd.DataFrame:  # needs the next bar to emit a row: a leak
        return pd.DataFrame({"x": c["close"].to_numpy()[:-1]}, index=c.index[:-1])

    (off,) = truncation_offenders(drops_last, candles, [60, 80])
    assert off.column == "x" and off.first_time == candles.index[60] and off.max_abs_diff == np.inf

    def schema_depends_on_length(c: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({f"x{len(c) % 2}": c["close"]}, index=c.index)

    with pytest.raises(ValueError, match="columns changed"):
        truncation_offenders(schema_depends_on_length, candles, [60])


def test_random_cuts():
    rng = np.random.default_rng(0)
    cuts = random_cuts(100, 10, rng, min_row=50)
    assert cuts == sorted(set(cuts)) and len(cuts) == 10 and 50 <= cuts[0] and cuts[-1] <= 98
    assert random_cuts(100, 10, np.random.default_rng(0), min_row=50) == cuts  # seeded
    assert len(random_cuts(10, 50, rng)) == 9
    with pytest.raises(ValueError):
        random_cuts(10, 1, rng, min_row=9)
    with pytest.raises(ValueError):
        random_cuts(10, 0, rng)


@pytest.mark.parametrize("cfg", [FeatureConfig(), FeatureConfig(higher_timeframes=("4h", "1d"))], ids=["default", "4h+1d"])
def test_shipped_features_have_no_offenders_on_bundled_data(cfg):
    candles = join_funding(load_candles(bundled_candles_path()), load_funding(bundled_funding_path()))
    data = candles.iloc[-6000:]
    rng = np.random.default_rng(8)
    cuts = [*random_cuts(len(data), 12, rng, min_row=10), warmup_bars(cfg) - 1, warmup_bars(cfg)]
    assert truncation_offenders(lambda c: compute_features(c, cfg), data, cuts) == []


def test_cli_reports_zero_offenders_for_features_and_model_outputs_on_smoke_config():
    """HMM filtered probabilities, LightGBM regime-ahead and TCN probabilities, fitted on the smoke config."""
    result = CliRunner().invoke(
        check_cmd.app, ["lookahead", "--config", str(REPO / "configs" / "smoke.yaml"), "--cuts", "6"]
    )
    assert result.exit_code == 0, result.output
    assert "0 offenders" in result.output


def test_cli_rejects_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nunknown_key: 1\n")
    result = CliRunner().invoke(check_cmd.app, ["lookahead", "--config", str(bad)])
    assert result.exit_code == 2


def test_cli_catches_a_leaky_feature_and_its_propagation_into_model_outputs(monkeypatch):
    """A feature replaced by a centred mean (models fitted on the clean one) makes the check fail."""
    import market.features as mf

    clean = mf.compute_features

    def leaky(candles: pd.DataFrame, cfg: FeatureConfig) -> pd.DataFrame:
        out = clean(candles, cfg)
        out["logret_1b"] = out["logret_1b"].rolling(3, center=True, min_periods=1).mean().astype(np.float32)
        return out

    monkeypatch.setattr(mf, "compute_features", leaky)
    result = CliRunner().invoke(
        check_cmd.app, ["lookahead", "--config", str(REPO / "configs" / "smoke.yaml"), "--cuts", "2"]
    )
    assert result.exit_code == 1, result.output
    assert "logret_1b" in result.output and "signal_p_up" in result.output
