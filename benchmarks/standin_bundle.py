"""A stand-in policy bundle for the serving benchmarks, built in seconds when ``runs/demo/bundle`` is absent.

Latency depends on the shapes of the models, not on what they learnt, so the stand-in has exactly the
demo's architecture (``configs/demo.yaml``): the demo's feature schema (its ``FeatureConfig``, so the
same 47 feature columns and the same observation names and schema hash), an HMM with the demo's
``regime`` config fitted by EM on the bundled BTCUSDT 1h data, the LightGBM regime-ahead model with
the demo's number of boosting rounds fitted on the same rows, the demo's TCN (channels, levels,
kernel, window) with its initial (untrained) weights, and an actor of the demo's ``ppo.net_arch``
with random weights. What it does not reproduce: trained weights, hence the decisions (the PPO
stand-in mostly stays flat) and anything that depends on them; the real bundle comes from
``make demo`` (or ``ats train --config configs/demo.yaml --out runs/demo``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from agents.actor import ActorNet
from agents.bundle import save_bundle
from agents.observation import ObsNormalizer, StackModels, model_outputs
from envs.trading_env import ACCOUNT_FEATURES
from market.bundled import bundled_candles_path, bundled_funding_path
from market.candles import join_funding, load_candles, load_funding
from market.features import compute_features, drop_warmup
from regime.hmm import RegimeHMM
from regime.transition import RegimeTransitionModel
from signals.tcn import TCN, TCNSignalModel

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
STAND_IN_NAME = "serving-latency-stand-in (demo architecture, untrained; not for trading)"


def build_demo_standin(
    out_dir: Path, *, config: Path = DEMO_CONFIG, fit_bars: int = 6_000, seed: int = 0
) -> Path:
    """Write the stand-in bundle (see module docstring) to ``out_dir``; return its path.

    The HMM, LightGBM and the observation normaliser are fitted on the first ``fit_bars`` bundled bars
    from the config's ``data.load_start`` (after the feature warm-up).
    """
    from training.config import load_config  # the demo config, as `ats train` parses it

    cfg = load_config(config, device="cpu")
    torch.manual_seed(seed)
    candles = join_funding(
        load_candles(bundled_candles_path(cfg.data.symbol)),
        load_funding(bundled_funding_path(cfg.data.symbol)),
    )
    candles = candles.loc[candles.index >= cfg.data.load_start].iloc[:fit_bars]
    feats, _ = drop_warmup(compute_features(candles, cfg.features))
    cols = list(cfg.regime_input_features)
    x_hmm = feats[cols].to_numpy(np.float64)
    hmm = RegimeHMM(cfg.regime).fit(x_hmm)
    x = feats.to_numpy(np.float32)
    transition = RegimeTransitionModel(cfg.regime).fit(x, hmm.filtered_proba(x_hmm), cfg.regime.horizon_bars)
    scfg = cfg.signals.updated(seed=seed)
    tcn = TCNSignalModel(TCN(x.shape[1], scfg), scfg, x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6))
    models = StackModels(hmm=hmm, transition=transition, tcn=tcn, hmm_columns=tuple(cols))
    w = scfg.window_bars
    market = np.concatenate(
        [x[w - 1 :], model_outputs(feats, models, start=w - 1, end=len(feats)).to_numpy()], axis=1
    ).astype(np.float32)
    normalizer = ObsNormalizer.fit(market, cfg.ppo.obs_clip)
    hidden = tuple(cfg.ppo.net_arch)
    actor = ActorNet(market.shape[1] + len(ACCOUNT_FEATURES), 5, hidden, "tanh")
    tensors = {k: v.detach().clone().contiguous() for k, v in actor.state_dict().items()}
    return save_bundle(
        Path(out_dir), actor_tensors=tensors, hidden=hidden, activation="tanh", normalizer=normalizer,
        feature_config=cfg.features, env_config=cfg.env, models=models,
        run_config={**cfg.model_dump(mode="json"), "name": STAND_IN_NAME},
        data_info={"stand_in": True, "fit_bars": len(feats), "config": str(config)}, metrics={},
    )  # fmt: skip
