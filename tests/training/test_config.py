"""Run configs parse into frozen objects; unknown keys and inconsistent periods are errors."""

from __future__ import annotations

from pathlib import Path

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
