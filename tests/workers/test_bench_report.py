"""The benchmark's report (``make bench`` -> docs/benchmarks.md) is drawn from its results as measured."""

from __future__ import annotations

import shutil
from typing import Any

from workers.bench.render import per_core_targets, ratio, render, targets
from workers.bench.scenarios import best_step, bound, in_turns, kept_up, median_run, publisher_bound
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
        "throughput": {"closed": {"1000": {"steps": steps}}},
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
        "modes": {"closed": "one event per request, closed loop"},
        "systems": {"herald": _system(400_000, 50, 20.0), "nchan": _system(100_000, 100, 10.0)},
    }
    text = render(results)
    row = next(line for line in text.splitlines() if line.startswith("| delivered events/s, 1,000"))
    assert row == (
        "| delivered events/s, 1,000 subscribers, zero loss (one event per request, closed loop) "
        "| 400,000 | 100,000 | 4.00x |"
    )
    assert "| KB per idle connection (5,000) | 20.0 | 10.0 | 0.50x |" in text
    assert "| what stopped the next step, 1,000 subscribers (closed) | server | server |  |" in text
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


def test_the_per_core_targets_are_judged_against_nchan_in_the_same_run() -> None:
    herald, nchan = _system(400_000, 50, 20.0), _system(100_000, 100, 10.0)
    nchan["idle"]["connect_all_s"] = 1.2  # herald's 1.5 s is within 1.5x (1.8 s)
    lines = per_core_targets({"throughput_subscribers": [1000], "systems": {"herald": herald, "nchan": nchan}})
    assert lines == [
        "- single-event closed-loop throughput, 1,000 subscribers, at least 1.0x nchan: 400,000 vs 100,000 "
        "(4.00x): met",
        "- p99 at 5,000 subscribers and 20 events/s at most nchan's: 50.0 ms vs 100.0 ms (2.00x): met",
        "- 5,000 connects at once within 1.5x nchan's time: 1.50 s vs 1.20 s (limit 1.80 s): met",
        "- memory per idle connection at most nchan's: 20.0 KB vs 10.0 KB: **not met**",
    ]


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
    # Short of the asked rate with the server core busy: the server answered too slowly.
    assert _step(100, 1, 1, 1, published_per_s=50, server_cpu={"server": 0.95})["bound"] == "server, publishing"
    # Short of the asked rate with the server core idle: the publisher was the bound.
    assert _step(100, 1, 1, 1, published_per_s=50)["bound"] == "publisher-bound"
    assert _step(100, 1, 1, 1, publisher_cpu=0.95, server_cpu={"server": 0.95})["bound"] == "publisher-bound"
    # The server core busy with other programs (a shared machine), not the server: said so.
    noisy = _step(100, 1, 1, 1, published_per_s=50, server_core_busy=0.98, server_core_interrupts=0.1)
    assert noisy["bound"] == "server core (other programs 38%), publishing"


def test_servers_and_client_are_pinned_to_their_own_cores() -> None:
    taskset = shutil.which("taskset")
    expected = [taskset, "-c", "0", "nginx"] if taskset else ["nginx"]
    assert pinned(0, ["nginx"]) == expected


def _peer_steps(publisher_cpu: float, published_at_top: float, server_at_top: float) -> list[dict[str, Any]]:
    """A peer's ladder: two honest steps, then one at 300 events/s that kept up as far as deliveries go."""
    return [
        _step(100, 100_000, 100_000, 20, publisher_cpu=0.01, server_cpu={"server": 0.4}),
        _step(200, 200_000, 200_000, 20, publisher_cpu=0.02, server_cpu={"server": 0.7}),
        _step(300, 300_000, 300_000, 20, published_per_s=published_at_top, publisher_cpu=publisher_cpu,
              server_cpu={"server": server_at_top}),
    ]  # fmt: skip


