"""``make bench``: Herald and its peers under the same load client and scenarios, side by side.

Each system runs pinned to core 0 (``taskset``); the load client (Herald's
load tool with its compiled subscriber worker, ``--client native``, and its
compiled publisher, ``--publisher native``) runs pinned to core 1. Every
system gets the same work in the headline rows: one event per publish
request, in a closed loop and pipelined; Herald's batches get rows of
their own. A full run takes about 25 minutes on 2 cores; ``--quick``
about 3 (and writes nothing). Every scenario runs on every system in the same invocation, so the
ratios compare figures measured minutes apart on the same machine; the two whose single runs are
noisiest (latency at 20 events/s, and idle connections: connect time and memory) run three times for
each system, the systems taking turns, and the median run counts. Results
are printed and written to ``docs/benchmarks.md`` (regenerated here, never
typed) and ``.run/bench/results.json``.

The scenarios are in :mod:`workers.bench.scenarios`; the multi-node one
runs ``ops.cluster`` (Redis, nodes, nginx, all on the server core) with 1
node and with 2; the auth one measures Herald with access control off and
on side by side (5,000 connects at once, fan-out throughput), judged
within 10 %; the mercure one measures the same node's fan-out through its
Mercure hub (``/.well-known/mercure``) and through the native API side by
side (alternated rounds, medians and the median ratio), and the idle memory
per connection of each; the redis-cost one measures Redis's own CPU per
published event, Herald's against a minimal script's in the same run
(:mod:`workers.bench.redis_cost`); the front one measures what the front's guards against gray failures
cost, the stream probe per open (nginx with and without it) and the heartbeat per idle stream
(:mod:`workers.bench.front`, docs/benchmarks-front.md); the latency-at-rate one measures Herald and nchan
at three moderate loads, p50, p99 and core time per delivery (:mod:`workers.bench.latency_at_rate`,
docs/benchmarks-latency.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any, Protocol

from workers.bench import baseline, front, latency_at_rate, partitions, redis_cost, scenarios
from workers.bench.render import render
from workers.bench.systems import ROOT, HeraldCluster, HeraldWorkers, all_systems

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / ".run" / "bench" / "results.json"
SCENARIOS = (
    "throughput", "latency", "many-topics", "idle", "storm", "multi-node", "cores", "auth", "metrics", "mercure",
    "redis-cost", "partitions", "front", "latency-at-rate",
)  # fmt: skip
PLAN = {
    1000: [25.0, 50.0, 100.0, 150.0, 200.0, 300.0, 400.0, 600.0, 800.0, 1200.0, 1600.0, 2400.0, 3200.0],
    5000: [5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 80.0, 120.0, 160.0, 240.0, 320.0, 480.0],
}
"""Events/s per subscriber count: steps about 1.5x apart, up to well past what any system here reaches
(nchan's real capacity, about 300 events/s to 1,000 subscribers, is inside the 1,000 ladder)."""
QUICK_PLAN = {1000: [100.0, 300.0]}
CORES_PLAN = [400.0, 800.0, 1200.0, 1600.0, 2400.0, 3200.0, 4800.0]
"""Events/s to 1,000 subscribers of one node on 1 and on 2 cores (HERALD_WORKERS), for the cores scenario."""
CLUSTER_PLAN = [5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 80.0]
"""Events/s to 5,000 subscribers through nginx, for the multi-node scenario."""


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} cores ({model}), {system}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="herald,nchan,sse-starlette,herald-redis")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="a comma-separated subset of: %(default)s")
    parser.add_argument("--seconds", type=float, default=5.0, help="publishing time of each throughput step")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of a few minutes: 1,000 subscribers at 100 and 300 events/s, 3 s steps, 500 idle and "
        "storm connections, access control off vs on once each; no files written",
    )
    parser.add_argument(
        "--modes",
        default=",".join(m.key for m in scenarios.MODES),
        help="publishing modes of the throughput scenario, a subset of: %(default)s",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="only compare this checkout's Herald with commit REF's, side by side (docs/benchmarks-baseline.md)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side per figure, with --baseline")
    parser.add_argument(
        "--figures",
        help="with --baseline: only these figures (comma-separated keys of workers.bench.baseline.FIGURES), each"
        " measured --repeats times; written to .run/bench/baseline-figures.json, not to docs",
    )
    parser.add_argument(
        "--render", type=Path, metavar="RESULTS_JSON", help="only redraw docs/benchmarks.md from saved results"
    )
    args = parser.parse_args(argv)
    if args.render:
        DOC.write_text(render(json.loads(args.render.read_text())))
        print(f"written to {DOC}")
        return
    if args.baseline:
        only = set(args.figures.split(",")) if args.figures else None
        if only and only - {key for key, _, _ in baseline.FIGURES}:
            parser.error(f"unknown figures: {', '.join(sorted(only - {k for k, _, _ in baseline.FIGURES}))}")
        result = baseline.compare(args.baseline, args.repeats, args.seconds, args.quick, only)
        result["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        result["machine"] = machine()
        for row in baseline.verdicts(result):
            print(f"  {row['label']}: {row['before']:,.3f} -> {row['after']:,.3f} ({row['ratio']:.3f})", flush=True)
        if only:
            baseline.RESULTS.with_name("baseline-figures.json").write_text(json.dumps(result, indent=2))
        elif not args.quick:
            baseline.save(result)
        return
    wanted = args.systems.split(",")
    chosen = args.scenarios.split(",")
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    modes = args.modes.split(",")
    unknown = set(modes) - {m.key for m in scenarios.MODES}
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    systems = [s for s in all_systems() if s.name in wanted]
    partial = set(chosen) != set(SCENARIOS)
    plan, cluster_plan = (PLAN, CLUSTER_PLAN) if not args.quick else (QUICK_PLAN, [5.0])
    seconds = args.seconds if not args.quick else min(args.seconds, 3.0)
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "throughput_subscribers": list(plan) if "throughput" in chosen else [],
        "modes": {m.key: m.label for m in scenarios.MODES if m.key in modes},
        "systems": {},
    }
    for system in systems:
        print(f"== {system.name}", flush=True)
        entry: dict[str, Any] = {"throughput": {}}
        if "throughput" in chosen:
            for mode in scenarios.modes_for(system):
                if mode.key not in modes:
                    continue
                entry["throughput"][mode.key] = {
                    str(subs): scenarios.throughput(system, subs, rates, seconds, mode) for subs, rates in plan.items()
                }
                save(results | {"systems": results["systems"] | {system.name: entry}}, args.quick, partial)
        if "many-topics" in chosen:
            entry["many_topics"] = scenarios.many_topics(system)
        if "storm" in chosen:
            entry["storm"] = scenarios.storm(system, 500 if args.quick else 5000)
        results["systems"][system.name] = entry
        save(results, args.quick, partial)  # what is measured is kept, whatever happens later
    # The figures one run leaves to chance: every system several times, taking turns; the median run counts.
    turns = 1 if args.quick else scenarios.TURNS
    if "latency" in chosen:
        print(f"== latency, {turns} run(s) of each system in turns", flush=True)
        for name, runs in scenarios.in_turns(systems, turns, scenarios.latency).items():
            results["systems"][name]["latency"] = scenarios.median_run(runs, "p99_ms", "settled_p99_ms", "p50_ms")
        save(results, args.quick, partial)
    if "idle" in chosen:
        print(f"== idle connections, {turns} run(s) of each system in turns", flush=True)
        count = 500 if args.quick else 5000
        for name, runs in scenarios.in_turns(systems, turns, lambda system: scenarios.idle(system, count)).items():
            results["systems"][name]["idle"] = scenarios.median_run(runs, "connect_all_s", "kb_per_connection")
            print(f"  {name} idle {results['systems'][name]['idle']}", flush=True)
        save(results, args.quick, partial)
    if "multi-node" in chosen:
        print("== multi-node (redis + nodes + nginx)", flush=True)
        results["cluster"] = {
            str(nodes): scenarios.throughput(HeraldCluster(nodes), 5000, cluster_plan, seconds) for nodes in (1, 2)
        }
    if "cores" in chosen:
        print("== one node on 1 and on 2 cores (HERALD_WORKERS, Redis broker)", flush=True)
        rates = CORES_PLAN if not args.quick else CORES_PLAN[:2]
        results["cores"] = {
            str(workers): scenarios.throughput(HeraldWorkers(workers), 1000, rates, seconds) for workers in (1, 2)
        }
        save(results, args.quick, partial)
    if "auth" in chosen:
        print("== access control off vs on (one node, embedded broker)", flush=True)
        results["auth"] = (
            scenarios.auth_cost(seconds=seconds)
            if not args.quick
            else scenarios.auth_cost(connections=500, seconds=seconds, repeats=1)
        )
        save(results, args.quick, partial)
    if "metrics" in chosen:
        print("== metrics off vs on (one node, embedded broker)", flush=True)
        results["metrics"] = scenarios.metrics_cost(seconds=seconds, repeats=5 if not args.quick else 1)
        save(results, args.quick, partial)
    if "mercure" in chosen:
        print("== Mercure hub vs native API (one node, embedded broker)", flush=True)
        results["mercure"] = (
            scenarios.mercure_cost(seconds=seconds)
            if not args.quick
            else scenarios.mercure_cost(seconds=seconds, repeats=1, idle_connections=500, idle_repeats=1)
        )
        save(results, args.quick, partial)
    if "redis-cost" in chosen:
        print("== Redis CPU per published event: Herald vs a minimal script (one node, Redis broker)", flush=True)
        measured = redis_cost.redis_cost() if not args.quick else redis_cost.redis_cost(events=5000, repeats=1)
        paged(results, "redis_cost", measured, redis_cost, args.quick, partial)
    if "partitions" in chosen:
        print("== A Redis Cluster, and topics over partitions: node and Redis CPU per event", flush=True)
        measured = (
            partitions.partitions_cost() if not args.quick else partitions.partitions_cost(events=3000, repeats=1)
        )
        paged(results, "partitions", measured, partitions, args.quick, partial)
    if "front" in chosen:
        print("== The front's stream probe per open, and the heartbeat per idle stream (one node, Redis)", flush=True)
        measured = front.front_cost() if not args.quick else front.front_cost(**front.QUICK)
        print("\n".join(front.section(measured)), flush=True)
        paged(results, "front", measured, front, args.quick, partial)
    if "latency-at-rate" in chosen:
        print("== latency at moderate rates: Herald and nchan in turns", flush=True)
        at_rate = [s for s in systems if s.name in ("herald", "nchan")]
        measured = (
            latency_at_rate.measure(systems=at_rate)
            if not args.quick
            else latency_at_rate.measure(latency_at_rate.QUICK_LOADS, turns=1, seconds=3.0, systems=at_rate)
        )
        print("\n".join(latency_at_rate.section(measured)), flush=True)
        paged(results, "latency_at_rate", measured, latency_at_rate, args.quick, partial)
    print(render(results))
    save(results, args.quick, partial)
    if partial and not args.quick:
        print(f"some scenarios only: {DOC} (the last full run's) left as it was; results in {RESULTS.parent}")
    elif not args.quick:
        print(f"written to {DOC} and {RESULTS}")


class PagedScenario(Protocol):
    """A scenario module with a page of its own (``DOC``, written by ``page``) besides its section here."""

    DOC: Path

    def page(self, result: dict[str, Any], date: str, machine: str) -> str: ...


def paged(
    results: dict[str, Any], key: str, measured: dict[str, Any], scenario: PagedScenario, quick: bool, partial: bool
) -> None:
    """Keep a scenario's figures, save, and (not for a --quick smoke run) write its own page."""
    results[key] = measured
    save(results, quick, partial)
    if not quick:
        scenario.DOC.write_text(scenario.page(measured, results["date"], results["machine"]))
        print(f"written to {scenario.DOC}", flush=True)


def save(results: dict[str, Any], quick: bool, partial: bool = False) -> None:
    """Write the results so far and the page drawn from them (not for a --quick smoke run).

    A run of some scenarios only (``partial``) keeps its results apart (``results-partial.json``) and leaves
    ``docs/benchmarks.md``, the page of the last full run, alone.
    """
    if quick:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if partial:
        RESULTS.with_name("results-partial.json").write_text(json.dumps(results, indent=1))
        return
    RESULTS.write_text(json.dumps(results, indent=1))
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(results))


if __name__ == "__main__":
    main()
