"""``HERALD_WORKERS``: one node as several processes sharing its port, against real processes and redis-server.

Which worker serves a connection is the kernel's choice (``SO_REUSEPORT``
hashes the connection's addresses), so the tests open fresh connections
until each worker has served some, and tell the workers apart by
``X-Node-Id`` (``<node id>-w<i>``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from api.settings import Settings
from ops import launch
from ops.probe import free_port
from tests import redis_server
from tests.server import Node, start_node
from tests.sse_client import EventStream, new_client, publish

WORKERS = 2
TEST_TIMEOUT = 45
"""Seconds any one test may take (its own bound, inside pytest-timeout's)."""


@pytest.fixture(scope="module")
def redis_url() -> str:
    if not redis_server.available():
        pytest.skip("redis-server is not installed")
    return redis_server.shared_server().url


def worker_ids(node: Node) -> set[str]:
    """The X-Node-Ids a node with default HERALD_NODE_ID gives its workers: ``<hostname>-<supervisor pid>-w<i>``."""
    return {f"{socket.gethostname()}-{node.pid}-w{i}" for i in range(WORKERS)}


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux's /proc)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def sockets_of(pid: int) -> list[str]:
    """The sockets process ``pid`` holds open (Linux's /proc)."""
    links = (os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
    return [link for link in links if link.startswith("socket:")]


def has_exited(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (exited, not yet reaped by whoever adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


async def wait_for(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Poll ``check()`` until true: for other processes' state, which can't be awaited from here."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.02)


async def served_by(url: str, connections: int = 40) -> list[str]:
    """X-Node-Id of ``connections`` requests, each on a fresh TCP connection (so the kernel picks again)."""
    ids = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=5) as client:
        for _ in range(connections):
            ids.append((await client.get(f"{url}/healthz")).headers["x-node-id"])
    return ids


async def wait_for_workers(node: Node, expected: set[str]) -> None:
    """Until every worker answers (start_node returns once the first one does)."""
    deadline = time.monotonic() + 15
    seen: set[str] = set()
    while seen != expected:
        assert time.monotonic() < deadline, f"workers answering: {seen}, expected {expected}\n{node.log()}"
        seen |= set(await served_by(node.url, 10))


@contextlib.asynccontextmanager
async def worker_node(redis_url: str) -> AsyncIterator[Node]:
    """A node of WORKERS workers on the Redis broker, every worker serving; afterwards stopped and its workers gone."""
    node = await asyncio.to_thread(start_node, {"REDIS_URL": redis_url, "HERALD_WORKERS": str(WORKERS)})
    workers: list[int] = []
    try:
        await wait_for_workers(node, worker_ids(node))
        workers = children(node.pid)
        yield node
    finally:
        if node.process.poll() is None:
            await asyncio.to_thread(node.terminate)
        for pid in workers:  # only if the supervisor failed to stop them
            if not has_exited(pid):
                os.kill(pid, signal.SIGKILL)
        node.log_path.unlink(missing_ok=True)


async def wait_for_position(stream: EventStream) -> None:
    """Until the stream sent its position (``id:``): from then on it gets every event published."""
    async with asyncio.timeout(10):
        while stream.parser.last_event_id is None:
            await asyncio.sleep(0.01)  # polling the stream's own parser, fed by its reader task


async def streams_on_every_worker(
    url: str, topics: list[str], per_worker: int, last_event_id: str | None = None
) -> dict[str, list[EventStream]]:
    """Open streams (each its own connection) until every worker holds ``per_worker``; extras are closed."""
    by_worker: dict[str, list[EventStream]] = {}
    try:
        for _ in range(200):
            if len(by_worker) == WORKERS and all(len(s) >= per_worker for s in by_worker.values()):
                return by_worker
            stream = await EventStream.open(url, topics, last_event_id=last_event_id)
            held = by_worker.setdefault(stream.response.headers["x-node-id"], [])
            if len(held) < per_worker:
                held.append(stream)
            else:
                await stream.close()
    except BaseException:
        await close_all(by_worker)
        raise
    await close_all(by_worker)
    raise AssertionError(f"streams per worker after 200 connects: { {k: len(v) for k, v in by_worker.items()} }")


async def close_all(by_worker: dict[str, list[EventStream]]) -> None:
    await asyncio.gather(*(s.close() for streams in by_worker.values() for s in streams))


@contextlib.asynccontextmanager
async def client_on(url: str, worker: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose one kept-alive connection is served by ``worker``: every request it makes goes there."""
    for _ in range(100):
        async with new_client(base_url=url, limits=httpx.Limits(max_connections=1), timeout=10) as client:
            if (await client.get("/healthz")).headers["x-node-id"] == worker:
                yield client
                return
    raise AssertionError(f"no connection reached {worker} in 100 connects")


async def test_both_workers_serve_on_the_one_port_and_the_supervisor_serves_nothing(redis_url: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), worker_node(redis_url) as node:
        seen = await served_by(node.url, 40)
        workers = children(node.pid)
        supervisor_sockets = sockets_of(node.pid)
    assert set(seen) == worker_ids(node)
    # 40 connections hashed over 2 sockets: all on one would be a 1-in-2^39 chance.
    assert all(seen.count(worker) > 1 for worker in worker_ids(node)), seen
    assert len(workers) == WORKERS
    assert supervisor_sockets == []


async def test_an_event_published_through_one_worker_reaches_every_workers_subscribers_once_in_order(
    redis_url: str, topic: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), worker_node(redis_url) as node:
        by_worker = await streams_on_every_worker(node.url, [topic], per_worker=3)
        try:
            await asyncio.gather(*(wait_for_position(s) for streams in by_worker.values() for s in streams))
            first, second = sorted(by_worker)
            async with client_on(node.url, first) as client:
                responses = [await publish(node.url, {"topic": topic, "data": i}, client) for i in range(30)]
            assert {r.headers["x-node-id"] for r in responses} == {first}
            assert [r.status_code for r in responses] == [201] * 30
            ids = [r.json()["id"] for r in responses]
            # A last event through the other worker: arriving right after the 30, it shows nothing came twice.
            async with client_on(node.url, second) as client:
                last = await publish(node.url, {"topic": topic, "data": "last"}, client)
            assert last.headers["x-node-id"] == second
            for worker, streams in by_worker.items():
                for stream in streams:
                    got = await stream.take(31)
                    assert [e.last_event_id for e in got] == [*ids, last.json()["id"]], worker
                    assert [e.data for e in got] == [*(str(i) for i in range(30)), "last"], worker
        finally:
            await close_all(by_worker)


async def test_resume_with_last_event_id_on_either_worker(redis_url: str, topic: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), worker_node(redis_url) as node:
        async with httpx.AsyncClient() as client:
            ids = [(await publish(node.url, {"topic": topic, "data": i}, client)).json()["id"] for i in range(10)]
        by_worker = await streams_on_every_worker(node.url, [topic], per_worker=2, last_event_id=ids[3])
        try:
            for worker, streams in by_worker.items():
                for stream in streams:
                    got = await stream.take(6)
                    assert [e.type for e in got] == ["message"] * 6, worker
                    assert [e.last_event_id for e in got] == ids[4:], worker
            # Then live events, on both.
            live = (await publish(node.url, {"topic": topic, "data": "live"})).json()["id"]
            for streams in by_worker.values():
                for stream in streams:
                    assert (await stream.next_event()).last_event_id == live
        finally:
            await close_all(by_worker)


async def test_sigterm_to_the_supervisor_ends_every_stream_and_every_process_exits_0(
    redis_url: str, topic: str
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), worker_node(redis_url) as node:
        workers = children(node.pid)
        by_worker = await streams_on_every_worker(node.url, [topic], per_worker=5)
        streams = [s for held in by_worker.values() for s in held]
        try:
            await asyncio.gather(*(wait_for_position(s) for s in streams))
            started = time.monotonic()
            node.process.send_signal(signal.SIGTERM)
            await asyncio.gather(*(asyncio.wait_for(s.ended.wait(), 3) for s in streams))
            ended_after = time.monotonic() - started
            code = await asyncio.to_thread(node.process.wait, 5)
            exited_after = time.monotonic() - started
        finally:
            await close_all(by_worker)
        log = node.log()
    assert ended_after < 3
    assert exited_after < 5
    assert code == 0, log
    assert all(has_exited(pid) for pid in workers)
    assert "Traceback" not in log
    assert "timeout graceful shutdown exceeded" not in log
    assert log.count("exited (status 0)") == WORKERS, log
    assert "every worker stopped cleanly" in log


async def test_a_worker_that_dies_stops_the_node_with_a_non_zero_status(redis_url: str, topic: str) -> None:
    """Nothing is restarted, and a node never serves on fewer workers than it was given: it stops, status 1."""
    async with asyncio.timeout(TEST_TIMEOUT), worker_node(redis_url) as node:
        by_worker = await streams_on_every_worker(node.url, [topic], per_worker=2)
        streams = [s for held in by_worker.values() for s in held]
        try:
            await asyncio.gather(*(wait_for_position(s) for s in streams))
            victim = children(node.pid)[0]
            os.kill(victim, signal.SIGKILL)
            # The other worker's streams end too (drained: their clients resume on other nodes).
            await asyncio.gather(*(asyncio.wait_for(s.ended.wait(), 5) for s in streams))
            code = await asyncio.to_thread(node.process.wait, 10)
        finally:
            await close_all(by_worker)
        log = node.log()
    assert code == 1, log
    assert f"(pid {victim}) exited (killed by SIGKILL) while the node was serving" in log, log
    assert "exited (status 0)" in log, log  # the survivor stopped cleanly
    assert "every worker stopped cleanly" not in log


async def test_workers_stop_when_their_supervisor_is_killed(redis_url: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), worker_node(redis_url) as node:
        workers = children(node.pid)
        node.process.kill()
        await asyncio.to_thread(node.process.wait, 5)
        await wait_for(lambda: all(has_exited(pid) for pid in workers), "workers exited after their supervisor")


async def test_embedded_broker_runs_one_process_and_says_so() -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        node = await asyncio.to_thread(start_node, {"HERALD_WORKERS": str(WORKERS)})
        try:
            seen = set(await served_by(node.url, 20))
            workers = children(node.pid)
            code = await asyncio.to_thread(node.terminate)
            log = node.log()
        finally:
            if node.process.poll() is None:
                node.process.kill()
                node.process.wait()
            node.log_path.unlink(missing_ok=True)
    # The process started serves itself (its default id carries its own pid), and started no other.
    assert seen == {f"{socket.gethostname()}-{node.pid}"}
    assert workers == []
    assert "the embedded broker lives in one process: running 1 worker, not 2" in log, log
    assert code == 0


async def test_a_port_already_listened_on_is_refused_before_any_worker_starts(redis_url: str, tmp_path: Path) -> None:
    """Workers set SO_REUSEPORT, so they could join a stale node's port unnoticed; the supervisor checks first."""
    port = free_port()
    log_path = tmp_path / "node.log"
    env = launch.node_env(port, extra={"REDIS_URL": redis_url, "HERALD_WORKERS": str(WORKERS)})
    async with asyncio.timeout(TEST_TIMEOUT):
        with socket.create_server(("127.0.0.1", port)):
            process = launch.spawn(launch.node_command(), log_path, env, new_session=False)
            try:
                code = await asyncio.to_thread(process.wait, 15)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    log = log_path.read_text()
    assert code == 3, log  # uvicorn's start-up failure, as a single-process node exits on a taken port
    assert "Address already in use" in log, log
    assert "starting 2 workers" not in log


@pytest.mark.parametrize(("value", "valid"), [("0", False), ("1", True), ("64", True), ("65", False)])
def test_workers_setting_is_1_to_64(value: str, valid: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_WORKERS", value)
    if valid:
        assert Settings().workers == int(value)
    else:
        with pytest.raises(ValidationError):
            Settings()


def test_default_is_one_worker() -> None:
    assert Settings.model_fields["workers"].default == 1
