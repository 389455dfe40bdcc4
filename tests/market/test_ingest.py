"""ccxt ingestion against a local Binance USDⓈ-M server: paging, closed candles, resume, faults, store.

The real ccxt ``binanceusdm`` client talks HTTP to :class:`tests.kit.fake_binance.FakeBinance` on
127.0.0.1, which serves rows of the bundled BTCUSDT files. Retry waits go to a recording ``sleep``
(nothing sleeps); the only real wait is the client timeout of the ``delay`` fault (2 x 0.8 s).
"""

from __future__ import annotations

import random
from pathlib import Path

import ccxt
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ats_cli import data_cmd
from market.bundled import bundled_candles_path, bundled_funding_path
from market.candles import load_candles, load_funding
from market.ingest import (
    DownloadConfig,
    IngestError,
    MalformedResponseError,
    RetryConfig,
    download,
    is_retryable,
    make_exchange,
    missing_spans,
    parse_funding_page,
    parse_ohlcv_page,
    retry_wait_s,
    timeframe_ms,
)
from market.store import (
    CANDLE_COLUMNS,
    FUNDING_COLUMNS,
    candles_path,
    funding_path,
    merge_rows,
    read_store_file,
    symbol_file_stem,
    write_store_file,
)
from tests.kit.fake_binance import FUNDING, KLINES, FakeBinance, Fault

SYMBOL = "BTC/USDT:USDT"
N_BARS = 1_000  # fixture bars served; the last one is still open at the server's clock
HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def fixture_data() -> tuple[pd.DataFrame, pd.Series]:
    candles = load_candles(bundled_candles_path()).iloc[:N_BARS]
    funding = load_funding(bundled_funding_path())
    return candles, funding[funding.index <= candles.index[-1]]


