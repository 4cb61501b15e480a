"""Adding up what the workers and the publisher measured: the live line, the result, the summary table.

The result is one JSON document (``--json``), described by
``result.schema.json`` beside this module; the summary table and the HTML
report are both drawn from it.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from workers.loadtest.config import AUTH_SOURCES, LoadConfig
from workers.loadtest.faults import LASTING, Fault
from workers.loadtest.histogram import Histogram
from workers.loadtest.publisher import Ledger
from workers.loadtest.server_counts import Context, Scrapes, section, summary_lines, tool_counts

SCHEMA_PATH = Path(__file__).with_name("result.schema.json")
SCHEMA_ID = "herald-loadtest/1"
WARM_UP_SECONDS = 1
"""Seconds of publishing the settled latencies leave out (:meth:`Aggregate.settled`)."""
SATURATED_CPU = 0.9
"""A process above this share of a core is saturated: the latencies it measures include its own delay."""


class Aggregate:
    """Running totals from the workers' progress messages, and their final results."""

    def __init__(self, workers: int) -> None:
        self.latency = Histogram()  # everything so far, for the live p99
        self.timeline: dict[int, dict[str, Histogram]] = defaultdict(lambda: defaultdict(Histogram))
        self.live: list[dict[str, Any]] = [{} for _ in range(workers)]
        self.cpu_samples: list[list[float]] = [[] for _ in range(workers)]
        self.results: list[dict[str, Any]] = []

    def add_buckets(self, buckets: list[list[Any]]) -> None:
        for node, sec, data in buckets:
            histogram = Histogram.from_json(data)
            self.latency.merge(histogram)
            self.timeline[int(sec)][node].merge(histogram)

    def settled(self) -> Histogram:
        """The latencies from the timeline's second :data:`WARM_UP_SECONDS` on (see ``latency_settled_ms``).

        In the first second of publishing every connection is fresh, and
        each write to one costs the server more (5,000 subscribers on
        loopback: about 11 us a write for the first few events, then 8, for
        Herald and nchan alike; Linux acknowledging the first segments of a
        fresh or idle connection at once, on the sender's core, is the likely
        cause). The whole run's p99 is then mostly that second's tail; this
        is the run after it.
        """
        settled = Histogram()
        for sec, per_node in self.timeline.items():
            if sec >= WARM_UP_SECONDS:
                for histogram in per_node.values():
                    settled.merge(histogram)
        return settled

    def by_node(self) -> dict[str, Histogram]:
        """Each node's latencies over the whole run, from the per-second buckets."""
        nodes: dict[str, Histogram] = defaultdict(Histogram)
        for per_node in self.timeline.values():
            for node, histogram in per_node.items():
                nodes[node].merge(histogram)
        return nodes

    def on_message(self, worker: int, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind in ("ready", "progress"):
            self.live[worker] = message
            if kind == "progress":
                self.add_buckets(message["buckets"])
                self.cpu_samples[worker].append(message["cpu"])
        elif kind == "result":
            self.add_buckets(message["buckets"])
            self.results.append(message)

    def total(self, key: str) -> int:
        return sum(int(m.get(key, 0)) for m in self.live)


def progress_line(elapsed: float, ledger: Ledger, aggregate: Aggregate, last: dict[str, float]) -> str:
    """One line of the live display: rates since the previous line, totals, p99 so far, errors."""
    delivered = aggregate.latency.count
    accepted = ledger.accepted
    span = max(elapsed - last.get("t", 0.0), 1e-6)
    deliver_rate = (delivered - last.get("delivered", 0)) / span
    publish_rate = (accepted - last.get("accepted", 0)) / span
    last.update(t=elapsed, delivered=delivered, accepted=accepted)
    cpu = [samples[-1] for samples in aggregate.cpu_samples if samples]
    errors = sum(ledger.errors.values())
    return (
        f"[{elapsed:6.1f}s] publish {publish_rate:8,.0f}/s ({accepted:,} ok, {errors:,} err)"
        f" | deliver {deliver_rate:10,.0f}/s ({delivered:,})"
        f" | p99 {aggregate.latency.percentile(99) / 1000:7.1f} ms"
        f" | open {aggregate.total('connected'):,} reconnects {aggregate.total('reconnects'):,}"
        f" resets {aggregate.total('resets'):,}"
        f" | cpu {' '.join(f'{c:.0%}' for c in cpu) or '-'}"
    )


def _cpu_summary(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"mean": 0.0, "max": 0.0}
    return {"mean": round(sum(samples) / len(samples), 3), "max": round(max(samples), 3)}


def build(
    config: LoadConfig,
    ledger: Ledger,
    aggregate: Aggregate,
    faults: list[Fault],
    *,
    started_at: str,
    t0_ns: int,
    publish_seconds: float,
    publisher_cpu: list[float],
    machine_cpu: list[float],
    open_files: tuple[int, int],
    scrapes: Scrapes | None = None,
    warmed: int = 0,
) -> dict[str, Any]:
    """The whole result, as written by ``--json``.

    ``scrapes`` are the nodes' ``/metrics`` before and after the run (its
    ``server`` section; none when not given), ``warmed`` the events the
    publisher's warm-up had accepted (the nodes count them as published).
    """
    subscribers = sorted((s for r in aggregate.results for s in r["subscribers"]), key=lambda s: s["index"])
    counted = [s for s in subscribers if not s["late"]]
    lost = sum(s["lost"] for s in counted)
    duplicated = sum(s["duplicated"] for s in subscribers)
    out_of_order = sum(s["out_of_order"] for s in subscribers)
    expected = sum(s["expected"] for s in counted)
    delivered = sum(s["delivered"] for s in subscribers)
    never = sum(1 for s in subscribers if not s["connected"])
    late = sum(1 for s in subscribers if s["connected"] and s["late"])
    last_delivery_ns = max((r["last_delivery_ns"] for r in aggregate.results), default=0)
    delivery_seconds = max((last_delivery_ns - t0_ns) / 1e9, publish_seconds, 1e-6)

    connect_time = Histogram()
    connects: Counter[str] = Counter()
    connect_errors: Counter[str] = Counter()
    drops: Counter[str] = Counter()
    reset_reasons: Counter[str] = Counter()
    told_to_retry = 0
    lag = Histogram()
    for r in aggregate.results:
        connect_time.merge(Histogram.from_json(r["connect_time"]))
        lag.merge(Histogram.from_json(r["lag"]))
        connects.update({node: n for node, n in r["connects"].items() if n > 0})
        connect_errors.update(r["connect_errors"])
        drops.update(r["drops"])
        reset_reasons.update(r["reset_reasons"])
        told_to_retry += int(r.get("told_to_retry", 0))

    nodes = [
        {
            "node": node,
            "connects": connects.get(node, 0),
            "subscribers_at_end": sum(1 for s in subscribers if s["node"] == node),
            "deliveries": histogram.count,
            "latency_ms": histogram.summary_ms(),
        }
        for node, histogram in sorted(aggregate.by_node().items())
        # Not a node that only said "retry later" (the proxy, while every node was down).
        if connects.get(node, 0) or histogram.count
    ]
    seconds = sorted(set(aggregate.timeline) | set(ledger.accepted_at) | set(ledger.errors_at))
    timeline = []
    for sec in seconds:
        per_node = aggregate.timeline.get(sec, {})
        merged = Histogram()
        for histogram in per_node.values():
            merged.merge(histogram)
        timeline.append(
            {
                "t": sec,
                "published": ledger.accepted_at.get(sec, 0),
                "publish_errors": ledger.errors_at.get(sec, 0),
                "delivered": merged.count,
                "p50_ms": merged.percentile(50) / 1000,
                "p99_ms": merged.percentile(99) / 1000,
                "max_ms": merged.max / 1000,
                "by_node": {node: h.count for node, h in sorted(per_node.items())},
            }
        )

    worker_cpu = [_cpu_summary(samples) for samples in aggregate.cpu_samples]
    publisher = _cpu_summary(publisher_cpu)
    warnings = []
    for i, cpu in enumerate(worker_cpu):
        if cpu["max"] >= SATURATED_CPU:
            warnings.append(
                f"subscriber worker {i} reached {cpu['max']:.0%} of a core: latencies include the tool's own "
                "delay; run again with more --procs"
            )
    if publisher["max"] >= SATURATED_CPU:
        warnings.append(f"the publisher reached {publisher['max']:.0%} of a core: the publish rate is the tool's limit")
    achieved = ledger.accepted / max(publish_seconds, 1e-6)
    if ledger.accepted + ledger.refused + ledger.uncertain < 0.95 * config.rate * config.duration:
        warnings.append(
            f"published {achieved:,.0f} events/s of the {config.rate:,.0f} asked: "
            "the target (or the publisher) could not keep up"
        )
    machine = _cpu_summary(machine_cpu)
    if machine["mean"] >= SATURATED_CPU:
        warnings.append(
            f"this machine's CPUs were {machine['mean']:.0%} busy on average while publishing: the servers and the "
            "tool competed for cores, so these figures are this machine's, not the servers' alone"
        )
    if lag.percentile(99) > 50_000:
        warnings.append(
            f"the subscriber event loops woke up to {lag.percentile(99) / 1000:.0f} ms late (p99): latencies "
            "include the tool's own delay (more --procs helps only where cores are free)"
        )
    if any(r["fd_exhausted"] for r in aggregate.results):
        warnings.append(
            f"ran out of file descriptors (open-files limit {open_files[0]}, hard limit {open_files[1]}): "
            "raise it (ulimit -n) or spread subscribers with --procs"
        )

    fault_reports = fault_reports_of(faults, subscribers, ledger, t0_ns, timeline)
    reasons = [f"fault {f.kind} was not carried out: {f.error}" for f in faults if f.error]
    if lost:
        reasons.append(f"{lost:,} accepted events lost")
    if duplicated:
        reasons.append(f"{duplicated:,} events delivered twice")
    if out_of_order:
        reasons.append(f"{out_of_order:,} events out of order")
    if never:
        reasons.append(f"{never:,} subscribers never connected")
    if late:
        reasons.append(f"{late:,} subscribers connected only after publishing started")
    if ledger.accepted == 0:
        reasons.append("no event was accepted")

    server = None
    if scrapes is not None:
        mine = tool_counts(
            subscribers,
            aggregate.results,
            published=ledger.accepted + warmed if config.publish == "http" else None,
            nodes=connects,
        )
        context = Context(
            shared=config.nodes_shared,
            faults=bool(faults),
            streams_cut=sum(drops.values()),
            told_to_retry=told_to_retry,
            connect_errors=sum(connect_errors.values()),
            publish_retries=sum(ledger.errors.values()) + ledger.uncertain,
        )
        server = section(scrapes, mine, context)

    return {
        "schema": SCHEMA_ID,
        "started_at": started_at,
        "config": config.to_json(),
        "verdict": {"pass": not reasons, "reasons": reasons},
        "publish": {
            "attempted": sum(ledger.last().values()),
            "accepted": ledger.accepted,
            "refused": ledger.refused,
            "uncertain": ledger.uncertain,
            "requests": ledger.requests,
            "started_ns": t0_ns,
            "seconds": round(publish_seconds, 3),
            "rate": round(achieved, 1),
            "errors": dict(sorted(ledger.errors.items())),
            "latency_ms": ledger.latency.summary_ms(),
        },
        "delivery": {
            "expected": expected,
            "delivered": delivered,
            "lost": lost,
            "duplicated": duplicated,
            "out_of_order": out_of_order,
            "unexpected_topic": sum(s["unknown"] for s in subscribers),
            "subscribers_with_loss": sum(1 for s in counted if s["lost"]),
            "seconds": round(delivery_seconds, 3),
            "per_second": round(delivered / delivery_seconds, 1),
        },
        "latency_ms": aggregate.latency.summary_ms(),
        "latency_settled_ms": aggregate.settled().summary_ms(),
        "latency_cdf": [[v / 1000, round(f, 6)] for v, f in aggregate.latency.cumulative()],
        "connections": {
            "subscribers": config.subscribers,
            "connected": sum(1 for s in subscribers if s["connected"]),
            "never_connected": never,
            "late": late,
            "connects": sum(connects.values()),
            "reconnects": sum(s["reconnects"] for s in subscribers),
            "resets": dict(sorted(reset_reasons.items())),
            "errors": dict(sorted(connect_errors.items())),
            "told_to_retry": told_to_retry,
            "dropped": dict(sorted(drops.items())),
            "connect_ms": connect_time.summary_ms(),
        },
        "nodes": nodes,
        "timeline": timeline,
        "faults": fault_reports,
        "tool": {
            "procs": config.procs,
            "publisher_cpu": publisher,
            "machine_cpu_busy": machine,
            "worker_cpu": worker_cpu,
            "loop_lag_ms": lag.summary_ms(),
            "open_files": {"soft": open_files[0], "hard": open_files[1]},
            "warnings": warnings,
        },
        "subscribers": [{k: v for k, v in s.items() if k not in ("gaps", "down_at")} for s in subscribers],
        **({} if server is None else {"server": server}),
    }


SLACK_S = 0.5
"""A disconnection up to this long before a fault's recorded start is its doing (the signal is sent first)."""


def fault_reports_of(
    faults: list[Fault],
    subscribers: list[dict[str, Any]],
    ledger: Ledger,
    t0_ns: int,
    timeline: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Each fault's report, each kept to its own window: from its start to the next fault's start.

    A disconnection, a failed publish request, a publish's wait and a
    delivery's delay count for the latest fault started before them, never
    for an earlier one too (see :func:`fault_report`).
    """
    starts = [f.began if f.began is not None else f.at for f in faults]
    reports = []
    for index, fault in enumerate(faults):
        until = min((s for s in starts if s > starts[index]), default=float("inf"))  # in any order
        reports.append(fault_report(fault, subscribers, ledger, t0_ns, until, timeline))
    return reports


def fault_report(
    fault: Fault,
    subscribers: list[dict[str, Any]],
    ledger: Ledger,
    t0_ns: int,
    until: float = float("inf"),
    timeline: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What ``fault`` did to the run: the subscribers it cut off, and when they (and publishing) were back.

    Its window runs from its start to ``until`` (the next fault's start, in
    seconds since publishing started). A disconnection is the fault's when
    it began from ``SLACK_S`` before the fault's start to ``SLACK_S`` before
    ``until``; a failed publish request, and a publish settled (its wait),
    when they happened in the window; "publishing back" is the time from
    the fault's start to the first accepted request after the window's last
    failed one. "All back" is the time from the fault's start until the last
    of its subscribers was streaming again, and for a fault that lasts (a
    rolling restart, every node down) at least until its last step: ``None``
    while any is still down at the end. The worst delivery delay is the
    longest publish-to-delivery latency of an event delivered in a second of
    the ``timeline`` (the result's) that overlaps the window.
    """
    at = fault.began if fault.began is not None else fault.at
    zero = t0_ns / 1e9
    start, stop = zero + at - SLACK_S, zero + until - SLACK_S
    cut: set[int] = set()
    downs: list[tuple[float, float]] = []
    not_back = 0
    for s in subscribers:
        for a, b in s["gaps"]:
            if start <= a < stop:
                downs.append((a, b))
                cut.add(s["index"])
        if s["down_at"] and start <= s["down_at"] < stop:
            not_back += 1
            cut.add(s["index"])
    failures = [t for t, ok in ledger.outcomes if not ok and at <= t < until]
    longest_wait = max((waited for t, waited in ledger.waits if at <= t < until), default=0.0)
    worst_delay = max((row["max_ms"] for row in timeline or [] if at < row["t"] + 1 and row["t"] < until), default=0.0)
    publish_back = None
    if failures:
        later = [t for t, ok in ledger.outcomes if ok and t > failures[-1]]
        publish_back = round(later[0] - at, 3) if later else None
    ended = fault.ended
    back_after: float | None = None
    if not not_back and (downs or fault.kind in LASTING) and ended is not None:
        last_back = max((b - zero for _, b in downs), default=at)
        back_after = round(max(last_back, ended if fault.kind in LASTING else at) - at, 3)
    return {
        "kind": fault.kind,
        "at_s": round(at, 3),
        "ended_s": ended,
        "steps": [{"what": what, "at_s": t} for what, t in fault.done],
        "error": fault.error,
        "subscribers_disconnected": len(cut),
        "disconnections": len(downs) + not_back,
        "subscribers_not_back": not_back,
        "subscribers_back_after_s": back_after,
        "publish_errors": len(failures),
        "publishing_back_after_s": publish_back if failures else 0.0,
        "longest_publish_wait_s": round(longest_wait, 3),
        "worst_delay_ms": worst_delay,
    }


def _ms(value: float) -> str:
    return f"{value:,.1f}"


def counts_text(counts: dict[str, int]) -> str:
    """``{"connection refused": 12, "502 from the proxy": 3}`` as "connection refused 12, 502 from the proxy 3"."""
    return ", ".join(f"{name} {n:,}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def fault_lines(fault: dict[str, Any]) -> tuple[str, str]:
    """A fault's two lines in the summary (and the report): what was done when, and what it did to the run."""
    steps = ", ".join(f"{s['what']} at {s['at_s']:.1f} s" for s in fault["steps"])
    back = fault["subscribers_back_after_s"]
    if fault["subscribers_not_back"]:
        back_text = f"{fault['subscribers_not_back']:,} not back at the end"
    else:
        back_text = f"all back after {back} s" if back is not None else "nobody to be back"
    done = f"{fault['kind']} at {fault['at_s']:.1f} s: {steps or 'nothing done'}"
    if fault["error"]:
        done += f"; FAILED: {fault['error']}"
    effect = (
        f"{fault['subscribers_disconnected']:,} subscribers cut off ({fault['disconnections']:,} times), {back_text}; "
        f"{fault['publish_errors']:,} publish errors, publishing back after {fault['publishing_back_after_s']} s"
    )
    if "worst_delay_ms" in fault:  # results written before these figures have none
        effect += (
            f"; worst delivery delay {fault['worst_delay_ms'] / 1000:.1f} s, "
            f"longest publish wait {fault['longest_publish_wait_s']:.1f} s"
        )
    return done, effect


def auth_text(config: dict[str, Any]) -> str:
    """``; <where the access token came from>`` for a run that had one, else nothing (never the token)."""
    auth = config.get("auth", "none")
    return "" if auth == "none" else f"; {AUTH_SOURCES.get(auth, auth)}"


def protocol_text(config: dict[str, Any]) -> str:
    """How the summary names a run's protocol: nothing for Herald's native API (older results have none)."""
    return "   protocol mercure (/.well-known/mercure)" if config.get("protocol") == "mercure" else ""


def summary_table(result: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    c, p, d = result["config"], result["publish"], result["delivery"]
    lat, conn = result["latency_ms"], result["connections"]
    topics = c["topics"]
    lines = [
        f"Herald load test {result['started_at']}  run {c['run_id']}",
        f"  target        {', '.join(c['targets'])}   publish via {c['publish']}{protocol_text(c)}{auth_text(c)}",
        f"  load          {c['subscribers']:,} subscribers, {topics:,} topic(s), {c['per_conn']} per connection, "
        f"{c['rate']:,.0f} events/s for {c['duration']:g} s, {c['payload']} B payload",
        "",
        f"  published     {p['accepted']:,} accepted ({p['rate']:,.0f}/s), {p['refused']:,} refused, "
        f"{p['uncertain']:,} uncertain, {p['requests']:,} requests, errors {p['errors'] or 'none'}",
        f"  publish time  p50 {_ms(p['latency_ms']['p50'])} ms  p99 {_ms(p['latency_ms']['p99'])} ms",
        f"  delivered     {d['delivered']:,} of {d['expected']:,} expected, {d['per_second']:,.0f} events/s",
        f"  lost          {d['lost']:,}   duplicated {d['duplicated']:,}   out of order {d['out_of_order']:,}"
        f"   (subscribers with loss: {d['subscribers_with_loss']:,})",
        "",
        "  latency ms    p50      p90      p99      p99.9    max",
        f"  publish->deliver {lat['p50']:<8.1f} {lat['p90']:<8.1f} {lat['p99']:<8.1f} {lat['p99_9']:<8.1f} "
        f"{lat['max']:.1f}",
        f"  connect      {conn['connect_ms']['p50']:<8.1f} {conn['connect_ms']['p90']:<8.1f} "
        f"{conn['connect_ms']['p99']:<8.1f} {conn['connect_ms']['p99_9']:<8.1f} {conn['connect_ms']['max']:.1f}",
        "",
        f"  connections   {conn['connected']:,}/{conn['subscribers']:,} connected, {conn['reconnects']:,} reconnects, "
        f"resets {counts_text(conn['resets'])}",
        f"  not streamed  {counts_text(conn['errors'])}; told to retry {conn['told_to_retry']:,}",
        f"  streams ended {counts_text(conn['dropped'])}",
        "",
        "  node            connects  at end   deliveries   p50 ms   p99 ms   max ms",
    ]
    for node in result["nodes"]:
        nl = node["latency_ms"]
        lines.append(
            f"  {node['node']:<15} {node['connects']:>8,} {node['subscribers_at_end']:>7,} {node['deliveries']:>12,}"
            f" {nl['p50']:>8.1f} {nl['p99']:>8.1f} {nl['max']:>8.1f}"
        )
    for fault in result["faults"]:
        done, effect = fault_lines(fault)
        lines += ["", f"  fault         {done}", f"                {effect}"]
    tool = result["tool"]
    cpu = ", ".join(f"{w['max']:.0%}" for w in tool["worker_cpu"])
    lines += [
        "",
        f"  tool          {tool['procs']} worker(s), peak cpu {cpu}; publisher {tool['publisher_cpu']['max']:.0%}; "
        f"loop lag p99 {tool['loop_lag_ms']['p99']:.1f} ms; machine CPUs {tool['machine_cpu_busy']['mean']:.0%} busy",
    ]
    lines += [f"  WARNING       {w}" for w in tool["warnings"]]
    server = summary_lines(result.get("server"))
    if server:
        lines += ["", *server]
    verdict = result["verdict"]
    lines += ["", "  PASS: no accepted event lost" if verdict["pass"] else f"  FAIL: {'; '.join(verdict['reasons'])}"]
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=1) + "\n")
