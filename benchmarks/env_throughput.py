"""Env throughput side by side: our env, our batched env, the minimal reference env, PPO fps on both.

Usage::

    python benchmarks/env_throughput.py [--repeats 5] [--json PATH]   (or python -m benchmarks.env_throughput)
        [--bundle runs/demo/bundle --replay runs/demo/replay/test_candles.parquet]

Measures, on the bundled BTCUSDT 1h data (the 47 causal features + 9 regime/signal columns, full cost model,
default ``EnvConfig``: 720-bar episodes from random starts, resets included), with pre-drawn uniform
random actions:

* single env steps/s: ``TradingEnv.step`` (targets: >= 200,000 steps/s, i.e. <= 5 us per step);
* batched env-steps/s: ``BatchedTradingEnv`` with N = 256 (target: >= 5,000,000);
* the minimal reference env (``benchmarks.minimal_env``) steps/s, for scale;
* SB3 PPO training fps (8 envs, n_steps=256, batch_size=256, ``torch.set_num_threads(1)``, CPU) on
  our env (``DummyVecEnv`` + ``Monitor``, the default of ``agents.ppo_sb3.make_vec_env``; and the
  batched ``BatchedSB3VecEnv`` + ``VecMonitor``) and on the minimal env (``DummyVecEnv`` + ``Monitor``),
  in the same run; target: ours >= 0.9 x reference. ``env_share`` is the measured share of PPO's wall
  time spent in the vec env's ``step_wait`` (target <= 10 %).

Every figure is the median of ``--repeats`` runs; the load average (``os.getloadavg``) is printed
next to them because the machine may be shared. The batched figures are also given per second of
the thread's CPU time (``time.thread_time``), which leaves out the time spent waiting for a core.
``--json PATH`` writes ``single_steps_per_s``,
``batched_steps_per_s``, ``ppo_fps``, ``ppo_fps_reference``, ``env_share`` (and a few more keys).
Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):  # run as a script (python benchmarks/env_throughput.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.minimal_env import MinimalTradingEnv
from envs.trading_env import EnvConfig, EnvData, TradingEnv
from envs.vector_env import BatchedTradingEnv
from market.bundled import bundled_candles_path, bundled_funding_path
from market.candles import join_funding, load_candles, load_funding
from market.features import FeatureConfig, atr, compute_features, drop_warmup
from market.json_codec import dumps as json_dumps

PPO_ENVS, PPO_N_STEPS, PPO_BATCH = 8, 256, 256
BATCH_N = 256


def load_env_data() -> EnvData:
    """Bundled BTCUSDT 1h candles + funding, the causal features (47 by default) and 9 zero regime/signal columns."""
    candles = join_funding(load_candles(bundled_candles_path()), load_funding(bundled_funding_path()))
    feats, n_warm = drop_warmup(compute_features(candles, FeatureConfig()))
    atr_all = atr(candles, 14)
    candles = candles.loc[feats.index]
    extra = pd.DataFrame(np.zeros((len(feats), 9), np.float32), index=feats.index,
                         columns=[f"model_{i}" for i in range(9)])  # fmt: skip
    obs = pd.concat([feats, extra], axis=1)
    return EnvData.from_frames(candles, obs, atr_all[n_warm:])


def minimal_env_factory(data: EnvData, episode_len_bars: int) -> Callable[[], MinimalTradingEnv]:
    obs = np.concatenate([data.market_obs, np.zeros((len(data), 6), np.float32)], axis=1)
    return lambda: MinimalTradingEnv(obs, data.close, episode_len_bars)


def steps_per_second(env, actions: np.ndarray, seed: int) -> float:
    """Single-env steps/s over ``len(actions)`` steps, resets included."""
    env.reset(seed=seed)
    step = env.step
    t0 = time.perf_counter()
    for a in actions:
        _, _, term, trunc, _ = step(a)
        if term or trunc:
            env.reset()
    return len(actions) / (time.perf_counter() - t0)


def batched_steps_per_second(
    data: EnvData, n_envs: int, n_batches: int, seed: int, copy: bool = True
) -> tuple[float, float]:
    """Env-steps/s of ``BatchedTradingEnv`` (autoreset included; ``copy`` as in its constructor).

    Returns (per wall-clock second, per second of this thread's CPU time). On a shared machine the
    process waits for a core part of the time; the CPU-time figure leaves that wait out (on an idle
    machine the two agree).
    """
    env = BatchedTradingEnv(data, EnvConfig(), n_envs, copy=copy)
    actions = np.random.default_rng(seed).uniform(-1, 1, (64, n_envs, 5)).astype(np.float32)
    env.reset(seed=seed)
    env.step(actions[0])  # compile / warm
    t0, c0 = time.perf_counter(), time.thread_time()
    for i in range(n_batches):
        env.step(actions[i % 64])
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return n_batches * n_envs / wall, n_batches * n_envs / cpu


def ppo_fps(make_venv: Callable[[], object], total_steps: int, seed: int) -> tuple[float, float]:
    """(fps, share of wall time in the vec env's step_wait) of SB3 PPO on ``make_venv()``."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class _Timed(VecEnvWrapper):
        def __init__(self, venv):
            super().__init__(venv)
            self.seconds = 0.0

        def reset(self):
            return self.venv.reset()

        def step_wait(self):
            t0 = time.perf_counter()
            out = self.venv.step_wait()
            self.seconds += time.perf_counter() - t0
            return out

    torch.set_num_threads(1)
    venv = _Timed(make_venv())
    model = PPO("MlpPolicy", venv, n_steps=PPO_N_STEPS, batch_size=PPO_BATCH, seed=seed, device="cpu", verbose=0)
    t0 = time.perf_counter()
    model.learn(total_timesteps=total_steps)
    wall = time.perf_counter() - t0
    venv.close()
    return model.num_timesteps / wall, venv.seconds / wall


def v2_decision_latency_ms(bundle_dir: str, replay: str, n_bars: int = 200) -> tuple[float, float]:
    """Median and p99 latency (ms) of the frozen V2 policy's decision from a 1,000-candle window."""
    from agents.bundle import load_bundle
    from agents.policy import FrozenPPOPolicy
    from market.decision import DecisionContext, PositionView

    policy = FrozenPPOPolicy(load_bundle(Path(bundle_dir)))
    candles = load_candles(replay)
    times = []
    for t in range(len(candles) - n_bars, len(candles)):
        ctx = DecisionContext(candles.index[t], candles.iloc[t - 999 : t + 1], PositionView(), 10_000.0)
        t0 = time.perf_counter()
        policy.decide(ctx)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 99))


