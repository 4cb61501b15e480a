"""The Mercure hub (``/.well-known/mercure``) against real nodes, on both brokers, across two nodes, behind nginx.

Written from the Mercure protocol (``spec/mercure.md``, draft-dunglas-mercure-08); each test is named after
the section whose MUSTs it observes. On Redis the cluster is two nodes on one ``redis-server``: updates are
published on node A and read on node B (a subscriber on B gets what a publisher on A sends, once, resumes
there from ids issued through A). On the embedded broker A and B are the same node; in the ``nginx``
variant both are the deployment's nginx in front of two Redis nodes (each request goes to either).

No test sleeps to synchronise: a stream is live once its first bytes arrived (it is registered and the
node fed before they are sent), and "nothing was delivered" is shown by a marker update published after
it arriving first.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import jwt
import pytest
from redis.cluster import RedisCluster as SyncRedisCluster

from api import token as tokens
from api.mercure.updates import UPDATES_TOPIC
from broker.redis.spread import partition_of, partition_tags
from tests import redis_server
from tests.server import Node, nginx_available, run_front, run_server
from tests.sse_client import EventStream

pytestmark = pytest.mark.timeout(60)

SECRET = secrets.token_urlsafe(48)
AUDIENCE = "https://hub.test/.well-known/mercure"
METADATA_URL = "https://hub.test/.well-known/oauth-protected-resource/.well-known/mercure"
HUB = "/.well-known/mercure"
ALLOWED_ORIGIN = "http://app.test:8080"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}

MISSING = f'Bearer resource_metadata="{METADATA_URL}"'
INVALID = (
    f'Bearer error="invalid_token", error_description="The access token is invalid", resource_metadata="{METADATA_URL}"'
)

BROKERS = [
    pytest.param("memory", id="memory"),
    pytest.param(
        "redis",
        id="redis",
        marks=pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed"),
    ),
]

Matcher = dict[str, str]


def mint(
    *,
    publish: Sequence[Matcher] = (),
    subscribe: Sequence[Matcher] = (),
    ttl: float = 86400,
    typ: str = "at+jwt",
    key: str = SECRET,
    **claims: Any,
) -> str:
    """An access token with ``mercure`` authorization details; ``claims`` replace or (None) drop claims."""
    details = []
    if publish:
        details.append({"type": "mercure", "actions": ["publish"], "topics": list(publish)})
    if subscribe:
        details.append({"type": "mercure", "actions": ["subscribe"], "topics": list(subscribe)})
    body: dict[str, Any] = {"aud": AUDIENCE, "exp": int(time.time() + ttl), "authorization_details": details}
    for name, value in claims.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return jwt.encode(body, key, algorithm="HS256", headers={"typ": typ})


EVERYTHING = [{"match": "*"}]
PUBLISHER = mint(publish=EVERYTHING)
READER = mint(subscribe=EVERYTHING)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Cluster:
    a: Node
    """Where updates are published."""
    b: Node
    """Where they are read (the same node on the embedded broker)."""


def _env(broker: str, **extra: str) -> dict[str, str]:
    env = {
        "HERALD_JWT_SECRET": SECRET,
        "HERALD_MERCURE_AUDIENCE": AUDIENCE,
        "HERALD_HEARTBEAT": "1",
        "HERALD_MAX_EVENT_BYTES": "4096",
        "HERALD_MAX_BODY_BYTES": "65536",
        "HERALD_CORS_ORIGINS": ALLOWED_ORIGIN,
        **extra,
    }
    if broker == "redis":
        env["REDIS_URL"] = redis_server.shared_server().url
    return env


NGINX = pytest.param(
    "nginx",
    id="nginx",
    marks=pytest.mark.skipif(
        not (redis_server.available() and nginx_available()), reason="redis-server or nginx is not installed"
    ),
)


SPREAD = pytest.param(
    "spread",
    id="spread",
    marks=pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed"),
)
"""Two nodes on a Redis Cluster with the topics over 3 partitions (the hub numbers by its feed topic's)."""


@pytest.fixture(scope="module", params=[*BROKERS, NGINX, SPREAD])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """One node (embedded broker), two nodes on Redis (A publishes, B reads), two behind the deployment's nginx, or
    two on a Redis Cluster with the topics spread over partitions."""
    env = _env("memory" if request.param == "memory" else "redis")
    if request.param == "spread":
        env["REDIS_URL"] = redis_server.shared_cluster().url
        env["HERALD_REDIS_PARTITIONS"] = "3"
    if request.param == "memory":
        with run_server(env) as node:
            yield Cluster(node, node)
    elif request.param in ("redis", "spread"):
        with run_server(env) as a, run_server(env) as b:
            yield Cluster(a, b)
    else:
        with run_server(env) as a, run_server(env) as b, run_front([a.port, b.port]) as front:
            yield Cluster(front, front)


@pytest.fixture(scope="module", params=BROKERS)
def anonymous_node(request: pytest.FixtureRequest) -> Iterator[Node]:
    with run_server(_env(request.param, HERALD_MERCURE_ANONYMOUS="1")) as node:
        yield node


@pytest.fixture
def book() -> str:
    """A topic no other test uses, under a URL-pattern-friendly prefix."""
    return f"https://example.com/books/{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def post(
    http: httpx.AsyncClient, node: Node, fields: Sequence[tuple[str, str]], token: str | None = PUBLISHER
) -> httpx.Response:
    headers = {**FORM, **(bearer(token) if token is not None else {})}
    return await http.post(f"{node.url}{HUB}", content=urlencode(list(fields)), headers=headers)


