"""Resume with Last-Event-ID against a real node: exact replay, race-free hand-off, and every reset."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from tests.server import Node, run_server
from tests.sse_client import EventStream, publish

pytestmark = pytest.mark.http_contract  # on both serving paths: the adapter and stock uvicorn (conftest)


async def publish_many(url: str, topic: str, count: int, start: int = 0) -> list[str]:
    async with httpx.AsyncClient() as client:
        return [(await publish(url, {"topic": topic, "data": i}, client)).json()["id"] for i in range(start, count)]


async def test_resume_replays_everything_after_the_id_then_goes_live(node: Node, topic: str) -> None:
    ids = await publish_many(node.url, topic, 10)
    async with await EventStream.open(node.url, [topic], last_event_id=ids[2]) as stream:
        replayed = await stream.take(7)
        live = (await publish(node.url, {"topic": topic, "data": "live"})).json()["id"]
        after = await stream.next_event()
    assert [e.last_event_id for e in replayed] == ids[3:]
    assert [e.data for e in replayed] == [str(i) for i in range(3, 10)]
    assert after.last_event_id == live
    assert not [e for e in replayed if e.type == "reset"]


async def test_resume_from_the_query_parameter_and_header_wins(node: Node, topic: str) -> None:
    ids = await publish_many(node.url, topic, 5)
    async with await EventStream.open(node.url, [topic], query_last_event_id=ids[1]) as stream:
        assert [e.last_event_id for e in await stream.take(3)] == ids[2:]
    async with await EventStream.open(node.url, [topic], last_event_id=ids[3], query_last_event_id=ids[0]) as stream:
        assert (await stream.next_event()).last_event_id == ids[4]


async def test_resume_from_the_last_id_gets_only_new_events(node: Node, topic: str) -> None:
    ids = await publish_many(node.url, topic, 3)
    async with await EventStream.open(node.url, [topic], last_event_id=ids[-1]) as stream:
        await asyncio.wait_for(stream.first_bytes.wait(), 2)
        new = (await publish(node.url, {"topic": topic, "data": "new"})).json()["id"]
        event = await stream.next_event()
    assert event.last_event_id == new


async def test_multi_topic_resume_is_merged_in_id_order(node: Node, topic: str) -> None:
    a, b = topic + "-a", topic + "-b"
    async with httpx.AsyncClient() as client:
        ids = [(await publish(node.url, {"topic": [a, b][i % 2], "data": i}, client)).json()["id"] for i in range(12)]
    async with await EventStream.open(node.url, [a, b], last_event_id=ids[3]) as stream:
        assert [e.last_event_id for e in await stream.take(8)] == ids[4:]


async def test_reconnecting_under_concurrent_publishing_loses_and_repeats_nothing(node: Node, topic: str) -> None:
    """The replay-to-live hand-off under load: a client that keeps reconnecting sees every event once."""
    total = 600
    rng = random.Random(7)
    received: list[str] = []
    # Start from a known position, then reconnect every few events while the publisher runs.
    async with await EventStream.open(node.url, [topic]) as stream:
        await asyncio.wait_for(stream.first_bytes.wait(), 5)
        last = stream.parser.last_event_id
    publisher = asyncio.create_task(publish_many(node.url, topic, total))
    while len(received) < total:
        async with await EventStream.open(node.url, [topic], last_event_id=last) as stream:
            want = min(rng.randint(1, 60), total - len(received))
            try:
                events = await stream.take(want, timeout=20)
            except TimeoutError:
                if publisher.done():
                    publisher.result()  # the publisher died: its error is why nothing came
                raise
            for event in events:
                assert event.type != "reset", event
                received.append(event.last_event_id)
                last = event.last_event_id
    published = await asyncio.wait_for(publisher, 30)
    assert received == published


async def test_client_that_reconnects_before_any_event_misses_nothing(node: Node, topic: str) -> None:
    """A new stream tells the client its position, so a quick reconnect can't skip events."""
    async with await EventStream.open(node.url, [topic]) as stream:
        await asyncio.wait_for(stream.first_bytes.wait(), 2)
        position = stream.parser.last_event_id
    assert position.isdigit()
    ids = await publish_many(node.url, topic, 3)  # published while the client was away
    async with await EventStream.open(node.url, [topic], last_event_id=position) as stream:
        assert [e.last_event_id for e in await stream.take(3)] == ids


