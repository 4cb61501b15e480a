"""The redis-cost scenario: Redis's own CPU per published event, Herald against a minimal script.

A Herald deployment's publish ceiling is its Redis primary's core, so the
figure that matters is what one published event costs Redis, whatever the
node does: Redis's CPU time (``INFO cpu``: ``used_cpu_sys + used_cpu_user``)
over a run, divided by the events accepted. The floor it is judged against
runs on the same Redis in the same run, the two taking turns: a minimal Lua
script that takes an id, appends it to a capped stream, renews the stream's
TTL and publishes it (:data:`MINIMAL`). Two workloads: one hot topic whose
replay buffer is full (every publish past the size), and 10,000 topics
(every publish to a different, existing stream). Each is measured two ways:

* **at capacity** (the target): Herald's publish (:meth:`RedisBroker.publish
  <broker.redis.RedisBroker.publish>`, the very call a node makes for ``POST
  /publish`` and ``workers.produce`` makes) and the minimal script, each from
  ``PRODUCERS`` concurrent producers flat out, from one client on the server
  core (no node runs meanwhile), Redis alone on the client core. This is what
  bounds a deployment: many nodes keep Redis busy.
* **through one node over HTTP** (context): ``POST /publish``, one event per
  request, from the load tool's compiled publisher (``PRODUCERS``
  connections, closed loop, as fast as answers come) against one node, then
  the minimal script paced to the rate the node reached. One node can't keep
  Redis busy, so Redis wakes for nearly every command and pays its event
  loop's fixed cost each time: this row is higher on both sides, and says
  what a lone node's publishes cost, not what Redis can take.

Medians over ``repeats`` turns, and the median of the per-turn ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from broker.base import Message, RetentionPolicy
from broker.redis import RedisBroker
from workers.bench.client import LineProcess
from workers.bench.systems import CLIENT_CORE, SERVER_CORE, Herald, pinned
from workers.loadtest import native

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks-redis.md"
"""Where a run of this scenario writes its figures (also a section of docs/benchmarks.md in a full run)."""

PRODUCERS = 16
"""Concurrent producers, on each side."""
DATA = "x" * 100
"""Every event's data: 100 bytes."""
WORKLOADS = {"hot": 1, "topics": 10_000}
"""Workload name -> how many topics its events go to, round-robin."""
TARGET = 2.0
"""Herald's Redis CPU per event may be at most this many times the minimal script's (at capacity)."""
FEEDS = 8
"""Node feeds subscribed to every topic for the per-feed-delivery figure (what each more node costs Redis)."""
SIZE = 1000
"""Events kept per topic: Herald's default (HERALD_REPLAY_SIZE), the minimal script's MAXLEN."""
TTL_MS = 3_600_000
"""The streams' TTL: Herald's default (HERALD_REPLAY_TTL, an hour), the minimal script's PEXPIRE."""

MINIMAL = """
local id = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], id .. '-0', 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', KEYS[3], id .. '||' .. ARGV[1])
return id
"""
"""The floor: an id, a capped stream append, its TTL renewed, a publish. What any replayable publish must do."""


async def redis_cpu(client: aioredis.Redis) -> float:
    """Redis's CPU seconds so far, every thread (``INFO cpu``)."""
    info = await client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def topic_names(topics: int) -> list[str]:
    return [f"cost-{i}" for i in range(topics)]


async def _herald_direct(broker: RedisBroker, names: list[str], events: int) -> int:
    """Publish ``events`` through the broker from PRODUCERS producers flat out; the number accepted."""

    async def producer(first: int) -> None:
        for i in range(first, events, PRODUCERS):
            await broker.publish([Message(names[i % len(names)], DATA)])

    await asyncio.gather(*(producer(k) for k in range(PRODUCERS)))
    return events


async def _minimal(client: aioredis.Redis, names: list[str], events: int, rate: float | None = None) -> int:
    """The minimal script ``events`` times from PRODUCERS producers, flat out or paced to ``rate`` events/s."""
    script = client.register_script(MINIMAL)
    start = time.monotonic()

    async def producer(first: int) -> None:
        for i in range(first, events, PRODUCERS):
            if rate is not None:
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            topic = names[i % len(names)]
            await script(keys=["minimal:id", f"minimal:s:{topic}", f"minimal:c:{topic}"], args=[DATA, SIZE, TTL_MS])

    await asyncio.gather(*(producer(k) for k in range(PRODUCERS)))
    return events


