"""Choosing a broker from settings: the one place that knows every implementation."""

from __future__ import annotations

from broker.base import Broker, RetentionPolicy
from broker.memory import MemoryBroker


def create_broker(
    redis_url: str | None,
    retention: RetentionPolicy,
    *,
    sentinels: str | None = None,
    sentinel_master: str = "herald",
    pool: int = 50,
    replicas_ack: int = 0,
) -> Broker:
    """The embedded broker when neither ``redis_url`` nor ``sentinels`` is set, else the Redis broker.

    ``sentinels`` (``host:port,host:port``) win over ``redis_url``: the
    broker then follows the primary that the sentinels name ``sentinel_master``.
    """
    if redis_url is None and not sentinels:
        return MemoryBroker(retention)
    # Only when asked for: the embedded broker needs no Redis client.
    from broker.redis import RedisBroker, RedisTarget

    if sentinels:
        target = RedisTarget(sentinels=RedisTarget.parse_sentinels(sentinels), master=sentinel_master)
    else:
        target = RedisTarget(url=redis_url)
    return RedisBroker(target, retention, pool=pool, replicas_ack=replicas_ack)
