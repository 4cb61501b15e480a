"""The publish script's cost on a busy topic, counted by Redis itself (calls, never time).

``INFO commandstats`` showed an age-trim probe (``XREVRANGE`` from the TTL's
cutoff backwards) taking most of every publish on a full stream: it walked the
whole stream when nothing in it was that old. These pin which commands a
publish and a replay read run, so the probe can't come back unnoticed; the
cost itself is measured in ``make bench``, not here.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from broker.base import Event, Message, Reset, RetentionPolicy
from broker.redis import RedisBroker
from tests import redis_server
from tests.brokers import FakeClock
from tests.redis_server import needs_redis

pytestmark = needs_redis


class _Sink:
    def on_event(self, event: Event) -> None:
        pass

    def on_reset(self, reset: Reset) -> None:
        pass


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.shared_server().url)
    yield client
    await client.aclose()


async def calls(raw: aioredis.Redis, command: str) -> int:
    stats = await raw.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.mark.timeout(60)
async def test_regression_a_publish_to_a_full_stream_does_not_walk_it_backwards(raw: aioredis.Redis) -> None:
    clock = FakeClock()
    broker = RedisBroker(
        redis_server.shared_server().url,
        RetentionPolicy(size=50, ttl=60),
        prefix=f"cost-{uuid.uuid4().hex[:8]}",
        clock=clock,
    )
    await broker.start(_Sink())
    try:
        for i in range(120):  # the stream is full: every publish trims by size
            await broker.publish([Message("hot", f"e{i}")])
        before = await calls(raw, "xrevrange")
        for i in range(50):
            await broker.publish([Message("hot", f"f{i}")])
        history = await broker.history(["hot"], 0)
        assert await calls(raw, "xrevrange") == before  # nothing is past the TTL: no backward probe at all
        assert [e.data for e in history.events][-1] == "f49"
        assert len(history.events) == 50
        # Past the TTL, the age trim still records the floor: a resume from before it is told, not holed.
        first = history.events[0].id
        clock.advance(61)
        (fresh,) = await broker.publish([Message("hot", "fresh")])
        assert await calls(raw, "xrevrange") == before + 1
        resumed = await broker.history(["hot"], first)
        assert resumed.reset is not None
        assert [e.id for e in resumed.events] == [fresh.id]
    finally:
        await broker.close()
