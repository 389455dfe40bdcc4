"""Progress bars say what they count: the paper replay counts decided bars (not the warm-up rows)."""

from __future__ import annotations

import io

from rich.console import Console
from typer.testing import CliRunner

from ats_cli.main import app
from ats_cli.progress import counting_progress


def test_replay_progress_counts_decided_bars_and_names_the_warm_up(tmp_path):
    from tests.kit.candles import make_candles

    candles = tmp_path / "candles.parquet"
    make_candles(400, seed=3).to_parquet(candles)
    r = CliRunner().invoke(app, ["serve", "--mode", "paper", "--replay", str(candles), "--bundle", str(tmp_path / "b"),
                                 "--db", str(tmp_path / "s.sqlite"), "--warmup-bars", "300", "--max-bars", "50",
                                 "--symbol", "BTC/USDT:USDT"],  # no bundle, no manifest: the replayed instrument
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "replay after 300 warm-up bars" in r.output and "50/50 decided bars" in r.output, r.output
    assert "350/350" not in r.output and "served 50 bars" in r.output


def test_every_count_carries_its_unit():
    out = io.StringIO()
    with counting_progress(Console(file=out, width=200, force_terminal=False)) as progress:
        progress.add_task("PPO", total=100_000, completed=40_000, unit="env steps")
        progress.add_task("no unit given", total=3, completed=1)
    text = out.getvalue()
    assert "40,000/100,000 env steps" in text and "1/3" in text
