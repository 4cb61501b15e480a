"""The scenarios of ``make bench``, each run the same way on every system.

Every scenario starts the system afresh (nothing carries over from the step
before), drives it from the client core with the compiled load client
(``--client native``: the Python one cannot out-run nchan), and records the
servers' CPU per component while publishing, so each figure says what
bounded it.

* :func:`throughput`: N subscribers on one topic, rising publish rate; the
  best step with zero loss whose deliveries kept up is the figure.
* :func:`latency`: 5,000 subscribers, 20 events/s: p99 publish -> deliver.
* :func:`many_topics`: 10,000 subscribers, each on its own topic, 2,000
  events/s spread over them.
* :func:`idle`: 5,000 idle connections opened at once: the time until all
  have their 200, and the server's RSS growth per connection.
* :func:`storm`: 5,000 subscribers drop, miss 100 events, and all reconnect
  at once with ``Last-Event-ID``: the time until every one has them all,
  and whether each got exactly those (no loss, no duplicate, no reset).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from workers.bench.client import NativeClient
from workers.bench.cpu import CpuSampler
from workers.bench.systems import CLIENT_CORE, ROOT, System, pinned, rss_bytes
from workers.loadtest.config import subscribe_path
from workers.loadtest.histogram import Histogram
from workers.loadtest.wire import payload

SATURATED = 0.9
"""A process above this share of a core is the bound of its step."""


def loadtest(system: System, args: list[str]) -> dict[str, Any]:
    """One run of the load tool on the client core, the servers' CPU sampled meanwhile.

    Returns the tool's JSON result with ``server_cpu`` added: each
    component's share of a core over the publishing window.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "workers.loadtest", "--quiet", "--client", "native",
                   "--system", system.loadtest_system, "--target", system.url, "--json", str(out),
                   "--payload", "100", "--drain", "5", *args]  # fmt: skip
        with CpuSampler(system.components()) as sampler:
            done = subprocess.run(pinned(CLIENT_CORE, command), cwd=ROOT, capture_output=True, timeout=900)
        if not out.exists():
            raise RuntimeError(f"the load tool failed on {system.name}: {done.stderr.decode()[-2000:]}")
        result: dict[str, Any] = json.loads(out.read_text())
    start = result["publish"]["started_ns"]
    result["server_cpu"] = sampler.share(start, start + int(result["publish"]["seconds"] * 1e9))
    return result


def bound(step: dict[str, Any]) -> str:
    """What set a step's figure: a saturated server component, the client, the publisher, or nothing.

    Components that share the server core (``core_components``: all but the
    Redis of ``herald-redis``, which runs on the client's) are also
    saturated together when their shares add up to a full core.
    """
    cpu = step["server_cpu"]
    busy = [name for name, share in cpu.items() if share >= SATURATED]
    shared = step.get("core_components", list(cpu))
    if not busy and sum(cpu.get(name, 0.0) for name in shared) >= SATURATED:
        busy = ["server core"]
    if step["client_cpu_max"] >= SATURATED:
        busy.append("client")
    if step["published_per_s"] < 0.95 * step["rate"]:
        busy.append("publishing")
    return ", ".join(busy) or "none"


def kept_up(step: dict[str, Any]) -> bool:
    """A step counts when nothing was lost and deliveries kept up with what was offered.

    Delivered events/s is measured from the first publish to the last
    delivery, so a server that falls behind (and catches up while draining)
    does not pass.
    """
    return bool(
        step.get("passed", True)
        and step["lost"] == 0
        and step["delivered_per_s"] >= 0.95 * step["offered_per_s"]
        and step["published_per_s"] >= 0.95 * step["rate"]
    )


