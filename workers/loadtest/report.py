"""``--report report.html``: one self-contained page with the run's plots and tables.

Plotly draws the plots; its JavaScript is embedded once in the page, so the
file opens anywhere, offline, and can be mailed around. Every figure comes
from the result document (the same one ``--json`` writes), so a report can
also be drawn later from a saved result: ``python -m workers.loadtest.report
result.json report.html``.
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from workers.loadtest.results import auth_text, counts_text, fault_lines, protocol_text

_LAYOUT: dict[str, Any] = {
    "template": "plotly_white",
    "height": 360,
    "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
    "legend": {"orientation": "h", "y": -0.2},
}


def _fault_lines(fig: go.Figure, result: dict[str, Any]) -> None:
    """Each fault on a timeline: a dashed line per step, its span shaded, and when all were back."""
    for fault in result["faults"]:
        for step in fault["steps"]:
            fig.add_vline(x=step["at_s"], line_dash="dash", line_color="#c0392b",
                          annotation_text=step["what"], annotation_position="top right",
                          annotation_font={"color": "#c0392b", "size": 11})  # fmt: skip
        back = fault.get("subscribers_back_after_s")
        if back is not None:
            end = fault["at_s"] + back
            fig.add_vrect(x0=fault["at_s"], x1=end, fillcolor="#c0392b", opacity=0.08, line_width=0)
            fig.add_vline(x=end, line_dash="dot", line_color="#1e6b34",
                          annotation_text=f"all back ({fault['kind']}, {back} s)", annotation_position="bottom right",
                          annotation_font={"color": "#1e6b34", "size": 11})  # fmt: skip


def latency_cdf(result: dict[str, Any]) -> go.Figure:
    points = result["latency_cdf"]
    fig = go.Figure(go.Scatter(x=[max(p[0], 0.001) for p in points], y=[p[1] * 100 for p in points],
                               mode="lines", line_shape="hv", name="publish -> deliver"))  # fmt: skip
    for row, (label, key) in enumerate((("p50", "p50"), ("p99", "p99"), ("p99.9", "p99_9"))):
        value = max(result["latency_ms"][key], 0.001)
        fig.add_vline(x=value, line_dash="dot", line_color="#888")
        # An annotation on a log axis is placed in log10 units (a shape is not).
        fig.add_annotation(x=math.log10(value), y=0.3 - 0.12 * row, yref="paper", xanchor="right", showarrow=False,
                           text=f"{label} {value:.1f} ms ", font={"color": "#555", "size": 11})  # fmt: skip
    fig.update_layout(title="Latency, publish to deliver: cumulative distribution", **_LAYOUT)
    fig.update_xaxes(title="milliseconds (log)", type="log")
    fig.update_yaxes(title="% of deliveries at or below", range=[0, 100.5])
    return fig


_BINS_PER_DECADE = 20


def latency_histogram(result: dict[str, Any]) -> go.Figure:
    """The histogram's fine buckets, regrouped into 20 bins per decade for the eye."""
    shares: dict[int, float] = {}
    previous = 0.0
    for value, fraction in result["latency_cdf"]:
        key = math.floor(math.log10(max(value, 0.001)) * _BINS_PER_DECADE)
        shares[key] = shares.get(key, 0.0) + (fraction - previous) * 100
        previous = fraction
    keys = sorted(shares)
    centres = [10 ** ((k + 0.5) / _BINS_PER_DECADE) for k in keys]
    fig = go.Figure(go.Bar(x=centres, y=[shares[k] for k in keys], name="deliveries",
                           hovertemplate="%{x:.2f} ms: %{y:.2f} %<extra></extra>"))  # fmt: skip
    fig.update_layout(title="Latency histogram", bargap=0.05, **_LAYOUT)
    fig.update_xaxes(title="milliseconds (log)", type="log")
    fig.update_yaxes(title="% of deliveries")
    return fig


def deliveries_over_time(result: dict[str, Any]) -> go.Figure:
    timeline = result["timeline"]
    seconds = [row["t"] for row in timeline]
    nodes = [n["node"] for n in result["nodes"]]
    fig = go.Figure()
    for node in nodes:
        fig.add_trace(go.Scatter(x=seconds, y=[row["by_node"].get(node, 0) for row in timeline], name=node,
                                 mode="lines", stackgroup="deliveries"))  # fmt: skip
    fig.add_trace(go.Scatter(x=seconds, y=[row["published"] for row in timeline], name="published (events/s)",
                             mode="lines", yaxis="y2", line={"color": "black", "dash": "dot"}))  # fmt: skip
    errors = [row["publish_errors"] for row in timeline]
    if any(errors):
        fig.add_trace(go.Bar(x=seconds, y=errors, name="publish errors", yaxis="y2", marker_color="#c0392b"))
    fig.update_layout(title="Deliveries per second, by node", **_LAYOUT,
                      yaxis2={"title": "published / errors per s", "overlaying": "y", "side": "right"})  # fmt: skip
    fig.update_xaxes(title="seconds since publishing started")
    fig.update_yaxes(title="deliveries per s")
    _fault_lines(fig, result)
    return fig


