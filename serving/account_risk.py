"""The account's risk guard of a multi-symbol run: limits across symbols, on one account's equity.

Each symbol keeps its own :class:`serving.risk.RiskGuard` (scope ``symbol:<SYMBOL>``): its kill switches (fast and
slow, over that symbol's round trips), its entry leverage and notional caps (``risk:`` of ``configs/serve.yaml``).
In a multi-symbol run the per-symbol guards do not apply the daily-loss and drawdown limits (a symbol's book is
not the account): :class:`AccountGuard` (scope ``account``) does, on the account's equity, together with the
limits only the account can see (``account_risk:`` of ``configs/serve.yaml``, :class:`AccountRiskConfig`):

* total notional: ``sum |qty| * close`` over the symbols <= ``max_total_notional_usdt``;
* total margin: ``sum notional / leverage`` <= ``max_total_margin_frac * equity``;
* total leverage: total notional / account equity <= ``max_total_leverage``;
* per-symbol leverage on the account: a symbol's notional / account equity <= ``max_symbol_leverage``;
* correlation-aware cap: the sum of the notional of positions on the same side (all longs, or all shorts)
  <= ``max_same_direction_notional_usdt`` (crypto perpetuals move together: two longs are close to one larger long);
* daily loss and drawdown of the account's equity (REDUCING / HALTED as in :mod:`serving.risk`), and the account's
  fast and slow kill switches over every symbol's round trips (HALTED; sticky, ``ats serve reset-risk --scope
  account``).

Decision order (deterministic, :func:`gate_account`): the bar's decisions of all symbols are reviewed together,
**exits and holds first, then entries, each in symbol order** (sorted by exchange id). Exits always pass (in HALTED
with ``flatten_on_halt`` a held position is closed); they free room before any entry is weighed. Each entry is
then checked against the positions that remain plus the entries already accepted this bar; one that does not fit is
clipped to the room left (``oversize_action: clip``) or refused (``refuse``: the decision becomes flat, a
reversal then only closes). An open position is never reduced by a limit (a target-position decision cannot
express a partial close). Notional of an entry: ``size_frac * sizing equity * leverage`` (the equity the symbol
sizes on: its sleeve in paper, :mod:`serving.portfolio`).

The gating is a pure function; :class:`AccountGuard` holds the account's state (through a
:class:`serving.risk.RiskGuard` of scope ``account``, persisted in the store) and never raises: on a failure
the account goes HALTED and only exits pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import pandas as pd
from pydantic import Field

from market.config_base import StrictConfig
from market.decision import Decision
from serving.risk import GuardVerdict, RiskConfig, RiskGuard, RiskState
from serving.store import StateStore

ACCOUNT_SCOPE = "account"


def symbol_scope(symbol: str) -> str:
    """The risk-state scope of ``symbol``'s own guard in a multi-symbol run (``symbol:BTCUSDT``)."""
    return f"symbol:{symbol}"


class AccountRiskConfig(StrictConfig):
    """Limits of the :class:`AccountGuard` (fractions of account equity, 0.05 = 5 %; None disables a limit)."""

    max_total_notional_usdt: float | None = Field(
        500_000.0, gt=0.0, description="Largest sum of the symbols' notional (|qty| * close), USDT.")
    max_total_margin_frac: float | None = Field(
        0.9, gt=0.0, description="Largest sum of the positions' initial margin (notional / leverage), as a fraction "
        "of the account equity.")
    max_total_leverage: float | None = Field(
        5.0, gt=0.0, description="Largest total notional / account equity.")
    max_symbol_leverage: float | None = Field(
        3.0, gt=0.0, description="Largest notional of one symbol / account equity.")
    max_same_direction_notional_usdt: float | None = Field(
        300_000.0, gt=0.0, description="Largest sum of the notional of the positions on one side (longs, or "
        "shorts), USDT: the correlation-aware cap.")
    oversize_action: Literal["clip", "refuse"] = Field(
        "clip", description="An entry above an account limit is clipped to the room left, or refused (flat).")
    daily_loss_limit_frac: float | None = Field(
        0.05, gt=0.0, le=1.0,
        description="Loss of the account's marked equity since the start of the UTC day that sets REDUCING.")
    max_drawdown_halt_frac: float | None = Field(
        0.30, gt=0.0, le=1.0, description="Drawdown of the account's marked equity from its peak that sets HALTED.")
    fast_kill_consecutive_losses: int | None = Field(
        15, ge=1, description="Consecutive losing round trips, all symbols together, that set HALTED.")
    slow_kill_min_profit_factor: float | None = Field(
        0.8, gt=0.0, description="Profit factor over the account's last slow_kill_window_trades below which HALTED.")
    slow_kill_window_trades: int = Field(100, ge=1, description="Round trips the account's slow kill switch spans.")
    flatten_on_halt: bool = Field(True, description="HALTED closes every open position (else only blocks entries).")

    def state_limits(self) -> RiskConfig:
        """The account's state limits as a :class:`serving.risk.RiskConfig` (its entry caps left wide open: the
        account's caps are :func:`gate_account`'s)."""
        return RiskConfig(
            max_leverage=1e9, max_notional_per_symbol_usdt=1e18, oversize_action=self.oversize_action,
            daily_loss_limit_frac=self.daily_loss_limit_frac, max_drawdown_halt_frac=self.max_drawdown_halt_frac,
            fast_kill_consecutive_losses=self.fast_kill_consecutive_losses,
            slow_kill_min_profit_factor=self.slow_kill_min_profit_factor,
            slow_kill_window_trades=self.slow_kill_window_trades, flatten_on_halt=self.flatten_on_halt,
        )  # fmt: skip


