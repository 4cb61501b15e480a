"""A node that stood still notices it and resynchronises before it takes new streams (api.node.stall)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from api.node.stall import StallWatch
from broker.base import Message, RetentionPolicy
from broker.memory import MemoryBroker
from broker.redis import RedisBroker
from tests import redis_server
from tests.brokers import RecordingSink


class ResyncingBroker(MemoryBroker):
    """The embedded broker, with the Resyncs capability: records each resync and lets the test hold it."""

    def __init__(self) -> None:
        super().__init__()
        self.resyncs = 0
        self.release = asyncio.Event()
        self.asked = asyncio.Event()

    async def resync(self) -> None:
        self.resyncs += 1
        self.asked.set()
        await self.release.wait()


@pytest.mark.timeout(10)
async def test_a_loop_that_stood_still_is_noticed_and_the_node_resyncs_before_serving_again() -> None:
    broker = ResyncingBroker()
    watch = StallWatch(broker, stall=0.3, period=0.05)
    watch.start()
    try:
        await asyncio.sleep(0.1)  # a few healthy ticks first: none of them is a stall
        assert watch.stalls == 0
        time.sleep(0.5)  # noqa: ASYNC251 - the fault itself: the event loop stands still, as a stuck node's does
        await asyncio.wait_for(broker.asked.wait(), 5)
        assert watch.resyncing  # /probe answers 503 and /cluster says "resyncing" until the feed is rebuilt
        assert watch.stalls == 1
        assert watch.longest >= 0.4
        broker.release.set()
        while watch.resyncing:
            await asyncio.sleep(0.01)  # the watch's own task finishes the recovery
        assert broker.resyncs == 1
    finally:
        await watch.close()


@pytest.mark.timeout(10)
async def test_a_short_pause_is_no_stall() -> None:
    broker = ResyncingBroker()
    watch = StallWatch(broker, stall=0.5, period=0.05)
    watch.start()
    try:
        time.sleep(0.2)  # noqa: ASYNC251 - a garbage collection, a busy loop: well under the stall
        await asyncio.sleep(0.2)
        assert watch.stalls == 0
        assert broker.resyncs == 0
    finally:
        await watch.close()


@redis_server.needs_redis
@pytest.mark.timeout(20)
async def test_a_redis_feed_resync_reconnects_and_misses_nothing() -> None:
    sink = RecordingSink()
    broker = RedisBroker(
        redis_server.shared_server().url, RetentionPolicy(size=100, ttl=3600), prefix=f"stall-{uuid.uuid4().hex[:8]}"
    )
    await broker.start(sink)
    try:
        await broker.subscribe(["t"])
        before = await broker.publish([Message("t", str(i)) for i in range(3)])
        await sink.wait_for_id(before[-1].id)
        connects = broker.stats()["feed_connects"]
        resync = asyncio.create_task(broker.resync())
        during = await broker.publish([Message("t", str(i)) for i in range(3, 6)])  # while the feed reconnects
        await asyncio.wait_for(resync, 10)
        after = await broker.publish([Message("t", "6")])
        await sink.wait_for_id(after[-1].id)
        assert broker.stats()["feed_connects"] == connects + 1
        assert [e.data for e in sink.events] == [str(i) for i in range(7)]  # each once, in order
        assert [e.id for e in sink.events] == [e.id for e in (*before, *during, *after)]
    finally:
        await broker.close()