def best_step(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest rate reached before the first step that did not keep up."""
    best = None
    for step in steps:
        if not kept_up(step):
            break
        best = step
    return best


def _step(system: System, subscribers: int, rate: float, args: list[str], fanout: int | None = None) -> dict[str, Any]:
    """One load-tool run on a fresh start of ``system``; ``fanout``: subscribers per event (all, by default)."""
    with system.running():
        r = loadtest(system, ["--subscribers", str(subscribers), "--rate", str(rate), *args])
        core = system.core_components()
    step = {
        "rate": rate,
        "offered_per_s": rate * (subscribers if fanout is None else fanout),
        "delivered_per_s": round(r["delivery"]["per_second"]),
        "published_per_s": r["publish"]["rate"],
        "lost": r["delivery"]["lost"],
        "duplicated": r["delivery"]["duplicated"],
        "p50_ms": r["latency_ms"]["p50"],
        "p99_ms": r["latency_ms"]["p99"],
        "client_cpu_max": max(w["max"] for w in r["tool"]["worker_cpu"]),
        "server_cpu": r["server_cpu"],
        "core_components": core,
        "passed": r["verdict"]["pass"],
    }
    step["ok"] = kept_up(step)
    step["bound"] = bound(step)
    print(f"  {system.name:18} {subscribers:>6} subs {rate:>6g} ev/s: {step}", flush=True)
    return step


def throughput(system: System, subscribers: int, rates: list[float], seconds: float) -> dict[str, Any]:
    """Rising rates until one loses events or falls behind (:func:`best_step` picks the figure)."""
    steps = []
    for rate in rates:
        step = _step(system, subscribers, rate, ["--duration", str(seconds), "--ramp", "2", "--publishers", "1"])
        steps.append(step)
        if not step["ok"]:
            break
    return {"steps": steps}


def latency(system: System) -> dict[str, Any]:
    """5,000 subscribers on one topic at 20 events/s: the latency of a calm, crowded topic."""
    return _step(system, 5000, 20, ["--duration", "10", "--ramp", "3", "--publishers", "1"])


def many_topics(system: System) -> dict[str, Any]:
    """10,000 subscribers, each on its own topic; 2,000 events/s spread over the topics."""
    # 8 publish lanes. The peers take one event per request, and the tool's publisher tops out at about
    # 900 requests/s whether 8 or 32 are in flight (measured); 32 lanes only added the publisher's own
    # queueing to every latency (Herald's p99 12 ms with 8, 40-79 ms with 32, in successive runs).
    args = ["--topics", "each", "--duration", "10", "--ramp", "5", "--publishers", "8", "--connect-timeout", "60"]
    return _step(system, 10_000, 2000, args, fanout=1)


def idle(system: System, count: int = 5000) -> dict[str, Any]:
    """``count`` connections opened at once, then idle: connect time and RSS growth per connection."""
    path = subscribe_path(system.loadtest_system, ["idle"])
    with system.running():
        time.sleep(1)  # the server's own start-up allocations settle first
        before = rss_bytes(system.server_pids())
        with NativeClient([(i, system.address, path, [0]) for i in range(count)]) as client:
            ready = client.ready()
            time.sleep(2)  # buffers settle before memory is read
            after = rss_bytes(system.server_pids())
            result = client.finish({0: 0})
    connect = Histogram.from_json(result["connect_time"])
    return {
        "connections": count,
        "connected": ready["ready"],
        "connect_all_s": round(ready["connect_all_s"], 3),
        "connect_p50_ms": connect.percentile(50) / 1000,
        "connect_p99_ms": connect.percentile(99) / 1000,
        "connect_errors": result["connect_errors"],
        "rss_before_mb": round(before / 2**20, 1),
        "rss_after_mb": round(after / 2**20, 1),
        "kb_per_connection": round((after - before) / count / 1024, 1),
    }


def publish(system: System, topic: str, seqs: range) -> None:
    """Publish load events ``seqs`` of topic index 0 (named ``topic``), waiting for each answer."""
    with httpx.Client(base_url=system.url, timeout=30) as http:
        if system.loadtest_system == "herald":
            body = [{"topic": topic, "data": payload(0, s, time.time_ns(), 100)} for s in seqs]
            http.post("/publish", json=body).raise_for_status()
            return
        path = f"/pub/{topic}" if system.loadtest_system == "nchan" else f"/publish?topic={topic}"
        for s in seqs:
            http.post(path, content=payload(0, s, time.time_ns(), 100)).raise_for_status()


def storm(system: System, count: int = 5000, missed: int = 100) -> dict[str, Any]:
    """``count`` subscribers miss ``missed`` events, then all reconnect at once with ``Last-Event-ID``.

    Resumed exactly means every subscriber got every missed event once, in
    order, with no ``reset``: counted by the client per subscriber.
    """
    topic = f"storm-{secrets.token_hex(3)}"
    path = subscribe_path(system.loadtest_system, [topic])
    first = 10
    with (
        system.running(),
        NativeClient([(i, system.address, path, [0]) for i in range(count)], ramp=2) as client,
    ):
        client.ready()
        publish(system, topic, range(1, first + 1))
        client.send({"cmd": "expect", "last": {"0": first}})
        client.wait_for("caught_up", 30)
        client.send({"cmd": "disconnect"})
        client.wait_for("disconnected", 30)
        publish(system, topic, range(first + 1, first + missed + 1))
        started = time.time_ns()
        client.send({"cmd": "reconnect"})
        client.send({"cmd": "expect", "last": {"0": first + missed}})
        try:
            caught = client.wait_for("caught_up", 30)
            resume_s: float | None = round((caught["at_ns"] - started) / 1e9, 3)
        except TimeoutError:
            resume_s = None  # not every subscriber got what it missed within 30 s
        result = client.finish({0: first + missed})
    subs = result["subscribers"]
    out = {
        "subscribers": count,
        "missed_each": missed,
        "resume_all_s": resume_s,
        "lost": sum(s["lost"] for s in subs),
        "duplicated": sum(s["duplicated"] for s in subs),
        "resets": sum(s["resets"] for s in subs),
        "connect_errors": result["connect_errors"],
    }
    out["exact"] = resume_s is not None and out["lost"] == out["duplicated"] == out["resets"] == 0
    print(f"  {system.name:18} storm: {out}", flush=True)
    return out
