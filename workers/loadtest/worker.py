"""A subscriber worker process: ``python -m workers.loadtest.worker``, driven over its stdin and stdout.

The load tool spreads its subscribers over ``--procs`` of these, so that
reading events never competes with publishing for one core, and so that a
run too big for one process can use more. The protocol is one JSON object
per line each way:

parent -> worker
    ``{"setup": {...}}`` first (:class:`Setup`; its ``token``, when access
    control is on, goes to every subscriber and nowhere else; its
    ``silence``, seconds, absent or 0 for none, is how long an open stream
    may deliver nothing before it is closed and resumed), then commands:
    ``{"cmd": "go", "t0_ns": N}`` publishing starts now (the timeline's zero),
    ``{"cmd": "expect", "last": {topic: seq}}`` the last accepted event per topic,
    ``{"cmd": "finish", "last": {...}, "unaccepted": {topic: [seq, ...]}}``.
worker -> parent
    ``ready`` once every subscriber has had a 200 (or the connect time is up),
    ``progress`` every ``tick`` seconds (deltas of the latency buckets,
    running totals of the rest), ``caught_up`` once every subscriber has the
    last events it expects, ``result`` at the end; then it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.loadtest.histogram import Histogram
from workers.loadtest.subscriber import Recorder, Subscriber


@dataclass(frozen=True)
class Setup:
    """What a worker is told first: its subscribers and how to pace their connects."""

    worker: int
    subscribers: list[tuple[int, str, str, list[int]]]  # (index, "host:port", path, topic indices)
    ramp: float
    connect_timeout: float
    tick: float = 0.5
    token: str | None = None  # every subscriber's access token (Authorization: Bearer), None with auth off
    read_pause: float = 0.0  # seconds each subscriber stops reading after every read: slow consumers
    silence: float = 0.0  # seconds an open stream may stay silent before it is closed and resumed; 0: never


class CpuMeter:
    """CPU time of this process as a fraction of one core, between calls."""

    def __init__(self) -> None:
        self._cpu = self._now_cpu()
        self._wall = time.monotonic()

    @staticmethod
    def _now_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def take(self) -> float:
        cpu, wall = self._now_cpu(), time.monotonic()
        share = (cpu - self._cpu) / max(wall - self._wall, 1e-6)
        self._cpu, self._wall = cpu, wall
        return share


class MachineCpu:
    """How busy this machine's CPUs are (all of them, every program), from /proc/stat, between calls.

    When the whole machine is busy, the tool and the servers share cores:
    the figures are what this machine can do with both, not the servers alone.
    """

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    def take(self) -> float | None:
        """Busy share of all CPUs since the last call (0-1), or None where /proc/stat is missing."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] == last[0]:
            return None
        return 1 - (now[1] - last[1]) / (now[0] - last[0])


async def measure_lag(histogram: Histogram, period: float = 0.05) -> None:
    """Record how late the event loop wakes up: when it lags, so do the latencies measured here.

    uvloop keeps its timers in whole milliseconds (libuv's cached loop
    time), so a sleep can end up to a millisecond *early* by
    ``time.monotonic``; waking early is no lag, and is recorded as 0.
    """
    while True:
        start = time.monotonic()
        await asyncio.sleep(period)
        histogram.record(max(0, int((time.monotonic() - start - period) * 1_000_000)))