def per_symbol_limits(config: RiskConfig) -> RiskConfig:
    """``config`` for one symbol's guard in a multi-symbol run: its kill switches and entry caps, without the
    daily-loss and drawdown limits (the account's guard applies them to the account's equity)."""
    return config.updated(daily_loss_limit_frac=None, max_drawdown_halt_frac=None)


@dataclass(frozen=True)
class SymbolBook:
    """One symbol at a bar's close, as the account guard weighs it.

    Attributes
    ----------
    symbol : str
        Exchange id (``BTCUSDT``).
    decision : Decision
        The decision to review (after the symbol's own guard).
    position_side : int
        -1, 0, +1: the open position.
    position_notional_usdt : float
        ``|qty| * close`` of the open position, USDT (>= 0).
    position_margin_usdt : float
        Initial margin of the open position (notional / leverage), USDT (>= 0).
    sizing_equity_usdt : float
        The equity an entry of this symbol is sized on, USDT (> 0): notional = size_frac * it * leverage.
    """

    symbol: str
    decision: Decision
    position_side: int
    position_notional_usdt: float
    position_margin_usdt: float
    sizing_equity_usdt: float


def _is_entry(decision: Decision, side: int) -> bool:
    return decision.direction != 0 and decision.direction != side


def gate_account(books: Sequence[SymbolBook], equity_usdt: float, state: RiskState, config: AccountRiskConfig
                 ) -> dict[str, tuple[Decision, tuple[str, ...]]]:
    """Review the bar's decisions of every symbol together (pure; order in the module docstring).

    Parameters
    ----------
    books : Sequence[SymbolBook]
        One per symbol (any order; reviewed sorted by symbol).
    equity_usdt : float
        The account's equity marked at the bar's close, USDT (finite, > 0).
    state : RiskState
        The account's state (REDUCING and HALTED allow exits only; HALTED with ``flatten_on_halt`` closes).
    config : AccountRiskConfig

    Returns
    -------
    dict[str, tuple[Decision, tuple[str, ...]]]
        Per symbol: the decision to submit and what the account changed (empty: unchanged).

    Raises
    ------
    ValueError
        ``equity_usdt`` not finite and > 0, a duplicate symbol, or a book with a negative or non-finite amount.
    """
    if not (math.isfinite(equity_usdt) and equity_usdt > 0):
        raise ValueError(f"account equity_usdt must be finite and > 0, got {equity_usdt!r}")
    ordered = sorted(books, key=lambda b: b.symbol)
    if len({b.symbol for b in ordered}) != len(ordered):
        raise ValueError(f"duplicate symbols in {[b.symbol for b in ordered]}")
    for b in ordered:
        for name in ("position_notional_usdt", "position_margin_usdt"):
            value = getattr(b, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{b.symbol}: {name} must be finite and >= 0, got {value!r}")
    out: dict[str, tuple[Decision, tuple[str, ...]]] = {}
    # what stays open after the exits and holds: symbol -> (side, notional, margin)
    kept: dict[str, tuple[int, float, float]] = {}
    entries: list[SymbolBook] = []
    for b in ordered:  # pass 1: exits and holds, in symbol order
        side, decision = b.position_side, b.decision
        if state is RiskState.HALTED and config.flatten_on_halt and side != 0 and decision.direction != 0:
            out[b.symbol] = (Decision.flat(), (f"account_halted_flatten: decision {decision.direction:+d} "
                                               "replaced by flat",))
            continue
        if _is_entry(decision, side):
            entries.append(b)
            continue
        out[b.symbol] = (decision, ())
        if decision.direction != 0 and side != 0:
            kept[b.symbol] = (side, b.position_notional_usdt, b.position_margin_usdt)
    for b in entries:  # pass 2: entries, in symbol order, against what is open and accepted so far
        if state is not RiskState.ACTIVE:
            out[b.symbol] = (Decision.flat(), (f"account_entry_refused: account {state.value} allows exits only",))
            continue
        decision = b.decision
        lev = float(decision.leverage)
        wanted = float(decision.size_frac) * b.sizing_equity_usdt * lev
        gross = sum(n for _, n, _ in kept.values())
        margin = sum(m for _, _, m in kept.values())
        same = sum(n for s, n, _ in kept.values() if s == decision.direction)
        rooms: list[tuple[float, str]] = []
        if config.max_total_notional_usdt is not None:
            rooms.append((config.max_total_notional_usdt - gross,
                          f"total notional {gross:.2f} + entry > max_total_notional_usdt {config.max_total_notional_usdt:.2f}"))
        if config.max_total_margin_frac is not None:
            cap = config.max_total_margin_frac * equity_usdt
            rooms.append(((cap - margin) * lev, f"total margin {margin:.2f} + entry > max_total_margin_frac "
                          f"{config.max_total_margin_frac:.3g} x equity {equity_usdt:.2f} USDT"))
        if config.max_total_leverage is not None:
            cap = config.max_total_leverage * equity_usdt
            rooms.append((cap - gross, f"total leverage {(gross + wanted) / equity_usdt:.3g} > max_total_leverage "
                          f"{config.max_total_leverage:.3g}"))
        if config.max_symbol_leverage is not None:
            rooms.append((config.max_symbol_leverage * equity_usdt, f"{b.symbol} leverage {wanted / equity_usdt:.3g} "
                          f"> max_symbol_leverage {config.max_symbol_leverage:.3g}"))
        if config.max_same_direction_notional_usdt is not None:
            rooms.append((config.max_same_direction_notional_usdt - same,
                          f"{'long' if decision.direction > 0 else 'short'} notional {same:.2f} + entry > "
                          f"max_same_direction_notional_usdt {config.max_same_direction_notional_usdt:.2f}"))
        binding = [(room, why) for room, why in rooms if wanted > room]
        if not binding:
            out[b.symbol] = (decision, ())
            kept[b.symbol] = (decision.direction, wanted, wanted / lev)
            continue
        room, why = min(binding, key=lambda x: x[0])
        if config.oversize_action == "refuse" or room <= 0.0:
            out[b.symbol] = (Decision.flat(), (f"account_entry_refused: {why}",))
            continue
        size = room / (b.sizing_equity_usdt * lev)
        out[b.symbol] = (dataclasses.replace(decision, size_frac=size), (
            f"account_notional_clipped: {wanted:.2f} -> {room:.2f} USDT (size_frac {decision.size_frac:.4g} -> "
            f"{size:.4g}): {why}",))
        kept[b.symbol] = (decision.direction, room, room / lev)
    return out


class AccountGuard:
    """The account's guard of a multi-symbol run (module docstring): its state (daily loss, drawdown, kill switches
    over all symbols' trades) persisted under scope ``account``, and :func:`gate_account`. Never raises.

    Parameters
    ----------
    config : AccountRiskConfig
    store : StateStore | None
        Where the account's risk state lives (a HALTED account stays HALTED after a restart); None: in memory.
    now : Callable[[], datetime]
        Wall clock for ``created_at``.

    Raises
    ------
    ValueError
        At construction, if the persisted state cannot be read back.
    """

    def __init__(self, config: AccountRiskConfig, store: StateStore | None = None, *,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.config = config
        self._state_guard = RiskGuard(config.state_limits(), store, scope=ACCOUNT_SCOPE, now=now)

    @property
    def state(self) -> RiskState:
        """The account's current state."""
        return self._state_guard.state

    @property
    def reasons(self) -> tuple[str, ...]:
        """Why the account is not ACTIVE (empty when it is)."""
        return self._state_guard.status.reasons

    def record_closed_trade(self, time: pd.Timestamp, pnl_usdt: float) -> None:
        """Count a closed round trip of any symbol (net PnL, USDT) in the account's kill switches; never raises."""
        self._state_guard.record_closed_trade(time, pnl_usdt)

    def review(self, time: pd.Timestamp, equity_usdt: float, books: Sequence[SymbolBook]) -> dict[str, GuardVerdict]:
        """Mark the account's equity at ``time`` (its state may change), then gate every symbol's decision
        (:func:`gate_account`). Returns one verdict per symbol of ``books``; ``reasons`` lists what the account
        changed and, when it is not ACTIVE, the state's reasons (``account_state: ...``).

        Never raises: on any failure the account goes HALTED (reason ``guard_error``) and each verdict lets only
        an exit or a hold through.
        """
        try:
            status = self._state_guard.observe(time, float(equity_usdt))
            gated = gate_account(books, float(equity_usdt), status.state, self.config)
            state_reasons = () if status.state is RiskState.ACTIVE else tuple(f"account_state: {r}"
                                                                              for r in status.reasons)
            return {s: GuardVerdict(d, status.state.value, why + state_reasons) for s, (d, why) in gated.items()}
        except Exception as exc:  # noqa: BLE001 - fail closed, never open
            reason = self._state_guard.fail(time, exc)
            out = {}
            for b in books:
                d = b.decision
                keep = d.direction == 0 or d.direction == b.position_side
                out[b.symbol] = GuardVerdict(d if keep else Decision.flat(), RiskState.HALTED.value, (reason,))
            return out
