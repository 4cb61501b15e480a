"""The demo producer (workers.demo) against a real node, plus its retry rules and command line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import datetime, timedelta

import httpx
import pytest

from tests.server import Node, run_server
from tests.sse_client import EventStream
from tests.sse_parser import SSEEvent
from workers import demo

RUN_TIMEOUT = 30.0


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
                events.append(await stream.next_event(timeout=10))
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
