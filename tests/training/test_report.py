"""The HTML report: self-contained, escaped, every strategy and metric shown, non-finite values as text."""

from __future__ import annotations

import base64
import html
import math
import re

import numpy as np
import pandas as pd
import pytest

from tests.kit.candles import make_candles
from training.metrics import summarize, to_jsonable
from training.report import ReportInputError, format_metric, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _inputs():
    candles = make_candles(300, seed=1)
    buy_hold = 1000.0 * candles["close"] / candles["close"].iloc[0]
    flat = pd.Series(1000.0, index=candles.index)
    curves = {"ppo <v2>": buy_hold * 1.01, "buy & hold": buy_hold, "flat": flat}
    common = {
        "bar_interval_s": 3600.0,
        "fees_paid_usdt": 1.5,
        "funding_paid_usdt": 0.2,
        "slippage_paid_usdt": 0.7,
    }
    metrics = {
        "ppo <v2>": summarize(curves["ppo <v2>"].to_numpy(), trades=[], turnover_usdt=5000.0, **common),
        "buy & hold": summarize(buy_hold.to_numpy(), trades=[], turnover_usdt=1000.0, **common),
        # JSON form: "inf" strings and None must render as text too
        "flat": to_jsonable(summarize(flat.to_numpy(), trades=[], turnover_usdt=0.0, **common)),
    }
    metrics["ppo <v2>"]["sortino"] = math.inf
    return curves, metrics


def test_report_contains_strategies_metrics_and_embedded_png(tmp_path):
    curves, metrics = _inputs()
    notes = ["data: BTCUSDT 1h <synthetic>", "test period never used for fitting or selection"]
    extra = {"per fold": pd.DataFrame({"fold": [1, 2], "sortino": [1.2, math.nan]})}
    path = write_report(
        tmp_path / "out",
        title="Walk-forward <test>",
        equity_curves=curves,
        metrics=metrics,
        notes=notes,
        extra_tables=extra,
    )
    assert path == tmp_path / "out" / "report.html"
    text = path.read_text(encoding="utf-8")
    for name in curves:
        assert html.escape(name) in text
    assert "<v2>" not in text and "<test>" not in text and "<synthetic>" not in text  # escaped
    for key in metrics["buy & hold"]:
        assert f">{key}<" in text
    for note in notes:
        assert html.escape(note) in text
    assert "per fold" in text and "n/a" in text
    assert '<img src="data:image/png;base64,' in text
    encoded = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text).group(1)
    png = base64.b64decode(encoded, validate=True)
    assert png.startswith(PNG_SIGNATURE)
    assert (tmp_path / "out" / "equity.png").read_bytes() == png


def test_non_finite_metrics_render_as_text(tmp_path):
    curves = {"a": pd.Series([100.0, 101.0, 99.0])}  # integer index: x-axis in bars
    metrics = {
        "a": {
            "sortino": math.inf,
            "calmar": -math.inf,
            "profit_factor": math.nan,
            "win_rate": None,
            "sharpe": "inf",
        }
    }
    text = write_report(tmp_path, title="t", equity_curves=curves, metrics=metrics).read_text()
    cells = re.findall(r'<td class="num">([^<]*)</td>', text)
    assert cells == ["inf", "-inf", "n/a", "n/a", "inf"]


def test_format_metric():
    assert format_metric("total_return", 0.1234) == "12.34%"
    assert format_metric("max_drawdown", 0.25) == "25.00%"
    assert format_metric("n_trades", 12.0) == "12"
    assert format_metric("fees_paid", 1234.5) == "1,234.50"
    assert format_metric("sortino", 1.23456) == "1.235"
    assert format_metric("sortino", 1e-5) == "1.000e-05"
    assert format_metric("sortino", math.nan) == "n/a"


def test_report_is_deterministic(tmp_path):
    curves, metrics = _inputs()
    a = write_report(tmp_path / "a", title="x", equity_curves=curves, metrics=metrics).read_bytes()
    b = write_report(tmp_path / "b", title="x", equity_curves=curves, metrics=metrics).read_bytes()
    assert a == b


def test_report_rejects_bad_curves(tmp_path):
    with pytest.raises(ReportInputError, match="empty"):
        write_report(tmp_path, title="t", equity_curves={}, metrics={})
    bad = pd.Series([100.0, np.nan, 90.0])
    with pytest.raises(ReportInputError, match="'ppo'"):
        write_report(tmp_path, title="t", equity_curves={"ppo": bad}, metrics={})
    assert not (tmp_path / "report.html").exists()


def test_monthly_returns_by_hand():
    from training.report import monthly_returns

    idx = pd.to_datetime(["2024-01-01", "2024-01-31", "2024-02-15", "2024-02-29", "2024-03-10"], utc=True)
    eq = pd.Series([100.0, 110.0, 99.0, 121.0, 108.9], index=idx)
    m = monthly_returns({"s": eq})["s"]
    # Jan: 110/100 - 1; Feb: 121/110 - 1; Mar: 108.9/121 - 1
    np.testing.assert_allclose(m.to_numpy(), [0.10, 0.10, -0.10])


def test_positions_panel_and_monthly_table_are_rendered(tmp_path):
    idx = pd.date_range("2024-01-01", periods=24 * 70, freq="h", tz="UTC")
    eq = pd.Series(np.linspace(100, 120, len(idx)), index=idx)
    pos = pd.Series(np.sign(np.sin(np.arange(len(idx)) / 50.0)), index=idx)
    regimes = pd.Series(np.arange(len(idx)) // 500 % 3, index=idx)
    html_text = write_report(tmp_path, title="t", equity_curves={"ppo": eq}, metrics={"ppo": {"total_return": 0.2}},
                             positions={"ppo": pos}, regimes=regimes).read_text()
    assert html_text.count('<img src="data:image/png;base64,') == 2
    assert "Monthly returns" in html_text and "2024-03" in html_text
