"""The paper evidence of ``ats gate --paper-db``: a paper run's state database read into
:class:`training.gate.PaperEvidence` (via :func:`serving.ops_data.read_period`)."""

from __future__ import annotations

from pathlib import Path

from training.gate import PaperEvidence

SWAP_EVENTS = frozenset({"bundle_swapped"})
"""Event kinds that mean the primary changed during the run."""


def paper_evidence(db: str, run_id: str | None = None) -> PaperEvidence:
    """The whole run ``run_id`` (default: the latest) of the state database ``db`` as gate evidence.

    Raises
    ------
    FileNotFoundError
        ``db`` is a path to no file.
    ValueError
        The database holds no decisions (of ``run_id``), or fewer than one equity mark.
    """
    from serving.ops_data import read_period
    from serving.store import StateStore

    if "://" not in db and not Path(db).is_file():
        raise FileNotFoundError(f"no state database at {db}")
    with StateStore.open(db) as store:
        period = read_period(store, run_id)
        shown = store.display_url if "://" in db else db
    curve = period.curve
    if period.equity.empty or period.bar_interval is None:
        raise ValueError(f"{shown}: run {period.run_id!r} has fewer than 2 equity marks: nothing to judge yet")
    identity = period.start_detail.get("bundle")
    files = identity.get("files") if isinstance(identity, dict) and identity.get("loaded") else None
    events = period.events
    swaps = int(events.kind.isin(SWAP_EVENTS).sum()) if len(events) else 0
    return PaperEvidence(
        source=f"{shown} run {period.run_id}", candles=period.candles,
        first_bar=period.equity.index[0].to_pydatetime(), last_bar=period.equity.index[-1].to_pydatetime(),
        bar_interval_s=float(period.bar_interval.total_seconds()), equity_usdt=tuple(float(x) for x in curve),
        n_closed_trades=period.closed_trades, bundle_files=None if files is None else dict(files), n_swaps=swaps,
    )


def recorded_report(bundle: Path) -> Path:
    """The report directory the bundle's last gate verdict recorded (``manifest.json`` ``gate.report``).

    Raises
    ------
    FileNotFoundError
        The bundle has no manifest, or its manifest records no gate report (give ``--report``).
    """
    import json

    manifest_path = Path(bundle) / "manifest.json"
    report = (json.loads(manifest_path.read_text()).get("gate") or {}).get("report")
    if not report:
        raise FileNotFoundError(f"{manifest_path} records no gate report: give --report (the walk-forward directory)")
    return Path(report)
