"""Subscriptions as sets of selectors, and the one fan-out over them.

A subscription names what it wants with *selectors*: exact topics, or
patterns (Mercure's ``match``, ``match_exact``, ``match_urlpattern``, ``*``);
with a *reader* it may also receive private events of the topics the reader
allows. An event to deliver (:class:`Delivery`) carries its topics, its frame
(encoded once, for every client) and whether it is private; whether a
connection gets it is :meth:`Selection.can_receive` (Mercure's
``Subscriber.CanReceive``), answered in bulk by an :class:`Index`:

* connections whose selectors are all exact sit in a dictionary by topic:
  one lookup per event finds them, and nothing is done for the others;
* connections with a pattern are grouped by their selector list (10,000
  clients of one pattern are one :class:`Group`), each group asked once per
  event, its answer cached per distinct topic;
* the private check is made per connection, cached per topic the same way.

So a native event to 1,000 subscribers of its topic costs one dictionary
lookup, then one :meth:`~api.core.connection.Connection.offer` each: no
per-client Python work beyond the offer (``make bench``: fan-out).

An index serves one *topic space*: the native API's topics are one, the
Mercure hub's another (:class:`api.mercure.space.MercureSpace`); a space
decides how the broker's events become deliveries, the index who gets them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from api.core.connection import Connection

ENTRY_BYTES = 120
"""What a kept delivery (or a kept "no delivery") costs beyond its bytes, about: the object and its cache slot."""

MATCH_CACHE = 4096
"""Topics whose answer a group or a reader keeps (then its cache starts over): a byte bound per cache."""


class TopicMatcher(Protocol):
    """A list of selectors (``api.mercure.matchers.Matchers``): does a topic match one? Equal lists hash alike."""

    def matches(self, topic: str) -> bool: ...

    def __hash__(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Delivery:
    """An event as the hub fans it out: what selectors match (``topics``), the bytes sent, who may read it.

    ``payload`` is what the event's space decoded it into, for the space's
    own use (a Mercure update, when a resume looks for a publisher's id).
    """

    topics: tuple[str, ...]
    frame: bytes
    private: bool = False
    payload: object = None

    @property
    def size(self) -> int:
        """Bytes it holds, about (the frame counts twice when a space decoded a payload of the same size)."""
        return len(self.frame) * (2 if self.payload is not None else 1) + ENTRY_BYTES


def cached_match(cache: dict[str, bool], matcher: TopicMatcher, topic: str) -> bool:
    """``matcher.matches(topic)``, remembered in ``cache`` (at most :data:`MATCH_CACHE` topics)."""
    answer = cache.get(topic)
    if answer is None:
        answer = matcher.matches(topic)
        if len(cache) >= MATCH_CACHE:
            cache.clear()
        cache[topic] = answer
    return answer


class Group:
    """The connections selecting with the same pattern list: asked once per event for all of them."""

    __slots__ = ("_cache", "everything", "matcher", "members")

    def __init__(self, matcher: TopicMatcher, everything: bool) -> None:
        self.matcher = matcher
        self.everything = everything
        """One selector is ``*``: every topic matches."""
        self.members: set[Connection] = set()
        self._cache: dict[str, bool] = {}

    def selects(self, topics: Iterable[str]) -> bool:
        if self.everything:
            return True
        cache, matcher = self._cache, self.matcher
        return any(cached_match(cache, matcher, topic) for topic in topics)


class Selection:
    """What one connection receives: its selectors, and its reader for private events.

    ``exact``: its topics, when every selector is an exact one (then the
    connection sits in its index by topic); ``matcher``: its selector list
    when one is a pattern (then it joins that list's :class:`Group`).
    A native subscription needs none of this: its connection's ``topics``
    are its exact selectors, and it has no reader (a native event is
    never private).
    """

    __slots__ = ("_reads", "everything", "exact", "group", "matcher", "reader", "space")

    def __init__(
        self,
        space: str,
        *,
        exact: frozenset[str] | None,
        matcher: TopicMatcher | None = None,
        everything: bool = False,
        reader: TopicMatcher | None = None,
    ) -> None:
        if exact is None and matcher is None:
            raise ValueError("a selection needs exact topics or a matcher")
        self.space = space
        """The space it selects in: the broker topic that feeds it (``api.core.hub.Space.feed``)."""
        self.exact = None if everything else exact
        self.matcher = matcher
        self.everything = everything
        self.reader = reader
        """The selectors of the private events it may read (None: no private event)."""
        self.group: Group | None = None  # set by the index
        self._reads: dict[str, bool] = {}

    def may_read(self, topics: Iterable[str]) -> bool:
        """May it receive a private event of ``topics`` (its reader allows one of them)?"""
        reader = self.reader
        return reader is not None and any(cached_match(self._reads, reader, topic) for topic in topics)

    def selects(self, topics: Iterable[str]) -> bool:
        """Does one of ``topics`` match one of its selectors?"""
        if self.exact is not None:
            exact = self.exact
            return any(topic in exact for topic in topics)
        return self.group.selects(topics) if self.group is not None else False

    def can_receive(self, delivery: Delivery) -> bool:
        """Whether a connection with this selection gets ``delivery``."""
        topics = delivery.topics
        return self.selects(topics) and (not delivery.private or self.may_read(topics))


class Index:
    """The connections of one topic space, by exact topic and by pattern group; :meth:`fan_out` delivers."""

    __slots__ = ("by_topic", "groups")

    def __init__(self) -> None:
        self.by_topic: dict[str, set[Connection]] = {}
        self.groups: dict[TopicMatcher, Group] = {}

    def add(self, connection: Connection) -> None:
        selection = connection.selection
        if selection is None or selection.exact is not None:
            by_topic = self.by_topic
            for topic in connection.topics if selection is None else selection.exact or ():
                by_topic.setdefault(topic, set()).add(connection)
            return
        assert selection.matcher is not None
        group = self.groups.get(selection.matcher)
        if group is None:
            group = self.groups[selection.matcher] = Group(selection.matcher, selection.everything)
        selection.group = group
        group.members.add(connection)

    def remove(self, connection: Connection) -> list[str]:
        """Take ``connection`` out; the exact topics it leaves without a connection."""
        selection = connection.selection
        if selection is not None and selection.group is not None:
            group = selection.group
            group.members.discard(connection)
            if not group.members:
                del self.groups[group.matcher]
            return []
        orphaned = []
        by_topic = self.by_topic
        for topic in connection.topics if selection is None else selection.exact or ():
            connections = by_topic.get(topic)
            if connections is None:
                continue
            connections.discard(connection)
            if not connections:
                del by_topic[topic]
                orphaned.append(topic)
        return orphaned

    def fan_out(self, event_id: int, delivery: Delivery) -> bool:
        """Offer ``delivery`` to every connection that can receive it (never awaits); whether one could.

        A connection reached through two topics (an event with alternate
        topics) is offered it once.
        """
        topics = delivery.topics
        by_topic = self.by_topic
        reached = False
        if by_topic:
            exact: Iterable[Connection] | None
            if len(topics) == 1:
                exact = by_topic.get(topics[0])
            else:
                exact = {c for topic in topics for c in by_topic.get(topic, ())}
            if exact:
                reached = True
                _offer(exact, event_id, delivery)
        for group in self.groups.values():
            if group.selects(topics):
                reached = True
                _offer(group.members, event_id, delivery)
        return reached

    def connections(self) -> set[Connection]:
        """Every connection of the index (for a space that ends them all)."""
        found = {c for connections in self.by_topic.values() for c in connections}
        for group in self.groups.values():
            found |= group.members
        return found


def _offer(connections: Iterable[Connection], event_id: int, delivery: Delivery) -> None:
    """Offer ``delivery`` to each of ``connections``; a private one only to those whose reader allows it."""
    frame = delivery.frame
    if not delivery.private:
        for connection in connections:
            connection.offer(event_id, frame)
        return
    topics = delivery.topics
    for connection in connections:
        selection = connection.selection
        if selection is not None and selection.may_read(topics):
            connection.offer(event_id, frame)
