"""Hostile clients against a real node: one request never freezes it, idle sockets never fill it.

Each attack of the hostile-clients review is a test named after it. Each runs
while a canary subscriber listens and a producer publishes to it, and a probe
asks ``/healthz`` five times a second: the node must stay answering within a
second and the canary must get every accepted event, in order, once
(:func:`watched`). The attacks' own sockets are driven from threads, so the
test's event loop (the canary's, the probe's) stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import jwt
import pytest

from tests.server import Node, run_server
from tests.sse_client import EventStream, new_client

HEALTH_WITHIN = 1.0
"""Seconds ``/healthz`` must answer within, all through an attack."""

SECRET = "hostile-" + uuid.uuid4().hex * 2


@dataclass
class Watch:
    """What :func:`watched` saw: the canary's accepted ids, and how long each health probe took."""

    accepted: list[str] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def watched(node: Node, headers: dict[str, str] | None = None) -> AsyncIterator[Watch]:
    """A canary subscriber, a producer publishing to it every 50 ms and a health probe, around an attack."""
    topic = f"canary-{uuid.uuid4().hex[:8]}"
    watch = Watch()
    stop = asyncio.Event()
    async with await EventStream.open(node.url, [topic], headers=headers) as canary, new_client(timeout=10) as client:
        assert canary.response.status_code == 200

        async def produce() -> None:
            n = 0
            while not stop.is_set():
                answer = await client.post(f"{node.url}/publish", json={"topic": topic, "data": n}, headers=headers)
                assert answer.status_code == 201, answer.text
                watch.accepted.append(answer.json()["id"])
                n += 1
                await asyncio.sleep(0.05)  # a steady producer, not a flood

        async def probe() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    answer = await client.get(f"{node.url}/healthz", timeout=5)
                    if answer.status_code != 200:
                        watch.failures.append(f"/healthz {answer.status_code}")
                except httpx.HTTPError as exc:
                    watch.failures.append(f"/healthz {exc!r}")
                watch.health.append(time.monotonic() - started)
                await asyncio.sleep(0.2)

        tasks = [asyncio.create_task(produce()), asyncio.create_task(probe())]
        try:
            yield watch
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        got = [event.last_event_id for event in await canary.take(len(watch.accepted), timeout=20)]
    assert got == watch.accepted  # every accepted event, in order, once
    assert watch.failures == []
    assert max(watch.health) < HEALTH_WITHIN, sorted(watch.health)[-5:]


def metric(node: Node, name: str, labels: str = "") -> float:
    text = httpx.get(f"{node.url}/metrics", timeout=5).text
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, flags=re.M)
    return float(found.group(1)) if found else 0.0


