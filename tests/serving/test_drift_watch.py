"""The drift monitor wired into the serving loops (serving/drift_watch.py): paper replays of the kit bundle (with a
training distribution fitted on its own synthetic market) through a planted 10x volatility shift prove each path:
alert (events, notification, decisions unchanged), rollback to the previous gated bundle kept by the hot-swap slot
(and V1 when there is none), V1 until an operator resets (kept across a restart), per symbol in a multi-symbol
replay; `ats status` and `ats report` show the breach."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agents.bundle import MANIFEST, load_bundle
from agents.drift_reference import REFERENCE_FILE, fit_reference
from agents.policy import FrozenPPOPolicy
from ats_cli.main import app
from envs.config import CostConfig
from fallback.config import V1Config
from fallback.v1 import V1Policy
from market.features import FeatureConfig, compute_features, drop_warmup
from market.features import atr as atr_indicator
from serving.drift import DRIFT_EVENT, DriftConfig
from serving.drift_watch import DRIFT_BREACH_EVENT, DriftWatch, drift_mode, reset_drift
from serving.hotswap import PolicySlot, load_frozen_policy, request_reload
from serving.loop import ServeConfig, run_replay
from serving.notify import DEFAULT_KINDS, messages
from serving.portfolio import Leg, run_portfolio_replay
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.serving import bundle_kit as kit
from tests.serving.test_drift import _shifted

N_CANDLES, N_TRAIN = 3_000, 2_000
START = 2_600  # first served bar (the bars before: history)
SHIFT_ROW = 2_620  # planted: log moves 10 x larger from here on
END = 2_720  # 120 served bars: evaluations after 24, 48, 72, 96, 120 bars
CFG = DriftConfig(window_bars=168, every_bars=24)


class Recorder:
    """A notifier that keeps what it is given (the webhook notifier's input)."""

    def __init__(self) -> None:
        self.events: list = []

    def publish(self, events, fills) -> None:
        self.events.extend(events)

    def close(self, timeout_s: float = 5.0) -> None:
        pass


def _gated(bundle, ref) -> None:
    """Give ``bundle`` a training distribution (hashed) and a PASS verdict of the gate."""
    (bundle / REFERENCE_FILE).write_text(json.dumps(ref))
    kit.rehash(bundle, REFERENCE_FILE)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["gate"] = {"verdict": "PASS", "expected_bar_return": None}
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=1))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift_watch")
    a = kit.make_it_trade(kit.build_bundle(root / "a"))
    candles = make_candles(N_CANDLES, seed=0)  # the kit bundle's market (its first 1,600 bars) and more
    models = load_bundle(a).models
    feats, _ = drop_warmup(compute_features(candles, FeatureConfig()))
    proba = models.hmm.filtered_proba(feats[list(models.hmm_columns)].to_numpy(np.float64))
    ref = fit_reference(feats.iloc[:N_TRAIN], proba[:N_TRAIN])
    _gated(a, ref)
    b = kit.copy_bundle(a, root / "b")  # the bundle swapped in later (same content, another directory)
    return {"a": a, "b": b, "calm": candles, "shifted": _shifted(candles, SHIFT_ROW, 10.0), "root": root}


def _replay(candles, store, drift, *, slot=None, bundle=None, start=START, end=END, notifier=None, run_id="paper"):
    c = candles.iloc[:end]
    slot = slot if slot is not None else PolicySlot(FrozenPPOPolicy(load_bundle(bundle)), source=bundle)
    v1 = V1Policy(V1Config())
    return run_replay(c, primary=slot, fallback=v1, atr=atr_indicator(c, 14),
                      fallback_atr=atr_indicator(c, v1.atr_period_bars), costs=CostConfig(), store=store,
                      config=ServeConfig(warmup_bars=start, run_id=run_id), notifier=notifier, drift=drift)  # fmt: skip


def _drift_rows(store):
    ev = store.events("paper")
    d = ev[ev.kind == DRIFT_EVENT]
    return pd.DataFrame([{"time": t, **det} for t, det in zip(d.time, d.detail, strict=True)])


def _first_breach(store) -> pd.Timestamp:
    rows = _drift_rows(store)
    return rows[rows.breach].time.min()


