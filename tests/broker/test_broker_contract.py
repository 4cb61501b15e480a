"""The broker contract (:mod:`broker.base`), held against every implementation.

Every test runs once per entry of :data:`tests.brokers.BROKER_CASES`. Time
is a :class:`~tests.brokers.FakeClock`, and live events are awaited on a
recording sink, so nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Collection, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Protocol

import pytest

from broker.base import (
    Broker,
    BrokerUnavailable,
    Event,
    EventSink,
    History,
    IdempotencyConflict,
    Message,
    NodeDirectory,
    NodeEntries,
    NodeRecord,
    PositionNow,
    Reset,
    ResetReason,
    RetentionPolicy,
    now_us,
)
from broker.memory import MemoryBroker
from tests.brokers import BROKER_CASES, WAIT, BrokerCase, FakeClock, RecordingSink


@dataclass
class Node:
    """A started broker, the sink it delivers to, and the clock it reads."""

    broker: Broker
    sink: RecordingSink
    clock: FakeClock
    stack: AsyncExitStack

    async def aclose(self) -> None:
        """Close the broker and release what its case created (as a node shutting down)."""
        await self.stack.aclose()


class OpenNode(Protocol):
    def __call__(self, retention: RetentionPolicy | None = None) -> Awaitable[Node]: ...


@pytest.fixture(params=[pytest.param(case, id=case.name, marks=case.marks) for case in BROKER_CASES])
def case(request: pytest.FixtureRequest) -> BrokerCase:
    chosen: BrokerCase = request.param
    return chosen


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def open_node(case: BrokerCase, clock: FakeClock) -> AsyncIterator[OpenNode]:
    """Open started brokers of this case, all on the test's clock; each a fresh store."""
    async with AsyncExitStack() as nodes:

        async def open_(retention: RetentionPolicy | None = None) -> Node:
            stack = AsyncExitStack()
            nodes.push_async_callback(stack.aclose)
            broker = await stack.enter_async_context(case.make(retention or RetentionPolicy(), clock))
            sink = RecordingSink()
            assert isinstance(sink, EventSink)
            assert isinstance(broker, Broker)
            await broker.start(sink)
            return Node(broker, sink, clock, stack)

        yield open_


@pytest.fixture
async def bnode(open_node: OpenNode) -> Node:
    """A started broker with the default retention."""
    return await open_node()


def msg(topic: str, data: str, type: str | None = None) -> Message:
    return Message(topic, data, type)


async def publish_each(broker: Broker, messages: Sequence[Message]) -> list[Event]:
    """Publish messages one per batch; the events in publish order."""
    events: list[Event] = []
    for message in messages:
        events.extend(await broker.publish([message]))
    return events


def on(events: Sequence[Event], topics: Collection[str]) -> list[Event]:
    return [e for e in events if e.topic in topics]


def ids(events: Sequence[Event]) -> list[int]:
    return [e.id for e in events]


def assert_increasing(values: Sequence[int]) -> None:
    assert all(a < b for a, b in itertools.pairwise(values)), values


# -- ids -----------------------------------------------------------------------


async def test_ids_are_ints_strictly_increasing_across_topics_and_batches(bnode: Node) -> None:
    broker = bnode.broker
    events: list[Event] = []
    events += await broker.publish([msg("a", "1")])
    events += await broker.publish([msg("b", "2"), msg("a", "3")])
    events += await broker.publish([msg("c", "4")])
    events += await broker.publish([msg("b", "5"), msg("c", "6"), msg("a", "7")])
    events += await broker.publish([msg("a", "8")])

    assert [e.data for e in events] == [str(n) for n in range(1, 9)]
    assert all(type(e.id) is int for e in events), [type(e.id) for e in events]
    assert_increasing(ids(events))
    assert await broker.head() == events[-1].id


