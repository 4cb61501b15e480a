"""Streams answered by Herald's protocol itself (api.adapter.lane): the same answer, the same guarantees, no task.

The protocol is driven over a transport that records its writes, with a real
hub on the embedded broker; the last test compares the lane's answer with
the app's on a real node, byte for byte.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from uvicorn.server import ServerState

from api.adapter import writes
from api.adapter.lane import QUERIES_KEPT, LaneStream, StreamLane
from api.adapter.protocol import HeraldHttpToolsProtocol
from api.auth.access import Access
from api.auth.cors import Cors
from api.core.connection import Closed, Connection
from api.core.hub import Hub
from api.core.sse import CUT_OFF_NOTICE
from api.settings import Settings
from api.token import mint
from broker.base import Message
from broker.memory import MemoryBroker
from tests.adapter.test_protocol import RecordingTransport
from tests.server import run_server

TOPIC = "lane-topic"
DEFAULT_HEADERS = [(b"date", b"Thu, 01 Jan 2026 00:00:00 GMT"), (b"server", b"uvicorn")]


class Transport(RecordingTransport):
    """A recording transport whose writes and closing can be awaited."""

    def __init__(self) -> None:
        super().__init__()
        self.written = asyncio.Event()
        self.aborted = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.written.set()

    def abort(self) -> None:
        super().abort()
        self.aborted = True

    async def next_write(self) -> bytes:
        async with asyncio.timeout(5):
            while not self.writes:
                self.written.clear()
                await self.written.wait()
        return self.writes.pop(0)


class App:
    """An ASGI app with a lane: what reaches it is what the lane left to the app."""

    def __init__(self) -> None:
        self.stream_lane: StreamLane | None = None
        self.requests: list[str] = []
        self.called = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.requests.append(f"{scope['method']} {scope['path']}")
        self.called.set()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"3")]})
        await send({"type": "http.response.body", "body": b"app"})


@dataclass
class Node:
    broker: MemoryBroker
    hub: Hub
    app: App
    first: Connection
    """A client of TOPIC opened the usual way: the node feeds the topic."""
    access: Access

    def serve(self, request: bytes) -> tuple[HeraldHttpToolsProtocol, Transport]:
        config = uvicorn.Config(self.app, http=HeraldHttpToolsProtocol, log_config=None, lifespan="off")
        state = ServerState()
        state.default_headers = list(DEFAULT_HEADERS)
        protocol = HeraldHttpToolsProtocol(config, state, {}, asyncio.get_running_loop())
        protocol.access_log = False  # as a node runs (uvicorn asks the logger, and pytest's handlers answer)
        transport = Transport()
        transport.protocol = protocol
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(request)
        return protocol, transport

    def clients(self) -> int:
        return self.hub.stats()["connections"]

    async def publish(self, *data: str) -> list[int]:
        events = await self.broker.publish([Message(TOPIC, d) for d in data])
        return [e.id for e in events]


SECRET = "lane-test-secret-" + "x" * 40


def node_with(client_buffer: int = 1 << 20, cors: str | None = None, auth: bool = False) -> Any:
    @pytest.fixture
    async def fixture() -> AsyncIterator[Node]:
        broker = MemoryBroker()
        hub = Hub(broker, client_buffer=client_buffer, heartbeat=60)
        await broker.start(hub)
        await hub.start()
        first = (await hub.connect([TOPIC], None)).connection
        app = App()
        settings = Settings(node_id="n1", retry_ms=1500, max_topics=3, jwt_secret=SECRET if auth else None)
        access = Access.from_settings(settings)
        await access.start()
        app.stream_lane = StreamLane(hub, settings, access, Cors.parse(cors))
        try:
            yield Node(broker, hub, app, first, access)
        finally:
            await access.close()
            await hub.close()
            await broker.close()

    return fixture


node = node_with()
small_node = node_with(client_buffer=300)
cors_node = node_with(cors="https://app.example")
auth_node = node_with(auth=True)


def request(target: str = f"/events?topic={TOPIC}", *headers: str, method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: a", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunks(body: bytes) -> list[bytes]:
    out = []
    while body:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        out.append(body[:n])
        body = body[n + 2 :]
    return out


async def test_a_fresh_stream_on_a_fed_topic_is_answered_by_the_protocol_with_no_task(node: Node) -> None:
    protocol, transport = node.serve(request())
    position = node.broker.position_now([TOPIC])
    assert transport.writes == [
        b"HTTP/1.1 200 OK\r\n"
        b"date: Thu, 01 Jan 2026 00:00:00 GMT\r\nserver: uvicorn\r\n"
        b"content-type: text/event-stream\r\ncache-control: no-cache\r\nx-accel-buffering: no\r\n"
        b"x-node-id: n1\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(f"retry: 1500\nid: {position}\n\n")
        + f"retry: 1500\nid: {position}\n\n\r\n".encode()
    ]
    assert isinstance(protocol.cycle, LaneStream)
    assert not protocol.tasks  # uvicorn started no task for it
    assert node.app.requests == []
    assert node.clients() == 2
    assert node.hub.connections_total == 2


async def test_lane_streams_get_every_event_once_in_order(node: Node) -> None:
    served = [node.serve(request()) for _ in range(3)]
    for _, transport in served:
        await transport.next_write()  # the head
    ids = await node.publish("a", "b")
    ids += await node.publish("c")
    for _, transport in served:
        received = b""
        while received.count(b"\n\n") < 3:
            received += b"".join(chunks(await transport.next_write()))
        assert received == "".join(f"id: {i}\ndata: {d}\n\n" for i, d in zip(ids, "abc", strict=True)).encode()


@pytest.mark.parametrize(
    ("what", "raw"),
    [
        ("a resume", request(f"/events?topic={TOPIC}", "Last-Event-ID: 5")),
        ("a resume in the query", request(f"/events?topic={TOPIC}&last_event_id=5")),
        ("an invalid topic", request("/events?topic=a%20b")),
        ("no topic", request("/events")),
        ("too many topics", request(f"/events?topic={TOPIC}&topic=b&topic=c&topic=d")),
        ("HEAD", request(method="HEAD")),
        ("HTTP/1.0", request(version="1.0")),
        ("a body", request(f"/events?topic={TOPIC}", "Content-Length: 2") + b"{}"),
        ("another path", request(f"/events/x?topic={TOPIC}")),
        ("an expected 100-continue", request(f"/events?topic={TOPIC}", "Expect: 100-continue")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
async def test_what_the_lane_cannot_answer_goes_to_the_app(node: Node, what: str, raw: bytes) -> None:
    protocol, _ = node.serve(raw)
    async with asyncio.timeout(5):
        await node.app.called.wait()
    assert not isinstance(protocol.cycle, LaneStream), what
    assert node.clients() == 1  # the lane registered nothing
    assert node.hub.connections_total == 1


async def test_a_topics_first_client_on_the_node_has_the_feed_take_it(node: Node) -> None:
    protocol, transport = node.serve(request("/events?topic=new"))
    await transport.next_write()
    assert isinstance(protocol.cycle, LaneStream)
    assert node.broker.stats()["topics_subscribed"] == 2
    assert node.hub.stats()["topics_subscribed"] == 2
    event = (await node.broker.publish([Message("new", "first")]))[0]
    assert b"".join(chunks(await transport.next_write())) == f"id: {event.id}\ndata: first\n\n".encode()


async def test_no_lane_while_the_feeds_topics_change(node: Node) -> None:
    async with node.hub._sub_lock:  # a reconcile under way
        protocol, _ = node.serve(request())
        assert not isinstance(protocol.cycle, LaneStream)
    async with asyncio.timeout(5):
        await node.app.called.wait()


async def test_a_blank_resume_is_a_fresh_stream(node: Node) -> None:
    protocol, _ = node.serve(request(f"/events?topic={TOPIC}", "Last-Event-ID: "))
    assert isinstance(protocol.cycle, LaneStream)


async def test_a_draining_node_leaves_the_stream_to_the_app(node: Node) -> None:
    node.hub.drain()
    protocol, _ = node.serve(request())
    async with asyncio.timeout(5):
        await node.app.called.wait()
    assert not isinstance(protocol.cycle, LaneStream)


async def test_a_drained_lane_stream_ends_its_body_and_the_pipelined_request_follows(node: Node) -> None:
    _, transport = node.serve(request() + request("/healthz"))
    await transport.next_write()
    assert node.app.requests == []  # queued behind the stream
    node.hub.drain()
    assert await transport.next_write() == b"0\r\n\r\n"
    async with asyncio.timeout(5):
        await node.app.called.wait()
    assert node.app.requests == ["GET /healthz"]
    assert node.first.closed is Closed.SHUTDOWN
    assert node.clients() == 1  # the lane's stream detached itself; the first client has no writer to do it
    assert not transport.closed  # kept alive


async def test_a_lane_stream_on_a_connection_not_kept_alive_is_closed_at_its_end(node: Node) -> None:
    _, transport = node.serve(request(f"/events?topic={TOPIC}", "Connection: close"))
    assert b"connection: close\r\n" in await transport.next_write()
    node.hub.drain()
    assert await transport.next_write() == b"0\r\n\r\n"
    assert transport.closed


async def test_a_client_gone_is_detached_with_nothing_more_written(node: Node) -> None:
    protocol, transport = node.serve(request())
    await transport.next_write()
    assert node.clients() == 2
    protocol.connection_lost(None)
    async with asyncio.timeout(5):
        while node.clients() != 1:
            await asyncio.sleep(0)  # detached on the next loop turns (api.adapter.lane: LaneStream.woken)
    await node.publish("after")
    await asyncio.sleep(0)
    assert transport.writes == []


async def test_a_paused_socket_gets_what_waited_once_it_resumes(node: Node) -> None:
    protocol, transport = node.serve(request())
    await transport.next_write()
    protocol.pause_writing()
    ids = await node.publish("a", "b")
    for _ in range(5):
        await asyncio.sleep(0)  # rounds would have written by now (they run on the next loop turns)
    assert transport.writes == []
    protocol.resume_writing()
    written = b"".join(chunks(await transport.next_write()))
    assert written == f"id: {ids[0]}\ndata: a\n\nid: {ids[1]}\ndata: b\n\n".encode()


async def test_regression_a_paused_lane_stream_past_its_budget_is_cut_off(
    small_node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    protocol, transport = small_node.serve(request())
    await transport.next_write()
    protocol.pause_writing()
    monkeypatch.setattr(writes, "CUT_OFF_GRACE", 0.05)
    await small_node.publish(*["x" * 100] * 5)  # 5 frames of over 100 bytes: past the 300-byte budget
    # The stream says why, ends its response and closes; the connection is dropped after a grace if unread.
    assert transport.closed
    assert transport.writes == [b"%x\r\n%b\r\n0\r\n\r\n" % (len(CUT_OFF_NOTICE), CUT_OFF_NOTICE)]
    assert not transport.aborted
    async with asyncio.timeout(5):
        while not transport.aborted:
            await asyncio.sleep(0.01)  # the grace (made short here) runs out
    protocol.connection_lost(None)  # what the close leads to
    async with asyncio.timeout(5):
        while small_node.clients() != 1:
            await asyncio.sleep(0)
    assert small_node.hub.cutoffs == 1


async def test_lane_answers_carry_the_cors_headers_of_the_app(cors_node: Node) -> None:
    _, transport = cors_node.serve(request(f"/events?topic={TOPIC}", "Origin: https://app.example"))
    head = await transport.next_write()
    assert b"access-control-allow-origin: https://app.example\r\n" in head
    assert b"access-control-allow-credentials: true\r\n" in head
    assert b"vary: Origin\r\n" in head
    _, other = cors_node.serve(request(f"/events?topic={TOPIC}", "Origin: https://evil.example"))
    head = await other.next_write()
    assert b"access-control-allow-origin" not in head
    assert b"vary: Origin\r\n" in head


def _read_head_and_first_chunk(sock: socket.socket) -> tuple[list[bytes], bytes]:
    """The response head's lines and the body's first chunk (the stream's first bytes)."""
    data = b""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        size, crlf, body = rest.partition(b"\r\n")
        if sep and crlf and len(body) >= int(size, 16) + 2:
            return head.split(b"\r\n"), body[: int(size, 16)]
        received = sock.recv(65536)
        assert received, "the node closed the connection"
        data += received


async def test_the_lane_answers_byte_for_byte_as_the_app_on_a_real_node(topic: str) -> None:
    with run_server() as real:

        def open_stream(extra: str = "") -> tuple[socket.socket, list[bytes], bytes]:
            sock = socket.create_connection(("127.0.0.1", real.port), timeout=5)
            sock.sendall(f"GET /events?topic={topic} HTTP/1.1\r\nHost: t\r\nOrigin: https://x\r\n{extra}\r\n".encode())
            head, first = _read_head_and_first_chunk(sock)
            return sock, head, first

        async def tasks() -> int:
            async with httpx.AsyncClient() as client:
                return int((await client.get(f"{real.url}/stats")).json()["hub"]["tasks"])

        before = await tasks()
        # A request that expects a 100-continue takes the app's way (api.adapter.lane), to the same answer.
        by_app = await asyncio.to_thread(open_stream, "Expect: 100-continue\r\n")
        after_app = await tasks()
        by_lane = [await asyncio.to_thread(open_stream) for _ in range(20)]
        after_lane = await tasks()
        try:
            assert after_app >= before + 1  # the app's stream is a task
            assert after_lane - after_app <= 2  # the lane's 20 are not (a request of the node's own may be running)
            without_date = [line for line in by_app[1] if not line.startswith(b"date:")]
            for _, head, first in by_lane:
                assert [line for line in head if not line.startswith(b"date:")] == without_date
                assert first == by_app[2]
        finally:
            for sock, _, _ in [by_app, *by_lane]:
                sock.close()


async def test_a_query_is_parsed_and_checked_once_and_the_memory_of_queries_is_bounded(node: Node) -> None:
    lane = node.app.stream_lane
    assert lane is not None
    assert lane._subscription_of(b"topic=a&topic=b&topic=a") == (
        ("a", "b"),
        [("topic", "a"), ("topic", "b"), ("topic", "a")],
    )
    assert lane._queries[b"topic=a&topic=b&topic=a"] is not None
    assert lane._subscription_of(b"topic=a&last_event_id=7") is None
    assert lane._subscription_of(b"topic=a%20b") is None
    for i in range(QUERIES_KEPT + 10):
        lane._subscription_of(f"topic=t{i}".encode())
    assert len(lane._queries) <= QUERIES_KEPT


async def test_a_token_opens_a_lane_stream_verified_once_that_ends_when_it_expires(auth_node: Node) -> None:
    token = mint(SECRET, subscribe=[TOPIC], ttl=3600)
    verifier = auth_node.access.verifier
    assert verifier is not None
    for how in (f"/events?topic={TOPIC}&access_token={token}", f"/events?topic={TOPIC}"):
        header = () if "access_token" in how else (f"Authorization: Bearer {token}",)
        protocol, transport = auth_node.serve(request(how, *header))
        assert isinstance(protocol.cycle, LaneStream), how
        await transport.next_write()
    assert verifier.verified == 1  # checked by the first, cached for the second
    expiring = [c for c in auth_node.hub._connections if c.expires_at]
    assert len(expiring) == 2
    assert expiring[0].expires_at == pytest.approx(time.time() + 3600, abs=5)
    auth_node.hub._expire(expiring[0].expires_at)  # its token's exp (the timer's call)
    assert await transport.next_write() == b"0\r\n\r\n"


@pytest.mark.parametrize(
    ("what", "token"),
    [
        ("no token", None),
        ("a token for other topics", mint(SECRET, subscribe=["other"], ttl=3600)),
        ("a bad signature", mint("another-secret-" + "y" * 40, subscribe=[TOPIC], ttl=3600)),
        ("an expired token", mint(SECRET, subscribe=[TOPIC], ttl=-10)),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
async def test_a_token_the_lane_cannot_allow_goes_to_the_app(auth_node: Node, what: str, token: str | None) -> None:
    header = () if token is None else (f"Authorization: Bearer {token}",)
    protocol, _ = auth_node.serve(request(f"/events?topic={TOPIC}", *header))
    assert not isinstance(protocol.cycle, LaneStream), what
    async with asyncio.timeout(5):
        await auth_node.app.called.wait()
    assert auth_node.clients() == 1
    verifier = auth_node.access.verifier
    assert verifier is not None
    assert verifier.rejected == 0  # the app's way refuses and counts (this App stands in for it and does not)


async def test_the_head_is_made_once_per_second_and_kept_alive_or_not(node: Node) -> None:
    lane = node.app.stream_lane
    assert lane is not None
    now = [(b"date", b"Thu, 01 Jan 2026 00:00:00 GMT")]
    head = lane._head(now, [], True)
    assert head is not None
    assert lane._head(now, [], True) is head  # the same second: kept
    assert lane._head(now, [], False) == head.replace(b"transfer-encoding", b"connection: close\r\ntransfer-encoding")
    later = [(b"date", b"Thu, 01 Jan 2026 00:00:01 GMT")]  # uvicorn's next second: a new list
    assert lane._head(later, [], True) == head.replace(b"00:00:00", b"00:00:01")
