"""The benchmark's report (``make bench`` -> docs/benchmarks.md) is drawn from its results as measured."""

from __future__ import annotations

import shutil
from typing import Any

from workers.bench.render import ratio, render, targets
from workers.bench.scenarios import best_step, bound, kept_up
from workers.bench.systems import pinned


def _step(rate: float, offered: float, delivered: float, p99: float, lost: int = 0, **extra: Any) -> dict[str, Any]:
    step = {"rate": rate, "offered_per_s": offered, "delivered_per_s": delivered, "published_per_s": rate,
            "lost": lost, "p99_ms": p99, "client_cpu_max": 0.3, "server_cpu": {"server": 0.5}}  # fmt: skip
    step.update(extra)
    step["bound"] = bound(step)
    return step


def _system(delivered: int, p99: float, idle_kb: float) -> dict[str, Any]:
    steps = [
        _step(100, delivered, delivered, p99),
        _step(200, 2 * delivered, delivered, 10 * p99, server_cpu={"server": 0.99}),
    ]
    return {
        "throughput": {"1000": {"steps": steps}},
        "latency": {"p99_ms": p99, "p50_ms": p99 / 2, "lost": 0},
        "idle": {"kb_per_connection": idle_kb, "connect_all_s": 1.5},
    }


def test_ratios_say_how_many_times_better_herald_is() -> None:
    assert ratio(300.0, 100.0) == "3.00x"
    assert ratio(10.0, 40.0, higher_is_better=False) == "4.00x"  # a lower latency is better
    assert ratio(None, 100.0) == "-"


def test_the_table_puts_every_system_side_by_side_with_its_ratio() -> None:
    results = {
        "date": "2026-11-24 12:00 UTC",
        "machine": "2 cores (test)",
        "throughput_subscribers": [1000],
        "systems": {"herald": _system(400_000, 50, 20.0), "nchan": _system(100_000, 100, 10.0)},
    }
    text = render(results)
    row = next(line for line in text.splitlines() if line.startswith("| delivered events/s, 1,000"))
    assert row == "| delivered events/s, 1,000 subscribers, zero loss | 400,000 | 100,000 | 4.00x |"
    assert "| KB per idle connection (5,000) | 20.0 | 10.0 | 0.50x |" in text
    assert "| what stopped the next step, 1,000 subscribers | server | server |  |" in text
    assert "2 cores (test)" in text


def test_each_target_is_judged_from_the_measured_figures() -> None:
    results = {
        "throughput_subscribers": [1000],
        "systems": {"herald": _system(400_000, 50, 20.0), "nchan": _system(100_000, 100, 10.0)},
    }
    lines = targets(results)
    assert any(line.startswith("- p99 at 5,000 subscribers") and line.endswith(": met") for line in lines)
    assert any(line.startswith("- at most 20 KB") and line.endswith(": met") for line in lines)
    assert any(line.startswith("- 5,000 connects within 1 s: 1.50 s") and "not met" in line for line in lines)


def test_a_step_that_fell_behind_or_lost_events_does_not_count() -> None:
    steps = [_step(100, 1000, 1000, 5), _step(200, 2000, 1990, 6), _step(400, 4000, 3000, 9), _step(800, 8000, 8000, 9)]
    assert best_step(steps) == steps[1]  # 3,000 of 4,000 offered: behind; what follows is not looked at
    assert not kept_up(_step(100, 1000, 1000, 5, lost=1))
    assert best_step([_step(100, 1000, 10, 5)]) is None


def test_a_step_names_what_was_saturated() -> None:
    assert _step(100, 1, 1, 1)["bound"] == "none"
    assert _step(100, 1, 1, 1, server_cpu={"node-0": 0.5, "nginx": 0.95})["bound"] == "nginx"
    assert _step(100, 1, 1, 1, server_cpu={"node-0": 0.5, "nginx": 0.45})["bound"] == "server core"
    # Redis on the client's core does not add to the node's.
    on_two_cores = _step(100, 1, 1, 1, server_cpu={"node": 0.85, "redis": 0.09}, core_components=["node"])
    assert on_two_cores["bound"] == "none"
    assert _step(100, 1, 1, 1, client_cpu_max=0.97)["bound"] == "client"
    assert _step(100, 1, 1, 1, published_per_s=50)["bound"] == "publishing"


def test_servers_and_client_are_pinned_to_their_own_cores() -> None:
    taskset = shutil.which("taskset")
    expected = [taskset, "-c", "0", "nginx"] if taskset else ["nginx"]
    assert pinned(0, ["nginx"]) == expected
