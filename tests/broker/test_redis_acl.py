"""ops/redis-acl.conf against a real redis-server: producers publish and nothing else, nodes run.

Publishing straight to Redis bypasses Herald's HTTP access control, so the
Redis users are the access control there (docs/access-control.md). The file is
used as shipped (its example passwords included): the producer user
publishes through the Redis-level contract (``workers.produce``, and
``publish.lua`` by EVAL and EVALSHA as another language would), a real
Herald node runs on the node user, and what a producer must not do is
refused with NOPERM. ``ACL LOG`` staying empty shows that no command the
scripts run was refused along the way.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from broker.base import Event, Message, Reset, RetentionPolicy
from broker.redis import HISTORY_SCRIPT, MARK_LOST_SCRIPT, PUBLISH_SCRIPT, RedisBroker
from ops import launch
from ops.probe import free_port
from tests import redis_server
from tests.server import run_server
from tests.sse_client import EventStream
from workers.produce import publish_direct

pytestmark = pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed")

ROOT = Path(__file__).resolve().parents[2]
ACL_CONF = ROOT / "ops" / "redis-acl.conf"
PASSWORDS = {
    "herald-producer": "change-me-producer",
    "herald-node": "change-me-node",
    "herald-admin": "change-me-admin",
}
"""The example passwords whose hashes the file ships with (its header says so)."""


class AclRedis:
    """redis-server started with ops/redis-acl.conf as its configuration file."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="herald-redis-acl-"))
        args = launch.redis_args(self.port, data_dir=self.dir, logfile=self.dir / "redis.log")
        # The configuration file comes first, options after it (redis-server's rule).
        self.process = launch.spawn([args[0], str(ACL_CONF), *args[1:]], new_session=False)
        admin = self.client("herald-admin")
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()}")
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        admin.close()

    def url(self, user: str) -> str:
        return f"redis://{user}:{PASSWORDS[user]}@127.0.0.1:{self.port}/0"

    def client(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user), decode_responses=True, socket_timeout=5)

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def server() -> Iterator[AclRedis]:
    server = AclRedis()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def admin(server: AclRedis) -> Iterator[redis.Redis]:
    client = server.client("herald-admin")
    client.acl_log_reset()
    yield client
    client.close()


@pytest.fixture
async def producer(server: AclRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url("herald-producer"), decode_responses=True)
    yield client
    await client.aclose()


def refusals(admin: redis.Redis) -> list[str]:
    """What ACL LOG noted since the test began: ``user: command/key/channel``."""
    return [f"{e['username']}: {e['reason']} {e['object']}" for e in admin.acl_log()]


def retained(admin: redis.Redis, name: str) -> list[str]:
    """The data of the events the topic's replay stream holds."""
    return [str((fields or {}).get("d")) for _, fields in admin.xrange(f"herald:s:{name}") or []]


def created_floor(admin: redis.Redis, name: str) -> int:
    """What the topic had before its stream was created: the stream's max-deleted-entry-id (XSETID)."""
    info = admin.xinfo_stream(f"herald:s:{name}")
    return int(str(info["max-deleted-entry-id"]).split("-")[0])


def topic() -> str:
    return f"acl-{uuid.uuid4().hex[:10]}"


# -- who may connect -----------------------------------------------------------------


def test_there_is_no_anonymous_access(server: AclRedis) -> None:
    anonymous = redis.Redis(port=server.port, socket_timeout=5)
    try:
        with pytest.raises(AuthenticationError):
            anonymous.ping()
    finally:
        anonymous.close()
    wrong = redis.Redis(port=server.port, username="herald-producer", password="guess", socket_timeout=5)
    try:
        with pytest.raises(AuthenticationError):
            wrong.ping()
    finally:
        wrong.close()


# -- producers: publish, through the Redis-level contract -------------------------------


