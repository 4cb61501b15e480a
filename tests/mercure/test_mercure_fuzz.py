"""Fuzzing the Mercure hub's inputs (hypothesis) against a real node: a client mistake is a 4xx, never a 500.

The publish form (any names, any values, any bytes), the subscribe query (matchers of every kind,
cursors, tokens) and the subscription API's paths are generated freely; each answer must be one the spec
names for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote_from_bytes, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.mercure.test_mercure_hub import AUDIENCE, FORM, HUB, PUBLISHER, READER, SECRET, bearer
from tests.server import Node, run_server

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

PUBLISH_STATUSES = {200, 400, 403, 413, 415}
SUBSCRIBE_STATUSES = {200, 400, 401}

_FIELD_NAMES = st.sampled_from(["topic", "data", "private", "id", "type", "retry", "unknown", "match", ""])
_TOPICS = st.sampled_from(
    [
        "https://example.com/books/1",
        "*",
        "/.well-known/mercure",
        "/.well-known/%6Dercure/subscriptions",
        "https://x.test/a/../.well-known/mercure/x",
        "urn:uuid:1",
        "",
    ]
)
_VALUES = st.one_of(st.text(max_size=40), _TOPICS, st.sampled_from(["earliest", "#1", "mercure", "12", "-1"]))
_QUERY_NAMES = st.sampled_from(
    ["match", "match_exact", "match_urlpattern", "match_regexp", "MATCH", "matchx", "last_event_id", "topic", "x"]
)
_PATTERNS = st.sampled_from(
    [
        "https://example.com/books/:id",
        "/relative/:id(\\d+)",
        "https://example.com/:a/:b/*",
        "https://example.com/(a|b)+",
        "((((a+)+)+)+)",
        ":x(.*)*",
        "https://example.com/{:id}?",
        "*",
    ]
)


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    env = {
        "HERALD_JWT_SECRET": SECRET,
        "HERALD_MERCURE_AUDIENCE": AUDIENCE,
        "HERALD_MAX_EVENT_BYTES": "2048",
        "HERALD_MERCURE_SUBSCRIPTIONS": "1",  # every fuzzed stream's subscriptions are published and listed too
    }
    with run_server(env) as node:
        yield node


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


@FUZZ
@given(fields=st.lists(st.tuples(_FIELD_NAMES | st.text(max_size=10), _VALUES), max_size=8))
def test_fuzz_publication_form_is_never_a_500(node: Node, client: httpx.Client, fields: list[tuple[str, str]]) -> None:
    response = client.post(f"{node.url}{HUB}", content=urlencode(fields), headers={**FORM, **bearer(PUBLISHER)})
    assert response.status_code in PUBLISH_STATUSES, (fields, response.status_code, response.text)
    if response.status_code == 200:
        assert response.headers["content-type"] == "text/plain; charset=utf-8"


@FUZZ
@given(body=st.binary(max_size=200), content_type=st.sampled_from([FORM["Content-Type"], "text/plain", ""]))
def test_fuzz_publication_raw_bodies_are_never_a_500(
    node: Node, client: httpx.Client, body: bytes, content_type: str
) -> None:
    headers = {**bearer(PUBLISHER), **({"Content-Type": content_type} if content_type else {})}
    response = client.post(f"{node.url}{HUB}", content=body, headers=headers)
    assert response.status_code in PUBLISH_STATUSES, (body, response.status_code, response.text)


@FUZZ
@given(
    params=st.lists(st.tuples(_QUERY_NAMES, st.one_of(_PATTERNS, _VALUES)), max_size=6),
    raw_suffix=st.binary(max_size=20),
    last_event_id=st.none() | st.sampled_from(["earliest", "#0", "#123", "urn:x", ""]),
)
def test_fuzz_subscription_query_is_never_a_500(
    node: Node, client: httpx.Client, params: list[tuple[str, str]], raw_suffix: bytes, last_event_id: str | None
) -> None:
    query = urlencode(params) + "&x=" + quote_from_bytes(raw_suffix)
    headers = {**bearer(READER), **({"Last-Event-ID": last_event_id} if last_event_id is not None else {})}
    with client.stream("GET", f"{node.url}{HUB}?{query}", headers=headers) as response:
        assert response.status_code in SUBSCRIBE_STATUSES, (params, raw_suffix, response.status_code)


API_STATUSES = {200, 404}


@FUZZ
@given(
    segments=st.lists(
        st.one_of(st.binary(max_size=12), st.sampled_from([b"exact", b"urlpattern", b"*", b""])), max_size=4
    ),
    encode=st.booleans(),
)
@example(segments=[b"\n", b""], encode=True)  # ".../subscriptions/%0A/" was redirected (307)
def test_fuzz_subscription_api_paths_are_never_a_500(
    node: Node, client: httpx.Client, segments: list[bytes], encode: bool
) -> None:
    path = "".join("/" + (quote_from_bytes(s, safe="") if encode else quote_from_bytes(s, safe="/%")) for s in segments)
    response = client.get(f"{node.url}{HUB}/subscriptions{path}", headers=bearer(READER))
    assert response.status_code in API_STATUSES, (path, response.status_code, response.text)
    if response.status_code == 200:
        assert response.headers["content-type"] == "application/ld+json"
        assert "last_event_id" in response.json()
