"""Paper protection of ``ats gate``: a bundle passes for testnet/live only after N days of paper trading on live
candles whose realised Sortino, max drawdown and trade rate lie inside the walk-forward's intervals. The evidence
is a real paper-on-live-candles run (the paper loop against the fake exchange, no sleeps); time is injected."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from typer.testing import CliRunner

from ats_cli.gate_cmd import paper_evidence
from ats_cli.main import app
from envs.config import CostConfig
from serving.exchange import BinanceFuturesBroker, make_client
from serving.hotswap import BackoffConfig, PolicySlot
from serving.loop import ServeConfig
from serving.paper_live import FeedConfig, PaperLiveLoop
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.kit.fake_binance import FakeBinance
from tests.serving import bundle_kit as kit
from tests.serving.fakes import ScriptedFallback
from training.gate import (
    GateConfig,
    PaperEvidence,
    evaluate_paper,
    paper_figures,
    paper_intervals,
    verdict_of,
)
from training.provenance import strategy_config_sha256

H_MS = 3_600_000
CONTEXT, FIRST, DAYS = 1_200, 1_300, 15


class _Clock:
    def __init__(self, fake):
        self.fake = fake

    def __call__(self) -> float:
        return self.fake.now_ms / 1000.0

    def sleep(self, seconds: float) -> None:
        self.fake.now_ms += round(seconds * 1000)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """15 days of paper trading on live candles (fake exchange) with the test kit's trading bundle."""
    tmp = tmp_path_factory.mktemp("paper")
    bundle = kit.make_it_trade(kit.build_bundle(tmp / "bundle"))
    candles = make_candles(FIRST + DAYS * 24 + 2, seed=5)
    db = tmp / "paper.sqlite"
    store = StateStore.sqlite(db)
    t0 = int(candles.index[FIRST + 1].value // 1_000_000) + 60_000
    with FakeBinance(candles, candles["funding_rate"].dropna(), now_ms=t0) as fake:
        client = make_client(api_key=None, secret=None, sandbox=False, base_url=fake.url, timeout_ms=5_000,
                             rate_limit=False)  # fmt: skip
        clock = _Clock(fake)
        config = ServeConfig(run_id="paper", context_bars=CONTEXT, primary_backoff=BackoffConfig(initial_bars=0))
        loop = PaperLiveLoop(BinanceFuturesBroker(client, read_attempts=2, sleep=lambda s: None), store, config,
                             FeedConfig(), primary=PolicySlot.from_bundle(bundle), fallback=ScriptedFallback(),
                             costs=CostConfig(), wall_clock_s=clock, monotonic_s=clock, sleep=clock.sleep)  # fmt: skip
        for _ in range(DAYS * 24):
            loop.step()
            fake.now_ms += H_MS
    store.close()
    return db, bundle


def _wf_report(manifest, *, sortino=(-50.0, 50.0), worst_dd=0.9, fold_trades=(10, 400), n_days=30):
    t = datetime(2024, 1, 1, tzinfo=UTC)
    windows, folds = [], []
    for k, n in enumerate(fold_trades):
        windows.append({"fold": k, "seed": 0, "test_start": (t + timedelta(days=k * n_days)).isoformat(),
                        "test_end": (t + timedelta(days=(k + 1) * n_days)).isoformat()})
        folds.append({"sortino": 0.5, "max_drawdown": worst_dd if k == 0 else worst_dd / 2, "n_trades": float(n)})
    return {"stitched": {"ppo": {"sortino": 1.2, "max_drawdown": 0.2}, "v1": {"sortino": 0.4}},
            "deflated_sharpe": {"dsr": 0.97}, "pbo": {"pbo": 0.3}, "windows": windows, "per_fold": {"ppo": folds},
            "sortino_ci95": {"ppo": list(sortino)},
            "provenance": {"strategy_config_sha256": strategy_config_sha256(manifest["config"]),
                           "schema_hash": manifest["observation"]["schema_hash"]}}


def _evidence(days=15.0, *, candles="live", files=None, swaps=0, equity=None, trades=30):
    first = datetime(2025, 1, 1, tzinfo=UTC)
    n = int(days * 24)
    eq = equity if equity is not None else tuple(10_000 * (1 + 0.0004 * np.sin(np.arange(n + 1) / 5) + 1e-5 * np.arange(n + 1)))
    return PaperEvidence(source="test", candles=candles, first_bar=first, last_bar=first + timedelta(hours=n - 1),
                         bar_interval_s=3600.0, equity_usdt=tuple(eq), n_closed_trades=trades,
                         bundle_files={"a": "1"} if files is None else files, n_swaps=swaps)


MANIFEST = {"files": {"a": "1"}, "config": {"name": "x"}, "observation": {"schema_hash": "s"}}
NOW = datetime(2025, 3, 1, tzinfo=UTC)


DEFAULT = GateConfig()


def _judge(evidence, report=None, cfg=DEFAULT, now=NOW):
    criteria, record = evaluate_paper(evidence, report or _wf_report(MANIFEST), MANIFEST, cfg, now)
    return {c.name: c.status for c in criteria}, verdict_of(criteria), record


def test_intervals_come_from_the_walkforward_report():
    iv = paper_intervals(_wf_report(MANIFEST, sortino=(-1.0, 2.5), worst_dd=0.3, fold_trades=(30, 60)),
                         GateConfig(paper_trade_rate_tolerance_frac=0.5))
    assert iv["sortino"] == (-1.0, 2.5) and iv["max_drawdown"] == (0.0, 0.3)
    assert iv["trades_per_day"] == pytest.approx((30 / 30 * 0.5, 60 / 30 * 1.5))
    assert paper_intervals({}, GateConfig()) == {"sortino": None, "max_drawdown": None, "trades_per_day": None}


def test_protection_passes_inside_the_intervals_after_the_days():
    status, verdict, record = _judge(_evidence(15))
    assert verdict == "PASS" and set(status.values()) == {"passed"}
    assert record["figures"]["days"] == pytest.approx(15.0) and record["required_days"] == 14


def test_too_few_days_holds_and_time_is_the_injected_now():
    status, verdict, _ = _judge(_evidence(10))
    assert status["paper_days"] == "missing" and verdict == "HOLD"
    assert {k: v for k, v in status.items() if k != "paper_days"} == dict.fromkeys(
        ("paper_live_candles", "paper_bundle", "paper_sortino", "paper_max_drawdown", "paper_trades_per_day"), "passed")
    # 15 days recorded, but "now" is 5 days after the first bar: only 5 days count
    status, verdict, record = _judge(_evidence(15), now=datetime(2025, 1, 6, tzinfo=UTC))
    assert status["paper_days"] == "missing" and verdict == "HOLD" and record["figures"]["days"] == pytest.approx(5.0)
    assert _judge(_evidence(10), cfg=GateConfig(paper_protection_days=7))[1] == "PASS"


@pytest.mark.parametrize("report, failed", [
    (_wf_report(MANIFEST, sortino=(5.0, 9.0)), "paper_sortino"),
    (_wf_report(MANIFEST, worst_dd=0.0001), "paper_max_drawdown"),
    (_wf_report(MANIFEST, fold_trades=(300, 400)), "paper_trades_per_day"),
])
def test_a_figure_outside_its_interval_rejects(report, failed):
    status, verdict, _ = _judge(_evidence(15), report)
    assert status[failed] == "failed" and verdict == "REJECT"
    assert [k for k, v in status.items() if v == "failed"] == [failed]


@pytest.mark.parametrize("evidence, name", [
    (_evidence(15, candles="replay"), "paper_live_candles"),
    (_evidence(15, files={"a": "2"}), "paper_bundle"),
    (_evidence(15, swaps=1), "paper_bundle"),
])
def test_evidence_of_another_kind_or_bundle_is_missing(evidence, name):
    status, verdict, _ = _judge(evidence)
    assert status[name] == "missing" and verdict == "HOLD"


def test_no_paper_run_holds_unless_protection_is_off():
    status, verdict, record = _judge(None)
    assert status == {"paper_protection": "missing"} and verdict == "HOLD" and record == {"given": False}
    assert _judge(None, cfg=GateConfig(paper_protection_days=0)) == ({}, "PASS", {"disabled": True})


def test_real_paper_run_is_read_as_live_evidence_of_its_bundle(paper_run):
    db, bundle = paper_run
    ev = paper_evidence(str(db))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert ev.candles == "live" and ev.bundle_files == manifest["files"] and ev.n_swaps == 0
    assert ev.bar_interval_s == 3600.0 and len(ev.equity_usdt) == DAYS * 24 + 1 and ev.equity_usdt[0] == 10_000.0
    store = StateStore.sqlite(db)
    assert ev.n_closed_trades > 5 and ev.n_closed_trades <= len(store.fills()) // 2 + 1
    assert ev.equity_usdt[-1] == store.equity().equity_usdt.iloc[-1]
    figures = paper_figures(ev, NOW)
    assert figures["days"] == pytest.approx(DAYS)


def test_gate_command_judges_the_paper_run_and_records_it(paper_run, tmp_path):
    db, bundle_src = paper_run
    bundle = kit.copy_bundle(bundle_src, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    figures = paper_figures(paper_evidence(str(db)), datetime.now(UTC))
    s, dd, rate = figures["sortino"], figures["max_drawdown"], figures["trades_per_day"]
    report_dir = tmp_path / "wf"
    report_dir.mkdir()
    inside = _wf_report(manifest, sortino=(s - 1, s + 1), worst_dd=dd + 0.01, fold_trades=(rate * 30, rate * 30))
    (report_dir / "metrics.json").write_text(json.dumps(inside))
    runner = CliRunner()
    r = runner.invoke(app, ["gate", "--bundle", str(bundle), "--report", str(report_dir)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "HOLD" in r.output and "paper_protection: missing" in r.output, r.output
    r = runner.invoke(app, ["gate", "--bundle", str(bundle), "--paper-db", str(db)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "PASS" in r.output, r.output  # --report: the one the last verdict recorded
    gate = json.loads((bundle / "manifest.json").read_text())["gate"]
    assert gate["verdict"] == "PASS" and gate["paper"]["candles"] == "live"
    assert gate["paper"]["figures"]["sortino"] == pytest.approx(s) and gate["paper"]["intervals"]["sortino"] == [s - 1, s + 1]
    # the same run judged against a walk-forward whose worst window lost less: the paper drawdown is outside
    (report_dir / "metrics.json").write_text(json.dumps({**inside, "per_fold": {"ppo": [
        {**f, "max_drawdown": dd / 2} for f in inside["per_fold"]["ppo"]]}}))
    r = runner.invoke(app, ["gate", "--bundle", str(bundle), "--paper-db", str(db)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "REJECT" in r.output and "paper_max_drawdown: failed" in r.output, r.output
    r = runner.invoke(app, ["gate", "--bundle", str(bundle), "--paper-db", str(tmp_path / "no.sqlite")])
    assert r.exit_code == 2 and "no state database" in r.output
