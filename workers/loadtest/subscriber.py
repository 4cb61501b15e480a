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

On Herald's Mercure hub (``--protocol mercure``) the stream has the same
shape (``id:`` then ``data:``, ids ``#<n>``), plus a data-less ``id:`` frame
first on a fresh stream: its id is kept as the cursor like any other, and
nothing is counted. A resume answered ``Mercure-Last-Event-ID: earliest``
(history lost: the hub replays everything it retains) counts as a reset,
reason ``earliest``; what it replays that was seen before counts as
duplicated, as a Mercure client would see it twice.

It also says why a connect did not give a stream, by cause
(:func:`workers.loadtest.wire.answer_cause` and
:func:`~workers.loadtest.wire.errno_cause`: ``"503 broker unavailable"``,
``"502 from the proxy"``, ``"connection refused"``, ``"timeout"``,
``"200 but not text/event-stream"`` ...), and counts apart the streams that
were answered 200 and ended at once with nothing but ``retry:``: a server
*telling the client to retry*, which EventSource obeys, and which is not an
error. Such a stream does not count as the subscriber being back.

Unlike EventSource, it does not trust a stream that has gone quiet: a
Herald node writes every open stream at least once a heartbeat
(``HERALD_HEARTBEAT``, a comment line when there is no event), so an open
stream that delivers no byte for ``silence`` seconds (the load tool's
``--silence-timeout``: two heartbeats by default) is on a node that hangs
(a gray failure: it holds the connection but answers nothing) or behind a
connection that died without a word. The subscriber then closes it, counts
it as ended ``silent`` (:data:`~workers.loadtest.wire.SILENT`), and
reconnects with ``Last-Event-ID`` (through a front, to a node that
answers), as any non-browser client of Herald should.

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
from workers.loadtest.wire import (
    BAD_RESPONSE,
    CLOSED_BEFORE_ANSWER,
    DATA_LINE,
    ERROR_BODY_LIMIT,
    SILENT,
    TIMEOUT,
    ChunkedDecoder,
    ResponseHead,
    answer_cause,
    errno_cause,
    get_request,
    is_event_stream,
    last_field,
    parse_head,
)

_RESET_REASON = re.compile(rb'\{"reason":"([a-z-]+)"')
"""The data of a ``reset`` event (the only JSON object on a load test's streams)."""

MERCURE_LAST_EVENT_ID = "mercure-last-event-id"
MERCURE_EARLIEST = "earliest"
"""A Mercure hub's answer to a resume it could not make exact (history lost): everything retained is
replayed instead. Mercure has no ``reset`` event; this answer is its reset, counted under its own reason."""

ANSWER_TIMEOUT = 10.0
"""Seconds from starting a connect to the response head; past them the attempt counts as a ``timeout``."""

RETRY_ONLY_SECONDS = 1.0
"""A 200 stream that ends cleanly within this long of its head with no event, only ``retry:``, was
*told to retry* (a node or the proxy asking the client to come back): counted apart, not as an error."""


class Recorder:
    """What one worker process measures, shared by its subscribers.

    Latencies go into one histogram per (node, second since publishing
    started): the report's per-node and over-time views both come from
    these, and the worker sends and forgets them every progress tick.
    """

    __slots__ = (
        "body_bytes",
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
        "told_to_retry",
    )

    def __init__(self) -> None:
        self.t0_ns = time.time_ns()
        self.buckets: dict[tuple[str, int], Histogram] = {}
        self.generation = 0
        self.connect_time = Histogram()
        self.connects: Counter[str] = Counter()  # successful connects per node
        self.connect_errors: Counter[str] = Counter()  # connects that gave no stream, by cause
        self.told_to_retry = 0  # 200 streams that ended at once with only retry:
        self.drops: Counter[str] = Counter()  # streams that ended while open, by why
        self.reset_reasons: Counter[str] = Counter()
        self.reconnects = 0
        self.last_delivery_ns = 0
        self.fd_exhausted = False
        self.body_bytes = 0  # event-stream bytes read (after de-chunking), to set beside the nodes' bytes sent

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
    """One HTTP connection of a subscriber: the response head, then the event stream.

    The connection ends, and :attr:`done` resolves, when the server closes
    it, when the response is over (the last chunk, or ``Content-Length``
    bytes: EventSource then reconnects, even on a kept-alive connection), or
    when the open stream has delivered no byte for the subscriber's
    ``silence`` seconds (counted as a drop, ``silent``).
    Whatever kept it from streaming is counted once, by cause, in the
    recorder's ``connect_errors``; a 200 stream that ended cleanly at once
    with only ``retry:`` counts as ``told_to_retry``; any other end of an
    open stream as a drop.
    """

    __slots__ = (
        "_answer",
        "_body",
        "_buffer",
        "_clean",
        "_decoder",
        "_evented",
        "_head",
        "_last_read",
        "_left",
        "_opened_at",
        "_request",
        "_retry",
        "_settled",
        "_started",
        "_sub",
        "_timer",
        "done",
        "opened",
        "transport",
    )

    def __init__(self, sub: Subscriber, request: bytes, started: float | None = None) -> None:
        self._sub = sub
        self._request = request
        self._head = b""
        self._buffer = b""
        self._decoder: ChunkedDecoder | None = None
        self._left: int | None = None  # body bytes still to come, for a response with Content-Length
        self._answer: ResponseHead | None = None  # a non-200 (or not-SSE) head, while its body is read
        self._body = b""
        self._clean = False  # the response ended as HTTP says it may (not a cut connection)
        self._evented = False  # an event (a data: line) arrived on this stream
        self._retry = False  # the stream sent retry:
        self._settled = False  # why this attempt gave no stream has been counted
        self._started = time.monotonic() if started is None else started
        self._opened_at = 0.0
        self._last_read = 0.0  # time.monotonic() of the last read, or when reading resumes after a pause
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[bool] = loop.create_future()  # True at a 200 head, False if none came
        self.done: asyncio.Future[None] = loop.create_future()  # the connection ended
        self.transport: asyncio.Transport | None = None
        delay = max(0.0, self._started + ANSWER_TIMEOUT - time.monotonic())
        self._timer: asyncio.TimerHandle | None = loop.call_later(delay, self._timed_out)

    def _resume_reading(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        # The hot path: one call per read. Whole frames go to the subscriber
        # as one block; a partial frame waits in the buffer for the rest.
        sub = self._sub
        self._last_read = time.monotonic()
        if sub.read_pause and self.transport is not None:  # a slow consumer: nothing read for a while
            self.transport.pause_reading()
            self._last_read += sub.read_pause  # its own pause is no silence of the stream's
            asyncio.get_running_loop().call_later(sub.read_pause, self._resume_reading)
        if not sub.streaming:
            data = self._read_head(data)
            if not data:
                return
        if self._left is not None:
            data = data[: self._left]
            self._left -= len(data)
        if self._decoder is not None:
            data = self._decoder.feed(data)
        sub.recorder.body_bytes += len(data)
        if self._buffer:
            data = self._buffer + data
        if data.endswith(b"\n\n"):
            self._buffer = b""
            self._block(data)
        else:
            end = data.rfind(b"\n\n")
            if end < 0:
                self._buffer = data
            else:
                self._buffer = data[end + 2 :]
                self._block(data[: end + 2])
        if self._left == 0 or (self._decoder is not None and self._decoder.done):
            self._clean = True  # the response is over: EventSource reconnects
            self._settle(None)
            self._close()

    def _block(self, block: bytes) -> None:
        if not self._evented:  # until the first event: is this stream only a "retry later"?
            self._evented = b"data:" in block
            self._retry = self._retry or b"retry:" in block
        self._sub.on_block(block, time.time_ns())

    def _read_head(self, data: bytes) -> bytes:
        if self._answer is not None:
            self._read_answer(data)
            return b""
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self._head = head
            return b""
        sub = self._sub
        try:
            parsed = parse_head(head[:end])
        except ValueError:
            self._fail(BAD_RESPONSE)
            return b""
        if parsed.status != 200 or not is_event_stream(parsed):
            self._answer = parsed  # its cause is in its body: read some of it first
            self._read_answer(head[end + 4 :])
            return b""
        if parsed.chunked:
            self._decoder = ChunkedDecoder()
        elif "content-length" in parsed.headers:
            self._left = int(parsed.headers["content-length"])
        self._cancel_timer()
        self._opened_at = time.monotonic()
        if sub.silence > 0:  # the answer timer's slot now holds the silence timer
            self._timer = asyncio.get_running_loop().call_later(sub.silence, self._check_silence)
        sub.on_open(parsed.headers.get("x-node-id", sub.target), self._opened_at - self._started)
        if parsed.headers.get(MERCURE_LAST_EVENT_ID) == MERCURE_EARLIEST and sub.last_id_raw not in (None, b"earliest"):
            sub.history_lost()  # a Mercure resume that could not be exact: its reset
        self.opened.set_result(True)
        return head[end + 4 :]

    def _read_answer(self, data: bytes) -> None:
        """Collect a refused answer's body (up to its end, or ERROR_BODY_LIMIT), then count its cause."""
        answer = self._answer
        assert answer is not None
        self._body += data
        length = answer.headers.get("content-length")
        if answer.chunked:
            complete = b"\r\n0\r\n" in self._body or self._body.startswith(b"0\r\n")
        else:
            complete = length is not None and length.isdigit() and len(self._body) >= int(length)
        if complete or len(self._body) >= ERROR_BODY_LIMIT:
            self._fail(answer_cause(answer, self._body))

    def _fail(self, cause: str) -> None:
        """This attempt gave no stream, because of ``cause``: count it once, and close."""
        if not self._settled and not self._sub.stopping:
            self._sub.recorder.connect_errors[cause] += 1
        self._settled = True
        self._close()

    def _timed_out(self) -> None:
        self._timer = None
        if not self._sub.streaming:
            self._fail(TIMEOUT)

    def _check_silence(self) -> None:
        """The silence timer: end a stream that delivered no byte for ``silence`` seconds, else look again when
        it could first have been silent that long."""
        self._timer = None
        silence = self._sub.silence
        quiet = time.monotonic() - self._last_read
        if quiet < silence:
            self._timer = asyncio.get_running_loop().call_later(silence - quiet, self._check_silence)
            return
        if not self._settled and not self._sub.stopping:
            self._sub.recorder.drops[SILENT] += 1
        self._settled = True
        self._finish()
        if self.transport is not None:
            self.transport.abort()  # not close(): a hung peer would never acknowledge it

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self) -> None:
        self._finish()
        if self.transport is not None:
            self.transport.close()

    def _finish(self) -> None:
        self._cancel_timer()
        if not self.opened.done():
            self.opened.set_result(False)
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(exc)
        self._finish()

    def _settle(self, exc: BaseException | None) -> None:
        """Count, once, how this connection ended (``exc``: why it was cut, None for a close)."""
        if self._settled:
            return
        self._settled = True
        sub = self._sub
        if sub.stopping:
            return
        if self._opened_at:
            clean = self._clean or (exc is None and self._decoder is None and self._left is None)
            quick = time.monotonic() - self._opened_at < RETRY_ONLY_SECONDS
            if clean and quick and self._retry and not self._evented:
                sub.recorder.told_to_retry += 1
                sub.recorder.connects[sub.node] -= 1  # not a connect to a node: a "come back later"
                sub.told_to_retry()
            else:
                # Why a stream ended: "eof" is the server (or a proxy) closing it.
                sub.recorder.drops["eof" if exc is None else type(exc).__name__] += 1
        elif self._answer is not None:  # the body ended with the connection
            sub.recorder.connect_errors[answer_cause(self._answer, self._body)] += 1
        else:
            sub.recorder.connect_errors[CLOSED_BEFORE_ANSWER if exc is None else errno_cause(_errno_name(exc))] += 1


def _errno_name(exc: BaseException) -> str:
    """The errno name of an OSError (``ECONNREFUSED``), else the exception's class name."""
    code = exc.errno if isinstance(exc, OSError) else None
    return errno.errorcode.get(code or 0, type(exc).__name__)


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
        "gap_opened",
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
        "read_pause",
        "recorder",
        "resets",
        "retry_s",
        "silence",
        "stopping",
        "streaming",
        "target",
        "token",
        "topics",
        "unknown",
    )

    def __init__(
        self,
        index: int,
        target: str,
        path: str,
        topics: list[int],
        recorder: Recorder,
        retry_s: float = 2.0,
        token: str | None = None,
        read_pause: float = 0.0,
        silence: float = 0.0,
    ) -> None:
        self.index = index
        self.read_pause = read_pause  # seconds without reading after each read (a slow consumer); 0: none
        self.silence = silence  # seconds an open stream may deliver nothing before it is closed and resumed; 0: never
        self.token = token  # Herald's access token (Authorization: Bearer), None with access control off
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
        self.gap_opened = False  # the last 200 closed a gap (undone if it was only "retry later")
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
        self.gap_opened = bool(self.down_at)
        if self.down_at:
            self.gaps.append((self.down_at, now))
            self.down_at = 0.0

    def told_to_retry(self) -> None:
        """The last 200 was only "retry later": the subscriber was not back, and is still down."""
        if self.gap_opened:
            self.gap_opened = False
            self.down_at = self.gaps.pop()[0]

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

    def history_lost(self) -> None:
        """A Mercure resume was answered ``Mercure-Last-Event-ID: earliest`` (not asked for): a reset."""
        self.resets += 1
        self.recorder.reset_reasons[MERCURE_EARLIEST] += 1

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
            request = get_request(self.target, self.path, self.last_id, self.token)
            self.streaming = False
            started = time.monotonic()
            try:
                _, protocol = await asyncio.wait_for(
                    loop.create_connection(
                        functools.partial(StreamProtocol, self, request, started), self.host, self.port
                    ),
                    ANSWER_TIMEOUT,
                )
            except (OSError, TimeoutError) as exc:
                if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                    recorder.fd_exhausted = True
                no_answer = isinstance(exc, TimeoutError) and exc.errno is None  # ANSWER_TIMEOUT passed
                recorder.connect_errors[TIMEOUT if no_answer else errno_cause(_errno_name(exc))] += 1
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
