"""Self-contained HTML evaluation report: notes, metrics table, equity and drawdown plot, extra tables.

The report is one file (``report.html``) with the figure embedded as a base64 PNG, so it can be mailed
or archived without its folder; the same PNG is also written as ``equity.png``. Rendering uses
matplotlib's Agg canvas through :class:`matplotlib.figure.Figure` (no pyplot, no global backend state,
no display needed). All text from the caller is HTML-escaped. The output is deterministic: the same
inputs give the same bytes (no timestamps).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from market import json_codec
from training.metrics import METRIC_DESCRIPTIONS

__all__ = ["ReportInputError", "format_metric", "write_report"]

REPORT_FILENAME = "report.html"
"""Name of the HTML file written into ``out_dir``."""

FIGURE_FILENAME = "equity.png"
"""Name of the equity/drawdown PNG written next to the HTML file."""

PERCENT_METRICS: frozenset[str] = frozenset(
    {"total_return", "annualized_return", "max_drawdown", "win_rate", "exposure"}
)
"""Metrics stored as fractions and shown as percentages."""

COUNT_METRICS: frozenset[str] = frozenset({"n_trades", "n_bars", "max_drawdown_duration_bars"})
"""Metrics shown as whole numbers."""

USDT_METRICS: frozenset[str] = frozenset({"fees_paid", "funding_paid", "slippage_paid"})
"""Metrics in USDT, shown with two decimals and thousands separators."""

LOG_SCALE_MIN_RANGE: float = 4.0
"""Use a log y-axis for normalised equity when max / min over all curves exceeds this ratio."""

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th.metric { text-align: left; font-weight: normal; }
img { max-width: 100%; }
dl.defs dt { font-family: monospace; } dl.defs dd { margin: 0 0 0.4em 1.5em; color: #555; }
"""


class ReportInputError(ValueError):
    """Input to the report is malformed (empty, non-finite or non-positive equity, ...)."""


def format_metric(name: str, value: Any) -> str:
    """Return the display text of one metric value (plain text, not yet HTML-escaped).

    Parameters
    ----------
    name : str
        Metric name; selects the format: percentages for :data:`PERCENT_METRICS`, whole numbers for
        :data:`COUNT_METRICS`, two decimals for :data:`USDT_METRICS`, three significant decimals for
        ratios.
    value : Any
        Float, int, ``None`` or a string (e.g. ``"Infinity"`` from :func:`training.metrics.to_jsonable`;
        the reserved strings of :mod:`market.json_codec` and the legacy ``"inf"``/``"-inf"`` are numbers).

    Returns
    -------
    str
        ``"n/a"`` for ``None``/``nan``, ``"inf"``/``"-inf"`` for infinities, other strings unchanged.
    """
    if value is None:
        return "n/a"
    if isinstance(value, str):
        try:
            value = json_codec.to_float(value)  # "NaN"/"Infinity"/"-Infinity" (and legacy "inf"/"-inf")
        except ValueError:
            return value
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if name in PERCENT_METRICS:
        return f"{v * 100:.2f}%"
    if name in COUNT_METRICS:
        return f"{v:,.0f}"
    if name in USDT_METRICS:
        return f"{v:,.2f}"
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:,.3f}"


def _validate_curve(name: str, curve: pd.Series) -> np.ndarray:
    if not isinstance(curve, pd.Series):
        raise ReportInputError(f"equity_curves[{name!r}] must be a pandas Series, got {type(curve).__name__}")
    if curve.empty:
        raise ReportInputError(f"equity_curves[{name!r}] is empty")
    values = curve.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ReportInputError(
            f"equity_curves[{name!r}] has {int(bad.sum())} non-finite or negative value(s); "
            f"first at {curve.index[i]!r}: {values[i]!r}"
        )
    if values[0] <= 0:
        raise ReportInputError(f"equity_curves[{name!r}] must start positive, got {values[0]!r}")
    return values


def _x_values(index: pd.Index) -> tuple[Any, str]:
    if isinstance(index, pd.DatetimeIndex):
        if index.tz is not None:
            return index.tz_convert("UTC").tz_localize(None).to_numpy(), "time (UTC)"
        return index.to_numpy(), "time"
    return np.asarray(index), str(index.name) if index.name is not None else "bar"


