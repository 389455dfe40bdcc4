"""Seed ensembles (``ats ensemble``, :mod:`agents.ensemble`): several bundles written and served as one bundle.

The members are small real bundles (:mod:`tests.serving.bundle_kit`, seconds, no PPO training) trained as the
seeds of one run are: the same candles, feature config and regime models (byte-identical files), a different
TCN, normaliser and actor per seed (:func:`tests.serving.bundle_kit.build_bundle` seeds torch with the seed),
each actor made to trade (:func:`tests.serving.bundle_kit.make_it_trade`) so that the members disagree. Their
manifests carry a seed, a name and validation metrics, as a trained run's do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import talib
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from agents.bundle import MANIFEST, load_bundle, sha256_file
from agents.ensemble import EnsembleActor, EnsembleError, build_ensemble, combine_actions
from agents.observation import schema_hash
from agents.policy import FrozenPPOPolicy
from ats_cli.main import app
from envs import ENV_ID
from envs.actions import ActionConfig, decode_action
from envs.trading_env import EnvConfig
from market.decision import DecisionContext, NonFiniteDecisionError, PositionView
from market.features import FeatureConfig
from regime.hmm import ModelLoadError
from serving.hotswap import BundleRejected, PolicySlot, load_frozen_policy, validate_candidate
from serving.loop import ServeConfig, run_replay
from serving.store import StateStore
from tests.kit.candles import make_candles
from tests.serving import bundle_kit as kit
from tests.serving.fakes import ScriptedFallback
from training.evaluate import bundle_span, span_env_data

HOUR = pd.Timedelta("1h")
SEEDS = (0, 1, 2)
DZ = ActionConfig().direction_dead_zone


def _as_trained(bundle: Path, seed: int) -> Path:
    """Give a kit bundle's manifest what a trained run's has: name, seed, validation metrics, selected step (the
    manifest is not in its own file table, so the bundle still loads)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["config"] = {**manifest["config"], "name": f"kit-seed{seed}", "seed": seed}
    manifest["metrics"] = {"validation": {"sortino": 0.25 * seed, "total_return": 0.01 * seed}, "selected_step": 512}
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return bundle


def _edit_manifest(bundle: Path, **changes) -> Path:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest.update(changes)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return bundle


@pytest.fixture(scope="module")
def train_candles() -> pd.DataFrame:
    return make_candles(1_600, seed=0)


@pytest.fixture(scope="module")
def members(tmp_path_factory, train_candles) -> list[Path]:
    root = tmp_path_factory.mktemp("members")
    return [_as_trained(kit.make_it_trade(kit.build_bundle(root / f"seed{s}", candles=train_candles, seed=s)), s)
            for s in SEEDS]


@pytest.fixture(scope="module")
def mean_ensemble(members, tmp_path_factory) -> Path:
    return build_ensemble(members, tmp_path_factory.mktemp("ens") / "mean", "mean")


@pytest.fixture(scope="module")
def majority_ensemble(members, tmp_path_factory) -> Path:
    return build_ensemble(members, tmp_path_factory.mktemp("ens") / "majority", "majority")


@pytest.fixture(scope="module")
def candles() -> pd.DataFrame:
    """Candles the members never saw (another seed of the candle factory)."""
    return make_candles(1_400, seed=5)


def _contexts(candles: pd.DataFrame, history: int, bars) -> list[DecisionContext]:
    return [DecisionContext(candles.index[t], candles.iloc[t + 1 - history : t + 1], PositionView(), 10_000.0)
            for t in bars]


# ---------------------------------------------------------------------------------------------
# the combination rules


