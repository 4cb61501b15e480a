"""The cluster registry (``GET /cluster``) with real nodes on one real redis-server, and on the embedded broker."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from tests import redis_server
from tests.redis_server import needs_redis
from tests.server import Node, run_server
from tests.sse_client import EventStream


def nodes(node: Node) -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{node.url}/cluster", timeout=5).json()
    return {n["id"]: n for n in body["nodes"]}


def wait_until(check: Callable[[], dict[str, Any] | None], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.1)


def state_of(observer: Node, node_id: str, state: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        record = nodes(observer).get(node_id)
        return record if record is not None and record["state"] == state else None

    return check


@needs_redis
def test_every_node_sees_the_cluster_and_a_killed_node_turns_gone() -> None:
    url = redis_server.shared_server().url
    a_id, b_id = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    with (
        run_server({"REDIS_URL": url, "HERALD_NODE_ID": a_id}) as a,
        run_server({"REDIS_URL": url, "HERALD_NODE_ID": b_id}) as b,
    ):

        def both() -> dict[str, Any] | None:
            listed = nodes(b)
            return listed if {a_id, b_id} <= listed.keys() else None

        seen = wait_until(both, 5)
        assert seen[a_id]["state"] == seen[b_id]["state"] == "serving"
        assert seen[a_id]["url"] == a.url
        # The figures are the node's own counts, the same ones /metrics shows.
        a.process.send_signal(signal.SIGKILL)
        a.process.wait()
        killed = time.monotonic()
        gone = wait_until(state_of(b, a_id, "gone"), 10)
        assert time.monotonic() - killed <= 7  # its TTL (5 s) and an announcement interval
        assert gone["last_seen"] < time.time()


@needs_redis
def test_a_draining_node_shows_as_draining() -> None:
    url = redis_server.shared_server().url
    a_id, b_id = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    with (
        run_server({"REDIS_URL": url, "HERALD_NODE_ID": a_id}) as a,
        run_server({"REDIS_URL": url, "HERALD_NODE_ID": b_id}) as b,
    ):
        wait_until(state_of(b, a_id, "serving"), 5)
        a.process.send_signal(signal.SIGTERM)
        wait_until(state_of(b, a_id, "draining"), 5)
        assert a.process.wait(15) == 0
        wait_until(state_of(b, a_id, "gone"), 10)


async def test_the_embedded_broker_is_a_cluster_of_one_with_live_figures() -> None:
    with run_server({"HERALD_NODE_ID": "solo"}) as node:
        async with await EventStream.open(node.url, ["x"]) as stream:
            assert stream.response.status_code == 200

            def connected() -> dict[str, Any] | None:
                record = nodes(node)["solo"]
                return record if record["connections"] == 1 else None

            record = wait_until(connected, 5)
        assert list(nodes(node)) == ["solo"]
        assert record["state"] == "serving"
        # The same figures arrive once a second on the reserved topic, as events of type "node".
        async with await EventStream.open(node.url, ["_herald/nodes"]) as figures:
            event = await figures.next_event(5)
        assert event.type == "node"
        assert '"id":"solo"' in event.data
