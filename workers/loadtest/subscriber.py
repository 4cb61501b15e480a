"""One load-test subscriber: an EventSource on a raw socket that checks every event it gets.

It behaves like a browser's EventSource: it sends ``Last-Event-ID`` when it
reconnects, waits the server's ``retry:`` delay first, and keeps the last
``id:`` of every complete event. Unlike EventSource it does not give up on
a non-200 answer; it counts it and retries, because a load test would rather
count a failure than stop looking.

Every load event carries its topic index, its per-topic sequence number and
its publish time (see :mod:`workers.loadtest.wire`), so each subscriber
counts, per topic and exactly:

* ``delivered``: events seen for the first time;
* ``duplicated``: a sequence number seen before;
* ``out_of_order``: an event that arrives after a later one of its topic;
* ``lost``: worked out at the end against what the publisher had accepted
  (:meth:`Subscriber.lost`): sequence numbers never seen.

The bookkeeping is one integer per topic (the next sequence number
expected) plus the set of numbers skipped so far, which stays empty while
nothing goes wrong: memory does not grow with the number of events.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import cast

from workers.loadtest.histogram import Histogram
from workers.loadtest.wire import DATA_LINE, ChunkedDecoder, get_request, last_field, parse_head

_RESET_REASON = re.compile(rb'\{"reason":"([a-z-]+)"')
"""The data of a ``reset`` event (the only JSON object on a load test's streams)."""


class Recorder:
    """What one worker process measures, shared by its subscribers.

    Latencies go into one histogram per (node, second since publishing
    started): the report's per-node and over-time views both come from
    these, and the worker sends and forgets them every progress tick.
    """

    __slots__ = (
        "buckets",
        "connect_errors",
        "connect_time",
        "connects",
        "drops",
        "fd_exhausted",
        "generation",
        "last_delivery_ns",
        "reconnects",
        "reset_reasons",
        "t0_ns",
    )

    def __init__(self) -> None:
        self.t0_ns = time.time_ns()
        self.buckets: dict[tuple[str, int], Histogram] = {}
        self.generation = 0
        self.connect_time = Histogram()
        self.connects: Counter[str] = Counter()  # successful connects per node
        self.connect_errors: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()  # streams that ended while open, by why
        self.reset_reasons: Counter[str] = Counter()
        self.reconnects = 0
        self.last_delivery_ns = 0
        self.fd_exhausted = False

    def bucket(self, node: str, second: int) -> Histogram:
        histogram = self.buckets.get((node, second))
        if histogram is None:
            histogram = self.buckets[node, second] = Histogram()
        return histogram

    def take_buckets(self) -> dict[tuple[str, int], Histogram]:
        """The buckets so far, handed over; recording goes on in new ones."""
        taken, self.buckets = self.buckets, {}
        self.generation += 1  # subscribers drop the histograms they hold
        return taken


class StreamProtocol(asyncio.Protocol):
    """One HTTP connection of a subscriber: the response head, then the event stream."""

    __slots__ = ("_buffer", "_decoder", "_head", "_request", "_started", "_sub", "done", "opened", "transport")

    def __init__(self, sub: Subscriber, request: bytes) -> None:
        self._sub = sub
        self._request = request
        self._head = b""
        self._buffer = b""
        self._decoder: ChunkedDecoder | None = None
        self._started = time.monotonic()
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[bool] = loop.create_future()  # True at a 200 head, False if none came
        self.done: asyncio.Future[None] = loop.create_future()  # the connection ended
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        # The hot path: one call per read. Whole frames go to the subscriber
        # as one block; a partial frame waits in the buffer for the rest.
        sub = self._sub
        if not sub.streaming:
            data = self._read_head(data)
            if not data:
                return
        if self._decoder is not None:
            data = self._decoder.feed(data)
        if self._buffer:
            data = self._buffer + data
        if data.endswith(b"\n\n"):
            self._buffer = b""
            sub.on_block(data, time.time_ns())
            return
        end = data.rfind(b"\n\n")
        if end < 0:
            self._buffer = data
            return
        self._buffer = data[end + 2 :]
        sub.on_block(data[: end + 2], time.time_ns())

    def _read_head(self, data: bytes) -> bytes:
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self._head = head
            return b""
        sub = self._sub
        try:
            parsed = parse_head(head[:end])
        except ValueError:
            sub.recorder.connect_errors["bad-response"] += 1
            self._close()
            return b""
        if parsed.status != 200:
            sub.recorder.connect_errors[f"http-{parsed.status}"] += 1
            self._close()
            return b""
        if parsed.chunked:
            self._decoder = ChunkedDecoder()
        sub.on_open(parsed.headers.get("x-node-id", sub.target), time.monotonic() - self._started)
        self.opened.set_result(True)
        return head[end + 4 :]

    def _close(self) -> None:
        self._finish()
        if self.transport is not None:
            self.transport.close()

    def _finish(self) -> None:
        if not self.opened.done():
            self.opened.set_result(False)
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sub.streaming and not self._sub.stopping:
            # Why a stream ended: "eof" is the server (or a proxy) closing it.
            self._sub.recorder.drops["eof" if exc is None else type(exc).__name__] += 1
        self._finish()


class Subscriber:
    """A subscriber's identity, its EventSource state and its exact accounting."""

    __slots__ = (
        "_fresh",
        "_generation",
        "_histogram",
        "_second",
        "delivered",
        "down_at",
        "duplicated",
        "first_ready",
        "gaps",
        "host",
        "index",
        "last_id_raw",
        "missing",
        "next_seq",
        "node",
        "out_of_order",
        "path",
        "port",
        "protocol",
        "recorder",
        "resets",
        "retry_s",
        "stopping",
        "streaming",
        "target",
        "topics",
        "unknown",
    )

    def __init__(
        self, index: int, target: str, path: str, topics: list[int], recorder: Recorder, retry_s: float = 2.0
    ) -> None:
        self.index = index
        self.target = target  # "host:port"
        host, _, port = target.rpartition(":")
        self.host, self.port = host, int(port)
        self.path = path
        self.topics = topics
        self.recorder = recorder
        self.retry_s = retry_s
        self.next_seq = dict.fromkeys(topics, 1)
        self.missing: dict[int, set[int]] = {}
        self.delivered = self.duplicated = self.out_of_order = self.resets = self.unknown = 0
        self.last_id_raw: bytes | None = None
        self._fresh = True
        self.node = ""
        self.streaming = False
        self.stopping = False
        self.first_ready = 0.0  # time.time() of the first 200, 0 until then
        self.down_at = 0.0
        self.gaps: list[tuple[float, float]] = []  # (connection lost, stream back), wall clock
        self.protocol: StreamProtocol | None = None
        # The latency histogram of the current (node, second), held to skip a lookup per read.
        self._histogram: Histogram | None = None
        self._second = self._generation = -1

    # -- events --------------------------------------------------------------------

    def on_open(self, node: str, connect_seconds: float) -> None:
        now = time.time()
        self.node = node
        self._histogram = None
        self._fresh = True
        self.streaming = True
        recorder = self.recorder
        recorder.connects[node] += 1
        recorder.connect_time.record(int(connect_seconds * 1_000_000))
        if not self.first_ready:
            self.first_ready = now
        if self.down_at:
            self.gaps.append((self.down_at, now))
            self.down_at = 0.0

    def on_block(self, block: bytes, now_ns: int) -> None:
        """Account for a block of complete frames received at ``now_ns``.

        The hot path, once per read: a split on the data lines, then three
        ``int()`` per event. No regular expression and no per-byte loop.
        """
        if self._fresh:  # retry: comes first on each connection
            self._fresh = False
            retry = last_field(block, b"retry:")
            if retry is not None and retry.isdigit():
                self.retry_s = int(retry) / 1000
        # The last id of the block is the one to resume from (decoded when needed).
        at = block.rfind(b"\nid: ")
        if at >= 0 or block.startswith(b"id: "):
            at += 5
            self.last_id_raw = block[at : block.find(b"\n", at)]
        recorder = self.recorder
        second = (now_ns - recorder.t0_ns) // 1_000_000_000
        histogram = self._histogram
        if histogram is None or second != self._second or self._generation != recorder.generation:
            histogram = self._histogram = recorder.bucket(self.node, second)
            self._second, self._generation = second, recorder.generation
        next_seq = self.next_seq
        delivered = 0
        lines = block.split(DATA_LINE)
        if lines[0].startswith(b"data: "):  # a frame without id: (a server with no resume)
            lines[0] = lines[0][6:]
        else:
            del lines[0]
        for line in lines:
            try:
                topic_s, seq_s, sent_s, _ = line.split(b" ", 3)
                topic = int(topic_s)
                seq = int(seq_s)
                sent = int(sent_s)
            except ValueError:
                self._other_data(line)
                continue
            expected = next_seq.get(topic)
            if seq == expected:
                next_seq[topic] = seq + 1
            elif expected is None:
                self.unknown += 1  # an event of a topic this subscriber never asked for
                continue
            elif seq > expected:
                self.missing.setdefault(topic, set()).update(range(expected, seq))
                next_seq[topic] = seq + 1
            else:
                skipped = self.missing.get(topic)
                if skipped is not None and seq in skipped:
                    skipped.discard(seq)
                    self.out_of_order += 1
                else:
                    self.duplicated += 1
                    continue
            delivered += 1
            histogram.record((now_ns - sent) // 1000)
        if delivered:
            self.delivered += delivered
            recorder.last_delivery_ns = now_ns

    def _other_data(self, line: bytes) -> None:
        """A data line that is not a load event: a ``reset`` (its reason is counted) or something else."""
        match = _RESET_REASON.match(line)
        if match:
            self.resets += 1
            self.recorder.reset_reasons[match.group(1).decode()] += 1
        else:
            self.unknown += 1

    @property
    def last_id(self) -> str | None:
        return None if self.last_id_raw is None else self.last_id_raw.decode("latin-1")

    # -- connection loop ---------------------------------------------------------------

    async def run(self, on_first_ready: Callable[[], None]) -> None:
        """Connect, stream, reconnect after ``retry`` with ``Last-Event-ID``, until stopped."""
        loop = asyncio.get_running_loop()
        recorder = self.recorder
        ready_reported = False
        while not self.stopping:
            request = get_request(self.target, self.path, self.last_id)
            self.streaming = False
            try:
                _, protocol = await loop.create_connection(
                    functools.partial(StreamProtocol, self, request), self.host, self.port
                )
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    recorder.fd_exhausted = True
                recorder.connect_errors[errno.errorcode.get(exc.errno or 0, type(exc).__name__)] += 1
                self.mark_down()
                await asyncio.sleep(self.retry_s)
                continue
            self.protocol = protocol
            if await protocol.opened and not ready_reported:
                ready_reported = True
                on_first_ready()
            await protocol.done
            self.protocol = None
            if self.stopping:
                break
            self.mark_down()
            recorder.reconnects += 1
            await asyncio.sleep(self.retry_s)

    def mark_down(self) -> None:
        if not self.down_at and self.first_ready:
            self.down_at = time.time()

    def stop(self) -> None:
        self.stopping = True
        protocol = self.protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    # -- the verdict ---------------------------------------------------------------------

    def caught_up(self, last: dict[int, int]) -> bool:
        """Whether every topic's last accepted event (or a later one) has arrived."""
        return all(self.next_seq[t] > last.get(t, 0) for t in self.topics)

    def lost(self, last: dict[int, int], unaccepted: dict[int, set[int]]) -> int:
        """Accepted events of this subscriber's topics that never arrived.

        ``last`` is each topic's highest sequence number published (accepted
        or not); ``unaccepted`` the numbers the server refused, or never
        confirmed (they may arrive, but need not).
        """
        lost = 0
        for topic in self.topics:
            refused = unaccepted.get(topic, set())
            skipped = self.missing.get(topic, set())
            lost += len(skipped - refused)
            tail_from, tail_to = self.next_seq[topic], last.get(topic, 0)
            if tail_to >= tail_from:
                lost += tail_to - tail_from + 1 - sum(1 for s in refused if tail_from <= s <= tail_to)
        return lost
