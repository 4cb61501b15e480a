"""What a connection may cost before it has sent a request: deadlines, size caps and a cap on sockets.

An SSE node holds thousands of sockets for hours on purpose, which makes it
easy to fill with sockets that never become streams: connections that send
nothing, or a byte of their headers now and then ("slowloris"), or a body
that never ends, or headers of many megabytes (a parser that grows them by
concatenation spends quadratic time on them). uvicorn has no deadline before
a request's headers or during its body, no cap on their size, and counts
only what it serves. :class:`ConnectionGuard` adds them to Herald's protocol
(:mod:`api.adapter.protocol`), one per node:

* a connection that has not sent a complete request head within
  ``HERALD_HEADER_TIMEOUT`` seconds of connecting (or of starting its next
  request) is closed (a ``408`` if it sent part of one);
* a request body that goes ``HERALD_BODY_TIMEOUT`` seconds without a byte
  is answered ``408`` and closed;
* the request line may hold ``HERALD_MAX_REQUEST_LINE`` bytes (else
  ``414``), the whole head ``HERALD_MAX_HEADER_BYTES`` (else ``431``),
  checked as bytes arrive: the parser never sees more than that;
* past ``HERALD_MAX_SOCKETS`` open sockets (by default what the open-files
  limit allows, less a reserve for Redis, logs and the listening socket), a
  new connection makes room by closing the oldest one still waiting for its
  request; with none waiting, the new one is closed. The node never runs out
  of file descriptors, which would make it refuse everyone.

Only connections waiting for a head or a body are tracked (a dict entry
each, no timer): a stream, once its request is in, costs nothing here. One
sweep a second closes the late ones, and one log line at most every
:data:`LOG_EVERY` seconds says how many connections were shed and why.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from api.adapter.protocol import HeraldHttpToolsProtocol
    from api.settings import Settings

log = logging.getLogger("herald.guard")

SWEEP_EVERY = 1.0
"""Seconds between two sweeps for connections past their deadline."""

LOG_EVERY = 10.0
"""Seconds between two log lines about shed connections (each sums up what was shed meanwhile)."""

FD_RESERVE_MIN = 64
"""File descriptors kept free of client sockets at least: Redis connections, log files, the listening socket."""

REASONS = (
    "header_timeout",
    "body_timeout",
    "request_line_too_long",
    "headers_too_large",
    "missing_host",
    "too_many_sockets",
)
"""Why a connection was shed: the label values of ``herald_connections_shed_total``."""

_WHY = {
    "header_timeout": "sent no complete request head within HERALD_HEADER_TIMEOUT",
    "body_timeout": "sent no body byte within HERALD_BODY_TIMEOUT",
    "request_line_too_long": "sent a request line over HERALD_MAX_REQUEST_LINE (414)",
    "headers_too_large": "sent a head over HERALD_MAX_HEADER_BYTES (431)",
    "missing_host": "sent an HTTP/1.1 request without Host (400)",
    "too_many_sockets": "came past HERALD_MAX_SOCKETS (the oldest idle ones closed first)",
}

HEAD, BODY = 0, 1


def default_max_sockets() -> int:
    """Client sockets a node may hold: its open-files limit (raised to the hard limit at start), less a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(16, soft - max(FD_RESERVE_MIN, soft // 20))


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    body_timeout: float
    max_request_line: int
    max_head_bytes: int
    max_sockets: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            max_request_line=settings.max_request_line,
            max_head_bytes=settings.max_header_bytes,
            max_sockets=settings.max_sockets or default_max_sockets(),
        )


class _Waiting:
    """A connection waiting for its request's head (with its bytes so far) or for the next bytes of its body."""

    __slots__ = ("deadline", "head_bytes", "phase")

    def __init__(self, phase: int, deadline: float) -> None:
        self.phase = phase
        self.deadline = deadline
        self.head_bytes = 0


class ConnectionGuard:
    """The node's deadlines and caps for connections that have not (fully) sent their request; one per node."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._waiting: dict[HeraldHttpToolsProtocol, _Waiting] = {}
        self.shed: dict[str, int] = dict.fromkeys(REASONS, 0)
        """Connections shed since start, by reason (``herald_connections_shed_total``)."""
        self._unlogged: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._logged_at = -LOG_EVERY  # the first shed connections are told at the next sweep
        self._sweeper: asyncio.TimerHandle | None = None
        self._sockets: Collection[object] = ()  # the server's open connections (uvicorn's set), for the log line

    @property
    def waiting(self) -> int:
        """Connections waiting for a request head or body now."""
        return len(self._waiting)

    # -- the protocol's calls ------------------------------------------------

    def admit(self, protocol: HeraldHttpToolsProtocol, open_sockets: int) -> bool:
        """A new connection (counted in ``open_sockets``); whether it may stay. Makes room past the cap."""
        self._start_sweeping(protocol.loop)
        self._sockets = protocol.connections
        if open_sockets > self.limits.max_sockets:
            oldest = next((p for p, w in self._waiting.items() if w.phase == HEAD), None)
            self._count("too_many_sockets")
            if oldest is None:
                return False  # every socket is a request or a stream: this one goes
            self._close(oldest, None)
        self.request_started(protocol)
        return True

    def request_started(self, protocol: HeraldHttpToolsProtocol) -> None:
        """A connection that waits for a request head from now (new, or its previous request is done)."""
        if protocol not in self._waiting:
            self._waiting[protocol] = _Waiting(HEAD, self._clock() + self.limits.header_timeout)

    def head_room(self, protocol: HeraldHttpToolsProtocol) -> int | None:
        """Bytes the connection's request head may still take; None when it is not reading a head."""
        waiting = self._waiting.get(protocol)
        if waiting is None or waiting.phase != HEAD:
            return None
        return self.limits.max_head_bytes - waiting.head_bytes

    def head_read(self, protocol: HeraldHttpToolsProtocol, count: int) -> None:
        waiting = self._waiting.get(protocol)
        if waiting is not None and waiting.phase == HEAD:
            waiting.head_bytes += count

    def head_done(self, protocol: HeraldHttpToolsProtocol, body: bool) -> None:
        """The request's head is in: it waits for its body now, or for nothing."""
        if body:
            self._waiting[protocol] = _Waiting(BODY, self._clock() + self.limits.body_timeout)
        else:
            self._waiting.pop(protocol, None)

    def body_read(self, protocol: HeraldHttpToolsProtocol) -> None:
        """Body bytes came: the body's deadline starts again."""
        waiting = self._waiting.get(protocol)
        if waiting is not None and waiting.phase == BODY:
            waiting.deadline = self._clock() + self.limits.body_timeout

    def done(self, protocol: HeraldHttpToolsProtocol) -> None:
        """The request is all in (or the connection is gone): nothing to wait for."""
        self._waiting.pop(protocol, None)

    def refuse(self, protocol: HeraldHttpToolsProtocol, reason: str, status: int) -> None:
        """Answer ``status`` and close: the request broke a cap (:data:`REASONS`)."""
        self._count(reason)
        self._close(protocol, status)

    # -- the sweep -----------------------------------------------------------

    def _start_sweeping(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweeper is None:
            self._sweeper = loop.call_later(SWEEP_EVERY, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = self._clock()
        late = [(p, w) for p, w in self._waiting.items() if w.deadline <= now]
        for protocol, waiting in late:
            if waiting.phase == BODY:
                self._count("body_timeout")
                self._close(protocol, 408)
            else:
                self._count("header_timeout")
                self._close(protocol, 408 if waiting.head_bytes else None)
        if now - self._logged_at >= LOG_EVERY:
            self._log(now)
        self._sweeper = loop.call_later(SWEEP_EVERY, self._sweep, loop)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._log(self._clock())

    def _count(self, reason: str) -> None:
        self.shed[reason] += 1
        self._unlogged[reason] += 1

    def _log(self, now: float) -> None:
        self._logged_at = now
        shed = {reason: count for reason, count in self._unlogged.items() if count}
        if not shed:
            return
        self._unlogged = dict.fromkeys(REASONS, 0)
        parts = "; ".join(f"{count} {_WHY[reason]}" for reason, count in shed.items())
        log.warning(
            "shed %d connections: %s (%d sockets open, cap %d)",
            sum(shed.values()),
            parts,
            len(self._sockets),
            self.limits.max_sockets,
            extra={f"shed_{reason}": count for reason, count in shed.items()},
        )

    def _close(self, protocol: HeraldHttpToolsProtocol, status: int | None) -> None:
        self._waiting.pop(protocol, None)
        protocol.shed(status)
