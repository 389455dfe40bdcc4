"""Pooled multi-symbol training env: each episode trades one symbol, drawn at reset.

A :class:`MultiSymbolEnv` holds one :class:`envs.trading_env.TradingEnv` per symbol, each built from that
symbol's own :class:`~envs.trading_env.EnvData` (candles, ATR, funding rates, market observation) and its own
:class:`~envs.trading_env.EnvConfig` (whose ``costs.instrument`` is that symbol's
:class:`market.instruments.InstrumentSpec`: tick, step, minimum notional, brackets, funding interval). At
``reset`` it draws a symbol uniformly with its seeded generator (or takes ``options["symbol"]``), then the
symbol's env draws the episode's start with the same generator, so one seed fixes the whole sequence of
(symbol, start) pairs. Steps are the symbol env's steps, unchanged (its levers too: decision interval,
holding period, band, vol-target sizing on the symbol's own volatility, reward terms): no value of one symbol is
ever used for another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym

from envs.trading_env import EnvConfig, EnvData, TradingEnv


class MultiSymbolEnv(gym.Env):
    """Episodes over several symbols, each with its own data and cost model (instrument spec).

    Parameters
    ----------
    legs : sequence of (symbol, EnvData, EnvConfig)
        One entry per symbol; every ``EnvData`` has the same market observation columns. The configs may
        differ only in ``costs.instrument`` in practice (a pooled run's per-symbol spec), but any difference is
        honoured.

    Observation and action spaces are those of :class:`~envs.trading_env.TradingEnv` (identical for every leg).
    ``reset`` info and the last step's info carry ``symbol``.

    Raises
    ------
    ValueError
        If ``legs`` is empty, names a symbol twice, or the legs' observation columns differ.
    """

    metadata = TradingEnv.metadata

    def __init__(self, legs: Sequence[tuple[str, EnvData, EnvConfig]]) -> None:
        super().__init__()
        if not legs:
            raise ValueError("MultiSymbolEnv needs at least one (symbol, data, config) leg")
        symbols = [s for s, _, _ in legs]
        if len(set(symbols)) != len(symbols):
            raise ValueError(f"MultiSymbolEnv: a symbol is given twice: {symbols}")
        names = legs[0][1].market_obs_names
        for s, d, _ in legs:
            if d.market_obs_names != names:
                raise ValueError(f"MultiSymbolEnv: {s}'s observation columns differ from {symbols[0]}'s")
        self.symbols = tuple(symbols)
        self.envs = tuple(TradingEnv(d, c) for _, d, c in legs)
        self.observation_space = self.envs[0].observation_space
        self.action_space = self.envs[0].action_space
        self._k = 0

    @property
    def symbol(self) -> str:
        """The symbol of the current episode."""
        return self.symbols[self._k]

    @property
    def env(self) -> TradingEnv:
        """The current symbol's env."""
        return self.envs[self._k]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Draw a symbol (uniformly; ``options["symbol"]`` picks one) and reset its env.

        Other ``options`` (``start_index``, ``end_index``) go to the symbol's env.

        Raises
        ------
        ValueError
            If ``options["symbol"]`` is not one of the env's symbols, or the symbol env refuses the options.
        """
        super().reset(seed=seed)
        options = dict(options or {})
        if "symbol" in options:
            name = options.pop("symbol")
            if name not in self.symbols:
                raise ValueError(f"unknown symbol {name!r}; this env trades {list(self.symbols)}")
            self._k = self.symbols.index(name)
        else:
            self._k = int(self.np_random.integers(0, len(self.envs)))
        env = self.envs[self._k]
        env.np_random = self.np_random  # one generator: the seed fixes symbols and starts together
        obs, info = env.reset(options=options or None)
        return obs, {**info, "symbol": self.symbol}

    def step(self, action):
        """Step the current symbol's env (see :meth:`envs.trading_env.TradingEnv.step`)."""
        obs, reward, terminated, truncated, info = self.envs[self._k].step(action)
        if terminated or truncated:
            info["symbol"] = self.symbol
        return obs, reward, terminated, truncated, info

    def render(self) -> str | None:  # type: ignore[override]  # gymnasium's RenderFrame is an unbound TypeVar; ansi renders a str
        """The current symbol's render line, prefixed with the symbol."""
        line = self.envs[self._k].render()
        return None if line is None else f"{self.symbol} {line}"

