"""The load tool's producer: events at a steady rate, each numbered per topic, and a ledger of what was accepted.

Publishing is split into *pacers*, each owning a disjoint set of topics and
sending one request at a time. One request in flight per topic is what
makes "out of order" meaningful: two concurrent requests for one topic have
no order to keep. A pacer that falls behind its schedule (a slow answer, an
outage) sends the overdue events in batches of up to ``batch``, which the
publish endpoint takes atomically and in order.

With ``--protocol mercure`` each request is one Mercure update (a form
POSTed to ``/.well-known/mercure``; 200 is accepted). The hub has no
idempotency: a retried request whose first attempt was published but not
answered publishes its update twice (seen as duplicated).

Every request carries an ``Idempotency-Key`` and is retried with it until it
is answered, refused (4xx) or ``retry_for`` seconds have passed. So an event
is *accepted* (201), *refused* (4xx), or *uncertain* (never confirmed: it
may or may not have been published). Only accepted events count as lost
when they do not arrive; uncertain ones are reported but never counted as
loss, nor as a surprise when they do arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlencode

import httpx

from broker.base import Message, RetentionPolicy
from broker.factory import partitions_setting, redis_broker, redis_target
from workers.loadtest.config import MERCURE_PATH
from workers.loadtest.histogram import Histogram
from workers.loadtest.wire import payload


class Sender(Protocol):
    """Publishes events somewhere: HTTP (:class:`HttpSender`) or Redis (:class:`RedisSender`)."""

    warmed: int
    """Events the warm-up published (accepted), which the nodes' publish counts include."""

    async def __call__(self, items: list[tuple[int, int]], sent_ns: int, key: str) -> int | str:
        """Publish ``(topic index, seq)`` events stamped ``sent_ns`` under ``key``.

        Returns the HTTP status (201: accepted) or the name of the error that
        left the outcome unknown.
        """

    async def warmup(self) -> None:
        """One throwaway publish before the run, so the first measured one doesn't pay for connecting."""

    async def close(self) -> None: ...


_RETRYABLE = {408, 425, 429}

REQUEST_TIMEOUT = httpx.Timeout(10.0, connect=2.0)
"""A publish request's bounds: 2 s to connect, 10 s for each write and read. A node that hangs (a gray
failure: it accepts the connection, the kernel takes the request, nothing answers) costs a request 10 s,
after which it is retried, with its Idempotency-Key, on the next target."""


@dataclass
class Ledger:
    """What was published: per topic the last sequence number, and what was not accepted."""

    topics: int
    next_seq: list[int] = field(default_factory=list)
    unaccepted: dict[int, set[int]] = field(default_factory=dict)
    accepted = 0
    refused = 0
    uncertain = 0
    requests = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)  # request time of accepted publishes, µs
    accepted_at: Counter[int] = field(default_factory=Counter)  # events accepted per second of the run
    errors_at: Counter[int] = field(default_factory=Counter)  # failed requests per second of the run
    outcomes: list[tuple[float, bool]] = field(default_factory=list)  # (seconds into the run, ok) per request
    waits: list[tuple[float, float]] = field(default_factory=list)
    """Per publish (a request and its retries): (seconds into the run when it was settled, seconds it took from
    its first attempt: accepted, refused or given up)."""
    t0: float = 0.0  # time.monotonic() when publishing started

    def __post_init__(self) -> None:
        self.next_seq = [1] * self.topics

    def take(self, topic: int) -> int:
        seq = self.next_seq[topic]
        self.next_seq[topic] = seq + 1
        return seq

    def last(self) -> dict[int, int]:
        """Highest sequence number handed out per topic (accepted or not)."""
        return {t: n - 1 for t, n in enumerate(self.next_seq) if n > 1}

    def last_accepted(self) -> dict[int, int]:
        out = {}
        for topic, last in self.last().items():
            refused = self.unaccepted.get(topic, set())
            seq = last
            while seq in refused:
                seq -= 1
            if seq > 0:
                out[topic] = seq
        return out

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def ok(self, items: Sequence[tuple[int, int]], seconds: float) -> None:
        self.requests += 1
        self.accepted += len(items)
        self.latency.record(int(seconds * 1_000_000))
        now = self._now()
        self.accepted_at[int(now)] += len(items)
        self.outcomes.append((now, True))

    def failed(self, status: int | str) -> None:
        self.requests += 1
        self.errors[str(status)] += 1
        now = self._now()
        self.errors_at[int(now)] += 1
        self.outcomes.append((now, False))

    def settled(self, waited: float) -> None:
        """A publish is settled, ``waited`` seconds after its first attempt (:attr:`waits`)."""
        self.waits.append((self._now(), waited))

    def give_up(self, items: Sequence[tuple[int, int]], refused: bool) -> None:
        for topic, seq in items:
            self.unaccepted.setdefault(topic, set()).add(seq)
        if refused:
            self.refused += len(items)
        else:
            self.uncertain += len(items)


