"""The Mercure hub's one sequence: its feed topic's own, whatever the broker (``#<n>`` cursors).

Every Mercure update is an event of one broker topic, so the hub numbers
updates by that topic's sequence: the broker's ids on one data set, the
topic's partition's sequence when topics are spread over partitions
(:class:`~broker.base.Cursors`). Either way ``#<n>`` means the same on every
node, and it is what a publish answers. The node's own positions (what the
hub hands over from replay to live by) travel beside it.
"""

from __future__ import annotations

from broker.base import Broker, Cursors, Event, History, Reset, ResetReason


class FeedSequence:
    """Positions and history of one broker topic, in its own sequence."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self._broker = broker
        self._topic = topic
        self._cursors = broker if isinstance(broker, Cursors) else None

    def of(self, event: Event) -> int:
        """The event's number in the sequence."""
        if self._cursors is None or event.cursor is None:
            return event.id
        return self._cursors.sequence(self._topic, event.cursor)

    async def position(self) -> tuple[int, int]:
        """Where a subscriber starting now starts: the node's position and the sequence's. Raises BrokerUnavailable."""
        topics = (self._topic,)
        if self._cursors is None:
            position = await self._broker.position(topics)
            return position, position
        position, cursor = await self._cursors.position_cursor(topics)
        return position, self._cursors.sequence(self._topic, cursor)

    async def history(self, after: int) -> tuple[History, int]:
        """The retained events after ``after`` of the sequence (``History.head``: the node's position to go live
        from) and the sequence's number at that head. Raises BrokerUnavailable."""
        topics = (self._topic,)
        if self._cursors is None:
            history = await self._broker.history(topics, after)
            return history, history.head
        answer = await self._cursors.history_from(topics, self._cursors.cursor(self._topic, after))
        if answer is None:  # above the sequence's head: never issued
            position, head = await self.position()
            return History([], position, Reset(ResetReason.INVALID_ID, topics)), head
        history, cursor = answer
        return history, self._cursors.sequence(self._topic, cursor)

    @property
    def numbered_apart(self) -> bool:
        """Whether replayed events are numbered apart from live ones (their ``id`` is the sequence's, not the
        node's): then they must not share the hub's frame cache, which is keyed by the node's numbers."""
        return self._cursors is not None
