"""Which Redis, how Herald connects to it, and how one command runs (the pool, the one retry).

Passing faults heal here:

* Connections are checked when taken from the pool: RESP2, because redis-py's
  RESP3 pool skips its check for a connection the server closed, so after a
  Redis restart every pooled connection failed once ("Connection closed by
  server"). Reads are retried once on a connection error (they are
  idempotent); a publish never is: it may have run before its answer was
  lost, and sending it again would publish it twice.
* At most ``pool`` commands are in flight; more wait their turn (up to
  :data:`POOL_WAIT` seconds) instead of failing with "Too many connections".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from broker.base import BrokerUnavailable, Clock, now_us

POOL_WAIT = 5.0
"""Seconds a command waits for one of the ``pool`` connections before the broker counts as unavailable."""

PUBLISH_SCRIPT = resources.files("broker").joinpath("lua/publish.lua").read_text(encoding="utf-8")
HISTORY_SCRIPT = resources.files("broker").joinpath("lua/history.lua").read_text(encoding="utf-8")
MARK_LOST_SCRIPT = resources.files("broker").joinpath("lua/mark_lost.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Which Redis to use: one server by URL, or the primary that Sentinel names.

    ``sentinels`` (``host:port`` each) win over ``url``; ``master`` is the
    name the sentinels monitor (database 0 of that primary).
    """

    url: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = "herald"
    cluster: tuple[tuple[str, int], ...] = ()
    """Seed nodes of a Redis Cluster (``host:port`` each; any node will do): set, the target is that cluster
    (and ``url``, if any, gives only the user and password)."""

    @classmethod
    def parse_sentinels(cls, text: str, what: str = "a sentinel") -> tuple[tuple[str, int], ...]:
        """``host:port,host:port`` as pairs; ValueError on a malformed entry."""
        pairs = []
        for item in text.split(","):
            host, sep, port = item.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{what} is host:port, got {item.strip()!r}")
            pairs.append((host.strip("[]"), int(port)))
        return tuple(pairs)


def make_client(target: RedisTarget, pool: int, timeout: float | None, connect_timeout: float) -> aioredis.Redis:
    """A client with Herald's connection policy (see the module docstring)."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": "replace",
        "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout,
        "protocol": 2,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": pool,
    }
    if target.cluster:
        del options["max_connections"]  # per node, below
        credentials = urlsplit(target.url) if target.url else None  # REDIS_URL's user and password, if any
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.cluster],
            max_connections=pool,
            username=unquote(credentials.username) if credentials and credentials.username else None,
            password=unquote(credentials.password) if credentials and credentials.password else None,
            **options,
        )
        return cast(aioredis.Redis, cluster)  # the commands Herald uses are the same on both
    if target.sentinels:
        sentinel = Sentinel(
            list(target.sentinels),
            sentinel_kwargs={"socket_timeout": connect_timeout, "socket_connect_timeout": connect_timeout},
        )
        client: aioredis.Redis = sentinel.master_for(target.master, redis_class=aioredis.Redis, **options)
        return client
    assert target.url is not None
    return aioredis.Redis.from_url(target.url, **options)


class Commands:
    """Commands on the pooled client, and what every part of the broker shares: the key prefix, the scripts'
    clock, the counters, whether the broker is closed."""

    def __init__(
        self, client: aioredis.Redis, pool: int, prefix: str, clock: Clock | None, counters: dict[str, int]
    ) -> None:
        self.redis = client
        self.pool = pool
        self.prefix = prefix
        self.counters = counters
        self.closed = False
        self._clock = clock
        self._slots = asyncio.Semaphore(pool)
        self.keys = [f"{prefix}:id"]
        """A script's KEYS when it names no other key (one Redis: every script's; the scripts use ARGV)."""
        self.cluster = isinstance(client, RedisCluster)
        self.publish_script = client.register_script(PUBLISH_SCRIPT)
        self.history_script = client.register_script(HISTORY_SCRIPT)
        self.mark_lost_script = client.register_script(MARK_LOST_SCRIPT)

    def publish_keys(self, topics: Iterable[str], idempotency_key: str | None) -> list[str]:
        """``publish.lua``'s KEYS: on a Redis Cluster every key it touches, else just the counter.

        Declared keys are what a cluster routes a script by and checks before running it: while Herald's slot
        migrates, a call whose keys are not all on one side is refused whole (``ASK``, ``TRYAGAIN``) instead of
        failing half-way through a batch (a script is not rolled back). One Redis ignores them: no cost there.
        """
        if not self.cluster:
            return self.keys
        prefix = self.prefix
        keys = [f"{prefix}:id", f"{prefix}:epoch", *dict.fromkeys(f"{prefix}:s:{t}" for t in topics)]
        if idempotency_key:
            keys.append(f"{prefix}:idem:{idempotency_key}")
        return keys

    def history_keys(self, topics: Iterable[str]) -> list[str]:
        """``history.lua``'s KEYS (see :meth:`publish_keys`): its streams and their version 2 floors, on a cluster."""
        if not self.cluster:
            return self.keys
        prefix = self.prefix
        keys = [f"{prefix}:id", f"{prefix}:epoch"]
        for topic in topics:
            keys += (f"{prefix}:s:{topic}", f"{prefix}:f:{topic}")
        return keys

    async def call(self, command: Callable[[], Awaitable[Any]], *, idempotent: bool = True) -> Any:
        """Run one command on a pooled connection, waiting for a free one; BrokerUnavailable on failure.

        An idempotent command is sent once more after a connection error (the
        connection may have died with a restarted Redis just before it was
        taken); anything else is sent exactly once.
        """
        try:
            async with asyncio.timeout(POOL_WAIT):
                await self._slots.acquire()
        except TimeoutError:
            raise BrokerUnavailable("redis: every pooled connection stayed busy") from None
        try:
            try:
                return await command()
            except RedisConnectionError:
                if not idempotent or self.closed:
                    raise
                self.counters["read_retries"] += 1
                return await command()
        except (RedisError, OSError) as exc:
            if not isinstance(exc, ResponseError):  # a node that died or moved, not a refusal
                await refresh_topology(self.redis)
            raise BrokerUnavailable(f"redis: {exc}") from exc
        finally:
            self._slots.release()

    @property
    def in_use(self) -> int:
        """Commands holding a connection now."""
        return self.pool - self._slots._value

    def check_open(self) -> None:
        if self.closed:
            raise BrokerUnavailable("the redis broker is closed")

    def now(self) -> str:
        """The scripts' "now": empty for Redis's clock, or the injected clock in µs."""
        return "" if self._clock is None else str(now_us(self._clock))


