"""The Redis broker: one Redis server or a Sentinel-managed primary, its parts put together.

Each job is a module of its own: :mod:`~broker.redis.connection` (the target,
the client policy, the pool and its one retry), :mod:`~broker.redis.publish`,
:mod:`~broker.redis.history` (shared replay reads), :mod:`~broker.redis.feed`
(the node's live feed and its backfills) and :mod:`~broker.redis.directory`
(nodes and their entries). :class:`RedisBroker` is what the node and the
producers hold: the :class:`~broker.base.Broker` contract over those parts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Mapping, Sequence

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from broker.base import (
    BrokerMisconfigured,
    BrokerUnavailable,
    Clock,
    Event,
    EventSink,
    History,
    Message,
    NodeRecord,
    RetentionPolicy,
)
from broker.redis.connection import Commands, RedisTarget, check_server, make_client
from broker.redis.directory import Directory
from broker.redis.feed import Feed
from broker.redis.history import Reads
from broker.redis.publish import Publisher
from broker.redis.sharded import ShardLinks


class RedisBroker:
    """A :class:`~broker.base.Broker` on one Redis server or a Sentinel-managed primary (not Redis Cluster).

    ``publish`` works without :meth:`start` (a producer needs no feed).
    Time (the ids' seed and retention by age) comes from Redis's own clock,
    one clock for every node and producer; tests pass ``clock`` instead.
    ``pool`` bounds the commands in flight (more wait, see
    :data:`~broker.redis.connection.POOL_WAIT`); ``replicas_ack`` is how many
    replicas must have a publish before it returns.
    """

    def __init__(
        self,
        url: str | RedisTarget,
        retention: RetentionPolicy | None = None,
        *,
        prefix: str = "herald",
        clock: Clock | None = None,
        timeout: float = 2.0,
        client: aioredis.Redis | None = None,
        feed_client: aioredis.Redis | None = None,
        links: ShardLinks | None = None,
        pool: int = 50,
        replicas_ack: int = 0,
        read_replicas: bool = False,
    ) -> None:
        target = url if isinstance(url, RedisTarget) else RedisTarget(url=url)
        if target.cluster and not prefix.startswith("{"):
            # One hash tag for every key: on a Redis Cluster they all share one slot (a script reaches one).
            prefix = "{" + prefix + "}"
        retention = retention or RetentionPolicy()
        self.counters = {
            "feed_connects": 0,
            "backfilled_events": 0,
            "history_requests": 0,
            "history_reads": 0,
            "head_requests": 0,
            "positions_from_feed": 0,
            "duplicates_dropped": 0,
            "bad_messages": 0,
            "read_retries": 0,
            "lost_marked": 0,
        }
        self._commands_timeout = timeout
        # Clients given are shared (the partitions of a SpreadBroker): whoever made them closes them.
        self._owns_clients = client is None
        self._redis: aioredis.Redis = client or make_client(target, pool, timeout, timeout)
        self._feed_redis: aioredis.Redis = feed_client or client or make_client(target, 2, None, timeout)
        self._commands = Commands(self._redis, pool, prefix, clock, self.counters)
        self._publisher = Publisher(self._commands, retention, replicas_ack)
        self._reads = Reads(self._commands, retention)
        if links is None and isinstance(self._feed_redis, RedisCluster):
            links = ShardLinks(self._feed_redis, replica=read_replicas)
        self._links = links if self._owns_clients else None  # (given ones are closed by whoever made them)
        self._feed = Feed(self._commands, self._feed_redis, self._reads, self._publisher, links)
        if links is not None and links.replica:
            self._reads.replica = self._feed.replica  # resumes read where the feed reads
        self._directory = Directory(self._commands)

    @property
    def prefix(self) -> str:
        """The keys' and channels' prefix (``herald``): the Redis contract's ``<prefix>``."""
        return self._commands.prefix

    # -- lifecycle -------------------------------------------------------------

    async def start(self, sink: EventSink) -> None:
        """Start the feed; BrokerMisconfigured, before anything starts, when the server can't serve Herald.

        (A Redis that can't be reached is a passing fault: the node starts and the feed keeps trying, and
        checks again when it connects.)
        """
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self._commands_timeout):
                problem = await check_server(self._redis)
            if problem is not None:
                raise BrokerMisconfigured(problem)
        await self._feed.start(sink)

    async def close(self) -> None:
        self._commands.closed = True
        await self._feed.close()
        await self._reads.close()
        if self._links is not None:
            await self._links.close()
        if not self._owns_clients:
            return
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()
        if self._feed_redis is not self._redis:
            with contextlib.suppress(RedisError, OSError):
                await self._feed_redis.aclose()

    async def ping(self) -> bool:
        if self._commands.closed:
            return False
        try:
            pong = await self._commands.call(self._redis.ping)
        except BrokerUnavailable:
            return False
        return bool(pong) and self._feed.serving

    # -- the Broker contract -----------------------------------------------------

    async def publish(self, messages: Sequence[Message], idempotency_key: str | None = None) -> list[Event]:
        return await self._publisher.publish(messages, idempotency_key)

    async def head(self) -> int:
        return await self._reads.head()

    async def position(self, topics: Collection[str]) -> int:
        return await self._feed.position(topics)

    @property
    def feed(self) -> Feed:
        """The live feed (a SpreadBroker reads its partitions' positions from it)."""
        return self._feed

    def position_now(self, topics: Collection[str]) -> int | None:
        """The feed's position when it carries every one of ``topics`` exactly, else None (see :class:`Feed`)."""
        return self._feed.position_now(topics)

    async def history(self, topics: Collection[str], after: int) -> History:
        return await self._reads.history(topics, after)

    async def subscribe(self, topics: Collection[str]) -> None:
        await self._feed.subscribe(topics)

    async def unsubscribe(self, topics: Collection[str]) -> None:
        await self._feed.unsubscribe(topics)

    async def resync(self) -> None:
        """:class:`broker.base.Resyncs`: the feed reconnects and backfills."""
        await self._feed.resync()

    # -- NodeDirectory and NodeEntries ---------------------------------------------

    async def announce(self, node_id: str, record: str, ttl: float) -> None:
        await self._directory.announce(node_id, record, ttl)

    async def nodes(self, forget: float) -> list[NodeRecord]:
        return await self._directory.nodes(forget)

    async def put_entries(self, node_id: str, kind: str, entries: Mapping[str, str], keep: float) -> None:
        await self._directory.put_entries(node_id, kind, entries, keep)

    async def drop_entries(self, node_id: str, kind: str, keys: Collection[str], keep: float) -> None:
        await self._directory.drop_entries(node_id, kind, keys, keep)

    async def entries(self, kind: str, node_ids: Collection[str]) -> dict[str, dict[str, str]]:
        return await self._directory.entries(kind, node_ids)

    async def take_entries(self, node_id: str, kind: str) -> dict[str, str]:
        return await self._directory.take_entries(node_id, kind)

    def stats(self) -> dict[str, int]:
        return {
            "topics_subscribed": self._feed.topics,
            "feed_up": int(self._feed.up),
            "pool_size": self._commands.pool,
            "pool_in_use": self._commands.in_use,
            **self.counters,
        }
