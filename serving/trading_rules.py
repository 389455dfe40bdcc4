"""The env's trading rules in serving: when the policy is asked, when a decision is read as a hold, what live serves.

A bundle's env carries execution rules (:class:`envs.config.TradingRulesConfig`, issue 16's levers): the agent acts
only at *decision bars* (``decision_interval_bars`` k: bars closing at a multiple of k bars since the Unix epoch,
:func:`envs.accounting.is_decision_bar`), a decision cannot close or flip a position held for fewer than
``min_hold_bars`` bars, and with ``rebalance_band_frac`` a decision in the held direction resizes the position. The
serving loops apply them as the env does, by pure functions of the bar and the position (no counter: a restart
changes nothing):

* **decision bars** (:func:`decides_at`): the paper and live loops ask the policy only at decision bars; between
  them the bar is a hold (source 'guard', reason :func:`not_decision_bar_reason`), and stops, take-profits,
  liquidation and funding act as always;
* **minimum holding period** (:func:`min_hold_reason`): a decision that would close or flip a position held for
  fewer bars (``bars_in_trade`` at the decided bar's close, the kernel's count) is a hold (source 'guard');
  the risk guard still acts after it (a kill switch is not held back);
* **rebalance band**: the paper broker resizes as the kernel does (:class:`serving.paper.PaperBroker`); the live
  loop has no partial resize orders yet, so it refuses a bundle that sets a band (:func:`live_rules_problem`:
  :class:`UnservableBundleError` at start, ``bundle_rejected`` for a hot-swap candidate through
  :func:`load_live_policy`) instead of trading it differently from its backtest;
* **limit entries** (``env.costs.entry_order = "limit"``, :class:`envs.config.CostConfig`): the paper broker enters
  as the kernel does (a limit at the open, filled only on a trade-through); live sends market entries, so it
  refuses such a bundle the same way.

The rules of a run are its primary bundle's (:func:`bundle_env_config`); a run whose primary is not a bundle
policy (tests, V1 alone) trades by the defaults (every bar, no holding period, no resize) unless it is given rules.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from agents.policy import FrozenPPOPolicy
from envs.accounting import is_decision_bar
from envs.config import CostConfig, TradingRulesConfig
from envs.trading_env import EnvConfig
from market import json_codec
from market.decision import Policy
from serving.errors import FatalError
from serving.hotswap import load_frozen_policy

__all__ = [
    "UnservableBundleError", "bundle_env_config", "decides_at", "live_rules_problem", "load_live_policy",
    "min_hold_reason", "not_decision_bar_reason", "refuse_unservable_bundle", "require_live_servable",
]  # fmt: skip


class UnservableBundleError(FatalError):
    """The live loop cannot trade a bundle's rules as its env does (the message says which and what to do)."""


def bundle_env_config(policy: Policy | None) -> EnvConfig | None:
    """The env config of a bundle policy (:class:`agents.policy.FrozenPPOPolicy`: ``bundle.env_config``), else None."""
    return policy.bundle.env_config if isinstance(policy, FrozenPPOPolicy) else None


def decides_at(bar_open_time: pd.Timestamp, bar_interval: pd.Timedelta | None,
               rules: TradingRulesConfig | None) -> bool:  # fmt: skip
    """True when the decision at the close of the bar opening at ``bar_open_time`` is read: always with a decision
    interval of 1 (or no rules), else :func:`envs.accounting.is_decision_bar` (the bar closes at a multiple of
    ``decision_interval_bars`` bars since the epoch).

    Raises
    ------
    ValueError
        A decision interval > 1 without a positive ``bar_interval``.
    """
    k = 1 if rules is None else rules.decision_interval_bars
    if k == 1:
        return True
    if bar_interval is None or not bar_interval > pd.Timedelta(0):
        raise ValueError(f"a decision interval of {k} bars needs the bar length, got {bar_interval!r}")
    return bool(is_decision_bar(int(pd.Timestamp(bar_open_time).value), int(bar_interval.value), k))


