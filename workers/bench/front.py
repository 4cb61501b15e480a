"""The front scenario: what the stream probe costs per open, and what the heartbeat costs per idle stream.

Both guard against gray failures (a node that hangs holding its sockets) and
both sit on a hot path, so both are measured side by side in one run,
alternated rounds, medians:

* **the probe** (``auth_request /_herald/probe;`` in ``location = /events``
  of ``ops/nginx.conf.template``): one node (Redis broker, as the clusters of
  ``ops.cluster`` run) behind two nginx fronts at once, the shipped rendering
  (:func:`ops.nginx.render_local`) and the same text with its
  ``auth_request`` lines taken out (:func:`without_probe`). Each round opens
  ``opens`` streams through each front, ``concurrency`` at a time: connect,
  ``GET /events?topic=t``, read until the first body bytes (the node's
  ``retry:`` preamble), close. Figures: opens/s, the median and p99 open
  latency (request written to first body byte), the node's CPU and nginx's
  (master and workers) per 1,000 opens; and the rounds' median ratios, with
  over without. One more stream, opened directly to the node and held, keeps
  the topic live, as a topic with subscribers is (its opens take the node's
  stream lane, :mod:`api.adapter.lane`). The probe costs the node a request
  through uvicorn's ASGI cycle and a connection accepted and closed: nginx
  closes the upstream connection an ``auth_request`` subrequest used, whatever
  the upstream's ``keepalive``.
* **the heartbeat** (``HERALD_HEARTBEAT``: a node writes each idle stream a
  comment every half of it, :meth:`api.core.hub.Hub._tick_forever`): one node
  per heartbeat in ``heartbeats`` (the first, the default, is the baseline),
  each in its turn holding ``streams`` idle streams opened directly to it
  while its CPU is read over ``window`` seconds. Figures: the node's CPU % of
  a core; the CPU per heartbeat written (the client counts them); the bytes a
  stream receives per minute (TCP payload: the comment in its chunk); the
  extra CPU over the baseline's per 10,000 streams, and per extra heartbeat.

Servers run pinned to the server core (nodes, nginx); Redis and this process
(the client: raw asyncio sockets) to the client core. CPU time is every
thread's run time from ``/proc/<pid>/task/*/schedstat`` (nanoseconds; where
the kernel has none, utime + stime from ``/proc/<pid>/stat``, in 10 ms ticks).
Every server listens on 127.0.0.1 (free ports) and is stopped by pid.

Run it as ``python -m workers.bench --scenarios front``; it writes
``docs/benchmarks-front.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from api.core.sse import HEARTBEAT
from ops import launch
from ops.nginx import FrontPolicy, render_local
from ops.probe import free_port, probe_get, wait_until
from workers.bench.cpu import cpu_seconds, descendants
from workers.bench.systems import CLIENT_CORE, SERVER_CORE, pinned

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks-front.md"
"""Where a run of this scenario writes its figures."""

OPENS = 2000
"""Streams opened through each front per round."""
CONCURRENCY = 50
"""Opens in flight at once."""
STREAMS = 5000
"""Idle streams a node holds while its heartbeat's CPU is read."""
HEARTBEATS = (15.0, 5.0, 2.0)
"""HERALD_HEARTBEAT values measured; the first (the default) is the baseline."""
WINDOW = 15.0
"""Seconds of each idle reading: a whole number of ticks (heartbeat / 2) of every heartbeat above."""
REPEATS = 3
"""Alternated rounds; the figures are the rounds' medians."""
QUICK: dict[str, Any] = {"opens": 300, "streams": 500, "window": 7.5, "repeats": 1}
"""``--quick``: a smoke run of well under a minute."""

TOPIC = "t"
PROBE_LINE = re.compile(r"^[ \t]*auth_request /_herald/probe;.*\n", re.MULTILINE)
"""A line of the template that makes a stream probe its node first."""
SIDES = ("with", "without")
"""The probe's two fronts: the shipped template, and the same without its auth_request lines."""


