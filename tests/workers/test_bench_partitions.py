"""The partitions scenario: a node's feed and its Redis, per event, on one Redis and on a cluster with 1 and 3
partitions.

A short real run (redis-server, a local Redis Cluster, the producer process) checks the scenario measures what it
says; the figures themselves are ``make bench``'s, never asserted here.
"""

from __future__ import annotations

import pytest

from tests.redis_server import needs_redis, shared_cluster
from workers.bench import partitions

pytestmark = needs_redis


@pytest.mark.timeout(240)
def test_every_deployment_is_measured_in_turns_and_the_cursor_is_the_partitions_id() -> None:
    result = partitions.partitions_cost(events=600, repeats=1, cluster=shared_cluster())
    assert list(result) == [name for name, _, _ in partitions.DEPLOYMENTS]
    for row in result.values():
        assert len(row["turns"]) == 1
        assert row["node_us"] > 0
        assert row["redis_us"] > 0  # every primary's CPU counted (the producer's events reached Redis)
        assert row["events_per_s"] > 0
    one, spread = result["Redis Cluster, 1 partition"], result["Redis Cluster, 3 partitions"]
    assert one["id_bytes"] == 16  # an integer id: microseconds since the epoch
    assert 16 < spread["id_bytes"] <= 30  # a cursor of 3 positions
    page = partitions.page(result, "today", "this machine")
    assert page.count("| Redis Cluster") == 2
