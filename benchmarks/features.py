"""Time of the full feature computation on 65,000 1h bars (the issue's budget: at most 2 s).

Usage::

    python -m benchmarks.features [--rows 65000] [--repeats 7] [--higher-timeframes 4h] [--json PATH]

The bundled BTCUSDT 1h candles (48k rows, with funding) are tiled to ``--rows`` rows: each copy
follows the previous one in time (index shifted by the span of the data) and its prices are scaled
so that its first open equals the previous copy's last close, so the series stays gap-free and
valid and the benchmark needs nothing outside the repository. Prints the rows, the number of
feature columns and the median wall time of ``--repeats`` runs of
:func:`market.features.compute_features` (validation included), plus the load average; with
``--json PATH`` also writes ``{"rows", "features", "seconds"}``. Nothing here runs in the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):  # run as a script (python benchmarks/features.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from market.bundled import bundled_candles_path, bundled_funding_path
from market.candles import FUNDING_COLUMN, PRICE_COLUMNS, join_funding, load_candles, load_funding
from market.features import FeatureConfig, compute_features
from market.json_codec import dumps as json_dumps


def tiled_candles(rows: int) -> pd.DataFrame:
    """The bundled candles (with funding) repeated forward in time until ``rows`` rows.

    Returns
    -------
    pandas.DataFrame
        Canonical candles, ``rows`` rows, gap-free 1h UTC index starting at the bundled start.

    Raises
    ------
    ValueError
        If ``rows < 2``.
    """
    if rows < 2:
        raise ValueError(f"rows must be >= 2, got {rows}")
    base = join_funding(load_candles(bundled_candles_path()), load_funding(bundled_funding_path()))
    step = base.index[1] - base.index[0]
    span = base.index[-1] - base.index[0] + step
    parts: list[pd.DataFrame] = []
    scale, k = 1.0, 0
    while sum(len(p) for p in parts) < rows:
        part = base.copy()
        part[list(PRICE_COLUMNS)] = part[list(PRICE_COLUMNS)] * scale
        part.index = base.index + k * span
        parts.append(part)
        scale = float(part["close"].iloc[-1] / base["open"].iloc[0])
        k += 1
    out = pd.concat(parts).iloc[:rows]
    if FUNDING_COLUMN in out.columns:
        out[FUNDING_COLUMN] = out[FUNDING_COLUMN].astype(np.float64)
    return out


def time_features(candles: pd.DataFrame, cfg: FeatureConfig, repeats: int) -> tuple[int, float]:
    """(number of feature columns, median seconds of ``repeats`` runs of ``compute_features``)."""
    times, n_features = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        feats = compute_features(candles, cfg)
        times.append(time.perf_counter() - t0)
        n_features = feats.shape[1]
    return n_features, float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--higher-timeframes", nargs="*", default=[], help="e.g. 4h (default: the shipped config, none)")
    parser.add_argument("--json", type=Path, default=None, help="write {rows, features, seconds} here")
    args = parser.parse_args()
    candles = tiled_candles(args.rows)
    cfg = FeatureConfig(higher_timeframes=tuple(args.higher_timeframes))
    compute_features(candles.iloc[:2000], cfg)  # warm imports and caches outside the timing
    n_features, seconds = time_features(candles, cfg, args.repeats)
    load = os.getloadavg()
    print(f"rows {len(candles)}")
    print(f"features {n_features}")
    print(f"seconds {seconds:.3f} (median of {args.repeats} runs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    if args.json is not None:
        args.json.write_text(json_dumps({"rows": len(candles), "features": n_features, "seconds": seconds}))


if __name__ == "__main__":
    main()
