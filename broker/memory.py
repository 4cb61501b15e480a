"""The embedded broker: one process, no Redis, the same guarantees.

Everything lives in this process's memory and is lost when it exits. That
loss is detected, not hidden: ids are seeded from the clock, so the first id
after a restart is above every id the previous process issued, and a client
resuming from an id older than this process's start gets a ``reset``
(:attr:`~broker.base.ResetReason.LOST`).

Memory has a ceiling: :attr:`~broker.base.RetentionPolicy.max_bytes` bounds
the whole replay buffer, over every topic. Each topic keeps at most ``size``
events, but the number of topics has no bound of its own, so past the
ceiling the oldest events go first, whichever their topic (their topic's
floor rises: a resume from before them gets ``reset``, as after the TTL).

Atomicity comes for free: :meth:`MemoryBroker.publish` and
:meth:`MemoryBroker.history` never await, so on the event loop each runs as
one step and a history read can never see half a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence

from broker.base import (
    BrokerUnavailable,
    Clock,
    Event,
    EventSink,
    History,
    IdempotencyConflict,
    Message,
    NodeRecord,
    RetentionPolicy,
    Snapshot,
    next_id,
    now_us,
)

EVENT_OVERHEAD = 240
"""Bytes an event costs besides its data and topic name (the object, its id, its slot in two deques), roughly."""

IDEMPOTENCY_KEPT = 100_000
"""Idempotency keys kept at most (the oldest forgotten first), whatever their TTL: each client may send new ones."""


def event_bytes(event: Event) -> int:
    """What one retained event is counted as against the replay buffer's byte ceiling."""
    return len(event.data) + len(event.topic) + EVENT_OVERHEAD


class _Topic:
    """One topic's replay buffer and its floor (the largest id it has dropped)."""

    __slots__ = ("events", "floor")

    def __init__(self, floor: int) -> None:
        self.events: deque[Event] = deque()
        self.floor = floor

    def expire(self, cutoff: int) -> None:
        """Drop events with an id below ``cutoff`` (older than the TTL)."""
        events = self.events
        while events and events[0].id < cutoff:
            self.floor = events.popleft().id

    def after(self, after: int) -> Iterator[Event]:
        """The retained events with an id above ``after``, oldest first."""
        newer: list[Event] = []
        for event in reversed(self.events):
            if event.id <= after:
                break
            newer.append(event)
        return reversed(newer)


