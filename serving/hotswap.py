"""The primary (V2) policy slot: retry backoff after failures, and validated hot-swap between bars.

:class:`PolicySlot` holds the bundle policy the loop asks first. Per bar the loop calls

1. :meth:`PolicySlot.poll` *between bars* (before deciding): a reload request (a JSON file written
   by :func:`request_reload`, i.e. ``ats serve reload``) or a new bundle directory dropped into the
   watched directory is validated and, if good, swapped in; a primary that failed to load is
   re-loaded once its backoff has passed;
2. :meth:`PolicySlot.acquire`: the policy to ask, or ``None`` and the reason why not (load
   failure, or the primary is backing off after a failure);
3. :meth:`PolicySlot.record`: whether the primary's answer was used; a failure (exception,
   non-finite output, deadline miss, wrong type) starts a backoff of
   :func:`backoff_bars` bars during which V1 decides without asking the primary.

Validation of a candidate bundle (:func:`validate_candidate`), in order: no pickle payload
(:func:`find_pickle_payloads`: our loaders never unpickle, this is defence in depth and a clear
rejection reason), :func:`agents.bundle.load_bundle` (every file's SHA-256 against the manifest,
so truncated or altered weights are refused; observation schema against this code), then a
probe: the actor on a zero observation and, when the loop has one, a full ``decide`` on the last
decision context must give finite actions. A rejected candidate leaves the current policy in
place and produces a ``bundle_rejected`` event. A candidate takes over the outgoing policy's
carried state (:class:`market.decision.PolicyState`, e.g. the peak equity) before it is probed, so
an identical copy decides exactly as the policy it replaces.

The slot keeps the last bundle that passed the gate before the current one (:attr:`PolicySlot.previous`,
loaded): a drift breach with the ``rollback`` action swaps back to it (:meth:`PolicySlot.rollback`,
:mod:`serving.drift_watch`).

Events are ``(kind, detail)`` pairs the loop writes to the store: ``bundle_swapped``,
``bundle_rejected``, ``bundle_reload_failed``, ``reload_request_invalid``, ``primary_backoff``.

Several symbols (:class:`SlotGroup`): one candidate is probed once per symbol and swapped into every symbol's slot
at the same bar, or into none when any symbol refuses it.
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from agents.bundle import MANIFEST, load_bundle, sha256_file
from agents.policy import FrozenPPOPolicy
from market import json_codec
from market.config_base import StrictConfig
from market.decision import Decision, DecisionContext, Policy, PolicyState, require_policy

Event = tuple[str, dict[str, Any]]
PolicyLoader = Callable[[Path], Policy]

#: file suffixes of pickle-based formats (refused in a bundle whatever their content)
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".dill", ".pt", ".pth", ".ckpt"})


class BackoffConfig(StrictConfig):
    """Bars the primary is skipped after consecutive failures: ``min(max, initial * factor^(k-1))``."""

    initial_bars: int = Field(
        1, ge=0, description="Bars skipped after the first failure (0: retry every bar)."
    )
    factor: float = Field(
        2.0, ge=1.0, description="Growth of the skipped bars per further consecutive failure."
    )
    max_bars: int = Field(64, ge=0, description="Cap of the skipped bars.")


def backoff_bars(consecutive_failures: int, cfg: BackoffConfig) -> int:
    """Bars to skip after the ``consecutive_failures``-th failure in a row (0 for none).

    ``min(max_bars, ceil(initial_bars * factor ** (k - 1)))``; 1, 2, 4, ..., 64 with the defaults.
    """
    if consecutive_failures <= 0 or cfg.initial_bars == 0:
        return 0
    exponent = min(consecutive_failures - 1, 64)  # no overflow: the cap applies long before
    return int(min(cfg.max_bars, math.ceil(cfg.initial_bars * cfg.factor**exponent)))


class BundleRejected(Exception):
    """A candidate bundle failed validation; the message says which check and why."""


def _is_pickle_stream(head: bytes) -> bool:
    # pickle protocol >= 2 starts with PROTO (0x80) and the protocol number
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def find_pickle_payloads(bundle_dir: Path) -> list[str]:
    """Files of ``bundle_dir`` that are (or contain) pickles: relative paths with the evidence.

    Checks every file's suffix (:data:`PICKLE_SUFFIXES`), its first bytes (pickle protocol 2-5
    header) and, for zip archives (``.npz``, torch's zip format), the members' names and first bytes.
    """
    found: list[str] = []
    root = Path(bundle_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        if path.suffix.lower() in PICKLE_SUFFIXES:
            found.append(f"{rel} (pickle file suffix)")
            continue
        with open(path, "rb") as fh:
            head = fh.read(4)
        if _is_pickle_stream(head):
            found.append(f"{rel} (pickle protocol {head[1]} stream)")
        elif head[:4] == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(path) as zf:
                    for info in zf.infolist():
                        name = info.filename
                        if Path(name).suffix.lower() in PICKLE_SUFFIXES or _is_pickle_stream(
                            zf.read(name)[:2]
                        ):
                            found.append(f"{rel}:{name} (pickle inside a zip archive)")
            except zipfile.BadZipFile:
                pass  # load_bundle's hash and loader checks reject a broken archive
    return found


def load_frozen_policy(path: Path) -> Policy:
    """Default loader: :func:`agents.bundle.load_bundle` (hash + schema checks) -> FrozenPPOPolicy."""
    return FrozenPPOPolicy(load_bundle(path))


def probe_policy(policy: Policy, ctx: DecisionContext | None) -> None:
    """Raise :class:`BundleRejected` unless ``policy`` gives finite outputs.

    The actor (of a :class:`FrozenPPOPolicy`) on a zero observation, then ``decide(ctx)`` when a
    context is given: it must return a :class:`Decision` and a finite ``last_raw_action``.
    """
    if isinstance(policy, FrozenPPOPolicy):
        bundle = policy.bundle
        action = np.asarray(bundle.actor.act(np.zeros(bundle.actor.obs_dim, np.float32)), dtype=np.float64)
        if not np.isfinite(action).all():
            raise BundleRejected(f"probe: non-finite action {action.tolist()} on a zero observation")
    if ctx is not None:
        try:
            answer = policy.decide(ctx)
        except Exception as exc:
            raise BundleRejected(
                f"probe: decide failed on {ctx.bar_open_time}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(answer, Decision):
            raise BundleRejected(f"probe: decide returned {type(answer).__name__}, not a Decision")
        raw = policy.last_raw_action
        if raw is not None and not np.isfinite(np.asarray(raw, dtype=np.float64)).all():
            raise BundleRejected(f"probe: non-finite raw action {np.asarray(raw).tolist()}")


def validate_candidate(
    path: Path, loader: PolicyLoader, probe_ctx: DecisionContext | None, *, require_gate_pass: bool = False,
    state: PolicyState | None = None,
) -> Policy:
    """Load ``path`` with every check of the module docstring; raise :class:`BundleRejected` otherwise.

    ``require_gate_pass`` (testnet and live serving): the manifest's ``ats gate`` verdict must be
    ``PASS``, as for the bundle the loop started with. ``state``: the carried state the candidate
    takes over before the probe (the outgoing policy's; None: its own).
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise BundleRejected(f"{path}: no {MANIFEST}")
    if require_gate_pass:
        try:
            verdict = (json_codec.loads((path / MANIFEST).read_text()).get("gate") or {}).get("verdict")
        except (OSError, ValueError) as exc:
            raise BundleRejected(f"{path}: unreadable {MANIFEST}: {exc}") from exc
        if verdict != "PASS":
            raise BundleRejected(f"gate verdict is {verdict or 'absent'}, not PASS (required on testnet and live; "
                                 "run `ats gate`)")  # fmt: skip
    payloads = find_pickle_payloads(path)
    if payloads:
        raise BundleRejected(f"pickle payload refused: {', '.join(payloads)}")
    try:
        policy = require_policy(loader(path), "loaded")
    except Exception as exc:
        raise BundleRejected(f"load failed: {type(exc).__name__}: {exc}") from exc
    if state is not None:
        policy.restore(state)
    probe_policy(policy, probe_ctx)
    return policy


def gate_verdict(path: Path) -> str | None:
    """The ``ats gate`` verdict recorded in the manifest of the bundle at ``path`` (None: none, or unreadable)."""
    try:
        return (json_codec.loads((Path(path) / MANIFEST).read_text()).get("gate") or {}).get("verdict")
    except (OSError, ValueError, AttributeError):
        return None


def reload_request_path(db_path: Path) -> Path:
    """Where ``ats serve reload`` leaves its request for the loop serving ``db_path``."""
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + ".reload.json")


def request_reload(
    request_file: Path, bundle_dir: Path, *, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> Path:
    """Ask the running loop to validate and swap in ``bundle_dir`` between bars (atomic write).

    Raises
    ------
    FileNotFoundError
        If ``bundle_dir`` has no manifest.
    """
    bundle_dir = Path(bundle_dir).resolve()
    if not (bundle_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"{bundle_dir} is not a bundle: {MANIFEST} missing")
    request_file = Path(request_file)
    tmp = request_file.with_name(request_file.name + ".tmp")
    tmp.write_text(json_codec.dumps({"bundle": str(bundle_dir), "requested_at": now().isoformat()}))
    os.replace(tmp, request_file)
    return request_file


def _bundle_key(path: Path) -> str:
    """Changes when the bundle's manifest or any file's size/mtime changes (a re-copied bundle)."""
    stats = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file())
    return f"{sha256_file(path / MANIFEST)}:{hash(tuple(stats))}"


@dataclass
class _Failure:
    kind: str
    bar: int


class PolicySlot:
    """The primary policy with backoff and hot-swap (see the module docstring).

    A swapped-in primary carries on the outgoing one's :class:`market.decision.PolicyState`.

    Parameters
    ----------
    policy : Policy | None
        The current primary, or None when it failed to load (``load_error`` says why).
    source : Path | None
        The bundle the primary came from (re-loaded after a load failure when ``loader`` is set).
    load_error : str | None
        Why ``policy`` is None.
    loader : PolicyLoader | None
        Loads a bundle directory into a policy (:func:`load_frozen_policy`); None disables
        reloading and hot-swap.
    backoff : BackoffConfig
        Bars skipped after failures.
    watch_dir : Path | None
        Directory watched for new bundles (itself, or its sub-directories, holding a manifest);
        what is there at construction is the baseline, only new or changed bundles are tried.
    reload_file : Path | None
        Request file of :func:`request_reload`; consumed (deleted) when read.

    Raises
    ------
    TypeError
        If ``policy`` is not a :class:`market.decision.Policy`.
    """

    def __init__(
        self,
        policy: Policy | None,
        *,
        source: Path | None = None,
        load_error: str | None = None,
        loader: PolicyLoader | None = None,
        backoff: BackoffConfig | None = None,
        watch_dir: Path | None = None,
        reload_file: Path | None = None,
        require_gate_pass: bool = False,
    ) -> None:
        self._policy = None if policy is None else require_policy(policy, "primary")
        self.require_gate_pass = require_gate_pass
        self.source = None if source is None else Path(source)
        self.load_error = load_error if policy is None else None
        self._loader = loader
        self.backoff = backoff if backoff is not None else BackoffConfig()
        self.watch_dir = None if watch_dir is None else Path(watch_dir)
        self.reload_file = None if reload_file is None else Path(reload_file)
        self._failures = 0
        self._retry_at = 0
        self._last_failure: _Failure | None = None
        self._seen: dict[str, str] = {str(p): k for p, k in self._watched().items()}
        #: the last bundle that passed the gate before the current one (policy, directory), kept loaded for a
        #: drift rollback (:meth:`rollback`); set when a swap replaces a primary whose manifest says PASS
        self.previous: tuple[Policy, Path] | None = None

    @classmethod
    def from_bundle(
        cls, path: Path, *, loader: PolicyLoader = load_frozen_policy, **kwargs: Any
    ) -> PolicySlot:
        """Slot whose primary is the validated bundle at ``path`` (None with the reason if invalid)."""
        try:
            policy = validate_candidate(Path(path), loader, None,
                                        require_gate_pass=kwargs.get("require_gate_pass", False))  # fmt: skip
            error = None
        except BundleRejected as exc:
            policy, error = None, str(exc)
        return cls(policy, source=Path(path), load_error=error, loader=loader, **kwargs)

    @property
    def policy(self) -> Policy | None:
        """The current primary (None when unavailable)."""
        return self._policy

    @property
    def consecutive_failures(self) -> int:
        """Failed loads or probes since the last success."""
        return self._failures

    # -- per bar ---------------------------------------------------------------------------------

    def acquire(self, bar: int) -> tuple[Policy | None, str | None]:
        """The primary to ask at ``bar``, or (None, reason) while it is unavailable or backing off."""
        if self._policy is None:
            return None, f"bundle_load_failed: {self.load_error or 'no primary policy'}"
        if bar < self._retry_at and self._last_failure is not None:
            f = self._last_failure
            return None, f"backoff: primary failed ({f.kind}) at bar {f.bar}, retried at bar {self._retry_at}"
        return self._policy, None

    def record(self, bar: int, failure: str | None) -> list[Event]:
        """Report the outcome of asking the primary at ``bar`` (``failure``: the reason, None if used)."""
        if failure is None:
            self._failures, self._last_failure = 0, None
            return []
        self._failures += 1
        kind = failure.split(":", 1)[0].strip()
        self._last_failure = _Failure(kind, bar)
        wait = backoff_bars(self._failures, self.backoff)
        self._retry_at = bar + 1 + wait
        if wait == 0:
            return []
        return [("primary_backoff", {
            "reason": failure, "consecutive_failures": self._failures, "skip_bars": wait, "retry_at_bar": self._retry_at,
        })]  # fmt: skip

    def poll(self, bar: int, probe_ctx: DecisionContext | None = None) -> list[Event]:
        """Between bars: reload a failed primary when due, then try a requested or dropped bundle."""
        events: list[Event] = []
        if self._loader is None:
            return events
        if self._policy is None and self.source is not None and bar >= self._retry_at:
            try:
                self._swap(validate_candidate(self.source, self._loader, probe_ctx, state=self._carried_state(),
                                              require_gate_pass=self.require_gate_pass), self.source)  # fmt: skip
                events.append(
                    ("bundle_swapped", {"bundle": str(self.source), "trigger": "retry_after_load_failure"})
                )
            except BundleRejected as exc:
                self.load_error = str(exc)
                self._failures += 1
                self._retry_at = bar + 1 + backoff_bars(self._failures, self.backoff)
                events.append(("bundle_reload_failed", {
                    "bundle": str(self.source), "reason": str(exc), "retry_at_bar": self._retry_at,
                }))  # fmt: skip
        for trigger, candidate in self._candidates(events):
            try:
                policy = validate_candidate(candidate, self._loader, probe_ctx, state=self._carried_state(),
                                            require_gate_pass=self.require_gate_pass)
            except BundleRejected as exc:
                events.append(
                    (
                        "bundle_rejected",
                        {
                            "bundle": str(candidate),
                            "trigger": trigger,
                            "reason": str(exc),
                            "kept": None if self.source is None else str(self.source),
                        },
                    )
                )
                continue
            old = self.source
            self._swap(policy, candidate)
            events.append(
                (
                    "bundle_swapped",
                    {
                        "bundle": str(candidate),
                        "trigger": trigger,
                        "previous": None if old is None else str(old),
                    },
                )
            )
        return events

    # -- internals -------------------------------------------------------------------------------

    def _carried_state(self) -> PolicyState | None:
        """The outgoing primary's state (None when there is no primary: the candidate keeps its own)."""
        return None if self._policy is None else self._policy.state

    def rollback(self, reason: str) -> list[Event]:
        """Swap back to :attr:`previous`, the last bundle that passed the gate before the current one (a drift
        breach: :mod:`serving.drift_watch`); it carries on the outgoing primary's state. Returns its
        ``bundle_swapped`` event (trigger ``drift_rollback``), or [] when there is none (nothing changes). The
        bundle rolled back from is not kept: a second rollback needs another gated bundle swapped in first."""
        if self.previous is None:
            return []
        policy, path = self.previous
        old = self.source
        state = self._carried_state()
        if state is not None:
            policy.restore(state)
        self.previous = None
        self._policy, self.source, self.load_error = policy, Path(path), None
        self._failures, self._retry_at, self._last_failure = 0, 0, None
        return [("bundle_swapped", {"bundle": str(path), "trigger": "drift_rollback", "reason": reason,
                                    "previous": None if old is None else str(old)})]  # fmt: skip

    def _swap(self, policy: Policy, source: Path) -> None:
        if self._policy is not None and self.source is not None and Path(source) != self.source \
                and gate_verdict(self.source) == "PASS":
            self.previous = (self._policy, self.source)
        self._policy, self.source, self.load_error = policy, Path(source), None
        self._failures, self._retry_at, self._last_failure = 0, 0, None

    def _watched(self) -> dict[Path, str]:
        return _watched_bundles(self.watch_dir)

    def _candidates(self, events: list[Event]) -> list[tuple[str, Path]]:
        return _take_candidates(self.reload_file, self.watch_dir, self._seen, events)


def _watched_bundles(watch_dir: Path | None) -> dict[Path, str]:
    """Bundle directories under ``watch_dir`` (itself or a sub-directory holding a manifest) -> content key."""
    if watch_dir is None or not watch_dir.is_dir():
        return {}
    dirs = [watch_dir, *sorted(p for p in watch_dir.iterdir() if p.is_dir())]
    out = {}
    for d in dirs:
        if (d / MANIFEST).is_file():
            try:
                out[d] = _bundle_key(d)
            except OSError:
                continue  # vanished while scanning: next poll
    return out


def _take_candidates(reload_file: Path | None, watch_dir: Path | None, seen: dict[str, str],
                     events: list[Event]) -> list[tuple[str, Path]]:
    """The candidates of this poll as (trigger, bundle): a reload request (consumed; an unreadable one is a
    ``reload_request_invalid`` event in ``events``), then the new or changed bundles of ``watch_dir`` (oldest
    manifest first; ``seen`` updated)."""
    out: list[tuple[str, Path]] = []
    if reload_file is not None and reload_file.is_file():
        try:
            text = reload_file.read_text()
            reload_file.unlink()
            out.append(("reload_request", Path(json_codec.loads(text)["bundle"])))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            events.append(
                (
                    "reload_request_invalid",
                    {"file": str(reload_file), "error": f"{type(exc).__name__}: {exc}"},
                )
            )
            with contextlib.suppress(OSError):
                reload_file.unlink()
    changed = [(p, k) for p, k in _watched_bundles(watch_dir).items() if seen.get(str(p)) != k]
    for p, k in sorted(changed, key=lambda pk: (pk[0] / MANIFEST).stat().st_mtime_ns):
        seen[str(p)] = k
        out.append(("watch_dir", p))
    return out


class SlotGroup:
    """Hot-swap for a run serving several symbols (one :class:`PolicySlot` per symbol, each its own instance of one
    bundle): a candidate (a reload request, :func:`request_reload`, or a bundle dropped into ``watch_dir``) is
    validated once per symbol (:func:`validate_candidate` with that symbol's last decision context as the probe and
    its primary's carried state), and swapped into every slot at the same bar only if every symbol accepts it; if
    any symbol refuses it, no slot changes. Both are recorded per symbol: a ``bundle_swapped`` event per symbol, or
    a ``bundle_rejected`` event per symbol naming the symbols that refused (``refused_by``: symbol -> reason) and
    this symbol's own verdict (``reason``, None when it accepted).

    The slots' own reload request and watched directory must be off (``reload_file`` and ``watch_dir`` None): the
    group reads them, so a request reaches every symbol. A slot still re-loads its own bundle after a load failure
    (:meth:`PolicySlot.poll`).

    Parameters
    ----------
    slots : dict[str, PolicySlot]
        Symbol -> its slot (each with a loader).
    watch_dir : Path | None
        Watched for new bundles; what is there at construction is the baseline.
    reload_file : Path | None
        Request file of :func:`request_reload` (consumed when read).

    Raises
    ------
    ValueError
        No slot, a slot without a loader, or a slot that reads its own request file or watched directory.
    """

    def __init__(self, slots: dict[str, PolicySlot], *, watch_dir: Path | None = None,
                 reload_file: Path | None = None) -> None:
        if not slots:
            raise ValueError("a slot group needs at least one symbol's slot")
        self._loaders: dict[str, PolicyLoader] = {}
        for symbol, slot in slots.items():
            if slot._loader is None:
                raise ValueError(f"the slot of {symbol} has no loader: it cannot be hot-swapped")
            self._loaders[symbol] = slot._loader
            if slot.reload_file is not None or slot.watch_dir is not None:
                raise ValueError(f"the slot of {symbol} reads its own reload request or watched directory: give them "
                                 "to the group only, so that a candidate reaches every symbol")
        self.slots = dict(sorted(slots.items()))
        self.watch_dir = None if watch_dir is None else Path(watch_dir)
        self.reload_file = None if reload_file is None else Path(reload_file)
        self._seen: dict[str, str] = {str(p): k for p, k in _watched_bundles(self.watch_dir).items()}

    def poll(self, probe_ctxs: dict[str, DecisionContext | None]) -> dict[str, list[Event]]:
        """Between bars, before any symbol decides: try each candidate on every symbol; swap it in everywhere or
        nowhere (class docstring). Returns each symbol's events (every symbol of the group has an entry)."""
        out: dict[str, list[Event]] = {symbol: [] for symbol in self.slots}
        shared: list[Event] = []
        candidates = _take_candidates(self.reload_file, self.watch_dir, self._seen, shared)
        for symbol in self.slots:
            out[symbol].extend(shared)
        for trigger, candidate in candidates:
            accepted: dict[str, Policy] = {}
            refused: dict[str, str] = {}
            for symbol, slot in self.slots.items():
                try:
                    accepted[symbol] = validate_candidate(candidate, self._loaders[symbol], probe_ctxs.get(symbol),
                                                          state=slot._carried_state(),
                                                          require_gate_pass=slot.require_gate_pass)  # fmt: skip
                except BundleRejected as exc:
                    refused[symbol] = str(exc)
            if refused:
                for symbol, slot in self.slots.items():
                    out[symbol].append(("bundle_rejected", {
                        "bundle": str(candidate), "trigger": trigger, "reason": refused.get(symbol),
                        "refused_by": refused, "kept": None if slot.source is None else str(slot.source),
                    }))  # fmt: skip
                continue
            for symbol, slot in self.slots.items():
                old = slot.source
                slot._swap(accepted[symbol], candidate)
                out[symbol].append(("bundle_swapped", {"bundle": str(candidate), "trigger": trigger,
                                                       "previous": None if old is None else str(old)}))
        return out
