"""Paper on live candles with several symbols on one account (:class:`serving.paper_live.PaperLivePortfolio`,
``ats serve --mode paper --symbols BTCUSDT,ETHUSDT``) against the multi-symbol fake exchange: it equals the
multi-symbol replay of the same closed candles (as ``test_paper_live.py`` shows for one symbol)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from envs.config import CostConfig
from market.decision import Decision, DecisionContext, StatelessPolicy
from market.instruments import resolve_spec
from serving.account_risk import AccountGuard, AccountRiskConfig, per_symbol_limits, symbol_scope
from serving.errors import FatalError, RetryableError
from serving.exchange import BinanceFuturesBroker, make_client
from serving.hotswap import BackoffConfig, PolicySlot, SlotGroup
from serving.loop import ServeConfig
from serving.paper_live import FeedConfig, PaperLiveLoop, PaperLivePortfolio, _last_atr
from serving.portfolio import Leg, run_portfolio_replay, sleeve_equity_usdt
from serving.risk import RiskConfig, RiskGuard
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.kit.fake_binance import KLINES, FakeBinance, Fault
from tests.serving.fakes import FlipPolicy, ScriptedFallback

H = 3_600_000
BTC = make_candles(300, seed=7)
ETH = make_candles(300, seed=8, start_price=2_000.0)
FIRST = 99  # the last closed bar at T0
T0 = int(BTC.index[FIRST + 1].value // 1_000_000) + 60_000  # one minute into bar 100
CONTEXT = 40
SYMBOLS = {"BTCUSDT": "BTC/USDT:USDT", "ETHUSDT": "ETH/USDT:USDT"}
EQUITY = 10_000.0


class LongEth(StatelessPolicy):
    """Long (0.5 of the sleeve at 3x) on every bar: a position held across bars (the flip reverses every bar)."""

    name = "long"

    def decide(self, ctx: DecisionContext) -> Decision:
        return Decision(direction=1, leverage=3.0, size_frac=0.5, stop_atr=1.0, take_profit_atr=2.0)


class FakeTime:
    """Wall and monotonic clock: the fake exchange's; sleeping moves it."""

    def __init__(self, fake: FakeBinance) -> None:
        self.fake = fake

    def __call__(self) -> float:
        return self.fake.now_ms / 1000.0

    def sleep(self, seconds: float) -> None:
        self.fake.now_ms += round(seconds * 1000)


@pytest.fixture
def fake():
    with FakeBinance({"BTCUSDT": BTC, "ETHUSDT": ETH},
                     {"BTCUSDT": BTC["funding_rate"].dropna(), "ETHUSDT": ETH["funding_rate"].dropna()},
                     now_ms=T0) as server:  # fmt: skip
        yield server


def _policies() -> dict[str, StatelessPolicy]:
    return {"BTCUSDT": FlipPolicy(), "ETHUSDT": LongEth()}


def _config(equity: float = EQUITY) -> ServeConfig:
    return ServeConfig(run_id="p", context_bars=CONTEXT, initial_equity_usdt=equity,
                       primary_backoff=BackoffConfig(initial_bars=0))


def _portfolio(fake, store=None, *, symbol_risk: RiskConfig | None = None, account_risk: AccountRiskConfig | None = None,
               primaries: dict | None = None, slot_group: SlotGroup | None = None
               ) -> tuple[PaperLivePortfolio, StateStore]:  # fmt: skip
    """Both symbols' loops on one client and one store (each on its sleeve, its own symbol guard), behind the
    account's guard: wired as ``ats serve --mode paper --symbols`` does (:func:`serving.app.serve_paper_live_multi`)."""
    client = make_client(api_key=None, secret=None, sandbox=False, base_url=fake.url, timeout_ms=2_000,
                         rate_limit=False)  # fmt: skip
    store = store if store is not None else StateStore("sqlite://")
    clock = FakeTime(fake)
    sleeve = _config(sleeve_equity_usdt(EQUITY, len(SYMBOLS)))
    policies = _policies()
    loops = []
    for sym, unified in SYMBOLS.items():
        guard = (RiskGuard(per_symbol_limits(symbol_risk), store, scope=symbol_scope(sym))
                 if symbol_risk is not None else None)
        loops.append(PaperLiveLoop(
            BinanceFuturesBroker(client, unified, read_attempts=2, sleep=lambda s: None), store, sleeve,
            FeedConfig(symbol=unified), primary=(primaries or policies)[sym], fallback=ScriptedFallback(),
            costs=CostConfig(instrument=resolve_spec(sym).spec), guard=guard, wall_clock_s=clock, monotonic_s=clock,
            sleep=clock.sleep))  # fmt: skip
    account = AccountGuard(account_risk, store) if account_risk is not None else None
    return PaperLivePortfolio(loops, store, _config(), account_guard=account, slot_group=slot_group), store