async def test_batch_gets_all_its_events_in_order(bnode: Node) -> None:
    broker = bnode.broker
    before = await broker.head()
    messages = [
        msg("a", '{"n": 1}'),
        msg("b", "plain text", "update"),
        msg("a", "ünïcødé ✓ \U0001f680"),
        msg("c", "", None),
        msg("a", "line one\nline two", "multi"),
    ]

    events = await broker.publish(messages)

    assert [Message(e.topic, e.data, e.type) for e in events] == messages
    assert_increasing(ids(events))
    history = await broker.history(["a", "b", "c"], before)
    assert history.reset is None
    assert history.events == events
    assert history.head == events[-1].id


async def test_batch_ids_are_consecutive_under_concurrent_publishers(bnode: Node) -> None:
    broker = bnode.broker
    before = await broker.head()
    topics = [f"t{n}" for n in range(4)]

    async def writer(w: int) -> list[list[Event]]:
        batches: list[list[Event]] = []
        for i in range(15):
            batch = [msg(topics[(w + j) % len(topics)], f"w{w}-b{i}-m{j}") for j in range(1 + (i + w) % 4)]
            batches.append(await broker.publish(batch))
            await asyncio.sleep(0)
        return batches

    results = await asyncio.gather(*(writer(w) for w in range(4)))
    batches = [batch for result in results for batch in result]
    every = sorted((e for batch in batches for e in batch), key=lambda e: e.id)
    assert len({e.id for e in every}) == len(every), "an id was issued twice"

    history = await broker.history(topics, before)
    assert history.reset is None
    assert history.events == every
    order = ids(history.events)
    for batch in batches:
        start = order.index(batch[0].id)
        assert order[start : start + len(batch)] == ids(batch), "another event's id fell inside a batch"


async def test_ids_are_never_below_the_clock(bnode: Node) -> None:
    broker, clock = bnode.broker, bnode.clock
    for step in (0.0, 0.000_001, 0.5, 0.0, 3.0, 120.0, 86_400.0):
        clock.advance(step)
        floor = now_us(clock)
        events = await broker.publish([msg("a", "x"), msg("b", "y")])
        assert all(e.id >= floor for e in events), (floor, ids(events))
    # The counter jumps with the clock: a day later, ids are a day later too.
    assert events[0].id >= now_us(clock)


async def test_ids_keep_increasing_when_the_clock_goes_back(bnode: Node) -> None:
    broker, clock = bnode.broker, bnode.clock
    events = await publish_each(broker, [msg("a", "1"), msg("b", "2")])
    clock.advance(-3600.0)
    events += await broker.publish([msg("a", "3"), msg("b", "4")])
    clock.advance(-0.5)
    events += await publish_each(broker, [msg("a", "5"), msg("c", "6")])
    clock.advance(1.0)
    events += await broker.publish([msg("a", "7")])

    assert_increasing(ids(events))
    assert await broker.head() == events[-1].id
    history = await broker.history(["a", "b", "c"], events[0].id - 1)
    assert history.events == events


async def test_restarted_broker_issues_higher_ids_and_reports_lost_history(open_node: OpenNode) -> None:
    old = await open_node()
    old_events = await publish_each(old.broker, [msg("a", "1"), msg("b", "2"), msg("a", "3")])
    old_events += await old.broker.publish([msg("a", "4"), msg("b", "5")])
    await old.aclose()

    old.clock.advance(1.0)
    new = await open_node()
    # Before anything is published, a client resuming from an old id gets told the history is lost.
    assert await new.broker.head() >= old_events[-1].id
    early = await new.broker.history(["a", "b"], old_events[1].id)
    assert early.reset is not None
    assert early.reset.reason == ResetReason.LOST
    assert set(early.reset.topics) == {"a", "b"}
    assert early.events == []

    new_events = await publish_each(new.broker, [msg("a", "6"), msg("b", "7")])
    assert min(ids(new_events)) > max(ids(old_events))
    assert_increasing(ids(new_events))

    for old_event in old_events:
        history = await new.broker.history(["a", "b"], old_event.id)
        assert history.reset is not None, old_event
        assert history.reset.reason == ResetReason.LOST
        assert set(history.reset.topics) == {"a", "b"}
        # What the new life retains is still handed over.
        assert history.events == new_events
        assert history.head == new_events[-1].id


