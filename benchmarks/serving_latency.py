"""Serving latency: from candle arrival to order intent on the V2 path (no exchange I/O).

Usage::

    python -m benchmarks.serving_latency [--bundle runs/demo/bundle] [--bars 10000] [--json PATH] [--symbols N]
    (or python benchmarks/serving_latency.py ...)

Bundle: ``--bundle DIR`` if given (exit 2 if it is not there); else ``runs/demo/bundle`` if
``make demo`` made it; else a stand-in with the demo's architecture and feature schema, built in a
temporary folder first (``benchmarks.standin_bundle``: same models and sizes, untrained weights;
latency depends on the shapes, not on the weights, but the stand-in rarely trades).

For each of the last ``--bars`` bars of the bundled BTCUSDT 1h data (funding joined) the timed
span is what the serving loop does between a closed candle arriving and the order intent being
ready, with the real code of ``serving.loop``:

1. the decision context (trailing ``context_bars`` candles, position, marked equity);
2. the primary slot (``PolicySlot.acquire``) and the V2 decision with deadline check and V1
   fallback (``serving.loop._choose``): features over the bounded history, one HMM filter step,
   LightGBM, TCN, normaliser, actor;
3. the risk guard's review (``RiskGuard.review``, in-memory store);
4. the decision row (the intent record written ahead of sending).

Not timed: the paper broker's fill simulation (the exchange's job live) and the SQLite commit
(reported separately as ``store_ms``: local disk, not exchange I/O). ``--breakdown`` also
times ``compute_features`` alone as the policy calls it on that history (already validated candles,
trailing-window statistics for the TCN's rows only: ``features_*_ms``). Timings are per bar,
``time.perf_counter``; p50/p99 over all bars; the load average is printed because the machine
may be shared. ``--torch-threads`` (default 1) sets torch's intra-op threads: on 2 shared cores
one thread is faster for the small TCN/actor. ``--json PATH`` writes ``{"p50_ms", "p99_ms",
"bars", ...}``. Target: p99 <= 10 ms.

``--symbols N`` (N >= 2): the multi-symbol path of ``serving.portfolio``, one account of N symbols decided
together at each bar. The timed span of a bar runs from the N closed candles arriving to the N intents being
ready: for each symbol (sorted) its context, bundle -> V1 choice and its own guard's review, then the account's
guard over all N (``serving.account_risk.AccountGuard.review``) and the N decision rows. Reported: ``p50_ms`` /
``p99_ms`` of that span per bar (all N symbols), and ``per_symbol_p99_ms`` (span / N). The series are the bundled
BTCUSDT, ETHUSDT and XRPUSDT 1h files (each with its instrument spec); beyond three a series is reused by a
further symbol (its own policy instance, book and guard; named e.g. ``BTCUSDT2``): latency depends on the shapes,
not on the prices.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script (python benchmarks/serving_latency.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.bundle import load_bundle
from agents.policy import FrozenPPOPolicy
from envs.accounting import Bar, is_funding_time
from fallback.config import V1Config
from fallback.v1 import V1Policy
from market.candles import join_funding, load_candles, load_funding
from market.decision import DecisionContext
from market.features import atr as atr_indicator
from market.features import compute_features
from market.json_codec import dumps as json_dumps
from serving.hotswap import PolicySlot
from serving.loop import ServeConfig, _account_snapshot, _choose
from serving.paper import PaperBroker
from serving.risk import RiskConfig, RiskGuard
from serving.store import DecisionRecord, EquityRecord, StateStore

BUNDLED = Path(__file__).resolve().parents[1] / "market" / "bundled"
DEMO_BUNDLE = Path("runs/demo/bundle")


def _percentiles(ms: np.ndarray) -> dict[str, float]:
    return {
        "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()), "mean_ms": float(ms.mean()),
    }  # fmt: skip


def measure(bundle_dir: Path, n_bars: int, context_bars: int = 1_000, breakdown: bool = False) -> dict:
    """Replay the last ``n_bars`` bundled bars; per-bar latency (ms) of the V2 path and store writes.

    With ``breakdown``, ``market.features.compute_features`` is timed again, outside the timed
    span, on the same bounded history the policy used (``features_*_ms``): the part of the
    latency that lives in ``market.features``.
    """
    candles = join_funding(
        load_candles(BUNDLED / "BTCUSDT-1h.parquet"), load_funding(BUNDLED / "BTCUSDT-funding.parquet")
    )
    if len(candles) < n_bars + context_bars:
        raise SystemExit(
            f"the bundled data has {len(candles)} bars, fewer than {n_bars} + {context_bars} of context"
        )
    bundle = load_bundle(bundle_dir)
    slot = PolicySlot(FrozenPPOPolicy(bundle), source=bundle_dir)
    fallback = V1Policy(V1Config())
    guard = RiskGuard(RiskConfig(), StateStore("sqlite://"))
    store = StateStore("sqlite://")
    cfg = ServeConfig(context_bars=context_bars)
    costs = bundle.env_config.costs
    broker = PaperBroker(cfg.initial_equity_usdt, costs)
    atr = atr_indicator(candles, bundle.feature_config.atr_period_bars)
    o, h, lo, c = (candles[k].to_numpy(np.float64) for k in ("open", "high", "low", "close"))
    funding = candles["funding_rate"].to_numpy(np.float64)
    first = len(candles) - n_bars
    lat, store_ms, feat_ms, sources = [], [], [], {"v2": 0, "v1": 0, "guard": 0}
    policy0 = slot.policy
    if policy0 is None:
        raise SystemExit(f"the bundle in {bundle_dir} did not load")
    keep = policy0.history_bars(candles.index[1] - candles.index[0])
    for t in range(first, len(candles)):
        ts = candles.index[t]
        result = broker.on_bar(Bar(int(ts.value), o[t], h[t], lo[t], c[t], funding[t],
                                   is_funding_time(int(ts.value), costs.funding_interval_hours)))  # fmt: skip
        for trade in result.closed_trades:
            guard.record_closed_trade(ts, trade.pnl_usdt)
        state = broker.state
        # ---- candle arrived: timed span starts
        t0 = time.perf_counter()
        ctx = DecisionContext(
            ts, candles.iloc[t + 1 - context_bars : t + 1], broker.position_view(), result.equity_usdt
        )
        policy, unavailable = slot.acquire(t)
        choice = _choose(ctx, policy, fallback, unavailable, cfg.decision_timeout_ms, time.perf_counter)
        slot.record(t, choice.primary_failure)
        verdict = guard.review(choice.decision, _account_snapshot(ts, result.equity_usdt, state, c[t]))
        record = DecisionRecord.from_decision(
            cfg.run_id, ts, choice.source, verdict.decision, raw_action=choice.raw_action,
            fallback_reason=choice.reason, latency_ms=choice.latency_ms, created_at=datetime.now(UTC),
            symbol=broker.market_id,
        )  # fmt: skip
        t1 = time.perf_counter()
        # ---- intent ready: timed span ends
        store.append(decisions=[record], equity=[EquityRecord(cfg.run_id, ts, result.equity_usdt, state.cash_usdt,
                                                              state.side, state.qty_base, broker.market_id)])  # fmt: skip
        store_ms.append((time.perf_counter() - t1) * 1e3)
        if breakdown:
            t2 = time.perf_counter()
            compute_features(candles.iloc[t + 1 - keep : t + 1], bundle.feature_config, validate=False,
                             tail_rows=bundle.models.tcn.window_bars + 1)
            feat_ms.append((time.perf_counter() - t2) * 1e3)
        lat.append((t1 - t0) * 1e3)
        sources[choice.source] += 1
        broker.submit(
            verdict.decision, float(atr[t])
        )  # ATR is finite here: the span starts after its warm-up
    arr = np.asarray(lat)
    out = {**_percentiles(arr), "bars": len(arr), "sources": sources,
           "store_p50_ms": float(np.median(store_ms)), "store_p99_ms": float(np.percentile(store_ms, 99)),
           "bundle": str(bundle_dir), "span": [str(candles.index[first]), str(candles.index[-1])],
           "loadavg_1m": os.getloadavg()[0], "torch_threads": torch.get_num_threads()}  # fmt: skip
    if breakdown:
        out["features_p50_ms"] = float(np.percentile(feat_ms, 50))
        out["features_p99_ms"] = float(np.percentile(feat_ms, 99))
    return out


def measure_portfolio(bundle_dir: Path, n_bars: int, n_symbols: int, context_bars: int = 1_000) -> dict:
    """Per-bar latency (ms) of deciding ``n_symbols`` symbols together on one account (module docstring)."""
    from market.instruments import resolve_spec
    from serving.account_risk import AccountGuard, AccountRiskConfig, SymbolBook, per_symbol_limits

    bases = ("BTCUSDT", "ETHUSDT", "XRPUSDT")
    series = {b: join_funding(load_candles(BUNDLED / f"{b}-1h.parquet"), load_funding(BUNDLED / f"{b}-funding.parquet"))
              for b in bases[: min(n_symbols, 3)]}
    common = series[bases[0]].index
    for c in series.values():
        common = common.intersection(c.index)
    if len(common) < n_bars + context_bars:
        raise SystemExit(f"the bundled series share {len(common)} bars, fewer than {n_bars} + {context_bars}")
    bundle = load_bundle(bundle_dir)
    cfg = ServeConfig(context_bars=context_bars)
    sleeve = cfg.initial_equity_usdt / n_symbols
    account = AccountGuard(AccountRiskConfig(), StateStore("sqlite://"))
    legs = []
    for i in range(n_symbols):
        base = bases[i % 3]
        name = base if i < 3 else f"{base}{i // 3 + 1}"
        candles = series[base].loc[common]
        costs = bundle.env_config.costs.with_instrument(resolve_spec(base).spec)
        legs.append({
            "symbol": name, "candles": candles, "slot": PolicySlot(FrozenPPOPolicy(load_bundle(bundle_dir)), source=bundle_dir),
            "broker": PaperBroker(sleeve, costs), "guard": RiskGuard(per_symbol_limits(RiskConfig()), StateStore("sqlite://")),
            "atr": atr_indicator(candles, bundle.feature_config.atr_period_bars), "costs": costs,
            "ohlcf": [candles[k].to_numpy(np.float64) for k in ("open", "high", "low", "close", "funding_rate")],
        })  # fmt: skip
    fallback = V1Policy(V1Config())
    store = StateStore("sqlite://")
    first = len(common) - n_bars
    lat, sources = [], {"v2": 0, "v1": 0, "guard": 0}
    for t in range(first, len(common)):
        ts = common[t]
        results = []
        for leg in legs:  # the exchange's part (fills, marks): not timed
            o, h, lo, c, f = (a[t] for a in leg["ohlcf"])
            result = leg["broker"].on_bar(Bar(int(ts.value), o, h, lo, c, f,
                                              is_funding_time(int(ts.value), leg["costs"].funding_interval_hours)))
            for trade in result.closed_trades:
                leg["guard"].record_closed_trade(ts, trade.pnl_usdt)
                account.record_closed_trade(ts, trade.pnl_usdt)
            results.append(result)
        # ---- the N candles arrived: timed span starts
        t0 = time.perf_counter()
        decided = []
        for leg, result in zip(legs, results, strict=True):
            broker, state, c = leg["broker"], leg["broker"].state, leg["ohlcf"][3][t]
            ctx = DecisionContext(ts, leg["candles"].iloc[t + 1 - context_bars : t + 1], broker.position_view(),
                                  result.equity_usdt)
            policy, unavailable = leg["slot"].acquire(t)
            choice = _choose(ctx, policy, fallback, unavailable, cfg.decision_timeout_ms, time.perf_counter)
            leg["slot"].record(t, choice.primary_failure)
            verdict = leg["guard"].review(choice.decision, _account_snapshot(ts, result.equity_usdt, state, c))
            decided.append((choice, verdict.decision, SymbolBook(
                leg["symbol"], verdict.decision, int(state.side), float(state.qty_base) * c,
                float(state.margin_usdt) if state.side else 0.0, float(result.equity_usdt))))
        verdicts = account.review(ts, sum(b.sizing_equity_usdt for _, _, b in decided), [b for _, _, b in decided])
        records = [DecisionRecord.from_decision(
            cfg.run_id, ts, choice.source, verdicts[book.symbol].decision, raw_action=choice.raw_action,
            fallback_reason=choice.reason, latency_ms=choice.latency_ms, created_at=datetime.now(UTC),
            symbol=book.symbol) for choice, _, book in decided]  # fmt: skip
        t1 = time.perf_counter()
        # ---- N intents ready: timed span ends
        store.append(decisions=records)
        lat.append((t1 - t0) * 1e3)
        for leg, (choice, _, book) in zip(legs, decided, strict=True):
            sources[choice.source] += 1
            atr_t = float(leg["atr"][t])
            leg["broker"].submit(verdicts[book.symbol].decision, atr_t)
    arr = np.asarray(lat)
    return {**_percentiles(arr), "per_symbol_p50_ms": float(np.percentile(arr / n_symbols, 50)),
            "per_symbol_p99_ms": float(np.percentile(arr / n_symbols, 99)), "bars": len(arr), "sources": sources,
            "symbols": [leg["symbol"] for leg in legs], "bundle": str(bundle_dir),
            "span": [str(common[first]), str(common[-1])], "loadavg_1m": os.getloadavg()[0],
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None,
                        help=f"policy bundle (default: {DEMO_BUNDLE} if present, else a stand-in built first)")
    parser.add_argument("--bars", type=int, default=10_000)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--breakdown", action="store_true", help="also time compute_features alone")
    parser.add_argument("--symbols", type=int, default=1,
                        help="decide this many symbols together on one account (the multi-symbol path; default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    if args.bundle is not None and not (args.bundle / "manifest.json").is_file():
        print(f"no bundle at {args.bundle}: run `make demo` first (it writes {DEMO_BUNDLE}), or omit --bundle",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    with tempfile.TemporaryDirectory(prefix="ats-latency-") as tmp:
        bundle = args.bundle
        if bundle is None and (DEMO_BUNDLE / "manifest.json").is_file():
            bundle = DEMO_BUNDLE
        if bundle is None:
            from benchmarks.standin_bundle import build_demo_standin

            print(f"{DEMO_BUNDLE} not found (`make demo` makes it): building a stand-in bundle with the demo's "
                  "architecture and feature schema, untrained weights (benchmarks/standin_bundle.py) ...")  # fmt: skip
            bundle = build_demo_standin(Path(tmp) / "bundle")
        if args.symbols < 1:
            raise SystemExit("--symbols must be >= 1")
        res = (measure(bundle, args.bars, breakdown=args.breakdown) if args.symbols == 1
               else measure_portfolio(bundle, args.bars, args.symbols))
        res["stand_in_bundle"] = bundle != args.bundle and bundle != DEMO_BUNDLE
    from rich.console import Console
    from rich.table import Table

    what = f"{args.symbols} symbols together, per bar" if args.symbols > 1 else "V2 path"
    table = Table(
        title=f"serving latency, candle -> intent, {what} ({res['bars']} bars, {res['span'][0]} .. {res['span'][1]})"
    )
    for col in ("metric", "value"):
        table.add_column(col)
    for k in (
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "mean_ms",
        "per_symbol_p50_ms",
        "per_symbol_p99_ms",
        "store_p50_ms",
        "store_p99_ms",
        "features_p50_ms",
        "features_p99_ms",
    ):
        if k in res:
            table.add_row(k, f"{res[k]:.2f}")
    table.add_row("bundle", ("stand-in, demo architecture, untrained (benchmarks/standin_bundle.py)"
                             if res["stand_in_bundle"] else res["bundle"]))  # fmt: skip
    table.add_row("decided by", ", ".join(f"{k} {v}" for k, v in res["sources"].items()))
    if "symbols" in res:
        table.add_row("symbols", ", ".join(res["symbols"]))
    table.add_row("load average (1 min)", f"{res['loadavg_1m']:.2f}")
    table.add_row("torch threads", str(res["torch_threads"]))
    table.add_row("target p99 <= 10 ms", "met" if res["p99_ms"] <= 10.0 else "NOT met")
    Console().print(table)
    if args.json is not None:
        args.json.write_text(json_dumps(res, strict=False, indent=1))


if __name__ == "__main__":
    main()
