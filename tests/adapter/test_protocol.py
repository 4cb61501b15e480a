"""Herald's HTTP protocol and the stream's first write, against uvicorn's own behaviour.

:mod:`api.adapter.protocol` keeps less per connection than uvicorn's httptools
protocol and :func:`api.adapter.writes.send_head` writes a stream's head and first
chunk at once; both must leave the bytes on the wire and the request's scope
exactly as uvicorn would. These tests drive the real uvicorn classes over a
transport that records its writes.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
import uvicorn
import uvloop
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
from uvicorn.protocols.utils import get_local_addr, get_remote_addr
from uvicorn.server import ServerState

from api.adapter import DIRECT_WRITES
from api.adapter.protocol import HeraldHttpToolsProtocol, LazyEvent, LazyFlowControl, local_address, remote_address
from api.adapter.writes import send_head
from api.core.stream import MEDIA_TYPE
from api.routes.events import parse_query

STREAM_HEADERS = [(b"content-type", MEDIA_TYPE.encode()), (b"cache-control", b"no-cache"), (b"x-node-id", b"n1")]
FIRST = b"retry: 2000\nid: 7\n\n"


class RecordingTransport:
    """Enough of an asyncio transport for uvicorn's protocol and request cycle; keeps every write."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.peer = peer
        self.protocol: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_protocol(self) -> Any:
        return self.protocol

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


def cycle_for(
    transport: RecordingTransport, *, method: str = "GET", keep_alive: bool = True, direct: bool = True
) -> RequestResponseCycle:
    scope: Any = {"type": "http", "method": method, "path": "/events", "headers": [], "query_string": b""}
    if direct:
        scope[DIRECT_WRITES] = True
    return RequestResponseCycle(
        scope=scope,
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=uvicorn.config.logger,
        access_logger=uvicorn.config.logger,
        access_log=False,
        default_headers=[(b"date", b"Thu, 01 Jan 2026 00:00:00 GMT"), (b"server", b"uvicorn")],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )


async def uvicorn_bytes(**kwargs: Any) -> bytes:
    """What uvicorn's own ``send`` writes for the start and the first chunk."""
    transport = RecordingTransport()
    cycle = cycle_for(transport, **kwargs)
    await cycle.send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
    await cycle.send({"type": "http.response.body", "body": FIRST, "more_body": True})
    return b"".join(transport.writes)


@pytest.mark.parametrize("keep_alive", [True, False])
async def test_send_head_writes_the_head_and_first_chunk_at_once_as_uvicorn_would(keep_alive: bool) -> None:
    transport = RecordingTransport()
    cycle = cycle_for(transport, keep_alive=keep_alive)
    await send_head(cycle.scope, cycle.receive, cycle.send, STREAM_HEADERS, FIRST)  # type: ignore[arg-type]
    assert transport.writes == [await uvicorn_bytes(keep_alive=keep_alive)]
    assert cycle.response_started
    assert cycle.chunked_encoding is True
    assert not cycle.response_complete
    # The stream goes on through uvicorn's send as before.
    await cycle.send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
    assert transport.writes[-1] == b"9\r\ndata: x\n\n\r\n"


async def test_send_head_through_a_middleware_keeps_its_headers_in_one_write() -> None:
    transport = RecordingTransport()
    cycle = cycle_for(transport)

    async def wrapped(message: Any) -> None:  # a middleware adding a header, as NodeIdMiddleware does
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message["headers"], (b"x-extra", b"1")]}
        await cycle.send(message)

    await send_head(cycle.scope, cycle.receive, wrapped, STREAM_HEADERS, FIRST)  # type: ignore[arg-type]
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert b"\r\nx-extra: 1\r\n" in head + b"\r\n"
    assert body == b"%x\r\n%b\r\n" % (len(FIRST), FIRST)
    assert transport.writes[0].replace(b"x-extra: 1\r\n", b"") == await uvicorn_bytes()


@pytest.mark.parametrize(
    ("method", "direct"),
    [("HEAD", True), ("GET", False)],
    ids=["a HEAD request: uvicorn's send decides", "something around the app wraps send"],
)
async def test_send_head_leaves_other_cases_to_uvicorns_send(method: str, direct: bool) -> None:
    transport = RecordingTransport()
    cycle = cycle_for(transport, method=method, direct=direct)
    await send_head(cycle.scope, cycle.receive, cycle.send, STREAM_HEADERS, FIRST)  # type: ignore[arg-type]
    assert b"".join(transport.writes) == await uvicorn_bytes(method=method, direct=direct)


async def test_send_head_refuses_an_invalid_header_as_uvicorn_does() -> None:
    cycle = cycle_for(RecordingTransport())
    with pytest.raises(RuntimeError, match="Invalid HTTP header value"):
        await send_head(cycle.scope, cycle.receive, cycle.send, [(b"x-bad", b"a\nb")], FIRST)  # type: ignore[arg-type]


async def test_lazy_event_behaves_as_an_event_and_makes_its_queue_on_the_first_wait() -> None:
    event = LazyEvent()
    assert not event.is_set()
    assert not isinstance(event._waiters, collections.deque)
    waiter = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    assert isinstance(event._waiters, collections.deque)
    event.set()
    assert await asyncio.wait_for(waiter, 1) is True
    event.clear()
    assert not event.is_set()
    assert await asyncio.wait_for(LazyEvent(True).wait(), 1) is True


def config_for(app: Any, **kwargs: Any) -> uvicorn.Config:
    config = uvicorn.Config(app, http=HeraldHttpToolsProtocol, log_config=None, lifespan="off", **kwargs)
    config.load()
    return config


