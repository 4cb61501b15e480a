"""``make bench``: Herald and its peers under the same load client and scenarios, side by side.

Each system runs pinned to core 0 (``taskset``); the load client (Herald's
own load tool, ``workers.loadtest``) runs pinned to core 1. Every scenario
runs on every system in the same invocation, so the ratios compare figures
measured minutes apart on the same machine. Results are printed and written
to ``docs/benchmarks.md`` (regenerated here, never typed).

Scenarios:

* **throughput**: N subscribers on one topic, 100-byte events, rising publish
  rate; the best step with zero loss whose deliveries kept up (at least 95 %
  of the offered events/s) is the system's figure.
* **latency**: 5,000 subscribers, 20 events/s: p99 publish -> deliver.
* **idle**: 5,000 idle SSE connections: RSS growth per connection, and the
  time for all 5,000 to connect at once.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from workers.bench.systems import CLIENT_CORE, ROOT, SERVER_CORE, System, all_systems, pinned, rss_bytes
from workers.loadtest.config import subscribe_path
from workers.loadtest.histogram import Histogram
from workers.loadtest.subscriber import Recorder, Subscriber

DOC = ROOT / "docs" / "benchmarks.md"


def loadtest(system: System, args: list[str]) -> dict[str, Any]:
    """One run of the load tool on the client core; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "workers.loadtest", "--quiet", "--system", system.loadtest_system,
                   "--target", system.url, "--json", str(out), "--payload", "100", "--drain", "5", *args]  # fmt: skip
        subprocess.run(pinned(CLIENT_CORE, command), cwd=ROOT, capture_output=True, timeout=600)
        result: dict[str, Any] = json.loads(out.read_text())
        return result


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


def throughput(system: System, subscribers: int, rates: list[float], seconds: float) -> dict[str, Any]:
    """Rising rates until one loses events or falls behind (:func:`best_step` picks the figure)."""
    steps = []
    for rate in rates:
        with system.running():
            r = loadtest(system, ["--subscribers", str(subscribers), "--rate", str(rate), "--duration",
                                  str(seconds), "--ramp", "2", "--publishers", "1"])  # fmt: skip
        offered = rate * subscribers
        step = {
            "rate": rate,
            "offered_per_s": offered,
            "delivered_per_s": round(r["delivery"]["per_second"]),
            "published_per_s": r["publish"]["rate"],
            "lost": r["delivery"]["lost"],
            "p99_ms": r["latency_ms"]["p99"],
            "client_cpu_max": max(w["max"] for w in r["tool"]["worker_cpu"]),
            "passed": r["verdict"]["pass"],
        }
        step["ok"] = kept_up(step)
        steps.append(step)
        print(f"  {system.name:14} {subscribers:>5} subs {rate:>6g} ev/s: {step}", flush=True)
        if not step["ok"]:
            break
    return {"steps": steps}


async def _idle_connections(system: System, count: int) -> dict[str, Any]:
    recorder = Recorder()
    path = subscribe_path(system.loadtest_system, ["idle"])
    subs = [Subscriber(i, f"127.0.0.1:{system.port}", path, [0], recorder) for i in range(count)]
    ready = asyncio.Event()
    opened = 0

    def one() -> None:
        nonlocal opened
        opened += 1
        if opened == count:
            ready.set()

    before = rss_bytes(system.server_pids())
    started = time.monotonic()
    tasks = [asyncio.create_task(s.run(one)) for s in subs]
    try:
        await asyncio.wait_for(ready.wait(), 60)
        connect_seconds = time.monotonic() - started
        await asyncio.sleep(2)  # let the server settle its buffers before reading its memory
        after = rss_bytes(system.server_pids())
    finally:
        for s in subs:
            s.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    connect: Histogram = recorder.connect_time
    return {
        "connections": count,
        "connect_all_s": round(connect_seconds, 3),
        "connect_p99_ms": connect.percentile(99) / 1000,
        "rss_before_mb": round(before / 2**20, 1),
        "rss_after_mb": round(after / 2**20, 1),
        "kb_per_connection": round((after - before) / count / 1024, 1),
    }


def idle(system: System, count: int) -> dict[str, Any]:
    os.sched_setaffinity(0, {CLIENT_CORE})
    with system.running():
        return asyncio.run(_idle_connections(system, count))


def ratio(a: float | None, b: float | None, higher_is_better: bool = True) -> str:
    if not a or not b:
        return "-"
    return f"{(a / b if higher_is_better else b / a):.2f}x"


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} cores ({model}), {system}, Python {platform.python_version()}"


