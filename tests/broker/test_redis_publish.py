"""The publish script's cost on a busy topic, counted by Redis itself (calls, never time).

``INFO commandstats`` showed an age-trim probe (``XREVRANGE`` from the TTL's
cutoff backwards) taking most of every publish on a full stream: it walked the
whole stream when nothing in it was that old. Then the size trim's reads
(``XLEN``, ``XRANGE``, ``XTRIM``) and the floor key's upkeep made a publish
four times the price of its ``XADD``. Retention is now the reader's job
(``history.lua``): a publish to an existing stream runs one ``XADD``, one
``PEXPIRE`` and one ``PUBLISH`` per event. These pin which commands a publish
and a replay read run, so none of those can come back unnoticed; the cost
itself is measured in ``make bench`` (the redis-cost scenario), not here.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

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


PER_EVENT = {"xadd": 1, "pexpire": 1, "publish": 1}
"""What a publish to an existing stream runs per event, and nothing else but once per batch (TIME, MGET, SET)."""


async def command_calls(raw: aioredis.Redis) -> dict[str, int]:
    stats = await raw.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}


@pytest.mark.timeout(60)
async def test_regression_a_publish_to_a_full_stream_reads_nothing_of_it(raw: aioredis.Redis) -> None:
    clock = FakeClock()
    broker = RedisBroker(
        redis_server.shared_server().url,
        RetentionPolicy(size=50, ttl=60),
        prefix=f"cost-{uuid.uuid4().hex[:8]}",
        clock=clock,
    )
    await broker.start(_Sink())
    try:
        for i in range(120):  # the stream is past its size
            await broker.publish([Message("hot", f"e{i}")])
        before = await command_calls(raw)
        for i in range(50):
            await broker.publish([Message("hot", f"f{i}")])
        after = await command_calls(raw)
        ran = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
        ran.pop("info", None)
        ran.pop("evalsha", None)
        # (No TIME: the test's clock is passed in.)
        assert ran == {**{name: 50 * n for name, n in PER_EVENT.items()}, "mget": 50, "set": 50}
        history = await broker.history(["hot"], 0)
        assert await calls(raw, "xrevrange") == before.get("xrevrange", 0)  # nothing is past the TTL: no probe
        assert [e.data for e in history.events][-1] == "f49"
        assert len(history.events) == 50
        # Past the TTL, the reader's age probe sets the floor: a resume from before it is told, not holed.
        first = history.events[0].id
        clock.advance(61)
        (fresh,) = await broker.publish([Message("hot", "fresh")])
        resumed = await broker.history(["hot"], first)
        assert await calls(raw, "xrevrange") == before.get("xrevrange", 0) + 1
        assert resumed.reset is not None
        assert [e.id for e in resumed.events] == [fresh.id]
    finally:
        await broker.close()


LEGACY_PUBLISH = (Path(__file__).parent / "legacy" / "publish_v2.lua").read_text(encoding="utf-8")
"""publish.lua of the Redis contract's version 2 (exact trims, the floor in ``<prefix>:f:<topic>``), as a
producer that copied it runs it still."""


@pytest.mark.timeout(60)
async def test_regression_a_producer_on_the_version_2_script_keeps_its_floors(raw: aioredis.Redis) -> None:
    """Version 2 trimmed exactly and kept the floor in its own key: today's reader must still see that floor,
    or a resume from before the trimmed events would be claimed exact (a silent hole)."""
    prefix = f"legacy-{uuid.uuid4().hex[:8]}"
    broker = RedisBroker(redis_server.shared_server().url, RetentionPolicy(size=2, ttl=60), prefix=prefix)
    try:
        argv: list[str | int] = [prefix, "", 2, 60 * 1_000_000, "", 5]
        argv += [x for i in range(5) for x in ("t", "", f"e{i}")]
        _, joined = await raw.eval(LEGACY_PUBLISH, 0, *argv)
        ids = [int(i) for i in joined.decode().split(",")]
        assert await raw.xlen(f"{prefix}:s:t") == 2  # exactly the size: the entry before the window is gone
        stale = await broker.history(["t"], ids[0])
        assert stale.reset is not None
        assert [e.data for e in stale.events] == ["e3", "e4"]
        exact = await broker.history(["t"], ids[2])
        assert exact.reset is None
        assert [e.data for e in exact.events] == ["e3", "e4"]
        # Today's publish.lua appends to the same stream; the floor holds.
        (later,) = await broker.publish([Message("t", "e5")])
        assert (await broker.history(["t"], ids[0])).reset is not None
        assert [e.id for e in (await broker.history(["t"], ids[3])).events] == [ids[4], later.id]
    finally:
        await broker.close()


@pytest.mark.timeout(60)
async def test_regression_a_publisher_with_a_smaller_size_leaves_no_silent_hole() -> None:
    """A producer on the default size (1,000) under nodes with a larger one, or a size being changed: the stream
    is trimmed below the reader's window with nothing recorded. The reader must say ``reset``, not skip."""
    prefix = f"sizes-{uuid.uuid4().hex[:8]}"
    url = redis_server.shared_server().url
    small = RedisBroker(url, RetentionPolicy(size=10, ttl=60), prefix=prefix)
    large = RedisBroker(url, RetentionPolicy(size=1000, ttl=60), prefix=prefix)
    try:
        published = [event for i in range(500) for event in await small.publish([Message("t", f"e{i}")])]
        stale = await large.history(["t"], published[0].id)
        assert stale.reset is not None  # events 2..~400 are gone: told, not skipped
        kept = [e.id for e in stale.events]
        assert kept == [e.id for e in published[-len(kept) :]]  # what is kept is the newest, in order
        assert len(kept) < 500
        # From inside what is kept, the resume is exact.
        exact = await large.history(["t"], published[-2].id)
        assert exact.reset is None
        assert [e.id for e in exact.events] == [published[-1].id]
    finally:
        await small.close()
        await large.close()
