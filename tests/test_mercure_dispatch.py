"""The Mercure dispatcher in process: routing by index and by shared matcher groups, private updates, cleanup.

The protocol behaviour is tested against real nodes (``test_mercure_hub.py``); these pin the
dispatcher's own bookkeeping, which a node can't show from outside.
"""

from __future__ import annotations

import pytest

from api.core.connection import Connection
from api.core.hub import Hub
from api.core.sse import event_frame
from api.mercure.dispatch import MercureHub, Subscriber, data_of
from api.mercure.matchers import Matchers
from api.mercure.updates import PublicationError, Update, parse_hub_id, read_update
from broker.memory import MemoryBroker

BOOKS = "https://example.com/books/:id"


@pytest.fixture
def mercure() -> MercureHub:
    broker = MemoryBroker()
    return MercureHub(Hub(broker, client_buffer=1 << 20, heartbeat=15), broker)


def admit(mercure: MercureHub, query: list[tuple[str, str]], reader: Matchers | None = None) -> Subscriber:
    matchers = Matchers.from_query(query)
    subscriber = mercure.admit(
        matchers,
        reader,
        exact=None if matchers.has_patterns else matchers.exact_topics,
        everything=matchers.wildcard,
    )
    subscriber.connection.go_live(0)
    return subscriber


def deliver(mercure: MercureHub, event_id: int, update: Update) -> None:
    mercure._dispatch(event_id, event_frame(event_id, update.encode()))


def received(connection: Connection) -> bytes:
    return b"".join(connection._chunks)


def test_subscribers_of_one_pattern_share_one_group_and_the_index_holds_exact_ones(mercure: MercureHub) -> None:
    first, second = admit(mercure, [("match_urlpattern", BOOKS)]), admit(mercure, [("match_urlpattern", BOOKS)])
    exact = admit(mercure, [("match", "https://example.com/books/1")])
    assert first.group is second.group is not None
    assert exact.group is None
    deliver(mercure, 10, Update(("https://example.com/books/1",), "hi"))
    deliver(mercure, 11, Update(("https://example.com/authors/1",), "no"))
    for subscriber in (first, second, exact):
        assert received(subscriber.connection) == b"id: #10\ndata: hi\n\n"
    for subscriber in (first, second, exact):
        mercure.forget(subscriber)
        mercure.hub.detach(subscriber.connection)
    assert (mercure._groups, mercure._by_topic, mercure.subscribers) == ({}, {}, 0)


def test_private_updates_are_decided_per_subscriber_within_a_group(mercure: MercureHub) -> None:
    allowed = admit(
        mercure, [("match_urlpattern", BOOKS)], Matchers.from_query([("match", "https://example.com/books/1")])
    )
    refused = admit(
        mercure, [("match_urlpattern", BOOKS)], Matchers.from_query([("match", "https://example.com/books/2")])
    )
    anonymous = admit(mercure, [("match_urlpattern", BOOKS)])
    deliver(mercure, 20, Update(("https://example.com/books/1",), "secret", private=True))
    assert received(allowed.connection) == b"id: #20\ndata: secret\n\n"
    assert received(refused.connection) == received(anonymous.connection) == b""


def test_an_update_with_alternate_topics_is_offered_once(mercure: MercureHub) -> None:
    both = admit(mercure, [("match", "a"), ("match", "b")])
    deliver(mercure, 30, Update(("a", "b"), "once", id="urn:x"))
    assert received(both.connection) == b"id: urn:x\ndata: once\n\n"


def test_events_that_are_no_update_are_skipped(mercure: MercureHub) -> None:
    everything = admit(mercure, [("match", "*")])
    mercure._dispatch(40, event_frame(40, "not json"))
    mercure._dispatch(41, event_frame(41, '{"v": 2, "t": ["a"]}'))
    assert received(everything.connection) == b""
    assert mercure.skipped == 2


def test_the_frame_of_an_update_splits_data_lines_and_carries_type_and_retry() -> None:
    update = Update(("t",), "a\r\nb\rc\nd", type="kind", retry="250")
    assert update.frame(7) == b"id: #7\nevent: kind\nretry: 250\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    assert Update.decode(update.encode()) == update
    assert data_of(7, event_frame(7, update.encode())) == update.encode()
    assert parse_hub_id("#7") == 7
    assert parse_hub_id("7") is None


def test_read_update_dedupes_alternates_and_ignores_unknown_fields() -> None:
    update = read_update([("topic", "a"), ("topic", "b"), ("topic", "a"), ("x", "y"), ("private", "")], 100)
    assert (update.topics, update.private) == (("a", "b"), True)
    with pytest.raises(PublicationError) as refused:
        read_update([("topic", "a"), ("id", "#1")], 100)
    assert refused.value.status == 400