def test_mean_and_majority_by_hand():
    a = np.array([[0.8, 0.2, -0.4, 0.0, 1.0],
                  [0.5, -0.6, 0.4, 0.5, 0.0],
                  [-0.9, 1.0, 1.0, -1.0, -1.0]], np.float32)  # fmt: skip
    np.testing.assert_allclose(combine_actions(a, "mean", DZ), [0.4 / 3, 0.6 / 3, 1.0 / 3, -0.5 / 3, 0.0], atol=1e-7)
    # votes +1, +1, -1: long, every component the mean of the two longs
    np.testing.assert_allclose(combine_actions(a, "majority", DZ), [0.65, -0.2, 0.0, 0.25, 0.5], atol=1e-7)
    # a tie of one long and one short, no flat member: flat (a0 = 0), the rest the mean of both
    tie = combine_actions(a[[0, 2]], "majority", DZ)
    np.testing.assert_allclose(tie, [0.0, 0.6, 0.3, -0.5, 0.0], atol=1e-7)
    assert decode_action(tie, ActionConfig()).direction == 0
    # long, short and flat: the sum is 0, flat; the flat member is the one that agrees
    flat = np.array([0.1, 0.3, 0.3, 0.3, 0.3], np.float32)
    np.testing.assert_allclose(combine_actions(np.vstack([a[0], a[2], flat]), "majority", DZ), flat, atol=1e-7)
    # the mean of agreeing members stays in their direction's interval, even right at the dead zone
    edge = np.array([[DZ + 1e-6, 0, 0, 0, 0], [1.0, 0, 0, 0, 0], [-0.2, 0, 0, 0, 0]], np.float32)
    assert decode_action(combine_actions(edge, "majority", DZ), ActionConfig()).direction == 1
    # the dead zone decides the votes: with 0.85, 0.8 and 0.5 are flat votes and the one short wins
    np.testing.assert_allclose(combine_actions(a, "majority", 0.85), a[2], atol=1e-7)
    for bad, match in (((a, "median"), "mode"), ((a[:, :4], "mean"), "shape"),
                       ((np.where(a == 1.0, np.nan, a), "mean"), "non-finite")):
        with pytest.raises(ValueError, match=match):
            combine_actions(bad[0], bad[1], DZ)


# ---------------------------------------------------------------------------------------------
# the ensemble's actions on real observations


def test_mean_is_the_arithmetic_mean_of_the_members_on_real_observations(members, mean_ensemble, candles):
    """Serving path: each policy builds its observation from the candles; inside the ensemble every member's
    action is exactly the one it gives alone (its own normaliser and TCN), and the ensemble's is their mean."""
    ens = FrozenPPOPolicy(load_bundle(mean_ensemble))
    solo = [FrozenPPOPolicy(load_bundle(m)) for m in members]
    history = ens.history_bars(HOUR)
    assert history == solo[0].history_bars(HOUR)
    split = 0
    for ctx in _contexts(candles, history, range(1_100, 1_400, 40)):
        decision = ens.decide(ctx)
        raw = np.stack([(p.decide(ctx), p.last_raw_action)[1] for p in solo])
        assert isinstance(ens.bundle.actor, EnsembleActor)
        np.testing.assert_array_equal(ens.bundle.actor.last_member_actions, raw)
        np.testing.assert_allclose(ens.last_raw_action, raw.astype(np.float64).mean(axis=0), rtol=0, atol=1e-7)
        assert decision == decode_action(ens.last_raw_action, ens.bundle.env_config.actions)
        split += len({decode_action(r, ActionConfig()).direction for r in raw}) > 1
    assert split >= 3, "the members should disagree on some bars, or the test shows nothing"


def test_evaluation_observation_gives_each_member_its_own(members, mean_ensemble, candles):
    """Evaluation path (``training.evaluate.span_env_data``, what ``ats evaluate`` trades): the ensemble's
    observation holds the shared columns once and each member's signal columns; a member's view of it is the
    observation that member gets in its own evaluation."""
    ens = load_bundle(mean_ensemble)
    start, end = candles.index[1_250], candles.index[1_320]
    env_e = span_env_data(ens, bundle_span(ens, candles, start, end))
    assert list(env_e.market_obs_names) == ens.market_obs_names
    assert [n for n in ens.market_obs_names if n.endswith("signal_p_up")] == [f"m{i}_signal_p_up" for i in SEEDS]
    solos = [load_bundle(m) for m in members]
    envs = [span_env_data(b, bundle_span(b, candles, start, end)) for b in solos]
    account = np.zeros(6, np.float32)
    for row in range(0, len(env_e.market_obs), 9):
        obs = np.concatenate([env_e.market_obs[row], account])
        views = ens.actor.member_observations(obs)
        acts = []
        for b, env, view in zip(solos, envs, views, strict=True):
            np.testing.assert_array_equal(view, np.concatenate([env.market_obs[row], account]))
            acts.append(b.actor.act(view))
        np.testing.assert_allclose(ens.actor.act(obs), np.mean(acts, axis=0), rtol=0, atol=1e-7)