class MemoryBroker:
    """A :class:`~broker.base.Broker` kept in this process's memory.

    ``clock`` is injectable so tests can move time without sleeping; it feeds
    both the id seed and retention by age.
    """

    def __init__(self, retention: RetentionPolicy | None = None, clock: Clock = time.time) -> None:
        self._retention = retention or RetentionPolicy()
        self._clock = clock
        # Ids issued by this process are all above the epoch; anything at or
        # below it belongs to a previous life whose history is gone.
        self._epoch = now_us(clock)
        self._last = self._epoch
        self._topics: dict[str, _Topic] = {}
        # Every event published, oldest first, until the byte ceiling or the TTL takes it: the order in which the
        # ceiling drops events. An event its topic has dropped already (by count) stays here, still counted,
        # until it reaches the front: what this holds is what the ceiling bounds.
        self._order: deque[Event] = deque()
        self._bytes = 0
        self._announced: dict[str, tuple[str, float, float]] = {}  # node id -> (record, alive until, last seen)
        self._subscribed: set[str] = set()
        self._entries: dict[tuple[str, str], dict[str, str]] = {}  # (kind, node id) -> entries
        self._idempotency: dict[str, tuple[int, list[int]]] = {}  # key -> (expiry in µs, ids)
        self._sink: EventSink | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------

    async def start(self, sink: EventSink) -> None:
        self._sink = sink
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="herald-memory-sweeper")

    async def close(self) -> None:
        self._closed = True
        self._sink = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def ping(self) -> bool:
        return not self._closed

    # -- publishing ----------------------------------------------------------

    async def publish(self, messages: Sequence[Message], idempotency_key: str | None = None) -> list[Event]:
        self._check_open()
        if idempotency_key is not None:
            known = self._idempotency.get(idempotency_key)
            if known is not None and known[0] > now_us(self._clock):
                if len(known[1]) != len(messages):
                    raise IdempotencyConflict(f"idempotency key {idempotency_key!r} was used for a different request")
                return [Event(i, m.topic, m.data, m.type) for i, m in zip(known[1], messages, strict=True)]
        size = self._retention.size
        cutoff = self._cutoff()
        events: list[Event] = []
        for message in messages:
            self._last = next_id(self._last, self._clock)
            event = Event(self._last, message.topic, message.data, message.type)
            topic = self._topics.get(event.topic)
            if topic is None:
                topic = self._topics[event.topic] = _Topic(self._new_topic_floor(cutoff))
            topic.events.append(event)
            if len(topic.events) > size:
                topic.floor = topic.events.popleft().id
            topic.expire(cutoff)
            events.append(event)
            self._order.append(event)
            self._bytes += event_bytes(event)
        self._trim(cutoff)
        if idempotency_key is not None:
            expiry = now_us(self._clock) + int(self._retention.ttl * 1_000_000)
            self._idempotency[idempotency_key] = (expiry, [e.id for e in events])
            if len(self._idempotency) > IDEMPOTENCY_KEPT:
                del self._idempotency[next(iter(self._idempotency))]
        sink = self._sink
        if sink is not None:
            for event in events:
                if event.topic in self._subscribed:
                    sink.on_event(event)
        return events

    # -- live feed -----------------------------------------------------------

    async def subscribe(self, topics: Collection[str]) -> None:
        self.subscribe_now(topics)

    def subscribe_now(self, topics: Collection[str]) -> None:
        self._check_open()
        self._subscribed.update(topics)

    async def unsubscribe(self, topics: Collection[str]) -> None:
        self._subscribed.difference_update(topics)

    # -- replay --------------------------------------------------------------

    async def head(self) -> int:
        self._check_open()
        return self._last

    async def position(self, topics: Collection[str]) -> int:
        self._check_open()
        return self._last

    def position_now(self, topics: Collection[str]) -> int | None:
        # Delivery is synchronous: everything up to the last id has reached the sink.
        self._check_open()
        return self._last

    async def history(self, topics: Collection[str], after: int) -> History:
        self._check_open()
        topics = tuple(topics)
        cutoff = self._cutoff()
        floors: dict[str, int] = {}
        streams: list[Iterator[Event]] = []
        for name in topics:
            topic = self._topics.get(name)
            if topic is None:
                floors[name] = self._new_topic_floor(cutoff)
            else:
                topic.expire(cutoff)
                floors[name] = topic.floor
                streams.append(topic.after(after))
        events = list(heapq.merge(*streams, key=lambda e: e.id))
        return Snapshot(after, self._last, self._epoch, floors, events).judge(topics, after)

    # -- internals -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerUnavailable("the embedded broker is closed")

    def _cutoff(self) -> int:
        """Ids below this are older than the TTL (an id is never below its publish time)."""
        return now_us(self._clock) - int(self._retention.ttl * 1_000_000)

    def _new_topic_floor(self, cutoff: int) -> int:
        """The floor of a topic with nothing retained.

        Had it kept any event newer than the TTL, it would still hold it; so
        whatever it had is below ``cutoff``, and this life holds nothing
        older than the epoch.
        """
        return max(self._epoch, cutoff)

    def _trim(self, cutoff: int) -> None:
        """Drop the oldest events while the buffer is over its byte ceiling, and those older than ``cutoff``."""
        order = self._order
        ceiling = self._retention.max_bytes
        while order and ((ceiling is not None and self._bytes > ceiling) or order[0].id < cutoff):
            event = order.popleft()
            self._bytes -= event_bytes(event)
            topic = self._topics.get(event.topic)
            if topic is not None and topic.events and topic.events[0] is event:
                topic.events.popleft()  # still retained: the ceiling or the TTL takes it now
                topic.floor = event.id

    def sweep(self) -> None:
        """Expire old events everywhere and forget topics left empty."""
        cutoff = self._cutoff()
        self._trim(cutoff)
        for name, topic in list(self._topics.items()):
            topic.expire(cutoff)
            if not topic.events:
                del self._topics[name]
        now = now_us(self._clock)
        for key, (expiry, _) in list(self._idempotency.items()):
            if expiry <= now:
                del self._idempotency[key]

    async def _sweep_forever(self) -> None:
        interval = min(60.0, max(1.0, self._retention.ttl / 4))
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    # -- NodeDirectory: a node on the embedded broker is its own cluster ----------

    # Wall-clock time, as Redis' key TTLs: a registry is about real time, not the ids' clock.

    async def announce(self, node_id: str, record: str, ttl: float) -> None:
        now = time.time()
        self._announced[node_id] = (record, now + ttl, now)

    async def nodes(self, forget: float) -> list[NodeRecord]:
        now = time.time()
        for node_id in [n for n, (_, _, seen) in self._announced.items() if now - seen > forget]:
            del self._announced[node_id]
        return [NodeRecord(n, record, now < alive_until) for n, (record, alive_until, _) in self._announced.items()]

    # -- NodeEntries: kept in process (``keep`` has nothing to outlive) -------------

    async def put_entries(self, node_id: str, kind: str, entries: Mapping[str, str], keep: float) -> None:
        self._entries.setdefault((kind, node_id), {}).update(entries)

    async def drop_entries(self, node_id: str, kind: str, keys: Collection[str], keep: float) -> None:
        held = self._entries.get((kind, node_id))
        if held is not None:
            for key in keys:
                held.pop(key, None)
            if not held:
                del self._entries[kind, node_id]

    async def entries(self, kind: str, node_ids: Collection[str]) -> dict[str, dict[str, str]]:
        return {n: dict(held) for n in node_ids if (held := self._entries.get((kind, n)))}

    async def take_entries(self, node_id: str, kind: str) -> dict[str, str]:
        return self._entries.pop((kind, node_id), {})

    def stats(self) -> dict[str, int]:
        """Counts for the node's /stats endpoint."""
        return {
            "topics_retained": len(self._topics),
            "events_retained": sum(len(t.events) for t in self._topics.values()),
            "retained_bytes": self._bytes,
            "topics_subscribed": len(self._subscribed),
        }
