"""A stream's bytes written straight to uvicorn's transport: the adapter's :class:`~api.adapter.ServerHooks`.

Each write to a socket is a trip through the TCP stack, and every ASGI
``send`` of a chunk is a few coroutine steps on top of it. So a stream's
head and first chunk leave in one write, and a live stream's events go to
the transport directly (:class:`UvicornDirectWriter`), framed exactly as
uvicorn's ``send`` frames a chunk: the bytes on the wire are the same, only
the path to them is shorter (``docs/benchmarks.md``: connects, fan-out).

All of it reads or sets attributes of uvicorn's httptools request cycle
(``transport``, ``flow``, ``disconnected``, ``response_started``,
``chunked_encoding``...) and uses its header checks (``HEADER_RE``,
``HEADER_VALUE_RE``, ``STATUS_LINE``): only imported, through
:func:`api.adapter.choose`, for a uvicorn the adapter was tested with.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE

from api.adapter import DIRECT_WRITES, DisconnectNotifier, ServerHooks
from api.adapter.protocol import HeraldHttpToolsProtocol
from api.core.sse import CUT_OFF_NOTICE

if TYPE_CHECKING:
    from api.adapter.guard import ConnectionGuard
    from api.adapter.lane import StreamLane
    from api.auth.access import Access
    from api.auth.cors import Cors
    from api.core.hub import Hub
    from api.settings import Settings

_UVICORN_HTTPTOOLS = "uvicorn.protocols.http.httptools_impl"
"""The module of uvicorn's httptools protocol and request cycle, whose internals the fast paths here use."""


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
    # own streams (api.adapter.lane) use this same write.
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
    write: each write is a trip through the TCP stack and a wake-up of the
    client, much of a connect storm's CPU. When ``send`` is uvicorn's own
    the head is written here, as uvicorn writes it (:func:`_write_head`),
    its header checks cached (uvicorn's ``send`` checks and lowers every
    header of every response anew). Otherwise (a middleware's ``send``,
    adding its headers) uvicorn's ``send`` frames the head into a stand-in
    for its transport, and the head goes out with the first chunk.
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


def disconnect_notifier(receive: Receive, on_lost: Callable[[], None]) -> DisconnectNotifier | None:
    """Herald's protocol serving this request, calling ``on_lost`` once the client is gone; None under another.

    ``on_lost`` is called at once when the client went away before it was in place.
    """
    cycle = getattr(receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    get_protocol = getattr(transport, "get_protocol", None)
    protocol = get_protocol() if callable(get_protocol) else None
    if not isinstance(protocol, HeraldHttpToolsProtocol):
        return None
    protocol.on_lost = on_lost
    if getattr(cycle, "disconnected", False):
        on_lost()  # gone before the callback was in place
    return protocol


CUT_OFF_GRACE = 10.0
"""Seconds a client cut off for falling behind has to take the end of its stream before its connection is dropped."""


def cut_off(transport: asyncio.Transport) -> None:
    """End a stream whose client fell too far behind: say why, end the response, close; drop it if it won't read.

    A client this far behind often has a full socket buffer, so what is
    written now reaches it only if it reads again. The notice and the end of
    the response are queued, the connection is closed gracefully, and after
    :data:`CUT_OFF_GRACE` seconds it is dropped whatever it read: the node
    holds nothing for a client that stopped reading. The request in progress
    is marked gone, so nothing else is written after the end.
    """
    if transport.is_closing():
        return
    protocol = transport.get_protocol()
    cycle = getattr(protocol, "cycle", None)
    if getattr(cycle, "chunked_encoding", True) is True:
        transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(CUT_OFF_NOTICE), CUT_OFF_NOTICE))
    else:
        transport.write(CUT_OFF_NOTICE)  # a close-delimited (HTTP/1.0) body ends with the connection
    if cycle is not None and hasattr(cycle, "disconnected"):
        cycle.disconnected = True
    transport.close()
    asyncio.get_running_loop().call_later(CUT_OFF_GRACE, transport.abort)


def transport_aborter(receive: Receive) -> Callable[[], None] | None:
    """How to end the stream of a client cut off for falling behind (:func:`cut_off`), when the server offers it.

    ASGI has no "abort", but uvicorn's ``receive`` is a method of its
    request cycle, which holds the transport. Under another server, the
    writer is only woken and ends the response normally.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is None or not callable(getattr(transport, "abort", None)):
        return None
    return functools.partial(cut_off, transport)


class UvicornHooks(ServerHooks):
    """The adapter's answers: Herald's protocol, direct writes, the transport's abort, the protocol's lane."""

    name = "Herald's HTTP adapter on uvicorn"
    http: type[asyncio.Protocol] | str = HeraldHttpToolsProtocol

    def direct_writes(self, receive: Receive, send: Send) -> bool:
        server = getattr(receive, "__self__", None)
        return server is not None and getattr(send, "__self__", None) is server

    def direct_writer(self, scope: Scope, receive: Receive) -> UvicornDirectWriter | None:
        return direct_writer(scope, receive)

    async def send_head(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        await send_head(scope, receive, send, headers, body)

    def disconnect_notifier(self, receive: Receive, on_lost: Callable[[], None]) -> DisconnectNotifier | None:
        return disconnect_notifier(receive, on_lost)

    def aborter(self, receive: Receive) -> Callable[[], None] | None:
        return transport_aborter(receive)

    def stream_lane(self, hub: Hub, settings: Settings, access: Access, cors: Cors) -> StreamLane | None:
        from api.adapter.lane import StreamLane  # the lane imports the node's modules, which import this package

        return StreamLane(hub, settings, access, cors)

    def connection_guard(self, settings: Settings) -> ConnectionGuard | None:
        from api.adapter.guard import ConnectionGuard, Limits

        return ConnectionGuard(Limits.from_settings(settings))


UVICORN_HOOKS = UvicornHooks()
