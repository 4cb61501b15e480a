"""The feeds' connections on a Redis Cluster: sharded Pub/Sub, one connection per cluster node read from.

On a cluster, ``publish.lua`` sends each event with ``SPUBLISH`` (the prefix is
a hash tag, so a data set's channels live in the slot of its keys): a message
reaches only the nodes of that slot's shard, not every node over the cluster
bus. A feed (one per partition, :mod:`broker.redis.spread`) reads its channels
with ``SSUBSCRIBE`` on the node that serves its slot: the shard's primary, or
its first replica with ``replica`` (``HERALD_REDIS_READ_REPLICAS``; a replica
receives every sharded message its primary does, a replication delay later).

:class:`ShardLinks` keeps one connection (:class:`_Link`) per cluster node and
shares it between every feed whose slot that node serves, so a Herald node
holds at most one subscribing connection per shard however many partitions
and topics it carries. Each feed sees its own :class:`ShardedPubSub`: the few
calls a feed makes of a pub/sub (``subscribe``, ``unsubscribe``,
``get_message``, ``aclose``), messages in plain pub/sub's shape, so
:class:`~broker.redis.feed.Feed` keeps one code path for both.

Nothing here heals by itself, on purpose: whatever interrupts a feed's
messages ends its view with an error, and the feed's reconnect (which
backfills from the streams) is the one way back. That covers the server's
own ``sunsubscribe`` of a channel whose slot moved (``redis-cli --cluster
reshard``: only the views of that slot end, the new owner is found on their
next connect), a ``MOVED`` answer to ``SSUBSCRIBE`` (a stale slot map), a
dropped connection (a failover: every view on it ends), and a feed that fell
:data:`QUEUE` messages behind. redis-py's ``ClusterPubSub`` mends those itself,
silently: what was published meanwhile would be lost without the feed
knowing to backfill it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from broker.base import BrokerUnavailable
from broker.redis.connection import node_client

QUEUE = 65536
"""Messages a feed may fall behind its shared connection before its view ends (it then reconnects and backfills)."""

_TYPES = {"smessage": "message", "ssubscribe": "subscribe"}
"""Sharded message types as the feed knows them (plain pub/sub's names)."""


class ShardLinks:
    """A node's sharded Pub/Sub connections: one per cluster node, shared by the feeds whose slots it serves."""

    def __init__(self, cluster: RedisCluster, *, replica: bool = False) -> None:
        self._cluster = cluster
        self.replica = replica
        self._links: dict[str, _Link] = {}

    def node_for(self, key: str) -> ClusterNode:
        """The node a feed of ``key``'s slot reads from: its first replica with ``replica`` (if it has one), else
        its primary, as the client's slot map says now."""
        try:
            node = self._cluster.get_node_from_key(key, replica=True) if self.replica else None
            if node is None:
                node = self._cluster.get_node_from_key(key)
        except (RedisClusterException, RedisError) as exc:  # the slot map has no owner for it now (a failover)
            raise BrokerUnavailable(f"redis cluster: {exc}") from exc
        if node is None:
            raise BrokerUnavailable(f"redis cluster: no node serves the slot of {key}")
        return node

    def open(self, key: str) -> ShardedPubSub:
        """A feed's view on the connection to the node serving ``key``'s slot (made when there is none yet)."""
        node = self.node_for(key)
        link = self._links.get(node.name)
        if link is None or link.error is not None:
            link = self._links[node.name] = _Link(node, self._forget)
        return ShardedPubSub(link)

    def _forget(self, link: _Link) -> None:
        if self._links.get(link.name) is link:
            del self._links[link.name]

    async def close(self) -> None:
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()


class _Link:
    """One ``SSUBSCRIBE`` connection to one cluster node, and the views it feeds (by channel)."""

    def __init__(self, node: ClusterNode, forget: Any) -> None:
        self.name = node.name
        self._client = node_client(node, 1)
        self._pubsub = self._client.pubsub()
        self._owners: dict[str, ShardedPubSub] = {}
        self._views: set[ShardedPubSub] = set()
        self._reader: asyncio.Task[None] | None = None
        self._forget = forget
        self.error: BrokerUnavailable | None = None

    def join(self, view: ShardedPubSub) -> None:
        self._views.add(view)

    async def subscribe(self, view: ShardedPubSub, channels: tuple[str, ...]) -> None:
        if self.error is not None:
            raise self.error
        for channel in channels:
            self._owners[channel] = view
        try:
            await self._pubsub.ssubscribe(*channels)
        except (RedisError, OSError) as exc:  # MOVED (a stale slot map), or the connection is gone
            self._fail(BrokerUnavailable(f"redis cluster {self.name}: {exc}"))
            raise self.error from exc  # type: ignore[misc]
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name=f"herald-shard-link-{self.name}")

    async def unsubscribe(self, view: ShardedPubSub, channels: tuple[str, ...]) -> None:
        mine = tuple(c for c in channels if self._owners.get(c) is view)
        for channel in mine:
            del self._owners[channel]
        if mine and self.error is None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.sunsubscribe(*mine)

    async def leave(self, view: ShardedPubSub) -> None:
        """A view closed: its channels go, and the connection with the last view."""
        self._views.discard(view)
        await self.unsubscribe(view, tuple(view.wanted))
        if not self._views:
            await self.close()

    async def _read(self) -> None:
        owners = self._owners
        try:
            while True:
                message: dict[str, Any] | None = await self._pubsub.get_message(timeout=None)
                if message is None:
                    continue
                kind = message["type"]
                view = owners.get(message["channel"])
                if view is None:
                    continue  # a channel no feed wants any more
                if kind == "sunsubscribe":
                    if message["channel"] in view.wanted:
                        # Not asked for: the server dropped the channel because its slot now lives elsewhere.
                        del owners[message["channel"]]
                        view.fail(
                            BrokerUnavailable(f"redis cluster: the slot of {message['channel']} left {self.name}")
                        )
                    continue
                message["type"] = _TYPES.get(kind, kind)
                view.put(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection is gone, whatever the cause: every view on it must reconnect
            self._fail(BrokerUnavailable(f"redis cluster {self.name}: {exc}"))

    def _fail(self, error: BrokerUnavailable) -> None:
        if self.error is None:
            self.error = error
        self._forget(self)
        for view in list(self._views):
            view.fail(error)

    async def close(self) -> None:
        if self.error is None:
            self.error = BrokerUnavailable(f"redis cluster {self.name}: connection closed")
        self._forget(self)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await reader
        with contextlib.suppress(RedisError, OSError, RuntimeError):
            await self._pubsub.aclose()
        with contextlib.suppress(RedisError, OSError, RuntimeError):
            await self._client.aclose()


_ENDED: dict[str, Any] = {"type": "ended"}
"""Queued when a view ends, to wake a feed waiting for its next message."""


class ShardedPubSub:
    """One feed's view on a shared sharded connection (see the module docstring)."""

    def __init__(self, link: _Link) -> None:
        self._link = link
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._error: BrokerUnavailable | None = None
        self.wanted: set[str] = set()
        link.join(self)

    @property
    def node(self) -> str:
        """The cluster node (``host:port``) it reads from."""
        return self._link.name

    async def subscribe(self, *channels: str) -> None:
        self.wanted.update(channels)
        await self._link.subscribe(self, channels)

    async def unsubscribe(self, *channels: str) -> None:
        self.wanted.difference_update(channels)
        await self._link.unsubscribe(self, channels)

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        """The next message (plain pub/sub's shape), None after ``timeout``; raises once the view ended."""
        if self._error is not None:
            raise self._error
        try:
            message = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            try:
                async with asyncio.timeout(timeout):
                    message = await self._queue.get()  # (a cancelled get loses nothing: the message stays queued)
            except TimeoutError:
                return None
        if self._error is not None:
            raise self._error
        return message

    def put(self, message: dict[str, Any]) -> None:
        """A message from the link (never blocks): a feed :data:`QUEUE` messages behind ends instead."""
        if self._error is not None:
            return
        if self._queue.qsize() >= QUEUE:
            self.fail(BrokerUnavailable(f"the redis feed fell {QUEUE} messages behind"))
            return
        self._queue.put_nowait(message)

    def fail(self, error: BrokerUnavailable) -> None:
        if self._error is None:
            self._error = error
            self._queue.put_nowait(_ENDED)

    async def aclose(self) -> None:
        if self._error is None:
            self._error = BrokerUnavailable("closed")
        await self._link.leave(self)
