"""Instrument specifications as data: the exchange rules of one symbol, with their source and date.

An :class:`InstrumentSpec` holds what every place that moves money must know about the symbol it
trades (tick size, quantity step, minimum notional, maximum leverage, maintenance-margin brackets,
funding interval, contract type), plus where the values came from (``source``) and when they were
read (``read_on``). The env kernel (through :class:`envs.config.CostConfig`), the backtests, the paper
broker and the live intents all use this one frozen type, so a simulation and the exchange size and
round alike.

Where a spec comes from (:func:`resolve_spec`), in this order:

1. a spec file the user passes (``--instrument-spec PATH`` on the CLI, ``data.instrument_spec`` in a
   run config): JSON or YAML, the fields of :class:`InstrumentSpec` (format in the README);
2. the spec file ``ats data download`` writes next to the candles: ``<SYMBOL>.spec.json`` in the
   candle file's folder (read from the exchange: ``exchangeInfo`` filters, and the leverage brackets
   when API keys are present; see :func:`spec_from_ccxt_market`);
3. the bundled table :data:`BUNDLED_SPECS` (each value with its source document and date).

Otherwise :class:`InstrumentSpecError` names the symbol and these three ways; another symbol's spec
is never used. :func:`check_spec_fits` is the sanity guard applied whenever a spec meets data.

Sources of the formulas that use these values: Binance, "How to Calculate Liquidation Price of
USDⓈ-M Contracts" (brackets); Binance USDⓈ-M ``GET /fapi/v1/exchangeInfo`` (filters) and
``GET /fapi/v1/leverageBracket`` (brackets) API documentation.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError, model_validator

from market import json_codec
from market.config_base import StrictConfig


class InstrumentSpecError(ValueError):
    """No spec for a symbol, an unreadable or invalid spec file, or a spec that does not fit the data.

    The message names the symbol (and the file) and says what to do.
    """


SpecOrigin = Literal["instrument_spec", "data_spec_file", "bundled_table"]
"""Which of the three sources of :func:`resolve_spec` gave the spec (recorded in manifests and reports)."""

SPEC_FILE_SUFFIX = ".spec.json"
"""File name of a downloaded spec: ``<SYMBOL>.spec.json`` next to ``<SYMBOL>-<tf>.parquet``."""

MAX_TICK_FRAC_OF_PRICE = 0.001
"""Sanity guard: a tick larger than this fraction (0.1 %) of the data's median close is an error."""

MAX_LOT_NOTIONAL_MULTIPLE = 100.0
"""Sanity guard: one lot worth more than this multiple of the minimum notional (at the median close) is
an error (the spec's quantity step belongs to a much higher-priced instrument)."""


class MaintenanceBracket(StrictConfig):
    """One row of Binance's leverage-bracket table (``GET /fapi/v1/leverageBracket``).

    The bracket applies to positions whose notional is at most ``notional_cap_usdt`` (and above the
    previous row's cap); maintenance margin = notional x ``maint_margin_rate`` - ``maint_amount_usdt``
    (Binance's "cum").
    """

    notional_cap_usdt: float = Field(..., gt=0.0, description="upper notional of the bracket, USDT")
    maint_margin_rate: float = Field(..., gt=0.0, lt=1.0, description="maintenance margin rate (fraction)")
    maint_amount_usdt: float = Field(..., ge=0.0, description="maintenance amount 'cum', USDT")


