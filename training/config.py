"""The run configuration: one YAML file parsed once into typed, frozen objects.

Unknown keys anywhere are an error (``extra="forbid"`` on every section), so a typo never
falls back silently to a default. Periods are half-open ``[start, end)`` intervals of bar open
times in UTC; train < validation < test and they never overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pandas as pd
import yaml
from pydantic import Field, ValidationError, model_validator

from envs.trading_env import EnvConfig
from fallback.config import V1Config
from market.config_base import StrictConfig, UtcTime, check_periods
from market.features import FeatureConfig
from market.instruments import DEFAULT_SYMBOL, InstrumentSpec, InstrumentSpecError, ResolvedSpec, resolve_spec
from market.labels import TripleBarrierConfig
from regime.config import RegimeConfig
from signals.config import SignalConfig
from training.baselines import BaselinesConfig


class ConfigError(ValueError):
    """The configuration file is missing, malformed or inconsistent (the message names the key)."""


class SymbolSource(StrictConfig):
    """One symbol of a pooled run (``data.symbols``): its candles, funding and instrument spec.

    ``None`` paths follow the single-symbol rules of :class:`DataConfig`: the bundled 1h candles (and funding) of
    ``symbol``; the spec from ``instrument_spec``, else ``SYMBOL.spec.json`` next to the candles, else the bundled
    table. A relative path in a config file is taken relative to that file.
    """

    symbol: str = Field(..., min_length=1, description="exchange id of the contract, e.g. ETHUSDT")
    candles_path: str | None = Field(None, description="OHLCV parquet; None = the bundled 1h candles of symbol")
    funding_path: str | None = Field(None, description="funding parquet; None = bundled (with bundled candles)")
    instrument_spec: str | None = Field(None, description="instrument spec file (JSON/YAML) of symbol")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: object) -> object:
        return {"symbol": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _upper(self) -> SymbolSource:
        if self.symbol != self.symbol.strip().upper() or not self.symbol.isalnum():
            raise ValueError(f"symbol must be an exchange id in capitals (e.g. ETHUSDT), got {self.symbol!r}")
        return self


class DataConfig(StrictConfig):
    """Where the candles come from and how the span is split into train / validation / test.

    One symbol (``symbol``, ``candles_path``, ``funding_path``, ``instrument_spec``), or several pooled into one run
    (``symbols``: a list of names or of :class:`SymbolSource` mappings; the first is the *primary* symbol, whose spec
    the run's ``env.costs.instrument`` carries). With ``symbols`` the four single-symbol keys must be left unset.
    Every symbol is cut at the same period boundaries.
    """

    candles_path: str | None = Field(None, description="OHLCV parquet; None = the bundled 1h USDT-M candles of symbol")
    funding_path: str | None = Field(None, description="funding parquet; None = bundled (with bundled candles)")
    symbol: str = Field(DEFAULT_SYMBOL, description="exchange id of the traded contract, e.g. BTCUSDT")
    instrument_spec: str | None = Field(
        None,
        description="instrument spec file (JSON/YAML) of symbol; None = SYMBOL.spec.json next to the candles, else "
        "the bundled table (market/instruments.py); a symbol known to none of them is an error",
    )
    symbols: tuple[SymbolSource, ...] | None = Field(
        None,
        min_length=1,
        description="pooled multi-symbol run: the symbols (names or {symbol, candles_path, funding_path, "
        "instrument_spec}); None = the one symbol above",
    )
    gap_policy: Literal["error", "mark"] = Field(
        "error", description="missing bars: error = refuse the data; mark = fill (close carried, volume 0) + is_gap"
    )
    load_start: UtcTime = Field(..., description="first open time loaded (UTC); includes the feature warm-up")
    train_start: UtcTime = Field(..., description="first open time of the training period (UTC)")
    val_start: UtcTime = Field(..., description="end of training = first open time of validation (UTC)")
    val_end: UtcTime | None = Field(
        None,
        description="end (exclusive) of validation (UTC); None = test_start. Bars in [val_end, test_start) are an "
        "embargo gap: neither trained on nor used for selection, and not traded",
    )
    test_start: UtcTime = Field(
        ..., description="first open time of test (UTC); end of validation unless val_end is set"
    )
    test_end: UtcTime = Field(..., description="end (exclusive) of the test period (UTC)")

    @model_validator(mode="before")
    @classmethod
    def _primary_symbol(cls, raw: object) -> object:
        if isinstance(raw, dict) and raw.get("symbols") and "symbol" not in raw:
            first = raw["symbols"][0]
            name = first if isinstance(first, str) else first.get("symbol") if isinstance(first, dict) else None
            if isinstance(name, str):
                raw = {**raw, "symbol": name}
        return raw

    @model_validator(mode="after")
    def _ordered(self) -> DataConfig:
        check_periods({f"data.{k}": getattr(self, k) for k in self.period_keys()})
        if self.symbols is not None:
            single = [k for k in ("candles_path", "funding_path", "instrument_spec") if getattr(self, k) is not None]
            if self.symbol != self.symbols[0].symbol:
                single.append("symbol")
            if single:
                raise ValueError(f"with data.symbols, give {single} per symbol (entries of data.symbols), not at the top")
            names = [s.symbol for s in self.symbols]
            if len(set(names)) != len(names):
                raise ValueError(f"data.symbols lists a symbol twice: {names}")
        return self

    def sources(self) -> tuple[SymbolSource, ...]:
        """The run's symbols with their data and spec sources; the first is the primary symbol."""
        if self.symbols is not None:
            return self.symbols
        return (SymbolSource(symbol=self.symbol, candles_path=self.candles_path, funding_path=self.funding_path,
                             instrument_spec=self.instrument_spec),)

    @property
    def symbol_names(self) -> tuple[str, ...]:
        """The symbols of the run, primary first."""
        return tuple(s.symbol for s in self.sources())

    @property
    def primary_symbol(self) -> str:
        """The first symbol (the one of ``env.costs.instrument``)."""
        return self.sources()[0].symbol

    @staticmethod
    def period_keys() -> tuple[str, ...]:
        """Names of the period boundaries, in time order."""
        return ("load_start", "train_start", "val_start", "val_end", "test_start", "test_end")

    def ts(self, key: str) -> pd.Timestamp:
        """Return the named boundary as a UTC timestamp (``val_end`` defaults to ``test_start``)."""
        if key == "val_end" and self.val_end is None:
            key = "test_start"
        return getattr(self, key)


class StackingConfig(StrictConfig):
    """Out-of-fold stacking of regime and signal outputs over the training period."""

    n_folds: int = Field(3, ge=1, description="forward folds whose outputs the agent trains on")
    purge_bars: int | None = Field(
        None, description="gap between a fold's fitting data and its predictions; None = max label horizon"
    )
    min_fit_bars: int = Field(1500, ge=200, description="bars before the first predicted fold")


class PPOConfig(StrictConfig):
    """Stable-Baselines3 PPO hyperparameters (Schulman et al. 2017)."""

    total_timesteps: int = Field(100_000, ge=64)
    n_envs: int = Field(4, ge=1)
    n_steps: int = Field(512, ge=8, description="rollout length per env")
    batch_size: int = Field(256, ge=8)
    n_epochs: int = Field(10, ge=1)
    learning_rate: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.0
    net_arch: tuple[int, ...] = (64, 64)
    eval_every_steps: int = Field(10_000, ge=64, description="validation backtest interval (env steps)")
    obs_clip: float = Field(10.0, gt=0, description="clip of the standardised market observation")


class RLlibConfig(StrictConfig):
    """Ray RLlib backend (``backend: rllib``): where Ray runs and how sampling/learning is spread.

    The PPO hyperparameters themselves come from the ``ppo`` section (same meaning as for SB3).
    """

    ray_address: str | None = Field(
        None, description="None = start a local Ray; 'auto' or HOST:PORT = join that running Ray cluster"
    )
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (None = all); ignored with an address")
    num_env_runners: int = Field(0, ge=0, description="remote sampling processes; 0 = sample in the driver")
    num_envs_per_env_runner: int | None = Field(
        None, ge=1, description="envs stepped by each runner; None = ppo.n_envs / max(1, num_env_runners)"
    )
    num_learners: int = Field(0, ge=0, description="remote learner processes; 0 = learn in the driver")
    num_gpus_per_learner: float | None = Field(
        None, ge=0, description="GPUs per learner; None = 1 when the device resolves to cuda, else 0"
    )
    train_batch_size: int | None = Field(None, ge=8, description="env steps per iteration; None = ppo.n_envs * ppo.n_steps")
    minibatch_size: int | None = Field(None, ge=8, description="SGD minibatch; None = ppo.batch_size")


class RunConfig(StrictConfig):
    """Everything one ``ats train`` run needs."""

    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(2, ge=1)
    data: DataConfig
    features: FeatureConfig = FeatureConfig()
    labels: TripleBarrierConfig = TripleBarrierConfig()
    regime: RegimeConfig = RegimeConfig()
    regime_input_features: tuple[str, ...] = Field(
        ("logret_24b", "rvol_24b"), description="feature columns the HMM observes"
    )
    signals: SignalConfig = SignalConfig()
    stacking: StackingConfig = StackingConfig()
    env: EnvConfig = EnvConfig()
    ppo: PPOConfig = PPOConfig()
    backend: Literal["sb3", "rllib"] = Field("sb3", description="PPO implementation: sb3 (one process) or rllib (Ray)")
    rllib: RLlibConfig = RLlibConfig()
    v1: V1Config = V1Config()
    baselines: BaselinesConfig = Field(
        BaselinesConfig(), description="rule baselines traded next to the agent in every report (tsmom)")

    @model_validator(mode="after")
    def _pooled_backend(self) -> RunConfig:
        if self.backend != "sb3" and len(self.data.sources()) > 1:
            raise ValueError("backend: pooled multi-symbol training (data.symbols) runs on the sb3 backend only")
        return self


def load_config(path: str | Path, *, instrument_spec: str | Path | None = None, **overrides: object) -> RunConfig:
    """Parse a YAML run config into a frozen :class:`RunConfig` whose cost model carries the run's instrument spec.

    ``overrides`` replace top-level keys (e.g. ``device="cpu"``) before validation; ``instrument_spec`` (a spec
    file, ``--instrument-spec``) replaces ``data.instrument_spec`` (stored as an absolute path). The spec is then
    resolved (:func:`run_instrument`) and set as ``env.costs.instrument`` (:func:`with_instrument`); an
    ``env.costs.instrument`` written in the file (a saved run config) is replaced by the resolved one.

    Raises
    ------
    ConfigError
        If the file is missing, is not a YAML mapping, or fails validation (unknown key,
        wrong type, inconsistent periods); the message names the offending key.
    market.instruments.InstrumentSpecError
        If the symbol has no spec (the message names it and the three ways to give one), or the spec file is
        invalid or of another symbol.
    """
    path = Path(path)
    raw = read_config_mapping(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    _symbol_paths_absolute(raw, path.parent)
    if instrument_spec is not None:
        data = raw.get("data")
        if isinstance(data, dict) and data.get("symbols"):
            raise ConfigError(f"{path}: --instrument-spec gives the spec of one symbol; with data.symbols give each "
                              "symbol's spec as data.symbols[i].instrument_spec")
        spec_file = str(Path(instrument_spec).resolve())
        raw["data"] = {**(data if isinstance(data, dict) else {}), "instrument_spec": spec_file}
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise invalid_config(path, exc) from exc
    return with_instrument(cfg)[0]


def _symbol_paths_absolute(raw: dict, base: Path) -> None:
    """Make the relative paths of ``data.symbols`` entries absolute, relative to the config file's folder ``base``
    (so a saved run config, read from the run directory, names the same files)."""
    data = raw.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("symbols"), list):
        return
    symbols = data["symbols"]
    out = []
    for entry in symbols:
        if isinstance(entry, dict):
            entry = dict(entry)
            for key in ("candles_path", "funding_path", "instrument_spec"):
                v = entry.get(key)
                if isinstance(v, str) and not Path(v).is_absolute():
                    entry[key] = str((base / v).resolve())
        out.append(entry)
    raw["data"] = {**data, "symbols": out}


def source_instrument(source: SymbolSource) -> ResolvedSpec:
    """The instrument spec of one symbol of the run (:func:`market.instruments.resolve_spec`): its
    ``instrument_spec``, else ``<SYMBOL>.spec.json`` next to its candles (or the bundled candles), else the bundled
    table.

    Raises
    ------
    market.instruments.InstrumentSpecError
        As :func:`run_instrument`.
    """
    from market.bundled import BUNDLED_DIR

    candles = Path(source.candles_path) if source.candles_path else BUNDLED_DIR / f"{source.symbol}-1h.parquet"
    return resolve_spec(source.symbol, spec_path=source.instrument_spec, candles_path=candles)


def run_instruments(cfg: RunConfig) -> dict[str, ResolvedSpec]:
    """The resolved spec of every symbol of the run (:func:`source_instrument`), primary first.

    Raises
    ------
    market.instruments.InstrumentSpecError
        If a symbol has no spec, or a spec file is invalid or of another symbol.
    """
    return {s.symbol: source_instrument(s) for s in cfg.data.sources()}


def symbol_env_config(cfg: RunConfig, spec: InstrumentSpec) -> EnvConfig:
    """The run's env config with ``spec`` as the traded instrument (a pooled run's per-symbol cost model)."""
    return cfg.env.updated(costs=cfg.env.costs.with_instrument(spec))


def run_instrument(cfg: RunConfig) -> ResolvedSpec:
    """The instrument spec of the run's symbol (:func:`market.instruments.resolve_spec`): ``data.instrument_spec``,
    else ``<SYMBOL>.spec.json`` next to ``data.candles_path`` (or the bundled candles), else the bundled table.

    Raises
    ------
    market.instruments.InstrumentSpecError
        If no source knows the symbol (the message names it and the three ways to give a spec), or the spec file
        is invalid or of another symbol.
    """
    return source_instrument(cfg.data.sources()[0])


def with_instrument(cfg: RunConfig) -> tuple[RunConfig, ResolvedSpec]:
    """``cfg`` with ``env.costs.instrument`` set to the run's resolved spec (:func:`run_instrument`; a pooled run's
    primary symbol), and that spec.

    Raises
    ------
    market.instruments.InstrumentSpecError
        As :func:`run_instruments`, or ``env.actions.max_leverage`` above any symbol's ``max_leverage``.
    """
    resolved_all = run_instruments(cfg)
    resolved = next(iter(resolved_all.values()))
    for r in resolved_all.values():
        if cfg.env.actions.max_leverage > r.spec.max_leverage:
            raise InstrumentSpecError(
                f"env.actions.max_leverage {cfg.env.actions.max_leverage:g} is above {r.spec.symbol}'s maximum "
                f"leverage {r.spec.max_leverage}x ({r.describe()}); lower env.actions.max_leverage"
            )
    costs = cfg.env.costs.with_instrument(resolved.spec)
    return cfg.updated(env=cfg.env.updated(costs=costs)), resolved


def check_run_instrument(cfg: RunConfig, resolved: ResolvedSpec) -> None:
    """Refuse a config whose cost model carries another spec than the run's resolved one.

    Raises
    ------
    market.instruments.InstrumentSpecError
        If ``cfg.env.costs.instrument`` differs from ``resolved.spec`` (a config built without
        :func:`load_config` / :func:`with_instrument`).
    """
    have = cfg.env.costs.instrument
    if have != resolved.spec:
        raise InstrumentSpecError(
            f"the run's cost model carries the instrument spec of {have.symbol} ({have.source}), not the spec resolved "
            f"for its data {cfg.data.symbol} ({resolved.describe()}); build run configs with "
            "training.config.load_config or with_instrument"
        )


def read_config_mapping(path: str | Path) -> dict:
    """The top-level mapping of the YAML config file ``path``.

    Raises
    ------
    ConfigError
        If the file is missing, is not valid YAML, or its top level is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def invalid_config(path: str | Path, exc: ValidationError) -> ConfigError:
    """The :class:`ConfigError` for a config file whose contents failed validation: one line per key."""
    lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return ConfigError(f"{path}: invalid config:\n  " + "\n  ".join(lines))
