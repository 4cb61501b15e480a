"""A stream gone silent is dead: the load tool's subscribers (Python and compiled) close it and resume.

A Herald node writes every open stream at least once a heartbeat, so a
stream that delivers nothing for longer is on a node that hangs (a gray
failure: SIGSTOP, a stuck loop) and holds the connection open. The server
here behaves so: it answers, sends one event, then holds the connection
without a byte more. The subscriber must give up on it after its silence
limit (small here), count it as ended ``silent``, and come back with
``Last-Event-ID``; a stream that keeps its heartbeats must be left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest

from workers.loadtest import native
from workers.loadtest.subscriber import Recorder, Subscriber
from workers.loadtest.wire import SILENT, payload

SILENCE = 0.5
"""The silence limit of these tests, seconds."""

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Node-Id: hung\r\n\r\n"


class HangingServer:
    """An SSE server on 127.0.0.1: the first stream sends an event and hangs; later ones send heartbeats.

    Every request head is put in :attr:`requests` as it arrives;
    :attr:`released` is set when the client has closed the hung stream;
    :meth:`heartbeats` waits for heartbeats sent.
    """

    def __init__(self, heartbeat: float = 0.1) -> None:
        self.heartbeat = heartbeat
        self.requests: asyncio.Queue[bytes] = asyncio.Queue()
        self.released = asyncio.Event()
        self.heartbeats_sent = 0
        self._beat = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._first = True

    async def heartbeats(self, count: int) -> None:
        """Until ``count`` more heartbeats have been sent."""
        target = self.heartbeats_sent + count
        while self.heartbeats_sent < target:
            self._beat.clear()
            await self._beat.wait()

    async def __aenter__(self) -> HangingServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    @property
    def target(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.requests.put_nowait(await reader.readuntil(b"\r\n\r\n"))
        first, self._first = self._first, False
        # A short retry, so the reconnect is quick; on the first stream one event: topic 0, sequence 1, id 1.
        event = f"id: 1\ndata: {payload(0, 1, time.time_ns(), 8)}\n\n" if first else ""
        writer.write(HEAD + f"retry: 10\n\n{event}".encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            if first:
                await reader.read()  # hung: not a byte more, until the client lets go
                self.released.set()
            else:
                while not reader.at_eof():
                    writer.write(b":\n\n")  # the heartbeat of a node that is fine
                    await writer.drain()
                    self.heartbeats_sent += 1
                    self._beat.set()
                    await asyncio.sleep(self.heartbeat)  # the pace of the heartbeats
        writer.close()


@pytest.mark.timeout(10)
async def test_a_silent_stream_is_closed_after_the_silence_limit_and_resumed_with_last_event_id() -> None:
    async with HangingServer() as server:
        recorder = Recorder()
        sub = Subscriber(0, server.target, "/events?topic=t", [0], recorder, silence=SILENCE)
        task = asyncio.create_task(sub.run(lambda: None))
        try:
            first = await server.requests.get()
            asked = time.monotonic()
            second = await server.requests.get()
            waited = time.monotonic() - asked
            await server.released.wait()
            # The resumed stream keeps its heartbeats: three silence limits of them, and it is left alone.
            await server.heartbeats(int(3 * SILENCE / server.heartbeat))
        finally:
            sub.stop()
            await asyncio.wait_for(task, 5)
    assert b"last-event-id" not in first.lower()
    assert b"Last-Event-ID: 1\r\n" in second  # resumed after the last event it had
    assert SILENCE <= waited < SILENCE + 2.0  # not before its limit, and soon after it
    assert recorder.drops == {SILENT: 1}  # once: the heartbeating stream was not cut
    assert server.requests.empty()  # no third connect
    assert (sub.delivered, sub.duplicated) == (1, 0)
    assert len(sub.gaps) == 1  # down from the silence until the resumed stream


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("native_tools")
async def test_the_compiled_subscriber_also_closes_a_silent_stream_and_resumes() -> None:
    try:
        binary = native.build()
    except native.NativeUnavailable as exc:
        pytest.skip(str(exc))
    async with HangingServer() as server:
        worker = await asyncio.create_subprocess_exec(
            str(binary), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert worker.stdin is not None
        assert worker.stdout is not None
        try:
            setup = {"worker": 0, "subscribers": [[0, server.target, "/events?topic=t", [0]]], "ramp": 0,
                     "connect_timeout": 5, "silence": SILENCE}  # fmt: skip
            worker.stdin.write(json.dumps({"setup": setup}).encode() + b"\n")
            first = await server.requests.get()
            asked = time.monotonic()
            second = await server.requests.get()
            waited = time.monotonic() - asked
            await server.released.wait()
            worker.stdin.write(json.dumps({"cmd": "finish", "last": {"0": 1}, "unaccepted": {}}).encode() + b"\n")
            result = await _message(worker.stdout, "result")
        finally:
            if worker.returncode is None:
                worker.kill()
            await worker.wait()
    assert b"last-event-id" not in first.lower()
    assert b"Last-Event-ID: 1\r\n" in second
    assert SILENCE <= waited < SILENCE + 2.0  # it looks every 0.5 s
    assert result["drops"] == {SILENT: 1}
    [sub] = result["subscribers"]
    assert (sub["delivered"], len(sub["gaps"])) == (1, 1)


async def _message(stdout: asyncio.StreamReader, kind: str) -> dict[str, Any]:
    """The worker's next message of type ``kind`` (others are skipped)."""
    while line := await stdout.readline():
        message: dict[str, Any] = json.loads(line)
        if message["type"] == kind:
            return message
    raise AssertionError(f"the worker exited before its {kind!r}")
