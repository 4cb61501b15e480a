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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aioredis
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

    @classmethod
    def parse_sentinels(cls, text: str) -> tuple[tuple[str, int], ...]:
        """``host:port,host:port`` as pairs; ValueError on a malformed entry."""
        pairs = []
        for item in text.split(","):
            host, sep, port = item.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"a sentinel is host:port, got {item.strip()!r}")
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
        self.publish_script = client.register_script(PUBLISH_SCRIPT)
        self.history_script = client.register_script(HISTORY_SCRIPT)
        self.mark_lost_script = client.register_script(MARK_LOST_SCRIPT)

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
    "REDIS_URL names a node of a Redis Cluster (HELLO: mode cluster). This version of Herald needs one Redis "
    "server or a Sentinel-managed primary (REDIS_SENTINELS): on a cluster a publish script reaches only the keys "
    'of its own node\'s slots, so most publishes would fail. See docs/operations.md, "Redis deployments".'
)
"""Why a node refuses a Redis Cluster, in its log and its exit."""

MINIMUM_REDIS = (7, 0)
"""publish.lua keeps a new stream's floor with ``XSETID … MAXDELETEDID``, history.lua reads it back (XINFO)."""


def server_problem(hello: object) -> str | None:
    """What makes the server that answered ``HELLO 2`` unfit for Herald (a cluster node, a Redis before 7.0).

    ``HELLO`` answers every authenticated user, whatever its ACL (``INFO`` would be refused, and noted in
    ACL LOG, for ``ops/redis-acl.conf``'s users).
    """
    if isinstance(hello, list):
        hello = dict(zip(hello[::2], hello[1::2], strict=False))
    if not isinstance(hello, dict):
        return None
    fields = {k.decode() if isinstance(k, bytes) else str(k): v for k, v in hello.items()}
    text = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in fields.items()}
    if text.get("mode") == "cluster":
        return CLUSTER_UNSUPPORTED
    version = text.get("version", "")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if len(parts) == 2 and parts < MINIMUM_REDIS:
        return (
            f"Redis {version} is too old: Herald needs Redis {MINIMUM_REDIS[0]}.{MINIMUM_REDIS[1]} or later "
            "(a new replay stream keeps its floor with XSETID ... MAXDELETEDID)"
        )
    return None


async def check_server(client: aioredis.Redis) -> str | None:
    """:func:`server_problem` of ``client``'s server; connection errors propagate, a Redis without HELLO is too old."""
    try:
        hello = await client.execute_command("HELLO", 2)  # type: ignore[no-untyped-call]
    except ResponseError:
        return server_problem({"version": "5"})
    return server_problem(hello)


def check_server_now(url: str, timeout: float = 2.0) -> str | None:
    """:func:`check_server` for a node's start, before its event loop: None when Redis can't be reached now."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=None)
    try:
        hello = client.execute_command("HELLO", 2)  # type: ignore[no-untyped-call]
    except ResponseError:
        return server_problem({"version": "5"})
    except (RedisError, OSError):
        return None
    finally:
        client.close()
    return server_problem(hello)