def _load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (medians are reported)")
    parser.add_argument("--steps", type=int, default=200_000, help="single-env steps per run")
    parser.add_argument("--batches", type=int, default=400, help="batched steps (of N=256) per run")
    parser.add_argument("--ppo-steps", type=int, default=PPO_ENVS * PPO_N_STEPS * 4, help="PPO timesteps per run")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--bundle")
    parser.add_argument("--replay")
    args = parser.parse_args()
    if bool(args.bundle) != bool(args.replay):
        parser.error("--bundle and --replay go together")
    for given in (args.bundle, args.replay):
        if given and not Path(given).exists():
            print(f"{given} not found: run `make demo` first (it writes runs/demo/bundle and runs/demo/replay)",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(2)

    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.ppo_sb3 import make_vec_env

    data = load_env_data()
    cfg = EnvConfig()
    print(f"data: {len(data)} bars x {data.market_obs.shape[1]} market columns; {_load()} at start")
    actions = np.random.default_rng(0).uniform(-1, 1, (args.steps, 5)).astype(np.float32)
    ours_env, minimal = TradingEnv(data, cfg), minimal_env_factory(data, cfg.episode_len_bars or 720)()
    steps_per_second(ours_env, actions[:2_000], 0)  # compile / warm
    single, ref_single, batched, batched_nocopy, batched_cpu, batched_nocopy_cpu = [], [], [], [], [], []
    ppo, ppo_batched, ppo_ref, share, share_batched, share_ref = [], [], [], [], [], []
    make_min = minimal_env_factory(data, cfg.episode_len_bars or 720)
    for r in range(args.repeats):
        single.append(steps_per_second(ours_env, actions, r))
        ref_single.append(steps_per_second(minimal, actions, r))
        wall, cpu = batched_steps_per_second(data, BATCH_N, args.batches, r)
        batched.append(wall)
        batched_cpu.append(cpu)
        wall, cpu = batched_steps_per_second(data, BATCH_N, args.batches, r, copy=False)
        batched_nocopy.append(wall)
        batched_nocopy_cpu.append(cpu)
    for r in range(args.repeats):
        f, s = ppo_fps(functools.partial(make_vec_env, data, cfg, n_envs=PPO_ENVS, seed=r), args.ppo_steps, r)
        ppo.append(f)
        share.append(s)
        f, s = ppo_fps(functools.partial(make_vec_env, data, cfg, n_envs=PPO_ENVS, seed=r, batched=True), args.ppo_steps, r)
        ppo_batched.append(f)
        share_batched.append(s)
        f, s = ppo_fps(lambda: DummyVecEnv([lambda: Monitor(make_min()) for _ in range(PPO_ENVS)]),
                       args.ppo_steps, r)  # fmt: skip
        ppo_ref.append(f)
        share_ref.append(s)
    med = statistics.median
    res = {
        "single_steps_per_s": med(single),
        "batched_steps_per_s": med(batched),
        "ppo_fps": med(ppo),
        "ppo_fps_reference": med(ppo_ref),
        "env_share": med(share),
        "batched_steps_per_s_nocopy": med(batched_nocopy),
        "batched_steps_per_cpu_s": med(batched_cpu),
        "batched_steps_per_cpu_s_nocopy": med(batched_nocopy_cpu),
        "ppo_fps_batched": med(ppo_batched),
        "env_share_batched": med(share_batched),
        "env_share_reference": med(share_ref),
        "minimal_single_steps_per_s": med(ref_single),
        "repeats": args.repeats,
        "load_average_end": list(os.getloadavg()),
    }

    def ok(condition: bool) -> str:
        return "met" if condition else "NOT met"

    print(f"medians of {args.repeats} runs; {_load()} at end")
    print(f"{'measure':<58}{'ours':>14}{'minimal ref':>14}  target")
    print(f"{'single env steps/s (720-bar episodes, resets incl.)':<58}{res['single_steps_per_s']:>14,.0f}"
          f"{res['minimal_single_steps_per_s']:>14,.0f}  >= 200,000: {ok(res['single_steps_per_s'] >= 2e5)}")
    print(f"{'  = us per step':<58}{1e6 / res['single_steps_per_s']:>14.2f}"
          f"{1e6 / res['minimal_single_steps_per_s']:>14.2f}  <= 5 us")
    print(f"{f'batched env-steps/s (N = {BATCH_N})':<58}{res['batched_steps_per_s']:>14,.0f}{'-':>14}"
          f"  >= 5,000,000: {ok(res['batched_steps_per_s'] >= 5e6)}")
    print(f"{'  same, copy=False (internal buffers, as the SB3 adapter uses)':<58}"
          f"{res['batched_steps_per_s_nocopy']:>14,.0f}{'-':>14}")
    print(f"{'  batched env-steps per CPU-second (copy / copy=False)':<58}"
          f"{res['batched_steps_per_cpu_s']:>14,.0f}{res['batched_steps_per_cpu_s_nocopy']:>14,.0f}"
          f"  (thread CPU time: leaves out waiting for a core)")
    ratio = res["ppo_fps"] / res["ppo_fps_reference"]
    print(f"{'PPO fps, 8 envs DummyVecEnv+Monitor':<58}{res['ppo_fps']:>14,.0f}{res['ppo_fps_reference']:>14,.0f}"
          f"  ratio {ratio:.3f} >= 0.9: {ok(ratio >= 0.9)}")
    ratio_b = res["ppo_fps_batched"] / res["ppo_fps_reference"]
    print(f"{'PPO fps, 8 envs BatchedSB3VecEnv+VecMonitor':<58}{res['ppo_fps_batched']:>14,.0f}"
          f"{res['ppo_fps_reference']:>14,.0f}  ratio {ratio_b:.3f} >= 0.9: {ok(ratio_b >= 0.9)}")
    shares = f"{res['env_share']:.1%} / {res['env_share_batched']:.1%}"
    print(f"{'env share of PPO wall time (DummyVecEnv / batched)':<58}"
          f"{shares:>14}{res['env_share_reference']:>14.1%}"
          f"  <= 10 %: {ok(res['env_share'] <= 0.10)}")
    if args.json:
        Path(args.json).write_text(json_dumps(res, strict=False, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    if args.bundle and args.replay:
        p50, p99 = v2_decision_latency_ms(args.bundle, args.replay)
        print(f"V2 decision from a 1,000-candle window (features, HMM filter, LightGBM, TCN, actor): "
              f"median {p50:.1f} ms, p99 {p99:.1f} ms")


if __name__ == "__main__":
    main()
