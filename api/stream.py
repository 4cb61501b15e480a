"""The ``text/event-stream`` response: one client's writer.

It sends the stream's first bytes at once (reconnect hint and position),
then the replay frames the hub worked out, then hands over to live events,
sending everything queued since the last write as one chunk. A closed
connection is released at once rather than at the next write: Herald's own
HTTP protocol (:mod:`api.protocol`) calls the stream back when its client
goes away; under any other server a second task waits in ``receive()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE

from api.connection import Closed, Connection
from api.hub import Hub, Opened
from api.protocol import HeraldHttpToolsProtocol
from api.sse import HEARTBEAT, position_frame, preamble, retry_notice
from broker.base import BrokerUnavailable

MEDIA_TYPE = "text/event-stream"
STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx honours this per response: never buffer the stream.
    "X-Accel-Buffering": "no",
}

RAW_HEADERS = (
    (b"content-type", MEDIA_TYPE.encode("latin-1")),
    *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in STREAM_HEADERS.items()),
)
"""The stream's response headers, encoded once (not per connect)."""

_WAIT_STEP = 0.5
"""Seconds between looks at a waiting stream (closed by its client, or by a drain?)."""

_REPLAY_CHUNK = 64 * 1024
"""Replayed frames are sent in writes of about this many bytes."""


def transport_aborter(receive: Receive) -> Callable[[], None] | None:
    """A way to drop the client's TCP connection at once, when the server offers one.

    A client cut off for falling behind usually has a full socket buffer, so
    the end of the response would never reach it and a polite close would
    wait for that forever. ASGI has no "abort", but uvicorn's ``receive`` is
    a method of its request cycle, which holds the transport; aborting it
    frees the connection now (uvicorn then sees a disconnect). Under another
    server, the writer is only woken and ends the response normally.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    return abort if callable(abort) else None


class UvicornDirectWriter:
    """Writes body chunks straight to uvicorn's transport, framed as uvicorn frames them.

    Only built for uvicorn's httptools protocol once it has chosen chunked
    encoding (it does for every stream: no Content-Length), so the bytes on
    the wire are exactly what its ``send`` would have written. Readiness is
    uvicorn's own flow control: a paused transport means the client is not
    reading, and the writer task then sends (and waits) through ``send``.
    """

    __slots__ = ("_cycle", "_flow", "_transport")

    # The last chunk framed, and its framing: in a fan-out every client's
    # chunk is the same bytes object (one event's frame, encoded once), so
    # the hub's flush frames it once, not once per client. The protocol's
    # own streams (api.lane) use this same write.
    _last: tuple[bytes, bytes] = (b"", b"")

    def __init__(self, cycle: object) -> None:
        self._cycle = cycle
        self._transport = cycle.transport  # type: ignore[attr-defined]
        self._flow = cycle.flow  # type: ignore[attr-defined]

    def ready(self) -> bool:
        return not (self._flow.write_paused or self._cycle.disconnected or self._transport.is_closing())  # type: ignore[attr-defined]

    def write(self, data: bytes) -> None:
        last, framed = UvicornDirectWriter._last
        if data is not last:
            framed = b"%x\r\n%b\r\n" % (len(data), data)
            UvicornDirectWriter._last = (data, framed)
        self._transport.write(framed)


_UVICORN_HTTPTOOLS = "uvicorn.protocols.http.httptools_impl"
"""The module of uvicorn's httptools protocol and request cycle, whose internals the fast paths here use."""

DIRECT_WRITES = "herald.direct_writes"
"""Scope key: true when nothing outside the app wraps the server's ``send`` (set by :class:`api.app.HeraldApp`)."""


