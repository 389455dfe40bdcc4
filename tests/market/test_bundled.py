"""The real BTCUSDT, ETHUSDT and XRPUSDT data shipped in market/bundled loads, validates and stays within its period."""

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


@pytest.mark.parametrize(("symbol", "first", "rows", "n_funding", "first_candle"), [
    ("ETHUSDT", "2020-01-01 00:00", 48_192, 6_024, (129.12, 129.12, 128.62, 128.82, 14947.691)),
    ("XRPUSDT", "2020-01-06 08:00", 48_064, 6_008, (0.197, 0.2041, 0.197, 0.2041, 6306.4)),
])
def test_other_bundled_symbols_load_validate_and_span(symbol, first, rows, n_funding, first_candle):
    c = load_candles(bundled_candles_path(symbol))
    f = load_funding(bundled_funding_path(symbol))
    assert c.index[0] == pd.Timestamp(first, tz="UTC") and c.index[-1] == LAST_ALLOWED and len(c) == rows
    assert tuple(c.iloc[0][["open", "high", "low", "close", "volume"]]) == first_candle  # quoted in PROVENANCE.md
    assert f.index[0] == pd.Timestamp(first, tz="UTC") and f.index[-1] <= LAST_ALLOWED and len(f) == n_funding
    joined = join_funding(c, f)
    assert joined["funding_rate"].notna().sum() == len(f)


def test_provenance_lists_the_files_checksums():
    text = (BUNDLED_DIR / "PROVENANCE.md").read_text(encoding="utf-8")
    paths = [p for sym in ("BTCUSDT", "ETHUSDT", "XRPUSDT") for p in (bundled_candles_path(sym), bundled_funding_path(sym))]
    for path in paths:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest in text, f"PROVENANCE.md does not list the SHA-256 of {path.name}"


def test_missing_bundled_file_names_the_path():
    with pytest.raises(FileNotFoundError, match=r"DOGEUSDT-1h\.parquet"):
        bundled_candles_path("DOGEUSDT")
    with pytest.raises(FileNotFoundError, match=r"BTCUSDT-4h\.parquet"):
        bundled_candles_path("BTCUSDT", "4h")
    with pytest.raises(FileNotFoundError, match=r"SOLUSDT-funding\.parquet"):
        bundled_funding_path("SOLUSDT")
