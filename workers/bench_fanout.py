"""Fan-out measurement: N subscribers on one topic of one node, events published over HTTP.

``python -m workers.bench_fanout`` starts its own node process on a free
port (or measures ``--url``), opens ``--subscribers`` SSE connections to one
topic, then runs two phases, each bounded in events and seconds:

* **paced**: ``--rate`` events/s for ``--seconds``. Reports end-to-end latency
  (publish call started -> event parsed by a subscriber), median and p99.
* **flood**: ``--flood`` events published back to back (batches of
  ``--batch``). Reports delivered events/s (events x subscribers, per second
  of wall time until the last subscriber has the last event).

Every subscriber counts every event it receives; ``--sample`` of them also
parse each event to time it (parsing all of them would measure this
process, not the node). Publisher, subscribers and node share this machine,
so the figures are for comparing runs side by side, not absolute capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from ops import launch
from ops.probe import free_port, wait_until
from workers.loadtest.wire import ChunkedDecoder


@dataclass
class Subscriber:
    """One SSE connection that counts events, and optionally times them."""

    timed: bool
    events: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    buffer: bytes = b""
    tail: bytes = b""
    chunked: ChunkedDecoder = field(default_factory=lambda: ChunkedDecoder())
    got: asyncio.Event = field(default_factory=asyncio.Event)
    target: int = 0

    def feed(self, raw: bytes) -> None:
        if self.timed:
            now = time.time_ns()
            self.buffer += self.chunked.feed(raw)
            *frames, self.buffer = self.buffer.split(b"\n\n")
            for frame in frames:
                start = frame.find(b"data: ")
                if frame.startswith(b"id: ") and start >= 0:
                    sent = json.loads(frame[start + 6 :])["t"]
                    self.latencies_ms.append((now - sent) / 1e6)
                    self.events += 1
        else:
            # Chunk-size lines are hex digits, so they never hold "id: ": count
            # on the raw bytes, keeping 3 bytes back for a match split across reads.
            data = self.tail + raw
            self.events += data.count(b"id: ")
            self.tail = data[-3:]
        if self.target and self.events >= self.target:
            self.got.set()


async def subscribe(host: str, port: int, topic: str, sub: Subscriber, ready: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /events?topic={topic} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"subscribe failed: {head!r}")
    preamble = await reader.readuntil(b"\n\n\r\n")  # the first chunk: retry and position
    sub.chunked.feed(preamble)
    ready.set()
    try:
        while chunk := await reader.read(1 << 16):
            sub.feed(chunk)
    finally:
        writer.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def own_node(env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    proc = launch.spawn(launch.node_command(), env=launch.node_env(port, extra=env), new_session=False)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, "the node", 20)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run(
    url: str, subscribers: int, sample: int, rate: float, seconds: float, flood: int, batch: int
) -> dict[str, object]:
    host, port = url.removeprefix("http://").split(":")
    topic = f"bench-{os.getpid()}"
    subs = [Subscriber(timed=i < sample) for i in range(subscribers)]
    readies = [asyncio.Event() for _ in subs]
    tasks = [asyncio.create_task(subscribe(host, int(port), topic, s, r)) for s, r in zip(subs, readies, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
    result: dict[str, object] = {"subscribers": subscribers}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        # Paced phase: latency at a steady rate.
        count = int(rate * seconds)
        for s in subs:
            s.target = count
        start = time.monotonic()
        for i in range(count):
            await client.post("/publish", json={"topic": topic, "data": {"t": time.time_ns(), "n": i}})
            delay = start + (i + 1) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.wait_for(asyncio.gather(*(s.got.wait() for s in subs)), 60)
        latencies = [ms for s in subs for ms in s.latencies_ms]
        result["paced"] = {
            "events": count,
            "rate": rate,
            "deliveries": count * subscribers,
            "latency_ms_p50": round(statistics.median(latencies), 2),
            "latency_ms_p99": round(percentile(latencies, 0.99), 2),
            "latency_ms_max": round(max(latencies), 2),
        }
        # Flood phase: delivered events per second.
        for s in subs:
            s.latencies_ms.clear()
            s.got.clear()
            s.target = count + flood
        started = time.monotonic()
        for offset in range(0, flood, batch):
            body = [{"topic": topic, "data": {"t": time.time_ns(), "n": offset + j}} for j in range(batch)]
            response = await client.post("/publish", json=body)
            response.raise_for_status()
        published = time.monotonic() - started
        await asyncio.wait_for(asyncio.gather(*(s.got.wait() for s in subs)), 120)
        elapsed = time.monotonic() - started
        latencies = [ms for s in subs for ms in s.latencies_ms]
        result["flood"] = {
            "events": flood,
            "deliveries": flood * subscribers,
            "publish_seconds": round(published, 3),
            "delivery_seconds": round(elapsed, 3),
            "delivered_per_second": round(flood * subscribers / elapsed),
            "latency_ms_p50": round(statistics.median(latencies), 2),
            "latency_ms_p99": round(percentile(latencies, 0.99), 2),
        }
        result["all_delivered"] = all(s.events == count + flood for s in subs)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="measure this node instead of starting one")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--sample", type=int, default=50, help="subscribers that time every event")
    parser.add_argument("--rate", type=float, default=50.0, help="events/s in the paced phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the paced phase")
    parser.add_argument("--flood", type=int, default=2000, help="events in the flood phase")
    parser.add_argument("--batch", type=int, default=20, help="events per publish request in the flood phase")
    parser.add_argument("--runs", type=int, default=1, help="repeat and report each run")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.subscribers + 256)), hard))

    def measure(url: str) -> None:
        for _ in range(args.runs):
            result = asyncio.run(
                run(url, args.subscribers, args.sample, args.rate, args.seconds, args.flood, args.batch)
            )
            print(json.dumps(result), flush=True)

    if args.url:
        measure(args.url)
    else:
        with own_node({}) as url:
            measure(url)


if __name__ == "__main__":
    main()
