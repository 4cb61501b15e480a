"""The node's Mercure side: one feed of the hub-wide update sequence in, each Mercure subscriber out.

Herald's :class:`~api.core.hub.Hub` routes events by exact topic. Every Mercure
update is one event on :data:`~api.mercure.updates.UPDATES_TOPIC`, so the hub
hands each of them to exactly one local "connection": this module's
:class:`_Tap`, which is not a client but the Mercure dispatcher. The tap
decodes the update once and offers its frame (encoded once) to every local
Mercure subscriber that wants it: a topic matches one of its matchers and,
for a private update, its token grants ``subscribe`` on one of the topics.

Mercure subscribers are ordinary hub connections without topics (the hub
never routes anything to them itself), so they get everything Herald's
connections get: the byte budget and cut-off, heartbeats, direct writes
from the hub's flush, the token deadline (``Hub.expire_at``), the drain.

Per update the cost is: subscribers with only exact matchers are found in
an index by topic (nothing is done for the others); subscribers with a
pattern (or ``*``) are grouped by their matchers, and each group is asked
once, its answer cached per distinct topic (10,000 clients of one pattern
cost one dictionary lookup, then one offer each); the private check is
cached per subscriber and topic the same way. A node with no Mercure
subscriber decodes nothing.

Resume: the subscriber is registered here (live updates held aside by its
connection) and the tap subscribed *before* the history is read, exactly as
:meth:`api.core.hub.Hub.open` does for native clients, so
:meth:`~api.core.connection.Connection.go_live` makes the hand-off exact.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from api.core.connection import Closed, Connection
from api.core.hub import Hub, Opened
from api.mercure.updates import EARLIEST, UPDATES_TOPIC, Update, hub_id, parse_hub_id, position_frame
from broker.base import Broker, Event, ResetReason

log = logging.getLogger("herald.mercure")

_RECENT_BYTES = 8 * 1024 * 1024
"""Decoded updates and their frames kept by Herald id, in bytes (replays of recent updates decode nothing)."""
_RECENT_COUNT = 65536
"""... and in number."""
_MATCH_CACHE = 4096
"""Topics whose answer a subscriber keeps (then the cache starts over)."""
UNKNOWN_ID = "unknown-id"
"""The reset reason counted (``herald_resets_total``) when a publisher's id is not among the retained updates."""
_TAP_BUFFER = 1 << 62
"""The tap queues nothing; its byte budget is never reached."""


class TopicMatchers(Protocol):
    """What this module needs of a matcher list (``api.mercure.matchers.Matchers``): equal lists hash alike."""

    def matches(self, topic: str) -> bool: ...

    def __hash__(self) -> int: ...


class _Group:
    """The subscribers routing with the same matchers (one pattern, many clients): asked once per update."""

    __slots__ = ("everything", "matchers", "members", "routes_cache")

    def __init__(self, matchers: TopicMatchers, everything: bool) -> None:
        self.matchers = matchers
        self.everything = everything
        self.members: set[Subscriber] = set()
        self.routes_cache: dict[str, bool] = {}

    def routes(self, topics: Iterable[str]) -> bool:
        if self.everything:
            return True
        return any(_cached(self.routes_cache, self.matchers, topic) for topic in topics)


