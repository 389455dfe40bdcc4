"""One contract, two venues: the same scenarios on the paper broker and on the ccxt broker (the local fake Binance).

Every scenario runs on real bundled BTCUSDT 1h candles, 1,010 bars into the fixture (the demo bundle's context),
through :class:`serving.broker.Broker` only. The venues move bar by bar alike (:class:`Venue`): orders placed
in bar k's slot fill at bar k's open (the paper broker in ``open_bar``; the fake at once, its clock one minute into
bar k), stops and take-profits act on bar k's range when the venue moves on (paper ``close_bar``; the fake when
its clock passes the bar's close). The fake fills at the env kernel's prices (:class:`tests.kit.fake_binance.
KernelFills`) and charges the cost model's taker fee, so the expected prices below are the kernel's (open or level,
adverse slippage ``(1 bp + 0.05 x ATR / open)``, rounded to the tick against the trader), computed here by hand.

Both venues settle funding (the fake with ``settle_funding``); scenario bars are chosen so that no settlement
falls inside them: equity after a round trip is start - fees +- price PnL exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import pandas as pd
import pytest

from envs.accounting import Bar, is_funding_time
from envs.config import CostConfig
from envs.sizing import exchange_leverage, protective_prices, round_to_tick
from market.decision import Decision
from market.features import atr as atr_indicator
from serving.broker import Broker, ExchangeBroker, TradeFill
from serving.errors import RejectedError
from serving.exchange import BinanceFuturesBroker, make_client
from serving.intents import OrderIntent, client_order_id
from serving.paper import PaperBroker
from tests.kit.exchange_sim import real_market
from tests.kit.fake_binance import FakeBinance, KernelFills

H = 3_600_000
CONTEXT = 1_010  # the demo bundle's context: bars before the first scenario bar
COSTS = CostConfig()
FEE = COSTS.taker_fee_bps / 1e4
TICK = COSTS.instrument.tick_size_usdt
EQUITY = 10_000.0
CANDLES, FUNDING = real_market(30_000, CONTEXT + 200)
ATR = atr_indicator(CANDLES, 14)
SYMBOL = "BTCUSDT"


def _quiet_bar(need_range_ticks: float = 60.0) -> int:
    """First bar after the context opening 1-4 h after a funding time (no settlement in the next 3 bars) whose
    low and high both lie ``need_range_ticks`` ticks or more from its open (a stop inside the bar on either side)."""
    for k in range(CONTEXT, len(CANDLES) - 4):
        row = CANDLES.iloc[k]
        hour = CANDLES.index[k].hour % 8
        if 1 <= hour <= 4 and min(row.open - row.low, row.high - row.open) >= need_range_ticks * TICK:
            return k
    raise AssertionError("no quiet bar in the fixture")


K = _quiet_bar()


def _bar(k: int) -> Bar:
    ns = int(CANDLES.index[k].value)
    row = CANDLES.iloc[k]
    rate = float(FUNDING.get(CANDLES.index[k], np.nan))
    return Bar(ns, float(row.open), float(row.high), float(row.low), float(row.close), rate, is_funding_time(ns, 8))


def kernel_price(k: int, ref: float, trade_side: int) -> float:
    """The kernel's fill of ``trade_side`` in bar ``k`` at ``ref`` (by hand: the formula of ``envs.accounting``)."""
    o = float(CANDLES["open"].iloc[k])
    slip = (COSTS.slippage_bps / 1e4 + COSTS.slippage_atr_coef * float(ATR[k - 1]) / o) * COSTS.cost_multiplier
    return round_to_tick(ref * (1 + trade_side * slip), TICK, trade_side)


class Venue(Protocol):
    """A broker and how to move its clock: orders placed now fill at the open of bar ``k``; :meth:`open` makes
    that open happen (a no-op on the exchange, whose market orders fill at once), :meth:`close` runs bar ``k``'s
    range and moves to bar ``k + 1``."""

    name: str
    broker: Broker
    k: int

    def open(self) -> None: ...

    def close(self) -> None: ...


