"""The local fake Binance serving several symbols (issue 19, 6): market data, orders, conditional orders,
positions, funding and faults per symbol, through the real ccxt client (:class:`serving.exchange.BinanceFuturesBroker`
with one client shared by the symbols' brokers, as ``ats serve --symbols`` runs them)."""

from __future__ import annotations

import pandas as pd
import pytest

from serving.errors import FatalError, MalformedResponseError, RejectedError
from serving.exchange import BinanceFuturesBroker, make_client
from serving.intents import OrderIntent, client_order_id
from tests.kit.candles import make_candles
from tests.kit.fake_binance import ALGO_ORDER, KLINES, FakeBinance, Fault

H = 3_600_000
BTC = make_candles(200, seed=1)
ETH = make_candles(200, seed=2, start_price=2_000.0)
T0 = int(BTC.index[100].value // 1_000_000) + 60_000  # one minute into bar 100
BAR = BTC.index[99]


def _fake(**kw) -> FakeBinance:
    return FakeBinance({"BTCUSDT": BTC, "ETHUSDT": ETH},
                       {"BTCUSDT": BTC["funding_rate"].dropna(), "ETHUSDT": ETH["funding_rate"].dropna()},
                       now_ms=T0, **kw)


@pytest.fixture
def fake():
    with _fake() as server:
        yield server


def _brokers(fake: FakeBinance, attempts: int = 1) -> dict[str, BinanceFuturesBroker]:
    client = make_client(api_key="k", secret="s", base_url=fake.url, timeout_ms=2_000, rate_limit=False)
    out = {}
    for sym, unified in (("BTCUSDT", "BTC/USDT:USDT"), ("ETHUSDT", "ETH/USDT:USDT")):
        out[sym] = BinanceFuturesBroker(client, unified, read_attempts=attempts, sleep=lambda s: None)
        out[sym].load()
    return out


def _intent(sym: str, kind: str, side: str, qty: float | None, otype: str = "market", trigger: float | None = None,
            bar: pd.Timestamp = BAR) -> OrderIntent:
    return OrderIntent(client_order_id(sym, bar, kind), kind, sym, bar, side, otype, qty, trigger,
                       kind in ("stop", "tp"), kind in ("stop", "tp"))


def test_each_symbol_has_its_own_candles_funding_and_rules(fake):
    b = _brokers(fake)
    assert b["ETHUSDT"].rules.tick_size_usdt == 0.01 and b["BTCUSDT"].rules.tick_size_usdt == 0.1
    assert b["ETHUSDT"].rules.min_notional_usdt == 5.0 and b["BTCUSDT"].rules.min_notional_usdt == 100.0
    for sym, frame in (("BTCUSDT", BTC), ("ETHUSDT", ETH)):
        rows = b[sym].fetch_ohlcv("1h", int(BTC.index[90].value // 1_000_000), 5)
        assert [float(r[1]) for r in rows] == pytest.approx(frame["open"].iloc[90:95].tolist())
        funding = b[sym].fetch_funding(int(BTC.index[0].value // 1_000_000))
        expected = frame["funding_rate"].dropna()
        expected = expected[expected.index <= pd.Timestamp(T0, unit="ms", tz="UTC")]
        assert [r for _, r in funding] == pytest.approx(expected.tolist())
    # the still-open bar is served partial for each symbol
    last = b["ETHUSDT"].fetch_ohlcv("1h", int(BTC.index[100].value // 1_000_000), 5)
    assert len(last) == 1 and float(last[0][4]) == float(ETH["open"].iloc[100])
    # a symbol the fake does not serve is refused (not answered with another's candles)
    with pytest.raises(Exception, match=r"-1121|Invalid symbol"):
        b["BTCUSDT"].client.fetch_ohlcv("XRP/USDT:USDT", "1h", None, 5)


def test_orders_positions_and_protection_are_per_symbol_on_one_account(fake):
    b = _brokers(fake)
    b["BTCUSDT"].create(_intent("BTCUSDT", "entry", "buy", 0.2))
    b["ETHUSDT"].create(_intent("ETHUSDT", "entry", "sell", 3.0))
    btc_open, eth_open = float(BTC["open"].iloc[100]), float(ETH["open"].iloc[100])
    assert fake.position("BTCUSDT") == (pytest.approx(0.2), pytest.approx(btc_open))
    assert fake.position("ETHUSDT") == (pytest.approx(-3.0), pytest.approx(eth_open))
    assert fake.position() == fake.position("BTCUSDT")  # the primary
    assert b["BTCUSDT"].position().qty_base == pytest.approx(0.2) and b["ETHUSDT"].position().side == -1
    # the entry's trades and orders are listed under their symbol only
    assert {f.side for f in b["ETHUSDT"].fills_since(None)} == {-1}
    assert {f.side for f in b["BTCUSDT"].fills_since(None)} == {1}
    # an ETH stop above its price, on its own tick (0.01, finer than BTC's 0.1): accepted
    stop = round(eth_open * 1.5, 2) + 0.01
    b["ETHUSDT"].create(_intent("ETHUSDT", "stop", "buy", None, "stop_market", stop))
    assert float(fake.trading.algo_orders[-1]["triggerPrice"]) == pytest.approx(stop)
    assert [o.client_id for o in b["ETHUSDT"].open_orders()] == [client_order_id("ETHUSDT", BAR, "stop")]
    assert b["BTCUSDT"].open_orders() == []
    assert b["BTCUSDT"].lookup(client_order_id("ETHUSDT", BAR, "stop"), conditional=True) is None
    # an ETH entry below ETH's minimum notional (5 USDT) is refused, one above it (but below BTC's 100) accepted
    with pytest.raises(RejectedError):
        b["ETHUSDT"].create(_intent("ETHUSDT", "entry", "sell", 0.001, bar=BTC.index[98]))
    b["ETHUSDT"].create(_intent("ETHUSDT", "entry", "sell", 0.01, bar=BTC.index[97]))
    # one account: the wallet pays both symbols' fees, equity marks both positions
    fees = 0.0004 * (0.2 * btc_open + 3.01 * eth_open)
    assert b["BTCUSDT"].balance().wallet_usdt == pytest.approx(10_000.0 - fees)
    assert b["ETHUSDT"].equity_usdt() == b["BTCUSDT"].equity_usdt()


def test_a_symbols_stop_triggers_on_its_own_candles_only(fake):
    b = _brokers(fake)
    b["BTCUSDT"].create(_intent("BTCUSDT", "entry", "buy", 0.2))
    b["ETHUSDT"].create(_intent("ETHUSDT", "entry", "buy", 3.0))
    eth_low = float(ETH["low"].iloc[100])
    eth_stop = round(eth_low + 0.01, 2)  # touched by ETH's bar 100
    btc_stop = round(float(BTC["low"].iloc[100:110].min()) - 1000.0, 1)  # never touched
    b["ETHUSDT"].create(_intent("ETHUSDT", "stop", "sell", None, "stop_market", eth_stop))
    b["BTCUSDT"].create(_intent("BTCUSDT", "stop", "sell", None, "stop_market", btc_stop))
    fake.now_ms += H
    assert fake.position("ETHUSDT")[0] == 0.0 and fake.position("BTCUSDT")[0] == pytest.approx(0.2)
    stops = {a["symbol"]: a["algoStatus"] for a in fake.trading.algo_orders}
    assert stops == {"ETHUSDT": "FINISHED", "BTCUSDT": "NEW"}
    closing = [f for f in b["ETHUSDT"].fills_since(None) if f.side == -1]
    assert len(closing) == 1 and closing[0].price == pytest.approx(eth_stop)


def test_funding_is_settled_per_symbol():
    with _fake(settle_funding=True) as fake:
        b = _brokers(fake)
        b["BTCUSDT"].create(_intent("BTCUSDT", "entry", "buy", 0.2))
        b["ETHUSDT"].create(_intent("ETHUSDT", "entry", "sell", 3.0))
        fake.now_ms += 24 * H
        for sym, frame, amt in (("BTCUSDT", BTC, 0.2), ("ETHUSDT", ETH, -3.0)):
            paid = fake.funding_by_symbol[sym]
            assert len(paid) == 3
            for at_ms, qty, price, rate, payment in paid:
                t = pd.Timestamp(at_ms, unit="ms", tz="UTC")
                assert qty == pytest.approx(amt) and price == float(frame["open"].loc[t])
                assert rate == float(frame["funding_rate"].loc[t]) and payment == pytest.approx(amt * price * rate)
        assert len(fake.funding_payments) == 6


def test_faults_lag_and_malformed_answers_hit_the_symbol_they_name(fake):
    b = _brokers(fake)
    fake.add_fault(KLINES, Fault("json_5xx"), symbol="ETHUSDT")
    since = int(BTC.index[90].value // 1_000_000)
    assert len(b["BTCUSDT"].fetch_ohlcv("1h", since, 5)) == 5  # BTC's request does not meet ETH's fault
    with pytest.raises(Exception, match=r"-1000|OperationFailed|unknown error"):
        b["ETHUSDT"].fetch_ohlcv("1h", since, 5)
    assert fake.pending_faults() == 0
    # a path-wide fault meets the next request whatever its symbol
    fake.add_fault("/fapi/v3/positionRisk", Fault("truncated_json"))
    fake.add_fault("/fapi/v2/positionRisk", Fault("truncated_json"))
    with pytest.raises(MalformedResponseError):
        b["ETHUSDT"].position()
    # the klines cap is per request and per symbol alike
    rows = b["ETHUSDT"].client.fapiPublicGetKlines({"symbol": "ETHUSDT", "interval": "1h", "limit": 5000})
    assert len(rows) == 101
    # query lag: an ETH order is invisible to lookups until the lag has passed, for every symbol
    fake.query_lag_ms = 30_000
    b["ETHUSDT"].create(_intent("ETHUSDT", "entry", "buy", 1.0))
    assert b["ETHUSDT"].lookup(client_order_id("ETHUSDT", BAR, "entry"), conditional=False) is None
    fake.now_ms += 30_000
    assert b["ETHUSDT"].lookup(client_order_id("ETHUSDT", BAR, "entry"), conditional=False) is not None
    # a conditional order of ETH that fails for ETH only
    fake.add_fault(f"POST {ALGO_ORDER}", Fault("auth_error"), symbol="ETHUSDT")
    with pytest.raises(FatalError):
        b["ETHUSDT"].create(_intent("ETHUSDT", "stop", "sell", None, "stop_market", round(float(ETH["low"].min()) / 2, 2)))


def test_mapping_must_name_the_same_symbols():
    with pytest.raises(ValueError, match="funding must be given"):
        FakeBinance({"BTCUSDT": BTC, "ETHUSDT": ETH}, {"BTCUSDT": BTC["funding_rate"].dropna()}, now_ms=T0)
    with pytest.raises(ValueError, match="without a market"):
        FakeBinance({"DOGEUSDT": BTC}, {"DOGEUSDT": BTC["funding_rate"].dropna()}, now_ms=T0)