def test_majority_takes_the_direction_of_most_members_and_their_mean(majority_ensemble, candles):
    ens = FrozenPPOPolicy(load_bundle(majority_ensemble))
    cfg = ens.bundle.env_config.actions
    votes_seen = set()
    for ctx in _contexts(candles, ens.history_bars(HOUR), range(1_100, 1_400, 30)):
        decision = ens.decide(ctx)
        acts = ens.bundle.actor.last_member_actions
        votes = np.array([decode_action(a, cfg).direction for a in acts])
        want = int(np.sign(votes.sum()))
        assert decision.direction == want
        agree = acts[votes == want]
        if len(agree):
            np.testing.assert_allclose(ens.last_raw_action, agree.astype(np.float64).mean(axis=0), atol=1e-7)
        votes_seen.add(tuple(sorted(votes.tolist())))
    assert any(len(set(v)) > 1 for v in votes_seen), votes_seen  # some bars with a split vote


def _mirror(bundle: Path, dst: Path) -> Path:
    """A copy of ``bundle`` whose actor's direction output is negated: long where the original is short."""
    out = kit.copy_bundle(bundle, dst)
    path = out / "policy.safetensors"
    tensors = load_file(str(path))
    for key in (k for k in tensors if k.startswith("action_net.")):
        tensors[key][0] = -tensors[key][0]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    kit.rehash(out, "policy.safetensors")
    return out


def test_majority_tie_is_flat_on_real_observations(members, candles, tmp_path):
    """Two members that always vote opposite directions (the second is the first with its direction negated):
    every bar is a tie or a flat vote, so the ensemble is always flat; on a tie a0 is 0."""
    mirror = _mirror(members[0], tmp_path / "mirror")
    ens = FrozenPPOPolicy(load_bundle(build_ensemble([members[0], mirror], tmp_path / "tie", "majority")))
    cfg = ens.bundle.env_config.actions
    ties = 0
    for ctx in _contexts(candles, ens.history_bars(HOUR), range(1_100, 1_400, 30)):
        assert ens.decide(ctx).direction == 0
        acts = ens.bundle.actor.last_member_actions
        votes = [decode_action(a, cfg).direction for a in acts]
        assert votes[0] == -votes[1]
        if votes[0] != 0:
            ties += 1
            assert ens.last_raw_action[0] == 0.0
            np.testing.assert_allclose(ens.last_raw_action[1:], acts[:, 1:].astype(np.float64).mean(axis=0), atol=1e-7)
    assert ties >= 3


# ---------------------------------------------------------------------------------------------
# members that cannot form an ensemble


def _refused(tmp_path: Path, dirs, match: str, mode: str = "mean") -> None:
    out = tmp_path / "E"
    with pytest.raises(EnsembleError, match=match):
        build_ensemble(dirs, out, mode)
    assert not out.exists() and not list(tmp_path.glob(".E.partial-*"))  # nothing half-written left


def test_refuses_fewer_than_two_members_twice_the_same_bundle_a_nested_ensemble_and_a_bad_mode(
        members, mean_ensemble, tmp_path):
    _refused(tmp_path, members[:1], "at least 2 member bundles, got 1")
    _refused(tmp_path, [members[0], members[1], members[0]], "the same files as .*seed0: the same bundle twice")
    _refused(tmp_path, [mean_ensemble, members[0]], "mean is itself an ensemble")
    _refused(tmp_path, members, "mode must be one of mean, majority, got 'median'", mode="median")
    (tmp_path / "E").mkdir()
    with pytest.raises(EnsembleError, match="exists"):
        build_ensemble(members, tmp_path / "E", "mean")