class HttpSender:
    """Publishes over HTTP, round-robin over the targets, moving on when one is down.

    Herald takes a JSON array (one atomic batch); the peers of ``make bench``
    take one event per request, its data as the raw body.
    """

    def __init__(
        self,
        targets: list[str],
        names: list[str],
        size: int,
        pacer: int,
        system: str = "herald",
        token: str | None = None,
        protocol: str = "native",
    ) -> None:
        # Herald's access token goes with every request (Authorization: Bearer); None with access control off.
        headers = {"authorization": f"Bearer {token}"} if token else None
        self.client = httpx.AsyncClient(timeout=REQUEST_TIMEOUT, headers=headers)
        self.targets = targets
        self.names = names
        self.size = size
        self.system = system
        self.protocol = protocol
        self.pacer = pacer
        self.at = pacer % len(targets)
        self.warmed = 0

    def _request(self, events: list[tuple[str, str]]) -> tuple[str, str]:
        """Path and body publishing ``(topic name, data)`` events in the target system's shape."""
        if self.protocol == "mercure":
            ((topic, data),) = events  # one update per request: Mercure has no batches
            return MERCURE_PATH, urlencode({"topic": topic, "data": data})
        if self.system == "herald":
            return "/publish", json.dumps([{"topic": t, "data": d} for t, d in events], separators=(",", ":"))
        ((topic, data),) = events  # one event per request
        return (f"/pub/{topic}" if self.system == "nchan" else f"/publish?topic={topic}"), data

    async def _post(self, events: list[tuple[str, str]], key: str) -> int | str:
        path, body = self._request(events)
        headers = {"content-type": self._content_type(), "idempotency-key": key}
        try:
            response = await self.client.post(f"{self.targets[self.at]}{path}", content=body, headers=headers)
        except httpx.HTTPError as exc:
            self.at = (self.at + 1) % len(self.targets)
            return type(exc).__name__
        return response.status_code

    def _content_type(self) -> str:
        if self.protocol == "mercure":
            return "application/x-www-form-urlencoded"
        return "application/json" if self.system == "herald" else "text/plain"

    async def warmup(self) -> None:
        # A topic of its own (no subscriber has it), so nothing measured sees it; a key of each pacer's own,
        # so every warm-up is one publish the nodes count (not a repeat of another pacer's).
        topic = f"{self.names[0]}-warmup"
        status = await self._post([(topic, payload(0, 0, time.time_ns(), self.size))], f"{topic}-{self.pacer}")
        self.warmed = 1 if status in (200, 201) else 0

    async def __call__(self, items: list[tuple[int, int]], sent_ns: int, key: str) -> int | str:
        return await self._post([(self.names[t], payload(t, seq, sent_ns, self.size)) for t, seq in items], key)

    async def close(self) -> None:
        await self.client.aclose()