async def publish(http: httpx.AsyncClient, node: Node, topic: str | Sequence[str], data: str, **fields: str) -> str:
    """Publish an update (``private=""`` makes it private); its id."""
    topics = [topic] if isinstance(topic, str) else list(topic)
    response = await post(http, node, [*(("topic", t) for t in topics), ("data", data), *fields.items()])
    assert response.status_code == 200, response.text
    return response.text


async def subscribe(
    node: Node,
    params: Sequence[tuple[str, str]],
    token: str | None = READER,
    headers: dict[str, str] | None = None,
    live: bool = True,
) -> EventStream:
    """Open a Mercure stream; with ``live``, wait (bounded) until it is registered and fed."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(10, read=None))
    all_headers = {"Accept": "text/event-stream", **(bearer(token) if token is not None else {}), **(headers or {})}
    request = client.build_request("GET", f"{node.url}{HUB}", params=list(params), headers=all_headers)
    try:
        response = await asyncio.wait_for(client.send(request, stream=True), 10)
    except BaseException:
        await client.aclose()
        raise
    stream = EventStream(client, response)
    if live and response.status_code == 200:
        await asyncio.wait_for(stream.first_bytes.wait(), 10)
    return stream


async def position_of(stream: EventStream) -> str:
    """The id of a stream's position frame (``id:`` without data), once it arrived (it follows ``retry:``)."""
    async with asyncio.timeout(10):
        while not stream.parser.last_event_id:
            await asyncio.sleep(0.01)  # polling the stream's own reader (it runs on this loop)
    return stream.parser.last_event_id


async def marker_first(
    http: httpx.AsyncClient, node: Node, streams: EventStream | Sequence[EventStream], topic: str
) -> None:
    """Nothing reached the streams before a public marker update published now on ``topic``."""
    marker = await publish(http, node, topic, "marker")
    for stream in [streams] if isinstance(streams, EventStream) else streams:
        event = await stream.next_event(5)
        assert (event.last_event_id, event.data) == (marker, "marker")


# -- Publication -------------------------------------------------------------------------------------------------


