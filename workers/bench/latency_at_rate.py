"""The latency-at-rate scenario: what a subscriber waits, and what a delivery costs, at moderate rates.

Saturation figures say how much a server can deliver; a push service spends
most of its life far below that, where nothing piles up to be coalesced and
every delivery is its own write. Three loads, each one topic, one event per
publish request (the publisher waiting for each answer, paced), 100-byte
events, the server on core 0 and the load tool (its compiled subscriber and
publisher) on core 1:

* 1,000 subscribers at 100 events/s (100,000 deliveries/s),
* 5,000 subscribers at 20 events/s,
* 15,000 subscribers at 5 events/s.

For each, Herald (embedded broker) and nchan take turns, :data:`TURNS` runs
each (A-B, B-A, A-B), and the medians count: p50 and p99 from the publisher's
send to the client's receipt of every event, the server core's busy share
over the publishing window, and the core time per delivery (busy seconds /
deliveries). Run it as ``python -m workers.bench --scenarios latency-at-rate``.
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path
from typing import Any

from workers.bench import scenarios
from workers.bench.systems import Herald, Nchan, System

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks-latency.md"
"""Where a run of this scenario writes its figures."""

LOADS = ((1000, 100.0), (5000, 20.0), (15000, 5.0))
"""(subscribers, events/s): the three moderate loads."""
QUICK_LOADS = ((1000, 100.0),)
TURNS = 3
SECONDS = 15.0
"""Publishing window of one run, seconds."""


def one_run(system: System, subscribers: int, rate: float, seconds: float) -> dict[str, Any]:
    """One load-tool run on a fresh start of ``system``: its latency, core share and core time per delivery."""
    ramp = max(3.0, subscribers / 2500)  # 15,000 connections take a few seconds to open
    step = scenarios._step(
        system, subscribers, rate, ["--duration", str(seconds), "--ramp", f"{ramp:g}", "--publishers", "1"]
    )
    delivered = step["delivered_per_s"]
    busy = step["server_core_busy"]
    return {
        "p50_ms": step["p50_ms"],
        "p99_ms": step["p99_ms"],
        "core_busy": busy,
        "us_per_delivery": round(busy / delivered * 1e6, 2) if delivered else None,
        "delivered_per_s": delivered,
        "lost": step["lost"],
        "ok": step["ok"],
    }


def measure(
    loads: tuple[tuple[int, float], ...] = LOADS,
    turns: int = TURNS,
    seconds: float = SECONDS,
    systems: list[System] | None = None,
) -> dict[str, Any]:
    """Every load, the systems in turns; each figure's runs and median, and Herald / nchan of the medians."""
    systems = systems or [Herald(), Nchan()]
    result: dict[str, Any] = {"turns": turns, "seconds": seconds, "loads": []}
    for subscribers, rate in loads:
        print(f"== latency at rate: {subscribers:,} subscribers, {rate:g} events/s", flush=True)
        runs = scenarios.in_turns(
            systems, turns, functools.partial(one_run, subscribers=subscribers, rate=rate, seconds=seconds)
        )
        entry: dict[str, Any] = {"subscribers": subscribers, "rate": rate, "systems": {}}
        for name, measured in runs.items():
            figures: dict[str, Any] = {"runs": measured}
            for key in ("p50_ms", "p99_ms", "core_busy", "us_per_delivery"):
                values = [run[key] for run in measured if run[key] is not None]
                figures[key] = statistics.median(values) if values else None
            figures["lost"] = sum(run["lost"] for run in measured)
            entry["systems"][name] = figures
            print(f"  {name}: {figures}", flush=True)
        result["loads"].append(entry)
    return result


def _ratio(entry: dict[str, Any], key: str) -> str:
    herald, nchan = entry["systems"].get("herald", {}).get(key), entry["systems"].get("nchan", {}).get(key)
    return f"**{herald / nchan:.2f}**" if herald and nchan else "-"


def _runs(figures: dict[str, Any], key: str, unit: str, scale: float = 1.0) -> str:
    values = [run[key] for run in figures["runs"]]
    shown = " / ".join("-" if v is None else f"{v * scale:.1f}" for v in values)
    return f"{shown} {unit}"


def section(result: dict[str, Any]) -> list[str]:
    """The table: each load's figures, every run and the ratio of the medians (Herald / nchan: below 1.00
    Herald is ahead)."""
    lines = [
        "| load | figure | herald (runs) | nchan (runs) | herald / nchan (medians) |",
        "|---|---|---|---|---|",
    ]
    rows = (
        ("p50 publish→deliver", "p50_ms", "ms", 1.0),
        ("p99", "p99_ms", "ms", 1.0),
        ("server core busy", "core_busy", "%", 100.0),
        ("core time per delivery", "us_per_delivery", "µs", 1.0),
    )
    for entry in result["loads"]:
        load = f"{entry['subscribers']:,} subscribers, {entry['rate']:g} events/s"
        herald, nchan = entry["systems"].get("herald"), entry["systems"].get("nchan")
        for i, (label, key, unit, scale) in enumerate(rows):
            lines.append(
                f"| {load if i == 0 else ''} | {label} | {_runs(herald, key, unit, scale) if herald else '-'} | "
                f"{_runs(nchan, key, unit, scale) if nchan else '-'} | {_ratio(entry, key)} |"
            )
    return lines


def page(result: dict[str, Any], date: str, machine: str) -> str:
    """docs/benchmarks-latency.md: what is measured, how to rerun it, the table."""
    return "\n".join(
        [
            "# Latency at moderate rates: Herald and nchan side by side",
            "",
            f"Generated by `python -m workers.bench --scenarios latency-at-rate` (also part of `make bench`) on "
            f"{date}: {machine}.",
            "",
            "One topic, one event per publish request (the publisher waits for each answer, paced at the rate), "
            "100-byte events; the server pinned to core 0, the load tool (compiled subscriber and publisher) to "
            f"core 1. Each system runs {result['turns']} times per load, the systems taking turns; every run's "
            f"figure is listed and the median counts. Publishing window: {result['seconds']:g} s per run. Latency "
            "is from the publisher's send to the subscriber's receipt, of every event by every subscriber; core "
            "time per delivery is the server core's busy time over the window divided by the deliveries. Herald "
            "runs on its embedded broker (`make run`'s default without Redis).",
            "",
            *section(result),
            "",
            "Below 1.00 Herald is ahead. Saturation figures (most deliveries per second kept up) are in "
            "[benchmarks.md](benchmarks.md).",
            "",
        ]
    )
