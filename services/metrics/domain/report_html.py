"""A ``Report`` as one self-contained HTML page: the decision matrix and its charts.

Charts are drawn by plotly.js, which the page carries inline (about 4.8 MB), so it opens
without a network. Each chart sits in ``<div id="chart-<name>">``; a chart with nothing to
draw says so in its place instead of drawing empty axes.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from services.metrics.domain.report import MEANING, WINDOW_BINS, Report

CHARTS = ("latency-cdf", "over-time", "cost", "window-use", "canary")
_CONFIG = {"displaylogo": False, "responsive": True}
_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d232a; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 6px; }
.meta { color: #555; margin-bottom: 16px; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; white-space: nowrap; }
th { background: #f3f5f7; position: sticky; top: 0; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.notes { color: #8a5a00; white-space: normal; min-width: 220px; }
.matrix { overflow-x: auto; max-height: 480px; }
.chart { min-height: 380px; } .empty { color: #666; padding: 40px 0; min-height: 0; }
dl { font-size: 12px; color: #444; } dt { font-weight: 600; display: inline; }
dd { display: inline; margin: 0 12px 0 4px; }
"""


def render(report: Report, generated: datetime | None = None) -> str:
    generated = generated or datetime.now(UTC)
    sections = [
        _chart("latency-cdf", "Latency distribution per model (successful calls)", _cdf(report)),
        _chart("over-time", "p95 latency and error rate over time", _over_time(report)),
        _chart("cost", "Cost per 1,000 tokens per model", _cost(report)),
        _chart("window-use", "Context-window use per model", _window_use(report)),
        _chart("canary", "Canary: candidate share and decisions", _canary(report)),
    ]
    source = {
        "events": "llm_events (exact quantiles)",
        "aggregate": "llm_events_1m (per-minute aggregate, t-digest quantiles)",
    }[report.source]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Switchboard report, {html.escape(report.window.describe())}</title>
