"""BinanceFuturesBroker: the real ccxt client against the local fake Binance USDⓈ-M server."""

from __future__ import annotations

import ccxt
import pandas as pd
import pytest

from market.decision import Decision
from serving.errors import AmbiguousOutcomeError, FatalError, RejectedError, RetryableError
from serving.exchange import BinanceFuturesBroker, RateLimitedError, classify_error, make_client
from serving.intents import ExchangePosition, OrderIntent, client_order_id, protective_intents
from tests.kit.candles import make_candles
from tests.kit.fake_binance import ALGO_ORDER, ORDER, FakeBinance, Fault

H = 3_600_000
CANDLES = make_candles(200, seed=1)
FUNDING = CANDLES["funding_rate"].dropna()
BAR = CANDLES.index[99]
T0 = int(CANDLES.index[100].value // 1_000_000) + 60_000  # one minute into bar 100


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def fake():
    with FakeBinance(CANDLES, FUNDING, now_ms=T0) as server:
        yield server


def _broker(fake: FakeBinance, timeout_ms: int = 2_000, attempts: int = 4) -> tuple[BinanceFuturesBroker, Sleeps]:
    sleeps = Sleeps()
    client = make_client(api_key="k", secret="s", base_url=fake.url, timeout_ms=timeout_ms, rate_limit=False)
    broker = BinanceFuturesBroker(client, read_attempts=attempts, sleep=sleeps)
    broker.load()
    return broker, sleeps


def _entry(qty: float = 0.2, side: str = "buy", bar: pd.Timestamp = BAR) -> OrderIntent:
    return OrderIntent(client_order_id("BTCUSDT", bar, "entry"), "entry", "BTCUSDT", bar, side, "market", qty,
                       None, False, False)


def test_rules_margin_leverage_and_no_request_leaves_localhost(fake):
    broker, _ = _broker(fake)
    r = broker.rules
    assert (r.symbol, r.tick_size_usdt, r.step_size_base, r.min_qty_base, r.min_notional_usdt) == (
        "BTCUSDT", 0.1, 0.001, 0.001, 100.0)
    broker.set_isolated_margin()
    broker.set_isolated_margin()  # already isolated: fine
    broker.set_leverage(5)
    assert fake.trading.margin_type == "ISOLATED" and fake.trading.leverage == 5
    with pytest.raises(RejectedError):
        broker.set_leverage(0)
    assert broker.server_time_ms() == T0
    urls = [u for g in ("api", "test") for u in broker.client.urls[g].values() if isinstance(u, str)]
    assert urls and all(u.startswith(fake.url) for u in urls)


def test_market_entry_protective_orders_lookup_cancel_fills(fake):
    broker, _ = _broker(fake)
    snap = broker.create(_entry(0.2))
    price = fake.current_price()
    assert snap.status == "closed" and snap.filled_base == pytest.approx(0.2)
    assert snap.average_price == pytest.approx(price)
    assert broker.position() == ExchangePosition(1, 0.2, pytest.approx(price))
    stop, tp = protective_intents("BTCUSDT", BAR, 1, price, 300.0, Decision(1, 2.0, 0.5, 1.0, 2.0), broker.rules)
    s_snap, t_snap = broker.create(stop), broker.create(tp)
    assert t_snap.order_type == "take_profit_market" and t_snap.trigger_price == pytest.approx(tp.trigger_price)
    assert s_snap.conditional and s_snap.status == "open" and s_snap.trigger_price == pytest.approx(stop.trigger_price)
    assert {o.client_id for o in broker.open_orders()} == {stop.client_id, tp.client_id}
    assert broker.lookup(stop.client_id, conditional=True).exchange_id == s_snap.exchange_id
    assert broker.lookup(snap.client_id, conditional=False).filled_base == pytest.approx(0.2)
    assert broker.lookup("ats-BTCUSDT-1-entry", conditional=False) is None
    assert broker.lookup("ats-BTCUSDT-1-stop", conditional=True) is None
    assert broker.cancel(tp.client_id, conditional=True).status == "canceled"
    assert broker.cancel(tp.client_id, conditional=True) is None  # already cancelled
    fills = broker.fills_since(None)
    assert [(f.side, f.qty_base) for f in fills] == [(1, pytest.approx(0.2))]
    assert broker.fills_since(fills[-1].trade_id) == []
    # the stop triggers when a later bar's low crosses it: the position closes at the stop price
    fake.now_ms = T0 + 60 * H
    assert broker.position() == ExchangePosition()
    closing = broker.fills_since(fills[-1].trade_id)
    assert len(closing) == 1 and closing[0].price == pytest.approx(stop.trigger_price)
    assert closing[0].realized_pnl_usdt == pytest.approx(0.2 * (stop.trigger_price - price))
    assert broker.equity_usdt() == pytest.approx(fake.trading.wallet_usdt)


def test_reads_retry_5xx_and_honour_retry_after(fake):
    broker, sleeps = _broker(fake)
    fake.add_fault("/fapi/v3/positionRisk", Fault("html_5xx"))
    fake.add_fault("/fapi/v3/positionRisk", Fault("json_5xx"))
    fake.add_fault("/fapi/v3/positionRisk", Fault("status_429", retry_after_s=7))
    assert broker.position() == ExchangePosition()
    assert fake.count("/fapi/v3/positionRisk") == 4
    assert len(sleeps) == 3 and sleeps[2] == 7.0 and all(0 < s <= 8.0 for s in sleeps[:2])


def test_read_gives_up_after_budget(fake):
    broker, sleeps = _broker(fake, attempts=3)
    fake.add_fault("/fapi/v1/time", Fault("html_5xx"), times=5)
    with pytest.raises(RetryableError):
        broker.server_time_ms()
    assert fake.count("/fapi/v1/time") == 3 and len(sleeps) == 2


@pytest.mark.parametrize("kind", ["accept_then_delay", "drop"])
def test_create_timeout_after_accept_is_ambiguous_and_never_retried(fake, kind):
    broker, sleeps = _broker(fake, timeout_ms=400)
    fake.add_fault(f"POST {ORDER}", Fault(kind, delay_s=1.5))
    intent = _entry(0.2)
    with pytest.raises(AmbiguousOutcomeError):
        broker.create(intent)
    assert fake.count(f"POST {ORDER}") == 1 and sleeps == []  # one request, no blind retry
    found = broker.lookup(intent.client_id, conditional=False)  # the order exists: resolve by client id
    assert found is not None and found.filled_base == pytest.approx(0.2)
    assert fake.orders_by_client_id() == {intent.client_id: 1}


def test_create_5xx_is_ambiguous_and_429_is_rate_limited(fake):
    broker, _ = _broker(fake)
    fake.add_fault(f"POST {ORDER}", Fault("html_5xx"))
    with pytest.raises(AmbiguousOutcomeError):
        broker.create(_entry())
    fake.add_fault(f"POST {ORDER}", Fault("status_429", retry_after_s=3))
    with pytest.raises(RateLimitedError) as info:
        broker.create(_entry())
    assert info.value.retry_after_s == 3.0
    assert fake.orders_by_client_id() == {}


def test_rejections_and_auth(fake):
    broker, _ = _broker(fake)
    with pytest.raises(RejectedError, match=r"4164|notional"):
        broker.create(_entry(0.001))  # ~30 USDT < min notional 100
    exit_ = OrderIntent(client_order_id("BTCUSDT", BAR, "exit"), "exit", "BTCUSDT", BAR, "sell", "market", 0.2,
                        None, True, False)
    with pytest.raises(RejectedError, match=r"2022|ReduceOnly"):
        broker.create(exit_)  # reduce-only on a flat position
    stop = OrderIntent(client_order_id("BTCUSDT", BAR, "stop"), "stop", "BTCUSDT", BAR, "sell", "stop_market", None,
                       fake.current_price() * 2, True, True)
    with pytest.raises(RejectedError, match=r"2021|immediately"):
        broker.create(stop)  # a sell stop above the price would trigger at once
    fake.add_fault("/fapi/v3/positionRisk", Fault("auth_error"))
    with pytest.raises(FatalError):
        broker.position()
    assert fake.count("/fapi/v3/positionRisk") == 1  # fatal: not retried


def test_partial_fill_reports_filled_quantity(fake):
    broker, _ = _broker(fake)
    fake.add_fault(f"POST {ORDER}", Fault("partial_fill", fill_ratio=0.4))
    snap = broker.create(_entry(0.5))
    assert snap.status == "expired" and snap.filled_base == pytest.approx(0.2) and snap.amount_base == 0.5
    assert broker.position().qty_base == pytest.approx(0.2)


def test_duplicate_client_id_accepted_once_filled_like_binance(fake):
    """The hazard the live loop guards against: a filled market order's id can be reused."""
    broker, _ = _broker(fake)
    broker.create(_entry(0.2))
    broker.create(_entry(0.2))
    assert fake.orders_by_client_id() == {_entry().client_id: 2}


def test_algo_lookup_path_used(fake):
    broker, _ = _broker(fake)
    broker.create(_entry(0.2))
    stop, _ = protective_intents("BTCUSDT", BAR, 1, fake.current_price(), 300.0, Decision(1, 2.0, 0.5, 1.0, 2.0),
                                 broker.rules)
    broker.create(stop)
    broker.lookup(stop.client_id, conditional=True)
    assert fake.count(ALGO_ORDER) == 1 and fake.count(f"POST {ALGO_ORDER}") == 1


@pytest.mark.parametrize(("exc", "create", "expected"), [
    (ccxt.AuthenticationError("x"), False, FatalError),
    (ccxt.PermissionDenied("x"), True, FatalError),
    (ccxt.DDoSProtection("x"), False, RateLimitedError),
    (ccxt.RateLimitExceeded("x"), True, RateLimitedError),
    (ccxt.RequestTimeout("x"), False, RetryableError),
    (ccxt.RequestTimeout("x"), True, AmbiguousOutcomeError),
    (ccxt.NetworkError("x"), True, AmbiguousOutcomeError),
    (ccxt.ExchangeNotAvailable("x"), False, RetryableError),
    (ccxt.ExchangeNotAvailable("x"), True, AmbiguousOutcomeError),
    (ccxt.OperationFailed("x"), True, AmbiguousOutcomeError),
    (ccxt.InvalidOrder("x"), True, RejectedError),
    (ccxt.InsufficientFunds("x"), True, RejectedError),
    (ccxt.BadRequest("x"), False, RejectedError),
    (ValueError("parse"), True, AmbiguousOutcomeError),
])  # fmt: skip
def test_error_classification_matrix(exc, create, expected):
    out = classify_error(exc, during_create=create)
    assert type(out) is expected
    if expected is AmbiguousOutcomeError or expected is RetryableError:
        assert not isinstance(out, RateLimitedError)


def test_state_file_survives_a_server_restart(tmp_path):
    state = tmp_path / "exchange.json"
    with FakeBinance(CANDLES, FUNDING, now_ms=T0, state_path=state) as first:
        broker, _ = _broker(first)
        broker.create(_entry(0.2))
        position = first.position()
    with FakeBinance(CANDLES, FUNDING, now_ms=T0, state_path=state) as second:
        broker, _ = _broker(second)
        assert second.position() == position and broker.position().qty_base == pytest.approx(0.2)
        assert broker.lookup(_entry().client_id, conditional=False) is not None
        assert len(broker.fills_since(None)) == 1
