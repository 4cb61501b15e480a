"""The nodes' own counts beside the tool's: ``GET /metrics`` of every node before and after a run.

Before the subscribers connect, the tool reads each node's Prometheus text
(:func:`scrape_all`); after the last worker has reported, and once the
nodes have let go of the run's streams, it reads them again. The counters'
deltas, summed over the nodes, are the server's account of the run; the
tool's own account comes from its subscribers and its publisher. The two
are put side by side (:func:`section`), and where they disagree the
section says so:

================  ===========================================  ==========================================
row               the nodes (sum of deltas)                    the tool
================  ===========================================  ==========================================
deliveries        ``herald_deliveries_total``                  events read by subscribers (resets aside)
bytes             ``herald_bytes_sent_total``                  stream body bytes read (after de-chunking)
cut-offs          ``herald_slow_client_cutoffs_total``         open streams ended by the other side
                  (+ ``herald_expired_streams_total``)
resets            ``herald_resets_total`` (every reason)       ``reset`` events read
published         ``herald_events_published_total``            events answered 201 (warm-ups included)
streams opened    ``herald_connects_total{outcome="accepted"}``  200 event streams (not "retry later")
                  (+ ``outcome="waited"``)
================  ===========================================  ==========================================

How strict the comparison is depends on what else could have moved the
counters (:func:`rules_for`):

* **exact**: the nodes had no open stream before the run (no other
  subscriber), ``--nodes-shared`` was not given, and the run was
  undisturbed (no fault, no stream cut, no reconnect, no publish retry).
  Every row must then be equal; bytes may differ by one heartbeat per
  stream (the tool stops reading while a heartbeat can be on its way).
* **at least**: another client may have used the nodes, or a stream was cut
  (what was written to it may never have been read), or a publish was
  retried (an answer lost after the node took the events). The nodes'
  counts must then be at least the tool's; cut-offs are not compared when
  faults cut streams themselves.

The counts are *unavailable* (and the run goes on, its verdict untouched)
when a node cannot be read (metrics off: 404; access control on without an
admin token: 401/403; no answer; an older node), when a node restarted
during the run (its counters started over), or when the run's streams came
from a node that was not read (a proxy in front of several nodes: give
them with ``--metrics-from``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from workers.loadtest.config import LoadConfig
from workers.loadtest.wire import SILENT

SCRAPE_TIMEOUT = 5.0
"""Seconds one ``GET /metrics`` may take."""
SETTLE_TIMEOUT = 10.0
"""Seconds, after the run, for the nodes to let go of its streams before they are read anyway."""
SETTLE_POLL = 0.1
HEARTBEAT_BYTES = 3
"""A heartbeat on the wire (``:\\n\\n``): what a node may have written that the tool stopped reading."""

ROWS: dict[str, str] = {
    "deliveries": "deliveries",
    "bytes": "bytes",
    "cutoffs": "cut-offs",
    "resets": "resets",
    "published": "published",
    "streams_opened": "streams opened",
}
"""The rows of the comparison, in order: key and label."""

SERVER_SOURCES: dict[str, str] = {
    "deliveries": "herald_deliveries_total",
    "bytes": "herald_bytes_sent_total",
    "cutoffs": "herald_slow_client_cutoffs_total + herald_expired_streams_total",
    "resets": "herald_resets_total (all reasons)",
    "published": "herald_events_published_total",
    "streams_opened": 'herald_connects_total{outcome="accepted"|"waited"}',
}
TOOL_SOURCES: dict[str, str] = {
    "deliveries": "events read by the subscribers (duplicates included, resets not)",
    "bytes": "event-stream bytes read by the subscribers",
    "cutoffs": "open streams ended by the other side",
    "resets": "reset events read",
    "published": "events answered 201 (warm-ups included)",
    "streams_opened": "event streams opened (200, not 'retry later')",
}

Key = tuple[str, str]
"""A counter sample: (sample name, its label value or "")."""


@dataclass(frozen=True)
class Sample:
    """One node's ``/metrics`` at one moment: who answered, and its counters."""

    node_id: str | None
    version: str | None
    started: float | None  # process_start_time_seconds: a restart changes it
    connections: float  # herald_connections: open streams
    counters: dict[Key, float]

    def total(self, name: str, *labels: str) -> float:
        """A counter's value: one label value, several summed, or (none given) every label value summed."""
        if labels:
            return sum(self.counters.get((name, label), 0.0) for label in labels)
        return sum(value for (sample, _), value in self.counters.items() if sample == name)


