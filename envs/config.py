"""Typed, frozen configuration of the execution/cost model (``envs.accounting``).

One :class:`CostConfig` is shared by the training env, the backtester and the serving paper
broker, so that all three charge the same fees, slippage, funding and liquidation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from market.config_base import StrictConfig
from market.instruments import DEFAULT_SYMBOL, InstrumentSpec, bundled_spec


class CostConfig(StrictConfig):
    """Costs and exchange rules of Binance USDT-M perpetual futures (isolated margin, one-way mode).

    Sources: Binance fee schedule (VIP0 USDT-M taker 0.05 %, maker 0.02 %), Binance "How to Calculate Liquidation
    Price of USDⓈ-M Contracts", Binance funding-rate documentation (settlement every ``funding_interval_hours``).

    The exchange rules of the traded symbol (tick, quantity step, minimum notional, maintenance brackets, funding
    interval) are not settings of this config: they are ``instrument``, an :class:`market.instruments.InstrumentSpec`
    with its source and date. Every run path (train, evaluate, backtest, paper, serve) resolves the spec of the
    symbol it trades (:func:`market.instruments.resolve_spec`) and sets it with :meth:`with_instrument`; the
    default (the bundled table's spec of the bundled candles' symbol) only serves code that builds an env by hand
    on the bundled data, e.g. unit tests. ``tick_size_quote``, ``lot_size_base``, ``min_notional_usdt``,
    ``maintenance_brackets`` and ``funding_interval_hours`` read the spec.

    Entry order (issue 16 lever "maker-priced entries"; default ``"market"``: today's entries, bit for bit).
    ``entry_order = "limit"`` opens a position (from flat, or the opening leg of a flip, whose close stays a market
    order) with a limit order resting from the fill bar's open at ``open * (1 - s * entry_limit_offset_bps / 1e4)``
    (s = +1 buy / -1 sell), rounded to the tick away from the market. It fills at that price, maker fee, no
    slippage, only if the bar trades *through* it (long: low < limit; short: high > limit); a bar that only
    touches it, or never reaches it, leaves the account flat and counts a missed entry (no market fallback; the
    order is taken as cancelled at the bar's end). Sized by the one sizing rule at the limit price with the maker
    fee rate (:mod:`envs.sizing`). In the fill bar the stop and liquidation are checked against the bar's adverse
    extreme (reached after the trade-through) and the take-profit against the close only (a high or low before
    the fill cannot take profit). Rebalance adds and all exits stay as configured above. Sources: the
    trade-through convention of conservative backtest fill models (a resting order's place in the queue is
    unknown, so a touch is not a fill; backtrader's and TradingView's broker emulators fill a limit on a touch,
    which is the optimistic variant); the maker rate of the Binance USDT-M fee schedule (``maker_fee_bps``).
    Live serving places no entry limit orders and refuses such a bundle (:mod:`serving.trading_rules`).
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
        "take-profit fills when take_profit_order is 'limit' and on entries when entry_order is 'limit'.",
    )
    take_profit_order: Literal["market", "limit"] = Field(
        "market",
        description="'market': a reduce-only TAKE_PROFIT_MARKET order (taker fee, adverse slippage); "
        "'limit': a resting reduce-only limit order at the level (maker fee, no slippage; fills at "
        "the open when the bar gaps through it).",
    )
    entry_order: Literal["market", "limit"] = Field(
        "market",
        description="'market': a position is opened by a market order at the next open (taker fee, adverse "
        "slippage); 'limit': by a limit order at the next open (less entry_limit_offset_bps), filled at its "
        "price only if the bar trades through it (long: low < limit; short: high > limit), maker fee, no "
        "slippage; not filled: no position (a missed entry, counted), no market fallback.",
    )
    entry_limit_offset_bps: float = Field(
        0.0,
        ge=0.0,
        le=1_000.0,
        description="With entry_order 'limit': the limit lies this many basis points of the open below it (a "
        "buy) or above it (a sell), rounded to the tick away from the market. 0: at the open.",
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
    funding_fallback_rate: float = Field(
        0.0001,
        description="Funding rate per settlement, as a fraction of position notional (0.0001 = 0.01 %, "
        "Binance's base rate), used at a funding time whose rate is NaN/missing (counted and reported).",
    )
    instrument: InstrumentSpec = Field(
        default_factory=lambda: bundled_spec(DEFAULT_SYMBOL),
        description="Exchange rules of the traded symbol, with their source (market.instruments).",
    )
    cost_multiplier: float = Field(
        1.0, ge=0.0, description="Scales fees and slippage (cost sensitivity runs: 0, 1, 2)."
    )

    @model_validator(mode="after")
    def _offset_needs_a_limit_entry(self) -> CostConfig:
        if self.entry_limit_offset_bps != 0.0 and self.entry_order != "limit":
            raise ValueError(
                f"entry_limit_offset_bps={self.entry_limit_offset_bps} is set but entry_order is "
                f"{self.entry_order!r}: the offset places a limit entry; set entry_order: limit or drop the offset"
            )
        return self

    def with_instrument(self, spec: InstrumentSpec) -> CostConfig:
        """Copy of this config with ``spec`` as the traded symbol's rules (fees, slippage and funding settings kept)."""
        return self.updated(instrument=spec)

    @property
    def symbol(self) -> str:
        """Symbol of the instrument spec."""
        return self.instrument.symbol

    @property
    def tick_size_quote(self) -> float:
        """Price step in USDT (the spec's ``tick_size_usdt``)."""
        return self.instrument.tick_size_usdt

    @property
    def lot_size_base(self) -> float:
        """Quantity step in base units (the spec's ``lot_step_base``)."""
        return self.instrument.lot_step_base

    @property
    def min_notional_usdt(self) -> float:
        """Orders with a smaller notional (USDT) are skipped and counted (the spec's ``min_notional_usdt``)."""
        return self.instrument.min_notional_usdt

    @property
    def maintenance_brackets(self) -> tuple[tuple[float, float, float], ...]:
        """(notional cap USDT, maintenance margin rate, maintenance amount cum USDT) rows, ascending caps; the first
        bracket whose cap >= position notional applies (the spec's brackets)."""
        return self.instrument.bracket_rows()

    @property
    def funding_interval_hours(self) -> int:
        """Funding settles at open times whose hour % interval == 0 and minute == 0 (the spec's interval)."""
        return self.instrument.funding_interval_hours


class TradingRulesConfig(StrictConfig):
    """When the agent may act and how a decision in the held direction is executed (issue 16, "levers").

    Every default keeps the rules the env had before these settings existed (a decision every bar, no holding
    period, a position sized once at its entry), bit for bit (``tests/envs/test_kernel_equivalence.py``).

    * ``decision_interval_bars`` k: the agent acts at the close of the bars that close at a multiple of k bars
      since the Unix epoch (``envs.accounting.is_decision_bar``; 00:00, 04:00, ... UTC for k = 4 on 1h bars: the
      rule of the ``tsmom`` baseline's rebalance bars, so training, backtests and serving agree without a
      counter). Between two decisions the env still funds, marks, and fills stops, take-profits and liquidations
      every bar. ``TradingEnv.step`` (the agent's API) reads one action and runs every bar up to the next
      decision bar; its reward is the sum of the per-bar rewards. ``TradingEnv.step_decision`` (the bar-by-bar
      API of the backtests) runs one bar and reads the decision only at a decision bar (else a hold).
    * ``min_hold_bars`` m: a decision that would close, flip or resize a position held for fewer than m bars
      (``bars_in_trade`` at the decision's close) is read as a hold; stops, take-profits and liquidation act as
      always. A hold's trailing-stop move is still honoured.
    * ``rebalance_band_frac`` b: None (default) keeps the position's size from its entry (a decision in the held
      direction is a hold). A number turns on rebalancing: a decision in the held direction sets an aim, the
      quantity the one sizing rule (:mod:`envs.sizing`) gives for the account's equity marked at the next open;
      the position is resized to the aim (a partial close or an add, at the next open, taker, adverse slippage)
      unless ``|aim - qty| < b * qty`` (the no-trade band). This approximates the no-trade region of Davis &
      Norman (1990, "Portfolio selection with transaction costs", Math. Oper. Res. 15(4)): no trade while the
      aim stays within the band around the held position; outside it the position moves all the way to the aim
      (Davis & Norman trade to the region's edge, and the band is a fixed fraction here, not derived from costs
      and risk). Gârleanu & Pedersen's (2013) partial trading towards the aim is not modelled. Closes and flips
      change the position by 100 % or more, so a band <= 1 never blocks them (``min_hold_bars`` does).
    """

    decision_interval_bars: int = Field(
        1, ge=1, description="The agent acts at bars closing at a multiple of this many bars since the epoch."
    )
    min_hold_bars: int = Field(
        0, ge=0, description="A position held for fewer bars cannot be closed, flipped or resized by a decision."
    )
    rebalance_band_frac: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="None: no resize in the held direction. A number: resize to the aim unless "
        "|aim - qty| < band * qty (fraction of the held quantity).",
    )
