"""The broker implementations the contract suite runs against, and a clock tests can move.

``tests/broker/test_broker_contract.py`` runs every test once per entry of
:data:`BROKER_CASES`. A new implementation joins the suite by adding one
:class:`BrokerCase` whose ``make`` creates whatever the broker needs (a
key prefix of its own on the shared real ``redis-server``) and removes it
again on exit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import pytest

from broker.base import Broker, Clock, Event, Reset, RetentionPolicy
from broker.memory import MemoryBroker
from broker.redis import RedisBroker, RedisTarget
from tests import redis_server

WAIT = 5.0
"""Seconds a test waits for live events before failing."""


class RecordingSink:
    """An :class:`EventSink` that records what it gets and lets tests await it."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.resets: list[Reset] = []
        self.max_id = 0
        self._changed = asyncio.Event()

    def on_event(self, event: Event) -> None:
        self.events.append(event)
        self.max_id = max(self.max_id, event.id)
        self._changed.set()

    def on_reset(self, reset: Reset) -> None:
        self.resets.append(reset)
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        async def until() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), timeout)

    async def wait_for_id(self, event_id: int, timeout: float = WAIT) -> list[Event]:
        """Wait until the event ``event_id`` (or a later one) arrived; return everything so far."""
        await self.wait_until(lambda: self.max_id >= event_id, timeout)
        return list(self.events)


BrokerFactory = Callable[[RetentionPolicy, Clock], AbstractAsyncContextManager[Broker]]
"""``make(retention, clock)``: an async context manager giving one broker, not yet started."""


@dataclass(frozen=True)
class BrokerCase:
    """One broker implementation under the contract suite.

    ``make(retention, clock)`` is entered once per broker a test needs and
    must yield a broker that is **not started** (the suite starts it with its
    own sink) and that:

    * uses ``retention`` and takes every reading of time from ``clock``
      (ids and retention by age), so tests move time without sleeping;
    * sits on a **fresh, empty store** each time ``make`` is entered, as
      after a restart that lost everything: a test opening a second broker
      after closing the first is simulating exactly that;
    * is closed on exit (``close`` is idempotent, so tests may close it
      earlier), together with every resource ``make`` created.

    ``marks`` are applied to every test of this case (e.g. a ``skipif`` for a
    ``redis-server`` that is not installed).
    """

    name: str
    make: BrokerFactory
    marks: tuple[pytest.MarkDecorator, ...] = ()


class FakeClock:
    """A :data:`~broker.base.Clock` that only moves when told to.

    It starts at the real time so ids look like the ones a deployment issues.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock by ``seconds``; a negative value moves it back."""
        self._now += seconds


@asynccontextmanager
async def _memory(retention: RetentionPolicy, clock: Clock) -> AsyncIterator[Broker]:
    broker = MemoryBroker(retention, clock)
    try:
        yield broker
    finally:
        await broker.close()


@asynccontextmanager
async def _real_redis(retention: RetentionPolicy, clock: Clock) -> AsyncIterator[Broker]:
    # A fresh key prefix is a fresh, empty store on the shared server.
    server = redis_server.shared_server()
    broker = RedisBroker(server.url, retention, clock=clock, prefix=f"test-{uuid.uuid4().hex[:10]}")
    try:
        yield broker
    finally:
        await broker.close()


@asynccontextmanager
async def _redis_cluster(retention: RetentionPolicy, clock: Clock) -> AsyncIterator[Broker]:
    # A fresh key prefix (a hash tag of its own: one slot) is a fresh, empty store on the shared cluster.
    cluster = redis_server.shared_cluster()
    target = RedisTarget(cluster=tuple(("127.0.0.1", port) for port in cluster.running_ports()))
    broker = RedisBroker(target, retention, clock=clock, prefix=f"test-{uuid.uuid4().hex[:10]}")
    try:
        yield broker
    finally:
        await broker.close()


BROKER_CASES: list[BrokerCase] = [
    BrokerCase("memory", _memory),
    BrokerCase("redis", _real_redis),
    BrokerCase("redis-cluster", _redis_cluster),
]
