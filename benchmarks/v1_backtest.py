"""V1 speed: one serving decision, and a full-year 15m backtest under the env's cost model.

Usage::

    python -m benchmarks.v1_backtest [--repeats 3] [--json PATH]

* ``per_bar_ms``: median wall time of ``V1Policy.decide(ctx)`` (the serving path: TA-Lib on the
  trailing 600 of a 1,000-candle context, flat position) over 2,000 consecutive bars; target < 1 ms.
* ``year_15m_seconds``: median wall time of :func:`training.v1_eval.evaluate_v1` over the 35,040
  bars of 2024-07-01 .. 2025-07-01 of a 15m candle file (``--data``; default
  ``../shared/data/binance_usdm/BTCUSDT-15m.parquet`` next to the repository: real Binance USDT-M
  candles, funding joined), i.e. indicator precomputation (``V1SeriesPolicy``) plus
  ``training.backtest.run_backtest`` through ``TradingEnv``; target < 5 s. Without a 15m file the
  last 35,040 bars of the bundled 1h data are timed instead: the same number of bars, but not
  15m data, so the JSON then has ``year_15m_seconds: null`` and the time under
  ``bars_35040_1h_seconds`` (the output says so).

Each figure is the median of ``--repeats`` runs; the load average is printed next to it because
the machine may be shared. Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):  # run as a script (python benchmarks/v1_backtest.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.trading_env import EnvConfig
from fallback.config import V1Config
from fallback.v1 import V1Policy
from market.decision import DecisionContext, PositionView
from market.json_codec import dumps as json_dumps
from training.v1_eval import evaluate_v1, load_v1_candles

DATA_15M = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "binance_usdm" / "BTCUSDT-15m.parquet"
YEAR_BARS_15M = 35_040


def per_bar_ms(candles: pd.DataFrame, n_bars: int = 2_000) -> float:
    """Median ms of one ``V1Policy.decide`` on a 1,000-candle context."""
    policy = V1Policy(V1Config())
    times = []
    for t in range(len(candles) - n_bars, len(candles)):
        ctx = DecisionContext(candles.index[t], candles.iloc[t - 999 : t + 1], PositionView(), 10_000.0)
        t0 = time.perf_counter()
        policy.decide(ctx)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def year_backtest_s(candles: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> tuple[float, dict]:
    """Wall seconds of one V1 backtest over ``[start, end)`` and a few of its numbers."""
    t0 = time.perf_counter()
    res = evaluate_v1(candles, start, end, V1Config(), EnvConfig())
    dt = time.perf_counter() - t0
    return dt, {
        "bars": len(res.equity) - 1,
        "trades": len(res.trades),
        "final_equity": float(res.equity.iloc[-1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=DATA_15M, help="15m USDT-M candle parquet")
    args = ap.parse_args()

    is_15m = args.data.is_file()
    if is_15m:
        candles = load_v1_candles(args.data)
        end = pd.Timestamp("2025-07-01", tz="UTC")
        start = end - pd.Timedelta(minutes=15 * YEAR_BARS_15M)
        source = f"{args.data} (15m, {start:%Y-%m-%d} .. {end:%Y-%m-%d})"
    else:
        candles = load_v1_candles(None)
        start, end = candles.index[-YEAR_BARS_15M], candles.index[-1] + pd.Timedelta(hours=1)
        source = "bundled BTCUSDT 1h, last 35,040 bars (no 15m file available)"

    per_bar = [per_bar_ms(candles) for _ in range(args.repeats)]
    print(
        f"V1 decide (serving path, 1,000-candle context): median {statistics.median(per_bar):.3f} ms per bar "
        f"(runs: {', '.join(f'{x:.3f}' for x in per_bar)}); load average {os.getloadavg()[0]:.2f}"
    )
    year: list[float] = []
    info: dict = {}
    for _ in range(args.repeats):
        dt, info = year_backtest_s(candles, start, end)
        year.append(dt)
    print(
        f"V1 backtest of {info['bars']:,} bars from {source}: median {statistics.median(year):.2f} s "
        f"(runs: {', '.join(f'{x:.2f}' for x in year)}); {info['trades']} trades, final equity "
        f"{info['final_equity']:,.2f} USDT; load average {os.getloadavg()[0]:.2f}"
    )
    if args.json is not None:
        timed = statistics.median(year)
        out = {"per_bar_ms": statistics.median(per_bar), "year_15m_seconds": timed if is_15m else None}
        if not is_15m:
            out["bars_35040_1h_seconds"] = timed
        args.json.write_text(json_dumps(out, strict=False, indent=1))


if __name__ == "__main__":
    main()
