"""Composition roots of ``ats serve --mode paper``: wire candles, bundle, V1 and the store.

:func:`serve_replay` (``--replay CANDLES``) replays a candles file; :func:`serve_paper_live` (no
``--replay``) polls the exchange's public klines (:mod:`serving.paper_live`), no API key needed.

A bundle that fails to load does not stop serving: every bar is then decided by V1 and the
load error is recorded as the fallback reason of each decision (the load is retried after the
backoff). The risk guard (state persisted in the same database), hot-swap and notifications are
wired here. The paper account trades by the bundle env's trading rules (decision interval, minimum holding
period, rebalance band: :mod:`serving.trading_rules`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agents.policy import FrozenPPOPolicy
from envs.config import CostConfig, TradingRulesConfig
from fallback.config import V1Config
from fallback.v1 import V1Policy
from market import json_codec
from market.candles import load_candles
from market.features import FeatureConfig
from market.features import atr as atr_indicator
from market.instruments import InstrumentSpec, InstrumentSpecError, resolve_spec
from market.store import symbol_file_stem
from serving.account_risk import AccountGuard, AccountRiskConfig, per_symbol_limits, symbol_scope
from serving.drift import DriftConfig
from serving.drift_watch import DriftWatch
from serving.errors import FatalError
from serving.hotswap import BackoffConfig, PolicySlot, SlotGroup, reload_request_path
from serving.loop import ReplaySummary, ServeConfig, run_replay
from serving.notify import NotifyConfig, make_notifier, notify_config_from_env
from serving.paper_live import FeedConfig
from serving.risk import RiskConfig, RiskGuard
from serving.store import StateStore
from serving.trading_rules import bundle_env_config

if TYPE_CHECKING:
    from serving.portfolio import PortfolioSummary

DEFAULT_RISK = RiskConfig()


def _v1_config_from_manifest(bundle_dir: Path) -> V1Config:
    """The V1 config the bundle was evaluated with, if its manifest is readable; defaults otherwise."""
    try:
        manifest = json_codec.loads((Path(bundle_dir) / "manifest.json").read_text())
        return V1Config.model_validate(manifest["config"]["v1"])
    except Exception:  # noqa: BLE001 - an unreadable manifest must not stop the fallback from running
        return V1Config()


def _costs_from_manifest(bundle_dir: Path, symbol: str | None = None) -> CostConfig:
    """The cost model of a bundle that failed to load, for V1: the instrument spec its manifest records (or the
    spec of the symbol it records, else of ``symbol``, the served one: :func:`market.instruments.resolve_spec`)
    with the default fees and slippage.

    Raises
    ------
    market.instruments.InstrumentSpecError
        The manifest is unreadable or records no symbol with a known spec: the instrument is unknown, and another
        symbol's spec is never used.
    """
    try:
        manifest = json_codec.loads((Path(bundle_dir) / "manifest.json").read_text())
        data = manifest.get("data", {})
    except (OSError, ValueError, AttributeError) as exc:
        if symbol is not None:
            return CostConfig(instrument=resolve_spec(symbol_file_stem(symbol)).spec)
        raise InstrumentSpecError(f"bundle {bundle_dir} failed to load and its manifest is unreadable ({exc}): the "
                                  "instrument it trades (tick, step, brackets) is unknown; name it with --symbol"
                                  ) from exc  # fmt: skip
    record = (data.get("instrument") or {}).get("spec")
    if record is not None:
        try:
            return CostConfig(instrument=InstrumentSpec.model_validate(record))
        except ValueError:
            pass
    symbol = data.get("symbol") or (symbol_file_stem(symbol) if symbol is not None else None)
    if not symbol:
        raise InstrumentSpecError(f"bundle {bundle_dir} failed to load and its manifest records no symbol: the "
                                  "instrument it trades (tick, step, brackets) is unknown; name it with --symbol")  # fmt: skip
    return CostConfig(instrument=resolve_spec(str(symbol)).spec)


def _policies(bundle_dir: Path, backoff: BackoffConfig, watch_dir: Path | None, db_path: Path,
              log: Callable[[str], None], symbol: str | None = None,
              ) -> tuple[PolicySlot, V1Policy, CostConfig, FeatureConfig]:
    """The primary's slot (hot-swap from ``watch_dir`` and reload requests), V1 with the bundle's
    V1 config, and the bundle's cost and feature configs (a pooled bundle serving ``symbol``, one of the symbols its
    manifest lists in ``data.instruments``: that symbol's spec; defaults when the bundle failed to load:
    then V1 decides every bar until a reload succeeds, and the reason is recorded; the instrument spec then comes
    from the manifest, :func:`_costs_from_manifest`)."""
    slot = PolicySlot.from_bundle(
        bundle_dir, backoff=backoff, watch_dir=watch_dir, reload_file=reload_request_path(db_path)
    )
    bundle = slot.policy.bundle if isinstance(slot.policy, FrozenPPOPolicy) else None
    if bundle is not None:
        costs, feature_cfg = bundle.env_config.costs, bundle.feature_config
        pooled = (bundle.manifest.get("data") or {}).get("instruments") or {}
        if symbol is not None and symbol_file_stem(symbol) in pooled:  # a pooled bundle serving one of its symbols
            costs = costs.with_instrument(InstrumentSpec.model_validate(pooled[symbol_file_stem(symbol)]["spec"]))
        log(f"bundle loaded: {bundle_dir} (schema {bundle.manifest['observation']['schema_hash'][:12]})")
    else:
        costs, feature_cfg = _costs_from_manifest(bundle_dir, symbol), FeatureConfig()
        log(f"[yellow]bundle failed to load, V1 decides every bar[/]: {slot.load_error}")
    return slot, V1Policy(_v1_config_from_manifest(bundle_dir)), costs, feature_cfg


def _trading_rules(slot: PolicySlot) -> TradingRulesConfig | None:
    """The execution rules of the primary bundle's env (decision interval, minimum holding period, rebalance band;
    :mod:`serving.trading_rules`); None (the defaults) when the bundle failed to load."""
    env = bundle_env_config(slot.policy)
    return None if env is None else env.trading_rules


def _set_torch_threads(torch_threads: int | None) -> None:
    if torch_threads is not None:
        import torch

        torch.set_num_threads(int(torch_threads))


def serve_replay(
    *,
    replay: Path,
    bundle_dir: Path,
    db_path: Path,
    warmup_bars: int | None = None,
    max_bars: int = 0,
    initial_equity_usdt: float | None = None,
    risk: RiskConfig | None = DEFAULT_RISK,
    backoff: BackoffConfig | None = None,
    config: ServeConfig | None = None,
    watch_dir: Path | None = None,
    notify: NotifyConfig | Literal["env"] | None = "env",
    torch_threads: int | None = 1,
    log: Callable[[str], None] = print,
    progress_factory: Callable | None = None,
    symbol: str | None = None,
    drift: DriftConfig | None = None,
) -> ReplaySummary:
    """Replay ``replay`` candles bar by bar: V2 from the bundle, V1 on any V2 failure, paper fills.

    Parameters
    ----------
    warmup_bars, initial_equity_usdt, backoff
        Shortcuts for the fields of ``config`` (warm-up bars, paper equity in USDT, backoff); given
        explicitly they override it.
    max_bars : int
        Stop after this many decision bars (0: the whole file).
    config : ServeConfig | None
        The loop's settings (deadline ``decision_timeout_ms``, ``run_id``, ``context_bars`` ...);
        default ``ServeConfig(warmup_bars=1200)``.
    risk : RiskConfig | None
        Limits of the risk guard (its state is kept in ``db_path``, scope ``default``); None: no guard.
    backoff : BackoffConfig | None
        Bars V1 decides alone after primary failures (default :class:`BackoffConfig`).
    watch_dir : Path | None
        Directory watched for new bundles (hot-swap between bars). A reload request written by
        :func:`serving.hotswap.request_reload` to ``reload_request_path(db_path)`` is always honoured.
    notify : NotifyConfig | None | "env"
        Webhook notifications; "env" reads :func:`serving.notify.notify_config_from_env`.
    torch_threads : int | None
        torch intra-op threads of this (serving) process, None: leave as is. The TCN and the actor
        see one window per bar; on the 2 shared cores of the dev machine one thread took ~1 ms per
        TCN call where two took ~25 ms (thread oversubscription), so the default is 1.
    progress_factory : Callable | None
        Returns a rich ``Progress`` (e.g. :func:`ats_cli.progress.counting_progress`); its one task
        counts decided bars (task field ``unit``) and names the warm-up bars in its description.
    symbol : str | None
        The replayed symbol, for the instrument spec when the bundle does not load and its manifest does not
        record one (paper fills always use the bundle's recorded spec when it has one).
    drift : DriftConfig | None
        The drift monitor (``configs/serve.yaml`` ``drift:``; :mod:`serving.drift_watch`); None: none.

    Raises
    ------
    market.instruments.InstrumentSpecError
        The bundle failed to load and neither its manifest nor ``symbol`` names an instrument with a known spec.
    """
    _set_torch_threads(torch_threads)
    config = config if config is not None else ServeConfig(warmup_bars=1200)
    overrides = {"warmup_bars": warmup_bars, "initial_equity_usdt": initial_equity_usdt, "primary_backoff": backoff}
    config = ServeConfig.model_validate({**config.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})
    warmup_bars, backoff = config.warmup_bars, config.primary_backoff
    candles = load_candles(replay)
    if max_bars:
        candles = candles.iloc[: warmup_bars + max_bars]
    slot, fallback, costs, feature_cfg = _policies(bundle_dir, backoff, watch_dir, db_path, log, symbol)
    # each policy's stops in the units it decided them in: the bundle's feature ATR, V1's own ATR
    atr = atr_indicator(candles, feature_cfg.atr_period_bars)
    fallback_atr = atr_indicator(candles, fallback.atr_period_bars)
    store = StateStore.sqlite(db_path)
    guard = RiskGuard(risk, store) if risk is not None else None
    if guard is not None and guard.state.value != "ACTIVE":
        log(f"[red]risk guard is {guard.state.value}[/] (persisted): {'; '.join(guard.status.reasons)}")
    notifier = make_notifier(notify_config_from_env() if notify == "env" else notify)
    n = max(0, len(candles) - warmup_bars)
    kwargs: dict[str, Any] = {"fallback": fallback, "atr": atr, "fallback_atr": fallback_atr, "costs": costs, "store": store,
              "config": config, "guard": guard, "notifier": notifier, "trading_rules": _trading_rules(slot),
              "drift": drift}
    try:
        if progress_factory is None:
            return run_replay(candles, primary=slot, **kwargs)
        with progress_factory() as progress:  # counts decided bars only: the warm-up is named, not counted
            task = progress.add_task(f"replay after {min(warmup_bars, len(candles)):,} warm-up bars", total=n,
                                     unit="decided bars")
            return run_replay(candles, primary=slot, **kwargs,
                              progress=lambda i, total: progress.update(task, completed=i - warmup_bars))
    finally:
        if notifier is not None:
            notifier.close()


def serve_paper_live(
    *,
    bundle_dir: Path,
    db_path: Path,
    feed: FeedConfig | None = None,
    config: ServeConfig | None = None,
    initial_equity_usdt: float | None = None,
    max_bars: int | None = None,
    risk: RiskConfig | None = DEFAULT_RISK,
    watch_dir: Path | None = None,
    testnet_data: bool = False,
    base_url: str | None = None,
    notify: NotifyConfig | Literal["env"] | None = "env",
    torch_threads: int | None = 1,
    log: Callable[[str], None] = print,
    drift: DriftConfig | None = None,
) -> ReplaySummary:
    """Forward-test the bundle on the exchange's live candles with the paper broker (no key, no order).

    Polls the public klines of ``feed.symbol`` / ``feed.timeframe`` shortly after each bar close
    and decides every new closed bar as the replay does (:mod:`serving.paper_live`), until
    SIGINT/SIGTERM (between bars) or ``max_bars`` decided bars.

    Parameters
    ----------
    feed : FeedConfig | None
        Symbol, timeframe, poll timing (default :class:`serving.paper_live.FeedConfig`).
    config : ServeConfig | None
        Paper settings (``context_bars`` <= 10,000, read in pages; ``warmup_bars`` unused); default
        ``ServeConfig(warmup_bars=1200)`` as for the replay.
    initial_equity_usdt : float | None
        Overrides ``config.initial_equity_usdt`` (USDT).
    risk, watch_dir, notify, torch_threads, log, drift
        As :func:`serve_replay`.
    testnet_data : bool
        Read the Binance futures testnet's public candles instead of the real market's.
    base_url : str | None
        Redirect the exchange client to this URL (a local test server).

    Raises
    ------
    FatalError
        ``db_path`` already holds this paper run (no resume; use a new file), or the exchange does
        not list the symbol.
    ValueError
        A setting out of range (``context_bars`` None or above 10,000, shorter than V1's history).

    A failed poll (network, 5xx, 429) is recorded and retried, never raised.
    """
    from serving.exchange import BinanceFuturesBroker, make_client
    from serving.paper_live import PaperLiveLoop

    _set_torch_threads(torch_threads)
    feed = feed if feed is not None else FeedConfig()
    config = config if config is not None else ServeConfig(warmup_bars=1200)
    if initial_equity_usdt is not None:
        config = ServeConfig.model_validate({**config.model_dump(), "initial_equity_usdt": initial_equity_usdt})
    slot, fallback, costs, _ = _policies(bundle_dir, config.primary_backoff, watch_dir, db_path, log, feed.symbol)
    store = StateStore.sqlite(db_path)
    if store.last_decision_bar(config.run_id) is not None:  # before the guard or anything else writes
        raise FatalError(f"{db_path} already holds paper run {config.run_id!r}; a paper account cannot be "
                         "resumed after a restart: start the forward test with a new --db")  # fmt: skip
    client = make_client(api_key=None, secret=None, sandbox=testnet_data, base_url=base_url)
    guard = RiskGuard(risk, store) if risk is not None else None
    notifier = make_notifier(notify_config_from_env() if notify == "env" else notify)
    loop = PaperLiveLoop(BinanceFuturesBroker(client, feed.symbol), store, config, feed, primary=slot,
                         fallback=fallback, costs=costs, guard=guard, notifier=notifier)  # fmt: skip
    loop.stepper.use_trading_rules(_trading_rules(slot))
    if drift is not None:
        loop.stepper.drift_watch = DriftWatch(drift, store, config.run_id, loop.stepper.symbol)
    log(f"paper on live candles: {feed.symbol} {feed.timeframe} from the {'testnet' if testnet_data else 'real'} "
        f"market{f' at {base_url}' if base_url else ''}; state in {db_path}; stop with Ctrl-C (between bars)")
    try:
        return loop.run(max_bars=max_bars)
    finally:
        if notifier is not None:
            notifier.close()


def bundle_symbols(bundle_dir: Path) -> list[str]:
    """The symbols a bundle was trained on, from its manifest (``data.symbols`` of a pooled run, else
    ``data.symbol``), as exchange ids (``BTCUSDT``); empty when the manifest records none or is unreadable."""
    try:
        data = json_codec.loads((Path(bundle_dir) / "manifest.json").read_text()).get("data") or {}
    except (OSError, ValueError, AttributeError):
        return []
    raw = data.get("symbols") or ([data["symbol"]] if data.get("symbol") else [])
    return [symbol_file_stem(str(s)) for s in raw]


def check_symbols_served(bundle_dir: Path, symbols: list[str], allow_transfer: bool) -> list[str]:
    """The symbols of ``symbols`` the bundle was not trained on (:func:`bundle_symbols`); empty when all were.

    Raises
    ------
    FatalError
        Some were not, and ``allow_transfer`` is False (the message names them and the bundle's symbols).
    """
    trained = bundle_symbols(bundle_dir)
    foreign = [s for s in symbols if s not in trained]
    if foreign and not allow_transfer:
        known = ", ".join(trained) if trained else "none recorded in its manifest"
        raise FatalError(f"bundle {bundle_dir} was trained on {known}; it is not asked to serve {', '.join(foreign)} "
                         "unless --allow-transfer is given (a transfer to an unseen symbol; it is logged)")
    return foreign


def serve_replay_multi(
    *,
    replays: dict[str, Path],
    bundle_dir: Path,
    db_path: Path,
    config: ServeConfig | None = None,
    warmup_bars: int | None = None,
    max_bars: int = 0,
    initial_equity_usdt: float | None = None,
    risk: RiskConfig | None = DEFAULT_RISK,
    account_risk: AccountRiskConfig | None = None,
    allow_transfer: bool = False,
    notify: NotifyConfig | Literal["env"] | None = "env",
    torch_threads: int | None = 1,
    log: Callable[[str], None] = print,
    progress_factory: Callable | None = None,
    drift: DriftConfig | None = None,
    watch_dir: Path | None = None,
) -> PortfolioSummary:
    """Replay several symbols' candles on one paper account (:func:`serving.portfolio.run_portfolio_replay`).

    Parameters
    ----------
    replays : dict[str, Path]
        Symbol (exchange id, ``BTCUSDT``) -> its candles file.
    bundle_dir : Path
        One bundle serves every symbol: each gets its own instance (slot) of it, V1 with the bundle's V1 config and
        the symbol's instrument spec (a pooled bundle's record of it, else :func:`market.instruments.resolve_spec`).
    config, warmup_bars, max_bars, initial_equity_usdt, notify, torch_threads, log, progress_factory, drift
        As :func:`serve_replay` (``max_bars``: clock times decided; the warm-up is per symbol; ``drift``: a
        monitor per symbol).
    risk : RiskConfig | None
        Each symbol's guard (kill switches, entry caps; scope ``symbol:<SYMBOL>``); None: none.
    account_risk : AccountRiskConfig | None
        The account's guard (scope ``account``); default :class:`serving.account_risk.AccountRiskConfig` when
        ``risk`` is given, none when ``risk`` is None.
    allow_transfer : bool
        Serve symbols the bundle was not trained on (:func:`check_symbols_served`); each is logged as a
        ``transfer_allowed`` event.
    watch_dir : Path | None
        Watched for new bundles; with the reload requests of ``ats serve reload --db`` (always honoured) a candidate
        is probed on every symbol and swapped into all of them at the same bar, or into none
        (:class:`serving.hotswap.SlotGroup`).

    Raises
    ------
    FatalError
        The bundle was not trained on a symbol and ``allow_transfer`` is False.
    market.instruments.InstrumentSpecError
        A symbol without a known instrument spec.
    """
    from serving.portfolio import Leg, run_portfolio_replay

    _set_torch_threads(torch_threads)
    symbols = sorted(replays)
    foreign = check_symbols_served(bundle_dir, symbols, allow_transfer)
    config = config if config is not None else ServeConfig(warmup_bars=1200)
    overrides = {"warmup_bars": warmup_bars, "initial_equity_usdt": initial_equity_usdt}
    config = ServeConfig.model_validate({**config.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})
    legs = []
    slots: dict[str, PolicySlot] = {}
    for symbol in symbols:
        candles = load_candles(replays[symbol])
        if max_bars:
            candles = candles.iloc[: config.warmup_bars + max_bars]
        slot, fallback, costs, feature_cfg = _policies(bundle_dir, config.primary_backoff, None, db_path, log, symbol)
        slot.reload_file = None  # the group reads the requests, so that one reaches every symbol
        slots[symbol] = slot
        if costs.instrument.symbol != symbol:  # a single-symbol bundle serving another symbol: that symbol's spec
            costs = costs.with_instrument(resolve_spec(symbol).spec)
        legs.append(Leg(symbol, candles, slot, fallback, atr_indicator(candles, feature_cfg.atr_period_bars), costs,
                        fallback_atr=atr_indicator(candles, fallback.atr_period_bars),
                        trading_rules=_trading_rules(slot)))
    store = StateStore.sqlite(db_path)
    if risk is not None and account_risk is None:
        account_risk = AccountRiskConfig()
    for symbol in foreign:
        log(f"[yellow]transfer[/]: the bundle was not trained on {symbol} (--allow-transfer)")
    notifier = make_notifier(notify_config_from_env() if notify == "env" else notify)
    files = {s: str(replays[s]) for s in symbols}
    kwargs: dict[str, Any] = {"store": store, "config": config, "symbol_risk": risk, "account_risk": account_risk,
                              "notifier": notifier, "detail": {"replay": files, "transfer": foreign}, "drift": drift,
                              "slot_group": SlotGroup(slots, watch_dir=watch_dir, reload_file=reload_request_path(db_path))}
    try:
        if foreign:
            store.append_event(config.run_id, legs[0].candles.index[0], "transfer_allowed",
                               {"symbols": foreign, "bundle": str(bundle_dir),
                                "trained_on": bundle_symbols(bundle_dir)})
        if progress_factory is None:
            return run_portfolio_replay(legs, **kwargs)
        with progress_factory() as progress:
            task = progress.add_task(f"replay of {len(symbols)} symbols after {config.warmup_bars:,} warm-up bars",
                                     total=None, unit="bar times")
            return run_portfolio_replay(legs, **kwargs, progress=lambda i, total: progress.update(
                task, completed=i, total=total))
    finally:
        if notifier is not None:
            notifier.close()


def serve_paper_live_multi(
    *,
    symbols: list[str],
    bundle_dir: Path,
    db_path: Path,
    feed: FeedConfig | None = None,
    config: ServeConfig | None = None,
    initial_equity_usdt: float | None = None,
    max_bars: int | None = None,
    risk: RiskConfig | None = DEFAULT_RISK,
    account_risk: AccountRiskConfig | None = None,
    allow_transfer: bool = False,
    testnet_data: bool = False,
    base_url: str | None = None,
    notify: NotifyConfig | Literal["env"] | None = "env",
    torch_threads: int | None = 1,
    log: Callable[[str], None] = print,
    drift: DriftConfig | None = None,
    watch_dir: Path | None = None,
) -> PortfolioSummary:
    """Forward-test the bundle on several symbols' live candles on one paper account (``ats serve --mode paper
    --symbols A,B``; :class:`serving.paper_live.PaperLivePortfolio`): equal sleeves, every symbol's bar decided
    together, each symbol's guard then the account's, as the multi-symbol replay (:func:`serve_replay_multi`).

    Parameters
    ----------
    symbols : list[str]
        Two or more distinct ccxt unified symbols (``BTC/USDT:USDT``); each gets its own instance (slot) of the
        bundle, V1 with the bundle's V1 config and its instrument spec (the exchange's filters at start).
    feed : FeedConfig | None
        Timeframe and poll timing (its ``symbol`` is ignored; each symbol's feed is a copy naming it).
    config, initial_equity_usdt, max_bars, testnet_data, base_url, notify, torch_threads, log
        As :func:`serve_paper_live` (``initial_equity_usdt``: the whole account, split equally).
    risk, account_risk, allow_transfer, drift, watch_dir
        As :func:`serve_replay_multi` (``drift``: a monitor per symbol; hot-swap into every symbol at the same bar
        or none).

    Raises
    ------
    FatalError
        ``db_path`` already holds this paper run, the exchange does not list a symbol, or the bundle was not trained
        on a symbol and ``allow_transfer`` is False.
    ValueError
        Fewer than two distinct symbols, or a setting out of range.
    market.instruments.InstrumentSpecError
        A symbol without a known instrument spec.
    """
    from serving.exchange import BinanceFuturesBroker, make_client
    from serving.paper_live import PaperLiveLoop, PaperLivePortfolio
    from serving.portfolio import sleeve_equity_usdt
    from serving.store import EventRecord

    exchange_ids = [symbol_file_stem(s) for s in symbols]
    if len(exchange_ids) < 2 or len(set(exchange_ids)) != len(exchange_ids):
        raise ValueError(f"paper serving of several symbols needs two or more distinct symbols, got {symbols}")
    _set_torch_threads(torch_threads)
    foreign = check_symbols_served(bundle_dir, exchange_ids, allow_transfer)
    feed = feed if feed is not None else FeedConfig()
    config = config if config is not None else ServeConfig(warmup_bars=1200)
    if initial_equity_usdt is not None:
        config = ServeConfig.model_validate({**config.model_dump(), "initial_equity_usdt": initial_equity_usdt})
    store = StateStore.sqlite(db_path)
    if store.last_decision_bar(config.run_id) is not None:  # before the guards or anything else writes
        raise FatalError(f"{db_path} already holds paper run {config.run_id!r}; a paper account cannot be "
                         "resumed after a restart: start the forward test with a new --db")  # fmt: skip
    if risk is not None and account_risk is None:
        account_risk = AccountRiskConfig()
    sleeve = config.updated(initial_equity_usdt=sleeve_equity_usdt(config.initial_equity_usdt, len(symbols)))
    client = make_client(api_key=None, secret=None, sandbox=testnet_data, base_url=base_url)
    notifier = make_notifier(notify_config_from_env() if notify == "env" else notify)
    loops = []
    slots: dict[str, PolicySlot] = {}
    for unified, symbol in zip(symbols, exchange_ids, strict=True):
        slot, fallback, costs, _ = _policies(bundle_dir, config.primary_backoff, None, db_path, log, unified)
        slot.reload_file = None  # the group reads the requests, so that one reaches every symbol
        slots[symbol] = slot
        if costs.instrument.symbol != symbol:  # a single-symbol bundle serving another symbol: that symbol's spec
            costs = costs.with_instrument(resolve_spec(symbol).spec)
        guard = (RiskGuard(per_symbol_limits(risk), store, scope=symbol_scope(symbol)) if risk is not None else None)
        loop = PaperLiveLoop(BinanceFuturesBroker(client, unified), store, sleeve, feed.model_copy(
            update={"symbol": unified}), primary=slot, fallback=fallback, costs=costs, guard=guard, notifier=notifier)
        loop.stepper.use_trading_rules(_trading_rules(slot))
        if drift is not None:
            loop.stepper.drift_watch = DriftWatch(drift, store, config.run_id, symbol)
        loops.append(loop)
    account = AccountGuard(account_risk, store) if account_risk is not None else None
    group = SlotGroup(slots, watch_dir=watch_dir, reload_file=reload_request_path(db_path))
    portfolio = PaperLivePortfolio(loops, store, config, account_guard=account, notifier=notifier, slot_group=group)
    for symbol in foreign:
        log(f"[yellow]transfer[/]: the bundle was not trained on {symbol} (--allow-transfer)")
    log(f"paper on live candles: {','.join(exchange_ids)} {feed.timeframe} on one account from the "
        f"{'testnet' if testnet_data else 'real'} market{f' at {base_url}' if base_url else ''}; state in {db_path}; "
        "stop with Ctrl-C (between bars)")
    try:
        if foreign:
            import pandas as pd

            store.append(events=[EventRecord(config.run_id, pd.Timestamp.now(tz="UTC"), "transfer_allowed", {
                "symbols": foreign, "bundle": str(bundle_dir), "trained_on": bundle_symbols(bundle_dir)})])  # fmt: skip
        return portfolio.run(max_bars=max_bars)
    finally:
        if notifier is not None:
            notifier.close()
