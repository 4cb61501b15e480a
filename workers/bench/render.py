"""``docs/benchmarks.md``, drawn from the results of one ``make bench`` run (never typed by hand)."""

from __future__ import annotations

import json
import statistics
from typing import Any

from workers.bench import partitions, redis_cost
from workers.bench.scenarios import (
    AUTH_TOLERANCE,
    BATCH,
    METRICS_TOLERANCE,
    PIPELINE,
    auth_verdicts,
    best_step,
    kept_up,
    mercure_figures,
    metrics_verdict,
)
from workers.bench.systems import CLIENT_CORE, SERVER_CORE


def ratio(a: float | None, b: float | None, higher_is_better: bool = True) -> str:
    """How many times better ``a`` (Herald) is than ``b`` (a peer): above 1.00x Herald is better."""
    if not a or not b:
        return "-"
    return f"{(a / b if higher_is_better else b / a):.2f}x"


def _first_failure(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((s for s in steps if not s.get("retried") and not kept_up(s)), None)


def _get(entry: dict[str, Any] | None, key: str) -> Any:
    return None if entry is None else entry.get(key)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | int):
        return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
    return str(value)


_SCENARIO_ROWS: list[tuple[str, str, str, bool | None]] = [
    # (scenario, field, label, higher is better; None where no ratio makes sense)
    ("latency", "p99_ms", "p99 ms, 5,000 subscribers, 20 events/s", False),
    ("latency", "settled_p99_ms", "same, after the first second (connections warmed up)", False),
    ("many_topics", "p99_ms", "10,000 topics, 2,000 events/s: p99 ms", False),
    ("many_topics", "kept_up", "10,000 topics: kept up with zero loss", None),
    ("idle", "kb_per_connection", "KB per idle connection (5,000)", False),
    ("idle", "connect_all_s", "seconds for 5,000 connects at once", False),
    ("storm", "resume_all_s", "reconnect storm: seconds until all 5,000 resumed", False),
    ("storm", "exact", "reconnect storm: every missed event exactly once", None),
]
"""The table's rows after the throughput ones: one figure of one scenario each."""


def _scenario_value(entry: dict[str, Any] | None, field: str) -> Any:
    if field == "kept_up":  # derived: the step's own verdict
        return entry is not None and kept_up(entry)
    return _get(entry, field)


def throughput_runs(results: dict[str, Any], mode: str, subs: int) -> dict[str, list[dict[str, Any]]]:
    """Each system's steps of the throughput scenario in publishing ``mode`` with ``subs`` subscribers."""
    out = {}
    for name, entry in results["systems"].items():
        run = entry["throughput"].get(mode, {}).get(str(subs))
        if run is not None:
            out[name] = run["steps"]
    return out


def _modes(results: dict[str, Any]) -> dict[str, str]:
    """The publishing modes of the run, key -> label, headline (same work for all) first."""
    return dict(results.get("modes") or {})


def _figures(results: dict[str, Any]) -> list[tuple[str, dict[str, Any], bool | None]]:
    """(label, value per system, higher is better; None where no ratio makes sense)."""
    systems: dict[str, dict[str, Any]] = results["systems"]
    rows: list[tuple[str, dict[str, Any], bool | None]] = []
    for mode, label in _modes(results).items():
        # Herald's batches are not the peers' work: their rows carry no ratio.
        same_work = mode != "batch"
        for subs in results["throughput_subscribers"]:
            runs = throughput_runs(results, mode, subs)
            if not runs:
                continue
            best = {n: best_step(steps) for n, steps in runs.items()}
            rows.append(
                (
                    f"delivered events/s, {subs:,} subscribers, zero loss ({label})",
                    {n: _get(b, "delivered_per_s") for n, b in best.items()},
                    True if same_work else None,
                )
            )
            rows.append(
                (
                    f"p99 ms at that rate, {subs:,} subscribers ({mode})",
                    {n: _get(b, "p99_ms") for n, b in best.items()},
                    False if same_work else None,
                )
            )
            rows.append(
                (
                    f"publisher CPU at that rate, {subs:,} subscribers ({mode})",
                    {n: _percent(_get(b, "publisher_cpu")) for n, b in best.items()},
                    None,
                )
            )
            rows.append(
                (
                    f"what stopped the next step, {subs:,} subscribers ({mode})",
                    {n: _get(_first_failure(s), "bound") or "not reached" for n, s in runs.items()},
                    None,
                )
            )
    for key, field, label, higher in _SCENARIO_ROWS:
        if any(key in e for e in systems.values()):
            rows.append((label, {n: _scenario_value(e.get(key), field) for n, e in systems.items()}, higher))
    return rows


