"""Browser clients never die: a real EventSource, in headless Chromium, through the cluster's nginx.

A native EventSource that gets anything but ``200 text/event-stream`` fails
the connection for good (readyState CLOSED: it never reconnects). So the
browser is the judge: in each scenario a page on the front's origin opens
``new EventSource("/events?topic=…")`` while a producer publishes through the
front, retrying each event with one idempotency key until it gets a 201 (the
accepted ids are the truth), and the cluster goes through a fault:

(a) both nodes killed (SIGKILL), down for 3 s, restarted;
(b) Redis stopped and the page's node killed, so the page reconnects (to the
    other node) during the Redis outage; then Redis and the node are back;
(c) a rolling restart (one node at a time: SIGTERM, gone, started, ready).

Each must end with the page's readyState never CLOSED, no ``reset``, and
every accepted event received exactly once, in order. What Chromium saw of
each ``/events`` request (status and type, or the network error) is recorded
through DevTools and shown when a scenario fails. Run with ``-s`` for the
figures quoted when the issue is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from ops.cluster import Cluster
from ops.probe import free_port
from tests import redis_server
from tests.browser import CHROMIUM, Browser, JavaScriptError, chromium, live_processes
from tests.ops.test_cluster import wait_ready
from tests.sse_client import publish_reliably

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (ops/install-system-deps.sh installs it)"),
    pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed"),
]

PUBLISH_PERIOD = 0.06  # ~15 events/s, a steady stream
CATCH_UP = 30.0  # seconds a page may take to receive every accepted event once the cluster is whole

# Injected into the page (on the front's origin). Records everything the
# EventSource does in window.__herald; times are Date.now() (ms, wall clock,
# comparable with the test's time.time()).
PAGE_SCRIPT = """
(() => {
  const h = {events: [], errors: [], resets: [], opens: [], everClosed: false, closedAt: null, closedBy: null};
  window.__herald = h;
  const source = new EventSource("/events?topic=" + encodeURIComponent(TOPIC));
  window.__heraldSource = source;
  const watch = (by) => {
    if (source.readyState === EventSource.CLOSED && !h.everClosed) {
      h.everClosed = true;
      h.closedAt = Date.now();
      h.closedBy = by;
    }
  };
  source.onopen = () => { h.opens.push(Date.now()); };
  source.onmessage = (e) => { h.events.push([e.lastEventId, e.data, Date.now()]); };
  source.onerror = () => { h.errors.push([Date.now(), source.readyState]); watch("onerror"); };
  source.addEventListener("reset", (e) => { h.resets.push(e.data); });
  setInterval(() => watch("interval"), 50);
  return source.url;
})()
"""

PAGE_STATUS = """
({events: window.__herald.events.length, opens: window.__herald.opens.length,
  closed: window.__herald.everClosed, state: window.__heraldSource.readyState})
"""


@dataclass
class PageStatus:
    """The page's progress: events received, opens, whether readyState was ever CLOSED, readyState now."""

    events: int
    opens: int
    closed: bool
    state: int


@dataclass
class PageRecord:
    """Everything the page's EventSource did, read back once at the end; times in seconds (wall clock)."""

    events: list[tuple[str, str]]  # (lastEventId, data)
    arrivals: list[float]  # when each event was dispatched
    errors: list[tuple[float, int]]  # (when, readyState at that moment)
    resets: list[str]
    opens: list[float]
    ever_closed: bool
    closed_by: str | None

    def outage(self, since: float) -> tuple[float, float] | None:
        """When the stream broke (the first error event after ``since``) and when the next event came.

        None when nothing broke; the second time is ``inf`` when no event came after.
        """
        lost = next((t for t, _ in self.errors if t >= since), None)
        if lost is None:
            return None
        return lost, next((t for t in self.arrivals if t > lost), float("inf"))

    def longest_gap(self) -> float:
        return max((b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)), default=0.0)


