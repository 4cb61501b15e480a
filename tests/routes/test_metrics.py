"""``GET /metrics`` against real nodes, on both brokers: each counter moves by exactly what happened.

A known load (N publishes to M subscribers, K slow clients cut off, resumes
with a bad id) is put on a node, and the deltas of its counters are compared
with what the test's own clients saw. The exposition is also checked by
``promtool check metrics`` (Debian's ``prometheus`` package).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api import token as tokens
from api.adapter.guard import REASONS as SHED_REASONS
from api.core.metrics import CONNECT_OUTCOMES, PUBLISH_ERROR_CLASSES, RESET_REASONS, labelled_counter
from tests import redis_server
from tests.server import Node, run_server
from tests.sse_client import EventStream, publish

BROKERS = [
    pytest.param("memory", id="memory"),
    pytest.param(
        "redis",
        id="redis",
        marks=pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed"),
    ),
]


@pytest.fixture(scope="module", params=BROKERS)
def metrics_node(request: pytest.FixtureRequest) -> Iterator[Node]:
    # No heartbeats during a test (so bytes can be compared exactly), a small client buffer (cut-offs).
    env = {"HERALD_HEARTBEAT": "600", "HERALD_CLIENT_BUFFER": "65536", "HERALD_MAX_EVENT_BYTES": "40000"}
    if request.param == "redis":
        env["REDIS_URL"] = redis_server.shared_server().url
    with run_server(env) as node:
        yield node


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Every sample of a node's /metrics, keyed ``name{label="value"}``."""
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    response.raise_for_status()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


