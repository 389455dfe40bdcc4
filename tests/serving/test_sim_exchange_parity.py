"""Sim/exchange parity (issue 18): the same candles through the paper broker and through the live loop on the fake
Binance give the same fills (price, quantity, fee) and equity within one tick per fill.

Both runs (:func:`tests.kit.exchange_sim.run_parity`) trade real bundled BTCUSDT 1h candles with the demo bundle's
context (1,010 bars), the same scripted policy (entries, exits, direct flips, stops and take-profits at 1.5 / 2.5
ATR) and the default cost model. The fake exchange fills where the env kernel would (open or level, adverse
slippage, tick-rounded: :class:`tests.kit.fake_binance.KernelFills`) and settles funding, so the comparison is of
the serving paths: timing (decision at the close, fill at the next open), the entry size, stop and take-profit
placement, fees, funding and the equity the two accounts mark.

What differs (measured, not hidden; :data:`KNOWN`): the entry **quantity**, by at most one lot, for two reasons of
the live path, both in :func:`serving.intents.plan_bar` as :class:`serving.live.LiveLoop` calls it:

1. *Reference price.* Live sizes an entry at the close of the decided bar (it sends the order before the fill
   exists); the kernel sizes it at its fill, the next open with adverse slippage rounded to the tick. Buys fill
   above the close and sells below it (slippage), so ``floor(B L / P, step)`` lands a lot apart whenever the
   budget sits near a lot boundary.
2. *Equity on a flip.* On a reversal live sizes the new position with the equity read before the exit (wallet +
   unrealised PnL at the current price); the kernel with the cash after the exit, its fee and slippage paid.

Every other quantity is equal: the fills happen in the same bars, on the same sides, for the same reasons, at the
same prices (0 ticks apart); fees are the same fraction of notional; the equity marked at every close stays within
one tick per fill (the lot-apart entries included); and with the sizing reference made equal (zero slippage,
candles whose open is the previous close, no direct flips) quantities and equity agree to float noise
(:func:`test_sim_exchange_parity_is_exact_when_the_sizing_reference_agrees`). Exact quantities under the default
costs are an expected failure (``xfail(strict=True)``): it turns into a failure the day live sizes as the kernel.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from envs.config import CostConfig
from market.decision import Decision, DecisionContext, StatelessPolicy
from tests.kit.exchange_sim import ParityRun, continuous, run_parity

COSTS = CostConfig()
BARS = 96  # four days of 1h bars after the 1,010-bar context
#: measured with this script on these candles (96 bars, 45 fills, 23 entries): 7 entries a lot apart, 6 of them
#: among the 8 entries of a flip (cause 2) and 1 among the 15 entries from flat (cause 1); equity gap at most
#: 0.27 USDT, within one tick per fill
KNOWN = {"entries": 23, "differing": 7}


class ScriptedPolicy(StatelessPolicy):
    """Decides by the hour (a pure function of the bar's open time), so both runs are asked the same question and
    answer the same: a 24-bar cycle of long, short, flat and long again. ``flips``: long turns into short directly
    (a reversal in one bar); otherwise every change of side goes through flat."""

    name = "v2"

    def __init__(self, flips: bool) -> None:
        cycle = ["L"] * 6 + ["S"] * 6 + ["F"] * 2 + ["L"] * 5 + ["F"] + ["S"] * 4
        if not flips:
            cycle = ["L"] * 6 + ["F"] * 2 + ["S"] * 6 + ["F"] * 2 + ["L"] * 5 + ["F"] * 3
        self.cycle = cycle

    def decide(self, ctx: DecisionContext) -> Decision:
        phase = self.cycle[int(ctx.bar_open_time.value // 3_600_000_000_000) % len(self.cycle)]
        if phase == "F":
            return Decision.flat()
        return Decision(direction=1 if phase == "L" else -1, leverage=3.0, size_frac=0.5, stop_atr=1.5,
                        take_profit_atr=2.5)  # fmt: skip


@pytest.fixture(scope="module")
def realistic() -> ParityRun:
    return run_parity(lambda: ScriptedPolicy(flips=True), costs=COSTS, bars=BARS)


@pytest.fixture(scope="module")
def aligned() -> ParityRun:
    costs = COSTS.updated(slippage_bps=0.0, slippage_atr_coef=0.0)
    return run_parity(lambda: ScriptedPolicy(flips=False), costs=costs, bars=72, transform=continuous)


def _ticks(run: ParityRun) -> np.ndarray:
    return np.abs(run.paper_fills["price"].to_numpy() - run.live_fills["price"].to_numpy()) / run.tick


def _equity_tolerance(run: ParityRun) -> pd.Series:
    """One tick per fill so far, on the fill's quantity (USDT), by bar."""
    per_fill = run.paper_fills.assign(tol=run.paper_fills["qty_base"] * run.tick).groupby("bar_open_time")["tol"].sum()
    return per_fill.reindex(run.paper_equity.index, fill_value=0.0).cumsum() + 1e-6


def test_sim_exchange_parity_same_fills_in_the_same_bars_at_the_same_prices(realistic):
    p, q = realistic.paper_fills, realistic.live_fills
    assert len(p) >= 30 and "external" not in set(q["reason"])
    assert {"entry", "exit_signal", "stop", "take_profit"} <= set(p["reason"])  # every kind of fill met
    assert (p[["bar_open_time", "side", "reason"]].to_numpy() == q[["bar_open_time", "side", "reason"]].to_numpy()).all()
    assert _ticks(realistic).max() <= 1.0  # measured: 0 ticks
    assert (_ticks(realistic) == 0).all()
    fee_rate = COSTS.taker_fee_bps / 1e4
    for df in (p, q):
        np.testing.assert_allclose(df["fee_usdt"], df["qty_base"] * df["price"] * fee_rate, rtol=1e-12)
    assert realistic.live_events.get("internal_error", 0) == 0 and realistic.live_events.get("step_failed", 0) == 0


def test_sim_exchange_parity_quantities_differ_by_at_most_one_lot_and_only_at_entries(realistic):
    """The known discrepancy (module docstring), bounded and counted: one lot at most, at entries (their exits and
    stops carry the entry's quantity), in the number of entries measured."""
    p, q = realistic.paper_fills, realistic.live_fills
    lots = np.rint(np.abs(p["qty_base"].to_numpy() - q["qty_base"].to_numpy()) / realistic.step)
    assert lots.max() <= 1
    entries = (p["reason"] == "entry").to_numpy()
    differing = int((lots[entries] > 0).sum())
    assert int(entries.sum()) >= 20 and 0 < differing <= int(entries.sum()) // 2  # measured: KNOWN
    for df in (p, q):  # each account closes what it opened
        signed = (df["side"] * df["qty_base"]).cumsum().round(9)
        closes = df["reason"] != "entry"
        assert (signed[closes] == 0).all()


def test_sim_exchange_parity_equity_within_one_tick_per_fill_at_every_close(realistic):
    """The two accounts' equity marked at every close: within one tick per fill so far (on its quantity), the
    lot-apart entries included (measured: at most 0.27 USDT apart over 95 closes)."""
    assert realistic.paper_equity.index.equals(realistic.live_equity.index) and len(realistic.paper_equity) == BARS - 1
    gap = (realistic.paper_equity - realistic.live_equity).abs()
    assert (gap <= _equity_tolerance(realistic)).all()


@pytest.mark.xfail(strict=True, reason="live sizes an entry at the decided bar's close and, on a flip, with the "
                   "equity before the exit; the kernel at its fill and with the cash after the exit (module docstring)")
def test_sim_exchange_parity_same_quantities_with_the_default_costs(realistic):
    p, q = realistic.paper_fills, realistic.live_fills
    assert (p["qty_base"].to_numpy() == q["qty_base"].to_numpy()).all()


def test_sim_exchange_parity_is_exact_when_the_sizing_reference_agrees(aligned):
    """Zero slippage, continuous candles, no direct flips: the close live sizes at is the kernel's fill and the
    equity it sizes with is the kernel's cash, so everything agrees: fills (price, quantity, fee) and the equity
    marked at every close, within one tick per fill (measured: float noise)."""
    p, q = aligned.paper_fills, aligned.live_fills
    assert len(p) >= 20 and {"entry", "exit_signal", "stop", "take_profit"} <= set(p["reason"])
    cols = ["bar_open_time", "side", "reason", "qty_base", "price"]
    assert (p[cols].to_numpy() == q[cols].to_numpy()).all()
    np.testing.assert_allclose(p["fee_usdt"], q["fee_usdt"], rtol=1e-12)
    assert aligned.paper_equity.index.equals(aligned.live_equity.index) and len(aligned.paper_equity) == 71
    gap = (aligned.paper_equity - aligned.live_equity).abs()
    assert (gap <= _equity_tolerance(aligned)).all() and gap.max() < 1e-6