def render(results: dict[str, Any]) -> str:
    names = list(results["systems"])
    peers = [n for n in names if not n.startswith("herald")]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` on {results['date']}: {results['machine']}.",
        f"Each server pinned to core {SERVER_CORE}, the load client (`workers.loadtest`) to core {CLIENT_CORE};",
        "100-byte events; the publisher waits for each response. Ratios are Herald (embedded broker) / peer:",
        "above 1.00x Herald is better. `herald-redis` is the same node on the Redis broker",
        "(Redis on the client's core).",
        "",
        "The load client is Python. In the steps below, `client_cpu_max` near 1.0 means the client, not the server,",
        "set that figure: nchan writes once per event per socket, so its client has the most reads to do.",
        "",
    ]
    header = "| figure | " + " | ".join(names) + " | " + " | ".join(f"herald vs {p}" for p in peers) + " |"
    lines += [header, "|" + "---|" * (1 + len(names) + len(peers))]

    def row(label: str, values: dict[str, float | None], higher: bool, unit: str) -> None:
        cells = [f"{values[n]:,.1f}{unit}" if values.get(n) is not None else "-" for n in names]
        ratios = [ratio(values.get("herald"), values.get(p), higher) for p in peers]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")

    for subs in results["throughput_subscribers"]:
        best = {n: (best_step(results["systems"][n]["throughput"][str(subs)]["steps"]) or {}) for n in names}
        delivered = {n: b.get("delivered_per_s") for n, b in best.items()}
        row(f"delivered events/s, {subs:,} subscribers, zero loss", delivered, True, "")
        row(f"p99 ms at that rate, {subs:,} subscribers", {n: b.get("p99_ms") for n, b in best.items()}, False, "")
    lat = {n: results["systems"][n].get("latency") for n in names}
    row("p99 ms, 5,000 subscribers, 20 events/s", {n: (v or {}).get("p99_ms") for n, v in lat.items()}, False, "")
    idle_ = {n: results["systems"][n].get("idle") for n in names}
    row("KB per idle connection", {n: (v or {}).get("kb_per_connection") for n, v in idle_.items()}, False, "")
    row("seconds for 5,000 connects", {n: (v or {}).get("connect_all_s") for n, v in idle_.items()}, False, "")
    lines += ["", "## Steps", "", "Every step of every throughput run (rate = events/s published to the topic):", ""]
    for n in names:
        for subs, run in results["systems"][n]["throughput"].items():
            for step in run["steps"]:
                lines.append(f"- {n}, {subs} subscribers: {json.dumps({**step, 'ok': kept_up(step)})}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="herald,nchan,sse-starlette,herald-redis")
    parser.add_argument("--seconds", type=float, default=5.0, help="publishing time of each throughput step")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller steps (a smoke run)")
    parser.add_argument(
        "--render", type=Path, metavar="RESULTS_JSON", help="only redraw docs/benchmarks.md from saved results"
    )
    args = parser.parse_args(argv)
    if args.render:
        DOC.write_text(render(json.loads(args.render.read_text())))
        print(f"written to {DOC}")
        return
    wanted = args.systems.split(",")
    systems = [s for s in all_systems() if s.name in wanted]
    plan = {
        1000: [10.0, 25.0, 50.0, 100.0, 150.0, 200.0, 300.0, 400.0, 600.0, 800.0],
        5000: [2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 80.0],
    }
    if args.quick:
        plan = {200: [20.0, 40.0]}
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "throughput_subscribers": list(plan),
        "systems": {},
    }
    for system in systems:
        print(f"== {system.name}", flush=True)
        entry: dict[str, Any] = {"throughput": {}}
        for subs, rates in plan.items():
            entry["throughput"][str(subs)] = throughput(system, subs, rates, args.seconds)
        if not args.quick:
            with system.running():
                r = loadtest(system, ["--subscribers", "5000", "--rate", "20", "--duration", "10", "--ramp", "3",
                                      "--publishers", "1"])  # fmt: skip
            entry["latency"] = {"p99_ms": r["latency_ms"]["p99"], "p50_ms": r["latency_ms"]["p50"],
                                "lost": r["delivery"]["lost"]}  # fmt: skip
            entry["idle"] = idle(system, 5000)
            print(f"  latency {entry['latency']}  idle {entry['idle']}", flush=True)
        results["systems"][system.name] = entry
    text = render(results)
    print(text)
    if not args.quick:
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
        (ROOT / ".run" / "bench" / "results.json").write_text(json.dumps(results, indent=1))
        print(f"written to {DOC}")


if __name__ == "__main__":
    main()
