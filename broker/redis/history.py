"""Replay reads: the ``history.lua`` snapshot of some topics' streams, shared by concurrent resumes.

A reconnect storm (every client of a dead node resuming at once) asks for the
same topics thousands of times. Concurrent requests for the same topics share
one script call: the batch stays open while the previous read of those topics
is in flight and closes before it is sent, so every request's read still
comes after its subscription (else the hand-off to live could miss an event).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from broker.base import BrokerUnavailable, Event, History, RetentionPolicy, Snapshot
from broker.redis.connection import HISTORY_SCRIPT, Commands, node_client

STORM_WINDOW = 0.05
"""Seconds between two replay reads of the same topics while clients keep resuming."""


@dataclass(slots=True)
class _SharedRead:
    """History requests for the same topics waiting for the same script call."""

    after: int
    future: asyncio.Future[Snapshot] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Reads:
    """Snapshots of the replay streams: :meth:`history` for resumes, :meth:`head`, and :meth:`read` for the feed."""

    def __init__(self, commands: Commands, retention: RetentionPolicy) -> None:
        self._commands = commands
        self._retention = retention
        self._replicas: dict[str, aioredis.Redis] = {}  # READONLY connections to replicas, by host:port
        self.replica: Callable[[], str | None] | None = None
        """With replica reads: the replica the feed reads from now (``host:port``; None: it isn't reading). Resumes
        and heads are read there, so what the feed delivered, they see (another replica may be further behind)."""
        self._reads: dict[tuple[str, ...], _SharedRead] = {}
        self._inflight: dict[tuple[str, ...], asyncio.Future[Snapshot]] = {}
        self._last_read_at: dict[tuple[str, ...], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def head(self) -> int:
        self._commands.check_open()
        self._commands.counters["head_requests"] += 1
        return (await self._shared((), 0)).head

    async def history(self, topics: Collection[str], after: int) -> History:
        """Concurrent calls for the same topics share one script call (reconnect storms)."""
        self._commands.check_open()
        self._commands.counters["history_requests"] += 1
        key = tuple(topics)
        snapshot = await self._shared(key, after)
        return snapshot.judge(key, after)

    async def close(self) -> None:
        for client in self._replicas.values():
            with contextlib.suppress(RedisError, OSError, RuntimeError):
                await client.aclose()
        self._replicas.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, BrokerUnavailable, OSError):
                await task

    async def _shared(self, key: tuple[str, ...], after: int) -> Snapshot:
        """A snapshot of ``key`` read after this call began, shared with concurrent callers of the same key."""
        shared = self._reads.get(key)
        if shared is None:
            shared = self._reads[key] = _SharedRead(after)
            task = asyncio.create_task(self._serve_shared(key, shared))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            shared.after = min(shared.after, after)
        return await asyncio.shield(shared.future)

    async def _serve_shared(self, key: tuple[str, ...], shared: _SharedRead) -> None:
        # Requests keep joining this read until it is sent; later requests
        # start the next one. (A request may only join a read not yet sent: the
        # read must come after its subscription, or the hand-off to live could
        # miss an event.) Reads of the same topics are at least STORM_WINDOW
        # apart, so a reconnect storm costs a few reads per second, not one per
        # client.
        try:
            previous = self._inflight.get(key)
            if previous is not None:
                await asyncio.wait([previous])
            # In a storm (these topics were read moments ago), wait out the
            # window so everyone arriving meanwhile shares this read; a lone
            # resume is read at once.
            last = self._last_read_at.get(key, -STORM_WINDOW)
            await asyncio.sleep(max(0.0, last + STORM_WINDOW - time.monotonic()))
            del self._reads[key]
            self._note_read(key)
            self._inflight[key] = shared.future
            replica = self.replica() if self.replica is not None else None
            shared.future.set_result(await self.read(key, shared.after, replica))
        except Exception as exc:
            shared.future.set_exception(exc)
        except BaseException:
            shared.future.set_exception(BrokerUnavailable("the redis broker is closed"))
            raise
        finally:
            if self._reads.get(key) is shared:
                del self._reads[key]
            if self._inflight.get(key) is shared.future:
                del self._inflight[key]
            # Nobody may be left to retrieve the error of a failed read.
            if shared.future.done() and not shared.future.cancelled():
                shared.future.exception()

    def _note_read(self, key: tuple[str, ...]) -> None:
        now = time.monotonic()
        self._last_read_at[key] = now
        if len(self._last_read_at) > 1024:  # forget topic sets read longer ago than the window
            for old in [k for k, at in self._last_read_at.items() if now - at > STORM_WINDOW]:
                del self._last_read_at[old]

    async def read(self, topics: Sequence[str], after: int, replica: str | None = None) -> Snapshot:
        """One ``history.lua`` call: the head, the epoch, each topic's floor and its events above ``after``.

        On ``replica`` (a cluster node's ``host:port``) when given: ``EVALSHA_RO`` there; a data set too new to
        have its epoch yet (the script would write it) is read on the primary instead.
        """
        commands = self._commands
        commands.counters["history_reads"] += 1
        args: list[str | int] = [
            commands.prefix,
            commands.now(),
            int(self._retention.ttl * 1_000_000),
            after,
            self._retention.size,
            len(topics),
            *topics,
        ]
        keys = commands.history_keys(topics)
        answer = None
        if replica is not None:
            with contextlib.suppress(ReadOnlyScript):
                answer = await commands.call(lambda: self._read_on(replica, keys, args))
        if answer is None:
            answer = await commands.call(lambda: commands.history_script(keys=keys, args=args))
        head, epoch, per_topic = answer
        floors: dict[str, int] = {}
        streams: list[list[Event]] = []
        for topic, (floor, flat) in zip(topics, per_topic, strict=True):
            floors[topic] = int(floor)
            streams.append(
                [
                    Event(int(flat[i]), topic, flat[i + 2], flat[i + 1] or None)
                    for i in range(0, len(flat), 3)
                    if int(flat[i]) > after
                ]
            )
        events = list(heapq.merge(*streams, key=lambda e: e.id))
        return Snapshot(after, int(head), int(epoch), floors, events)

    async def _read_on(self, replica: str, keys: list[str], args: list[str | int]) -> Any:
        """``history.lua`` as a read-only script on the cluster node ``replica`` (loaded there when it lacks it)."""
        client = self._replica_client(replica)
        sha = self._commands.history_script.sha
        try:
            try:
                return await client.evalsha_ro(sha, len(keys), *keys, *args)
            except NoScriptError:
                pass  # scripts are not replicated: load it there
            await client.script_load(HISTORY_SCRIPT)
            return await client.evalsha_ro(sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if "write" in str(exc).lower() or "moved" in str(exc).lower():
                # A new data set (its epoch is set on the primary), or no replica of the slot any more.
                raise ReadOnlyScript(str(exc)) from exc
            raise

    def _replica_client(self, replica: str) -> aioredis.Redis:
        """A small pool of ``READONLY`` connections to the cluster node ``replica`` (a replica answers a keyed
        command only on a connection that said ``READONLY``; otherwise it redirects it to its primary)."""
        client = self._replicas.get(replica)
        if client is None:
            cluster = self._commands.redis
            node = cluster.get_node(node_name=replica) if isinstance(cluster, RedisCluster) else None
            if node is None:
                raise ReadOnlyScript(f"{replica} is not in the cluster's map")
            client = self._replicas[replica] = node_client(node, 8, redis_connect_func=_read_only)
        return client


async def _read_only(connection: Any) -> None:
    """A replica connection's set-up: the usual hand-shake, then ``READONLY``."""
    await connection.on_connect()
    await connection.send_command("READONLY")
    if str(await connection.read_response()) != "OK":
        raise RedisConnectionError("READONLY refused")


class ReadOnlyScript(Exception):
    """A read on a replica that can't be done there (read it on the primary)."""
