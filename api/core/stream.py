"""The ``text/event-stream`` response: one client's writer.

It sends the stream's first bytes at once (reconnect hint and position),
then the replay frames the hub worked out, then hands over to live events,
sending everything queued since the last write as one chunk. A closed
connection is released at once rather than at the next write: Herald's own
HTTP protocol calls the stream back when its client goes away; under any
other server a second task waits in ``receive()``. What the server offers
beyond ASGI (that callback, writes straight to the socket, dropping a
stalled client's connection) it is asked through :data:`api.adapter.active`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api import adapter
from api.core.connection import Closed, Connection
from api.core.hub import Hub, Opened
from api.core.sse import CUT_OFF_NOTICE, HEARTBEAT, position_frame, preamble, retry_notice
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
        hooks: tuple[Callable[[], None], Callable[[], None]] | None = None,
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
        self._hooks = hooks  # called as the answer starts and when it ends (Mercure's active subscriptions)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        connection = self._connection
        hooks = self._hooks
        if hooks is not None:
            hooks[0]()
        server = adapter.active
        watcher: asyncio.Task[None] | None = None
        notifier = server.disconnect_notifier(receive, self._client_gone)
        if notifier is None:
            watcher = asyncio.create_task(_watch_disconnect(receive, connection))
        try:
            opened = self._opened
            tally = self._hub.tally
            if opened is None:
                notice = retry_notice(self._retry_ms, "waiting for the broker")
                await server.send_head(scope, receive, send, self.raw_headers, notice)
                opened = await self._wait_and_open(send)
                if opened is not None and opened.fresh:
                    first = position_frame(opened.marker)
                    await send({"type": "http.response.body", "body": first, "more_body": True})
                    tally.bytes += len(first)
            else:
                first = preamble(self._retry_ms, opened.marker if opened.fresh else None)
                await server.send_head(scope, receive, send, self.raw_headers, first)
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
                writer = server.direct_writer(scope, receive)
                if writer is not None:
                    connection.go_direct(writer)
                while (chunk := await connection.next_chunk()) is not None:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if connection.closed is not Closed.DISCONNECTED:
                # Cut off for falling behind: the stream says so last (the adapter has already said it, ended the
                # response and marked the request gone: then this returns at once).
                last = CUT_OFF_NOTICE if connection.closed is Closed.OVERFLOW else b""
                await send({"type": "http.response.body", "body": last, "more_body": False})
        finally:
            if notifier is not None:
                notifier.on_lost = None  # the connection may serve another request
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            self._hub.detach(connection)
            if hooks is not None:
                hooks[1]()

    def _client_gone(self) -> None:
        """The server's protocol calls this when the client's connection is lost (a bound method: no partial kept)."""
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
