"""``ats dashboard``: a read-only web page of a serving state database (server-rendered, no script).

Built on Werkzeug (routing, requests, the threaded development server; Pallets) and Jinja2 (templates with
autoescaping), charts drawn by matplotlib's Agg canvas as PNG: the page needs no JavaScript and no resource
from outside the server. It reads the store through :func:`serving.ops_data.read_period` at every request, so
it shows what the serving loop has written so far, and it never writes: the routes accept GET and HEAD only
(anything else is 405 Method Not Allowed) and no handler calls a store write.

Pages and resources
-------------------
* ``/``: the status lines of ``ats status`` (:func:`serving.ops_data.status_rows`), the last decision, positions
  per symbol, equity and drawdown (chart), decisions by source over time (chart and a table per UTC day), the
  risk state and kill switches (the guard's latest state, its reasons and its transitions), drift statistics
  (the latest ``drift`` event of each statistic), and the last events. While the run is going (its latest
  ``run_started``/``live_started`` has no later ``run_finished``) the page reloads itself every ``refresh_s``
  seconds (``<meta http-equiv="refresh">``).
* ``/chart/equity.png``, ``/chart/sources.png``: the charts.
* ``/status.json``: the status lines as JSON (for a small fetch).

Binding: loopback only (``127.0.0.0/8``, ``::1``, ``localhost``) unless ``allow_remote`` is set: the page shows
positions and equity to whoever reaches the port, and there is no login.
"""

from __future__ import annotations

import io
import ipaddress
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Response

from serving.ops_data import ServingPeriod, read_period, status_rows
from serving.risk import DEFAULT_SCOPE
from serving.store import DECISION_SOURCES, StateStore

__all__ = ["DEFAULT_PORT", "Dashboard", "RemoteBindError", "check_host", "make_dashboard_server"]

DEFAULT_PORT = 8050
"""TCP port of ``ats dashboard`` when none is given."""

LAST_EVENTS = 50
"""How many of the latest events the page lists."""