def without_probe(text: str) -> str:
    """A rendered config with its ``auth_request /_herald/probe;`` lines removed, and nothing else."""
    stripped, removed = PROBE_LINE.subn("", text)
    assert removed >= 1, "no auth_request line in the rendered template: the probe moved, update this scenario"
    assert not re.search(r"^\s*auth_request\s", stripped, re.MULTILINE), "an auth_request of another shape is left"
    assert "location = /_herald/probe {" in stripped, "the probe's own location stays (nothing points at it)"
    return stripped


# -- processes -------------------------------------------------------------------------------------------------


def _cores() -> tuple[int | None, int | None]:
    """(server core, client core), or (None, None) on a machine without both."""
    if {SERVER_CORE, CLIENT_CORE} <= os.sched_getaffinity(0):
        return SERVER_CORE, CLIENT_CORE
    return None, None


def _pinned(core: int | None, args: list[str]) -> list[str]:
    return args if core is None else pinned(core, args)


def task_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds of these processes, every thread's: schedstat's nanoseconds where the kernel keeps them,
    else utime + stime (10 ms ticks); 0 for a process that is gone."""
    total = 0.0
    for pid in pids:
        try:
            tasks = [p.read_text() for p in Path(f"/proc/{pid}/task").glob("*/schedstat")]
            total += sum(int(task.split()[0]) for task in tasks) / 1e9 if tasks else cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            total += cpu_seconds(pid)
    return total


class _Fleet:
    """The processes a measurement started: all stopped by pid at its end, at once (SIGTERM, then each waited
    for; SIGKILL after 10 s), the last started first."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, args: list[str], log: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        process = launch.spawn(args, log, env)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def __enter__(self) -> _Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _started(process: subprocess.Popen[bytes], url: str, what: str, log: Path) -> None:
    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}")
        return probe_get(url).status_code == 200

    wait_until(up, what, 30, fatal=(RuntimeError,))


@dataclass
class _Server:
    port: int
    pids: list[int]
    """The processes whose CPU counts (a node; nginx's master and workers)."""


def _redis(fleet: _Fleet, core: int | None) -> str:
    port = free_port()
    process = fleet.spawn(_pinned(core, launch.redis_args(port)))
    wait_until(lambda: process.poll() is None and _ping(port), f"redis-server on {port}", 10)
    return f"redis://127.0.0.1:{port}/0"


def _ping(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        return bool(client.ping())
    finally:
        client.close()


def _nodes(
    fleet: _Fleet, run_dir: Path, redis_url: str, heartbeats: Sequence[float], core: int | None
) -> list[_Server]:
    """One node per heartbeat, started side by side; each returned once it is ready."""
    started = []
    for i, heartbeat in enumerate(heartbeats):
        port, log = free_port(), run_dir / f"node-{i}.log"
        env = launch.node_env(port, f"front-bench-{i}", {"REDIS_URL": redis_url, "HERALD_HEARTBEAT": f"{heartbeat:g}"})
        process = fleet.spawn(_pinned(core, launch.node_command()), log, env)
        started.append((process, port, log))
    servers = []
    for process, port, log in started:
        _started(process, f"http://127.0.0.1:{port}/readyz", f"node on {port}", log)
        servers.append(_Server(port, descendants([process.pid])))
    return servers


def _front(fleet: _Fleet, run_dir: Path, node_port: int, probe: bool, core: int | None) -> _Server:
    """nginx from the shipped template (``probe``) or without its probe, in front of one node."""
    for sub in ("logs", "nginx-body", "nginx-proxy"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
        (run_dir / sub).chmod(0o777)  # nginx workers drop root privileges
    port = free_port()
    text = render_local(port, [node_port], run_dir, FrontPolicy())
    conf = run_dir / "nginx.conf"
    conf.write_text(text if probe else without_probe(text))
    log = run_dir / "logs" / "nginx.out"
    args = [launch.NGINX, "-p", str(run_dir), "-c", str(conf), "-e", str(run_dir / "logs" / "nginx-error.log"),
            "-g", "daemon off;"]  # fmt: skip
    process = fleet.spawn(_pinned(core, args), log)
    _started(process, f"http://127.0.0.1:{port}/healthz", "nginx", log)
    master = int((run_dir / "nginx.own-pid").read_text())  # the master's pid file; its workers are its children
    return _Server(port, descendants([master]))


@contextlib.contextmanager
def _client_core(core: int | None) -> Iterator[None]:
    """This process (the client) on the client core, with as many descriptors as it may have."""
    affinity = os.sched_getaffinity(0)
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limits[1] != resource.RLIM_INFINITY and limits[0] < limits[1]:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits[1], limits[1]))
    if core is not None:
        os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, affinity)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


