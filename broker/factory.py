"""Choosing a broker from settings: the one place that knows every implementation."""

from __future__ import annotations

from broker.base import Broker, RetentionPolicy
from broker.memory import MemoryBroker


def create_broker(redis_url: str | None, retention: RetentionPolicy) -> Broker:
    """The embedded broker when ``redis_url`` is None, else the Redis broker."""
    if redis_url is None:
        return MemoryBroker(retention)
    raise ValueError("REDIS_URL is set, but this build has no Redis broker yet: unset it to run the embedded broker")