<style>{_STYLE}</style>
<script>{get_plotlyjs()}</script>
</head><body>
<h1>Switchboard: decision matrix</h1>
<div class="meta">{html.escape(report.window.describe())} · from {html.escape(source)} ·
generated {generated:%Y-%m-%d %H:%M:%S} UTC</div>
<h2>Per tier, model, variant and config</h2>
{_matrix(report)}
{"".join(sections)}
</body></html>
"""


def _matrix(report: Report) -> str:
    if not report.matrix:
        return '<p class="empty">No model calls in this range.</p>'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in report.columns)
    body = []
    for row in report.rows():
        cells = []
        for column, value in zip(report.columns, row, strict=True):
            kind = "notes" if column == "notes" else ("n" if isinstance(value, int | float) else "")
            text = "" if value is None else (f"{value:.6g}" if isinstance(value, float) else value)
            cells.append(f'<td class="{kind}">{html.escape(str(text))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    meaning = "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in MEANING.items()
    )
    return (
        f'<div class="matrix"><table id="matrix"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div><dl>{meaning}</dl>"
    )


def _chart(name: str, title: str, drawn: go.Figure | str) -> str:
    if isinstance(drawn, str):
        inner = f'<div class="chart empty" id="chart-{name}">{html.escape(drawn)}</div>'
    else:
        drawn.update_layout(
            title=None, margin={"l": 60, "r": 20, "t": 20, "b": 50}, showlegend=True, height=420
        )
        inner = pio.to_html(
            drawn,
            full_html=False,
            include_plotlyjs=False,
            div_id=f"chart-{name}",
            config=_CONFIG,
            default_width="100%",
        )
    return f'<section><h2>{html.escape(title)}</h2><div class="chart-box">{inner}</div></section>'


def _cdf(report: Report) -> go.Figure | str:
    if not report.cdf:
        return "No successful calls in this range."
    fig = go.Figure()
    for model, points in report.cdf.items():
        fig.add_trace(
            go.Scatter(
                x=[ms for ms, _ in points],
                y=[level for _, level in points],
                mode="lines",
                name=model,
            )
        )
    fig.update_xaxes(title="latency (ms)", type="log")
    fig.update_yaxes(title="share of calls at or under", tickformat=".0%", range=[0, 1])
    return fig


def _over_time(report: Report) -> go.Figure | str:
    if not report.series:
        return "No model calls in this range."
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    colors = _palette(report.series)
    for model, points in report.series.items():
        times = [t for t, *_ in points]
        common: dict[str, Any] = {"legendgroup": model, "line": {"color": colors[model]}}
        fig.add_trace(
            go.Scatter(x=times, y=[p95 for _, p95, _, _ in points], name=model, **common),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=times,
                y=[rate for _, _, rate, _ in points],
                name=f"{model} errors",
                showlegend=False,
                **common,
            ),
            row=2,
            col=1,
        )
    fig.update_yaxes(title="p95 (ms, log scale)", type="log", row=1, col=1)
    fig.update_yaxes(title="error rate", tickformat=".0%", rangemode="tozero", row=2, col=1)
    step = f"{report.step_s // 60} min" if report.step_s >= 60 else f"{report.step_s} s"
    fig.update_xaxes(title=f"time (UTC), steps of {step}", row=2, col=1)
    fig.update_layout(height=520)
    return fig


def _cost(report: Report) -> go.Figure | str:
    priced = {m: c for m, c in report.cost_per_1k().items() if c is not None}
    if not priced:
        return "No tokens counted in this range."
    fig = go.Figure(
        go.Bar(
            x=list(priced),
            y=list(priced.values()),
            name="USD per 1k tokens",
            text=[f"${c:.4f}" for c in priced.values()],
        )
    )
    # models' prices span orders of magnitude: a linear axis flattens the cheap ones to nothing
    fig.update_yaxes(title="USD per 1,000 tokens (in + out), log scale", type="log")
    return fig


def _window_use(report: Report) -> go.Figure | str:
    if not report.window_use:
        return "No call to a model with a known context window in this range."
    width = 100 / WINDOW_BINS
    labels = [f"{i * width:g} to {(i + 1) * width:g} %" for i in range(WINDOW_BINS)]
    fig = go.Figure()
    for model, bins in report.window_use.items():
        fig.add_trace(go.Bar(x=labels, y=bins, name=model))
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="tokens in ÷ the model's maximum input")
    fig.update_yaxes(title="calls")
    return fig


def _canary(report: Report) -> go.Figure | str:
    if not report.decisions and not report.canary_traffic:
        return "No canary in this range: no controller decision and no candidate traffic."
    fig = go.Figure()
    for tier, points in report.canary_traffic.items():
        fig.add_trace(
            go.Scatter(
                x=[t for t, _ in points],
                y=[share for _, share in points],
                mode="lines",
                line={"shape": "hv"},
                name=f"{tier}: candidate's share of requests",
            )
        )
    if report.decisions:
        fig.add_trace(
            go.Scatter(
                x=[d["decided_at"] for d in report.decisions],
                y=[d["share_to"] for d in report.decisions],
                mode="markers+text",
                text=[d["action"] for d in report.decisions],
                textposition="top center",
                hovertext=[
                    f"{d['experiment']}: {d['action']} {d['share_from']:g} → {d['share_to']:g} %"
                    f"<br>{html.escape(str(d['reason']))[:200]}"
                    for d in report.decisions
                ],
                marker={"size": 10, "symbol": "diamond"},
                name="decisions (share set to)",
            )
        )
    fig.update_yaxes(title="candidate share (%)", range=[0, 105])
    fig.update_xaxes(title="time (UTC)")
    return fig


def _palette(models: dict[str, Any]) -> dict[str, str]:
    colors = (
        "#1f77b4 #ff7f0e #2ca02c #d62728 #9467bd #8c564b #e377c2 #7f7f7f #bcbd22 #17becf".split()
    )
    return {m: colors[i % len(colors)] for i, m in enumerate(models)}
