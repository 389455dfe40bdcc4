"""V1's phased trailing takes effect end to end: V1 -> Decision.new_stop_price -> env -> accounting.

A hand-made series: the 600-bar uptrend of ``tests.fallback.series`` ends on a breakout bar (V1
enters long at the next open), then three bars, in units of the ATR ``a`` at the decision bar and
relative to its close ``c``:

* bar +1: a quiet bar (``c - 0.3a .. c + 0.3a``, close ``c + 0.2a``);
* bar +2: a run to ``c + 2.6a`` (1.73 R with R = 1.5a: phase 2, stop ``extreme - 2 ATR``, above
  the entry since the ATR grows with this bar's range), closing at ``c + 2.3a`` above that stop
  (no exit signal);
* bar +3: a dip to ``c`` that closes at ``c + a``: below the trailed stop (a little above the
  entry), far above the entry stop ``entry - 1.5a``.

With trailing the trade must close at bar +3 by a *stop* fill above the entry price (a long's
entry stop lies below its entry, so only the moved stop can do that); without trailing the same
bars leave the position open.
"""

from __future__ import annotations

import pandas as pd
import pytest
import talib

from envs.trading_env import EnvConfig
from fallback.config import V1Config
from tests.fallback.series import mirror, trend_candles
from training.v1_eval import evaluate_v1


def _series(side: int) -> tuple[pd.DataFrame, pd.Timestamp, pd.Timestamp]:
    base = trend_candles()
    a = float(talib.ATR(base["high"].to_numpy(), base["low"].to_numpy(), base["close"].to_numpy(), 14)[-1])
    c = float(base["close"].iloc[-1])
    rows = [  # open, high, low, close in units of a above c
        (0.0, 0.3, -0.3, 0.2),
        (0.2, 2.6, 0.1, 2.3),
        (2.0, 2.2, 0.0, 1.0),
    ]
    idx = pd.date_range(base.index[-1] + pd.Timedelta(hours=1), periods=len(rows), freq="1h", tz="UTC",
                        name="open_time")  # fmt: skip
    extra = pd.DataFrame([[c + k * a for k in r] + [200.0] for r in rows], index=idx,
                         columns=["open", "high", "low", "close", "volume"])  # fmt: skip
    candles = pd.concat([base, extra])
    candles.index = candles.index.as_unit("ns")  # run_backtest aligns on ns open times
    if side < 0:
        candles = mirror(candles, 2_000.0)
    return candles, base.index[-1], idx[-1] + pd.Timedelta(hours=1)


@pytest.mark.parametrize("side", [1, -1], ids=["long", "short"])
def test_trailed_stop_not_the_entry_stop_closes_the_trade(side: int) -> None:
    candles, start, end = _series(side)
    # the Bollinger width is not mirror-invariant (relative to the price level): that filter is opened
    on = V1Config(trailing_enabled=True, bb_width_pct_min=0.0, bb_width_pct_max=1.0)
    res = evaluate_v1(candles, start, end, on, EnvConfig())
    assert len(res.trades) == 1
    trade = res.trades[0]
    assert trade.side == side and trade.exit_reason == "stop"
    assert side * (trade.exit_price - trade.entry_price) > 0  # a stop fill on the profitable side of the entry
    assert trade.exit_time_ns == candles.index[-1].value and trade.bars_held == 3
    # the same bars without trailing: the entry stop (1.5 ATR away) is never reached, the trade stays open
    off = evaluate_v1(candles, start, end, on.model_copy(update={"trailing_enabled": False}), EnvConfig())
    assert off.trades == () and int(off.position_side[-1]) == side