class RedisSender:
    """Straight to Redis through the broker's publish script, as ``workers.produce`` does (a Redis Cluster node's
    URL is detected the same way: ``HELLO``, or ``REDIS_CLUSTER_NODES``)."""

    def __init__(self, redis_url: str, names: list[str], size: int, retention: RetentionPolicy) -> None:
        target = redis_target(redis_url, cluster_nodes=os.environ.get("REDIS_CLUSTER_NODES"))
        self.broker = redis_broker(target, retention, partitions=partitions_setting())  # the nodes' partitions
        self.names = names
        self.size = size
        self.warmed = 0  # straight to Redis: not through any node's publish endpoint

    async def warmup(self) -> None:
        with contextlib.suppress(Exception):
            await self.broker.publish([Message(f"{self.names[0]}-warmup", payload(0, 0, time.time_ns(), self.size))])

    async def __call__(self, items: list[tuple[int, int]], sent_ns: int, key: str) -> int | str:
        messages = [Message(self.names[t], payload(t, seq, sent_ns, self.size)) for t, seq in items]
        try:
            await self.broker.publish(messages, key)
        except Exception as exc:  # BrokerUnavailable, redis-py's ConnectionError and friends: retry
            return type(exc).__name__
        return 201

    async def close(self) -> None:
        await self.broker.close()


@dataclass
class Pacer:
    """One sequential publisher for its own topics, at ``rate`` events/s for ``duration`` seconds."""

    index: int
    topics: list[int]
    rate: float
    duration: float
    batch: int
    retry_for: float
    run_id: str
    seed: int
    ledger: Ledger
    send: Sender
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        rng = random.Random(self.seed * 7919 + self.index)
        start = self.ledger.t0
        sent = 0
        requests = 0
        quota = int(self.rate * self.duration)
        while True:
            elapsed = time.monotonic() - start
            if self.stopping.is_set():
                return
            if elapsed >= self.duration:
                # Time is up. A pacer a little behind (its last requests were
                # slow) sends what it still owes as one last batch, so a run
                # publishes rate x duration events, not one fewer by chance;
                # one far behind does not: the target could not keep up.
                owed = min(quota - sent, self.batch)
                if owed > 0:
                    await self.publish(self._take(rng, owed), f"{self.run_id}-{self.index}-{requests + 1}")
                return
            due = min(int(self.rate * elapsed) + 1, quota) - sent
            if due <= 0:
                if sent >= quota:
                    return
                await asyncio.sleep(max(0.0, sent / self.rate - elapsed))
                continue
            count = min(due, self.batch)
            requests += 1
            await self.publish(self._take(rng, count), f"{self.run_id}-{self.index}-{requests}")
            sent += count

    def _take(self, rng: random.Random, count: int) -> list[tuple[int, int]]:
        """The next ``count`` events: (topic, its next sequence number), topics drawn from this pacer's."""
        return [(t, self.ledger.take(t)) for t in (rng.choice(self.topics) for _ in range(count))]

    async def publish(self, items: list[tuple[int, int]], key: str) -> None:
        """Until accepted, refused, or ``retry_for`` is up; the events keep their first attempt's time.

        Every attempt carries the same ``key`` (the Idempotency-Key), so a
        retry of a request the node took but did not answer publishes
        nothing twice. How long the whole publish took goes to
        :meth:`Ledger.settled`.
        """
        sent_ns = time.time_ns()
        first = time.monotonic()
        give_up_at = first + self.retry_for
        delay = 0.05
        while True:
            started = time.monotonic()
            status = await self.send(items, sent_ns, key)
            if status in (200, 201):
                self.ledger.ok(items, time.monotonic() - started)
                break
            self.ledger.failed(status)
            if isinstance(status, int) and 400 <= status < 500 and status not in _RETRYABLE:
                self.ledger.give_up(items, refused=True)
                break
            if time.monotonic() + delay > give_up_at:
                self.ledger.give_up(items, refused=False)
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        self.ledger.settled(time.monotonic() - first)


def pacers_for(topics: int, pacers: int) -> list[list[int]]:
    """Topic indices per pacer: topic ``t`` belongs to pacer ``t % pacers``."""
    pacers = max(1, min(pacers, topics))
    return [list(range(i, topics, pacers)) for i in range(pacers)]
