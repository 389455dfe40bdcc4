"""Testnet serving against the local fake Binance, bar after bar, with Binance's faults (test kit).

:func:`run_fault_sim` runs exactly what ``ats serve --mode testnet`` runs
(:func:`ats_cli.serve_live.build_live_loop`: bundle -> V1 -> flat, the risk guard, the state store,
the real ccxt client) over real bundled BTCUSDT 1h candles served by :class:`FakeBinance`, with a
simulated clock: every sleep of the loop moves the exchange's clock, so the loop polls after each
bar close, stops and take-profits trigger on the real highs and lows, and Binance's order-query
lag (``query_lag_ms``) runs out as it would. Before each bar, with probability ``fault_rate``, one
fault of :data:`FAULTS` (seeded choice) is queued on its endpoint: malformed and empty HTTP 200
bodies, a malformed trade record, 5xx and 429 answers, creates lost after the accept, and a
take-profit filling between the trades read and the position read.

:func:`run_crash_sweep` kills the serving process (SIGKILL by injected crash points,
:class:`serving.crash.KillAt`) at each crash point of :data:`serving.crash.CRASH_POINTS` while it
serves, restarts it, and checks the same invariants. Both return a :class:`SimReport`;
``python -m tests.kit.exchange_sim --bundle B`` prints the fault matrix and the crash matrix for a bundle (e.g. the ``make demo`` bundle).

:func:`run_parity` replays the same candles through the paper broker and serves them with the live loop on the
fake exchange (kernel fill prices, funding settled), for the sim/exchange parity test.

Invariants checked by the callers: one decision row per bar, no client id placed twice on the
exchange, the stored position equal to the exchange's, not blocked at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from market.bundled import bundled_candles_path, bundled_funding_path
from market.candles import load_candles, load_funding
from market.decision import Decision, DecisionContext, StatelessPolicy
from tests.kit.fake_binance import ORDER, FakeBinance, Fault

REPO = Path(__file__).resolve().parents[2]
H = 3_600_000
SYMBOL = "BTCUSDT"
SIM_KEY, SIM_SECRET = "sim-api-key-0123456789", "sim-api-secret-0123456789"


def _null_first_trade_id(body: object) -> object:
    if isinstance(body, list) and body:
        body[0]["id"] = None
    return body


def _trigger_open(fake: FakeBinance, order_type: str) -> None:
    """Fill our resting ``order_type`` (STOP_MARKET / TAKE_PROFIT_MARKET) now, if there is one."""
    for a in list(fake.trading.algo_orders):
        if a["algoStatus"] == "NEW" and a["orderType"] == order_type:
            fake.trigger_now(a["clientAlgoId"])
            return


#: (label, path, fault factory): what Binance does to a serving loop (issue 17's sweep)
FAULTS: tuple[tuple[str, str, Callable[[FakeBinance], Fault]], ...] = (
    ("positionRisk truncated 200", "/fapi/v3/positionRisk", lambda f: Fault("truncated_json")),
    ("positionRisk empty 200", "/fapi/v3/positionRisk", lambda f: Fault("empty_body")),
    ("userTrades truncated 200", "/fapi/v1/userTrades", lambda f: Fault("truncated_json")),
    ("userTrades record without id", "/fapi/v1/userTrades", lambda f: Fault("mutate", transform=_null_first_trade_id)),
    ("openOrders truncated 200", "/fapi/v1/openOrders", lambda f: Fault("truncated_json")),
    ("openAlgoOrders empty 200", "/fapi/v1/openAlgoOrders", lambda f: Fault("empty_body")),
    ("account truncated 200", "/fapi/v3/account", lambda f: Fault("truncated_json")),
    ("klines 503 html", "/fapi/v1/klines", lambda f: Fault("html_5xx")),
    ("klines 429", "/fapi/v1/klines", lambda f: Fault("status_429", retry_after_s=2)),
    ("time 500 -1000", "/fapi/v1/time", lambda f: Fault("json_5xx")),
    ("order create accepted, answer lost (timeout)", f"POST {ORDER}", lambda f: Fault("accept_then_delay", delay_s=0.8)),
    ("order create accepted, connection dropped", f"POST {ORDER}", lambda f: Fault("drop")),
    ("order create 503 (not accepted)", f"POST {ORDER}", lambda f: Fault("html_5xx")),
    ("algo create connection dropped", "POST /fapi/v1/algoOrder", lambda f: Fault("drop")),
    ("take-profit fills between the two reads", "/fapi/v3/positionRisk",
     lambda f: Fault("before", action=lambda: _trigger_open(f, "TAKE_PROFIT_MARKET"))),
    ("stop fills between the two reads", "/fapi/v3/positionRisk",
     lambda f: Fault("before", action=lambda: _trigger_open(f, "STOP_MARKET"))),
)


@dataclass
class SimReport:
    """What a simulation did and the invariants it ended with."""

    bars: int
    decisions: int
    sources: dict[str, int]
    first_source: str | None
    one_row_per_bar: bool
    faults: dict[str, int]  # queued, by label
    orders_on_exchange: int
    duplicate_client_ids: dict[str, int]
    exchange_trades: int
    position_matches: bool
    blocked_at_end: bool
    protected_at_end: bool = True
    events: dict[str, int] = field(default_factory=dict)
    crashes: dict[str, str] = field(default_factory=dict)
    secret_in_store: bool = False
    faults_never_met: int = 0  # queued faults still waiting for a request to their endpoint at the end

    @property
    def ok(self) -> bool:
        return (self.one_row_per_bar and not self.duplicate_client_ids and self.position_matches
                and not self.blocked_at_end and self.protected_at_end and not self.secret_in_store)


class SimClock:
    """Simulated time: a sleep moves the exchange's clock (the loop's wall clock reads it) and, at
    each new bar, may queue one seeded fault of :data:`FAULTS`."""

    def __init__(self, fake: FakeBinance, rng: np.random.Generator | None, fault_rate: float) -> None:
        self.fake, self.rng, self.fault_rate = fake, rng, float(fault_rate)
        self.t = 0.0
        self.faults: Counter[str] = Counter()

    def sleep(self, seconds: float) -> None:
        before = self.fake.now_ms // H
        self.t += max(0.0, float(seconds))
        self.fake.now_ms += round(max(0.0, float(seconds)) * 1000)
        if self.rng is not None and self.fake.now_ms // H != before and self.rng.random() < self.fault_rate:
            label, path, make = FAULTS[int(self.rng.integers(len(FAULTS)))]
            self.fake.add_fault(path, make(self.fake))
            self.faults[label] += 1

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.fake.now_ms / 1000.0


def real_market(first_bar: int = 0, n_bars: int = 2_400) -> tuple[pd.DataFrame, pd.Series]:
    """``n_bars`` bundled BTCUSDT 1h candles from row ``first_bar``, and the funding of that span."""
    candles = load_candles(bundled_candles_path()).iloc[first_bar:first_bar + n_bars]
    funding = load_funding(bundled_funding_path())
    return candles, funding[(funding.index >= candles.index[0]) & (funding.index <= candles.index[-1])]


def _report(fake: FakeBinance, store, bars: int, clock_faults: Counter[str], crashes: dict[str, str] | None = None
            ) -> SimReport:
    d = store.decisions("testnet")
    times = pd.DatetimeIndex(d["bar_open_time"]) if len(d) else pd.DatetimeIndex([])
    ns = times.as_unit("ns").asi8
    contiguous = bool(times.is_unique and (len(times) < 2 or (np.diff(ns) == H * 1_000_000).all()))
    amt, _ = fake.position()
    last = store.last_position(SYMBOL)
    stored = 0.0 if last is None else last.side * last.qty_base
    ev = store.events()
    stops = [a for a in fake.trading.algo_orders if a["algoStatus"] == "NEW" and a["orderType"] == "STOP_MARKET"]
    dump = " ".join(str(x) for x in ev["detail"]) + " ".join(str(x) for x in d.get("fallback_reason", []))
    return SimReport(
        bars=bars, decisions=len(d), sources=dict(Counter(d["source"])) if len(d) else {},
        first_source=None if not len(d) else str(d["source"].iloc[0]), one_row_per_bar=contiguous,
        faults=dict(clock_faults), orders_on_exchange=sum(fake.orders_by_client_id().values()),
        duplicate_client_ids={k: v for k, v in fake.orders_by_client_id().items() if v != 1},
        exchange_trades=len(fake.trading.trades), position_matches=abs(stored - amt) < 1e-9,
        blocked_at_end=store.position_blocked(SYMBOL), protected_at_end=amt == 0 or bool(stops),
        events=dict(Counter(ev["kind"])), crashes=crashes or {},
        secret_in_store=SIM_KEY in dump or SIM_SECRET in dump, faults_never_met=fake.pending_faults(),
    )  # fmt: skip


def sim_loop(bundle_dir: Path, fake: FakeBinance, clock: SimClock, store, *, reload_file: Path | None = None,
             **live_settings):
    """The loop of ``ats serve --mode testnet`` (:func:`ats_cli.serve_live.build_live_loop`) on ``fake``,
    with the real ccxt client, the default risk guard, ``store`` and ``clock``'s simulated time;
    ``reload_file``: the request file of ``ats serve reload`` (hot swap)."""
    from ats_cli.serve_live import build_live_loop
    from serving.exchange import BinanceFuturesBroker, make_client
    from serving.live import LiveConfig
    from serving.secrets import redact

    client = make_client(api_key=SIM_KEY, secret=SIM_SECRET, base_url=fake.url, timeout_ms=500, rate_limit=False)
    broker = BinanceFuturesBroker(client, "BTC/USDT:USDT", read_attempts=3, sleep=clock.sleep)
    return build_live_loop(mode="testnet", bundle_dir=bundle_dir, store=store, broker=broker,
                           live_config=LiveConfig(**live_settings), force_gate=True, use_guard=True,
                           reload_file=reload_file,
                           redact=lambda text: redact(text, (SIM_KEY, SIM_SECRET)), log=lambda _m: None,
                           wall_clock_s=clock.wall, monotonic_s=clock.monotonic, sleep=clock.sleep)


def sim_exchange(bars: int, *, first_bar: int = 30_000, start_offset_bars: int = 1_200,
                 query_lag_ms: int = 5_000) -> FakeBinance:
    """A :class:`FakeBinance` (not started) serving bundled candles from row ``first_bar``, its clock
    60 s into row ``first_bar + start_offset_bars`` (more than the 1,010-bar context before it)."""
    candles, funding = real_market(first_bar, start_offset_bars + bars + 50)
    now = int(candles.index[start_offset_bars].value // 1_000_000) + 60_000
    return FakeBinance(candles, funding, now_ms=now, query_lag_ms=query_lag_ms)


def run_fault_sim(bundle_dir: Path, db_path: Path, *, bars: int = 110, seed: int = 0, fault_rate: float = 0.5,
                  first_bar: int = 30_000, start_offset_bars: int = 1_200, query_lag_ms: int = 5_000) -> SimReport:
    """Serve ``bars`` bars on the testnet composition against the fake exchange (module docstring).

    The exchange serves bundled candles from row ``first_bar``; serving starts ``start_offset_bars``
    bars later (more than the 1,010-bar context, so the first bar can be decided) and 60 s into
    that bar. ``fault_rate``: probability of one fault per bar (0 = none).
    """
    from serving.store import StateStore

    with sim_exchange(bars, first_bar=first_bar, start_offset_bars=start_offset_bars,
                      query_lag_ms=query_lag_ms) as fake:
        clock = SimClock(fake, np.random.default_rng(seed) if fault_rate > 0 else None, fault_rate)
        store = StateStore.sqlite(db_path)
        sim_loop(bundle_dir, fake, clock, store).run(max_steps=bars, install_signal_handlers=False)
        return _report(fake, store, bars, clock.faults)


@dataclass
class ParityRun:
    """The same candles through the paper broker and through the live loop on the fake exchange (:func:`run_parity`).

    ``*_fills``: one row per fill, in order, columns ``bar_open_time`` (the bar in whose open or range it filled),
    ``side`` (+1 buy / -1 sell), ``qty_base``, ``price``, ``fee_usdt``, ``reason`` (the kernel's names: entry,
    exit_signal, stop, take_profit; live fills mapped from their client id's kind). ``*_equity``: equity (USDT)
    marked at each bar's close, by bar open time (paper: the broker's equity row; live: the fake exchange's wallet
    and position at that close, before the next open's funding). ``tick`` and ``step``: the symbol's. ``candles``:
    the candles both runs traded (after ``transform``).
    """

    paper_fills: pd.DataFrame
    live_fills: pd.DataFrame
    paper_equity: pd.Series
    live_equity: pd.Series
    tick: float
    step: float
    live_events: dict[str, int] = field(default_factory=dict)
    candles: pd.DataFrame | None = None


_KIND_REASON = {"entry": "entry", "exit": "exit_signal", "unprot": "exit_signal", "stop": "stop", "stopmv": "stop",
                "tp": "take_profit"}  # fmt: skip


def continuous(candles: pd.DataFrame) -> pd.DataFrame:
    """``candles`` with each open equal to the previous close (high and low widened to keep them consistent): the
    textbook candle, for which the close the live loop sizes an entry at is the open the kernel fills it at."""
    out = candles.copy()
    out.iloc[1:, out.columns.get_loc("open")] = out["close"].to_numpy()[:-1]
    out["high"] = np.maximum(out["high"], out["open"])
    out["low"] = np.minimum(out["low"], out["open"])
    return out


def run_parity(make_policy: Callable[[], object], *, costs, bars: int, first_bar: int = 30_000,
               start_offset_bars: int = 1_200, context_bars: int = 1_010, initial_equity_usdt: float = 10_000.0,
               query_lag_ms: int = 5_000, transform: Callable[[pd.DataFrame], pd.DataFrame] | None = None
               ) -> ParityRun:  # fmt: skip
    """Replay real BTCUSDT 1h candles through the paper broker (:func:`serving.loop.run_replay`) and serve the same
    candles with the live loop (:class:`serving.live.LiveLoop`, real ccxt client) on :class:`FakeBinance`, with
    the same policy (``make_policy()``, one instance each; flat fallback), from bar ``start_offset_bars`` for
    ``bars`` decisions (the first decided bar is the one before it, with ``context_bars`` of context).

    The fake fills where the kernel would (:class:`tests.kit.fake_binance.KernelFills` of ``costs``, with the ATR the
    paper run uses), charges the taker fee of ``costs`` and settles the fixture's funding, so what differs between
    the two runs is the serving path, not the fill model. ``transform``: applied to the candles first (e.g.
    :func:`continuous`).
    """
    from market.features import atr as atr_indicator
    from serving.candles import with_funding_column
    from serving.exchange import BinanceFuturesBroker, make_client
    from serving.live import LiveConfig, LiveLoop, atr_period_of
    from serving.loop import ServeConfig, run_replay
    from serving.store import StateStore
    from tests.kit.fake_binance import KernelFills

    candles, funding = real_market(first_bar, start_offset_bars + bars + 50)
    if transform is not None:
        candles = transform(candles)
    live_cfg = LiveConfig(context_bars=context_bars)
    atr = atr_indicator(candles, atr_period_of(make_policy(), live_cfg.atr_period_bars))  # type: ignore[arg-type]
    start, last = start_offset_bars, start_offset_bars + bars - 2  # first fill bar, last decided bar
    paper = candles.iloc[: last + 1]
    paper = with_funding_column(paper, [(int(t.value // 1_000_000), float(r)) for t, r in funding.items()], H)
    store = StateStore("sqlite://")
    run_replay(paper, primary=make_policy(), fallback=FlatPolicy(), atr=atr[: len(paper)], costs=costs,  # type: ignore[arg-type]
               store=store, config=ServeConfig(warmup_bars=start - 1, context_bars=context_bars,
                                               initial_equity_usdt=initial_equity_usdt))  # fmt: skip
    pf = store.fills("paper")[["bar_open_time", "side", "qty_base", "price", "fee_usdt", "reason"]]
    peq = store.equity("paper").set_index("bar_open_time")["equity_usdt"].iloc[1:]  # from the first fill bar
    closes: dict[pd.Timestamp, float] = {}

    def snapshot(open_ms: int, fake: FakeBinance) -> None:
        st = fake.trading
        close = float(candles["close"].loc[pd.Timestamp(open_ms, unit="ms", tz="UTC")])
        upnl = st.position_amt * (close - st.entry_price) if st.position_amt else 0.0
        closes[pd.Timestamp(open_ms, unit="ms", tz="UTC")] = st.wallet_usdt + upnl

    now = int(candles.index[start].value // 1_000_000) + 60_000
    kernel = KernelFills.from_costs(costs, pd.Series(atr, index=candles.index))
    fee = costs.taker_fee_bps / 1e4 * costs.cost_multiplier
    with FakeBinance(candles, funding, now_ms=now, wallet_usdt=initial_equity_usdt, fee_rate=fee,
                     query_lag_ms=query_lag_ms, kernel_fills=kernel, settle_funding=True) as fake:  # fmt: skip
        fake.bar_closed = snapshot
        clock = SimClock(fake, None, 0.0)
        client = make_client(api_key=SIM_KEY, secret=SIM_SECRET, base_url=fake.url, timeout_ms=2_000, rate_limit=False)
        broker = BinanceFuturesBroker(client, read_attempts=3, sleep=clock.sleep)
        live_store = StateStore("sqlite://")
        loop = LiveLoop(broker, live_store, live_cfg, primary=make_policy(), fallback=FlatPolicy(),  # type: ignore[arg-type]
                        wall_clock_s=clock.wall, monotonic_s=clock.monotonic, sleep=clock.sleep, costs=costs)  # fmt: skip
        loop.run(max_steps=bars, install_signal_handlers=False)
    lf = live_store.exchange_fills(SYMBOL)
    t_ms = pd.DatetimeIndex(lf["time"]).as_unit("ms").asi8
    live = pd.DataFrame({
        "bar_open_time": pd.to_datetime((t_ms - 1) // H * H, unit="ms", utc=True), "side": lf["side"].to_numpy(),
        "qty_base": lf["qty_base"].to_numpy(), "price": lf["price"].to_numpy(), "fee_usdt": lf["fee_usdt"].to_numpy(),
        "reason": [_KIND_REASON.get(str(c).rsplit("-", 1)[-1], "external") for c in lf["client_id"]],
    })  # fmt: skip
    last_bar = candles.index[last]
    live = live[live["bar_open_time"] <= last_bar].reset_index(drop=True)
    leq = pd.Series(closes).sort_index()
    leq = leq[(leq.index >= candles.index[start]) & (leq.index <= last_bar)]
    ev = live_store.events("live")
    return ParityRun(pf.reset_index(drop=True), live, peq[peq.index <= last_bar], leq,
                     costs.instrument.tick_size_usdt, costs.instrument.lot_step_base, dict(Counter(ev["kind"])), candles)


class FlatPolicy(StatelessPolicy):
    """A policy that always decides flat (the fallback of :func:`run_parity`; never asked there)."""

    name = "v1"

    def decide(self, ctx: DecisionContext) -> Decision:
        return Decision.flat()


CHILD = """
import sys
import time
from pathlib import Path
from ats_cli.serve_live import build_live_loop
from serving.crash import KillAt
from serving.errors import AmbiguousOutcomeError, RetryableError
from serving.exchange import BinanceFuturesBroker, make_client
from serving.live import LiveConfig
from serving.store import StateStore

url, db, bundle, crash = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
client = make_client(api_key="SIM_KEY", secret="SIM_SECRET", base_url=url, timeout_ms=3000, rate_limit=False)
broker = BinanceFuturesBroker(client, "BTC/USDT:USDT", read_attempts=3, sleep=lambda s: None)
loop = build_live_loop(mode="testnet", bundle_dir=bundle, store=StateStore.sqlite(db), broker=broker,
                       live_config=LiveConfig(create_settle_s=0.0), force_gate=True, use_guard=True, log=lambda m: None,
                       wall_clock_s=lambda: client.fetch_time() / 1000.0,
                       crash_points=KillAt.parse(crash) if crash else None)
for attempt in range(30):  # the bar of the exchange's clock (which stands still here), resumed until done
    try:
        print("done", loop.step().bar_open_time)
        break
    except (RetryableError, AmbiguousOutcomeError) as exc:
        print("retry", exc)
        time.sleep(0.05)
""".replace("SIM_KEY", SIM_KEY).replace("SIM_SECRET", SIM_SECRET)


def _child(url: str, db: Path, bundle: Path, crash: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", CHILD, url, str(db), str(bundle), crash or ""], cwd=REPO, env=env,
                          check=False, capture_output=True, text=True, timeout=300)


def run_crash_sweep(bundle_dir: Path, workdir: Path, *, bars: int = 6, first_bar: int = 30_000,
                    start_offset_bars: int = 1_200, points: Sequence[str] | None = None) -> dict[str, SimReport]:
    """For each crash point (``points``, default all of :data:`serving.crash.CRASH_POINTS`): serve ``bars`` bars in child processes (one per bar), the child killed
    with SIGKILL at the point (first pass; repeated until it fires) and restarted on the same bar;
    returns a report per point (``crashes``: bar -> 'killed' / 'restarted'). The child steps the bar
    of the exchange's clock once (retried on retryable errors) and exits; the clock moves between
    children. A point the bundle's decisions never pass (no order sent) is not in ``crashes``."""
    from serving.crash import CRASH_POINTS
    from serving.store import StateStore

    out: dict[str, SimReport] = {}
    candles, funding = real_market(first_bar, start_offset_bars + bars + 50)
    for point in CRASH_POINTS if points is None else points:
        now = int(candles.index[start_offset_bars].value // 1_000_000) + 60_000
        db = workdir / f"crash_{point}.sqlite"
        crashes: dict[str, str] = {}
        with FakeBinance(candles, funding, now_ms=now) as fake:
            fired = False
            for k in range(bars):
                if k:
                    fake.now_ms += H  # the next bar closes (its stops and take-profits trigger)
                bar = str(pd.Timestamp((fake.now_ms // H - 1) * H, unit="ms", tz="UTC"))
                proc = _child(fake.url, db, bundle_dir, None if fired else point)
                if proc.returncode == -9:
                    fired, crashes[bar] = True, "killed"
                    proc = _child(fake.url, db, bundle_dir, None)
                    crashes[bar] += "; restarted: " + ("ok" if proc.returncode == 0 else proc.stderr[-300:])
                elif proc.returncode != 0:
                    crashes[bar] = "child failed: " + proc.stderr[-300:]
            out[point] = _report(fake, StateStore.sqlite(db), bars, Counter(), crashes)
    return out


def main() -> None:  # pragma: no cover - a manual sweep for closing notes
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--bars", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--crash-bars", type=int, default=6)
    parser.add_argument("--crash-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(0 if args.crash_only else args.seeds):
            rep = run_fault_sim(args.bundle, Path(tmp) / f"faults_{seed}.sqlite", bars=args.bars, seed=seed)
            print(json.dumps({"run": f"faults seed {seed}", "ok": rep.ok, **asdict(rep)}, default=str))
        for point, rep in run_crash_sweep(args.bundle, Path(tmp), bars=args.crash_bars).items():
            print(json.dumps({"run": f"crash {point}", "ok": rep.ok, **asdict(rep)}, default=str))


if __name__ == "__main__":
    main()
