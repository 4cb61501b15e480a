"""A local Redis Cluster started by the project (``ops.cluster.redis_cluster``), and what a node does on it.

Real processes: six redis-server in cluster mode (3 primaries, a replica
each) joined by ``redis-cli --cluster create``, as an operator builds one.
Herald's broker does not run on a Redis Cluster yet (issue 23, part 2): a
node pointed at one must refuse to start and say why, not start and fail
most publishes (a script there reaches only its own node's slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import RedisError

from broker.redis.connection import server_problem
from ops import launch
from ops.cluster.redis_cluster import SLOTS, RedisCluster
from ops.cluster.sentinel import redis_client
from ops.probe import free_port, wait_until
from tests.redis_server import needs_redis

pytestmark = needs_redis


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    servers = RedisCluster([free_port() for _ in range(6)], tmp_path_factory.mktemp("redis-cluster"))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.mark.timeout(90)
def test_the_local_cluster_has_three_shards_each_with_a_replica(cluster: RedisCluster) -> None:
    shards = cluster.shards()
    assert len(shards) == 3
    assert sum(shard.slot_count for shard in shards) == SLOTS
    assert all(len(shard.replicas) == 1 for shard in shards)
    assert sorted([s.primary for s in shards] + [r for s in shards for r in s.replicas]) == sorted(cluster.ports)


@pytest.mark.timeout(90)
def test_a_node_pointed_at_a_cluster_refuses_to_start_and_says_why(cluster: RedisCluster, tmp_path: Path) -> None:
    log_path = tmp_path / "node.log"
    env = launch.node_env(free_port(), extra={"REDIS_URL": cluster.url})
    process = launch.spawn(launch.node_command(), log_path, env, new_session=False)
    try:
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text(errors="replace")
    assert code != 0, log
    assert "Redis Cluster" in log, log
    assert "HELLO: mode cluster" in log, log
    assert "REDIS_SENTINELS" in log, log  # what to use instead
    assert "Traceback" not in log, log


@pytest.mark.timeout(120)
def test_a_killed_primary_is_replaced_by_its_replica_within_seconds(cluster: RedisCluster) -> None:
    """The failover a cluster deployment leans on: cluster-node-timeout 2 s here, Redis's default 15 s."""
    first = cluster.shards()[0]
    killed = time.monotonic()
    cluster.kill(first.primary)

    def promoted() -> bool:
        shard = next(s for s in cluster.shards() if s.slots == first.slots)
        return shard.primary == first.replicas[0]

    wait_until(promoted, "the replica to take over the killed primary's slots", timeout=15)
    took = time.monotonic() - killed
    assert took < 15
    # The killed primary comes back as a replica of the new one, with its data.
    cluster.start_process(first.primary)
    wait_until(cluster.ready, "the old primary back as a replica", timeout=30)
    shard = next(s for s in cluster.shards() if s.slots == first.slots)
    assert shard.primary == first.replicas[0]
    assert shard.replicas == (first.primary,)


@pytest.mark.parametrize(
    ("hello", "unfit"),
    [
        ({"server": "redis", "version": "7.0.15", "mode": "standalone"}, None),
        ({"server": "redis", "version": "7.2.4", "mode": "cluster"}, "Redis Cluster"),
        ([b"server", b"redis", b"version", b"6.2.14", b"mode", b"standalone"], "Redis 7.0 or later"),
    ],
)
def test_what_hello_says_decides_whether_a_node_starts(hello: object, unfit: str | None) -> None:
    problem = server_problem(hello)
    if unfit is None:
        assert problem is None
    else:
        assert problem is not None
        assert unfit in problem


@pytest.mark.timeout(120)
async def test_sharded_pubsub_takes_one_connection_per_shard_and_follows_a_failover(cluster: RedisCluster) -> None:
    """What the cluster feed's design leans on (ARCHITECTURE.md, "Redis Cluster: the design"): redis-py's
    ClusterPubSub subscribes many channels over one connection per shard, and after a primary is killed the
    channels of its shard deliver again from the replica that took over."""
    client = AsyncRedisCluster(host="127.0.0.1", port=cluster.running_ports()[0], decode_responses=True)
    pubsub = client.pubsub()
    channels = [f"herald:{{t{i}}}:c" for i in range(60)]
    killed: int | None = None
    try:
        async with asyncio.timeout(100):
            await client.initialize()
            await pubsub.ssubscribe(*channels)

            async def deliver_all(marker: str) -> None:
                """Publish on every channel until every one delivered (pub/sub is at most once: a message
                published before the subscriber is back on a new primary is gone, so ask again)."""
                waiting = set(channels)
                while waiting:
                    for channel in waiting:
                        with contextlib.suppress(RedisError):  # refused until the replica takes over
                            await client.spublish(channel, f"{marker}:{channel}")
                    deadline = asyncio.get_running_loop().time() + 0.5
                    while waiting and asyncio.get_running_loop().time() < deadline:
                        message = await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=0.1)
                        if message is not None and message["type"] == "smessage":
                            got_marker, _, channel = str(message["data"]).partition(":")
                            if got_marker == marker:
                                waiting.discard(channel)

            await deliver_all("a")
            for shard in cluster.shards():  # one subscriber connection on each primary, for all 60 channels
                assert pubsub_clients(shard.primary) == 1

            killed = cluster.shards()[0].primary
            cluster.kill(killed)
            await deliver_all("b")  # every channel again, the killed shard's too, from its new primary
            for shard in cluster.shards():
                assert pubsub_clients(shard.primary) == 1
    finally:
        await pubsub.aclose()
        await client.aclose()
        if killed is not None:
            cluster.start_process(killed)
            wait_until(cluster.ready, "the old primary back as a replica", timeout=30)


def pubsub_clients(port: int) -> int:
    client = redis_client(port, decode_responses=True)
    try:
        listed = client.execute_command("CLIENT", "LIST", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
    finally:
        client.close()
    return len(listed) if isinstance(listed, list) else str(listed).count("id=")