# -- live feed -------------------------------------------------------------------


async def test_sink_gets_subscribed_topics_only_in_id_order_each_once(bnode: Node) -> None:
    broker, sink = bnode.broker, bnode.sink
    await broker.publish([msg("a", "before subscribe")])
    await broker.subscribe(["a", "b"])

    published: list[Event] = []
    published += await broker.publish([msg("a", "1"), msg("c", "2"), msg("b", "3")])
    published += await publish_each(broker, [msg("c", "4"), msg("b", "5"), msg("a", "6", "kind")])
    published += await broker.publish([msg("c", "7"), msg("c", "8"), msg("a", "9"), msg("b", "10"), msg("c", "11")])
    barrier = (await broker.publish([msg("b", "barrier")]))[0]
    published.append(barrier)

    received = await sink.wait_for_id(barrier.id)
    assert received == on(published, {"a", "b"})
    assert_increasing(ids(received))
    assert sink.resets == []


async def test_subscribe_takes_effect_when_it_returns(bnode: Node) -> None:
    broker, sink = bnode.broker, bnode.sink
    for n in range(5):
        topic = f"t{n}"
        await broker.subscribe([topic])
        (event,) = await broker.publish([msg(topic, str(n))])
        assert (await sink.wait_for_id(event.id))[-1] == event
    assert len(sink.events) == 5


async def test_a_client_starting_at_the_position_gets_every_event_after_it(bnode: Node) -> None:
    """``position`` after ``subscribe``: every event above it reaches the sink; it is never above what was issued.

    Asked twice: for a topic just subscribed, and again once the feed has
    carried events (a broker may then answer from its feed, not a read).
    """
    broker, sink = bnode.broker, bnode.sink
    published: list[Event] = []
    for round_ in range(2):
        published += await broker.publish([msg("p", f"before {round_}")])
        await broker.subscribe(["p"])
        start = await broker.position(["p"])
        after = await broker.publish([msg("p", f"after {round_} {i}") for i in range(3)])
        published += after
        received = await sink.wait_for_id(after[-1].id)
        assert start < after[0].id  # a position issued before these were published
        # Everything above it, once, in order (maybe an event published just before the call too).
        assert [e for e in received if e.id > start] == [e for e in published if e.id > start]
        await broker.publish([msg("other", "unsubscribed")])


async def test_a_position_answered_at_once_starts_a_client_exactly(bnode: Node) -> None:
    """``position_now`` (every broker has it): once the feed carries a topic, the position, with no wait."""
    broker, sink = bnode.broker, bnode.sink
    assert isinstance(broker, PositionNow)
    await broker.subscribe(["p"])
    await broker.position(["p"])  # the topic's first client on the node
    (carried,) = await broker.publish([msg("p", "carried")])
    await sink.wait_for_id(carried.id)  # the feed has carried the topic past that client's start
    now = broker.position_now(["p"])
    assert now is not None
    assert now >= carried.id
    after = await broker.publish([msg("p", f"after {i}") for i in range(3)])
    received = await sink.wait_for_id(after[-1].id)
    assert [e for e in received if e.id > now] == after


async def test_unsubscribe_stops_that_topic_only(bnode: Node) -> None:
    broker, sink = bnode.broker, bnode.sink
    await broker.subscribe(["a", "b"])
    first = await broker.publish([msg("a", "1"), msg("b", "2")])
    await sink.wait_for_id(first[-1].id)

    await broker.unsubscribe(["a", "never-subscribed"])
    later = await broker.publish([msg("a", "3"), msg("b", "4")])
    later += await publish_each(broker, [msg("a", "5"), msg("b", "6")])

    # Delivery is in id order, so once "6" is in, a stray "a" event would be too.
    received = await sink.wait_for_id(later[-1].id)
    assert received == [*first, *on(later, {"b"})]
    assert sink.resets == []


