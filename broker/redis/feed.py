"""The node's live feed: one pub/sub connection for every topic its clients want, backfilled after each reconnect.

The stream is the source of truth, pub/sub only the fast path. The feed's
connection can drop and lose messages, so after every reconnect the feed
backfills from the streams everything after the last id it delivered
(:meth:`Feed._connect_feed`), and only then reads the live channels again,
dropping what the backfill already covered. If the backfill can't be exact
(Redis lost its data, or the events expired meanwhile), the sink gets a
``reset``.

* Its subscriptions survive an outage: :meth:`Feed.subscribe` takes topics
  while the feed is down, and the reconnect subscribes and backfills them from
  the feed's position, so clients can start at that position without Redis
  (:meth:`Feed.position`).
* With Sentinel, a failover can lose what asynchronous replication had not
  copied yet. A node that finds the new primary's head below an id it has
  already delivered or published raises the data set's epoch above it
  (``mark_lost.lua``), and every resume from before it gets ``reset``
  (``lost``) instead of a silent hole.
* Because every publish runs as one script and one connection receives the
  messages in order, the feed is in id order across all its topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Collection
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.base import BrokerUnavailable, Event, EventSink, Reset, ResetReason
from broker.redis.connection import Commands, check_server, refresh_topology
from broker.redis.history import Reads
from broker.redis.publish import Publisher
from broker.redis.sharded import ShardLinks

log = logging.getLogger("herald.redis")


class Feed:
    """The live feed of one node: subscriptions, positions, reconnects and backfills (see the module docstring)."""

    def __init__(
        self, commands: Commands, client: aioredis.Redis, reads: Reads, publisher: Publisher, links: ShardLinks | None
    ) -> None:
        self._commands = commands
        self._links = links  # on a cluster: the node's sharded connections (shared with other partitions' feeds)
        # The feed has its own client: its connection blocks reading, and must
        # not time out while the channels are quiet (a health ping keeps it honest).
        self._feed_redis = client
        self._told_unfit = False
        self._reads = reads
        self._publisher = publisher
        prefix = commands.prefix
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
        self._positioned = False  # the feed has connected once: _last_seen is a real position
        self._echoing = False  # a head is on its way round the feed (see position())
        self._epoch = -1
        self._tasks: set[asyncio.Task[None]] = set()
        self._rounds: list[tuple[int, asyncio.Future[None]]] = []  # positions awaited by reach()
        self._resync_asked = False  # resync(): the reading loop drops the connection at its next turn
        self._resynced: asyncio.Future[None] | None = None  # resolved by the first connect after that

    @property
    def up(self) -> bool:
        return self._feed_up.is_set()

    @property
    def serving(self) -> bool:
        """Whether the node may count on the feed: it is up, or the broker feeds no one (a producer's)."""
        return self._sink is None or self._feed_up.is_set()

    @property
    def topics(self) -> int:
        return len(self._topics)

    async def start(self, sink: EventSink) -> None:
        self._sink = sink
        self._feed = asyncio.create_task(self._run_feed(), name="herald-redis-feed")
        # Serve as soon as Redis answers; if it doesn't, the node still starts
        # (readiness says 503) and the feed keeps reconnecting.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._feed_up.wait(), 5)

    async def close(self) -> None:
        self._sink = None
        tasks = [t for t in (self._feed, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await task

    async def position(self, topics: Collection[str]) -> int:
        self._commands.check_open()
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
        head = await self._reads.head()
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
        self._commands.check_open()
        if self._connecting is None and self._positioned and self._is_exact(topics):
            self._commands.counters["positions_from_feed"] += 1
            return self._last_seen
        return None

    def replica(self) -> str | None:
        """The replica this feed reads from now (``host:port``), None when it reads a primary or is not up."""
        pubsub = self._pubsub
        if self._links is None or not self._links.replica or not self._feed_up.is_set() or pubsub is None:
            return None
        node: str = pubsub.node
        return node

    @property
    def last_seen(self) -> int:
        """The feed's position: every event of its exact topics up to it has reached the sink, later ones will."""
        return self._last_seen

    async def reach(self, topics: Collection[str], at_least: int) -> None:
        """Return once the feed carries ``topics`` exactly and its position is at least ``at_least`` (or the head,
        if that is lower: an id above the head is the caller's to judge). Raises BrokerUnavailable.

        What a resume on partitioned topics needs (:mod:`broker.redis.spread`): replaying up to the feed's position
        and going live from there is exact only once the feed is past the client's own position in this partition.
        One round per call at most: the head is read, sent round the feed, and its return awaited (shared by every
        caller waiting for the same or a lower head).
        """
        await self.position(topics)  # waits for a connecting feed; starts making fresh topics exact
        if self.position_now(topics) is not None and self._last_seen >= at_least:
            return
        head = await self._reads.head()
        if self._last_seen < head:
            future = next((f for target, f in self._rounds if target >= head and not f.done()), None)
            if future is None:
                future = asyncio.get_running_loop().create_future()
                self._rounds.append((head, future))
                await self._send_round(str(head))
            try:
                await asyncio.wait_for(asyncio.shield(future), 5)
            except TimeoutError:
                raise BrokerUnavailable("the redis feed did not bring its position round in time") from None
        if self.position_now(topics) is None:  # the feed reconnected meanwhile: its position is in flux
            raise BrokerUnavailable("the redis feed is reconnecting")

    async def resync(self, timeout: float = 10.0) -> None:
        """Reconnect the feed and backfill (:class:`broker.base.Resyncs`); BrokerUnavailable if not live in time."""
        if self._feed is None:
            return  # a producer's broker: no feed to rebuild
        if self._resynced is None or self._resynced.done():
            self._resynced = asyncio.get_running_loop().create_future()
            self._resync_asked = True
        try:
            await asyncio.wait_for(asyncio.shield(self._resynced), timeout)
        except TimeoutError:
            raise BrokerUnavailable("the redis feed did not come back after a resync") from None

    def _passed(self) -> None:
        """The position moved: release the rounds it passed (:meth:`reach`)."""
        last = self._last_seen
        kept = []
        for target, future in self._rounds:
            if target <= last:
                if not future.done():
                    future.set_result(None)
            else:
                kept.append((target, future))
        self._rounds = kept

    async def _echo_position(self, head: int) -> None:
        try:
            await self._send_round(str(head))
        except BrokerUnavailable:
            pass
        finally:
            self._echoing = False

    async def _send_round(self, head: str) -> None:
        """Publish ``head`` on this node's control channel: once it comes back, the feed has passed it."""
        redis = self._commands.redis
        send = redis.spublish if self._commands.cluster else redis.publish  # where publish.lua sends (sharded)
        await self._commands.call(functools.partial(send, self._control, head))

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

    # -- live feed -------------------------------------------------------------

    async def subscribe(self, topics: Collection[str]) -> None:
        self._commands.check_open()
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
        while not self._commands.closed:
            self._connecting = asyncio.get_running_loop().create_future()
            pubsub: Any = None
            try:
                pubsub = self._open_pubsub()
                await self._connect_feed(pubsub, resync)
                backoff = 0.05
                resync = True  # any later reconnect must backfill
                self._end_connecting()
                resynced = self._resynced
                if resynced is not None and not self._resync_asked and not resynced.done():
                    resynced.set_result(None)  # connected (and backfilled) since resync() asked
                await self._read_feed(pubsub)
            except Exception as exc:
                # Whatever went wrong, the feed must come back: a dead feed
                # would silently stop live delivery on this node.
                if not isinstance(exc, RedisError | OSError | BrokerUnavailable | TimeoutError):
                    log.exception("redis feed failed; reconnecting")
                elif self._feed_up.is_set():
                    log.warning("redis feed lost (%s); reconnecting", exc)
                self._feed_down()
                await refresh_topology(self._feed_redis)
            finally:
                self._end_connecting()
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError, RuntimeError):
                        await pubsub.aclose()
            if not self._commands.closed:
                await asyncio.sleep(backoff)
                # Short: a node should notice that Redis is back within a
                # fraction of a second, not after a long backoff.
                backoff = min(backoff * 2, 0.5)

    def _open_pubsub(self) -> Any:
        """The feed's connection: plain pub/sub on one Redis; on a cluster, a view on the node's shared sharded
        connection to the node serving this data set's slot."""
        if self._links is not None:
            return self._links.open(self._commands.keys[0])
        return self._feed_redis.pubsub()

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
        for _, future in self._rounds:
            if not future.done():
                future.set_exception(BrokerUnavailable("redis feed lost"))
                future.exception()  # retrieved here: a round nobody awaits any more must not be reported
        self._rounds = []
        # Every topic is backfilled from the feed's position when it is back.
        self._exact = set(self._topics)
        self._exact_at.clear()

    async def _connect_feed(self, pubsub: Any, resync: bool) -> None:
        """Subscribe everything wanted, backfill what the feed missed, then go live."""
        topics = tuple(self._topics)  # subscribe() waits while this runs, so this stays the set
        problem = await check_server(self._feed_redis)
        if problem is not None:
            # Redis was down when the node started, and came back unfit (a cluster node): refuse, say why once.
            if not self._told_unfit:
                log.error("%s", problem)
                self._told_unfit = True
            raise BrokerUnavailable(problem)
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
        self._commands.counters["feed_connects"] += 1
        # What the snapshot must hold, sampled *before* it is read: an event
        # this node publishes while the read is in flight may come after it,
        # and taking it for a lost one would skip it (the epoch would rise
        # above it: every client of this node missed that event).
        known = max(self._last_seen, self._publisher.last_published)
        # Everything up to the snapshot's head is now either backfilled or
        # irrelevant; live messages at or below it are duplicates.
        snapshot = await self._reads.read(topics, self._last_seen if resync else 0)
        if resync and snapshot.epoch == self._epoch and snapshot.head < known:
            # The new primary is behind what this node already delivered
            # or published: a failover lost those events. Mark the data
            # set so every resume from before them is reset, not holed.
            await self._mark_lost(known, snapshot.head)
            snapshot = await self._reads.read(topics, self._last_seen)
        if not resync:
            self._epoch = snapshot.epoch
        elif snapshot.epoch != self._epoch:
            # Redis lost its data: what the old data set had after our
            # position is gone, and everything in the new one is news (its ids
            # need not even be above the old ones, if the old clock ran ahead).
            self._epoch = snapshot.epoch
            snapshot = await self._reads.read(topics, snapshot.epoch)
            self._last_seen = snapshot.epoch
            if self._sink is not None and topics:
                self._sink.on_reset(Reset(ResetReason.LOST, topics))
        if resync and self._sink is not None:
            history = snapshot.judge(topics, self._last_seen)
            if history.reset is not None and history.reset.topics:
                self._sink.on_reset(history.reset)
            for event in history.events:
                self._sink.on_event(event)
            self._commands.counters["backfilled_events"] += len(history.events)
        self._last_seen = max(self._last_seen, snapshot.head)
        if self._rounds:
            self._passed()
        self._positioned = True
        self._exact = self._topics.intersection(topics)
        self._exact_at.clear()
        # Topics dropped while this connection was being made (unsubscribe had
        # no feed to tell) must not stay subscribed on it.
        stale = [self._channel_prefix + t for t in topics if t not in self._topics]
        if stale:
            await pubsub.unsubscribe(*stale)
        self._feed_up.set()

    async def _mark_lost(self, lost: int, head: int) -> None:
        self._commands.counters["lost_marked"] += 1
        log.error(
            "redis lost events up to id %d, its head is %d (a failover before replicas had them): resumes from"
            " before it get a reset",
            lost,
            head,
        )
        args: list[str | int] = [self._commands.prefix, lost, self._epoch_channel]
        keys = self._commands.history_keys(())  # the counter and the epoch
        await self._commands.call(lambda: self._commands.mark_lost_script(keys=keys, args=args))

    async def _read_feed(self, pubsub: Any) -> None:
        quiet_since = time.monotonic()
        pinged = False
        while not self._commands.closed:
            if self._resync_asked:
                self._resync_asked = False
                raise BrokerUnavailable("resynchronising: this node stood still")
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
                    head = await self._commands.call(
                        functools.partial(self._commands.redis.get, f"{self._commands.prefix}:id")
                    )
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
                if self._rounds:
                    self._passed()
                return
            try:
                raw_id, event_type, data = message["data"].split("|", 2)
                event_id = int(raw_id)
            except ValueError:
                # Not written by publish.lua: the stream, not this message, is
                # what counts, so skip it rather than stop the feed.
                self._commands.counters["bad_messages"] += 1
                log.warning("ignoring a malformed message on %s", channel)
                return
            if event_id <= self._last_seen:
                self._commands.counters["duplicates_dropped"] += 1
                return
            self._last_seen = event_id
            topic = channel[len(self._channel_prefix) :]
            if self._sink is not None and topic in self._topics:
                self._sink.on_event(Event(event_id, topic, data, event_type or None))
        elif kind == "subscribe":
            future = self._confirmations.pop(message["channel"], None)
            if future is not None and not future.done():
                future.set_result(None)
