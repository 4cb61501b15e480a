"""A local Redis Cluster started by the project (``ops.cluster.redis_cluster``), and what a node does on it.

Real processes: six redis-server in cluster mode (3 primaries, a replica
each) joined by ``redis-cli --cluster create``, as an operator builds one
(the session's, shared with the broker contract suite). Herald's broker runs
on it with one partition: every key in one hash slot (the prefix is the hash
tag ``{herald}``), events on sharded Pub/Sub; the cluster gives it failover,
slot migration and replica reads. Topics spread over partitions:
``test_redis_partitions.py``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from redis.crc import key_slot

from broker.base import BrokerUnavailable, Message, RetentionPolicy
from broker.redis import RedisBroker, RedisTarget
from broker.redis.connection import server_problem
from broker.redis.spread import partition_of, partition_tags
from ops.cluster import Cluster
from ops.cluster.__main__ import redis_env
from ops.cluster.redis_cluster import SLOTS, RedisCluster, Shard, reshard
from ops.cluster.sentinel import redis_client
from ops.probe import free_port
from tests.redis_server import needs_redis, shared_cluster, subscriber_connections
from tests.server import run_server
from tests.sse_client import EventStream, ResumingClient, publish_at, publish_reliably, resuming_clients
from workers.produce import publish_direct

pytestmark = needs_redis


@pytest.fixture
def cluster() -> RedisCluster:
    """The session's local Redis Cluster (the broker contract suite's too): tests here kill its primaries and move
    Herald's slot, and each leaves it whole again (every primary with its replica) for the next."""
    return shared_cluster()


@pytest.mark.timeout(90)
def test_the_local_cluster_has_three_shards_each_with_a_replica(cluster: RedisCluster) -> None:
    shards = cluster.shards()
    assert len(shards) == 3
    assert sum(shard.slot_count for shard in shards) == SLOTS
    assert all(len(shard.replicas) == 1 for shard in shards)
    assert sorted([s.primary for s in shards] + [r for s in shards for r in s.replicas]) == sorted(cluster.ports)


@pytest.mark.timeout(90)
async def test_a_node_pointed_at_any_cluster_node_serves_publish_stream_and_resume(cluster: RedisCluster) -> None:
    """REDIS_URL names one node of the cluster (not necessarily the one owning Herald's slot): the node finds out
    it is a cluster (HELLO), and publishing, streaming and an exact resume work through it."""
    owner = herald_shard(cluster).primary
    elsewhere = next(port for port in cluster.running_ports() if port != owner)
    topic = f"cluster-{uuid.uuid4().hex[:8]}"
    with run_server({"REDIS_URL": f"redis://127.0.0.1:{elsewhere}/0"}) as node:
        async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
            ids = [await publish_reliably(client, node.url, {"topic": topic, "data": f"e{i}"}) for i in range(3)]
            async with asyncio.timeout(30), await EventStream.open(node.url, [topic], last_event_id=ids[0]) as stream:
                assert stream.response.status_code == 200
                events = await stream.take(2)
            assert [e.last_event_id for e in events] == ids[1:]
            assert [e.data for e in events] == ["e1", "e2"]
            ready = await client.get("/readyz")
            assert ready.status_code == 200
    # Every key in one slot: the shard that owns it holds them all.
    admin = redis_client(owner, decode_responses=True)
    try:
        assert admin.exists(f"{{herald}}:s:{topic}") == 1
    finally:
        admin.close()


@pytest.mark.timeout(90)
async def test_regression_wait_is_asked_of_the_primary_that_ran_the_publish(cluster: RedisCluster) -> None:
    """With HERALD_REDIS_REPLICAS_ACK, WAIT must follow the script on its own connection: on a cluster a keyless
    command may go to any primary, whose replicas have nothing to wait for. With the replica of Herald's shard
    frozen, a publish must not be accepted."""
    shard = herald_shard(cluster)
    target = RedisTarget(cluster=tuple(("127.0.0.1", port) for port in cluster.running_ports()))
    broker = RedisBroker(target, RetentionPolicy(), prefix="herald", replicas_ack=1)
    replica = cluster.processes[shard.replicas[0]]
    try:
        await broker.publish([Message("wait", "before")])  # acknowledged
        replica.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(BrokerUnavailable):  # not accepted (no ack in time, or no answer in time)
                await broker.publish([Message("wait", "unacknowledged")])
        finally:
            replica.send_signal(signal.SIGCONT)
        await broker.publish([Message("wait", "after")])
    finally:
        await broker.close()


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


