"""The demo producer (workers.demo) against a real node, plus its retry rules and command line."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from api.token import mint
from ops import launch
from tests.browser import CHROMIUM, Browser, chromium
from tests.server import Node, run_server
from tests.sse_client import EventStream
from tests.sse_parser import SSEEvent
from workers import demo

RUN_TIMEOUT = 30.0

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (ops/install-system-deps.sh installs it)"
)


@pytest.fixture(scope="module")
def demo_node() -> Iterator[Node]:
    """A node of this module's own, so no other test publishes on "chat" or "ticker"."""
    with run_server() as running:
        yield running


def test_tokens_join_back_into_every_canned_reply() -> None:
    for reply in demo.CANNED_REPLIES:
        tokens = demo.tokenize(reply.text)
        assert "".join(tokens) == reply.text
        assert all(token.strip() for token in tokens), "no token is whitespace alone"
    assert demo.tokenize("Hello, world. It's SSE!") == ["Hello", ", ", "world", ". ", "It's ", "SSE", "!"]


async def test_demo_streams_a_reply_and_ticks_to_a_subscriber(demo_node: Node) -> None:
    async with await EventStream.open(demo_node.url, ["chat", "ticker"]) as stream:
        run = asyncio.create_task(demo.run(demo_node.url, tick_interval=0.05, replies=1, duration=RUN_TIMEOUT, seed=7))
        try:
            events: list[SSEEvent] = []
            while not (any(e.type == "reply.end" for e in events) and any(e.type == "tick" for e in events)):
                try:
                    events.append(await stream.next_event(timeout=10))
                except TimeoutError:
                    if run.done():
                        run.result()  # the demo producer died: its error is why nothing came
                    raise
            stats = await asyncio.wait_for(run, RUN_TIMEOUT)
        finally:
            run.cancel()

    ids = [int(e.last_event_id) for e in events]
    assert ids == sorted(set(ids)), "ids strictly increase"
    assert {e.type for e in events} <= {"reply.start", "reply.token", "reply.end", "tick"}

    reply = demo.CANNED_REPLIES[0]
    chat = [e for e in events if e.type.startswith("reply.")]
    assert chat[0].type == "reply.start"
    assert json.loads(chat[0].data) == {"reply": 1, "prompt": reply.prompt}
    assert chat[-1].type == "reply.end"
    tokens = [e.data for e in chat[1:-1]]
    assert all(e.type == "reply.token" for e in chat[1:-1])
    assert tokens == demo.tokenize(reply.text)
    assert "".join(tokens) == reply.text
    assert json.loads(chat[-1].data) == {"reply": 1, "tokens": len(tokens)}

    ticks = [json.loads(e.data) for e in events if e.type == "tick"]
    assert ticks
    assert [t["n"] for t in ticks] == list(range(1, len(ticks) + 1))
    for tick in ticks:
        assert datetime.fromisoformat(tick["time"]).utcoffset() == timedelta(0)

    assert stats.replies == 1
    assert stats.tokens == len(tokens)
    assert stats.ticks >= len(ticks)
    assert stats.events == stats.ticks + stats.tokens + 2


async def test_demo_stops_after_its_duration(demo_node: Node) -> None:
    stats = await asyncio.wait_for(
        demo.run(demo_node.url, chat_topic="chat-2", ticker_topic="ticker-2", tick_interval=0.05, duration=0.3),
        RUN_TIMEOUT,
    )
    assert stats.ticks >= 1
    assert stats.replies == 0


