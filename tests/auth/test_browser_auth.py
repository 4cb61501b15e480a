"""Access control as a browser lives it: a page of another origin subscribes (and publishes) in headless Chromium.

A node runs with ``HERALD_JWT_SECRET`` (tokens required), ``HERALD_CORS_ORIGINS``
naming one origin, and ``HERALD_PUBLIC_TOPICS``. Pages are loaded from two
small static servers on other loopback ports: the *allowed* origin and an
*other* origin the node does not list. Both are same-site with the node
(cookies are per host, not per port), so a cookie for ``127.0.0.1`` goes
with their cross-origin requests when asked to (``withCredentials``); what
CORS decides is whether the page may read the answer.

The browser is the judge of what a page gets: a native ``EventSource`` with
``{withCredentials: true}`` and the ``herald_token`` cookie, or with
``?access_token=``, receives what is published; a page of the other origin
with the same cookie gets nothing (the browser refuses an answer without
``Access-Control-Allow-Origin``); a page with no token gets the 401 and its
EventSource gives up (readyState CLOSED, the client's own fault). ``fetch``
``POST /publish`` with an ``Authorization`` header passes its preflight from
the allowed origin only, and a cookie alone publishes nothing. What the node
did is checked too: its stream counters (``/stats``, with an admin token), its
answers as Chromium's network layer saw them, and a subscriber of its own.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from api.token import mint
from tests.browser import CHROMIUM, Browser, chromium, static_origin
from tests.server import Node, run_server
from tests.sse_client import EventStream

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (ops/install-system-deps.sh installs it)"),
    pytest.mark.timeout(30),
]

SECRET = "browser-auth-test-secret-" + "x" * 32
COOKIE = "herald_token"  # the node's default HERALD_JWT_COOKIE
PUBLIC = "news/**"

OPEN, CLOSED = 1, 2  # EventSource.OPEN, EventSource.CLOSED

# Run in a page: opens an EventSource and records everything it does in window.__es.
SUBSCRIBE = """
((url, withCredentials) => {
  const h = {opens: 0, messages: [], errors: []};
  window.__es = h;
  const source = new EventSource(url, {withCredentials});
  window.__source = source;
  source.onopen = () => { h.opens += 1; };
  source.onmessage = (e) => { h.messages.push(e.data); };
  source.onerror = () => { h.errors.push(source.readyState); };
  return source.withCredentials;
})(URL, WITH_CREDENTIALS)
"""

STATUS = "({...window.__es, state: window.__source.readyState})"

# Run in a page: POST /publish with fetch; the answer as the page may see it, or the error fetch rejected with.
PUBLISH = """
fetch(URL, INIT).then(
  async (r) => ({status: r.status, type: r.type, body: await r.text(), node: r.headers.get("X-Node-Id")}),
  (e) => ({error: String(e)}),
)
"""


def subscriber_token(ttl: float = 600) -> str:
    return mint(SECRET, subscribe=["user/{sub}/**"], sub="42", ttl=ttl)


def publisher_token() -> str:
    return mint(SECRET, publish=["user/**", "news/**"], sub="producer", ttl=600)


def admin_token() -> str:
    return mint(SECRET, admin=True, ttl=600)


def private_topic() -> str:
    """A topic of user 42's that only this test uses."""
    return f"user/42/notes-{uuid.uuid4().hex[:10]}"


@dataclass
class Origins:
    allowed: str
    other: str


@pytest.fixture(scope="module")
def origins() -> Iterator[Origins]:
    with static_origin() as allowed, static_origin() as other:
        yield Origins(allowed, other)


@pytest.fixture(scope="module")
def auth_node(origins: Origins) -> Iterator[Node]:
    env = {
        "HERALD_JWT_SECRET": SECRET,
        "HERALD_CORS_ORIGINS": origins.allowed,
        "HERALD_PUBLIC_TOPICS": PUBLIC,
        "HERALD_HEARTBEAT": "1",
    }
    with run_server(env) as node:
        yield node


