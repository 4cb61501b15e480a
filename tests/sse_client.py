"""An SSE test client over real sockets (httpx), parsing with the spec parser.

A background task reads the response as it arrives and queues each
dispatched event, so tests await events instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from tests.sse_parser import SSEEvent, SSEParser

_END = object()

RETRYABLE = (httpx.HTTPError, OSError, TimeoutError)
"""What a client that behaves like EventSource retries after: a refused or dropped connection, or no answer in
time. Anything else is a bug in the test and ends the client's task with its exception."""


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every client the tests make.

    httpx builds a context per client, loading the CA bundle: 20-50 ms of
    CPU each, with the event loop blocked. A harness that made one client
    per stream spent seconds of a test's time limit on it, more on a slower
    machine (``test_regression_clients_built_per_connection_ate_the_connect_deadline``).
    """
    return ssl.create_default_context()


def new_client(**options: object) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` that costs no CA-bundle load (:func:`tls_context`); ``options`` as httpx takes them."""
    return httpx.AsyncClient(verify=tls_context(), **options)  # type: ignore[arg-type]


class EventStream:
    """One open ``GET /events`` connection."""

    def __init__(self, client: httpx.AsyncClient, response: httpx.Response, owns_client: bool = True) -> None:
        self._client = client
        self._owns_client = owns_client
        self.response = response
        self.parser = SSEParser()
        self.raw = bytearray()
        self.ended = asyncio.Event()
        self.first_bytes = asyncio.Event()
        self.comment_seen = asyncio.Event()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls,
        base_url: str,
        topics: Sequence[str],
        last_event_id: str | None = None,
        query_last_event_id: str | None = None,
        timeout: float = 10,
        client: httpx.AsyncClient | None = None,
        headers: dict[str, str] | None = None,
        params: Sequence[tuple[str, str]] = (),
    ) -> EventStream:
        """Open a stream; pass ``client`` to share one connection pool among many streams.

        ``headers`` and ``params`` are sent besides the stream's own (a token, say).
        The stream is open whatever the answer: check ``response.status_code``.
        """
        query: list[tuple[str, str | int | float | bool | None]] = [("topic", t) for t in topics]
        query.extend(params)
        if query_last_event_id is not None:
            query.append(("last_event_id", query_last_event_id))
        headers = {"Accept": "text/event-stream", **(headers or {})}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        owns = client is None
        if client is None:
            client = new_client(timeout=httpx.Timeout(timeout, read=None))
        request = client.build_request("GET", f"{base_url}/events", params=query, headers=headers)
        try:
            response = await asyncio.wait_for(client.send(request, stream=True), timeout)
        except BaseException:
            if owns:
                await client.aclose()
            raise
        return cls(client, response, owns)

    async def _read(self) -> None:
        try:
            async for chunk in self.response.aiter_raw():
                self.raw += chunk
                self.first_bytes.set()
                comments = self.parser.comments
                for event in self.parser.feed(chunk):
                    self._queue.put_nowait(event)
                if self.parser.comments > comments:
                    self.comment_seen.set()
        except (httpx.HTTPError, asyncio.CancelledError):
            pass
        finally:
            self.ended.set()
            self._queue.put_nowait(_END)

    async def next_event(self, timeout: float = 10) -> SSEEvent:
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is _END:
            self._queue.put_nowait(_END)
            raise EOFError("the stream ended")
        assert isinstance(item, SSEEvent)
        return item

    async def take(self, count: int, timeout: float = 10) -> list[SSEEvent]:
        """The next ``count`` events, all within ``timeout`` seconds."""

        async def collect() -> list[SSEEvent]:
            return [await self.next_event(timeout) for _ in range(count)]

        return await asyncio.wait_for(collect(), timeout)

    def received_so_far(self) -> list[SSEEvent]:
        """Events already queued, without waiting."""
        events: list[SSEEvent] = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is _END:
                self._queue.put_nowait(_END)
                break
            assert isinstance(item, SSEEvent)
            events.append(item)
        return events

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.response.aclose()
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def publish(
    base_url: str, body: object, client: httpx.AsyncClient | None = None, token: str | None = None
) -> httpx.Response:
    """POST /publish with a JSON body (and ``Authorization: Bearer`` when given a token)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    if client is not None:
        return await client.post(f"{base_url}/publish", json=body, headers=headers)
    async with new_client(timeout=10) as own:
        return await own.post(f"{base_url}/publish", json=body, headers=headers)


async def publish_reliably(client: httpx.AsyncClient, url: str, body: object) -> str:
    """Publish until a 201, retrying with one idempotency key: never twice, never lost."""
    key = uuid.uuid4().hex
    while True:
        with contextlib.suppress(httpx.HTTPError):
            response = await client.post(f"{url}/publish", json=body, headers={"Idempotency-Key": key}, timeout=5)
            if response.status_code == 201:
                event_id: str = response.json()["id"]
                return event_id
        await asyncio.sleep(0.05)  # a producer's retry delay


class SteadyPublisher:
    """Publishes ``count`` events (data = their index) one after another, each until it gets its 201.

    A steady stream, not a flood (``pause`` seconds between events); every
    event is retried with one idempotency key (:func:`publish_reliably`), so
    :attr:`accepted` is exactly the ids published, in order. Use as an async
    context manager; :meth:`reached` waits for a count, :meth:`finish` for the end.
    """

    def __init__(self, url: str, topic: str, count: int, pause: float = 0.01) -> None:
        self.url = url
        self.topic = topic
        self.count = count
        self.pause = pause
        self.accepted: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._client = new_client()

    async def _run(self) -> None:
        for i in range(self.count):
            self.accepted.append(await publish_reliably(self._client, self.url, {"topic": self.topic, "data": i}))
            await asyncio.sleep(self.pause)

    async def reached(self, count: int, timeout: float = 60) -> None:
        """Until ``count`` events were accepted."""
        async with asyncio.timeout(timeout):
            while len(self.accepted) < count:
                if self._task is not None and self._task.done():
                    self._task.result()  # died: say why, now
                    raise RuntimeError(f"the publisher stopped at {len(self.accepted)} of {count} events")
                await asyncio.sleep(0.01)  # polling our own task's progress

    async def finish(self, timeout: float = 60) -> list[str]:
        """Until every event was accepted; the accepted ids."""
        assert self._task is not None
        await asyncio.wait_for(self._task, timeout)
        return self.accepted

    async def __aenter__(self) -> SteadyPublisher:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()


def shared_pool(timeout: float = 10) -> httpx.AsyncClient:
    """One connection pool for many long-lived streams: no limit on its connections, no read timeout."""
    return new_client(
        timeout=httpx.Timeout(timeout, read=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
    )


class ResumingClient:
    """Behaves like a browser's EventSource: whenever the stream ends, reconnect with Last-Event-ID.

    Collects every event it receives across reconnects, and which node served
    each connection (``X-Node-Id``).
    """

    def __init__(
        self,
        base_url: str,
        topics: Sequence[str],
        retry_delay: float = 0.1,
        client: httpx.AsyncClient | None = None,
        open_timeout: float = 10,
    ) -> None:
        """``client``: a pool shared with other clients (see :func:`shared_pool`); else each connection makes its own.

        ``open_timeout`` bounds one attempt (the answer, then its first
        bytes); an attempt that runs out is retried as any failed connect.
        """
        self.base_url = base_url
        self.client = client
        self.open_timeout = open_timeout
        self.topics = list(topics)
        self.retry_delay = retry_delay
        self.events: list[SSEEvent] = []
        self.nodes: list[str] = []
        self.connected = asyncio.Event()
        self.stop = asyncio.Event()
        self.last_event_id: str | None = None
        # Answers a browser's EventSource would have given up on for good:
        # any status but 200, or a 200 that is not text/event-stream.
        self.fatal_answers: list[str] = []
        self.failed_attempts = 0
        """Connects that failed or got no first bytes in time (each retried)."""

    @property
    def reconnects(self) -> int:
        return max(0, len(self.nodes) - 1)

    def ids(self) -> list[str]:
        return [e.last_event_id for e in self.events if e.type != "reset"]

    async def run(self) -> None:
        while not self.stop.is_set():
            try:
                stream = await EventStream.open(
                    self.base_url,
                    self.topics,
                    last_event_id=self.last_event_id,
                    client=self.client,
                    timeout=self.open_timeout,
                )
            except RETRYABLE:
                self.failed_attempts += 1
                await asyncio.sleep(self.retry_delay)  # the reconnect delay, like EventSource's retry
                continue
            try:
                media_type = stream.response.headers.get("content-type", "").split(";")[0]
                if stream.response.status_code != 200 or media_type != "text/event-stream":
                    self.fatal_answers.append(f"{stream.response.status_code} {media_type}")
                    await asyncio.sleep(self.retry_delay)
                    continue
                try:
                    await asyncio.wait_for(stream.first_bytes.wait(), self.open_timeout)
                except TimeoutError:
                    self.failed_attempts += 1  # a 200 with no bytes in time: drop it and try again
                    continue
                self.nodes.append(stream.response.headers.get("x-node-id", "?"))
                self.last_event_id = stream.parser.last_event_id or self.last_event_id
                self.connected.set()
                await self._read(stream)
            finally:
                await stream.close()

    async def _read(self, stream: EventStream) -> None:
        stop = asyncio.create_task(self.stop.wait())
        try:
            while True:
                take = asyncio.create_task(stream.next_event(timeout=3600))
                done, _ = await asyncio.wait({take, stop}, return_when=asyncio.FIRST_COMPLETED)
                if take not in done:
                    take.cancel()
                    return
                try:
                    event = take.result()
                except EOFError:
                    self.last_event_id = stream.parser.last_event_id or self.last_event_id
                    return
                self.events.append(event)
                self.last_event_id = stream.parser.last_event_id
        finally:
            stop.cancel()


@contextlib.asynccontextmanager
async def resuming_clients(
    url: str, topics: Sequence[str], count: int, connect_within: float = 30
) -> AsyncIterator[list[ResumingClient]]:
    """``count`` :class:`ResumingClient` on one shared pool, all connected within ``connect_within`` seconds.

    The deadline covers the clients' connects only: the clients (and their
    pool) are built before it starts. Stopped, and their pool closed, on the way out.
    """
    async with shared_pool() as pool:
        clients = [ResumingClient(url, topics, client=pool) for _ in range(count)]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        try:
            async with asyncio.timeout(connect_within):
                connected = asyncio.ensure_future(asyncio.gather(*(c.connected.wait() for c in clients)))
                waiting: list[asyncio.Future[Any]] = [connected, *tasks]
                try:
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    connected.cancel()
                ended = [t for t in tasks if t.done()]
                if ended:  # a client's task only ends when told to stop: this one crashed before connecting
                    ended[0].result()
                    raise RuntimeError("a client's task ended before it connected")
            yield clients
        finally:
            for c in clients:
                c.stop.set()
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            crashed = [o for o in outcomes if isinstance(o, Exception)]
            if crashed:  # raised here, so that a test failing because of them shows them (with its own error)
                raise ExceptionGroup(f"{len(crashed)} of {count} clients' tasks died", crashed)


@dataclass
class Ledger:
    """What the publisher was told: accepted ids in order, and how each failure looked."""

    accepted: list[str] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)  # (seconds into the run, status or error)


async def publish_at(client: httpx.AsyncClient, url: str, topic: str, rate: float, seconds: float) -> Ledger:
    """One event after another at ``rate``/s for ``seconds``, each retried with its Idempotency-Key until 201."""
    ledger = Ledger()
    started = time.monotonic()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        key = uuid.uuid4().hex
        while True:
            try:
                response = await client.post(
                    f"{url}/publish", json={"topic": topic, "data": i}, headers={"Idempotency-Key": key}, timeout=5
                )
            except httpx.HTTPError as exc:
                ledger.failures.append((time.monotonic() - started, type(exc).__name__))
            else:
                if response.status_code == 201:
                    ledger.accepted.append(response.json()["id"])
                    break
                ledger.failures.append((time.monotonic() - started, str(response.status_code)))
            await asyncio.sleep(0.05)  # a producer's retry delay
    return ledger