def _herald_http(system: Herald, names: list[str], seconds: float) -> tuple[int, float]:
    """POST /publish from the compiled publisher, closed loop as fast as answers come: (accepted, seconds)."""
    setup = {
        "host": "127.0.0.1",
        "port": system.port,
        "system": "herald",
        "topics": names,
        "rate": 1_000_000.0,
        "duration": seconds,
        "pacers": PRODUCERS,
        "pipeline": 1,
        "batch": 1,
        "size": len(DATA),
        "answer_timeout": 10.0,
    }
    with LineProcess(pinned(CLIENT_CORE, [str(native.build_publisher())])) as publisher:
        publisher.send({"setup": setup})
        publisher.wait_for("ready", 60)
        publisher.send({"cmd": "go"})
        result = publisher.wait_for("result", seconds + 60)
    return int(result["accepted"]), float(result["seconds"])


async def _with_feeds(client: aioredis.Redis, port: int, names: list[str], run: Awaitable[int]) -> float:
    """Redis's CPU µs per event accepted by ``run`` while FEEDS node feeds are subscribed to every topic.

    Each feed is what a node's is: one connection subscribed to the topics' channels, read as it comes; the
    CPU is read once every feed has had every event (Redis writes to a slow reader later, not less).
    """
    feeds = [aioredis.Redis(host="127.0.0.1", port=port) for _ in range(FEEDS)]
    pubsubs = [feed.pubsub() for feed in feeds]
    try:
        for pubsub in pubsubs:
            for start in range(0, len(names), 1000):
                await pubsub.subscribe(*(f"herald:c:{n}" for n in names[start : start + 1000]))
            confirmed = 0
            while confirmed < len(names):
                message = await pubsub.get_message(timeout=10)
                assert message is not None, "no subscribe confirmation"
                confirmed += message["type"] == "subscribe"

        async def drain(pubsub: Any, accepted: int) -> None:
            got = 0
            while got < accepted:
                message = await pubsub.get_message(timeout=10)
                assert message is not None, f"a feed had {got} of {accepted} events"
                got += message["type"] == "message"

        async def published_and_read() -> int:
            accepted = await run
            await asyncio.gather(*(drain(pubsub, accepted) for pubsub in pubsubs))
            return accepted

        return await _cost(client, published_and_read())
    finally:
        for pubsub in pubsubs:
            await pubsub.aclose()
        for feed in feeds:
            await feed.aclose()


async def _cost(client: aioredis.Redis, run: Awaitable[int]) -> float:
    """Redis's CPU µs per event accepted by ``run`` (a coroutine: nothing runs before it is awaited here)."""
    before = await redis_cpu(client)
    accepted = await run
    return (await redis_cpu(client) - before) / max(1, accepted) * 1e6


@contextlib.contextmanager
def on_server_core() -> Iterator[None]:
    """This thread on the server core for a while (the capacity rows' client; Redis is on the other)."""
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {SERVER_CORE})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def _summary(herald: list[float], minimal: list[float], **extra: Any) -> dict[str, Any]:
    ratios = [h / m for h, m in zip(herald, minimal, strict=True)]
    median = statistics.median(herald)
    return {
        "herald_us": round(median, 1),
        "minimal_us": round(statistics.median(minimal), 1),
        "ratio": round(statistics.median(ratios), 2),
        "herald_runs_us": [round(h, 1) for h in herald],
        "minimal_runs_us": [round(m, 1) for m in minimal],
        "events_per_core_s": round(1e6 / median),
        **extra,
    }


async def _measure(
    system: Herald, events: int, seconds: float, repeats: int, workloads: dict[str, int]
) -> dict[str, Any]:
    client = aioredis.Redis(host="127.0.0.1", port=system.redis_port)
    broker = RedisBroker(f"redis://127.0.0.1:{system.redis_port}/0", RetentionPolicy(size=SIZE, ttl=TTL_MS / 1000))
    out: dict[str, Any] = {}
    try:
        for name, topics in workloads.items():
            names = topic_names(topics)
            fill = max(topics, 2 * SIZE)  # the hot topic past its size; every one of 10,000 topics with a stream
            with on_server_core():
                await _herald_direct(broker, names, fill)
                await _minimal(client, names, fill)
            capacity: tuple[list[float], list[float]] = ([], [])
            feeds: list[float] = []
            http: tuple[list[float], list[float]] = ([], [])
            rates: list[float] = []
            for _ in range(repeats):
                with on_server_core():
                    capacity[0].append(await _cost(client, _herald_direct(broker, names, events)))
                    with_feeds = await _with_feeds(
                        client, system.redis_port, names, _herald_direct(broker, names, events)
                    )
                    feeds.append((with_feeds - capacity[0][-1]) / FEEDS)
                    capacity[1].append(await _cost(client, _minimal(client, names, events)))
                before = await redis_cpu(client)
                accepted, took = await asyncio.to_thread(_herald_http, system, names, seconds)
                http[0].append((await redis_cpu(client) - before) / max(1, accepted) * 1e6)
                rates.append(accepted / took)
                with on_server_core():
                    http[1].append(await _cost(client, _minimal(client, names, accepted, accepted / took)))
            out[name] = {
                "topics": topics,
                "capacity": _summary(*capacity, events=events),
                "per_feed_delivery_us": round(statistics.median(feeds), 2),
                "per_feed_delivery_runs_us": [round(f, 2) for f in feeds],
                "http": _summary(*http, events_per_s=round(statistics.median(rates))),
            }
            for way in ("capacity", "http"):
                row = out[name][way]
                print(
                    f"  {name}, {way}: Herald {row['herald_us']} µs, minimal {row['minimal_us']} µs of Redis CPU "
                    f"per event, {row['ratio']}x" + (f" (target <= {TARGET}x)" if way == "capacity" else ""),
                    flush=True,
                )
            print(
                f"  {name}: each node feed subscribed adds {out[name]['per_feed_delivery_us']} µs per event", flush=True
            )
        return out
    finally:
        await broker.close()
        await client.aclose()


