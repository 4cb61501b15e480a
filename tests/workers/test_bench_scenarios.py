"""``make bench``'s own scenarios, small, against a real node: what they report is what happened.

The figures they produce are only measured by ``make bench``; here they
run on a few hundred connections to check that the storm and idle
scenarios drive the compiled client correctly and account exactly.
"""

from __future__ import annotations

import pytest

from workers.bench import scenarios
from workers.bench.systems import Herald


@pytest.mark.timeout(90)
def test_a_reconnect_storm_resumes_every_subscriber_exactly() -> None:
    result = scenarios.storm(Herald(), count=200, missed=50)
    assert result["exact"] is True
    assert (result["lost"], result["duplicated"], result["resets"]) == (0, 0, 0)
    assert result["resume_all_s"] is not None
    assert result["connect_errors"] == {}


@pytest.mark.timeout(90)
def test_idle_connections_are_all_opened_and_their_memory_measured() -> None:
    result = scenarios.idle(Herald(), count=200)
    assert result["connected"] == 200
    assert result["connect_errors"] == {}
    assert result["rss_after_mb"] > result["rss_before_mb"] > 0
    assert 0 < result["connect_p50_ms"] <= result["connect_p99_ms"]


@pytest.mark.timeout(180)
def test_the_access_control_scenario_measures_off_and_on_side_by_side() -> None:
    result = scenarios.auth_cost(connections=200, subscribers=30, seconds=1, repeats=1)
    connects, fanout = result["connects"], result["fanout"]
    for run in connects["off"] + connects["on"]:
        assert run["connected"] == 200
        assert run["connect_errors"] == {}  # with access control on, the shared token was accepted every time
    for step in fanout["off"] + fanout["on"]:
        assert step["passed"], step
        assert step["lost"] == 0
        assert step["delivered_per_s"] > 0
        assert step["rate"] == scenarios.SATURATING_RATE
    judged = scenarios.auth_verdicts(result)
    assert judged["connects"]["off"] > 0
    assert judged["connects"]["on"] > 0
    assert judged["fanout"]["on"] > 0
    assert judged["fanout"]["off"] == fanout["off"][0]["delivered_per_s"]  # one run each: the run is the figure


@pytest.mark.timeout(90)
def test_a_reconnect_storm_with_access_control_on_carries_its_tokens() -> None:
    result = scenarios.storm(Herald(auth=True), count=100, missed=20)
    assert result["exact"] is True
    assert result["connect_errors"] == {}
