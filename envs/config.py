"""Typed, frozen configuration of the execution/cost model (``envs.accounting``).

One :class:`CostConfig` is shared by the training env, the backtester and the serving paper
broker, so that all three charge the same fees, slippage, funding and liquidation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from market.config_base import StrictConfig

#: BTCUSDT-like USDT-M leverage brackets: (notional cap USDT, maintenance margin rate, maintenance
#: amount "cum" USDT), the first five rows of Binance's BTCUSDT table (``GET /fapi/v1/leverageBracket``)
#: as published in 2024-2025. Binance revises these tables; for serving, the ccxt broker reads the
#: live table, and a backtest of another symbol or period should set its own.
BTCUSDT_MAINTENANCE_BRACKETS: tuple[tuple[float, float, float], ...] = (
    (50_000.0, 0.004, 0.0),
    (600_000.0, 0.005, 50.0),
    (3_000_000.0, 0.0065, 950.0),
    (12_000_000.0, 0.01, 11_450.0),
    (70_000_000.0, 0.02, 131_450.0),
)


class CostConfig(StrictConfig):
    """Costs and exchange rules of Binance USDT-M perpetual futures (isolated margin, one-way mode).

    Sources: Binance fee schedule (VIP0 USDT-M taker 0.05 %, maker 0.02 %), Binance "How to Calculate Liquidation
    Price of USDⓈ-M Contracts", Binance funding-rate documentation (settlement every 8 h at 00/08/16
    UTC), BTCUSDT exchange filters (LOT_SIZE step 0.001, PRICE_FILTER tick 0.1, MIN_NOTIONAL 100).
    """

    taker_fee_bps: float = Field(
        5.0,
        ge=0.0,
        description="Taker fee in basis points of fill notional (VIP0 USDT-M 0.05 %); market, "
        "stop-market and take-profit-market fills are taker.",
    )
    maker_fee_bps: float = Field(
        2.0,
        ge=0.0,
        description="Maker fee in basis points of fill notional (VIP0 USDT-M 0.02 %); charged on "
        "take-profit fills when take_profit_order is 'limit'.",
    )
    take_profit_order: Literal["market", "limit"] = Field(
        "market",
        description="'market': a reduce-only TAKE_PROFIT_MARKET order (taker fee, adverse slippage); "
        "'limit': a resting reduce-only limit order at the level (maker fee, no slippage; fills at "
        "the open when the bar gaps through it).",
    )
    slippage_bps: float = Field(
        1.0, ge=0.0, description="Fixed part of slippage in basis points of price, adverse, per fill."
    )
    slippage_atr_coef: float = Field(
        0.05,
        ge=0.0,
        description="Volatility part of slippage: coef x ATR%, where ATR% = ATR of the decision bar "
        "(price units) / the reference price of the fill bar (its open).",
    )
    maintenance_brackets: tuple[tuple[float, float, float], ...] = Field(
        BTCUSDT_MAINTENANCE_BRACKETS,
        description="(notional cap USDT, maintenance margin rate, maintenance amount cum USDT), ascending "
        "caps; the first bracket whose cap >= position notional applies.",
    )
    funding_interval_hours: int = Field(
        8,
        ge=1,
        le=24,
        description="Funding settles at open times whose hour % interval == 0 and minute == 0.",
    )
    funding_fallback_rate: float = Field(
        0.0001,
        description="Funding rate per settlement, as a fraction of position notional (0.0001 = 0.01 %, "
        "Binance's base rate), used at a funding time whose rate is NaN/missing (counted and reported).",
    )
    lot_size_base: float = Field(
        0.001, gt=0.0, description="Quantity step in base units (BTCUSDT 0.001 BTC)."
    )
    tick_size_quote: float = Field(0.1, gt=0.0, description="Price step in USDT (BTCUSDT 0.1).")
    min_notional_usdt: float = Field(
        100.0, ge=0.0, description="Orders with a smaller notional (USDT) are skipped and counted."
    )
    cost_multiplier: float = Field(
        1.0, ge=0.0, description="Scales fees and slippage (cost sensitivity runs: 0, 1, 2)."
    )

    @field_validator("maintenance_brackets")
    @classmethod
    def _check_brackets(
        cls, value: tuple[tuple[float, float, float], ...]
    ) -> tuple[tuple[float, float, float], ...]:
        if not value:
            raise ValueError("maintenance_brackets must hold at least one bracket")
        prev_cap = 0.0
        for i, (cap, mmr, cum) in enumerate(value):
            if not cap > prev_cap:
                raise ValueError(f"maintenance_brackets[{i}]: caps must be positive and ascending, got {cap}")
            if not 0.0 < mmr < 1.0:
                raise ValueError(
                    f"maintenance_brackets[{i}]: maintenance margin rate must be in (0, 1), got {mmr}"
                )
            if cum < 0.0:
                raise ValueError(f"maintenance_brackets[{i}]: maintenance amount must be >= 0, got {cum}")
            prev_cap = cap
        return value

    @model_validator(mode="after")
    def _check_interval(self) -> CostConfig:
        if 24 % self.funding_interval_hours != 0:
            raise ValueError(f"funding_interval_hours must divide 24, got {self.funding_interval_hours}")
        return self
