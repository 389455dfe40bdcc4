"""The drift monitor of the serving loops: one :class:`DriftWatch` per served symbol, called once per bar by the
paper loop (:class:`serving.loop.PaperStepper`, replay, live candles and every symbol of a multi-symbol replay) and
by the live loop (:class:`serving.live.LiveLoop`), so both evaluate and act by this one code.

Per bar, before the policies decide (:meth:`DriftWatch.observe`):

1. a reset written by ``ats serve reset-drift`` (:func:`reset_drift`) ends the ``v1`` mode;
2. the bar's realised return is recorded: the account (book) equity marked now over the one of the previous
   observed bar, minus 1 (fractions; the returns start again when another bundle takes over, whose walk-forward
   expectation is then the CUSUM's reference);
3. the bar's candles go to a rolling buffer (the last ``window_bars`` + the bundle's feature history rows);
4. every ``every_bars`` observed bars the three statistics of :func:`serving.drift.evaluate_drift` are
   computed over the last ``window_bars`` bars: the bundle's features of the buffer (its feature config, as
   the policy computes them), the bundle HMM's forward-filtered regime probabilities of those rows, and the
   returns. The bundle is the slot's current primary (a policy without a bundle, or none: feature and regime
   drift are unavailable); its ``drift_reference.json`` and the ``gate.expected_bar_return`` its manifest records
   (read from disk at each evaluation: the gate may have run since it was loaded) are the references.

Each evaluation writes one ``drift`` event per statistic (statistic, value, threshold, breach, action taken; the
symbol in a multi-symbol run) with the bar's rows, in its transaction. A breach adds a ``drift_breach`` event
(notified: :data:`serving.notify.DEFAULT_KINDS`) and carries out the configured action:

* ``alert``: nothing more;
* ``rollback``: the slot swaps back to the previous bundle that passed the gate
  (:meth:`serving.hotswap.PolicySlot.rollback`; a ``bundle_swapped`` event, trigger ``drift_rollback``); when the
  slot keeps none, ``v1`` instead, and the events say so (action ``v1 (rollback: ...)``). A restart serves the
  bundle given on its command line again;
* ``v1``: V1 decides every bar (decision source 'v1', reason ``drift: ...``: :meth:`DriftWatch.gate`) until an
  operator resets (``ats serve reset-drift --db S --note ...``). The mode is a ``drift_mode`` event of the run
  (detail ``mode`` 'v1' or 'model', ``symbol``), written with the bar's rows; a loop started on the same store
  and run reads the latest one of its symbol back (:meth:`DriftWatch.__init__`), so a restart stays on V1.

While V1 decides because of drift the evaluations go on (recorded; a breach's action reads ``v1 (in force since
...)``). A bar without a valid candle window (quarantined, held) still counts, its candles are not buffered.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agents.bundle import MANIFEST
from agents.drift_reference import read_reference
from market import json_codec
from market.decision import DecisionContext, Policy
from market.features import compute_features, drop_warmup
from serving.drift import DRIFT_EVENT, DriftConfig, DriftVerdict, evaluate_drift
from serving.hotswap import PolicySlot
from serving.store import EventRecord, StateStore

__all__ = ["DRIFT_BREACH_EVENT", "DRIFT_MODE_EVENT", "RESET_COMMAND", "DriftWatch", "drift_mode", "reset_drift"]

DRIFT_MODE_EVENT = "drift_mode"
"""Event kind of a change of the drift mode (detail ``mode`` 'v1' or 'model', ``symbol``, ``change``)."""

DRIFT_BREACH_EVENT = "drift_breach"
"""Event kind of a breach (one per evaluation with a breach; notified)."""

RESET_COMMAND = "ats serve reset-drift"
"""The operator's command that ends the ``v1`` mode."""

Event = tuple[str, dict[str, Any]]


def drift_mode(events: pd.DataFrame, symbol: str) -> dict[str, Any] | None:
    """The detail of the latest ``drift_mode`` event of ``symbol`` in ``events`` (a run's events as
    :meth:`serving.store.StateStore.events` reads them), or None when it has none."""
    if events.empty:
        return None
    rows = events[events.kind == DRIFT_MODE_EVENT]
    for detail in reversed(list(rows.detail)):
        if (detail or {}).get("symbol") == symbol:
            return dict(detail)
    return None


