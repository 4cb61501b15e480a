"""The node's fan-out hub: one broker feed in, every local SSE client out.

The hub is the broker's :class:`~broker.base.EventSink`. It keeps, per topic,
the set of local connections that want it, and subscribes the broker to
exactly the topics that have at least one local client (so a node costs the
broker one feed, however many clients it serves).

Per event the hub encodes the SSE frame once and hands the same bytes to each
interested connection without awaiting anything (see
:mod:`api.core.connection`). Events arrive from the broker in id order, so every
connection's queue is in id order too, merged across its topics.

Who is interested is one question for every kind of subscription
(:mod:`api.core.routing`): an index of selectors per *topic space*. The
native API's space is the broker's topics themselves; another space (the
Mercure hub's, :mod:`api.mercure.space`) is fed by one broker topic whose
events it decodes into deliveries of its own topics. Every event, of any
space, goes through the same :meth:`Hub.on_event` and
:meth:`~api.core.routing.Index.fan_out`; every connection is admitted,
opened, expired, heartbeated and drained by the same code.

Live connections that can be written to directly are written by the hub
itself (:mod:`api.core.flusher`): everything queued since a client's last write
(a published batch, a burst from the Redis feed, or under load whatever
arrived meanwhile) leaves as one write, with no task woken per client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from api.core.connection import Closed, Connection
from api.core.flusher import Flusher
from api.core.metrics import LatencyWindow, Metrics, NullMetrics
from api.core.routing import ENTRY_BYTES, Delivery, Index, Selection
from api.core.sse import event_frame, reset_frame
from broker.base import Broker, BrokerUnavailable, Cursors, Event, PositionNow, Reset, ResetReason, SubscribeNow

log = logging.getLogger("herald.hub")

_EVENT_ID = re.compile(r"[0-9]{1,19}")
"""What an id this deployment issues looks like (decimal, fits in 64 bits)."""


def parse_event_id(text: str) -> int | None:
    """The id a client resumes from, or None when it is not one Herald could issue."""
    return int(text) if _EVENT_ID.fullmatch(text) else None


def _with_itself(
    position_now: Callable[[Collection[str]], int | None], topics: Collection[str]
) -> tuple[int, int] | None:
    """A broker's ``position_now`` as :meth:`Hub.open_now` takes it: the position, and what the client is told."""
    position = position_now(topics)
    return None if position is None else (position, position)


class Refused(Exception):
    """The node can't take a new stream now (draining, or at its connection limit); the client should retry."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        """``draining`` or ``full``."""


@dataclass(slots=True)
class Opened:
    """A connection ready to stream: what to send before going live, and where it ends.

    ``frames`` are sent in order (a ``reset`` first when there is one, then
    the replayed events); after them the stream is at ``position``, and
    :meth:`Connection.go_live` takes over from there. ``fresh`` is true when
    the client did not resume (its first bytes should tell it its position).
    """

    connection: Connection
    frames: list[bytes]
    position: int
    fresh: bool
    replayed: int = 0
    """How many of ``frames`` are replayed events (the others: a ``reset``)."""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    """Response headers the space's protocol owes for this opening (Mercure's ``Mercure-Last-Event-ID``)."""
    cursor: str | None = None
    """The id the client is told for ``position`` when it is not ``position`` itself (a broker with Cursors)."""

    @property
    def marker(self) -> int | str:
        """What the client's ``id:`` is at ``position``."""
        return self.position if self.cursor is None else self.cursor


class Space(Protocol):
    """A topic space fed by one broker topic (:attr:`feed`) whose events carry topics of their own.

    The space decodes the feed's events into deliveries (:meth:`decode`),
    keeps the :class:`~api.core.routing.Index` of its connections (the hub
    fans out through it as through its own), and opens a connection's stream
    with its protocol's cursors (:meth:`open`). The native API needs none of
    this: its topics are the broker's.
    """

    feed: str
    index: Index

    def decode(self, event: Event) -> Delivery | None:
        """The delivery an event of the feed becomes; None: it is none of the space's (skipped)."""

    async def open(self, hub: Hub, connection: Connection, cursor: str | None) -> Opened:
        """What an admitted connection gets before live events (raises BrokerUnavailable)."""

    def lost(self, connections: set[Connection]) -> None:
        """The live feed lost events it can't backfill: tell ``connections`` (the space's own)."""