def _replay(pf: PaperLivePortfolio, n_bars: int, *, symbol_risk: RiskConfig | None = None,
            account_risk: AccountRiskConfig | None = None):
    """The multi-symbol replay of the same closed candles: the first decided bar after CONTEXT - 1 warm-up rows,
    each bar's ATR over its context window (as the live loop computes it), each symbol under the costs the live
    run traded with (the exchange's spec, read at start)."""
    costs = {loop.stepper.symbol: loop.costs for loop in pf.loops}
    legs = []
    for sym, frame in (("BTCUSDT", BTC), ("ETHUSDT", ETH)):
        candles = frame.iloc[FIRST - CONTEXT + 1 : FIRST + n_bars]
        atr = np.array([_last_atr(candles.iloc[max(0, t - CONTEXT + 1) : t + 1], 14) for t in range(len(candles))])
        legs.append(Leg(sym, candles, _policies()[sym], ScriptedFallback(), atr, costs[sym]))
    store = StateStore("sqlite://")
    summary = run_portfolio_replay(legs, store=store, config=_config().updated(warmup_bars=CONTEXT - 1),
                                   symbol_risk=symbol_risk, account_risk=account_risk)  # fmt: skip
    return summary, store


DECISION_COLS = ["symbol", "bar_open_time", "source", "direction", "leverage", "size_frac", "fallback_reason"]
EQUITY_COLS = ["symbol", "bar_open_time", "equity_usdt", "cash_usdt", "position_side", "position_qty_base"]
FILL_COLS = ["symbol", "bar_open_time", "side", "qty_base", "price", "fee_usdt", "slippage_usdt", "reason"]