async def test_subscribing_twice_is_a_no_op(bnode: Node) -> None:
    broker, sink = bnode.broker, bnode.sink
    await broker.subscribe(["a"])
    await broker.subscribe(["a"])
    await broker.subscribe(["a", "b"])
    events = await publish_each(broker, [msg("a", "1"), msg("b", "2"), msg("a", "3")])
    received = await sink.wait_for_id(events[-1].id)
    assert received == events, "each event once, however often its topic was subscribed"

    # No reference counting either: one unsubscribe undoes any number of subscribes.
    await broker.unsubscribe(["a"])
    more = await publish_each(broker, [msg("a", "4"), msg("b", "5")])
    received = await sink.wait_for_id(more[-1].id)
    assert received == [*events, more[1]]


# -- history ---------------------------------------------------------------------


async def test_history_is_exact_and_merged_in_id_order(bnode: Node) -> None:
    broker = bnode.broker
    start = await broker.head()
    published = await publish_each(
        broker, [msg("a", "1"), msg("b", "2"), msg("c", "3"), msg("a", "4"), msg("c", "5"), msg("b", "6")]
    )
    published += await broker.publish([msg("b", "7"), msg("a", "8"), msg("c", "9")])
    published += await publish_each(broker, [msg("c", "10"), msg("a", "11")])

    for after in [start, *ids(published)]:
        head = await broker.head()
        history = await broker.history(["a", "b"], after)
        assert history.reset is None, after
        assert history.events == [e for e in on(published, {"a", "b"}) if e.id > after]
        assert_increasing(ids(history.events))
        assert history.head == head
        assert all(e.id <= history.head for e in history.events)

    one = await broker.history(["c"], published[2].id)
    assert one == History([e for e in on(published, {"c"}) if e.id > published[2].id], published[-1].id)


async def test_history_from_the_head_before_any_publish_is_exact(bnode: Node) -> None:
    broker = bnode.broker
    start = await broker.head()
    empty = await broker.history(["a", "never"], start)
    assert empty == History([], start)

    published = await broker.publish([msg("a", "1"), msg("a", "2")])
    history = await broker.history(["a", "never"], start)
    assert history == History(published, published[-1].id)


async def test_history_after_the_head_is_empty_and_exact(bnode: Node) -> None:
    broker = bnode.broker
    await publish_each(broker, [msg("a", "1"), msg("b", "2")])
    head = await broker.head()
    assert await broker.history(["a", "b", "never"], head) == History([], head)


async def test_history_after_an_id_above_the_head_is_invalid(bnode: Node) -> None:
    broker = bnode.broker
    ahead = await broker.head() + 1
    history = await broker.history(["a"], ahead)
    assert history.reset is not None
    assert history.reset.reason == ResetReason.INVALID_ID
    assert history.events == []

    await publish_each(broker, [msg("a", "1"), msg("b", "2")])
    head = await broker.head()
    for after in (head + 1, head + 1_000_000, head * 2):
        history = await broker.history(["a", "b"], after)
        assert history.reset is not None, after
        assert history.reset.reason == ResetReason.INVALID_ID
        assert set(history.reset.topics) == {"a", "b"}
        assert history.events == []
        assert history.head == head


# -- retention -------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "one-batch"])
async def test_retention_by_size_keeps_the_last_n(open_node: OpenNode, batched: bool) -> None:
    size, extra = 5, 3
    bnode = await open_node(RetentionPolicy(size=size))
    broker = bnode.broker
    start = await broker.head()
    messages = [msg("t", str(n)) for n in range(size + extra)]
    published = await broker.publish(messages) if batched else await publish_each(broker, messages)
    dropped, kept = published[:extra], published[extra:]

    # Resuming where a dropped event would come next: told, and given what is kept.
    for after in [start, *ids(dropped[:-1])]:
        history = await broker.history(["t"], after)
        assert history.reset is not None, after
        assert history.reset.reason == ResetReason.EXPIRED
        assert history.reset.topics == ("t",)
        assert history.events == kept

    # Resuming from the last dropped event misses nothing.
    assert await broker.history(["t"], dropped[-1].id) == History(kept, published[-1].id)
    assert await broker.history(["t"], kept[1].id) == History(kept[2:], published[-1].id)


