"""Herald's HTTP protocol: uvicorn's httptools protocol, lighter per connection, telling streams of disconnects.

ASGI reports a disconnect only to a task blocked in ``receive()``, so every
stream would need one more task (a coroutine chain and a future) for as long
as it is open, just to learn that its client went away. For idle streams
that task is most of what the app holds per connection, and its creation a
good part of a connect's CPU (docs/performance.md; ``make bench``: idle memory, connects). With
this protocol (``python -m api`` runs it) a stream registers a callback
instead; under any other server it falls back to the watcher task
(:mod:`api.core.stream`). Only used through :mod:`api.adapter`, for a uvicorn it was tested with.

An SSE connection lives for hours, so whatever uvicorn keeps per connection
in case it is needed is paid for as long. This protocol keeps the same
behaviour with less of it (what each saves: docs/performance.md, measured by ``make bench``):

* the two ``asyncio.Event`` of a connection (the request's "message
  arrived" and the flow control's "writable again") make their waiter queue
  on the first wait, not up front: an idle stream never waits on either,
  and each queue is a ``deque``;
* the queue of pipelined requests is made when a request is pipelined
  (never, for EventSource and most clients): another ``deque``;
* the connection's two addresses come from what the transport already
  knows (``peername``, ``sockname``): uvicorn asks for the transport's
  ``socket``, which makes a socket object (kept as long as the connection)
  and two system calls on each connect;
* ``--proxy-headers`` (uvicorn's default) applies ``X-Forwarded-For`` and
  ``X-Forwarded-Proto`` here, before the request's task starts, with
  uvicorn's own middleware run to completion at once, instead of the
  middleware wrapping the app, where its suspended coroutine stays on
  every stream's stack.

The memory per idle connection is in docs/benchmarks.md (idle memory), with
the compact attribute layout kept by ``__init__``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal

from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import is_ssl

if TYPE_CHECKING:
    from api.adapter.guard import ConnectionGuard


class LazyEvent(asyncio.Event):
    """An :class:`asyncio.Event` whose queue of waiters is made by the first :meth:`wait`.

    ``set`` and ``clear`` work on the empty class-level tuple until then.
    """

    _waiters: Any = ()

    def __init__(self, value: bool = False) -> None:  # no super().__init__: it makes the deque
        self._value = value

    def wait(self) -> Coroutine[Any, Any, Literal[True]]:
        if not isinstance(self._waiters, collections.deque):
            self._waiters = collections.deque()
        return super().wait()


class LazyFlowControl(FlowControl):
    """uvicorn's flow control, its "writable again" event a :class:`LazyEvent` (set: writable, as uvicorn's starts)."""

    def __init__(self, transport: asyncio.Transport) -> None:  # no super().__init__: it makes an Event and its deque
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._is_writable_event = LazyEvent(True)


def remote_address(transport: asyncio.BaseTransport) -> tuple[str, int] | None:
    """The client's address as uvicorn's ``get_remote_addr`` gives it for a socket, from ``peername``.

    ``(host, port)`` for IPv4 and IPv6 alike (IPv6's flow info and scope id
    dropped), None for a Unix socket.
    """
    info = transport.get_extra_info("peername")
    if isinstance(info, tuple | list) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


def local_address(transport: asyncio.BaseTransport) -> tuple[str, int | None] | None:
    """The server's address as uvicorn's ``get_local_addr`` gives it for a socket, from ``sockname``.

    ``(host, port)``, or ``(path, None)`` for a Unix socket.
    """
    info = transport.get_extra_info("sockname")
    if isinstance(info, tuple | list) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    if isinstance(info, str):
        return (info, None)
    return None


async def _forwarded_only(scope: Any, receive: Any, send: Any) -> None:
    """The "app" that the inline proxy-headers middleware runs: nothing, the scope is all it wanted."""


_INLINE: dict[ProxyHeadersMiddleware, ProxyHeadersMiddleware] = {}
"""Each server's proxy-headers middleware (the app uvicorn loaded) and its inline twin: the same trusted hosts,
wrapping nothing. Looked up per request, not kept per connection (see ``__init__``)."""


def _inline_forwarded(wrapper: ProxyHeadersMiddleware) -> ProxyHeadersMiddleware:
    inline = _INLINE.get(wrapper)
    if inline is None:
        inline = _INLINE[wrapper] = ProxyHeadersMiddleware(_forwarded_only)
        inline.trusted_hosts = wrapper.trusted_hosts
    return inline


_FORWARDED = frozenset((b"x-forwarded-for", b"x-forwarded-proto"))
"""The headers uvicorn's proxy-headers middleware reads: without them it leaves the scope as it is."""

