"""PPO training throughput: Stable-Baselines3 vs Ray RLlib on the same env and config, and RLlib's
scaling from 1 to 2 env runners.

Usage::

    python -m benchmarks.train_throughput [--config configs/smoke.yaml] [--steps 8192] [--json PATH]

The env data is the config's training period with its out-of-fold regime/signal observation, built
once by the pipeline (``training.pipeline``), exactly what ``ats train`` trains on. Each backend then
trains PPO with the config's ``ppo`` section (``n_envs`` envs, ``n_steps`` per env per rollout,
``batch_size``, ``n_epochs``, ``net_arch``) for ``--steps`` env steps on CPU, through the production
entry points (``agents.ppo_sb3.train_ppo`` and ``agents.ppo_rllib.train_ppo_rllib``) with a validator
that returns at once, so the figure is sampling + PPO updates + TensorBoard logging, nothing else.

* ``sb3_fps``: env steps / wall seconds of SB3's ``learn`` (one process, envs stepped in-process);
* ``rllib_fps``: RLlib with ``num_env_runners=0`` (sampling in the driver, the same process layout);
* ``rllib_runners``: RLlib with 1 and 2 remote env runners (``ppo.n_envs`` envs split between them),
  and ``rllib_scaling_1_to_2`` = fps(2) / fps(1).

RLlib's wall time excludes building the ``Algorithm`` (actor start-up) but includes its first
iteration; SB3's excludes building the model. Torch uses 1 thread in every configuration. Local Ray
gets 2 CPUs (``--ray-cpus``). The machine may be shared: the load average is printed with the table,
and numbers from a busy machine are only comparable within the same run. ``--json PATH`` writes
``{"sb3_fps", "rllib_fps", "rllib_runners": {"1": fps, "2": fps}, "rllib_scaling_1_to_2", ...}``.
Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script (python benchmarks/train_throughput.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from market.json_codec import dumps as json_dumps


def _no_validation(_model) -> dict[str, float]:
    return {"sortino": 0.0}


def build_train_data(config_path: Path):
    """(RunConfig, EnvData of the training period, bar interval s) as ``ats train`` builds them."""
    from agents.observation import ObsNormalizer
    from training.config import load_config
    from training.pipeline import build_market_obs, env_data, fold_starts, prepare_data

    cfg = load_config(config_path, device="cpu")
    prep = prepare_data(cfg)
    market_obs, _, _ = build_market_obs(prep, cfg, device="cpu", log=lambda s: None)
    first = fold_starts(prep, cfg)[0]
    normalizer = ObsNormalizer.fit(market_obs.iloc[: prep.val_row - first].to_numpy(np.float32), cfg.ppo.obs_clip)
    return cfg, env_data(prep, market_obs, normalizer, first, prep.val_row), prep.info["bar_interval_s"]


def sb3_fps(cfg, data, bar_s: float, steps: int, tb: Path) -> float:
    from agents.ppo_sb3 import train_ppo
    from training.pipeline import episode_stats

    ppo = cfg.ppo.updated(total_timesteps=steps, eval_every_steps=10 * steps)
    t0 = time.perf_counter()
    train_ppo(data, cfg.env, ppo, seed=cfg.seed, device="cpu", tensorboard_dir=tb, episode_stats=episode_stats(bar_s),
              validator=_no_validation)
    return steps / (time.perf_counter() - t0)


def rllib_fps(cfg, data, bar_s: float, steps: int, tb: Path, *, runners: int, ray_cpus: int) -> float:
    from agents.ppo_rllib import train_ppo_rllib
    from training.pipeline import episode_stats

    ppo = cfg.ppo.updated(total_timesteps=steps, eval_every_steps=10 * steps)
    rl = cfg.rllib.updated(num_env_runners=runners, ray_num_cpus=ray_cpus, ray_address=None)
    result = train_ppo_rllib(data, cfg.env, ppo, rl, seed=cfg.seed, device="cpu", tensorboard_dir=tb,
                             episode_stats=episode_stats(bar_s), validator=_no_validation)
    return result.env_steps / result.wall_s


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/smoke.yaml"))
    parser.add_argument("--steps", type=int, default=8192, help="env steps per measurement")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.config.is_file():
        print(f"config {args.config} not found: run from the repository root or pass --config", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(1)
    cfg, data, bar_s = build_train_data(args.config)
    p = cfg.ppo
    print(f"config {args.config}: {len(data)} training bars, obs dim {data.market_obs.shape[1] + 6}, n_envs {p.n_envs}, "
          f"n_steps {p.n_steps}, batch {p.batch_size}, epochs {p.n_epochs}, net {list(p.net_arch)}, {args.steps} steps")
    with tempfile.TemporaryDirectory() as tmp:
        tb = Path(tmp)
        out: dict[str, Any] = {"sb3_fps": sb3_fps(cfg, data, bar_s, args.steps, tb / "sb3")}
        out["rllib_fps"] = rllib_fps(cfg, data, bar_s, args.steps, tb / "r0", runners=0, ray_cpus=args.ray_cpus)
        out["rllib_runners"] = {
            str(n): rllib_fps(cfg, data, bar_s, args.steps, tb / f"r{n}", runners=n, ray_cpus=args.ray_cpus)
            for n in (1, 2)
        }
    out["rllib_scaling_1_to_2"] = out["rllib_runners"]["2"] / out["rllib_runners"]["1"]
    out["rllib_vs_sb3"] = out["rllib_fps"] / out["sb3_fps"]
    out.update(steps=args.steps, config=str(args.config), cpu_count=os.cpu_count(), load_avg=os.getloadavg())
    print(f"\n{'backend':<28}{'env steps/s':>12}")
    print(f"{'SB3 (in-process envs)':<28}{out['sb3_fps']:>12.0f}")
    print(f"{'RLlib, 0 env runners':<28}{out['rllib_fps']:>12.0f}   ({out['rllib_vs_sb3']:.2f} x SB3)")
    for n, fps in out["rllib_runners"].items():
        print(f"{'RLlib, ' + n + ' env runner(s)':<28}{fps:>12.0f}")
    print(f"RLlib scaling 1 -> 2 env runners: {out['rllib_scaling_1_to_2']:.2f} x")
    print(f"load average {out['load_avg'][0]:.2f} on {out['cpu_count']} CPUs (shared machine: compare within one run)")
    if args.json:
        args.json.write_text(json_dumps(out, strict=False, indent=1))
    return out


if __name__ == "__main__":
    main()
