"""PaperBroker is a thin wrapper of envs.accounting.step_bar: same numbers, no second accounting."""

from __future__ import annotations

import numpy as np
import pytest
import talib

from envs.accounting import AccountState, Bar, is_funding_time, step_bar
from envs.config import CostConfig
from market.decision import Decision
from serving.paper import PaperBroker
from tests.kit.candles import make_candles

COSTS = CostConfig()


def _bars(candles) -> list[Bar]:
    out = []
    for ts, row in candles.iterrows():
        ns = int(ts.value)
        out.append(Bar(ns, row.open, row.high, row.low, row.close, row.funding_rate, is_funding_time(ns, 8)))
    return out


def _random_decision(rng: np.random.Generator) -> Decision | None:
    u = rng.random()
    if u < 0.3:
        return None
    return Decision(
        direction=int(rng.integers(-1, 2)),
        leverage=float(rng.uniform(1, 5)),
        size_frac=float(rng.uniform(0.1, 1.0)),
        stop_atr=float(rng.uniform(0.5, 3)),
        take_profit_atr=float(rng.uniform(0.5, 4)),
    )


def test_broker_equals_direct_step_bar_sequence() -> None:
    candles = make_candles(400, seed=7)
    atr = talib.ATR(candles.high.to_numpy(), candles.low.to_numpy(), candles.close.to_numpy(), 14)
    bars = _bars(candles)
    rng = np.random.default_rng(11)
    decisions = [_random_decision(rng) for _ in bars]

    broker = PaperBroker(10_000.0, COSTS)
    state = AccountState.initial(10_000.0)
    pending: tuple[Decision | None, float] = (None, float("nan"))
    last_atr = float("nan")
    n_results = 0
    for t in range(20, len(bars)):
        direct = step_bar(
            state, pending[0], bars[t], pending[1] if pending[0] is not None else last_atr, COSTS
        )
        via_broker = broker.on_bar(bars[t])
        assert via_broker == direct  # identical dataclasses: state, fills, costs, equity
        state = direct.state
        if pending[0] is not None:
            last_atr = pending[1]
        assert broker.equity_usdt == direct.equity_usdt
        assert broker.position_view() == state.position_view()
        n_results += 1
        d = decisions[t]
        if d is not None:
            broker.submit(d, float(atr[t]))
            pending = (d, float(atr[t]))
        else:
            pending = (None, float("nan"))
    assert n_results == 380
    assert state.n_fills > 20 and state.n_trades > 10  # the sequence exercised entries, exits, reversals
    assert broker.state == state


def test_equity_before_any_bar_is_the_initial_equity() -> None:
    broker = PaperBroker(5_000.0, COSTS)
    assert broker.equity_usdt == 5_000.0
    assert broker.position_view().side == 0
    assert broker.pending is None


def test_submit_rules() -> None:
    broker = PaperBroker(10_000.0, COSTS)
    with pytest.raises(ValueError, match="atr_at_decision"):
        broker.submit(Decision(1, 2.0, 0.5), float("nan"))
    assert broker.pending is None
    broker.submit(Decision.flat(), float("nan"))  # flat while flat needs no ATR
    with pytest.raises(ValueError, match="already pending"):
        broker.submit(Decision(1, 2.0, 0.5), 100.0)
    assert broker.cancel_pending() == Decision.flat()
    broker.submit(Decision(1, 2.0, 0.5), 100.0)
    assert broker.pending == (Decision(1, 2.0, 0.5), 100.0)
    with pytest.raises(TypeError):
        broker.submit({"direction": 1}, 100.0)  # type: ignore[arg-type]


def test_on_bar_enters_and_rejects_out_of_order_bars() -> None:
    candles = make_candles(5, seed=1)
    bars = _bars(candles)
    broker = PaperBroker(10_000.0, COSTS)
    broker.on_bar(bars[0])
    broker.submit(Decision(1, 2.0, 0.5, 2.0, 4.0), 300.0)
    result = broker.on_bar(bars[1])
    assert [f.reason for f in result.fills] == ["entry"]
    assert broker.pending is None and broker.state.side == 1
    with pytest.raises(ValueError, match="not after"):
        broker.on_bar(bars[1])
    # without a new decision the position and its orders are kept; stops use the last ATR (300)
    before = broker.state
    assert broker.on_bar(bars[2]) == step_bar(before, None, bars[2], 300.0, COSTS)
