"""The Redis broker's live feed against a real redis-server: what must never stop or mislead it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from broker.base import Event, Message, Reset, ResetReason, RetentionPolicy
from broker.redis import RedisBroker
from tests import redis_server
from tests.brokers import FakeClock

pytestmark = pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed")


class Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.resets: list[Reset] = []
        self.changed = asyncio.Event()

    def on_event(self, event: Event) -> None:
        self.events.append(event)
        self.changed.set()

    def on_reset(self, reset: Reset) -> None:
        self.resets.append(reset)
        self.changed.set()

    async def wait_for(self, event_id: int, timeout: float = 10) -> None:
        async def until() -> None:
            while not any(e.id == event_id for e in self.events):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout)


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.shared_server().url)
    yield client
    await client.aclose()


async def started(sink: Sink, clock: FakeClock | None = None, ttl: float = 3600) -> RedisBroker:
    broker = RedisBroker(
        redis_server.shared_server().url,
        RetentionPolicy(size=100, ttl=ttl),
        prefix=f"feed-{uuid.uuid4().hex[:8]}",
        clock=clock,
    )
    await broker.start(sink)
    return broker


async def test_regression_malformed_pubsub_messages_do_not_stop_the_feed(raw: aioredis.Redis) -> None:
    sink = Sink()
    broker = await started(sink)
    try:
        await broker.subscribe(["t"])
        prefix = broker.prefix
        await raw.publish(f"{prefix}:ctl", "hello")
        await raw.publish(broker._feed._control, "not a number")
        await raw.publish(f"{prefix}:c:t", "no separators here")
        await raw.publish(f"{prefix}:c:t", "notanumber|x|data")
        await raw.publish(f"{prefix}:c:t", b"7|x|caf\xe9")  # not UTF-8
        (event,) = await broker.publish([Message("t", "after")])
        await sink.wait_for(event.id)
        assert [e.data for e in sink.events] == ["after"]
        assert await broker.ping()
        assert broker.stats()["bad_messages"] == 2
    finally:
        await broker.close()


async def test_regression_quiet_feed_is_not_reset_after_a_blip(raw: aioredis.Redis) -> None:
    """A feed whose topics were quiet for longer than the TTL must not tell its clients they missed events."""
    clock = FakeClock()
    sink = Sink()
    broker = await started(sink, clock, ttl=5)
    try:
        await broker.subscribe(["quiet"])
        await broker.publish([Message("busy-elsewhere", "x")])  # the deployment moves on
        counter = int(await raw.get(f"{broker.prefix}:id") or 0)
        clock.advance(60)  # far past the TTL
        deadline = time.monotonic() + 10
        while broker._feed._last_seen < counter:  # the feed's health ping carries its position forward
            assert time.monotonic() < deadline, "the feed's position never moved while quiet"
            await asyncio.sleep(0.1)
        before = broker.stats()["feed_connects"]
        await raw.client_kill_filter(_type="pubsub")
        while broker.stats()["feed_connects"] == before or not await broker.ping():
            assert time.monotonic() < deadline + 10
            await asyncio.sleep(0.05)
        assert sink.resets == []
    finally:
        await broker.close()


async def test_regression_new_data_set_with_lower_ids_is_delivered_after_a_reset(raw: aioredis.Redis) -> None:
    """If ids of a lost data set ran ahead of the clock, the new set's events still get through."""
    clock = FakeClock()
    sink = Sink()
    broker = await started(sink, clock)
    try:
        await broker.subscribe(["t"])
        (old,) = await broker.publish([Message("t", "old")])
        await sink.wait_for(old.id)
        for key in await raw.keys(f"{broker.prefix}:*"):
            await raw.delete(key)  # Redis lost this deployment's data
        clock.advance(-30)  # and the clock that fed the old ids was ahead
        await raw.client_kill_filter(_type="pubsub")
        deadline = time.monotonic() + 10
        while not sink.resets:
            assert time.monotonic() < deadline, "no reset after the data set changed"
            await asyncio.sleep(0.05)
        (new,) = await broker.publish([Message("t", "new")])
        assert new.id < old.id
        await sink.wait_for(new.id)
        assert sink.resets[0].reason == ResetReason.LOST
    finally:
        await broker.close()


async def test_regression_a_publish_answered_during_the_feeds_backfill_read_is_not_taken_for_lost(
    raw: aioredis.Redis,
) -> None:
    """A node's own publish, answered while its reconnecting feed's snapshot read is in flight, is news, not loss.

    The feed took "what this node published" *after* the read returned: a publish
    that ran after the read looked lost (above the snapshot's head), the epoch
    rose above it and the backfill skipped it, so every client of the node
    missed that one event (a load run with a Redis restart: 50 events lost,
    one for each subscriber of one node).
    """
    sink = Sink()
    broker = await started(sink)
    feed = broker._feed
    published: list[Event] = []
    read = feed._reads.read

    async def read_then_publish(topics: object, after: int) -> object:
        snapshot = await read(topics, after)  # type: ignore[arg-type]
        if not published:  # the node's publish runs after the read, its answer comes before the feed resumes
            published.extend(await broker.publish([Message("t", "during the read")]))
        return snapshot

    try:
        await broker.subscribe(["t"])
        (before,) = await broker.publish([Message("t", "before")])
        await sink.wait_for(before.id)
        connects = broker.stats()["feed_connects"]
        feed._reads.read = read_then_publish  # type: ignore[method-assign,assignment]
        await raw.client_kill_filter(_type="pubsub")
        deadline = time.monotonic() + 10
        while broker.stats()["feed_connects"] == connects or not published:
            assert time.monotonic() < deadline, "the feed did not reconnect"
            await asyncio.sleep(0.05)
        await sink.wait_for(published[0].id)
        assert broker.stats()["lost_marked"] == 0
        assert sink.resets == []
        assert [e.data for e in sink.events] == ["before", "during the read"]
    finally:
        feed._reads.read = read  # type: ignore[method-assign]
        await broker.close()