def latency_over_time(result: dict[str, Any]) -> go.Figure:
    timeline = [row for row in result["timeline"] if row["delivered"]]
    seconds = [row["t"] for row in timeline]
    fig = go.Figure()
    for key, name in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
        fig.add_trace(go.Scatter(x=seconds, y=[row[key] for row in timeline], name=name, mode="lines+markers"))
    fig.update_layout(title="Latency over time (per second of delivery)", **_LAYOUT)
    fig.update_xaxes(title="seconds since publishing started")
    fig.update_yaxes(title="milliseconds", rangemode="tozero")
    _fault_lines(fig, result)
    return fig


def per_node(result: dict[str, Any]) -> go.Figure:
    nodes = result["nodes"]
    names = [n["node"] for n in nodes]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("deliveries", "connects", "p99 latency, ms"))
    fig.add_trace(go.Bar(x=names, y=[n["deliveries"] for n in nodes], name="deliveries"), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=[n["connects"] for n in nodes], name="connects"), row=1, col=2)
    fig.add_trace(go.Bar(x=names, y=[n["latency_ms"]["p99"] for n in nodes], name="p99 ms"), row=1, col=3)
    fig.update_layout(title="Per node (from X-Node-Id)", showlegend=False, **{**_LAYOUT, "height": 340})
    return fig


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _facts(result: dict[str, Any]) -> str:
    c, p, d = result["config"], result["publish"], result["delivery"]
    lat, conn = result["latency_ms"], result["connections"]
    rows = [
        ("target", ", ".join(c["targets"]) + f" (publish via {c['publish']}{protocol_text(c)}{auth_text(c)})"),
        ("load", f"{c['subscribers']:,} subscribers, {c['topics']:,} topic(s), {c['rate']:,.0f} events/s "
                 f"for {c['duration']:g} s, {c['payload']} B"),
        ("published", f"{p['accepted']:,} accepted ({p['rate']:,.0f}/s), {p['refused']:,} refused, "
                      f"{p['uncertain']:,} uncertain; errors {p['errors'] or 'none'}"),
        ("delivered", f"{d['delivered']:,} of {d['expected']:,} expected, {d['per_second']:,.0f} events/s"),
        ("lost / duplicated / out of order", f"{d['lost']:,} / {d['duplicated']:,} / {d['out_of_order']:,}"),
        ("latency ms p50 / p90 / p99 / p99.9 / max",
         f"{lat['p50']:.1f} / {lat['p90']:.1f} / {lat['p99']:.1f} / {lat['p99_9']:.1f} / {lat['max']:.1f}"),
        ("connect ms p50 / p99", f"{conn['connect_ms']['p50']:.1f} / {conn['connect_ms']['p99']:.1f}"),
        ("connections", f"{conn['connected']:,}/{conn['subscribers']:,}, {conn['reconnects']:,} reconnects, "
                        f"resets {counts_text(conn['resets'])}"),
        ("not streamed (by cause)", f"{counts_text(conn['errors'])}; told to retry {conn['told_to_retry']:,}"),
        ("streams ended", counts_text(conn["dropped"])),
    ]  # fmt: skip
    for fault in result["faults"]:
        done, effect = fault_lines(fault)
        rows.append(("fault", f"{done}. {effect}"))
    rows += [("tool warning", w) for w in result["tool"]["warnings"]]
    return _table(rows)


_RULES = {
    "equal": "must be equal",
    "within": "equal, or the nodes above by at most",
    "at least": "nodes at least the tool",
    "shown": "shown, not compared",
}


def _why(row: dict[str, Any]) -> str:
    if not row["why"]:
        return ""
    return f"<br>{'slack' if row['rule'] == 'within' else 'not exact'}: {html.escape(row['why'])}"