async def serve_request(config: uvicorn.Config, request: bytes, peer: str = "127.0.0.1") -> RecordingTransport:
    transport = RecordingTransport((peer, 40000))
    protocol = HeraldHttpToolsProtocol(config, ServerState(), {}, asyncio.get_running_loop())
    transport.protocol = protocol
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(request)
    for _ in range(20):
        await asyncio.sleep(0)
    return transport


async def answer(scope: Any, receive: Any, send: Any) -> None:
    client = scope["client"]
    body = f"{scope['path']} {scope['scheme']} {client[0] if client else None}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize(
    ("peer", "expected"),
    [("127.0.0.1", b"/ https 203.0.113.9"), ("198.51.100.7", b"/ http 198.51.100.7")],
    ids=["from a trusted proxy", "from anyone else"],
)
async def test_forwarded_headers_apply_as_uvicorns_middleware_applies_them(peer: str, expected: bytes) -> None:
    config = config_for(answer)  # proxy_headers on, trusting 127.0.0.1: uvicorn's defaults
    request = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n\r\n"
    transport = await serve_request(config, request, peer)
    assert b"".join(transport.writes).endswith(b"\r\n\r\n" + expected)


async def test_the_app_runs_without_the_proxy_headers_middleware_on_its_stack() -> None:
    callers: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != "run_asgi":
            callers.append(frame.f_code.co_filename)
            frame = frame.f_back  # type: ignore[assignment]
        await answer(scope, receive, send)

    transport = await serve_request(config_for(app), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"".join(transport.writes).endswith(b"/ http 127.0.0.1")
    assert callers == []  # uvicorn's run_asgi calls the app itself: no middleware coroutine between, held per stream


async def test_pipelined_requests_are_answered_in_order() -> None:
    request = b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\n"
    transport = await serve_request(config_for(answer, proxy_headers=False), request)
    answers = b"".join(transport.writes)
    assert answers.index(b"/one http") < answers.index(b"/two http")


async def test_a_protocol_keeps_its_attributes_compact() -> None:
    """Every attribute set up front, at most 29: one more, or one first set late, gives each connection a dict.

    A dict of its own is 1.3 KB more per connection (``make bench``: idle
    memory); without one, the instance's values are in a small array and
    the collector sees them directly, not a dict holding them.
    """
    config = config_for(answer)
    loop = asyncio.get_running_loop()
    state = ServerState()

    def serve_stream() -> HeraldHttpToolsProtocol:
        protocol = HeraldHttpToolsProtocol(config, state, {}, loop)
        protocol.connection_made(RecordingTransport())  # type: ignore[arg-type]
        protocol.on_message_begin()
        protocol.on_lost = lambda: None  # as a stream sets it
        return protocol

    serve_stream()
    protocol = serve_stream()
    assert not any(isinstance(r, dict) and "parser" in r and "config" in r for r in gc.get_referents(protocol))
    assert len(vars(protocol)) <= 29


@pytest.mark.parametrize(
    "query",
    [
        "",
        "topic=a",
        "topic=a&topic=b",
        "a",
        "a&&b=",
        "=x",
        "a=b=c",
        "&topic=x&",
        "x=%20y",
        "x=a+b",
        "a=;b",
        "é=ü",
        "&&",
    ],
)
def test_parse_query_is_parse_qsl_with_blank_values(query: str) -> None:
    assert parse_query(query) == parse_qsl(query, keep_blank_values=True)


class _Addresses(asyncio.Protocol):
    """Records, for every accepted connection, Herald's addresses and uvicorn's (asked in that order)."""

    def __init__(self, seen: list[tuple[object, ...]], made: asyncio.Event) -> None:
        self.seen = seen
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ours = (local_address(transport), remote_address(transport))
        self.seen.append((*ours, get_local_addr(transport), get_remote_addr(transport)))  # type: ignore[arg-type]
        self.made.set()
        transport.close()


async def _accept_one(family: str, seen: list[tuple[object, ...]]) -> None:
    loop = asyncio.get_running_loop()
    made = asyncio.Event()
    if family == "unix":
        with tempfile.TemporaryDirectory() as directory:
            path = str(Path(directory) / "s")
            server = await loop.create_unix_server(lambda: _Addresses(seen, made), path)
            _, writer = await asyncio.open_unix_connection(path)
    else:
        host = "127.0.0.1" if family == "ipv4" else "::1"
        server = await loop.create_server(lambda: _Addresses(seen, made), host, 0)
        _, writer = await asyncio.open_connection(host, server.sockets[0].getsockname()[1])
    async with asyncio.timeout(5):
        await made.wait()
    writer.close()
    server.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6", "unix"])
def test_addresses_are_uvicorns_without_a_socket_object(loop_kind: str, family: str) -> None:
    """The scope's ``server`` and ``client`` as uvicorn gives them, from the transport's ``sockname``/``peername``."""
    if family == "ipv6" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    seen: list[tuple[object, ...]] = []
    runner = uvloop.run if loop_kind == "uvloop" else asyncio.run
    runner(_accept_one(family, seen))
    ours_local, ours_remote, uvicorn_local, uvicorn_remote = seen[0]
    assert (ours_local, ours_remote) == (uvicorn_local, uvicorn_remote)
    assert ours_local is not None
    assert (ours_remote is None) == (family == "unix")


def test_lazy_flow_control_starts_as_uvicorns() -> None:
    transport = RecordingTransport()
    ours, theirs = LazyFlowControl(transport), FlowControl(transport)  # type: ignore[arg-type]
    assert (ours.read_paused, ours.write_paused) == (theirs.read_paused, theirs.write_paused) == (False, False)
    assert ours._is_writable_event.is_set()
    assert theirs._is_writable_event.is_set()
    assert isinstance(ours._is_writable_event, LazyEvent)