def direct_writer(scope: Scope, receive: Receive) -> UvicornDirectWriter | None:
    """A :class:`UvicornDirectWriter` when the server is uvicorn (httptools) streaming chunked, else None.

    None too when something around the app wraps ``send`` (``herald.direct_writes``
    unset): its changes to the body must not be bypassed.
    """
    if not scope.get(DIRECT_WRITES):
        return None
    cycle = getattr(receive, "__self__", None)
    if cycle is None or type(cycle).__module__ != _UVICORN_HTTPTOOLS:
        return None
    if getattr(cycle, "chunked_encoding", None) is not True or getattr(cycle, "response_complete", True):
        return None
    if not (hasattr(cycle, "transport") and hasattr(cycle, "flow") and hasattr(cycle, "disconnected")):
        return None
    return UvicornDirectWriter(cycle)


def _batches(frames: list[bytes]) -> Iterator[tuple[bytes, int]]:
    """The frames joined into writes of about :data:`_REPLAY_CHUNK` bytes, each with how many frames it holds."""
    batch: list[bytes] = []
    size = 0
    for frame in frames:
        batch.append(frame)
        size += len(frame)
        if size >= _REPLAY_CHUNK:
            yield b"".join(batch), len(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch), len(batch)


class _HeadHolder:
    """Stands in for uvicorn's transport while its ``send`` writes the response head: keeps the bytes instead."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.head = b""

    def write(self, data: bytes) -> None:
        self.head += data

    def is_closing(self) -> bool:
        return bool(self.transport.is_closing())


_HEAD_LINES: dict[tuple[bytes, bytes], bytes | None] = {}
"""Response headers checked as uvicorn's ``send`` checks them, each with its line of the head; None for one
that uvicorn's ``send`` must see (invalid, or ``content-length``, ``transfer-encoding``, ``connection``)."""

_HEAD_LINES_MAX = 1024
"""Entries kept before :data:`_HEAD_LINES` starts over (a new ``date`` header each second, CORS origins)."""

_SPECIAL_HEADERS = frozenset((b"content-length", b"transfer-encoding", b"connection"))


def _head_line(header: tuple[bytes, bytes]) -> bytes | None:
    line = _HEAD_LINES.get(header, b"")
    if line == b"":
        name, value = header
        if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value) or name.lower() in _SPECIAL_HEADERS:
            line = None
        else:
            line = b"%b: %b\r\n" % (name.lower(), value)
        if len(_HEAD_LINES) >= _HEAD_LINES_MAX:
            _HEAD_LINES.clear()
        _HEAD_LINES[header] = line
    return line


def stream_head(
    default_headers: list[tuple[bytes, bytes]], headers: list[tuple[bytes, bytes]], keep_alive: bool
) -> bytes | None:
    """The head of a chunked 200 as uvicorn's ``send`` writes it, up to the first chunk; None if it must not be.

    The server's default headers first, then ``headers``, ``connection:
    close`` when the connection is not kept alive. None when a header is
    one uvicorn's ``send`` treats specially or would refuse: then only its
    ``send`` may write the head.
    """
    lines = [STATUS_LINE[200]]
    for group in (default_headers, headers):
        for header in group:
            line = _head_line(header) if type(header) is tuple else None
            if line is None:
                return None
            lines.append(line)
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines.append(b"transfer-encoding: chunked\r\n\r\n")
    return b"".join(lines)