# -- the client --------------------------------------------------------------------------------------------------

REQUEST = f"GET /events?topic={TOPIC} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode()


class _Stream(asyncio.Protocol):
    """One stream: writes its request on connect; ``opened`` is set, with the seconds from the request to
    the first body byte, once the node's answer (200, its ``X-Node-Id``: not nginx's own) has body bytes."""

    def __init__(self, opened: asyncio.Future[float]) -> None:
        self.opened = opened
        self.sent = 0.0
        self.head = b""
        self.received = 0
        self.heartbeats = 0
        self.lost = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.sent = time.perf_counter()
        transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        if self.opened.done():
            self.received += len(data)
            self.heartbeats += data.count(HEARTBEAT)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0 or len(self.head) == end + 4:
            return  # no body byte yet
        elapsed = time.perf_counter() - self.sent
        head = self.head[:end].lower()
        if not head.startswith(b"http/1.1 200") or b"\r\nx-node-id:" not in head:
            self.opened.set_exception(RuntimeError(f"not a node's stream: {self.head[:300]!r}"))
        else:
            self.opened.set_result(elapsed)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before the stream opened: {self.head[:300]!r}"))


async def _connect(port: int) -> _Stream:
    """A stream to 127.0.0.1:``port``, open (its first body bytes in)."""
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[float] = loop.create_future()
    _, stream = await loop.create_connection(lambda: _Stream(opened), "127.0.0.1", port)
    await asyncio.wait_for(opened, 30)
    return stream


