"""Topics spread over partitions (``HERALD_REDIS_PARTITIONS``) on the session's local Redis Cluster.

Real processes: the cluster (3 primaries with a replica each), real nodes.
What must hold: the partitions land on every shard and publishing spreads
over them; a client whose topics live on several shards resumes exactly on
any node (cursors); a cursor that can't be covered gets ``reset``; a shard's
primary killed under publishing loses no accepted event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import ValidationError
from redis.crc import key_slot

from api.settings import Settings
from broker.base import Event, Message, Reset, ResetReason, RetentionPolicy
from broker.redis import RedisTarget
from broker.redis.cursor import decode, encode
from broker.redis.spread import SpreadBroker, partition_of, partition_tags
from ops.cluster.redis_cluster import RedisCluster, Shard
from ops.cluster.sentinel import redis_client
from ops.probe import wait_until
from tests.brokers import RecordingSink
from tests.redis_server import needs_redis, shared_cluster, subscriber_connections
from tests.server import run_server
from tests.sse_client import EventStream, ResumingClient, resuming_clients

pytestmark = needs_redis

PARTITIONS = 3


@pytest.fixture
def cluster() -> RedisCluster:
    return shared_cluster()


def topics_on_each_partition(partitions: int = PARTITIONS) -> list[str]:
    """One fresh topic per partition, in partition order."""
    found: dict[int, str] = {}
    base = uuid.uuid4().hex[:8]
    i = 0
    while len(found) < partitions:
        topic = f"spread-{base}-{i}"
        found.setdefault(partition_of(topic, partitions), topic)
        i += 1
    return [found[k] for k in range(partitions)]


def shard_of(cluster: RedisCluster, tag: str) -> Shard:
    slot = key_slot(f"{tag}:id".encode())
    return next(s for s in cluster.shards() if any(start <= slot <= end for start, end in s.slots))


@contextlib.asynccontextmanager
async def spread_broker(cluster: RedisCluster, retention: RetentionPolicy | None = None) -> AsyncIterator[SpreadBroker]:
    target = RedisTarget(cluster=tuple(("127.0.0.1", port) for port in cluster.running_ports()))
    broker = SpreadBroker(target, retention or RetentionPolicy(), partitions=PARTITIONS)
    try:
        yield broker
    finally:
        await broker.close()


def test_cursors_are_short_and_read_back_exactly() -> None:
    now = int(time.time() * 1_000_000)
    three = [now, now - 1_234, now - 3_600_000_000]  # one partition quiet for an hour
    sixteen = [now - i * 5_000 for i in range(16)]  # sixteen busy partitions, 5 ms apart
    assert decode(encode(three), 3) == three
    assert decode(encode(sixteen), 16) == sixteen
    assert len(encode(three)) <= 30
    assert len(encode(sixteen)) <= 100
    for bad in (
        "",
        "12",
        "1.0.0",
        encode(three) + ".0",
        "A.0.0.0",
        "g.0.0.0",
        "1.2.0.0",
        "1..0.0",
        "x" * 2000,
        "\u0661.0.0.0",
    ):
        assert decode(bad, 3) is None, bad


@pytest.mark.timeout(60)
def test_the_partitions_land_on_every_shard(cluster: RedisCluster) -> None:
    tags = partition_tags(PARTITIONS)
    assert tags[0] == "{herald}"  # one partition is the one-slot deployment
    assert len({shard_of(cluster, tag).primary for tag in tags}) == len(cluster.shards()) == 3


@pytest.mark.timeout(90)
async def test_publishing_spreads_over_the_shards_and_a_batch_keeps_its_order(cluster: RedisCluster) -> None:
    topics = topics_on_each_partition()
    async with spread_broker(cluster) as broker:
        events = await broker.publish([Message(t, f"{t}/{i}") for i in range(2) for t in topics])
        assert [e.data for e in events] == [f"{t}/{i}" for i in range(2) for t in topics]
        again = await broker.publish([Message(t, "x") for t in topics], idempotency_key=topics[0])
        retried = await broker.publish([Message(t, "x") for t in topics], idempotency_key=topics[0])
        assert [e.id for e in retried] == [e.id for e in again]  # nothing published twice, in any partition
        for tag, topic in zip(partition_tags(PARTITIONS), topics, strict=True):
            admin = redis_client(shard_of(cluster, tag).primary, decode_responses=True)
            try:
                assert admin.xlen(f"{tag}:s:{topic}") == 3
            finally:
                admin.close()


@pytest.mark.timeout(90)
async def test_a_resume_over_every_shard_is_exact_and_an_uncovered_cursor_is_reset(cluster: RedisCluster) -> None:
    topics = topics_on_each_partition()
    async with spread_broker(cluster, RetentionPolicy(size=5)) as broker:
        sink = RecordingSink()
        await broker.start(sink)
        await broker.subscribe(topics)
        _, start = await broker.position_cursor(topics)
        await broker.publish([Message(t, f"{t}/{i}") for i in range(3) for t in topics])
        await sink.wait_until(lambda: len(sink.events) >= 9)
        assert sorted(e.data for e in sink.events) == sorted(f"{t}/{i}" for i in range(3) for t in topics)
        middle = sink.events[4]
        answer = await broker.history_from(topics, middle.cursor or "")
        assert answer is not None
        history, _ = answer
        assert history.reset is None
        # Exactly what came after it: the same events, in the same order per topic (across partitions the replay
        # goes by the partitions' clocks, the feed by arrival).
        after = [e.data for e in sink.events[5:]]
        assert sorted(e.data for e in history.events) == sorted(after)
        for topic in topics:
            assert assert_datas(history.events, topic) == [d for d in after if d.startswith(f"{topic}/")]
        # Resuming from any replayed event's cursor gets exactly the rest of the replay.
        again = await broker.history_from(topics, history.events[0].cursor or "")
        assert again is not None
        assert [e.data for e in again[0].events] == [e.data for e in history.events[1:]]

        # More than the replay size published to one topic after the start: that topic is reset, the others exact.
        await broker.publish([Message(topics[1], f"more/{i}") for i in range(6)])
        answer = await broker.history_from(topics, start)
        assert answer is not None
        history, _ = answer
        assert history.reset == Reset(ResetReason.EXPIRED, (topics[1],))
        assert assert_datas(history.events, topics[0]) == [f"{topics[0]}/{i}" for i in range(3)]

        assert await broker.history_from(topics, "12345") is None  # an integer id: not a cursor here
        assert await broker.history_from(topics, encode([1, 1, 10**17])) is None  # beyond a partition's head


def assert_datas(events: list[Event], topic: str) -> list[str]:
    return [e.data for e in events if e.topic == topic]


@pytest.mark.timeout(120)
async def test_a_client_of_topics_on_every_shard_resumes_exactly_on_another_node(cluster: RedisCluster) -> None:
    """Node A reads its feeds and resumes from the shards' replicas (HERALD_REDIS_READ_REPLICAS), node B from the
    primaries: a client's cursor from one resumes exactly on the other."""
    topics = topics_on_each_partition()
    env = {"REDIS_URL": cluster.url, "HERALD_REDIS_PARTITIONS": str(PARTITIONS)}
    replicas = {**env, "HERALD_REDIS_READ_REPLICAS": "1"}
    with run_server(replicas) as first, run_server(env) as second:
        async with asyncio.timeout(60), httpx.AsyncClient(timeout=10) as client:

            async def publish(data: list[str]) -> None:
                for i, item in enumerate(data):
                    answer = await client.post(f"{second.url}/publish", json={"topic": topics[i % 3], "data": item})
                    assert answer.status_code == 201, answer.text

            async with await EventStream.open(first.url, topics) as stream:
                await publish([f"a{i}" for i in range(6)])
                got = await stream.take(6)
            # Every event once, in order per topic (topics i and i + 3 share a partition); across partitions, each
            # replica's replication delay decides.
            assert in_order_per_topic([e.data for e in got], [f"a{i}" for i in range(6)])
            ids = [e.last_event_id for e in got]
            assert len(set(ids)) == 6
            assert max(len(i.encode()) for i in ids) <= 30, ids
            await publish([f"b{i}" for i in range(6)])
            async with await EventStream.open(second.url, topics, last_event_id=ids[3]) as resumed:
                replayed = await resumed.take(8)
                await publish(["c0"])
                (live,) = await resumed.take(1)
            missed = [e.data for e in got[4:]] + [f"b{i}" for i in range(6)]
            assert in_order_per_topic([e.data for e in replayed], missed)  # exactly what it missed
            assert all(e.type != "reset" for e in replayed)
            assert live.data == "c0"