def _percent(share: float | None) -> str | None:
    return None if share is None else f"{share:.0%}"


def targets(results: dict[str, Any]) -> list[str]:
    """Issue 5's targets, each with the measured figures and whether it is met."""
    systems = results["systems"]
    herald = systems.get("herald")
    out: list[str] = []
    if herald is None:
        return out

    def best(name: str, subs: int) -> float | None:
        # Judged on the same work for every system: one event per request, closed loop.
        run = systems.get(name, {}).get("throughput", {}).get("closed", {}).get(str(subs))
        return _get(best_step(run["steps"]), "delivered_per_s") if run else None

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "**not met**")

    for subs in results["throughput_subscribers"]:
        h, n, s = best("herald", subs), best("nchan", subs), best("sse-starlette", subs)
        ok = None if h is None or n is None or s is None else h >= n and h >= 6 * s
        out.append(
            f"- delivered events/s, {subs:,} subscribers (one event per request, closed loop): at least nchan's "
            "and 6x sse-starlette's: "
            f"{_cell(h)} vs {_cell(n)} ({ratio(h, n)}) and {_cell(s)} ({ratio(h, s)}): {verdict(ok)}"
        )
    lat = {n: e.get("latency") for n, e in systems.items()}
    if lat.get("herald") and lat.get("nchan"):
        h, n = lat["herald"]["p99_ms"], lat["nchan"]["p99_ms"]
        caveats = [
            f" ({name} published only {step['published_per_s']:,.1f} of 20 events/s)"
            for name, step in (("herald", lat["herald"]), ("nchan", lat["nchan"]))
            if "published_per_s" in step and not kept_up(step)
        ]
        out.append(
            f"- p99 at 5,000 subscribers, 20 events/s, no worse than nchan: {h:,.1f} ms vs {n:,.1f} ms "
            f"({ratio(h, n, False)}){''.join(caveats)}: {verdict(h <= n)}"
        )
    many = herald.get("many_topics")
    if many is not None:
        ok = kept_up(many) and many["p99_ms"] < 50
        out.append(f"- 10,000 topics at 2,000 events/s, zero loss, p99 under 50 ms: lost {many['lost']}, "
                   f"p99 {many['p99_ms']:,.1f} ms: {verdict(ok)}")  # fmt: skip
    idle = herald.get("idle")
    if idle is not None:
        out.append(f"- at most 20 KB per idle connection: {idle['kb_per_connection']:,.1f} KB: "
                   f"{verdict(idle['kb_per_connection'] <= 20)}")  # fmt: skip
        out.append(
            f"- 5,000 connects within 1 s: {idle['connect_all_s']:,.2f} s: {verdict(idle['connect_all_s'] <= 1)}"
        )
    storm = herald.get("storm")
    if storm is not None:
        ok = storm["exact"] and storm["resume_all_s"] is not None and storm["resume_all_s"] <= 5
        out.append(
            f"- reconnect storm, all exactly resumed within 5 s: {_cell(storm['resume_all_s'])} s, "
            f"lost {storm['lost']}, duplicated {storm['duplicated']}, resets {storm['resets']}: {verdict(ok)}"
        )
    return out