@pytest.mark.parametrize("case", ["schema", "symbol", "span", "action", "env", "config", "regime"])
def test_refuses_members_that_differ_and_names_the_bundle(case, members, train_candles, tmp_path, monkeypatch):
    odd = tmp_path / f"odd-{case}"
    if case == "schema":  # another feature config: other observation columns
        monkeypatch.setattr(kit, "FeatureConfig", lambda: FeatureConfig(return_horizons_bars=(1, 3, 6, 12, 24)))
        kit.build_bundle(odd, candles=train_candles, seed=3)
        match = "observation schema hash differs"
    elif case == "symbol":
        _edit_manifest(kit.copy_bundle(members[1], odd), data={"synthetic": True, "symbol": "ETHUSDT"})
        match = r"symbol\(s\) differs .*symbol: 'ETHUSDT' vs None"
    elif case == "span":
        _edit_manifest(kit.copy_bundle(members[1], odd),
                       data={"synthetic": True, "train": ["2021-01-01", "2021-02-01", 744]})
        match = r"data \(span, files or hashes\) differs .*train"
    elif case == "action":
        kit.build_bundle(odd, candles=train_candles, seed=3, env=EnvConfig(actions=ActionConfig(direction_dead_zone=0.2)))
        match = "env action config differs .*direction_dead_zone: 0.2 vs 0.3"
    elif case == "env":
        kit.build_bundle(odd, candles=train_candles, seed=3, env=EnvConfig(initial_equity_usdt=20_000.0))
        match = "env config differs .*initial_equity_usdt: 20000.0 vs 10000.0"
    elif case == "config":
        manifest = json.loads((members[1] / MANIFEST).read_text())
        _edit_manifest(kit.copy_bundle(members[1], odd), config={**manifest["config"], "ppo": {"n_steps": 64}})
        match = "run config differs .*ppo: .*n_steps.* vs '<absent>'"
    else:  # the same config on other candles: another HMM scaling and LightGBM model
        kit.build_bundle(odd, candles=make_candles(1_600, seed=9), seed=3)
        match = r"feature config or regime model files \(SHA-256\) differ .*regime/hmm/regime_hmm.npz"
    _refused(tmp_path, [members[0], odd, members[2]], f"ensemble member {odd}: {match}")


def test_members_may_differ_in_name_seed_device_and_threads(members, tmp_path):
    manifest = json.loads((members[1] / MANIFEST).read_text())
    other = _edit_manifest(kit.copy_bundle(members[1], tmp_path / "m1"),
                           config={**manifest["config"], "name": "renamed", "seed": 41, "device": "cuda",
                                   "torch_threads": 8})  # fmt: skip
    out = build_ensemble([members[0], other], tmp_path / "E", "mean")
    assert [m["seed"] for m in json.loads((out / MANIFEST).read_text())["ensemble"]["members"]] == [0, 41]


# ---------------------------------------------------------------------------------------------
# the bundle on disk and the loader


