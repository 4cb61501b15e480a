"""The bench's judgement of issue 13's target: fan-out with metrics on within 3 % of metrics off."""

from __future__ import annotations

from typing import Any

from workers.bench.render import metrics_targets
from workers.bench.scenarios import metrics_verdict


def runs(*rates: float, lost: int = 0) -> list[dict[str, Any]]:
    return [{"delivered_per_s": rate, "lost": lost} for rate in rates]


def result(off: list[dict[str, Any]], on: list[dict[str, Any]]) -> dict[str, Any]:
    return {"repeats": len(off), "fanout": {"subscribers": 1000, "mode": "closed", "off": off, "on": on}}


def test_within_three_percent_on_the_best_runs_is_met() -> None:
    judged = metrics_verdict(result(runs(1_000_000, 900_000), runs(975_000, 800_000)))
    assert judged["met"]
    assert round(judged["cost"], 3) == 0.025
    assert judged["off_median"] == 950_000


def test_more_than_three_percent_is_not_met() -> None:
    assert not metrics_verdict(result(runs(1_000_000), runs(960_000)))["met"]


def test_a_lost_event_fails_it_whatever_the_rate() -> None:
    assert not metrics_verdict(result(runs(1_000_000), runs(1_000_000, lost=1)))["met"]


def test_the_target_is_rendered_with_its_verdict() -> None:
    lines = metrics_targets({"metrics": result(runs(1_000_000), runs(990_000))})
    assert len(lines) == 1
    assert "at most 3 % lower" in lines[0]
    assert lines[0].endswith("met")
    assert metrics_targets({}) == []
