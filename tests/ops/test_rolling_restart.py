"""A rolling restart of every node under load loses, repeats and reorders nothing.

Real processes (redis-server, two nodes, nginx, from ops.cluster) on free
loopback ports. Clients behave like EventSource (reconnect with
Last-Event-ID through nginx); the producer retries with an idempotency key.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ops.cluster import Cluster
from ops.launch import NGINX
from tests import redis_server
from tests.clusters import cluster_running
from tests.ops.test_cluster import until_all_have
from tests.sse_client import publish_reliably, resuming_clients

pytestmark = [
    pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed"),
    pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed"),
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with cluster_running(tmp_path, nodes=2) as running:
        yield running


@pytest.mark.timeout(240)  # the cluster's start and stop (its fixture) count against it
async def test_rolling_restart_under_load_delivers_every_event_once_in_order(cluster: Cluster) -> None:
    topic = f"roll-{uuid.uuid4().hex[:10]}"
    steps: list[tuple[float, str]] = []
    accepted: list[str] = []
    async with resuming_clients(cluster.front_url, [topic], 50) as clients, httpx.AsyncClient() as client:
        first_nodes = {c.nodes[0] for c in clients}
        stop_at: list[int] = []  # set once the restart is over: publish 20 more, then stop

        async def producer() -> None:
            # Keep publishing through the whole restart, and a little after it.
            while not stop_at or len(accepted) < stop_at[0]:
                body = {"topic": topic, "data": len(accepted)}
                accepted.append(await publish_reliably(client, cluster.front_url, body))
                await asyncio.sleep(0.01)  # a steady stream, not a flood

        task = asyncio.create_task(producer())
        async with asyncio.timeout(30):
            while len(accepted) < 30:
                assert not task.done(), task  # publish_reliably retries until a 201: its task never ends by itself
                await asyncio.sleep(0.01)  # polling the producer's progress on this loop
        began = time.monotonic()
        loop = asyncio.get_running_loop()

        def on_step(text: str) -> None:
            steps.append((time.monotonic() - began, text))

        # A thread: restart_nodes blocks (signals, waits on pids), the clients run on this loop.
        await loop.run_in_executor(None, lambda: cluster.restart_nodes(on_step=on_step))
        took = time.monotonic() - began
        stop_at.append(len(accepted) + 20)
        await asyncio.wait_for(task, 60)
        await until_all_have(clients, len(accepted), timeout=60)
    assert [text for _, text in steps] == [
        "stopped node-0", "node-0 ready", "nginx sends to node-0 again",
        "stopped node-1", "node-1 ready", "nginx sends to node-1 again",
    ]  # fmt: skip
    assert first_nodes == {"node-0", "node-1"}
    for c in clients:
        assert c.ids() == accepted  # every accepted event, once, in order
        assert all(e.type != "reset" for e in c.events)
        assert c.reconnects >= 1  # every node was restarted, so every client moved at least once
    reconnects = sum(c.reconnects for c in clients)
    print(
        f"\nrolling restart of 2 nodes in {took:.1f} s under load: {len(accepted)} events accepted, "
        f"50 clients reconnected {reconnects} times in all; each got all {len(accepted)} events once, in order; "
        f"steps: {', '.join(f'{text} @{at:.1f}s' for at, text in steps)}"
    )