CLUSTER_UNSUPPORTED = (
    "Redis answers as a node of a Redis Cluster (HELLO: mode cluster), but this broker was set up for one Redis "
    "server (Redis could not be reached when the node started, so it could not tell). Set REDIS_CLUSTER_NODES, or "
    'restart the node once Redis answers. See docs/operations.md, "Redis deployments".'
)
"""Why a broker set up for one Redis refuses a cluster node it meets later."""

MINIMUM_REDIS = (7, 0)
"""publish.lua keeps a new stream's floor with ``XSETID … MAXDELETEDID``, history.lua reads it back (XINFO)."""


def server_problem(hello: object, cluster: bool = False) -> str | None:
    """What makes the server that answered ``HELLO 2`` unfit for Herald: a Redis before 7.0, or a cluster node
    where one Redis was configured (``cluster``: a cluster was, and is expected).

    ``HELLO`` answers every authenticated user, whatever its ACL (``INFO`` would be refused, and noted in
    ACL LOG, for ``ops/redis-acl.conf``'s users).
    """
    text = _hello_fields(hello)
    if text.get("mode") == "cluster" and not cluster:
        return CLUSTER_UNSUPPORTED
    version = text.get("version", "")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if len(parts) == 2 and parts < MINIMUM_REDIS:
        return (
            f"Redis {version} is too old: Herald needs Redis {MINIMUM_REDIS[0]}.{MINIMUM_REDIS[1]} or later "
            "(a new replay stream keeps its floor with XSETID ... MAXDELETEDID)"
        )
    return None


NO_HELLO = {"version": "5"}
"""What a Redis without ``HELLO`` (before 6.0) is taken to answer: too old."""


async def check_server(client: aioredis.Redis) -> str | None:
    """:func:`server_problem` of ``client``'s server, a cluster expected if ``client`` is a cluster client;
    connection errors propagate."""
    cluster = isinstance(client, RedisCluster)
    try:
        if isinstance(client, RedisCluster):  # any node answers for the cluster (a keyless command needs one named)
            hello = await client.execute_command("HELLO", "2", target_nodes=RedisCluster.RANDOM)
        else:
            hello = await client.execute_command("HELLO", "2")  # type: ignore[no-untyped-call]
    except ResponseError:
        hello = NO_HELLO
    return server_problem(hello, cluster)


def hello_now(url: str, timeout: float = 2.0) -> object:
    """The server's ``HELLO 2`` answer, for a node's start (before its event loop): None when it can't be reached
    now, ``{"version": "5"}`` from a Redis that has no HELLO (before 6.0)."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=None)
    try:
        reply: object = client.execute_command("HELLO", 2)  # type: ignore[no-untyped-call]
        return reply
    except ResponseError:
        return NO_HELLO
    except (RedisError, OSError):
        return None
    finally:
        client.close()


def is_cluster(hello: object) -> bool:
    """Whether a ``HELLO`` answer (see :func:`hello_now`) comes from a Redis Cluster node."""
    return _hello_fields(hello).get("mode") == "cluster"


def _hello_fields(hello: object) -> dict[str, str]:
    """A ``HELLO`` answer (a map, or RESP2's flat list; bytes or text) as text fields."""
    if isinstance(hello, list):
        hello = dict(zip(hello[::2], hello[1::2], strict=False))
    if not isinstance(hello, dict):
        return {}
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
        for k, v in hello.items()
    }


def node_client(node: ClusterNode, max_connections: int, **options: Any) -> aioredis.Redis:
    """A plain client of our own to one cluster node, with the cluster client's settings for it (credentials,
    timeouts, RESP2) plus ``options``: a feed's sharded Pub/Sub connection, a replica's read connections.

    It reads redis-py's ``ClusterNode.connection_class`` and ``connection_kwargs`` (8.2, the version locked and
    tested), here only, as :func:`refresh_topology` is the one place that calls into its slot map.
    """
    kwargs = {**node.connection_kwargs, **options}
    pool = aioredis.ConnectionPool(connection_class=node.connection_class, max_connections=max_connections, **kwargs)
    return aioredis.Redis.from_pool(pool)  # the pool closes with the client


async def refresh_topology(client: aioredis.Redis) -> None:
    """On a Redis Cluster, read which node serves which slots again (after a failover, the replica that took over).

    redis-py (8.2, the version locked and tested) refreshes its slot map by itself only when its own retries are
    on; Herald's are off (a publish is never sent twice), so a client kept sending to a dead primary. This is the
    one place that reaches into its internals (``nodes_manager.initialize``). One Redis: nothing to do.
    """
    if isinstance(client, RedisCluster):
        with contextlib.suppress(RedisError, OSError):
            await client.nodes_manager.initialize()
