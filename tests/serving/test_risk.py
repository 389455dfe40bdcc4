"""Risk guard: limits, kill switches, fail-closed behaviour and persistence across restarts."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pandas as pd
import pytest

from market.decision import Decision
from serving.risk import (
    AccountSnapshot,
    RiskConfig,
    RiskGuard,
    RiskState,
    RiskStatus,
    RiskTracker,
    evaluate,
    gate_decision,
    observe_equity,
    observe_trade,
    profit_factor,
    reset_risk,
)
from serving.store import StateStore

T0 = pd.Timestamp("2025-03-01 00:00", tz="UTC")
NOW = datetime(2025, 3, 1, tzinfo=UTC)
LONG = Decision(direction=1, leverage=3.0, size_frac=0.5, stop_atr=2.0, take_profit_atr=4.0)
SHORT = Decision(direction=-1, leverage=3.0, size_frac=0.5, stop_atr=2.0, take_profit_atr=4.0)
HOLD_LONG_TIGHTER = Decision(direction=1, new_stop_price=95.0)
# every limit off except what a test switches on
OFF = RiskConfig(
    max_leverage=100.0, max_notional_per_symbol_usdt=1e12, daily_loss_limit_frac=None,
    max_drawdown_halt_frac=None, fast_kill_consecutive_losses=None, slow_kill_min_profit_factor=None,
)  # fmt: skip


def acct(equity: float = 10_000.0, side: int = 0, hours: float = 0.0, qty: float = 0.0) -> AccountSnapshot:
    return AccountSnapshot(
        time=T0 + pd.Timedelta(hours=hours), equity_usdt=equity, position_side=side, position_qty_base=qty,
        position_notional_usdt=qty * 100.0, leverage=3.0 if side else 1.0,
    )  # fmt: skip


def guard(cfg: RiskConfig, store: StateStore | None = None) -> RiskGuard:
    return RiskGuard(cfg, store, now=lambda: NOW)


# ---------------------------------------------------------------------------------------------
# entry limits


def test_leverage_is_clipped_or_refused() -> None:
    d, why = gate_decision(LONG, acct(), RiskState.ACTIVE, OFF.model_copy(update={"max_leverage": 2.0}))
    assert d.leverage == 2.0 and d.size_frac == LONG.size_frac and d.direction == 1
    assert why == ("leverage_clipped: 3 -> 2",)
    refuse = OFF.model_copy(update={"max_leverage": 2.0, "oversize_action": "refuse"})
    d, why = gate_decision(LONG, acct(), RiskState.ACTIVE, refuse)
    assert d == Decision.flat() and why[0].startswith("entry_refused: leverage 3 > max_leverage 2")


def test_notional_is_clipped_to_the_cap() -> None:
    cfg = OFF.model_copy(update={"max_notional_per_symbol_usdt": 6_000.0})
    d, why = gate_decision(LONG, acct(equity=10_000.0), RiskState.ACTIVE, cfg)  # wants 0.5*10k*3 = 15k
    assert d.size_frac * 10_000.0 * d.leverage == pytest.approx(6_000.0)
    assert why[0].startswith("notional_clipped: 15000.00 -> 6000.00 USDT")
    d, why = gate_decision(
        LONG, acct(), RiskState.ACTIVE, cfg.model_copy(update={"oversize_action": "refuse"})
    )
    assert d == Decision.flat() and "notional 15000.00 USDT > max 6000.00 USDT" in why[0]


def test_exits_and_holds_always_pass() -> None:
    strict = RiskConfig(max_leverage=1.0, max_notional_per_symbol_usdt=1.0, oversize_action="refuse",
                        flatten_on_halt=False)  # fmt: skip
    for state in RiskState:
        assert gate_decision(Decision.flat(), acct(side=1, qty=1.0), state, strict) == (Decision.flat(), ())
        assert gate_decision(HOLD_LONG_TIGHTER, acct(side=1, qty=1.0), state, strict) == (
            HOLD_LONG_TIGHTER,
            (),
        )


@pytest.mark.parametrize("state", [RiskState.REDUCING, RiskState.HALTED])
def test_entries_and_reversals_are_refused_outside_active(state: RiskState) -> None:
    cfg = OFF.model_copy(update={"flatten_on_halt": False})
    d, why = gate_decision(LONG, acct(), state, cfg)
    assert d == Decision.flat() and why == (f"entry_refused: {state.value} allows exits only",)
    d, _ = gate_decision(SHORT, acct(side=1, qty=1.0), state, cfg)  # reversal: only the exit remains
    assert d == Decision.flat()


# ---------------------------------------------------------------------------------------------
# equity limits and kill switches through the guard


def test_daily_loss_sets_reducing_until_the_next_utc_day() -> None:
    g = guard(OFF.model_copy(update={"daily_loss_limit_frac": 0.05}))
    assert g.review(LONG, acct(10_000.0, hours=0)).state == "ACTIVE"
    v = g.review(LONG, acct(9_600.0, hours=5))  # -4 %
    assert v.state == "ACTIVE" and v.decision == LONG
    v = g.review(LONG, acct(9_400.0, hours=6))  # -6 %
    assert v.state == "REDUCING" and v.decision == Decision.flat()
    assert any(r.startswith("state: daily_loss: 6.00% of the day-start equity 10000.00") for r in v.reasons)
    v = g.review(LONG, acct(9_900.0, hours=7))  # recovered the same day: still exits only
    assert v.state == "REDUCING" and v.decision == Decision.flat()
    assert g.review(HOLD_LONG_TIGHTER, acct(9_900.0, side=1, qty=1.0, hours=8)).decision == HOLD_LONG_TIGHTER
    v = g.review(LONG, acct(9_900.0, hours=24))  # next UTC day, anchored at 9,900
    assert v.state == "ACTIVE" and v.decision == LONG
    assert g.status.tracker.day_start_equity_usdt == 9_900.0


def test_drawdown_halts_and_stays_halted() -> None:
    g = guard(OFF.model_copy(update={"max_drawdown_halt_frac": 0.10}))
    g.review(LONG, acct(10_000.0))
    g.review(LONG, acct(12_000.0, hours=30))  # peak
    assert g.review(LONG, acct(10_900.0, hours=31)).state == "ACTIVE"  # -9.2 %
    v = g.review(HOLD_LONG_TIGHTER, acct(10_700.0, side=1, qty=1.0, hours=32))  # -10.8 %
    assert v.state == "HALTED" and v.decision == Decision.flat()  # flatten_on_halt
    assert (
        v.reasons[0].startswith("halted_flatten")
        and "max_drawdown: 10.83% below the peak 12000.00" in v.reasons[1]
    )
    v = g.review(LONG, acct(13_000.0, hours=60))  # new high: still halted (sticky)
    assert v.state == "HALTED" and v.decision == Decision.flat()


def test_fast_kill_switch_counts_consecutive_losses() -> None:
    g = guard(OFF.model_copy(update={"fast_kill_consecutive_losses": 3}))
    for pnl in (-10.0, -5.0, 20.0, -1.0, -2.0):  # the win resets the streak
        g.record_closed_trade(T0, pnl)
    assert g.state is RiskState.ACTIVE and g.status.tracker.consecutive_losses == 2
    g.record_closed_trade(T0, -3.0)
    assert g.state is RiskState.HALTED and g.status.reasons == (
        "fast_kill: 3 consecutive losing trades >= 3",
    )
    assert g.review(LONG, acct()).decision == Decision.flat()


def test_slow_kill_switch_uses_the_profit_factor_of_the_window() -> None:
    cfg = OFF.model_copy(update={"slow_kill_min_profit_factor": 1.0, "slow_kill_window_trades": 4})
    g = guard(cfg)
    for pnl in (100.0, -30.0, 20.0):  # 3 trades < window: not evaluated yet
        g.record_closed_trade(T0, pnl)
    assert g.state is RiskState.ACTIVE
    g.record_closed_trade(T0, -40.0)  # PF = 120 / 70 = 1.71
    assert g.state is RiskState.ACTIVE
    g.record_closed_trade(T0, -90.0)  # window -30, 20, -40, -90: PF = 20 / 160 = 0.125
    assert g.state is RiskState.HALTED
    assert g.status.reasons == ("slow_kill: profit factor 0.125 over the last 4 trades < 1.0",)


def test_profit_factor_edge_cases() -> None:
    assert math.isnan(profit_factor(()))
    assert profit_factor((5.0, 0.0)) == math.inf
    assert profit_factor((30.0, -10.0, -5.0)) == pytest.approx(2.0)


def test_pure_transitions() -> None:
    t = observe_equity(RiskTracker(), T0, 1_000.0)
    assert (t.peak_equity_usdt, t.day, t.day_start_equity_usdt) == (1_000.0, "2025-03-01", 1_000.0)
    t = observe_equity(t, T0 + pd.Timedelta(hours=23), 900.0)
    t = observe_equity(t, T0 + pd.Timedelta(hours=24), 950.0)  # anchored at the last mark of the day before
    assert (t.peak_equity_usdt, t.day, t.day_start_equity_usdt) == (1_000.0, "2025-03-02", 900.0)
    t = observe_trade(observe_trade(t, -1.0, 2), -2.0, 2)
    t = observe_trade(t, -3.0, 2)
    assert t.consecutive_losses == 3 and t.recent_pnls_usdt == (-2.0, -3.0)
    with pytest.raises(ValueError, match="pnl_usdt must be finite"):
        observe_trade(t, math.nan, 2)
    with pytest.raises(ValueError, match="equity_usdt must be finite and > 0"):
        observe_equity(t, T0, 0.0)
    with pytest.raises(ValueError, match="tz-aware"):
        observe_equity(t, pd.Timestamp("2025-03-01"), 1.0)
    cfg = OFF.model_copy(update={"fast_kill_consecutive_losses": 3})
    halted = evaluate(evaluate(RiskStatus(), t, cfg), t, cfg)
    assert halted.state is RiskState.HALTED and len(halted.reasons) == 1  # sticky, no duplicate reason


# every field of RiskConfig changes the verdict of some scenario (a field read but never used fails)
def _scenario_entry(cfg: RiskConfig) -> tuple:
    v = guard(cfg).review(LONG, acct())
    return v.state, v.decision


def _scenario_loss_day(cfg: RiskConfig) -> tuple:
    g = guard(cfg)
    g.review(LONG, acct(10_000.0))
    v = g.review(HOLD_LONG_TIGHTER, acct(9_300.0, side=1, qty=1.0, hours=3))
    return v.state, v.decision


def _scenario_trades(cfg: RiskConfig) -> tuple:
    g = guard(cfg)
    for pnl in (50.0, -10.0, -10.0, -10.0, -10.0):
        g.record_closed_trade(T0, pnl)
    v = g.review(HOLD_LONG_TIGHTER, acct(side=1, qty=1.0))
    return v.state, v.decision


BASE = RiskConfig(
    max_leverage=5.0, max_notional_per_symbol_usdt=100_000.0, oversize_action="clip", daily_loss_limit_frac=0.5,
    max_drawdown_halt_frac=0.5, fast_kill_consecutive_losses=10, slow_kill_min_profit_factor=0.5,
    slow_kill_window_trades=50, flatten_on_halt=True,
)  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "scenario"),
    [
        ("max_leverage", 2.0, _scenario_entry),
        ("max_notional_per_symbol_usdt", 1_000.0, _scenario_entry),
        ("oversize_action", "refuse", lambda c: _scenario_entry(c.model_copy(update={"max_leverage": 2.0}))),
        ("daily_loss_limit_frac", 0.05, _scenario_loss_day),
        ("max_drawdown_halt_frac", 0.05, _scenario_loss_day),
        ("fast_kill_consecutive_losses", 4, _scenario_trades),
        (
            "slow_kill_min_profit_factor",
            2.0,
            lambda c: _scenario_trades(c.model_copy(update={"slow_kill_window_trades": 5})),
        ),
        (
            "slow_kill_window_trades",
            5,
            lambda c: _scenario_trades(c.model_copy(update={"slow_kill_min_profit_factor": 2.0})),
        ),
        (
            "flatten_on_halt",
            False,
            lambda c: _scenario_trades(c.model_copy(update={"fast_kill_consecutive_losses": 4})),
        ),
    ],
)
def test_every_config_field_changes_behaviour(field: str, value, scenario) -> None:
    assert set(RiskConfig.model_fields) == {
        "max_leverage",
        "max_notional_per_symbol_usdt",
        "oversize_action",
        "daily_loss_limit_frac",
        "max_drawdown_halt_frac",
        "fast_kill_consecutive_losses",
        "slow_kill_min_profit_factor",
        "slow_kill_window_trades",
        "flatten_on_halt",
    }  # fmt: skip  (a new field must get a row in this table)
    assert scenario(BASE) != scenario(BASE.model_copy(update={field: value}))


def test_limits_can_be_disabled() -> None:
    g = guard(OFF)
    g.review(LONG, acct(10_000.0))
    for pnl in [-1.0] * 60:
        g.record_closed_trade(T0, pnl)
    v = g.review(LONG, acct(100.0, hours=1))  # -99 % today, no limit configured
    assert v.state == "ACTIVE" and v.decision == LONG


# ---------------------------------------------------------------------------------------------
# fail closed


@pytest.mark.parametrize(
    "bad",
    [
        acct(equity=math.nan),
        acct(equity=-5.0),
        AccountSnapshot(pd.Timestamp("2025-03-01"), 10_000.0, 0, 0.0, 0.0, 1.0),  # naive time
        AccountSnapshot(T0, 10_000.0, 2, 0.0, 0.0, 1.0),
        AccountSnapshot(T0, 10_000.0, 0, 0.0, math.inf, 1.0),
    ],
)
def test_bad_account_halts_entries(bad: AccountSnapshot, tmp_path) -> None:
    store = StateStore.sqlite(tmp_path / "s.db")
    g = guard(BASE, store)
    v = g.review(LONG, bad)
    assert (
        v.state == "HALTED"
        and v.decision == Decision.flat()
        and v.reasons[0].startswith("guard_error: ValueError")
    )
    assert store.latest_risk_state("default").change == "error"
    assert guard(BASE, store).state is RiskState.HALTED  # and it survives a restart


def test_store_failure_inside_review_fails_closed() -> None:
    class BrokenStore:
        def latest_risk_state(self, scope, change=None):
            return None

        def latest_risk_state_id(self, scope, change=None):
            return None

        def append_risk_state(self, record):
            raise OSError("disk full")

    g = RiskGuard(BASE, BrokenStore(), now=lambda: NOW)  # type: ignore[arg-type]
    v = g.review(LONG, acct())  # first mark writes a row -> the write fails
    assert v.state == "HALTED" and v.decision == Decision.flat() and "disk full" in v.reasons[0]
    hold = g.review(HOLD_LONG_TIGHTER, acct(side=1, qty=1.0))
    assert hold.state == "HALTED"


def test_non_finite_trade_pnl_halts() -> None:
    g = guard(BASE)
    g.record_closed_trade(T0, math.nan)
    assert g.state is RiskState.HALTED and g.status.reasons[0].startswith("guard_error: ValueError: pnl_usdt")


# ---------------------------------------------------------------------------------------------
# persistence


def test_kill_switch_persists_across_restart_until_reset(tmp_path) -> None:
    db = tmp_path / "state.sqlite"
    cfg = OFF.model_copy(update={"fast_kill_consecutive_losses": 2, "flatten_on_halt": False})
    g = guard(cfg, StateStore.sqlite(db))
    g.review(LONG, acct())
    g.record_closed_trade(T0, -1.0)
    g.record_closed_trade(T0, -1.0)
    assert g.state is RiskState.HALTED
    del g

    restarted = guard(cfg, StateStore.sqlite(db))  # a new process over the same database
    assert restarted.state is RiskState.HALTED
    v = restarted.review(LONG, acct(hours=48))
    assert v.state == "HALTED" and v.decision == Decision.flat()
    assert v.reasons == (
        "entry_refused: HALTED allows exits only",
        "state: fast_kill: 2 consecutive losing trades >= 2",
    )

    reset_risk(db, note="checked by alice", now=lambda: NOW)
    after = guard(cfg, StateStore.sqlite(db))
    assert after.state is RiskState.ACTIVE and after.status.tracker.consecutive_losses == 0
    assert after.review(LONG, acct(hours=49)).decision == LONG
    hist = StateStore.sqlite(db).risk_states("default")
    assert list(hist.state[hist.change != "update"]) == ["HALTED", "ACTIVE", "ACTIVE"]
    assert hist.reasons[hist.change == "reset"].iloc[0] == ["manual_reset: checked by alice"]


def test_drawdown_peak_and_daily_anchor_survive_restart(tmp_path) -> None:
    db = tmp_path / "state.sqlite"
    cfg = OFF.model_copy(update={"max_drawdown_halt_frac": 0.2, "daily_loss_limit_frac": 0.1})
    g = guard(cfg, StateStore.sqlite(db))
    g.review(LONG, acct(10_000.0))
    g.review(LONG, acct(15_000.0, hours=1))  # peak, same day
    restarted = guard(cfg, StateStore.sqlite(db))
    v = restarted.review(LONG, acct(13_000.0, hours=2))  # -13 % from the persisted peak; +30 % on the day
    assert v.state == "ACTIVE"
    v = restarted.review(LONG, acct(11_900.0, hours=3))  # -20.7 % from the peak
    assert v.state == "HALTED" and "max_drawdown" in v.reasons[-1]


def test_reducing_persists_within_the_day(tmp_path) -> None:
    db = tmp_path / "state.sqlite"
    cfg = OFF.model_copy(update={"daily_loss_limit_frac": 0.05})
    g = guard(cfg, StateStore.sqlite(db))
    g.review(LONG, acct(10_000.0))
    assert g.review(LONG, acct(9_000.0, hours=1)).state == "REDUCING"
    restarted = guard(cfg, StateStore.sqlite(db))
    assert restarted.review(LONG, acct(9_800.0, hours=2)).state == "REDUCING"
    assert restarted.review(LONG, acct(9_800.0, hours=25)).state == "ACTIVE"


def test_scopes_are_independent(tmp_path) -> None:
    store = StateStore.sqlite(tmp_path / "s.db")
    cfg = OFF.model_copy(update={"fast_kill_consecutive_losses": 1})
    a = RiskGuard(cfg, store, scope="BTCUSDT", now=lambda: NOW)
    a.record_closed_trade(T0, -1.0)
    assert a.state is RiskState.HALTED
    assert RiskGuard(cfg, store, scope="ETHUSDT").state is RiskState.ACTIVE


# ---------------------------------------------------------------------------------------------
# the guard inside the paper replay loop


def _loop_run(store: StateStore, cfg: RiskConfig, decision: Decision, n: int = 200, warmup: int = 40):
    import talib

    from envs.config import CostConfig
    from serving.hotswap import BackoffConfig
    from serving.loop import ServeConfig, run_replay
    from tests.kit.candles import make_candles
    from tests.serving.fakes import FixedPolicy, ScriptedFallback

    candles = make_candles(n, seed=11)
    atr = talib.ATR(candles.high.to_numpy(), candles.low.to_numpy(), candles.close.to_numpy(), 14)
    summary = run_replay(
        candles, primary=FixedPolicy(decision), fallback=ScriptedFallback(), atr=atr, costs=CostConfig(),
        store=store, config=ServeConfig(warmup_bars=warmup, run_id="r", context_bars=50,
                                        primary_backoff=BackoffConfig(initial_bars=0)),
        guard=RiskGuard(cfg, store, now=lambda: NOW), now=lambda: NOW,
    )  # fmt: skip
    return summary, candles


def test_loop_clips_entries_and_keeps_the_policy_as_source() -> None:
    store = StateStore("sqlite://")
    wide = Decision(direction=1, leverage=4.0, size_frac=0.5, stop_atr=1.0, take_profit_atr=1.5)
    summary, _ = _loop_run(store, OFF.model_copy(update={"max_leverage": 2.0}), wide)
    d = store.decisions()
    flat_before = (store.equity().position_side == 0).to_numpy()  # position at the close, before deciding
    assert set(d.source) == {"v2"}
    assert (d.leverage[flat_before] == 2.0).all() and flat_before.sum() > 1  # entries clipped
    assert (d.leverage[~flat_before] == 4.0).all()  # holds pass unchanged (their size is ignored)
    ev = store.events()
    clipped = ev[ev.kind == "risk_clipped"]
    assert len(clipped) > 0 and clipped.detail.iloc[0]["reasons"] == ["leverage_clipped: 4 -> 2"]
    assert summary.n_trades > 1 and summary.risk_state == "ACTIVE"


def test_loop_kill_switch_halts_and_a_restart_stays_halted(tmp_path) -> None:
    db = tmp_path / "state.sqlite"
    cfg = OFF.model_copy(update={"fast_kill_consecutive_losses": 1})
    tight = Decision(
        direction=1, leverage=2.0, size_frac=0.5, stop_atr=0.5, take_profit_atr=50.0
    )  # loses fast
    summary, candles = _loop_run(StateStore.sqlite(db), cfg, tight)
    store = StateStore.sqlite(db)
    d, ev = store.decisions(), store.events()
    halt = ev[ev.kind == "risk_state_changed"]
    assert list(halt.detail.map(lambda x: x["to"])) == ["HALTED"] and summary.risk_state == "HALTED"
    after = d[d.bar_open_time >= halt.time.iloc[0]]
    assert (after.direction == 0).all() and (after.source == "guard").all()
    assert after.fallback_reason.str.contains("risk: entry_refused: HALTED allows exits only").all()
    assert len(d) == len(candles) - 40  # every bar still has exactly one decision
    n_entries = (store.fills().reason == "entry").sum()

    # restart: a new process over the same database trades no more
    summary2, _ = _loop_run(StateStore.sqlite(db), cfg, tight)
    assert summary2.risk_state == "HALTED" and summary2.decisions_guard == summary2.bars
    assert (store.fills().reason == "entry").sum() == n_entries


def test_reset_from_another_process_reaches_a_running_guard(tmp_path) -> None:
    db = tmp_path / "state.sqlite"
    cfg = OFF.model_copy(update={"fast_kill_consecutive_losses": 1})
    running = guard(cfg, StateStore.sqlite(db))
    running.record_closed_trade(T0, -5.0)
    assert running.review(LONG, acct()).decision == Decision.flat()
    reset_risk(db, note="ops", now=lambda: datetime(2025, 3, 2, tzinfo=UTC))  # the CLI, another process
    running.record_closed_trade(T0 + pd.Timedelta(hours=1), 5.0)  # a trade closes before the next review
    v = running.review(LONG, acct(hours=2))
    assert v.state == "ACTIVE" and v.decision == LONG
