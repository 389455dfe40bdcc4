"""The real BTCUSDT data shipped in market/bundled loads, validates and stays within its period."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from market.bundled import BUNDLED_DIR, bundled_candles_path, bundled_funding_path
from market.candles import join_funding, load_candles, load_funding

LAST_ALLOWED = pd.Timestamp("2025-06-30 23:00", tz="UTC")


@pytest.fixture(scope="module")
def candles() -> pd.DataFrame:
    return load_candles(bundled_candles_path())


@pytest.fixture(scope="module")
def funding() -> pd.Series:
    return load_funding(bundled_funding_path())


def test_candles_load_validate_and_span(candles):
    assert candles.index[0] == pd.Timestamp("2020-01-01 00:00", tz="UTC")
    assert candles.index[-1] <= LAST_ALLOWED
    assert candles.index[-1] == LAST_ALLOWED
    assert len(candles) == 48_192  # every hour of 2020-01-01 .. 2025-06-30, no gaps
    # spot check against the value quoted in PROVENANCE.md (Binance's candle)
    first = candles.iloc[0]
    assert (first["open"], first["high"], first["low"], first["close"], first["volume"]) == (
        7189.43,
        7190.52,
        7170.15,
        7171.55,
        2449.049,
    )


def test_funding_loads_and_joins(candles, funding):
    assert funding.index[0] == pd.Timestamp("2020-01-01 00:00", tz="UTC")
    assert funding.index[-1] <= LAST_ALLOWED
    assert len(funding) == 6_024
    joined = join_funding(candles, funding)
    assert joined["funding_rate"].notna().sum() == len(funding)
    settled = joined.index[joined["funding_rate"].notna()]
    assert set(settled.hour) == {0, 8, 16}
    assert np.isfinite(joined["funding_rate"].dropna()).all()


def test_provenance_lists_the_files_checksums():
    text = (BUNDLED_DIR / "PROVENANCE.md").read_text(encoding="utf-8")
    for path in (bundled_candles_path(), bundled_funding_path()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest in text, f"PROVENANCE.md does not list the SHA-256 of {path.name}"


def test_missing_bundled_file_names_the_path():
    with pytest.raises(FileNotFoundError, match="DOGEUSDT-1h.parquet"):
        bundled_candles_path("DOGEUSDT")
    with pytest.raises(FileNotFoundError, match="BTCUSDT-4h.parquet"):
        bundled_candles_path("BTCUSDT", "4h")
    with pytest.raises(FileNotFoundError, match="ETHUSDT-funding.parquet"):
        bundled_funding_path("ETHUSDT")