async def test_publication_answers_200_text_plain_with_the_update_id(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    response = await post(http, cluster.a, [("topic", book), ("data", "x")])
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text.startswith("#")  # a hub-generated id: a fragment ("Publication", id)
    custom = f"urn:uuid:{uuid.uuid4()}"
    assert await publish(http, cluster.a, book, "y", id=custom) == custom


async def test_publication_update_on_node_a_reaches_matching_subscribers_on_node_b_once(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    by_exact = await subscribe(cluster.b, [("match", book)])
    by_pattern = await subscribe(cluster.b, [("match_urlpattern", "https://example.com/books/:id")])
    by_both = await subscribe(cluster.b, [("match", book), ("match_exact", book), ("match_urlpattern", book)])
    other = await subscribe(cluster.b, [("match", book + "-other")])
    try:
        update_id = await publish(http, cluster.a, book, "line 1\nline 2\r\nline 3", type="book-updated", retry="1500")
        for stream in (by_exact, by_pattern, by_both):
            event = await stream.next_event(5)
            assert (event.type, event.data, event.last_event_id) == (
                "book-updated",
                "line 1\nline 2\nline 3",
                update_id,
            )
            assert stream.parser.retry == 1500
        await marker_first(http, cluster.a, by_both, book)  # the update came once
        await marker_first(http, cluster.a, other, book + "-other")
    finally:
        for stream in (by_exact, by_pattern, by_both, other):
            await stream.close()


async def test_publication_alternate_topics_reach_a_subscriber_once(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    alternate = book + "/alternate"
    both = await subscribe(cluster.b, [("match", book), ("match", alternate)])
    only_alternate = await subscribe(cluster.b, [("match", alternate)])
    try:
        update_id = await publish(http, cluster.a, [book, alternate], "one update")
        for stream in (both, only_alternate):
            event = await stream.next_event(5)
            assert (event.data, event.last_event_id) == ("one update", update_id)
        await marker_first(http, cluster.a, both, book)
    finally:
        await both.close()
        await only_alternate.close()


async def test_publication_unknown_fields_are_ignored_and_private_needs_no_value(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    stream = await subscribe(cluster.b, [("match", book)])
    try:
        response = await post(http, cluster.a, [("topic", book), ("data", "p"), ("private", ""), ("future", "x")])
        assert response.status_code == 200
        event = await stream.next_event(5)
        assert (event.data, event.last_event_id) == ("p", response.text)
    finally:
        await stream.close()


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        pytest.param([("data", "no topic")], 400, id="no-topic"),
        pytest.param([("topic", "*")], 400, id="wildcard-topic"),
        pytest.param([("topic", "https://example.com/a\u200bb")], 400, id="format-char-in-topic"),
        pytest.param([("topic", "https://example.com/a\x7fb")], 400, id="del-in-topic"),
        pytest.param([("topic", "x"), ("topic", "y\x85")], 400, id="c1-in-alternate"),
        pytest.param([("topic", "x"), ("type", "mercure")], 400, id="mercure-type"),
        pytest.param([("topic", "x"), ("type", "a\nid: 1")], 400, id="line-break-in-type"),
        pytest.param([("topic", "x"), ("id", "#123")], 400, id="id-starting-with-hash"),
        pytest.param([("topic", "x"), ("id", "earliest")], 400, id="id-earliest"),
        pytest.param([("topic", "x"), ("id", "a\rb")], 400, id="control-char-in-id"),
        pytest.param([("topic", "x"), ("id", "a\u2066b")], 400, id="format-char-in-id"),
        pytest.param([("topic", "x"), ("retry", "1.5")], 400, id="retry-not-digits"),
        pytest.param([("topic", "x"), ("retry", "\u0661")], 400, id="retry-not-ascii-digits"),
        pytest.param([("topic", "/.well-known/mercure/subscriptions/exact/a/b")], 403, id="reserved-namespace"),
        pytest.param([("topic", "https://other.test/.well-known/mercure")], 403, id="reserved-any-authority"),
        pytest.param([("topic", "/.well-known/%6Dercure/x")], 403, id="reserved-percent-encoded"),
        pytest.param([("topic", "/books/../.well-known/mercure/x")], 403, id="reserved-dot-segments"),
        pytest.param([("topic", "x"), ("data", "d" * 4097)], 413, id="data-over-limit"),
        pytest.param([("topic", "x" * 2049)], 413, id="topic-over-limit"),
        pytest.param([("topic", f"t{i}") for i in range(101)], 413, id="too-many-topics"),
        pytest.param([("topic", "x"), ("id", "i" * 1025)], 413, id="id-over-limit"),
    ],
)
async def test_publication_refuses_what_the_spec_forbids(
    cluster: Cluster, http: httpx.AsyncClient, fields: list[tuple[str, str]], status: int
) -> None:
    response = await post(http, cluster.a, fields)
    assert response.status_code == status, response.text
    assert "www-authenticate" not in response.headers  # malformed independently of the token


async def test_publication_limits_the_body_and_wants_a_form(cluster: Cluster, http: httpx.AsyncClient) -> None:
    big = await http.post(
        f"{cluster.a.url}{HUB}", content=b"topic=x&data=" + b"d" * 70_000, headers={**FORM, **bearer(PUBLISHER)}
    )
    assert big.status_code == 413
    as_json = await http.post(f"{cluster.a.url}{HUB}", json={"topic": "x"}, headers=bearer(PUBLISHER))
    assert as_json.status_code == 415
    not_utf8 = await http.post(f"{cluster.a.url}{HUB}", content=b"topic=%FF", headers={**FORM, **bearer(PUBLISHER)})
    assert not_utf8.status_code == 400


async def test_publication_reaches_nobody_when_refused(cluster: Cluster, http: httpx.AsyncClient, book: str) -> None:
    stream = await subscribe(cluster.b, [("match", book)])
    try:
        assert (await post(http, cluster.a, [("topic", book), ("type", "mercure")])).status_code == 400
        only_book = mint(publish=[{"match": book}])
        refused = await post(http, cluster.a, [("topic", book), ("topic", book + "/other"), ("data", "no")], only_book)
        assert refused.status_code == 403
        await marker_first(http, cluster.a, stream, book)
    finally:
        await stream.close()


# -- Authorization: Error Responses, Token Validation, Publishers, Subscribers ------------------------------------


async def test_error_responses_publish_without_a_token_is_401_with_no_error_code(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    response = await post(http, cluster.a, [("topic", book)], token=None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == MISSING


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(mint(publish=EVERYTHING, typ="JWT"), id="typ-not-at+jwt"),
        pytest.param(mint(publish=EVERYTHING, key="another-secret-" * 4), id="bad-signature"),
        pytest.param(mint(publish=EVERYTHING, ttl=-5), id="expired"),
        pytest.param(mint(publish=EVERYTHING, exp=None), id="no-exp"),
        pytest.param(mint(publish=EVERYTHING, nbf=int(time.time()) + 3600), id="not-yet-valid"),
        pytest.param(mint(publish=EVERYTHING, aud="https://another-hub.test/.well-known/mercure"), id="wrong-aud"),
        pytest.param(mint(publish=EVERYTHING, aud=None), id="no-aud"),
        pytest.param(mint(authorization_details=[{"type": "mercure", "actions": ["publish"]}]), id="detail-no-topics"),
        pytest.param("not.a.token", id="garbage"),
    ],
)
async def test_token_validation_refuses_with_invalid_token(
    cluster: Cluster, http: httpx.AsyncClient, book: str, token: str
) -> None:
    published = await post(http, cluster.a, [("topic", book)], token=token)
    assert (published.status_code, published.headers["www-authenticate"]) == (401, INVALID)
    stream = await subscribe(cluster.b, [("match", book)], token=token, live=False)
    try:
        assert (stream.response.status_code, stream.response.headers["www-authenticate"]) == (401, INVALID)
    finally:
        await stream.close()


async def test_publishers_need_publish_on_every_topic(cluster: Cluster, http: httpx.AsyncClient, book: str) -> None:
    pattern = mint(publish=[{"match": "https://example.com/books/:id", "match_type": "urlpattern"}])
    assert (await post(http, cluster.a, [("topic", book)], pattern)).status_code == 200
    reader_only = await post(http, cluster.a, [("topic", book)], READER)
    assert reader_only.status_code == 403
    assert reader_only.headers["www-authenticate"].startswith('Bearer error="insufficient_scope"')
    other = await post(http, cluster.a, [("topic", "https://example.com/authors/1")], pattern)
    assert other.status_code == 403


async def test_subscribers_private_updates_reach_only_authorized_subscribers(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    pattern = [("match_urlpattern", "https://example.com/books/:id")]
    allowed = await subscribe(cluster.b, pattern, token=mint(subscribe=[{"match": book}]))
    via_alternate = await subscribe(cluster.b, pattern, token=mint(subscribe=[{"match": book + "/owner"}]))
    not_allowed = await subscribe(cluster.b, pattern, token=mint(subscribe=[{"match": book + "-other"}]))
    no_rights = await subscribe(cluster.b, pattern, token=mint(publish=EVERYTHING))
    try:
        secret = await publish(http, cluster.a, book, "secret", private="on")
        shared = await publish(http, cluster.a, [book, book + "/owner"], "shared", private="on")
        assert [(e.data, e.last_event_id) for e in await allowed.take(2, 5)] == [("secret", secret), ("shared", shared)]
        event = await via_alternate.next_event(5)
        assert (event.data, event.last_event_id) == ("shared", shared)
        await marker_first(http, cluster.a, [not_allowed, no_rights, via_alternate], book)
    finally:
        for stream in (allowed, via_alternate, not_allowed, no_rights):
            await stream.close()


async def test_subscribers_stream_ends_at_the_tokens_exp(cluster: Cluster, book: str) -> None:
    stream = await subscribe(cluster.b, [("match", book)], token=mint(subscribe=EVERYTHING, ttl=2))
    try:
        await asyncio.wait_for(stream.ended.wait(), 10)
    finally:
        await stream.close()


async def test_error_responses_subscribe_without_a_token_is_401_when_anonymous_subscribers_are_off(
    cluster: Cluster, book: str
) -> None:
    refused = await subscribe(cluster.b, [("match", book)], token=None, live=False)
    try:
        assert (refused.response.status_code, refused.response.headers["www-authenticate"]) == (401, MISSING)
    finally:
        await refused.close()


async def test_authorization_anonymous_subscribers_receive_public_updates_only(
    anonymous_node: Node, http: httpx.AsyncClient, book: str
) -> None:
    stream = await subscribe(anonymous_node, [("match", book)], token=None)
    try:
        assert stream.response.status_code == 200
        await publish(http, anonymous_node, book, "private", private="on")
        await marker_first(http, anonymous_node, stream, book)
    finally:
        await stream.close()


async def test_presenting_the_access_token_header_then_query_then_cookie(
    anonymous_node: Node, http: httpx.AsyncClient, book: str
) -> None:
    reader = mint(subscribe=[{"match": book}])
    cookie = {"Cookie": f"__Secure-mercure_access_token={reader}"}
    legacy_cookie = {"Cookie": f"mercureAuthorization={reader}"}
    by_query = await subscribe(anonymous_node, [("match", book), ("access_token", reader)], token=None)
    by_cookie = await subscribe(anonymous_node, [("match", book)], token=None, headers=cookie)
    by_legacy_cookie = await subscribe(anonymous_node, [("match", book)], token=None, headers=legacy_cookie)
    # The header wins: a token without subscribe rights hides the cookie's (anonymous mode lets it in).
    header_wins = await subscribe(anonymous_node, [("match", book)], token=PUBLISHER, headers=cookie)
    try:
        assert "private" in by_query.response.headers["cache-control"]
        secret = await publish(http, anonymous_node, book, "secret", private="on")
        for stream in (by_query, by_cookie, by_legacy_cookie):
            event = await stream.next_event(5)
            assert (event.data, event.last_event_id) == ("secret", secret)
        await marker_first(http, anonymous_node, header_wins, book)
    finally:
        for stream in (by_query, by_cookie, by_legacy_cookie, header_wins):
            await stream.close()


# -- Subscription ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        pytest.param([], id="no-matcher"),
        pytest.param([("topic", "https://example.com/{id")], id="legacy-topic-malformed-uri-template"),
        pytest.param([("match", "x"), ("match_regexp", "x")], id="unknown-matcher-type"),
        pytest.param([("match", "x"), ("MATCH_EXACT", "x")], id="match-namespace-is-case-insensitive"),
        pytest.param([("matchx", "x")], id="match-prefix-reserved"),
        pytest.param([("match", "a\x00b")], id="control-char"),
        pytest.param([("match", "a\u200eb")], id="format-char"),
        pytest.param([("match_urlpattern", "https://example.com/(")], id="bad-url-pattern"),
        pytest.param([("match", "m" * 2049)], id="matcher-over-limit"),
        pytest.param([("match", f"t{i}") for i in range(101)], id="too-many-matchers"),
    ],
)
async def test_subscription_refuses_bad_matchers_with_400(cluster: Cluster, params: list[tuple[str, str]]) -> None:
    stream = await subscribe(cluster.b, params, live=False)
    try:
        assert stream.response.status_code == 400
    finally:
        await stream.close()


async def test_subscription_wildcard_and_relative_patterns(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    everything = await subscribe(cluster.b, [("match", "*")])
    relative = await subscribe(cluster.b, [("match_urlpattern", "/relative/:id")])
    try:
        update_id = await publish(http, cluster.a, book, "any")
        event = await everything.next_event(5)
        assert event.last_event_id == update_id  # (other tests' updates may come first on a shared broker)
        relative_id = await publish(http, cluster.a, f"https://hub.test/relative/{uuid.uuid4().hex}", "rel")
        event = await relative.next_event(5)
        assert (event.data, event.last_event_id) == ("rel", relative_id)
    finally:
        await everything.close()
        await relative.close()


# -- Reconnection, State Reconciliation ----------------------------------------------------------------------


async def test_reconciliation_resume_from_a_hub_id_is_exact_on_another_node(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    first = await publish(http, cluster.a, book, "1")
    second = await publish(http, cluster.a, book, "2")
    third = await publish(http, cluster.a, book, "3")
    stream = await subscribe(cluster.b, [("match", book)], headers={"Last-Event-ID": first})
    try:
        assert stream.response.headers["mercure-last-event-id"] == first
        assert [(e.data, e.last_event_id) for e in await stream.take(2, 5)] == [("2", second), ("3", third)]
        fourth = await publish(http, cluster.a, book, "4")
        event = await stream.next_event(5)
        assert (event.data, event.last_event_id) == ("4", fourth)
    finally:
        await stream.close()


@pytest.fixture(scope="module")
def spread_cluster() -> Iterator[Cluster]:
    """Two nodes on a Redis Cluster with the topics over 3 partitions (as the ``spread`` cluster, its own)."""
    env = {**_env("redis"), "REDIS_URL": redis_server.shared_cluster().url, "HERALD_REDIS_PARTITIONS": "3"}
    with run_server(env) as a, run_server(env) as b:
        yield Cluster(a, b)


async def test_regression_on_partitions_updates_are_numbered_in_the_feeds_own_sequence_on_every_node(
    spread_cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    """With topics over partitions a node numbers its feed's events in delivery order; that number runs ahead of the
    Mercure feed's own sequence once another partition's event comes in with a higher one, and updates went out as
    ``#<the node's number>``, which the publisher was not told and no other node could resume from. Here node B's
    numbering is pushed ahead (another partition's counter 100 s ahead, one native event B delivers): its
    subscribers still see the publish's id, and a resume from it on node A is exact."""
    a, b = spread_cluster.a, spread_cluster.b
    feed_partition = partition_of(UPDATES_TOPIC, 3)
    other = (feed_partition + 1) % 3
    native = next(t for t in (f"native-{uuid.uuid4().hex[:8]}-{i}" for i in range(1000)) if partition_of(t, 3) == other)
    tag = partition_tags(3)[other]
    admin = SyncRedisCluster.from_url(redis_server.shared_cluster().url, decode_responses=True)
    try:
        ahead = int(time.time() * 1_000_000) + 100_000_000
        admin.set(f"{tag}:id", ahead)
    finally:
        admin.close()
    rights = jwt.encode({"exp": int(time.time()) + 600, "herald": {"publish": ["**"], "subscribe": ["**"]}}, SECRET)
    async with await EventStream.open(b.url, [native], headers=bearer(rights)) as stream:
        answer = await http.post(f"{a.url}/publish", json={"topic": native, "data": "x"}, headers=bearer(rights))
        assert answer.status_code == 201, answer.text
        (event,) = await stream.take(1)
        assert event.data == "x"
    mercure = await subscribe(b, [("match", book)])
    try:
        first = await publish(http, a, book, "1")
        got = await mercure.next_event(5)
        assert (got.data, got.last_event_id) == ("1", first)
    finally:
        await mercure.close()
    second = await publish(http, a, book, "2")
    resumed = await subscribe(a, [("match", book)], headers={"Last-Event-ID": got.last_event_id})
    try:
        assert resumed.response.headers["mercure-last-event-id"] == first
        assert [(e.data, e.last_event_id) for e in await resumed.take(1, 5)] == [("2", second)]
    finally:
        await resumed.close()


async def test_reconciliation_a_fresh_stream_starts_with_its_position(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    stream = await subscribe(cluster.b, [("match", book)])
    position = await position_of(stream)
    await stream.close()
    assert position.startswith("#")
    assert "mercure-last-event-id" not in stream.response.headers
    missed = await publish(http, cluster.a, book, "missed")
    resumed = await subscribe(cluster.b, [("match", book)], headers={"Last-Event-ID": position})
    try:
        assert resumed.response.headers["mercure-last-event-id"] == position
        event = await resumed.next_event(5)
        assert (event.data, event.last_event_id) == ("missed", missed)
    finally:
        await resumed.close()


async def test_reconciliation_publisher_supplied_ids_are_sse_ids_and_cursors(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    live = await subscribe(cluster.b, [("match", book)])
    first, second = f"urn:uuid:{uuid.uuid4()}", f"https://example.com/revisions/{uuid.uuid4()}"
    try:
        assert await publish(http, cluster.a, book, "one", id=first) == first
        assert await publish(http, cluster.a, book, "two", id=second) == second
        assert [e.last_event_id for e in await live.take(2, 5)] == [first, second]
    finally:
        await live.close()
    after_reuse = await publish(http, cluster.a, book, "three", id=first)  # a reused id: the earliest counts
    resumed = await subscribe(cluster.b, [("match", book)], headers={"Last-Event-ID": first})
    try:
        assert resumed.response.headers["mercure-last-event-id"] == first
        events = await resumed.take(2, 5)
        assert [(e.data, e.last_event_id) for e in events] == [("two", second), ("three", after_reuse)]
    finally:
        await resumed.close()


async def test_reconciliation_last_event_id_query_parameter_and_header_precedence(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    first = await publish(http, cluster.a, book, "1")
    second = await publish(http, cluster.a, book, "2")
    by_query = await subscribe(cluster.b, [("match", book), ("last_event_id", first)])
    header_wins = await subscribe(
        cluster.b, [("match", book), ("last_event_id", first)], headers={"Last-Event-ID": second}
    )
    try:
        assert by_query.response.headers["mercure-last-event-id"] == first
        event = await by_query.next_event(5)
        assert (event.data, event.last_event_id) == ("2", second)
        assert header_wins.response.headers["mercure-last-event-id"] == second
        await marker_first(http, cluster.a, header_wins, book)
    finally:
        await by_query.close()
        await header_wins.close()


@pytest.mark.parametrize("cursor", ["earliest", "urn:uuid:never-published", "#1", "#99999999999999999"])
async def test_reconciliation_earliest_and_unknown_cursors_replay_everything_retained(
    cluster: Cluster, http: httpx.AsyncClient, book: str, cursor: str
) -> None:
    first = await publish(http, cluster.a, book, "1")
    second = await publish(http, cluster.a, book, "2")
    stream = await subscribe(cluster.b, [("match", book)], headers={"Last-Event-ID": cursor})
    try:
        assert stream.response.headers["mercure-last-event-id"] == "earliest"
        assert [e.last_event_id for e in await stream.take(2, 5)] == [first, second]
    finally:
        await stream.close()


async def test_reconciliation_an_empty_cursor_starts_now_and_is_answered_with_the_position(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    await publish(http, cluster.a, book, "old")
    stream = await subscribe(cluster.b, [("match", book), ("last_event_id", "")])
    try:
        position = stream.response.headers["mercure-last-event-id"]
        assert position.startswith("#")
        assert await position_of(stream) == position
        await marker_first(http, cluster.a, stream, book)
    finally:
        await stream.close()


async def test_reconciliation_private_updates_are_not_replayed_to_unauthorized_subscribers(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    start = await publish(http, cluster.a, book, "start")
    await publish(http, cluster.a, book, "secret", private="on")
    public = await publish(http, cluster.a, book, "public")
    unauthorized = await subscribe(
        cluster.b, [("match", book)], token=mint(subscribe=[{"match": "elsewhere"}]), headers={"Last-Event-ID": start}
    )
    authorized = await subscribe(
        cluster.b, [("match", book)], token=mint(subscribe=[{"match": book}]), headers={"Last-Event-ID": start}
    )
    try:
        event = await unauthorized.next_event(5)
        assert (event.data, event.last_event_id) == ("public", public)
        assert [e.data for e in await authorized.take(2, 5)] == ["secret", "public"]
    finally:
        await unauthorized.close()
        await authorized.close()


# -- Discovery, CORS, and the native API beside it --------------------------------------------------------------


async def test_discovery_protected_resource_metadata(cluster: Cluster, http: httpx.AsyncClient) -> None:
    response = await http.get(f"{cluster.a.url}/.well-known/oauth-protected-resource{HUB}")
    assert response.status_code == 200
    document = response.json()
    assert document["resource"] == AUDIENCE
    assert "mercure" in document["authorization_details_types_supported"]
    assert document["mercure_cookie"] is True


async def test_discovery_challenges_name_the_metadata_derived_from_the_hub_url(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    # "Protected Resource Metadata": served at the RFC 9728 location derived from the hub URL, and named by the
    # resource_metadata parameter of a token-less request's challenge. (The discovery Link headers of "Hub
    # Discovery" are the publisher's to send, on its resources; the hub's own only on the subscription API.)
    refused = await http.get(f"{cluster.b.url}{HUB}", params={"match": book})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == f'Bearer resource_metadata="{METADATA_URL}"'
    assert AUDIENCE.replace(HUB, "/.well-known/oauth-protected-resource" + HUB) == METADATA_URL
    response = await http.get(f"{cluster.b.url}{urlsplit(METADATA_URL).path}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["resource"] == AUDIENCE  # what clients put in aud, and compare with the URL they derived from
    assert "header" in document["bearer_methods_supported"]
    assert set(document["bearer_methods_supported"]) <= {"header", "query"}  # the cookie is not an RFC 6750 method
    assert "mercure_subscriptions" not in document  # active subscriptions are not implemented: the member is omitted
    assert set(document.get("mercure_matcher_types_supported", ["exact", "urlpattern"])) >= {"exact", "urlpattern"}


async def test_subscription_streams_take_the_fast_lane_and_say_which_node_answered(cluster: Cluster, book: str) -> None:
    """Streams skip the app's middleware (20.5 KB per idle stream through it, 12.6 KB without, measured):
    the node id the middleware would have added must still come, once, from the ASGI shortcut."""
    stream = await subscribe(cluster.b, [("match", book)])
    try:
        assert len(stream.response.headers.get_list("x-node-id")) == 1
        assert stream.response.headers["content-type"] == "text/event-stream"
    finally:
        await stream.close()


async def test_subscription_cors_names_the_allowed_origin_with_credentials(cluster: Cluster, book: str) -> None:
    allowed = await subscribe(cluster.b, [("match", book)], headers={"Origin": ALLOWED_ORIGIN})
    other = await subscribe(cluster.b, [("match", book)], headers={"Origin": "http://evil.test"})
    try:
        assert allowed.response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert allowed.response.headers["access-control-allow-credentials"] == "true"
        assert "Mercure-Last-Event-ID" in allowed.response.headers["access-control-expose-headers"]
        assert "access-control-allow-origin" not in other.response.headers
    finally:
        await allowed.close()
        await other.close()
    async with httpx.AsyncClient(timeout=10) as client:
        preflight = await client.options(
            f"{cluster.b.url}{HUB}",
            headers={
                "Origin": ALLOWED_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


async def test_publication_by_cookie_needs_a_trusted_origin(
    cluster: Cluster, http: httpx.AsyncClient, book: str
) -> None:
    cookie = f"__Secure-mercure_access_token={PUBLISHER}"
    body = urlencode([("topic", book), ("data", "c")])
    url = f"{cluster.a.url}{HUB}"
    no_origin = await http.post(url, content=body, headers={**FORM, "Cookie": cookie})
    assert no_origin.status_code == 401
    foreign = await http.post(url, content=body, headers={**FORM, "Cookie": cookie, "Origin": "http://evil.test"})
    assert foreign.status_code == 401
    allowed = await http.post(url, content=body, headers={**FORM, "Cookie": cookie, "Origin": ALLOWED_ORIGIN})
    assert allowed.status_code == 200


async def test_native_api_cannot_publish_on_the_mercure_sequence(cluster: Cluster, http: httpx.AsyncClient) -> None:
    token = tokens.mint(SECRET, publish=["**"], admin=True)
    response = await http.post(
        f"{cluster.a.url}/publish", json={"topic": UPDATES_TOPIC, "data": "forged"}, headers=bearer(token)
    )
    assert response.status_code == 403


@pytest.fixture(
    scope="module",
    params=[
        pytest.param({"HERALD_JWT_SECRET": SECRET}, id="key-without-resource-identifier"),
        pytest.param({"HERALD_MERCURE_AUDIENCE": AUDIENCE}, id="resource-identifier-without-key"),
    ],
)
def tokenless_node(request: pytest.FixtureRequest) -> Iterator[Node]:
    with run_server({**request.param, "HERALD_MERCURE_ANONYMOUS": "1", "HERALD_HEARTBEAT": "1"}) as node:
        yield node


async def test_authorization_without_a_key_or_resource_identifier_no_token_is_valid(
    tokenless_node: Node, http: httpx.AsyncClient, book: str
) -> None:
    """The hub can't validate a token: nobody may publish; anonymous subscribers may still read."""
    anonymous = await post(http, tokenless_node, [("topic", book)], token=None)
    assert anonymous.status_code == 401
    assert "error=" not in anonymous.headers["www-authenticate"]
    with_token = await post(http, tokenless_node, [("topic", book)])
    assert with_token.status_code == 401
    assert 'error="invalid_token"' in with_token.headers["www-authenticate"]
    stream = await subscribe(tokenless_node, [("match", book)], token=None)
    try:
        assert stream.response.status_code == 200
    finally:
        await stream.close()


# -- the node's own figures (/metrics) count the hub's streams and updates like native ones -----------------------


def _figures(text: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, next(iter(sample.labels.values()), "")] = float(sample.value)
    return found


async def test_regression_mercure_streams_and_updates_were_missing_from_the_nodes_metrics(
    http: httpx.AsyncClient, book: str
) -> None:
    """The load tool's server counts disagreed: Mercure publishes and connects were not counted, resets neither,
    and the dispatcher's own feed was counted as an open stream for good."""
    admin = bearer(tokens.mint(SECRET, admin=True))
    with run_server(_env("memory")) as node:

        async def figures() -> dict[tuple[str, str], float]:
            response = await http.get(f"{node.url}/metrics", headers=admin)
            assert response.status_code == 200
            return _figures(response.text)

        before = await figures()
        streams = [await subscribe(node, [("match", book)]) for _ in range(3)]
        await publish(http, node, book, "counted")
        resumed = await subscribe(node, [("match", book)], headers={"Last-Event-ID": "urn:never-published"})
        during = await figures()
        assert during["herald_connections", ""] - before["herald_connections", ""] == 4
        accepted = ("herald_connects_total", "accepted")
        assert during[accepted] - before.get(accepted, 0) == 4
        published = ("herald_events_published_total", "")
        assert during[published] - before.get(published, 0) == 1
        assert during.get(("herald_resets_total", "unknown-id"), 0) == 1
        assert during["herald_topics", ""] == before["herald_topics", ""]  # the dispatcher's feed is no topic
        for stream in [*streams, resumed]:
            await stream.close()
        async with asyncio.timeout(10):
            while (await figures())["herald_connections", ""] != before["herald_connections", ""]:
                await asyncio.sleep(0.05)  # the node notices the closed sockets on its own schedule