def not_decision_bar_reason(rules: TradingRulesConfig) -> str:
    """Decision-row reason of a bar between two decision bars (the policy is not asked)."""
    return (f"not_decision_bar: decisions are read at bars closing at a multiple of {rules.decision_interval_bars} "
            "bars since the epoch (trading_rules.decision_interval_bars); a hold")  # fmt: skip


def min_hold_reason(direction: int, side: int, bars_in_trade: int | None,
                    rules: TradingRulesConfig | None) -> str | None:  # fmt: skip
    """Why a decision of ``direction`` is read as a hold under the minimum holding period, else None.

    It is when a position is open (``side`` != 0), the decision would close or flip it (``direction != side``) and
    the position has been held for fewer than ``rules.min_hold_bars`` bars (``bars_in_trade``: closes since its
    entry fill, at the decided bar's close; the kernel's count). ``bars_in_trade`` None (a position we did not
    open: its age is unknown) is never held back.
    """
    m = 0 if rules is None else rules.min_hold_bars
    if m == 0 or side == 0 or direction == side or bars_in_trade is None or bars_in_trade >= m:
        return None
    return (f"min_hold: the position is {bars_in_trade} bar(s) old, under trading_rules.min_hold_bars={m}; the "
            f"decision (direction {direction}) is read as a hold")  # fmt: skip


def live_rules_problem(rules: TradingRulesConfig | None, costs: CostConfig | None = None) -> str | None:
    """Why the live loop cannot trade ``rules`` and ``costs`` as the env does (None: it can): a rebalance band, or
    limit entries (``costs.entry_order = "limit"``: the env enters with a limit order at the open filled only on
    a trade-through, and live serving sends market entries)."""
    if rules is not None and rules.rebalance_band_frac is not None:
        return (f"trading_rules.rebalance_band_frac={rules.rebalance_band_frac} is set: the env resizes a held "
                "position towards its aim (partial closes and adds), and live serving has no partial resize "
                "orders yet; serve this bundle on paper, or train without the band (rebalance_band_frac: null)")
    if costs is not None and costs.entry_order != "market":
        return (f"costs.entry_order={costs.entry_order!r} is set: the env enters with a limit order at the open "
                "(maker fee, filled only when the bar trades through it, else no entry), and live serving places "
                "market entries only (no post-only entry orders yet); serve this bundle on paper, or train with "
                "entry_order: market")
    return None


def require_live_servable(rules: TradingRulesConfig | None, what: str, costs: CostConfig | None = None) -> None:
    """Raise :class:`UnservableBundleError` naming ``what`` (e.g. the bundle) when :func:`live_rules_problem` finds
    one."""
    problem = live_rules_problem(rules, costs)
    if problem is not None:
        raise UnservableBundleError(f"refusing to serve {what} live: {problem}")


def load_live_policy(path: Path) -> Policy:
    """The hot-swap loader of the live loop: :func:`serving.hotswap.load_frozen_policy`, refusing a bundle whose
    rules live cannot trade (:class:`UnservableBundleError`; the slot rejects the candidate and keeps the current
    policy)."""
    policy = load_frozen_policy(path)
    env = bundle_env_config(policy)
    require_live_servable(None if env is None else env.trading_rules, f"bundle {path}",
                          None if env is None else env.costs)  # fmt: skip
    return policy


def refuse_unservable_bundle(bundle_dir: Path) -> None:
    """Raise :class:`UnservableBundleError` when the bundle at ``bundle_dir`` sets rules live cannot trade (read from
    its ``policy.json``, before any model is loaded); an unreadable file is left to the bundle's loader to report.
    """
    try:
        meta = json_codec.loads((Path(bundle_dir) / "policy.json").read_text())
        env = EnvConfig.model_validate(meta["env_config"])
    except Exception:  # noqa: BLE001 - the loader names what is wrong with the bundle
        return
    require_live_servable(env.trading_rules, f"bundle {bundle_dir}", env.costs)
