"""Arming rules of live mode, and ``serve_live`` end to end on the fake exchange (testnet mode)."""

from __future__ import annotations

import json
import os

import pytest

from ats_cli.serve_live import arming_phrase, check_arming, serve_live
from serving.errors import FatalError
from serving.secrets import ENV_API_KEY, ENV_API_SECRET
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.kit.fake_binance import FakeBinance

SYM = "BTC/USDT:USDT"
PASS = {"gate": {"verdict": "PASS"}}


def _arm(**kw):
    args = {"mode": "live", "live_flag": True, "manifest": PASS, "force_gate": False,
            "typed_phrase": arming_phrase(SYM), "symbol": SYM}
    args.update(kw)
    return check_arming(**args)


def test_live_arms_only_with_flag_pass_gate_and_phrase():
    assert _arm() == []
    assert _arm(typed_phrase=f"  {arming_phrase(SYM)}\n") == []
    with pytest.raises(FatalError, match="--live"):
        _arm(live_flag=False)
    for manifest in (None, {}, {"gate": {"verdict": "HOLD"}}, {"gate": {"verdict": "REJECT"}}):
        with pytest.raises(FatalError, match="not PASS"):
            _arm(manifest=manifest)
    assert "overridden" in _arm(manifest={"gate": {"verdict": "REJECT"}}, force_gate=True)[0]
    for typed in (None, "", "yes", arming_phrase("ETH/USDT:USDT"), arming_phrase(SYM).lower()):
        with pytest.raises(FatalError, match="arming phrase"):
            _arm(typed_phrase=typed)
    with pytest.raises(FatalError, match="mode"):
        _arm(mode="paper")


def test_testnet_needs_no_arming_but_refuses_a_bundle_without_pass_unless_forced():
    assert check_arming(mode="testnet", live_flag=False, manifest=PASS, force_gate=False, typed_phrase=None,
                        symbol=SYM) == []
    for manifest, verdict in ((None, "absent"), ({"gate": {"verdict": "HOLD"}}, "HOLD"),
                              ({"gate": {"verdict": "REJECT"}}, "REJECT")):
        with pytest.raises(FatalError, match=f"verdict is {verdict}, not PASS"):
            check_arming(mode="testnet", live_flag=False, manifest=manifest, force_gate=False, typed_phrase=None,
                         symbol=SYM)
        warn = check_arming(mode="testnet", live_flag=False, manifest=manifest, force_gate=True, typed_phrase=None,
                            symbol=SYM)
        assert verdict in warn[0] and "--force-gate" in warn[0]


def test_live_refused_before_any_exchange_call(tmp_path):
    prompts = []
    with pytest.raises(FatalError, match="arming phrase"):
        serve_live(mode="live", bundle_dir=tmp_path / "nobundle", db_path=tmp_path / "s.sqlite", live=True,
                   force_gate=True, prompt=lambda text: prompts.append(text) or "nope", log=lambda m: None,
                   base_url="http://127.0.0.1:9")  # nothing listens there: any call would fail differently
    assert prompts and arming_phrase(SYM) in prompts[0]
    assert not (tmp_path / "s.sqlite").exists()


def test_serve_live_testnet_one_bar_with_v1_fallback(tmp_path, monkeypatch):
    candles = make_candles(1_000, seed=3)
    t0 = int(candles.index[900].value // 1_000_000) + 60_000
    env = tmp_path / ".env"
    env.write_text(f"{ENV_API_KEY}=testkey1234\n{ENV_API_SECRET}=testsecret5678\n")
    os.chmod(env, 0o600)
    monkeypatch.delenv(ENV_API_KEY, raising=False)
    monkeypatch.delenv(ENV_API_SECRET, raising=False)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"gate": {"verdict": "HOLD"}}))
    logs: list[str] = []
    with FakeBinance(candles, candles["funding_rate"].dropna(), now_ms=t0) as fake:
        with pytest.raises(FatalError, match="HOLD"):  # refused before any order without --force-gate
            serve_live(mode="testnet", bundle_dir=bundle, db_path=tmp_path / "s.sqlite", env_file=env,
                       max_bars=1, log=logs.append, base_url=fake.url, use_guard=False)
        done = serve_live(mode="testnet", bundle_dir=bundle, db_path=tmp_path / "s.sqlite", env_file=env,
                          max_bars=1, log=logs.append, base_url=fake.url, use_guard=False, force_gate=True)
    assert done == 1
    store = StateStore.sqlite(tmp_path / "s.sqlite")
    d = store.decisions("testnet")
    assert len(d) == 1 and d["source"].iloc[0] == "v1"
    assert d["fallback_reason"].iloc[0].startswith("bundle_load_failed")
    assert any("HOLD" in m for m in logs) and not any("testkey1234" in m for m in logs)
    from serving.status import read_status

    status = read_status(store)
    assert status.mode == "testnet" and status.run_id == "testnet"


def test_serve_live_sends_notifications_from_the_environment(tmp_path, monkeypatch):
    from tests.serving.test_notify import _Server

    candles = make_candles(1_000, seed=3)
    t0 = int(candles.index[900].value // 1_000_000) + 60_000
    for var in (ENV_API_KEY, ENV_API_SECRET):
        monkeypatch.setenv(var, "notifykey1234" if var == ENV_API_KEY else "notifysecret5678")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    server = _Server("ok")
    monkeypatch.setenv("ATS_DISCORD_WEBHOOK_URL", f"{server.url}/api/webhooks/1/tok")
    try:
        with FakeBinance(candles, candles["funding_rate"].dropna(), now_ms=t0) as fake:
            done = serve_live(mode="testnet", bundle_dir=bundle, db_path=tmp_path / "s.sqlite", max_bars=1,
                              log=lambda m: None, base_url=fake.url, force_gate=True)
    finally:
        server.close()
    assert done == 1
    texts = [b["content"] for b in server.bodies]  # serve_live closes (drains) the notifier before returning
    assert any("live_started" in t for t in texts) and any("live_stopped" in t for t in texts)
    assert any("fallback_engaged" in t for t in texts)  # no bundle: V1 decides
