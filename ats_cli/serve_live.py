"""``ats serve --mode testnet|live``: composition root of the live loop (called by ``ats_cli.main``).

* ``testnet``: Binance USDⓈ-M futures testnet (ccxt sandbox mode) with testnet keys.
* ``live``: real money. Starts only if ``--live`` is given, the bundle's manifest carries a PASS
  gate verdict (``manifest["gate"]["verdict"]``, written by ``ats gate``) unless ``--force-gate``,
  and the user types the arming phrase (:func:`arming_phrase`) at the prompt.
  :func:`check_arming` is the pure check of these rules.

Keys: :func:`serving.secrets.load_credentials` (environment or a ``chmod 600`` ``.env`` file).
The bundle, the V1 fallback and the risk guard are wired as in paper serving: a bundle that fails
to load leaves V1 deciding every bar (the reason is recorded with every decision).
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from market.instruments import DEFAULT_CCXT_SYMBOL
from serving.errors import FatalError

MODES = ("testnet", "live")


def arming_phrase(symbol: str) -> str:
    """The exact text a user must type to arm live trading on ``symbol``."""
    return f"ARM LIVE TRADING {symbol}"


def check_arming(
    *,
    mode: str,
    live_flag: bool,
    manifest: dict[str, Any] | None,
    force_gate: bool,
    typed_phrase: str | None,
    symbol: str,
) -> list[str]:
    """Whether the live loop may start in ``mode`` (pure). Returns warnings to show.

    Rules: ``mode`` in {testnet, live}; for live: ``live_flag`` True, gate verdict PASS in
    ``manifest`` (or ``force_gate``), ``typed_phrase`` equal to :func:`arming_phrase` (surrounding
    whitespace ignored). On testnet: gate verdict PASS (or ``force_gate``).

    Raises
    ------
    FatalError
        Naming the first rule broken.
    """
    if mode not in MODES:
        raise FatalError(f"mode must be one of {MODES}, got {mode!r}")
    verdict = ((manifest or {}).get("gate") or {}).get("verdict")
    warnings: list[str] = []
    if mode == "testnet":
        if verdict != "PASS":
            if not force_gate:
                raise FatalError(f"bundle gate verdict is {verdict or 'absent'}, not PASS; testnet serves only a "
                                 "PASS bundle: run `ats gate`, or --force-gate to serve it anyway")  # fmt: skip
            warnings.append(f"gate verdict {verdict or 'absent'} overridden by --force-gate (testnet)")
        return warnings
    if not live_flag:
        raise FatalError("live trading needs the --live flag")
    if verdict != "PASS":
        if not force_gate:
            raise FatalError(f"bundle gate verdict is {verdict or 'absent'}, not PASS; run `ats gate` or --force-gate")
        warnings.append(f"gate verdict {verdict or 'absent'} overridden by --force-gate")
    if typed_phrase is None or typed_phrase.strip() != arming_phrase(symbol):
        raise FatalError("arming phrase not typed correctly; live trading not armed")
    return warnings


def check_base_url(url: str) -> str:
    """``url`` if the exchange REST base URL may carry signed (keyed) requests: ``https://HOST[...]``, or
    ``http://`` to a loopback host (``localhost``, ``127.0.0.0/8``, ``[::1]``: a local exchange simulator or
    an egress proxy on this machine). Pure.

    Raises
    ------
    FatalError
        Any other URL (plain http to another host, another scheme, no host), naming the rule; also
        a URL with a user name or password in it (it would be logged and recorded).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.username is not None or parts.password is not None:
        raise FatalError("--base-url must not contain a user name or password (it is logged and recorded)")
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and host:
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name other than localhost
            loopback = False
        if loopback:
            return url
    raise FatalError(f"--base-url {url!r} refused: testnet/live send the API key, so the URL must be https:// "
                     "or http:// to a loopback host (localhost, 127.0.0.0/8, [::1])")