class InstrumentSpec(StrictConfig):
    """Exchange rules of one USDT-margined contract, with the source of the values and the date read.

    Units: prices in USDT, quantities in base-asset units, notionals in USDT. ``lot_step_base`` is the
    quantity step (LOT_SIZE / MARKET_LOT_SIZE ``stepSize``), ``min_qty_base`` the smallest market
    order (MARKET_LOT_SIZE ``minQty``), ``max_market_qty_base`` the largest (None = no limit known),
    ``min_notional_usdt`` the MIN_NOTIONAL filter, ``max_leverage`` the first bracket's initial leverage.
    """

    symbol: str = Field(..., min_length=1, description="exchange id without separators, e.g. BTCUSDT")
    contract_type: Literal["PERPETUAL"] = Field(
        "PERPETUAL", description="only USDT-M perpetuals are modelled"
    )
    tick_size_usdt: float = Field(..., gt=0.0, description="price step, USDT (PRICE_FILTER.tickSize)")
    lot_step_base: float = Field(..., gt=0.0, description="quantity step, base units (LOT_SIZE.stepSize)")
    min_qty_base: float = Field(
        ..., gt=0.0, description="smallest order quantity, base units (MARKET_LOT_SIZE.minQty)"
    )
    max_market_qty_base: float | None = Field(
        None,
        gt=0.0,
        description="largest market order quantity, base units (MARKET_LOT_SIZE.maxQty); None = unknown",
    )
    min_notional_usdt: float = Field(
        ..., gt=0.0, description="smallest order notional, USDT (MIN_NOTIONAL.notional)"
    )
    max_leverage: int = Field(
        ..., ge=1, le=200, description="largest leverage (first bracket's initialLeverage)"
    )
    maintenance_brackets: tuple[MaintenanceBracket, ...] = Field(
        ..., min_length=1, description="leverage-bracket table, ascending notional caps"
    )
    funding_interval_hours: int = Field(8, ge=1, le=24, description="hours between funding settlements")
    source: str = Field(
        ..., min_length=1, description="where the values come from (document, endpoint, file)"
    )
    read_on: str = Field(
        ...,
        min_length=4,
        description="when the values were read: ISO date (or the dated period of the source)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> InstrumentSpec:
        if self.symbol != self.symbol.strip().upper() or not self.symbol.isalnum():
            raise ValueError(
                f"symbol must be an exchange id in capitals without separators (e.g. BTCUSDT), got {self.symbol!r}"
            )
        for name in ("tick_size_usdt", "lot_step_base", "min_qty_base", "min_notional_usdt"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{self.symbol}: {name} must be finite")
        if 24 % self.funding_interval_hours != 0:
            raise ValueError(
                f"{self.symbol}: funding_interval_hours must divide 24, got {self.funding_interval_hours}"
            )
        prev = 0.0
        for i, b in enumerate(self.maintenance_brackets):
            if not b.notional_cap_usdt > prev:
                raise ValueError(
                    f"{self.symbol}: maintenance_brackets[{i}]: caps must be ascending, got {b.notional_cap_usdt}"
                )
            prev = b.notional_cap_usdt
        return self

    def bracket_rows(self) -> tuple[tuple[float, float, float], ...]:
        """The brackets as ``(notional cap USDT, maintenance margin rate, maintenance amount USDT)`` rows."""
        return tuple(
            (b.notional_cap_usdt, b.maint_margin_rate, b.maint_amount_usdt) for b in self.maintenance_brackets
        )

    def summary(self) -> str:
        """One line for reports: symbol, tick, step, min notional, max leverage, source and date."""
        return (
            f"{self.symbol}: tick {self.tick_size_usdt:g} USDT, step {self.lot_step_base:g}, min notional "
            f"{self.min_notional_usdt:g} USDT, max leverage {self.max_leverage}x, {len(self.maintenance_brackets)} "
            f"brackets; source: {self.source} ({self.read_on})"
        )


def brackets_from_rows(rows: Any) -> tuple[MaintenanceBracket, ...]:
    """:class:`MaintenanceBracket` rows from ``(cap, rate, cum)`` triples."""
    return tuple(
        MaintenanceBracket(notional_cap_usdt=float(c), maint_margin_rate=float(r), maint_amount_usdt=float(a))
        for c, r, a in rows
    )


# ---------------------------------------------------------------------------------------------
# the bundled table
# ---------------------------------------------------------------------------------------------

_BTC_SOURCE = (
    "Binance USDT-M BTCUSDT. exchangeInfo filters (PRICE_FILTER tickSize 0.10; LOT_SIZE and MARKET_LOT_SIZE "
    "stepSize 0.001, minQty 0.001; MARKET_LOT_SIZE maxQty 120; MIN_NOTIONAL 100) as documented in the CostConfig "
    "docstring of envs/config.py (commit e634467) and served by tests/kit/fake_binance.py; maintenance brackets: "
    "the first five rows of GET /fapi/v1/leverageBracket as documented in envs/config.py (commit e634467, "
    "BTCUSDT_MAINTENANCE_BRACKETS, 'as published in 2024-2025'; moved here); max leverage 125x: bracket 1 "
    "initialLeverage in tests/kit/fake_binance.py; funding every 8 h: ../shared/data/README.md (all intervals 8 h)"
)

_FILTERS_SNAPSHOT = (
    "exchangeInfo filters (PRICE_FILTER tickSize; LOT_SIZE stepSize, minQty; MARKET_LOT_SIZE maxQty; MIN_NOTIONAL) "
    "of the USDT-M perpetual in ccxt's stored market snapshot, github.com/ccxt/ccxt "
    "ts/src/test/static/markets/binance.json @0dca8ac0a3ce97d642fd9973b3121c2d6e3e3063 (info.filters is the raw "
    "GET /fapi/v1/exchangeInfo record; the snapshot lists the BTCUSDT_231229 quarterly as trading, so it was taken "
    "before 2023-12-29). Binance later raised MIN_NOTIONAL on several symbols (BTCUSDT's is 100 in this table): "
    "refresh with `ats data download` before relying on the minimum"
)
_BRACKETS_SNAPSHOT = (
    "maintenance brackets and max leverage (bracket 1 initialLeverage): the first five rows of GET "
    "/fapi/v1/leverageBracket as stored in github.com/freqtrade/freqtrade freqtrade/exchange/"
    "binance_leverage_tiers.json @01d10aebcab25c526473c603a88e14eb7d9699cc (ccxt fetch_leverage_tiers output "
    "keeping each raw bracket; it lists the 240927 and 241227 quarterlies, so it was taken between 2024-06-28 and "
    "2024-09-27; its BTCUSDT rows equal this table's)"
)


_FILTERS_RESPONSE_2024 = (
    "exchangeInfo filters (PRICE_FILTER tickSize; LOT_SIZE and MARKET_LOT_SIZE stepSize, minQty; MARKET_LOT_SIZE "
    "maxQty; MIN_NOTIONAL) of the USDT-M perpetual in a stored raw GET /fapi/v1/exchangeInfo response "
    "(futuresType U_MARGINED), github.com/eddysan/TradingBotFest exchange_info.json "
    "@445b59f59dc7d3b5489a104a965d97101a5be23f (the same response as a Python repr at "
    "@8932e1a6439f15cd7d5d6d46afb424123392510c). Its serverTime 1727892008657 is 2024-10-02 18:00 UTC and its newest "
    "listing (DIAUSDT) has onboardDate 2024-10-02 12:30 UTC, so it was taken on 2024-10-02; it is the live exchange, "
    "not the testnet: its BTCUSDT and XRPUSDT filters equal this table's, and its ETHUSDT and LTCUSDT filters differ "
    "only in MIN_NOTIONAL (20 there, 5 in the 2023 snapshot)"
)

_SOL_GRID_NOTE = (
    "SOLUSDT's tick and step changed after this response, as the SOLUSDT 1h candles of ../shared/data/binance_usdm "
    "(2024-01-01..2025-06-30) show: all prices lie on the 0.001 grid; up to 2024-10-14 06:00 UTC 6,890 of 6,895 "
    "candles have a price off the 0.01 grid, from then on 66 of 6,233 (a 0.01 tick); volumes are whole SOL up to "
    "2025-04-09 08:00 UTC and on a 0.01 grid from then on (a finer step). No document of the later values was found, "
    "so this spec keeps the response's (tick 0.001, step 1): "
    "from 2024-10-14 the simulated tick is finer than the exchange's, and from 2025-04-09 the quantity step coarser; "
    "refresh with `ats data download` for today's values"
)


def _published_spec(
    symbol: str, *, tick: float, step: float, min_qty: float, max_market_qty: float, min_notional: float,
    max_leverage: int, brackets: tuple[tuple[float, float, float], ...],
    filters: str = _FILTERS_SNAPSHOT, filters_when: str = "before 2023-12-29", read: str = "2026-12-07",
    note: str = "",
) -> InstrumentSpec:
    """A bundled spec read from public snapshots: the filters from ``filters`` (by default the ccxt snapshot, taken
    ``filters_when``), the brackets from :data:`_BRACKETS_SNAPSHOT` (mid-2024); ``read`` is the date the values were
    read from them, ``note`` what else the source must say (e.g. a filter that changed later)."""
    return InstrumentSpec(
        symbol=symbol,
        tick_size_usdt=tick,
        lot_step_base=step,
        min_qty_base=min_qty,
        max_market_qty_base=max_market_qty,
        min_notional_usdt=min_notional,
        max_leverage=max_leverage,
        maintenance_brackets=brackets_from_rows(brackets),
        funding_interval_hours=8,
        source=f"Binance USDT-M {symbol}. {filters}; {_BRACKETS_SNAPSHOT}; funding every 8 h: "
        "../shared/data/README.md (all intervals 8 h)" + (f". {note}" if note else ""),
        read_on=f"filters {filters_when}; brackets 2024-06-28..2024-09-27 (read from the snapshots {read})",
    )


BUNDLED_SPECS: dict[str, InstrumentSpec] = {
    "BTCUSDT": InstrumentSpec(
        symbol="BTCUSDT",
        tick_size_usdt=0.1,
        lot_step_base=0.001,
        min_qty_base=0.001,
        max_market_qty_base=120.0,
        min_notional_usdt=100.0,
        max_leverage=125,
        maintenance_brackets=brackets_from_rows(
            (
                (50_000.0, 0.004, 0.0),
                (600_000.0, 0.005, 50.0),
                (3_000_000.0, 0.0065, 950.0),
                (12_000_000.0, 0.01, 11_450.0),
                (70_000_000.0, 0.02, 131_450.0),
            )
        ),
        funding_interval_hours=8,
        source=_BTC_SOURCE,
        read_on="2024-2025",
    ),
    "ETHUSDT": _published_spec(
        "ETHUSDT", tick=0.01, step=0.001, min_qty=0.001, max_market_qty=2000.0, min_notional=5.0, max_leverage=125,
        brackets=(
            (50_000.0, 0.004, 0.0),
            (600_000.0, 0.005, 50.0),
            (3_000_000.0, 0.0065, 950.0),
            (12_000_000.0, 0.01, 11_450.0),
            (50_000_000.0, 0.02, 131_450.0),
        ),
    ),
    "XRPUSDT": _published_spec(
        "XRPUSDT", tick=0.0001, step=0.1, min_qty=0.1, max_market_qty=2_000_000.0, min_notional=5.0, max_leverage=75,
        brackets=(
            (10_000.0, 0.005, 0.0),
            (20_000.0, 0.0065, 15.0),
            (160_000.0, 0.01, 85.0),
            (800_000.0, 0.02, 1_685.0),
            (1_600_000.0, 0.025, 5_685.0),
        ),
    ),
    "LTCUSDT": _published_spec(
        "LTCUSDT", tick=0.01, step=0.001, min_qty=0.001, max_market_qty=5000.0, min_notional=5.0, max_leverage=75,
        brackets=(
            (5_000.0, 0.005, 0.0),
            (10_000.0, 0.006, 5.0),
            (50_000.0, 0.01, 45.0),
            (750_000.0, 0.02, 545.0),
            (3_000_000.0, 0.05, 23_045.0),
        ),
    ),
    "SOLUSDT": _published_spec(
        "SOLUSDT", tick=0.001, step=1.0, min_qty=1.0, max_market_qty=5000.0, min_notional=5.0, max_leverage=100,
        brackets=(
            (20_000.0, 0.005, 0.0),
            (100_000.0, 0.0065, 30.0),
            (800_000.0, 0.01, 380.0),
            (4_000_000.0, 0.02, 8_380.0),
            (8_000_000.0, 0.025, 28_380.0),
        ),
        filters=_FILTERS_RESPONSE_2024, filters_when="2024-10-02", read="2026-12-08", note=_SOL_GRID_NOTE,
    ),
    "BCHUSDT": _published_spec(
        "BCHUSDT", tick=0.01, step=0.001, min_qty=0.001, max_market_qty=850.0, min_notional=20.0, max_leverage=75,
        brackets=(
            (5_000.0, 0.005, 0.0),
            (10_000.0, 0.0065, 7.5),
            (50_000.0, 0.01, 42.5),
            (500_000.0, 0.02, 542.5),
            (2_000_000.0, 0.05, 15_542.5),
        ),
        filters=_FILTERS_RESPONSE_2024, filters_when="2024-10-02", read="2026-12-08",
    ),
}
"""Specs shipped with the package, by symbol; every value has its source document and date in ``source`` and
``read_on``. BTCUSDT from this project's documented values; ETHUSDT, XRPUSDT and LTCUSDT from two public stored
snapshots (:data:`_FILTERS_SNAPSHOT`, :data:`_BRACKETS_SNAPSHOT`); SOLUSDT and BCHUSDT from a stored exchangeInfo
response of 2024-10-02 (:data:`_FILTERS_RESPONSE_2024`) and the same bracket snapshot. SOLUSDT's tick and step
changed after 2024-10-02 (:data:`_SOL_GRID_NOTE`)."""

DEFAULT_SYMBOL = "BTCUSDT"
"""The symbol of the bundled candles (``market/bundled/BTCUSDT-1h.parquet``), the default of configs."""

DEFAULT_CCXT_SYMBOL = "BTC/USDT:USDT"
""":data:`DEFAULT_SYMBOL` as a unified ccxt symbol: the default of the serving settings (which symbol to trade)."""


def bundled_spec(symbol: str) -> InstrumentSpec:
    """The bundled table's spec of ``symbol``.

    Raises
    ------
    InstrumentSpecError
        If the table has no such symbol (the message names it and the three ways to give a spec).
    """
    spec = BUNDLED_SPECS.get(symbol.upper())
    if spec is None:
        raise InstrumentSpecError(_unknown_message(symbol.upper(), None))
    return spec


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def spec_file_path(candles_path: str | os.PathLike[str], symbol: str) -> Path:
    """Where ``ats data download`` writes the spec of ``symbol``: ``<candles folder>/<SYMBOL>.spec.json``."""
    return Path(candles_path).parent / f"{symbol.upper()}{SPEC_FILE_SUFFIX}"


def load_spec_file(path: str | os.PathLike[str]) -> InstrumentSpec:
    """Parse a JSON or YAML spec file (the fields of :class:`InstrumentSpec`; YAML for ``.yaml``/``.yml``).

    Raises
    ------
    InstrumentSpecError
        If the file is missing, unreadable, not a mapping, or fails validation (the message names the
        file and the key).
    """
    path = Path(path)
    if not path.is_file():
        raise InstrumentSpecError(f"instrument spec file not found: {path}")
    try:
        text = path.read_text()
        raw = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json_codec.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise InstrumentSpecError(f"instrument spec file {path}: cannot parse: {exc}") from exc
    if not isinstance(raw, dict):
        raise InstrumentSpecError(
            f"instrument spec file {path}: top level must be a mapping, got {type(raw).__name__}"
        )
    try:
        return InstrumentSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '(spec)'}: {e['msg']}" for e in exc.errors()]
        raise InstrumentSpecError(
            f"instrument spec file {path}: invalid spec:\n  " + "\n  ".join(lines)
        ) from exc


def write_spec_file(spec: InstrumentSpec, path: str | os.PathLike[str]) -> Path:
    """Write ``spec`` as JSON to ``path`` atomically (temporary file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json_codec.dumps(spec.model_dump(mode="json"), indent=2) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# resolution
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolvedSpec:
    """A spec and where :func:`resolve_spec` found it (``origin``; ``path`` of the file, None for the table)."""

    spec: InstrumentSpec
    origin: SpecOrigin
    path: str | None = None

    def record(self) -> dict[str, Any]:
        """JSON-ready record for manifests and reports: the origin, the file and the whole spec."""
        return {"origin": self.origin, "path": self.path, "spec": self.spec.model_dump(mode="json")}

    def describe(self) -> str:
        """One line: which of the three sources gave the spec, and the spec's summary."""
        where = {
            "instrument_spec": f"spec file {self.path} (--instrument-spec / data.instrument_spec)",
            "data_spec_file": f"downloaded spec {self.path}",
            "bundled_table": "bundled table (market/instruments.py)",
        }[self.origin]
        return f"instrument spec from {where}: {self.spec.summary()}"


def resolve_spec(
    symbol: str,
    *,
    spec_path: str | os.PathLike[str] | None = None,
    candles_path: str | os.PathLike[str] | None = None,
) -> ResolvedSpec:
    """The spec of ``symbol``: from ``spec_path`` if given, else ``<SYMBOL>.spec.json`` next to
    ``candles_path`` if that file exists, else the bundled table.

    Raises
    ------
    InstrumentSpecError
        If the file is invalid, its symbol is not ``symbol``, or no source knows ``symbol`` (the message
        names the symbol and the three ways to give a spec). Never returns another symbol's spec.
    """
    symbol = symbol.strip().upper()
    if spec_path is not None:
        spec = load_spec_file(spec_path)
        _same_symbol(spec, symbol, f"spec file {spec_path}")
        return ResolvedSpec(spec, "instrument_spec", str(spec_path))
    if candles_path is not None:
        p = spec_file_path(candles_path, symbol)
        if p.is_file():
            spec = load_spec_file(p)
            _same_symbol(spec, symbol, f"downloaded spec file {p}")
            return ResolvedSpec(spec, "data_spec_file", str(p))
    if symbol in BUNDLED_SPECS:
        return ResolvedSpec(BUNDLED_SPECS[symbol], "bundled_table", None)
    raise InstrumentSpecError(_unknown_message(symbol, candles_path))


def _same_symbol(spec: InstrumentSpec, symbol: str, what: str) -> None:
    if spec.symbol != symbol:
        raise InstrumentSpecError(
            f"{what} is the spec of {spec.symbol}, but the data is {symbol}: a spec is never used for another "
            f"symbol; give the spec of {symbol}"
        )


def _unknown_message(symbol: str, candles_path: str | os.PathLike[str] | None) -> str:
    near = f" ({spec_file_path(candles_path, symbol)} does not exist)" if candles_path is not None else ""
    return (
        f"no instrument spec for {symbol}: its tick size, quantity step, minimum notional and margin brackets are "
        f"unknown, and another symbol's are never used. Give one of: (1) a spec file with --instrument-spec PATH "
        f"(or data.instrument_spec in the config; JSON or YAML, format in the README); (2) the spec "
        f"`ats data download --symbol {_ccxt_symbol(symbol)}` writes next to the candles as "
        f"{symbol}{SPEC_FILE_SUFFIX}{near}; "
        f"(3) a symbol of the bundled table ({', '.join(sorted(BUNDLED_SPECS))})"
    )


def _ccxt_symbol(symbol: str) -> str:
    """``XRPUSDT`` -> ``XRP/USDT:USDT`` (the unified form ``ats data download`` takes); other ids unchanged."""
    return f"{symbol[:-4]}/USDT:USDT" if symbol.endswith("USDT") and len(symbol) > 4 else symbol


def symbol_from_data_path(path: str | os.PathLike[str]) -> str | None:
    """The symbol in a store file name ``<SYMBOL>-<timeframe>.parquet`` (e.g. ``XRPUSDT-1h.parquet``), else None."""
    stem = Path(path).name
    if not stem.endswith(".parquet"):
        return None
    head = stem[: -len(".parquet")].split("-", 1)[0]
    return head.upper() if head.isalnum() and "-" in stem else None


# ---------------------------------------------------------------------------------------------
# the sanity guard
# ---------------------------------------------------------------------------------------------


def check_spec_fits(spec: InstrumentSpec, symbol: str, close_prices: Any) -> None:
    """Refuse a spec that does not fit the data it meets.

    Errors (each says which rule and why): ``spec.symbol`` differs from the data's ``symbol``; the tick
    is larger than :data:`MAX_TICK_FRAC_OF_PRICE` (0.1 %) of the median close; one quantity step is
    worth more than :data:`MAX_LOT_NOTIONAL_MULTIPLE` (100x) the minimum notional at the median close.

    Raises
    ------
    InstrumentSpecError
        On any of the three rules, or when ``close_prices`` holds no finite positive price.
    """
    symbol = symbol.strip().upper()
    if spec.symbol != symbol:
        raise InstrumentSpecError(
            f"instrument spec of {spec.symbol} used on {symbol} data: a spec is never used for another symbol; "
            f"give the spec of {symbol}"
        )
    prices = np.asarray(close_prices, dtype=np.float64)
    prices = prices[np.isfinite(prices) & (prices > 0)]
    if prices.size == 0:
        raise InstrumentSpecError(
            f"{symbol}: no finite positive close price to check the instrument spec against"
        )
    median = float(np.median(prices))
    if spec.tick_size_usdt > MAX_TICK_FRAC_OF_PRICE * median:
        raise InstrumentSpecError(
            f"instrument spec of {symbol} does not fit the data: tick {spec.tick_size_usdt:g} USDT is "
            f"{spec.tick_size_usdt / median:.2%} of the median close {median:.6g} USDT (more than "
            f"{MAX_TICK_FRAC_OF_PRICE:.1%}): every fill would be rounded by a large share of the price; the spec "
            f"probably belongs to a higher-priced instrument"
        )
    lot_notional = spec.lot_step_base * median
    if lot_notional > MAX_LOT_NOTIONAL_MULTIPLE * spec.min_notional_usdt:
        raise InstrumentSpecError(
            f"instrument spec of {symbol} does not fit the data: one quantity step "
            f"{spec.lot_step_base:g} is worth {lot_notional:.6g} USDT at the median close {median:.6g}, more than "
            f"{MAX_LOT_NOTIONAL_MULTIPLE:g}x the minimum notional {spec.min_notional_usdt:g} USDT: positions could "
            f"not be sized; the spec probably belongs to a lower-priced instrument"
        )


# ---------------------------------------------------------------------------------------------
# from the exchange
# ---------------------------------------------------------------------------------------------


def exchange_filters(info: dict[str, Any], symbol: str = "") -> dict[str, float | None]:
    """The spec fields in one Binance ``exchangeInfo`` symbol entry (ccxt market ``info``).

    Returns ``tick_size_usdt`` (PRICE_FILTER ``tickSize``), ``lot_step_base``, ``min_qty_base`` and
    ``max_market_qty_base`` (MARKET_LOT_SIZE, else LOT_SIZE: ``stepSize``, ``minQty``, ``maxQty``; market orders are
    what this project sends) and ``min_notional_usdt`` (MIN_NOTIONAL ``notional``). The one parser of exchange
    filters: the downloaded spec and the live broker's :class:`serving.intents.MarketRules` both use it.

    Raises
    ------
    InstrumentSpecError
        If a filter is missing, malformed, or not finite and > 0.
    """
    filters = {f.get("filterType"): f for f in info.get("filters", []) if isinstance(f, dict)}
    try:
        lot = filters.get("MARKET_LOT_SIZE") or filters["LOT_SIZE"]
        out: dict[str, float | None] = {
            "tick_size_usdt": float(filters["PRICE_FILTER"]["tickSize"]),
            "lot_step_base": float(lot["stepSize"]),
            "min_qty_base": float(lot["minQty"]),
            "max_market_qty_base": float(lot["maxQty"]) if lot.get("maxQty") else None,
            "min_notional_usdt": float(filters["MIN_NOTIONAL"]["notional"]),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise InstrumentSpecError(
            f"{symbol}: exchangeInfo filters incomplete or malformed (missing {exc})"
        ) from exc
    for k, v in out.items():
        if v is not None and not (math.isfinite(v) and v > 0):
            raise InstrumentSpecError(
                f"{symbol}: exchangeInfo filter value {k} = {v!r} is not finite and > 0"
            )
    return out


def spec_from_ccxt_market(
    market: dict[str, Any],
    brackets: list[dict[str, Any]] | None = None,
    *,
    read_on: dt.date | None = None,
    exchange_label: str = "binanceusdm",
    fallback: InstrumentSpec | None = None,
) -> InstrumentSpec:
    """A spec from one ccxt ``load_markets()`` entry (its raw ``info``: Binance ``exchangeInfo`` symbol).

    Filters read: PRICE_FILTER ``tickSize``, MARKET_LOT_SIZE (else LOT_SIZE) ``stepSize``/``minQty``/
    ``maxQty``, MIN_NOTIONAL ``notional``. ``brackets``: rows of ``GET /fapi/v1/leverageBracket``
    (``notionalCap``, ``maintMarginRatio``, ``cum``, ``initialLeverage``), read with API keys; without
    them the brackets and max leverage come from ``fallback`` (the previous spec of the same symbol),
    and the source says so.

    Raises
    ------
    InstrumentSpecError
        If a filter is missing or malformed, or there are no brackets and no fallback of the same symbol.
    """
    info = market.get("info") or {}
    symbol = str(info.get("symbol") or market.get("id") or "").upper()
    f = exchange_filters(info, symbol or str(market.get("symbol")))
    when = (read_on or dt.datetime.now(dt.UTC).date()).isoformat()
    contract = str(info.get("contractType") or "PERPETUAL")
    if contract != "PERPETUAL":
        raise InstrumentSpecError(f"{symbol}: contract type {contract} is not modelled (only PERPETUAL)")
    src = f"{exchange_label} exchangeInfo filters (ccxt load_markets)"
    if brackets:
        rows = sorted(brackets, key=lambda b: float(b["notionalCap"]))
        br = brackets_from_rows([(b["notionalCap"], b["maintMarginRatio"], b["cum"]) for b in rows])
        max_lev = int(float(rows[0]["initialLeverage"]))
        src += " and leverage brackets (GET /fapi/v1/leverageBracket)"
    elif fallback is not None and fallback.symbol == symbol:
        br, max_lev = fallback.maintenance_brackets, fallback.max_leverage
        kept = fallback.source.split("kept from: ")[-1]
        src += f"; brackets and max leverage not read (they need API keys), kept from: {kept} ({fallback.read_on})"
    else:
        raise InstrumentSpecError(
            f"{symbol}: the leverage brackets need API keys (GET /fapi/v1/leverageBracket is signed) and no earlier "
            f"spec of {symbol} is known to keep them from; set the API keys, or write the brackets into a spec file"
        )
    interval = info.get("fundingIntervalHours")
    if not interval:
        src += "; funding interval 8 h (exchangeInfo does not give it; Binance's default)"
    try:
        return InstrumentSpec(
            symbol=symbol,
            contract_type="PERPETUAL",
            **f,
            max_leverage=max_lev,
            maintenance_brackets=br,
            funding_interval_hours=int(interval) if interval else 8,
            source=src,
            read_on=when,
        )
    except ValidationError as exc:
        raise InstrumentSpecError(f"{symbol}: exchange values do not make a valid spec: {exc}") from exc
