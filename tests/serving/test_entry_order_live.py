"""Live serving refuses a bundle whose env enters with limit orders (``CostConfig.entry_order = "limit"``, issue 16's
maker-priced entries): the kernel enters with a limit at the open filled only on a trade-through, live sends market
entries, so it would trade differently from its backtest. Refused like a rebalance band
(``test_serving_trading_rules.py``): at start, for ``ats serve --mode testnet|live``, and as a hot-swap candidate;
paper serving follows the kernel (``tests/envs/test_entry_limit.py``).
"""

from __future__ import annotations

import pytest

from agents.bundle import load_bundle
from agents.policy import FrozenPPOPolicy
from ats_cli.serve_live import build_live_loop
from envs.config import CostConfig
from envs.trading_env import EnvConfig
from serving.exchange import BinanceFuturesBroker, make_client
from serving.hotswap import BundleRejected, validate_candidate
from serving.live import LiveConfig, LiveLoop
from serving.store import StateStore
from serving.trading_rules import (
    UnservableBundleError,
    live_rules_problem,
    load_live_policy,
    refuse_unservable_bundle,
)
from tests.serving import bundle_kit as kit
from tests.serving.fakes import FlipPolicy, ScriptedFallback
from tests.serving.test_serving_trading_rules import fake  # noqa: F401 - the fake exchange fixture

LIMIT = CostConfig(entry_order="limit")


@pytest.fixture(scope="module")
def limit_bundle(tmp_path_factory):
    return kit.build_bundle(tmp_path_factory.mktemp("limit") / "bundle", env=EnvConfig(costs=LIMIT))


def _loop(fake, primary, costs=None) -> LiveLoop:  # noqa: F811 - the fixture's value
    client = make_client(api_key="k", secret="s", base_url=fake.url, timeout_ms=2_000, rate_limit=False)
    broker = BinanceFuturesBroker(client, read_attempts=3, sleep=lambda s: None)
    return LiveLoop(broker, StateStore("sqlite://"), LiveConfig(context_bars=1_010), primary=primary,
                    fallback=ScriptedFallback(), wall_clock_s=lambda: fake.now_ms / 1000.0, sleep=lambda s: None,
                    costs=costs)  # fmt: skip


def test_live_rules_problem_names_the_limit_entry() -> None:
    problem = live_rules_problem(None, LIMIT)
    assert problem is not None and problem.startswith("costs.entry_order='limit' is set")
    assert "serve this bundle on paper" in problem
    assert live_rules_problem(None, CostConfig()) is None and live_rules_problem(None, None) is None


def test_live_refuses_a_limit_entry_bundle_at_start_and_as_a_hot_swap_candidate(fake, limit_bundle, tmp_path) -> None:  # noqa: F811
    with pytest.raises(UnservableBundleError, match=r"refusing to serve the primary bundle live: costs\.entry_order"):
        _loop(fake, FrozenPPOPolicy(load_bundle(limit_bundle)))
    with pytest.raises(UnservableBundleError, match="refusing to serve these costs live"):
        _loop(fake, FlipPolicy(), LIMIT)
    with pytest.raises(UnservableBundleError, match="no post-only entry orders"):
        refuse_unservable_bundle(limit_bundle)
    client = make_client(api_key="k", secret="s", base_url=fake.url, timeout_ms=2_000, rate_limit=False)
    with pytest.raises(UnservableBundleError, match="entry_order"):  # ats serve --mode testnet|live
        build_live_loop(mode="testnet", bundle_dir=limit_bundle, store=StateStore("sqlite://"),
                        broker=BinanceFuturesBroker(client), live_config=LiveConfig(), force_gate=True,
                        use_guard=False, log=lambda m: None)  # fmt: skip
    with pytest.raises(BundleRejected, match="entry_order"):  # a hot-swap candidate: rejected, not served
        validate_candidate(limit_bundle, load_live_policy, None)
    _loop(fake, FlipPolicy(), CostConfig())  # market entries: served
