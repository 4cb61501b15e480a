"""Streams answered by Herald's HTTP protocol itself: ``GET /events`` when nothing needs awaiting.

Through the ASGI app, a connect costs uvicorn's request cycle, a task, and
the coroutines of the app's path to the stream, all held for as long as the
stream is open (:mod:`api.routes.events`, :mod:`api.core.stream`). Most connects need
none of it: a fresh stream (no ``Last-Event-ID``) when

* access control is off, or the client's token was verified earlier (it is
  in the verifier's cache) and covers every topic asked for;
* the broker answers the client's position at once
  (:class:`broker.base.PositionNow`: the embedded broker always, the Redis
  broker for topics its feed already carries);
* the node's feed already has the topics, or takes them at once
  (:class:`broker.base.SubscribeNow`: the embedded broker).

For those, :class:`StreamLane` answers from the protocol's
``on_headers_complete`` (:mod:`api.adapter.protocol`): the head and the first chunk
in one write, the client registered live with the hub in the same step
(:meth:`api.core.hub.Hub.open_now`), its token's expiry set as the app sets it,
and the stream then lives as callbacks, a :class:`LaneStream`:

* the hub's rounds write its events (it is the connection's direct writer,
  as :class:`api.adapter.writes.UvicornDirectWriter` is for the app's streams);
* when the socket pushes back, its queue waits (and the client is cut off
  past its byte budget, as any stream) until the transport's
  ``resume_writing`` has it written by the next round;
* a close (client gone, cut off, node draining, token expired) ends the
  response as the app's stream ends it: the last chunk, then uvicorn's own
  ``on_response_complete`` (keep-alive, pipelined requests, shutdown).

Everything else takes the app's way, unchanged: a resume, a token to verify
or to refuse, a topic new to a node on Redis, a Redis feed (re)connecting,
a node draining or full, a change of the feed's topics under way, a broker
that is down, a request with a body, HTTP/1.0, ``HEAD``, uvicorn's access
log on, an app mounted under a ``root_path``, a request pipelined behind
another, and any query the app would refuse (it answers the 400).

The answer is the app's, byte for byte (``tests/adapter/test_lane.py`` compares
them), and the hub's guarantees are untouched: the connection is an ordinary
:class:`~api.core.connection.Connection`, only its writer differs. What it saves,
per stream (docs/performance.md; ``make bench``: connects, idle memory): a request
cycle, a task and four coroutine frames held for the stream's life, and
their creation on every connect.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any

import httptools

from api.adapter.writes import UvicornDirectWriter, cut_off, stream_head
from api.auth.access import Access
from api.auth.cors import Cors
from api.auth.credentials import subscriber_token
from api.core.connection import Closed, Connection
from api.core.hub import Hub
from api.core.sse import preamble
from api.core.stream import RAW_HEADERS
from api.errors import RequestRejected
from api.routes.events import node_id_header, parse_query
from api.settings import Settings
from api.subscribe import check_topics, native_plan_now, open_subscription_now

if TYPE_CHECKING:
    from api.adapter.protocol import HeraldHttpToolsProtocol

EVENTS_PATH = b"/events"

QUERIES_KEPT = 1024
"""Query strings whose parsed subscription is kept (then the lane starts over)."""

QUERY_KEPT_BYTES = 2048
"""Longest query string whose subscription is kept. A connect storm repeats a few short subscriptions; a client
sending ever new long ones (up to HERALD_MAX_REQUEST_LINE each) would otherwise fill the cache with them: kept,
the queries and their fields hold at most about QUERIES_KEPT x 2 x this many bytes."""

Header = tuple[bytes, bytes]

HEADS_KEPT = 64
"""Response heads kept (by keep-alive and CORS answer; then the lane starts over)."""

_UNSEEN: Any = object()

_BODY_HEADERS = frozenset((b"content-length", b"transfer-encoding"))
"""A request with a body is left to the app (uvicorn's cycle keeps the body)."""


class _NothingWaits:
    """The "message arrived" event of a lane stream: uvicorn's protocol sets it; no one waits on it."""

    __slots__ = ()

    def set(self) -> None:
        pass

    def is_set(self) -> bool:
        return True


class StreamLane:
    """Answers a node's ``GET /events`` from the protocol when it can (:meth:`answer`); one per app.

    Built by the app's lifespan, and only used by
    :class:`api.adapter.protocol.HeraldHttpToolsProtocol`. With access control on it
    takes a stream whose token the verifier has already checked (a connect
    storm carries a few tokens: the first connect of each goes the app's
    way, which verifies it) and that covers every topic asked for.
    """

    __slots__ = ("_access", "_cookie", "_cors", "_headers", "_heads", "_hub", "_max_topics", "_queries", "_retry_ms")

    def __init__(self, hub: Hub, settings: Settings, access: Access, cors: Cors) -> None:
        self._hub = hub
        self._access = access
        self._cookie = settings.jwt_cookie
        self._cors = cors
        self._max_topics = settings.max_topics
        self._retry_ms = settings.retry_ms
        self._headers = [*RAW_HEADERS, node_id_header(settings.node_id)]
        # Response heads by keep-alive and CORS answer, each with the default headers it was made from.
        self._heads: dict[tuple[bool, tuple[Header, ...]], tuple[list[Header], bytes | None]] = {}
        # Query strings seen, with their checked topics and their fields (None: not for the lane). A connect
        # storm asks for the same few subscriptions thousands of times: each is parsed and checked once.
        self._queries: dict[bytes, tuple[tuple[str, ...], list[tuple[str, str]]] | None] = {}

    def _subscription_of(self, query: bytes) -> tuple[tuple[str, ...], list[tuple[str, str]]] | None:
        """The topics a query string asks for, checked as the app checks them, and its fields; None when the
        request is not the lane's (a resume, or topics the app refuses with a 400)."""
        fields = parse_query(query.decode("latin-1"))
        asked: tuple[tuple[str, ...], list[tuple[str, str]]] | None = None
        if not any(name == "last_event_id" and value.strip() for name, value in fields):
            with contextlib.suppress(RequestRejected):  # the app answers the 400
                asked = check_topics([v for n, v in fields if n == "topic"], self._max_topics), fields
        if len(query) <= QUERY_KEPT_BYTES:
            if len(self._queries) >= QUERIES_KEPT:
                self._queries.clear()
            self._queries[query] = asked
        return asked

    def _head(self, default_headers: list[Header], request_headers: list[Header], keep_alive: bool) -> bytes | None:
        """The response head (:func:`api.adapter.writes.stream_head`), made once per second, keep-alive and CORS answer.

        The server's default headers change once a second (``date``), as a
        new list: a head is kept with the list it was made from.
        """
        cors = self._cors
        extra = tuple(cors.headers(request_headers)) if cors else ()
        key = (keep_alive, extra)
        kept = self._heads.get(key)
        if kept is not None and kept[0] is default_headers:
            return kept[1]
        head = stream_head(default_headers, [*self._headers, *extra], keep_alive)
        if len(self._heads) >= HEADS_KEPT:
            self._heads.clear()
        self._heads[key] = (default_headers, head)
        return head

    def answer(self, protocol: HeraldHttpToolsProtocol) -> bool:
        """Serve the request whose headers ``protocol`` has just parsed as a stream, if this lane may; whether it did.

        Called from ``on_headers_complete`` with no request in progress on
        the connection. When it returns False nothing has been done, and
        uvicorn's own ``on_headers_complete`` takes the request to the app.
        """
        parser = protocol.parser
        if (
            protocol.access_log
            or protocol.limit_concurrency is not None
            or protocol.root_path
            or protocol.expect_100_continue
            or protocol.flow.write_paused
            or parser.get_method() != b"GET"
            or parser.get_http_version() != "1.1"
            or parser.should_upgrade()
        ):
            return False
        url = httptools.parse_url(protocol.url)
        if url.path != EVENTS_PATH:
            return False
        headers = protocol.headers
        for name, value in headers:
            if name in _BODY_HEADERS or (name == b"last-event-id" and value.strip()):
                return False
        query = url.query or b""
        asked = self._queries.get(query, _UNSEEN)
        if asked is _UNSEEN:
            asked = self._subscription_of(query)
        if asked is None:
            return False
        topics, fields = asked
        access = self._access
        # The token the app would pick (its verification only if the verifier has it already: api.subscribe).
        token = (
            subscriber_token(headers, fields, self._cookie, self._cors.trusts_ambient_credentials(headers))
            if access.enabled
            else None
        )
        plan = native_plan_now(access, topics, token)
        if plan is None:
            return False
        keep_alive = parser.should_keep_alive()
        head = self._head(protocol.server_state.default_headers, headers, keep_alive)
        transport = protocol.transport
        if head is None or transport.is_closing():
            return False
        hub = self._hub
        opened = open_subscription_now(hub, plan, functools.partial(cut_off, transport))
        if opened is None:
            return False
        connection, position, marker = opened
        first = preamble(self._retry_ms, marker)
        stream = LaneStream(protocol, connection, hub, keep_alive)
        protocol.cycle = stream  # type: ignore[assignment]  # what uvicorn's protocol asks a request in progress
        protocol.on_lost = stream.lost
        transport.write(b"%b%x\r\n%b\r\n" % (head, len(first), first))
        hub.tally.bytes += len(first)
        # Direct before live: the events go_live queues are marked for the hub's next round.
        connection.go_direct(stream)
        connection.wake_with(stream.woken)
        connection.go_live(position)
        return True


class LaneStream:
    """One stream of the lane: to uvicorn's protocol the request in progress, to the hub the connection's writer.

    The attributes without an underscore are the ones uvicorn's protocol
    reads or sets on its request cycle (``response_complete``,
    ``disconnected``, ``keep_alive``, ``more_body``, ``body``,
    ``message_event``).
    """

    __slots__ = (
        "_connection",
        "_ending",
        "_flow",
        "_hub",
        "_protocol",
        "_transport",
        "body",
        "disconnected",
        "keep_alive",
        "more_body",
        "response_complete",
    )

    message_event: Any = _NothingWaits()

    def __init__(self, protocol: HeraldHttpToolsProtocol, connection: Connection, hub: Hub, keep_alive: bool) -> None:
        self._protocol = protocol
        self._connection = connection
        self._hub = hub
        self._transport = protocol.transport
        self._flow = protocol.flow
        self._ending = False
        self.body = b""
        self.more_body = True
        self.disconnected = False
        self.keep_alive = keep_alive
        self.response_complete = False

    # -- the connection's writer (api.core.connection.DirectWriter) -----------------

    def ready(self) -> bool:
        return not (self._flow.write_paused or self.disconnected or self._transport.is_closing())

    # UvicornDirectWriter's own write (it needs only ``_transport``): the same framing and framing cache,
    # with no call in between (this runs once per client per round).
    write = UvicornDirectWriter.write

    # -- callbacks -------------------------------------------------------------

    def woken(self) -> None:
        """The connection's wake-up (:meth:`Connection.wake_with`): once it is closed, end the response soon.

        Soon, not now: this may run inside the hub's loop over a topic's
        connections, which ending (detaching) would change under it.
        """
        if self._connection.closed is not None and not self._ending:
            self._ending = True
            self._protocol.loop.call_soon(self._end)

    def writable(self) -> None:
        """The transport takes writes again (the protocol's ``resume_writing``)."""
        self._connection.resume()

    def lost(self) -> None:
        """The client's connection is gone (the protocol's ``on_lost``)."""
        self._connection.close(Closed.DISCONNECTED)

    def _end(self) -> None:
        protocol = self._protocol
        if protocol.on_lost == self.lost:
            protocol.on_lost = None
        self._hub.detach(self._connection)
        if self.response_complete:
            return
        self.response_complete = True
        transport = self._transport
        if self.disconnected or transport.is_closing():
            return  # gone (or cut off: aborted), nothing more to say
        # As uvicorn's send ends a chunked body: the last chunk, closed unless kept alive, then the next request.
        transport.write(b"0\r\n\r\n")
        if not self.keep_alive:
            transport.close()
        protocol.on_response_complete()
