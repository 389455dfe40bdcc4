"""Settings of the live loop (:class:`serving.live.LiveLoop`) and the bar lengths it serves."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from market.config_base import StrictConfig
from market.instruments import DEFAULT_CCXT_SYMBOL

TF_MS: dict[str, int] = {
    "1m": 60_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000, "1h": 3_600_000, "4h": 14_400_000,
}  # fmt: skip
"""Bar length (ms) of each timeframe the live loop serves."""


class LiveConfig(StrictConfig):
    """Settings of :class:`LiveLoop` (units in the names)."""

    run_id: str = Field("live", min_length=1, max_length=128, description="Key of this run's rows in the store.")
    mode: Literal["testnet", "live"] = Field("testnet", description="Recorded in the live_started event (ats status).")
    symbol: str = Field(DEFAULT_CCXT_SYMBOL, description="Unified ccxt symbol.")
    timeframe: str = Field("1h", description="Bar length; one of 1m 5m 15m 30m 1h 4h.")
    context_bars: int = Field(300, ge=20, le=1500, description="Closed candles given to the policies.")
    atr_period_bars: int = Field(
        14, ge=1, description="ATR period for stop/take-profit distances of a policy that does not state its own "
        "(V2 and V1 state theirs: atr_period_bars of the bundle's features and of V1's config).")
    decision_timeout_ms: float = Field(2_000.0, gt=0, description="Deadline of the primary policy, ms.")
    close_delay_s: float = Field(3.0, ge=0, description="Wait after a bar close before polling its candle, s.")
    poll_interval_s: float = Field(1.0, gt=0, description="Minimum sleep between two steps, s.")
    max_clock_offset_ms: float = Field(
        2_500.0, gt=0, description="Largest |exchange - local| clock offset with which entries are allowed, ms."
    )
    max_leverage: int = Field(20, ge=1, le=125, description="Upper bound of the leverage set on the exchange.")
    rate_limit_max_wait_s: float = Field(30.0, gt=0, description="Longest Retry-After honoured inside a bar, s.")
    lookup_attempts: int = Field(
        3, ge=1, le=10, description="Lookups by client id (spaced, doubling) before an unconfirmed intent is resent."
    )
    lookup_spacing_s: float = Field(1.0, ge=0, description="Wait before the second lookup, s (doubles after).")
    step_retry_initial_s: float = Field(
        2.0, gt=0, description="A failed step is retried within the bar after this wait, s (doubling)."
    )
    step_retry_max_s: float = Field(60.0, gt=0, description="Longest wait between retries of a failed step, s.")
    create_settle_s: float = Field(
        30.0, ge=0, description="A market order whose create had an unknown outcome is re-sent (same client id) "
        "only when, this long after it was sent, lookups still miss it AND the trades and the position show it did "
        "not execute; longer than the exchange's order-query lag (Binance: a few seconds), s.")
    reconcile_reads: int = Field(
        3, ge=1, le=10, description="Reads of trades and position before a disagreement with the expected position "
        "is confirmed (a fill landing between the two reads resolves on a re-read).")
    reconcile_read_spacing_s: float = Field(
        1.0, ge=0, description="Wait before the second read of a reconciliation, s (doubles after).")
    with_funding: bool = Field(
        True, description="Join the funding history as ``funding_rate`` (features use it); a failed fetch "
        "quarantines the bar."
    )
    bad_candle_hold_bars: int = Field(
        2, ge=0, le=1000, description="Bars held (no policy, hold-or-flat) after an invalid or missing candle "
        "inside the context window is first seen and re-fetched in vain; then it is repaired as a gap (previous "
        "close, volume 0, candle_repaired event). The decided bar's own bad candle is always quarantined.")
