"""The ``ats serve --config`` file: paper and live loop settings, risk limits, hot-swap directory.

Every section is optional; an absent one takes the defaults shown in ``configs/serve.yaml``.
Command-line options given explicitly (``--warmup-bars``, ``--symbol`` ...) override the file.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from market.config_base import StrictConfig
from serving.account_risk import AccountRiskConfig
from serving.drift import DriftConfig
from serving.errors import FatalError
from serving.live import LiveConfig
from serving.loop import ServeConfig
from serving.risk import RiskConfig


class ServeSettings(StrictConfig):
    """Settings of ``ats serve`` (all modes).

    Attributes
    ----------
    paper : ServeConfig
        Replay (paper) loop: warm-up bars, paper equity (USDT), decision deadline (ms), backoff.
    live : LiveConfig
        Testnet/live loop: symbol, timeframe, deadline, candle-poll delay, clock-offset limit.
    risk : RiskConfig | None
        Limits of the risk guard (of each symbol's guard in a multi-symbol run, whose daily loss and drawdown are
        then the account's). ``null`` disables the guard, allowed in paper mode only.
    account_risk : AccountRiskConfig
        Limits of the account's guard of a multi-symbol run (:mod:`serving.account_risk`); unused with one symbol.
    watch_dir : Path | None
        Directory watched for new bundles (validated, then swapped in between bars).
    drift : DriftConfig
        Drift thresholds and the action on a breach (:mod:`serving.drift`).
    symbols : tuple[str, ...]
        On live candles (paper, testnet, live): the symbols served together on one account (``BTCUSDT`` or
        ``BTC/USDT:USDT``; two or more: :mod:`serving.live_portfolio`, paper :class:`serving.paper_live.PaperLivePortfolio`);
        empty: ``live.symbol`` alone. ``--symbols`` overrides it.
    """

    paper: ServeConfig = Field(default_factory=lambda: ServeConfig(warmup_bars=1200))
    live: LiveConfig = Field(default_factory=LiveConfig)
    risk: RiskConfig | None = Field(default_factory=RiskConfig)
    account_risk: AccountRiskConfig = Field(default_factory=AccountRiskConfig)
    watch_dir: Path | None = None
    drift: DriftConfig = Field(default_factory=DriftConfig)
    symbols: tuple[str, ...] = ()


def load_serve_settings(path: Path | None) -> ServeSettings:
    """Parse ``path`` (YAML) into :class:`ServeSettings`; None gives the defaults.

    Raises
    ------
    FatalError
        If the file is missing, not a YAML mapping, or invalid (the message names the key).
    """
    if path is None:
        return ServeSettings()
    path = Path(path)
    if not path.is_file():
        raise FatalError(f"serve config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise FatalError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise FatalError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return ServeSettings.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise FatalError(f"{path}: invalid serve config:\n  " + "\n  ".join(lines)) from exc
