"""Bundle faults, primary backoff and hot-swap: V1 decides the very bar the bundle fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import talib

from agents.bundle import load_bundle
from agents.policy import FrozenPPOPolicy
from envs.config import CostConfig
from market.decision import Decision, DecisionContext, PositionView, StatelessPolicy
from serving.hotswap import (
    BackoffConfig,
    BundleRejected,
    PolicySlot,
    backoff_bars,
    find_pickle_payloads,
    load_frozen_policy,
    reload_request_path,
    request_reload,
    validate_candidate,
)
from serving.loop import ServeConfig, run_replay
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.serving import bundle_kit as kit
from tests.serving.fakes import FakeClock, RaisingPolicy, ScriptedFallback, SlowPolicy

WARMUP, N_DECIDE = 700, 12
COSTS = CostConfig()


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> Path:
    return kit.build_bundle(tmp_path_factory.mktemp("bundle") / "good", seed=0)


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory) -> Path:
    return kit.build_bundle(tmp_path_factory.mktemp("bundle") / "other", seed=1)


@pytest.fixture(scope="module")
def candles() -> pd.DataFrame:
    return make_candles(WARMUP + N_DECIDE, seed=7)


def _atr(c: pd.DataFrame) -> np.ndarray:
    return talib.ATR(c.high.to_numpy(), c.low.to_numpy(), c.close.to_numpy(), 14)


NO_BACKOFF = BackoffConfig(initial_bars=0)


def _replay(candles, primary, *, backoff=NO_BACKOFF, progress=None, clock=None, fallback=None):
    store = StateStore("sqlite://")
    config = ServeConfig(warmup_bars=WARMUP, run_id="t", context_bars=700, primary_backoff=backoff)
    kw = {"clock": clock} if clock is not None else {}
    summary = run_replay(
        candles, primary=primary, fallback=fallback or ScriptedFallback(), atr=_atr(candles), costs=COSTS,
        store=store, config=config, progress=progress, **kw,
    )  # fmt: skip
    return summary, store


# ---------------------------------------------------------------------------------------------
# backoff schedule


def test_backoff_schedule() -> None:
    cfg = BackoffConfig(initial_bars=1, factor=2.0, max_bars=8)
    assert [backoff_bars(k, cfg) for k in range(7)] == [0, 1, 2, 4, 8, 8, 8]
    assert [backoff_bars(k, BackoffConfig(initial_bars=3, factor=1.0, max_bars=64)) for k in (1, 5)] == [3, 3]
    assert backoff_bars(5, BackoffConfig(initial_bars=0)) == 0
    assert backoff_bars(10_000, BackoffConfig()) == 64  # no overflow


def test_failing_primary_backs_off_and_every_bar_has_one_decision(candles) -> None:
    class Counting(RaisingPolicy):
        calls = 0

        def decide(self, ctx):
            self.calls += 1
            return super().decide(ctx)

    primary = Counting()
    summary, store = _replay(candles, primary, backoff=BackoffConfig(initial_bars=1, factor=2.0, max_bars=4))
    d = store.decisions()
    assert len(d) == N_DECIDE and list(d.bar_open_time) == list(candles.index[WARMUP:])
    assert set(d.source) == {"v1"}
    kinds = [r.split(":")[0] for r in d.fallback_reason]
    # asked at bars 0, 2, 5, 10 (skips 1, 2, 4, 4 bars)
    assert kinds == ["exception", "backoff", "exception", "backoff", "backoff", "exception"] + ["backoff"] * 4 + [
        "exception", "backoff"]  # fmt: skip
    assert primary.calls == 4
    assert d.fallback_reason[1] == "backoff: primary failed (exception) at bar 700, retried at bar 702"
    ev = store.events()
    assert list(ev[ev.kind == "primary_backoff"].detail.map(lambda x: x["skip_bars"])) == [1, 2, 4, 4]
    assert summary.fallback_reasons == {"exception": 4, "backoff": 8}


def test_backoff_resets_after_a_success(candles) -> None:
    class FailTwice(StatelessPolicy):
        name = "v2"
        calls = 0

        def decide(self, ctx):
            self.calls += 1
            if self.calls in (1, 3):
                raise RuntimeError("flaky")
            return Decision.flat()

    _, store = _replay(candles, FailTwice(), backoff=BackoffConfig(initial_bars=2, factor=2.0))
    src = list(store.decisions().source)
    # fail at 0 -> skip 2; ok at 3; fail at 4 -> skip 2 again (not 4: the success reset the count)
    assert src[:8] == ["v1", "v1", "v1", "v2", "v1", "v1", "v1", "v2"]


def test_deadline_miss_falls_back_on_the_same_bar(candles) -> None:
    clock = FakeClock()
    long = Decision(direction=1, leverage=2.0, size_frac=0.5)
    _, store = _replay(candles, SlowPolicy(clock, 3.0, long), clock=clock)
    d = store.decisions()
    assert (
        set(d.source) == {"v1"}
        and d.fallback_reason.str.startswith("deadline_exceeded: 3000 ms > 2000 ms").all()
    )


# ---------------------------------------------------------------------------------------------
# bundle faults: the bundle is refused at load and V1 decides from the first bar


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (kit.truncate_weights, "policy.safetensors does not match its SHA-256"),
        (kit.tamper_manifest_hash, "policy.json does not match its SHA-256"),
        (kit.nan_weights, "probe: non-finite action"),
        ("pickle", "pickle payload refused: policy.safetensors (pickle protocol 4 stream)"),
    ],
)
def test_faulty_bundle_is_refused_and_v1_decides(damage, expected, good_bundle, candles, tmp_path) -> None:
    bundle = kit.copy_bundle(good_bundle, tmp_path / "b")
    marker = tmp_path / "pwned"
    if damage == "pickle":
        kit.pickle_payload(bundle, marker)
    else:
        damage(bundle)
    slot = PolicySlot.from_bundle(bundle)
    assert slot.policy is None and expected in slot.load_error
    _, store = _replay(candles, slot)
    d = store.decisions()
    assert len(d) == N_DECIDE and set(d.source) == {"v1"}
    assert d.fallback_reason.str.startswith("bundle_load_failed: ").all()
    assert d.fallback_reason.str.contains(expected, regex=False).all()
    assert not marker.exists()  # the pickle was never executed


def test_pickle_is_refused_even_without_the_scan(good_bundle, tmp_path) -> None:
    """The loaders themselves never unpickle: the safetensors reader rejects the payload."""
    bundle = kit.copy_bundle(good_bundle, tmp_path / "b")
    marker = tmp_path / "pwned"
    kit.pickle_payload(bundle, marker)
    with pytest.raises(Exception, match="cannot read actor weights"):
        load_bundle(bundle)
    assert not marker.exists()


def test_find_pickle_payloads(good_bundle, tmp_path) -> None:
    assert find_pickle_payloads(good_bundle) == []
    bundle = kit.copy_bundle(good_bundle, tmp_path / "b")
    (bundle / "extra.pkl").write_bytes(b"not even a pickle")
    import zipfile

    with zipfile.ZipFile(bundle / "regime" / "hmm" / "x.npz", "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x04K\x01.")
    found = find_pickle_payloads(bundle)
    assert found == [
        "extra.pkl (pickle file suffix)",
        "regime/hmm/x.npz:archive/data.pkl (pickle inside a zip archive)",
    ]


def test_nan_output_at_decision_time_falls_back_on_the_same_bar(good_bundle, candles, tmp_path) -> None:
    """A bundle that loads but answers NaN on a bar (weights poisoned after the probe)."""
    policy = FrozenPPOPolicy(load_bundle(good_bundle))
    slot = PolicySlot(policy, source=good_bundle, backoff=BackoffConfig(initial_bars=0))

    def poison(i: int, n: int) -> None:
        if i == WARMUP + 5:  # after 5 decided bars
            with np.errstate(all="ignore"):
                for p in policy.bundle.actor.action_net.parameters():
                    p.data.fill_(float("nan"))

    _, store = _replay(candles, slot, progress=poison)
    d = store.decisions()
    assert list(d.source) == ["v2"] * 5 + ["v1"] * (N_DECIDE - 5)
    assert d.fallback_reason[5:].str.startswith("non_finite_action: ").all()
    assert np.isnan(d.raw_action[5]).all()  # the NaN action is kept for the audit


# ---------------------------------------------------------------------------------------------
# hot-swap between bars


def _drop_at(bar: int, action):
    def progress(i: int, n: int) -> None:
        if i == WARMUP + bar:
            action()

    return progress


def test_watched_directory_swaps_a_good_bundle_between_bars(
    good_bundle, other_bundle, candles, tmp_path
) -> None:
    watch = tmp_path / "incoming"
    watch.mkdir()
    slot = PolicySlot.from_bundle(good_bundle, watch_dir=watch)
    first = slot.policy
    _, store = _replay(
        candles, slot, progress=_drop_at(4, lambda: shutil.copytree(other_bundle, watch / "v2"))
    )
    ev = store.events()
    swaps = ev[ev.kind == "bundle_swapped"]
    assert (
        len(swaps) == 1 and swaps.time.iloc[0] == candles.index[WARMUP + 4]
    )  # the next bar, before deciding
    assert swaps.detail.iloc[0]["trigger"] == "watch_dir" and swaps.detail.iloc[0]["previous"] == str(
        good_bundle
    )
    assert slot.policy is not first and slot.source == watch / "v2"
    d = store.decisions()
    assert set(d.source) == {"v2"}  # no bar without a decision, none by V1
    # the new bundle decides from the swap bar on: its raw actions differ from the old one's
    assert (store.equity().position_side == 0).all()  # flat all along: the account part is the same for both
    t = WARMUP + 6
    ctx = DecisionContext(candles.index[t], candles.iloc[t - 699 : t + 1], PositionView(), 10_000.0)
    old, new = FrozenPPOPolicy(load_bundle(good_bundle)), FrozenPPOPolicy(load_bundle(other_bundle))
    old.decide(ctx)
    new.decide(ctx)
    np.testing.assert_allclose(d.raw_action[6], new.last_raw_action, atol=1e-6)
    assert not np.allclose(d.raw_action[6], old.last_raw_action)


@pytest.mark.parametrize(
    "damage", [kit.truncate_weights, kit.tamper_manifest_hash, kit.nan_weights, "pickle"]
)
def test_bad_bundle_in_watched_directory_is_rejected_and_the_old_one_kept(
    damage, good_bundle, candles, tmp_path
) -> None:
    watch = tmp_path / "incoming"
    watch.mkdir()
    slot = PolicySlot.from_bundle(good_bundle, watch_dir=watch)
    first = slot.policy

    def drop() -> None:
        bad = kit.copy_bundle(good_bundle, tmp_path / "staging")
        if damage == "pickle":
            kit.pickle_payload(bad, tmp_path / "pwned")
        else:
            damage(bad)
        shutil.move(str(bad), str(watch / "bad"))

    _, store = _replay(candles, slot, progress=_drop_at(3, drop))
    ev = store.events()
    rejected = ev[ev.kind == "bundle_rejected"]
    assert len(rejected) == 1 and rejected.detail.iloc[0]["kept"] == str(good_bundle)
    assert (ev.kind != "bundle_swapped").all()
    assert slot.policy is first and set(store.decisions().source) == {"v2"}
    assert not (tmp_path / "pwned").exists()


def test_reload_request_swaps_and_is_consumed(good_bundle, other_bundle, candles, tmp_path) -> None:
    db = tmp_path / "state.sqlite"
    req = reload_request_path(db)
    slot = PolicySlot.from_bundle(good_bundle, reload_file=req)
    _, store = _replay(candles, slot, progress=_drop_at(2, lambda: request_reload(req, other_bundle)))
    ev = store.events()
    swaps = ev[ev.kind == "bundle_swapped"]
    assert list(swaps.detail.map(lambda x: x["trigger"])) == ["reload_request"]
    assert slot.source == other_bundle.resolve() and not req.exists()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json missing"):
        request_reload(req, tmp_path)


def _with_verdict(bundle: Path, dest: Path, verdict: str | None) -> Path:
    import json

    out = kit.copy_bundle(bundle, dest)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("gate", None)
    if verdict:
        manifest["gate"] = {"verdict": verdict}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_testnet_hot_swap_needs_a_pass_verdict(good_bundle, other_bundle, candles, tmp_path) -> None:
    start = _with_verdict(good_bundle, tmp_path / "start", "PASS")
    held = _with_verdict(other_bundle, tmp_path / "held", "HOLD")
    passed = _with_verdict(other_bundle, tmp_path / "passed", "PASS")
    with pytest.raises(BundleRejected, match="verdict is HOLD, not PASS"):
        validate_candidate(held, load_frozen_policy, None, require_gate_pass=True)
    with pytest.raises(BundleRejected, match="absent"):
        validate_candidate(_with_verdict(other_bundle, tmp_path / "none", None), load_frozen_policy, None,
                           require_gate_pass=True)  # fmt: skip
    validate_candidate(held, load_frozen_policy, None)  # paper: the verdict is not required
    req = reload_request_path(tmp_path / "state.sqlite")
    slot = PolicySlot.from_bundle(start, reload_file=req, require_gate_pass=True)
    assert slot.policy is not None
    requests = {1: held, 3: passed}
    _, store = _replay(candles, slot, progress=lambda i, n: (i - WARMUP) in requests
                       and request_reload(req, requests[i - WARMUP]))  # fmt: skip
    ev = store.events()
    rejected = ev[ev.kind == "bundle_rejected"]
    assert len(rejected) == 1 and "HOLD" in rejected.detail.iloc[0]["reason"]
    assert slot.source == passed.resolve()


def test_failed_load_is_retried_after_backoff(good_bundle, candles, tmp_path) -> None:
    bundle = kit.copy_bundle(good_bundle, tmp_path / "b")
    kit.truncate_weights(bundle)
    slot = PolicySlot.from_bundle(bundle, backoff=BackoffConfig(initial_bars=1, factor=2.0, max_bars=64))
    assert slot.policy is None

    def repaired() -> None:
        shutil.copy(good_bundle / "policy.safetensors", bundle / "policy.safetensors")

    _, store = _replay(candles, slot, progress=_drop_at(3, repaired), backoff=slot.backoff)
    ev = store.events()
    assert list(ev[ev.kind.isin(["bundle_reload_failed", "bundle_swapped"])].kind) == [
        "bundle_reload_failed", "bundle_reload_failed", "bundle_swapped"]  # fmt: skip
    d = store.decisions()
    # load retried at bars 0 (fail, next try at 2), 2 (fail, next at 5), 5 (ok): V2 from bar 5
    assert list(d.source) == ["v1"] * 5 + ["v2"] * (N_DECIDE - 5)


def test_validate_candidate_rejects_a_directory_without_manifest(tmp_path) -> None:
    with pytest.raises(BundleRejected, match=r"no manifest\.json"):
        validate_candidate(tmp_path, load_frozen_policy, None)


# ---------------------------------------------------------------------------------------------
# the V2 observation served bar by bar (incremental HMM filter) equals the from-scratch one


def test_incremental_observation_matches_the_full_recomputation(good_bundle) -> None:
    bundle = load_bundle(good_bundle)
    candles = make_candles(1_300, seed=9)
    served = FrozenPPOPolicy(bundle)  # one policy over consecutive bars: HMM filter advanced one step per bar
    n_market = len(bundle.market_obs_names)
    worst = 0.0
    for t in range(1_285, 1_300):
        ctx = DecisionContext(candles.index[t], candles.iloc[t - 999 : t + 1], PositionView(), 10_000.0)
        got = served.observation(ctx)
        assert candles.index[t - 1] in served._filter_state or t == 1_285  # the incremental path was taken
        fresh = FrozenPPOPolicy(bundle).observation(ctx)  # filter re-run over the whole window
        worst = max(worst, float(np.abs(got[:n_market] - fresh[:n_market]).max()))
    assert worst < 1e-4, worst
    # the one-row LightGBM runs on a copy with its own thread count; the bundle's model is untouched
    other = FrozenPPOPolicy(bundle, lgbm_threads=2)
    assert other._models.transition.cfg.n_threads == 2 and bundle.models.transition.cfg.n_threads == 1


def test_history_is_bounded_to_min_history_bars(good_bundle) -> None:
    from market.features import min_history_bars

    bundle = load_bundle(good_bundle)
    candles = make_candles(2_500, seed=9)
    policy = FrozenPPOPolicy(bundle)
    assert policy.history_bars(pd.Timedelta("1h")) == min_history_bars(bundle.feature_config, "1h") == 1_000
    long_ctx = DecisionContext(candles.index[-1], candles, PositionView(), 10_000.0)  # 2,500 candles given
    short_ctx = DecisionContext(candles.index[-1], candles.iloc[-1_000:], PositionView(), 10_000.0)
    np.testing.assert_array_equal(
        FrozenPPOPolicy(bundle).observation(long_ctx), FrozenPPOPolicy(bundle).observation(short_ctx)
    )