class Worker:
    """Runs one :class:`Setup`'s subscribers and reports on them."""

    def __init__(self, setup: Setup, emit: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.setup = setup
        self.emit = emit
        self.recorder = Recorder()
        self.subscribers = [
            Subscriber(
                index,
                target,
                path,
                topics,
                self.recorder,
                token=setup.token,
                read_pause=setup.read_pause,
                silence=setup.silence,
            )
            for index, target, path, topics in setup.subscribers
        ]
        self.ready = 0
        self.all_ready = asyncio.Event()
        self.expect: dict[int, int] | None = None
        self.lag = Histogram()
        self.cpu = CpuMeter()
        self.tasks: list[asyncio.Task[None]] = []

    def _one_ready(self) -> None:
        self.ready += 1
        if self.ready == len(self.subscribers):
            self.all_ready.set()

    async def connect_all(self) -> None:
        """Start every subscriber, spread evenly over ``ramp`` seconds."""
        count = len(self.subscribers)
        start = time.monotonic()
        for i, sub in enumerate(self.subscribers):
            delay = start + self.setup.ramp * i / max(count, 1) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.tasks.append(asyncio.create_task(sub.run(self._one_ready)))
        if count == 0:
            self.all_ready.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_ready.wait(), self.setup.connect_timeout)
        await self.emit({"type": "ready", "ready": self.ready, "of": count, **self._totals()})

    def _totals(self) -> dict[str, Any]:
        """The running totals of the live display (the final figures come with the result)."""
        recorder = self.recorder
        return {
            "connected": sum(1 for s in self.subscribers if s.streaming),
            "reconnects": recorder.reconnects,
            "resets": sum(recorder.reset_reasons.values()),
        }

    def _take_buckets(self) -> list[list[Any]]:
        """The latency buckets since the last call, as ``[node, second, histogram]``; recording goes on in new ones."""
        return [[node, sec, h.to_json()] for (node, sec), h in self.recorder.take_buckets().items()]

    async def report_progress(self) -> None:
        caught_up_sent = False
        while True:
            await asyncio.sleep(self.setup.tick)
            message = {"type": "progress", "cpu": round(self.cpu.take(), 3), "buckets": self._take_buckets()}
            await self.emit({**message, **self._totals()})
            if self.expect is not None and not caught_up_sent:
                expect = self.expect
                if all(s.caught_up(expect) for s in self.subscribers if s.first_ready):
                    caught_up_sent = True
                    await self.emit({"type": "caught_up"})

    def result(self, last: dict[int, int], unaccepted: dict[int, set[int]], counted_from: float) -> dict[str, Any]:
        subscribers = []
        for s in self.subscribers:
            late = not s.first_ready or s.first_ready > counted_from
            subscribers.append(
                {
                    "index": s.index,
                    "node": s.node,
                    "topics": len(s.topics),
                    "connected": bool(s.first_ready),
                    "late": late,
                    "delivered": s.delivered,
                    "expected": 0 if late else sum(last.get(t, 0) - len(unaccepted.get(t, ())) for t in s.topics),
                    "lost": 0 if late else s.lost(last, unaccepted),
                    "duplicated": s.duplicated,
                    "out_of_order": s.out_of_order,
                    "unknown": s.unknown,
                    "reconnects": len(s.gaps) + (1 if s.down_at else 0),
                    "resets": s.resets,
                    "gaps": [[round(a, 4), round(b, 4)] for a, b in s.gaps],
                    "down_at": round(s.down_at, 4) if s.down_at else None,
                }
            )
        recorder = self.recorder
        return {
            "type": "result",
            "worker": self.setup.worker,
            "subscribers": subscribers,
            "buckets": self._take_buckets(),
            "connect_time": recorder.connect_time.to_json(),
            "connects": dict(recorder.connects),
            "connect_errors": dict(recorder.connect_errors),
            "told_to_retry": recorder.told_to_retry,
            "drops": dict(recorder.drops),
            "reset_reasons": dict(recorder.reset_reasons),
            "fd_exhausted": recorder.fd_exhausted,
            "last_delivery_ns": recorder.last_delivery_ns,
            "body_bytes": recorder.body_bytes,
            "lag": self.lag.to_json(),
        }

    async def stop(self) -> None:
        for sub in self.subscribers:
            sub.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def main() -> None:
    reader = await _stdin_lines()
    out = sys.stdout.buffer

    async def emit(message: dict[str, Any]) -> None:
        out.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        out.flush()

    first = json.loads(await reader.readline())
    raw = first["setup"]
    setup = Setup(
        worker=raw["worker"],
        subscribers=[(i, target, path, topics) for i, target, path, topics in raw["subscribers"]],
        ramp=raw["ramp"],
        connect_timeout=raw["connect_timeout"],
        tick=raw.get("tick", 0.5),
        token=raw.get("token"),
        read_pause=raw.get("read_pause", 0.0),
        silence=raw.get("silence", 0.0),
    )
    worker = Worker(setup, emit)
    background = [asyncio.create_task(measure_lag(worker.lag)), asyncio.create_task(worker.connect_all())]
    counted_from = float("inf")
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command["cmd"] == "go":
                worker.recorder.t0_ns = command["t0_ns"]
                counted_from = command["t0_ns"] / 1e9
                background.append(asyncio.create_task(worker.report_progress()))
            elif command["cmd"] == "expect":
                worker.expect = {int(t): n for t, n in command["last"].items()}
            elif command["cmd"] == "finish":
                last = {int(t): n for t, n in command["last"].items()}
                unaccepted = {int(t): set(seqs) for t, seqs in command["unaccepted"].items()}
                await worker.stop()
                await emit(worker.result(last, unaccepted, counted_from))
                break
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await worker.stop()


def run() -> None:
    try:
        import uvloop  # the same loop the nodes run on: the tool must out-run them

        uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        asyncio.run(main())


if __name__ == "__main__":
    run()
