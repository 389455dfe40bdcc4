"""Hot-swap of a testnet/live run serving several symbols (:class:`serving.live_portfolio.LivePortfolio` with the
paper portfolio's :class:`serving.hotswap.SlotGroup`) against the fake exchange serving BTCUSDT and ETHUSDT: a
candidate is checked on every symbol and swapped into both at the same bar, before either decides it, or into
neither when one symbol refuses it (its probe, or the live rules); events per symbol."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from market.decision import Decision, DecisionContext, Policy, StatelessPolicy
from serving.hotswap import BackoffConfig, PolicySlot, SlotGroup, reload_request_path, request_reload
from serving.store import StateStore
from tests.kit.fake_binance import FakeBinance, assert_consistent
from tests.serving.portfolio_kit import SYMBOLS, H, WideFlip, live_portfolio, two_symbol_fake


class Short(StatelessPolicy):
    """Short whatever the bar (far stop and take-profit, as :class:`tests.serving.portfolio_kit.WideFlip`)."""

    name = "short"

    def decide(self, ctx: DecisionContext) -> Decision:
        return Decision(direction=-1, leverage=3.0, size_frac=0.5, stop_atr=40.0, take_profit_atr=60.0)


class CheapOnly(StatelessPolicy):
    """Long on coins below 10,000 USDT, raises on the others: BTC's probe refuses it, ETH's accepts it."""

    name = "cheap_only"

    def decide(self, ctx: DecisionContext) -> Decision:
        if float(ctx.candles["close"].iloc[-1]) > 10_000.0:
            raise ValueError("price out of the range this policy was trained on")
        return Decision(direction=1, leverage=3.0, size_frac=0.5, stop_atr=40.0, take_profit_atr=60.0)


POLICIES: dict[str, type[StatelessPolicy]] = {"wide_flip": WideFlip, "short": Short, "cheap_only": CheapOnly}


def _loader(path: Path) -> Policy:
    """A test bundle: a directory whose manifest names its policy (a new instance per call)."""
    return POLICIES[json.loads((Path(path) / "manifest.json").read_text())["policy"]]()


def _bundle(path: Path, policy: str) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"policy": policy}))
    return path


def _wall(fake: FakeBinance):
    return lambda: fake.now_ms / 1000.0


def _portfolio(fake: FakeBinance, store: StateStore, tmp_path: Path):
    """The kit's two-symbol portfolio with a slot per symbol (the same v0 bundle) and the group reading the reload
    request of ``tmp_path/s.sqlite``."""
    v0 = _bundle(tmp_path / "v0", "wide_flip")
    slots = {sym: PolicySlot(_loader(v0), source=v0, loader=_loader, backoff=BackoffConfig(initial_bars=0))
             for sym in SYMBOLS}
    pf = live_portfolio(fake.url, store, wall_clock_s=_wall(fake), policies=slots)  # type: ignore[arg-type]
    pf.slot_group = SlotGroup(slots, reload_file=reload_request_path(tmp_path / "s.sqlite"))
    return pf, slots, v0


def _events(store: StateStore, kind: str) -> list[tuple[pd.Timestamp, dict]]:
    ev = store.events("live")
    ev = ev[ev["kind"] == kind]
    return list(zip(ev["time"], ev["detail"], strict=True))


def test_a_reload_swaps_both_symbols_at_the_same_bar_before_either_decides(tmp_path):
    store = StateStore.sqlite(tmp_path / "s.sqlite")
    with two_symbol_fake() as fake:
        pf, slots, v0 = _portfolio(fake, store, tmp_path)
        b1 = pf.step()["BTCUSDT"].bar_open_time
        v1 = _bundle(tmp_path / "v1", "short")
        request = request_reload(reload_request_path(tmp_path / "s.sqlite"), v1)
        assert all(r.bar_open_time is None for r in pf.step().values())  # the same bar again: both decided it
        assert request.exists() and all(s.source == v0 for s in slots.values())  # the candidate waits for a new bar
        fake.now_ms += H
        results = pf.step()
        b2 = b1 + pd.Timedelta(hours=1)
        assert {s: r.bar_open_time for s, r in results.items()} == {"BTCUSDT": b2, "ETHUSDT": b2}
        assert not request.exists() and all(s.source == v1 for s in slots.values())
        assert all(isinstance(s.policy, Short) for s in slots.values())
        swapped = _events(store, "bundle_swapped")
        assert sorted(d["symbol"] for _, d in swapped) == ["BTCUSDT", "ETHUSDT"]
        assert {pd.Timestamp(t) for t, _ in swapped} == {b2}  # at the bar both then decided
        assert all(d["bundle"] == str(v1) and d["previous"] == str(v0) and d["trigger"] == "reload_request"
                   for _, d in swapped)  # fmt: skip
        d = store.decisions("live")
        at_b2 = d[d["bar_open_time"] == b2]
        assert sorted(at_b2["symbol"]) == ["BTCUSDT", "ETHUSDT"]
        assert set(at_b2["source"]) == {"v2"} and set(at_b2["direction"]) == {-1}  # the new bundle decided both
        for sym in SYMBOLS:
            assert fake.position(sym)[0] < 0, sym  # both short on the exchange
            assert_consistent(fake, store, sym)
    store.close()


def test_a_candidate_whose_probe_fails_for_one_symbol_is_refused_for_both(tmp_path):
    store = StateStore.sqlite(tmp_path / "s.sqlite")
    with two_symbol_fake() as fake:
        pf, slots, v0 = _portfolio(fake, store, tmp_path)
        b1 = pf.step()["BTCUSDT"].bar_open_time
        bad = _bundle(tmp_path / "cheap", "cheap_only")
        request = request_reload(reload_request_path(tmp_path / "s.sqlite"), bad)
        fake.now_ms += H
        results = pf.step()
        b2 = b1 + pd.Timedelta(hours=1)
        assert all(r.bar_open_time == b2 for r in results.values())
        assert not request.exists()  # consumed: refused, not retried every bar
        assert all(s.source == v0 and isinstance(s.policy, WideFlip) for s in slots.values())  # ETH did not swap
        assert _events(store, "bundle_swapped") == []
        rejected = {d["symbol"]: d for _, d in _events(store, "bundle_rejected")}
        assert set(rejected) == {"BTCUSDT", "ETHUSDT"}
        for det in rejected.values():
            assert list(det["refused_by"]) == ["BTCUSDT"] and "price out of the range" in det["refused_by"]["BTCUSDT"]
            assert det["kept"] == str(v0) and det["bundle"] == str(bad)
        assert rejected["ETHUSDT"]["reason"] is None and "probe" in rejected["BTCUSDT"]["reason"]
        d = store.decisions("live")
        at_b2 = d[d["bar_open_time"] == b2]
        assert set(at_b2["source"]) == {"v2"} and set(at_b2["direction"]) == {1 if b2.hour % 2 == 0 else -1}  # v0
        for sym in SYMBOLS:
            assert_consistent(fake, store, sym)
    store.close()


def test_ats_serve_symbols_composition_refuses_a_live_unservable_candidate_for_every_symbol(tmp_path):
    """:func:`ats_cli.serve_live.build_live_portfolio` (``ats serve --mode testnet --symbols``) with real bundles: a
    candidate with a rebalance band is refused by every symbol's live loader (the live rules), both keep the bundle;
    a servable copy then swaps into both."""
    from ats_cli.serve_live import build_live_portfolio
    from envs.config import TradingRulesConfig
    from envs.trading_env import EnvConfig
    from serving.exchange import BinanceFuturesBroker, make_client
    from serving.live import LiveConfig
    from tests.serving import bundle_kit as kit

    plain = kit.build_bundle(tmp_path / "plain")
    band = kit.build_bundle(tmp_path / "band", env=EnvConfig(trading_rules=TradingRulesConfig(rebalance_band_frac=0.2)))
    copy = kit.copy_bundle(plain, tmp_path / "copy")
    db = tmp_path / "t.sqlite"
    store = StateStore.sqlite(db)
    with two_symbol_fake() as fake:
        client = make_client(api_key="k", secret="s", base_url=fake.url, timeout_ms=3_000, rate_limit=False)
        brokers = {u: BinanceFuturesBroker(client, u, read_attempts=3, sleep=lambda s: None) for u in SYMBOLS.values()}
        pf = build_live_portfolio(mode="testnet", bundle_dir=plain, store=store, brokers=brokers,
                                  live_config=LiveConfig(context_bars=1_010), force_gate=True, use_guard=False,
                                  log=lambda m: None, wall_clock_s=_wall(fake), sleep=lambda s: None,
                                  reload_file=reload_request_path(db))  # fmt: skip
        pf.step()
        request_reload(reload_request_path(db), band)
        fake.now_ms += H
        pf.step()
        ev = store.events("testnet")
        rejected = {d["symbol"]: d for d in ev[ev["kind"] == "bundle_rejected"]["detail"]}
        assert set(rejected) == {"BTCUSDT", "ETHUSDT"}
        for det in rejected.values():
            assert sorted(det["refused_by"]) == ["BTCUSDT", "ETHUSDT"]
            assert all("rebalance_band_frac" in why for why in det["refused_by"].values())
        assert all(lp.slot.source == plain for lp in pf.loops)
        request_reload(reload_request_path(db), copy)
        fake.now_ms += H
        pf.step()
        ev = store.events("testnet")
        swapped = ev[ev["kind"] == "bundle_swapped"]
        assert sorted(d["symbol"] for d in swapped["detail"]) == ["BTCUSDT", "ETHUSDT"]
        assert swapped["time"].nunique() == 1
        assert all(lp.slot.source == copy.resolve() for lp in pf.loops)
    store.close()


@pytest.mark.parametrize("bad", ["symbols", "slots"])
def test_a_slot_group_that_is_not_the_loops_slots_is_refused(tmp_path, bad):
    store = StateStore.sqlite(tmp_path / "s.sqlite")
    with two_symbol_fake() as fake:
        pf, slots, v0 = _portfolio(fake, store, tmp_path)
        other = PolicySlot(WideFlip(), source=v0, loader=_loader)
        wrong = {"BTCUSDT": slots["BTCUSDT"]} if bad == "symbols" else {**slots, "ETHUSDT": other}
        pf.slot_group = SlotGroup(wrong)
        with pytest.raises(ValueError, match="slot group"):
            pf.step()
    store.close()


def test_ats_serve_testnet_with_symbols_accepts_a_watch_dir(tmp_path, monkeypatch):
    """``--watch-dir`` with ``--mode testnet --symbols`` was refused; it is served now (one bar, both symbols)."""
    from typer.testing import CliRunner

    from ats_cli.main import app

    monkeypatch.setenv("ATS_BINANCE_API_KEY", "clikey1234")
    monkeypatch.setenv("ATS_BINANCE_API_SECRET", "clisecret5678")
    for var in ("ATS_DISCORD_WEBHOOK_URL", "ATS_TELEGRAM_BOT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    bundle = tmp_path / "bundle"
    bundle.mkdir()  # no loadable bundle: V1 decides
    (bundle / "manifest.json").write_text(json.dumps({"gate": {"verdict": "HOLD"}, "data": {"symbol": "BTCUSDT"}}))
    (tmp_path / "w").mkdir()
    db = tmp_path / "t.sqlite"
    with two_symbol_fake() as fake:
        r = CliRunner().invoke(app, ["serve", "--mode", "testnet", "--symbols", "BTCUSDT,ETHUSDT", "--bundle",
                                     str(bundle), "--db", str(db), "--force-gate", "--max-bars", "1", "--base-url",
                                     fake.url, "--allow-transfer", "--watch-dir", str(tmp_path / "w")],
                               env={"COLUMNS": "250"})  # fmt: skip
        assert r.exit_code == 0, r.output
    store = StateStore.sqlite(db)
    assert store.decisions("testnet").groupby("symbol").size().to_dict() == {"BTCUSDT": 1, "ETHUSDT": 1}
    store.close()