class Page:
    """The page with the EventSource under test, and what Chromium's network layer saw of its requests."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.requests: list[tuple[float, str]] = []  # (when, "200 text/event-stream" or "failed net::ERR_…")

    @classmethod
    async def open(cls, browser: Browser, front_url: str, topic: str) -> Page:
        """Load a page of the front (same origin), start the EventSource; return once it opened (or closed)."""
        page = cls(browser)
        await browser.send("Network.enable")
        browser.on("Network.responseReceived", page._on_response)
        browser.on("Network.loadingFailed", page._on_failure)
        await browser.navigate(f"{front_url}/healthz")
        await browser.evaluate(PAGE_SCRIPT.replace("TOPIC", json.dumps(topic)))
        opened = await page.until(lambda s: s.opens >= 1 or s.closed, 10)
        assert opened.opens == 1, f"the EventSource did not open: {opened}, {page.requests}"
        return page

    def _on_response(self, params: dict[str, Any]) -> None:
        response = params["response"]
        if "/events" in response.get("url", ""):
            self.requests.append((time.time(), f"{response['status']} {response.get('mimeType', '?')}"))

    def _on_failure(self, params: dict[str, Any]) -> None:
        if params.get("type") == "EventSource":
            self.requests.append((time.time(), f"failed {params.get('errorText', '?')}"))

    async def status(self) -> PageStatus:
        value = await self.browser.evaluate(PAGE_STATUS)
        return PageStatus(value["events"], value["opens"], value["closed"], value["state"])

    async def until(self, done: Callable[[PageStatus], bool], timeout: float) -> PageStatus:
        """Poll the page until ``done`` holds or ``timeout`` seconds passed; the last status either way."""
        deadline = time.monotonic() + timeout
        status = await self.status()
        while not done(status) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling the page's own progress: DevTools has nothing to await
            status = await self.status()
        return status

    async def record(self) -> PageRecord:
        h = await self.browser.evaluate("window.__herald")
        return PageRecord(
            events=[(i, d) for i, d, _ in h["events"]],
            arrivals=[t / 1000 for _, _, t in h["events"]],
            errors=[(t / 1000, state) for t, state in h["errors"]],
            resets=h["resets"],
            opens=[t / 1000 for t in h["opens"]],
            ever_closed=h["everClosed"],
            closed_by=h["closedBy"],
        )


@dataclass
class Publisher:
    """Publishes ``{"topic": topic, "data": i}`` through the front until stopped; ``accepted`` is the truth.

    Each event is retried with one idempotency key until a 201, so an event
    is in ``accepted`` (as ``(id, data as EventSource delivers it)``) exactly
    when the cluster took it, once.
    """

    client: httpx.AsyncClient
    url: str
    topic: str
    accepted: list[tuple[str, str]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            event_id = await publish_reliably(self.client, self.url, {"topic": self.topic, "data": i})
            self.accepted.append((event_id, str(i)))
            i += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), PUBLISH_PERIOD)  # the rate, or stop at once


@dataclass
class Scene:
    cluster: Cluster
    page: Page
    publisher: Publisher
    publishing: asyncio.Task[None]
    fault_at: float = 0.0  # when the fault began (time.time())
    accepted_before: int = 0  # events accepted before it

    def fault(self) -> None:
        """Mark the start of the fault (call right before causing it)."""
        self.fault_at = time.time()
        self.accepted_before = len(self.publisher.accepted)

    def network(self) -> str:
        """Every /events request of the page as Chromium saw it, timed from the fault."""
        return ", ".join(f"{when - self.fault_at:+.1f}s {what}" for when, what in self.page.requests)

    async def settle(self) -> PageRecord:
        """Once the cluster is whole: publish a little more, stop, and give the page time to get everything.

        Returns what the page recorded; checks nothing (see :func:`check`).
        """
        more = len(self.publisher.accepted) + 15
        await self.page.until(lambda s: s.events >= more or s.closed, CATCH_UP)
        self.publisher.stop.set()
        await asyncio.wait_for(self.publishing, 30)
        total = len(self.publisher.accepted)
        await self.page.until(lambda s: s.events >= total or s.closed, CATCH_UP)
        return await self.page.record()


@contextlib.asynccontextmanager
async def scene(tmp_path: Path) -> AsyncIterator[Scene]:
    """A fresh 2-node cluster, a page subscribed through its front, and a publisher already flowing to it."""
    cluster = Cluster(tmp_path / "cluster", nodes=2, front_port=free_port())
    await asyncio.to_thread(cluster.start)
    try:
        async with chromium() as browser, httpx.AsyncClient(trust_env=False) as client:
            topic = f"b-{uuid.uuid4().hex[:10]}"
            page = await Page.open(browser, cluster.front_url, topic)
            publisher = Publisher(client, cluster.front_url, topic)
            publishing = asyncio.create_task(publisher.run())
            try:
                steady = await page.until(lambda s: s.events >= 10 or s.closed, 10)
                assert steady.events >= 10, f"the page received no flow before the fault: {steady}"
                yield Scene(cluster, page, publisher, publishing)
            finally:
                # Normally settled already; after a failure the publisher may be retrying an event forever.
                publishing.cancel()
                await asyncio.gather(publishing, return_exceptions=True)
    finally:
        await asyncio.to_thread(cluster.stop)


def check(s: Scene, record: PageRecord, label: str) -> None:
    """The issue's contract: readyState never CLOSED, no ``reset``, every accepted event once, in order."""
    accepted = s.publisher.accepted
    assert not record.ever_closed, (
        f"browser ({label}): the EventSource was CLOSED for good (seen by {record.closed_by}) after "
        f"{len(record.events)}/{len(accepted)} events; errors (time, readyState) {record.errors}; "
        f"/events as Chromium saw it (from the fault): {s.network()}"
    )
    assert record.resets == [], f"browser ({label}): reset events {record.resets}"
    received_ids = [i for i, _ in record.events]
    accepted_ids = [i for i, _ in accepted]
    assert len(received_ids) == len(set(received_ids)), f"browser ({label}): an event was received twice"
    missing = sorted(set(accepted_ids) - set(received_ids))
    unexpected = sorted(set(received_ids) - set(accepted_ids))
    assert received_ids == accepted_ids, (
        f"browser ({label}): {len(accepted_ids)} accepted, {len(received_ids)} received; "
        f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    )
    assert record.events == accepted  # and each with its own data


