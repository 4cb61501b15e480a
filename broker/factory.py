"""Choosing a broker from settings: the one place that knows every implementation."""

from __future__ import annotations

from broker.base import Broker, RetentionPolicy
from broker.memory import MemoryBroker


def create_broker(redis_url: str | None, retention: RetentionPolicy) -> Broker:
    """The embedded broker when ``redis_url`` is None, else the Redis broker."""
    if redis_url is None:
        return MemoryBroker(retention)
    from broker.redis import RedisBroker  # only when asked for: the embedded broker needs no Redis client

    return RedisBroker(redis_url, retention)
