"""A paper replay state database for the operations views (report, dashboard, gate, drift): the real
``ats serve --mode paper --replay`` command on synthetic candles with the test kit's trading bundle."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from ats_cli.main import app
from tests.kit.candles import make_candles
from tests.serving import bundle_kit as kit

WARMUP_BARS = 1_600
"""Bars of history before the first decided bar (the kit bundle's feature and model context)."""


def paper_replay_db(out: Path, *, bars: int = 200, seed: int = 11, drift: bool = False) -> tuple[Path, Path]:
    """Serve ``bars`` synthetic 1h bars (after :data:`WARMUP_BARS` warm-up bars) through ``ats serve --mode paper
    --replay`` with a trading kit bundle; return (database, bundle). About 10 s on 2 busy cores. ``drift``: with
    the drift monitor of the default serve config (the kit bundle has no training distribution: its feature and
    regime drift read 'unavailable'); without it (default) the run writes no drift event."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "serve.yaml"
    config.write_text("{}\n" if drift else "drift:\n  enabled: false\n")
    bundle = kit.make_it_trade(kit.build_bundle(out / "bundle"))
    candles = out / "candles.parquet"
    make_candles(WARMUP_BARS + bars, seed=seed).to_parquet(candles)
    db = out / "state.sqlite"
    r = CliRunner().invoke(app, ["serve", "--mode", "paper", "--replay", str(candles), "--bundle", str(bundle), "--db",
                                 str(db), "--warmup-bars", str(WARMUP_BARS), "--symbol", "BTC/USDT:USDT", "--config", str(config)],
                           env={"COLUMNS": "200"})  # fmt: skip
    if r.exit_code != 0:
        raise RuntimeError(f"ats serve failed ({r.exit_code}): {r.output}")
    return db, bundle