async def test_retention_by_size_is_per_topic_and_resets_name_affected_topics_only(open_node: OpenNode) -> None:
    bnode = await open_node(RetentionPolicy(size=3))
    broker = bnode.broker
    start = await broker.head()
    published = await publish_each(
        broker, [msg("busy", "1"), msg("quiet", "2"), msg("busy", "3"), msg("busy", "4"), msg("busy", "5")]
    )
    published += await broker.publish([msg("busy", "6"), msg("quiet", "7"), msg("busy", "8")])
    busy_kept = on(published, {"busy"})[-3:]
    quiet = on(published, {"quiet"})

    history = await broker.history(["busy", "quiet", "never"], start)
    assert history.reset == Reset(ResetReason.EXPIRED, ("busy",))
    assert history.events == sorted([*busy_kept, *quiet], key=lambda e: e.id)
    assert_increasing(ids(history.events))

    assert await broker.history(["quiet", "never"], start) == History(quiet, published[-1].id)
    # Past the drop, the busy topic is exact again.
    after = busy_kept[0].id - 1
    assert (await broker.history(["busy", "quiet"], after)).reset is None


async def test_retention_by_age(open_node: OpenNode) -> None:
    ttl = 10.0
    bnode = await open_node(RetentionPolicy(ttl=ttl))
    broker, clock = bnode.broker, bnode.clock
    start = await broker.head()
    old = await publish_each(broker, [msg("t", "1"), msg("t", "2"), msg("u", "3")])
    clock.advance(6.0)
    young = await broker.publish([msg("t", "4"), msg("u", "5")])

    # 9.999 s after the young ones and 15.999 s after the old ones.
    clock.advance(ttl - 0.001)
    head = await broker.head()
    history = await broker.history(["t", "u"], start)
    assert history.reset is not None
    assert history.reset.reason == ResetReason.EXPIRED
    assert set(history.reset.topics) == {"t", "u"}
    assert history.events == young, "events older than the ttl are gone, younger ones are kept"
    assert history.head == head

    resumed = await broker.history(["t"], old[0].id)
    assert resumed.reset == Reset(ResetReason.EXPIRED, ("t",))
    assert resumed.events == on(young, {"t"})
    # Resuming after everything that expired is exact.
    assert await broker.history(["t", "u"], young[0].id) == History(young[1:], head)

    # Still within the ttl of the young ones: never dropped for age.
    fresh = await broker.publish([msg("t", "6")])
    assert (await broker.history(["t", "u"], old[-1].id)).events == [*young, *fresh]

    # Past the ttl of the young ones too.
    clock.advance(0.002)
    history = await broker.history(["t", "u"], old[-1].id)
    assert history.reset is not None
    assert history.reset.reason == ResetReason.EXPIRED
    assert set(history.reset.topics) == {"t", "u"}
    assert history.events == fresh


async def test_retention_by_age_ignores_publish_rate(open_node: OpenNode) -> None:
    """Events younger than the ttl survive however many are published after them (within size)."""
    ttl = 30.0
    bnode = await open_node(RetentionPolicy(size=1000, ttl=ttl))
    broker, clock = bnode.broker, bnode.clock
    start = await broker.head()
    published: list[Event] = []
    for n in range(60):
        published += await broker.publish([msg("t", str(n))])
        clock.advance(0.49)  # 60 x 0.49 s = 29.4 s < ttl
    history = await broker.history(["t"], start)
    assert history == History(published, published[-1].id)


# -- resume while publishing --------------------------------------------------------


async def take_over(bnode: Node, topics: Sequence[str], after: int) -> tuple[History, int]:
    """The hub's hand-off up to the history read: subscribe first, then read history.

    Returns the history and how many live events the sink had before the
    subscribe; the caller takes live events from there with an id above
    ``history.head``.
    """
    mark = len(bnode.sink.events)
    await bnode.broker.subscribe(topics)
    for _ in range(3):  # let the publisher run between subscribe and read
        await asyncio.sleep(0)
    history = await bnode.broker.history(topics, after)
    return history, mark