def per_core_targets(results: dict[str, Any]) -> list[str]:
    """Issue 11's targets, per core against nchan in the same run: throughput, p99, connects, memory."""
    systems = results["systems"]
    herald, nchan = systems.get("herald"), systems.get("nchan")
    if herald is None or nchan is None:
        return []

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "**not met**")

    def best(entry: dict[str, Any], subs: int) -> float | None:
        run = entry.get("throughput", {}).get("closed", {}).get(str(subs))
        return _get(best_step(run["steps"]), "delivered_per_s") if run else None

    out = []
    for subs in results["throughput_subscribers"]:
        h, n = best(herald, subs), best(nchan, subs)
        ok = None if h is None or n is None else h >= n
        out.append(f"- single-event closed-loop throughput, {subs:,} subscribers, at least 1.0x nchan: "
                   f"{_cell(h)} vs {_cell(n)} ({ratio(h, n)}): {verdict(ok)}")  # fmt: skip
    hl, nl = herald.get("latency"), nchan.get("latency")
    if hl and nl:
        h, n = hl["p99_ms"], nl["p99_ms"]
        out.append(f"- p99 at 5,000 subscribers and 20 events/s at most nchan's: {h:,.1f} ms vs {n:,.1f} ms "
                   f"({ratio(h, n, False)}): {verdict(h <= n)}")  # fmt: skip
        hs, ns = hl.get("settled_p99_ms"), nl.get("settled_p99_ms")
        if hs is not None and ns is not None:
            # Shown beside the target's figure, not instead of it: the target is judged on the whole run.
            out.append(f"  - the same after the first second (fresh connections warmed up): {hs:,.1f} ms vs "
                       f"{ns:,.1f} ms ({ratio(hs, ns, False)})")  # fmt: skip
    hi, ni = herald.get("idle"), nchan.get("idle")
    if hi and ni:
        h, n = hi["connect_all_s"], ni["connect_all_s"]
        out.append(f"- 5,000 connects at once within 1.5x nchan's time: {h:,.2f} s vs {n:,.2f} s "
                   f"(limit {1.5 * n:,.2f} s): {verdict(h <= 1.5 * n)}")  # fmt: skip
        h, n = hi["kb_per_connection"], ni["kb_per_connection"]
        out.append(f"- memory per idle connection at most nchan's: {h:,.1f} KB vs {n:,.1f} KB: {verdict(h <= n)}")
    return out


def _ladders(runs: dict[str, Any], head: list[str], what: str, compare: str) -> list[str]:
    """A section of one throughput ladder per row (``what`` names the rows' key), and the 2-vs-1 ratio."""
    columns = "delivered events/s, zero loss | p99 ms | CPU at that step | what stopped the next step"
    lines = [*head, "", f"| {what} | {columns} |", "|---|---|---|---|---|"]
    figures = {}
    for key, run in runs.items():
        best = best_step(run["steps"])
        figures[key] = _get(best, "delivered_per_s")
        cpu = ", ".join(f"{k} {v:.0%}" for k, v in (_get(best, "server_cpu") or {}).items())
        failure = _first_failure(run["steps"])
        lines.append(f"| {key} | {_cell(figures[key])} | {_cell(_get(best, 'p99_ms'))} | {cpu or '-'} | "
                     f"{_get(failure, 'bound') or 'not reached'} |")  # fmt: skip
    return [*lines, "", f"{compare}: {ratio(figures.get('2'), figures.get('1'))}."]


def _cluster(results: dict[str, Any]) -> list[str]:
    cluster = results.get("cluster")
    if not cluster:
        return []
    head = ["", "## Multi-node: Redis + nodes + nginx", "",
            f"5,000 subscribers through nginx, rising rates; every process of the cluster on core {SERVER_CORE}.",
            "CPU is each component's share of a core while publishing, at the best step."]  # fmt: skip
    return _ladders(cluster, head, "nodes", "2 nodes vs 1")


def _cores(results: dict[str, Any]) -> list[str]:
    cores = results.get("cores")
    if not cores:
        return []
    head = ["", "## One node on 1 and on 2 cores (`HERALD_WORKERS`)", "",
            "The Redis broker; 1,000 subscribers, one event per request, closed loop, rising rates. With 2 workers",
            "the node's second worker shares core 1 with the load client (2 cores in all), so the 2-core figure is",
            "bounded by what the client leaves of that core: read \"what stopped the next step\"."]  # fmt: skip
    return _ladders(cores, head, "workers (cores)", "2 cores vs 1")


def _cost(cost: float | None) -> str:
    """A cost as a signed percentage: ``+4.0 %`` (worse with access control on), ``-1.2 %`` (better)."""
    return "-" if cost is None else f"{cost * 100:+.1f} %"


