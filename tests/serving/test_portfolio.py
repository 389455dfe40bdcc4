"""Multi-symbol paper replay (serving.portfolio) and the account's guard (serving.account_risk)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
import talib

from envs.config import CostConfig
from market.decision import Decision, DecisionContext, StatelessPolicy
from market.instruments import resolve_spec
from serving.account_risk import AccountRiskConfig, SymbolBook, gate_account
from serving.hotswap import BackoffConfig
from serving.loop import ServeConfig, run_replay
from serving.portfolio import Leg, run_portfolio_replay
from serving.risk import RiskConfig, RiskGuard, RiskState
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.serving.fakes import FixedPolicy, FlipPolicy, NanLeveragePolicy, ScriptedFallback

N_BARS = 200
WARMUP = 40
NOW = datetime(2025, 1, 1, tzinfo=UTC)
EQUITY = 10_000.0
LONG = Decision(direction=1, leverage=2.0, size_frac=0.5, stop_atr=3.0, take_profit_atr=6.0)
LOOSE = RiskConfig(max_leverage=20.0, daily_loss_limit_frac=None, max_drawdown_halt_frac=None,
                   fast_kill_consecutive_losses=None, slow_kill_min_profit_factor=None)

# the account's caps at their defaults (they do not bind on these runs), its loss limits and kill switches off (the
# flipping test policies lose more than 5 % a day)
LOOSE_ACCOUNT = AccountRiskConfig(daily_loss_limit_frac=None, max_drawdown_halt_frac=None,
                                  fast_kill_consecutive_losses=None, slow_kill_min_profit_factor=None)


def _costs(symbol: str) -> CostConfig:
    return CostConfig().with_instrument(resolve_spec(symbol).spec)


def _candles(symbol: str, n: int = N_BARS) -> pd.DataFrame:
    return {"BTCUSDT": make_candles(n, seed=11, start_price=30_000.0),
            "ETHUSDT": make_candles(n, seed=12, start_price=2_000.0, vol_per_bar=0.012)}[symbol]


def _atr(c: pd.DataFrame) -> np.ndarray:
    return talib.ATR(c.high.to_numpy(), c.low.to_numpy(), c.close.to_numpy(), 14)


class _EthPolicy(StatelessPolicy):
    """Long on even days, short on odd days (a second, different stream of decisions)."""

    name = "v2"

    def decide(self, ctx: DecisionContext) -> Decision:
        d = 1 if ctx.bar_open_time.day % 2 == 0 else -1
        return Decision(direction=d, leverage=2.0, size_frac=0.6, stop_atr=2.0, take_profit_atr=3.0)


def _config(equity: float, run_id: str = "p") -> ServeConfig:
    return ServeConfig(warmup_bars=WARMUP, run_id=run_id, context_bars=50, initial_equity_usdt=equity,
                       primary_backoff=BackoffConfig(initial_bars=0))


def _policy(symbol: str) -> StatelessPolicy:
    return FlipPolicy() if symbol == "BTCUSDT" else _EthPolicy()


def _leg(symbol: str, candles: pd.DataFrame | None = None, primary=None) -> Leg:
    c = _candles(symbol) if candles is None else candles
    return Leg(symbol, c, primary if primary is not None else _policy(symbol), ScriptedFallback(), _atr(c),
               _costs(symbol))


def test_two_symbols_equal_the_sum_of_two_single_runs_on_half_the_equity_when_no_guard_binds() -> None:
    store = StateStore("sqlite://")
    summary = run_portfolio_replay([_leg("ETHUSDT"), _leg("BTCUSDT")], store=store, config=_config(EQUITY),
                                   symbol_risk=LOOSE, account_risk=LOOSE_ACCOUNT, now=lambda: NOW)
    assert summary.symbols == ("BTCUSDT", "ETHUSDT") and summary.bars == N_BARS - WARMUP
    singles = {}
    for symbol in ("BTCUSDT", "ETHUSDT"):
        single = StateStore("sqlite://")
        c = _candles(symbol)
        run_replay(c, primary=_policy(symbol), fallback=ScriptedFallback(), atr=_atr(c), costs=_costs(symbol),
                   store=single, config=_config(EQUITY / 2, run_id="s"), guard=RiskGuard(LOOSE), now=lambda: NOW)
        singles[symbol] = single
        mine, theirs = store.decisions("p", symbol), single.decisions("s")
        cols = ["bar_open_time", "source", "direction", "leverage", "size_frac"]
        pd.testing.assert_frame_equal(mine[cols].reset_index(drop=True), theirs[cols].reset_index(drop=True))
        assert (theirs.source == "v2").all()
        fills = store.fills("p", symbol)
        assert len(fills) == len(single.fills("s")) > 20  # both trade, at every flip
        np.testing.assert_array_equal(fills.price.to_numpy(), single.fills("s").price.to_numpy())
    account = store.account_equity("p")
    both = singles["BTCUSDT"].equity("s").equity_usdt.to_numpy() + singles["ETHUSDT"].equity("s").equity_usdt.to_numpy()
    np.testing.assert_allclose(account.equity_usdt.to_numpy(), both, rtol=0, atol=1e-9)
    assert summary.final_equity_usdt == pytest.approx(both[-1], abs=1e-9)
    assert abs(summary.final_equity_usdt - EQUITY) > 1.0  # the runs moved money: the sum is not trivially EQUITY
    assert set(store.events("p").kind) == {"run_started", "run_finished"}  # no guard event: nothing bound


def test_the_account_limit_binds_where_no_per_symbol_limit_would() -> None:
    """Both symbols go long 5,000 USDT of notional each (sleeve 5,000, size 0.5, leverage 2); the per-symbol caps
    (250,000 USDT, leverage 5) let each through, the account's same-direction cap of 8,000 USDT does not: BTCUSDT
    (first in symbol order) gets its 5,000, ETHUSDT the 3,000 left."""
    cap = AccountRiskConfig(max_same_direction_notional_usdt=8_000.0)
    legs = [_leg(s, primary=FixedPolicy(LONG)) for s in ("ETHUSDT", "BTCUSDT")]
    store = StateStore("sqlite://")
    run_portfolio_replay(legs, store=store, config=_config(EQUITY), symbol_risk=RiskConfig(), account_risk=cap,
                         now=lambda: NOW)
    first = store.decisions("p").iloc[:2].set_index("symbol")
    assert first.loc["BTCUSDT", "size_frac"] == 0.5 and first.loc["BTCUSDT", "source"] == "v2"
    assert first.loc["ETHUSDT", "size_frac"] == pytest.approx(0.3) and first.loc["ETHUSDT", "direction"] == 1
    clipped = store.events("p")
    clipped = clipped[clipped.kind == "risk_clipped"]
    at_first = clipped[clipped.time == first.bar_open_time.iloc[0]]  # later re-entries after stops may clip too
    assert len(at_first) == 1 and at_first.detail.iloc[0]["symbol"] == "ETHUSDT"
    assert "max_same_direction_notional_usdt" in at_first.detail.iloc[0]["reasons"][0]
    # the same entries one symbol at a time: no per-symbol guard touches them
    for symbol in ("BTCUSDT", "ETHUSDT"):
        alone = StateStore("sqlite://")
        c = _candles(symbol)
        run_replay(c, primary=FixedPolicy(LONG), fallback=ScriptedFallback(), atr=_atr(c), costs=_costs(symbol),
                   store=alone, config=_config(EQUITY / 2, "s"), guard=RiskGuard(RiskConfig()), now=lambda: NOW)
        assert alone.decisions("s").size_frac.iloc[0] == 0.5
        assert not (alone.events("s").kind == "risk_clipped").any()
    # refused instead of clipped: the second symbol's entry becomes flat, source 'guard'
    store = StateStore("sqlite://")
    run_portfolio_replay([_leg(s, primary=FixedPolicy(LONG)) for s in ("ETHUSDT", "BTCUSDT")], store=store,
                         config=_config(EQUITY), account_risk=cap.updated(oversize_action="refuse"), now=lambda: NOW)
    first = store.decisions("p").iloc[:2].set_index("symbol")
    assert first.loc["ETHUSDT", "direction"] == 0 and first.loc["ETHUSDT", "source"] == "guard"
    assert "account_entry_refused" in first.loc["ETHUSDT", "fallback_reason"]


def test_one_symbols_candles_stop_it_holds_and_the_other_keeps_trading() -> None:
    eth = _candles("ETHUSDT").iloc[:150]  # the ETH file stops 50 bars before the BTC one
    store = StateStore("sqlite://")
    summary = run_portfolio_replay([_leg("BTCUSDT"), _leg("ETHUSDT", candles=eth)], store=store,
                                   config=_config(EQUITY), symbol_risk=LOOSE, account_risk=LOOSE_ACCOUNT,
                                   now=lambda: NOW)
    btc, eth_rows = store.decisions("p", "BTCUSDT"), store.decisions("p", "ETHUSDT")
    assert len(btc) == len(eth_rows) == N_BARS - WARMUP  # both decisions recorded at every bar
    after = eth_rows[eth_rows.bar_open_time > eth.index[-1]]
    assert len(after) == 50 and (after.source == "guard").all()
    assert after.fallback_reason.str.startswith("quarantine: missing_candle: no ETHUSDT candle").all()
    held = after.direction.unique()
    assert len(held) == 1  # the position is held as it was (no policy asked)
    assert (btc[btc.bar_open_time > eth.index[-1]].source == "v2").all()
    assert summary.legs["ETHUSDT"].n_quarantined == 50 and summary.legs["BTCUSDT"].n_quarantined == 0
    quarantines = store.events("p")
    quarantines = quarantines[quarantines.kind == "quarantine"]
    assert len(quarantines) == 50 and all(d["symbol"] == "ETHUSDT" for d in quarantines.detail)  # events name it
    eth_equity = store.equity("p", "ETHUSDT")
    assert eth_equity[eth_equity.bar_open_time > eth.index[-1]].equity_usdt.nunique() == 1  # last mark repeated


def test_one_symbols_bundle_output_is_nan_it_falls_back_and_the_other_keeps_trading() -> None:
    store = StateStore("sqlite://")
    run_portfolio_replay([_leg("BTCUSDT"), _leg("ETHUSDT", primary=NanLeveragePolicy())], store=store,
                         config=_config(EQUITY), symbol_risk=LOOSE, now=lambda: NOW)
    btc, eth = store.decisions("p", "BTCUSDT"), store.decisions("p", "ETHUSDT")
    assert len(btc) == len(eth) == N_BARS - WARMUP
    assert (btc.source == "v2").all() and (eth.source == "v1").all()
    assert eth.fallback_reason.str.startswith("non_finite").all()
    assert all(np.isnan(r[1]) for r in eth.raw_action)


def test_inputs_are_checked() -> None:
    store = StateStore("sqlite://")
    with pytest.raises(ValueError, match="at least one"):
        run_portfolio_replay([], store=store, config=_config(EQUITY))
    with pytest.raises(ValueError, match="once"):
        run_portfolio_replay([_leg("BTCUSDT"), _leg("BTCUSDT")], store=store, config=_config(EQUITY))
    wrong = Leg("ETHUSDT", _candles("ETHUSDT"), _EthPolicy(), ScriptedFallback(), _atr(_candles("ETHUSDT")),
                _costs("BTCUSDT"))
    with pytest.raises(ValueError, match="spec of ETHUSDT"):
        run_portfolio_replay([wrong], store=store, config=_config(EQUITY))


# -- the account's gate (pure) ---------------------------------------------------------------------


def _book(symbol: str, decision: Decision, side: int = 0, notional: float = 0.0, lev: float = 2.0,
          equity: float = 5_000.0) -> SymbolBook:
    return SymbolBook(symbol, decision, side, notional, notional / lev if notional else 0.0, equity)


def _long(size: float, lev: float = 2.0) -> Decision:
    return Decision(direction=1, leverage=lev, size_frac=size)


NO_CAPS = AccountRiskConfig(max_total_notional_usdt=None, max_total_margin_frac=None, max_total_leverage=None,
                            max_symbol_leverage=None, max_same_direction_notional_usdt=None)


def test_exits_are_reviewed_before_entries_whatever_the_symbol_order() -> None:
    """ETHUSDT closes a long of 8,000 USDT; BTCUSDT (earlier in symbol order) opens a long of 8,000 under a
    same-direction cap of 10,000: the exit goes first, so the entry fits whole."""
    cfg = NO_CAPS.updated(max_same_direction_notional_usdt=10_000.0)
    books = [_book("ETHUSDT", Decision.flat(), 1, 8_000.0), _book("BTCUSDT", _long(0.8))]
    out = gate_account(books, 10_000.0, RiskState.ACTIVE, cfg)
    assert out["BTCUSDT"] == (_long(0.8), ()) and out["ETHUSDT"] == (Decision.flat(), ())
    # a held position counts: the entry gets the 2,000 left
    held = [_book("ETHUSDT", Decision(direction=1), 1, 8_000.0), _book("BTCUSDT", _long(0.8))]
    d, why = gate_account(held, 10_000.0, RiskState.ACTIVE, cfg)["BTCUSDT"]
    assert d.size_frac == pytest.approx(0.2) and why[0].startswith("account_notional_clipped")
    assert gate_account(list(reversed(held)), 10_000.0, RiskState.ACTIVE, cfg) == gate_account(
        held, 10_000.0, RiskState.ACTIVE, cfg)


def test_entries_are_weighed_in_symbol_order_and_each_cap_binds() -> None:
    two = [_book("ETHUSDT", _long(0.6)), _book("BTCUSDT", _long(0.6))]  # 6,000 USDT each
    cases = {
        "max_total_notional_usdt": NO_CAPS.updated(max_total_notional_usdt=9_000.0),
        "max_total_leverage": NO_CAPS.updated(max_total_leverage=0.9),  # 9,000 on 10,000 equity
        "max_total_margin_frac": NO_CAPS.updated(max_total_margin_frac=0.45),  # 4,500 margin = 9,000 notional at 2x
    }
    for name, cfg in cases.items():
        out = gate_account(two, 10_000.0, RiskState.ACTIVE, cfg)
        assert out["BTCUSDT"] == (_long(0.6), ()), name
        d, why = out["ETHUSDT"]
        assert d.size_frac == pytest.approx(0.3) and name in why[0], name
    d, why = gate_account(two, 10_000.0, RiskState.ACTIVE, NO_CAPS.updated(max_symbol_leverage=0.5))["BTCUSDT"]
    assert d.size_frac == pytest.approx(0.5) and "max_symbol_leverage" in why[0]
    # opposite sides do not add up under the same-direction cap
    hedged = [_book("ETHUSDT", Decision(direction=-1, leverage=2.0, size_frac=0.6)), _book("BTCUSDT", _long(0.6))]
    out = gate_account(hedged, 10_000.0, RiskState.ACTIVE, NO_CAPS.updated(max_same_direction_notional_usdt=7_000.0))
    assert all(why == () for _, why in out.values())


def test_account_states_allow_exits_only_and_halted_flattens() -> None:
    books = [_book("BTCUSDT", _long(0.5)), _book("ETHUSDT", Decision(direction=1), 1, 4_000.0),
             _book("SOLUSDT", Decision.flat(), -1, 1_000.0)]
    reducing = gate_account(books, 10_000.0, RiskState.REDUCING, NO_CAPS)
    assert reducing["BTCUSDT"][0] == Decision.flat() and "REDUCING" in reducing["BTCUSDT"][1][0]
    assert reducing["ETHUSDT"] == (Decision(direction=1), ()) and reducing["SOLUSDT"] == (Decision.flat(), ())
    halted = gate_account(books, 10_000.0, RiskState.HALTED, NO_CAPS)
    assert all(d == Decision.flat() for d, _ in halted.values())
    assert halted["ETHUSDT"][1][0].startswith("account_halted_flatten")
    with pytest.raises(ValueError, match="equity"):
        gate_account(books, float("nan"), RiskState.ACTIVE, NO_CAPS)


def test_account_guard_halts_on_the_accounts_drawdown_and_fails_closed() -> None:
    from serving.account_risk import AccountGuard

    store = StateStore("sqlite://")
    guard = AccountGuard(NO_CAPS.updated(max_drawdown_halt_frac=0.1), store)
    t = pd.Timestamp("2024-01-01", tz="UTC")
    books = [_book("BTCUSDT", _long(0.5))]
    assert guard.review(t, 10_000.0, books)["BTCUSDT"].decision == _long(0.5)
    v = guard.review(t + pd.Timedelta(hours=1), 8_900.0, books)["BTCUSDT"]
    assert v.state == "HALTED" and v.decision == Decision.flat() and "max_drawdown" in " ".join(v.reasons)
    assert store.latest_risk_state("account").state == "HALTED"
    assert AccountGuard(NO_CAPS, store).state is RiskState.HALTED  # survives a restart
    broken = AccountGuard(NO_CAPS)
    v = broken.review(t, float("inf"), [_book("BTCUSDT", _long(0.5)), _book("ETHUSDT", Decision(direction=1), 1, 1.0)])
    assert v["BTCUSDT"].decision == Decision.flat() and v["ETHUSDT"].decision == Decision(direction=1)
    assert broken.state is RiskState.HALTED and v["BTCUSDT"].reasons[0].startswith("guard_error")


class _LosingLong(StatelessPolicy):
    """Goes long at every bar with a stop a hair away: a stream of small losing round trips (fast kill switch)."""

    name = "v2"

    def decide(self, ctx: DecisionContext) -> Decision:
        return Decision(direction=1, leverage=1.0, size_frac=0.2, stop_atr=0.05, take_profit_atr=50.0)


def test_one_symbols_kill_switch_halts_it_alone_and_the_accounts_halts_all() -> None:
    """ETHUSDT's own fast kill switch (3 losing round trips) halts ETHUSDT only (scope symbol:ETHUSDT); BTCUSDT keeps
    deciding by its policy. Then the same losses counted by the account's kill switch halt every symbol."""
    per_symbol = LOOSE.updated(fast_kill_consecutive_losses=3)
    store = StateStore("sqlite://")
    hold = Decision(direction=1, leverage=1.0, size_frac=0.2, stop_atr=50.0, take_profit_atr=50.0)  # no round trip
    run_portfolio_replay([_leg("BTCUSDT", primary=FixedPolicy(hold)), _leg("ETHUSDT", primary=_LosingLong())],
                         store=store, config=_config(EQUITY), symbol_risk=per_symbol, account_risk=LOOSE_ACCOUNT,
                         now=lambda: NOW)
    assert store.latest_risk_state("symbol:ETHUSDT").state == "HALTED"
    assert store.latest_risk_state("symbol:BTCUSDT") is None or store.latest_risk_state("symbol:BTCUSDT").state == "ACTIVE"
    assert store.latest_risk_state("account") is None or store.latest_risk_state("account").state == "ACTIVE"
    eth, btc = store.decisions("p", "ETHUSDT"), store.decisions("p", "BTCUSDT")
    halted_at = eth[eth.fallback_reason.fillna("").str.contains("fast_kill")].bar_open_time.min()
    assert pd.notna(halted_at)
    after_eth = eth[eth.bar_open_time > halted_at]
    assert len(after_eth) and (after_eth.direction == 0).all()  # halted: flat from then on
    after_btc = btc[btc.bar_open_time > halted_at]
    assert len(after_btc) and (after_btc.source == "v2").all() and (after_btc.direction == 1).all()  # BTC trades on
    assert store.equity("p", "BTCUSDT").position_side.iloc[-1] == 1
    # the account's kill switch counts every symbol's losses: it halts both
    store = StateStore("sqlite://")
    run_portfolio_replay([_leg("BTCUSDT", primary=FixedPolicy(hold)), _leg("ETHUSDT", primary=_LosingLong())],
                         store=store, config=_config(EQUITY), symbol_risk=LOOSE,
                         account_risk=LOOSE_ACCOUNT.updated(fast_kill_consecutive_losses=3), now=lambda: NOW)
    assert store.latest_risk_state("account").state == "HALTED"
    last = store.decisions("p").groupby("symbol").tail(5)
    assert (last.direction == 0).all() and (last.source == "guard").all()
    changed = store.events("p")
    changed = changed[changed.kind == "risk_state_changed"]
    assert any(d.get("scope") == "account" and d["to"] == "HALTED" for d in changed.detail)