def _ms(ts: pd.Timestamp) -> int:
    return int(ts.value // 1_000_000)


@pytest.fixture
def server(fixture_data):
    candles, funding = fixture_data
    now = _ms(candles.index[-1]) + 30 * 60_000  # 30 min into the last bar: it is still open
    with FakeBinance(candles, funding, now_ms=now) as fake:
        yield fake


class Sleeps(list):
    """Records the retry waits instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _cfg(store: Path, url: str, **kw) -> DownloadConfig:
    base = {
        "symbol": SYMBOL, "since": "2020-01-01", "store_dir": str(store), "api_url": url, "rate_limit_ms": 1,
        "page_limit_bars": 200, "funding_page_limit": 40, "timeout_ms": 5_000, "flush_every_pages": 1,
        "retry": RetryConfig(max_attempts=4, backoff_initial_s=1.0, jitter_s=0.5),
    }
    base.update(kw)
    return DownloadConfig(**base)


def _run(store: Path, fake: FakeBinance, sleeps: Sleeps | None = None, **kw):
    return download(
        _cfg(store, fake.url, **kw), clock_ms=lambda: fake.now_ms + 10 * HOUR_MS,
        sleep=sleeps if sleeps is not None else Sleeps(), rng=random.Random(1),
    )


def _files(store: Path) -> tuple[bytes, bytes]:
    return (
        candles_path(store, "binanceusdm", "BTCUSDT", "1h").read_bytes(),
        funding_path(store, "binanceusdm", "BTCUSDT").read_bytes(),
    )


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory, fixture_data) -> Path:
    """A download without faults: the reference every faulted download must equal byte for byte."""
    candles, funding = fixture_data
    store = tmp_path_factory.mktemp("clean")
    with FakeBinance(candles, funding, now_ms=_ms(candles.index[-1]) + 30 * 60_000) as fake:
        _run(store, fake)
    return store


# ---------------------------------------------------------------------------------------------
# a clean download
# ---------------------------------------------------------------------------------------------


def test_clean_download_stores_exactly_the_closed_candles(tmp_path, server, fixture_data):
    candles, funding = fixture_data
    result = _run(tmp_path, server)
    stored = read_store_file(candles_path(tmp_path, "binanceusdm", SYMBOL, "1h"), CANDLE_COLUMNS)
    closed = candles.iloc[:-1]  # the last fixture bar is still open at the server's clock
    assert len(stored) == N_BARS - 1 == result.candles.rows_total == result.candles.rows_added
    np.testing.assert_array_equal(stored.to_numpy(), closed[list(CANDLE_COLUMNS)].to_numpy())
    assert (stored.index == closed.index).all()
    assert result.candles.pages == 5  # 999 bars in pages of 200
    stored_f = read_store_file(funding_path(tmp_path, "binanceusdm", SYMBOL), FUNDING_COLUMNS)
    np.testing.assert_array_equal(stored_f["funding_rate"].to_numpy(), funding.to_numpy())
    assert result.cutoff == pd.Timestamp(server.now_ms, unit="ms", tz="UTC")  # min(clock, server time)
    # the store file is what `load_candles` expects (same schema as the shared data)
    loaded = load_candles(candles_path(tmp_path, "binanceusdm", SYMBOL, "1h"))
    assert len(loaded) == N_BARS - 1
    assert candles_path(tmp_path, "binanceusdm", SYMBOL, "1h").relative_to(tmp_path) == Path(
        "binance_usdm/BTCUSDT-1h.parquet"
    )


def test_until_bounds_the_span_and_requests_use_the_page_limit(tmp_path, server, fixture_data):
    candles, _ = fixture_data
    result = _run(tmp_path, server, until=str(candles.index[450]))
    assert result.candles.rows_total == 450 and result.candles.last == candles.index[449]
    limits = {p["limit"] for path, p in server.requests if path == KLINES}
    assert limits == {"200"}


def test_local_clock_behind_server_bounds_the_cutoff(tmp_path, server, fixture_data):
    candles, _ = fixture_data
    clock = _ms(candles.index[100]) + 1  # bar 100 is open at this local time
    result = download(_cfg(tmp_path, server.url), clock_ms=lambda: clock, sleep=Sleeps())
    assert result.candles.last == candles.index[99] and result.candles.rows_total == 100


def test_still_open_candle_is_dropped_even_if_the_exchange_sends_it(tmp_path, server, clean_store):
    # past_end: the exchange ignores endTime on every page, so the last page carries the open bar
    server.add_fault(KLINES, Fault("past_end"), times=10)
    result = _run(tmp_path, server)
    assert result.candles.open_rows_dropped == 1
    assert _files(tmp_path) == _files(clean_store)


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------


def test_second_run_fetches_nothing_it_has(tmp_path, server):
    _run(tmp_path, server)
    before = _files(tmp_path)
    n_requests = len(server.requests)
    result = _run(tmp_path, server)
    new = server.requests[n_requests:]
    assert [p for p, _ in new if p in (KLINES, FUNDING)] == []  # only load_markets and the clock
    assert result.candles.rows_added == 0 and result.funding.rows_added == 0
    assert _files(tmp_path) == before


def test_resume_fetches_only_the_tail(tmp_path, server, fixture_data):
    candles, _ = fixture_data
    _run(tmp_path, server, until=str(candles.index[600]))
    n_requests = len(server.requests)
    result = _run(tmp_path, server)
    klines = [p for path, p in server.requests[n_requests:] if path == KLINES]
    assert int(klines[0]["startTime"]) == _ms(candles.index[600])  # right after the last stored bar
    assert result.candles.rows_added == N_BARS - 1 - 600


def test_resume_fetches_a_missing_head(tmp_path, server, fixture_data, clean_store):
    candles, _ = fixture_data
    _run(tmp_path, server, since=str(candles.index[300]))
    n_requests = len(server.requests)
    _run(tmp_path, server)
    klines = [p for path, p in server.requests[n_requests:] if path == KLINES]
    assert int(klines[0]["startTime"]) == _ms(candles.index[0])
    assert all(int(p["endTime"]) < _ms(candles.index[300]) for p in klines)  # the head only
    assert _files(tmp_path) == _files(clean_store)


class Killed(Exception):
    """Stands for the process being killed between two pages."""


def test_interrupted_run_leaves_a_readable_store_and_the_rerun_completes_it(tmp_path, server, clean_store):
    pages = []

    def kill_after_two_pages(progress) -> None:
        pages.append(progress)
        if len(pages) == 2:
            raise Killed

    with pytest.raises(Killed):
        download(_cfg(tmp_path, server.url), clock_ms=lambda: server.now_ms, sleep=Sleeps(),
                 on_progress=kill_after_two_pages)
    path = candles_path(tmp_path, "binanceusdm", SYMBOL, "1h")
    partial = read_store_file(path, CANDLE_COLUMNS)  # readable, sorted, unique
    assert len(partial) == 400
    # no temporary file left behind (the instrument spec is written next to the candles first)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, "BTCUSDT.spec.json"])
    _run(tmp_path, server)
    assert _files(tmp_path) == _files(clean_store)


# ---------------------------------------------------------------------------------------------
# network faults: the store ends identical to a clean download
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, fault",
    [
        (KLINES, Fault("status_429", retry_after_s=7)),
        (KLINES, Fault("html_5xx")),
        (KLINES, Fault("json_5xx")),
        (KLINES, Fault("delay", delay_s=2.5)),
        (FUNDING, Fault("status_429", retry_after_s=3)),
        (FUNDING, Fault("html_5xx")),
    ],
    ids=["429", "html-503", "json-500(-1000)", "timeout", "funding-429", "funding-503"],
)
def test_retried_faults_end_identical(tmp_path, server, clean_store, path, fault):
    server.add_fault(path, fault, times=2)
    sleeps = Sleeps()
    timeout_ms = 800 if fault.kind == "delay" else 5_000  # the delayed answer comes after 2.5 s
    result = _run(tmp_path, server, sleeps, timeout_ms=timeout_ms)
    assert result.retries == 2 and len(sleeps) == 2
    if fault.kind == "status_429":
        assert sleeps == [fault.retry_after_s] * 2  # Retry-After honoured, not the backoff
    else:
        assert 1.0 <= sleeps[0] < 1.5 and 2.0 <= sleeps[1] < 2.5  # 1 s, 2 s + jitter in [0, 0.5)
    assert _files(tmp_path) == _files(clean_store)


@pytest.mark.parametrize("kind", ["overlap", "duplicate", "reverse"])
def test_overlapping_duplicate_and_unordered_pages_end_identical(tmp_path, server, clean_store, kind):
    server.add_fault(KLINES, Fault(kind, bars=5), times=3)
    server.add_fault(FUNDING, Fault("duplicate" if kind != "reverse" else "reverse"), times=2)
    result = _run(tmp_path, server)
    if kind == "duplicate":
        assert result.candles.duplicate_rows > 0
    assert _files(tmp_path) == _files(clean_store)


@pytest.mark.parametrize(
    "kind, ccxt_error",
    [("html_5xx", ccxt.ExchangeNotAvailable), ("json_5xx", ccxt.OperationFailed), ("status_429", ccxt.DDoSProtection)],
)
def test_retries_exhausted_stop_with_a_clear_error(tmp_path, server, kind, ccxt_error):
    server.add_fault(KLINES, Fault(kind, retry_after_s=1), times=4)
    with pytest.raises(IngestError, match=r"fetch_ohlcv\(BTC/USDT:USDT, 1h, since=2020-01-01.*after 4 attempts") as info:
        _run(tmp_path, server)
    assert type(info.value.__cause__) is ccxt_error  # how ccxt 4.5 classifies this answer


def test_malformed_page_stops_and_keeps_what_was_stored(tmp_path, server):
    server.add_fault(KLINES, Fault("duplicate"))  # page 1 fine (doubled)
    server.add_fault(KLINES, Fault("duplicate"))
    server.add_fault(KLINES, Fault("null_rows"))  # page 3: rows of null
    with pytest.raises(MalformedResponseError, match=r"fetch_ohlcv.*raw row 0 is invalid"):
        _run(tmp_path, server)
    stored = read_store_file(candles_path(tmp_path, "binanceusdm", SYMBOL, "1h"), CANDLE_COLUMNS)
    assert len(stored) > 0 and stored.index.is_monotonic_increasing


def test_non_retryable_errors_are_not_retried(tmp_path, server):
    sleeps = Sleeps()
    with pytest.raises(IngestError, match="not retried"):
        _run(tmp_path, server, sleeps, timeframe="4h")  # the server answers 400 -1120
    assert sleeps == []
    with pytest.raises(IngestError, match="does not list 'ETH/USDT:USDT'"):
        _run(tmp_path, server, symbol="ETH/USDT:USDT")


# ---------------------------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------------------------


def test_every_url_points_at_the_local_server(tmp_path):
    for testnet in (False, True):
        ex = make_exchange(_cfg(tmp_path, "http://127.0.0.1:9", testnet=testnet))
        for key in ("api", "test", "demo"):
            for url in (ex.urls.get(key) or {}).values():
                assert url.startswith("http://127.0.0.1:9/"), (key, url)
        assert ex.enableRateLimit and ex.options["fetchCurrencies"] is False
        assert bool(ex.isSandboxModeEnabled) is testnet


def test_testnet_download_goes_through_sandbox_urls(tmp_path, server, clean_store):
    _run(tmp_path, server, testnet=True)
    assert _files(tmp_path) == _files(clean_store)


def test_cli_download(tmp_path, server, fixture_data):
    candles, _ = fixture_data
    args = ["download", "--exchange", "binanceusdm", "--symbol", SYMBOL, "--timeframe", "1h",
            "--since", "2020-01-01", "--until", str(candles.index[300]), "--store", str(tmp_path),
            "--api-url", server.url, "--quiet"]
    result = CliRunner().invoke(data_cmd.app, args)
    assert result.exit_code == 0, result.output
    assert len(read_store_file(candles_path(tmp_path, "binanceusdm", SYMBOL, "1h"), CANDLE_COLUMNS)) == 300
    bad = CliRunner().invoke(data_cmd.app, [*args, "--symbol", "NOPE/USDT:USDT"])
    assert bad.exit_code == 1


# ---------------------------------------------------------------------------------------------
# pure parts
# ---------------------------------------------------------------------------------------------


def test_retry_classification():
    assert is_retryable(ccxt.DDoSProtection("429"))
    assert is_retryable(ccxt.RateLimitExceeded("x"))
    assert is_retryable(ccxt.RequestTimeout("x"))
    assert is_retryable(ccxt.ExchangeNotAvailable("503"))
    assert is_retryable(ccxt.OperationFailed("-1000"))
    assert not is_retryable(ccxt.BadResponse("x"))  # an OperationFailed subclass, but a broken answer
    assert not is_retryable(ccxt.BadSymbol("x"))
    assert not is_retryable(ccxt.ExchangeError("x"))


def test_retry_wait():
    cfg = RetryConfig(backoff_initial_s=1.0, backoff_max_s=5.0, jitter_s=0.0, retry_after_max_s=30.0)
    rng = random.Random(0)
    assert [retry_wait_s(ccxt.RequestTimeout(), n, cfg, rng, None) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    assert retry_wait_s(ccxt.DDoSProtection(), 1, cfg, rng, 12.0) == 12.0
    assert retry_wait_s(ccxt.DDoSProtection(), 1, cfg, rng, 99.0) == 30.0  # capped
    assert retry_wait_s(ccxt.RequestTimeout(), 1, cfg, rng, 12.0) == 1.0  # Retry-After only for rate limits


def test_missing_spans():
    idx = pd.DatetimeIndex(pd.to_datetime([10, 20, 30], unit="ms", utc=True))
    assert missing_spans(idx, 0, 100, 10) == [(0, 10), (40, 100)]
    assert missing_spans(idx, 10, 40, 10) == []
    assert missing_spans(idx, 15, 25, 10) == []  # interior holes are the exchange's own gaps
    assert missing_spans(pd.DatetimeIndex([], tz="UTC"), 5, 5, 1) == []


def test_parse_pages_refuse_bad_rows():
    ok = parse_ohlcv_page([[3_600_000, 1, 2, 0.5, 1.5, 10]], request="r", tf_ms=HOUR_MS)
    assert ok.index[0] == pd.Timestamp("1970-01-01 01:00", tz="UTC") and ok["close"].iloc[0] == 1.5
    for rows, what in [
        ([[None] * 6], "candle 0"),
        ([[3_600_000, 1, 2, float("nan"), 1.5, 10]], "not finite"),
        ([[3_600_000, 1, 2, 0.5, 1.5]], "6 values"),
        ([[3_600_001, 1, 2, 0.5, 1.5, 10]], "grid"),
        (None, "expected a list"),
    ]:
        with pytest.raises(MalformedResponseError, match=what):
            parse_ohlcv_page(rows, request="fetch_ohlcv(X)", tf_ms=HOUR_MS)
    f = parse_funding_page([{"timestamp": 28_800_004, "fundingRate": 1e-4}], request="r")
    assert f.index[0] == pd.Timestamp("1970-01-01 08:00", tz="UTC")  # ms jitter rounded away
    with pytest.raises(MalformedResponseError, match="funding row 0"):
        parse_funding_page([{"timestamp": 28_800_000, "fundingRate": None}], request="r")


def test_merge_rows_new_wins_and_counts():
    t = pd.date_range("2021-01-01", periods=4, freq="1h", tz="UTC", name="timestamp").as_unit("ns")
    old = pd.DataFrame({"funding_rate": [1.0, 2.0, 3.0]}, index=t[:3])
    new = pd.DataFrame({"funding_rate": [9.0, 3.0, 4.0, 4.0]}, index=t[[1, 2, 3, 3]])
    merged, added, replaced = merge_rows(old, new)
    assert merged["funding_rate"].tolist() == [1.0, 9.0, 3.0, 4.0]
    assert (added, replaced) == (1, 1)


def test_write_store_file_refuses_bad_frames_and_keeps_the_old_file(tmp_path):
    t = pd.date_range("2021-01-01", periods=2, freq="1h", tz="UTC")
    path = write_store_file(pd.DataFrame({"funding_rate": [1.0, 2.0]}, index=t), tmp_path / "f.parquet")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="strictly increasing"):
        write_store_file(pd.DataFrame({"funding_rate": [1.0, 2.0]}, index=t[::-1]), path)
    with pytest.raises(ValueError, match="float64"):
        write_store_file(pd.DataFrame({"funding_rate": [1, 2]}, index=t), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["f.parquet"]
    raw = pd.read_parquet(path)
    assert list(raw.columns) == ["timestamp", "funding_rate"] and str(raw["timestamp"].dtype) == "datetime64[ns, UTC]"


def test_names_and_timeframes():
    assert symbol_file_stem("BTC/USDT:USDT") == "BTCUSDT" and symbol_file_stem("ETHUSDT") == "ETHUSDT"
    with pytest.raises(ValueError):
        symbol_file_stem("../x")
    assert timeframe_ms("15m") == 900_000 and timeframe_ms("4h") == 4 * HOUR_MS
    with pytest.raises(ValueError):
        timeframe_ms("1M")