def auth_targets(results: dict[str, Any]) -> list[str]:
    """Issue 12's targets: 5,000 connects at once and the fan-out throughput with access control on, each
    within 10 % of access control off, measured side by side in the same run."""
    auth = results.get("auth")
    if not auth:
        return []
    judged = auth_verdicts(auth)
    connects, fanout = judged["connects"], judged["fanout"]
    limit = f"{AUTH_TOLERANCE * 100:g} %"

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    count, subs = auth["connects"]["connections"], auth["fanout"]["subscribers"]
    return [
        f"- {count:,} connects at once with access control on, at most {limit} slower than off: "
        f"{connects['on']:,.2f} s vs {connects['off']:,.2f} s ({_cost(connects['cost'])}): {verdict(connects['met'])}",
        f"- fan-out throughput to {subs:,} subscribers with access control on, at most {limit} lower than off: "
        f"{_cell(fanout['on'])} vs {_cell(fanout['off'])} deliveries/s ({_cost(fanout['cost'])}): "
        f"{verdict(fanout['met'])}",
    ]


def metrics_targets(results: dict[str, Any]) -> list[str]:
    """Issue 13's target: fan-out throughput with metrics on within 3 % of metrics off, side by side."""
    measured = results.get("metrics")
    if not measured:
        return []
    judged = metrics_verdict(measured)
    subs = measured["fanout"]["subscribers"]
    return [
        f"- fan-out throughput to {subs:,} subscribers with metrics on, at most {METRICS_TOLERANCE * 100:g} % lower"
        f" than off (best of {measured['repeats']} alternated runs each; medians {_cell(judged['on_median'])} vs"
        f" {_cell(judged['off_median'])}): {_cell(judged['on'])} vs {_cell(judged['off'])} deliveries/s"
        f" ({_cost(judged['cost'])}): {'met' if judged['met'] else '**not met**'}",
    ]


def _auth(results: dict[str, Any]) -> list[str]:
    auth = results.get("auth")
    if not auth:
        return []
    judged = auth_verdicts(auth)
    connects, fanout = judged["connects"], judged["fanout"]
    tolerance = f"{AUTH_TOLERANCE * 100:g} %"
    head = [
        "",
        "## Access control: on vs off",
        "",
        "One node (embedded broker) with access control off, and with it on (`HERALD_JWT_SECRET` set), measured",
        f"alternately in this run (A-B B-A), {auth['repeats']} time(s) each. With it on, every subscriber carries the",
        "same token (as a deployment with a few tokens: the node verifies each once and keeps it) and the publisher",
        "its own. Fan-out throughput: one event per request in a closed loop, asked far more than the node can do,",
        "so it publishes as fast as the node answers. Other programs on this machine only ever slow a run down:",
        "each side's figure is its best run (medians beside). Cost: how much slower (connects) or lower",
        f"(deliveries) with access control on; negative, better. The target: at most {tolerance} of cost, every",
        "connect opened and, for fan-out, no event lost in any run.",
        "",
        f"| figure | access control off | on | cost | within {tolerance} | medians, off / on |",
        "|---|---|---|---|---|---|",
    ]
    rows = [
        (
            f"seconds for {auth['connects']['connections']:,} connects at once",
            [f"{connects[k]:,.2f}" for k in ("off", "on", "off_median", "on_median")],
            connects,
        ),
        (
            f"delivered events/s, {auth['fanout']['subscribers']:,} subscribers, at saturation (closed loop)",
            [_cell(round(fanout[k])) for k in ("off", "on", "off_median", "on_median")],
            fanout,
        ),
    ]
    lines = [*head]
    for label, (off, on, off_median, on_median), verdict in rows:
        lines.append(f"| {label} | {off} | {on} | {_cost(verdict['cost'])} | {'yes' if verdict['met'] else 'no'} "
                     f"| {off_median} / {on_median} |")  # fmt: skip
    p99 = {k: statistics.median(r["p99_ms"] for r in auth["fanout"][k]) for k in ("off", "on")}
    lines += [
        "",
        f"p99 at saturation (median of the runs): {p99['off']:,.1f} ms off, {p99['on']:,.1f} ms on. Fan-out runs "
        f"the node bounded (its core saturated by the node): {fanout['server_bound']}; a run it did not bound (other "
        "programs on the client's core or on its own) was tried again, up to 3 runs, the last one counting.",
    ]
    return lines