def parse(text: str) -> Sample:
    """A node's Prometheus text, read with prometheus_client's parser.

    Raises ValueError for text that is not Prometheus exposition, or has no
    ``herald_`` metric (not a Herald node).
    """
    node_id = version = None
    started: float | None = None
    connections = 0.0
    counters: dict[Key, float] = {}
    herald = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name.startswith("herald_"):
                herald = True
            if name == "herald_node_info":
                node_id, version = labels.get("node_id"), labels.get("version")
            elif name == "herald_connections":
                connections = value
            elif name == "process_start_time_seconds":
                started = value
            elif name.startswith("herald_") and name.endswith("_total"):
                label = next(iter(labels.values()), "") if labels else ""
                counters[name, label] = counters.get((name, label), 0.0) + value
    if not herald:
        raise ValueError("no herald_ metric in it: not a Herald node")
    return Sample(node_id, version, started, connections, counters)


def deltas(before: Sample, after: Sample) -> dict[str, int]:
    """What one node counted between two samples, per row."""

    def moved(name: str, *labels: str) -> int:
        return round(after.total(name, *labels) - before.total(name, *labels))

    return {
        "deliveries": moved("herald_deliveries_total"),
        "bytes": moved("herald_bytes_sent_total"),
        "cutoffs": moved("herald_slow_client_cutoffs_total"),
        "expired": moved("herald_expired_streams_total"),
        "resets": moved("herald_resets_total"),
        "published": moved("herald_events_published_total"),
        "streams_opened": moved("herald_connects_total", "accepted", "waited"),
        "accepted": moved("herald_connects_total", "accepted"),
        "received": moved("herald_events_received_total"),
        "replayed": moved("herald_replayed_events_total"),
    }


def restarted(before: Sample, after: Sample) -> bool:
    """Whether the node started again between the samples: a new process, or a counter gone down."""
    if before.started is not None and after.started is not None and abs(after.started - before.started) > 0.5:
        return True
    return any(after.counters.get(key, 0.0) < value for key, value in before.counters.items())


def resets_by_reason(before: Sample, after: Sample) -> dict[str, int]:
    reasons = {label for name, label in after.counters if name == "herald_resets_total"}
    moved = {r: round(after.total("herald_resets_total", r) - before.total("herald_resets_total", r)) for r in reasons}
    return {r: n for r, n in sorted(moved.items()) if n}


# -- reading the nodes ------------------------------------------------------------------


def _why_refused(url: str, status: int) -> str:
    if status == 404:
        return f"{url}/metrics answered 404: metrics are off there (HERALD_METRICS=0), or the node predates them"
    if status == 401:
        return (
            f"{url}/metrics answered 401: access control is on and /metrics needs an admin token "
            "(pass --metrics-token, or set HERALD_JWT_SECRET to mint one)"
        )
    if status == 403:
        return f"{url}/metrics answered 403: the token is not an admin token (pass --metrics-token)"
    return f"{url}/metrics answered {status}"


