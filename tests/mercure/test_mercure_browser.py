"""The Mercure hub as a browser lives it: a native ``EventSource`` in headless Chromium.

A node runs the hub with a key, a resource identifier (``HERALD_MERCURE_AUDIENCE``),
anonymous subscribers allowed (``HERALD_MERCURE_ANONYMOUS=1``) and one allowed
origin (``HERALD_CORS_ORIGINS``): a small static server on another loopback
port, so the page's requests to the hub are cross-origin (CORS) though
same-site (a cookie for ``127.0.0.1`` goes with them when the EventSource asks
for credentials).

The page subscribes the way the spec's own example does, with
``new EventSource(hub + '/.well-known/mercure?match_urlpattern=...',
{withCredentials: true})``. A publisher (httpx, ``at+jwt`` token) publishes:

* a public update with its own ``id``: the page receives it, ``lastEventId``
  being that id ("Publication": a publisher's id is the event's SSE id);
* a private update, then a public marker: the marker arrives and the private
  update did not (no token: "Subscription" / "Subscribers");
* with the hub's token cookie set (``HERALD_MERCURE_COOKIE``'s default,
  ``__Secure-mercure_access_token``, ``HttpOnly``, what the application's
  login would have set), a new EventSource receives the next
  private update ("Cookie").
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import pytest

from tests.browser import CHROMIUM, Browser, chromium, static_origin
from tests.server import Node, run_server

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (ops/install-system-deps.sh installs it)"),
    pytest.mark.timeout(60),
]

SECRET = secrets.token_urlsafe(48)
AUDIENCE = "https://hub.test/.well-known/mercure"
HUB = "/.well-known/mercure"
# The hub's default HERALD_MERCURE_COOKIE. A __Secure- cookie needs the Secure attribute, which Chromium
# accepts and sends for http://127.0.0.1 (a potentially trustworthy origin).
COOKIE = "__Secure-mercure_access_token"
PATTERN = "https://example.com/books/:id"

OPEN, CLOSED = 1, 2  # EventSource.OPEN, EventSource.CLOSED

# Run in a page: opens an EventSource and records what it receives in window.__es.
SUBSCRIBE = """
((url) => {
  const h = {opens: 0, messages: [], errors: []};
  window.__es = h;
  if (window.__source) { window.__source.close(); }
  const source = new EventSource(url, {withCredentials: true});
  window.__source = source;
  source.onopen = () => { h.opens += 1; };
  source.onmessage = (e) => { h.messages.push({data: e.data, id: e.lastEventId}); };
  source.onerror = () => { h.errors.push(source.readyState); };
  return source.withCredentials;
})(URL)
"""

STATUS = "({...window.__es, state: window.__source.readyState})"


def mint(**detail: Any) -> str:
    """An ``at+jwt`` access token for the hub with one ``mercure`` authorization detail."""
    body = {
        "aud": AUDIENCE,
        "exp": int(time.time() + 600),
        "authorization_details": [{"type": "mercure", **detail}],
    }
    return jwt.encode(body, SECRET, algorithm="HS256", headers={"typ": "at+jwt"})


PUBLISHER = mint(actions=["publish"], topics=[{"match": "*"}])
SUBSCRIBER = mint(actions=["subscribe"], topics=[{"match": PATTERN, "match_type": "urlpattern"}])


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    with static_origin() as page:
        yield page


@pytest.fixture(scope="module")
def hub_node(origin: str) -> Iterator[Node]:
    env = {
        "HERALD_JWT_SECRET": SECRET,
        "HERALD_MERCURE_AUDIENCE": AUDIENCE,
        "HERALD_MERCURE_ANONYMOUS": "1",
        "HERALD_CORS_ORIGINS": origin,
        "HERALD_HEARTBEAT": "1",
    }
    with run_server(env) as node:
        yield node


async def publish(node: Node, topic: str, data: str, **fields: str) -> str:
    """Publish as a Mercure publisher does (form body, Bearer ``at+jwt``); the update's id."""
    body = urlencode([("topic", topic), ("data", data), *fields.items()])
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        answer = await client.post(
            f"{node.url}{HUB}",
            content=body,
            headers={"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Bearer {PUBLISHER}"},
        )
    assert answer.status_code == 200, answer.text
    return answer.text


async def subscribe(browser: Browser, node: Node) -> dict[str, Any]:
    """Open the page's EventSource on the hub with ``match_urlpattern``; its status once open (or CLOSED)."""
    url = f"{json.dumps(node.url + HUB)} + '?match_urlpattern=' + encodeURIComponent({json.dumps(PATTERN)})"
    script = SUBSCRIBE.replace("URL", url)
    assert await browser.evaluate(script) is True
    status: dict[str, Any] = await browser.until(STATUS, lambda s: s["opens"] > 0 or s["state"] == CLOSED, 10)
    return status


async def receive(browser: Browser, data: str, timeout: float = 10) -> dict[str, Any]:
    """The page's EventSource status once ``data`` arrived (or it closed, or ``timeout`` passed)."""
    status: dict[str, Any] = await browser.until(
        STATUS, lambda s: any(m["data"] == data for m in s["messages"]) or s["state"] == CLOSED, timeout
    )
    return status


def book() -> str:
    return f"https://example.com/books/{uuid.uuid4().hex[:12]}"


async def test_subscription_native_eventsource_urlpattern_custom_id_and_private_updates_by_cookie(
    hub_node: Node, origin: str
) -> None:
    async with chromium() as browser:
        await browser.navigate(f"{origin}/")

        # Anonymous: public updates only.
        opened = await subscribe(browser, hub_node)
        assert (opened["opens"], opened["state"]) == (1, OPEN), opened

        custom_id = f"urn:uuid:{uuid.uuid4()}"
        public = f"public-{uuid.uuid4().hex[:8]}"
        assert await publish(hub_node, book(), public, id=custom_id) == custom_id
        got = await receive(browser, public)
        assert got["messages"] == [{"data": public, "id": custom_id}], got

        secret = f"private-{uuid.uuid4().hex[:8]}"
        await publish(hub_node, book(), secret, private="on")
        marker = f"marker-{uuid.uuid4().hex[:8]}"
        await publish(hub_node, book(), marker)  # published after the private one: it arrives after it would have
        got = await receive(browser, marker)
        assert [m["data"] for m in got["messages"]] == [public, marker], got
        assert (got["errors"], got["state"]) == ([], OPEN), got

        # With the subscriber's token in the hub's cookie, a new EventSource gets private updates too.
        result = await browser.send(
            "Network.setCookie",
            {"name": COOKIE, "value": SUBSCRIBER, "url": hub_node.url, "httpOnly": True, "secure": True},
        )
        assert result.get("success", True), result
        opened = await subscribe(browser, hub_node)
        assert (opened["opens"], opened["state"]) == (1, OPEN), opened

        secret_id = f"urn:uuid:{uuid.uuid4()}"
        secret = f"private-{uuid.uuid4().hex[:8]}"
        assert await publish(hub_node, book(), secret, private="on", id=secret_id) == secret_id
        got = await receive(browser, secret)
        assert got["messages"] == [{"data": secret, "id": secret_id}], got
        assert (got["errors"], got["state"]) == ([], OPEN), got
