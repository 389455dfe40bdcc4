"""Sim/exchange parity (issue 18): the same candles through the paper broker and through the live loop on the fake
Binance give the same fills (price, quantity, fee) and equity within one tick per fill.

Both runs (:func:`tests.kit.exchange_sim.run_parity`) trade real bundled BTCUSDT 1h candles with the demo bundle's
context (1,010 bars), the same scripted policy (entries, exits, direct flips, stops and take-profits at 1.5 / 2.5
ATR) and the default cost model. The fake exchange fills where the env kernel would (open or level, adverse
slippage, tick-rounded: :class:`tests.kit.fake_binance.KernelFills`) and settles funding, so the comparison is of
the serving paths: timing (decision at the close, fill at the next open), the entry size, stop and take-profit
placement, fees, funding and the equity the two accounts mark.

The entry size. The kernel sizes an entry at its fill (the next open with adverse slippage, tick-rounded) with the
cash it has after closing the position held (its exit fee and slippage paid). Live sends the order before that open
exists; it sizes the entry as the kernel would if the next open were the decided bar's close
(:func:`serving.intents.next_open_entry`: the modelled entry fill, and on a flip the equity less the modelled exit's
fee and slippage, through the one sizing rule). So the quantities are equal whenever the next open equals the last
close (:func:`test_sim_exchange_parity_is_exact_when_the_next_open_is_the_last_close`: slippage on, direct flips,
everything exact); what can still move a quantity by a lot is a gap between the two
(:func:`test_sim_exchange_parity_quantities_differ_only_after_a_gap`). Not modelled either: funding settled at that
open on the position held (the kernel takes it before the exit); the script's flips never fill at a funding time.

Measured on these candles (96 bars, 45 fills, 23 entries, 13 of them at an open one tick from the last close): before
live sized this way (close as the price, equity before the exit), 7 entries (14 fills) were a lot apart and the
equity up to 0.27 USDT; now every fill is equal and the equity agrees to float noise.
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
#: measured with this script on these candles: fills, entries, entries at an open away from the last close
KNOWN = {"fills": 45, "entries": 23, "entries_after_a_gap": 13}
#: the gapped run: every third open moved this far from the last close (about 44 USDT at 29,000: half a lot of a 0.5 BTC entry)
GAP_FRAC = 0.0015


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
    return run_parity(lambda: ScriptedPolicy(flips=True), costs=COSTS, bars=72, transform=continuous)


def gapped(candles: pd.DataFrame) -> pd.DataFrame:
    """:func:`continuous` candles except every third open, moved ``GAP_FRAC`` away from the last close (up and down
    in turn; high and low widened): the only bars whose next open is not the last close."""
    out = continuous(candles)
    rows = np.arange(3, len(out), 3)
    sign = np.where((rows // 3) % 2 == 0, 1.0, -1.0)
    out.iloc[rows, out.columns.get_loc("open")] = out["close"].to_numpy()[rows - 1] * (1.0 + sign * GAP_FRAC)
    out["high"] = np.maximum(out["high"], out["open"])
    out["low"] = np.minimum(out["low"], out["open"])
    return out


@pytest.fixture(scope="module")
def gaps() -> ParityRun:
    return run_parity(lambda: ScriptedPolicy(flips=True), costs=COSTS, bars=72, transform=gapped)


def _ticks(run: ParityRun) -> np.ndarray:
    return np.abs(run.paper_fills["price"].to_numpy() - run.live_fills["price"].to_numpy()) / run.tick


def _lots(run: ParityRun) -> np.ndarray:
    return np.rint(np.abs(run.paper_fills["qty_base"].to_numpy() - run.live_fills["qty_base"].to_numpy()) / run.step)


def _opens_at_last_close(run: ParityRun) -> np.ndarray:
    """Per paper fill: whether its bar opened at the previous bar's close (the price live sized at)."""
    c = run.candles
    assert c is not None
    prev_close = c["close"].shift(1)
    t = pd.DatetimeIndex(run.paper_fills["bar_open_time"])
    return (c["open"].reindex(t).to_numpy() == prev_close.reindex(t).to_numpy())


def _equity_tolerance(run: ParityRun) -> pd.Series:
    """One tick per fill so far, on the fill's quantity (USDT), by bar."""
    per_fill = run.paper_fills.assign(tol=run.paper_fills["qty_base"] * run.tick).groupby("bar_open_time")["tol"].sum()
    return per_fill.reindex(run.paper_equity.index, fill_value=0.0).cumsum() + 1e-6