@dataclass
class Network:
    """What Chromium's network layer saw of a page's requests to the node (enable before navigating)."""

    node_url: str
    urls: dict[str, str] = field(default_factory=dict)  # requestId -> url
    responses: list[dict[str, Any]] = field(default_factory=list)  # {url, status, headers (lower-case names)}
    failures: list[dict[str, Any]] = field(default_factory=list)  # {url, type, errorText, corsError}

    @classmethod
    async def watch(cls, browser: Browser, node_url: str) -> Network:
        network = cls(node_url)
        browser.on("Network.requestWillBeSent", network._on_request)
        browser.on("Network.responseReceived", network._on_response)
        browser.on("Network.loadingFailed", network._on_failure)
        await browser.send("Network.enable")
        return network

    def _on_request(self, params: dict[str, Any]) -> None:
        self.urls[params["requestId"]] = params["request"]["url"]

    def _on_response(self, params: dict[str, Any]) -> None:
        response = params["response"]
        if response["url"].startswith(f"{self.node_url}/"):
            headers = {name.lower(): value for name, value in response.get("headers", {}).items()}
            self.responses.append({"url": response["url"], "status": response["status"], "headers": headers})

    def _on_failure(self, params: dict[str, Any]) -> None:
        url = self.urls.get(params["requestId"], "?")
        if url.startswith(f"{self.node_url}/"):
            cors = params.get("corsErrorStatus") or {}
            self.failures.append(
                {
                    "url": url,
                    "type": params.get("type"),
                    "errorText": params.get("errorText"),
                    "corsError": cors.get("corsError"),
                }
            )

    def __str__(self) -> str:
        return f"responses {self.responses}, failures {self.failures}"


async def set_cookie(browser: Browser, node: Node, token: str) -> None:
    """The node's token cookie, for 127.0.0.1 (any port): what the application's login would have set."""
    result = await browser.send("Network.setCookie", {"name": COOKIE, "value": token, "url": node.url})
    assert result.get("success", True), result


async def subscribe(browser: Browser, page: str, url: str, with_credentials: bool) -> dict[str, Any]:
    """Load ``page``, open ``new EventSource(url, {withCredentials})`` in it; its status once open or CLOSED."""
    await browser.navigate(f"{page}/")
    script = SUBSCRIBE.replace("URL", json.dumps(url)).replace("WITH_CREDENTIALS", json.dumps(with_credentials))
    assert await browser.evaluate(script) is with_credentials
    status: dict[str, Any] = await browser.until(STATUS, lambda s: s["opens"] > 0 or s["state"] == CLOSED, 10)
    return status


async def receive(browser: Browser, data: str, timeout: float = 10) -> dict[str, Any]:
    """The page's EventSource status once ``data`` arrived (or it closed, or ``timeout`` passed)."""
    status: dict[str, Any] = await browser.until(
        STATUS, lambda s: data in s["messages"] or s["state"] == CLOSED, timeout
    )
    return status


async def publish(node: Node, topic: str, data: str) -> str:
    """Publish as a producer would (httpx, Bearer token); the event's id."""
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        answer = await client.post(
            f"{node.url}/publish",
            json={"topic": topic, "data": data},
            headers={"Authorization": f"Bearer {publisher_token()}"},
        )
    assert answer.status_code == 201, answer.text
    event_id: str = answer.json()["id"]
    return event_id


async def hub_stats(node: Node) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        answer = await client.get(f"{node.url}/stats", headers={"Authorization": f"Bearer {admin_token()}"})
    assert answer.status_code == 200, answer.text
    hub: dict[str, Any] = answer.json()["hub"]
    return hub


