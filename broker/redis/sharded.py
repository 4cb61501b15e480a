"""The feed's connection on a Redis Cluster: sharded Pub/Sub on the node that serves Herald's slot.

On a cluster, ``publish.lua`` sends each event with ``SPUBLISH`` (the prefix is
a hash tag, so every channel lives in the slot of Herald's keys): a message
reaches only the nodes of that slot's shard, not every node over the cluster
bus. A node's feed reads them with ``SSUBSCRIBE`` on one connection to the node
that serves the slot: the shard's primary, or one of its replicas with
``replica`` (``HERALD_REDIS_READ_REPLICAS``; a replica receives every sharded
message its primary does, a replication delay later).

:class:`ShardedPubSub` speaks the few calls the feed makes of a pub/sub
(``subscribe``, ``unsubscribe``, ``get_message``, ``aclose``) and hands back
messages as plain pub/sub ones, so :class:`~broker.redis.feed.Feed` keeps one
code path for both. It never heals by itself, on purpose: whatever interrupts
it ends it with an error, and the feed's reconnect (which backfills from the
streams) is the one way back. That covers the server's own ``sunsubscribe``
of a channel whose slot moved (``redis-cli --cluster reshard``; the new owner
is found on the next connect, after the slot map is read again), a ``MOVED``
answer to ``SSUBSCRIBE`` (the slot map was stale), and a dropped connection
(failover). redis-py's ``ClusterPubSub`` mends those itself, silently: the
messages published meanwhile would be lost without the feed knowing to
backfill them.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from broker.base import BrokerUnavailable

_TYPES = {"smessage": "message", "ssubscribe": "subscribe"}
"""Sharded message types as the feed knows them (plain pub/sub's names)."""


class ShardedPubSub:
    """One ``SSUBSCRIBE`` connection to the node serving ``key``'s slot (see the module docstring)."""

    def __init__(self, cluster: RedisCluster, key: str, *, replica: bool = False) -> None:
        node = cluster.get_node_from_key(key, replica=True) if replica else None
        if node is None:  # no replica (or none asked for): the primary
            node = cluster.get_node_from_key(key)
        assert node is not None
        self.node = node.name
        # The cluster client's own settings for that node (credentials, timeouts, RESP2), on a connection of ours.
        kwargs = node.connection_kwargs
        pool = aioredis.ConnectionPool(connection_class=node.connection_class, max_connections=1, **kwargs)
        self._client = aioredis.Redis.from_pool(pool)  # closed with the client
        self._pubsub = self._client.pubsub()
        self._wanted: set[str] = set()

    async def subscribe(self, *channels: str) -> None:
        self._wanted.update(channels)
        await self._pubsub.ssubscribe(*channels)

    async def unsubscribe(self, *channels: str) -> None:
        self._wanted.difference_update(channels)
        await self._pubsub.sunsubscribe(*channels)

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        """The next message (plain pub/sub's shape), None after ``timeout``; raises once the slot moved."""
        message: dict[str, Any] | None = await self._pubsub.get_message(timeout=timeout)
        if message is None:
            return None
        kind = message["type"]
        if kind == "sunsubscribe":
            if message["channel"] in self._wanted:
                # Not asked for: the server dropped the channel because its slot now lives elsewhere.
                raise BrokerUnavailable(f"redis cluster: the slot of {message['channel']} moved away from {self.node}")
            return None
        message["type"] = _TYPES.get(kind, kind)
        return message

    async def aclose(self) -> None:
        try:
            await self._pubsub.aclose()
        finally:
            await self._client.aclose()
