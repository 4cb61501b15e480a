"""Redis high availability: a Sentinel failover under load, with and without replica acknowledgements.

Real processes: redis-server primaries and replicas, three redis-server
sentinels, and (for the cluster test) Herald nodes behind nginx, started by
``ops.cluster`` on free loopback ports and stopped by pid. Run with ``-s``
for the figures quoted when the issue is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from broker.base import Message, Reset, ResetReason, RetentionPolicy
from broker.redis import RedisBroker, RedisTarget
from ops import launch
from ops.cluster import Cluster
from ops.probe import free_port, wait_until
from tests import redis_server
from tests.brokers import RecordingSink
from tests.sse_client import publish_at, resuming_clients

pytestmark = pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed")


@pytest.mark.timeout(180)
async def test_failover_with_replicas_ack_loses_no_accepted_event(tmp_path: Path) -> None:
    """The primary SIGKILLed under 200 publishes/s with HERALD_REDIS_REPLICAS_ACK=1.

    Publishes get 503 while there is no primary, then 201 again; every
    subscriber gets every accepted event once, in order.
    """
    cluster = Cluster(
        tmp_path / "cluster",
        nodes=2,
        front_port=free_port(),
        sentinel=True,
        replica_ports=[free_port(), free_port()],  # the new primary still has a replica to acknowledge
        env={"HERALD_REDIS_REPLICAS_ACK": "1"},
    )
    await asyncio.to_thread(cluster.start)
    topic = f"ha-{uuid.uuid4().hex[:8]}"
    try:
        async with resuming_clients(cluster.front_url, [topic], 30) as clients:
            async with httpx.AsyncClient() as client:
                publishing = asyncio.create_task(publish_at(client, cluster.front_url, topic, 200, 8))
                await asyncio.sleep(2)  # two seconds of steady publishing before the fault
                killed_at = time.monotonic()
                killed = await asyncio.to_thread(cluster.failover_redis)
                ledger = await asyncio.wait_for(publishing, 120)
            promoted = await asyncio.to_thread(cluster.primary)
            last = ledger.accepted[-1]
            async with asyncio.timeout(30):
                while any(not c.ids() or c.ids()[-1] != last for c in clients):
                    await asyncio.sleep(0.05)  # polling the clients' own progress; they run on this loop
    finally:
        await asyncio.to_thread(cluster.stop)
    accepted = set(ledger.accepted)
    for c in clients:
        got = c.ids()
        assert [i for i in got if i in accepted] == ledger.accepted  # every accepted event, once, in order
        assert len(got) == len(set(got))  # nothing twice (an unaccepted attempt may show up once: "uncertain")
        assert c.fatal_answers == []
    failed = [t for t, _ in ledger.failures]
    outage = (max(failed) - min(failed)) if failed else 0.0
    statuses = sorted({s for _, s in ledger.failures})
    resets = sum(e.type == "reset" for c in clients for e in c.events)
    assert promoted is not None
    assert promoted != killed
    assert ledger.failures  # the failover was felt: publishing had no primary for a while
    assert set(statuses) <= {"503", "502"}, statuses
    print(
        f"\nsentinel failover (HERALD_REDIS_REPLICAS_ACK=1): {killed} SIGKILLed {time.monotonic() - killed_at:.1f} s "
        f"before the end, {promoted} promoted; {len(ledger.accepted)} events accepted, {len(ledger.failures)} publish "
        f"attempts refused ({statuses}) over {outage:.2f} s, then 201 again; {len(clients)} subscribers through "
        f"nginx each got all {len(ledger.accepted)} accepted events once, in order; resets {resets}; "
        f"non-200 answers on /events: 0"
    )


@contextlib.asynccontextmanager
async def sentinel_pair(work: Path) -> AsyncIterator[tuple[subprocess.Popen[bytes], int, int, list[int]]]:
    """A primary, its replica and three sentinels watching them.

    Yields the primary's process, its port, the replica's port and the sentinels' ports.
    """
    primary, replica = free_port(), free_port()
    sentinels = [free_port() for _ in range(3)]
    processes = [launch.spawn(launch.redis_args(primary, data_dir=work))]
    try:
        wait_until(redis.Redis(port=primary).ping, "primary")
        with redis.Redis(port=primary) as admin:  # the replica's own user, so a test can shut it out
            admin.acl_setuser("replication", enabled=True, passwords=["+secret"], commands=["+@all"], keys=["*"])
        (work / "replica").mkdir()
        args = launch.redis_args(replica, data_dir=work / "replica", replicaof=primary)
        args += ["--masteruser", "replication", "--masterauth", "secret"]
        processes.append(launch.spawn(args))
        for port in sentinels:
            conf = work / f"sentinel-{port}.conf"
            conf.write_text(launch.sentinel_config(port, primary, work))
            processes.append(launch.spawn(launch.sentinel_args(conf)))
        client = aioredis.Redis(port=sentinels[0], decode_responses=True)
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(redis.RedisError):
                    info: Any = await client.sentinel_master(launch.SENTINEL_MASTER)
                    if int(info["num-slaves"]) >= 1 and int(info["num-other-sentinels"]) >= 2:
                        break
                await asyncio.sleep(0.1)  # the sentinels find each other through the primary's hello channel
        await client.aclose()
        yield processes[0], primary, replica, sentinels
    finally:
        for process in processes:
            process.kill()
            process.wait()


async def replicated(primary: int, replica: int) -> None:
    """Until the replica has everything the primary wrote."""
    p, r = aioredis.Redis(port=primary), aioredis.Redis(port=replica)
    try:
        async with asyncio.timeout(10):
            while (await r.info("replication")).get("master_repl_offset") != (await p.info("replication")).get(
                "master_repl_offset"
            ):
                await asyncio.sleep(0.02)
    finally:
        await p.aclose()
        await r.aclose()


@pytest.mark.timeout(90)
async def test_failover_that_lost_unreplicated_events_resets_resuming_clients() -> None:
    """With HERALD_REDIS_REPLICAS_ACK=0 a failover can lose accepted events: they surface as a reset, never a hole.

    The replica is shut out, five more events are published (and reach the
    node live), the primary is killed,
    and the sentinels promote the replica, which never had those five. The node's feed finds
    the new primary behind what it delivered, raises the epoch, and resets
    its clients; a resume from before the lost events gets ``reset`` (``lost``),
    a resume from the last of them is exact, and new ids are above them.
    """
    work = Path(tempfile.mkdtemp(prefix="herald-sentinel-"))
    try:
        async with sentinel_pair(work) as (primary_process, primary, replica, sentinels):
            target = RedisTarget(sentinels=tuple(("127.0.0.1", p) for p in sentinels), master=launch.SENTINEL_MASTER)
            broker = RedisBroker(target, RetentionPolicy(1000, 3600))
            sink = RecordingSink()
            await broker.start(sink)
            try:
                await broker.subscribe(["t"])
                kept = await broker.publish([Message("t", f"kept {i}") for i in range(5)])
                await replicated(primary, replica)
                # Shut the replica out (deleting its user drops its link and
                # refuses it again), publish, and kill the primary.
                with redis.Redis(port=primary) as admin:
                    admin.acl_deluser("replication")
                lost = await broker.publish([Message("t", f"lost {i}") for i in range(5)])
                primary_process.kill()  # gone without a word to the replica
                killed = time.monotonic()
                await asyncio.to_thread(primary_process.wait)
                with redis.Redis(port=replica, decode_responses=True) as check:
                    assert check.xlen("herald:s:t") == 5  # the replica never got the last five
                assert len(sink.events) <= 10
                try:
                    async with asyncio.timeout(30):
                        while not sink.resets:
                            await asyncio.sleep(0.05)  # the feed reconnects to the new primary and finds the hole
                except TimeoutError:
                    with redis.Redis(port=sentinels[0], decode_responses=True) as s:
                        where = s.sentinel_get_master_addr_by_name(launch.SENTINEL_MASTER)
                    raise AssertionError(
                        f"no reset; primary now {where}, replica {replica}, {broker.stats()}"
                    ) from None
                healed = time.monotonic() - killed
                from_before = await broker.history(["t"], kept[-1].id)
                from_last = await broker.history(["t"], lost[-1].id)
                (after,) = await broker.publish([Message("t", "after")])
                stats = broker.stats()
            finally:
                await broker.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert sink.resets == [Reset(ResetReason.LOST, ("t",))]
    assert from_before.reset == Reset(ResetReason.LOST, ("t",))
    assert from_last.reset is None
    assert after.id > lost[-1].id
    assert stats["lost_marked"] == 1
    print(
        "\nsentinel failover with HERALD_REDIS_REPLICAS_ACK=0 and a replica shut out: 5 accepted events lost; the "
        f"node saw the new primary behind it {healed:.1f} s after the kill and reset its clients; a resume from "
        f"before them: reset {json.dumps(from_before.reset.reason)}; from the last of them: exact"
    )
