"""The shared config rules: revalidating updates, UTC times, period boundaries."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest
from pydantic import Field, ValidationError, model_validator

from envs.config import CostConfig
from market.config_base import DATA_END, StrictConfig, UtcTime, check_periods, to_utc
from training.config import load_config
from training.walkforward import WalkForwardConfig

REPO = Path(__file__).resolve().parents[2]


class _Section(StrictConfig):
    n: int = Field(1, ge=1)
    lo: float = 0.0
    hi: float = 1.0

    @model_validator(mode="after")
    def _ordered(self) -> _Section:
        if self.hi <= self.lo:
            raise ValueError("hi must be above lo")
        return self


class _Outer(StrictConfig):
    section: _Section = _Section()
    when: UtcTime = pd.Timestamp("2024-01-01", tz="UTC")


def test_updated_validates_what_model_copy_lets_through():
    s = _Section()
    # pydantic's model_copy(update=...) accepts all three silently; updated() refuses each
    assert s.model_copy(update={"n": 0}).n == 0
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        s.updated(n=0)
    with pytest.raises(ValidationError, match="hi must be above lo"):
        s.updated(lo=2.0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        s.updated(typo=1)
    assert s.updated(n=3, hi=5.0) == _Section(n=3, hi=5.0)
    outer = _Outer()
    assert outer.updated(section=outer.section.updated(n=2)).section.n == 2
    assert outer.updated(section={"n": 4}).section == _Section(n=4)
    assert outer.updated(when="2024-02-01 06:00").when == pd.Timestamp("2024-02-01 06:00", tz="UTC")


def test_updated_on_product_configs():
    costs = CostConfig()
    with pytest.raises(ValidationError):
        costs.updated(cost_multiplier=-1.0)
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    with pytest.raises(ValidationError, match="strictly increasing"):
        cfg.updated(data=cfg.data.updated(val_start=cfg.data.test_end))
    with pytest.raises(ValidationError, match="withheld"):
        cfg.data.updated(test_end="2025-08-01")


def test_utc_time_parses_and_converts():
    assert to_utc("2024-01-01") == pd.Timestamp("2024-01-01", tz="UTC")
    assert to_utc("2024-01-01T02:00:00+02:00") == pd.Timestamp("2024-01-01 00:00", tz="UTC")
    assert to_utc(dt.date(2024, 1, 1)) == pd.Timestamp("2024-01-01", tz="UTC")
    for bad in ("soon", 20240101, None, True, "NaT"):
        with pytest.raises(ValueError, match="date"):
            to_utc(bad)
    with pytest.raises(ValidationError, match="when"):
        _Outer(when="yesterday-ish")
    # written back as ISO 8601 and read again to the same value
    o = _Outer(when="2024-03-04 05:00")
    assert o.model_dump(mode="json")["when"] == "2024-03-04T05:00:00+00:00"
    assert _Outer.model_validate(o.model_dump(mode="json")) == o


def test_check_periods_names_the_boundaries():
    t = pd.Timestamp("2024-01-01", tz="UTC")
    check_periods({"a": t, "b": None, "c": t + pd.Timedelta(hours=1)})
    with pytest.raises(ValueError, match=r"c=.* is not after a="):
        check_periods({"a": t, "b": None, "c": t})
    with pytest.raises(ValueError, match="withheld"):
        check_periods({"end": DATA_END + pd.Timedelta(hours=1)})


def test_walkforward_dates_are_typed_and_checked():
    wf = WalkForwardConfig(base_config="b.yaml", data_start="2022-01-01", start="2024-01-01", end="2025-07-01")
    assert wf.start == pd.Timestamp("2024-01-01", tz="UTC")
    with pytest.raises(ValidationError, match="withheld"):
        wf.updated(end="2025-09-01")
    with pytest.raises(ValidationError, match="not after data_start"):
        wf.updated(start="2021-06-01")