class Subscriber:
    """One Mercure stream: its connection, what it routes (matchers) and what it may read (private updates).

    ``exact`` is the set of its topics when every matcher is an exact one
    (then it sits in the hub's index by topic); otherwise it belongs to the
    :class:`_Group` of every subscriber with the same matchers (``*``
    included), asked once per update for all of them.
    """

    __slots__ = ("_reads", "connection", "exact", "group", "reader")

    def __init__(
        self,
        connection: Connection,
        reader: TopicMatchers | None,
        exact: frozenset[str] | None,
        group: _Group | None,
    ) -> None:
        self.connection = connection
        self.reader = reader
        """The token's ``subscribe`` matchers (None: anonymous, or no subscribe right): who reads private updates."""
        self.exact = exact
        self.group = group
        self._reads: dict[str, bool] = {}

    def routes(self, topics: Iterable[str]) -> bool:
        """Does one of ``topics`` match one of the subscriber's matchers?"""
        if self.group is not None:
            return self.group.routes(topics)
        exact = self.exact
        return exact is not None and any(topic in exact for topic in topics)

    def may_read(self, topics: Iterable[str]) -> bool:
        """May the subscriber receive a private update of ``topics`` (its token grants one of them)?"""
        reader = self.reader
        return reader is not None and any(_cached(self._reads, reader, topic) for topic in topics)

    def wants(self, update: Update) -> bool:
        return self.routes(update.topics) and (not update.private or self.may_read(update.topics))


def _cached(cache: dict[str, bool], matchers: TopicMatchers, topic: str) -> bool:
    answer = cache.get(topic)
    if answer is None:
        answer = matchers.matches(topic)
        if len(cache) >= _MATCH_CACHE:
            cache.clear()
        cache[topic] = answer
    return answer


class _Record:
    """A decoded update of the sequence, and its SSE frame once one was needed (the same for every subscriber)."""

    __slots__ = ("_frame", "event_id", "size", "update")

    def __init__(self, event_id: int, update: Update, size: int) -> None:
        self.event_id = event_id
        self.update = update
        self.size = size
        """Bytes it holds, about: the decoded data, and the frame it may get."""
        self._frame: bytes | None = None

    @property
    def frame(self) -> bytes:
        frame = self._frame
        if frame is None:
            frame = self._frame = self.update.frame(self.event_id)
        return frame


@dataclass(slots=True)
class Resumed:
    """What a subscriber gets before live updates, and the ``Mercure-Last-Event-ID`` answer (None: fresh)."""

    opened: Opened
    last_event_id: str | None


class _Tap(Connection):
    """The hub's only connection to :data:`UPDATES_TOPIC`: hands each update to the dispatcher, queues nothing."""

    __slots__ = ("_dispatch", "_feed_reset")

    def __init__(self, dispatch: Callable[[int, bytes], None], feed_reset: Callable[[], None]) -> None:
        super().__init__((UPDATES_TOPIC,), _TAP_BUFFER)
        self._dispatch = dispatch
        self._feed_reset = feed_reset

    def offer(self, event_id: int, frame: bytes) -> None:
        self._dispatch(event_id, frame)

    def push(self, frame: bytes) -> None:
        # The hub pushes a ``reset`` here when the live feed lost updates it can't backfill.
        self._feed_reset()

    def heartbeat(self) -> None:
        pass


def data_of(event_id: int, frame: bytes) -> str:
    """The data of an event frame as :func:`api.core.sse.event_frame` writes one without a type.

    The update contract's JSON is one line (JSON escapes line breaks), so the
    frame is ``id: <id>\\ndata: <json>\\n\\n``.
    """
    prefix = b"id: %d\ndata: " % event_id
    if frame.startswith(prefix) and frame.endswith(b"\n\n"):
        return frame[len(prefix) : -2].decode()
    lines = frame.decode().split("\n")
    return "\n".join(line[6:] for line in lines if line.startswith("data: "))


