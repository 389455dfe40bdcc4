"""Two symbols' live loops on one account against the fake exchange (test helper of the live portfolio tests and
their kill -9 child processes): BTCUSDT and ETHUSDT candles, the fake serving both, and
:func:`live_portfolio` wiring :class:`serving.live_portfolio.LivePortfolio` as ``ats serve --symbols`` does (one
ccxt client, a :class:`serving.live_portfolio.SymbolEvents` view and a :class:`serving.live_portfolio.SymbolGuard`
per symbol)."""

from __future__ import annotations

from collections.abc import Callable

from market.decision import Decision, DecisionContext, Policy, StatelessPolicy
from serving.account_risk import AccountGuard, AccountRiskConfig
from serving.crash import NO_CRASH, CrashPoints
from serving.exchange import BinanceFuturesBroker, make_client
from serving.live import LiveConfig, LiveLoop
from serving.live_portfolio import LivePortfolio, SymbolEvents, SymbolGuard
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.kit.fake_binance import FakeBinance
from tests.serving.fakes import ScriptedFallback

H = 3_600_000
BTC = make_candles(1_400, seed=1)
ETH = make_candles(1_400, seed=2, start_price=2_000.0)
T0 = int(BTC.index[1_100].value // 1_000_000) + 60_000
CONTEXT = 1_010  # ccxt pages it (1,000 klines a request)
SYMBOLS = {"BTCUSDT": "BTC/USDT:USDT", "ETHUSDT": "ETH/USDT:USDT"}


class WideFlip(StatelessPolicy):
    """:class:`tests.serving.fakes.FlipPolicy`'s reversals (long on even open hours, short on odd; 0.5 of the equity
    at 3x) with the stop and take-profit far away (40 and 60 ATR), so no exchange-side exit closes a position
    between two bars of these tests."""

    name = "flip"

    def decide(self, ctx: DecisionContext) -> Decision:
        return Decision(direction=1 if ctx.bar_open_time.hour % 2 == 0 else -1, leverage=3.0, size_frac=0.5,
                        stop_atr=40.0, take_profit_atr=60.0)


def two_symbol_fake(**kw) -> FakeBinance:
    """The fake exchange serving BTCUSDT (primary) and ETHUSDT at ``T0`` (one minute into bar 1,100)."""
    return FakeBinance({"BTCUSDT": BTC, "ETHUSDT": ETH},
                       {"BTCUSDT": BTC["funding_rate"].dropna(), "ETHUSDT": ETH["funding_rate"].dropna()},
                       now_ms=kw.pop("now_ms", T0), **kw)


def live_portfolio(url: str, store: StateStore, *, wall_clock_s: Callable[[], float],
                   policies: dict[str, Policy] | None = None, account_risk: AccountRiskConfig | None = None,
                   crash_points: CrashPoints = NO_CRASH) -> LivePortfolio:
    """Both symbols' loops (:class:`WideFlip` unless ``policies`` names one, flat V1) on one client, behind the account's
    guard when ``account_risk`` is given."""
    client = make_client(api_key="k", secret="s", base_url=url, timeout_ms=3_000, rate_limit=False)
    account = AccountGuard(account_risk, store) if account_risk is not None else None
    loops = []
    for sym, unified in SYMBOLS.items():
        broker = BinanceFuturesBroker(client, unified, read_attempts=3, sleep=lambda s: None)
        loop = LiveLoop(broker, SymbolEvents(store, sym).as_store(), LiveConfig(symbol=unified, context_bars=CONTEXT),
                        primary=(policies or {}).get(sym, WideFlip()), fallback=ScriptedFallback(),
                        wall_clock_s=wall_clock_s, sleep=lambda s: None, crash_points=crash_points)  # fmt: skip
        loop.set_guard(SymbolGuard(None, account))
        loops.append(loop)
    return LivePortfolio(loops, store, account_guard=account)