async def _open_and_close(port: int, opens: int, concurrency: int) -> tuple[float, list[float]]:
    """``opens`` streams opened and closed, ``concurrency`` at a time: (wall seconds, each one's latency)."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    left = opens

    async def opener() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            opened: asyncio.Future[float] = loop.create_future()
            transport, _ = await loop.create_connection(functools.partial(_Stream, opened), "127.0.0.1", port)
            try:
                latencies.append(await asyncio.wait_for(opened, 30))
            finally:
                transport.close()

    started = time.perf_counter()
    await asyncio.gather(*(opener() for _ in range(min(concurrency, opens))))
    return time.perf_counter() - started, latencies


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


# -- the probe ---------------------------------------------------------------------------------------------------


async def _probe_rounds(
    node: _Server, fronts: dict[str, _Server], opens: int, concurrency: int, repeats: int, settle: float
) -> dict[str, list[dict[str, float]]]:
    keeper = await _connect(node.port)  # the topic stays live, as one with subscribers is
    try:
        for front in fronts.values():  # warm-up: connections, caches, the nodes' and nginx's first allocations
            await _open_and_close(front.port, min(opens, 200), concurrency)
        turns: dict[str, list[dict[str, float]]] = {side: [] for side in fronts}
        for i in range(repeats):
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                front = fronts[side]
                node_before, nginx_before = task_cpu_seconds(node.pids), task_cpu_seconds(front.pids)
                seconds, latencies = await _open_and_close(front.port, opens, concurrency)
                await asyncio.sleep(settle)  # the closes reach the node and are done with
                node_cpu = task_cpu_seconds(node.pids) - node_before
                nginx_cpu = task_cpu_seconds(front.pids) - nginx_before
                turns[side].append(
                    {
                        "opens": len(latencies),
                        "opens_per_s": len(latencies) / seconds,
                        "p50_ms": statistics.median(latencies) * 1e3,
                        "p99_ms": _p99(latencies) * 1e3,
                        "node_cpu_s_per_1000": node_cpu / len(latencies) * 1000,
                        "nginx_cpu_s_per_1000": nginx_cpu / len(latencies) * 1000,
                    }
                )
        return turns
    finally:
        assert keeper.transport is not None
        keeper.transport.close()


PROBE_FIGURES = ("opens_per_s", "p50_ms", "p99_ms", "node_cpu_s_per_1000", "nginx_cpu_s_per_1000")


def _probe_summary(turns: dict[str, list[dict[str, float]]], opens: int, concurrency: int) -> dict[str, Any]:
    result: dict[str, Any] = {"opens": opens, "concurrency": concurrency, "repeats": len(turns["with"])}
    for side in SIDES:
        result[side] = {key: statistics.median(t[key] for t in turns[side]) for key in PROBE_FIGURES}
        result[side]["opens_counted"] = sum(int(t["opens"]) for t in turns[side])
        result[side]["turns"] = turns[side]
    result["ratios"] = {
        key: statistics.median(
            w[key] / o[key] if o[key] else float("nan") for w, o in zip(turns["with"], turns["without"], strict=True)
        )
        for key in PROBE_FIGURES
    }
    return result


def probe_cost(
    redis_url: str, opens: int = OPENS, concurrency: int = CONCURRENCY, repeats: int = REPEATS, settle: float = 0.5
) -> dict[str, Any]:
    """One node behind both fronts (see the module's docstring); medians of ``repeats`` alternated rounds."""
    server, client = _cores()
    run_dir = Path(tempfile.mkdtemp(prefix="herald-bench-front-"))
    try:
        with _Fleet() as fleet:
            (node,) = _nodes(fleet, run_dir, redis_url, [FrontPolicy().heartbeat], server)
            fronts = {side: _front(fleet, run_dir / side, node.port, side == "with", server) for side in SIDES}
            with _client_core(client):
                turns = asyncio.run(_probe_rounds(node, fronts, opens, concurrency, repeats, settle))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return _probe_summary(turns, opens, concurrency)


# -- the heartbeat -----------------------------------------------------------------------------------------------


async def _idle_turn(node: _Server, streams: int, window: float, settle: float) -> dict[str, float]:
    """``streams`` idle streams to the node; its CPU and what the streams received over ``window`` seconds."""
    held: list[_Stream] = []
    try:
        for first in range(0, streams, 250):
            batch = [_connect(node.port) for _ in range(first, min(streams, first + 250))]
            opened = await asyncio.gather(*batch, return_exceptions=True)
            held += [stream for stream in opened if isinstance(stream, _Stream)]  # closed below, whatever happens
            failed = next((error for error in opened if isinstance(error, BaseException)), None)
            if failed is not None:
                raise failed
        await asyncio.sleep(settle)  # the opens are done with
        cpu_before = task_cpu_seconds(node.pids)
        received, heartbeats = sum(s.received for s in held), sum(s.heartbeats for s in held)
        started = time.monotonic()
        await asyncio.sleep(window)
        cpu = task_cpu_seconds(node.pids) - cpu_before
        seconds = time.monotonic() - started
        received_bytes = sum(s.received for s in held) - received
        heartbeats = sum(s.heartbeats for s in held) - heartbeats
        lost = sum(s.lost for s in held)
    finally:
        for stream in held:
            if stream.transport is not None:
                stream.transport.close()
        await asyncio.sleep(0.2)
    return {"cpu_s": cpu, "seconds": seconds, "heartbeats": heartbeats, "bytes": received_bytes, "lost": lost}


async def _heartbeat_rounds(
    nodes: dict[float, _Server], streams: int, window: float, repeats: int, settle: float
) -> dict[float, list[dict[str, float]]]:
    order = list(nodes)
    turns: dict[float, list[dict[str, float]]] = {h: [] for h in order}
    for i in range(repeats):
        for heartbeat in order if i % 2 == 0 else order[::-1]:
            turns[heartbeat].append(await _idle_turn(nodes[heartbeat], streams, window, settle))
    return turns


def _heartbeat_summary(turns: dict[float, list[dict[str, float]]], streams: int, window: float) -> dict[str, Any]:
    baseline = next(iter(turns))
    rows: dict[str, Any] = {}
    for heartbeat, runs in turns.items():
        row: dict[str, Any] = {
            "heartbeat_s": heartbeat,
            "cpu_percent": statistics.median(r["cpu_s"] / r["seconds"] * 100 for r in runs),
            "us_per_heartbeat": statistics.median(r["cpu_s"] / max(r["heartbeats"], 1) * 1e6 for r in runs),
            "heartbeats": statistics.median(r["heartbeats"] for r in runs),
            "expected_heartbeats": streams * window / (heartbeat / 2),
            "bytes_per_stream_per_min": statistics.median(r["bytes"] / streams / r["seconds"] * 60 for r in runs),
            "lost": sum(int(r["lost"]) for r in runs),
            "turns": runs,
        }
        pairs = list(zip(runs, turns[baseline], strict=True))
        row["extra_cpu_percent_per_10k"] = statistics.median(
            (r["cpu_s"] / r["seconds"] - b["cpu_s"] / b["seconds"]) * 100 * 10_000 / streams for r, b in pairs
        )
        row["extra_us_per_heartbeat"] = (
            None
            if heartbeat == baseline
            else statistics.median(
                (r["cpu_s"] - b["cpu_s"]) / max(r["heartbeats"] - b["heartbeats"], 1) * 1e6 for r, b in pairs
            )
        )
        rows[f"{heartbeat:g}"] = row
    return {"streams": streams, "window_s": window, "repeats": len(turns[baseline]), "baseline": baseline, "rows": rows}


def heartbeat_cost(
    redis_url: str,
    streams: int = STREAMS,
    heartbeats: Sequence[float] = HEARTBEATS,
    window: float = WINDOW,
    repeats: int = REPEATS,
    settle: float = 1.0,
) -> dict[str, Any]:
    """A node per heartbeat, each holding ``streams`` idle streams in turn (see the module's docstring)."""
    server, client = _cores()
    run_dir = Path(tempfile.mkdtemp(prefix="herald-bench-front-"))
    try:
        with _Fleet() as fleet:
            nodes = dict(zip(heartbeats, _nodes(fleet, run_dir, redis_url, heartbeats, server), strict=True))
            with _client_core(client):
                turns = asyncio.run(_heartbeat_rounds(nodes, streams, window, repeats, settle))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return _heartbeat_summary(turns, streams, window)


def front_cost(
    opens: int = OPENS,
    concurrency: int = CONCURRENCY,
    streams: int = STREAMS,
    heartbeats: Sequence[float] = HEARTBEATS,
    window: float = WINDOW,
    repeats: int = REPEATS,
    settle: float = 1.0,
) -> dict[str, Any]:
    """Both measurements, on one redis-server (the client core's)."""
    with _Fleet() as fleet:
        redis_url = _redis(fleet, _cores()[1])
        return {
            "nginx": nginx_version(),
            "probe": probe_cost(redis_url, opens, concurrency, repeats, settle=min(settle, 0.5)),
            "heartbeat": heartbeat_cost(redis_url, streams, heartbeats, window, repeats, settle),
        }


def nginx_version() -> str:
    """``nginx/1.22.1``, say (what ``nginx -v`` prints)."""
    printed = subprocess.run([launch.NGINX, "-v"], capture_output=True, text=True, check=False).stderr
    return printed.strip().removeprefix("nginx version: ") or "nginx"


# -- the page ----------------------------------------------------------------------------------------------------


def section(result: dict[str, Any]) -> list[str]:
    probe, beat = result["probe"], result["heartbeat"]
    default = " (the default)" if beat["baseline"] == FrontPolicy().heartbeat else ""
    ratios = probe["ratios"]
    lines = [
        "**The probe, per stream open.** One node (Redis broker) behind two nginx fronts: the shipped",
        "`ops/nginx.conf.template` and the same rendering without its `auth_request /_herald/probe;` lines.",
        f"Each round opens {probe['opens']:,} streams through each front, {probe['concurrency']} at a time (connect,",
        "`GET /events`, read to the first body byte, close), the fronts alternating; medians of",
        f"{probe['repeats']} rounds, and the median of the rounds' ratios. Latency: request written to first body",
        "byte. CPU: the node's, and nginx's master and workers', per 1,000 opens.",
        "",
        "| front | opens/s | p50 open | p99 open | node CPU s / 1,000 opens | nginx CPU s / 1,000 opens |",
        "|---|---|---|---|---|---|",
    ]
    for side, label in (("with", "with the probe (shipped)"), ("without", "without the probe")):
        row = probe[side]
        lines.append(
            f"| {label} | {row['opens_per_s']:,.0f} | {row['p50_ms']:.2f} ms | {row['p99_ms']:.2f} ms | "
            f"{row['node_cpu_s_per_1000']:.3f} | {row['nginx_cpu_s_per_1000']:.3f} |"
        )
    lines.append(
        f"| with / without | {ratios['opens_per_s']:.2f}x | {ratios['p50_ms']:.2f}x | {ratios['p99_ms']:.2f}x | "
        f"{ratios['node_cpu_s_per_1000']:.2f}x | {ratios['nginx_cpu_s_per_1000']:.2f}x |"
    )
    lines += [
        "",
        f"**The heartbeat, per idle stream.** A node per `HERALD_HEARTBEAT`, each holding {beat['streams']:,} idle",
        f"streams (opened directly, not through nginx) in its turn while its CPU is read over {beat['window_s']:g} s",
        f"(a whole number of ticks of each); medians of {beat['repeats']} rounds. The heartbeats are counted by the",
        "client; bytes are the TCP payload each stream receives (the comment in its HTTP chunk). Extra CPU is over",
        f"the {beat['baseline']:g} s heartbeat's{default} in the same round, scaled to 10,000 streams.",
        "",
        "| HERALD_HEARTBEAT | node CPU (% of a core) | CPU per heartbeat written | bytes per stream per minute "
        "| extra CPU per 10,000 streams | CPU per extra heartbeat |",
        "|---|---|---|---|---|---|",
    ]
    for row in beat["rows"].values():
        if row["extra_us_per_heartbeat"] is None:
            extra_cpu = extra_us = "baseline"
        else:
            extra_cpu = f"{row['extra_cpu_percent_per_10k']:+.2f} % of a core"
            extra_us = f"{row['extra_us_per_heartbeat']:.1f} µs"
        lines.append(
            f"| {row['heartbeat_s']:g} s | {row['cpu_percent']:.2f} % | {row['us_per_heartbeat']:.1f} µs | "
            f"{row['bytes_per_stream_per_min']:.0f} | {extra_cpu} | {extra_us} |"
        )
    lines += [
        "",
        "Reading it: the probe is one more request per stream open, and one more connection the node accepts",
        "and closes (nginx closes the upstream connection an `auth_request` subrequest used, whatever the",
        "upstream's `keepalive`), paid once per stream and never per event: it weighs on connects and reconnect",
        "storms, not on fan-out, and the ratio row is its whole price (opens/s is what the server core, node and",
        "nginx together, sustains). The heartbeat is paid per idle stream and per tick, so its cost scales with",
        "streams divided by the heartbeat: a shorter default ends a stream on a hung node sooner",
        '(docs/operations.md, "Gray failures") at the extra CPU and bytes its rows show.',
    ]
    return lines


def page(result: dict[str, Any], date: str, machine: str) -> str:
    return "\n".join(
        [
            "# The front's guards against gray failures: the stream probe and the heartbeat",
            "",
            f"Generated by `python -m workers.bench --scenarios front` (also part of `make bench`) on {date}:",
            f"{machine}; {result.get('nginx', 'nginx')}. The nodes and nginx run on one core, Redis and the client",
            "(raw asyncio sockets) on the other; CPU is each process's run time, every thread's, from `/proc`.",
            "Rerun it with `.venv/bin/python -m workers.bench --scenarios front` (`--quick`: a smoke run, nothing",
            "written).",
            "",
            *section(result),
            "",
        ]
    )
