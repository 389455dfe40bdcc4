"""``ats serve --mode paper --replay A --replay B``: several symbols on one paper account from the command line, and
``ats status`` of such a run; the bundle's symbols and ``--allow-transfer``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ats_cli.main import app
from ats_cli.serve_cmd import replay_symbol
from serving.app import bundle_symbols, check_symbols_served
from serving.errors import FatalError
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.serving import bundle_kit as kit
from tests.serving.ops_kit import WARMUP_BARS

runner = CliRunner()
BARS = 24


def test_the_symbol_of_a_replay_file_comes_from_its_name_or_is_given() -> None:
    assert replay_symbol("data/BTCUSDT-1h.parquet") == ("BTCUSDT", Path("data/BTCUSDT-1h.parquet"))
    assert replay_symbol("/x/ethusdt_1h.parquet")[0] == "ETHUSDT"
    assert replay_symbol("SOL/USDT:USDT=/x/candles.parquet") == ("SOLUSDT", Path("/x/candles.parquet"))
    with pytest.raises(typer.BadParameter, match="SYMBOL=PATH"):
        replay_symbol("/x/my candles.parquet")


def _manifest(tmp_path: Path, data: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "manifest.json").write_text(json.dumps({"data": data}))
    return tmp_path


def test_a_pooled_bundle_serves_its_symbols_and_refuses_others_unless_transfer_is_allowed(tmp_path) -> None:
    pooled = _manifest(tmp_path / "pooled", {"symbol": "BTCUSDT", "symbols": ["BTC/USDT:USDT", "ETHUSDT"]})
    assert bundle_symbols(pooled) == ["BTCUSDT", "ETHUSDT"]
    assert check_symbols_served(pooled, ["BTCUSDT", "ETHUSDT"], allow_transfer=False) == []
    with pytest.raises(FatalError, match=r"trained on BTCUSDT, ETHUSDT; it is not asked to serve SOLUSDT.*--allow-transfer"):
        check_symbols_served(pooled, ["BTCUSDT", "SOLUSDT"], allow_transfer=False)
    assert check_symbols_served(pooled, ["BTCUSDT", "SOLUSDT"], allow_transfer=True) == ["SOLUSDT"]
    single = _manifest(tmp_path / "single", {"symbol": "ETHUSDT"})
    assert bundle_symbols(single) == ["ETHUSDT"]
    assert bundle_symbols(tmp_path / "nothing") == []


def test_two_replays_on_one_account_and_status_shows_both(tmp_path) -> None:
    bundle = kit.make_it_trade(kit.build_bundle(tmp_path / "bundle"))  # synthetic: its manifest names no symbol
    btc, eth = tmp_path / "BTCUSDT-1h.parquet", tmp_path / "ETHUSDT-1h.parquet"
    make_candles(WARMUP_BARS + BARS, seed=11).to_parquet(btc)
    make_candles(WARMUP_BARS + BARS, seed=12, start_price=2_000.0).to_parquet(eth)
    db = tmp_path / "S.sqlite"
    args = ["serve", "--mode", "paper", "--replay", str(btc), "--replay", str(eth), "--bundle", str(bundle),
            "--db", str(db), "--warmup-bars", str(WARMUP_BARS)]
    r = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "--allow-transfer" in r.output and "Traceback" not in r.output, r.output
    assert not db.exists()
    r = runner.invoke(app, [*args, "--allow-transfer"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "served 2 symbols" in r.output
    with StateStore.open(db) as store:
        decisions = store.decisions()
        assert sorted(decisions.symbol.unique()) == ["BTCUSDT", "ETHUSDT"]
        assert (decisions.groupby("symbol").size() == BARS).all()
        assert set(decisions.source) <= {"v2", "v1", "guard"} and (decisions.source == "v2").any()
        assert len(store.account_equity()) == BARS
        events = store.events()
        transfer = events[events.kind == "transfer_allowed"]
        assert len(transfer) == 1 and transfer.detail.iloc[0]["symbols"] == ["BTCUSDT", "ETHUSDT"]
        # each symbol traded its own instrument spec (prices on its own tick)
        fills = store.fills()
        assert set(fills.symbol) <= {"BTCUSDT", "ETHUSDT"}
    r = runner.invoke(app, ["status", "--db", str(db)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for text in ("BTCUSDT", "ETHUSDT", "account", "account risk state"):
        assert text in r.output, r.output
