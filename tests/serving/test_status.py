"""``ats status``: the summary is recomputed independently from the stored rows."""

from __future__ import annotations

from datetime import UTC, datetime

import talib
from typer.testing import CliRunner

from ats_cli.main import app
from envs.config import CostConfig
from market.decision import Decision, DecisionContext, StatelessPolicy
from serving.hotswap import BackoffConfig
from serving.loop import ServeConfig, run_replay
from serving.risk import RiskConfig, RiskGuard
from serving.status import read_status
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.serving.fakes import ScriptedFallback

N, WARMUP = 140, 40


class _EveryThirdFails(StatelessPolicy):
    """Long (wide stops) except every third call raises: a mix of V2 and V1 bars."""

    name = "v2"
    calls = 0

    def decide(self, ctx: DecisionContext) -> Decision:
        self.calls += 1
        if self.calls % 3 == 0:
            raise RuntimeError("model down")
        return Decision(direction=1, leverage=2.0, size_frac=0.5, stop_atr=50.0, take_profit_atr=50.0)


def _serve(db, run_id: str = "paper", risk: RiskConfig | None = None) -> None:
    candles = make_candles(N, seed=4)
    atr = talib.ATR(candles.high.to_numpy(), candles.low.to_numpy(), candles.close.to_numpy(), 14)
    store = StateStore.sqlite(db)
    run_replay(
        candles, primary=_EveryThirdFails(), fallback=ScriptedFallback(), atr=atr, costs=CostConfig(), store=store,
        config=ServeConfig(warmup_bars=WARMUP, run_id=run_id, context_bars=50, primary_backoff=BackoffConfig(initial_bars=0)),
        guard=RiskGuard(risk, store) if risk is not None else None,
    )  # fmt: skip


def test_read_status_matches_the_rows(tmp_path) -> None:
    db = tmp_path / "state.sqlite"
    _serve(db, risk=RiskConfig())
    store = StateStore.sqlite(db)
    s = read_status(store)
    d, e = store.decisions(), store.equity()
    assert s.run_id == "paper" and s.mode == "paper" and s.bars == N - WARMUP == len(d)
    assert (s.decided_v2, s.decided_v1, s.decided_guard) == tuple(
        (d.source == k).sum() for k in ("v2", "v1", "guard")
    )
    assert s.decided_v1 > 10 and s.decided_v2 > 10
    assert abs(s.share("v2") + s.share("v1") + s.share("guard") - 1.0) < 1e-12
    last = e.iloc[-1]
    assert s.equity_usdt == last.equity_usdt and s.position_side == last.position_side
    day_start = last.bar_open_time.normalize()
    prev_close = e[e.bar_open_time < day_start].equity_usdt.iloc[-1]
    assert s.today_pnl_usdt == last.equity_usdt - prev_close and s.day == str(day_start.date())
    assert s.today_pnl_usdt != 0.0  # a position was open all day
    assert s.risk_state == "ACTIVE"


def test_status_shows_a_halted_guard_and_picks_runs(tmp_path) -> None:
    db = tmp_path / "state.sqlite"
    _serve(db, run_id="first")
    store = StateStore.sqlite(db)
    guard = RiskGuard(
        RiskConfig(fast_kill_consecutive_losses=1), store, now=lambda: datetime(2025, 1, 1, tzinfo=UTC)
    )
    guard.record_closed_trade(store.equity().bar_open_time.iloc[-1], -10.0)
    s = read_status(store)
    assert s.risk_state == "HALTED" and s.risk_reasons == ("fast_kill: 1 consecutive losing trades >= 1",)
    _serve(db, run_id="second")
    assert read_status(store).run_id == "second" and read_status(store, "first").run_id == "first"


def test_cli_prints_the_table(tmp_path) -> None:
    db = tmp_path / "state.sqlite"
    _serve(db, risk=RiskConfig())
    result = CliRunner().invoke(app, ["status", "--db", str(db)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    s = read_status(StateStore.sqlite(db))
    for text in (
        "mode",
        "paper",
        "today's PnL",
        "risk state",
        "ACTIVE",
        f"{s.decided_v2} ({s.share('v2'):.1%})",
        f"{s.decided_v1} ({s.share('v1'):.1%})",
        f"{s.equity_usdt:,.2f} USDT",
    ):
        assert text in result.output, text
    missing = CliRunner().invoke(app, ["status", "--db", str(tmp_path / "nope.sqlite")])
    assert missing.exit_code == 2 and "no state database" in missing.output
    unknown = CliRunner().invoke(app, ["status", "--db", str(db), "--run-id", "zzz"])
    assert unknown.exit_code == 2 and "has no decisions" in unknown.output
    # any SQLAlchemy URL works in place of the file path (here the same SQLite file by URL)
    by_url = CliRunner().invoke(app, ["status", "--db", f"sqlite:///{db}"], env={"COLUMNS": "200"})
    assert by_url.exit_code == 0 and f"{s.equity_usdt:,.2f} USDT" in by_url.output


def test_store_open_takes_a_url_or_a_path_and_hides_passwords(tmp_path) -> None:
    assert StateStore.open(tmp_path / "a.sqlite").journal_mode() == "wal"
    assert StateStore.open("sqlite://").url == "sqlite://"
    store = StateStore.__new__(StateStore)
    store.url = "postgresql+psycopg://ats:hunter2@db.example/ats"
    assert "hunter2" not in store.display_url and "db.example" in store.display_url


def test_reset_risk_and_reload_commands(tmp_path) -> None:
    import typer

    from ats_cli.status_cmd import reload, reset_risk
    from serving.hotswap import reload_request_path

    cli = typer.Typer()
    cli.command("reset-risk")(reset_risk)
    cli.command("reload")(reload)
    db = tmp_path / "state.sqlite"
    store = StateStore.sqlite(db)
    RiskGuard(RiskConfig(fast_kill_consecutive_losses=1), store).record_closed_trade(
        make_candles(2).index[0], -1.0
    )
    out = CliRunner().invoke(cli, ["reset-risk", "--db", str(db), "--note", "alice: checked"])
    assert out.exit_code == 0, out.output
    assert "was HALTED: fast_kill" in out.output
    assert read_status(store).risk_state == "ACTIVE" and RiskGuard(RiskConfig(), store).state.value == "ACTIVE"
    bundle = tmp_path / "b"
    bundle.mkdir()
    assert CliRunner().invoke(cli, ["reload", "--db", str(db), "--bundle", str(bundle)]).exit_code == 2
    (bundle / "manifest.json").write_text("{}")
    assert CliRunner().invoke(cli, ["reload", "--db", str(db), "--bundle", str(bundle)]).exit_code == 0
    assert reload_request_path(db).is_file()