def test_manifest_records_every_member_and_the_loader_checks_the_schema(members, mean_ensemble):
    manifest = json.loads((mean_ensemble / MANIFEST).read_text())
    block = manifest["ensemble"]
    assert block["mode"] == "mean" and len(block["members"]) == len(members)
    for i, (rec, src) in enumerate(zip(block["members"], members, strict=True)):
        src_manifest = json.loads((src / MANIFEST).read_text())
        assert rec["dir"] == f"members/m{i}" and rec["source"] == str(src.resolve())
        assert rec["manifest_sha256"] == sha256_file(src / MANIFEST) == sha256_file(mean_ensemble / rec["dir"] / MANIFEST)
        assert rec["seed"] == SEEDS[i] and rec["name"] == f"kit-seed{SEEDS[i]}"
        assert rec["validation"] == src_manifest["metrics"]["validation"] and rec["selected_step"] == 512
        for rel, digest in src_manifest["files"].items():  # copied verbatim
            assert sha256_file(mean_ensemble / rec["dir"] / rel) == digest
    on_disk = {p.relative_to(mean_ensemble).as_posix() for p in mean_ensemble.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {MANIFEST}  # every member file (and member manifest) is hashed
    assert manifest["config"]["seed"] == list(SEEDS) and "ensemble of 3" in manifest["config"]["name"]
    bundle = load_bundle(mean_ensemble)
    assert manifest["observation"]["schema_hash"] == schema_hash(bundle.market_obs_names, {"env_id": ENV_ID})
    assert bundle.actor.obs_dim == len(bundle.market_obs_names) + 6
    assert manifest["observation"]["market_obs_names"] == bundle.market_obs_names
    assert manifest["action"] == json.loads((members[0] / MANIFEST).read_text())["action"]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _rehash_ensemble(ens: Path, rel: str) -> None:
    manifest = json.loads((ens / MANIFEST).read_text())
    manifest["files"][rel] = sha256_file(ens / rel)
    (ens / MANIFEST).write_text(json.dumps(manifest, indent=1))


def test_a_corrupted_member_file_is_refused_by_the_loader(mean_ensemble, tmp_path):
    ens = kit.copy_bundle(mean_ensemble, tmp_path / "E")
    rel = "members/m1/signals/tcn/tcn.safetensors"
    _flip_byte(ens / rel)
    with pytest.raises(ModelLoadError, match=f"bundle file {ens / rel} does not match its SHA-256"):
        load_bundle(ens)
    # the ensemble's table rewritten to the damaged file: the member's own manifest still refuses it
    _rehash_ensemble(ens, rel)
    with pytest.raises(ModelLoadError, match=f"bundle file {ens / rel} does not match its SHA-256"):
        load_bundle(ens)
    # the member's manifest rewritten as well: it is no longer the member manifest the ensemble recorded
    kit.rehash(ens / "members" / "m1", "signals/tcn/tcn.safetensors")
    _rehash_ensemble(ens, "members/m1/manifest.json")
    with pytest.raises(EnsembleError, match=r"members/m1/manifest\.json is not the member manifest the ensemble recorded"):
        load_bundle(ens)


def test_a_member_swapped_for_another_config_is_refused_on_load(members, mean_ensemble, train_candles, tmp_path):
    """Someone who replaces a member folder and rewrites every hash: the members are checked against each other
    again when the ensemble loads."""
    ens = kit.copy_bundle(mean_ensemble, tmp_path / "E")
    shutil.rmtree(ens / "members" / "m2")
    kit.build_bundle(ens / "members" / "m2", candles=train_candles, seed=2,
                     env=EnvConfig(actions=ActionConfig(direction_dead_zone=0.1)))
    manifest = json.loads((ens / MANIFEST).read_text())
    manifest["files"] = {p.relative_to(ens).as_posix(): sha256_file(p) for p in ens.rglob("*")
                         if p.is_file() and p.relative_to(ens).as_posix() != MANIFEST}
    manifest["ensemble"]["members"][2]["manifest_sha256"] = sha256_file(ens / "members" / "m2" / MANIFEST)
    (ens / MANIFEST).write_text(json.dumps(manifest, indent=1))
    with pytest.raises(EnsembleError, match="members/m2: env action config differs"):
        load_bundle(ens)


@pytest.mark.parametrize("mode", ["mean", "majority"])
def test_a_member_answering_nan_makes_the_ensemble_fall_back(mode, members, candles, tmp_path):
    """A member whose actor answers NaN (it loads: its weights are hashed): the ensemble's action is NaN, so the
    decision raises NonFiniteDecisionError (serving falls back to V1) and the hot-swap probe rejects the bundle,
    in majority mode too (where a NaN direction would otherwise count as a flat vote)."""
    poisoned = kit.copy_bundle(members[1], tmp_path / "nan")
    kit.nan_weights(poisoned)
    ens_dir = build_ensemble([members[0], poisoned, members[2]], tmp_path / "E", mode)
    policy = FrozenPPOPolicy(load_bundle(ens_dir))
    ctx = _contexts(candles, policy.history_bars(HOUR), [1_200])[0]
    with pytest.raises(NonFiniteDecisionError):
        policy.decide(ctx)
    assert policy.last_raw_action is not None and np.isnan(policy.last_raw_action).all()
    with pytest.raises(BundleRejected, match="probe: non-finite action"):
        validate_candidate(ens_dir, load_frozen_policy, None)


# ---------------------------------------------------------------------------------------------
# served like any bundle: paper replay, hot-swap, command line


def test_paper_replay_hot_swaps_from_a_member_to_the_ensemble(members, mean_ensemble, candles, tmp_path):
    """The serving loop with the hot-swap loader: a member serves, the ensemble dropped into the watched folder is
    validated (hashes, schema, probe) and swapped in between bars; every bar is decided by V2, and from the swap
    on the raw actions are the ensemble's."""
    history = FrozenPPOPolicy(load_bundle(members[0])).history_bars(HOUR)
    warmup, n = 1_300, 12
    watch = tmp_path / "incoming"
    watch.mkdir()
    slot = PolicySlot.from_bundle(members[0], watch_dir=watch)
    assert slot.policy is not None

    def progress(i: int, total: int) -> None:
        if i == warmup + 4:
            shutil.copytree(mean_ensemble, watch / "ensemble")

    c = candles.iloc[: warmup + n]
    atr = talib.ATR(c.high.to_numpy(), c.low.to_numpy(), c.close.to_numpy(), 14)
    store = StateStore("sqlite://")
    run_replay(c, primary=slot, fallback=ScriptedFallback(), atr=atr, costs=EnvConfig().costs, store=store,
               config=ServeConfig(warmup_bars=warmup, context_bars=history, decision_timeout_ms=600_000),
               progress=progress)  # fmt: skip
    ev = store.events()
    swaps = ev[ev.kind == "bundle_swapped"]
    assert len(swaps) == 1 and swaps.time.iloc[0] == c.index[warmup + 4]
    d = store.decisions().reset_index(drop=True)
    assert len(d) == n and set(d.source) <= {"v2", "guard"} and (d.source == "v2").sum() >= n - 2
    assert slot.source == watch / "ensemble"
    actor = slot.policy.bundle.actor
    assert isinstance(actor, EnsembleActor) and actor.last_member_actions.shape == (len(members), 5)
    # the last bar's recorded raw action is the mean of the three members' actions on that bar
    assert d.source.iloc[-1] == "v2"
    np.testing.assert_allclose(d.raw_action.iloc[-1], actor.last_member_actions.astype(np.float64).mean(axis=0),
                               atol=1e-7)
    assert np.isfinite(np.stack(d.raw_action.to_numpy())).all()


def test_cli_writes_the_ensemble_and_serves_it_on_a_paper_replay(members, tmp_path):
    runner = CliRunner()
    out = tmp_path / "E"
    args = ["ensemble", *[a for m in members for a in ("--bundle", str(m))], "--mode", "majority", "--out", str(out)]
    r = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert str(out) in r.output and json.loads((out / MANIFEST).read_text())["ensemble"]["mode"] == "majority"
    replay = tmp_path / "candles.parquet"
    make_candles(1_260, seed=7).to_parquet(replay)
    db = tmp_path / "s.sqlite"
    r = runner.invoke(app, ["serve", "--mode", "paper", "--replay", str(replay), "--bundle", str(out), "--db", str(db),
                            "--warmup-bars", "1200", "--max-bars", "15", "--symbol", "BTC/USDT:USDT"],
                      env={"COLUMNS": "250"})  # fmt: skip
    assert r.exit_code == 0, r.output
    d = StateStore.sqlite(db).decisions()
    assert len(d) == 15 and set(d.source) <= {"v2", "guard"} and (d.source == "v2").any()
    assert np.isfinite(np.stack(d.raw_action.to_numpy())).all()


def test_cli_refusal_is_one_message_and_exit_code_2(members, train_candles, tmp_path):
    odd = kit.build_bundle(tmp_path / "odd", candles=train_candles, seed=3,
                           env=EnvConfig(actions=ActionConfig(direction_dead_zone=0.2)))
    r = CliRunner().invoke(app, ["ensemble", "--bundle", str(members[0]), "--bundle", str(odd), "--out",
                                 str(tmp_path / "E")], env={"COLUMNS": "400", "ATS_DEBUG": ""})  # fmt: skip
    assert r.exit_code == 2, r.output
    assert f"ensemble member {odd}: env action config differs" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "E").exists()
    r = CliRunner().invoke(app, ["ensemble", "--bundle", str(members[0]), "--bundle", str(tmp_path / "nope"),
                                 "--out", str(tmp_path / "E")], env={"COLUMNS": "400", "ATS_DEBUG": ""})  # fmt: skip
    assert r.exit_code == 2 and "nope" in r.output and "Traceback" not in r.output