async def test_publisher_retries_503_after_retry_after_then_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [
        httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": "broker unavailable: down"}),
        httpx.Response(502, text="bad gateway"),
        httpx.Response(201, json={"id": "42", "topic": "chat"}),
    ]
    bodies: list[object] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return answers.pop(0)

    monkeypatch.setattr(demo, "BACKOFF_FIRST", 0.0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        publisher = demo.Publisher(client, "http://herald.test/")
        event_id = await asyncio.wait_for(publisher.publish("chat", "reply.token", "Hi "), 10)
    assert event_id == "42"
    assert bodies == [{"topic": "chat", "data": "Hi ", "event": "reply.token"}] * 3
    assert publisher.stats.events == 1


async def test_a_4xx_stops_the_run() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"detail": [{"msg": "bad"}]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(demo.PublishRejected) as caught:
            await asyncio.wait_for(demo.run("http://herald.test", replies=1, client=client), 10)
    assert caught.value.status_code == 422


def test_retry_after_parsing() -> None:
    assert demo.retry_after_seconds("2") == 2.0
    assert demo.retry_after_seconds(None) == demo.RETRY_AFTER_DEFAULT
    assert demo.retry_after_seconds("soon") == demo.RETRY_AFTER_DEFAULT
    assert demo.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert demo.retry_after_seconds("99999") == demo.RETRY_AFTER_MAX


def test_command_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        demo.main(["--help"])
    assert exited.value.code == 0
    assert "--tick-interval" in capsys.readouterr().out

    monkeypatch.setenv("HERALD_URL", "http://node.test:9000")
    args = demo.build_parser().parse_args([])
    assert (args.url, args.chat_topic, args.ticker_topic, args.tick_interval) == (
        "http://node.test:9000",
        "chat",
        "ticker",
        1.0,
    )
    assert (args.replies, args.duration, args.seed) == (None, None, None)

    args = demo.build_parser().parse_args(["--replies", "3", "--duration", "5", "--seed", "1", "--tick-interval", ".5"])
    assert (args.replies, args.duration, args.seed, args.tick_interval) == (3, 5.0, 1, 0.5)

    for bad in (["--tick-interval", "0"], ["--replies", "-1"], ["--duration", "nan"]):
        with pytest.raises(SystemExit):
            demo.build_parser().parse_args(bad)


def test_main_runs_to_the_end(demo_node: Node) -> None:
    assert (
        demo.main(["--url", demo_node.url, "--chat-topic", "chat-3", "--ticker-topic", "ticker-3", "--duration", "0.5"])
        == 0
    )


def test_verbose_logs_the_demos_lines_not_the_http_clients(demo_node: Node) -> None:
    """``-v`` adds a line per tick; httpx's line per request and httpcore's debug lines stay out."""
    args = ["--url", demo_node.url, "--chat-topic", "chat-4", "--ticker-topic", "ticker-4"]
    done = subprocess.run(
        [sys.executable, "-m", "workers.demo", *args, "--tick-interval", "0.05", "--duration", "0.6", "-v"],
        cwd=launch.ROOT,
        env=launch.clean_environ(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert any(line.endswith(" tick 1") for line in lines), lines
    assert any("done:" in line for line in lines), lines
    chatter = [line for line in lines if re.search(r"HTTP Request|connect_tcp|send_request|receive_response|h11", line)]
    assert chatter == [], chatter[:5]
    assert len(lines) < 60, f"{len(lines)} lines for a 0.6 s run"


# The demo page (``/``, api/static/index.html) in headless Chromium: what a new user sees.

STATE = "document.getElementById('state').textContent"
PROBLEM = "document.getElementById('problem').hidden ? '' : document.getElementById('problem').textContent"
ROWS = "[...document.querySelectorAll('#log tr')].reverse().map(tr => [...tr.cells].map(td => td.textContent))"
REPLY = "document.getElementById('reply').textContent"
AUTH_SECRET = "demo-page-test-secret-" + "s" * 32


def page_topic() -> str:
    return f"page-{uuid.uuid4().hex[:10]}"


@dataclass
class EventsRequests:
    """The page's requests to ``/events`` as Chromium sent them (URL and headers), in order."""

    sent: list[dict[str, Any]] = field(default_factory=list)

    def record(self, params: dict[str, Any]) -> None:
        if urlsplit(params["request"]["url"]).path == "/events":
            self.sent.append(params["request"])


async def open_page(browser: Browser, url: str) -> EventsRequests:
    requests = EventsRequests()
    await browser.send("Network.enable")
    browser.on("Network.requestWillBeSent", requests.record)
    await browser.navigate(url)
    return requests


async def post(client: httpx.AsyncClient, body: object, token: str | None = None) -> list[str]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    answer = await client.post("/publish", json=body, headers=headers)
    assert answer.status_code == 201, answer.text
    published = answer.json()
    return [e["id"] for e in published] if isinstance(published, list) else [published["id"]]


@needs_chromium
async def test_page_shows_every_event_whatever_its_type(demo_node: Node) -> None:
    orders, chat = page_topic(), page_topic()
    async with chromium() as browser, httpx.AsyncClient(base_url=demo_node.url, timeout=10) as client:
        await open_page(browser, f"{demo_node.url}/?topic={orders}&topic={chat}")
        assert await browser.until(STATE, lambda s: s == "live") == "live"
        # The README's first example, an event without a type, a type nobody planned for, the demo's reply.
        ids = await post(client, {"topic": orders, "event": "created", "data": {"id": 42}})
        ids += await post(client, {"topic": chat, "data": "Hello"})
        ids += await post(client, {"topic": orders, "event": "order.shipped:v2", "data": "two\nlines"})
        ids += await post(
            client,
            [
                {"topic": chat, "event": "reply.start", "data": {"reply": 1}},
                {"topic": chat, "event": "reply.token", "data": "Hi "},
                {"topic": chat, "event": "reply.token", "data": "there"},
                {"topic": chat, "event": "reply.end", "data": {"reply": 1, "tokens": 2}},
            ],
        )
        rows = await browser.until(ROWS, lambda r: len(r) >= 5)
        reply = await browser.evaluate(REPLY)
    assert rows == [
        [ids[0], "created", '{"id":42}'],
        [ids[1], "message", "Hello"],
        [ids[2], "order.shipped:v2", "two\nlines"],
        [ids[3], "reply.start", '{"reply":1}'],
        [ids[6], "reply.end", '{"reply":1,"tokens":2}'],
    ]
    assert reply == "Hi there"  # the tokens are shown in the reply box


@needs_chromium
async def test_page_shows_why_a_bad_topic_is_refused_and_stops(demo_node: Node) -> None:
    async with httpx.AsyncClient(base_url=demo_node.url, timeout=10) as client:
        detail = (await client.get("/events", params={"topic": "bad topic"})).json()["detail"]
    async with chromium() as browser:
        requests = await open_page(browser, f"{demo_node.url}/?topic=bad%20topic")
        assert await browser.until(STATE, lambda s: s.startswith("refused")) == "refused (400)"
        problem = await browser.evaluate(PROBLEM)
        await asyncio.sleep(3)  # longer than any retry delay: a refused page does not come back
        assert len(requests.sent) == 1
        assert await browser.evaluate(STATE) == "refused (400)"
    assert "invalid topic name" in detail
    assert detail in problem


@pytest.fixture(scope="module")
def auth_demo_node() -> Iterator[Node]:
    with run_server({"HERALD_JWT_SECRET": AUTH_SECRET, "HERALD_RETRY_MS": "1500"}) as node:
        yield node


def subscriber(ttl: float = 600, topics: str = "page-*") -> str:
    return mint(AUTH_SECRET, subscribe=[topics], ttl=ttl)


@needs_chromium
async def test_page_shows_why_it_may_not_subscribe(auth_demo_node: Node) -> None:
    topic = page_topic()
    cases = [(None, 401), (subscriber(topics="other-*"), 403)]
    async with httpx.AsyncClient(base_url=auth_demo_node.url, timeout=10) as client, chromium() as browser:
        for token, status in cases:
            query = {"topic": topic} | ({"access_token": token} if token else {})
            answer = await client.get("/events", params=query)
            assert answer.status_code == status
            await open_page(browser, f"{auth_demo_node.url}/?{urlencode(query)}")
            assert await browser.until(STATE, lambda s: s.startswith("refused")) == f"refused ({status})"
            assert answer.json()["detail"] in await browser.evaluate(PROBLEM)


@needs_chromium
async def test_page_subscribes_with_the_token_in_its_address(auth_demo_node: Node) -> None:
    topic, token = page_topic(), subscriber()
    publisher = mint(AUTH_SECRET, publish=["page-*"], ttl=600)
    async with httpx.AsyncClient(base_url=auth_demo_node.url, timeout=10) as client, chromium() as browser:
        requests = await open_page(browser, f"{auth_demo_node.url}/?topic={topic}&access_token={token}")
        assert await browser.until(STATE, lambda s: s == "live") == "live"
        ids = await post(client, {"topic": topic, "event": "created", "data": {"id": 1}}, publisher)
        assert await browser.until(ROWS, bool) == [[ids[0], "created", '{"id":1}']]
    assert parse_qs(urlsplit(requests.sent[0]["url"]).query) == {"topic": [topic], "access_token": [token]}


@needs_chromium
@pytest.mark.timeout(45)
async def test_page_resumes_with_last_event_id_after_its_stream_ends(auth_demo_node: Node) -> None:
    """The cookie's token expires: the node ends the stream; the page comes back with a new cookie and resumes."""
    topic = page_topic()
    publisher = mint(AUTH_SECRET, publish=["page-*"], ttl=600)
    async with httpx.AsyncClient(base_url=auth_demo_node.url, timeout=10) as client, chromium() as browser:
        cookie = {"name": "herald_token", "url": auth_demo_node.url}
        await browser.send("Network.setCookie", cookie | {"value": subscriber(ttl=5)})
        requests = await open_page(browser, f"{auth_demo_node.url}/?topic={topic}")
        assert await browser.until(STATE, lambda s: s == "live") == "live"
        await browser.send("Network.setCookie", cookie | {"value": subscriber()})  # for the next connection
        first = await post(client, {"topic": topic, "event": "created", "data": 1}, publisher)
        assert len(await browser.until(ROWS, bool)) == 1
        state = await browser.until(STATE, lambda s: s.startswith("reconnecting"), timeout=10)
        assert state.startswith("reconnecting"), state
        # Published while the page is away (it waits retry: 1500 ms): the resume brings them.
        missed = await post(
            client, [{"topic": topic, "data": 2}, {"topic": topic, "event": "updated", "data": 3}], publisher
        )
        rows = await browser.until(ROWS, lambda r: len(r) >= 3, timeout=10)
        assert await browser.evaluate(STATE) == "live"
        await asyncio.sleep(0.3)
        assert await browser.evaluate(ROWS) == rows
    assert rows == [[first[0], "created", "1"], [missed[0], "message", "2"], [missed[1], "updated", "3"]]
    assert len(requests.sent) == 2
    assert "Last-Event-ID" not in requests.sent[0]["headers"]
    assert requests.sent[1]["headers"]["Last-Event-ID"] == first[0]
