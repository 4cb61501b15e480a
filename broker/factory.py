"""Choosing a broker from settings: the one place that knows every implementation."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from broker.base import Broker, RetentionPolicy
from broker.memory import MemoryBroker

if TYPE_CHECKING:
    from broker.redis import RedisTarget


def create_broker(
    redis_url: str | None,
    retention: RetentionPolicy,
    *,
    sentinels: str | None = None,
    sentinel_master: str = "herald",
    cluster_nodes: str | None = None,
    pool: int = 50,
    replicas_ack: int = 0,
    partitions: int = 1,
    read_replicas: bool = False,
) -> Broker:
    """The embedded broker when no Redis is configured, else the Redis broker.

    ``sentinels`` (``host:port,host:port``) win over ``redis_url``: the
    broker then follows the primary that the sentinels name ``sentinel_master``.
    ``cluster_nodes`` (``host:port,...``) names a Redis Cluster; so does a
    ``redis_url`` whose server says it is a cluster node (``HELLO``, asked
    now: a Redis that can't be reached now is taken for one server). ``partitions`` above 1 spreads the
    topics over that many data sets, one hash slot each (:mod:`broker.redis.spread`); no Redis: ignored.
    """
    if redis_url is None and not sentinels and not cluster_nodes:
        return MemoryBroker(retention)
    target = redis_target(redis_url, sentinels=sentinels, sentinel_master=sentinel_master, cluster_nodes=cluster_nodes)
    return redis_broker(
        target, retention, partitions=partitions, pool=pool, replicas_ack=replicas_ack, read_replicas=read_replicas
    )


def redis_broker(
    target: RedisTarget,
    retention: RetentionPolicy,
    *,
    partitions: int = 1,
    pool: int = 50,
    replicas_ack: int = 0,
    read_replicas: bool = False,
) -> Broker:
    """The Redis broker for ``target``: one data set, or the topics over ``partitions`` (what nodes and producers
    writing straight to Redis both use, so they agree on where a topic lives)."""
    from broker.redis import RedisBroker

    if partitions > 1:
        from broker.redis.spread import SpreadBroker

        return SpreadBroker(
            target, retention, partitions=partitions, pool=pool, replicas_ack=replicas_ack, read_replicas=read_replicas
        )
    return RedisBroker(target, retention, pool=pool, replicas_ack=replicas_ack, read_replicas=read_replicas)


def partitions_setting() -> int:
    """``HERALD_REDIS_PARTITIONS`` as a producer outside a node reads it (a node reads it with its settings)."""
    return max(1, int(os.environ.get("HERALD_REDIS_PARTITIONS", "1")))


def redis_target(
    redis_url: str | None,
    *,
    sentinels: str | None = None,
    sentinel_master: str = "herald",
    cluster_nodes: str | None = None,
) -> RedisTarget:
    """Which Redis the settings name (see :func:`create_broker`): also what a producer writing to Redis uses."""
    from broker.redis import RedisTarget
    from broker.redis.connection import hello_now, is_cluster

    if sentinels:
        return RedisTarget(sentinels=RedisTarget.parse_sentinels(sentinels), master=sentinel_master)
    if cluster_nodes or (redis_url is not None and is_cluster(hello_now(redis_url))):
        seeds = RedisTarget.parse_sentinels(cluster_nodes, "a cluster node") if cluster_nodes else ()
        if redis_url is not None:
            url = urlsplit(redis_url)
            seeds = (*seeds, (url.hostname or "127.0.0.1", url.port or 6379))
        return RedisTarget(url=redis_url, cluster=seeds)
    return RedisTarget(url=redis_url)
