"""Run configs parse into frozen objects; unknown keys and inconsistent periods are errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from training.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["demo.yaml", "smoke.yaml"])
def test_shipped_configs_parse(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data.ts("train_start") < cfg.data.ts("val_start") < cfg.data.ts("test_start") < cfg.data.ts("test_end")
    with pytest.raises(Exception):
        cfg.seed = 3  # frozen


def _write(tmp_path, mutate) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    mutate(raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = _write(tmp_path, lambda r: r["env"].update({"fee_bsp": 3}))
    with pytest.raises(ConfigError, match="env.fee_bsp"):
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
