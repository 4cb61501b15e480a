"""Topics spread over partitions: the publish capacity of several Redis primaries (``HERALD_REDIS_PARTITIONS``).

Each partition is a whole Herald data set of its own (:class:`RedisBroker`:
its counter, epoch, streams, scripts and feed), under its own hash tag, so on
a Redis Cluster each lives in one slot and the partitions spread over the
shards. Everything proven of one data set holds per partition: ids, order,
retention and floors, idempotency, ``WAIT``, failover, the feed's backfills.

* **Which partition.** A topic belongs to partition ``key_slot(topic) mod P``
  (``key_slot``: Redis Cluster's CRC16 hash slot of the topic's name), the
  same for every node and producer. Partition ``k``'s tag hashes into the
  ``k``-th of ``P`` equal slot ranges (:func:`partition_tags`), so a cluster
  made by ``redis-cli --cluster create`` (equal ranges per shard) carries
  ``P / shards`` partitions on each shard when ``P`` is a multiple of its
  shards.
* **Ids.** A partition's sequence is its own. What a client holds is a cursor
  (:mod:`broker.redis.cursor`): the node's position in every partition, one
  short text shared by every subscriber of the node. Inside the node the
  feed's events are numbered in delivery order (``max(last + 1, seq)``, so
  still about their publish time in microseconds), which is what the hub
  orders and hands over by (:class:`~broker.base.Cursors`).
* **Resume** reads, per partition of the client's topics, what came after
  the cursor's position there, up to the feed's own position (the feed is
  first brought past the client's: :meth:`Feed.reach`), and goes live from
  there. Each partition's floor and epoch decide ``reset`` as on one Redis.
* **Order** is total per topic and per partition; across partitions a node
  delivers each in its own order, and none is promised.
* **Batches** are atomic per partition: a batch over several partitions is
  one script per partition (concurrently), each recording the idempotency key
  in its own partition, so a retry with the key completes exactly the parts
  that did not happen. With ``replicas_ack`` each part waits on its own shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Collection, Mapping, Sequence

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from broker.base import (
    BrokerMisconfigured,
    Clock,
    Event,
    EventSink,
    History,
    Message,
    NodeRecord,
    Reset,
    ResetReason,
    RetentionPolicy,
)
from broker.redis.broker import RedisBroker
from broker.redis.connection import RedisTarget, make_client
from broker.redis.cursor import decode, encode
from broker.redis.sharded import ShardLinks

SLOTS = 16384
"""Redis Cluster's hash slots."""


def partition_tags(partitions: int, name: str = "herald") -> list[str]:
    """Each partition's hash tag: ``{herald}`` for the first (one partition is the one-slot deployment), then
    the first ``{herald-<k>-<j>}`` whose slot is in the ``k``-th of ``partitions`` equal slot ranges."""
    tags = []
    for k in range(partitions):
        low, high = k * SLOTS // partitions, (k + 1) * SLOTS // partitions
        candidates = itertools.chain([name] if k == 0 else [], (f"{name}-{k}-{j}" for j in itertools.count()))
        tag = next(c for c in candidates if low <= key_slot(c.encode()) < high)
        tags.append("{" + tag + "}")
    return tags


def partition_of(topic: str, partitions: int) -> int:
    """The partition that holds ``topic``: its hash slot modulo ``partitions`` (what producers compute too)."""
    return key_slot(topic.encode()) % partitions


class _PartitionSink:
    """What one partition's feed calls: its events numbered and given the node's cursor, on to the node's sink."""

    def __init__(self, spread: SpreadBroker, index: int) -> None:
        self._spread = spread
        self._index = index

    def on_event(self, event: Event) -> None:
        self._spread._deliver(self._index, event)

    def on_reset(self, reset: Reset) -> None:
        sink = self._spread._sink
        if sink is not None:
            sink.on_reset(reset)