class MercureHub:
    """The Mercure dispatcher of one node (one per app: ``app.state.mercure``)."""

    def __init__(self, hub: Hub, broker: Broker) -> None:
        self.hub = hub
        self.broker = broker
        self._subscribers: set[Subscriber] = set()
        self._by_topic: dict[str, set[Subscriber]] = {}  # subscribers with exact matchers only
        self._groups: dict[TopicMatchers, _Group] = {}  # the others, by their matchers
        self._recent: dict[int, _Record | None] = {}  # None: an event that is no update (skipped)
        self._recent_bytes = 0
        self._tap: _Tap | None = None
        self._tap_open = False
        self._tap_lock = asyncio.Lock()
        self.updates_in = 0
        self.skipped = 0  # events on the topic that were no update of the contract

    # -- subscribers -----------------------------------------------------------

    def admit(
        self,
        matchers: TopicMatchers,
        reader: TopicMatchers | None,
        *,
        exact: frozenset[str] | None,
        everything: bool,
        on_overflow: Callable[[], None] | None = None,
    ) -> Subscriber:
        """Register a new subscriber (pending: it gets nothing until opened). Raises ``api.core.hub.Refused``.

        ``exact``: its topics, when every matcher is an exact one; ``everything``: one is ``*``.
        """
        connection = self.hub.admit((), on_overflow)
        if exact is not None and not everything:
            subscriber = Subscriber(connection, reader, exact, None)
            for topic in exact:
                self._by_topic.setdefault(topic, set()).add(subscriber)
        else:
            group = self._groups.get(matchers)
            if group is None:
                group = self._groups[matchers] = _Group(matchers, everything)
            subscriber = Subscriber(connection, reader, None, group)
            group.members.add(subscriber)
        self._subscribers.add(subscriber)
        return subscriber

    def forget(self, subscriber: Subscriber) -> None:
        """Unregister a subscriber (its stream ended); its connection is the hub's to detach."""
        if subscriber not in self._subscribers:
            return
        self._subscribers.discard(subscriber)
        group = subscriber.group
        if group is not None:
            group.members.discard(subscriber)
            if not group.members:
                del self._groups[group.matchers]
        for topic in subscriber.exact or ():
            members = self._by_topic.get(topic)
            if members is not None:
                members.discard(subscriber)
                if not members:
                    del self._by_topic[topic]

    def detach(self, subscriber: Subscriber) -> None:
        """:meth:`forget` and the hub's detach: for a subscriber whose stream never started."""
        self.forget(subscriber)
        self.hub.detach(subscriber.connection)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # -- the feed ----------------------------------------------------------------

    async def _open_tap(self) -> None:
        """Have the broker feed this node the update sequence (once; kept for the node's life).

        Raises BrokerUnavailable (the next subscriber tries again).
        """
        if self._tap_open:
            return
        async with self._tap_lock:
            if self._tap_open:
                return
            if self._tap is None:
                self._tap = _Tap(self._dispatch, self._feed_lost)
                # The hub builds its connections itself (Hub.admit); the tap is one of
                # its own making, and not a client: no figure of the node counts it.
                self.hub.attach_internal(self._tap)
            await self.hub.open(self._tap, None)  # subscribes the broker to UPDATES_TOPIC
            self._tap_open = True

    def _record(self, event_id: int, data: str) -> _Record | None:
        """The update of an event of the sequence (None: not one), decoded once while recent."""
        recent = self._recent
        if event_id in recent:
            return recent[event_id]
        update = Update.decode(data)
        if update is None:
            self.skipped += 1
            recent[event_id] = None
            if len(recent) > _RECENT_COUNT:
                dropped = recent.pop(next(iter(recent)))
                if dropped is not None:
                    self._recent_bytes -= dropped.size
            return None
        record = recent[event_id] = _Record(event_id, update, 2 * len(data))
        self._recent_bytes += record.size
        while (self._recent_bytes > _RECENT_BYTES or len(recent) > _RECENT_COUNT) and len(recent) > 1:
            dropped = recent.pop(next(iter(recent)))
            if dropped is not None:
                self._recent_bytes -= dropped.size
        return record

    def _dispatch(self, event_id: int, frame: bytes) -> None:
        """A live update (called by the hub, in id order, never awaiting)."""
        self.updates_in += 1
        if not self._subscribers:
            return  # (nothing decoded: a replay decodes what it needs)
        record = self._record(event_id, data_of(event_id, frame))
        if record is None:
            return
        update = record.update
        topics = update.topics
        private = update.private
        by_topic = self._by_topic
        if by_topic:
            if len(topics) == 1:
                exact: Iterable[Subscriber] = by_topic.get(topics[0], ())
            else:
                exact = {s for topic in topics for s in by_topic.get(topic, ())}
            for subscriber in exact:
                if private and not subscriber.may_read(topics):
                    continue
                subscriber.connection.offer(event_id, record.frame)
        for group in self._groups.values():
            if group.routes(topics):
                for subscriber in group.members:
                    if private and not subscriber.may_read(topics):
                        continue
                    subscriber.connection.offer(event_id, record.frame)

    def _feed_lost(self) -> None:
        """The live feed lost updates it can't backfill: every subscriber reconnects and resumes.

        Mercure has no ``reset`` event; a reconnect with ``Last-Event-ID``
        answers with ``Mercure-Last-Event-ID``, which tells the client whether
        its resume was exact.
        """
        log.warning("the live feed lost Mercure updates; %d subscribers reconnect", len(self._subscribers))
        for subscriber in list(self._subscribers):
            subscriber.connection.close(Closed.SHUTDOWN)

    # -- opening a stream ------------------------------------------------------

    async def open(self, subscriber: Subscriber, cursor: str | None) -> Resumed:
        """What an admitted subscriber gets before live updates; raises BrokerUnavailable.

        ``cursor`` (``Last-Event-ID``) None or empty starts now; ``#<n>`` resumes after Herald id ``n``
        (exact unless the updates after it are no longer retained);
        ``earliest`` asks for every retained update; any other value is a
        publisher-supplied id, looked up among the retained updates (the
        earliest carrying it). A cursor that can't be resumed exactly replays
        every retained update and answers ``earliest``.
        """
        await self._open_tap()
        connection = subscriber.connection
        if not cursor:
            # No cursor; or an empty one, which names no update: the stream starts now, and
            # ``Mercure-Last-Event-ID`` (owed whenever a cursor was sent) is where "now" is.
            position = await self.broker.position((UPDATES_TOPIC,))
            opened = Opened(connection, [position_frame(position)], position, fresh=False)
            return Resumed(opened, None if cursor is None else hub_id(position))
        after = parse_hub_id(cursor)
        answer = cursor
        events: list[Event]
        if after is not None:
            history = await self.broker.history((UPDATES_TOPIC,), after)
            head, events = history.head, history.events
            if history.reset is not None:
                answer = EARLIEST
                self.hub.count_reset(history.reset.reason)  # Mercure's reset: Mercure-Last-Event-ID: earliest
                if history.reset.reason == ResetReason.INVALID_ID:  # from the future: nothing to go on
                    history = await self.broker.history((UPDATES_TOPIC,), 0)
                    head, events = history.head, history.events
        else:
            history = await self.broker.history((UPDATES_TOPIC,), 0)
            head, events = history.head, history.events
            if cursor == EARLIEST:
                answer = EARLIEST
            else:
                found = next((i for i, e in enumerate(events) if self._carries(e, cursor)), None)
                if found is None:
                    answer = EARLIEST
                    self.hub.count_reset(UNKNOWN_ID)
                else:
                    events = events[found + 1 :]
        frames: list[bytes] = []
        for event in events:
            record = self._record(event.id, event.data)
            if record is not None and subscriber.wants(record.update):
                frames.append(record.frame)
        replayed = len(frames)
        if not frames:
            frames.append(position_frame(head))
        return Resumed(Opened(connection, frames, head, fresh=False, replayed=replayed), answer)

    def _carries(self, event: Event, update_id: str) -> bool:
        record = self._record(event.id, event.data)
        return record is not None and record.update.id == update_id

    def stats(self) -> dict[str, int]:
        return {
            "mercure_subscribers": len(self._subscribers),
            "mercure_updates_in": self.updates_in,
            "mercure_skipped": self.skipped,
        }
