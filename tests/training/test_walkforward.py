"""Walk-forward folds and an end-to-end walk-forward on the bundled data (smoke config, 2 seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from training.walkforward import WalkForwardConfig, fold_windows

REPO = Path(__file__).resolve().parents[2]
H = pd.Timedelta(hours=1)


def _wf(**kw) -> WalkForwardConfig:
    base = dict(base_config="smoke.yaml", data_start="2022-01-01", start="2022-07-01", end="2022-07-11",
                folds=2, train_bars=1000, val_bars=48)
    return WalkForwardConfig(**{**base, **kw})


def test_fold_windows_tile_the_span_and_train_before_validation_before_test():
    ws = fold_windows(_wf(), H)
    # 10 days = 240 bars -> two test windows of 120 bars
    assert [w.test_start for w in ws] == [pd.Timestamp("2022-07-01", tz="UTC"), pd.Timestamp("2022-07-06", tz="UTC")]
    assert ws[-1].test_end == pd.Timestamp("2022-07-11", tz="UTC") and ws[0].test_end == ws[1].test_start
    for w in ws:
        assert w.train_start == pd.Timestamp("2022-01-01", tz="UTC")  # expanding
        assert w.val_start == w.test_start - 48 * H
    rolling = fold_windows(_wf(scheme="rolling"), H)
    assert all(w.val_start - w.train_start == 1000 * H for w in rolling)


def test_embargo_leaves_a_gap_before_each_test_window():
    ws = fold_windows(_wf(embargo_bars=12), H)
    assert all(w.test_start - w.val_start == (48 + 12) * H for w in ws)


def test_too_short_training_window_is_an_error():
    with pytest.raises(ValueError, match="train_bars"):
        fold_windows(_wf(data_start="2022-06-20"), H)


def test_walkforward_smoke_end_to_end(tmp_path):
    from training.walkforward import load_walkforward, run_walkforward

    wf, base = load_walkforward(REPO / "configs" / "walkforward_smoke.yaml", seeds=[0, 1])
    summary = run_walkforward(wf, base, tmp_path / "out", log=lambda s: None)
    folds = json.loads((tmp_path / "out" / "folds.json").read_text())
    assert len(folds) == 4 and {f["seed"] for f in folds} == {0, 1}
    for f in folds:
        assert f["train_start"] < f["val_start"] < f["test_start"] < f["test_end"] and f["data_sha256"]
    assert set(summary["stitched"]) == {"ppo", "v1", "buy_and_hold", "flat", "random"}
    assert summary["stitched"]["flat"]["total_return"] == 0.0
    # the random policy trades, and every strategy is charged under the same cost model
    assert summary["stitched"]["random"]["n_trades"] > 0 and summary["stitched"]["random"]["fees_paid"] > 0
    assert summary["deflated_sharpe"]["n_trials"] == 2
    assert (tmp_path / "out" / "report.html").read_text().count("data:image/png;base64,") >= 1
