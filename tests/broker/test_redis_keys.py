"""What a script declares as KEYS: everything it touches on a Redis Cluster, just the counter on one Redis."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from broker.redis.connection import Commands


def commands(client: aioredis.Redis, prefix: str) -> Commands:
    return Commands(client, 1, prefix, None, {})


def test_on_one_redis_every_script_names_only_the_counter() -> None:
    one = commands(aioredis.Redis(), "herald")
    assert one.publish_keys(["a", "b"], "k") == ["herald:id"]
    assert one.history_keys(["a"]) == ["herald:id"]


def test_a_cluster_publish_declares_every_key_so_a_migrating_slot_refuses_it_whole() -> None:
    """With only {herald}:id declared, a batch could run on a slot's old owner after some of its streams had moved
    and fail half-way (a script is not rolled back): its first events published, no idempotency record written."""
    cluster = commands(RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", 1)]), "{herald}")  # type: ignore[arg-type]
    assert cluster.publish_keys(["a", "b", "a"], "k") == [
        "{herald}:id",
        "{herald}:epoch",
        "{herald}:s:a",
        "{herald}:s:b",
        "{herald}:idem:k",
    ]
    assert cluster.publish_keys(["a"], None) == ["{herald}:id", "{herald}:epoch", "{herald}:s:a"]
    assert cluster.history_keys(["a"]) == ["{herald}:id", "{herald}:epoch", "{herald}:s:a", "{herald}:f:a"]
