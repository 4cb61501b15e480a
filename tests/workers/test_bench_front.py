"""The front scenario: the stream probe's cost per open (nginx with and without it) and the heartbeat's per idle
stream.

A tiny real run (redis-server, nodes, two nginx) checks the scenario measures what it says; the figures
themselves are ``make bench``'s, never asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.launch import NGINX
from ops.nginx import render_local
from tests.redis_server import needs_redis
from workers.bench import front

pytestmark = [needs_redis, pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")]


def test_without_the_probe_only_the_auth_request_lines_are_gone() -> None:
    text = render_local(8080, [8000], Path("/tmp/run"))
    stripped = front.without_probe(text)
    removed = [line for line in text.splitlines() if line not in stripped.splitlines()]
    assert len(removed) == 2  # /events and the Mercure hub's streams
    assert all(line.strip().startswith("auth_request /_herald/probe;") for line in removed)


@pytest.mark.timeout(60)
def test_both_fronts_and_every_heartbeat_are_measured() -> None:
    result = front.front_cost(
        opens=50, concurrency=10, streams=200, heartbeats=(0.5, 0.25), window=0.5, repeats=1, settle=0.1
    )
    probe = result["probe"]
    for side in ("with", "without"):
        row = probe[side]
        assert row["opens_counted"] == 50  # every open reached a node's stream (not nginx's own answer)
        assert len(row["turns"]) == 1
        assert row["opens_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["node_cpu_s_per_1000"] >= 0
        assert row["nginx_cpu_s_per_1000"] >= 0
    assert set(probe["ratios"]) == set(front.PROBE_FIGURES)

    beat = result["heartbeat"]
    assert beat["baseline"] == 0.5
    assert list(beat["rows"]) == ["0.5", "0.25"]
    for row in beat["rows"].values():
        assert row["lost"] == 0  # every idle stream stayed open through the window
        assert row["heartbeats"] > 0  # counted by the client
        assert row["cpu_percent"] >= 0
        assert row["us_per_heartbeat"] >= 0
        assert row["bytes_per_stream_per_min"] > 0
    assert beat["rows"]["0.5"]["extra_us_per_heartbeat"] is None  # the baseline
    assert beat["rows"]["0.25"]["extra_us_per_heartbeat"] is not None

    page = front.page(result, "today", "this machine")
    assert "| with the probe (shipped) |" in page
    assert "| without the probe |" in page
    assert "| 0.25 s |" in page
