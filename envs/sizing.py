"""The one sizing rule: a decision to open a position -> quantity, margin, exchange leverage, stop and take-profit.

Every place that opens a position uses it: the env kernel's entry (:func:`envs.kernel.bar_step`, hence the
training envs, the backtests and the paper broker, which all run the kernel) calls the compiled core
:func:`size_position`; the live intents (:mod:`serving.intents`) call the same compiled functions through the
typed wrappers :func:`size_entry`, :func:`protective_prices` and :func:`exchange_leverage`. So for the same
reference price, equity and decision, training, paper and live give the same quantity, margin, integer
exchange leverage and stop / take-profit prices (tested: ``tests/envs/test_sizing_parity.py``).

The rule (Binance USDⓈ-M, isolated margin, one-way mode)
----------------------------------------------------------
Inputs: equity E (USDT; the free balance of a flat account), ``size_frac`` f in [0, 1], requested leverage
L_req >= 1, reference price P (USDT; the kernel: its simulated fill, the next open with adverse slippage rounded
to the tick, or for a limit entry, ``CostConfig.entry_order = "limit"``, the limit price; live: the close of the
decided bar, its best estimate of that fill), taker fee rate r (fraction of notional; the maker rate for a limit
entry, the fee it pays), side s = +1 long / -1 short, the symbol's rules (tick, step, min quantity, max market quantity, min
notional, max leverage; :class:`market.instruments.InstrumentSpec`, i.e. Binance ``exchangeInfo`` filters
PRICE_FILTER / MARKET_LOT_SIZE / MIN_NOTIONAL and the first leverage bracket's ``initialLeverage``).

1. ``L = min(L_req, max_leverage)``; exchange leverage ``L_x = ceil(L)``, the smallest integer >= L (Binance takes
   an integer leverage, ``POST /fapi/v1/leverage``).
2. margin budget ``B = min(f E, E / (1 + L r))`` (0 if E <= 0): the margin plus the entry fee never exceed E.
3. quantity ``Q = floor(B L / P, step)``, capped at ``floor(max_market_qty, step)``: the notional ``N = Q P`` is
   sized with the *requested* leverage L, so rounding the leverage up does not change it.
4. no trade (a reason, no error) when B <= 0, ``Q < min_qty`` or ``N < min_notional``.
5. margin ``M = N / L_x``: the isolated margin the exchange takes at the integer leverage (<= B, since L_x >= L);
   the kernel computes the liquidation price from it, ``LP = (M + cum - s Q P) / (Q MMR - s Q)`` (Binance, "How
   to Calculate Liquidation Price of USDⓈ-M Contracts"; ``../shared/reference/formulas.md``).
6. stop ``P - s stop_atr ATR`` and take-profit ``P + s take_profit_atr ATR``, each rounded to the **nearest tick**
   (tick count rounded half to even, then to the tick's decimals + 2 to drop the float noise of ``n * tick``): at
   most half a tick from the ATR distance asked. This is the one tick rule of an entry's protective prices
   (a trailing stop move is rounded conservatively instead, see :func:`envs.kernel.move_stop`).

Volatility targeting (``ActionConfig.sizing_mode = "vol_target"``)
------------------------------------------------------------------
The size action u in [0, 1] scales a target annualised volatility: the exposure (notional / equity) is
``L = min(u * target_vol_annual / sigma, max_leverage)`` with sigma the ex-ante annualised volatility at the
decision bar (:func:`ex_ante_vol_annual`; Moskowitz, Ooi & Pedersen 2012; Zhang, Zohren & Roberts 2020 scale
positions the same way). It is not a second sizing formula: :func:`vol_target_decision` only turns L into the
decision's ``leverage = max(1, L)`` and ``size_frac = min(1, L)``, and the rule above sizes the order from them
(notional ``L E``, less step 2's fee reserve when L > 1).

Units: prices and notionals USDT, quantities base-asset units, leverage dimensionless, fee rate a fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numba import njit

# Same compile options as envs.kernel (the kernel inlines these functions into its entry). Numba's on-disk
# cache of a function is invalidated by changes to its own file only: after editing this file, delete the
# kernel's cache (envs/__pycache__/kernel.*.nbi and .nbc) or touch envs/kernel.py, else the kernel keeps the
# old rule while the Python wrappers below run the new one (tests/envs/test_sizing_parity.py would fail).
_NUMBA_OPTS: dict[str, Any] = {"cache": True, "nogil": True, "boundscheck": False, "_nrt": False}
_INLINE_OPTS: dict[str, Any] = {**_NUMBA_OPTS, "inline": "always"}

#: Binance's largest USDⓈ-M leverage; the cap of rules that do not state their own.
BINANCE_MAX_LEVERAGE = 125

# Return codes of the compiled core.
SIZE_OK = 0
SIZE_NO_BUDGET = 1  # equity <= 0 or size_frac == 0: no margin to trade with
SIZE_MIN_QTY = 2  # quantity below the minimum order quantity
SIZE_MIN_NOTIONAL = 3  # notional below the minimum notional
SIZE_BAD_INPUT = 4  # a non-finite or out-of-range input: never a trade


class SizingError(ValueError):
    """A non-finite or out-of-range input to the sizing rule (the message names it)."""


# ---------------------------------------------------------------------------------------------
# Compiled core
# ---------------------------------------------------------------------------------------------


@njit(**_INLINE_OPTS)
def round_decimals(x, pow10):  # pragma: no cover - compiled
    """``round(x, d)`` for ``pow10 = 10.0 ** d`` (0 <= d <= 22, finite x): numba's own algorithm for
    ``round(x, d)`` with the power precomputed (scale, round half to even, unscale)."""
    return np.rint(x * pow10) / pow10


@njit(**_INLINE_OPTS)
def round_price(price, tick, mode, pow10):  # pragma: no cover - compiled
    """Round to the tick: mode +1 up, -1 down, 0 nearest (half to even, like Python's ``round``),
    then to ``log10(pow10)`` decimals (removes the float noise of ``n * tick``)."""
    k = price / tick
    if mode > 0:
        n = math.ceil(k - 1e-9)
    elif mode < 0:
        n = math.floor(k + 1e-9)
    else:
        n = round(k)
    return round_decimals(n * tick, pow10)


@njit(**_INLINE_OPTS)
def integer_leverage(leverage, max_leverage):  # pragma: no cover - compiled
    """``(L, L_x)``: the requested leverage capped at ``max_leverage`` and the smallest integer >= it."""
    lev = min(leverage, max_leverage)
    return lev, max(1, math.ceil(lev))


@njit(**_INLINE_OPTS)
def entry_size(equity, size_frac, leverage, price, fee_rate, step, min_qty, max_qty, min_notional, max_leverage,
               step_pow10):  # pragma: no cover - compiled  # fmt: skip
    """Steps 1-5 of the module rule.

    Returns
    -------
    (code, qty, notional, margin, exchange_leverage) : tuple[int, float, float, float, int]
        ``code`` :data:`SIZE_OK` or why there is no trade; on a skip ``qty`` and ``notional`` are those of the
        order that would have been sent (for the reason), ``margin`` is 0.
    """
    if not (math.isfinite(equity) and math.isfinite(size_frac) and math.isfinite(leverage)
            and math.isfinite(price) and math.isfinite(fee_rate) and price > 0.0 and leverage >= 1.0
            and 0.0 <= size_frac <= 1.0 and fee_rate >= 0.0 and max_leverage >= 1.0):  # fmt: skip
        return SIZE_BAD_INPUT, 0.0, 0.0, 0.0, 1
    lev, lev_x = integer_leverage(leverage, max_leverage)
    margin_budget = min(size_frac * equity, equity / (1.0 + lev * fee_rate)) if equity > 0 else 0.0
    notional_budget = margin_budget * lev
    n_lots = math.floor(notional_budget / price / step + 1e-9)
    while n_lots > 0 and n_lots * step * price > notional_budget * (1.0 + 1e-12):
        n_lots -= 1
    if math.isfinite(max_qty):
        n_lots = min(n_lots, math.floor(max_qty / step + 1e-9))
    qty = round_decimals(n_lots * step, step_pow10)
    notional = qty * price
    if not margin_budget > 0.0:
        return SIZE_NO_BUDGET, qty, notional, 0.0, lev_x
    if qty <= 0.0 or qty < min_qty - 1e-9 * step:
        return SIZE_MIN_QTY, qty, notional, 0.0, lev_x
    if notional < min_notional:
        return SIZE_MIN_NOTIONAL, qty, notional, 0.0, lev_x
    return SIZE_OK, qty, notional, notional / lev_x, lev_x


@njit(**_INLINE_OPTS)
def protective_levels(side, price, atr, stop_atr, tp_atr, tick, tick_pow10):  # pragma: no cover - compiled
    """Step 6 of the module rule: ``(stop, take_profit)`` of a position of ``side`` entered at ``price``."""
    return (round_price(price - side * stop_atr * atr, tick, 0, tick_pow10),
            round_price(price + side * tp_atr * atr, tick, 0, tick_pow10))  # fmt: skip


@njit(**_INLINE_OPTS)
def size_position(equity, size_frac, leverage, price, fee_rate, atr, stop_atr, tp_atr, side, tick, step, min_qty,
                  max_qty, min_notional, max_leverage, tick_pow10, step_pow10):  # pragma: no cover  # fmt: skip
    """The whole rule (module docstring) in one call; the kernel's entry runs it.

    Returns
    -------
    (code, qty, notional, margin, exchange_leverage, stop, take_profit) : tuple[int, float, float, float, int, float, float]
        As :func:`entry_size`, plus the protective prices (NaN on :data:`SIZE_BAD_INPUT`).
    """
    if not (math.isfinite(atr) and math.isfinite(stop_atr) and math.isfinite(tp_atr) and atr > 0.0
            and stop_atr > 0.0 and tp_atr > 0.0 and (side == 1 or side == -1)):  # fmt: skip
        return SIZE_BAD_INPUT, 0.0, 0.0, 0.0, 1, np.nan, np.nan
    code, qty, notional, margin, lev_x = entry_size(equity, size_frac, leverage, price, fee_rate, step, min_qty,
                                                    max_qty, min_notional, max_leverage, step_pow10)  # fmt: skip
    if code == SIZE_BAD_INPUT:
        return code, qty, notional, margin, lev_x, np.nan, np.nan
    stop, tp = protective_levels(side, price, atr, stop_atr, tp_atr, tick, tick_pow10)
    return code, qty, notional, margin, lev_x, stop, tp


@njit(**_INLINE_OPTS)
def vol_target_decision(u, target_vol_annual, vol_annual, max_leverage):  # pragma: no cover - compiled
    """Volatility-targeted sizing (module docstring, "Volatility targeting"): ``(leverage, size_frac)`` of the
    decision that holds the exposure ``L = min(u * target_vol_annual / vol_annual, max_leverage)``.

    ``(1.0, 0.0)`` (no margin budget, so no trade) when ``u <= 0`` or an input is not finite or
    ``vol_annual <= 0`` (no volatility estimate yet)."""
    if not (math.isfinite(u) and math.isfinite(target_vol_annual) and math.isfinite(vol_annual)
            and math.isfinite(max_leverage) and u > 0.0 and vol_annual > 0.0):  # fmt: skip
        return 1.0, 0.0
    lev = min(u * target_vol_annual / vol_annual, max_leverage)
    return max(1.0, lev), min(1.0, lev)


# ---------------------------------------------------------------------------------------------
# Typed Python wrappers
# ---------------------------------------------------------------------------------------------


def decimals_pow10(step: float) -> float:
    """``10.0 ** d`` with ``d = max(0, ceil(-log10(step))) + 2``: the decimals kept when rounding a multiple of
    ``step`` (2 more than the step's own), as the compiled rounding takes it."""
    return 10.0 ** (max(0, math.ceil(-math.log10(step))) + 2)


class InstrumentRules(Protocol):
    """What the rule reads of a symbol (units in the names); :class:`SizingRules` and
    :class:`serving.intents.MarketRules` both provide it."""

    @property
    def tick_size_usdt(self) -> float:
        """Price tick, USDT."""

    @property
    def step_size_base(self) -> float:
        """Quantity step, base asset."""

    @property
    def min_qty_base(self) -> float:
        """Smallest order quantity, base asset."""

    @property
    def min_notional_usdt(self) -> float:
        """Smallest order notional, USDT."""

    @property
    def max_qty_base(self) -> float:
        """Largest market order quantity, base asset (``inf`` when unlimited)."""

    @property
    def max_leverage(self) -> int:
        """Largest exchange leverage (integer)."""


@dataclass(frozen=True, slots=True)
class SizingRules:
    """The symbol's rules the sizing reads: tick (USDT), quantity step, min and max market quantity (base units;
    max ``inf`` = none known), min notional (USDT), max leverage (integer >= 1).

    Raises
    ------
    SizingError
        A value not finite and > 0 (``max_qty_base`` may be ``inf``), or ``max_leverage`` not an integer >= 1.
    """

    tick_size_usdt: float
    step_size_base: float
    min_qty_base: float
    min_notional_usdt: float
    max_qty_base: float = math.inf
    max_leverage: int = BINANCE_MAX_LEVERAGE

    def __post_init__(self) -> None:
        check_rules(self)

    @classmethod
    def from_spec(cls, spec: object) -> SizingRules:
        """The rules of a :class:`market.instruments.InstrumentSpec` (``max_market_qty_base`` None -> ``inf``)."""
        mx = spec.max_market_qty_base  # type: ignore[attr-defined]
        return cls(tick_size_usdt=spec.tick_size_usdt, step_size_base=spec.lot_step_base,  # type: ignore[attr-defined]
                   min_qty_base=spec.min_qty_base, min_notional_usdt=spec.min_notional_usdt,  # type: ignore[attr-defined]
                   max_qty_base=math.inf if mx is None else float(mx),
                   max_leverage=int(spec.max_leverage))  # type: ignore[attr-defined]  # fmt: skip


def check_rules(rules: InstrumentRules) -> None:
    """Raise :class:`SizingError` unless tick, step, min quantity and min notional are finite and > 0, the max
    quantity > 0 (``inf`` allowed) and the max leverage an integer >= 1."""
    for name in ("tick_size_usdt", "step_size_base", "min_qty_base", "min_notional_usdt"):
        v = getattr(rules, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise SizingError(f"rules.{name} must be finite and > 0, got {v!r}")
    mx = rules.max_qty_base
    if not (isinstance(mx, (int, float)) and mx > 0):
        raise SizingError(f"rules.max_qty_base must be > 0 (inf: no limit), got {mx!r}")
    ml = rules.max_leverage
    if isinstance(ml, bool) or not isinstance(ml, int) or ml < 1:
        raise SizingError(f"rules.max_leverage must be an integer >= 1, got {ml!r}")


@dataclass(frozen=True, slots=True)
class EntrySize:
    """Result of :func:`size_entry`.

    ``quantity_base`` (> 0 when traded, else 0), ``notional_usdt = quantity * price`` and ``margin_usdt =
    notional / exchange_leverage`` (0 when not traded); ``leverage`` is the requested leverage after the max
    leverage cap (it sized the notional), ``exchange_leverage`` the integer to set on the exchange;
    ``stop_price`` / ``take_profit_price`` (USDT, tick-rounded) when asked for, else None; ``skip_reason`` says
    why there is no trade (None when traded).
    """

    quantity_base: float
    notional_usdt: float
    margin_usdt: float
    leverage: float
    exchange_leverage: int
    stop_price: float | None
    take_profit_price: float | None
    skip_reason: str | None

    @property
    def traded(self) -> bool:
        """True when an order is to be sent."""
        return self.skip_reason is None


def _finite(name: str, value: object, *, positive: bool = False, at_least: float | None = None) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SizingError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(x):
        raise SizingError(f"{name} must be finite, got {value!r}")
    if positive and not x > 0:
        raise SizingError(f"{name} must be finite and > 0, got {value!r}")
    if at_least is not None and x < at_least:
        raise SizingError(f"{name} must be >= {at_least:g}, got {value!r}")
    return x


def _side(side: object) -> int:
    if side not in (-1, 1) or isinstance(side, bool):
        raise SizingError(f"side must be -1 or +1, got {side!r}")
    return int(side)


def size_entry(
    *,
    side: int,
    equity_usdt: float,
    size_frac: float,
    leverage: float,
    price_usdt: float,
    fee_rate: float,
    rules: InstrumentRules,
    atr_usdt: float | None = None,
    stop_atr: float | None = None,
    take_profit_atr: float | None = None,
) -> EntrySize:
    """Size a new position by the module rule (runs the compiled :func:`size_position`, the kernel's code).

    Parameters
    ----------
    side : int
        +1 long, -1 short.
    equity_usdt : float
        Equity (USDT) of the flat account, finite (<= 0: no trade, with a reason).
    size_frac : float
        Fraction of equity used as margin, in [0, 1].
    leverage : float
        Requested leverage, finite >= 1 (capped at ``rules.max_leverage``).
    price_usdt : float
        Reference price (USDT, finite > 0) that sizes the order and anchors the stop / take-profit.
    fee_rate : float
        Taker fee as a fraction of notional (finite >= 0), e.g. 0.0005.
    rules : InstrumentRules
        The symbol's tick, step, min/max quantity, min notional and max leverage.
    atr_usdt, stop_atr, take_profit_atr : float, optional
        ATR (USDT, > 0) and the stop / take-profit distances in ATRs (> 0): give all three for the protective
        prices, or none (``stop_price`` / ``take_profit_price`` are then None).

    Returns
    -------
    EntrySize

    Raises
    ------
    SizingError
        A non-finite or out-of-range input (named in the message), bad rules, or only some of the ATR inputs.
        Never a trade on a non-finite number.
    """
    s = _side(side)
    eq = _finite("equity_usdt", equity_usdt)
    frac = _finite("size_frac", size_frac)
    if not 0.0 <= frac <= 1.0:
        raise SizingError(f"size_frac must be in [0, 1], got {size_frac!r}")
    lev = _finite("leverage", leverage, at_least=1.0)
    price = _finite("price_usdt", price_usdt, positive=True)
    fee = _finite("fee_rate", fee_rate, at_least=0.0)
    check_rules(rules)
    given = [x is not None for x in (atr_usdt, stop_atr, take_profit_atr)]
    if any(given) and not all(given):
        raise SizingError("give atr_usdt, stop_atr and take_profit_atr together (or none of them)")
    tick, step = float(rules.tick_size_usdt), float(rules.step_size_base)
    args = (eq, frac, lev, price, fee)
    tail = (step, float(rules.min_qty_base), float(rules.max_qty_base), float(rules.min_notional_usdt),
            float(rules.max_leverage))  # fmt: skip
    stop: float | None = None
    tp: float | None = None
    if all(given):
        atr = _finite("atr_usdt", atr_usdt, positive=True)
        sa = _finite("stop_atr", stop_atr, positive=True)
        ta = _finite("take_profit_atr", take_profit_atr, positive=True)
        code, qty, notional, margin, lev_x, stop, tp = size_position(
            *args, atr, sa, ta, s, tick, *tail, decimals_pow10(tick), decimals_pow10(step))
    else:
        code, qty, notional, margin, lev_x = entry_size(*args, *tail, decimals_pow10(step))
    if code == SIZE_BAD_INPUT:  # pragma: no cover - the checks above come first
        raise SizingError(f"sizing rejected its inputs: {args}")
    capped = min(lev, float(rules.max_leverage))
    reason: str | None = None
    if code == SIZE_NO_BUDGET:
        reason = f"no margin budget (equity {eq} USDT, size_frac {frac})"
    elif code == SIZE_MIN_QTY:
        reason = f"qty {qty} below min_qty {rules.min_qty_base}"
    elif code == SIZE_MIN_NOTIONAL:
        reason = f"notional {notional:.2f} USDT below min_notional {rules.min_notional_usdt}"
    if reason is not None:
        qty, notional, margin = 0.0, 0.0, 0.0
    return EntrySize(float(qty), float(notional), float(margin), capped, int(lev_x),
                     None if stop is None else float(stop), None if tp is None else float(tp), reason)  # fmt: skip


def protective_prices(
    side: int, price_usdt: float, atr_usdt: float, stop_atr: float, take_profit_atr: float, tick_size_usdt: float
) -> tuple[float, float]:
    """``(stop, take_profit)`` (USDT) of a position of ``side`` entered at ``price_usdt``: step 6 of the module rule
    (nearest tick), the compiled code the kernel's entry runs.

    Raises
    ------
    SizingError
        ``side`` not +-1, or a non-finite / non-positive price, ATR, distance or tick.
    """
    s = _side(side)
    price = _finite("price_usdt", price_usdt, positive=True)
    atr = _finite("atr_usdt", atr_usdt, positive=True)
    sa = _finite("stop_atr", stop_atr, positive=True)
    ta = _finite("take_profit_atr", take_profit_atr, positive=True)
    tick = _finite("tick_size_usdt", tick_size_usdt, positive=True)
    stop, tp = protective_levels(s, price, atr, sa, ta, tick, decimals_pow10(tick))
    return float(stop), float(tp)


def exchange_leverage(leverage: float, max_leverage: int = BINANCE_MAX_LEVERAGE) -> int:
    """The integer leverage to set on the exchange for a requested ``leverage``: ``ceil(min(leverage,
    max_leverage))`` (step 1 of the module rule).

    Raises
    ------
    SizingError
        ``leverage`` not finite or < 1, or ``max_leverage`` not an integer >= 1.
    """
    lev = _finite("leverage", leverage, at_least=1.0)
    if isinstance(max_leverage, bool) or not isinstance(max_leverage, int) or max_leverage < 1:
        raise SizingError(f"max_leverage must be an integer >= 1, got {max_leverage!r}")
    return int(integer_leverage(lev, float(max_leverage))[1])


def round_to_tick(price_usdt: float, tick_size_usdt: float, mode: int) -> float:
    """``price_usdt`` rounded to the tick (mode +1 up, -1 down, 0 nearest half to even), the kernel's rounding.

    Raises
    ------
    SizingError
        Non-finite price, or a tick not finite and > 0.
    """
    price = _finite("price_usdt", price_usdt)
    tick = _finite("tick_size_usdt", tick_size_usdt, positive=True)
    return float(round_price(price, tick, int(mode), decimals_pow10(tick)))


#: Seconds in a year of 24/7 trading (the annualisation of :func:`ex_ante_vol_annual`, as ``training.baselines``).
SECONDS_PER_YEAR = 365.0 * 86_400.0


def ex_ante_vol_annual(close: np.ndarray, bar_interval_s: float, span_bars: int, min_bars: int) -> np.ndarray:
    """Ex-ante annualised volatility at each close, from the closes at or before it (causal).

    ``sigma_t = sqrt(bars per year) * EWSD_t``, where ``EWSD_t`` is the exponentially weighted standard deviation
    of the 1-bar simple returns ``close[j] / close[j - 1] - 1``, ``j <= t`` (pandas ``ewm(span=span_bars,
    adjust=True).std(bias=True)``: weight ``(1 - alpha) ** i`` of the return ``i`` bars back, ``alpha = 2 /
    (span + 1)``, returns demeaned by their weighted mean; Moskowitz, Ooi & Pedersen 2012 eq. (1), the estimator
    of ``training.baselines.ewma_vol`` without its truncation of the weights after two spans) and ``bars per year
    = 365 * 86400 / bar_interval_s``.

    Parameters
    ----------
    close : np.ndarray
        float (T,), closes in USDT, oldest first, finite and > 0.
    bar_interval_s : float
        Bar length in seconds, > 0.
    span_bars : int
        EWMA span, >= 1.
    min_bars : int
        Returns needed before an estimate is given (NaN before), >= 1.

    Returns
    -------
    np.ndarray
        float64 (T,), annualised volatility (fraction: 0.4 = 40 %); NaN at the first ``min_bars`` closes.

    Raises
    ------
    ValueError
        A non-positive bar interval, span or ``min_bars``.
    """
    if not (math.isfinite(bar_interval_s) and bar_interval_s > 0 and span_bars >= 1 and min_bars >= 1):
        raise ValueError(f"need bar_interval_s > 0, span_bars >= 1, min_bars >= 1; got {bar_interval_s}, "
                         f"{span_bars}, {min_bars}")  # fmt: skip
    import pandas as pd

    c = pd.Series(np.asarray(close, dtype=np.float64))
    sd = c.pct_change().ewm(span=span_bars, adjust=True, min_periods=min_bars).std(bias=True)
    return sd.to_numpy(dtype=np.float64) * math.sqrt(SECONDS_PER_YEAR / bar_interval_s)


def vol_target_fields(size_action: float, target_vol_annual: float, vol_annual: float,
                      max_leverage: float) -> tuple[float, float]:  # fmt: skip
    """``(leverage, size_frac)`` of a volatility-targeted decision (the compiled :func:`vol_target_decision`,
    the code the env kernel runs).

    ``size_action`` in [0, 1] scales ``target_vol_annual``; the exposure (notional / equity) is
    ``L = min(size_action * target_vol_annual / vol_annual, max_leverage)``, returned as ``leverage = max(1, L)``
    and ``size_frac = min(1, L)``, so the one sizing rule (:func:`size_entry`) gives the notional ``L * equity``
    (less the fee reserve of its step 2 when L > 1). A volatility that is NaN or <= 0 (no estimate) or
    ``size_action <= 0`` gives ``(1.0, 0.0)``: no margin budget, no trade.

    Raises
    ------
    SizingError
        ``size_action`` outside [0, 1], or a target volatility or max leverage not finite and > 0.
    """
    u = _finite("size_action", size_action)
    if not 0.0 <= u <= 1.0:
        raise SizingError(f"size_action must be in [0, 1], got {size_action!r}")
    tv = _finite("target_vol_annual", target_vol_annual, positive=True)
    ml = _finite("max_leverage", max_leverage, at_least=1.0)
    vol = float(vol_annual) if isinstance(vol_annual, (int, float, np.floating)) else math.nan
    lev, frac = vol_target_decision(u, tv, vol, ml)
    return float(lev), float(frac)


__all__ = [
    "BINANCE_MAX_LEVERAGE",
    "SECONDS_PER_YEAR",
    "SIZE_BAD_INPUT",
    "SIZE_MIN_NOTIONAL",
    "SIZE_MIN_QTY",
    "SIZE_NO_BUDGET",
    "SIZE_OK",
    "EntrySize",
    "InstrumentRules",
    "SizingError",
    "SizingRules",
    "check_rules",
    "decimals_pow10",
    "entry_size",
    "ex_ante_vol_annual",
    "exchange_leverage",
    "integer_leverage",
    "protective_levels",
    "protective_prices",
    "round_decimals",
    "round_price",
    "round_to_tick",
    "size_entry",
    "size_position",
    "vol_target_decision",
    "vol_target_fields",
]  # fmt: skip
