"""Action decoding: worked example, dead zone, clipping, non-finite input, inverse."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.actions import ActionConfig, decode_action, encode_decision
from market.decision import Decision, NonFiniteDecisionError

CFG = ActionConfig()


def test_worked_example_from_docstring() -> None:
    d = decode_action(np.array([0.5, 0.0, 1.0, -1.0, 2.0]), CFG)
    # direction: 0.5 > 0.3 -> long; leverage 1 + 0.5 * 4 = 3; size 1 * 0.5; stop 0.5; TP 8 (a4 clipped)
    assert d == Decision(direction=1, leverage=3.0, size_frac=0.5, stop_atr=0.5, take_profit_atr=8.0)


@pytest.mark.parametrize(
    ("a0", "direction"), [(0.3, 0), (-0.3, 0), (0.0, 0), (0.31, 1), (-0.31, -1), (5.0, 1)]
)
def test_direction_dead_zone(a0: float, direction: int) -> None:
    assert decode_action(np.array([a0, 0, 0, 0, 0], dtype=np.float64), CFG).direction == direction


def test_linear_maps_at_the_bounds_and_middle() -> None:
    lo = decode_action(-np.ones(5), CFG)
    assert (lo.leverage, lo.size_frac, lo.stop_atr, lo.take_profit_atr) == (1.0, 0.0, 0.5, 0.5)
    mid = decode_action(np.zeros(5), CFG)
    # middles: 1 + 4 / 2 = 3, 0.25, (0.5 + 4) / 2 = 2.25, (0.5 + 8) / 2 = 4.25
    assert (mid.leverage, mid.size_frac, mid.stop_atr, mid.take_profit_atr) == (3.0, 0.25, 2.25, 4.25)


@pytest.mark.parametrize(("index", "name"), [(0, "direction"), (2, "size"), (4, "take_profit_atr")])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_component_raises_naming_it(index: int, name: str, bad: float) -> None:
    a = np.zeros(5)
    a[index] = bad
    with pytest.raises(NonFiniteDecisionError, match=name):
        decode_action(a, CFG)


def test_wrong_shape_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        decode_action(np.zeros(4), CFG)


def test_config_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError):
        ActionConfig(stop_atr_range=(0.0, 1.0))
    with pytest.raises(ValueError):
        ActionConfig(take_profit_atr_range=(3.0, 1.0))
    with pytest.raises(ValueError):
        ActionConfig(unknown_key=1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=5, max_size=5))
def test_encode_inverts_decode(a: list[float]) -> None:
    d = decode_action(np.asarray(a), CFG)
    d2 = decode_action(encode_decision(d, CFG), CFG)
    assert d2.direction == d.direction
    for name in ("leverage", "size_frac", "stop_atr", "take_profit_atr"):
        assert getattr(d2, name) == pytest.approx(getattr(d, name), rel=1e-6, abs=1e-6)


def test_encode_out_of_range_raises_unless_clip() -> None:
    d = Decision(1, leverage=10.0, size_frac=0.5)
    with pytest.raises(ValueError, match="leverage"):
        encode_decision(d, CFG)
    a = encode_decision(d, CFG, clip=True)
    assert a.dtype == np.float32 and a[1] == 1.0
    assert decode_action(a, CFG).leverage == 5.0
