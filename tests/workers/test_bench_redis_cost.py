"""The redis-cost scenario: Redis's CPU per published event, Herald's and the minimal script's, both ways.

A short real run (redis-server, a node, the compiled publisher) checks the
scenario measures what it says; the figures themselves are ``make bench``'s,
never asserted here.
"""

from __future__ import annotations

import pytest

from tests.redis_server import needs_redis
from workers.bench import redis_cost

pytestmark = needs_redis


@pytest.mark.timeout(240)
def test_both_workloads_are_measured_both_ways_side_by_side() -> None:
    result = redis_cost.redis_cost(events=400, seconds=1.0, repeats=2, workloads={"hot": 1, "topics": 50})
    assert set(result) == {"hot", "topics"}
    for row in result.values():
        for way in ("capacity", "http"):
            figures = row[way]
            assert len(figures["herald_runs_us"]) == len(figures["minimal_runs_us"]) == 2
            assert all(us > 0 for us in figures["herald_runs_us"] + figures["minimal_runs_us"])
            assert figures["ratio"] > 0
        assert row["http"]["events_per_s"] > 0  # the node accepted what the publisher sent
        assert len(row["per_feed_delivery_runs_us"]) == 2  # every feed had every event (else it raised)
    page = redis_cost.page(result, "today", "this machine")
    assert page.count("| at capacity |") == 2
    assert page.count("| one node, HTTP |") == 2
    assert "**Each node feed**" in page


def test_a_ratio_over_the_target_is_missed() -> None:
    def figures(ratio: float) -> dict[str, object]:
        return {
            "herald_us": 30.0 * ratio,
            "minimal_us": 30.0,
            "ratio": ratio,
            "events_per_core_s": 1,
            "events_per_s": 1,
        }

    result = {
        "hot": {"capacity": figures(2.5), "http": figures(3.0)},
        "topics": {"capacity": figures(1.5), "http": figures(1.0)},
    }
    lines = redis_cost.verdicts(result)
    assert "**missed**" in next(line for line in lines if "one hot topic" in line and "at capacity" in line)
    assert "met" in next(line for line in lines if "10,000 topics" in line and "at capacity" in line)