async def test_a_producer_publishes_with_workers_produce(server: AclRedis, admin: redis.Redis) -> None:
    name = topic()
    admin.script_flush()  # a Redis that lost its script cache: redis-py loads publish.lua again
    url = server.url("herald-producer")
    (first,) = await publish_direct(url, [Message(name, '{"n":1}', "created")], idempotency_key=name)
    (again,) = await publish_direct(url, [Message(name, '{"n":1}', "created")], idempotency_key=name)
    assert again.id == first.id  # the idempotency record (herald:idem:*) was read and honoured
    # A new stream records what the topic had before it (XSETID), and appends after it.
    batch = await publish_direct(url, [Message(name, str(i)) for i in range(5)], retention=RetentionPolicy(2, 1))
    assert retained(admin, name) == ['{"n":1}', *(str(i) for i in range(5))]
    assert created_floor(admin, name) < first.id
    # A new stream after the old one expired: everything before it is older than the TTL.
    async with asyncio.timeout(10):
        while admin.exists(f"herald:s:{name}"):  # its TTL (1 s) after its last publish
            await asyncio.sleep(0.05)
    (fresh,) = await publish_direct(url, [Message(name, "fresh")], retention=RetentionPolicy(2, 1))
    assert retained(admin, name) == ["fresh"]
    assert batch[-1].id < created_floor(admin, name) < fresh.id
    assert refusals(admin) == []


async def test_a_producer_in_another_language_runs_publish_lua(
    server: AclRedis, admin: redis.Redis, producer: aioredis.Redis
) -> None:
    """The README's recipe: EVALSHA after SCRIPT LOAD, or EVAL; ARGV as documented, no KEYS."""
    name = topic()
    argv: list[str | int] = ["herald", "", 1000, 3600 * 1_000_000, "", 2, name, "", "hello", name, "greeting", "world"]
    sha = await producer.script_load(PUBLISH_SCRIPT)
    fresh, ids = await producer.evalsha(sha, 0, *argv)
    assert fresh == 0
    assert len(ids.split(",")) == 2
    fresh, ids = await producer.eval(PUBLISH_SCRIPT, 0, *argv)
    assert fresh == 0
    assert len(ids.split(",")) == 2
    assert admin.xlen(f"herald:s:{name}") == 4
    assert refusals(admin) == []


async def test_a_producer_cannot_read_the_retained_events(producer: aioredis.Redis) -> None:
    """Pinned, as README and the file say: Redis checks a script's commands against its caller, and
    publish.lua only appends, so a producer can't read the retained events at all."""
    name = topic()
    await producer.eval(PUBLISH_SCRIPT, 0, "herald", "", 10, 3600 * 1_000_000, "", 1, name, "", "x")
    for read in (producer.xrange(f"herald:s:{name}"), producer.xread({f"herald:s:{name}": "0"})):
        with pytest.raises(NoPermissionError):
            await read


REFUSED_TO_PRODUCERS: list[tuple[str, ...]] = [
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "GET", "*"),
    ("CONFIG", "SET", "appendonly", "no"),
    ("ACL", "LIST"),
    ("REPLICAOF", "NO", "ONE"),
    ("BGSAVE",),
    ("SHUTDOWN", "NOSAVE"),
    ("MONITOR",),
    ("SCRIPT", "FLUSH"),
    ("CLIENT", "LIST"),
    ("DEL", "herald:s:orders"),
    ("UNLINK", "herald:id"),
    ("XREAD", "STREAMS", "herald:s:orders", "0"),
    ("XRANGE", "app:audit", "-", "+"),
    ("GET", "session:42"),
    ("SET", "session:42", "forged"),
    ("SUBSCRIBE", "herald:c:orders"),
    ("PSUBSCRIBE", "herald:c:*"),
    ("PUBLISH", "herald:ctl:epoch", "1"),
    ("PUBLISH", "app:events", "x"),
    ("WAIT", "1", "0"),
]


@pytest.mark.parametrize("command", REFUSED_TO_PRODUCERS, ids=" ".join)
async def test_a_producer_can_do_nothing_else(
    command: tuple[str, ...], admin: redis.Redis, producer: aioredis.Redis
) -> None:
    with pytest.raises(NoPermissionError):
        await producer.execute_command(*command)  # type: ignore[no-untyped-call]
    assert refusals(admin), "the refusal is in ACL LOG"


@pytest.mark.parametrize(
    "call", ["redis.call('KEYS', '*')", "redis.call('GET', 'session:42')", "redis.call('DEL', 'herald:id')"]
)
async def test_a_producers_own_script_runs_with_the_producers_rights(
    call: str, admin: redis.Redis, producer: aioredis.Redis
) -> None:
    with pytest.raises(ResponseError, match="can't"):
        await producer.eval(f"return {call}", 0)
    assert [e["context"] for e in admin.acl_log()] == ["lua"]