def figures(label: str, s: Scene, record: PageRecord, whole_at: float, what: str) -> str:
    """Lines to quote: the events, the EventSource's opens and errors, how long the page went without events."""
    outage = record.outage(s.fault_at)
    if outage is None:
        flowing = "the page's stream never broke"
    else:
        lost, back = (t - s.fault_at for t in outage)
        flowing = f"the page's stream broke at {lost:+.2f} s, " + (
            "no event after that"
            if back == float("inf")
            else f"events again at {back:+.2f} s ({back - lost:.2f} s without)"
        )
    closed = f"CLOSED ({record.closed_by})" if record.ever_closed else "never CLOSED"
    in_order = [i for i, _ in record.events] == [i for i, _ in s.publisher.accepted]
    return (
        f"\nbrowser ({label}): {what}\n"
        f"  {len(s.publisher.accepted)} events accepted ({s.accepted_before} before the fault), "
        f"{len(record.events)} received (all, once, in order: {in_order}); "
        f"{len(record.opens)} opens ({len(record.opens) - 1} reconnects), {len(record.errors)} error events, "
        f"readyState {closed}, {len(record.resets)} resets\n"
        f"  from the fault: {flowing}, the cluster whole again at {whole_at - s.fault_at:+.2f} s; "
        f"longest gap between events {record.longest_gap():.2f} s\n"
        f"  /events as Chromium saw it (from the fault): {s.network()}"
    )


async def at(action: Callable[[], object]) -> float:
    """Run a blocking Cluster action in a thread (the page and the publisher go on); when it returned."""
    await asyncio.to_thread(action)
    return time.time()


def timed(s: Scene) -> str:
    """Now, from the fault."""
    return f"{time.time() - s.fault_at:+.1f}s"


def each_node(action: Callable[[int], None]) -> None:
    """``action(0)``, ``action(1)``: both nodes of the scene's cluster, one after the other."""
    for index in range(2):
        action(index)


async def until_unready(cluster: Cluster, index: int) -> float:
    """Poll the node's ``/readyz`` until it answers 503 (its broker is down); when it did."""
    async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
        deadline = time.monotonic() + 10
        while (await client.get(f"{cluster.node_url(index)}/readyz")).status_code != 503:
            assert time.monotonic() < deadline, f"node-{index} still ready 10 s after Redis stopped"
            await asyncio.sleep(0.05)  # the node notices on its own schedule: poll what it says
        return time.time()


