"""A BTC-trained bundle evaluated on XRPUSDT (issue 15): the XRP instrument sets the costs, fills land on XRP's
tick with slippage of the model's bps + ATR terms (not tick rounding), and the report says it is a transfer."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agents.bundle import load_bundle
from ats_cli.main import app
from market.bundled import bundled_candles_path
from market.instruments import resolve_spec
from tests.kit.instruments import write_spec_json, xrp_test_spec
from training.evaluate import bundle_span, span_backtests, v1_config_of
from training.v1_eval import load_v1_candles

PERIOD = ("2024-07-01", "2024-09-01")


def test_cli_evaluates_the_btc_bundle_on_xrp_at_xrps_tick(smoke_run, tmp_path):
    spec_path = write_spec_json(tmp_path / "xrp.json", xrp_test_spec())
    out = tmp_path / "xrp"
    data = str(bundled_candles_path("XRPUSDT"))
    r = CliRunner().invoke(app, ["evaluate", "--bundle", str(smoke_run / "bundle"), "--data", data,
                                 "--instrument-spec", str(spec_path), "--period", ":".join(PERIOD), "--out", str(out)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    inst = metrics["instrument"]
    assert (inst["trained_on"], inst["evaluated_on"], inst["transfer"], inst["origin"]) == (
        "BTCUSDT", "XRPUSDT", True, "instrument_spec")
    assert inst["spec"]["tick_size_usdt"] == 0.0001
    assert "trained on BTCUSDT, evaluated on XRPUSDT (transfer)" in (out / "report.html").read_text()
    for name in ("ppo", "v1", "random"):
        m = metrics[name]
        if m["n_trades"] > 0:  # slippage of the same order as fees, not tick rounding (9,835 vs 60 before)
            assert m["slippage_paid"] < 3 * m["fees_paid"], (name, m["slippage_paid"], m["fees_paid"])
    # without --instrument-spec, XRPUSDT's spec comes from the bundled table (never the bundle's BTC spec)
    r = CliRunner().invoke(app, ["evaluate", "--bundle", str(smoke_run / "bundle"), "--data", data,
                                 "--period", ":".join(PERIOD), "--out", str(tmp_path / "table")])
    assert r.exit_code == 0, r.output
    inst = json.loads((tmp_path / "table" / "metrics.json").read_text())["instrument"]
    assert (inst["evaluated_on"], inst["origin"], inst["spec"]["tick_size_usdt"]) == ("XRPUSDT", "bundled_table", 1e-4)
    # a symbol no source knows: the CLI refuses and names it
    doge = tmp_path / "DOGEUSDT-1h.parquet"
    doge.write_bytes(bundled_candles_path("XRPUSDT").read_bytes())
    r = CliRunner().invoke(app, ["evaluate", "--bundle", str(smoke_run / "bundle"), "--data", str(doge),
                                 "--period", ":".join(PERIOD), "--out", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no instrument spec for DOGEUSDT" in r.output and "Traceback" not in r.output


def test_one_xrp_fill_is_the_models_bps_plus_atr_slippage_on_xrps_tick(smoke_run):
    bundle = load_bundle(smoke_run / "bundle")
    candles = load_v1_candles(bundled_candles_path("XRPUSDT"))
    start, end = (pd.Timestamp(p, tz="UTC") for p in PERIOD)
    span = bundle_span(bundle, candles, start, end)
    spec = xrp_test_spec()
    env = bundle.env_config.model_copy(update={"costs": bundle.env_config.costs.with_instrument(spec)})
    res = span_backtests(bundle, span, env, v1_config_of(bundle), strategies=("random",), random_seed=3)["random"]
    assert len(res.trades) > 3
    trade = res.trades[0]
    t_fill = pd.Timestamp(trade.entry_time_ns, tz="UTC")
    row = span.candles.index.get_loc(t_fill)
    ref = float(span.candles["open"].iloc[row])
    atr = float(span.atr[row - 1])  # ATR of the decision bar (the close before the fill)
    c = env.costs
    slip = (c.slippage_bps / 1e4 + c.slippage_atr_coef * atr / ref) * c.cost_multiplier
    raw = ref * (1.0 + trade.side * slip)
    expected = (math.ceil(raw / 1e-4 - 1e-9) if trade.side > 0 else math.floor(raw / 1e-4 + 1e-9)) * 1e-4
    assert trade.entry_price == pytest.approx(expected, abs=1e-12)
    assert abs(trade.entry_price - raw) < 1e-4  # rounded by less than one XRP tick
    assert abs(trade.entry_price - ref) / ref < slip + 1e-4 / ref  # within the bps + ATR terms (+ one tick)
    # with BTC's 0.1 USDT tick the same fill would have been pushed a whole 0.1 USDT (about 20 % of XRP's price)
    assert 0.1 / ref > 100 * slip
    assert resolve_spec("BTCUSDT").spec.tick_size_usdt == 0.1
    assert np.isfinite(res.equity.to_numpy()).all()
