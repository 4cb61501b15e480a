"""A local Redis Cluster started by the project (``ops.cluster.redis_cluster``), and what a node does on it.

Real processes: six redis-server in cluster mode (3 primaries, a replica
each) joined by ``redis-cli --cluster create``, as an operator builds one.
Herald's broker does not run on a Redis Cluster yet (issue 23, part 2): a
node pointed at one must refuse to start and say why, not start and fail
most publishes (a script there reaches only its own node's slots).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.redis.connection import server_problem
from ops import launch
from ops.cluster.redis_cluster import SLOTS, RedisCluster
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