def raw_answer(port: int, request: bytes, wait: float = 5, shut: bool = False, until: bytes | None = None) -> bytes:
    """Send ``request`` on a new connection and read until the node closes it (or ``wait`` passes, or ``until``
    has arrived)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        deadline = time.monotonic() + wait
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while time.monotonic() < deadline:
                piece = sock.recv(65536)
                if not piece:
                    break
                answer += piece
                if until is not None and until in answer:
                    break
        return answer


@pytest.fixture(scope="module")
def plain_node() -> Iterator[Node]:
    """A node with default settings but for a short heartbeat."""
    with run_server({"HERALD_HEARTBEAT": "1", "HERALD_NODE_ID": "hostile"}) as node:
        yield node


# -- one request, much work ------------------------------------------------------


@pytest.mark.timeout(60)
async def test_topic_selector_blowup_is_answered_in_milliseconds() -> None:
    """``HERALD_PUBLIC_TOPICS='metrics.*.*.*.*.*'`` and a topic of 150 dots froze a node 12.5 s; a token's
    200-star selector spun it until SIGKILL."""
    env = {"HERALD_JWT_SECRET": SECRET, "HERALD_PUBLIC_TOPICS": "metrics.*.*.*.*.*,canary-*"}
    now = int(time.time())
    publisher = jwt.encode({"exp": now + 600, "herald": {"publish": ["**"]}}, SECRET, algorithm="HS256")
    starry = jwt.encode({"exp": now + 600, "herald": {"subscribe": ["*." * 200]}}, SECRET, algorithm="HS256")
    with run_server(env) as node:
        slowest = 0.0
        async with watched(node, {"Authorization": f"Bearer {publisher}"}), new_client(timeout=10) as client:
            for _ in range(3):
                for topic in ["metrics." + "." * 150 + "/", "metrics" + "." * 190 + "x/", "a" * 199 + "/"]:
                    for headers in [{}, {"Authorization": f"Bearer {starry}"}]:
                        started = time.monotonic()
                        async with client.stream(
                            "GET", f"{node.url}/events", params={"topic": topic}, headers=headers
                        ) as answer:
                            status = answer.status_code
                        slowest = max(slowest, time.monotonic() - started)
                        assert status in (401, 403), status
            covered = "metrics." + "a." * 4 + "b"
            async with await EventStream.open(node.url, [covered]) as stream:
                assert stream.response.status_code == 200  # the public selector still covers what it should
    assert slowest < HEALTH_WITHIN
    print(f"\nselector blow-up: 18 crafted subscribes, the slowest answered in {slowest * 1000:.1f} ms")


# -- connections that do nothing -------------------------------------------------


def hold_sockets(
    port: int, idle: int, slow: int, until_closed: float, expect: int | None = None
) -> tuple[int, int, float]:
    """Open ``idle`` silent sockets and ``slow`` slowloris ones (a header byte a second); wait for the node to close
    them all (or ``expect`` of them). How many it closed, how many it had refused at connect, and the seconds
    until the last closed."""
    sockets: list[socket.socket] = []
    refused = 0
    started = time.monotonic()
    for i in range(idle + slow):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            refused += 1
            continue
        sock.setblocking(False)
        if i >= idle:
            sock.send(b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        sockets.append(sock)
    poller = select.epoll()
    slowloris = {s.fileno(): s for s in sockets[idle - refused :]} if slow else {}
    for sock in sockets:
        poller.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    open_ = {s.fileno(): s for s in sockets}
    closed = 0
    last_drip = time.monotonic()
    last_closed = 0.0
    deadline = started + until_closed
    try:
        while open_ and time.monotonic() < deadline and (expect is None or closed < expect):
            for fd, _ in poller.poll(0.2):
                if fd not in open_:
                    continue
                sock = open_.pop(fd)
                with contextlib.suppress(OSError):
                    while sock.recv(65536):
                        pass
                poller.unregister(fd)
                sock.close()
                slowloris.pop(fd, None)
                closed += 1
                last_closed = time.monotonic() - started
            if time.monotonic() - last_drip >= 1:
                last_drip = time.monotonic()
                for sock in list(slowloris.values()):
                    with contextlib.suppress(OSError):
                        sock.send(b"a")
    finally:
        for sock in open_.values():
            sock.close()
        poller.close()
    return closed, refused, last_closed


@pytest.mark.timeout(120)
async def test_idle_sockets_and_slowloris_are_closed_within_the_header_timeout(plain_node: Node) -> None:
    """12,000 idle sockets and 500 slowloris: the node closed none in 60 s, and ran out of descriptors at ~20,000."""
    shed_before = metric(plain_node, "herald_connections_shed_total", '{reason="header_timeout"}')
    async with watched(plain_node):
        closed, refused, last = await asyncio.to_thread(hold_sockets, plain_node.port, 12_000, 500, 60)
    assert refused == 0
    assert closed == 12_500
    assert last < 60
    shed = metric(plain_node, "herald_connections_shed_total", '{reason="header_timeout"}') - shed_before
    assert shed >= 12_500
    assert "sent no complete request head within HERALD_HEADER_TIMEOUT" in plain_node.log()
    print(
        f"\n12,000 idle + 500 slowloris sockets: all closed by the node within {last:.1f} s; /healthz and canary fine"
    )


@pytest.mark.timeout(120)
async def test_past_the_socket_cap_the_oldest_idle_connections_make_room() -> None:
    """Out of file descriptors, the node refused everyone for 25 s: now it sheds idle sockets instead."""
    with run_server({"HERALD_MAX_SOCKETS": "1500", "HERALD_HEADER_TIMEOUT": "60"}) as node:
        async with watched(node):
            closed, refused, _ = await asyncio.to_thread(hold_sockets, node.port, 3000, 0, 30, 1500)
            async with new_client(timeout=5) as fresh:  # a new client still gets in
                assert (await fresh.get(f"{node.url}/healthz")).status_code == 200
        assert refused == 0
        assert closed >= 1500  # the oldest idle ones made room for the newer (and for the canary's requests)
        assert metric(node, "herald_connections_shed_total", '{reason="too_many_sockets"}') >= 1500
        async with asyncio.timeout(5):
            while "came past HERALD_MAX_SOCKETS" not in node.log():
                await asyncio.sleep(0.1)  # told at the guard's next sweep (one a second)


# -- requests too large to read --------------------------------------------------


def huge_header(port: int) -> tuple[bytes, float]:
    """A request whose one header is 48 MB: what the node answers, and in how long."""
    started = time.monotonic()
    head = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Huge: "
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
            for _ in range(48):
                sock.sendall(b"a" * 1_000_000)
        answer = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while piece := sock.recv(65536):
                answer += piece
    return answer, time.monotonic() - started


@pytest.mark.timeout(60)
async def test_huge_headers_are_refused_before_they_are_read(plain_node: Node) -> None:
    """Four requests with a 48 MB header took 10.4 s to refuse, with /healthz at 2.5 s."""
    async with watched(plain_node):
        answers = await asyncio.gather(*(asyncio.to_thread(huge_header, plain_node.port) for _ in range(4)))
        long_line = await asyncio.to_thread(
            raw_answer, plain_node.port, b"GET /events?topic=" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
        )
    for answer, seconds in answers:
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
        assert seconds < 5
    assert long_line.startswith(b"HTTP/1.1 414 "), long_line[:80]
    print(f"\n4 x 48 MB headers: each refused (431) in at most {max(s for _, s in answers):.2f} s")


# -- memory ------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_replay_buffer_over_many_topics_stays_under_its_byte_ceiling() -> None:
    """65 batches of 200 x 60 KB over 13,000 topics grew a node by 764 MB, kept for an hour."""
    ceiling = 16 * 1024 * 1024
    with run_server({"HERALD_REPLAY_MAX_BYTES": str(ceiling)}) as node:
        async with watched(node), new_client(timeout=30) as client:
            stats = (await client.get(f"{node.url}/stats")).json()
            rss_before = stats["rss_bytes"]
            payload = "x" * 60_000
            first: str | None = None
            # The attack's 12 MB batches are refused now (they could not reach a subscriber at once); 15 events
            # of 60 KB fit a subscriber's buffer. 200 MB over 3,300 topics, sixteen times the ceiling.
            for batch in range(220):
                body = [{"topic": f"flood-{batch}-{i}", "data": payload} for i in range(15)]
                answer = await client.post(f"{node.url}/publish", json=body)
                assert answer.status_code == 201, answer.text
                first = first or answer.json()[0]["id"]
            refused = await client.post(
                f"{node.url}/publish", json=[{"topic": f"big-{i}", "data": payload} for i in range(200)]
            )
            stats = (await client.get(f"{node.url}/stats")).json()
        assert first is not None
        async with await EventStream.open(node.url, ["flood-0-0"], last_event_id=str(int(first) - 1)) as stream:
            reset = await stream.next_event()
    assert refused.status_code == 413
    assert "HERALD_CLIENT_BUFFER" in refused.json()["detail"]
    assert stats["broker"]["retained_bytes"] <= ceiling
    grown = stats["rss_bytes"] - rss_before
    assert grown < ceiling + 48 * 1024 * 1024, f"RSS grew by {grown / 1e6:.0f} MB"
    assert reset.type == "reset"  # the oldest went first: resuming before them is told so
    print(f"\n200 MB published over 3,300 topics, replay ceiling 16 MiB: RSS +{grown / 1e6:.0f} MB")


@pytest.mark.timeout(60)
async def test_distinct_long_query_strings_keep_memory_flat(plain_node: Node) -> None:
    """1,000 distinct 60 KB query strings grew a node by 133 MB (the lane kept them)."""
    async with new_client(timeout=10) as client:
        rss_before = (await client.get(f"{plain_node.url}/stats")).json()["rss_bytes"]

        def ask(i: int) -> bytes:
            query = "&".join(f"topic=q{i}-{n}-" + "a" * 190 for n in range(60))  # 12 KB, under the 16 KiB line cap
            request = f"GET /events?{query} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
            return raw_answer(plain_node.port, request, wait=5, until=b"retry: ")

        async with watched(plain_node):
            for start in range(0, 1000, 50):
                answers = await asyncio.gather(*(asyncio.to_thread(ask, i) for i in range(start, start + 50)))
                assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
        rss_after = (await client.get(f"{plain_node.url}/stats")).json()["rss_bytes"]
    assert rss_after - rss_before < 24 * 1024 * 1024, f"RSS grew by {(rss_after - rss_before) / 1e6:.0f} MB"
    print(f"\n1,000 distinct 12 KB query strings: RSS +{(rss_after - rss_before) / 1e6:.1f} MB")


# -- logs ---------------------------------------------------------------------------


def aborted_publish(port: int) -> None:
    """A publish that promises 100 kB of body, sends 10 kB and goes away."""
    head = b"POST /publish HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + b'[{"topic":"x","data":"' + b"a" * 10_000)
        time.sleep(0.05)  # the node reads some of the body before the client goes (what the attack did)


@pytest.mark.timeout(60)
async def test_publishes_aborted_mid_body_are_counted_not_logged_each(plain_node: Node) -> None:
    """200 publishes aborted mid-body wrote 14,400 log lines (a 72-line traceback each)."""
    before = metric(plain_node, "herald_client_disconnects_total")
    lines_before = len(plain_node.log().splitlines())
    async with watched(plain_node):
        for _ in range(10):
            await asyncio.gather(*(asyncio.to_thread(aborted_publish, plain_node.port) for _ in range(20)))
        async with asyncio.timeout(10):
            while metric(plain_node, "herald_client_disconnects_total") - before < 200:
                await asyncio.sleep(0.1)  # the node counts them as it notices
    new_lines = plain_node.log().splitlines()[lines_before:]
    assert "Traceback" not in "\n".join(new_lines)
    assert len(new_lines) <= 3, new_lines
    assert metric(plain_node, "herald_client_disconnects_total") - before == 200
    print(f"\n200 publishes aborted mid-body: {len(new_lines)} log line(s), counted 200")


# -- limits that agree -------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_subscriber_reading_at_full_speed_is_never_cut_off_by_an_accepted_publish(plain_node: Node) -> None:
    """An accepted 12 MB batch cut a full-speed reader off before it got one event (1 MiB buffer, 16 MiB body)."""
    topic = f"big-{uuid.uuid4().hex[:8]}"
    payload = "x" * 60_000
    async with await EventStream.open(plain_node.url, [topic]) as stream, new_client(timeout=30) as client:
        refused = await client.post(f"{plain_node.url}/publish", json=[{"topic": topic, "data": payload}] * 200)
        fits = [{"topic": topic, "data": payload + str(i)} for i in range(16)]  # 16 x 60 KB: under 1 MiB
        accepted = await client.post(f"{plain_node.url}/publish", json=fits)
        got = await stream.take(16, timeout=20)
    assert refused.status_code == 413
    assert "HERALD_CLIENT_BUFFER" in refused.json()["detail"]
    assert accepted.status_code == 201
    assert [e.data for e in got] == [payload + str(i) for i in range(16)]


@pytest.mark.timeout(60)
async def test_a_client_cut_off_is_told_why_before_its_stream_ends() -> None:
    """A cut-off stream ended with no word of why."""
    env = {"HERALD_CLIENT_BUFFER": "65536", "HERALD_MAX_EVENT_BYTES": "40000"}
    with run_server(env) as node:
        topic = f"slow-{uuid.uuid4().hex[:8]}"
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", node.port))
        slow.sendall(f"GET /events?topic={topic} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        async with new_client(timeout=10) as client:
            async with asyncio.timeout(30):
                while (await client.get(f"{node.url}/stats")).json()["hub"]["cutoffs"] == 0:
                    await client.post(f"{node.url}/publish", json={"topic": topic, "data": "x" * 30_000})
        slow.settimeout(15)
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while piece := slow.recv(1 << 20):
                received += piece
        slow.close()
    assert b"cut off: this client fell further behind than HERALD_CLIENT_BUFFER allows" in received
    assert received.endswith(b"\r\n0\r\n\r\n")  # then the response ended as HTTP says


# -- smaller things ------------------------------------------------------------------


def test_http_1_0_gets_a_stream_without_chunking(plain_node: Node) -> None:
    answer = raw_answer(plain_node.port, b"GET /events?topic=old HTTP/1.0\r\n\r\n", wait=1.5)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body.startswith(b"retry: ")  # the stream's bytes as they are, no chunk sizes


def test_http_1_1_without_host_is_refused(plain_node: Node) -> None:
    assert raw_answer(plain_node.port, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_answer(plain_node.port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")


def responses(raw: bytes) -> list[int]:
    """The statuses of the complete HTTP/1.1 responses ``raw`` is made of; AssertionError if it is anything else
    (a response cut short, bytes inside a stream that are not its chunks, bytes after the last response)."""
    statuses = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"an unfinished head: {head[:80]!r}"
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 "), lines[0]
        statuses.append(int(lines[0].split()[1]))
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
        if b"content-length" in fields:
            length = int(fields[b"content-length"])
            assert len(raw) >= length
            raw = raw[length:]
        else:
            assert fields.get(b"transfer-encoding") == b"chunked", fields
            while True:
                size_line, sep, raw = raw.partition(b"\r\n")
                assert sep, "a chunk size without its line end"
                assert re.fullmatch(rb"[0-9a-f]+", size_line), f"not a chunk: {size_line[:80]!r}"
                size = int(size_line, 16)
                assert raw[size : size + 2] == b"\r\n", f"a chunk of {size} bytes not ended by CRLF"
                raw = raw[size + 2 :]
                if size == 0:
                    break
    return statuses


@pytest.mark.parametrize("resume", [False, True], ids=["lane", "app"])
def test_garbage_pipelined_behind_a_stream_gets_a_clean_400_after_it(plain_node: Node, resume: bool) -> None:
    """Garbage pipelined after a lane-answered GET /events landed inside the stream."""
    header = b"Last-Event-ID: 1\r\n" if resume else b""  # a resume takes the app's way
    request = b"GET /events?topic=pipelined HTTP/1.1\r\nHost: a\r\n" + header + b"\r\n" + b"\x00GARBAGE\r\n\r\n"
    statuses = responses(raw_answer(plain_node.port, request, wait=3))
    # The stream, ended by its last chunk, then the 400; or, when the garbage came before the stream's answer
    # started, the 400 alone. Never the 400's bytes inside a stream.
    assert statuses in ([200, 400], [400])
    if not resume:
        assert statuses == [200, 400]  # the lane answers at once: its stream comes first


async def test_the_guard_holds_nothing_for_streams(plain_node: Node) -> None:
    """Only connections waiting for their request are tracked: an open stream is not."""
    streams = [await EventStream.open(plain_node.url, ["waiting"]) for _ in range(20)]
    try:
        for stream in streams:
            await asyncio.wait_for(stream.first_bytes.wait(), 10)
        assert metric(plain_node, "herald_connections_waiting") <= 1  # the scrape's own request, at most
    finally:
        for stream in streams:
            await stream.close()