class Hub:
    """Fan-out of broker events to this node's SSE connections."""

    def __init__(
        self,
        broker: Broker,
        *,
        client_buffer: int,
        heartbeat: float,
        frame_cache_bytes: int = 8 * 1024 * 1024,
        max_connections: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self._broker = broker
        # What lets open_now open a fresh stream in one step (api.adapter.lane), when the broker answers at once.
        # What the client is told at a position, answered at once: the position itself, or its cursor text (a
        # broker whose clients hold cursors: topics over partitions).
        self._cursors = broker if isinstance(broker, Cursors) else None
        self._position_now: Callable[[Collection[str]], tuple[int, int | str] | None] | None = None
        if self._cursors is not None:
            self._position_now = self._cursors.position_cursor_now
        elif isinstance(broker, PositionNow):
            self._position_now = functools.partial(_with_itself, broker.position_now)
        self._subscribe_now = broker.subscribe_now if isinstance(broker, SubscribeNow) else None
        # Counted per write and per flush, read when Prometheus scrapes (api.core.metrics).
        self.metrics: Metrics = metrics if metrics is not None else NullMetrics()
        self.tally = self.metrics.tally
        self._latency = LatencyWindow()
        self.topic_events: dict[str, int] = {}  # events per topic with local clients (the dashboard's busiest)
        self.resets: dict[str, int] = {}  # reset events sent to clients, by reason
        self._max_connections = max_connections
        # Set while the broker answers; streams waiting for it wait on this
        # (one probe for all of them, not one retry loop per client).
        self._broker_up = asyncio.Event()
        self._broker_up.set()
        self._probe: asyncio.Task[None] | None = None
        self._client_buffer = client_buffer
        self._heartbeat = heartbeat
        self._native = Index()  # the native API's space: connections by the broker topics they want
        self._by_topic = self._native.by_topic  # (the same dict: its topics are the broker's)
        self._spaces: dict[str, Space] = {}  # the other spaces, by the broker topic that feeds them
        self._feeds: set[str] = set()  # their feeds, wanted from their first open on, for the node's life
        self._connections: set[Connection] = set()
        self._subscribed: set[str] = set()
        self._sub_lock = asyncio.Lock()
        # The most recent deliveries, for replays (a reconnect storm replays the
        # same recent events to many clients): bounded in bytes, oldest out.
        self._deliveries: dict[int, Delivery | None] = {}
        self._deliveries_size = 0
        self._frame_cache_bytes = frame_cache_bytes
        self._tasks: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._draining = False
        # Writes what is queued to the clients' sockets (when, and in slices: api.core.flusher).
        self._flusher = Flusher(lambda: self.events_in, self._latency, self.metrics)
        self._expiring: dict[float, set[Connection]] = {}  # streams by their token's exp (see expire_at)
        self.events_in = 0
        self.cutoffs = 0
        self.expired = 0  # streams ended because their token expired
        self.connections_total = 0
        self.refused = {"draining": 0, "full": 0}  # streams told to retry instead of served
        self.waited_for_broker = 0  # streams that had to wait for the broker before they could start

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_forever(), name="herald-heartbeat")

    def drain(self) -> None:
        """Shutdown: refuse new connections and end every open stream now."""
        self._draining = True
        for connection in list(self._connections):
            connection.close(Closed.SHUTDOWN)

    async def close(self) -> None:
        self.drain()
        tasks = [t for t in (self._ticker, self._probe, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- EventSink -------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        self.events_in += 1
        space = self._spaces.get(event.topic)
        index = self._native if space is None else space.index
        if space is not None and not (index.by_topic or index.groups):
            return  # a space with no connection decodes nothing (a replay decodes what it needs)
        delivery = self.delivery(event, space)
        if delivery is not None and index.fan_out(event.id, delivery):
            topic_events = self.topic_events
            topic_events[event.topic] = topic_events.get(event.topic, 0) + 1
            self._latency.add(event.id)

    def on_reset(self, reset: Reset) -> None:
        lost = set(reset.topics)
        for feed in lost & self._spaces.keys():
            space = self._spaces[feed]
            self.count_reset(reset.reason)  # the space's one reset (its clients are told in its own way)
            space.lost(space.index.connections())
        by_topic = self._native.by_topic
        for connection in {c for topic in lost for c in by_topic.get(topic, ())}:  # the native clients of them
            topics = tuple(t for t in connection.topics if t in lost)
            connection.push(reset_frame(reset.reason, topics, None))
            self.resets[reset.reason] = self.resets.get(reset.reason, 0) + 1
            if reset.reason == ResetReason.LOST:
                # A new data set: its ids need not be above the old ones.
                connection.last_id = 0

    # -- connections -----------------------------------------------------------

    def delivery(self, event: Event, space: Space | None = None) -> Delivery | None:
        """What ``event`` (of ``space``'s feed; None: a native topic) is delivered as, decoded once.

        Kept by id while the cache's byte budget allows: live fan-out and the
        replays of a reconnect storm share one encoding per event.
        """
        deliveries = self._deliveries
        if event.id in deliveries:
            return deliveries[event.id]
        if space is None:
            marker = event.id if event.cursor is None else event.cursor
            delivery: Delivery | None = Delivery((event.topic,), event_frame(marker, event.data, event.type))
        else:
            delivery = space.decode(event)
        deliveries[event.id] = delivery
        self._deliveries_size += delivery.size if delivery is not None else ENTRY_BYTES
        while self._deliveries_size > self._frame_cache_bytes and len(deliveries) > 1:
            dropped = deliveries.pop(next(iter(deliveries)))
            self._deliveries_size -= dropped.size if dropped is not None else ENTRY_BYTES
        return delivery

    def _remember(self, event: Event) -> bytes:
        """A native event's frame (:meth:`delivery`)."""
        delivery = self.delivery(event)
        assert delivery is not None
        return delivery.frame

    def add_space(self, space: Space) -> None:
        """Serve another topic space, fed by the broker topic ``space.feed`` (:class:`Space`)."""
        self._spaces[space.feed] = space

    def space(self, feed: str) -> Space | None:
        """The space fed by the broker topic ``feed``, if the hub serves one."""
        return self._spaces.get(feed)

    def _refusal(self) -> Refused | None:
        """Why a new stream can't be taken now (None: it can): the node's one admission rule."""
        if self._draining:
            return Refused("this node is shutting down", "draining")
        if self._max_connections and len(self._connections) >= self._max_connections:
            return Refused(f"this node serves its limit of {self._max_connections} streams", "full")
        return None

    def admit(
        self,
        topics: Sequence[str],
        on_overflow: Callable[[], None] | None = None,
        *,
        selection: Selection | None = None,
    ) -> Connection:
        """Register a new client of ``topics`` (pending: it gets nothing until :meth:`open`).

        ``selection``: the selectors of a subscription of another space than
        the native API's (``topics`` then empty), with its feed in ``space``.
        Raises :class:`Refused` when the node is draining or at its connection
        limit: passing causes, so the client is told to come back, not failed.
        """
        refusal = self._refusal()
        if refusal is not None:
            self.refused[refusal.reason] += 1
            raise refusal
        return self._admitted(tuple(topics), on_overflow, selection)

    def _admitted(
        self, topics: tuple[str, ...], on_overflow: Callable[[], None] | None, selection: Selection | None
    ) -> Connection:
        """A connection :meth:`_refusal` has just let in, made and registered (every stream is made here)."""
        connection = Connection(topics, self._client_buffer, on_overflow, self._flusher.mark, self.tally)
        if selection is not None:
            connection.selection = selection
            self._spaces[selection.space].index.add(connection)
        else:
            self._native.add(connection)
        self._connections.add(connection)
        return connection

    def expire_at(self, connection: Connection, deadline: float) -> None:
        """End ``connection`` (:attr:`Closed.EXPIRED`) at ``deadline`` (seconds since the epoch), its token's ``exp``.

        Connections are grouped by deadline, one timer per group: a token's
        ``exp`` is a whole second, and a connect storm carries a few tokens,
        so thousands of streams cost a timer or a few, not one timer handle each
        held for the stream's life.
        """
        connection.expires_at = deadline
        group = self._expiring.get(deadline)
        if group is None:
            group = self._expiring[deadline] = set()
            delay = max(0.0, deadline - time.time())
            asyncio.get_running_loop().call_later(delay, self._expire, deadline)
        group.add(connection)

    def _expire(self, deadline: float) -> None:
        for connection in self._expiring.pop(deadline, ()):
            connection.close(Closed.EXPIRED)

    async def open(self, connection: Connection, last_event_id: str | None) -> Opened:
        """Work out what an admitted client gets before live events.

        The order is what makes resume exact: the connection is registered
        and the broker subscribed *before* history is read, so every event is
        either in the history (id up to ``head``) or arrives live afterwards,
        and :meth:`Connection.go_live` drops the overlap.

        Raises BrokerUnavailable; the connection stays registered (live events
        keep being held aside for it), so the caller may call again once the
        broker is back (:meth:`wait_for_broker`) or :meth:`detach` it.
        """
        space = self._space_of(connection)
        feeds: tuple[str, ...] = connection.topics if space is None else (space.feed,)
        try:
            if space is not None:
                self._feeds.add(space.feed)
            # Most clients join topics the broker already feeds: then there is
            # nothing to reconcile, and no reason to queue on the lock (nor to
            # walk every topic of the node) per connect. With the lock free no
            # unsubscribe is under way, and any later one sees this client.
            if self._sub_lock.locked() or not self._subscribed.issuperset(feeds):
                await self._reconcile()
            if space is None:
                opened = await self._open(connection, last_event_id)
            else:
                opened = await space.open(self, connection, last_event_id)
        except BrokerUnavailable as exc:
            if self._broker_up.is_set():
                log.warning("broker unavailable: %s; new streams wait for it", exc)
            self._broker_up.clear()
            raise
        self.connections_total += 1
        return opened

    def _space_of(self, connection: Connection) -> Space | None:
        """The space a connection subscribes in (None: the native API's)."""
        selection = connection.selection
        return None if selection is None else self._spaces[selection.space]

    def open_now(
        self, topics: tuple[str, ...], on_overflow: Callable[[], None] | None = None
    ) -> tuple[Connection, int, int | str] | None:
        """:meth:`admit` and :meth:`open` of a fresh stream (no resume) in one step, when nothing needs awaiting.

        That is when the node is taking streams, the broker is up, no change
        of the feed's topics is under way, the broker can add the topics the
        feed lacks at once (:class:`~broker.base.SubscribeNow`, as
        :meth:`_reconcile` would add them: with the lock free none is running,
        and one that starts later sees this client), and it answers the
        position at once (:class:`~broker.base.PositionNow`, or a broker's
        :meth:`~broker.base.Cursors.position_cursor_now`: then the third
        element, what the client is told, is the position's cursor). The client is
        then registered and live from the returned position: nothing is held
        aside, since nothing can run between the two steps. Otherwise None,
        and no client is registered or counted: the caller takes the usual
        way (:meth:`admit`, then :meth:`open`), which also answers the refusals.
        """
        position_now = self._position_now
        if (
            position_now is None
            or self._sub_lock.locked()
            or not self._broker_up.is_set()
            or self._refusal() is not None  # refused the usual way, which counts and answers it
        ):
            return None
        try:
            if not self._subscribed.issuperset(topics):
                if self._subscribe_now is None:
                    return None
                added = [t for t in topics if t not in self._subscribed]
                self._subscribe_now(added)
                self._subscribed.update(added)
            answer = position_now(topics)
        except BrokerUnavailable:
            return None
        if answer is None:
            return None
        connection = self._admitted(topics, on_overflow, None)  # _refusal said yes above, and nothing ran since
        self.connections_total += 1
        return connection, *answer

    async def connect(
        self,
        topics: Sequence[str],
        last_event_id: str | None,
        on_overflow: Callable[[], None] | None = None,
    ) -> Opened:
        """:meth:`admit` and :meth:`open` in one; nothing stays registered when it raises."""
        connection = self.admit(topics, on_overflow)
        try:
            return await self.open(connection, last_event_id)
        except BaseException:
            self.detach(connection)
            raise

    async def wait_for_broker(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until the broker answers again; whether it does.

        One probe task pings the broker for every waiting stream, so an
        outage with thousands of clients waiting costs a ping every quarter
        of a second, not one failing call per client.
        """
        if self._broker_up.is_set():
            return True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_broker(), name="herald-broker-probe")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._broker_up.wait(), timeout)
        return self._broker_up.is_set()

    async def _probe_broker(self) -> None:
        while not self._broker_up.is_set():
            try:
                if await self._broker.ping():
                    self._broker_up.set()
                    log.info("broker available again")
                    return
            except BrokerUnavailable:
                pass
            await asyncio.sleep(0.25)

    async def _open(self, connection: Connection, last_event_id: str | None) -> Opened:
        if self._cursors is not None:
            return await self._open_at_cursor(self._cursors, connection, last_event_id)
        topics = connection.topics
        if last_event_id is None:
            position = await self._broker.position(topics)
            return Opened(connection, [], position, fresh=True)
        after = parse_event_id(last_event_id)
        if after is None:
            position = await self._broker.position(topics)
            self.count_reset(ResetReason.INVALID_ID)
            return Opened(connection, [reset_frame(ResetReason.INVALID_ID, topics, position)], position, fresh=False)
        history = await self._broker.history(topics, after)
        frames: list[bytes] = []
        if history.reset is not None:
            marker = None if history.events else history.head
            frames.append(reset_frame(history.reset.reason, history.reset.topics, marker))
            self.count_reset(history.reset.reason)
        # Clients resuming together replay the same events: encode each once.
        frames.extend(self._remember(event) for event in history.events)
        return Opened(connection, frames, history.head, fresh=False, replayed=len(history.events))

    async def _open_at_cursor(self, cursors: Cursors, connection: Connection, last_event_id: str | None) -> Opened:
        """:meth:`_open` with a broker whose clients hold cursors (:class:`~broker.base.Cursors`).

        Replayed frames carry each client's own cursor (where its replay has got to, in every partition), so
        they are made per stream, not taken from the frame cache; live frames stay shared.
        """
        topics = connection.topics
        if last_event_id is not None:
            answer = await cursors.history_from(topics, last_event_id)
            if answer is not None:
                history, cursor = answer
                frames: list[bytes] = []
                if history.reset is not None:
                    frames.append(
                        reset_frame(history.reset.reason, history.reset.topics, None if history.events else cursor)
                    )
                    self.count_reset(history.reset.reason)
                frames.extend(event_frame(e.cursor, e.data, e.type) for e in history.events)
                return Opened(
                    connection, frames, history.head, fresh=False, replayed=len(history.events), cursor=cursor
                )
        position, cursor = await cursors.position_cursor(topics)
        if last_event_id is None:
            return Opened(connection, [], position, fresh=True, cursor=cursor)
        self.count_reset(ResetReason.INVALID_ID)
        frames = [reset_frame(ResetReason.INVALID_ID, topics, cursor)]
        return Opened(connection, frames, position, fresh=False, cursor=cursor)

    def count_reset(self, reason: str) -> None:
        """A client was told its resume can't be exact, for ``reason`` (``herald_resets_total``)."""
        self.resets[reason] = self.resets.get(reason, 0) + 1

    def detach(self, connection: Connection) -> None:
        """Forget a connection; topics left without clients are unsubscribed soon after."""
        if connection not in self._connections:
            return
        self._connections.discard(connection)
        if connection.expires_at:
            group = self._expiring.get(connection.expires_at)
            if group is not None:
                group.discard(connection)
        if connection.closed is Closed.OVERFLOW:
            self.cutoffs += 1
        elif connection.closed is Closed.EXPIRED:
            self.expired += 1
        space = self._space_of(connection)
        if space is not None:
            space.index.remove(connection)
            return  # its feed stays wanted (Hub.open)
        orphaned = self._native.remove(connection)
        for topic in orphaned:
            self.topic_events.pop(topic, None)
        if orphaned and not self._draining:
            task = asyncio.create_task(self._reconcile_quietly())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _reconcile(self) -> None:
        """Bring the broker's subscriptions in line with the topics local clients want.

        Serialised by a lock and computed from the state at the time of each
        broker call, so concurrent joins and leaves can't leave the broker
        subscribed to the wrong set.
        """
        async with self._sub_lock:
            wanted = self._by_topic.keys() | self._feeds
            added = [t for t in wanted if t not in self._subscribed]
            if added:
                await self._broker.subscribe(added)
                self._subscribed.update(added)
            removed = [t for t in self._subscribed if t not in wanted]
            if removed:
                await self._broker.unsubscribe(removed)
                self._subscribed.difference_update(removed)

    async def _reconcile_quietly(self) -> None:
        try:
            await self._reconcile()
        except BrokerUnavailable:
            log.warning("could not unsubscribe idle topics; will retry on the next change")

    # -- heartbeats ------------------------------------------------------------

    async def _tick_forever(self) -> None:
        # A connection gets a comment when nothing was queued for it during a
        # whole tick, so an idle stream is never silent for two ticks.
        period = self._heartbeat / 2
        cutoffs = self.cutoffs
        while True:
            await asyncio.sleep(period)
            for connection in list(self._connections):
                connection.heartbeat()
            if self.cutoffs > cutoffs:  # one line per tick, however many were cut off
                log.warning(
                    "cut off %d slow clients (over %d bytes behind; %d in all)",
                    self.cutoffs - cutoffs,
                    self._client_buffer,
                    self.cutoffs,
                    extra={"cutoffs": self.cutoffs - cutoffs, "cutoffs_total": self.cutoffs},
                )
                cutoffs = self.cutoffs

    # -- introspection ---------------------------------------------------------

    def busiest(self, count: int = 10) -> list[dict[str, object]]:
        """The topics with the most local subscribers and those with the most events (up to ``count`` each)."""
        by_subscribers = heapq.nlargest(count, self._by_topic, key=lambda t: len(self._by_topic[t]))
        by_events = heapq.nlargest(count, self.topic_events, key=self.topic_events.__getitem__)
        events = self.topic_events
        return [
            {"topic": topic, "subscribers": len(self._by_topic.get(topic, ())), "events": events.get(topic, 0)}
            for topic in dict.fromkeys([*by_subscribers, *by_events])
        ]

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def broker_up(self) -> bool:
        return self._broker_up.is_set()

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self._connections),
            "connections_total": self.connections_total,
            "topics": len(self._by_topic),
            "topics_subscribed": len(self._subscribed),
            "events_in": self.events_in,
            "cutoffs": self.cutoffs,
            "expired": self.expired,
            "resets": sum(self.resets.values()),
            "deliveries": self.tally.events,
            "replayed": self.tally.replayed,
            "bytes_sent": self.tally.bytes,
            "direct_writes": self._flusher.writes,
            "pending_tasks": len(self._tasks),
            "refused_draining": self.refused["draining"],
            "refused_full": self.refused["full"],
            "waited_for_broker": self.waited_for_broker,
        }