def reset_drift(store: StateStore, run_id: str, *, note: str, symbol: str | None = None,
                now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> list[str]:  # fmt: skip
    """End the ``v1`` mode of ``symbol`` (None: of every symbol of the run in it): a ``drift_mode`` event (mode
    'model', change 'reset', the ``note``) per symbol, at ``now``. A running loop reads it before its next
    decision. Returns the symbols reset (empty: none was in the ``v1`` mode).

    Raises
    ------
    ValueError
        ``note`` is empty.
    """
    if not note.strip():
        raise ValueError("reset-drift needs a --note: who resets and why (recorded)")
    events = store.events(run_id)
    symbols = sorted({str((d or {}).get("symbol")) for d in events[events.kind == DRIFT_MODE_EVENT].detail})
    todo = [s for s in symbols if (symbol is None or s == symbol) and (drift_mode(events, s) or {}).get("mode") == "v1"]
    t = pd.Timestamp(now())
    store.append(events=[EventRecord(run_id, t, DRIFT_MODE_EVENT, {"mode": "model", "change": "reset", "symbol": s,
                                                                  "note": note}) for s in todo])  # fmt: skip
    return todo


def _gate_record(path: Path | None) -> dict[str, Any]:
    """The ``gate`` record of the bundle's manifest on disk ({} when unreadable or absent)."""
    if path is None:
        return {}
    try:
        return dict(json_codec.loads((Path(path) / MANIFEST).read_text()).get("gate") or {})
    except (OSError, ValueError, AttributeError):
        return {}


class DriftWatch:
    """Drift monitor of one served symbol (module docstring).

    Parameters
    ----------
    config : DriftConfig
        Window, cadence, thresholds and the action (``configs/serve.yaml`` ``drift:``).
    store : StateStore
        The run's store: the ``drift_mode`` events of ``run_id`` are read at construction and polled for a reset
        while V1 decides because of drift.
    run_id : str
        The serving run.
    symbol : str
        The served symbol (exchange id, e.g. ``BTCUSDT``): the mode is kept per symbol.
    """

    def __init__(self, config: DriftConfig, store: StateStore, run_id: str, symbol: str) -> None:
        self.config, self.store, self.run_id, self.symbol = config, store, run_id, symbol
        self.bars = 0  # bars observed
        self.evaluations = 0
        self.last_verdict: DriftVerdict | None = None
        self._returns: list[float] = []
        self._last_equity: float | None = None
        self._returns_of: Path | None = None  # the bundle the returns are counted for
        self._candles: pd.DataFrame | None = None
        self._references: dict[str, dict[str, Any] | None] = {}
        self._event_id, _ = store.max_ids()
        state = drift_mode(store.events(run_id), symbol)
        self.mode: str = "v1" if (state or {}).get("mode") == "v1" else "model"
        self.mode_detail: dict[str, Any] = dict(state or {})

    # -- what the loops call ----------------------------------------------------------------------
    @property
    def v1_reason(self) -> str | None:
        """The fallback reason while V1 decides because of drift (``drift: ...``), else None."""
        if self.mode != "v1":
            return None
        return (f"drift: V1 decides since {self.mode_detail.get('since', '?')} ({self.mode_detail.get('why', 'breach')})"
                f" until `{RESET_COMMAND}`")

    def gate(self, policy: Policy | None, unavailable: str | None) -> tuple[Policy | None, str | None]:
        """The primary the loop may ask (``policy``, ``unavailable`` from :meth:`PolicySlot.acquire`): none, with
        the ``drift: ...`` reason, while the ``v1`` mode is in force."""
        reason = self.v1_reason
        return (None, reason) if reason is not None else (policy, unavailable)

    def observe(self, time: pd.Timestamp, candles: pd.DataFrame | None, equity_usdt: float, slot: PolicySlot,
                probe_ctx: DecisionContext | None = None) -> list[Event]:  # fmt: skip
        """One bar (module docstring, steps 1-4): ``candles`` the bar's context window (up to and including it;
        None when it has no valid one), ``equity_usdt`` the equity marked at its close (USDT), ``slot`` the
        primary's slot (rolled back on a ``rollback`` breach; ``probe_ctx`` unused, for symmetry with its
        poll). Returns the ``(kind, detail)`` events to write with the bar's rows."""
        events: list[Event] = []
        self._poll_reset()
        bundle = getattr(slot.policy, "bundle", None)
        source = None if bundle is None else Path(bundle.path)
        if source != self._returns_of:
            self._returns, self._returns_of = [], source
        eq = float(equity_usdt)
        if self._last_equity is not None and self._last_equity > 0 and math.isfinite(eq):
            self._returns.append(eq / self._last_equity - 1.0)
        self._last_equity = eq if math.isfinite(eq) and eq > 0 else self._last_equity
        if candles is not None and len(candles):
            self._buffer(candles, slot.policy)
        self.bars += 1
        if not self.config.enabled or self.bars % self.config.every_bars != 0:
            return events
        verdict = self._evaluate(bundle)
        self.last_verdict, self.evaluations = verdict, self.evaluations + 1
        taken = None
        if verdict.action is not None:
            taken, action_events = self._act(verdict, time, slot)
            events.extend(action_events)
        details = verdict.event_details()
        for d in details:
            if d["breach"]:
                d["action"] = taken
            d["symbol"] = self.symbol
            d["bundle"] = None if source is None else str(source)
        events[:0] = [(DRIFT_EVENT, d) for d in details]
        if verdict.action is not None:
            events.insert(len(details), (DRIFT_BREACH_EVENT, {
                "statistics": list(verdict.breached), "action": taken, "symbol": self.symbol,
                "values": {s.name: s.value for s in verdict.statistics if s.breach},
                "thresholds": {s.name: s.threshold for s in verdict.statistics if s.breach}}))  # fmt: skip
        return events

    # -- internals --------------------------------------------------------------------------------
    def _poll_reset(self) -> None:
        """Read the run's new events: a reset of this symbol ends the ``v1`` mode (only polled while in it)."""
        if self.mode != "v1":
            return
        new, self._event_id = self.store.events_after(self.run_id, self._event_id)
        for e in new:
            if e.kind == DRIFT_MODE_EVENT and e.detail.get("symbol") == self.symbol and e.detail.get("mode") == "model":
                self.mode, self.mode_detail = "model", dict(e.detail)

    def _history(self, policy: Policy | None, candles: pd.DataFrame) -> int:
        """Candle rows kept: the window plus the feature history one row needs (the policy's, else 1,000)."""
        extra = 1_000
        if policy is not None and len(candles) >= 2 and hasattr(policy, "history_bars"):
            extra = int(policy.history_bars(candles.index[-1] - candles.index[-2]))
        return self.config.window_bars + extra

    def _buffer(self, candles: pd.DataFrame, policy: Policy | None) -> None:
        keep = self._history(policy, candles)
        if self._candles is None or not len(self._candles):
            self._candles = candles.iloc[-keep:]
            return
        new = candles[candles.index > self._candles.index[-1]]
        if len(new):
            self._candles = pd.concat([self._candles, new]).iloc[-keep:]

    def _reference(self, path: Path) -> dict[str, Any] | None:
        key = str(path)
        if key not in self._references:
            self._references[key] = read_reference(path)
        return self._references[key]

    def _evaluate(self, bundle: Any) -> DriftVerdict:
        """The three statistics over the last ``window_bars`` bars (module docstring, step 4)."""
        cfg = self.config
        features, proba, reference = pd.DataFrame(), None, None
        expected = None
        if bundle is not None:
            path = Path(bundle.path)
            reference = self._reference(path)
            e = _gate_record(path).get("expected_bar_return") or (bundle.manifest.get("gate") or {}).get(
                "expected_bar_return")
            if e and e.get("mean") is not None and e.get("std") is not None:
                expected = (float(e["mean"]), float(e["std"]))
            if reference is not None and self._candles is not None:
                feats, _ = drop_warmup(compute_features(self._candles, bundle.feature_config, validate=False))
                if len(feats):
                    cols = list(bundle.models.hmm_columns)
                    all_proba = bundle.models.hmm.filtered_proba(feats[cols].to_numpy(np.float64))
                    features, proba = feats.iloc[-cfg.window_bars:], all_proba[-cfg.window_bars:]
        r = np.asarray(self._returns, dtype=np.float64)
        return evaluate_drift(cfg, reference, features=features, regime_proba=proba, bar_returns=r,
                              expected_bar_return=expected)

    def _act(self, verdict: DriftVerdict, time: pd.Timestamp, slot: PolicySlot) -> tuple[str, list[Event]]:
        """Carry out ``verdict.action``; returns the action taken (as the events record it) and the events."""
        if self.mode == "v1":
            return f"v1 (in force since {self.mode_detail.get('since')})", []
        action = verdict.action
        why = f"{', '.join(verdict.breached)} breached"
        if action == "alert":
            return "alert", []
        if action == "rollback":
            swapped = slot.rollback(why)
            if swapped:
                self._returns = []  # the returns of the bundle rolled back to start now
                return "rollback", swapped
            note = "rollback: no previous bundle that passed the gate; V1 decides"
            return f"v1 ({note})", self._enter_v1(time, why, note)
        return "v1", self._enter_v1(time, why, None)

    def _enter_v1(self, time: pd.Timestamp, why: str, note: str | None) -> list[Event]:
        detail = {"mode": "v1", "change": "breach", "symbol": self.symbol, "since": str(time), "why": why,
                  "reset": f"{RESET_COMMAND} --db <state database> --note '...'", **({"note": note} if note else {})}
        self.mode, self.mode_detail = "v1", detail
        self._event_id, _ = self.store.max_ids()  # a reset can only come after this
        return [(DRIFT_MODE_EVENT, detail)]
