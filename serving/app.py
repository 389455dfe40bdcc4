"""Composition root of ``ats serve --mode paper --replay``: wires candles, bundle, V1 and the store.

A bundle that fails to load does not stop serving: every bar is then decided by V1 and the
load error is recorded as the fallback reason of each decision.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from agents.bundle import load_bundle
from agents.policy import FrozenPPOPolicy
from envs.config import CostConfig
from fallback.config import V1Config
from fallback.v1 import V1Policy
from market.candles import load_candles
from market.features import FeatureConfig
from market.features import atr as atr_indicator
from serving.loop import ReplaySummary, ServeConfig, run_replay
from serving.store import StateStore


def _v1_config_from_manifest(bundle_dir: Path) -> V1Config:
    """The V1 config the bundle was evaluated with, if its manifest is readable; defaults otherwise."""
    try:
        manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
        return V1Config.model_validate(manifest["config"]["v1"])
    except Exception:  # an unreadable manifest must not stop the fallback from running
        return V1Config()


def serve_replay(
    *,
    replay: Path,
    bundle_dir: Path,
    db_path: Path,
    warmup_bars: int = 1200,
    max_bars: int = 0,
    initial_equity_usdt: float = 10_000.0,
    log: Callable[[str], None] = print,
    progress_factory: Callable | None = None,
) -> ReplaySummary:
    """Replay ``replay`` candles bar by bar: V2 from the bundle, V1 on any V2 failure, paper fills."""
    candles = load_candles(replay)
    if max_bars:
        candles = candles.iloc[: warmup_bars + max_bars]
    primary, load_error = None, None
    costs, feature_cfg = CostConfig(), FeatureConfig()
    try:
        bundle = load_bundle(bundle_dir)
        primary = FrozenPPOPolicy(bundle)
        costs, feature_cfg = bundle.env_config.costs, bundle.feature_config
        log(f"bundle loaded: {bundle_dir} (schema {bundle.manifest['observation']['schema_hash'][:12]})")
    except Exception as exc:  # any load failure -> V1 decides every bar, and the reason is recorded
        load_error = f"{type(exc).__name__}: {exc}"
        log(f"[yellow]bundle failed to load, V1 decides every bar[/]: {load_error}")
    fallback = V1Policy(_v1_config_from_manifest(bundle_dir))
    atr = atr_indicator(candles, feature_cfg.atr_period_bars)
    store = StateStore.sqlite(db_path)
    config = ServeConfig(initial_equity_usdt=initial_equity_usdt, warmup_bars=warmup_bars)
    n = max(0, len(candles) - warmup_bars)
    if progress_factory is None:
        return run_replay(candles, primary=primary, fallback=fallback, atr=atr, costs=costs, store=store,
                          config=config, primary_load_error=load_error)
    with progress_factory() as progress:
        task = progress.add_task("replay", total=n)
        return run_replay(candles, primary=primary, fallback=fallback, atr=atr, costs=costs, store=store,
                          config=config, primary_load_error=load_error,
                          progress=lambda i, total: progress.update(task, completed=i, total=total))
