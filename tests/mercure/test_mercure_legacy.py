"""Legacy Mercure clients against a real node: what the reference hub still accepts from older clients.

The pre-standardization ``topic`` subscribe parameter (exact, ``*`` or an RFC 6570 URI template), and
access tokens carrying the ``mercure`` claim (``publish``/``subscribe`` selector lists) instead of
``authorization_details``, typed ``JWT`` and without ``aud``, as older publishers (Symfony's Mercure
component before RFC 9068 tokens) mint them. Helpers and settings are the hub tests'.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest

from tests.mercure.test_mercure_hub import BROKERS, SECRET, _env, post, publish, subscribe
from tests.server import Node, run_server

pytestmark = pytest.mark.timeout(60)


def legacy_token(mercure: dict[str, Any], ttl: float = 3600) -> str:
    """A pre-standardization token: typ JWT, no aud, the ``mercure`` claim."""
    return jwt.encode(
        {"exp": int(time.time() + ttl), "mercure": mercure}, SECRET, algorithm="HS256", headers={"typ": "JWT"}
    )


@pytest.fixture(scope="module", params=BROKERS)
def node(request: pytest.FixtureRequest) -> Iterator[Node]:
    with run_server(_env(request.param)) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def test_legacy_topic_uri_template_subscription_receives_a_matching_update(
    node: Node, http: httpx.AsyncClient
) -> None:
    shelf = f"https://example.com/{uuid.uuid4().hex[:12]}"
    stream = await subscribe(node, [("topic", shelf + "/books/{id}")], token=legacy_token({"subscribe": ["*"]}))
    try:
        assert stream.response.status_code == 200
        await publish(http, node, shelf + "/books/1/reviews", "not a book")  # {id} does not cross '/'
        await publish(http, node, shelf + "/authors/1", "not a book")
        update = await publish(http, node, shelf + "/books/1", "a book")
        event = await stream.next_event(5)
        assert (event.last_event_id, event.data) == (update, "a book")
    finally:
        await stream.close()


async def test_legacy_mercure_claim_token_publishes_within_its_selectors(node: Node, http: httpx.AsyncClient) -> None:
    shelf = f"https://example.com/{uuid.uuid4().hex[:12]}"
    token = legacy_token({"publish": [shelf + "/books/{id}"]})
    stream = await subscribe(node, [("match", shelf + "/books/7")])
    try:
        refused = await post(http, node, [("topic", shelf + "/authors/7"), ("data", "x")], token=token)
        assert refused.status_code == 403
        response = await post(http, node, [("topic", shelf + "/books/7"), ("data", "legacy")], token=token)
        assert response.status_code == 200, response.text
        event = await stream.next_event(5)
        assert (event.last_event_id, event.data) == (response.text, "legacy")
    finally:
        await stream.close()


async def test_legacy_private_update_reaches_a_legacy_subscriber_via_the_cookie(
    node: Node, http: httpx.AsyncClient
) -> None:
    shelf = f"https://example.com/{uuid.uuid4().hex[:12]}"
    reader = legacy_token({"subscribe": [shelf + "/{id}"]})
    stream = await subscribe(
        node, [("topic", shelf + "/{id}")], token=None, headers={"Cookie": f"mercureAuthorization={reader}"}
    )
    try:
        assert stream.response.status_code == 200
        update = await publish(http, node, shelf + "/1", "secret", private="on")
        event = await stream.next_event(5)
        assert (event.last_event_id, event.data) == (update, "secret")
    finally:
        await stream.close()