@pytest.mark.timeout(90)
async def test_a_node_keeps_one_subscribing_connection_per_shard_for_all_its_partitions(cluster: RedisCluster) -> None:
    """Six partitions over three shards: the feeds of the two partitions a shard serves share one SSUBSCRIBE
    connection, so the node holds exactly one subscriber connection on each shard, however many topics."""
    topics = topics_on_each_partition(6)
    env = {"REDIS_URL": cluster.url, "HERALD_REDIS_PARTITIONS": "6"}
    with run_server(env) as node:
        async with (
            asyncio.timeout(60),
            httpx.AsyncClient(timeout=10) as client,
            await EventStream.open(node.url, topics) as stream,
        ):
            for topic in topics:
                answer = await client.post(f"{node.url}/publish", json={"topic": topic, "data": topic})
                assert answer.status_code == 201, answer.text
            assert sorted(e.data for e in await stream.take(6)) == sorted(topics)
            held = {shard.primary: subscriber_connections(node.pid, shard.primary) for shard in cluster.shards()}
            stats = (await client.get(f"{node.url}/stats")).json()["broker"]
    assert held == dict.fromkeys(held, 1), held
    assert stats["partitions"] == 6


@pytest.mark.timeout(180)
async def test_a_shards_primary_killed_under_publishing_loses_no_accepted_event(cluster: RedisCluster) -> None:
    """The primary of partition 0's shard (``{herald}``: a one-partition deployment's only one) SIGKILLed while a
    node publishes 100 events/s round the three partitions' topics with HERALD_REDIS_REPLICAS_ACK=1 (each retried
    with its Idempotency-Key until accepted, and the killed process restarted a second later, as a supervisor would,
    so the new primary has a replica to WAIT for): every subscriber gets every accepted event once, in order per
    topic; publishing to the shard's topic is accepted again within 15 s; the other shards' topics never stop."""
    topics = topics_on_each_partition()
    shard = shard_of(cluster, partition_tags(PARTITIONS)[0])
    env = {"REDIS_URL": cluster.url, "HERALD_REDIS_REPLICAS_ACK": "1", "HERALD_REDIS_PARTITIONS": str(PARTITIONS)}
    accepted: list[str] = []
    refused: dict[str, list[float]] = {t: [] for t in topics}
    with run_server(env) as subscribed, run_server(env) as publishing_node:
        async with resuming_clients(subscribed.url, topics, 10) as clients, httpx.AsyncClient() as client:
            started = time.monotonic()
            accepted_at: dict[str, list[float]] = {t: [] for t in topics}

            async def publishing(topic: str, rate: float, seconds: float) -> None:
                """One producer per topic, each on its own: a refused topic holds up no other."""
                for i in range(int(rate * seconds)):
                    await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
                    key = uuid.uuid4().hex
                    while True:
                        with contextlib.suppress(httpx.HTTPError):
                            answer = await client.post(
                                f"{publishing_node.url}/publish",
                                json={"topic": topic, "data": f"{topic}/{i}"},
                                headers={"Idempotency-Key": key},
                                timeout=5,
                            )
                            if answer.status_code == 201:
                                accepted.append(f"{topic}/{i}")
                                accepted_at[topic].append(time.monotonic() - started)
                                break
                        refused[topic].append(time.monotonic() - started)
                        await asyncio.sleep(0.05)

            task = asyncio.ensure_future(asyncio.gather(*(publishing(t, 100 / 3, 8) for t in topics)))
            await asyncio.sleep(2)
            cluster.kill(shard.primary)
            await asyncio.sleep(1)
            cluster.start_process(shard.primary)  # back as the new primary's replica, so WAIT can be answered
            await asyncio.wait_for(task, 150)
            async with asyncio.timeout(30):
                while any(len(received(c)) < len(accepted) for c in clients):
                    await asyncio.sleep(0.05)  # polling the clients' own progress; they run on this loop
    wait_until(cluster.ready, "the old primary back as a replica", timeout=30)
    for c in clients:
        got = received(c)
        assert len(got) == len(set(got)) == len(accepted)
        for topic in topics:  # in order per topic
            assert [d for d in got if d.startswith(f"{topic}/")] == [d for d in accepted if d.startswith(f"{topic}/")]
        assert c.fatal_answers == []
    assert refused[topics[0]], "the killed shard's topic was never refused: no fault happened"
    first, last = min(refused[topics[0]]), max(refused[topics[0]])
    outage = last - first
    for other in topics[1:]:  # the other shards never stopped, and kept publishing through the outage
        assert not refused[other], refused
        assert any(first <= at <= last for at in accepted_at[other]), (first, last, accepted_at[other])
    assert outage < 15, refused
    print(
        f"\nspread over {PARTITIONS} partitions: partition 0's shard primary SIGKILLed under 100 publishes/s; "
        f"{len(accepted)} events accepted, {len(refused[topics[0]])} attempts on its topic refused over {outage:.2f} s"
        f" (none on the other shards', which kept being accepted meanwhile); {len(clients)} subscribers each got all"
        f" {len(accepted)} once, in order per topic"
    )


def in_order_per_topic(got: list[str], published: list[str]) -> bool:
    """``got`` holds exactly ``published``, once each, in publish order per topic (data ``<x><i>``: topic ``i % 3``)."""
    if sorted(got) != sorted(published):
        return False
    return all(
        [d for d in got if int(d[1:]) % 3 == k] == [d for d in published if int(d[1:]) % 3 == k] for k in range(3)
    )


def received(client: ResumingClient) -> list[str]:
    return [e.data for e in client.events if e.type != "reset"]


@pytest.mark.parametrize(("value", "valid"), [("0", False), ("1", True), ("16", True), ("17", False)])
def test_the_partitions_setting_is_1_to_16(value: str, valid: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_REDIS_PARTITIONS", value)
    if valid:
        assert Settings().redis_partitions == int(value)
    else:
        with pytest.raises(ValidationError):
            Settings()
