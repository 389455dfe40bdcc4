"""Env steps per second (random actions) and, given a bundle, V2 decision latency in serving.

Usage::

    python -m benchmarks.env_throughput [--steps 20000] [--bundle runs/demo/bundle --replay runs/demo/replay/test_candles.parquet]

Prints the numbers; nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from envs.trading_env import EnvConfig, EnvData, TradingEnv
from market.bundled import bundled_candles_path, bundled_funding_path
from market.candles import join_funding, load_candles, load_funding
from market.features import FeatureConfig, atr, compute_features, drop_warmup


def env_steps_per_second(n_steps: int, seed: int = 0) -> float:
    candles = join_funding(load_candles(bundled_candles_path()), load_funding(bundled_funding_path()))
    feats, n_warm = drop_warmup(compute_features(candles, FeatureConfig()))
    atr_all = atr(candles, 14)
    candles = candles.loc[feats.index]
    obs = pd.concat([feats, pd.DataFrame(np.zeros((len(feats), 9), np.float32), index=feats.index)], axis=1)
    data = EnvData.from_frames(candles, obs, atr_all[n_warm:])
    env = TradingEnv(data, EnvConfig(episode_len_bars=None, random_start=False))
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, size=(n_steps, 5)).astype(np.float32)
    env.reset(seed=seed)
    t0 = time.perf_counter()
    for i in range(n_steps):
        _, _, term, trunc, _ = env.step(actions[i])
        if term or trunc:
            env.reset()
    return n_steps / (time.perf_counter() - t0)


def v2_decision_latency_ms(bundle_dir: str, replay: str, n_bars: int = 200) -> tuple[float, float]:
    from agents.bundle import load_bundle
    from agents.policy import FrozenPPOPolicy
    from market.decision import DecisionContext, PositionView

    policy = FrozenPPOPolicy(load_bundle(bundle_dir))
    candles = load_candles(replay)
    times = []
    for t in range(len(candles) - n_bars, len(candles)):
        ctx = DecisionContext(candles.index[t], candles.iloc[t - 999 : t + 1], PositionView(), 10_000.0)
        t0 = time.perf_counter()
        policy.decide(ctx)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--bundle")
    parser.add_argument("--replay")
    args = parser.parse_args()
    print(f"TradingEnv (1 env, 1 process, {args.steps} random steps): {env_steps_per_second(args.steps):,.0f} steps/s")
    if args.bundle and args.replay:
        p50, p99 = v2_decision_latency_ms(args.bundle, args.replay)
        print(f"V2 decision from a 1,000-candle window (features, HMM filter, LightGBM, TCN, actor): "
              f"median {p50:.1f} ms, p99 {p99:.1f} ms")


if __name__ == "__main__":
    main()
