"""The hub and connections in-process: hand-off, dedupe, byte budget, heartbeats, subscriptions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection

import pytest

from api.core.connection import Closed, Connection
from api.core.hub import Hub, parse_event_id
from api.core.sse import HEARTBEAT, event_frame
from broker.base import Event, History, Message, RetentionPolicy
from broker.memory import MemoryBroker


class CountingBroker(MemoryBroker):
    """Records every subscribe/unsubscribe call the hub makes."""

    def __init__(self) -> None:
        super().__init__(RetentionPolicy(size=100, ttl=60))
        self.calls: list[tuple[str, frozenset[str]]] = []

    async def subscribe(self, topics: Collection[str]) -> None:
        self.calls.append(("sub", frozenset(topics)))
        await asyncio.sleep(0)  # a real broker round-trip yields to the loop
        await super().subscribe(topics)

    async def unsubscribe(self, topics: Collection[str]) -> None:
        self.calls.append(("unsub", frozenset(topics)))
        await asyncio.sleep(0)
        await super().unsubscribe(topics)


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    broker = CountingBroker()
    hub = Hub(broker, client_buffer=10_000, heartbeat=3600)
    await broker.start(hub)
    await hub.start()
    yield hub
    await hub.close()
    await broker.close()


def broker_of(hub: Hub) -> CountingBroker:
    broker = hub._broker
    assert isinstance(broker, CountingBroker)
    return broker


async def drain(connection: Connection) -> bytes:
    return await asyncio.wait_for(connection.next_chunk(), 1) or b""


def test_parse_event_id_accepts_only_decimal_ids() -> None:
    assert parse_event_id("0") == 0
    assert parse_event_id("1795515019313663") == 1795515019313663
    for bad in ["", "-1", "+1", "1.0", "1e3", " 1", "1 ", "0x1", "١٢", "9" * 20]:
        assert parse_event_id(bad) is None, bad


def test_pending_connection_keeps_only_events_after_the_replay_position() -> None:
    connection = Connection(("t",), limit=10_000)
    for event_id in (5, 6, 7, 8):
        connection.offer(event_id, b"%d;" % event_id)
    connection.go_live(6)  # the replay went up to 6
    connection.offer(7, b"7;")  # a late duplicate
    connection.offer(9, b"9;")
    assert connection._chunks == [b"7;", b"8;", b"9;"]


def test_overflow_closes_and_calls_the_aborter_once() -> None:
    aborted: list[bool] = []
    connection = Connection(("t",), limit=100, on_overflow=lambda: aborted.append(True))
    connection.go_live(0)
    for event_id in range(1, 20):
        connection.offer(event_id, b"x" * 30)
    assert connection.closed is Closed.OVERFLOW
    assert aborted == [True]
    assert connection._chunks == []


async def test_taking_a_chunk_frees_the_budget() -> None:
    connection = Connection(("t",), limit=100)
    connection.go_live(0)
    for event_id in range(1, 100):
        connection.offer(event_id, b"x" * 30)
        if event_id % 3 == 0:
            assert len(await drain(connection)) == 90
    assert connection.closed is None


def test_heartbeat_only_when_idle_for_a_whole_tick() -> None:
    connection = Connection(("t",), limit=10_000)
    connection.go_live(0)
    connection.offer(1, b"a")
    connection.heartbeat()  # activity since the last tick: no comment
    assert connection._chunks == [b"a"]
    connection.heartbeat()  # a whole tick idle: comment
    assert connection._chunks == [b"a", HEARTBEAT]


async def test_events_are_encoded_once_and_shared_by_every_connection(hub: Hub) -> None:
    opened = [await hub.connect(["t"], None) for _ in range(3)]
    for o in opened:
        o.connection.go_live(o.position)
    (event,) = await broker_of(hub).publish([Message("t", "hi", "x")])
    chunks = [await drain(o.connection) for o in opened]
    assert chunks == [event_frame(event.id, "hi", "x")] * 3
    assert chunks[0] is chunks[1] is chunks[2]  # the same bytes object, not three encodings


async def test_connect_subscribes_once_and_last_leave_unsubscribes(hub: Hub) -> None:
    broker = broker_of(hub)
    first = await hub.connect(["a", "b"], None)
    second = await hub.connect(["b"], None)
    assert broker.calls == [("sub", frozenset({"a", "b"}))]
    hub.detach(first.connection)
    await asyncio.gather(*hub._tasks)
    assert broker.calls[-1] == ("unsub", frozenset({"a"}))
    hub.detach(second.connection)
    await asyncio.gather(*hub._tasks)
    assert broker.calls[-1] == ("unsub", frozenset({"b"}))
    assert hub.stats()["topics_subscribed"] == 0
    assert hub.stats()["connections"] == 0


async def test_regression_join_racing_a_leave_keeps_the_topic_subscribed(hub: Hub) -> None:
    """A client leaving and another joining the same topic at once must not end unsubscribed."""
    broker = broker_of(hub)
    for _ in range(20):
        leaving = await hub.connect(["t"], None)
        hub.detach(leaving.connection)  # schedules an unsubscribe
        joining = await hub.connect(["t"], None)  # races it
        await asyncio.gather(*hub._tasks)
        assert "t" in broker._subscribed
        hub.detach(joining.connection)
        await asyncio.gather(*hub._tasks)
        assert "t" not in broker._subscribed


async def test_resume_hand_off_is_exact_while_events_keep_coming(hub: Hub) -> None:
    broker = broker_of(hub)
    start = (await broker.publish([Message("t", "0")]))[0].id
    stop = asyncio.Event()
    published: list[int] = []

    async def publisher() -> None:
        while not stop.is_set():
            published.extend(e.id for e in await broker.publish([Message("t", "n")]))
            await asyncio.sleep(0)

    task = asyncio.create_task(publisher())
    await asyncio.sleep(0)
    opened = await hub.connect(["t"], str(start))
    replayed = list(opened.frames)
    opened.connection.go_live(opened.position)
    await asyncio.sleep(0)
    stop.set()
    await task
    live = await drain(opened.connection)
    frames = b"".join(replayed) + live
    assert frames == b"".join(event_frame(i, "n") for i in published)


async def test_drain_closes_every_connection_and_refuses_new_ones(hub: Hub) -> None:
    opened = [await hub.connect(["t"], None) for _ in range(3)]
    hub.drain()
    assert all(o.connection.closed is Closed.SHUTDOWN for o in opened)
    assert [await o.connection.next_chunk() for o in opened] == [None] * 3
    with pytest.raises(Exception, match="shutting down"):
        await hub.connect(["t"], None)


async def test_regression_frame_cache_is_bounded_in_bytes_not_count() -> None:
    """Large events must not let the replay frame cache grow to count x max event size."""
    broker = MemoryBroker(RetentionPolicy(size=100, ttl=60))
    hub = Hub(broker, client_buffer=10_000, heartbeat=3600, frame_cache_bytes=100_000)
    await broker.start(hub)
    await broker.subscribe(["t"])
    for _ in range(50):
        await broker.publish([Message("t", "x" * 10_000)])
    assert 0 < hub._deliveries_size <= 100_000
    assert sum(d.size for d in hub._deliveries.values() if d is not None) == hub._deliveries_size
    await broker.close()


async def test_streams_of_one_token_share_one_expiry_timer(hub: Hub) -> None:
    import time

    deadline = time.time() + 0.2
    connections = [hub.admit(["t"]) for _ in range(1000)]
    for connection in connections:
        hub.expire_at(connection, deadline)
    assert len(hub._expiring) == 1
    gone = connections.pop()
    hub.detach(gone)
    assert gone not in hub._expiring[deadline]
    await asyncio.wait_for(connections[0].next_chunk(), 5)  # woken by the close, None once closed
    assert {c.closed for c in connections} == {Closed.EXPIRED}
    assert gone.closed is None
    assert hub._expiring == {}


class CursorBroker(MemoryBroker):
    """A broker whose clients hold cursors (as topics over partitions do): ``c<position>``."""

    def __init__(self) -> None:
        super().__init__(RetentionPolicy(size=100, ttl=60))

    async def position_cursor(self, topics: Collection[str]) -> tuple[int, str]:
        position = await self.position(topics)
        return position, f"c{position}"

    def position_cursor_now(self, topics: Collection[str]) -> tuple[int, str] | None:
        position = self.position_now(topics)
        return None if position is None else (position, f"c{position}")

    async def history_from(self, topics: Collection[str], cursor: str) -> tuple[History, str] | None:
        if not cursor.startswith("c") or not cursor[1:].isdigit():
            return None
        history = await self.history(topics, int(cursor[1:]))
        events = [Event(e.id, e.topic, e.data, e.type, f"c{e.id}") for e in history.events]
        return History(events, history.head, history.reset), f"c{history.head}"

    def sequence(self, topic: str, cursor: str) -> int:
        return int(cursor[1:])

    def cursor(self, topic: str, sequence: int) -> str:
        return f"c{sequence}"


async def test_with_cursors_the_one_step_open_tells_the_client_its_cursor_and_a_resume_replays_after_one() -> None:
    broker = CursorBroker()
    hub = Hub(broker, client_buffer=10_000, heartbeat=3600)
    await broker.start(hub)
    await hub.start()
    try:
        async with asyncio.timeout(5):
            first = await hub.connect(("a",), None)  # the long way subscribes the topic
            assert first.cursor == f"c{first.position}"
            opened = hub.open_now(("a",))
            assert opened is not None
            connection, position, marker = opened
            assert marker == f"c{position}"
            (event,) = await broker.publish([Message("a", "x")])
            resumed = await hub.connect(("a",), marker)
            assert resumed.frames == [event_frame(f"c{event.id}", "x")]
            assert resumed.cursor == f"c{resumed.position}"
            invalid = await hub.connect(("a",), "12")  # not a cursor here: reset, at the cursor of now
            assert b"event: reset" in invalid.frames[0]
            assert f"id: c{invalid.position}".encode() in invalid.frames[0]
            hub.detach(connection)
    finally:
        await hub.close()
        await broker.close()
