"""`ats serve --mode testnet`'s composition against the fake Binance over 110 bars of real candles,
with a demo-sized context (1,010 bars), Binance's 5 s order-query lag and one fault on about every
other bar (issue 17's "done when"; :mod:`tests.kit.exchange_sim`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.store import StateStore
from tests.kit.exchange_sim import FAULTS, run_crash_sweep, run_fault_sim
from tests.serving.bundle_kit import build_bundle, make_it_trade


@pytest.fixture(scope="module")
def trading_bundle(tmp_path_factory) -> Path:
    return make_it_trade(build_bundle(tmp_path_factory.mktemp("bundle") / "bundle"))


def test_testnet_serving_trades_110_bars_through_binance_faults_without_a_duplicate(trading_bundle, tmp_path):
    db = tmp_path / "testnet.sqlite"
    report = run_fault_sim(trading_bundle, db, bars=110, seed=0, fault_rate=0.5)
    store = StateStore.sqlite(db)
    assert store.decisions("testnet")["bar_open_time"].is_unique
    # the bundle needs 1,010 closed bars; ccxt serves 1,000 a request: the first bar is the bundle's
    assert report.first_source == "v2" and report.sources.get("v2", 0) >= 100
    assert report.decisions == 110 and report.one_row_per_bar
    assert report.exchange_trades >= 20  # it traded: entries, exits, stops and take-profits
    assert sum(report.faults.values()) >= 40 and len(report.faults) >= 12  # most fault kinds were met
    assert report.duplicate_client_ids == {}
    assert report.position_matches and not report.blocked_at_end
    assert not report.secret_in_store
    assert "internal_error" not in report.events  # no fault was taken for a bug
    fills = store.exchange_fills("BTCUSDT")
    assert fills["client_id"].notna().all()  # every trade is linked to our entry, exit, stop or take-profit
    assert set(report.faults) <= {label for label, _, _ in FAULTS}


@pytest.mark.slow
def test_crash_sweep_kills_the_served_composition_at_an_injected_point_and_restarts_it(trading_bundle, tmp_path):
    (report,) = run_crash_sweep(trading_bundle, tmp_path, bars=2, points=("after_intent_written",)).values()
    assert list(report.crashes.values()) == ["killed; restarted: ok"]  # killed by the injected KillAt
    assert report.ok and report.decisions == 2