def _render_figure(curves: Mapping[str, pd.Series], values: Mapping[str, np.ndarray]) -> bytes:
    normalised = {name: v / v[0] for name, v in values.items()}
    lowest = min(float(v.min()) for v in normalised.values())
    highest = max(float(v.max()) for v in normalised.values())
    use_log = lowest > 0 and highest / lowest > LOG_SCALE_MIN_RANGE

    fig = Figure(figsize=(11, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_eq, ax_dd = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    x_label = "bar"
    for name, norm in normalised.items():
        x, x_label = _x_values(curves[name].index)
        ax_eq.plot(x, norm, linewidth=1.0, label=name)
        peak = np.maximum.accumulate(norm)
        drawdown_pct = (norm / peak - 1.0) * 100.0
        ax_dd.plot(x, drawdown_pct, linewidth=0.8, label=name)
    if use_log:
        ax_eq.set_yscale("log")
    ax_eq.axhline(1.0, color="grey", linewidth=0.6, linestyle="--")
    ax_eq.set_ylabel("equity (start = 1" + (", log scale)" if use_log else ")"))
    ax_eq.set_title("Equity, normalised to 1 at the start")
    ax_eq.grid(True, alpha=0.3)
    ax_eq.legend(loc="best", fontsize="small")
    ax_dd.set_ylabel("drawdown (%)")
    ax_dd.set_xlabel(x_label)
    ax_dd.grid(True, alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def monthly_returns(equity_curves: Mapping[str, pd.Series]) -> pd.DataFrame:
    """Calendar-month returns (fractions) of each curve with a DatetimeIndex: rows = months, columns = strategies.

    A month's return is its last equity over the previous month's last equity (the first month uses
    the curve's first value), minus 1.
    """
    cols = {}
    for name, curve in equity_curves.items():
        if not isinstance(curve.index, pd.DatetimeIndex) or curve.empty:
            continue
        utc = curve.index.tz_convert("UTC").tz_localize(None) if curve.index.tz is not None else curve.index
        month_end = curve.groupby(utc.to_period("M")).last()
        prev = month_end.shift(1)
        prev.iloc[0] = curve.iloc[0]
        cols[name] = month_end / prev - 1.0
    return pd.DataFrame(cols)


def _render_positions(positions: Mapping[str, pd.Series], regimes: pd.Series | None) -> bytes:
    """One panel per strategy: the signed effective leverage (notional / equity, short < 0; a side series
    -1/0/+1 plots as leverage 1) per bar, with the regime shaded behind it."""
    fig = Figure(figsize=(11, 1.2 + 1.3 * len(positions)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(len(positions), 1, sharex=True))
    colours = ("#4c9a2a", "#e0a800", "#c0392b", "#6c3483", "#2e86c1")
    for ax, (name, pos) in zip(axes, positions.items(), strict=True):
        x, x_label = _x_values(pos.index)
        if regimes is not None:
            reg = regimes.reindex(pos.index).to_numpy()
            for k in np.unique(reg[np.isfinite(reg)]).astype(int):
                ax.fill_between(x, 0, 1, where=reg == k, step="post", transform=ax.get_xaxis_transform(),
                                color=colours[k % len(colours)], alpha=0.15, linewidth=0,
                                label=f"regime {k}" if ax is axes[0] else None)
        values = pos.to_numpy(dtype=float)
        ax.step(x, values, where="post", linewidth=0.8, color="black")
        top = max(1.0, float(np.nanmax(np.abs(values), initial=0.0))) * 1.2
        ax.set_ylim(-top, top)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_ylabel(f"{name}\nshort < 0 < long", rotation=0, ha="right", va="center")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel(x_label)
    if regimes is not None:
        axes[0].legend(loc="upper left", fontsize="x-small", ncol=5)
    axes[0].set_title("Position and effective leverage over time (|notional| / equity, signed by side)" + (" (background: HMM regime at the bar, 0 = calmest)" if regimes is not None else ""))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    strategies = list(metrics)
    names: list[str] = []
    for per_strategy in metrics.values():
        for key in per_strategy:
            if key not in names:
                names.append(key)
    head = "".join(f"<th>{html.escape(str(s))}</th>" for s in strategies)
    rows = []
    for key in names:
        cells = []
        for strategy in strategies:
            per_strategy = metrics[strategy]
            text = format_metric(key, per_strategy[key]) if key in per_strategy else "—"
            cells.append(f'<td class="num">{html.escape(text)}</td>')
        tip = html.escape(METRIC_DESCRIPTIONS.get(key, ""), quote=True)
        rows.append(f'<tr><th class="metric" title="{tip}">{html.escape(str(key))}</th>{"".join(cells)}</tr>')
    return f'<table class="metrics"><thead><tr><th>metric</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _definitions(names: Sequence[str]) -> str:
    items = [
        f"<dt>{html.escape(n)}</dt><dd>{html.escape(METRIC_DESCRIPTIONS[n])}</dd>"
        for n in names
        if n in METRIC_DESCRIPTIONS
    ]
    return f'<dl class="defs">{"".join(items)}</dl>' if items else ""


def write_report(
    out_dir: Path,
    *,
    title: str,
    equity_curves: dict[str, pd.Series],
    metrics: dict[str, dict[str, float]],
    notes: list[str] | None = None,
    extra_tables: dict[str, pd.DataFrame] | None = None,
    positions: dict[str, pd.Series] | None = None,
    regimes: pd.Series | None = None,
) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/equity.png``; return the HTML path.

    The report holds, in order: the title; the notes as a list (data span, cost model, "test period
    never used for fitting or selection", ...); the metrics table (rows = metrics in first-seen order,
    columns = strategies, formatted by :func:`format_metric`; a metric a strategy lacks shows "—",
    non-finite values show as text); the figure (equity of every strategy normalised to 1 at its
    first value, log y-axis when max/min exceeds :data:`LOG_SCALE_MIN_RANGE`, dates in UTC on the
    x-axis for a DatetimeIndex; drawdown in % underneath); the extra tables; metric definitions.

    Parameters
    ----------
    out_dir : pathlib.Path
        Output folder; created if missing. Existing ``report.html``/``equity.png`` are overwritten.
    title : str
        Report title (escaped).
    equity_curves : dict[str, pandas.Series]
        Strategy name -> equity in USDT indexed by bar close time (or bar number); non-empty, finite,
        >= 0, first value > 0.
    metrics : dict[str, dict[str, float]]
        Strategy name -> metrics (e.g. :func:`training.metrics.summarize`, or its
        :func:`~training.metrics.to_jsonable` form: ``"NaN"``/``"Infinity"`` strings, legacy ``"inf"`` and
        ``None`` are accepted).
    notes : list[str], optional
        Free-text notes, one list item each (escaped).
    extra_tables : dict[str, pandas.DataFrame], optional
        Section title -> table, rendered with escaped cells (e.g. per-fold results, cost breakdown).
    positions : dict[str, pandas.Series], optional
        Strategy name -> signed effective leverage per bar (|notional| / equity, negative when short;
        a side series -1/0/+1 works too), plotted with ``regimes`` shaded behind.
    regimes : pandas.Series, optional
        Regime index per bar (int, 0 = calmest), same time index as ``positions``.

    A table of calendar-month returns is added for curves indexed by time.

    Returns
    -------
    pathlib.Path
        Path of the written ``report.html``.

    Raises
    ------
    ReportInputError
        If ``equity_curves`` is empty, a curve is not a Series, is empty, holds a non-finite or
        negative value, or does not start positive.
    OSError
        If the files cannot be written.
    """
    if not equity_curves:
        raise ReportInputError("equity_curves is empty; the report needs at least one curve to plot")
    values = {name: _validate_curve(name, curve) for name, curve in equity_curves.items()}
    png = _render_figure(equity_curves, values)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FIGURE_FILENAME).write_bytes(png)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if notes:
        items = "".join(f"<li>{html.escape(str(note))}</li>" for note in notes)
        parts.append(f"<h2>Notes</h2><ul>{items}</ul>")
    parts.append("<h2>Metrics</h2>")
    parts.append(_metrics_table(metrics) if metrics else "<p>No metrics.</p>")
    encoded = base64.b64encode(png).decode("ascii")
    parts.append("<h2>Equity and drawdown</h2>")
    parts.append(f'<img src="data:image/png;base64,{encoded}" alt="equity and drawdown of each strategy">')
    if positions:
        pos_png = base64.b64encode(_render_positions(positions, regimes)).decode("ascii")
        parts.append("<h2>Position, leverage and regimes</h2>")
        parts.append(f'<img src="data:image/png;base64,{pos_png}" alt="position of each strategy over time">')
    months = monthly_returns(equity_curves)
    if not months.empty:
        parts.append("<h2>Monthly returns</h2>")
        shown = months.map(lambda v: "n/a" if not np.isfinite(v) else f"{v:+.2%}")
        shown.index = shown.index.astype(str)
        parts.append(shown.to_html(escape=True, border=0, classes="extra"))
    for table_title, frame in (extra_tables or {}).items():
        parts.append(f"<h2>{html.escape(str(table_title))}</h2>")
        parts.append(frame.to_html(escape=True, na_rep="n/a", border=0, classes="extra"))
    metric_names = list(dict.fromkeys(k for per in metrics.values() for k in per))
    definitions = _definitions(metric_names)
    if definitions:
        parts.append(f"<h2>Definitions</h2>{definitions}")
    parts.append("</body></html>")

    path = out_dir / REPORT_FILENAME
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