def mercure_section(results: dict[str, Any]) -> list[str]:
    """The Mercure hub vs Herald's native API: fan-out deliveries/s of each (medians), their ratio (the
    median of the rounds'), idle memory per connection, and every run."""
    measured = results.get("mercure")
    if not measured:
        return []
    figures = mercure_figures(measured)
    fanout, idle_runs = measured["fanout"], measured.get("idle") or {}
    subs = fanout["subscribers"]
    ratio_text = "-" if figures["ratio_median"] is None else f"{figures['ratio_median']:.2f}x"
    lines = [
        "",
        "## Mercure hub vs native API",
        "",
        "The same node (embedded broker, access control on: the hub takes no publish without a token) driven",
        "through its Mercure hub (`GET /.well-known/mercure?match=`, `POST /.well-known/mercure`, a form) and",
        "through Herald's own API (`GET /events?topic=`, `POST /publish`), each with tokens of its own kind:",
        f"{subs:,} subscribers on one topic, one event per request in a closed loop, asked far more than the node",
        f"can do, so it publishes as fast as the node answers; {measured['repeats']} round(s), the two sides",
        "alternated (A-B B-A). Figures are medians of the runs; the ratio is the median of the rounds' ratios",
        "(Mercure / native, each round's two runs side by side): 1.00x is parity, below it Mercure delivers less.",
        "",
        "| figure | native | Mercure | Mercure / native |",
        "|---|---|---|---|",
        f"| delivered events/s, {subs:,} subscribers, at saturation (closed loop), median | "
        f"{_cell(_round(figures['native_median']))} | {_cell(_round(figures['mercure_median']))} | {ratio_text} |",
        f"| best run | {_cell(_round(figures['native_best']))} | {_cell(_round(figures['mercure_best']))} | "
        f"{ratio(figures['mercure_best'], figures['native_best'])} |",
    ]
    kb = figures["kb_per_connection"]
    if idle_runs:
        count = idle_runs["connections"]
        connects = {
            k: statistics.median(r["connect_all_s"] for r in idle_runs[k]) if idle_runs.get(k) else None
            for k in ("native", "mercure")
        }
        lines += [
            f"| KB per idle connection ({count:,}), median | {_cell(kb['native'])} | {_cell(kb['mercure'])} | "
            f"{ratio(kb['mercure'], kb['native'])} |",
            f"| seconds for {count:,} connects at once, median | {_seconds(connects['native'])} | "
            f"{_seconds(connects['mercure'])} | {ratio(connects['mercure'], connects['native'])} |",
        ]
    p99 = {k: statistics.median(r["p99_ms"] for r in fanout[k]) if fanout[k] else None for k in ("native", "mercure")}
    lines += [
        "",
        f"Rounds' ratios: {', '.join(f'{r:.2f}x' for r in figures['ratios']) or '-'}. p99 at saturation (median of "
        f"the runs): {_cell(p99['native'])} ms native, {_cell(p99['mercure'])} ms Mercure. Every accepted event "
        f"delivered exactly once in every run: {'yes' if figures['no_loss'] else '**no**'}. Fan-out runs the node "
        f"bounded (its core saturated by the node): {figures['server_bound']}.",
        "",
        *[f"- {protocol}, fan-out at saturation: {json.dumps(run)}" for protocol in ("native", "mercure")
          for run in fanout[protocol]],
        *[f"- {protocol}, idle connections: {json.dumps(run)}" for protocol in ("native", "mercure")
          for run in idle_runs.get(protocol, [])],
    ]  # fmt: skip
    return lines


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _round(value: float | None) -> int | None:
    return None if value is None else round(value)


def partitions_section(results: dict[str, Any]) -> list[str]:
    measured = results.get("partitions")
    return (
        ["", "## A Redis Cluster, and topics over partitions (issue 23)", "", *partitions.section(measured)]
        if measured
        else []
    )


