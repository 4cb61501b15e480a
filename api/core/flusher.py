"""When and how the hub writes queued events to its clients' sockets.

Connections with queued bytes are *dirty*; the :class:`Flusher` writes each
dirty connection's whole queue as one write (:meth:`Connection.flush`), in
*rounds*. Two choices decide what a node can do under load, and what it
costs in latency when it is not loaded:

When a round starts (:meth:`Flusher.mark`). While writing is cheap, at
once. When it is expensive (many clients, each write a syscall: tens of
milliseconds for thousands of clients), a round that waits carries more
events per write, and events come faster than rounds can go out only under
load; on a lightly loaded node waiting would add latency to every event. So
the round waits as long as the last one took (capped: :data:`MAX_DELAY`)
when the last round carried several events, or when a *probe* says a
publisher is waiting on the node (see :meth:`Flusher._schedule`); otherwise
it starts at once.

How a round runs (:meth:`Flusher._write`). In slices of :data:`SLICE`
connections, one per loop iteration, so the node reads requests between
them: an event published while a round runs is queued at once, and goes out
in the same round to every client the round has not reached yet (sharing
their write with the event before it), and in the next round to the others.
Written in one go, a round held every request back for all of its time: an
event published while one ran waited the whole round before its own, which
doubled the p99 of ``make bench``'s latency scenario (docs/performance.md).

Guarantees: a connection is in at most one round at a time (its own
``_dirty`` flag), and each write takes its queue in order, so per-client
order is the queue's order; every dirty connection is written by a round
that is scheduled when it is marked or when the round before ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from api.core.connection import Connection
from api.core.metrics import LatencyWindow, Metrics

AT_ONCE = 0.0005
"""A round cheaper than this (seconds) does not delay the next one."""
MAX_DELAY = 0.02
"""The most a round is put off (seconds): the latency waiting may add."""
BEHIND_ROUND = 0.005
"""An event this soon (seconds) after an expensive round ended may come from a publisher waiting on the node."""
PROBE = 0.002
"""How long (seconds, at most) a round is held to see whether such a publisher sends more."""
SLICE = 256
"""Connections written per loop iteration (about 2 ms of writes), between which the node reads requests."""


class Flusher:
    """Writes the hub's dirty connections in rounds; ``events`` reads how many events the hub has taken in."""

    def __init__(self, events: Callable[[], int], latency: LatencyWindow, metrics: Metrics) -> None:
        self._events = events
        self._latency = latency
        self._metrics = metrics
        self._dirty: list[Connection] = []  # marked since the current round started
        self._round: list[Connection] = []  # the round being written
        self._next = 0  # index in _round of the next connection to write
        self._running = False  # a round is being written (it schedules the next one when it ends)
        self._cost = 0.0  # seconds the last round spent writing (its slices, not the time between them)
        self._spent = 0.0  # seconds the current round has spent writing so far
        self._written = 0  # writes of the current round so far
        self._ended = 0.0  # perf_counter() when the last round ended
        self._round_events = 0  # events taken in when the current round started
        self._coalescing = False  # the last round carried more than one event
        self.writes = 0
        """Writes made by rounds (the others are made by the connections' writer tasks)."""

    def mark(self, connection: Connection) -> None:
        """``connection`` has bytes queued: have a round write them (the connection's ``on_dirty``)."""
        if not self._dirty and not self._running:
            self._schedule()
        self._dirty.append(connection)

    def _schedule(self) -> None:
        """Start the next round now, or later so that more events join it.

        * the last round carried several events: events come faster than
          rounds, so wait as long as it took (what it gains: docs/performance.md,
          ``make bench``: single-event closed loop);
        * this event came soon after an expensive round ended (within
          :data:`BEHIND_ROUND`): it may be a publisher that waits for each
          answer (one event per request). Its answer left before the round,
          so it sent this event while the round ran, and it never makes a
          round carry two events by itself. Or it may be a paced stream's
          event that happened to land there. Tell them apart by *probing*:
          hold the round a little (:data:`PROBE`); if another event comes
          meanwhile, a publisher is waiting on the node: hold it the whole
          time. If not, go: a paced event paid at most the probe.
        * otherwise, at once.

        The probe replaced a narrow fixed window that decided for the
        whole wait at once: a closed-loop publisher's next event lands
        around that (behind a Redis round trip, or a client core busy
        reading 5,000 streams), so the node was bistable between coalescing
        and not; and a paced stream's event that landed in it waited a whole
        round, which made its next event land behind that round too.
        """
        loop = asyncio.get_running_loop()
        cost = self._cost
        if cost < AT_ONCE:
            loop.call_soon(self._start)
        elif self._coalescing:
            loop.call_later(min(cost, MAX_DELAY), self._start)
        elif time.perf_counter() - self._ended < min(cost, BEHIND_ROUND):
            probe = min(cost / 2, PROBE)
            loop.call_later(probe, self._probed, self._events(), min(cost, MAX_DELAY) - probe)
        else:
            loop.call_soon(self._start)

    def _probed(self, events: int, rest: float) -> None:
        """The probe of :meth:`_schedule` is over: start the round now, or in ``rest`` seconds if more events came."""
        if self._events() > events and rest > 0:
            asyncio.get_running_loop().call_later(rest, self._start)
        else:
            self._start()

    def _start(self) -> None:
        self._round, self._dirty = self._dirty, []
        self._next = 0
        self._running = True
        self._spent = 0.0
        self._written = 0
        events = self._events()
        self._coalescing = events - self._round_events > 1
        self._round_events = events
        self._write()

    def _write(self) -> None:
        """Write the next slice of the round; schedule the rest, or the next round when it is over."""
        started = time.perf_counter()
        round_, first = self._round, self._next
        last = min(first + SLICE, len(round_))
        written = 0
        for index in range(first, last):
            written += round_[index].flush()
        self._written += written
        ended = time.perf_counter()
        self._spent += ended - started
        if last < len(round_):
            self._next = last
            asyncio.get_running_loop().call_soon(self._write)
            return
        self.writes += self._written
        if self._written:
            self._metrics.flushed(self._latency.take(), time.time())
        self._round = []
        self._running = False
        self._cost = self._spent
        self._ended = ended
        if self._dirty:
            # Marked while the round ran (clients it had already written): they have waited since.
            if self._coalescing and self._cost >= AT_ONCE:
                asyncio.get_running_loop().call_later(min(self._cost, MAX_DELAY), self._start)
            else:
                asyncio.get_running_loop().call_soon(self._start)