def _sorted(frame: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    return frame[cols].sort_values(["bar_open_time", "symbol"], kind="stable").reset_index(drop=True)


@pytest.mark.parametrize("guarded", [False, True], ids=["no_guard", "guards"])
def test_two_symbols_on_live_candles_equal_the_multi_symbol_replay(fake, guarded):
    n_bars = 12
    risk = {"symbol_risk": RiskConfig(), "account_risk": AccountRiskConfig()} if guarded else {}
    pf, store = _portfolio(fake, **risk)
    for _ in range(n_bars):
        rows = pf.step()
        assert [r.symbol for r in rows] == ["BTCUSDT", "ETHUSDT"]  # decided together, one row per symbol
        assert rows[0].bar_open_time == rows[1].bar_open_time
        assert pf.step() == []  # the same bar again: nothing new
        fake.now_ms += H
    summary, replay = _replay(pf, n_bars, **risk)
    decisions = store.decisions("p")
    assert decisions.groupby("symbol").size().to_dict() == {"BTCUSDT": n_bars, "ETHUSDT": n_bars}
    assert list(decisions[decisions.symbol == "ETHUSDT"].bar_open_time) == list(BTC.index[FIRST : FIRST + n_bars])
    pd.testing.assert_frame_equal(_sorted(decisions, DECISION_COLS), _sorted(replay.decisions("p"), DECISION_COLS),
                                  check_exact=True)  # fmt: skip
    pd.testing.assert_frame_equal(_sorted(store.equity("p"), EQUITY_COLS), _sorted(replay.equity("p"), EQUITY_COLS),
                                  check_exact=True)  # fmt: skip
    pd.testing.assert_frame_equal(_sorted(store.fills("p"), FILL_COLS), _sorted(replay.fills("p"), FILL_COLS),
                                  check_exact=True)  # fmt: skip
    account, replay_account = store.account_equity("p"), replay.account_equity("p")
    assert len(account) == n_bars
    pd.testing.assert_frame_equal(account.drop(columns=["id"], errors="ignore").reset_index(drop=True),
                                  replay_account.drop(columns=["id"], errors="ignore").reset_index(drop=True),
                                  check_exact=True)  # fmt: skip
    fills = store.fills("p")
    assert set(fills.symbol) == {"BTCUSDT", "ETHUSDT"} and len(fills) >= 4
    assert pf.summary().final_equity_usdt == summary.final_equity_usdt
    assert {s: leg.final_equity_usdt for s, leg in pf.summary().legs.items()} == {
        s: leg.final_equity_usdt for s, leg in summary.legs.items()}
    started = store.events("p")
    (detail,) = started.detail[started.kind == "run_started"]
    assert detail["symbols"] == ["BTCUSDT", "ETHUSDT"] and detail["candles"] == "live"
    assert detail["sleeve_equity_usdt"] == EQUITY / 2 and set(detail["instrument"]) == {"BTCUSDT", "ETHUSDT"}


def test_a_failed_read_of_one_symbol_ends_the_poll_for_all_and_the_retry_decides_both(fake):
    pf, store = _portfolio(fake)
    fake.add_fault(KLINES, Fault("html_5xx"), times=2, symbol="ETHUSDT")  # both read attempts of ETH's klines
    with pytest.raises(RetryableError):
        pf.step()
    assert store.decisions("p").empty and store.account_equity("p").empty  # BTC was read, nothing was written
    rows = pf.step()  # the retry within the bar
    assert [(r.symbol, r.bar_open_time, r.source) for r in rows] == [
        ("BTCUSDT", BTC.index[FIRST], "v2"), ("ETHUSDT", BTC.index[FIRST], "v2")]
    assert len(store.account_equity("p")) == 1


def test_missed_bars_are_recorded_for_every_symbol_with_an_account_row_each(fake):
    pf, store = _portfolio(fake)
    pf.step()
    fake.now_ms += 3 * H  # bars 100 and 101 close while nobody polls
    rows = pf.step()
    assert [(r.symbol, r.bar_open_time, r.source) for r in rows] == [
        ("BTCUSDT", BTC.index[FIRST + 1], "missed"), ("ETHUSDT", BTC.index[FIRST + 1], "missed"),
        ("BTCUSDT", BTC.index[FIRST + 2], "missed"), ("ETHUSDT", BTC.index[FIRST + 2], "missed"),
        ("BTCUSDT", BTC.index[FIRST + 3], "v2"), ("ETHUSDT", BTC.index[FIRST + 3], "v2")]
    account = store.account_equity("p")
    assert list(account.bar_open_time) == list(BTC.index[FIRST : FIRST + 4])
    equity = store.equity("p")
    for ts, total in zip(account.bar_open_time, account.equity_usdt, strict=True):
        assert math.isclose(total, equity[equity.bar_open_time == ts].equity_usdt.sum(), rel_tol=1e-12)
    # ETH is long from bar 99's decision: its position held through the missed bars, its candles still marked
    eth = equity[equity.symbol == "ETHUSDT"]
    assert (eth.position_side.iloc[1:3] == 1).all() and eth.equity_usdt.iloc[1] != eth.equity_usdt.iloc[2]
    ev = store.events("p")
    (gap,) = ev.detail[ev.kind == "bars_missed"]
    assert gap["count"] == 2 and gap["symbols"] == ["BTCUSDT", "ETHUSDT"]


def test_an_invalid_candle_of_one_symbol_quarantines_it_while_the_other_is_decided(fake):
    pf, store = _portfolio(fake)
    pf.step()
    fake.now_ms += H
    fake.corrupt_candle(int(ETH.index[FIRST + 1].value // 1_000_000), symbol="ETHUSDT", close=float("nan"))
    btc, eth = pf.step()
    assert (btc.symbol, btc.source) == ("BTCUSDT", "v2")
    assert (eth.symbol, eth.source) == ("ETHUSDT", "guard") and eth.fallback_reason.startswith("quarantine")
    assert len(store.account_equity("p")) == 2


def test_a_store_holding_the_run_is_refused_and_loops_must_match_the_account(fake):
    pf, store = _portfolio(fake)
    pf.step()
    again, _ = _portfolio(fake, store=store)
    with pytest.raises(FatalError, match="cannot be resumed"):
        again.step()
    loop = pf.loops[0]
    with pytest.raises(ValueError, match="sleeves"):
        PaperLivePortfolio([loop], store, _config())  # one symbol on half the account
    with pytest.raises(ValueError, match="each symbol"):
        PaperLivePortfolio([loop, loop], store, _config())


def test_run_stops_after_max_bars_and_writes_the_account_totals(fake):
    pf, store = _portfolio(fake)
    summary = pf.run(max_bars=3, install_signal_handlers=False)
    assert summary.bars == 3 and summary.symbols == ("BTCUSDT", "ETHUSDT")
    assert store.decisions("p").groupby("symbol").size().to_dict() == {"BTCUSDT": 3, "ETHUSDT": 3}
    ev = store.events("p")
    assert ev.kind.iloc[-1] == "run_finished"
    finished = ev.detail.iloc[-1]
    assert finished["stopped"] == "max_bars" and set(finished["by_symbol"]) == {"BTCUSDT", "ETHUSDT"}
    assert math.isclose(finished["final_equity_usdt"], sum(v["final_equity_usdt"] for v in finished["by_symbol"].values()))


def test_ats_serve_paper_with_two_symbols_on_live_candles(tmp_path, monkeypatch):
    """``ats serve --mode paper --symbols BTCUSDT,ETHUSDT --base-url URL`` (no key): both symbols decided together on
    one paper account (V1: the bundle does not load), an account row, ``ats status`` shows both; a bundle not
    trained on them is refused without ``--allow-transfer``; ``--symbol`` and ``--symbols`` with ``--replay`` are
    refused."""
    import json

    from typer.testing import CliRunner

    from ats_cli.main import app
    from tests.serving.portfolio_kit import BTC as KIT_BTC
    from tests.serving.portfolio_kit import two_symbol_fake

    for var in ("ATS_BINANCE_API_KEY", "ATS_BINANCE_API_SECRET", "ATS_DISCORD_WEBHOOK_URL", "ATS_TELEGRAM_BOT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"gate": {"verdict": "HOLD"}, "data": {"symbol": "BTCUSDT"}}))
    db = tmp_path / "paper.sqlite"
    args = ["serve", "--mode", "paper", "--symbols", "BTCUSDT,ETHUSDT", "--bundle", str(bundle), "--db", str(db),
            "--max-bars", "1"]
    env = {"COLUMNS": "250"}
    with two_symbol_fake() as fake:
        refused = runner.invoke(app, [*args, "--base-url", fake.url], env=env)
        assert refused.exit_code != 0 and "ETHUSDT" in refused.output and "--allow-transfer" in refused.output
        both = runner.invoke(app, [*args, "--base-url", fake.url, "--symbol", "BTCUSDT"], env=env)
        assert both.exit_code != 0 and "no --symbol" in both.output
        r = runner.invoke(app, [*args, "--base-url", fake.url, "--allow-transfer", "--watch-dir", str(tmp_path / "w")],
                          env=env)  # fmt: skip
        assert r.exit_code == 0, r.output
        assert "served 2 symbols over 1 bars" in r.output and "ETHUSDT: 0 decided by V2, 1 by V1" in r.output
    store = StateStore.sqlite(db)
    d = store.decisions("paper")
    assert d.groupby("symbol").size().to_dict() == {"BTCUSDT": 1, "ETHUSDT": 1}
    assert set(d.source) == {"v1"} and list(d.bar_open_time.unique()) == [KIT_BTC.index[1_099]]
    assert len(store.account_equity("paper")) == 1
    kinds = list(store.events("paper").kind)
    assert "transfer_allowed" in kinds and kinds[-1] == "run_finished"
    store.close()
    status = runner.invoke(app, ["status", "--db", str(db)], env=env)
    assert status.exit_code == 0, status.output
    assert "BTCUSDT" in status.output and "ETHUSDT" in status.output and "account" in status.output.lower()
    replayed = runner.invoke(app, ["serve", "--mode", "paper", "--symbols", "BTCUSDT,ETHUSDT", "--replay",
                                   str(tmp_path / "x.parquet"), "--bundle", str(bundle), "--db",
                                   str(tmp_path / "r.sqlite")], env=env)  # fmt: skip
    assert replayed.exit_code != 0 and "one --replay per symbol" in replayed.output
    assert not (tmp_path / "r.sqlite").exists()


def test_a_watched_bundle_is_swapped_into_both_symbols_at_the_same_live_bar(fake, tmp_path):
    from tests.serving.test_hotswap_portfolio import Loader, Long, _bundle

    loader = Loader()
    slots = {sym: PolicySlot(FlipPolicy(), loader=loader) for sym in SYMBOLS}
    watch = tmp_path / "watch"
    watch.mkdir()
    pf, store = _portfolio(fake, primaries=slots, slot_group=SlotGroup(slots, watch_dir=watch))
    for _ in range(2):
        pf.step()
        fake.now_ms += H
    _bundle(watch / "long", "long")
    rows = pf.step()
    ev = store.events("p")
    swapped = ev[ev.kind == "bundle_swapped"]
    assert sorted(d["symbol"] for d in swapped.detail) == ["BTCUSDT", "ETHUSDT"]
    assert set(swapped.time) == {BTC.index[FIRST + 2]}
    assert [(r.symbol, r.direction) for r in rows] == [("BTCUSDT", 1), ("ETHUSDT", 1)]
    assert all(isinstance(slot.policy, Long) for slot in slots.values()) and len(loader.loaded) == 2