def test_a_peers_figure_never_comes_from_a_publisher_bound_step() -> None:
    # The publisher used a full core: whatever the step delivered measured the publisher.
    busy_publisher = _peer_steps(publisher_cpu=0.97, published_at_top=300, server_at_top=0.8)
    # The publisher fell short of the asked rate while the server core had time to spare.
    slow_publisher = _peer_steps(publisher_cpu=0.3, published_at_top=200, server_at_top=0.6)
    for steps in (busy_publisher, slow_publisher):
        assert publisher_bound(steps[2])
        assert steps[2]["bound"] == "publisher-bound"
        assert not kept_up(steps[2])
        assert best_step(steps) is steps[1], "a publisher-bound step was taken as the peer's figure"
    results = {
        "throughput_subscribers": [1000],
        "modes": {"closed": "one event per request, closed loop"},
        "systems": {
            "herald": {"throughput": {"closed": {"1000": {"steps": _peer_steps(0.01, 300, 0.5)}}}},
            "nchan": {"throughput": {"closed": {"1000": {"steps": slow_publisher}}}},
        },
        "date": "-",
        "machine": "-",
    }
    text = render(results)
    assert "| delivered events/s, 1,000 subscribers, zero loss (one event per request, closed loop) " \
           "| 300,000 | 200,000 | 1.50x |" in text  # fmt: skip
    assert "| what stopped the next step, 1,000 subscribers (closed) | not reached | publisher-bound |  |" in text


def test_a_step_the_server_bounded_is_not_publisher_bound() -> None:
    # Short of the asked rate because the server core was full: the system's own limit, a legitimate stop.
    step = _step(300, 300_000, 200_000, 20, published_per_s=200, publisher_cpu=0.02, server_cpu={"server": 0.99})
    assert not publisher_bound(step)
    assert step["bound"] == "server, publishing"
    # A step that kept up with a quiet publisher counts.
    assert kept_up(_step(300, 300_000, 300_000, 20, publisher_cpu=0.05, server_cpu={"server": 0.99}))


def test_a_step_retried_on_a_noisy_machine_counts_by_its_retry() -> None:
    noisy = _step(200, 200_000, 100_000, 20, published_per_s=100, server_core_busy=1.0, retried=True)
    steps = [_step(100, 100_000, 100_000, 20), noisy, _step(200, 200_000, 200_000, 20)]
    assert best_step(steps) is steps[2]


def test_the_p99_target_is_judged_on_the_whole_run_and_the_settled_p99_shown_beside_it() -> None:
    herald, nchan = _system(400_000, 50, 5.0), _system(100_000, 45, 10.0)
    herald["latency"]["settled_p99_ms"], nchan["latency"]["settled_p99_ms"] = 35.0, 37.0
    lines = per_core_targets({"throughput_subscribers": [], "systems": {"herald": herald, "nchan": nchan}})
    assert lines[:2] == [
        "- p99 at 5,000 subscribers and 20 events/s at most nchan's: 50.0 ms vs 45.0 ms (0.90x): **not met**",
        "  - the same after the first second (fresh connections warmed up): 35.0 ms vs 37.0 ms (1.06x)",
    ]


def test_systems_take_turns_and_the_median_run_counts_with_every_run_listed() -> None:
    order: list[str] = []

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

    figures = {"a": iter([30.0, 10.0, 20.0]), "b": iter([5.0, 6.0, 7.0])}

    def measure(system: Any) -> dict[str, Any]:
        order.append(system.name)
        return {"p99_ms": next(figures[system.name]), "p50_ms": 1.0}

    runs = in_turns([Named("a"), Named("b")], 3, measure)  # type: ignore[list-item]
    assert order == ["a", "b", "b", "a", "a", "b"]
    chosen = median_run(runs["a"], "p99_ms", "p50_ms")
    assert chosen["p99_ms"] == 20.0
    assert chosen["runs"] == {"p99_ms": [30.0, 10.0, 20.0], "p50_ms": [1.0, 1.0, 1.0]}
    assert median_run([{"x": 2}, {"x": 1}], "x")["x"] == 1  # an even count: the lower middle run
