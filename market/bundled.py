"""Paths of the real market data shipped inside the package (``market/bundled/``).

The bundled files are Binance USDⓈ-M BTCUSDT, ETHUSDT and XRPUSDT 1h candles and funding rates from
2020-01-01 00:00 UTC (XRPUSDT from 2020-01-06 08:00, its first USDT-M bar) to 2025-06-30 (nothing later);
see ``market/bundled/PROVENANCE.md`` for the sources and checksums. XRPUSDT trades near 0.2 to 3 USDT, so it
covers a tick scale unlike BTC's; only symbols with an instrument spec (``market.instruments``) can be traded.
Load them with :func:`market.candles.load_candles` and :func:`market.candles.load_funding`.
"""

from __future__ import annotations

from pathlib import Path

from market.instruments import DEFAULT_SYMBOL

BUNDLED_DIR: Path = Path(__file__).resolve().parent / "bundled"
"""Folder holding the bundled parquet files and their PROVENANCE.md."""


def bundled_candles_path(symbol: str = DEFAULT_SYMBOL, timeframe: str = "1h") -> Path:
    """Path of the bundled candle file ``<symbol>-<timeframe>.parquet``.

    Raises
    ------
    FileNotFoundError
        If no such file is bundled (the message names the path looked for).
    """
    return _existing(BUNDLED_DIR / f"{symbol}-{timeframe}.parquet")


def bundled_funding_path(symbol: str = DEFAULT_SYMBOL) -> Path:
    """Path of the bundled funding-rate file ``<symbol>-funding.parquet``.

    Raises
    ------
    FileNotFoundError
        If no such file is bundled (the message names the path looked for).
    """
    return _existing(BUNDLED_DIR / f"{symbol}-funding.parquet")


def _existing(path: Path) -> Path:
    if not path.is_file():
        available = sorted(p.name for p in BUNDLED_DIR.glob("*.parquet")) if BUNDLED_DIR.is_dir() else []
        raise FileNotFoundError(f"no bundled data file {path} (bundled: {available})")
    return path
