"""GET /events against a real node over real sockets: headers, framing, order, fan-out, heartbeats."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from api.app import create_app
from api.settings import Settings
from tests.server import Node, serve_app
from tests.sse_client import EventStream, publish

pytestmark = pytest.mark.http_contract  # on both serving paths: the adapter and stock uvicorn (conftest)


async def test_stream_headers_and_first_bytes_arrive_before_any_event(node: Node, topic: str) -> None:
    async with await EventStream.open(node.url, [topic]) as stream:
        response = stream.response
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-node-id"] == "test-node"
        assert "content-length" not in response.headers
        await asyncio.wait_for(stream.first_bytes.wait(), 2)
        assert bytes(stream.raw).startswith(b"retry: 2000\n")
        assert stream.parser.retry == 2000


async def test_retry_follows_the_setting(small_node: Node, topic: str) -> None:
    async with await EventStream.open(small_node.url, [topic]) as stream:
        await asyncio.wait_for(stream.first_bytes.wait(), 2)
        assert bytes(stream.raw).startswith(b"retry: 1234\n")


async def test_event_wire_format(node: Node, topic: str) -> None:
    async with await EventStream.open(node.url, [topic]) as stream:
        await asyncio.wait_for(stream.first_bytes.wait(), 2)
        start = len(stream.raw)
        typed = (await publish(node.url, {"topic": topic, "data": "a\r\nb\rc\nd", "event": "chat.token"})).json()
        plain = (await publish(node.url, {"topic": topic, "data": {"k": [1, "é"], "z": None}})).json()
        events = await stream.take(2)
        wire = bytes(stream.raw[start:]).replace(b":\n\n", b"")  # heartbeats may come in between
    assert (
        wire
        == (
            f"id: {typed['id']}\nevent: chat.token\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
            f"id: {plain['id']}\ndata: " + '{"k":[1,"é"],"z":null}' + "\n\n"
        ).encode()
    )
    assert (events[0].type, events[0].data, events[0].last_event_id) == ("chat.token", "a\nb\nc\nd", typed["id"])
    assert (events[1].type, events[1].data) == ("message", '{"k":[1,"é"],"z":null}')


async def test_string_data_is_sent_as_is(node: Node, topic: str) -> None:
    text = '  leading spaces, "quotes", {not json}, tab\tend\u2028line sep\x00nul'
    async with await EventStream.open(node.url, [topic]) as stream:
        await publish(node.url, {"topic": topic, "data": text})
        event = await stream.next_event()
    assert event.data == text


async def test_fan_out_to_many_clients_in_order(node: Node, topic: str) -> None:
    streams = await asyncio.gather(*(EventStream.open(node.url, [topic]) for _ in range(100)))
    try:
        async with httpx.AsyncClient() as client:
            ids = [(await publish(node.url, {"topic": topic, "data": i}, client)).json()["id"] for i in range(30)]
        results = await asyncio.gather(*(s.take(30) for s in streams))
    finally:
        await asyncio.gather(*(s.close() for s in streams))
    for events in results:
        assert [e.last_event_id for e in events] == ids
        assert [e.data for e in events] == [str(i) for i in range(30)]


async def test_multi_topic_connection_gets_events_merged_in_id_order(node: Node, topic: str) -> None:
    topics = [f"{topic}-{name}" for name in "abc"]
    async with await EventStream.open(node.url, topics) as stream, httpx.AsyncClient() as client:

        async def producer(name: str) -> list[str]:
            return [
                (await publish(node.url, {"topic": name, "data": f"{name}:{i}"}, client)).json()["id"]
                for i in range(40)
            ]

        published = await asyncio.gather(*(producer(t) for t in topics))
        events = await stream.take(120)
    received = [int(e.last_event_id) for e in events]
    assert received == sorted(int(i) for ids in published for i in ids)
    for name, ids in zip(topics, published, strict=True):
        assert [e.last_event_id for e in events if e.data.startswith(name + ":")] == ids


async def test_client_gets_only_its_topics(node: Node, topic: str) -> None:
    async with await EventStream.open(node.url, [topic]) as stream:
        await publish(node.url, {"topic": topic + "-other", "data": "no"})
        mine = (await publish(node.url, {"topic": topic, "data": "yes"})).json()["id"]
        event = await stream.next_event()
    assert (event.last_event_id, event.data) == (mine, "yes")


async def test_same_topic_twice_is_one_subscription(node: Node, topic: str) -> None:
    async with await EventStream.open(node.url, [topic, topic]) as stream:
        first = (await publish(node.url, {"topic": topic, "data": 1})).json()["id"]
        second = (await publish(node.url, {"topic": topic, "data": 2})).json()["id"]
        events = await stream.take(2)
    assert [e.last_event_id for e in events] == [first, second]


async def test_idle_stream_gets_heartbeat_comments(node: Node, topic: str) -> None:
    # The shared node runs with HERALD_HEARTBEAT=1: a comment must come within a second or so.
    async with await EventStream.open(node.url, [topic]) as stream:
        await asyncio.wait_for(stream.comment_seen.wait(), 2.5)
        comments = stream.parser.comments
        stream.comment_seen.clear()
        await asyncio.wait_for(stream.comment_seen.wait(), 2.5)
        assert stream.parser.comments > comments
        assert stream.received_so_far() == []


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("", "at least one topic"),
        ("?topic=", "invalid topic"),
        ("?topic=a%20b", "invalid topic"),
        ("?topic=ok&topic=a%0Ab", "invalid topic"),
        ("?topic=" + "x" * 201, "invalid topic"),
        ("?topic=a&topic=b&topic=c&topic=d", "at most 3 topics"),
    ],
)
def test_bad_subscriptions_are_400(small_node: Node, query: str, reason: str) -> None:
    response = httpx.get(f"{small_node.url}/events{query}")
    assert response.status_code == 400
    assert reason in response.json()["detail"]
    assert "x-node-id" in response.headers


async def test_max_topics_exactly_is_accepted(small_node: Node, topic: str) -> None:
    async with await EventStream.open(small_node.url, [f"{topic}-{i}" for i in range(3)]) as stream:
        assert stream.response.status_code == 200


def test_health_readiness_docs_and_page(node: Node) -> None:
    assert httpx.get(f"{node.url}/healthz").status_code == 200
    ready = httpx.get(f"{node.url}/readyz")
    assert ready.status_code == 200
    assert ready.headers["x-node-id"] == "test-node"
    assert httpx.get(f"{node.url}/docs").status_code == 200
    spec = httpx.get(f"{node.url}/openapi.json").json()
    assert {"/publish", "/events", "/healthz", "/readyz"} <= set(spec["paths"])
    assert "PublishEvent" in spec["components"]["schemas"]
    page = httpx.get(f"{node.url}/?topic=chat")
    assert page.status_code == 200
    assert "Last-Event-ID" in page.text
    missing = httpx.get(f"{node.url}/no-such-page")
    assert missing.status_code == 404
    assert missing.headers["x-node-id"] == "test-node"


async def _direct_writes(url: str) -> tuple[int, bool]:
    """The node's count of writes made straight to a socket, and whether it serves with the adapter."""
    async with httpx.AsyncClient() as client:
        stats = (await client.get(f"{url}/stats")).json()
        return int(stats["hub"]["direct_writes"]), bool(stats["server"]["adapter"])


