"""The Mercure hub's topic space: the hub-wide update sequence in, deliveries of Mercure topics out.

Every Mercure update is one event on the broker topic
:data:`~api.mercure.updates.UPDATES_TOPIC` (:mod:`api.mercure.updates`). The
node's :class:`~api.core.hub.Hub` is fed that topic like any other; this
space tells it what its events are (:meth:`MercureSpace.decode`: the update
decoded once, its frame encoded once, its own topics and privacy) and keeps
the index of Mercure subscriptions (:class:`~api.core.routing.Index`: exact
matchers by topic, patterns grouped by matcher list). The fan-out, the byte
budget and cut-off, heartbeats, direct writes, the token deadline and the
drain are the hub's, the same for every subscriber of every space.

Resume (:meth:`MercureSpace.open`) follows Mercure's cursors: ``#<n>`` is a
position in the sequence, ``earliest`` every retained update, any other
value a publisher's id looked up among the retained updates. The hub
registers the subscriber and subscribes the feed *before* this reads the
history, as for native clients, so
:meth:`~api.core.connection.Connection.go_live` makes the hand-off exact.
"""

from __future__ import annotations

import logging

from api.core.connection import Closed, Connection
from api.core.hub import Hub, Opened
from api.core.routing import Delivery, Index
from api.mercure.sequence import FeedSequence
from api.mercure.updates import EARLIEST, UPDATES_TOPIC, Update, hub_id, parse_hub_id, position_frame
from broker.base import Broker, Event, ResetReason

log = logging.getLogger("herald.mercure")

UNKNOWN_ID = "unknown-id"
"""The reset reason counted (``herald_resets_total``) when a publisher's id is not among the retained updates."""


class MercureSpace:
    """The Mercure space of one node (:class:`api.core.hub.Space`), made once per app: :func:`space_of`."""

    feed = UPDATES_TOPIC

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.sequence = FeedSequence(broker, UPDATES_TOPIC)
        self.index = Index()
        self.skipped = 0  # events of the feed that were no update of the contract

    def decode(self, event: Event) -> Delivery | None:
        update = Update.decode(event.data)
        if update is None:
            self.skipped += 1
            return None
        return Delivery(update.topics, update.frame(self.sequence.of(event)), update.private, update)

    def lost(self, connections: set[Connection]) -> None:
        """Every subscriber reconnects and resumes: Mercure has no ``reset`` event.

        A reconnect with ``Last-Event-ID`` answers ``Mercure-Last-Event-ID``,
        which tells the client whether its resume was exact.
        """
        log.warning("the live feed lost Mercure updates; %d subscribers reconnect", len(connections))
        for connection in connections:
            connection.close(Closed.SHUTDOWN)

    async def open(self, hub: Hub, connection: Connection, cursor: str | None) -> Opened:
        """What an admitted subscriber gets before live updates; raises BrokerUnavailable.

        ``cursor`` (``Last-Event-ID``) None or empty starts now; ``#<n>`` resumes after Herald id ``n``
        (exact unless the updates after it are no longer retained);
        ``earliest`` asks for every retained update; any other value is a
        publisher-supplied id, looked up among the retained updates (the
        earliest carrying it). A cursor that can't be resumed exactly replays
        every retained update and answers ``earliest``. The answer
        (``Mercure-Last-Event-ID``, owed whenever a cursor was sent) is in
        the opening's ``headers``.
        """
        sequence = self.sequence
        if not cursor:
            # No cursor; or an empty one, which names no update: the stream starts now, and
            # ``Mercure-Last-Event-ID`` is where "now" is.
            position, now = await sequence.position()
            opened = Opened(connection, [position_frame(now)], position, fresh=False)
            if cursor is not None:
                opened.headers.append(_answer(hub_id(now)))
            return opened
        after = parse_hub_id(cursor)
        answer = cursor
        events: list[Event]
        if after is not None:
            history, head_number = await sequence.history(after)
            if history.reset is not None:
                answer = EARLIEST
                hub.count_reset(history.reset.reason)  # Mercure's reset: Mercure-Last-Event-ID: earliest
                if history.reset.reason == ResetReason.INVALID_ID:  # from the future: nothing to go on
                    history, head_number = await sequence.history(0)
        else:
            history, head_number = await sequence.history(0)
        head, events = history.head, history.events
        if after is None:
            if cursor == EARLIEST:
                answer = EARLIEST
            else:
                found = next((i for i, e in enumerate(events) if self._carries(hub, e, cursor)), None)
                if found is None:
                    answer = EARLIEST
                    hub.count_reset(UNKNOWN_ID)
                else:
                    events = events[found + 1 :]
        selection = connection.selection
        frames: list[bytes] = []
        for event in events:
            delivery = self._delivery(hub, event)
            if delivery is not None and selection is not None and selection.can_receive(delivery):
                frames.append(delivery.frame)
        replayed = len(frames)
        if not frames:
            frames.append(position_frame(head_number))
        return Opened(connection, frames, head, fresh=False, replayed=replayed, headers=[_answer(answer)])

    def _delivery(self, hub: Hub, event: Event) -> Delivery | None:
        """A replayed event's delivery: from the hub's cache, unless replays are numbered apart from it."""
        return self.decode(event) if self.sequence.numbered_apart else hub.delivery(event, self)

    def _carries(self, hub: Hub, event: Event, update_id: str) -> bool:
        delivery = self._delivery(hub, event)
        return delivery is not None and isinstance(delivery.payload, Update) and delivery.payload.id == update_id

    @property
    def subscribers(self) -> int:
        return len(self.index.connections())


def _answer(cursor: str) -> tuple[bytes, bytes]:
    return (b"mercure-last-event-id", cursor.encode())


def space_of(hub: Hub, broker: Broker) -> MercureSpace:
    """The hub's Mercure space, added on first use."""
    space = hub.space(UPDATES_TOPIC)
    if not isinstance(space, MercureSpace):
        space = MercureSpace(broker)
        hub.add_space(space)
    return space