class PaperVenue:
    name = "paper"

    def __init__(self, k: int) -> None:
        self.broker = PaperBroker(EQUITY, COSTS)
        self.broker.open_bar(_bar(k - 1), float(ATR[k - 2]))  # the venue has seen bar k - 1: it has a price
        self.broker.close_bar()
        self.k, self._opened = k, False

    def open(self) -> None:
        self.broker.open_bar(_bar(self.k), float(ATR[self.k - 1]))
        self._opened = True

    def close(self) -> None:
        if not self._opened:
            self.open()
        self.broker.close_bar()
        self.k, self._opened = self.k + 1, False


class ExchangeVenue:
    name = "exchange"

    def __init__(self, fake: FakeBinance, k: int) -> None:
        self.fake, self.k = fake, k
        client = make_client(api_key="k", secret="s", base_url=fake.url, timeout_ms=3_000, rate_limit=False)
        broker = BinanceFuturesBroker(client, read_attempts=2, sleep=lambda _s: None)
        broker.load()
        broker.set_isolated_margin()
        self.broker = broker

    def open(self) -> None:
        pass

    def close(self) -> None:
        self.fake.now_ms += H  # bar k closes (its stops and take-profits trigger); one minute into bar k + 1
        self.k += 1


def _fake(k: int) -> FakeBinance:
    atr = pd.Series(ATR, index=CANDLES.index)
    return FakeBinance(CANDLES, FUNDING, now_ms=int(CANDLES.index[k].value // 1_000_000) + 60_000,
                       wallet_usdt=EQUITY, fee_rate=FEE, kernel_fills=KernelFills.from_costs(COSTS, atr), settle_funding=True)


@pytest.fixture(params=["paper", "exchange"])
def venue_at(request) -> Iterator:
    """``venue_at(k)``: a fresh venue of the parameter's kind, flat with 10,000 USDT, orders filling at bar k's open."""
    fakes: list[FakeBinance] = []

    def make(k: int = K) -> Venue:
        if request.param == "paper":
            return PaperVenue(k)
        fake = _fake(k).__enter__()
        fakes.append(fake)
        return ExchangeVenue(fake, k)

    yield make
    for fake in fakes:
        fake.__exit__(None, None, None)


def _order(kind: str, side: str, qty: float | None, *, k: int = K, trigger: float | None = None,
           order_type: str = "market", reduce_only: bool = False) -> OrderIntent:  # fmt: skip
    bar = CANDLES.index[k - 1]  # decided at the close of the bar before
    conditional = order_type != "market"
    return OrderIntent(client_order_id(SYMBOL, bar, kind), kind, SYMBOL, bar, side, order_type, qty, trigger,
                       reduce_only or conditional, conditional)  # fmt: skip


def _enter(venue: Venue, side: int, qty: float = 0.05, leverage: int = 3) -> TradeFill:
    venue.broker.set_leverage(leverage)
    venue.broker.create(_order("entry", "buy" if side > 0 else "sell", qty, k=venue.k))
    venue.open()
    (fill,) = venue.broker.fills_since(None)
    return fill


def test_both_brokers_are_brokers_and_the_exchange_is_an_exchange_broker(venue_at):
    venue = venue_at()
    assert isinstance(venue.broker, Broker)
    assert isinstance(venue.broker, ExchangeBroker) == (venue.name == "exchange")
    r = venue.broker.rules
    assert (venue.broker.market_id, r.tick_size_usdt, r.step_size_base, r.min_notional_usdt) == (SYMBOL, 0.1, 0.001,
                                                                                                  100.0)  # fmt: skip


@pytest.mark.parametrize("side", [1, -1], ids=["long", "short"])
def test_market_entry_fills_at_the_open_with_price_quantity_and_fee(venue_at, side):
    venue = venue_at()
    fill = _enter(venue, side, qty=0.05)
    price = kernel_price(K, float(CANDLES["open"].iloc[K]), side)
    assert (fill.side, fill.qty_base, fill.price) == (side, 0.05, price)
    assert fill.fee_usdt == pytest.approx(0.05 * price * FEE, rel=1e-12)
    assert fill.realized_pnl_usdt == 0.0
    snap = venue.broker.lookup(_order("entry", "buy", 0.05).client_id, conditional=False)
    assert snap is not None and (snap.status, snap.filled_base, snap.average_price) == ("closed", 0.05, price)
    assert snap.exchange_id == fill.exchange_order_id
    pos = venue.broker.position()
    assert (pos.side, pos.qty_base, pos.entry_price) == (side, 0.05, price)
    bal = venue.broker.balance()
    assert bal.wallet_usdt == pytest.approx(EQUITY - fill.fee_usdt, abs=1e-9)
    mark = float(CANDLES["open"].iloc[K])  # both venues mark at the bar's open until it closes
    assert bal.unrealized_pnl_usdt == pytest.approx(side * 0.05 * (mark - price), abs=1e-9)
    assert bal.equity_usdt == pytest.approx(bal.wallet_usdt + bal.unrealized_pnl_usdt, abs=1e-9)


@pytest.mark.parametrize("side", [1, -1], ids=["long", "short"])
def test_stop_and_take_profit_rest_at_tick_rounded_prices(venue_at, side):
    venue = venue_at()
    fill = _enter(venue, side)
    atr = float(ATR[K - 1])
    stop, tp = protective_prices(side, fill.price, atr, 2.0, 3.0, TICK)  # the one rule: nearest tick
    closing = "sell" if side > 0 else "buy"
    venue.broker.create(_order("stop", closing, None, trigger=stop, order_type="stop_market"))
    untidy = tp + side * 0.0437  # off the tick: the venue rounds it to the nearest tick, as ccxt does
    snap = venue.broker.create(_order("tp", closing, None, trigger=untidy, order_type="take_profit_market"))
    assert snap.conditional and snap.status == "open"
    resting = {o.order_type: o.trigger_price for o in venue.broker.open_orders() if o.conditional}
    assert resting == {"stop_market": stop, "take_profit_market": round_to_tick(untidy, TICK, 0)}
    for price in resting.values():
        assert price == pytest.approx(round(price / TICK) * TICK, abs=1e-9)


@pytest.mark.parametrize("side", [1, -1], ids=["long", "short"])
def test_stop_triggers_on_a_bar_through_it_and_the_position_is_flat_with_a_fill(venue_at, side):
    venue = venue_at()
    entry = _enter(venue, side)
    row = CANDLES.iloc[K]
    level = round_to_tick((row.open + (row.low if side > 0 else row.high)) / 2, TICK, 0)  # inside bar K's range
    closing = "sell" if side > 0 else "buy"
    stop = _order("stop", closing, None, trigger=level, order_type="stop_market")
    venue.broker.create(stop)
    venue.close()  # bar K's range crosses the stop
    (fill,) = venue.broker.fills_since(entry.trade_id)
    price = kernel_price(K, level, -side)
    assert (fill.side, fill.qty_base, fill.price) == (-side, entry.qty_base, price)
    assert fill.fee_usdt == pytest.approx(entry.qty_base * price * FEE, rel=1e-12)
    assert fill.realized_pnl_usdt == pytest.approx(side * entry.qty_base * (price - entry.price), abs=1e-9)
    assert venue.broker.position().side == 0
    snap = venue.broker.lookup(stop.client_id, conditional=True)
    assert snap is not None and snap.actual_order_id == fill.exchange_order_id
    assert not any(o.order_type == "stop_market" for o in venue.broker.open_orders())


def test_cancel_of_protection_leaves_the_position_unprotected(venue_at):
    venue = venue_at()
    entry = _enter(venue, 1)
    row = CANDLES.iloc[K]
    level = round_to_tick((row.open + row.low) / 2, TICK, 0)
    stop = _order("stop", "sell", None, trigger=level, order_type="stop_market")
    tp = _order("tp", "sell", None, trigger=round_to_tick(row.high + 500 * TICK, TICK, 0),
                order_type="take_profit_market")  # fmt: skip
    venue.broker.create(stop)
    venue.broker.create(tp)
    cancelled = venue.broker.cancel(stop.client_id, conditional=True)
    assert cancelled is not None and cancelled.status == "canceled" and cancelled.client_id == stop.client_id
    assert venue.broker.cancel(stop.client_id, conditional=True) is None  # no longer open
    assert [o.client_id for o in venue.broker.open_orders()] == [tp.client_id]
    venue.close()  # bar K's range crosses the cancelled stop: nothing happens
    assert venue.broker.fills_since(entry.trade_id) == []
    assert venue.broker.position().qty_base == entry.qty_base
    snap = venue.broker.lookup(stop.client_id, conditional=True)
    assert snap is not None and snap.status == "canceled"


def test_an_order_below_the_min_notional_is_refused(venue_at):
    venue = venue_at()
    venue.broker.set_leverage(3)
    with pytest.raises(RejectedError):
        venue.broker.create(_order("entry", "buy", 0.003))  # ~ 80 USDT < 100 USDT
    venue.open()
    assert venue.broker.fills_since(None) == [] and venue.broker.open_orders() == []
    assert venue.broker.position().side == 0 and venue.broker.balance().wallet_usdt == EQUITY


def test_the_quantity_is_truncated_to_the_step(venue_at):
    venue = venue_at()
    fill = _enter(venue, 1, qty=0.0529)  # 52.9 lots -> 52 (ccxt amount_to_precision truncates)
    assert fill.qty_base == 0.052
    assert venue.broker.position().qty_base == 0.052


@pytest.mark.parametrize("side", [1, -1], ids=["long", "short"])
def test_equity_after_a_round_trip_is_start_minus_fees_plus_price_pnl(venue_at, side):
    venue = venue_at()
    entry = _enter(venue, side, qty=0.2, leverage=5)
    venue.close()
    venue.broker.create(_order("exit", "sell" if side > 0 else "buy", 0.2, k=venue.k, reduce_only=True))
    venue.open()
    (exit_,) = venue.broker.fills_since(entry.trade_id)
    assert exit_.price == kernel_price(K + 1, float(CANDLES["open"].iloc[K + 1]), -side)
    pnl = side * 0.2 * (exit_.price - entry.price)
    fees = 0.2 * entry.price * FEE + 0.2 * exit_.price * FEE
    assert exit_.realized_pnl_usdt == pytest.approx(pnl, abs=1e-9)
    bal = venue.broker.balance()
    assert bal.wallet_usdt == pytest.approx(EQUITY - fees + pnl, abs=1e-9)
    assert bal.equity_usdt == pytest.approx(bal.wallet_usdt, abs=1e-12) and bal.unrealized_pnl_usdt == 0.0
    assert venue.broker.position().side == 0


def test_a_reduce_only_order_without_a_position_is_refused(venue_at):
    venue = venue_at()
    with pytest.raises(RejectedError):
        venue.broker.create(_order("exit", "sell", 0.05, reduce_only=True))


def test_the_two_venues_give_the_same_trades_for_the_same_orders():
    """Entries, stops and take-profits over 40 bars (funding settled): the same orders on both venues give the same
    trades and the same wallet."""
    paper = PaperVenue(K)
    with _fake(K) as fake:
        exchange = ExchangeVenue(fake, K)
        out = []
        for venue in (paper, exchange):
            side = 1
            for _ in range(40):
                b = venue.broker
                pos = b.position()
                if pos.side == 0:
                    for o in b.open_orders():  # orphans of a stop or take-profit that closed the position
                        b.cancel(o.client_id, conditional=o.conditional)
                    b.set_leverage(4)
                    b.create(_order("entry", "buy" if side > 0 else "sell", 0.25, k=venue.k))
                    venue.open()
                    p = b.position()
                    if p.side != 0:
                        stop, tp = protective_prices(p.side, p.entry_price, float(ATR[venue.k - 1]), 0.8, 1.2, TICK)
                        closing = "sell" if p.side > 0 else "buy"
                        for kind, otype, lvl in (("stop", "stop_market", stop), ("tp", "take_profit_market", tp)):
                            b.create(_order(kind, closing, None, k=venue.k, trigger=lvl, order_type=otype))
                    side = -side
                venue.close()
            out.append([(t.side, t.qty_base, t.price, round(t.fee_usdt, 9), round(t.realized_pnl_usdt, 9))
                        for t in venue.broker.fills_since(None)])  # fmt: skip
        assert len(out[0]) >= 20 and out[0] == out[1]
        assert paper.broker.balance().wallet_usdt == pytest.approx(exchange.broker.balance().wallet_usdt, abs=1e-6)


def test_paper_venue_halves_equal_one_kernel_step_per_bar():
    """The order venue is the kernel: over 380 bars of random decisions (flips, holds, flats; funding included),
    orders (exit, entry of the kernel's quantity, then the kernel's stop and take-profit placed after the fill)
    through open_bar / close_bar give the same fills and the same account as one step_bar per bar."""
    rng = np.random.default_rng(7)
    ref, ven = PaperBroker(EQUITY, COSTS), PaperBroker(EQUITY, COSTS)
    n_fills = n_stops = 0
    for k in range(CONTEXT, CONTEXT + 180):
        held = ref.state.side
        if rng.random() < 0.35:
            d = Decision(direction=int(rng.integers(-1, 2)), leverage=float(rng.integers(1, 6)),
                         size_frac=float(rng.uniform(0.1, 0.9)), stop_atr=float(rng.uniform(0.5, 3.0)),
                         take_profit_atr=float(rng.uniform(0.5, 4.0)))  # fmt: skip
        else:
            d = Decision(direction=held) if held else Decision.flat()
        atr, bar = float(ATR[k - 1]), _bar(k)
        ref.submit(d, atr)
        result = ref.on_bar(bar)
        if d.direction != held and held != 0:  # as the live executor: cancel the protection, then exit
            for o in ven.open_orders():
                ven.cancel(o.client_id, conditional=o.conditional)
            ven.create(_order("exit", "sell" if held > 0 else "buy", ven.position().qty_base, k=k, reduce_only=True))
        entry = [f for f in result.fills if f.reason == "entry"]
        if entry:
            ven.set_leverage(exchange_leverage(d.leverage))
            ven.create(_order("entry", "buy" if d.direction > 0 else "sell", entry[0].qty_base, k=k))
        trades = ven.open_bar(bar, atr)
        if entry:
            stop, tp = protective_prices(d.direction, entry[0].price, atr, d.stop_atr, d.take_profit_atr, TICK)
            closing = "sell" if d.direction > 0 else "buy"
            ven.create(_order("stop", closing, None, k=k, trigger=stop, order_type="stop_market"))
            ven.create(_order("tp", closing, None, k=k, trigger=tp, order_type="take_profit_market"))
        trades += ven.close_bar()
        assert [(t.side, t.qty_base, t.price, t.fee_usdt) for t in trades] == [
            (f.side, f.qty_base, f.price, f.fee_usdt) for f in result.fills]
        assert ven.state == ref.state and ven.equity_usdt == result.equity_usdt
        n_fills += len(trades)
        n_stops += sum(f.reason in ("stop", "take_profit") for f in result.fills)
        if ven.position().side == 0:
            for o in ven.open_orders():
                ven.cancel(o.client_id, conditional=o.conditional)
    assert n_fills >= 40 and n_stops >= 5 and ref.state.funding_paid_usdt != 0.0


def test_paper_decisions_follow_the_trading_rules_of_the_bundle_env():
    """``trading_rules`` reach step_bar (min hold) and the decision interval (a decision off a decision bar is
    not read), as in the env."""
    from envs.config import TradingRulesConfig

    long = Decision(direction=1, leverage=2.0, size_frac=0.3, stop_atr=50.0, take_profit_atr=50.0)
    rules = TradingRulesConfig(decision_interval_bars=4, min_hold_bars=3)
    with pytest.raises(ValueError, match="bar_interval_ns"):
        PaperBroker(EQUITY, COSTS, trading_rules=rules)
    broker = PaperBroker(EQUITY, COSTS, trading_rules=rules, bar_interval_ns=H * 1_000_000)
    sides, read = [], []
    for k in range(CONTEXT, CONTEXT + 12):
        bar = _bar(k)
        read.append(broker.reads_decision(bar))
        broker.on_bar(bar)
        sides.append(broker.state.side)
        flip = Decision.flat() if broker.state.side else long  # asks to trade every bar
        broker.submit(flip, float(ATR[k]))
    decision_bars = [int(CANDLES.index[k].value) % (4 * H * 1_000_000) == 0 for k in range(CONTEXT, CONTEXT + 12)]
    assert read == decision_bars
    changes = [k for k in range(1, 12) if sides[k] != sides[k - 1]]
    assert changes and all(read[k] for k in changes)  # the side changes only at decision bars
    held = [b - a for a, b in itertools.pairwise(changes) if sides[a] != 0]
    assert all(h >= 3 for h in held)  # min hold: a position lives 3 bars at least
