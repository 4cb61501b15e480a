"""Mercure's "Active Subscriptions" (subscription events, the subscription API) and Mercure updates on the native API.

Against real nodes with ``HERALD_MERCURE_SUBSCRIPTIONS=1``: one node on the embedded broker, two on Redis
(events and lists cross nodes), two behind the deployment's nginx. Each test is named after the section whose
MUSTs it observes. A subscription's entry is written before its event is published, so a test that has
awaited an event may read the list at once: no polling of the API.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from api import token as tokens
from api.mercure import subscriptions
from api.mercure.subscriptions import ActiveSubscriptions, Subscription, parse_api_path
from api.mercure.updates import UPDATES_TOPIC, Update
from broker.base import BrokerUnavailable, Event, Message, Reset
from broker.memory import MemoryBroker
from tests import redis_server
from tests.mercure.test_mercure_hub import (
    HUB,
    MISSING,
    NGINX,
    PUBLISHER,
    READER,
    SECRET,
    Cluster,
    _env,
    bearer,
    marker_first,
    mint,
    publish,
    subscribe,
)
from tests.server import Node, run_front, run_server
from tests.sse_client import EventStream
from tests.sse_parser import SSEEvent

pytestmark = pytest.mark.timeout(60)

COLLECTION = f"{HUB}/subscriptions"
WATCH = [("match_urlpattern", f"{COLLECTION}/*")]
"""The subscribe query of a client following every subscription event (a relative URL pattern)."""
WATCHER = mint(subscribe=[{"match": COLLECTION}, {"match": f"{COLLECTION}/*", "match_type": "urlpattern"}])
"""A token for subscription events and every resource of the subscription API."""
PUBLIC_NATIVE = "https://example.com/native/**"
ON = {"HERALD_MERCURE_SUBSCRIPTIONS": "1", "HERALD_PUBLIC_TOPICS": PUBLIC_NATIVE}

REDIS = pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed")


@pytest.fixture(
    scope="module",
    params=[pytest.param("memory", id="memory"), pytest.param("redis", id="redis", marks=REDIS), NGINX],
)
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    env = _env("memory" if request.param == "memory" else "redis", **ON)
    if request.param == "memory":
        with run_server(env) as node:
            yield Cluster(node, node)
    elif request.param == "redis":
        with run_server(env) as a, run_server(env) as b:
            yield Cluster(a, b)
    else:
        with run_server(env) as a, run_server(env) as b, run_front([a.port, b.port]) as front:
            yield Cluster(front, front)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture
def topic() -> str:
    """A topic no other test uses, with characters its event topic must percent-encode (``%`` among them)."""
    return f"https://example.com/books/{uuid.uuid4().hex[:8]}?q=a%20b&r=c d"


def documents(events: Sequence[SSEEvent]) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in events]


async def watcher(node: Node, last_event_id: str | None = None) -> EventStream:
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else None
    return await subscribe(node, WATCH, token=WATCHER, headers=headers)


async def events_about(stream: EventStream, match: str, count: int) -> list[dict[str, Any]]:
    """The next ``count`` subscription events about subscriptions of ``match`` (others' events skipped)."""
    found: list[dict[str, Any]] = []
    async with asyncio.timeout(15):
        while len(found) < count:
            event = await stream.next_event(15)
            if event.data:
                document = json.loads(event.data)
                if document.get("match") == match:
                    found.append(document)
    return found


async def api(http: httpx.AsyncClient, node: Node, path: str, token: str | None = WATCHER) -> httpx.Response:
    return await http.get(f"{node.url}{path}", headers=bearer(token) if token is not None else {})


# -- Subscription Events ---------------------------------------------------------------------------------------


async def test_subscription_events_are_private_updates_published_when_subscriptions_start_and_end(
    cluster: Cluster, topic: str
) -> None:
    watching = await watcher(cluster.a)
    payload = {"user": "42", "name": "Ada"}
    token = mint(
        authorization_details=[
            {"type": "mercure", "actions": ["subscribe"], "topics": [{"match": "*"}], "payload": payload}
        ]
    )
    pattern = topic.split("?")[0].rsplit("/", 1)[0] + "/:id"
    subscriber = await subscribe(cluster.b, [("match", topic), ("match_urlpattern", pattern)], token=token)
    try:
        started = await events_about(watching, topic, 1) + await events_about(watching, pattern, 1)
        ids = {d["subscriber"] for d in started}
        assert len(ids) == 1
        (subscriber_id,) = ids
        assert subscriber_id.startswith("urn:uuid:")
        exact, by_pattern = started
        assert exact == {
            "@context": "https://mercure.rocks/",
            "id": f"{COLLECTION}/exact/{quote(topic, safe='')}/{quote(subscriber_id, safe='')}",
            "type": "Subscription",
            "match_type": "exact",
            "match": topic,
            "subscriber": subscriber_id,
            "active": True,
            "payload": payload,
        }
        assert "%2520" in exact["id"]  # the topic's own "%20" encoded once more: "%" is data, not an escape
        assert by_pattern["match_type"] == "urlpattern"
        assert by_pattern["id"] == f"{COLLECTION}/urlpattern/{quote(pattern, safe='')}/{quote(subscriber_id, safe='')}"
    finally:
        await subscriber.close()
    ended = await events_about(watching, topic, 1) + await events_about(watching, pattern, 1)
    assert [(d["id"], d["active"]) for d in ended] == [(d["id"], False) for d in started]
    await watching.close()


async def test_subscription_events_reach_only_subscribers_authorized_for_them(
    cluster: Cluster, http: httpx.AsyncClient, topic: str
) -> None:
    """The events are private: a subscriber matching their topics without a grant for them gets none."""
    marker = f"https://example.com/marker/{uuid.uuid4().hex[:8]}"
    everything = mint(subscribe=[{"match": "https://example.com/*", "match_type": "urlpattern"}])
    nosy = await subscribe(cluster.a, [*WATCH, ("match", marker)], token=everything)
    watching = await watcher(cluster.a)
    subscriber = await subscribe(cluster.b, [("match", topic)])
    await subscriber.close()
    try:
        await events_about(watching, topic, 2)  # started, ended: both are in the sequence now
        await marker_first(http, cluster.a, nosy, marker)
    finally:
        await nosy.close()
        await watching.close()


# -- Subscription API ------------------------------------------------------------------------------------------


async def test_subscription_api_lists_the_clusters_subscriptions_in_json_ld(
    cluster: Cluster, http: httpx.AsyncClient, topic: str
) -> None:
    watching = await watcher(cluster.a)
    first = await subscribe(cluster.a, [("match", topic)])
    second = await subscribe(cluster.b, [("match", topic)])
    try:
        started = await events_about(watching, topic, 2)
        response = await api(http, cluster.b, COLLECTION)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/ld+json"
        assert response.headers["link"].endswith('/.well-known/mercure>; rel="mercure"')
        collection = response.json()
        assert collection["@context"] == "https://mercure.rocks/"
        assert (collection["id"], collection["type"]) == (COLLECTION, "Subscriptions")
        assert collection["last_event_id"].startswith("#")
        mine = [s for s in collection["subscriptions"] if s["match"] == topic]
        assert sorted(s["id"] for s in mine) == sorted(d["id"] for d in started)
        assert all(s["active"] is True and s["type"] == "Subscription" for s in mine)

        by_matcher = f"{COLLECTION}/exact/{quote(topic, safe='')}"
        listed = (await api(http, cluster.a, by_matcher)).json()
        assert listed["id"] == by_matcher
        assert sorted(s["id"] for s in listed["subscriptions"]) == sorted(d["id"] for d in started)

        one = await api(http, cluster.a, started[0]["id"])
        assert one.status_code == 200
        assert one.headers["content-type"] == "application/ld+json"
        assert {**started[0], "last_event_id": one.json()["last_event_id"]} == one.json()
        missing = f"{by_matcher}/{quote('urn:uuid:' + str(uuid.uuid4()), safe='')}"
        assert (await api(http, cluster.a, missing)).status_code == 404
        assert (await api(http, cluster.a, f"{COLLECTION}/exact")).status_code == 404
    finally:
        await first.close()
    (ended,) = await events_about(watching, topic, 1)
    assert ended["active"] is False
    remaining = [
        s["id"] for s in (await api(http, cluster.a, COLLECTION)).json()["subscriptions"] if s["match"] == topic
    ]
    assert remaining == [d["id"] for d in started if d["id"] != ended["id"]]
    await second.close()
    await watching.close()


async def test_subscription_api_last_event_id_resumes_the_events_after_the_list(
    cluster: Cluster, http: httpx.AsyncClient, topic: str
) -> None:
    """ "last_event_id ... SHOULD be passed back to the hub when subscribing to subscription events"."""
    watching = await watcher(cluster.a)
    before = await subscribe(cluster.a, [("match", topic)])
    await events_about(watching, topic, 1)  # its entry is written: the list below holds it
    listed = (await api(http, cluster.a, COLLECTION)).json()
    assert any(s["match"] == topic for s in listed["subscriptions"])
    after = await subscribe(cluster.b, [("match", topic)])
    (started,) = await events_about(watching, topic, 1)
    resumed = await watcher(cluster.b, last_event_id=listed["last_event_id"])
    try:
        assert resumed.response.headers["mercure-last-event-id"] == listed["last_event_id"]
        (replayed,) = await events_about(resumed, topic, 1)  # the one after the list, not the one in it
        assert replayed == started
    finally:
        for stream in (before, after, watching, resumed):
            await stream.close()


async def test_subscription_api_needs_a_token_granting_subscribe_on_the_requested_url(
    cluster: Cluster, http: httpx.AsyncClient, topic: str
) -> None:
    no_token = await api(http, cluster.a, COLLECTION, token=None)
    assert no_token.status_code == 401
    assert no_token.headers["www-authenticate"] == MISSING
    assert (await api(http, cluster.a, COLLECTION, token=PUBLISHER)).status_code == 403
    refused = await api(http, cluster.a, COLLECTION, token=mint(subscribe=[{"match": topic}]))
    assert refused.status_code == 403
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
    only_collection = mint(subscribe=[{"match": COLLECTION}])  # exact: the collection's URL, byte for byte
    assert (await api(http, cluster.a, COLLECTION, token=only_collection)).status_code == 200
    by_matcher = f"{COLLECTION}/exact/{quote(topic, safe='')}"
    assert (await api(http, cluster.a, by_matcher, token=only_collection)).status_code == 403
    assert (await api(http, cluster.a, by_matcher, token=READER)).status_code == 200  # "*" grants everything
    pattern = mint(subscribe=[{"match": f"https://hub.test{COLLECTION}/*", "match_type": "urlpattern"}])
    assert (await api(http, cluster.a, by_matcher, token=pattern)).status_code == 200  # absolute, same URL


async def test_discovery_metadata_advertises_active_subscriptions(cluster: Cluster, http: httpx.AsyncClient) -> None:
    document = (await http.get(f"{cluster.a.url}/.well-known/oauth-protected-resource{HUB}")).json()
    assert document["mercure_subscriptions"] is True


async def test_active_subscriptions_are_off_unless_asked_for(http: httpx.AsyncClient) -> None:
    with run_server(_env("memory")) as node:
        assert (await api(http, node, COLLECTION, token=READER)).status_code == 404
        document = (await http.get(f"{node.url}/.well-known/oauth-protected-resource{HUB}")).json()
        assert "mercure_subscriptions" not in document


@REDIS
@pytest.mark.timeout(90)
async def test_subscriptions_of_a_node_that_dies_vanish_from_the_list_and_end(
    http: httpx.AsyncClient, topic: str
) -> None:
    env = _env("redis", **ON, HERALD_NODE_ID=f"doomed-{uuid.uuid4().hex[:6]}")
    with run_server(_env("redis", **ON)) as survivor, run_server(env) as doomed:
        watching = await watcher(survivor)
        subscriber = await subscribe(doomed, [("match", topic)])
        (started,) = await events_about(watching, topic, 1)
        listed = (await api(http, survivor, COLLECTION)).json()["subscriptions"]
        assert started["id"] in [s["id"] for s in listed]
        doomed.process.send_signal(signal.SIGKILL)  # no goodbye: its streams never end on their own
        doomed.process.wait(10)
        (ended,) = await events_about(watching, topic, 1)  # published by the survivor once the registry sees it gone
        assert (ended["id"], ended["active"]) == (started["id"], False)
        listed = (await api(http, survivor, COLLECTION)).json()["subscriptions"]
        assert started["id"] not in [s["id"] for s in listed]
        await subscriber.close()
        await watching.close()


# -- Mercure updates on the native API ---------------------------------------------------------------------------


async def test_a_public_mercure_update_is_a_native_event_of_each_of_its_topics(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    canonical = f"https://example.com/native/{uuid.uuid4().hex[:8]}"
    alternate = canonical + "/alt"
    native = await EventStream.open(cluster.b.url, [canonical, alternate])
    try:
        assert native.response.status_code == 200
        await asyncio.wait_for(native.first_bytes.wait(), 10)
        await publish(http, cluster.a, [canonical, alternate], "line 1\nline 2", type="book-updated")
        received = await native.take(2)
        assert [(e.type, e.data) for e in received] == [("book-updated", "line 1\nline 2")] * 2
        assert all(e.last_event_id.isdigit() for e in received)  # native ids, in each topic's own sequence
        await publish(http, cluster.a, canonical, "secret", private="")
        await publish(http, cluster.a, canonical, "typed", type="reset")  # never a native reset
        (event,) = await native.take(1)
        assert (event.type, event.data) == ("message", "typed")
    finally:
        await native.close()


async def test_mercure_updates_stay_off_the_native_api_when_turned_off(http: httpx.AsyncClient) -> None:
    with run_server(_env("memory", HERALD_PUBLIC_TOPICS=PUBLIC_NATIVE, HERALD_MERCURE_NATIVE="0")) as node:
        topic = f"https://example.com/native/{uuid.uuid4().hex[:8]}"
        native = await EventStream.open(node.url, [topic])
        try:
            await asyncio.wait_for(native.first_bytes.wait(), 10)
            await publish(http, node, topic, "mercure only")
            producer = bearer(tokens.mint(SECRET, publish=["**"]))
            response = await http.post(
                f"{node.url}/publish", json={"topic": topic, "data": "native marker"}, headers=producer
            )
            assert response.status_code in (200, 201, 202), response.text
            (event,) = await native.take(1)
            assert event.data == "native marker"
        finally:
            await native.close()


# -- the parts ---------------------------------------------------------------------------------------------------


def test_subscription_topics_expand_each_variable_percent_encoded_exactly_once() -> None:
    subscription = Subscription("urlpattern", "https://example.com/:selector", "urn:uuid:bb3de268")
    assert subscription.topic(HUB) == (
        "/.well-known/mercure/subscriptions/urlpattern/https%3A%2F%2Fexample.com%2F%3Aselector/urn%3Auuid%3Abb3de268"
    )
    assert Subscription("exact", "a%2Fb é", "s").topic(HUB) == f"{COLLECTION}/exact/a%252Fb%20%C3%A9/s"
    assert Subscription.from_entry(subscription.entry()) == subscription
    assert Subscription.from_entry("not json") is None


@pytest.mark.parametrize(
    ("path", "selection"),
    [
        (COLLECTION, ("all", ())),
        (f"{COLLECTION}/exact/a%2Fb", ("matcher", ("exact", "a/b"))),
        (f"{COLLECTION}/exact/a%2Fb/urn%3Ax", ("one", ("exact", "a/b", "urn:x"))),
        (f"{COLLECTION}/exact", None),
        (f"{COLLECTION}/exact/a/b/c", None),
        (f"{COLLECTION}/exact//x", None),
        (f"{COLLECTION}x", None),
    ],
)
def test_subscription_api_paths_name_one_resource_each(path: str, selection: object) -> None:
    assert parse_api_path(path, HUB) == selection


class _NullSink:
    def on_event(self, event: Event) -> None:
        pass

    def on_reset(self, reset: Reset) -> None:
        pass


class _FlakyBroker(MemoryBroker):
    """The embedded broker, unavailable for its first ``failures`` publishes."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def publish(self, messages: Sequence[Message], idempotency_key: str | None = None) -> list[Event]:
        if self.failures:
            self.failures -= 1
            raise BrokerUnavailable("down for a moment")
        return await super().publish(messages, idempotency_key)


async def _events_of(broker: MemoryBroker, count: int) -> list[dict[str, Any]]:
    """The first ``count`` subscription documents of the update sequence, once there are that many."""
    async with asyncio.timeout(10):
        while True:
            events = (await broker.history((UPDATES_TOPIC,), 0)).events
            if len(events) >= count:
                updates = [Update.decode(e.data) for e in events]
                assert all(u is not None and u.private for u in updates)
                return [json.loads(u.data) for u in updates if u is not None]
            await asyncio.sleep(0.01)  # polling the tracker's own writer (no event to await from outside)


@pytest.mark.timeout(20)
async def test_tracker_publishes_in_order_and_retries_while_the_broker_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(subscriptions, "RETRY_DELAY", 0.01)
    broker = _FlakyBroker(failures=2)
    await broker.start(_NullSink())
    tracker = ActiveSubscriptions(broker, "n1", HUB)
    tracker.start()
    one = (Subscription("exact", "a", "urn:s1"), Subscription("urlpattern", "/b/:x", "urn:s1"))
    two = (Subscription("exact", "a", "urn:s2"),)
    try:
        tracker.started(one)
        tracker.started(two)
        tracker.ended(one)
        documents = await _events_of(broker, 5)
        assert [(d["subscriber"], d["match"], d["active"]) for d in documents] == [
            ("urn:s1", "a", True),
            ("urn:s1", "/b/:x", True),
            ("urn:s2", "a", True),
            ("urn:s1", "a", False),
            ("urn:s1", "/b/:x", False),
        ]
        _, listed = await tracker.listing()
        assert listed == list(two)
    finally:
        await tracker.close()
        await broker.close()


@pytest.mark.timeout(20)
async def test_tracker_takes_a_gone_nodes_entries_once_and_ends_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subscriptions, "REAP_EVERY", 0.01)
    broker = MemoryBroker()
    await broker.start(_NullSink())
    ghost = Subscription("exact", "t", "urn:ghost")
    await broker.announce("ghost", "{}", 0.05)  # stops announcing at once
    await broker.put_entries("ghost", subscriptions.KIND, {ghost.topic(HUB): ghost.entry()}, 60)
    await broker.announce("n1", "{}", 60)
    tracker = ActiveSubscriptions(broker, "n1", HUB)
    tracker.start()
    try:
        (ended,) = await _events_of(broker, 1)
        assert (ended["id"], ended["active"]) == (ghost.topic(HUB), False)
        assert await broker.entries(subscriptions.KIND, ["ghost"]) == {}
        assert (await tracker.listing())[1] == []
    finally:
        await tracker.close()
        await broker.close()
