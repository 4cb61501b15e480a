"""The broker contract: what every Herald broker guarantees, and the value types it trades in.

This module holds only the contract. Implementations live beside it
(:mod:`broker.memory` for a single node, the Redis broker for a cluster) and
are all held to the same test suite (``tests/broker/test_broker_contract.py``).

Model
-----
A broker owns three things for a deployment:

* the **id counter**: every published event gets an integer id, strictly
  increasing across all topics of the deployment and never reused. Ids are
  seeded from the wall clock in microseconds (``next = max(last + 1,
  now_us)``), so they keep increasing across a restart of whatever holds the
  counter, and an id is never smaller than its publish time in microseconds.
  That last property lets retention by age trim by id.
* the **replay buffer**: per topic, the last ``replay_size`` events, none
  replayed past ``replay_ttl`` seconds and none dropped for age before it. It
  is the source of truth for resume. (The Redis broker may hold older entries
  a while longer, until a size trim or its stream's expiry; they are never
  replayed.)
* the **live feed** to one node: the node subscribes to the topics its
  clients want, and the broker calls the node's :class:`EventSink` with every
  event published on them, in id order, each exactly once.

Publishing an event is atomic: the id is taken, the event is appended to the
replay buffer and handed to the live feed in one step, so an event is either
fully published (it has an id, is retained and delivered) or not at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Clock = Callable[[], float]
"""Seconds since the epoch, like :func:`time.time`; injectable for tests."""


class BrokerUnavailable(Exception):
    """The broker cannot be reached right now; the caller may retry later.

    Raised by publish, subscribe, head and history. Nothing was published when
    publish raises it.
    """


class BrokerMisconfigured(Exception):
    """The broker's target can't serve Herald as configured: not a passing fault, so the node must not start.

    Raised by ``start`` (for example, ``REDIS_URL`` names a Redis Cluster node).
    """


class IdempotencyConflict(Exception):
    """An idempotency key already published a different number of events."""


@dataclass(frozen=True, slots=True)
class Message:
    """An event as a producer hands it in, before it has an id.

    ``data`` is the payload exactly as it will be sent (already encoded: a
    producer's JSON string as is, any other JSON value as compact JSON).
    ``type`` is the SSE event type, or None for the default ``message``.
    """

    topic: str
    data: str
    type: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """A published event: a :class:`Message` with its deployment-wide id."""

    id: int
    topic: str
    data: str
    type: str | None = None
    cursor: str | None = None
    """The ``id:`` clients are sent when it is not ``id`` itself (a broker with :class:`Cursors`)."""


class ResetReason:
    """Why a resume cannot be exact (the ``reason`` of a ``reset`` event)."""

    INVALID_ID = "invalid-id"
    """The client's last event id is not an id this deployment could have issued."""
    EXPIRED = "expired"
    """Events after the client's id left the replay buffer (size or age)."""
    LOST = "lost"
    """The broker lost its data (restart without persistence): history is gone."""


@dataclass(frozen=True, slots=True)
class Reset:
    """Events of ``topics`` after the resume point may be missing, for ``reason``."""

    reason: str
    topics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class History:
    """What a resume gets: the retained events after an id, and how far they go.

    * ``events``: every retained event of the asked topics with a larger id,
      merged in id order.
    * ``head``: the last id issued in the deployment when the history was
      read. Every event of these topics with an id up to ``head`` that is
      still retained is in ``events``; every later one is published after the
      read, so a node subscribed before the read receives it live.
    * ``reset``: set when events of some topics after the id may be missing
      (they expired, or the broker lost data); None when ``events`` is exact.
    """

    events: list[Event]
    head: int
    reset: Reset | None = None


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long the replay buffer keeps events: per-topic count and age, and (embedded broker) all topics' bytes."""

    size: int = 1000
    ttl: float = 3600.0
    max_bytes: int | None = None
    """The whole replay buffer's bytes at most, oldest events dropped first (None: no ceiling). The embedded
    broker's; a Redis deployment's memory is bounded by Redis (``maxmemory``, the streams' trimming)."""


@dataclass(slots=True)
class Snapshot:
    """One atomic read of a broker's retention state: enough to answer any resume at or after ``after``.

    ``floors`` holds, per topic, the largest id the topic may have dropped
    (a topic with nothing retained: the TTL cutoff, or the epoch if later);
    ``events`` the retained events of those topics above ``after``, in id
    order. :meth:`judge` is the one place that decides which resets a resume
    gets, so every broker answers alike.
    """

    after: int
    head: int
    epoch: int
    floors: dict[str, int]
    events: list[Event]

    def judge(self, topics: Sequence[str], after: int) -> History:
        """The history for one client resuming after ``after`` (>= the snapshot's)."""
        if after > self.head:
            return History([], self.head, Reset(ResetReason.INVALID_ID, tuple(topics)))
        wanted = set(topics)
        events = [e for e in self.events if e.id > after and e.topic in wanted]
        if after < self.epoch:
            return History(events, self.head, Reset(ResetReason.LOST, tuple(topics)))
        # At the head, nothing was published since: nothing can be missing.
        expired = tuple(t for t in topics if after < self.floors[t] and after < self.head)
        return History(events, self.head, Reset(ResetReason.EXPIRED, expired) if expired else None)


@runtime_checkable
class EventSink(Protocol):
    """The node side of the live feed (the hub). Called on the event loop.

    Both methods must return promptly and never block: the broker calls them
    from its delivery path, and a slow sink would stall every topic.
    """

    def on_event(self, event: Event) -> None:
        """A new event on a subscribed topic. Calls arrive in id order, each event once."""

    def on_reset(self, reset: Reset) -> None:
        """The live feed lost events of ``reset.topics`` it cannot recover."""


@runtime_checkable
class Broker(Protocol):
    """The contract every broker implementation keeps.

    Lifecycle: :meth:`start` once with the node's sink, then any calls, then
    :meth:`close`. Every call may raise :class:`BrokerUnavailable`.
    """

    async def start(self, sink: EventSink) -> None:
        """Connect and start delivering subscribed topics' events to ``sink``."""

    async def close(self) -> None:
        """Stop delivering and release every resource. Idempotent."""

    async def publish(self, messages: Sequence[Message], idempotency_key: str | None = None) -> list[Event]:
        """Publish a batch atomically and in order; return the events with their ids.

        Either every message of the batch is published or none is. Ids of a
        batch are consecutive in the deployment's order (no other event's id
        falls between them).

        With an ``idempotency_key`` already used within the replay TTL,
        nothing is published and the first publish's ids are returned, so a
        producer may retry a publish whose answer it never got. Raises
        IdempotencyConflict if that publish had a different number of events.
        """

    async def subscribe(self, topics: Collection[str]) -> None:
        """Add topics to this node's live feed.

        Once it returns, every event published on these topics afterwards
        reaches the sink. Subscribing to an already subscribed topic is a no-op.
        A broker whose feed is down (reconnecting) still takes the topics: the
        feed catches up on them when it is back, so this need not fail then.
        """

    async def position(self, topics: Collection[str]) -> int:
        """Where a new client of ``topics`` (subscribed, see :meth:`subscribe`) starts.

        An id ``p`` such that every event of ``topics`` with an id above ``p``
        reaches the sink after this call began, and every event at or below it
        was published before the call returned. A client registered with the
        sink before the call, told ``p`` as its position, so gets exactly the
        events after ``p``. It need not be the deployment's head: a broker
        that feeds this node from elsewhere may answer from where its feed is
        (without a round trip, and while the source is unreachable), so long as
        the feed will deliver everything after it.
        """

    async def unsubscribe(self, topics: Collection[str]) -> None:
        """Remove topics from this node's live feed. Unknown topics are ignored."""

    async def head(self) -> int:
        """The last id issued in the deployment.

        Before the first publish it is a floor below every id to come, so a
        client may always resume from it.
        """

    async def history(self, topics: Collection[str], after: int) -> History:
        """The retained events of ``topics`` with an id above ``after``; see :class:`History`."""

    async def ping(self) -> bool:
        """True when the broker is usable right now (for readiness checks)."""


def now_us(clock: Clock = time.time) -> int:
    """The clock in whole microseconds: the floor of the next id."""
    return int(clock() * 1_000_000)


def next_id(last: int, clock: Clock = time.time) -> int:
    """The id after ``last``: strictly larger, and never below the clock.

    Seeding from the clock is what keeps ids increasing across a restart that
    lost the counter (memory broker, Redis without persistence). Microseconds
    keep ids below 2**53 until the year 2255, so they survive JSON numbers
    and Lua's doubles unharmed.
    """
    return max(last + 1, now_us(clock))


@runtime_checkable
class PositionNow(Protocol):
    """Optional capability: :meth:`Broker.position` answered at once when nothing needs waiting for.

    The embedded broker always can (it delivers in this process); the Redis
    broker can for topics its feed already carries exactly (it answers from
    the feed). With it, a node opens a fresh stream in one step, with
    nothing to await (:meth:`api.core.hub.Hub.open_now`): no task, no coroutine
    held per stream.
    """

    def position_now(self, topics: Collection[str]) -> int | None:
        """What :meth:`Broker.position` would answer, now; None when that needs waiting (I/O, a feed connecting).

        ``topics`` are subscribed. Raises BrokerUnavailable (closed).
        """


@runtime_checkable
class Cursors(Protocol):
    """Optional capability: the ids clients hold are cursors, not the integer positions the node orders by.

    A broker whose topics are spread over partitions, each with its own
    sequence (:mod:`broker.redis.spread`), has no deployment-wide integer: a
    client's place is a vector, one position per partition. The node still
    orders its feed by integers (the broker numbers what it delivers, in
    delivery order: :attr:`Event.id`), so the hub's hand-off from replay to
    live works as with any broker; the vector travels as text
    (:attr:`Event.cursor`, and the texts these methods return for positions).
    Such a broker's :meth:`Broker.position` and :meth:`Broker.history` are not
    used by the hub.
    """

    async def position_cursor(self, topics: Collection[str]) -> tuple[int, str]:
        """:meth:`Broker.position`, and the cursor text a client starting there is told."""

    def position_cursor_now(self, topics: Collection[str]) -> tuple[int, str] | None:
        """:meth:`position_cursor`, now, when nothing needs waiting for (see :class:`PositionNow`); else None."""

    async def history_from(self, topics: Collection[str], cursor: str) -> tuple[History, str] | None:
        """The events of ``topics`` after ``cursor`` (each with its :attr:`Event.cursor`), and the cursor text of
        ``History.head`` (a position, as from :meth:`position_cursor`); None when ``cursor`` is not one this
        deployment issues. Raises BrokerUnavailable."""

    def sequence(self, topic: str, cursor: str) -> int:
        """Where ``cursor`` stands in ``topic``'s own sequence (its partition's; 0 when it is no cursor here).

        A protocol whose whole feed is one topic numbers by that sequence (the Mercure hub: ``#<n>``), which is
        the same on every node; the ``id`` a publish answers is in it too.
        """

    def cursor(self, topic: str, sequence: int) -> str:
        """A cursor at ``sequence`` of ``topic``'s own sequence (and at 0 in every other): to resume a
        one-topic protocol's ``#<n>`` by :meth:`history_from`."""


@runtime_checkable
class SubscribeNow(Protocol):
    """Optional capability: :meth:`Broker.subscribe` done at once (a feed in this process: the embedded broker)."""

    def subscribe_now(self, topics: Collection[str]) -> None:
        """What :meth:`Broker.subscribe` does, done when it returns. Raises BrokerUnavailable (closed)."""


@runtime_checkable
class Resyncs(Protocol):
    """Optional capability: a live feed that can be rebuilt on demand (Redis), for a node that stood still.

    A node whose process was stopped (a stuck loop, a paused VM) may find its
    feed's connection dropped or far behind; the node asks for a resync
    before it takes new streams again (api.node.stall). The embedded broker
    lives in the node's own memory: nothing to rebuild, so it has no such method.
    """

    async def resync(self) -> None:
        """Drop the live feed, reconnect it and backfill every subscribed topic from the replay buffer (exactly,
        as after any reconnect: nothing missed, nothing twice); return once it is live again. Raises
        BrokerUnavailable when Redis does not answer: the feed then comes back by itself, as after any outage."""


@runtime_checkable
class ReportsStats(Protocol):
    """Optional capability: counters a broker exposes on the node's ``/stats``."""

    def stats(self) -> dict[str, int]:
        """A snapshot of the broker's own counters."""


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One node as the cluster registry knows it: its announcement, and whether it is still announcing."""

    node_id: str
    record: str
    """What the node announced (JSON: url, version, state, figures...), opaque to the broker."""
    alive: bool
    """False once the node stopped announcing for longer than its TTL (killed, stopped, cut off)."""


@runtime_checkable
class NodeDirectory(Protocol):
    """Optional capability: where the nodes of a deployment announce themselves (``GET /cluster``).

    A node calls :meth:`announce` every second or two; a node that stops is
    listed as not alive once its TTL has passed, and forgotten ``forget``
    seconds after its last announcement.
    """

    async def announce(self, node_id: str, record: str, ttl: float) -> None:
        """Say this node is alive for ``ttl`` seconds, with ``record``. Raises BrokerUnavailable."""

    async def nodes(self, forget: float) -> list[NodeRecord]:
        """Every node announced within the last ``forget`` seconds. Raises BrokerUnavailable."""


@runtime_checkable
class NodeEntries(Protocol):
    """Optional capability: small keyed records each node keeps in the broker, for the whole deployment to list.

    Mercure's active subscriptions are the use (``kind`` ``"mercure"``: one
    entry per subscription of the node's open streams). Entries belong to
    one node: a reader lists them for the nodes it knows alive
    (:class:`NodeDirectory`), so a node's entries drop out of every list the
    moment it stops announcing, whatever state it left them in. Whoever
    notices a node gone calls :meth:`take_entries` for it: the entries are
    read and removed in one step, so among several nodes noticing at once
    exactly one gets them (and can say they ended). A set nobody takes
    expires ``keep`` seconds after the node last wrote or kept it.
    """

    async def put_entries(self, node_id: str, kind: str, entries: Mapping[str, str], keep: float) -> None:
        """Add or replace entries of ``node_id``. Raises BrokerUnavailable."""

    async def drop_entries(self, node_id: str, kind: str, keys: Collection[str], keep: float) -> None:
        """Remove entries of ``node_id`` (absent keys are ignored). Raises BrokerUnavailable."""

    async def entries(self, kind: str, node_ids: Collection[str]) -> dict[str, dict[str, str]]:
        """The entries of each of ``node_ids`` (a node without any: absent). Raises BrokerUnavailable."""

    async def take_entries(self, node_id: str, kind: str) -> dict[str, str]:
        """Read and remove every entry of ``node_id`` at once (a second taker gets none). Raises BrokerUnavailable."""
