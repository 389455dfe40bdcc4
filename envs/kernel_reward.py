"""Compiled rewards and observation of the env step (numba), called by :func:`envs.kernel.env_step`.

The rewards have the forms, warm-up, floor, clip and arithmetic of :mod:`envs.rewards` (Moody & Saffell 2001), so
they equal the pure-Python reference bit for bit (``tests/envs``); :func:`write_observation` writes the market row
and the account features of ``envs.trading_env.ACCOUNT_FEATURES``. Inlined into the env step
(``envs.kernel_layout._INLINE_OPTS``); :mod:`envs.kernel` re-exports every name.
"""

from __future__ import annotations

import math

from numba import njit

from envs.kernel_layout import (
    _INLINE_OPTS,
    B_CLOSE,
    E_EQUITY,
    E_PEAK,
    E_RW_A,
    E_RW_B,
    E_RW_N,
    E_T,
    F_ENTRY,
    F_LEV,
    F_QTY,
    I_BARS,
    I_SIDE,
    P_CLIP,
    P_ETA,
    P_FLOOR,
    P_MAX_LEV_OBS,
    P_RKIND,
    P_WARMUP,
)

# ---------------------------------------------------------------------------------------------
# Rewards (same forms and arithmetic as envs.rewards)
# ---------------------------------------------------------------------------------------------


@njit(**_INLINE_OPTS)
def _unit_clip(x):  # pragma: no cover - compiled
    """``min(1.0, max(-1.0, x))`` for a finite x."""
    return 1.0 if x > 1.0 else (-1.0 if x < -1.0 else x)  # explicit comparisons, not min/max: fast in numba


@njit(**_INLINE_OPTS)
def _clip(x, bound):  # pragma: no cover - compiled
    return bound if x > bound else max(x, -bound)


@njit(**_INLINE_OPTS)
def _log_return(r, clip):  # pragma: no cover - compiled
    if r <= -1.0:
        return -clip
    return _clip(math.log1p(r), clip)


@njit(**_INLINE_OPTS)
def reward_step(st, r, p):  # pragma: no cover - compiled
    """Consume the net return ``r``; ``st[E_RW_A], st[E_RW_B], st[E_RW_N]`` hold A, B (or DD2), n.

    Same formulas, warm-up, floor and clip as :mod:`envs.rewards` (Moody & Saffell 2001)."""
    kind = int(p[P_RKIND])
    clip = p[P_CLIP]
    if kind == 2:
        return _log_return(r, clip)
    eta = p[P_ETA]
    a = st[E_RW_A]
    b = st[E_RW_B]
    n = st[E_RW_N]
    if kind == 0:
        if n < p[P_WARMUP]:
            out = _log_return(r, clip)
        else:
            dd = max(math.sqrt(b), p[P_FLOOR])
            x = r - 0.5 * a
            if r > 0:
                out = _clip(x / dd, clip)
            else:
                out = _clip((dd * dd * x - 0.5 * a * r * r) / (dd * dd * dd), clip)
        st[E_RW_A] = a + eta * (r - a)
        neg = min(r, 0.0)
        st[E_RW_B] = b + eta * (neg * neg - b)
    else:
        if n < p[P_WARMUP]:
            out = _log_return(r, clip)
        else:
            sd = max(math.sqrt(max(b - a * a, 0.0)), p[P_FLOOR])
            d_a = r - a
            d_b = r * r - b
            out = _clip((b * d_a - 0.5 * a * d_b) / (sd * sd * sd), clip)
        st[E_RW_A] = a + eta * (r - a)
        st[E_RW_B] = b + eta * (r * r - b)
    st[E_RW_N] = n + 1.0
    return out


@njit(**_INLINE_OPTS)
def write_observation(fs, is_, bars, market_obs, p, obs):  # pragma: no cover - compiled
    """``obs[:F] = market_obs[t]``, then the 6 account features of ``envs.trading_env.ACCOUNT_FEATURES``."""
    t = int(fs[E_T])
    nm = market_obs.shape[1]
    for j in range(nm):
        obs[j] = market_obs[t, j]
    side = is_[I_SIDE]
    equity = fs[E_EQUITY]
    peak = fs[E_PEAK]
    mark = bars[t, B_CLOSE]
    den = max(1e-09, equity)
    if side == 0:
        exposure = 0.0
        lev_frac = 0.0
        upnl = 0.0
        bars_frac = 0.0
    else:
        qty = fs[F_QTY]
        exposure = side * qty * mark / den
        lev_frac = fs[F_LEV] / p[P_MAX_LEV_OBS]
        upnl = side * qty * (mark - fs[F_ENTRY]) / den
        bars_frac = min(is_[I_BARS] / 720, 1.0)
    dd = max(0.0, 1.0 - equity / peak) if peak > 0 else 0.0
    obs[nm] = float(side)
    obs[nm + 1] = exposure
    obs[nm + 2] = lev_frac
    obs[nm + 3] = upnl
    obs[nm + 4] = bars_frac
    obs[nm + 5] = dd