class SpreadBroker:
    """A :class:`~broker.base.Broker` over ``partitions`` Herald data sets, one hash tag each (see the module)."""

    def __init__(
        self,
        target: RedisTarget,
        retention: RetentionPolicy | None = None,
        *,
        partitions: int,
        clock: Clock | None = None,
        timeout: float = 2.0,
        pool: int = 50,
        replicas_ack: int = 0,
        read_replicas: bool = False,
    ) -> None:
        if partitions < 2:
            raise ValueError("a SpreadBroker has two partitions or more (one is a RedisBroker)")
        self.partitions = partitions
        self._client = make_client(target, pool, timeout, timeout)
        self._feed_client = make_client(target, 2, None, timeout)
        # One subscribing connection per cluster node read from, for every partition's feed (one Redis: each
        # feed its own plain pub/sub connection).
        feeds = self._feed_client
        self._links = ShardLinks(feeds, replica=read_replicas) if isinstance(feeds, RedisCluster) else None
        self._parts = [
            RedisBroker(
                target,
                retention,
                prefix=tag,
                clock=clock,
                timeout=timeout,
                client=self._client,
                feed_client=self._feed_client,
                links=self._links,
                read_replicas=read_replicas,
                pool=pool,
                replicas_ack=replicas_ack,
            )
            for tag in partition_tags(partitions)
        ]
        self._feeds = [part.feed for part in self._parts]
        self._sink: EventSink | None = None
        self._delivered = 0  # the last number given to a delivered event (see _deliver)

    def _split(self, topics: Collection[str]) -> dict[int, list[str]]:
        """``topics`` by partition."""
        parts: dict[int, list[str]] = {}
        for topic in topics:
            parts.setdefault(partition_of(topic, self.partitions), []).append(topic)
        return parts

    # -- lifecycle -------------------------------------------------------------

    async def start(self, sink: EventSink) -> None:
        self._sink = sink
        try:
            await asyncio.gather(*(part.start(_PartitionSink(self, k)) for k, part in enumerate(self._parts)))
        except BrokerMisconfigured:
            await self.close()
            raise

    async def close(self) -> None:
        self._sink = None
        await asyncio.gather(*(part.close() for part in self._parts))
        if self._links is not None:
            await self._links.close()
        for client in (self._client, self._feed_client):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def ping(self) -> bool:
        answers = await asyncio.gather(*(part.ping() for part in self._parts))
        return all(answers)

    async def resync(self) -> None:
        """:class:`broker.base.Resyncs`: every partition's feed reconnects and backfills."""
        await asyncio.gather(*(part.resync() for part in self._parts))

    # -- the live feed, numbered -----------------------------------------------

    def _vector(self) -> list[int]:
        return [feed.last_seen for feed in self._feeds]

    def _deliver(self, index: int, event: Event) -> None:
        """One partition's event, numbered in delivery order and given the node's cursor at it."""
        number = self._delivered = max(self._delivered + 1, event.id)
        vector = self._vector()
        if vector[index] < event.id:  # a backfilled event: the feed's position moves past it afterwards
            vector[index] = event.id
        if self._sink is not None:
            self._sink.on_event(Event(number, event.topic, event.data, event.type, encode(vector)))

    # -- the Broker contract -----------------------------------------------------

    async def publish(self, messages: Sequence[Message], idempotency_key: str | None = None) -> list[Event]:
        """Each partition's part of the batch as one publish there, concurrently (atomic per partition).

        The events come back in the batch's order with each partition's own sequence as ``id`` (what
        ``POST /publish`` answers); subscribers see cursors instead.
        """
        parts: dict[int, list[int]] = {}
        for i, message in enumerate(messages):
            parts.setdefault(partition_of(message.topic, self.partitions), []).append(i)
        answers = await asyncio.gather(
            *(self._parts[k].publish([messages[i] for i in indexes], idempotency_key) for k, indexes in parts.items())
        )
        events: list[Event | None] = [None] * len(messages)
        for indexes, published in zip(parts.values(), answers, strict=True):
            for i, event in zip(indexes, published, strict=True):
                events[i] = event
        return [e for e in events if e is not None]

    async def subscribe(self, topics: Collection[str]) -> None:
        await asyncio.gather(*(self._parts[k].subscribe(ts) for k, ts in self._split(topics).items()))

    async def unsubscribe(self, topics: Collection[str]) -> None:
        await asyncio.gather(*(self._parts[k].unsubscribe(ts) for k, ts in self._split(topics).items()))

    async def position(self, topics: Collection[str]) -> int:
        return (await self.position_cursor(topics))[0]

    async def position_cursor(self, topics: Collection[str]) -> tuple[int, str]:
        """Where a fresh client starts: each partition of its topics answers its own position (the head read after a
        fresh subscription, as on one Redis); the others' are the feeds' positions."""
        split = self._split(topics)
        positions = await asyncio.gather(*(self._parts[k].position(ts) for k, ts in split.items()))
        vector = self._vector()
        for k, position in zip(split, positions, strict=True):
            vector[k] = max(vector[k], position)
        return self._delivered, encode(vector)

    def position_cursor_now(self, topics: Collection[str]) -> tuple[int, str] | None:
        """:meth:`position_cursor` at once, when every partition's feed carries its topics exactly (else None)."""
        for k, ts in self._split(topics).items():
            if self._parts[k].position_now(ts) is None:
                return None
        return self._delivered, encode(self._vector())

    async def head(self) -> int:
        return self._delivered

    async def history(self, topics: Collection[str], after: int) -> History:
        """Not a resume of this broker's clients (they hold cursors: :meth:`history_from`); the events of
        ``topics`` above ``after`` in every partition's own sequence, for tools."""
        split = self._split(topics)
        answers = await asyncio.gather(*(self._parts[k].history(ts, after) for k, ts in split.items()))
        events = sorted((e for h in answers for e in h.events), key=lambda e: e.id)
        return History(events, max((h.head for h in answers), default=0), _merge_resets([h.reset for h in answers]))

    async def history_from(self, topics: Collection[str], cursor: str) -> tuple[History, str] | None:
        """The events of ``topics`` after ``cursor``, each with the client's cursor once it has it, up to the
        node's feed; then live from there (see the module docstring). None: not a cursor of this deployment."""
        after = decode(cursor, self.partitions)
        if after is None:
            return None
        split = self._split(topics)
        await asyncio.gather(*(self._feeds[k].reach(ts, after[k]) for k, ts in split.items()))
        if any(self._feeds[k].last_seen < after[k] for k in split):
            return None  # a position above the partition's head: never issued here
        # Everything up to the feeds' positions now has reached the sink (and the client, held aside, gets what
        # comes after): replay up to them, no further.
        position, upto = self._delivered, self._vector()
        answers = await asyncio.gather(*(self._parts[k].history(ts, after[k]) for k, ts in split.items()))
        replay: list[tuple[int, Event]] = []
        for k, answer in zip(split, answers, strict=True):
            replay += ((k, e) for e in answer.events if e.id <= upto[k])
        replay.sort(key=lambda pair: pair[1].id)
        # Each replayed event's cursor: the client's own position, advanced through the replay (partitions without
        # its topics at the feed's position), so a reconnect anywhere in the replay resumes exactly there.
        reached = [after[k] if k in split else upto[k] for k in range(self.partitions)]
        events = []
        for k, event in replay:
            reached[k] = event.id
            events.append(Event(event.id, event.topic, event.data, event.type, encode(reached)))
        reset = _merge_resets([answer.reset for answer in answers])
        return History(events, position, reset), encode(upto)

    def sequence(self, topic: str, cursor: str) -> int:
        vector = decode(cursor, self.partitions)
        return 0 if vector is None else vector[partition_of(topic, self.partitions)]

    def cursor(self, topic: str, sequence: int) -> str:
        vector = [0] * self.partitions
        vector[partition_of(topic, self.partitions)] = sequence
        return encode(vector)

    # -- NodeDirectory and NodeEntries: partition 0's ------------------------------------

    async def announce(self, node_id: str, record: str, ttl: float) -> None:
        await self._parts[0].announce(node_id, record, ttl)

    async def nodes(self, forget: float) -> list[NodeRecord]:
        return await self._parts[0].nodes(forget)

    async def put_entries(self, node_id: str, kind: str, entries: Mapping[str, str], keep: float) -> None:
        await self._parts[0].put_entries(node_id, kind, entries, keep)

    async def drop_entries(self, node_id: str, kind: str, keys: Collection[str], keep: float) -> None:
        await self._parts[0].drop_entries(node_id, kind, keys, keep)

    async def entries(self, kind: str, node_ids: Collection[str]) -> dict[str, dict[str, str]]:
        return await self._parts[0].entries(kind, node_ids)

    async def take_entries(self, node_id: str, kind: str) -> dict[str, str]:
        return await self._parts[0].take_entries(node_id, kind)

    def stats(self) -> dict[str, int]:
        totals: dict[str, int] = {"partitions": self.partitions}
        for part in self._parts:
            for name, value in part.stats().items():
                if name == "feed_up":
                    totals[name] = min(totals.get(name, 1), value)
                elif name == "pool_size":
                    totals[name] = value
                else:
                    totals[name] = totals.get(name, 0) + value
        return totals


def _merge_resets(resets: Sequence[Reset | None]) -> Reset | None:
    """One reset for several partitions' judgements: every topic any of them names, for the gravest reason."""
    found = [r for r in resets if r is not None and r.topics]
    if not found:
        return None
    order = (ResetReason.LOST, ResetReason.EXPIRED, ResetReason.INVALID_ID)
    reason = min((r.reason for r in found), key=lambda reason: order.index(reason) if reason in order else len(order))
    return Reset(reason, tuple(t for r in found for t in r.topics))