def _read_manifest(bundle_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(bundle_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def serve_live(
    *,
    mode: str,
    bundle_dir: Path,
    db_path: Path,
    db_url: str | None = None,
    symbol: str = DEFAULT_CCXT_SYMBOL,
    timeframe: str = "1h",
    env_file: Path | None = None,
    live: bool = False,
    force_gate: bool = False,
    max_bars: int | None = None,
    use_guard: bool = True,
    prompt: Callable[[str], str] = input,
    log: Callable[[str], None] = print,
    base_url: str | None = None,
    live_config: Any = None,
    risk: Any = None,
    watch_dir: Path | None = None,
    notify: Any = "env",
    drift: Any = None,
) -> int:
    """Run the live loop until SIGTERM/SIGINT (or ``max_bars`` bars); returns the bars processed.

    ``base_url`` redirects the exchange client (a local exchange simulator, an egress proxy, tests); it must
    pass :func:`check_base_url`, and is logged and recorded in the ``live_started`` event. ``live_config``
    (:class:`serving.live.LiveConfig`) overrides ``symbol``/``timeframe`` and the loop's settings;
    ``risk`` (:class:`serving.risk.RiskConfig`) sets the guard's limits (default limits when None;
    ``use_guard=False`` is for tests only: the CLI always runs the guard).
    ``watch_dir``: directory watched for new bundles; ``ats serve reload --db`` also works.
    ``db_url``: a SQLAlchemy URL for the state (any backend SQLAlchemy speaks; tested on SQLite);
    ``db_path`` then only names the reload-request file.
    ``notify``: a :class:`serving.notify.NotifyConfig`, None (off) or "env" (default:
    :func:`serving.notify.notify_config_from_env`, i.e. ``ATS_DISCORD_WEBHOOK_URL`` or
    ``ATS_TELEGRAM_BOT_TOKEN`` + ``ATS_TELEGRAM_CHAT_ID``); a failing webhook never stops the loop.
    Raises :class:`FatalError` when arming, credentials or the exchange setup fail.
    """
    from serving.exchange import BinanceFuturesBroker, make_client
    from serving.hotswap import reload_request_path
    from serving.live import LiveConfig
    from serving.secrets import load_credentials
    from serving.store import StateStore

    if base_url is not None:
        check_base_url(base_url)
    if live_config is not None:
        symbol, timeframe = live_config.symbol, live_config.timeframe
    manifest = _read_manifest(bundle_dir)
    typed = prompt(f"Type '{arming_phrase(symbol)}' to arm LIVE trading: ") if mode == "live" and live else None
    for w in check_arming(mode=mode, live_flag=live, manifest=manifest, force_gate=force_gate, typed_phrase=typed,
                          symbol=symbol):
        log(f"[yellow]warning[/]: {w}")
    creds = load_credentials(env_file=env_file)
    log(f"credentials loaded from {creds.source} (values hidden)")

    store = StateStore(db_url) if db_url else StateStore.sqlite(db_path)
    client = make_client(api_key=creds.api_key.reveal(), secret=creds.api_secret.reveal(),
                         sandbox=mode == "testnet", base_url=base_url)
    broker = BinanceFuturesBroker(client, symbol)
    broker.base_url = base_url  # recorded by LiveLoop in its live_started event (ats status)
    from serving.notify import make_notifier, notify_config_from_env

    notifier = make_notifier(notify_config_from_env() if notify == "env" else notify)
    base = live_config if live_config is not None else LiveConfig(symbol=symbol, timeframe=timeframe)
    loop = build_live_loop(mode=mode, bundle_dir=bundle_dir, store=store, broker=broker, live_config=base,
                           reload_file=reload_request_path(db_path), force_gate=force_gate, manifest=manifest,
                           use_guard=use_guard, risk=risk, watch_dir=watch_dir, notifier=notifier,
                           redact=creds.redact, log=log, drift=drift)
    log(f"serving {symbol} {timeframe} on {mode}{f' at {base_url}' if base_url else ''}; state in {db_path}; "
        "stop with Ctrl-C (between bars)"
        + ("; notifications on" if notifier is not None else ""))
    try:
        return loop.run(max_steps=max_bars)
    finally:
        if notifier is not None:
            notifier.close()


def build_live_loop(
    *,
    mode: str,
    bundle_dir: Path,
    store: Any,
    broker: Any,
    live_config: Any,
    reload_file: Path | None = None,
    force_gate: bool = False,
    manifest: dict[str, Any] | None = None,
    use_guard: bool = True,
    risk: Any = None,
    watch_dir: Path | None = None,
    notifier: Any = None,
    redact: Callable[[str], str] = lambda text: text,
    log: Callable[[str], None] = print,
    wall_clock_s: Callable[[], float] = time.time,
    monotonic_s: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    crash_points: Any = None,
    drift: Any = None,
) -> Any:
    """The :class:`serving.live.LiveLoop` of ``ats serve --mode testnet|live`` (pure composition, no I/O
    beyond loading the bundle): bundle slot (hot-swap, backoff; a bundle that fails to load leaves V1
    deciding every bar), V1 with the bundle's V1 config, context of the policies' history + 10 bars
    (at least ``live_config.context_bars``; the loop pages the exchange's klines), the risk guard
    (``risk`` limits, defaults when None; ``use_guard=False`` for tests only) with its state in
    ``store``, ``run_id`` = ``mode``. The clocks and the crash points (:class:`serving.crash.CrashPoints`,
    None: :data:`serving.crash.NO_CRASH`) are injected by exchange simulations and crash tests. The loop trades
    by the bundle env's trading rules (:mod:`serving.trading_rules`); a bundle whose rules live cannot trade (a
    rebalance band) raises :class:`serving.trading_rules.UnservableBundleError` (a :class:`FatalError`), and
    such a hot-swap candidate is rejected (``bundle_rejected``; the current policy stays). ``drift``
    (:class:`serving.drift.DriftConfig`, None: none) attaches the drift monitor (:mod:`serving.drift_watch`).
    """
    import pandas as pd

    from fallback.v1 import V1Policy
    from serving.hotswap import PolicySlot
    from serving.live import LiveLoop
    from serving.trading_rules import load_live_policy, refuse_unservable_bundle

    manifest = manifest if manifest is not None else _read_manifest(bundle_dir)
    # rules live cannot trade as the env does (a rebalance band): refused at start, and as a hot-swap candidate
    refuse_unservable_bundle(bundle_dir)
    # hot-swapped bundles need PASS too; --force-gate (an explicit override) lifts it for the whole session
    slot = PolicySlot.from_bundle(bundle_dir, watch_dir=watch_dir, reload_file=reload_file,
                                  require_gate_pass=not force_gate, loader=load_live_policy)  # fmt: skip
    primary, load_error = slot.policy, slot.load_error
    if primary is None:
        log(f"[yellow]bundle failed to load, V1 decides every bar[/]: {load_error}")
    fallback = V1Policy(_v1_config(manifest))
    bar_interval = pd.Timedelta(live_config.timeframe)
    history = max(p.history_bars(bar_interval) for p in (fallback, primary) if p is not None)
    context = min(1500, max(100, history + 10))
    loop_cfg = live_config.updated(run_id=mode, mode=mode, context_bars=max(live_config.context_bars, context))
    guard = None
    if use_guard:
        from serving.risk import RiskConfig, RiskGuard

        # the default scope: the one `ats status` shows and `ats serve reset-risk` resets
        guard = RiskGuard(risk if risk is not None else RiskConfig(), store)
    from serving.crash import NO_CRASH

    loop = LiveLoop(broker, store, loop_cfg, primary=slot, fallback=fallback, primary_load_error=load_error,
                    guard=guard, redact=redact, notifier=notifier, wall_clock_s=wall_clock_s,
                    monotonic_s=monotonic_s, sleep=sleep,
                    crash_points=NO_CRASH if crash_points is None else crash_points)
    if drift is not None:
        from serving.drift_watch import DriftWatch

        market_id = str(loop_cfg.symbol).split(":")[0].replace("/", "").upper()  # BTC/USDT:USDT -> BTCUSDT
        loop.drift_watch = DriftWatch(drift, store, loop_cfg.run_id, market_id)
    return loop


def _v1_config(manifest: dict[str, Any] | None):
    """The V1 config the bundle was evaluated with (defaults when the manifest is unreadable)."""
    from fallback.config import V1Config

    try:
        return V1Config.model_validate((manifest or {})["config"]["v1"])
    except Exception:  # noqa: BLE001 - an unreadable manifest must not stop the fallback from running
        return V1Config()


def unified_symbol(symbol: str) -> str:
    """A USDⓈ-M perpetual as ccxt's unified symbol: ``ETHUSDT`` -> ``ETH/USDT:USDT``; a unified one unchanged (pure).

    Raises
    ------
    FatalError
        Neither form (``ETH``, ``ETH-USD``): the message names it.
    """
    s = symbol.strip().upper()
    if "/" in s and s.endswith(":USDT"):
        return s
    if s.endswith("USDT") and len(s) > 4 and s.isalnum():
        return f"{s[:-4]}/USDT:USDT"
    raise FatalError(f"symbol {symbol!r}: give a USDT perpetual as BTCUSDT or BTC/USDT:USDT")


def build_live_portfolio(
    *,
    mode: str,
    bundle_dir: Path,
    store: Any,
    brokers: dict[str, Any],
    live_config: Any,
    force_gate: bool = False,
    manifest: dict[str, Any] | None = None,
    use_guard: bool = True,
    risk: Any = None,
    account_risk: Any = None,
    notifier: Any = None,
    redact: Callable[[str], str] = lambda text: text,
    log: Callable[[str], None] = print,
    wall_clock_s: Callable[[], float] = time.time,
    monotonic_s: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    crash_points: Any = None,
    drift: Any = None,
    watch_dir: Path | None = None,
    reload_file: Path | None = None,
) -> Any:
    """The :class:`serving.live_portfolio.LivePortfolio` of ``ats serve --mode testnet|live --symbols A,B`` (pure
    composition, no I/O beyond loading the bundle): one :func:`build_live_loop` per symbol of ``brokers`` (unified
    ccxt symbol -> its broker, all on one client), each with its own bundle slot (the live loader and the gate
    rule of :func:`build_live_loop`), V1, its config (``live_config`` with its symbol), a :class:`serving.live_portfolio.
    SymbolEvents` view of ``store`` (its events name it) and a :class:`serving.live_portfolio.SymbolGuard`: its own
    guard (``risk`` without daily loss and drawdown, scope ``symbol:<SYMBOL>``; ``use_guard=False`` for tests only)
    and the account's guard (``account_risk``, :class:`serving.account_risk.AccountRiskConfig`, defaults when None)
    for its closed trades. One run id (``mode``). ``drift`` (:class:`serving.drift.DriftConfig`, None: none): a drift
    monitor per symbol (:func:`build_live_loop`). Hot-swap: one :class:`serving.hotswap.SlotGroup` over the symbols'
    slots reads ``reload_file`` (:func:`serving.hotswap.request_reload`, ``ats serve reload``) and ``watch_dir``
    (None: not read), so a candidate is checked on every symbol and swapped into all of them at one bar or into none
    (:mod:`serving.live_portfolio`).
    """
    from market.store import symbol_file_stem
    from serving.account_risk import AccountGuard, AccountRiskConfig, per_symbol_limits, symbol_scope
    from serving.hotswap import SlotGroup
    from serving.live_portfolio import LivePortfolio, SymbolEvents, SymbolGuard
    from serving.risk import RiskConfig, RiskGuard

    account_guard = AccountGuard(account_risk if account_risk is not None else AccountRiskConfig(), store) \
        if use_guard else None
    loops = []
    slots = {}
    for unified, broker in brokers.items():
        exchange_id = symbol_file_stem(unified).upper()
        view = SymbolEvents(store, exchange_id).as_store()
        loop = build_live_loop(mode=mode, bundle_dir=bundle_dir, store=view, broker=broker,
                               live_config=live_config.updated(symbol=unified), reload_file=None,
                               force_gate=force_gate, manifest=manifest, use_guard=False, notifier=None,
                               redact=redact, log=log, wall_clock_s=wall_clock_s, monotonic_s=monotonic_s,
                               sleep=sleep, crash_points=crash_points, drift=drift)  # fmt: skip
        own = (RiskGuard(per_symbol_limits(risk if risk is not None else RiskConfig()), store,
                         scope=symbol_scope(exchange_id)) if use_guard else None)  # fmt: skip
        loop.set_guard(SymbolGuard(own, account_guard))
        loops.append(loop)
        slots[exchange_id] = loop.slot  # its own request file and watched directory off: the group reads them
    group = SlotGroup(slots, watch_dir=watch_dir, reload_file=reload_file)
    return LivePortfolio(loops, store, account_guard=account_guard, notifier=notifier, slot_group=group)


def serve_live_multi(
    *,
    mode: str,
    symbols: list[str],
    bundle_dir: Path,
    db_path: Path,
    db_url: str | None = None,
    env_file: Path | None = None,
    live: bool = False,
    force_gate: bool = False,
    max_bars: int | None = None,
    prompt: Callable[[str], str] = input,
    log: Callable[[str], None] = print,
    base_url: str | None = None,
    live_config: Any = None,
    risk: Any = None,
    account_risk: Any = None,
    allow_transfer: bool = False,
    notify: Any = "env",
    drift: Any = None,
    watch_dir: Path | None = None,
) -> int:
    """``ats serve --mode testnet|live --symbols A,B,...``: several symbols in one process on one account
    (:class:`serving.live_portfolio.LivePortfolio`) until SIGTERM/SIGINT (or ``max_bars`` bar closes); returns the
    bar closes processed. As :func:`serve_live` otherwise (arming: the phrase names the symbols joined by ``,``;
    keys, ``base_url``, notifications); one ccxt client (one rate limiter) for every symbol's broker. A symbol the
    bundle was not trained on is refused unless ``allow_transfer`` (logged, ``transfer_allowed`` event).
    Hot-swap reaches every symbol: ``ats serve reload --db`` (the request file next to ``db_path``) and
    ``watch_dir`` (None: none); a candidate is swapped into all symbols at one bar or into none.

    Raises
    ------
    FatalError
        Arming, credentials, an unreadable symbol or the exchange set-up fail.
    ValueError
        Fewer than two symbols, a symbol given twice, or a symbol the bundle was not trained on without
        ``allow_transfer``.
    """
    from serving.app import check_symbols_served
    from serving.exchange import BinanceFuturesBroker, make_client
    from serving.hotswap import reload_request_path
    from serving.live import LiveConfig
    from serving.notify import make_notifier, notify_config_from_env
    from serving.secrets import load_credentials
    from serving.store import EventRecord, StateStore

    unified = [unified_symbol(s) for s in symbols]
    if len(unified) < 2 or len(set(unified)) != len(unified):
        raise ValueError(f"--symbols needs two or more distinct symbols, got {symbols}")
    exchange_ids = [u.split("/")[0] + "USDT" for u in unified]
    foreign = check_symbols_served(bundle_dir, exchange_ids, allow_transfer)
    if base_url is not None:
        check_base_url(base_url)
    manifest = _read_manifest(bundle_dir)
    label = ",".join(exchange_ids)
    typed = prompt(f"Type '{arming_phrase(label)}' to arm LIVE trading: ") if mode == "live" and live else None
    for w in check_arming(mode=mode, live_flag=live, manifest=manifest, force_gate=force_gate, typed_phrase=typed,
                          symbol=label):
        log(f"[yellow]warning[/]: {w}")
    creds = load_credentials(env_file=env_file)
    log(f"credentials loaded from {creds.source} (values hidden)")
    store = StateStore(db_url) if db_url else StateStore.sqlite(db_path)
    client = make_client(api_key=creds.api_key.reveal(), secret=creds.api_secret.reveal(),
                         sandbox=mode == "testnet", base_url=base_url)
    brokers = {}
    for u in unified:
        brokers[u] = BinanceFuturesBroker(client, u)
        brokers[u].base_url = base_url
    notifier = make_notifier(notify_config_from_env() if notify == "env" else notify)
    base = live_config if live_config is not None else LiveConfig()
    portfolio = build_live_portfolio(mode=mode, bundle_dir=bundle_dir, store=store, brokers=brokers, live_config=base,
                                     force_gate=force_gate, manifest=manifest, risk=risk, account_risk=account_risk,
                                     notifier=notifier, redact=creds.redact, log=log, drift=drift,
                                     watch_dir=watch_dir, reload_file=reload_request_path(db_path))  # fmt: skip
    import pandas as pd

    for s in foreign:
        log(f"[yellow]transfer[/]: the bundle was not trained on {s} (--allow-transfer)")
    if foreign:
        store.append(events=[EventRecord(mode, pd.Timestamp.now(tz="UTC"), "transfer_allowed", {
            "symbols": foreign, "bundle": str(bundle_dir)})])  # fmt: skip
    log(f"serving {label} {base.timeframe} on {mode} on one account{f' at {base_url}' if base_url else ''}; state in "
        f"{db_path}; stop with Ctrl-C (between bars)" + ("; notifications on" if notifier is not None else ""))
    try:
        return portfolio.run(max_steps=max_bars)
    finally:
        if notifier is not None:
            notifier.close()
