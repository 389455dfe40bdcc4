"""TensorBoard parity: the SB3 smoke run writes the trading tags, hparams and custom-scalars layout that
the RLlib backend writes (tests/agents/test_rllib.py checks the RLlib side)."""

from __future__ import annotations

from agents.tb_logging import TRADING_LAYOUT

SHARED_TAGS = {"episode/return", "episode/sortino", "episode/max_drawdown", "episode/fees_usdt",
               "episode/funding_usdt", "episode/n_trades", "episode/turnover_usdt", "episode/avg_leverage",
               "rollout/ep_rew_mean",
               "val/sortino", "val/best_sortino"}


def test_sb3_run_has_shared_trading_tags_hparams_and_layout(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(smoke_run / "tb" / "PPO_1"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert SHARED_TAGS <= tags, sorted(SHARED_TAGS - tags)
    assert ea.PluginTagToContent("hparams") and ea.PluginTagToContent("custom_scalars")


def test_layout_charts_name_only_tags_the_backends_write():
    charts = [tag for category in TRADING_LAYOUT.values() for _, (_, tags) in category.items() for tag in tags]
    assert all(tag.startswith(("episode/", "val/")) for tag in charts)
    assert {"episode/sortino", "episode/max_drawdown", "episode/turnover_usdt", "episode/fees_usdt",
            "episode/avg_leverage", "val/sortino"} <= set(charts)