def _write_head(cycle: Any, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
    """Write the head of a 200 and ``body`` as its first chunk, as uvicorn's ``send`` would; whether it did.

    The bytes and the cycle's state afterwards are those of uvicorn's
    ``send`` (``http.response.start``, then a body chunk with more to come)
    for a response whose headers it would pass as they are
    (:func:`stream_head`). Anything else (access log on, a paused or lost
    connection, a HEAD request, a header uvicorn treats specially or would
    refuse) is left to uvicorn's ``send``: False, nothing done.
    """
    if cycle.access_log or cycle.flow.write_paused or cycle.disconnected or cycle.scope["method"] == "HEAD":
        return False
    head = stream_head(cycle.default_headers, headers, cycle.keep_alive)
    if head is None:
        return False
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.chunked_encoding = True
    cycle.transport.write(b"%b%x\r\n%b\r\n" % (head, len(body), body))
    return True


async def send_head(
    scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """``http.response.start`` (status 200, ``headers``), then ``body`` as the body's first bytes, more to come.

    Under uvicorn's httptools protocol, when nothing around the app wraps
    ``send`` (the conditions of :func:`direct_writer`), the two leave in one
    write. Each write to a loopback or LAN socket is a trip through the TCP
    stack and a wake-up of the client, a third of a node's CPU in a connect
    storm (``make bench``: 5,000 connects at once, 0.47 -> 0.43 s). When
    ``send`` is uvicorn's own (the SSE fast lane) the head is written here,
    as uvicorn writes it (:func:`_write_head`), its header checks cached:
    uvicorn's ``send`` checked and lowered every header of every response
    anew, a sixth of the Python a connect runs. Otherwise (a middleware's
    ``send``, adding its headers) uvicorn's ``send`` frames the head into a
    stand-in for its transport, and the head goes out with the first chunk.
    Anywhere else: two ``send`` calls.
    """
    cycle: Any = getattr(receive, "__self__", None)
    holder: _HeadHolder | None = None
    if (
        scope.get(DIRECT_WRITES)
        and type(cycle).__module__ == _UVICORN_HTTPTOOLS
        and getattr(cycle, "response_started", True) is False
        and hasattr(cycle, "transport")
    ):
        if body and getattr(send, "__self__", None) is cycle and _write_head(cycle, headers, body):
            return
        holder = cycle.transport = _HeadHolder(cycle.transport)
    try:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
    finally:
        if holder is not None:
            cycle.transport = holder.transport
    if holder is not None and holder.head:
        if cycle.chunked_encoding is True and body and not cycle.disconnected:
            holder.transport.write(b"%b%x\r\n%b\r\n" % (holder.head, len(body), body))
            return
        holder.transport.write(holder.head)  # not chunked (a HEAD request): uvicorn's send knows what to do
    await send({"type": "http.response.body", "body": body, "more_body": True})


def disconnect_notifier(receive: Receive) -> HeraldHttpToolsProtocol | None:
    """The server's protocol for this request when it can call back on a disconnect (Herald's own), else None."""
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    get_protocol = getattr(transport, "get_protocol", None)
    protocol = get_protocol() if callable(get_protocol) else None
    return protocol if isinstance(protocol, HeraldHttpToolsProtocol) else None


async def _watch_disconnect(receive: Receive, connection: Connection) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            connection.close(Closed.DISCONNECTED)
            return


class RetryLaterResponse(Response):
    """A ``200 text/event-stream`` that only says "come back in ``retry_ms``", then ends.

    For a stream the node can't take now (draining, at its connection limit):
    EventSource reconnects after ``retry_ms`` (with its ``Last-Event-ID``,
    behind a proxy most likely to another node), where a 503 would end it for good.
    """

    def __init__(self, retry_ms: int, why: str, outcome: str = "retry_full") -> None:
        # The content type exactly as on a stream (Response would add a charset to it).
        super().__init__(retry_notice(retry_ms, why), headers={"Content-Type": MEDIA_TYPE, **STREAM_HEADERS})
        self.outcome = outcome
        """Why, for the node's metrics (``retry_draining``, ``retry_full``, ``retry_keys``)."""


class EventStreamResponse(Response):
    """Streams an admitted connection until it closes, then detaches it.

    ``opened`` is what :meth:`Hub.open` answered before the response started;
    None when the broker was unavailable. Then the stream starts anyway (a
    ``200`` the browser keeps, with ``retry:`` and a comment), waits for the
    broker with the connection registered (live events are held aside for
    it), opens it once the broker is back, and goes on as any stream: the
    client gets what it is owed, exactly once, without reconnecting.
    """

    media_type = MEDIA_TYPE

    def __init__(
        self,
        hub: Hub,
        connection: Connection,
        opened: Opened | None,
        *,
        resume: str | None,
        retry_ms: int,
        heartbeat: float,
    ) -> None:
        # Not Response.__init__: it would add a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.raw_headers = list(RAW_HEADERS)  # a copy: the caller may add its own
        self._hub = hub
        self._connection = connection
        self._opened = opened
        self.opened_at_once = opened is not None
        self._resume = resume
        self._retry_ms = retry_ms
        self._heartbeat = heartbeat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        connection = self._connection
        watcher: asyncio.Task[None] | None = None
        notifier = disconnect_notifier(receive)
        if notifier is not None:
            notifier.on_lost = self._client_gone
            if getattr(receive.__self__, "disconnected", False):  # type: ignore[attr-defined]
                connection.close(Closed.DISCONNECTED)  # gone before the callback was in place
        else:
            watcher = asyncio.create_task(_watch_disconnect(receive, connection))
        try:
            opened = self._opened
            tally = self._hub.tally
            if opened is None:
                notice = retry_notice(self._retry_ms, "waiting for the broker")
                await send_head(scope, receive, send, self.raw_headers, notice)
                opened = await self._wait_and_open(send)
                if opened is not None and opened.fresh:
                    first = position_frame(opened.position)
                    await send({"type": "http.response.body", "body": first, "more_body": True})
                    tally.bytes += len(first)
            else:
                first = preamble(self._retry_ms, opened.position if opened.fresh else None)
                await send_head(scope, receive, send, self.raw_headers, first)
                tally.bytes += len(first)
            if opened is not None:
                # Inline, not a helper coroutine: every frame on this path is
                # held for the stream's life (memory per idle connection).
                # The frames are the replayed events, after a reset when there is one.
                if opened.frames:
                    not_events = len(opened.frames) - opened.replayed
                    for batch, frames in _batches(opened.frames):
                        if connection.closed is not None:
                            break
                        await send({"type": "http.response.body", "body": batch, "more_body": True})
                        events = max(0, frames - not_events)
                        not_events = max(0, not_events - frames)
                        tally.bytes += len(batch)
                        tally.events += events
                        tally.replayed += events
                connection.go_live(opened.position)
                # Not held for the stream's life: a resumed stream's replayed frames (a list of
                # them, for a storm of resuming clients one per client) are done with.
                self._opened = opened = None
                writer = direct_writer(scope, receive)
                if writer is not None:
                    connection.go_direct(writer)
                while (chunk := await connection.next_chunk()) is not None:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if connection.closed is not Closed.DISCONNECTED:
                # After an abort (overflow) this returns at once: uvicorn knows
                # the client is gone.
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if notifier is not None:
                notifier.on_lost = None  # the connection may serve another request
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            self._hub.detach(connection)

    def _client_gone(self) -> None:
        """Herald's protocol calls this when the client's connection is lost (a bound method: no partial kept)."""
        self._connection.close(Closed.DISCONNECTED)

    async def _wait_and_open(self, send: Send) -> Opened | None:
        """Keep the stream (and its heartbeats) up until the hub can open it; None if it closed first."""
        hub, connection = self._hub, self._connection
        hub.waited_for_broker += 1
        quiet_since = time.monotonic()
        while connection.closed is None:
            if await hub.wait_for_broker(min(_WAIT_STEP, self._heartbeat)) and connection.closed is None:
                try:
                    return await hub.open(connection, self._resume)
                except BrokerUnavailable:
                    pass  # down again: wait for it again
            if time.monotonic() - quiet_since >= self._heartbeat and connection.closed is None:
                await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})
                quiet_since = time.monotonic()
        return None


def connect_outcome(response: Response) -> str | None:
    """How a subscribe that answered ``response`` ended its connect, in ``herald_connects_total``'s words:
    a stream opened at once or waiting for the broker, or told to come back; None for any other answer."""
    if isinstance(response, RetryLaterResponse):
        return response.outcome
    if isinstance(response, EventStreamResponse):
        return "accepted" if response.opened_at_once else "waited"
    return None