@pytest.mark.timeout(90)
async def test_with_replica_reads_the_feed_and_resumes_are_read_from_the_shards_replica(cluster: RedisCluster) -> None:
    """HERALD_REDIS_READ_REPLICAS=1: the node's subscriber connection is on the replica of Herald's shard, resumes run
    there as read-only scripts (EVALSHA_RO), and both stay exact: a resume replays exactly what was missed."""
    shard = herald_shard(cluster)
    replica = shard.replicas[0]
    topic = f"replica-{uuid.uuid4().hex[:8]}"
    scripts_before = read_only_scripts(replica)
    with run_server({"REDIS_URL": cluster.url, "HERALD_REDIS_READ_REPLICAS": "1"}) as node:
        async with asyncio.timeout(60), httpx.AsyncClient(base_url=node.url, timeout=10) as client:
            ids = [await publish_reliably(client, node.url, {"topic": topic, "data": f"e{i}"}) for i in range(3)]
            async with await EventStream.open(node.url, [topic], last_event_id=ids[0]) as stream:
                replayed = await stream.take(2)
                live = await publish_reliably(client, node.url, {"topic": topic, "data": "e3"})
                (event,) = await stream.take(1)
            on_primary, on_replica = (subscriber_connections(node.pid, port) for port in (shard.primary, replica))
    assert [e.last_event_id for e in replayed] == ids[1:]
    assert event.last_event_id == live
    assert (on_primary, on_replica) == (0, 1)  # the node's one subscriber connection, on the replica
    assert read_only_scripts(replica) > scripts_before  # resumes read there


def read_only_scripts(port: int) -> int:
    """EVALSHA_RO calls the server on ``port`` ran (INFO commandstats)."""
    client = redis_client(port, decode_responses=True)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get("cmdstat_evalsha_ro", {}).get("calls", 0))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("partitions", [3])
async def test_a_slot_migration_under_publishing_loses_and_duplicates_nothing(
    cluster: RedisCluster, partitions: int
) -> None:
    """``redis-cli --cluster reshard`` moves Herald's slot (partition 0's) to another shard while a node publishes
    100 events/s to a topic there (retried with an Idempotency-Key when refused): the subscribers, on another node,
    get every accepted event once and in order; the feeds follow the slot (the server's ``sunsubscribe``, then a
    backfill from the stream). With 3 partitions the moved feed joins the connection the target shard's own
    partition already uses."""
    source = herald_shard(cluster)
    target = next(shard for shard in cluster.shards() if shard.primary != source.primary)
    slot = key_slot(b"{herald}:id")
    # redis-cli moves the source's lowest-numbered slots: as many as it takes to include Herald's.
    count = sum(min(end, slot) - start + 1 for start, end in source.slots if start <= slot)
    env = {"REDIS_URL": cluster.url, "HERALD_REDIS_PARTITIONS": str(partitions)}
    topic = next(
        t for t in (f"reshard-{uuid.uuid4().hex[:8]}" for _ in range(1000)) if partition_of(t, partitions) == 0
    )
    with run_server(env) as subscribed, run_server(env) as publishing_node:
        async with resuming_clients(subscribed.url, [topic], 10) as clients, httpx.AsyncClient() as client:
            publishing = asyncio.create_task(publish_at(client, publishing_node.url, topic, 100, 8))
            await asyncio.sleep(1)  # steady publishing before the move
            moved_at = time.monotonic()
            await asyncio.to_thread(reshard, source.primary, target.primary, count)
            moved_in = time.monotonic() - moved_at
            ledger = await asyncio.wait_for(publishing, 150)
            accepted = [str(i) for i in range(len(ledger.accepted))]  # publish_at's data: each event's number
            async with asyncio.timeout(30):
                while any(len(datas(c)) < len(accepted) for c in clients):
                    await asyncio.sleep(0.05)  # polling the clients' own progress; they run on this loop
            assert herald_shard(cluster).primary == target.primary
            # The moved feed followed the slot, on the connection the target's own partition uses: one per shard.
            assert subscriber_connections(subscribed.pid, target.primary) == 1
            assert subscriber_connections(subscribed.pid, source.primary) == 0  # it serves no partition now
            feed = (await client.get(f"{subscribed.url}/stats")).json()["broker"]
    # Back where it was (the target's lowest slots are the ones it took): the session's cluster stays as made.
    await asyncio.to_thread(reshard, target.primary, source.primary, count)
    assert herald_shard(cluster).primary == source.primary
    # The server's sunsubscribe ended the moved partition's feed; it reconnected on the new owner.
    assert feed["feed_connects"] >= partitions + 1, feed
    for c in clients:
        assert datas(c) == accepted  # every accepted event, once, in order
        assert c.fatal_answers == []
    assert {s for _, s in ledger.failures} <= {"503"}, ledger.failures
    print(
        f"\nRedis Cluster reshard ({partitions} partitions): {count} slots (Herald's among them) moved in"
        f" {moved_in:.1f} s under 100 publishes/s; {len(ledger.accepted)} events accepted, {len(ledger.failures)}"
        f" attempts refused and retried; {len(clients)} subscribers each got all {len(ledger.accepted)} once, in"
        f" order; their node's feeds connected {feed['feed_connects']} times, {feed['backfilled_events']} events"
        " backfilled"
    )


def datas(client: ResumingClient) -> list[str]:
    return [e.data for e in client.events if e.type != "reset"]


def herald_shard(cluster: RedisCluster) -> Shard:
    """The shard that owns Herald's hash slot (every key starts with ``{herald}``)."""
    slot = key_slot(b"{herald}:id")
    return next(s for s in cluster.shards() if any(start <= slot <= end for start, end in s.slots))


