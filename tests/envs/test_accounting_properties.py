"""Property tests: accounting invariants over random action sequences on synthetic candles."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.actions import ActionConfig
from envs.trading_env import EnvConfig, TradingEnv
from market.decision import NonFiniteDecisionError
from tests.envs.helpers import make_env_data

action = st.lists(st.floats(-1.0, 1.0, allow_nan=False, width=32), min_size=5, max_size=5)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    actions=st.lists(action, min_size=5, max_size=80),
    vol=st.sampled_from([0.005, 0.02, 0.05]),
)
def test_invariants_hold_every_step(seed: int, actions: list[list[float]], vol: float) -> None:
    data = make_env_data(120, seed=seed, vol_per_bar=vol)
    cfg = EnvConfig(
        episode_len_bars=None, random_start=False, min_equity_frac=0.0, max_drawdown_frac=1.0,
        actions=ActionConfig(max_leverage=20.0, max_size_frac=1.0), info_level="full",
    )  # fmt: skip
    env = TradingEnv(data, cfg)
    obs, _ = env.reset(seed=seed)
    assert np.isfinite(obs).all()
    fees = slippage = turnover = liq_fees = funding = 0.0
    signed_qty = 0.0  # signed sum of fills since flat
    closed_pnl = 0.0
    initial = cfg.initial_equity_usdt
    taker_rate = cfg.costs.taker_fee_bps / 1e4
    for a in actions:
        prev = env.account_state
        obs, reward, terminated, truncated, info = env.step(np.asarray(a, dtype=np.float32))
        s = env.account_state
        close = float(data.close[env.current_index])
        # equity identity
        assert info["equity_usdt"] == s.cash_usdt + s.margin_usdt + s.side * s.qty_base * (
            close - s.entry_price
        )
        # each fee charged exactly once, at its fill
        for f in info["fills"]:
            fees += f.fee_usdt
            slippage += f.slippage_usdt
            turnover += f.qty_base * f.price
            signed_qty += f.side * f.qty_base
            # independent fee check: notional x the fee rate of the order type (taker unless liquidation)
            if f.reason != "liquidation":
                assert math.isclose(f.fee_usdt, f.qty_base * f.price * taker_rate, rel_tol=1e-12, abs_tol=1e-12)
            if f.reason == "entry" and f is info["fills"][-1]:
                # still open: notional = margin x the integer exchange leverage ceil(L) (envs.sizing), and the
                # notional is sized by the requested leverage: margin x L <= notional
                lev_x = math.ceil(min(s.leverage, cfg.costs.instrument.max_leverage))
                assert abs(s.margin_usdt * lev_x - f.qty_base * f.price) <= 1e-6 * f.qty_base * f.price
                assert s.margin_usdt * s.leverage <= f.qty_base * f.price * (1 + 1e-12)
        fees_bar = sum(f.fee_usdt for f in info["fills"])
        assert math.isclose(info["fees_usdt"], fees_bar, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(s.fees_paid_usdt, fees, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(s.slippage_paid_usdt, slippage, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(s.turnover_usdt, turnover, rel_tol=1e-9, abs_tol=1e-9)
        # position = signed sum of fills since flat
        assert math.isclose(s.side * s.qty_base, signed_qty, abs_tol=1e-9)
        if s.side == 0:
            signed_qty = 0.0
        # funding sign: the side held into the settlement times the rate
        if info["funding_usdt"] != 0.0:
            rate = data.funding_rate[env.current_index]
            rate = cfg.costs.funding_fallback_rate if math.isnan(rate) else rate
            assert np.sign(info["funding_usdt"]) == np.sign(prev.side * rate)
        funding += info["funding_usdt"]
        liq_fees += info["liquidation_fee_usdt"]
        assert math.isclose(s.funding_paid_usdt, funding, abs_tol=1e-9)
        # when flat, equity = initial + net PnL of the closed trades (fees, funding, liquidations included)
        closed_pnl += sum(t.pnl_usdt for t in info["closed_trades"])
        if s.side == 0:
            assert math.isclose(info["equity_usdt"], initial + closed_pnl, rel_tol=1e-9, abs_tol=1e-6)
        else:  # in a trade: + the open trade's price PnL at the close, less its entry fee and funding so far
            open_pnl = s.side * s.qty_base * (close - s.entry_price) - s.entry_fee_usdt - s.trade_funding_usdt
            assert math.isclose(info["equity_usdt"], initial + closed_pnl + open_pnl, rel_tol=1e-9, abs_tol=1e-6)
        # isolated margin: a position never takes more than its margin, so cash never goes negative
        assert s.cash_usdt >= -1e-9
        # nothing non-finite
        assert np.isfinite(obs).all() and obs.dtype == np.float32
        assert math.isfinite(reward)
        for key, value in info.items():
            if _is_number(value):
                assert math.isfinite(value), key
        assert not terminated
        if truncated:
            break
    assert math.isclose(s.liquidation_fees_usdt, liq_fees, abs_tol=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    actions=st.lists(action, min_size=2, max_size=40),
    bad_step=st.integers(0, 39),
    bad_component=st.integers(0, 4),
    bad_value=st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_a_non_finite_action_sends_no_order_and_leaves_the_account_unchanged(
    seed: int, actions: list[list[float]], bad_step: int, bad_component: int, bad_value: float
) -> None:
    data = make_env_data(60, seed=seed, vol_per_bar=0.02)
    cfg = EnvConfig(episode_len_bars=None, random_start=False, min_equity_frac=0.0, max_drawdown_frac=1.0,
                    info_level="full")  # fmt: skip
    env = TradingEnv(data, cfg)
    env.reset(seed=seed)
    bad_step = bad_step % len(actions)
    for k, a in enumerate(actions):
        if k == bad_step:
            before, index = env.account_state, env.current_index
            bad = np.asarray(a, dtype=np.float32)
            bad[bad_component] = bad_value
            try:
                env.step(bad)
            except NonFiniteDecisionError as exc:
                assert str(bad_component) in str(exc) or "finite" in str(exc)
            else:
                raise AssertionError(f"action {bad!r} was accepted")
            assert env.account_state == before  # no fill, no fee, no funding, same bar
            assert env.current_index == index
            # the env stays usable: the next finite action steps normally
        *_, truncated, _ = env.step(np.asarray(a, dtype=np.float32))
        if truncated:
            break