async def serving_node(cluster: Cluster) -> int:
    """The node holding the page's stream (the only stream in the cluster)."""
    async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
        deadline = time.monotonic() + 10
        while True:
            counts = [
                (await client.get(f"{cluster.node_url(i)}/stats")).json()["hub"]["connections"]
                for i in range(len(cluster.node_ports))
            ]
            if sum(counts) == 1:
                return counts.index(1)
            assert time.monotonic() < deadline, f"streams per node {counts}, expected the page's one"
            await asyncio.sleep(0.05)  # a node counts a stream once it is set up: poll its counters


# --------------------------------------------------------------------------- the driver


async def test_the_driver_evaluates_in_headless_chromium() -> None:
    async with chromium() as browser:
        assert await browser.evaluate("1 + 1") == 2
        assert await browser.evaluate("Promise.resolve({a: [1, 'x']})") == {"a": [1, "x"]}
        with pytest.raises(JavaScriptError, match="boom"):
            await browser.evaluate("(() => { throw new Error('boom'); })()")
        profile, pid = browser.profile, browser.process.pid
    assert not profile.exists()
    assert browser.process.returncode is not None
    assert live_processes(pid) == []  # Chromium's whole process group is gone


# --------------------------------------------------------------------------- the scenarios


@pytest.mark.timeout(240)  # a cluster's and Chromium's start count against it
async def test_both_nodes_killed_for_3_seconds(tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        s.fault()
        await at(lambda: each_node(s.cluster.kill_node))  # SIGKILL: no goodbye to anyone
        await asyncio.sleep(3)  # the outage itself: no node at all for 3 s
        whole_at = await at(lambda: each_node(s.cluster.start_node))  # each returns once ready
        record = await s.settle()
    print(figures("a", s, record, whole_at, f"both nodes SIGKILLed, ready again {whole_at - s.fault_at:.1f} s later"))
    check(s, record, "a")


@pytest.mark.timeout(240)  # a cluster's and Chromium's start count against it
async def test_redis_down_while_the_pages_node_is_killed(tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        victim = await serving_node(s.cluster)
        before = await s.page.status()
        s.fault()
        await at(s.cluster.stop_redis)
        # The outage as the other node knows it (/readyz 503) before the page is sent there.
        outage_seen = await until_unready(s.cluster, 1 - victim)
        await at(lambda: s.cluster.kill_node(victim))
        # The page's stream broke: EventSource reconnects (after the server's retry:), through nginx to the
        # other node, while Redis is still down. Redis stays down until the page reopened or gave up.
        during = await s.page.until(lambda st: st.opens > before.opens or st.closed, 15)
        async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
            on_other = (await client.get(f"{s.cluster.node_url(1 - victim)}/stats")).json()["hub"]["connections"]
        redis_back = await at(s.cluster.start_redis)
        whole_at = await at(lambda: s.cluster.start_node(victim))
        await wait_ready(s.cluster)
        record = await s.settle()
    reopened = "reopened" if during.opens > before.opens else "did not reopen"
    what = (
        f"Redis stopped, node-{1 - victim} not ready at {outage_seen - s.fault_at:+.1f} s, then node-{victim} "
        f"(the page's) killed; the page {reopened} during the "
        f"{redis_back - s.fault_at:.1f} s Redis outage (streams on node-{1 - victim} then: {on_other})"
    )
    print(figures("b", s, record, whole_at, what))
    check(s, record, "b")


@pytest.mark.timeout(240)  # a cluster's and Chromium's start count against it
async def test_rolling_restart_while_publishing(tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        steps: list[str] = []
        s.fault()
        # One node at a time: SIGTERM, gone, started, ready, fronted by nginx again.
        whole_at = await at(lambda: s.cluster.restart_nodes(lambda step: steps.append(f"{timed(s)} {step}")))
        record = await s.settle()
    print(figures("c", s, record, whole_at, f"rolling restart of 2 nodes: {', '.join(steps)}"))
    check(s, record, "c")
