"""Look-ahead check: every feature and model output must be unchanged when later bars are cut off.

A value at bar t is causal when it can be computed from the candles that closed at or before t
(``DESIGN.md``, "Causality"). The check computes a frame on the full series and on the series
truncated after N random cut rows, and compares every row up to each cut: a column whose value at
some row <= cut differs between the two computations used data after the cut. The pure core is
:func:`truncation_offenders`; :func:`lookahead_check` applies it to the shipped feature set and
to the stacked model outputs of a run config (forward-filtered HMM regime probabilities, the
LightGBM regime-ahead probabilities, the TCN signal probabilities), with models fitted once on the
config's training period by :func:`training.pipeline.fit_stack`.

Tolerances: features, HMM and LightGBM outputs must be identical (``atol = 0``): they are
deterministic forward computations over the same input rows. The TCN probabilities get
:data:`TCN_ATOL` = 1e-6: the TCN evaluates windows in batches of 1,024 aligned on the absolute
window index, so a truncated series only shortens the last batch, but a float32 convolution
(oneDNN on CPU, cuDNN on GPU) may choose a different kernel or accumulation order for another
batch shape; each probability then moves by a few float32 ulps (eps = 1.2e-7) after the softmax.
1e-6 allows about 8 ulps and is four orders of magnitude below any leak worth finding (a model
that sees one future bar moves its probabilities by far more than 1e-4). Measured with
``atol = 0`` on the smoke config (CPU, 2 threads, 40 cuts): no TCN difference at all, so on the
CPU the tolerance is never used; it is there for other batch shapes and GPU kernels (not measured).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

TCN_ATOL = 1e-6
"""Absolute tolerance on the TCN probabilities (float32 batched convolutions; see the module doc)."""


@dataclass(frozen=True)
class Offender:
    """A column whose values at or before a cut changed when the bars after the cut were removed.

    Attributes
    ----------
    column : str
        Column name.
    first_time : pandas.Timestamp
        Earliest row (open time) at which a truncated computation differed from the full one.
    n_cuts : int
        Number of cuts at which the column differed (out of the cuts checked).
    max_abs_diff : float
        Largest absolute difference seen (inf where one side is NaN or missing and the other not).
    """

    column: str
    first_time: pd.Timestamp
    n_cuts: int
    max_abs_diff: float


def random_cuts(n_rows: int, n_cuts: int, rng: np.random.Generator, *, min_row: int = 0) -> list[int]:
    """Distinct random cut rows in ``[min_row, n_rows - 2]`` (the last row would cut nothing), sorted.

    Parameters
    ----------
    n_rows : int
        Rows of the series.
    n_cuts : int
        Number of cuts wanted (>= 1); fewer come back if the range is smaller.
    rng : numpy.random.Generator
        Source of randomness (injected, so a seed reproduces the cuts).
    min_row : int, default 0
        First admissible cut row (e.g. after the warm-up).

    Raises
    ------
    ValueError
        If ``n_cuts < 1`` or the range ``[min_row, n_rows - 2]`` is empty.
    """
    if n_cuts < 1:
        raise ValueError(f"n_cuts must be >= 1, got {n_cuts}")
    hi = n_rows - 2
    if min_row > hi or min_row < 0:
        raise ValueError(f"no admissible cut row: min_row={min_row}, n_rows={n_rows}")
    count = min(n_cuts, hi - min_row + 1)
    return sorted(int(x) for x in rng.choice(np.arange(min_row, hi + 1), size=count, replace=False))


def _tolerances(columns: Sequence[str], atol: float | Mapping[str, float]) -> np.ndarray:
    if isinstance(atol, Mapping):
        unknown = sorted(set(atol) - set(columns))
        if unknown:
            raise ValueError(f"atol names columns that the computation does not produce: {unknown}")
        return np.array([float(atol.get(c, 0.0)) for c in columns])
    return np.full(len(columns), float(atol))


def truncation_offenders(
    compute: Callable[[pd.DataFrame], pd.DataFrame],
    data: pd.DataFrame,
    cuts: Sequence[int],
    atol: float | Mapping[str, float] = 0.0,
) -> list[Offender]:
    """Columns of ``compute`` whose rows up to a cut change when ``data`` is truncated at the cut.

    For each cut row c, ``compute(data.iloc[:c + 1])`` is compared with ``compute(data)`` on every
    output row whose time is <= ``data.index[c]`` (rows present on one side only count as a
    difference). Values are equal when both are NaN or ``|a - b| <= atol`` for their column.

    Parameters
    ----------
    compute : callable
        ``DataFrame -> DataFrame``: the computation to check (features, model outputs). Its output
        is indexed by times comparable with ``data.index`` (it may drop leading rows) and must
        have the same columns whatever the length of its input.
    data : pandas.DataFrame
        The full input series (e.g. candles), indexed by time, oldest first.
    cuts : sequence of int
        Row positions of ``data`` after which it is cut (``0 <= c < len(data)``).
    atol : float or mapping of column -> float, default 0.0
        Absolute tolerance; a mapping gives per-column tolerances (0.0 for the others).

    Returns
    -------
    list of Offender
        One per offending column, ordered by first offending time, then column; empty when the
        computation is causal at these cuts.

    Raises
    ------
    ValueError
        If a cut is out of range, if the columns of a truncated computation differ from the
        full one's, or if ``atol`` names an unknown column.
    """
    full = compute(data)
    columns = list(full.columns)
    tol = _tolerances(columns, atol)
    first: dict[str, pd.Timestamp] = {}
    count: dict[str, int] = {}
    worst: dict[str, float] = {}
    for c in sorted({int(c) for c in cuts}):
        if not 0 <= c < len(data):
            raise ValueError(f"cut row {c} outside [0, {len(data)})")
        part = compute(data.iloc[: c + 1])
        if list(part.columns) != columns:
            raise ValueError(
                f"columns changed when cutting after row {c} ({data.index[c]}): "
                f"{sorted(set(part.columns) ^ set(columns))}"
            )
        cut_time = data.index[c]
        rows = full.index[full.index <= cut_time].union(part.index[part.index <= cut_time])
        if len(rows) == 0:
            continue
        a = full.reindex(rows).to_numpy(np.float64)
        b = part.reindex(rows).to_numpy(np.float64)
        both_nan = np.isnan(a) & np.isnan(b)
        with np.errstate(invalid="ignore"):
            diff = np.where(both_nan, 0.0, np.abs(a - b))
        diff[np.isnan(diff)] = np.inf  # NaN on one side only
        bad = diff > tol
        for j in np.flatnonzero(bad.any(axis=0)):
            col = columns[j]
            t_first = rows[int(np.argmax(bad[:, j]))]
            first[col] = min(first.get(col, t_first), t_first)
            count[col] = count.get(col, 0) + 1
            worst[col] = max(worst.get(col, 0.0), float(diff[:, j].max()))
    out = [Offender(col, first[col], count[col], worst[col]) for col in first]
    return sorted(out, key=lambda o: (o.first_time, o.column))


@dataclass(frozen=True)
class LookaheadReport:
    """Result of :func:`lookahead_check`: the offenders and what was checked."""

    offenders: list[Offender]
    columns: list[str]
    cuts: list[pd.Timestamp]
    n_rows: int
    span: tuple[pd.Timestamp, pd.Timestamp]
    atol: dict[str, float]


def lookahead_check(cfg, n_cuts: int, rng: np.random.Generator, *, device: str = "cpu",
                    log: Callable[[str], None] = lambda s: None) -> LookaheadReport:
    """Check every feature and model output of a run config for look-ahead at random cuts.

    Loads and prepares the config's data (:func:`training.pipeline.prepare_data`), fits the
    regime and signal models once on the training period (:func:`training.pipeline.fit_stack`),
    then runs :func:`truncation_offenders` on the candles from ``train_start`` to ``test_end``
    with a computation that recomputes the features (warm-up dropped) and
    :func:`agents.observation.model_outputs` from scratch on whatever candles it is given.

    Parameters
    ----------
    cfg : training.config.RunConfig
        The run config (data span, feature config, model configs).
    n_cuts : int
        Number of random cut rows (>= 1), drawn after the feature warm-up and the TCN window.
    rng : numpy.random.Generator
        Draws the cuts.
    device : str, default "cpu"
        Torch device of the TCN.
    log : callable
        Progress messages.

    Returns
    -------
    LookaheadReport

    Raises
    ------
    market.errors.DataValidationError
        If the config's data is bad (as ``prepare_data``).
    ValueError
        If the span is too short for the warm-up, the TCN window and one cut.
    """
    from agents.observation import SIGNAL_COLUMNS, model_outputs
    from market.features import compute_features, drop_warmup, warmup_bars
    from training.pipeline import fit_stack, prepare_data

    prep = prepare_data(cfg, log)
    models = fit_stack(prep, prep.val_row, cfg, device=device, seed=cfg.seed)
    log(f"models fitted on {prep.val_row} training bars")
    window = models.tcn.window_bars
    feature_cfg = cfg.features

    def compute(candles: pd.DataFrame) -> pd.DataFrame:
        feats, _ = drop_warmup(compute_features(candles, feature_cfg))
        outputs = model_outputs(feats, models, start=window - 1, end=len(feats))
        return pd.concat([feats.iloc[window - 1 :], outputs], axis=1)

    candles = prep.candles
    interval = candles.index[1] - candles.index[0]
    min_row = warmup_bars(feature_cfg, interval) + window + 1
    cuts = random_cuts(len(candles), n_cuts, rng, min_row=min_row)
    atol = {c: TCN_ATOL for c in SIGNAL_COLUMNS}
    log(f"checking {len(cuts)} cuts on {len(candles)} bars ({candles.index[0]} .. {candles.index[-1]})")
    offenders = truncation_offenders(compute, candles, cuts, atol)
    columns = list(compute(candles.iloc[: min_row + 1]).columns)
    return LookaheadReport(
        offenders=offenders,
        columns=columns,
        cuts=[candles.index[c] for c in cuts],
        n_rows=len(candles),
        span=(candles.index[0], candles.index[-1]),
        atol=atol,
    )
