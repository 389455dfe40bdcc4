"""Run configs parse into frozen objects; unknown keys and inconsistent periods are errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pydantic
import pytest
import yaml

from market.instruments import BUNDLED_SPECS
from tests.kit.instruments import write_spec_json, xrp_test_spec
from training.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["demo.yaml", "smoke.yaml", "smoke_multi.yaml"])
def test_shipped_configs_parse(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data.ts("train_start") < cfg.data.ts("val_start") < cfg.data.ts("test_start") < cfg.data.ts("test_end")
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.seed = 3  # frozen


def _write(tmp_path, mutate) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    mutate(raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = _write(tmp_path, lambda r: r["env"].update({"fee_bsp": 3}))
    with pytest.raises(ConfigError, match=r"env\.fee_bsp"):
        load_config(path)


def test_unordered_periods_are_an_error(tmp_path):
    path = _write(tmp_path, lambda r: r["data"].update({"test_start": "2022-01-01"}))
    with pytest.raises(ConfigError, match="strictly increasing"):
        load_config(path)


def test_periods_after_withheld_date_are_refused(tmp_path):
    path = _write(tmp_path, lambda r: r["data"].update({"test_end": "2025-08-01"}))
    with pytest.raises(ConfigError, match="withheld"):
        load_config(path)


def test_override_device(tmp_path):
    assert load_config(REPO / "configs" / "smoke.yaml", device="cuda").device == "cuda"


def test_val_end_must_fall_between_val_start_and_test_start(tmp_path):
    ok = load_config(_write(tmp_path, lambda r: r["data"].update({"val_end": "2022-07-10"})))
    assert ok.data.ts("val_start") < ok.data.ts("val_end") < ok.data.ts("test_start")
    default = load_config(REPO / "configs" / "smoke.yaml")
    assert default.data.val_end is None and default.data.ts("val_end") == default.data.ts("test_start")
    with pytest.raises(ConfigError, match="strictly increasing"):
        load_config(_write(tmp_path, lambda r: r["data"].update({"val_end": "2022-07-20"})))


def test_val_end_leaves_an_embargo_gap_outside_validation_and_test(tmp_path):
    from training.pipeline import prepare_data

    cfg = load_config(_write(tmp_path, lambda r: r["data"].update({"val_end": "2022-07-14"})))
    prep = prepare_data(cfg)
    idx = prep.features.index
    assert idx[prep.val_stop - 1] == pd.Timestamp("2022-07-13 23:00", tz="UTC")
    assert idx[prep.test_row] == pd.Timestamp("2022-07-15", tz="UTC")
    assert prep.test_row - prep.val_stop == 24 == prep.info["embargo_bars"]
    assert prep.info["validation"][2] == prep.val_stop - prep.val_row


def test_symbols_list_resolves_each_symbols_spec_relative_to_the_config(tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "smoke_multi.yaml").read_text())
    assert raw["data"]["symbols"] == ["BTCUSDT", "ETHUSDT", "XRPUSDT"]
    raw["data"]["symbols"][2] = {"symbol": "XRPUSDT", "instrument_spec": "specs/XRPUSDT.spec.json"}
    (tmp_path / "cfg" / "specs").mkdir(parents=True)
    write_spec_json(tmp_path / "cfg" / "specs" / "XRPUSDT.spec.json", xrp_test_spec())
    (tmp_path / "cfg" / "multi.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "cfg" / "multi.yaml")
    assert cfg.data.symbol_names == ("BTCUSDT", "ETHUSDT", "XRPUSDT") and cfg.data.symbol == "BTCUSDT"
    assert cfg.env.costs.instrument.symbol == "BTCUSDT"  # the primary symbol's spec
    xrp = cfg.data.sources()[2]
    assert Path(xrp.instrument_spec).is_absolute() and Path(xrp.instrument_spec).is_file()
    from training.config import run_instruments

    specs = run_instruments(cfg)
    assert list(specs) == ["BTCUSDT", "ETHUSDT", "XRPUSDT"]
    assert specs["BTCUSDT"].origin == specs["ETHUSDT"].origin == "bundled_table"
    assert specs["XRPUSDT"].origin == "instrument_spec" and specs["XRPUSDT"].spec == xrp_test_spec()
    # a saved run config (absolute paths) loads from anywhere to the same specs
    saved = tmp_path / "run" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(saved) == cfg


def test_one_symbol_list_is_the_single_symbol_config(tmp_path):
    path = _write(tmp_path, lambda r: (r["data"].pop("symbol"), r["data"].update({"symbols": ["BTCUSDT"]})))
    listed, single = load_config(path), load_config(REPO / "configs" / "smoke.yaml")
    assert listed.data.sources() == single.data.sources() and listed.env == single.env


def test_symbols_list_refuses_top_level_single_symbol_keys_and_duplicates(tmp_path):
    path = _write(tmp_path, lambda r: r["data"].update({"symbols": ["BTCUSDT", "ETHUSDT"], "candles_path": "x.parquet"}))
    with pytest.raises(ConfigError, match="per symbol"):
        load_config(path)
    path = _write(tmp_path, lambda r: r["data"].update({"symbols": ["BTCUSDT", "BTCUSDT"]}))
    with pytest.raises(ConfigError, match="twice"):
        load_config(path)
    with pytest.raises(ConfigError, match="instrument-spec"):
        load_config(REPO / "configs" / "smoke_multi.yaml",
                    instrument_spec=write_spec_json(tmp_path / "ETHUSDT.spec.json", BUNDLED_SPECS["ETHUSDT"]))


def test_symbols_without_a_spec_or_below_the_leverage_are_errors(tmp_path):
    from market.instruments import InstrumentSpecError

    # DOGEUSDT: not in the bundled table, no spec file, no downloaded spec
    path = _write(tmp_path, lambda r: (r["data"].pop("symbol"), r["data"].update({"symbols": ["BTCUSDT", "DOGEUSDT"]})))
    with pytest.raises(InstrumentSpecError, match="DOGEUSDT"):
        load_config(path)

    def lev(r):
        r["data"].pop("symbol")
        r["data"]["symbols"] = ["BTCUSDT", "XRPUSDT"]
        r["env"]["actions"] = {"max_leverage": 100.0}

    with pytest.raises(InstrumentSpecError, match="XRPUSDT's maximum leverage 75x"):
        load_config(_write(tmp_path, lev))


def test_pooled_runs_refuse_the_rllib_backend():
    with pytest.raises(ConfigError, match="sb3 backend only"):
        load_config(REPO / "configs" / "smoke_multi.yaml", backend="rllib")