def test_sim_exchange_parity_same_fills_in_the_same_bars_at_the_same_prices(realistic):
    p, q = realistic.paper_fills, realistic.live_fills
    assert len(p) == KNOWN["fills"] and "external" not in set(q["reason"])
    assert {"entry", "exit_signal", "stop", "take_profit"} <= set(p["reason"])  # every kind of fill met
    assert (p[["bar_open_time", "side", "reason"]].to_numpy() == q[["bar_open_time", "side", "reason"]].to_numpy()).all()
    assert (_ticks(realistic) == 0).all()
    fee_rate = COSTS.taker_fee_bps / 1e4
    for df in (p, q):
        np.testing.assert_allclose(df["fee_usdt"], df["qty_base"] * df["price"] * fee_rate, rtol=1e-12)
    np.testing.assert_allclose(p["fee_usdt"], q["fee_usdt"], rtol=1e-12)
    assert realistic.live_events.get("internal_error", 0) == 0 and realistic.live_events.get("step_failed", 0) == 0


def test_sim_exchange_parity_same_quantities_with_the_default_costs(realistic):
    """Every fill has the same quantity: entries from flat and after a direct flip (sized at the modelled fill of
    the last close, with the equity after the modelled exit), and the exits, stops and take-profits that close
    them. 13 of the 23 entries open a tick away from the last close; no lot boundary lies in between here."""
    p, q = realistic.paper_fills, realistic.live_fills
    np.testing.assert_array_equal(p["qty_base"].to_numpy(), q["qty_base"].to_numpy())
    entries = (p["reason"] == "entry").to_numpy()
    flips = entries & (p["bar_open_time"].duplicated(keep=False)).to_numpy()  # an exit and an entry in one bar
    assert int(entries.sum()) == KNOWN["entries"] and int(flips.sum()) >= 6
    assert int((entries & ~_opens_at_last_close(realistic)).sum()) == KNOWN["entries_after_a_gap"]
    for df in (p, q):  # each account closes what it opened
        signed = (df["side"] * df["qty_base"]).cumsum().round(9)
        assert (signed[df["reason"] != "entry"] == 0).all()


def test_sim_exchange_parity_equity_within_one_tick_per_fill_at_every_close(realistic):
    """The two accounts' equity marked at every close: within one tick per fill so far (on its quantity); with the
    same fills it agrees to float noise (measured: 5e-12 USDT over 95 closes)."""
    assert realistic.paper_equity.index.equals(realistic.live_equity.index) and len(realistic.paper_equity) == BARS - 1
    gap = (realistic.paper_equity - realistic.live_equity).abs()
    assert (gap <= _equity_tolerance(realistic)).all() and gap.max() < 1e-6


def test_sim_exchange_parity_is_exact_when_the_next_open_is_the_last_close(aligned):
    """Candles whose every open is the previous close, default costs (slippage on), direct flips: the next open is
    the price live sized at, so everything agrees: fills (price, quantity, fee) and the equity marked at every
    close (float noise)."""
    p, q = aligned.paper_fills, aligned.live_fills
    assert len(p) >= 20 and {"entry", "exit_signal", "stop", "take_profit"} <= set(p["reason"])
    assert _opens_at_last_close(aligned).all()
    assert (p["bar_open_time"][p["reason"] == "entry"].isin(p["bar_open_time"][p["reason"] == "exit_signal"])).any()
    cols = ["bar_open_time", "side", "reason", "qty_base", "price"]
    assert (p[cols].to_numpy() == q[cols].to_numpy()).all()
    np.testing.assert_allclose(p["fee_usdt"], q["fee_usdt"], rtol=1e-12)
    assert aligned.paper_equity.index.equals(aligned.live_equity.index) and len(aligned.paper_equity) == 71
    gap = (aligned.paper_equity - aligned.live_equity).abs()
    assert (gap <= _equity_tolerance(aligned)).all() and gap.max() < 1e-6


def test_sim_exchange_parity_quantities_differ_only_after_a_gap(gaps):
    """Every third open moved 0.15 % from the last close: the kernel's fill moves with the open and live's cannot
    know it, so an entry there may land a lot apart (and the fill closing that trade with it). Every entry a lot
    apart opens at such a gap, and every entry at an open equal to the last close is equal (measured over 72 bars:
    6 of the 8 entries at a gap a lot apart, none of the 8 others; equity up to 0.29 USDT apart)."""
    p, q = gaps.paper_fills, gaps.live_fills
    assert (p[["bar_open_time", "side", "reason"]].to_numpy() == q[["bar_open_time", "side", "reason"]].to_numpy()).all()
    assert (_ticks(gaps) == 0).all()
    lots, at_close = _lots(gaps), _opens_at_last_close(gaps)
    entries = (p["reason"] == "entry").to_numpy()
    assert lots.max() <= 1 and (lots[entries] > 0).sum() >= 3  # the gap moves the kernel's size, live cannot follow
    assert not (entries & at_close & (lots > 0)).any() and (entries & at_close).sum() >= 8
    last_entry = pd.Series(np.where(entries, np.arange(len(p)), np.nan)).ffill().to_numpy().astype(int)
    np.testing.assert_array_equal(lots, lots[last_entry])  # a closing fill differs only with its entry
