"""The shipped front (``ops/nginx.conf.template``) facing the internet: TLS and HTTP/2, limits, what it serves.

A real nginx in front of a real node. "Outside" clients connect from
127.0.0.2 (any 127.0.0.0/8 address reaches loopback), which is not in the
front's lists of trusted addresses (``FrontPolicy``: 127.0.0.1 and ::1).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ops.nginx import FrontPolicy
from tests.browser import CHROMIUM, chromium
from tests.server import Node, nginx_available, run_front, run_server
from tests.sse_client import EventStream, new_client

pytestmark = pytest.mark.skipif(not nginx_available(), reason="nginx is not installed")

OUTSIDE = "127.0.0.2"
ORIGIN = "https://app.example"


def outside_client(**options: object) -> httpx.AsyncClient:
    """A client whose connections come from :data:`OUTSIDE`, an address the front does not trust."""
    return new_client(transport=httpx.AsyncHTTPTransport(local_address=OUTSIDE), **options)


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with run_server({"HERALD_HEARTBEAT": "2", "HERALD_CORS_ORIGINS": ORIGIN}) as node:
        yield node


@pytest.fixture(scope="module")
def front(node: Node) -> Iterator[Node]:
    policy = FrontPolicy(
        heartbeat=2, header_timeout=2, streams_per_address=5, publish_rate=5, publish_burst=5, cors_origins=(ORIGIN,)
    )
    with run_front([node.port], policy=policy) as front:
        yield front


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
         "-out", str(cert), "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


async def test_operators_pages_are_not_served_to_the_outside(front: Node) -> None:
    async with outside_client(timeout=10) as outside, new_client(timeout=10) as local:
        for path in ("/metrics", "/stats", "/cluster", "/dashboard", "/docs", "/openapi.json"):
            assert (await outside.get(f"{front.url}{path}")).status_code == 403, path
            assert (await local.get(f"{front.url}{path}")).status_code == 200, path
        assert (await outside.get(f"{front.url}/healthz")).status_code == 200  # the rest is served


async def test_publishing_from_outside_is_rate_limited_and_told_when_to_retry(front: Node) -> None:
    topic = f"limited-{uuid.uuid4().hex[:8]}"
    async with outside_client(timeout=10) as outside, new_client(timeout=10) as local:
        answers = [await outside.post(f"{front.url}/publish", json={"topic": topic, "data": i}) for i in range(30)]
        locals_ = [await local.post(f"{front.url}/publish", json={"topic": topic, "data": i}) for i in range(30)]
    limited = [a for a in answers if a.status_code == 429]
    assert limited, [a.status_code for a in answers]
    assert {a.status_code for a in answers} <= {201, 429}
    assert all(a.headers["retry-after"] == "1" and "retry" in a.json()["detail"] for a in limited)
    assert {a.status_code for a in locals_} == {201}  # the machine's own producers are not limited


async def test_too_many_streams_from_one_address_are_told_to_come_back_later(front: Node) -> None:
    topic = f"streams-{uuid.uuid4().hex[:8]}"
    async with outside_client(timeout=httpx.Timeout(10, read=None)) as outside:
        streams = [await EventStream.open(front.url, [topic], client=outside) for _ in range(5)]
        try:
            for stream in streams:
                assert stream.response.status_code == 200
            async with outside.stream("GET", f"{front.url}/events", params={"topic": topic}) as busy:
                body = (await busy.aread()).decode()
                status, media = busy.status_code, busy.headers["content-type"]
        finally:
            for stream in streams:
                await stream.close()
    assert (status, media) == (200, "text/event-stream")  # what EventSource retries, not a 429
    retry = int(re.search(r"^retry: (\d+)$", body, flags=re.M).group(1))  # type: ignore[union-attr]
    assert 15_000 <= retry <= 30_000


def test_the_front_names_no_version_and_ties_its_stream_timeout_to_the_heartbeat(front: Node) -> None:
    answer = httpx.get(f"{front.url}/healthz", timeout=5)
    assert answer.headers["server"] == "nginx"
    conf = (front.log_path.parent.parent / "nginx.conf").read_text()
    assert "proxy_read_timeout 3s;" in conf  # HERALD_HEARTBEAT (2 s here) and a 1 s margin, on streams


@pytest.fixture(scope="module")
def nodeless_front() -> Iterator[Node]:
    """A front whose one node is not there: every stream gets nginx's own retry answer."""
    from ops.probe import free_port

    with run_front([free_port()], policy=FrontPolicy(cors_origins=(ORIGIN,))) as front:
        yield front


