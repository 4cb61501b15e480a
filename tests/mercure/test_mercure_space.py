"""The Mercure space in process: one hub, its index by exact topic and by shared matcher groups, private updates.

The protocol behaviour is tested against real nodes (``test_mercure_hub.py``); these pin the
bookkeeping a node can't show from outside: Mercure subscriptions are the hub's own connections,
indexed by selectors, and every event (native or Mercure) is fanned out by the same
:meth:`api.core.routing.Index.fan_out`.
"""

from __future__ import annotations

import pytest

from api.core.connection import Connection
from api.core.hub import Hub, Refused
from api.core.routing import Index, Selection
from api.mercure.matchers import Matchers
from api.mercure.space import MercureSpace, space_of
from api.mercure.updates import UPDATES_TOPIC, PublicationError, Update, parse_hub_id, read_update
from broker.base import Event
from broker.memory import MemoryBroker

BOOKS = "https://example.com/books/:id"


@pytest.fixture
def hub() -> Hub:
    return Hub(MemoryBroker(), client_buffer=1 << 20, heartbeat=15)


@pytest.fixture
def mercure(hub: Hub) -> MercureSpace:
    return space_of(hub, MemoryBroker())


def admit(hub: Hub, query: list[tuple[str, str]], reader: Matchers | None = None) -> Connection:
    matchers = Matchers.from_query(query)
    selection = Selection(
        UPDATES_TOPIC,
        exact=None if matchers.has_patterns else matchers.exact_topics,
        matcher=matchers,
        everything=matchers.wildcard,
        reader=reader,
    )
    connection = hub.admit((), selection=selection)
    connection.go_live(0)
    return connection


def deliver(hub: Hub, event_id: int, update: Update) -> None:
    hub.on_event(Event(event_id, UPDATES_TOPIC, update.encode()))


def received(connection: Connection) -> bytes:
    return b"".join(connection._chunks)


def test_subscribers_of_one_pattern_share_one_group_and_the_index_holds_exact_ones(
    hub: Hub, mercure: MercureSpace
) -> None:
    first, second = admit(hub, [("match_urlpattern", BOOKS)]), admit(hub, [("match_urlpattern", BOOKS)])
    exact = admit(hub, [("match", "https://example.com/books/1")])
    assert first.selection is not None
    assert second.selection is not None
    assert exact.selection is not None
    assert first.selection.group is second.selection.group is not None
    assert exact.selection.group is None
    assert mercure.index.by_topic == {"https://example.com/books/1": {exact}}
    deliver(hub, 10, Update(("https://example.com/books/1",), "hi"))
    deliver(hub, 11, Update(("https://example.com/authors/1",), "no"))
    for connection in (first, second, exact):
        assert received(connection) == b"id: #10\ndata: hi\n\n"
    assert hub.stats()["connections"] == 3
    for connection in (first, second, exact):
        hub.detach(connection)
    assert (mercure.index.groups, mercure.index.by_topic, mercure.subscribers) == ({}, {}, 0)
    assert hub.stats()["connections"] == 0


def test_private_updates_are_decided_per_subscriber_within_a_group(hub: Hub, mercure: MercureSpace) -> None:
    allowed = admit(hub, [("match_urlpattern", BOOKS)], Matchers.from_query([("match", "https://example.com/books/1")]))
    refused = admit(hub, [("match_urlpattern", BOOKS)], Matchers.from_query([("match", "https://example.com/books/2")]))
    anonymous = admit(hub, [("match_urlpattern", BOOKS)])
    exact_reader = admit(
        hub, [("match", "https://example.com/books/1")], Matchers.from_query([("match", "https://example.com/books/1")])
    )
    exact_anonymous = admit(hub, [("match", "https://example.com/books/1")])
    deliver(hub, 20, Update(("https://example.com/books/1",), "secret", private=True))
    assert received(allowed) == received(exact_reader) == b"id: #20\ndata: secret\n\n"
    assert received(refused) == received(anonymous) == received(exact_anonymous) == b""


def test_an_update_with_alternate_topics_is_offered_once(hub: Hub, mercure: MercureSpace) -> None:
    both = admit(hub, [("match", "a"), ("match", "b")])
    deliver(hub, 30, Update(("a", "b"), "once", id="urn:x"))
    assert received(both) == b"id: urn:x\ndata: once\n\n"


def test_events_that_are_no_update_are_skipped(hub: Hub, mercure: MercureSpace) -> None:
    everything = admit(hub, [("match", "*")])
    hub.on_event(Event(40, UPDATES_TOPIC, "not json"))
    hub.on_event(Event(41, UPDATES_TOPIC, '{"v": 2, "t": ["a"]}'))
    assert received(everything) == b""
    assert mercure.skipped == 2


def test_native_and_mercure_events_take_the_one_fan_out(
    hub: Hub, mercure: MercureSpace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No tap connection, no second dispatcher: both kinds of event go through Index.fan_out."""
    native = hub.admit(["a"])
    native.go_live(0)
    subscriber = admit(hub, [("match", "a")])
    calls: list[tuple[str, ...]] = []
    fan_out = Index.fan_out

    def spy(index: Index, event_id: int, delivery: object) -> bool:
        calls.append(delivery.topics)  # type: ignore[attr-defined]
        return fan_out(index, event_id, delivery)  # type: ignore[arg-type]

    monkeypatch.setattr(Index, "fan_out", spy)
    hub.on_event(Event(50, "a", "native"))
    deliver(hub, 51, Update(("a",), "mercure"))
    assert calls == [("a",), ("a",)]
    assert received(native) == b"id: 50\ndata: native\n\n"  # the native "a" and Mercure's "a" are two spaces
    assert received(subscriber) == b"id: #51\ndata: mercure\n\n"
    assert hub.stats()["connections"] == 2


def test_one_connection_limit_counts_every_space(mercure: MercureSpace) -> None:
    hub = Hub(MemoryBroker(), client_buffer=1 << 20, heartbeat=15, max_connections=2)
    space_of(hub, MemoryBroker())
    hub.admit(["a"])
    admit(hub, [("match", "b")])
    with pytest.raises(Refused):
        admit(hub, [("match", "c")])
    with pytest.raises(Refused):
        hub.admit(["d"])
    assert hub.refused["full"] == 2


def test_the_frame_of_an_update_splits_data_lines_and_carries_type_and_retry() -> None:
    update = Update(("t",), "a\r\nb\rc\nd", type="kind", retry="250")
    assert update.frame(7) == b"id: #7\nevent: kind\nretry: 250\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    assert Update.decode(update.encode()) == update
    assert parse_hub_id("#7") == 7
    assert parse_hub_id("7") is None


def test_read_update_dedupes_alternates_and_ignores_unknown_fields() -> None:
    update = read_update([("topic", "a"), ("topic", "b"), ("topic", "a"), ("x", "y"), ("private", "")], 100)
    assert (update.topics, update.private) == (("a", "b"), True)
    with pytest.raises(PublicationError) as refused:
        read_update([("topic", "a"), ("id", "#1")], 100)
    assert refused.value.status == 400