_SOURCE_COLOURS = {"v2": "#2e86c1", "v1": "#e0a800", "guard": "#c0392b", "missed": "#7f8c8d"}

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
{% if refresh_s %}<meta http-equiv="refresh" content="{{ refresh_s }}">{% endif %}
<title>ats dashboard: {{ run_id }}</title>
<link rel="icon" href="data:,">
<style>
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.4em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ACTIVE { color: #1e8449; font-weight: bold; } .REDUCING { color: #b9770e; font-weight: bold; }
.HALTED { color: #c0392b; font-weight: bold; } .muted { color: #777; } img { max-width: 100%; }
</style></head><body>
<h1>ats dashboard: run {{ run_id }}</h1>
<p class="muted">{{ db }} &middot; {{ live_note }} &middot; read-only</p>
<h2>Status (as <code>ats status</code> shows it)</h2>
<table id="status">{% for field, value in status %}<tr><th>{{ field }}</th><td>{{ value }}</td></tr>{% endfor %}</table>
<h2>Last decision</h2>
{% if last_decision %}<table id="last-decision">{% for field, value in last_decision %}<tr><th>{{ field }}</th><td>{{ value }}</td></tr>{% endfor %}</table>
{% else %}<p>none</p>{% endif %}
<h2>Positions per symbol</h2>
<table id="positions"><tr><th>symbol</th><th>bar</th><th>position</th><th>equity (USDT)</th></tr>
{% for p in positions %}<tr><td>{{ p.symbol }}</td><td>{{ p.bar }}</td><td>{{ p.position }}</td><td class="num">{{ p.equity }}</td></tr>{% endfor %}</table>
<h2>Equity and drawdown</h2>
<img src="chart/equity.png" alt="account equity and drawdown" width="1000" height="450">
<h2>Decisions by source over time</h2>
<img src="chart/sources.png" alt="decisions by source per period" width="1000" height="300">
<table id="sources"><tr><th>{{ period_name }}</th>{% for s in sources %}<th>{{ s }}</th>{% endfor %}<th>fallback share</th></tr>
{% for row in source_rows %}<tr>{% for cell in row %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</table>
<h2>Risk state and kill switches</h2>
<p id="risk">scope {{ scope }}: <span class="{{ risk_state }}">{{ risk_state }}</span>{% if risk_since %} since {{ risk_since }}{% endif %}</p>
{% if risk_reasons %}<ul>{% for r in risk_reasons %}<li>{{ r }}</li>{% endfor %}</ul>{% endif %}
{% if risk_history %}<table id="risk-history"><tr><th>time</th><th>state</th><th>change</th><th>reasons</th></tr>
{% for h in risk_history %}<tr><td>{{ h.time }}</td><td class="{{ h.state }}">{{ h.state }}</td><td>{{ h.change }}</td><td>{{ h.reasons }}</td></tr>{% endfor %}</table>
{% else %}<p class="muted">the guard never changed state</p>{% endif %}
<h2>Drift</h2>
{% if drift %}<table id="drift"><tr><th>time</th><th>statistic</th><th>value</th><th>threshold</th><th>breach</th><th>action</th></tr>
{% for d in drift %}<tr><td>{{ d.time }}</td><td>{{ d.statistic }}</td><td class="num">{{ d.value }}</td><td class="num">{{ d.threshold }}</td><td>{{ d.breach }}</td><td>{{ d.action }}</td></tr>{% endfor %}</table>
{% else %}<p class="muted">no drift event recorded (no monitor ran, or nothing to report)</p>{% endif %}
<h2>Last events</h2>
<table id="events"><tr><th>time</th><th>kind</th><th>detail</th></tr>
{% for e in events %}<tr><td>{{ e.time }}</td><td>{{ e.kind }}</td><td>{{ e.detail }}</td></tr>{% endfor %}</table>
</body></html>
"""


class RemoteBindError(ValueError):
    """The dashboard was asked to listen on an address other than loopback without ``allow_remote``."""


def check_host(host: str, *, allow_remote: bool = False) -> str:
    """Return ``host`` if it is a loopback address (``127.0.0.0/8``, ``::1``) or ``localhost``, or if
    ``allow_remote``.

    Raises
    ------
    RemoteBindError
        Any other host (``0.0.0.0``, a LAN address, a name) without ``allow_remote``.
    """
    if allow_remote:
        return host
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise RemoteBindError(
        f"refusing to serve the dashboard on {host!r}: it shows positions and equity without a login, so it listens on "
        "loopback only (127.0.0.1, ::1, localhost); pass --allow-remote to bind another address on purpose")


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _naive_utc(index: pd.Index) -> Any:
    return index.tz_convert("UTC").tz_localize(None).to_numpy() if getattr(index, "tz", None) is not None else index


def equity_chart(period: ServingPeriod) -> bytes:
    """PNG: the account equity (USDT) and its drawdown (%) over the period."""
    fig = Figure(figsize=(10, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_eq, ax_dd = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    curve = period.curve
    if len(curve):
        x = _naive_utc(curve.index)
        ax_eq.plot(x, curve.to_numpy(), linewidth=1.0, color="#2e86c1")
        ax_dd.fill_between(x, period.drawdown.to_numpy() * 100.0, 0.0, step=None, color="#c0392b", alpha=0.4)
    else:
        ax_eq.text(0.5, 0.5, "no equity recorded yet", ha="center", va="center", transform=ax_eq.transAxes)
    ax_eq.set_ylabel("equity (USDT)")
    ax_eq.grid(True, alpha=0.3)
    ax_dd.set_ylabel("drawdown (%)")
    ax_dd.set_xlabel("bar open time (UTC)")
    ax_dd.grid(True, alpha=0.3)
    return _png(fig)


def source_periods(period: ServingPeriod) -> tuple[str, pd.DataFrame]:
    """Decisions by source per UTC day (per hour when the run spans at most 2 days): (name, table)."""
    d = period.decisions
    span = (d.bar_open_time.max() - d.bar_open_time.min()) if len(d) else pd.Timedelta(0)
    freq, name = ("h", "hour (UTC)") if span <= pd.Timedelta(days=2) else ("D", "day (UTC)")
    table = period.source_counts(freq)
    if isinstance(table.index, pd.MultiIndex):  # several symbols: the bars of all symbols per period
        table = table.groupby(level=0).sum()
    return name, table


def sources_chart(period: ServingPeriod) -> bytes:
    """PNG: stacked bars of the decisions per source (V2, V1, guard, missed) per period."""
    name, table = source_periods(period)
    fig = Figure(figsize=(10, 3), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if len(table):
        x = _naive_utc(table.index)
        width = (0.8 / 24) if name.startswith("hour") else 0.8
        bottom = np.zeros(len(table))
        for src in DECISION_SOURCES:
            values = table[src].to_numpy(dtype=float)
            ax.bar(x, values, width=width, bottom=bottom, label=src, color=_SOURCE_COLOURS[src])
            bottom += values
        ax.legend(loc="upper left", fontsize="small", ncol=4)
    else:
        ax.text(0.5, 0.5, "no decision recorded yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("bars decided")
    ax.set_xlabel(name)
    ax.grid(True, alpha=0.3, axis="y")
    return _png(fig)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


@dataclass(frozen=True)
class Dashboard:
    """The WSGI application of the dashboard over the state database ``db`` (a SQLite path or a SQLAlchemy URL).

    Parameters
    ----------
    db : str
        State database (read at every request).
    run_id : str | None
        Run to show (default: the latest, as ``ats status``).
    refresh_s : int
        Reload period of the page while the run is going, seconds (>= 1).
    scope : str
        Risk-guard scope shown.
    """

    db: str
    run_id: str | None = None
    refresh_s: int = 30
    scope: str = DEFAULT_SCOPE

    def __post_init__(self) -> None:
        if int(self.refresh_s) < 1:
            raise ValueError(f"refresh_s must be >= 1 second, got {self.refresh_s}")

    @property
    def _routes(self) -> Map:
        return Map([Rule("/", endpoint="page", methods=["GET"]),
                    Rule("/chart/equity.png", endpoint="equity", methods=["GET"]),
                    Rule("/chart/sources.png", endpoint="sources", methods=["GET"]),
                    Rule("/status.json", endpoint="status", methods=["GET"])])  # fmt: skip

    def _period(self) -> tuple[ServingPeriod, StateStore]:
        store = StateStore.open(self.db)
        try:
            return read_period(store, self.run_id), store
        except Exception:
            store.close()
            raise

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """WSGI entry: route GET/HEAD requests (405 for any other method, 404 for an unknown path); 503 with the
        reason while the database holds no decision."""
        try:
            endpoint, _ = self._routes.bind_to_environ(environ).match()
            response = self._dispatch(endpoint)
        except HTTPException as exc:
            response = exc.get_response(environ)
        except ValueError as exc:  # nothing served yet (no decisions): say so, and keep refreshing
            response = Response(f"<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv='refresh' "
                                f"content='{int(self.refresh_s)}'><title>ats dashboard</title></head><body><p>"
                                f"{_escape(str(exc))}</p></body></html>", status=503, mimetype="text/html")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; form-action 'none'")
        return response(environ, start_response)

    def _dispatch(self, endpoint: str) -> Response:
        period, store = self._period()
        try:
            if endpoint == "equity":
                return Response(equity_chart(period), mimetype="image/png")
            if endpoint == "sources":
                return Response(sources_chart(period), mimetype="image/png")
            if endpoint == "status":
                return Response(json.dumps(dict(status_rows(period.status))), mimetype="application/json")
            if endpoint == "page":
                return Response(self.render(period, store), mimetype="text/html")
            raise NotFound()
        finally:
            store.close()

    def render(self, period: ServingPeriod, store: StateStore) -> str:
        """The page's HTML for ``period`` (the risk history is read from ``store``)."""
        s = period.status
        d = period.decisions
        last_decision: list[tuple[str, str]] = []
        if len(d):
            row = d.iloc[-1]
            side = {1: "long", -1: "short", 0: "flat"}.get(int(row.direction), str(row.direction))
            last_decision = [("bar", str(row.bar_open_time)), ("symbol", str(row.get("symbol", ""))),
                             ("source", str(row.source)), ("direction", side),
                             ("leverage", f"{float(row.leverage):g}"), ("size", f"{float(row.size_frac):g}"),
                             ("fallback reason", str(row.fallback_reason or "")),
                             ("latency", f"{float(row.latency_ms):.1f} ms")]  # fmt: skip
        positions = [{"symbol": p.symbol or "-", "bar": str(p.bar_open_time),
                      "position": ("long" if p.position_side > 0 else "short" if p.position_side < 0 else "flat")
                      + (f" {p.position_qty_base:.6g}" if p.position_side else ""),
                      "equity": f"{p.equity_usdt:,.2f}"} for p in period.positions.itertuples()]  # fmt: skip
        name, table = source_periods(period)
        rows = []
        for t, r in table.iterrows():
            total = int(r.sum())
            fallback = (total - int(r["v2"])) / total if total else float("nan")
            label = f"{t:%Y-%m-%d %H:00}" if name.startswith("hour") else f"{t:%Y-%m-%d}"
            rows.append([label, *(int(r[c]) for c in DECISION_SOURCES),
                         "n/a" if not np.isfinite(fallback) else f"{fallback:.1%}"])
        hist = store.risk_states(self.scope)
        changes = hist[hist.change != "update"].tail(20) if len(hist) else hist
        risk_history = [{"time": str(h.time), "state": h.state, "change": h.change, "reasons": "; ".join(h.reasons)}
                        for h in changes.itertuples()]  # fmt: skip
        drift = []
        de = period.drift_events()
        if len(de):
            latest: dict[str, dict[str, Any]] = {}
            for t, det in zip(de.time, de.detail, strict=True):
                det = det or {}
                latest[str(det.get("statistic", "?"))] = {"time": str(t), **det}
            drift = [{"time": v["time"], "statistic": k, "value": _fmt(v.get("value")),
                      "threshold": _fmt(v.get("threshold")), "breach": _fmt(v.get("breach")),
                      "action": _fmt(v.get("action"))} for k, v in latest.items()]  # fmt: skip
        ev = period.events.tail(LAST_EVENTS).iloc[::-1] if len(period.events) else period.events
        events = [{"time": str(e.time), "kind": e.kind, "detail": json.dumps(e.detail or {}, default=str)[:300]}
                  for e in ev.itertuples()]  # fmt: skip
        running = self._running(period)
        env = Environment(autoescape=True)
        return env.from_string(_PAGE).render(
            run_id=s.run_id, db=_display(self.db), refresh_s=int(self.refresh_s) if running else None,
            live_note=(f"run in progress: this page reloads every {int(self.refresh_s)} s" if running
                       else "run finished: not reloading"),
            status=status_rows(s), last_decision=last_decision, positions=positions, period_name=name,
            sources=DECISION_SOURCES, source_rows=rows, scope=self.scope, risk_state=s.risk_state,
            risk_since=s.risk_since, risk_reasons=s.risk_reasons, risk_history=risk_history, drift=drift,
            events=events,
        )  # fmt: skip

    @staticmethod
    def _running(period: ServingPeriod) -> bool:
        """Whether the run's latest start has no later ``run_finished`` event."""
        e = period.events
        if e.empty:
            return True
        kinds = list(e.kind)
        starts = [i for i, k in enumerate(kinds) if k in ("run_started", "live_started")]
        last_start = starts[-1] if starts else -1
        return "run_finished" not in kinds[last_start + 1:]


def _escape(text: str) -> str:
    from html import escape

    return escape(text)


def _display(db: str) -> str:
    if "://" not in db:
        return db
    import sqlalchemy as sa

    return sa.engine.make_url(db).render_as_string(hide_password=True)


def make_dashboard_server(app: Dashboard, host: str, port: int, *, allow_remote: bool = False) -> BaseWSGIServer:
    """A threaded Werkzeug server of ``app`` on ``host:port`` (``port`` 0: any free port; ``server.server_port``
    tells which); call ``serve_forever()`` and ``shutdown()``.

    Raises
    ------
    RemoteBindError
        ``host`` is not loopback and ``allow_remote`` is False (:func:`check_host`).
    OSError
        The port is taken.
    """
    return make_server(check_host(host, allow_remote=allow_remote), port, app, threaded=True)