async def scrape(client: httpx.AsyncClient, url: str, token: str | None) -> Sample | str:
    """``url``'s sample, or why there is none (a sentence)."""
    headers = {"authorization": f"Bearer {token}"} if token else None
    try:
        response = await client.get(f"{url}/metrics", headers=headers, timeout=SCRAPE_TIMEOUT)
    except httpx.HTTPError as exc:
        return f"no answer from {url}/metrics ({type(exc).__name__})"
    if response.status_code != 200:
        return _why_refused(url, response.status_code)
    try:
        return parse(response.text)
    except Exception as exc:  # whatever the parser trips on is a reason, never the end of the run
        return f"{url}/metrics is not Herald's Prometheus text ({exc})"


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every scrape: httpx would load the CA bundle for each client (20-50 ms of CPU a poll)."""
    return ssl.create_default_context()


async def scrape_all(urls: list[str], token: str | None) -> list[Sample | str]:
    async with httpx.AsyncClient(verify=_tls()) as client:
        return list(await asyncio.gather(*(scrape(client, url, token) for url in urls)))


@dataclass
class Scrapes:
    """What the run read from the nodes: where, why there, and the samples before and after."""

    urls: list[str]
    source: str  # where the URLs came from, for the report
    token: str | None = field(default=None, repr=False)
    why_not: str | None = None  # set when the nodes are not read at all
    before: list[Sample | str] = field(default_factory=list)
    after: list[Sample | str] = field(default_factory=list)
    settled: bool = True  # the nodes let go of the run's streams before the second reading
    settle_seconds: float = 0.0

    async def read_before(self) -> None:
        if self.why_not is None:
            self.before = await scrape_all(self.urls, self.token)

    async def read_after(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Read again, once every node holds no more streams than before the run (or ``timeout`` is up)."""
        if self.why_not is None and any(isinstance(s, Sample) for s in self.before):
            start = time.monotonic()
            deadline = start + timeout
            while True:
                self.after = await scrape_all(self.urls, self.token)
                self.settled = all(
                    not isinstance(b, Sample) or not isinstance(a, Sample) or a.connections <= b.connections
                    for b, a in zip(self.before, self.after, strict=True)
                )
                if self.settled or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(SETTLE_POLL)
            self.settle_seconds = round(time.monotonic() - start, 3)
        elif self.why_not is None:
            self.after = list(self.before)  # nothing to compare: the first reading's reasons stand


def _cluster_nodes(config: LoadConfig) -> list[str] | None:
    """The node URLs of the local cluster whose front is one of the targets, if there is one."""
    from ops.cluster import Cluster  # only here: reading a state file needs none of the cluster's machinery

    state = Path(config.cluster_dir) / Cluster.STATE_FILE
    if not state.exists():
        return None
    with contextlib.suppress(OSError, ValueError, KeyError):
        cluster = Cluster.load(Path(config.cluster_dir))
        front = urlsplit(cluster.front_url)
        for target in config.targets:
            parts = urlsplit(target)
            if parts.port == front.port and parts.hostname in ("127.0.0.1", "localhost", "::1"):
                others = [t for t in config.targets if t != target]
                return [cluster.node_url(i) for i in range(len(cluster.node_ports))] + others
    return None


def plan(config: LoadConfig) -> Scrapes:
    """Which nodes to read: ``--metrics-from``, else a local cluster's nodes when a target is its front, else the
    targets."""
    token = config.metrics_token or config.token
    if not config.server_counts:
        return Scrapes([], "", why_not="not asked for (--no-server-counts)")
    if config.system != "herald":
        return Scrapes([], "", why_not=f"--system {config.system} has no Herald /metrics")
    if config.metrics_from:
        return Scrapes(list(dict.fromkeys(config.metrics_from)), "--metrics-from", token)
    nodes = _cluster_nodes(config)
    if nodes:
        return Scrapes(nodes, f"the nodes of the cluster in {config.cluster_dir}", token)
    return Scrapes(list(config.targets), "the targets (each taken for one node)", token)


# -- the comparison --------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCounts:
    """The tool's own account of a run, row by row (None: the tool does not know)."""

    deliveries: int
    bytes: int | None
    cutoffs: int
    resets: int
    published: int | None
    streams_opened: int
    reset_reasons: Mapping[str, int] = field(default_factory=dict)
    nodes: frozenset[str] = frozenset()  # X-Node-Id of the nodes that served the run's streams
    streams_at_end: int = 0  # subscribers streaming when the tool stopped reading
    subscribers: int = 0


@dataclass(frozen=True)
class Context:
    """What else may have moved the nodes' counters, or the tool's, during the run."""

    shared: bool = False  # --nodes-shared: other clients may use the nodes
    faults: bool = False  # the run injected faults
    streams_cut: int = 0  # open streams that ended (written to, maybe never read)
    told_to_retry: int = 0  # streams answered with only "retry later" (the proxy's own, when no node is up)
    connect_errors: int = 0  # connects that gave no stream (a node may still have counted one)
    publish_retries: int = 0  # failed publish requests (retried: an answer lost after the node took the events)


