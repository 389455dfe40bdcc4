"""TensorBoard helpers shared by the SB3 and RLlib backends: hparams, custom-scalars layout, tag names.

Both backends write the same trading tags, so runs trained by either can be overlaid in one
TensorBoard:

``episode/*``  statistics of every finished *training* episode (mean over the episodes that ended
               since the previous write): ``return``, ``sortino``, ``max_drawdown``, ``fees_usdt``,
               ``funding_usdt``, ``n_trades``, ``turnover_usdt`` and ``avg_leverage`` (mean |notional| /
               equity over the episode's bars, read from the observation's ``pos_exposure``).
``val/*``      the validation backtest of the current policy (``val/sortino`` ... ``val/best_sortino``).

The writer is :class:`torch.utils.tensorboard.SummaryWriter`, the one SB3's TensorBoard output uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from envs.trading_env import ACCOUNT_FEATURES

#: Index of ``pos_exposure`` (signed notional / equity) in the observation, counted from the end.
EXPOSURE_FROM_END = len(ACCOUNT_FEATURES) - ACCOUNT_FEATURES.index("pos_exposure")
#: Custom-scalars layout: category -> chart title -> ["Multiline", [tag regexes]].
TRADING_LAYOUT: dict[str, dict[str, list]] = {
    "trading (train episodes)": {
        "Sortino": ["Multiline", ["episode/sortino"]],
        "return": ["Multiline", ["episode/return"]],
        "max drawdown": ["Multiline", ["episode/max_drawdown"]],
        "fees and funding (USDT)": ["Multiline", ["episode/fees_usdt", "episode/funding_usdt"]],
        "turnover (USDT)": ["Multiline", ["episode/turnover_usdt"]],
        "average leverage": ["Multiline", ["episode/avg_leverage"]],
        "trades": ["Multiline", ["episode/n_trades"]],
    },
    "trading (validation)": {
        "Sortino": ["Multiline", ["val/sortino", "val/best_sortino"]],
        "return and drawdown": ["Multiline", ["val/total_return", "val/max_drawdown"]],
        "costs (USDT)": ["Multiline", ["val/fees_paid", "val/funding_paid"]],
        "turnover and leverage": ["Multiline", ["val/turnover", "val/avg_leverage"]],
    },
}


def hparam_value(value: Any) -> int | float | str | bool:
    """Coerce a config value to a type TensorBoard's hparams plugin accepts (tuples become strings)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_hparams(writer, hparams: Mapping[str, Any], metric_tags: tuple[str, ...] = ("val/best_sortino",)) -> None:
    """Write the run's hyperparameters to TensorBoard's HPARAMS tab (same records SB3's ``HParam`` writes).

    ``metric_tags`` are scalar tags written elsewhere in the run that the HPARAMS table shows as metrics.
    """
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    clean = {str(k): hparam_value(v) for k, v in hparams.items()}
    exp, ssi, sei = hparams_summary(clean, {tag: 0.0 for tag in metric_tags})
    fw = writer._get_file_writer()
    for summary in (exp, ssi, sei):
        fw.add_summary(summary)


def write_trading_layout(writer) -> None:
    """Write :data:`TRADING_LAYOUT` (TensorBoard's CUSTOM SCALARS tab) with ``writer``."""
    writer.add_custom_scalars(TRADING_LAYOUT)


def write_scalars(writer, scalars: Mapping[str, float], step: int) -> int:
    """Write the finite values of ``scalars`` at ``step``; return how many were written."""
    n = 0
    for tag, value in scalars.items():
        v = float(value)
        if np.isfinite(v):
            writer.add_scalar(tag, v, step)
            n += 1
    return n


def write_layout_to(log_dir) -> None:
    """Write :data:`TRADING_LAYOUT` into ``log_dir`` (a run's event directory, e.g. SB3's ``tb/PPO_1``)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        write_trading_layout(writer)