def _server_counts(result: dict[str, Any]) -> str:
    """The nodes' own counts beside the tool's (from their /metrics), mismatches flagged; or why there are none."""
    server = result.get("server")
    if not server:
        return ""
    head = "<h2>Server counts (GET /metrics of the nodes, before and after the run)</h2>"
    if not server["available"]:
        return f'{head}<p class="unavailable">server counts unavailable: {html.escape(server["why"])}</p>'
    nodes = ", ".join(
        html.escape(f"{n['node_id'] or n['url']} ({n['url']})") for n in server["nodes"] if n["counts"] is not None
    )
    body = []
    for row in server["rows"]:
        status = {True: "ok", False: "MISMATCH", None: "-"}[row["ok"]]
        css = {True: "ok", False: "mismatch", None: ""}[row["ok"]]
        tool = "-" if row["tool"] is None else f"{row['tool']:,}"
        rule = _RULES[row["rule"]] + (f" {row['slack']:,}" if row["rule"] == "within" else "")
        body.append(
            f'<tr class="{css}"><th>{html.escape(row["label"])}</th><td class="num">{row["server"]:,}</td>'
            f'<td class="num">{tool}</td><td>{html.escape(rule)}</td><td>{status}</td>'
            f'<td class="small">{html.escape(row["server_source"])}<br>{html.escape(row["tool_source"])}'
            f"{'<br>' + html.escape(row['detail']) if row['detail'] else ''}"
            f"{_why(row)}</td></tr>"
        )
    per_node = []
    tool_deliveries = {n["node"]: n["deliveries"] for n in result["nodes"]}
    for n in server["nodes"]:
        counts = n["counts"]
        cells = (
            "".join(f'<td class="num">{counts.get(k, 0):,}</td>' for k in ("deliveries", "bytes", "cutoffs",
                                                                           "resets", "published", "streams_opened"))
            + f'<td class="num">{tool_deliveries.get(n["node_id"], 0):,}</td>'
            if counts is not None
            else f'<td colspan="7">{html.escape(n.get("note") or n["error"] or "")}</td>'
        )  # fmt: skip
        per_node.append(f"<tr><th>{html.escape(n['node_id'] or '-')}</th><td>{html.escape(n['url'])}</td>{cells}</tr>")
    mismatches = "".join(f'<p class="mismatch">MISMATCH: {html.escape(m)}</p>' for m in server["mismatches"])
    return (
        f"{head}<p>from {nodes} ({html.escape(server['source'])}). {html.escape(server['note'])}. A mismatch is "
        f"flagged here and in the summary; the verdict above is about the events alone.</p>{mismatches}"
        '<table class="counts"><tr><th></th><th>nodes</th><th>tool</th><th>rule</th><th></th><th>what is counted'
        f"</th></tr>{''.join(body)}</table>"
        '<table class="counts"><tr><th>node</th><th>url</th><th>deliveries</th><th>bytes</th><th>cut-offs</th>'
        f"<th>resets</th><th>published</th><th>streams opened</th><th>tool: first deliveries (X-Node-Id)</th></tr>"
        f"{''.join(per_node)}</table>"
    )


_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
.verdict { font-size: 1.25em; font-weight: 600; padding: 0.5em 0.8em; border-radius: 6px; margin: 1em 0; }
.pass { background: #e6f4ea; color: #1e6b34; } .fail { background: #fdecea; color: #a12a1d; }
table { border-collapse: collapse; margin: 1em 0; } th, td { text-align: left; padding: 0.25em 1em 0.25em 0; }
th { font-weight: 500; color: #555; } .plot { margin: 1.5em 0; }
h2 { font-size: 1.15em; margin-top: 1.5em; } .num { text-align: right; } .small { font-size: 0.85em; color: #555; }
tr.mismatch td, p.mismatch { color: #a12a1d; font-weight: 600; } tr.ok td { color: #1e6b34; }
.unavailable { color: #7a5b00; background: #fff6dd; padding: 0.4em 0.8em; border-radius: 6px; }
table.counts td, table.counts th { border-bottom: 1px solid #eee; }
"""


def render(result: dict[str, Any]) -> str:
    """The report page, plotly.js included once."""
    figures = [latency_cdf(result), latency_histogram(result), deliveries_over_time(result),
               latency_over_time(result), per_node(result)]  # fmt: skip
    plots = []
    for index, fig in enumerate(figures):
        div = pio.to_html(fig, full_html=False, include_plotlyjs=index == 0, config={"displaylogo": False})
        plots.append(f'<div class="plot">{div}</div>')
    verdict = result["verdict"]
    verdict_html = (
        '<div class="verdict pass">PASS: every accepted event reached every subscriber once, in order</div>'
        if verdict["pass"]
        else f'<div class="verdict fail">FAIL: {html.escape("; ".join(verdict["reasons"]))}</div>'
    )
    title = f"Herald load test {result['started_at']}"
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<div>run {html.escape(result['config']['run_id'])}</div>{verdict_html}{_facts(result)}"
        f"{_server_counts(result)}"
        f"{''.join(plots)}</body></html>"
    )


def write_report(result: dict[str, Any], path: Path) -> None:
    path.write_text(render(result), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.exit("usage: python -m workers.loadtest.report RESULT.json REPORT.html")
    write_report(json.loads(Path(args[0]).read_text()), Path(args[1]))


if __name__ == "__main__":
    main()