@dataclass(frozen=True)
class Rule:
    """How a row is compared: ``equal``; ``within`` (the nodes' count at most ``slack`` above the tool's);
    ``at least`` (the nodes' count may hold what the tool never saw); ``shown`` (not comparable)."""

    kind: str
    slack: int | None = None
    why: tuple[str, ...] = ()

    def check(self, server: int, tool: int | None) -> bool | None:
        if tool is None or self.kind == "shown":
            return None
        if self.kind == "equal":
            return server == tool
        if self.kind == "within":
            return 0 <= server - tool <= (self.slack or 0)
        return server >= tool


def rule_of(row: str, context: Context, shared: list[str], tool: ToolCounts) -> Rule:
    """How ``row`` is compared, and why it is not exact.

    Two slacks are exact in their own way: a stream the tool stops reading
    may have a heartbeat (bytes) on its way; and when streams were cut and
    subscribers reconnecting, each subscriber's last connect or cut-off may
    race with the tool's stop (counted by the node, never seen by the tool).
    """
    why = list(shared)
    racing = context.streams_cut and not context.connect_errors  # at most one connect or cut per subscriber
    cut = f"{context.streams_cut:,} open stream(s) were cut"
    if row in ("deliveries", "bytes", "resets"):
        if context.streams_cut:
            why.append(f"{cut}: what was written to them may be unread")
        if context.faults:
            why.append("faults were injected")
        if row == "bytes" and context.told_to_retry:
            return Rule("shown", why=(
                f"{context.told_to_retry:,} stream(s) were only told to retry later, maybe by the proxy itself "
                "(bytes no node wrote)",
            ))  # fmt: skip
        if row == "bytes" and not why:
            heartbeats = "one heartbeat per stream the tool stopped reading"
            return Rule("within", HEARTBEAT_BYTES * tool.streams_at_end, (heartbeats,))
    elif row == "published":
        if context.publish_retries:
            why.append(f"{context.publish_retries:,} publish request(s) failed and were retried or given up")
    elif row in ("streams_opened", "cutoffs"):
        if row == "cutoffs" and context.faults:
            return Rule("shown", why=("faults cut streams themselves: those are no cut-offs",))
        if context.faults:
            why.append("faults were injected")
        if context.connect_errors:
            why.append(f"{context.connect_errors:,} connect(s) gave no stream (a node may have opened and cut it)")
        if racing and not why:
            what = "connect" if row == "streams_opened" else "cut-off"
            return Rule("within", tool.subscribers, (f"{cut}: one {what} per subscriber may race the tool's stop",))
    if why:
        return Rule("at least", why=tuple(why))
    return Rule("equal")


def _mismatch_text(label: str, rule: Rule, server: int, tool: int) -> str:
    if rule.kind == "at least":
        return f"{label}: the nodes counted {server:,}, fewer than the tool's {tool:,}"
    diff = server - tool
    more = "more" if diff > 0 else "fewer"
    text = f"{label}: the nodes counted {server:,}, {abs(diff):,} {more} than the tool's {tool:,}"
    if rule.kind == "within" and diff > 0:
        text += f" (at most {rule.slack:,} more allowed)"
    return text


def _node_label(url: str, sample: Sample | str | None) -> str:
    return f"{sample.node_id} ({url})" if isinstance(sample, Sample) and sample.node_id else url


def _unavailable(scrapes: Scrapes, why: str, nodes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "available": False,
        "why": why,
        "source": scrapes.source,
        "mode": None,
        "note": None,
        "nodes": nodes or [],
        "rows": [],
        "mismatches": [],
    }


