"""Faults and lifecycle against real nodes: slow clients, connection churn, broker outage, SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import httpx
import pytest

from api.app import create_app
from api.settings import Settings
from broker.base import Broker, BrokerUnavailable, RetentionPolicy
from broker.memory import MemoryBroker
from tests.server import Node, run_server, serve_app, start_node
from tests.sse_client import EventStream, new_client, publish
from tests.sse_parser import SSEEvent, SSEParser

pytestmark = pytest.mark.http_contract  # on both serving paths: the adapter and stock uvicorn (conftest)


def dechunk(raw: bytes) -> bytes:
    """The body of a (possibly cut short) chunked HTTP/1.1 response."""
    _, _, rest = raw.partition(b"\r\n\r\n")
    body = bytearray()
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        body += rest[:size]
        if size == 0 or len(rest) < size + 2:
            break
        rest = rest[size + 2 :]
    return bytes(body)


async def stats(url: str) -> dict[str, int]:
    async with new_client() as client:
        hub: dict[str, int] = (await client.get(f"{url}/stats")).json()["hub"]
        return hub


async def wait_for_stats(url: str, **expected: int) -> dict[str, int]:
    """Poll /stats until it shows ``expected`` (the node's state can't be awaited from outside)."""
    deadline = time.monotonic() + 10
    while True:
        current = await stats(url)
        if all(current[k] == v for k, v in expected.items()) or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.05)


async def test_slow_client_is_cut_off_without_hurting_publishers_or_other_clients(topic: str) -> None:
    with run_server({"HERALD_CLIENT_BUFFER": "65536", "HERALD_MAX_EVENT_BYTES": "40000"}) as node:
        # A client that stops reading: tiny receive window, never calls recv.
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", node.port))
        slow.sendall(f"GET /events?topic={topic} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        try:
            async with await EventStream.open(node.url, [topic]) as fast:
                await wait_for_stats(node.url, connections=2)
                payload = "x" * 32_000
                started = time.monotonic()
                async with httpx.AsyncClient() as client:
                    responses = [
                        await publish(node.url, {"topic": topic, "data": {"n": i, "pad": payload}}, client)
                        for i in range(400)
                    ]
                publish_seconds = time.monotonic() - started
                assert [r.status_code for r in responses] == [201] * 400
                ids = [r.json()["id"] for r in responses]
                received = await fast.take(400, timeout=30)
                assert [e.last_event_id for e in received] == ids
                # The slow client was cut off; the fast one is still connected.
                after = await wait_for_stats(node.url, connections=1, cutoffs=1)
                assert after["cutoffs"] == 1
                assert after["connections"] == 1
            # Publishing never waited for the stalled client (generous bound: it is not a benchmark).
            assert publish_seconds < 20

            # The slow client gets what reached it, then resumes with nothing lost.
            slow.setblocking(False)
            loop = asyncio.get_running_loop()
            raw = bytearray()
            try:
                while chunk := await asyncio.wait_for(loop.sock_recv(slow, 1 << 16), 5):
                    raw += chunk
            except ConnectionResetError:
                pass
            parser = SSEParser()
            got: list[SSEEvent] = parser.feed(dechunk(bytes(raw)))
            assert len(got) < 400
            async with await EventStream.open(node.url, [topic], last_event_id=parser.last_event_id) as again:
                rest = await again.take(400 - len(got), timeout=30)
            assert [e.last_event_id for e in got + rest] == ids
            assert all(e.type != "reset" for e in rest)
        finally:
            slow.close()


async def _open_and_drop(port: int, topic: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /events?topic={topic}&topic=shared HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    await writer.drain()
    data = b""
    while b"retry:" not in data:
        chunk = await reader.read(4096)
        assert chunk, "stream closed before its first bytes"
        data += chunk
    writer.close()
    await writer.wait_closed()


async def _churn(port: int, cycles: int, prefix: str) -> None:
    sem = asyncio.Semaphore(20)

    async def one(i: int) -> None:
        async with sem:
            await _open_and_drop(port, f"{prefix}-{i}")

    await asyncio.gather(*(one(i) for i in range(cycles)))


async def test_idle_streams_cost_one_task_each_and_a_leaving_client_is_released_at_once() -> None:
    """Regression: every stream held a second task, blocked in receive() to notice its client leaving.

    Herald's HTTP protocol now calls the stream back instead. The heartbeat is
    an hour away here, so nothing is written that could reveal the leaving
    clients: only the disconnect callback can release them.
    """
    with run_server({"HERALD_HEARTBEAT": "3600"}) as node:
        before = (await stats(node.url))["tasks"]
        opened = []
        for i in range(100):
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            writer.write(f"GET /events?topic=idle-{i % 5} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            await reader.readuntil(b"\r\n\r\n")  # the head, then the stream's first frame
            await reader.readuntil(b"\n\n")
            opened.append(writer)
        during = await wait_for_stats(node.url, connections=100)
        for writer in opened:
            writer.close()
        after = await wait_for_stats(node.url, connections=0, topics=0)
    assert during["connections"] == 100
    assert during["tasks"] - before <= 100 + 5, (before, during["tasks"])
    assert (after["connections"], after["topics"]) == (0, 0)
    assert after["connections_total"] == 100


async def test_connect_disconnect_cycles_leave_bookkeeping_and_memory_flat() -> None:
    with run_server() as node:
        async with httpx.AsyncClient() as client:

            async def rss() -> int:
                value: int = (await client.get(f"{node.url}/stats")).json()["rss_bytes"]
                return value

            await _churn(node.port, 1000, "warm")
            idle = await wait_for_stats(node.url, connections=0, topics=0, topics_subscribed=0)
            before = await rss()
            await _churn(node.port, 3000, "churn")
            after_stats = await wait_for_stats(node.url, connections=0, topics=0, topics_subscribed=0)
            after = await rss()
            broker = (await client.get(f"{node.url}/stats")).json()["broker"]
    assert idle["connections"] == 0
    assert after_stats["connections"] == 0
    assert after_stats["topics"] == 0
    assert after_stats["topics_subscribed"] == 0
    assert after_stats["pending_tasks"] == 0
    assert after_stats["connections_total"] == 4000
    assert broker["topics_subscribed"] == 0
    # 3,000 more connections than the warm-up may not cost more than a little allocator noise.
    assert after - before < 4 * 1024 * 1024, (before, after)


class SwitchableBroker(MemoryBroker):
    """A memory broker whose outage tests can switch on and off."""

    down = False

    def _check_open(self) -> None:
        if self.down:
            raise BrokerUnavailable("switched off by the test")
        super()._check_open()

    async def ping(self) -> bool:
        return not self.down and await super().ping()


async def test_regression_events_answered_503_while_the_broker_was_down(topic: str) -> None:
    """A 503 ends a browser's EventSource for good: during an outage /events answers 200 and waits.

    Publishing still gets its honest 503 (producers retry); an open stream
    stays open; a new stream starts at once with ``retry:``, waits, and gets
    its position and every event once the broker is back, without reconnecting.
    """
    brokers: list[SwitchableBroker] = []

    def factory(settings: Settings) -> Broker:
        brokers.append(SwitchableBroker(RetentionPolicy(settings.replay_size, settings.replay_ttl)))
        return brokers[-1]

    app = create_app(Settings(node_id="outage", heartbeat=0.2), broker_factory=factory)
    async with (
        serve_app(app) as url,
        httpx.AsyncClient(base_url=url) as client,
        await EventStream.open(url, [topic]) as stream,
    ):
        brokers[0].down = True
        refused = await client.post("/publish", json={"topic": topic, "data": 1})
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) > 0
        assert "broker" in refused.json()["detail"]
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert (await client.get("/healthz")).status_code == 200
        # The front's probe: the node takes streams (it holds them until Redis is back), so 204, not 503.
        assert (await client.get("/probe")).status_code == 204
        async with await EventStream.open(url, [topic + "-new"]) as waiting:
            assert waiting.response.status_code == 200
            assert waiting.response.headers["content-type"] == "text/event-stream"
            await asyncio.wait_for(waiting.comment_seen.wait(), 5)  # the notice, then heartbeats
            assert bytes(waiting.raw).startswith(b"retry: ")
            assert b"id:" not in waiting.raw  # no position until the broker can give one
            # The open stream stays open through the outage, and gets events again after it.
            brokers[0].down = False
            assert (await client.get("/readyz")).status_code == 200
            accepted = await client.post("/publish", json={"topic": topic, "data": 2})
            assert accepted.status_code == 201
            event = await stream.next_event()
            assert (event.last_event_id, event.data) == (accepted.json()["id"], "2")
            # The waiting stream got its position; it gets what is published after it.
            await wait_for_bytes(waiting, b"\nid: ")
            later = await client.post("/publish", json={"topic": topic + "-new", "data": 3})
            got = await waiting.next_event()
            assert (got.last_event_id, got.data) == (later.json()["id"], "3")


async def wait_for_bytes(stream: EventStream, needle: bytes, timeout: float = 5) -> None:
    """Until ``needle`` is in what the stream has read (it reads in the background)."""
    async with asyncio.timeout(timeout):
        while needle not in stream.raw:
            await asyncio.sleep(0.01)  # polling the stream's own buffer, filled by its reader task


async def test_sigterm_ends_every_stream_and_exits_cleanly(topic: str) -> None:
    node: Node = start_node()
    try:
        streams = await asyncio.gather(*(EventStream.open(node.url, [topic]) for _ in range(20)))
        await asyncio.gather(*(asyncio.wait_for(s.first_bytes.wait(), 5) for s in streams))
        started = time.monotonic()
        node.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(asyncio.wait_for(s.ended.wait(), 3) for s in streams))
        ended_after = time.monotonic() - started
        code = await asyncio.to_thread(node.process.wait, 5)
        await asyncio.gather(*(s.close() for s in streams))
    finally:
        if node.process.poll() is None:
            node.process.kill()
            node.process.wait()
    log = node.log()
    node.log_path.unlink(missing_ok=True)
    assert ended_after < 3
    assert code == 0, log
    assert "Traceback" not in log
    assert "timeout graceful shutdown exceeded" not in log