async def test_resume_while_publishing_misses_nothing_and_repeats_nothing(bnode: Node) -> None:
    broker, sink, clock = bnode.broker, bnode.sink, bnode.clock
    start = await broker.head()
    published: list[Event] = []
    progress = asyncio.Event()

    async def publisher() -> None:
        for n in range(300):
            batch = [msg("t", str(n))]
            if n % 7 == 0:
                batch.append(msg("noise", str(n)))
            if n % 11 == 0:
                batch.insert(0, msg("t", f"{n}-first"))
            published.extend(await broker.publish(batch))
            progress.set()
            if n % 25 == 0:
                clock.advance(0.001)
            await asyncio.sleep(0)

    async def published_at_least(count: int) -> None:
        while len(published) < count:
            progress.clear()
            await progress.wait()

    task = asyncio.create_task(publisher())
    resumes: list[tuple[int, History, int]] = []
    try:
        for threshold, back in ((20, None), (60, 10), (120, 1), (200, 0), (260, 150), (330, 5)):
            await asyncio.wait_for(published_at_least(threshold), WAIT)
            after = start if back is None else published[len(published) - 1 - back].id
            history, mark = await take_over(bnode, ["t"], after)
            resumes.append((after, history, mark))
        await asyncio.wait_for(task, WAIT)
    finally:
        task.cancel()

    last = on(published, {"t"})[-1]
    received = await sink.wait_for_id(last.id)
    assert received == [e for e in on(published, {"t"}) if e.id >= received[0].id]
    assert sink.resets == []
    for after, history, mark in resumes:
        assert history.reset is None, after
        live = [e for e in received[mark:] if e.id > history.head]
        assert [*history.events, *live] == [e for e in on(published, {"t"}) if e.id > after], after


async def test_resume_while_publishing_on_freshly_subscribed_topics(bnode: Node) -> None:
    broker, sink = bnode.broker, bnode.sink
    start = await broker.head()
    topics = ["a", "b", "c", "d"]
    published: list[Event] = []
    progress = asyncio.Event()

    async def publisher() -> None:
        for n in range(240):
            size = 1 + n % 3
            published.extend(await broker.publish([msg(topics[(n + j) % 4], f"{n}.{j}") for j in range(size)]))
            progress.set()
            await asyncio.sleep(0)

    async def published_at_least(count: int) -> None:
        while len(published) < count:
            progress.clear()
            await progress.wait()

    task = asyncio.create_task(publisher())
    resumes: list[tuple[list[str], int, History, int]] = []
    try:
        # Each resume subscribes at least one topic for the first time, mid-stream.
        for threshold, wanted, back in (
            (30, ["a"], None),
            (100, ["b"], 20),
            (180, ["a", "c"], 0),
            (300, ["d", "b"], 40),
        ):
            await asyncio.wait_for(published_at_least(threshold), WAIT)
            after = start if back is None else published[len(published) - 1 - back].id
            history, mark = await take_over(bnode, wanted, after)
            resumes.append((wanted, after, history, mark))
        await asyncio.wait_for(task, WAIT)
    finally:
        task.cancel()

    received = await sink.wait_for_id(published[-1].id)
    assert_increasing(ids(received))
    assert sink.resets == []
    for wanted, after, history, mark in resumes:
        assert history.reset is None, (wanted, after)
        live = [e for e in on(received[mark:], wanted) if e.id > history.head]
        expected = [e for e in on(published, wanted) if e.id > after]
        assert [*history.events, *live] == expected, (wanted, after)


# -- lifecycle ---------------------------------------------------------------------


async def test_closed_broker_refuses_publish_and_fails_ping(bnode: Node) -> None:
    broker = bnode.broker
    assert await broker.ping() is True
    await broker.publish([msg("a", "1")])

    await broker.close()
    assert await broker.ping() is False
    with pytest.raises(BrokerUnavailable):
        await broker.publish([msg("a", "2")])
    await broker.close()  # idempotent
    assert await broker.ping() is False


# -- idempotency -----------------------------------------------------------------