async def wait_metric(url: str, name: str, value: float, timeout: float = 10) -> dict[str, float]:
    """The node's samples once ``name`` reached ``value`` (counters are read when scraped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        samples = await asyncio.to_thread(scrape, url)
        if samples.get(name, 0.0) >= value or loop.time() > deadline:
            return samples
        await asyncio.sleep(0.05)


async def test_counters_move_by_exactly_what_happened(metrics_node: Node) -> None:
    url = metrics_node.url
    topic = f"m-{secrets.token_hex(6)}"
    subscribers, events = 7, 25
    before = await asyncio.to_thread(scrape, url)
    streams = await asyncio.gather(*(EventStream.open(url, [topic]) for _ in range(subscribers)))
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            ids = [(await publish(url, {"topic": topic, "data": i}, client)).json()["id"] for i in range(events)]
        for stream in streams:
            assert [e.last_event_id for e in await stream.take(events)] == ids
        after = await wait_metric(url, "herald_deliveries_total", before.get("herald_deliveries_total", 0) + 175)
        received_bytes = sum(len(s.raw) for s in streams)
    finally:
        await asyncio.gather(*(s.close() for s in streams))
    assert delta(before, after, "herald_events_published_total") == events
    assert delta(before, after, "herald_deliveries_total") == subscribers * events
    assert delta(before, after, "herald_events_received_total") == events
    assert delta(before, after, 'herald_connects_total{outcome="accepted"}') == subscribers
    assert delta(before, after, "herald_bytes_sent_total") == received_bytes
    assert after["herald_connections"] - before["herald_connections"] == subscribers
    assert delta(before, after, "herald_publish_duration_seconds_count") == events
    assert delta(before, after, "herald_delivery_latency_seconds_count") == events
    assert after["herald_broker_up"] == 1


async def test_cutoffs_resets_and_refusals_are_counted(metrics_node: Node) -> None:
    url = metrics_node.url
    topic = f"m-{secrets.token_hex(6)}"
    before = await asyncio.to_thread(scrape, url)
    slow = []
    for _ in range(3):  # clients that stop reading
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", metrics_node.port))
        sock.sendall(f"GET /events?topic={topic} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        slow.append(sock)
    try:
        await wait_metric(
            url,
            'herald_connects_total{outcome="accepted"}',
            before.get('herald_connects_total{outcome="accepted"}', 0) + 3,
        )
        async with httpx.AsyncClient(timeout=10) as client:
            for i in range(300):  # well past the kernel's socket buffers and the node's 64 KiB
                assert (
                    await publish(url, {"topic": topic, "data": {"n": i, "pad": "x" * 32_000}}, client)
                ).status_code == 201
            bad = await client.get(f"{url}/events", params={"topic": "no spaces"})
            assert bad.status_code == 400
            refused = await client.post(f"{url}/publish", content=b"x", headers={"Content-Type": "text/plain"})
            assert refused.status_code == 415
        async with await EventStream.open(url, [topic], last_event_id="not-an-id") as stream:
            assert (await stream.next_event()).type == "reset"
        after = await wait_metric(
            url, "herald_slow_client_cutoffs_total", before.get("herald_slow_client_cutoffs_total", 0) + 3
        )
    finally:
        for sock in slow:
            sock.close()
    assert delta(before, after, "herald_slow_client_cutoffs_total") == 3
    assert delta(before, after, 'herald_resets_total{reason="invalid-id"}') == 1
    assert delta(before, after, 'herald_connects_total{outcome="bad_request"}') == 1
    assert delta(before, after, 'herald_publish_errors_total{status="4xx"}') == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) is not installed")
def test_promtool_finds_nothing_to_say(metrics_node: Node) -> None:
    httpx.post(f"{metrics_node.url}/publish", json={"topic": "lint", "data": 1}, timeout=10)
    exposition = httpx.get(f"{metrics_node.url}/metrics", timeout=10).content
    result = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


KNOWN_LABELS = {
    "herald_resets": ("reason", RESET_REASONS),
    "herald_connects": ("outcome", CONNECT_OUTCOMES),
    "herald_publish_errors": ("status", PUBLISH_ERROR_CLASSES),
    "herald_connections_shed": ("reason", SHED_REASONS),
}
"""Every labelled herald_ counter whose label values are known in advance, and those values."""


@pytest.mark.parametrize("broker", BROKERS)
def test_regression_resets_total_is_exported_at_zero_before_any_reset(broker: str) -> None:
    """herald_resets_total appeared only after the first reset (a rate() or an alert on it saw nothing until
    then): a fresh node lists every known label value of every labelled counter, at 0."""
    env = {"REDIS_URL": redis_server.shared_server().url} if broker == "redis" else {}
    with run_server(env) as node:
        text = httpx.get(f"{node.url}/metrics", timeout=10).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert "herald_resets" in families
    for name, (label, values) in KNOWN_LABELS.items():
        if name not in families:
            assert name == "herald_connections_shed", name  # only with a connection guard (api.adapter)
            continue
        samples = {s.labels[label]: s.value for s in families[name].samples if s.name == f"{name}_total"}
        assert samples == dict.fromkeys(values, 0.0), name


def test_counted_label_values_outside_the_known_ones_are_still_exported() -> None:
    family = labelled_counter("herald_x", "X.", "reason", [("lost", 2), ("new-reason", 1)], known=RESET_REASONS)
    assert [(s.labels["reason"], s.value) for s in family.samples] == [
        *((reason, 2 if reason == "lost" else 0) for reason in RESET_REASONS),
        ("new-reason", 1),
    ]


def test_no_label_has_unbounded_values(metrics_node: Node) -> None:
    """No per-topic or per-client label: every herald_ family has a fixed, small set of series."""
    text = httpx.get(f"{metrics_node.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name.startswith("herald_"):
            labels = {name for sample in family.samples for name in sample.labels}
            assert labels <= {"outcome", "status", "reason", "le", "node_id", "version"}, family.name


def test_metrics_need_an_admin_token_with_access_control() -> None:
    secret = secrets.token_urlsafe(48)
    with run_server({"HERALD_JWT_SECRET": secret}) as node:
        assert httpx.get(f"{node.url}/metrics").status_code == 401
        reader = tokens.mint(secret, subscribe=["**"])
        assert httpx.get(f"{node.url}/metrics", headers={"Authorization": f"Bearer {reader}"}).status_code == 403
        admin = tokens.mint(secret, admin=True)
        assert httpx.get(f"{node.url}/metrics", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
        assert httpx.get(f"{node.url}/cluster").status_code == 401
    with run_server({"HERALD_JWT_SECRET": secret, "HERALD_METRICS_PUBLIC": "1"}) as node:
        assert httpx.get(f"{node.url}/metrics").status_code == 200


def test_metrics_can_be_turned_off() -> None:
    with run_server({"HERALD_METRICS": "0"}) as node:
        assert httpx.get(f"{node.url}/metrics").status_code == 404
        assert httpx.get(f"{node.url}/cluster").status_code == 200
