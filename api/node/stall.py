"""Stalls: this node noticing that it stood still, and resynchronising before it takes new streams.

A node can hang without dying (a gray failure): a stuck event loop, a long
swap storm, a paused VM or container, a ``SIGSTOP``. Meanwhile the world went
on: the front ended its silent streams and their clients resumed on other
nodes, its registry record expired (``/cluster`` listed it ``gone``), and
Redis may have dropped its feed connection (or kept a backlog for it). When it
runs again it must not serve as if nothing happened.

:class:`StallWatch` measures the node's own clock: a tick every
:data:`PERIOD` seconds, on ``CLOCK_BOOTTIME`` (it counts a stopped process's
time, and a suspended machine's). A tick :data:`STALL` seconds or more late
means the loop stood still: above any healthy pause (a garbage collection, a
busy loop's lag), below the registry's 5 s TTL and the front's stream read
timeout. The node then, in this order:

1. answers its ``/probe`` with 503 (:attr:`StallWatch.resyncing`): the front
   sends new streams to other nodes meanwhile (ops/nginx.conf);
2. says ``resyncing`` in its registry record (api.node.registry), at its next
   announcement, which the late tick makes at once;
3. rebuilds its broker feed (:class:`broker.base.Resyncs`: reconnect, and
   backfill every subscribed topic from the replay buffer), so every stream
   it serves from then on, old or new, gets every event exactly once;
4. serves again (``/probe`` 200, ``serving``).

Streams it kept (clients connected to it directly, not through the front)
stay open throughout: the feed's backfill, not a reconnect, closes their gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from broker.base import Broker, BrokerUnavailable, Resyncs

log = logging.getLogger("herald.stall")

PERIOD = 0.5
"""Seconds between two ticks of the watch."""
STALL = 3.0
"""A tick this many seconds late (or more) means the node stood still."""
RETRY = 1.0
"""Seconds between two resync attempts while Redis does not answer."""


def _now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class StallWatch:
    """Notices the node standing still, and resynchronises it (see the module docstring)."""

    def __init__(self, broker: Broker, stall: float = STALL, period: float = PERIOD) -> None:
        self._broker = broker
        self._stall = stall
        self._period = period
        self._task: asyncio.Task[None] | None = None
        self.resyncing = False
        """True from a stall's detection until the node is resynchronised: it takes no new streams."""
        self.stalls = 0
        """How many times the node stood still since it started."""
        self.longest = 0.0
        """The longest stall, in seconds."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="herald-stall-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        last = _now()
        while True:
            await asyncio.sleep(self._period)
            now = _now()
            stood = now - last - self._period
            last = now
            if stood >= self._stall:
                await self.recover(stood)
                last = _now()

    async def recover(self, stood: float) -> None:
        """Resynchronise after standing still for ``stood`` seconds; returns once the node serves again."""
        self.stalls += 1
        self.longest = max(self.longest, stood)
        self.resyncing = True
        log.warning(
            "this node stood still for %.1f s (a stuck loop, a stopped process or a paused machine): "
            "resynchronising before it takes new streams",
            stood,
            extra={"stalled_s": round(stood, 3)},
        )
        try:
            if isinstance(self._broker, Resyncs):
                while True:
                    try:
                        await self._broker.resync()
                        break
                    except BrokerUnavailable as exc:
                        log.warning("resync after the stall: %s; trying again", exc)
                        await asyncio.sleep(RETRY)
        finally:
            self.resyncing = False
        log.info("resynchronised after standing still: taking new streams again")
