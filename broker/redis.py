"""The Redis broker: one replay stream per topic, one pub/sub feed per node.

Redis-level contract (also in the README, for producers in any language):

* ``<prefix>:id``         the deployment's id counter (decimal string)
* ``<prefix>:epoch``      the first id of this data set; ids at or below it
                          were issued before Redis last lost its data
* ``<prefix>:s:<topic>``  the topic's replay stream; entry id ``<id>-0``,
                          fields ``d`` (data) and ``e`` (event type, if any)
* ``<prefix>:f:<topic>``  the topic's floor: the largest id it has dropped
* ``<prefix>:c:<topic>``  the topic's pub/sub channel; message ``<id>|<type>|<data>``
* ``<prefix>:idem:<key>`` ids published under an idempotency key

Publishing is the ``publish.lua`` script: id, stream append and trim, and
PUBLISH in one atomic step. The stream is the source of truth; pub/sub is
only the fast path. A node's feed can lose messages (its connection drops),
so after every reconnect it backfills from the streams everything after the
last id it delivered, and only then reads the live channel again, dropping
what the backfill already covered. If the backfill can't be exact (Redis lost
its data, or the events expired meanwhile), the sink gets a ``reset``.

Because every publish runs as one script, ids are issued in the order the
messages are published, and one pub/sub connection receives them in that
order: the node's feed is in id order across all its topics.

Passing faults (what makes a Redis restart or failover heal by itself):

* Connections are checked when taken from the pool: RESP2, because redis-py's
  RESP3 pool skips its check for a connection the server closed, so after a
  Redis restart every pooled connection failed once ("Connection closed by
  server"). Reads are retried once on a connection error (they are
  idempotent); a publish never is: it may have run before its answer was
  lost, and sending it again would publish it twice.
* At most ``pool`` commands are in flight; more wait their turn (up to
  ``POOL_WAIT`` seconds) instead of failing with "Too many connections".
* The feed's subscriptions survive an outage: :meth:`RedisBroker.subscribe`
  takes topics while the feed is down, and the reconnect subscribes and
  backfills them from the feed's position, so clients can start at that
  position without Redis (:meth:`RedisBroker.position`).
* With Sentinel, a failover can lose what asynchronous replication had not
  copied yet. A node that finds the new primary's head below an id it has
  already delivered or published raises the data set's epoch above it
  (``mark_lost.lua``), and every resume from before it gets ``reset``
  (``lost``) instead of a silent hole. ``replicas_ack`` makes a publish wait
  (``WAIT``) until that many replicas have it, so nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from broker.base import (
    BrokerUnavailable,
    Clock,
    Event,
    EventSink,
    History,
    IdempotencyConflict,
    Message,
    NodeRecord,
    Reset,
    ResetReason,
    RetentionPolicy,
    Snapshot,
    now_us,
)

log = logging.getLogger("herald.redis")

STORM_WINDOW = 0.05
"""Seconds between two replay reads of the same topics while clients keep resuming."""

POOL_WAIT = 5.0
"""Seconds a command waits for one of the ``pool`` connections before the broker counts as unavailable."""

ACK_TIMEOUT_MS = 2000
"""How long a publish waits for ``replicas_ack`` replicas (``WAIT``), in milliseconds."""

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


def _client(target: RedisTarget, pool: int, timeout: float | None, connect_timeout: float) -> aioredis.Redis:
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


@dataclass(slots=True)
class _SharedRead:
    """History requests for the same topics waiting for the same script call."""

    after: int
    future: asyncio.Future[Snapshot] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class RedisBroker:
    """A :class:`~broker.base.Broker` on one Redis server or a Sentinel-managed primary (not Redis Cluster).

    ``publish`` works without :meth:`start` (a producer needs no feed).
    Time (the ids' seed and retention by age) comes from Redis's own clock,
    one clock for every node and producer; tests pass ``clock`` instead.
    ``pool`` bounds the commands in flight (more wait, see :data:`POOL_WAIT`);
    ``replicas_ack`` is how many replicas must have a publish before it returns.
    """

    def __init__(
        self,
        url: str | RedisTarget,
        retention: RetentionPolicy | None = None,
        *,
        prefix: str = "herald",
        clock: Clock | None = None,
        timeout: float = 2.0,
        client: aioredis.Redis | None = None,
        pool: int = 50,
        replicas_ack: int = 0,
    ) -> None:
        target = url if isinstance(url, RedisTarget) else RedisTarget(url=url)
        self._retention = retention or RetentionPolicy()
        self._prefix = prefix
        self._clock = clock
        self._replicas_ack = replicas_ack
        self._redis: aioredis.Redis = client or _client(target, pool, timeout, timeout)
        # The feed has its own client: its connection blocks reading, and must
        # not time out while the channels are quiet (a health ping keeps it honest).
        self._feed_redis: aioredis.Redis = client or _client(target, 2, None, timeout)
        self._slots = asyncio.Semaphore(pool)
        self._pool = pool
        self._publish_script = self._redis.register_script(PUBLISH_SCRIPT)
        self._history_script = self._redis.register_script(HISTORY_SCRIPT)
        self._mark_lost_script = self._redis.register_script(MARK_LOST_SCRIPT)
        self._channel_prefix = f"{prefix}:c:"
        # This node's own control channel: its health pings come back on it.
        self._control = f"{prefix}:ctl:{uuid.uuid4().hex}"
        # Every node's: a node that raised the epoch (a failover lost events) says so here.
        self._epoch_channel = f"{prefix}:ctl:epoch"
        self._sink: EventSink | None = None
        self._topics: set[str] = set()
        # Topics whose every event above the feed's position reaches the sink:
        # those the last (re)connect subscribed and backfilled, and those taken
        # while the feed was down (the next connect backfills them). A topic
        # subscribed on a live feed joins once the feed has passed the head
        # read after its subscription (``_exact_at``).
        self._exact: set[str] = set()
        self._exact_at: dict[str, int] = {}
        self._pubsub: Any = None
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._feed_up = asyncio.Event()
        self._connecting: asyncio.Future[None] | None = None
        self._feed: asyncio.Task[None] | None = None
        self._last_seen = 0
        self._last_published = 0
        self._positioned = False  # the feed has connected once: _last_seen is a real position
        self._echoing = False  # a head is on its way round the feed (see position())
        self._epoch = -1
        self._closed = False
        self._reads: dict[tuple[str, ...], _SharedRead] = {}
        self._inflight: dict[tuple[str, ...], asyncio.Future[Snapshot]] = {}
        self._last_read_at: dict[tuple[str, ...], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.counters = {
            "feed_connects": 0,
            "backfilled_events": 0,
            "history_requests": 0,
            "history_reads": 0,
            "head_requests": 0,
            "positions_from_feed": 0,
            "duplicates_dropped": 0,
            "bad_messages": 0,
            "read_retries": 0,
            "lost_marked": 0,
        }

    # -- lifecycle -------------------------------------------------------------

    async def start(self, sink: EventSink) -> None:
        self._sink = sink
        self._feed = asyncio.create_task(self._run_feed(), name="herald-redis-feed")
        # Serve as soon as Redis answers; if it doesn't, the node still starts
        # (readiness says 503) and the feed keeps reconnecting.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._feed_up.wait(), 5)

    async def close(self) -> None:
        self._closed = True
        self._sink = None
        tasks = [t for t in (self._feed, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await task
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()
        if self._feed_redis is not self._redis:
            with contextlib.suppress(RedisError, OSError):
                await self._feed_redis.aclose()

    async def ping(self) -> bool:
        if self._closed:
            return False
        try:
            pong = await self._call(self._redis.ping)
        except BrokerUnavailable:
            return False
        return bool(pong) and (self._sink is None or self._feed_up.is_set())

    # -- commands --------------------------------------------------------------

    async def _call(self, command: Callable[[], Awaitable[Any]], *, idempotent: bool = True) -> Any:
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
                if not idempotent or self._closed:
                    raise
                self.counters["read_retries"] += 1
                return await command()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis: {exc}") from exc
        finally:
            self._slots.release()

    # -- publishing ------------------------------------------------------------

    async def publish(self, messages: Sequence[Message], idempotency_key: str | None = None) -> list[Event]:
        self._check_open()
        args: list[str | int] = [
            self._prefix,
            self._now(),
            self._retention.size,
            int(self._retention.ttl * 1_000_000),
            idempotency_key or "",
            len(messages),
        ]
        for message in messages:
            args += [message.topic, message.type or "", message.data]
        if self._replicas_ack:
            _, joined = await self._call(lambda: self._publish_and_wait(args), idempotent=False)
        else:
            _, joined = await self._call(lambda: self._publish_script(args=args), idempotent=False)
        ids = [int(i) for i in str(joined).split(",")]
        if len(ids) != len(messages):
            raise IdempotencyConflict(f"idempotency key {idempotency_key!r} was used for a different request")
        self._last_published = max(self._last_published, ids[-1])
        return [Event(i, m.topic, m.data, m.type) for i, m in zip(ids, messages, strict=True)]

    async def _publish_and_wait(self, args: list[str | int]) -> Any:
        # WAIT counts the replicas that have everything this connection wrote,
        # so it must follow the script on the same connection: one pipeline.
        async with self._redis.pipeline(transaction=False) as pipe:
            await self._publish_script(args=args, client=pipe)
            pipe.wait(self._replicas_ack, ACK_TIMEOUT_MS)
            result, acked = await pipe.execute()
        if int(acked) < self._replicas_ack:
            # Published on the primary (subscribers may have it), but a
            # failover now could lose it: not accepted. A retry with the same
            # Idempotency-Key waits for the replicas again, publishing nothing twice.
            raise BrokerUnavailable(f"only {acked} of {self._replicas_ack} replicas acknowledged the publish in time")
        return result

    # -- replay ----------------------------------------------------------------

    async def head(self) -> int:
        self._check_open()
        self.counters["head_requests"] += 1
        return (await self._shared((), 0)).head

    async def position(self, topics: Collection[str]) -> int:
        self._check_open()
        # While the feed is connecting, its position and its subscriptions are
        # in flux: wait for that attempt to end, then answer from what it left.
        while self._connecting is not None:
            await asyncio.wait([self._connecting])
        position = self.position_now(topics)
        if position is not None:
            return position
        # A topic subscribed on the live feed since its last connect: events
        # before its subscription was confirmed never passed the feed, so start
        # at the head read after it (shared by everyone asking meanwhile).
        head = await self.head()
        waiting = [t for t in topics if t in self._topics and t not in self._exact]
        for topic in waiting:
            self._exact_at[topic] = min(self._exact_at.get(topic, head), head)
        if waiting and self._feed_up.is_set() and not self._echoing:
            # Send the head round the feed (this node's control channel): once
            # it is back, the feed has passed it, and the next clients of
            # these topics start at the feed's position with no read at all.
            self._echoing = True
            task = asyncio.create_task(self._echo_position(head))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return head

    def position_now(self, topics: Collection[str]) -> int | None:
        """The feed's position when it carries every one of ``topics`` exactly (see :meth:`position`), else None."""
        self._check_open()
        if self._connecting is None and self._positioned and self._is_exact(topics):
            self.counters["positions_from_feed"] += 1
            return self._last_seen
        return None

    async def _echo_position(self, head: int) -> None:
        try:
            await self._send_round(str(head))
        except BrokerUnavailable:
            pass
        finally:
            self._echoing = False

    async def _send_round(self, head: str) -> None:
        """Publish ``head`` on this node's control channel: once it comes back, the feed has passed it."""
        await self._call(functools.partial(self._redis.publish, self._control, head))

    def _is_exact(self, topics: Collection[str]) -> bool:
        for topic in topics:
            if topic in self._exact:
                continue
            at = self._exact_at.get(topic)
            if at is None or at > self._last_seen or topic not in self._topics:
                return False
            del self._exact_at[topic]
            self._exact.add(topic)
        return True

    async def history(self, topics: Collection[str], after: int) -> History:
        """Concurrent calls for the same topics share one script call (reconnect storms)."""
        self._check_open()
        self.counters["history_requests"] += 1
        key = tuple(topics)
        snapshot = await self._shared(key, after)
        return snapshot.judge(key, after)

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
            shared.future.set_result(await self._read(key, shared.after))
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

    async def _read(self, topics: Sequence[str], after: int) -> Snapshot:
        self.counters["history_reads"] += 1
        args: list[str | int] = [
            self._prefix,
            self._now(),
            int(self._retention.ttl * 1_000_000),
            after,
            len(topics),
            *topics,
        ]
        head, epoch, per_topic = await self._call(lambda: self._history_script(args=args))
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

    # -- live feed -------------------------------------------------------------

    async def subscribe(self, topics: Collection[str]) -> None:
        self._check_open()
        while True:
            new = [t for t in topics if t not in self._topics]
            if not new:
                return
            if self._connecting is not None:
                await asyncio.wait([self._connecting])  # then look again: it may have taken them
                continue
            if not self._feed_up.is_set():
                # The feed is down: the next connect subscribes these and
                # backfills them from the feed's position, so they are exact
                # from that position on (see position()).
                self._topics.update(new)
                self._exact.update(new)
                return
            await self._subscribe_live(new)
            return

    async def _subscribe_live(self, new: list[str]) -> None:
        loop = asyncio.get_running_loop()
        waiting = []
        for topic in new:
            channel = self._channel_prefix + topic
            future = self._confirmations.get(channel)
            if future is None or future.done():
                future = self._confirmations[channel] = loop.create_future()
            waiting.append(future)
        self._topics.update(new)
        try:
            await self._pubsub.subscribe(*(self._channel_prefix + t for t in new))
            await asyncio.wait_for(asyncio.gather(*(asyncio.shield(f) for f in waiting)), 5)
        except (RedisError, OSError, TimeoutError, BrokerUnavailable) as exc:
            if not self._feed_up.is_set():
                # The feed went down meanwhile: the reconnect takes these
                # topics (they are in _topics), as if subscribed while down.
                self._exact.update(new)
                return
            self._topics.difference_update(new)
            with contextlib.suppress(RedisError, OSError):  # don't leave a half-made subscription behind
                await self._pubsub.unsubscribe(*(self._channel_prefix + t for t in new))
            raise BrokerUnavailable(f"redis subscribe: {exc}") from exc

    async def unsubscribe(self, topics: Collection[str]) -> None:
        gone = [t for t in topics if t in self._topics]
        self._topics.difference_update(gone)
        self._exact.difference_update(gone)
        for topic in gone:
            self._exact_at.pop(topic, None)
        if gone and self._feed_up.is_set():
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(*(self._channel_prefix + t for t in gone))

    async def _run_feed(self) -> None:
        backoff = 0.05
        resync = False
        while not self._closed:
            pubsub = self._feed_redis.pubsub()
            self._connecting = asyncio.get_running_loop().create_future()
            try:
                await self._connect_feed(pubsub, resync)
                backoff = 0.05
                resync = True  # any later reconnect must backfill
                self._end_connecting()
                await self._read_feed(pubsub)
            except Exception as exc:
                # Whatever went wrong, the feed must come back: a dead feed
                # would silently stop live delivery on this node.
                if not isinstance(exc, RedisError | OSError | BrokerUnavailable | TimeoutError):
                    log.exception("redis feed failed; reconnecting")
                elif self._feed_up.is_set():
                    log.warning("redis feed lost (%s); reconnecting", exc)
                self._feed_down()
            finally:
                self._end_connecting()
                with contextlib.suppress(RedisError, OSError, RuntimeError):
                    await pubsub.aclose()
            if not self._closed:
                await asyncio.sleep(backoff)
                # Short: a node should notice that Redis is back within a
                # fraction of a second, not after a long backoff.
                backoff = min(backoff * 2, 0.5)

    def _end_connecting(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.set_result(None)

    def _feed_down(self) -> None:
        self._feed_up.clear()
        for future in self._confirmations.values():
            if not future.done():
                future.set_exception(BrokerUnavailable("redis feed lost"))
        self._confirmations.clear()
        # Every topic is backfilled from the feed's position when it is back.
        self._exact = set(self._topics)
        self._exact_at.clear()

    async def _connect_feed(self, pubsub: Any, resync: bool) -> None:
        """Subscribe everything wanted, backfill what the feed missed, then go live."""
        topics = tuple(self._topics)  # subscribe() waits while this runs, so this stays the set
        channels = [self._control, self._epoch_channel, *(self._channel_prefix + t for t in topics)]
        await pubsub.subscribe(*channels)
        pending = set(channels)
        while pending:
            message = await pubsub.get_message(timeout=5)
            if message is None:
                raise BrokerUnavailable("no subscribe confirmation from redis")
            if message["type"] == "subscribe":
                pending.discard(message["channel"])
        self._pubsub = pubsub
        self.counters["feed_connects"] += 1
        # Everything up to the snapshot's head is now either backfilled or
        # irrelevant; live messages at or below it are duplicates.
        snapshot = await self._read(topics, self._last_seen if resync else 0)
        if resync and snapshot.epoch == self._epoch:
            known = max(self._last_seen, self._last_published)
            if snapshot.head < known:
                # The new primary is behind what this node already delivered
                # or published: a failover lost those events. Mark the data
                # set so every resume from before them is reset, not holed.
                await self._mark_lost(known)
                snapshot = await self._read(topics, self._last_seen)
        if not resync:
            self._epoch = snapshot.epoch
        elif snapshot.epoch != self._epoch:
            # Redis lost its data: what the old data set had after our
            # position is gone, and everything in the new one is news (its ids
            # need not even be above the old ones, if the old clock ran ahead).
            self._epoch = snapshot.epoch
            snapshot = await self._read(topics, snapshot.epoch)
            self._last_seen = snapshot.epoch
            if self._sink is not None and topics:
                self._sink.on_reset(Reset(ResetReason.LOST, topics))
        if resync and self._sink is not None:
            history = snapshot.judge(topics, self._last_seen)
            if history.reset is not None and history.reset.topics:
                self._sink.on_reset(history.reset)
            for event in history.events:
                self._sink.on_event(event)
            self.counters["backfilled_events"] += len(history.events)
        self._last_seen = max(self._last_seen, snapshot.head)
        self._positioned = True
        self._exact = self._topics.intersection(topics)
        self._exact_at.clear()
        # Topics dropped while this connection was being made (unsubscribe had
        # no feed to tell) must not stay subscribed on it.
        stale = [self._channel_prefix + t for t in topics if t not in self._topics]
        if stale:
            await pubsub.unsubscribe(*stale)
        self._feed_up.set()

    async def _mark_lost(self, lost: int) -> None:
        self.counters["lost_marked"] += 1
        log.error(
            "redis lost events up to id %d (a failover before replicas had them): resumes from before it get a reset",
            lost,
        )
        args: list[str | int] = [self._prefix, lost, self._epoch_channel]
        await self._call(lambda: self._mark_lost_script(args=args))

    async def _read_feed(self, pubsub: Any) -> None:
        quiet_since = time.monotonic()
        pinged = False
        while not self._closed:
            message = await pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if message is None:
                if now - quiet_since > 6:
                    raise BrokerUnavailable("redis feed stopped answering")
                if now - quiet_since > 2 and not pinged:
                    # Read the head, then publish it on this node's control
                    # channel: when it comes back, every event up to that head
                    # has passed this connection, so the feed's position moves
                    # on while its topics are quiet (else a later backfill would
                    # judge from a stale position). It also proves the feed alive.
                    head = await self._call(functools.partial(self._redis.get, f"{self._prefix}:id"))
                    await self._send_round(head or "0")
                    pinged = True
                continue
            quiet_since, pinged = now, False
            if message["type"] == "message" and message["channel"] == self._epoch_channel:
                if message["data"] != str(self._epoch):
                    # A node marked lost events: reconnect, so the backfill sees
                    # the new epoch and resets the clients who may miss them.
                    raise BrokerUnavailable("the data set's epoch moved (a failover lost events)")
                continue
            self._on_message(message)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "message":
            channel: str = message["channel"]
            if channel == self._control:
                with contextlib.suppress(ValueError):
                    self._last_seen = max(self._last_seen, int(message["data"]))
                return
            try:
                raw_id, event_type, data = message["data"].split("|", 2)
                event_id = int(raw_id)
            except ValueError:
                # Not written by publish.lua: the stream, not this message, is
                # what counts, so skip it rather than stop the feed.
                self.counters["bad_messages"] += 1
                log.warning("ignoring a malformed message on %s", channel)
                return
            if event_id <= self._last_seen:
                self.counters["duplicates_dropped"] += 1
                return
            self._last_seen = event_id
            topic = channel[len(self._channel_prefix) :]
            if self._sink is not None and topic in self._topics:
                self._sink.on_event(Event(event_id, topic, data, event_type or None))
        elif kind == "subscribe":
            future = self._confirmations.pop(message["channel"], None)
            if future is not None and not future.done():
                future.set_result(None)

    # -- internals -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerUnavailable("the redis broker is closed")

    def _now(self) -> str:
        """The scripts' "now": empty for Redis's clock, or the injected clock in µs."""
        return "" if self._clock is None else str(now_us(self._clock))

    # -- NodeDirectory ----------------------------------------------------------

    async def announce(self, node_id: str, record: str, ttl: float) -> None:
        """``<prefix>:node:<id>`` (the record, expiring after ``ttl``) says the node is alive; the hash
        ``<prefix>:nodes`` keeps every node's last record (and when it was written) so a node gone
        quiet is still listed, as gone, for a while."""
        now = time.time()
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(f"{self._prefix}:node:{node_id}", record, px=max(1, int(ttl * 1000)))
        pipe.hset(f"{self._prefix}:nodes", node_id, f"{now}|{record}")
        await self._call(pipe.execute)

    async def nodes(self, forget: float) -> list[NodeRecord]:
        entries: dict[str | bytes, str | bytes] = await self._call(lambda: self._redis.hgetall(f"{self._prefix}:nodes"))
        now = time.time()
        known: list[tuple[str, str]] = []
        stale: list[str] = []
        for raw_id, raw in entries.items():
            node_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            seen, _, record = (raw.decode() if isinstance(raw, bytes) else raw).partition("|")
            try:
                fresh = now - float(seen) <= forget
            except ValueError:
                fresh = False
            if fresh:
                known.append((node_id, record))
            else:
                stale.append(node_id)
        if stale:
            await self._call(lambda: self._redis.hdel(f"{self._prefix}:nodes", *stale))
        if not known:
            return []
        keys = [f"{self._prefix}:node:{node_id}" for node_id, _ in known]
        flags = await self._call(lambda: self._alive(keys))
        return [NodeRecord(n, r, bool(a)) for (n, r), a in zip(known, flags, strict=True)]

    async def _alive(self, keys: list[str]) -> list[bool]:
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        return [bool(n) for n in await pipe.execute()]

    # -- NodeEntries -------------------------------------------------------------

    def _entries_key(self, kind: str, node_id: str) -> str:
        return f"{self._prefix}:entries:{kind}:{node_id}"

    async def put_entries(self, node_id: str, kind: str, entries: Mapping[str, str], keep: float) -> None:
        """``<prefix>:entries:<kind>:<node id>``: a hash, expiring ``keep`` seconds after its last change."""
        key = self._entries_key(kind, node_id)

        async def run() -> None:
            pipe = self._redis.pipeline(transaction=False)
            if entries:
                pipe.hset(key, mapping=dict[Any, Any](entries))
            pipe.pexpire(key, max(1, int(keep * 1000)))
            await pipe.execute()

        await self._call(run)

    async def drop_entries(self, node_id: str, kind: str, keys: Collection[str], keep: float) -> None:
        key = self._entries_key(kind, node_id)

        async def run() -> None:
            pipe = self._redis.pipeline(transaction=False)
            if keys:
                pipe.hdel(key, *keys)
            pipe.pexpire(key, max(1, int(keep * 1000)))
            await pipe.execute()

        await self._call(run)

    async def entries(self, kind: str, node_ids: Collection[str]) -> dict[str, dict[str, str]]:
        ids = list(node_ids)
        if not ids:
            return {}

        async def run() -> list[dict[Any, Any]]:
            pipe = self._redis.pipeline(transaction=False)
            for node_id in ids:
                pipe.hgetall(self._entries_key(kind, node_id))
            return list(await pipe.execute())

        found = await self._call(run)
        return {node_id: _text_map(raw) for node_id, raw in zip(ids, found, strict=True) if raw}

    async def take_entries(self, node_id: str, kind: str) -> dict[str, str]:
        """HGETALL and DEL in one MULTI: of several takers, one gets the entries, the others nothing."""
        key = self._entries_key(kind, node_id)

        async def run() -> dict[Any, Any]:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hgetall(key)
            pipe.delete(key)
            raw, _ = await pipe.execute()
            return dict(raw)

        return _text_map(await self._call(run, idempotent=False))

    def stats(self) -> dict[str, int]:
        return {
            "topics_subscribed": len(self._topics),
            "feed_up": int(self._feed_up.is_set()),
            "pool_size": self._pool,
            "pool_in_use": self._pool - self._slots._value,  # commands holding a connection now
            **self.counters,
        }


def _text_map(raw: Mapping[Any, Any]) -> dict[str, str]:
    """A hash as Redis answered it (bytes or str, by the client's decoding), as text."""
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
        for k, v in raw.items()
    }