@pytest.mark.timeout(30)
async def test_live_events_go_straight_to_the_socket_and_arrive_whole_and_in_order(node: Node, topic: str) -> None:
    before, adapter = await _direct_writes(node.url)
    async with await EventStream.open(node.url, [topic]) as stream:
        for n in range(5):
            batch = [{"topic": topic, "data": f"e{n}.{i}"} for i in range(3)]
            assert (await publish(node.url, batch)).status_code == 201
        events = await stream.take(15)
    assert [e.data for e in events] == [f"e{n}.{i}" for n in range(5) for i in range(3)]
    after, _ = await _direct_writes(node.url)
    if adapter:
        # Each published batch left as one write by the hub's flush, not by the stream's writer task.
        assert after >= before + 5
    else:
        assert after == before == 0  # stock uvicorn: every chunk through ASGI's send, no write past it


class UnderRootPath:
    """Herald mounted under a path prefix (``root_path``), where the SSE fast lane does not apply."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "root_path": "/herald", "path": "/herald" + scope["path"]}
        await self.app(scope, receive, send)


async def test_the_fastapi_events_route_serves_the_same_stream_and_errors_as_the_fast_lane(topic: str) -> None:
    async with serve_app(UnderRootPath(create_app(Settings(node_id="mounted")))) as url:  # type: ignore[arg-type]
        async with httpx.AsyncClient() as client:
            bad = await client.get(f"{url}/events?topic=a%20b")
        assert bad.status_code == 400
        assert "invalid topic" in bad.json()["detail"]
        assert bad.headers["x-node-id"] == "mounted"
        async with await EventStream.open(url, [topic]) as stream:
            assert stream.response.headers["content-type"].startswith("text/event-stream")
            assert (
                await publish(url, [{"topic": topic, "data": "one"}, {"topic": topic, "data": "two"}])
            ).status_code == 201
            events = await stream.take(2, timeout=10)
    assert [e.data for e in events] == ["one", "two"]