def test_alert_records_notifies_and_leaves_the_policy_deciding(world, tmp_path):
    store, rec = StateStore.sqlite(tmp_path / "s.db"), Recorder()
    summary = _replay(world["shifted"], store, CFG.updated(action="alert"), bundle=world["a"], notifier=rec)
    rows = _drift_rows(store)
    assert len(rows) == 3 * (END - START) // 24  # three statistics per evaluation, every 24 bars
    assert set(rows.statistic) == {"feature_psi", "regime_occupancy", "pnl_cusum"}
    first = rows[rows.time == rows.time.min()]
    assert not first.breach.any()  # 4 of 168 rows shifted: calm
    breach = rows[rows.breach]
    assert len(breach) and set(breach.action) == {"alert"} and "feature_psi" in set(breach.statistic)
    assert (rows[~rows.breach].action == "none").all()
    assert (breach.value >= breach.threshold).all()
    assert not rows[rows.statistic == "pnl_cusum"].value.notna().any()  # no walk-forward expectation recorded
    # notified: the breach is among what the webhook notifier sends
    kinds = [e.kind for e in rec.events]
    assert DRIFT_BREACH_EVENT in kinds and DRIFT_BREACH_EVENT in DEFAULT_KINDS
    texts = messages([e for e in rec.events if e.kind == DRIFT_BREACH_EVENT], [], DEFAULT_KINDS)
    assert texts and "feature_psi" in texts[0]
    # alert only: the bundle keeps deciding after the breach
    dec = store.decisions("paper")
    after = dec[dec.bar_open_time > _first_breach(store)]
    assert len(after) and (after.source == "v2").all() and summary.decisions_v1 == 0
    # the calm market: no breach at all
    calm = StateStore.sqlite(tmp_path / "calm.db")
    _replay(world["calm"], calm, CFG.updated(action="v1"), bundle=world["a"])
    assert not _drift_rows(calm).breach.any() and (calm.decisions("paper").source == "v2").all()


