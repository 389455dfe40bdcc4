"""Hot-swap of a run serving several symbols (:class:`serving.hotswap.SlotGroup`) on a two-symbol paper replay: a
candidate is probed once per symbol and swapped into both at the same bar, or into neither when one refuses it;
both recorded per symbol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from envs.config import CostConfig
from market.decision import Decision, DecisionContext, Policy, StatelessPolicy
from market.instruments import resolve_spec
from serving.hotswap import BackoffConfig, PolicySlot, SlotGroup, request_reload
from serving.loop import ServeConfig
from serving.paper_live import _last_atr
from serving.portfolio import Leg, run_portfolio_replay
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.serving.fakes import FlipPolicy, ScriptedFallback

BTC = make_candles(80, seed=7)  # closes near 30,000
ETH = make_candles(80, seed=8, start_price=2_000.0)
WARMUP = 40
CONFIG = ServeConfig(run_id="p", warmup_bars=WARMUP, context_bars=WARMUP + 1, primary_backoff=BackoffConfig(initial_bars=0))


class Long(StatelessPolicy):
    name = "long"

    def decide(self, ctx: DecisionContext) -> Decision:
        return Decision(direction=1, leverage=2.0, size_frac=0.5, stop_atr=20.0, take_profit_atr=30.0)


class CheapOnly(StatelessPolicy):
    """Decides on coins below 10,000 USDT, raises on the others (so BTC's probe refuses it, ETH's accepts it)."""

    name = "cheap_only"

    def decide(self, ctx: DecisionContext) -> Decision:
        if float(ctx.candles["close"].iloc[-1]) > 10_000.0:
            raise ValueError("price out of the range this policy was trained on")
        return Decision(direction=-1, leverage=2.0, size_frac=0.5, stop_atr=20.0, take_profit_atr=30.0)


POLICIES: dict[str, type[StatelessPolicy]] = {"long": Long, "cheap_only": CheapOnly}


class Loader:
    """Loads a test bundle (a directory whose manifest names its policy): a new instance per call, counted."""

    def __init__(self) -> None:
        self.loaded: list[Path] = []

    def __call__(self, path: Path) -> Policy:
        self.loaded.append(Path(path))
        return POLICIES[json.loads((Path(path) / "manifest.json").read_text())["policy"]]()


def _bundle(path: Path, policy: str) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"policy": policy}))
    return path


def _legs(tmp_path: Path, loader: Loader) -> tuple[list[Leg], dict[str, PolicySlot]]:
    slots = {sym: PolicySlot(FlipPolicy(), source=tmp_path / "v0", loader=loader, backoff=CONFIG.primary_backoff)
             for sym in ("BTCUSDT", "ETHUSDT")}
    legs = []
    for sym, candles in (("BTCUSDT", BTC), ("ETHUSDT", ETH)):
        atr = np.array([_last_atr(candles.iloc[: t + 1], 14) for t in range(len(candles))])
        legs.append(Leg(sym, candles, slots[sym], ScriptedFallback(), atr, CostConfig(instrument=resolve_spec(sym).spec)))
    return legs, slots


def test_a_candidate_is_swapped_into_every_symbol_at_the_same_bar_or_refused_for_all(tmp_path):
    loader = Loader()
    legs, slots = _legs(tmp_path, loader)
    watch, request = tmp_path / "watch", tmp_path / "state.sqlite.reload.json"
    watch.mkdir()
    group = SlotGroup(slots, watch_dir=watch, reload_file=request)
    times = BTC.index[WARMUP:]

    def drop(k: int, total: int) -> None:  # after bar k - 1 was decided
        if k == 5:
            _bundle(watch / "long", "long")  # swapped in before bar 5 for both
        if k == 10:
            request_reload(request, _bundle(tmp_path / "picky", "cheap_only"))  # BTC's probe refuses it at bar 10

    store = StateStore("sqlite://")
    run_portfolio_replay(legs, store=store, config=CONFIG, progress=drop, slot_group=group)
    ev = store.events("p")
    swapped = ev[ev.kind == "bundle_swapped"]
    assert sorted(d["symbol"] for d in swapped.detail) == ["BTCUSDT", "ETHUSDT"]
    assert set(swapped.time) == {times[5]} and {d["trigger"] for d in swapped.detail} == {"watch_dir"}
    assert all(d["bundle"] == str(watch / "long") for d in swapped.detail)
    rejected = ev[ev.kind == "bundle_rejected"]
    assert set(rejected.time) == {times[10]}
    by_symbol = {d["symbol"]: d for d in rejected.detail}
    assert set(by_symbol) == {"BTCUSDT", "ETHUSDT"}
    assert list(by_symbol["BTCUSDT"]["refused_by"]) == ["BTCUSDT"] and "probe" in by_symbol["BTCUSDT"]["reason"]
    assert by_symbol["ETHUSDT"]["reason"] is None and by_symbol["ETHUSDT"]["refused_by"] == by_symbol["BTCUSDT"]["refused_by"]
    assert all(d["kept"] == str(watch / "long") for d in rejected.detail)
    assert not request.exists()  # the request was consumed once, for both symbols
    # one probe per symbol and candidate: each symbol its own instance
    assert loader.loaded.count(watch / "long") == 2 and loader.loaded.count(tmp_path / "picky") == 2
    d = store.decisions("p")
    for sym in ("BTCUSDT", "ETHUSDT"):
        mine = d[d.symbol == sym].set_index("bar_open_time")
        assert (mine.source == "v2").all()
        before, after = mine.loc[: times[4]], mine.loc[times[5] :]
        assert set(before.direction) == {-1, 1}  # the flip reverses every bar
        assert set(after.direction) == {1}  # long from bar 5 on, for both; the refused candidate never decided
        assert slots[sym].source == watch / "long" and isinstance(slots[sym].policy, Long)
    assert slots["BTCUSDT"].policy is not slots["ETHUSDT"].policy


def test_a_slot_group_must_own_the_requests_and_hold_the_steppers_slots(tmp_path):
    loader = Loader()
    own = PolicySlot(FlipPolicy(), loader=loader, reload_file=tmp_path / "r.json")
    with pytest.raises(ValueError, match="to the group only"):
        SlotGroup({"BTCUSDT": own})
    with pytest.raises(ValueError, match="no loader"):
        SlotGroup({"BTCUSDT": PolicySlot(FlipPolicy())})
    legs, slots = _legs(tmp_path, loader)
    group = SlotGroup({"BTCUSDT": slots["BTCUSDT"], "ETHUSDT": PolicySlot(FlipPolicy(), loader=loader)})
    with pytest.raises(ValueError, match="slot group"):
        run_portfolio_replay(legs, store=StateStore("sqlite://"), config=CONFIG, slot_group=group)


def test_ats_serve_reload_swaps_the_bundle_of_both_symbols_of_a_two_replay_run(tmp_path):
    """``ats serve reload --db`` before ``ats serve --mode paper --replay A --replay B`` (the request is read before
    the first bar): both symbols swap to the requested bundle at the first bar, recorded per symbol; a broken
    candidate is refused for both."""
    from typer.testing import CliRunner

    from ats_cli.main import app
    from tests.serving import bundle_kit as kit
    from tests.serving.ops_kit import WARMUP_BARS

    runner = CliRunner()
    first = kit.build_bundle(tmp_path / "first", seed=0)
    second = kit.build_bundle(tmp_path / "second", seed=1)
    btc, eth = tmp_path / "BTCUSDT-1h.parquet", tmp_path / "ETHUSDT-1h.parquet"
    make_candles(WARMUP_BARS + 4, seed=11).to_parquet(btc)
    make_candles(WARMUP_BARS + 4, seed=12, start_price=2_000.0).to_parquet(eth)
    args = ["serve", "--mode", "paper", "--replay", str(btc), "--replay", str(eth), "--bundle", str(first),
            "--warmup-bars", str(WARMUP_BARS), "--allow-transfer"]
    env = {"COLUMNS": "200"}
    db = tmp_path / "S.sqlite"
    assert runner.invoke(app, ["serve", "reload", "--db", str(db), "--bundle", str(second)]).exit_code == 0
    r = runner.invoke(app, [*args, "--db", str(db)], env=env)
    assert r.exit_code == 0, r.output
    ev = StateStore.sqlite(db).events("paper")
    swapped = ev[ev.kind == "bundle_swapped"]
    assert sorted(d["symbol"] for d in swapped.detail) == ["BTCUSDT", "ETHUSDT"]
    assert {d["bundle"] for d in swapped.detail} == {str(second)} and swapped.time.nunique() == 1
    assert {d["trigger"] for d in swapped.detail} == {"reload_request"}

    broken = kit.build_bundle(tmp_path / "broken", seed=2)
    weights = next(p for p in broken.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-16])  # truncated: its SHA-256 no longer matches the manifest
    db2 = tmp_path / "T.sqlite"
    assert runner.invoke(app, ["serve", "reload", "--db", str(db2), "--bundle", str(broken)]).exit_code == 0
    r = runner.invoke(app, [*args, "--db", str(db2)], env=env)
    assert r.exit_code == 0, r.output
    ev = StateStore.sqlite(db2).events("paper")
    rejected = ev[ev.kind == "bundle_rejected"]
    assert sorted(d["symbol"] for d in rejected.detail) == ["BTCUSDT", "ETHUSDT"]
    assert set(rejected.detail.iloc[0]["refused_by"]) == {"BTCUSDT", "ETHUSDT"}
    assert all("load failed" in d["reason"] for d in rejected.detail)
    assert "bundle_swapped" not in set(ev.kind) and {d["kept"] for d in rejected.detail} == {str(first)}