def redis_cost(
    events: int = 20_000, seconds: float = 5.0, repeats: int = 3, workloads: dict[str, int] | None = None
) -> dict[str, Any]:
    """Both workloads, both ways, Herald and the minimal script in turns (see the module's docstring)."""
    with Herald(redis=True).running() as system:
        assert isinstance(system, Herald)
        return asyncio.run(_measure(system, events, seconds, repeats, workloads or WORKLOADS))


def section(result: dict[str, Any]) -> list[str]:
    """How it was measured, then the table (:func:`verdicts`)."""
    return [
        "Redis's own CPU (`INFO cpu`) over a run divided by the events accepted; 100-byte events from "
        f"{PRODUCERS} concurrent",
        "producers. The minimal script (an id, `XADD ... MAXLEN ~`, `PEXPIRE`, `PUBLISH`) runs on the same Redis in",
        "the same run, the two taking turns; medians, and the median of the per-turn ratios. **At capacity**:",
        "Herald's publish (`RedisBroker.publish`, what a node runs for `POST /publish`) and the minimal script flat",
        "out, Redis kept busy as many nodes keep it (the target's row). **One node, HTTP**: `POST /publish`, one",
        "event per request, from the compiled publisher against one node, then the minimal script paced to the",
        "rate the node reached; one node leaves Redis idle between commands, so both sides pay Redis's event loop",
        "per command there.",
        "",
        *verdicts(result),
    ]


def page(result: dict[str, Any], date: str, machine: str) -> str:
    """docs/benchmarks-redis.md: this scenario's figures on their own page."""
    lines = [
        "# Redis CPU per published event",
        "",
        f"Generated by `python -m workers.bench --scenarios redis-cost` (also part of `make bench`) on {date}:",
        f"{machine}. Redis 7 on core {CLIENT_CORE}, the node on core {SERVER_CORE}.",
        "",
        *section(result),
        "",
    ]
    return "\n".join(lines)


def verdicts(result: dict[str, Any]) -> list[str]:
    """The lines of docs/benchmarks.md's table: per workload and way, both figures, the ratio, the verdict."""
    labels = {"hot": "one hot topic, replay buffer full (1,000 events)", "topics": "10,000 topics"}
    lines = [
        "| workload | measured | Herald: Redis CPU per event | minimal script, same run | Herald / minimal | "
        "events/s one Redis core takes (Herald) | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result.items():
        for way, label in (("capacity", "at capacity"), ("http", "one node, HTTP")):
            figures = row[way]
            if way == "capacity":
                target = f"<= {TARGET}x: " + ("met" if figures["ratio"] <= TARGET else "**missed**")
            else:
                target = f"(at {figures['events_per_s']:,} events/s)"
            lines.append(
                f"| {labels.get(name, name)} | {label} | {figures['herald_us']} µs | {figures['minimal_us']} µs | "
                f"{figures['ratio']}x | ~{figures['events_per_core_s']:,} | {target} |"
            )
    feeds = ", ".join(
        f"{labels.get(name, name)}: {row['per_feed_delivery_us']} µs" for name, row in result.items()
        if "per_feed_delivery_us" in row
    )  # fmt: skip
    if feeds:
        lines += [
            "",
            f"**Each node feed** subscribed to the topics adds, per published event, at capacity ({FEEDS} feeds"
            f" subscribed, read as they come, against none; medians): {feeds}. A topic's events cost Redis"
            " the publish plus this for every node that has a subscriber of it (docs/capacity.md).",
        ]
    return lines