async def test_retry_answers_spread_their_reconnects_and_name_only_allowed_origins(nodeless_front: Node) -> None:
    async with new_client(timeout=10) as client:
        retries = set()
        for _ in range(40):
            answer = await client.get(f"{nodeless_front.url}/events", params={"topic": "t"})
            assert (answer.status_code, answer.headers["content-type"]) == (200, "text/event-stream")
            retries.add(int(re.search(r"^retry: (\d+)$", answer.text, flags=re.M).group(1)))  # type: ignore[union-attr]
        allowed = await client.get(f"{nodeless_front.url}/events", params={"topic": "t"}, headers={"Origin": ORIGIN})
        other = await client.get(
            f"{nodeless_front.url}/events", params={"topic": "t"}, headers={"Origin": "https://evil.example"}
        )
    assert len(retries) >= 4  # spread, not every client in the same second
    assert all(1000 <= r <= 2875 for r in retries)
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-credentials" not in other.headers


def slow_head(port: int) -> float:
    """Send half a request head and wait: seconds until the front closes the connection."""
    import socket
    import time

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
        while sock.recv(4096):
            pass
    return time.monotonic() - started


@pytest.mark.timeout(60)
async def test_the_front_closes_a_request_head_that_never_ends(front: Node) -> None:
    seconds = await asyncio.to_thread(slow_head, front.port)
    assert 1.5 <= seconds <= 10  # client_header_timeout: 2 s for this front (10 s by default)
    assert "client_header_timeout 2s;" in (front.log_path.parent.parent / "nginx.conf").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
@pytest.mark.timeout(120)
async def test_a_page_holds_ten_event_sources_to_one_origin_over_http2(
    node: Node, certificate: tuple[str, str]
) -> None:
    """Over HTTP/1.1 a browser gives a host six connections: a page's seventh EventSource waits forever."""
    topic = f"tabs-{uuid.uuid4().hex[:8]}"
    with run_front([node.port], policy=FrontPolicy(heartbeat=2, tls=certificate)) as front:
        assert front.url.startswith("https://")
        async with chromium() as browser:
            await browser.send("Security.setIgnoreCertificateErrors", {"ignore": True})
            await browser.navigate(f"{front.url}/healthz")
            await browser.evaluate(
                f"""window.got = []; window.sources = [];
                for (let i = 0; i < 10; i++) {{
                    const source = new EventSource('/events?topic={topic}');
                    source.onmessage = (e) => window.got.push([i, e.data]);
                    window.sources.push(source);
                }}
                window.protocol = performance.getEntriesByType('navigation')[0].nextHopProtocol; true"""
            )
            await browser.until("window.sources.every((s) => s.readyState === 1)", timeout=20)
            async with httpx.AsyncClient(verify=False, timeout=10) as client:  # the test's own certificate
                published = await client.post(f"{front.url}/publish", json={"topic": topic, "data": "hello"})
                assert published.status_code == 201
            got = await browser.until("window.got.length >= 10 && window.got", timeout=20)
            protocol = await browser.until("window.protocol", timeout=10)
    assert sorted(i for i, _ in got) == list(range(10))
    assert {data for _, data in got} == {"hello"}
    assert protocol == "h2"


def test_the_cluster_serves_https_with_a_certificate_of_its_own(tmp_path: Path) -> None:
    from ops.cluster import Cluster

    cluster = Cluster(tmp_path / "c", tls=True)
    cluster.make_certificate()
    certificate, key = cluster.certificate
    assert cluster.front_url.startswith("https://127.0.0.1:")
    assert key.stat().st_mode & 0o077 == 0  # the key: its owner's only
    text = subprocess.run(
        ["openssl", "x509", "-in", str(certificate), "-noout", "-text"], check=True, capture_output=True, text=True
    ).stdout
    assert "IP Address:127.0.0.1" in text
    assert cluster.front_policy().tls == (str(certificate), str(key))
