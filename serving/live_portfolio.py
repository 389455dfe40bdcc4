"""Several symbols on one exchange account in one process (testnet/live): one :class:`serving.live.LiveLoop` per
symbol, decided together per bar close, behind the account's guard.

:class:`LivePortfolio` steps its symbols' loops on one exchange clock (one server-time read per step). Each step:

1. **Per symbol, in symbol order** (:meth:`serving.live.LiveLoop.begin_bar`): reconcile that symbol against the
   exchange (unresolved intents, fills, position; its orphans), record its late equity and missed bars, then resume
   a bar it decided already or decide the new one: candles, bundle -> V1 -> flat, its own guard
   (:class:`serving.risk.RiskGuard`, scope ``symbol:<SYMBOL>``, kill switches and entry caps; daily loss and
   drawdown are the account's). **An unreconciled symbol is frozen alone** (no order of it at all, its decision is
   still recorded) while the others trade; a symbol whose reads fail (unknown is not flat) ends its own step only
   (``step_failed`` naming it, retried within the bar) and the others go on.
2. **The account's guard** (:class:`serving.account_risk.AccountGuard`, scope ``account``; the paper portfolio's,
   not a fork): the account's equity (one balance read) is marked, then every symbol's pending decision is gated
   together by :func:`serving.account_risk.gate_account`: exits and holds first, then entries, each in symbol
   order. A symbol that has decided the bar already (a retry within the bar) counts with its position as a hold. A
   quarantined symbol holds whatever the account says (as in paper). A verdict that is not ACTIVE blocks entries.
3. **Per symbol** (:meth:`serving.live.LiveLoop.complete_bar`): plan, write the decision row and intents in one
   transaction, send, protect, record fills, position and the symbol's equity row (the account's equity, as every
   exchange row). Then one ``account_equity`` row for the bar (equity, gross notional, margin, open positions) once
   every symbol has decided it.

**Money.** The N symbols share one account in equal shares, as the paper portfolio's sleeves: each symbol sizes its
entries on ``equity / N`` (:attr:`serving.live.LiveLoop.equity_share`) and its policies see that share (and the
account's peak times the share). The exchange keeps one wallet: the shares are a sizing rule, not separate money.

**Events and ids.** Every event of a symbol's loop (its reconciler and executor included) names the symbol in its
detail (:class:`SymbolEvents`), so notifications name it; client order ids already carry the symbol
(:func:`serving.intents.client_order_id`). Notifications are published once per step for the whole run (every
symbol's fills). Crash points are shared by all loops: a process killed anywhere restarts and reconciles every
symbol by client id before anything is sent again.

**Hot-swap** (:class:`serving.hotswap.SlotGroup`, the paper portfolio's, not a fork): at the start of a step whose
bar no symbol has decided yet, before any symbol decides, a candidate (``ats serve reload``, a bundle dropped into
the watched directory) is validated once per symbol (with the symbol's slot loader, which on testnet and live
refuses a bundle whose rules live cannot trade: :func:`serving.trading_rules.load_live_policy`; the gate verdict;
a probe on the symbol's last decision context) and swapped into every symbol at that bar, or into none when any
symbol refuses it; ``bundle_swapped`` / ``bundle_rejected`` events per symbol. A retry within a bar some symbol
decided already leaves the candidate waiting for the next bar, so that every symbol decides one bar with one bundle.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pandas as pd

from market.decision import Decision
from serving.account_risk import ACCOUNT_SCOPE, AccountGuard, SymbolBook
from serving.clock import stop_on_signals
from serving.errors import AmbiguousOutcomeError, FatalError, RejectedError, RetryableError
from serving.executor import StepResult
from serving.hotswap import SlotGroup
from serving.live import LiveLoop, PendingLiveBar, fill_notices
from serving.notify import Notifier
from serving.risk import GuardVerdict, RiskState
from serving.store import AccountEquityRecord, EventRecord, StateStore

if TYPE_CHECKING:
    from serving.live import GuardLike

__all__ = ["LivePortfolio", "SymbolEvents", "SymbolGuard"]

T = TypeVar("T")


class SymbolEvents:
    """A :class:`serving.store.StateStore` seen by one symbol's loop: every event it writes names ``symbol`` in its
    detail (an event naming a symbol already keeps it); everything else is the store's."""

    def __init__(self, store: StateStore, symbol: str) -> None:
        self._store, self.symbol = store, symbol

    def _tag(self, events: Any) -> list[EventRecord]:
        return [e if "symbol" in e.detail else EventRecord(e.run_id, e.time, e.kind, {**e.detail, "symbol": self.symbol})
                for e in events]  # fmt: skip

    def append(self, *, events: Any = (), **rows: Any) -> None:
        """:meth:`serving.store.StateStore.append`, the events named."""
        self._store.append(events=self._tag(events), **rows)

    def append_event(self, run_id: str, time: pd.Timestamp, kind: str, detail: dict[str, Any] | None = None) -> None:
        """:meth:`serving.store.StateStore.append_event`, the event named."""
        self.append(events=[EventRecord(run_id, time, kind, detail or {})])

    def write_intents(self, run_id: str, intents: Any, time: pd.Timestamp, *, decisions: Any = (),
                      events: Any = ()) -> list[str]:
        """:meth:`serving.store.StateStore.write_intents`, the events named."""
        return self._store.write_intents(run_id, intents, time, decisions=decisions, events=self._tag(events))

    def record_position(self, *args: Any, events: Any = (), **kwargs: Any) -> int:
        """:meth:`serving.store.StateStore.record_position`, the events named."""
        return self._store.record_position(*args, events=self._tag(events), **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def as_store(self) -> StateStore:
        """The view, typed as the store the loop takes."""
        return cast(StateStore, self)


class SymbolGuard:
    """One symbol's guard in a multi-symbol run: its own :class:`serving.risk.RiskGuard` reviews its decisions (None:
    none, every decision passes ACTIVE), and its closed round trips count in its own and the account's kill switches
    (:meth:`serving.account_risk.AccountGuard.record_closed_trade`)."""

    def __init__(self, own: GuardLike | None, account: AccountGuard | None) -> None:
        self.own, self.account = own, account

    def review(self, decision: Decision, account: Any) -> Any:
        """The symbol's own guard's verdict (``ACTIVE``, unchanged, without one)."""
        if self.own is None:
            return GuardVerdict(decision, RiskState.ACTIVE.value, ())
        return self.own.review(decision, account)

    def record_closed_trade(self, time: pd.Timestamp, pnl_usdt: float) -> None:
        """Count a closed round trip (net PnL, USDT) in the symbol's and the account's kill switches."""
        if self.own is not None:
            self.own.record_closed_trade(time, pnl_usdt)
        if self.account is not None:
            self.account.record_closed_trade(time, pnl_usdt)


class LivePortfolio:
    """Several symbols' live loops on one account (module docstring).

    Parameters
    ----------
    loops : Sequence[LiveLoop]
        One per symbol (distinct ``market_id``; stepped in symbol order), sharing one run id, built on
        :class:`SymbolEvents` views of ``store`` and with :class:`SymbolGuard` guards (wired by
        :func:`ats_cli.serve_live.build_live_portfolio`), without notifiers (the portfolio publishes). Their
        ``equity_share`` is set to ``1 / len(loops)``.
    store : StateStore
        The run's store (account rows and events).
    account_guard : AccountGuard | None
        The account's guard (its closed-trade sink must be wired into the loops' :class:`SymbolGuard`); None: none.
    notifier : Notifier | None
        Receives the run's new events and every symbol's new exchange fills after each step; a notifier that raises
        is ignored.
    slot_group : SlotGroup | None
        Hot-swap of the run over the loops' slots (symbol -> ``loop.slot``; module docstring); None: none.

    Raises
    ------
    ValueError
        No loop, loops of different runs, or two loops of one symbol (after their brokers are loaded); a slot group
        whose slots are not exactly the loops' (checked by :meth:`start`).
    """

    def __init__(self, loops: Sequence[LiveLoop], store: StateStore, *, account_guard: AccountGuard | None = None,
                 notifier: Notifier | None = None, slot_group: SlotGroup | None = None) -> None:
        if not loops:
            raise ValueError("a live portfolio needs at least one symbol's loop")
        if len({loop.run_id for loop in loops}) != 1:
            raise ValueError(f"the loops of one portfolio share a run id, got {sorted({lp.run_id for lp in loops})}")
        self.loops = list(loops)
        self.store, self.account_guard, self.notifier = store, account_guard, notifier
        self.slot_group = slot_group
        for loop in self.loops:
            loop.equity_share = 1.0 / len(self.loops)
        self.stop_requested = threading.Event()
        self._started = False
        self._notified: tuple[int, dict[str, int]] | None = None
        self._account_state: str | None = None
        #: symbol -> consecutive failed steps (0: the last step of the symbol went through)
        self.failures: dict[str, int] = {}

    @property
    def run_id(self) -> str:
        """The run's id (the loops')."""
        return self.loops[0].run_id

    @property
    def symbols(self) -> list[str]:
        """The symbols' exchange ids, sorted (after :meth:`start`)."""
        return [loop.market_id for loop in self.loops]

    def start(self) -> None:
        """Start every loop (markets, one-way mode, isolated margin), sort them by symbol, check the symbols are
        distinct; once per process.

        Raises
        ------
        ValueError
            Two loops trade one symbol, or the slot group's slots are not the loops' (symbol -> ``loop.slot``).
        """
        if self._started:
            return
        for loop in self.loops:
            loop.start()
        self.loops.sort(key=lambda lp: lp.market_id)
        if len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"each symbol may be served once, got {self.symbols}")
        group = self.slot_group
        if group is not None and (list(group.slots) != self.symbols or any(
                group.slots[lp.market_id] is not lp.slot for lp in self.loops)):
            raise ValueError(f"the slot group must hold the loops' own slots for {self.symbols}, got symbols "
                             f"{list(group.slots)}")
        self._started = True
        if self._notified is None:
            ev, fill = self.store.max_ids()
            self._notified = (ev, {s: fill for s in self.symbols})
        if self.account_guard is not None:
            self._account_state = self.account_guard.state.value

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> dict[str, StepResult]:
        """Process the last closed bar of every symbol (module docstring); returns each symbol's result (a symbol
        whose step failed has none; :attr:`failures` counts it). Then publish the new events and fills.

        Raises
        ------
        FatalError
            From any symbol (authentication, a hedge-mode account): the whole process stops.
        RetryableError
            The server time could not be read: no symbol was stepped.
        """
        try:
            return self._step()
        finally:
            self.publish_notifications()

    def _step(self) -> dict[str, StepResult]:
        self.start()
        server_ms = self.loops[0].broker.server_time_ms()
        self._poll_swaps(server_ms)
        started: dict[str, StepResult | PendingLiveBar] = {}
        failed: set[str] = set()
        for loop in self.loops:
            loop._attempt_bar = None
            begun = self._attempt(loop, functools.partial(loop.begin_bar, server_ms))
            if begun is None:
                failed.add(loop.market_id)
            else:
                started[loop.market_id] = begun
        pendings = {s: p for s, p in started.items() if isinstance(p, PendingLiveBar)}
        if pendings:
            self._gate(pendings, set(started))
        results: dict[str, StepResult] = {}
        for loop in self.loops:
            out = started.get(loop.market_id)
            if isinstance(out, StepResult):
                results[loop.market_id] = out
            elif isinstance(out, PendingLiveBar):
                done = self._attempt(loop, functools.partial(loop.complete_bar, out))
                if done is None:
                    failed.add(loop.market_id)
                else:
                    results[loop.market_id] = done
        for symbol in self.symbols:
            self.failures[symbol] = self.failures.get(symbol, 0) + 1 if symbol in failed else 0
        if pendings and not failed:
            self._record_account(next(iter(pendings.values())).bar, pendings)
        return results

    def _poll_swaps(self, server_ms: int) -> None:
        """Hot-swap at the bar closed at ``server_ms``, before any symbol decides it (module docstring): nothing
        while some symbol has decided that bar already (a retry within the bar; the candidate waits for the next
        bar). The group's events go to each symbol's store view, at that bar."""
        if self.slot_group is None:
            return
        bar = pd.Timestamp(self.loops[0].last_closed_bar_ms(server_ms), unit="ms", tz="UTC")
        if any(self.store.decision_at(self.run_id, bar, loop.market_id) is not None for loop in self.loops):
            return
        try:
            swaps = self.slot_group.poll({loop.market_id: loop._last_ctx for loop in self.loops})
        except Exception as exc:  # noqa: BLE001 - a bug in hot-swap: every symbol keeps its bundle and trades on
            error = self.loops[0]._safe(f"{type(exc).__name__}: {exc}")[:1000]
            self.store.append(events=[EventRecord(self.run_id, bar, "hotswap_failed", {
                "error": error, "effect": "no symbol's bundle changed", "symbol": None})])  # fmt: skip
            return
        for loop in self.loops:
            events = [EventRecord(self.run_id, bar, kind, detail) for kind, detail in swaps.get(loop.market_id, [])]
            if events:
                loop.store.append(events=events)

    def _attempt(self, loop: LiveLoop, action: Callable[[], T]) -> T | None:
        """Run one symbol's phase; None when it failed (recorded as the loop's own ``run`` records a failure: the
        others go on). A :class:`FatalError` propagates."""
        try:
            return action()
        except (RetryableError, AmbiguousOutcomeError, RejectedError) as exc:
            error = loop._safe(f"{type(exc).__name__}: {exc}")
            loop._note_failure(error)
            loop._event(loop._now_ts(), "step_failed", {"error": error[:1000],
                                                        "consecutive": self.failures.get(loop.market_id, 0) + 1})
        except FatalError as exc:
            loop._event(loop._now_ts(), "fatal_error", {"error": loop._safe(f"{type(exc).__name__}: {exc}")[:1000]})
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: this symbol's entries stop, exits go on, others trade
            loop.record_internal_error(exc, "this symbol's entries halted until restart; exits still sent")
        return None

    def _mark(self, loop: LiveLoop, pending: PendingLiveBar | None) -> tuple[int, float, float, Decision, float]:
        """(side, notional, margin, decision to gate, sizing equity) of ``loop``'s symbol at this step."""
        state = pending.state if pending is not None else loop.last_state
        if state is None:
            raise ValueError(f"{loop.market_id}: no reconciled position this step")
        pos = state.position
        mark = pending.price_usdt if pending is not None else math.nan
        if not math.isfinite(mark):
            mark = pos.entry_price
        notional = float(pos.qty_base * mark) if pos.side != 0 else 0.0
        found = loop._our_entry(pos)
        leverage = max(1.0, float(found[1].leverage)) if found is not None else 1.0
        decision = pending.decision if pending is not None else (
            Decision(direction=pos.side) if pos.side else Decision.flat())
        sizing = pending.equity_usdt if pending is not None else math.nan
        return pos.side, notional, notional / leverage, decision, sizing

    def _gate(self, pendings: dict[str, PendingLiveBar], begun: set[str]) -> None:
        """Phase 2 (module docstring): the account's guard over every symbol's pending decision (``begun``: the
        symbols whose bar began this step; the others' positions are unknown)."""
        if self.account_guard is None:
            return
        bar = next(iter(pendings.values())).bar
        try:
            equity = self.loops[0].broker.equity_usdt()
            books = []
            for loop in self.loops:
                if loop.market_id not in begun:
                    continue  # its reads failed this step: its position is unknown (it holds; retried)
                side, notional, margin, decision, sizing = self._mark(loop, pendings.get(loop.market_id))
                if not math.isfinite(sizing):
                    sizing = equity * loop.equity_share
                books.append(SymbolBook(loop.market_id, decision, side, notional, margin, sizing))
        except Exception as exc:  # noqa: BLE001 - unknown is not room: no entry of any symbol this bar
            equity, books = math.nan, []
            why = f"account_unknown: {type(exc).__name__}: {exc}"[:500]
            for p in pendings.values():
                p.blocked.append(why)
                p.events.append(EventRecord(self.run_id, bar, "guard_verdict", {
                    "scope": ACCOUNT_SCOPE, "state": "unknown", "reasons": [why]}))  # fmt: skip
            return
        verdicts = self.account_guard.review(bar, equity, books)
        state = self.account_guard.state.value
        for symbol, pending in pendings.items():
            verdict = verdicts.get(symbol)
            if verdict is None or pending.candles is None:  # a quarantined symbol holds whatever the account says
                continue
            pending.decision = verdict.decision
            if verdict.state != RiskState.ACTIVE.value:
                pending.blocked.append(f"account_{verdict.state}")
            if verdict.reasons:
                pending.events.append(EventRecord(self.run_id, bar, "guard_verdict", {
                    "scope": ACCOUNT_SCOPE, "state": verdict.state, "reasons": list(verdict.reasons)}))  # fmt: skip
        if state != self._account_state:
            self.store.append(events=[EventRecord(self.run_id, bar, "risk_state_changed", {
                "scope": ACCOUNT_SCOPE, "from": self._account_state, "to": state,
                "reasons": list(self.account_guard.reasons)})])  # fmt: skip
            self._account_state = state

    def _record_account(self, bar: pd.Timestamp, pendings: dict[str, PendingLiveBar]) -> None:
        """The bar's ``account_equity`` row: the account's equity now, the positions stored after the bar's orders
        marked at each symbol's close (a quarantined one at its entry)."""
        try:
            equity = self.loops[0].broker.equity_usdt()
        except (RetryableError, RejectedError, AmbiguousOutcomeError):
            return  # the symbols' equity rows carry the account's; the next bar writes its own
        gross = margin = 0.0
        n_open = 0
        for loop in self.loops:
            row = self.store.last_position(loop.market_id)
            if row is None or row.side == 0:
                continue
            pending = pendings.get(loop.market_id)
            mark = pending.price_usdt if pending is not None and math.isfinite(pending.price_usdt) else row.entry_price
            notional = float(row.qty_base) * float(mark)
            found = loop._our_entry(loop.last_state.position) if loop.last_state is not None else None
            gross += notional
            margin += notional / (max(1.0, float(found[1].leverage)) if found is not None else 1.0)
            n_open += 1
        self.store.append(account=[AccountEquityRecord(self.run_id, bar, float(equity), gross, margin, n_open)])

    def publish_notifications(self) -> None:
        """Hand the run's events and every symbol's exchange fills stored since the last call to the notifier (the
        first ``step_failed`` of a streak only); never raises."""
        if self.notifier is None or self._notified is None:
            return
        try:
            events, ev_id = self.store.events_after(self.run_id, self._notified[0])
            fills = []
            ids = dict(self._notified[1])
            for symbol in self.symbols:
                mine, ids[symbol] = self.store.exchange_fills_after(symbol, ids.get(symbol, 0))
                fills += mine
            self._notified = (ev_id, ids)
            events = [e for e in events if not (e.kind == "step_failed" and e.detail.get("consecutive", 1) > 1)]
            if events or fills:
                self.notifier.publish(events, fill_notices(fills))
        except Exception:  # noqa: BLE001 - a notification must never stop trading
            return

    # -- running ----------------------------------------------------------------------------------
    def run(self, *, max_steps: int | None = None, install_signal_handlers: bool = True,
            poll_s: float | None = None) -> int:
        """Step until stopped (SIGTERM/SIGINT, :attr:`stop_requested`) or ``max_steps`` bar closes processed (a
        close counts once however many symbols decided it). A failed symbol is retried within the bar after the
        first loop's ``step_retry_initial_s`` (doubling, at most ``step_retry_max_s``, never past the next close);
        a :class:`FatalError` stops every symbol (re-raised). Returns the bar closes processed."""
        with stop_on_signals(self.stop_requested, install=install_signal_handlers):
            return self._run(max_steps, poll_s)

    def _run(self, max_steps: int | None, poll_s: float | None) -> int:
        first = self.loops[0]
        cfg = first.config
        done, streak = 0, 0
        while not self.stop_requested.is_set():
            failed = False
            try:
                results = self.step()
                failed = any(self.failures.get(s, 0) for s in self.symbols)
                if any(r.bar_open_time is not None for r in results.values()):
                    done += 1
            except (RetryableError, AmbiguousOutcomeError, RejectedError) as exc:  # the server time
                failed = True
                first._event(first._now_ts(), "step_failed", {"error": first._safe(f"{type(exc).__name__}: {exc}")[:1000],
                                                              "consecutive": streak + 1, "symbol": None})  # fmt: skip
            except FatalError:
                self.publish_notifications()
                raise
            streak = streak + 1 if failed else 0
            if max_steps is not None and done >= max_steps:
                break
            if failed and poll_s is None:
                retry = min(cfg.step_retry_initial_s * 2.0 ** (streak - 1), cfg.step_retry_max_s)
                wait = min(retry, first.seconds_to_next_poll())
            else:
                wait = first.seconds_to_next_poll() if poll_s is None else poll_s
            end = first.monotonic_s() + wait
            while not self.stop_requested.is_set() and first.monotonic_s() < end:
                first._sleep(min(1.0, max(0.0, end - first.monotonic_s())))
        self.store.append(events=[EventRecord(self.run_id, first._now_ts(), "live_stopped", {
            "bars": done, "symbols": self.symbols})])  # fmt: skip
        self.publish_notifications()
        return done

