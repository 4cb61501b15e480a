"""The Mercure hub through a Redis outage: what subscribers and publishers get while Redis is down, and after.

A node on its own ``redis-server`` (AOF on, so the restart keeps the data). While Redis is down: a
publish is a 503 with ``Retry-After``; a new subscriber gets a ``200`` stream that waits for the broker
(and is served once it is back, without reconnecting); a resuming subscriber is told to come back
(``retry:``), its answer carrying ``Mercure-Last-Event-ID`` (the spec requires it on every answer to a
request with ``Last-Event-ID``; the cursor itself: nothing was sent, nothing was lost).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests import redis_server
from tests.mercure.test_mercure_hub import AUDIENCE, FORM, HUB, PUBLISHER, SECRET, bearer, publish, subscribe
from tests.redis_server import RedisServer
from tests.server import Node, run_server

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed"),
]


@pytest.fixture(scope="module")
def redis_node() -> Iterator[tuple[RedisServer, Node]]:
    server = RedisServer(appendonly=True)
    server.start()
    env = {
        "REDIS_URL": server.url,
        "HERALD_JWT_SECRET": SECRET,
        "HERALD_MERCURE_AUDIENCE": AUDIENCE,
        "HERALD_HEARTBEAT": "1",
        "HERALD_RETRY_MS": "500",
    }
    try:
        with run_server(env) as node:
            yield server, node
    finally:
        server.cleanup()


async def test_reconciliation_through_a_redis_outage(redis_node: tuple[RedisServer, Node]) -> None:
    server, node = redis_node
    book = f"https://example.com/books/{uuid.uuid4().hex[:12]}"
    async with httpx.AsyncClient(timeout=10) as http:
        before = await publish(http, node, book, "before")
        server.stop()
        try:
            refused = await http.post(
                f"{node.url}{HUB}", content=f"topic={book}&data=x", headers={**FORM, **bearer(PUBLISHER)}
            )
            assert refused.status_code == 503
            assert "retry-after" in refused.headers
            waiting = await subscribe(node, [("match", book)], live=False)
            resuming = await subscribe(node, [("match", book)], headers={"Last-Event-ID": before}, live=False)
            try:
                assert (waiting.response.status_code, resuming.response.status_code) == (200, 200)
                assert resuming.response.headers["mercure-last-event-id"] == before
                await asyncio.wait_for(resuming.ended.wait(), 10)  # told to come back
                assert resuming.parser.retry == 500
                assert not waiting.ended.is_set()
            finally:
                await resuming.close()
        finally:
            server.start()
        try:
            # The waiting stream opens once the broker answers: its position comes first.
            async with asyncio.timeout(30):
                while b"id: #" not in waiting.raw:
                    await asyncio.sleep(0.05)  # polling the stream's own reader (it runs on this loop)
            after = await _publish_when_back(http, node, book, "after")
            # Everything after the stream's position, once: its position may come from the feed, which
            # was behind "before" (the node had never been fed the update sequence), so "before" may come too.
            received = [await waiting.next_event(10)]
            if received[0].data == "before":
                received.append(await waiting.next_event(10))
            assert (received[-1].data, received[-1].last_event_id) == ("after", after)
        finally:
            await waiting.close()
        resumed = await subscribe(node, [("match", book)], headers={"Last-Event-ID": before})
        try:
            assert resumed.response.headers["mercure-last-event-id"] == before
            event = await resumed.next_event(10)
            assert (event.data, event.last_event_id) == ("after", after)
        finally:
            await resumed.close()


async def _publish_when_back(http: httpx.AsyncClient, node: Node, topic: str, data: str) -> str:
    """Publish, retrying 503s (the node's connections to the restarted Redis come back one by one)."""
    async with asyncio.timeout(30):
        while True:
            try:
                return await publish(http, node, topic, data)
            except AssertionError:
                await asyncio.sleep(0.1)  # a publisher's retry delay