async def hub_until(node: Node, done: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict[str, Any]:
    """Poll the node's hub counters until ``done(hub)`` holds or ``timeout`` passed; the last counters."""
    deadline = time.monotonic() + timeout
    hub = await hub_stats(node)
    while not done(hub) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the node counts on its own schedule: poll what it says
        hub = await hub_stats(node)
    return hub


# --------------------------------------------------------------------------- subscribing


async def test_allowed_origin_subscribes_with_the_cookie_and_credentials(auth_node: Node, origins: Origins) -> None:
    topic = private_topic()
    async with chromium() as browser:
        network = await Network.watch(browser, auth_node.url)
        await set_cookie(browser, auth_node, subscriber_token())
        url = f"{auth_node.url}/events?topic={topic}"  # no token in the URL: the cookie is the only one
        opened = await subscribe(browser, origins.allowed, url, with_credentials=True)
        assert (opened["opens"], opened["state"]) == (1, OPEN), f"{opened}; {network}"

        data = f"note-{uuid.uuid4().hex[:8]}"
        await publish(auth_node, topic, data)
        got = await receive(browser, data)

    assert (got["messages"], got["errors"], got["state"]) == ([data], [], OPEN), f"{got}; {network}"
    (answer,) = network.responses
    assert answer["status"] == 200
    assert answer["headers"]["content-type"].startswith("text/event-stream")
    assert answer["headers"]["access-control-allow-origin"] == origins.allowed
    assert answer["headers"]["access-control-allow-credentials"] == "true"
    assert network.failures == [], network


async def test_allowed_origin_subscribes_with_access_token_in_the_url(auth_node: Node, origins: Origins) -> None:
    topic = private_topic()
    async with chromium() as browser:
        network = await Network.watch(browser, auth_node.url)
        url = f"{auth_node.url}/events?topic={topic}&access_token={subscriber_token()}"
        opened = await subscribe(browser, origins.allowed, url, with_credentials=False)
        assert (opened["opens"], opened["state"]) == (1, OPEN), f"{opened}; {network}"

        data = f"note-{uuid.uuid4().hex[:8]}"
        await publish(auth_node, topic, data)
        got = await receive(browser, data)

    assert (got["messages"], got["errors"], got["state"]) == ([data], [], OPEN), f"{got}; {network}"
    assert network.responses[0]["headers"]["access-control-allow-origin"] == origins.allowed


async def test_other_origin_is_kept_out_though_its_cookie_is_good(auth_node: Node, origins: Origins) -> None:
    topic = private_topic()
    before = await hub_until(auth_node, lambda h: h["connections"] == 0)  # earlier tests' browsers are gone
    assert before["connections"] == 0, before
    async with chromium() as browser:
        network = await Network.watch(browser, auth_node.url)
        await set_cookie(browser, auth_node, subscriber_token())
        url = f"{auth_node.url}/events?topic={topic}"
        status = await subscribe(browser, origins.other, url, with_credentials=True)
        # The request went (a cookie for 127.0.0.1 goes to any of its ports), but from a page of an origin
        # the node does not list the cookie does not stand for the user: 401, no stream opened for a page
        # that could not read it anyway. The browser reads no answer without Access-Control-Allow-Origin
        # either: the EventSource fails at once, for good.
        assert status["state"] == CLOSED, f"{status}; {network}"
        after = await hub_until(auth_node, lambda h: h["connections"] == 0)
        status = await browser.evaluate(STATUS)

    assert (status["opens"], status["messages"], status["errors"]) == (0, [], [CLOSED]), status
    assert [f["corsError"] for f in network.failures] == ["MissingAllowOriginHeader"], network
    assert after["connections_total"] == before["connections_total"], (before, after)

    # The node's answer that the browser refused: 401, with no CORS header for that origin.
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        answer = await client.get(
            f"{auth_node.url}/events",
            params={"topic": topic},
            headers={"Origin": origins.other, "Cookie": f"{COOKIE}={subscriber_token()}"},
        )
        assert answer.status_code == 401
        assert "access-control-allow-origin" not in answer.headers
        assert "access-control-allow-credentials" not in answer.headers
        # The same cookie without an Origin (same-origin or not a browser) is the user's.
        async with client.stream(
            "GET",
            f"{auth_node.url}/events",
            params={"topic": topic},
            headers={"Cookie": f"{COOKIE}={subscriber_token()}"},
        ) as same_origin:
            assert same_origin.status_code == 200


async def test_no_token_on_a_private_topic_is_401_and_eventsource_gives_up(auth_node: Node, origins: Origins) -> None:
    topic = private_topic()
    before = await hub_stats(auth_node)
    async with chromium() as browser:
        network = await Network.watch(browser, auth_node.url)
        url = f"{auth_node.url}/events?topic={topic}"
        status = await subscribe(browser, origins.allowed, url, with_credentials=True)  # and no cookie
        assert status["state"] == CLOSED, f"{status}; {network}"
        status = await browser.evaluate(STATUS)
    after = await hub_stats(auth_node)

    assert (status["opens"], status["messages"], status["errors"]) == (0, [], [CLOSED]), status
    # The page's own origin is allowed, so the browser let it see the 401 (not a CORS failure): the
    # EventSource failed on the status, which it never retries.
    (answer,) = network.responses
    assert answer["status"] == 401, network
    assert answer["headers"]["www-authenticate"].startswith('Bearer realm="herald"')
    assert answer["headers"]["access-control-allow-origin"] == origins.allowed
    assert after["connections_total"] == before["connections_total"], "the node admitted a stream without a token"


async def test_public_topic_needs_no_token(auth_node: Node, origins: Origins) -> None:
    topic = f"news/{uuid.uuid4().hex[:10]}"
    async with chromium() as browser:
        url = f"{auth_node.url}/events?topic={topic}"
        opened = await subscribe(browser, origins.allowed, url, with_credentials=False)
        assert (opened["opens"], opened["state"]) == (1, OPEN), opened
        await publish(auth_node, topic, "for everyone")
        got = await receive(browser, "for everyone")
    assert got["messages"] == ["for everyone"], got


# --------------------------------------------------------------------------- publishing


def fetch_init(body: dict[str, Any], token: str) -> dict[str, Any]:
    return {
        "method": "POST",
        "headers": {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        "body": json.dumps(body),
    }


async def page_publish(browser: Browser, page: str, node: Node, init: dict[str, Any]) -> dict[str, Any]:
    """From a page of ``page``'s origin, ``fetch(node/publish, init)``: the answer as the page sees it."""
    await browser.navigate(f"{page}/")
    script = PUBLISH.replace("URL", json.dumps(f"{node.url}/publish")).replace("INIT", json.dumps(init))
    result: dict[str, Any] = await browser.evaluate(script)
    return result


async def test_fetch_publish_passes_the_preflight_from_the_allowed_origin_only(
    auth_node: Node, origins: Origins
) -> None:
    topic = private_topic()
    token = publisher_token()
    # The node's own view: a subscriber of the test's, which sees every event the topic gets.
    async with (
        await EventStream.open(
            auth_node.url, [topic], headers={"Authorization": f"Bearer {subscriber_token()}"}
        ) as stream,
        chromium() as browser,
    ):
        assert stream.response.status_code == 200
        network = await Network.watch(browser, auth_node.url)

        # Another origin: the preflight (Authorization, JSON) is refused, so the POST is never sent.
        refused = await page_publish(
            browser, origins.other, auth_node, fetch_init({"topic": topic, "data": "x"}, token)
        )
        assert "Failed to fetch" in refused.get("error", ""), refused
        assert [f["corsError"] for f in network.failures] == ["PreflightMissingAllowOriginHeader"], network

        # Another origin with the cookie only, as a "simple" request that needs no preflight: a cookie is
        # no publisher's credential, so nothing is published (the page can't even see the refusal).
        await set_cookie(browser, auth_node, mint(SECRET, publish=["user/**"], subscribe=["user/**"], ttl=600))
        no_cors = {
            "method": "POST",
            "mode": "no-cors",
            "credentials": "include",
            "headers": {"Content-Type": "text/plain"},
            "body": json.dumps({"topic": topic, "data": "by cookie"}),
        }
        opaque = await page_publish(browser, origins.other, auth_node, no_cors)
        assert (opaque.get("type"), opaque.get("status")) == ("opaque", 0), opaque

        # The allowed origin: preflight answered, POST sent, its answer (and exposed X-Node-Id) readable.
        allowed = await page_publish(
            browser, origins.allowed, auth_node, fetch_init({"topic": topic, "data": "y"}, token)
        )
        assert allowed.get("status") == 201, f"{allowed}; {network}"
        assert json.loads(allowed["body"])["topic"] == topic
        assert allowed["node"], allowed  # Access-Control-Expose-Headers: X-Node-Id

        await publish(auth_node, topic, "end")
        events = await stream.take(2, timeout=10)

    assert [e.data for e in events] == ["y", "end"], "an event from a refused page was published"
    # The node's answers as Chromium saw them: the refused preflight, the cookie-only POST refused
    # (401: a publisher's token comes in the Authorization header only), the allowed preflight, the POST.
    assert [r["status"] for r in network.responses] == [403, 401, 204, 201], network