@pytest.mark.timeout(60)
async def test_a_producer_publishes_straight_to_the_cluster_with_workers_produce(cluster: RedisCluster) -> None:
    """The Redis contract on a cluster: workers.produce finds out from HELLO, and a node's resume replays it."""
    topic = f"produce-{uuid.uuid4().hex[:8]}"
    seed = next(port for port in cluster.running_ports() if port != herald_shard(cluster).primary)
    first, second = await publish_direct(
        f"redis://127.0.0.1:{seed}/0", [Message(topic, "one"), Message(topic, "two")], idempotency_key=topic
    )
    target = RedisTarget(cluster=tuple(("127.0.0.1", port) for port in cluster.running_ports()))
    broker = RedisBroker(target, RetentionPolicy(), prefix="herald")
    try:
        history = await broker.history([topic], first.id)
        assert history.reset is None
        assert [e.data for e in history.events] == ["two"]
        assert [e.id for e in history.events] == [second.id]
    finally:
        await broker.close()


@pytest.mark.timeout(120)
async def test_the_load_tools_redis_publisher_speaks_the_cluster_contract(
    cluster: RedisCluster, tmp_path: Path
) -> None:
    """``workers.loadtest --publish redis`` pointed at a cluster node (not the one owning Herald's slot) publishes
    through the cluster contract, and a node on the cluster delivers every event."""
    seed = next(port for port in cluster.running_ports() if port != herald_shard(cluster).primary)
    out = tmp_path / "result.json"
    with run_server({"REDIS_URL": cluster.url}) as node:
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "workers.loadtest", "--quiet", "--ramp", "0.3", "--drain", "15", "--json", str(out),
             f"--target={node.url}", "--subscribers", "50", "--topics", "each", "--rate", "200", "--duration", "2",
             "--publish", "redis", "--redis-url", f"redis://127.0.0.1:{seed}/0"],
            capture_output=True, text=True, timeout=90, check=False,
        )  # fmt: skip
    assert out.exists(), done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert done.returncode == 0, result["verdict"]
    assert result["delivery"]["delivered"] == result["delivery"]["expected"] == 400


@pytest.mark.timeout(120)
async def test_make_cluster_with_redis_cluster_and_partitions_serves_through_nginx_and_shows_its_shards(
    tmp_path: Path,
) -> None:
    """``make cluster REDIS=cluster PARTITIONS=3``'s topology (``ops.cluster start --redis-cluster --partitions 3``):
    a Redis Cluster under the nodes and nginx; ``status`` shows its three shards and a partition on each; an event
    published through the front reaches a stream resuming through it."""
    herald = Cluster(
        tmp_path / "cluster", nodes=2, front_port=free_port(), redis_cluster=True, env=redis_env(3, read_replicas=False)
    )
    await asyncio.to_thread(herald.start)
    try:
        status = herald.status()
        redis_status = status["redis"]
        assert isinstance(redis_status, dict)
        shards = redis_status["shards"]
        assert len(shards) == 3
        assert all(len(shard["replicas"]) == 1 for shard in shards)
        assert all(node["state"] == "ready" for node in status["nodes"])  # type: ignore[attr-defined]
        partitions = redis_status["partitions"]
        assert [p["tag"] for p in partitions] == partition_tags(3)
        assert sorted(p["primary"] for p in partitions) == sorted(shard["primary"] for shard in shards)
        topic = f"front-{uuid.uuid4().hex[:8]}"
        async with httpx.AsyncClient(timeout=10) as client:
            async with asyncio.timeout(30), await EventStream.open(herald.front_url, [topic]) as stream:
                await publish_reliably(client, herald.front_url, {"topic": topic, "data": "one"})
                (first,) = await stream.take(1)
            await publish_reliably(client, herald.front_url, {"topic": topic, "data": "two"})
        async with (
            asyncio.timeout(30),
            await EventStream.open(herald.front_url, [topic], last_event_id=first.last_event_id) as stream,
        ):
            (event,) = await stream.take(1)
        assert event.data == "two"
        assert Cluster.load(herald.run_dir).status()["redis"]["shards"] == shards  # type: ignore[index]
    finally:
        await asyncio.to_thread(herald.stop)


def test_regression_make_cluster_after_cluster_down_makes_a_new_redis_cluster(tmp_path: Path) -> None:
    """``make cluster REDIS=cluster`` after ``make cluster-down`` failed ("Node 127.0.0.1:6380 is not empty"): the
    stopped processes' nodes.conf named the earlier start's cluster bus ports, so the cluster could neither be created
    nor come back. A start now empties the stopped processes' data directories first."""
    herald = Cluster(tmp_path / "cluster", nodes=1, front_port=free_port(), redis_cluster=True)
    for name in herald.redis_names:
        (herald.run_dir / name).mkdir(parents=True)
        (herald.run_dir / name / "nodes.conf").write_text("an earlier cluster's\n")
    herald.forget_redis_cluster()
    assert all((herald.run_dir / name).is_dir() for name in herald.redis_names)
    assert not any(path for name in herald.redis_names for path in (herald.run_dir / name).iterdir())