@dataclass
class _Read:
    """The nodes read well before and after the run, once each."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per node id (or URL)
    reasons: dict[str, int] = field(default_factory=dict)  # resets by reason, all nodes
    open_before: int = 0  # streams the nodes held when the run began


def _read(scrapes: Scrapes) -> _Read:
    read = _Read()
    for url, before, after in zip(scrapes.urls, scrapes.before, scrapes.after, strict=True):
        entry: dict[str, Any] = {"url": url, "node_id": None, "version": None, "error": None, "counts": None}
        read.entries.append(entry)
        if isinstance(before, str):
            entry["error"] = f"before the run: {before}"
        elif isinstance(after, str):
            entry["node_id"] = before.node_id
            entry["error"] = f"after the run: {after}"
        elif before.node_id != after.node_id:
            entry["node_id"] = after.node_id
            entry["error"] = (
                f"{url} answered as {before.node_id} before the run and as {after.node_id} after: a proxy in front "
                "of several nodes (give the nodes themselves with --metrics-from)"
            )
        elif restarted(before, after):
            entry["node_id"] = after.node_id
            entry["error"] = f"{_node_label(url, after)} restarted during the run: its counters started over"
        else:
            entry.update(node_id=after.node_id, version=after.version)
            key = after.node_id or url
            if key in read.counts:
                entry["note"] = f"the same node as another URL ({key}): counted once"
                continue
            entry["counts"] = read.counts[key] = deltas(before, after)
            for reason, n in resets_by_reason(before, after).items():
                read.reasons[reason] = read.reasons.get(reason, 0) + n
            read.open_before += round(before.connections)
            continue
        read.problems.append(entry["error"])
    return read


def section(scrapes: Scrapes, tool: ToolCounts, context: Context) -> dict[str, Any]:
    """The result's ``server`` section: the two accounts side by side, or why the nodes' is unavailable."""
    if scrapes.why_not is not None:
        return _unavailable(scrapes, scrapes.why_not)
    read = _read(scrapes)
    if read.problems:
        return _unavailable(scrapes, read.problems[0], read.entries)
    if not read.counts:
        return _unavailable(scrapes, "no node to read", read.entries)
    missing = sorted(n for n in tool.nodes if n not in read.counts and ":" not in n)  # "host:port": no X-Node-Id
    if missing:
        return _unavailable(
            scrapes,
            f"the run's streams were served by {', '.join(missing)}, whose /metrics was not read (read: "
            f"{', '.join(sorted(read.counts))}; give every node with --metrics-from)",
            read.entries,
        )

    shared = []
    if context.shared:
        shared.append("--nodes-shared: other clients may use the nodes")
    if read.open_before:
        shared.append(f"the nodes held {read.open_before:,} other open stream(s) when the run began")
    if not scrapes.settled:
        shared.append(f"the nodes still held more streams than before the run after {scrapes.settle_seconds} s")

    totals = {key: sum(c[key] for c in read.counts.values()) for key in next(iter(read.counts.values()))}
    server_values = dict(totals)
    server_values["cutoffs"] = totals["cutoffs"] + totals["expired"]
    tool_values: dict[str, int | None] = {
        "deliveries": tool.deliveries,
        "bytes": tool.bytes,
        "cutoffs": tool.cutoffs,
        "resets": tool.resets,
        "published": tool.published,
        "streams_opened": tool.streams_opened,
    }
    details = {
        "deliveries": f"events from the broker feed {totals['received']:,}, replayed {totals['replayed']:,}",
        "bytes": None,
        "cutoffs": f"slow-client cut-offs {totals['cutoffs']:,}, token expiries {totals['expired']:,}",
        "resets": f"by reason: nodes {_reasons(read.reasons)}; tool {_reasons(tool.reset_reasons)}",
        "published": None
        if tool.published is not None
        else "the tool published straight to Redis: the nodes' publish endpoint was not used",
        "streams_opened": f"accepted {totals['accepted']:,}, waited for the broker "
        f"{totals['streams_opened'] - totals['accepted']:,}",
    }
    rows: list[dict[str, Any]] = []
    mismatches = []
    for key, label in ROWS.items():
        rule = rule_of(key, context, shared, tool)
        server, mine = server_values[key], tool_values[key]
        ok = rule.check(server, mine)
        text = None
        if ok is False and mine is not None:
            text = _mismatch_text(label, rule, server, mine)
        elif key == "resets" and ok and rule.kind == "equal" and read.reasons != dict(tool.reset_reasons):
            ok = False
            text = f"resets by reason: the nodes {_reasons(read.reasons)}, the tool {_reasons(tool.reset_reasons)}"
        if text:
            mismatches.append(text)
        rows.append(
            {
                "key": key,
                "label": label,
                "server": server,
                "tool": mine,
                "rule": rule.kind,
                "slack": rule.slack,
                "why": "; ".join(rule.why) or None,
                "ok": ok,
                "detail": details[key],
                "server_source": SERVER_SOURCES[key],
                "tool_source": TOOL_SOURCES[key],
            }
        )
    exact = all(row["rule"] in ("equal", "within") for row in rows)
    reasons = list(dict.fromkeys(w for row in rows if row["why"] for w in row["why"].split("; ")))
    if exact:
        note = (
            "exact: the nodes had no other client and the run was undisturbed, so every row must be equal, or "
            "within a stated slack: " + "; ".join(reasons)
            if reasons
            else "exact: the nodes had no other client and the run was undisturbed, so every row must be equal"
        )
    else:
        note = (
            "some rows are not exact: " + "; ".join(reasons) + ". Where so, the nodes' count may hold what the tool "
            "never saw (other clients, what was written to a cut stream, a publish whose answer was lost) and must "
            "be at least the tool's"
        )
    return {
        "available": True,
        "why": None,
        "source": scrapes.source,
        "mode": "exact" if exact else "at least",
        "note": note,
        "nodes": read.entries,
        "rows": rows,
        "mismatches": mismatches,
    }


def _reasons(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {n:,}" for reason, n in sorted(counts.items())) or "none"


def tool_counts(
    subscribers: Iterable[Mapping[str, Any]],
    results: Iterable[Mapping[str, Any]],
    *,
    published: int | None,
    nodes: Iterable[str],
) -> ToolCounts:
    """The tool's account from its subscribers' and workers' final reports."""
    subs = list(subscribers)
    reports = list(results)
    body = [r.get("body_bytes") for r in reports]
    reasons: dict[str, int] = {}
    for r in reports:
        for reason, n in r["reset_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + int(n)
    return ToolCounts(
        deliveries=sum(int(s["delivered"]) + int(s["duplicated"]) + int(s["unknown"]) for s in subs),
        bytes=None if any(b is None for b in body) else sum(int(b or 0) for b in body),
        # A stream the subscriber itself closed for its silence is no cut-off of the node's.
        cutoffs=sum(int(n) for r in reports for why, n in r["drops"].items() if why != SILENT),
        resets=sum(reasons.values()),
        published=published,
        streams_opened=sum(int(n) for r in reports for n in r["connects"].values()),
        reset_reasons={r: n for r, n in sorted(reasons.items()) if n},
        nodes=frozenset(nodes),
        streams_at_end=sum(1 for s in subs if s["connected"]),
        subscribers=len(subs),
    )


# -- showing it ------------------------------------------------------------------------


def summary_lines(server: Mapping[str, Any] | None) -> list[str]:
    """The summary table's lines for the ``server`` section (none for a result without one)."""
    if not server:
        return []
    if not server["available"]:
        return [f"  server counts unavailable: {server['why']}"]
    names = ", ".join(n["node_id"] or n["url"] for n in server["nodes"] if n["counts"] is not None)
    lines = [
        f"  server counts from /metrics of {names} ({server['source']}); {server['mode']}",
        f"  {'':<15} {'nodes':>12} {'tool':>12}",
    ]
    for row in server["rows"]:
        tool = "-" if row["tool"] is None else f"{row['tool']:,}"
        mark = {True: "ok", False: "MISMATCH", None: ""}[row["ok"]]
        if row["rule"] == "shown":
            mark = "(shown, not compared)"
        elif row["rule"] == "at least":
            mark += " (nodes >= tool)"
        elif row["rule"] == "within":
            mark += f" (within +{row['slack']:,})"
        lines.append(f"  {row['label']:<15} {row['server']:>12,} {tool:>12}   {mark}")
    lines += [f"  MISMATCH      {m}" for m in server["mismatches"]]
    return lines