async def test_malformed_id_gets_reset_then_live_events(node: Node, topic: str) -> None:
    old = await publish_many(node.url, topic, 3)
    for bad in ["abc", "-5", "12a", "1.5", "7 8", "0x10", "9" * 30]:
        async with await EventStream.open(node.url, [topic, topic + "-x"], last_event_id=bad) as stream:
            reset = await stream.next_event()
            assert reset.type == "reset"
            assert json.loads(reset.data) == {"reason": "invalid-id", "topics": [topic, topic + "-x"]}
            live = (await publish(node.url, {"topic": topic, "data": "live"})).json()["id"]
            event = await stream.next_event()
            # No replay for a malformed id: the next event is the live one.
            assert event.last_event_id == live
            assert event.last_event_id not in old
        # The reset carried a position: resuming from it is exact, with no new reset.
        async with await EventStream.open(node.url, [topic], last_event_id=reset.last_event_id) as stream:
            assert (await stream.next_event()).last_event_id == live


async def test_id_from_the_future_gets_reset(node: Node, topic: str) -> None:
    async with await EventStream.open(node.url, [topic], last_event_id="9" * 19) as stream:
        reset = await stream.next_event()
    assert reset.type == "reset"
    assert json.loads(reset.data)["reason"] == "invalid-id"


async def test_resume_past_the_buffer_size_gets_reset_then_the_retained_events(small_node: Node, topic: str) -> None:
    # small_node keeps 5 events per topic.
    ids = await publish_many(small_node.url, topic, 12)
    async with await EventStream.open(small_node.url, [topic, topic + "-quiet"], last_event_id=ids[2]) as stream:
        reset = await stream.next_event()
        retained = await stream.take(5)
        live = (await publish(small_node.url, {"topic": topic, "data": "live"})).json()["id"]
        after = await stream.next_event()
    assert reset.type == "reset"
    assert json.loads(reset.data) == {"reason": "expired", "topics": [topic]}
    assert [e.last_event_id for e in retained] == ids[7:]
    assert after.last_event_id == live
    # Resuming from the last dropped id is still exact (the live event pushed ids[7] out).
    async with await EventStream.open(small_node.url, [topic], last_event_id=ids[7]) as stream:
        events = await stream.take(5)
    assert [e.last_event_id for e in events] == [*ids[8:], live]


async def test_resume_past_the_ttl_gets_reset() -> None:
    with run_server({"HERALD_REPLAY_TTL": "1"}) as node:
        ids = await publish_many(node.url, "aging", 3)
        # Retention by age needs time to pass; there is no event to wait for instead.
        await asyncio.sleep(1.3)
        fresh = await publish_many(node.url, "aging", 1)
        async with await EventStream.open(node.url, ["aging"], last_event_id=ids[0]) as stream:
            reset = await stream.next_event()
            replayed = await stream.next_event()
    assert reset.type == "reset"
    assert json.loads(reset.data) == {"reason": "expired", "topics": ["aging"]}
    assert replayed.last_event_id == fresh[0]


async def test_resume_after_a_node_restart_gets_reset_and_ids_keep_increasing() -> None:
    with run_server() as node:
        before = await publish_many(node.url, "restart", 3)
        port = node.port
    with run_server(port=port) as node:
        after = await publish_many(node.url, "restart", 1)
        async with await EventStream.open(node.url, ["restart"], last_event_id=before[-1]) as stream:
            reset = await stream.next_event()
            replayed = await stream.next_event()
    assert int(after[0]) > int(before[-1])
    assert reset.type == "reset"
    assert json.loads(reset.data) == {"reason": "lost", "topics": ["restart"]}
    assert replayed.last_event_id == after[0]