async def test_idempotency_key_publishes_once_and_answers_the_same_ids(bnode: Node) -> None:
    broker = bnode.broker
    await broker.subscribe(["t"])
    batch = [msg("t", "a"), msg("t", "b", "x")]
    first = await broker.publish(batch, idempotency_key="k1")
    again = await broker.publish(batch, idempotency_key="k1")
    assert again == first
    other = await broker.publish([msg("t", "c")], idempotency_key="k2")
    received = await bnode.sink.wait_for_id(other[0].id)
    assert ids(received) == [*ids(first), other[0].id]  # the retry delivered nothing
    history = await broker.history(["t"], first[0].id - 1)
    assert ids(history.events) == [*ids(first), other[0].id]
    with pytest.raises(IdempotencyConflict):
        await broker.publish([msg("t", "a")], idempotency_key="k1")


async def test_idempotency_key_expires_with_the_replay_ttl(open_node: OpenNode) -> None:
    bnode = await open_node(RetentionPolicy(size=10, ttl=5))
    first = await bnode.broker.publish([msg("t", "a")], idempotency_key="k")
    bnode.clock.advance(6)
    later = await bnode.broker.publish([msg("t", "a")], idempotency_key="k")
    assert later[0].id > first[0].id


async def test_resume_from_the_head_after_a_long_quiet_period_is_exact(open_node: OpenNode) -> None:
    """Regression: nothing published since the client's id means nothing missed, even past the TTL."""
    bnode = await open_node(RetentionPolicy(size=10, ttl=5))
    (event,) = await bnode.broker.publish([msg("t", "a")])
    bnode.clock.advance(60)
    if isinstance(bnode.broker, MemoryBroker):
        bnode.broker.sweep()  # what its sweeper does while time passes
    history = await bnode.broker.history(["t", "never-published"], event.id)
    assert history.events == []
    assert history.reset is None


async def test_node_directory_lists_announced_nodes_and_notices_silence(bnode: Node) -> None:
    """``NodeDirectory``: alive while announcing; listed as not alive once the TTL passed, then forgotten."""
    directory = bnode.broker
    assert isinstance(directory, NodeDirectory)
    await directory.announce("n1", '{"state":"serving"}', 60)
    await directory.announce("n2", '{"state":"draining"}', 0.2)
    listed = {n.node_id: n for n in await directory.nodes(forget=300)}
    assert listed["n1"] == NodeRecord("n1", '{"state":"serving"}', True)
    assert listed["n2"].record == '{"state":"draining"}'

    async def n2_silent() -> None:
        while any(n.node_id == "n2" and n.alive for n in await directory.nodes(forget=300)):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(n2_silent(), 5)
    assert {n.node_id for n in await directory.nodes(forget=300)} >= {"n1", "n2"}
    assert {n.node_id for n in await directory.nodes(forget=0)} == set()  # everyone announced > 0 s ago


async def test_node_entries_are_listed_per_node_and_taken_once(bnode: Node) -> None:
    """``NodeEntries``: put, replace, drop, list per node; of two takers only one gets a node's entries."""
    entries = bnode.broker
    assert isinstance(entries, NodeEntries)
    await entries.put_entries("n1", "k", {"a": "1", "b": "2"}, 60)
    await entries.put_entries("n1", "k", {"b": "3"}, 60)
    await entries.put_entries("n2", "k", {"c": "4"}, 60)
    await entries.put_entries("n2", "other", {"x": "y"}, 60)
    await entries.drop_entries("n1", "k", ["a", "never-there"], 60)
    assert await entries.entries("k", ["n1", "n2", "n3"]) == {"n1": {"b": "3"}, "n2": {"c": "4"}}
    first, second = await asyncio.gather(entries.take_entries("n2", "k"), entries.take_entries("n2", "k"))
    assert sorted([first, second], key=len) == [{}, {"c": "4"}]
    assert await entries.entries("k", ["n2"]) == {}
    assert await entries.entries("other", ["n2"]) == {"n2": {"x": "y"}}  # another kind is another set
    await entries.drop_entries("n1", "k", ["b"], 60)
    assert await entries.entries("k", ["n1"]) == {}
