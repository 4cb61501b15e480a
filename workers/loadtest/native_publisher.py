"""``--publisher native``: the compiled publisher (``csrc/sse_publisher.c``) driven from the runner.

It replaces the Python pacers of :mod:`workers.loadtest.publisher` when the
publisher must not be what limits the server: one event per request (or
exactly ``--per-request`` events, Herald's batches), closed loop
(``--pipeline 1``: one request in flight per connection) or pipelined
(``--pipeline K``), paced to ``--rate`` for ``--duration`` seconds, over
``--publishers`` keep-alive connections (pacers, each owning its topics as
the Python pacers do, so a topic's order holds). Its result fills the same
:class:`~workers.loadtest.publisher.Ledger`, so the drain, the accounting
and the report do not know which publisher ran; its own CPU, per second,
is the run's ``publisher_cpu``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from workers.loadtest import native
from workers.loadtest.config import LoadConfig
from workers.loadtest.histogram import Histogram
from workers.loadtest.publisher import Ledger

EXIT_TIMEOUT = 5.0
"""Seconds the publisher has to exit once its result is in."""


def setup_message(config: LoadConfig) -> dict[str, Any]:
    """The publisher's setup line for ``config`` (see the protocol in ``csrc/sse_publisher.c``)."""
    parts = urlsplit(config.targets[0])
    assert parts.hostname is not None  # config.check_targets made sure
    host = socket.gethostbyname(parts.hostname)  # the C side takes an IPv4 address
    setup: dict[str, Any] = {
        "host": host,
        "port": parts.port or 80,
        "system": "mercure" if config.protocol == "mercure" else config.system,
        "topics": [config.topic_name(t) for t in range(config.topics)],
        "rate": config.rate,
        "duration": config.duration,
        "pacers": config.publishers,
        "pipeline": config.pipeline,
        "batch": config.per_request,
        "size": config.payload,
        # A request unanswered this long is given up as uncertain (the Python pacers retry for as long).
        "answer_timeout": max(1.0, min(config.retry_for, 30.0)),
    }
    if config.token:
        setup["token"] = config.token  # over its own pipe: never on a command line
    return {"setup": setup}


class NativePublisher:
    """One ``sse-publisher`` process: connected by :meth:`start`, publishing from :meth:`go` to :meth:`wait`."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.cpu: list[float] = []  # its own share of a core, per second of publishing
        self.progress: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None

    @classmethod
    async def start(cls, config: LoadConfig, timeout: float) -> NativePublisher:
        """Spawn it (built first if needed) and wait until every pacer is connected, at most ``timeout`` s."""
        process = await asyncio.create_subprocess_exec(
            str(native.build_publisher()), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 26
        )
        publisher = cls(process)
        try:
            await publisher._send(setup_message(config))
            ready = await asyncio.wait_for(publisher._next(), timeout)
            if ready.get("type") != "ready":
                raise RuntimeError(f"the native publisher said {ready!r} before it was ready")
        except BaseException:
            await publisher.close()
            raise
        return publisher

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        await self.process.stdin.drain()

    async def _next(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the native publisher exited (status {await self.process.wait()})")
        message: dict[str, Any] = json.loads(line)
        return message

    async def go(self) -> None:
        """Publishing starts now (the run's time zero)."""
        await self._send({"cmd": "go"})

    async def wait(self) -> dict[str, Any]:
        """Until its result (it stops by itself: ``duration``, then at most its answer timeout)."""
        while True:
            message = await self._next()
            if message["type"] == "progress":
                self.progress = message
                self.cpu.append(float(message["cpu"]))
            elif message["type"] == "result":
                self.result = message
                return message

    async def close(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), EXIT_TIMEOUT)
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def fill_ledger(ledger: Ledger, result: dict[str, Any]) -> None:
    """Put the native publisher's ``result`` into ``ledger``, as the Python pacers would have recorded it."""
    ledger.accepted = int(result["accepted"])
    ledger.refused = int(result["refused"])
    ledger.uncertain = int(result["uncertain"])
    ledger.requests = int(result["requests"])
    ledger.errors = Counter({str(k): int(v) for k, v in result["errors"].items()})
    ledger.latency = Histogram.from_json(result["latency"])
    ledger.accepted_at = Counter({int(k): int(v) for k, v in result["accepted_at"].items()})
    ledger.errors_at = Counter({int(k): int(v) for k, v in result["errors_at"].items()})
    for topic, last in result["last"].items():
        ledger.next_seq[int(topic)] = int(last) + 1
    ledger.unaccepted = {int(t): {int(s) for s in seqs} for t, seqs in result["unaccepted"].items()}