# -- nodes ------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.arrived = asyncio.Event()

    def on_event(self, event: Event) -> None:
        self.events.append(event)
        self.arrived.set()

    def on_reset(self, reset: Reset) -> None:
        pass


async def test_the_node_user_runs_the_redis_broker(server: AclRedis, admin: redis.Redis) -> None:
    """Feed, history.lua, publish.lua, mark_lost.lua, WAIT, SCRIPT EXISTS, the registry and node entries:
    every command a node sends."""
    name = topic()
    sink = Sink()
    broker = RedisBroker(server.url("herald-node"))
    await broker.start(sink)
    try:
        assert await broker.ping()
        await broker.subscribe([name])
        (published,) = await publish_direct(server.url("herald-producer"), [Message(name, "from a producer")])
        await asyncio.wait_for(sink.arrived.wait(), 10)
        assert [e.id for e in sink.events] == [published.id]
        (own,) = await broker.publish([Message(name, "from the node")])
        history = await broker.history([name], published.id - 1)
        assert [e.id for e in history.events] == [published.id, own.id]
        assert history.reset is None
        # The registry (NodeDirectory) and Mercure's active subscriptions (NodeEntries).
        await broker.announce("acl-node", "{}", 60)
        assert "acl-node" in [n.node_id for n in await broker.nodes(60)]
        await broker.put_entries("acl-node", "mercure", {"k": "v", "gone": "soon"}, 60)
        await broker.drop_entries("acl-node", "mercure", ["gone"], 60)
        assert await broker.entries("mercure", ["acl-node"]) == {"acl-node": {"k": "v"}}
        assert await broker.take_entries("acl-node", "mercure") == {"k": "v"}
    finally:
        await broker.close()
    node = aioredis.Redis.from_url(server.url("herald-node"), decode_responses=True)
    try:
        # What the broker sends only in rarer cases: a failover that lost events
        # (mark_lost.lua: it moves no epoch here, it only announces it), and
        # HERALD_REDIS_REPLICAS_ACK (a pipeline: SCRIPT EXISTS, then WAIT).
        await node.register_script(MARK_LOST_SCRIPT)(args=["herald", 1, "herald:ctl:epoch"])
        shas = [hashlib.sha1(script.encode()).hexdigest() for script in (PUBLISH_SCRIPT, HISTORY_SCRIPT)]
        assert await node.script_exists(*shas) == [True, True]
        assert await node.wait(0, 0) == 0
        with pytest.raises(NoPermissionError):
            await node.flushall()
        with pytest.raises(NoPermissionError):
            await node.get("session:42")
    finally:
        await node.aclose()
    assert refusals(admin) == ["herald-node: key session:42", "herald-node: command flushall"]  # newest first


async def test_a_herald_node_serves_on_the_node_user(server: AclRedis, admin: redis.Redis) -> None:
    """A real node (python -m api) with REDIS_URL naming the node user: ready, streams, publishes, replays."""
    name = topic()
    with run_server({"REDIS_URL": server.url("herald-node"), "HERALD_HEARTBEAT": "1"}) as node:
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(f"{node.url}/readyz")).status_code == 200
            async with await EventStream.open(node.url, [name]) as stream:
                assert stream.response.status_code == 200
                (direct,) = await publish_direct(server.url("herald-producer"), [Message(name, "direct")])
                answer = await client.post(f"{node.url}/publish", json={"topic": name, "data": "over http"})
                assert answer.status_code == 201
                events = await stream.take(2)
                assert [e.data for e in events] == ["direct", "over http"]
                assert events[0].last_event_id == str(direct.id)
            async with await EventStream.open(node.url, [name], last_event_id=str(direct.id - 1)) as resumed:
                replayed = await resumed.take(2)
                assert [e.data for e in replayed] == ["direct", "over http"]
    assert refusals(admin) == []


# -- the docs show these very rules --------------------------------------------------


def test_the_docs_show_the_files_users() -> None:
    readme = (ROOT / "docs" / "access-control.md").read_text()
    users = re.findall(r"^user herald-(?:producer|node) .*$", ACL_CONF.read_text(), flags=re.M)
    assert len(users) == 2
    for line in users:
        rules = re.sub(r"#[0-9a-f]{64}", "#<sha256 of its password>", line)
        assert rules in readme, f"docs/access-control.md's ACL example differs from ops/redis-acl.conf: {rules}"