_BODY_HEADERS = frozenset((b"content-length", b"transfer-encoding"))

_REASONS = {400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large"}


def plain_response(status: int, message: str) -> bytes:
    """A whole ``status`` answer with a text body, that closes the connection."""
    body = f"{message}\n".encode()
    head = STATUS_LINE.get(status) or b"HTTP/1.1 %d %b\r\n" % (status, _REASONS[status].encode())
    return b"%bcontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%b" % (
        head,
        len(body),
        body,
    )


class _Refused:
    """The "request in progress" of a request refused before the app saw it: uvicorn's protocol sees one that is done.

    The connection is closing; the parser may still call back for the rest
    of what it was fed (a body, a pipelined request), and those calls find
    nothing to do.
    """

    __slots__ = ()

    response_complete = True
    disconnected = True
    keep_alive = False
    more_body = False
    body = b""

    class _Event:
        def set(self) -> None:
            pass

        def is_set(self) -> bool:
            return True

    message_event = _Event()


REFUSED: Any = _Refused()


class CloseDelimitedCycle(RequestResponseCycle):
    """uvicorn's request cycle for an HTTP/1.0 request: a body without a length ends when the connection closes.

    HTTP/1.0 has no chunked encoding, but uvicorn's ``send`` chooses it for
    every response without a ``content-length``, whatever the request's
    version. For such a response this cycle writes the body as it comes and
    closes the connection after it, as HTTP/1.0 delimits it.
    """

    _close_delimited = False

    async def send(self, message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.start" and not self.response_started:
            headers = message.get("headers", [])
            if (
                self.scope["method"] != "HEAD"
                and message["status"] not in (204, 304)
                and not any(name.lower() in _BODY_HEADERS for name, _ in headers)
            ):
                self._close_delimited = True
                self.chunked_encoding = False
                self.keep_alive = False
                self.expected_content_length = 1 << 62  # no length: the body is as long as it is
        elif kind == "http.response.body" and self._close_delimited and not message.get("more_body", False):
            self.expected_content_length = len(message.get("body", b""))  # the last piece: nothing is missing
        await super().send(message)


class HeraldHttpToolsProtocol(HttpToolsProtocol):
    """Calls ``on_lost`` (set by the stream being served, cleared when it ends) once the connection is gone."""

    on_lost: Callable[[], None] | None
    pipeline: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Every attribute the protocol ever has is set by now, always in the same order, and
        # they are at most 29: the instances then share one key table and keep their values
        # in a small array. One attribute more (or one first set later, like ``url`` and
        # ``on_lost`` after uvicorn's own) turns each instance's attributes into a dict of
        # its own, per connection, for the connection's life (``make bench``: idle memory).
        self.pipeline = ()  # not uvicorn's deque: made when a request is pipelined (on_headers_complete)
        self.url = b""
        self.on_lost = None
        app = self.app
        if type(app) is ProxyHeadersMiddleware:
            _inline_forwarded(app)  # applied in on_headers_complete instead
            self.app = app.app

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # uvicorn's, but for the addresses (see the module's docstring) and the flow control's lazy Event.
        self.connections.add(self)
        self.transport = transport
        self.flow = LazyFlowControl(transport)
        self.server = local_address(transport)
        self.client = remote_address(transport)
        self.scheme = "https" if is_ssl(transport) else "http"
        if self.logger.level <= TRACE_LOG_LEVEL:
            prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
            self.logger.log(TRACE_LOG_LEVEL, "%sHTTP connection made", prefix)
        guard = self.guard
        if guard is not None and not guard.admit(self, len(self.connections)):
            self.shed(None)

    @property
    def guard(self) -> ConnectionGuard | None:
        """The node's deadlines and caps for requests not in yet (:mod:`api.adapter.guard`); None without."""
        guard: ConnectionGuard | None = getattr(self.app, "connection_guard", None)
        return guard

    def shed(self, status: int | None) -> None:
        """Close this connection (the guard's decision), with a ``status`` answer when one is due and can be given."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        cycle = self.cycle
        if status is not None and (cycle is None or cycle.response_complete or not cycle.response_started):
            transport.write(plain_response(status, _REASONS[status]))
        if cycle is None or cycle.response_complete:
            self.cycle = REFUSED
        transport.close()

    def data_received(self, data: bytes) -> None:
        guard = self.guard
        room = guard.head_room(self) if guard is not None else None
        if room is None:
            super().data_received(data)
            return
        if len(data) <= room:
            guard.head_read(self, len(data))  # type: ignore[union-attr]
            super().data_received(data)
            self._check_request_line(guard)  # type: ignore[arg-type]
            return
        # More than the head may still take: the parser gets only that much; if the head ends within it,
        # the rest is its body or the next request.
        guard.head_read(self, room)  # type: ignore[union-attr]
        super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if guard.head_room(self) is None:  # type: ignore[union-attr]
            self.data_received(data[room:])
            return
        if not self._check_request_line(guard):  # type: ignore[arg-type]
            guard.refuse(self, "headers_too_large", 431)  # type: ignore[union-attr]

    def _check_request_line(self, guard: ConnectionGuard) -> bool:
        """Refuse the request (414) when its request line is over the cap; whether it did."""
        if len(self.url) > guard.limits.max_request_line and not self.transport.is_closing():
            guard.refuse(self, "request_line_too_long", 414)
            return True
        return False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        guard = self.guard
        if guard is not None:
            guard.request_started(self)

    def on_body(self, body: bytes) -> None:
        guard = self.guard
        if guard is not None:
            guard.body_read(self)
        super().on_body(body)

    def on_message_complete(self) -> None:
        guard = self.guard
        if guard is not None:
            guard.done(self)
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        # A request that does not parse, behind one whose response is still streaming (pipelined): its 400 must
        # come after that response, in order. A stream never ends by itself, so it ends here, with its last
        # chunk (EventSource reconnects and resumes), and the 400 follows.
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and getattr(cycle, "response_started", True):
            if getattr(cycle, "chunked_encoding", True) is not True or self.transport.is_closing():
                self.transport.close()  # not a body that can be ended cleanly: only closing is left
                return
            self.transport.write(b"0\r\n\r\n")
            cycle.response_complete = True
            cycle.disconnected = True  # the app's sends and direct writes stop here
        super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        if self.transport.is_closing():
            self.cycle = REFUSED  # refused, or its connection is going: nothing more to serve on it
            return
        guard = self.guard
        if guard is not None:
            if self._check_request_line(guard):
                self.cycle = REFUSED
                return
            http_version = self.parser.get_http_version()
            if http_version == "1.1" and not any(name == b"host" for name, _ in self.headers):
                guard.refuse(self, "missing_host", 400)  # RFC 9112, 3.2: a request without Host is refused
                self.cycle = REFUSED
                return
            guard.head_done(self, any(name in _BODY_HEADERS for name, _ in self.headers))
        existing = self.cycle
        if existing is None or existing.response_complete:
            # A stream the app's lane can answer here, with no request cycle or task (api.adapter.lane).
            lane = getattr(self.app, "stream_lane", None)
            if lane is not None and lane.answer(self):
                return
        elif not self.pipeline:
            self.pipeline = collections.deque()  # this request will be queued behind the one in flight
        if self.app is not self.config.loaded_app:
            for name, _ in self.headers:
                if name in _FORWARDED:
                    self._apply_forwarded()
                    break
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not existing and type(cycle.message_event) is asyncio.Event:
            # Not waited on nor set yet: the request's task has not run.
            cycle.message_event = LazyEvent(cycle.message_event.is_set())
            if type(cycle) is RequestResponseCycle and cycle.scope["http_version"] == "1.0":
                cycle.__class__ = CloseDelimitedCycle  # before its task runs: every send is the 1.0 one

    def _apply_forwarded(self) -> None:
        """Run uvicorn's proxy-headers middleware on this request's scope; it finishes at once (it awaits nothing)."""
        forwarded = _INLINE.get(self.config.loaded_app)
        if forwarded is None:
            return
        run = forwarded(self.scope, _no_receive, _no_send)
        try:
            run.send(None)
        except StopIteration:
            return
        run.close()  # pragma: no cover - uvicorn's middleware awaits nothing before calling the app
        raise RuntimeError("uvicorn's proxy-headers middleware did not finish at once")  # pragma: no cover

    def resume_writing(self) -> None:
        super().resume_writing()
        writable = getattr(self.cycle, "writable", None)  # a stream of the lane (api.adapter.lane) writes what waited
        if writable is not None and not self.cycle.response_complete:
            writable()

    def connection_lost(self, exc: Exception | None) -> None:
        guard = self.guard
        if guard is not None:
            guard.done(self)
        super().connection_lost(exc)
        callback, self.on_lost = self.on_lost, None
        if callback is not None:
            callback()


async def _no_receive() -> Any:  # pragma: no cover - never called
    raise RuntimeError("not a request")


async def _no_send(message: Any) -> None:  # pragma: no cover - never called
    raise RuntimeError("not a request")