def test_status_and_report_show_the_breach(world, tmp_path):
    db = tmp_path / "s.db"
    _replay(world["shifted"], StateStore.sqlite(db), CFG.updated(action="alert"), bundle=world["a"])
    runner = CliRunner()
    r = runner.invoke(app, ["status", "--db", str(db)], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "feature_psi" in x)
    assert "BREACH -> alert" in line and "threshold 0.1" in line, r.output
    r = runner.invoke(app, ["report", "--db", str(db), "--out", str(tmp_path / "rep")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Drift events" in html and "regime_occupancy" in html and "alert" in html


def test_rollback_swaps_back_to_the_previous_gated_bundle(world, tmp_path):
    store = StateStore.sqlite(tmp_path / "s.db")
    request = tmp_path / "reload.json"
    slot = PolicySlot(load_frozen_policy(world["a"]), source=world["a"], loader=load_frozen_policy,
                      reload_file=request)  # fmt: skip
    request_reload(request, world["b"])  # swapped in at the first bar: a (gated PASS) becomes the previous bundle
    _replay(world["shifted"], store, CFG.updated(action="rollback"), slot=slot)
    ev = store.events("paper")
    swaps = [d for d in ev[ev.kind == "bundle_swapped"].detail]
    assert [s["trigger"] for s in swaps] == ["reload_request", "drift_rollback"]
    assert swaps[1]["bundle"] == str(world["a"]) and swaps[1]["previous"] == str(world["b"])
    assert slot.source == world["a"] and slot.previous is None
    rows = _drift_rows(store)
    t0 = _first_breach(store)
    assert set(rows[rows.breach & (rows.time == t0)].action) == {"rollback"}
    assert set(rows[rows.time < t0].bundle) == {str(world["b"])} and set(rows[rows.time > t0].bundle) == {str(world["a"])}
    # the next breach finds no previous gated bundle: V1, and the event says why
    later = rows[rows.breach & (rows.time > t0)]
    assert len(later) and later.action.iloc[0].startswith("v1 (rollback: no previous bundle that passed the gate")
    dec = store.decisions("paper")
    t1 = later.time.iloc[0]
    assert (dec[(dec.bar_open_time > t0) & (dec.bar_open_time < t1)].source == "v2").all()
    v1 = dec[dec.bar_open_time >= t1]
    assert len(v1) and (v1.source == "v1").all() and v1.fallback_reason.str.startswith("drift: ").all()


def test_rollback_without_a_previous_bundle_falls_back_to_v1(world, tmp_path):
    store = StateStore.sqlite(tmp_path / "s.db")
    _replay(world["shifted"], store, CFG.updated(action="rollback"), bundle=world["a"])
    rows = _drift_rows(store)
    t0 = _first_breach(store)
    assert rows[rows.breach & (rows.time == t0)].action.iloc[0] == (
        "v1 (rollback: no previous bundle that passed the gate; V1 decides)")
    ev = store.events("paper")
    assert "drift_rollback" not in [d.get("trigger") for d in ev[ev.kind == "bundle_swapped"].detail]
    mode = drift_mode(ev, "BTCUSDT")
    assert mode["mode"] == "v1" and "rollback" in mode["note"]


def test_v1_until_reset_and_kept_across_a_restart(world, tmp_path):
    db = tmp_path / "s.db"
    store = StateStore.sqlite(db)
    cfg = CFG.updated(action="v1")
    _replay(world["shifted"], store, cfg, bundle=world["a"])
    t0 = _first_breach(store)
    dec = store.decisions("paper")
    before, after = dec[dec.bar_open_time < t0], dec[dec.bar_open_time >= t0]
    assert len(before) and (before.source == "v2").all()
    assert len(after) and (after.source == "v1").all()  # evaluated at the breach's bar before its decision
    assert after.fallback_reason.str.startswith("drift: V1 decides since").all()
    assert drift_mode(store.events("paper"), "BTCUSDT")["mode"] == "v1"
    # a restart on the same store and run: V1 from its first bar
    _replay(world["shifted"], store, cfg, bundle=world["a"], start=END, end=END + 30)
    dec = store.decisions("paper")
    restarted = dec[dec.bar_open_time >= world["shifted"].index[END]]
    assert len(restarted) == 30 and (restarted.source == "v1").all()
    # the operator resets: the bundle decides again (until the next evaluation, on a still shifted market)
    r = CliRunner().invoke(app, ["serve", "reset-drift", "--db", str(db), "--note", "alice: checked"])
    assert r.exit_code == 0 and "BTCUSDT" in r.output, r.output
    assert drift_mode(store.events("paper"), "BTCUSDT")["mode"] == "model"
    r = CliRunner().invoke(app, ["serve", "reset-drift", "--db", str(db), "--note", "again"])
    assert r.exit_code == 0 and "nothing to reset" in r.output, r.output
    _replay(world["shifted"], store, cfg, bundle=world["a"], start=END + 30, end=END + 60)
    dec = store.decisions("paper")
    third = dec[dec.bar_open_time >= world["shifted"].index[END + 30]]
    assert (third.source.iloc[:23] == "v2").all()  # before the first evaluation of this run (its 24th bar)
    assert (third.source.iloc[23:] == "v1").all()  # breached again at its first evaluation, before that decision


def test_a_reset_reaches_a_running_watch(world, tmp_path):
    store = StateStore.sqlite(tmp_path / "s.db")
    slot = PolicySlot(FrozenPPOPolicy(load_bundle(world["a"])), source=world["a"])
    watch = DriftWatch(CFG.updated(action="v1", every_bars=24), store, "paper", "BTCUSDT")
    c = world["shifted"]
    for t in range(2_700, 2_724):
        for kind, detail in watch.observe(c.index[t], c.iloc[t - 999 : t + 1], 10_000.0, slot):
            store.append_event("paper", c.index[t], kind, detail)
    assert watch.mode == "v1" and watch.gate(slot.policy, None) == (None, watch.v1_reason)
    with pytest.raises(ValueError, match="--note"):
        reset_drift(store, "paper", note=" ")
    assert reset_drift(store, "paper", note="bob") == ["BTCUSDT"]
    watch.observe(c.index[2_724], c.iloc[2_725 - 1_000 : 2_725], 10_000.0, slot)
    assert watch.mode == "model" and watch.gate(slot.policy, None) == (slot.policy, None)


def test_each_symbol_has_its_own_monitor_in_a_multi_symbol_replay(world, tmp_path):
    store = StateStore.sqlite(tmp_path / "s.db")
    v1 = V1Policy(V1Config())
    legs = []
    for symbol, candles in (("BTCUSDT", world["shifted"]), ("ETHUSDT", world["calm"])):
        from market.instruments import resolve_spec

        c = candles.iloc[:END]
        costs = CostConfig(instrument=resolve_spec(symbol).spec)
        legs.append(Leg(symbol, c, PolicySlot(FrozenPPOPolicy(load_bundle(world["a"])), source=world["a"]), v1,
                        atr_indicator(c, 14), costs, fallback_atr=atr_indicator(c, v1.atr_period_bars)))
    run_portfolio_replay(legs, store=store, config=ServeConfig(warmup_bars=START), drift=CFG.updated(action="v1"))
    ev = store.events("paper")
    assert drift_mode(ev, "BTCUSDT")["mode"] == "v1" and drift_mode(ev, "ETHUSDT") is None
    rows = _drift_rows(store)
    assert rows[rows.symbol == "ETHUSDT"].breach.sum() == 0 and rows[rows.symbol == "BTCUSDT"].breach.any()
    dec = store.decisions("paper")
    assert (dec[dec.symbol == "ETHUSDT"].source == "v2").all() and (dec[dec.symbol == "BTCUSDT"].source == "v1").any()


def test_drift_off_writes_nothing(world, tmp_path):
    store = StateStore.sqlite(tmp_path / "s.db")
    _replay(world["shifted"], store, CFG.updated(enabled=False, action="v1"), bundle=world["a"], end=START + 48)
    assert _drift_rows(store).empty and (store.decisions("paper").source == "v2").all()


def test_the_live_loop_runs_the_same_monitor(world, tmp_path):
    """``ats serve --mode testnet``'s loop (:func:`ats_cli.serve_live.build_live_loop`) on the fake exchange serving
    the paper tests' shifted market: its evaluations breach where the paper replay's do (windows one bar apart), V2
    decides until the evaluation that breaches, V1 from it on (reason 'drift')."""
    from tests.kit.exchange_sim import FakeBinance, SimClock, sim_loop

    c = world["shifted"].iloc[: END + 50]
    now = int(c.index[START].value // 1_000_000) + 60_000
    store = StateStore.sqlite(tmp_path / "s.db")
    with FakeBinance(c.drop(columns="funding_rate"), c.funding_rate.dropna(), now_ms=now, query_lag_ms=5_000) as fake:
        loop = sim_loop(world["a"], fake, SimClock(fake, None, 0.0), store)
        loop.drift_watch = DriftWatch(CFG.updated(action="v1"), store, loop.run_id, "BTCUSDT")
        loop.run(max_steps=END - START, install_signal_handlers=False)
    ev = store.events("testnet")
    d = ev[ev.kind == DRIFT_EVENT]
    live = pd.DataFrame([{"time": t, **det} for t, det in zip(d.time, d.detail, strict=True)])
    paper_store = StateStore.sqlite(tmp_path / "paper.db")
    _replay(world["shifted"], paper_store, CFG.updated(action="v1"), bundle=world["a"])
    paper = _drift_rows(paper_store)
    # the live loop's first bar is the last one closed before its start (one earlier than the replay's first)
    keys = ["statistic", "breach"]
    assert live.breach.any() and live.time.iloc[0] == paper.time.iloc[0] - pd.Timedelta(hours=1)
    fp = paper[paper.statistic == "feature_psi"]
    fl = live[live.statistic == "feature_psi"]
    assert fl[keys].reset_index(drop=True).equals(fp[keys].reset_index(drop=True)[: len(fl)])
    assert (fl.value.to_numpy() > 0).sum() == (fp.value.to_numpy()[: len(fl)] > 0).sum()  # windows one bar apart
    t0 = live[live.breach].time.min()
    dec = store.decisions("testnet")
    before, after = dec[dec.bar_open_time < t0], dec[dec.bar_open_time >= t0]
    assert len(before) >= 23 and (before.source == "v2").all()
    assert len(after) and (after.source == "v1").all() and after.fallback_reason.str.startswith("drift: ").all()
    assert drift_mode(ev, "BTCUSDT")["mode"] == "v1"