def redis_cost_section(results: dict[str, Any]) -> list[str]:
    measured = results.get("redis_cost")
    return ["", "## Redis CPU per published event (issue 23)", "", *redis_cost.section(measured)] if measured else []


def render(results: dict[str, Any]) -> str:
    systems = results["systems"]
    names = list(systems)
    peers = [n for n in names if not n.startswith("herald")]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` on {results['date']}: {results['machine']}.",
        f"Each server pinned to core {SERVER_CORE}; the load client on core {CLIENT_CORE}: the load tool with its",
        "compiled subscriber worker (`--client native`) and its compiled publisher (`--publisher native`,",
        "`workers/loadtest/csrc/sse_publisher.c`). 100-byte events.",
        "",
        "Every system gets the same work in the headline rows: **one event per publish request**, either in a",
        "**closed loop** (one request in flight, the next sent when the answer is in, as a notification service",
        f"publishes) or **pipelined** ({PIPELINE} requests in flight on the publisher's keep-alive connection).",
        f"Herald's batch API ({BATCH} events per request, a JSON array) has rows of its own, labelled as batches,",
        "with no ratio: the peers take one event per request. Each row says which publishing mode it used.",
        "",
        "The publisher is never a system's figure: every step shows the publisher's CPU, and a step whose",
        "publisher used 90 % of a core, or that published below the asked rate while the server core had time",
        'to spare, fails as "publisher-bound"; the figure stays the last step before it. Ratios are',
        "Herald (embedded broker) / peer: above 1.00x Herald is better. `herald-redis` is the same node on the",
        'Redis broker (Redis on the client\'s core), measured closed loop only. "What stopped the next step"',
        "names what was saturated (90 % of a core or more) on the first step that lost events, fell behind, or",
        'was publisher-bound ("publishing" alone: the server core was busy and answered too slowly to keep',
        "the asked rate).",
        "",
    ]
    if names:
        header = "| figure | " + " | ".join(names) + " | " + " | ".join(f"herald vs {p}" for p in peers) + " |"
        lines += [header, "|" + "---|" * (1 + len(names) + len(peers))]
        for label, values, higher in _figures(results):
            cells = [_cell(values.get(n)) for n in names]
            ratios = [ratio(values.get("herald"), values.get(p), higher) if higher is not None else "" for p in peers]
            lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    goals = targets(results)
    if goals:
        lines += ["", "## Targets (issue 5)", "", *goals]
    per_core = per_core_targets(results)
    if per_core:
        lines += ["", "## Targets (issue 11: per core, against nchan in the same run)", "", *per_core]
    auth = auth_targets(results)
    if auth:
        lines += ["", "## Targets (issue 12: access control, on vs off in the same run)", "", *auth]
    lines += _cluster(results)
    lines += _cores(results)
    metrics = metrics_targets(results)
    if metrics:
        lines += ["", "## Targets (issue 13: metrics, on vs off in the same run)", "", *metrics]
    lines += _auth(results)
    lines += mercure_section(results)
    lines += redis_cost_section(results)
    lines += partitions_section(results)
    lines += ["", "## Steps", "", "Every step of every run (rate = events/s published):", ""]
    for n in names:
        for mode, runs in systems[n]["throughput"].items():
            for subs, run in runs.items():
                lines += [f"- {n}, {subs} subscribers, {mode}: {json.dumps(step)}" for step in run["steps"]]
        for key in ("latency", "many_topics", "idle", "storm"):
            if key in systems[n]:
                lines.append(f"- {n}, {key}: {json.dumps(systems[n][key])}")
    for nodes, run in (results.get("cluster") or {}).items():
        lines += [f"- cluster of {nodes} node(s), 5000 subscribers: {json.dumps(step)}" for step in run["steps"]]
    auth_runs = results.get("auth") or {}
    for figure in ("connects", "fanout"):
        for key in ("off", "on"):
            what = "connects at once" if figure == "connects" else "fan-out at saturation"
            lines += [
                f"- access control {key}, {what}: {json.dumps(run)}" for run in auth_runs.get(figure, {}).get(key, [])
            ]
    return "\n".join(lines) + "\n"
