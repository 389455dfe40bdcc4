"""Instrument specs for tests of symbols the bundled table does not hold (values of the fake exchange).

:func:`xrp_test_spec` has the scale of Binance's XRPUSDT perpetual (tick 0.0001 USDT, step 0.1 XRP, min notional
5 USDT) with the fake exchange's brackets (:data:`tests.kit.fake_binance.DEFAULT_MARKETS`). It is a test fixture,
not a statement about Binance: its ``source`` says so, and the bundled table never uses it.
"""

from __future__ import annotations

import json
from pathlib import Path

from market.instruments import InstrumentSpec

XRP_TEST_SOURCE = "test fixture (tests/kit/instruments.py; the fake exchange's XRPUSDT values, not read from Binance)"


def xrp_test_spec(**update: object) -> InstrumentSpec:
    """A validated XRPUSDT spec for tests; ``update`` replaces fields (validated again)."""
    raw = {
        "symbol": "XRPUSDT",
        "tick_size_usdt": 0.0001,
        "lot_step_base": 0.1,
        "min_qty_base": 0.1,
        "max_market_qty_base": 2_000_000.0,
        "min_notional_usdt": 5.0,
        "max_leverage": 75,
        "maintenance_brackets": [
            {"notional_cap_usdt": c, "maint_margin_rate": r, "maint_amount_usdt": a}
            for c, r, a in ((5_000.0, 0.005, 0.0), (50_000.0, 0.01, 25.0), (1_000_000.0, 0.025, 775.0))
        ],
        "funding_interval_hours": 8,
        "source": XRP_TEST_SOURCE,
        "read_on": "2025-06-30",
    }
    raw.update(update)
    return InstrumentSpec.model_validate(raw)


def write_spec_json(path: Path, spec: InstrumentSpec | dict) -> Path:
    """Write ``spec`` (a spec or a raw mapping) as a JSON spec file; returns ``path``."""
    raw = spec.model_dump(mode="json") if isinstance(spec, InstrumentSpec) else spec
    path.write_text(json.dumps(raw, indent=1))
    return path


__all__ = ["XRP_TEST_SOURCE", "write_spec_json", "xrp_test_spec"]
