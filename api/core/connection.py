"""One SSE client's outbox: a bounded byte queue the hub fills and the client's writer drains.

The hub never awaits a client: it appends a ready-made frame and moves on.
Each client's own writer coroutine sends whatever has piled up as one write.
So a slow client only grows its own queue; once that holds more than its byte
budget the client is cut off (it can resume with ``Last-Event-ID``, the
events are in the replay buffer) instead of holding memory or the hub back.

The fast path (:class:`DirectWriter`): a live client whose socket is ready
needs no writer task at all. Its queue is handed to the transport by the
hub's flush, everything queued since the last one in one write, so a batch
of events is one write per client, and an event costs no task wake-up per
client. The writer task only steps in when the socket pushes
back (uvicorn pauses writing), so flow control is uvicorn's as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from api.core.metrics import WriteTally
from api.core.sse import HEARTBEAT

if TYPE_CHECKING:
    from api.core.routing import Selection


class Closed(StrEnum):
    """Why a connection ended."""

    DISCONNECTED = "disconnected"
    """The client went away."""
    OVERFLOW = "overflow"
    """The client fell more than its byte budget behind and was cut off."""
    SHUTDOWN = "shutdown"
    """The node is shutting down; the client will reconnect elsewhere."""
    EXPIRED = "expired"
    """The token the stream was opened with expired; the client reconnects with a fresh one."""


class DirectWriter(Protocol):
    """Writes body bytes straight to a ready client socket, bypassing the ASGI ``send``."""

    def ready(self) -> bool:
        """Whether a write now would go out without waiting (connected, not paused)."""

    def write(self, data: bytes) -> None:
        """Write ``data`` as the next piece of the response body."""


class Connection:
    """The hub's handle on one client.

    It starts *pending*: while the stream replays history, live events are
    held aside. :meth:`go_live` then keeps only those above the position the
    replay reached, which is what makes the hand-off from replay to live free
    of gaps and duplicates. After that, events with an id at or below the last
    one queued are dropped, so each event is queued at most once.
    """

    __slots__ = (
        "_chunks",
        "_direct",
        "_dirty",
        "_extra",
        "_limit",
        "_on_dirty",
        "_on_overflow",
        "_on_wake",
        "_pending",
        "_sending",
        "_size",
        "_tally",
        "_waiter",
        "active",
        "closed",
        "expires_at",
        "last_id",
        "selection",
        "topics",
    )

    def __init__(
        self,
        topics: tuple[str, ...],
        limit: int,
        on_overflow: Callable[[], None] | None = None,
        on_dirty: Callable[[Connection], None] | None = None,
        tally: WriteTally | None = None,
    ) -> None:
        self.topics = topics
        """The native topics it wants (its exact selectors); empty for a connection of another space."""
        self.selection: Selection | None = None
        """Its selectors, when it subscribes in another space than the native API's (set by the hub)."""
        self.last_id = 0
        self.closed: Closed | None = None
        self.expires_at = 0.0  # when the token it was opened with expires (0: never); see Hub.expire_at
        self.active = False
        self._limit = limit
        self._on_overflow = on_overflow
        self._chunks: list[bytes] = []
        self._size = 0
        self._pending: list[tuple[int, bytes]] | None = []
        # The writer task's wake-up, created only while it waits: an idle
        # stream holds no Event (an Event and its deque would be a large part of an idle
        # stream's bytes, per connection, for as long as it is open: ``make bench``, idle).
        self._waiter: asyncio.Future[None] | None = None
        self._direct: DirectWriter | None = None  # set once live, when the server allows it
        self._on_wake: Callable[[], None] | None = None  # a writer without a task (api.adapter.lane): see wake_with
        self._on_dirty = on_dirty  # the hub's "flush me this iteration"
        self._dirty = False  # already in the hub's flush list
        self._sending = False  # the writer task holds a chunk it has not written yet
        # What was written, counted per write (a chunk's frames are events but for the
        # ``_extra`` comments and resets pushed among them): nothing per event per client.
        self._tally = tally if tally is not None else WriteTally()
        self._extra = 0

    # -- fed by the hub (never awaits) -----------------------------------------

    def offer(self, event_id: int, frame: bytes) -> None:
        """Queue an event's frame, unless it was already queued or replayed."""
        if self.closed is not None:
            return
        if self._pending is not None:
            self._pending.append((event_id, frame))
            self._grow(len(frame))
            return
        if event_id <= self.last_id:
            return
        self.last_id = event_id
        self._chunks.append(frame)
        # _grow and _ready, inline: this runs once per client per event (``make bench``: fan-out).
        self.active = True
        size = self._size = self._size + len(frame)
        if size > self._limit:
            self.close(Closed.OVERFLOW)
        elif self._direct is not None and self._on_dirty is not None:
            if not self._dirty:
                self._dirty = True
                self._on_dirty(self)
        else:
            self._wake()

    def _ready(self) -> None:
        """Something is queued: have it written by the hub's flush, or else by the writer task."""
        if self._direct is not None and self._on_dirty is not None:
            if not self._dirty:
                self._dirty = True
                self._on_dirty(self)
        else:
            self._wake()

    def flush(self) -> bool:
        """Called by the hub's flush: write what is queued straight to the socket.

        Only when nothing can be ahead of it: the writer task holds no chunk
        and the socket takes writes now. Otherwise the writer task is woken
        and sends through the server as usual (waiting for the socket).
        Returns whether it wrote.
        """
        self._dirty = False
        if self.closed is not None or not self._chunks:
            return False
        direct = self._direct
        if direct is not None and not self._sending and direct.ready():
            chunks = self._chunks
            chunk = b"".join(chunks)
            # Counted here, inline (this runs once per client per flush): see _count.
            tally = self._tally
            tally.events += len(chunks) - self._extra
            tally.bytes += len(chunk)
            self._extra = 0
            chunks.clear()
            self._size = 0
            direct.write(chunk)
            return True
        self._wake()
        return False

    def go_direct(self, writer: DirectWriter) -> None:
        """From now on (the stream is live) queued events may be written by :meth:`flush`."""
        self._direct = writer

    def wake_with(self, callback: Callable[[], None]) -> None:
        """For a writer that is not a task waiting in :meth:`next_chunk`: called instead of waking one.

        It is called when the connection closes (``closed`` set) and when
        :meth:`flush` could not write (the socket pushes back); it must not
        call back into the hub (it may run inside the hub's loop over
        connections). Such a writer calls :meth:`resume` once the socket
        takes writes again.
        """
        self._on_wake = callback

    def resume(self) -> None:
        """The socket takes writes again: have what is queued written (by the hub's next round)."""
        if self.closed is None and self._chunks:
            self._ready()

    def _count(self, chunk: bytes) -> None:
        tally = self._tally
        tally.events += len(self._chunks) - self._extra
        tally.bytes += len(chunk)
        self._extra = 0

    def push(self, frame: bytes) -> None:
        """Queue bytes that carry no event id (a comment, a live-feed ``reset``)."""
        if self.closed is not None:
            return
        self._extra += 1
        self._chunks.append(frame)
        self._grow(len(frame))
        self._ready()

    def heartbeat(self) -> None:
        """Queue a comment unless something was queued since the last call."""
        if self.active:
            self.active = False
        elif self._pending is None:
            self.push(HEARTBEAT)
            self.active = False

    def close(self, reason: Closed) -> None:
        """End the stream; the first reason wins. Never awaits."""
        if self.closed is not None:
            return
        self.closed = reason
        self._chunks.clear()
        self._extra = 0
        self._pending = None
        self._wake()
        if reason is Closed.OVERFLOW and self._on_overflow is not None:
            self._on_overflow()

    def _grow(self, size: int) -> None:
        self.active = True
        self._size += size
        if self._size > self._limit:
            self.close(Closed.OVERFLOW)

    # -- used by the client's writer -------------------------------------------

    def go_live(self, position: int) -> None:
        """End the replay: everything up to ``position`` has been sent.

        Held-aside live events above ``position`` are queued in order; the
        ones at or below it were part of the replay and are dropped.
        """
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        self._size = sum(map(len, self._chunks))
        self.last_id = max(self.last_id, position)
        for event_id, frame in pending:
            self.offer(event_id, frame)

    async def next_chunk(self) -> bytes | None:
        """Wait for queued bytes and take them all as one chunk; None once closed.

        The caller must have sent the previous chunk before calling again:
        until then, :meth:`flush` writes nothing (it would overtake it).
        """
        self._sending = False
        while self.closed is None:
            if self._chunks:
                chunk = b"".join(self._chunks)
                self._count(chunk)
                self._chunks.clear()
                self._size = 0
                self._sending = True
                return chunk
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return None

    def _wake(self) -> None:
        """Wake the writer task if it waits (it rechecks the queue and ``closed`` before waiting again).

        A writer without a task is called instead (:meth:`wake_with`).
        """
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        elif self._on_wake is not None:
            self._on_wake()
