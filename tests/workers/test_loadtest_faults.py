"""The load tool's whole-cluster faults for real: a rolling restart, every node down at once, a node that hangs.

A 2-node cluster (redis-server, 2 nodes, nginx) on free loopback ports, the
tool run as its own process, as an operator runs it; its ``--json`` result is
read back. Each fault must lose no accepted event, and say when it happened
and when every subscriber was back.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.cluster import Cluster
from ops.probe import wait_until
from tests import redis_server
from tests.clusters import cluster_running
from tests.workers.test_loadtest import fronted_nodes, run_tool, validate

pytestmark = pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed")

LOAD = ["--subscribers", "100", "--rate", "50", "--duration", "8"]


HEARTBEAT = 2
"""The nodes' HERALD_HEARTBEAT in the freeze drill (15 s by default): the front and the subscribers give up on a
silent stream a heartbeat or two after its last byte, so the drill takes seconds."""


@contextlib.contextmanager
def fresh_cluster(**env: str) -> Iterator[Cluster]:
    """A 2-node cluster with ``env`` for its nodes (and its front), both nodes behind nginx.

    Its run directory is not under pytest's tmp_path: that is mode 0700, and
    nginx's workers (not root) could not write the request bodies they
    buffer to disk there, so a large publish batch (as after an outage)
    would be answered 500.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="herald-lt-faults-"))
    run_dir.chmod(0o755)
    try:
        with cluster_running(run_dir, nodes=2, env=env) as running:
            wait_until(lambda: fronted_nodes(running) == {"node-0", "node-1"}, "both nodes behind nginx", 20)
            yield running
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A fresh cluster per test: each fault here restarts every node."""
    with fresh_cluster() as running:
        yield running


@pytest.fixture
def gray_cluster() -> Iterator[Cluster]:
    """A fresh cluster whose nodes heartbeat every :data:`HEARTBEAT` seconds, for a freeze drill."""
    with fresh_cluster(HERALD_HEARTBEAT=str(HEARTBEAT)) as running:
        yield running


def check_fault(code: int, result: dict[str, Any], kind: str) -> dict[str, Any]:
    """What every fault run must show: a pass, no loss, the fault, and when all were back."""
    assert result["delivery"]["lost"] == 0, result["connections"]
    assert code == 0, (result["verdict"], result["connections"])
    # Every accepted event reached every subscriber (what the outage kept from being published is not lost).
    accepted = result["publish"]["accepted"]
    assert accepted > 0
    assert result["delivery"]["delivered"] == result["delivery"]["expected"] == 100 * accepted
    [fault] = result["faults"]
    assert isinstance(fault, dict)
    assert fault["kind"] == kind
    assert fault["error"] is None
    assert fault["subscribers_disconnected"] > 0
    assert fault["subscribers_not_back"] == 0
    assert fault["subscribers_back_after_s"] is not None
    assert fault["ended_s"] is not None
    # "All back" is never before the fault was over: the last node up again.
    assert fault["at_s"] + fault["subscribers_back_after_s"] >= fault["ended_s"] - 0.01
    validate(result)
    return fault


def run_fault(
    cluster: Cluster, tmp_path: Path, kind: str, *fault: str
) -> tuple[dict[str, Any], list[str], dict[str, Any], str]:
    """The load tool on ``cluster`` with one fault: the fault's report (checked), its steps, the result, the summary."""
    code, result, printed = run_tool(
        tmp_path / "result.json", "--target", cluster.front_url, *LOAD,
        *fault, "--cluster-dir", str(cluster.run_dir), timeout=120,
    )  # fmt: skip
    print(printed)
    report = check_fault(code, result, kind)
    return report, [s["what"] for s in report["steps"]], result, printed


@pytest.mark.timeout(240)  # the cluster's start (its fixture) counts against it
def test_a_rolling_restart_loses_nothing_and_says_when_all_were_back(cluster: Cluster, tmp_path: Path) -> None:
    fault, steps, _, printed = run_fault(cluster, tmp_path, "restart-nodes", "--restart-nodes-at", "2")
    assert steps[0] == "rolling restart"
    assert steps[-1] == "rolling restart done"
    assert steps.index("stopped node-0") < steps.index("node-0 ready") < steps.index("stopped node-1")
    assert steps.index("stopped node-1") < steps.index("node-1 ready")
    # Every subscriber was on one of the two nodes, and each node went away once.
    assert fault["subscribers_disconnected"] == 100
    assert "fault         restart-nodes at" in printed
    assert "all back after" in printed


@pytest.mark.timeout(240)  # the cluster's start (its fixture) counts against it
def test_every_node_down_at_once_loses_nothing_and_says_when_all_were_back(cluster: Cluster, tmp_path: Path) -> None:
    fault, steps, result, printed = run_fault(
        cluster, tmp_path, "stop-all-nodes", "--stop-all-nodes-at", "2", "--for", "2"
    )
    assert steps[0] == "killed all 2 nodes"
    assert steps[-1] == "all nodes ready"
    assert {"node-0 ready", "node-1 ready"} <= set(steps)
    assert fault["subscribers_disconnected"] == 100
    # Down for 2 s: nobody can be back sooner. And not much later: nginx used
    # to keep every node marked failed for ~30 s after they were back (a mark
    # is cleared only when the one request let through ends, and a stream
    # doesn't), answering its retry page meanwhile.
    assert 2 <= fault["subscribers_back_after_s"] <= 10
    # While every node was down, the reconnects were answered by the proxy, or not at all: counted, by cause.
    connections = result["connections"]
    assert connections["told_to_retry"] + sum(connections["errors"].values()) > 0, connections
    assert "stop-all-nodes at" in printed


@pytest.mark.timeout(240)  # the cluster's start (its fixture) counts against it
def test_a_frozen_node_loses_nothing_and_its_subscribers_are_back_before_it_thaws(
    gray_cluster: Cluster, tmp_path: Path
) -> None:
    """``--fault freeze``: node-0 hangs for 6 heartbeats. Its subscribers' streams go silent (the front, or
    their own silence limit, ends them) and they resume on node-1 before the thaw; nothing accepted is lost.

    Back takes about 4 heartbeats here (8 s): the front ends a silent stream 1.5 heartbeats after its last
    byte, the client waits its retry, and its next stream's probe of the hung node takes 2 s to give up.
    """
    freeze_for = 6 * HEARTBEAT
    code, result, printed = run_tool(
        tmp_path / "result.json", "--target", gray_cluster.front_url,
        "--subscribers", "100", "--rate", "50", "--duration", str(2 + freeze_for + 4),
        "--fault", "freeze", "--freeze-node-at", "2", "--freeze-for", str(freeze_for),
        "--heartbeat", str(HEARTBEAT), "--cluster-dir", str(gray_cluster.run_dir), timeout=180,
    )  # fmt: skip
    print(printed)
    assert result["config"]["silence_timeout"] == 2 * HEARTBEAT
    [fault] = result["faults"]
    assert [s["what"] for s in fault["steps"]] == ["froze node-0", "thawed node-0"], fault
    assert fault["error"] is None
    assert result["delivery"]["lost"] == 0, (result["connections"], fault)
    assert code == 0, (result["verdict"], result["connections"], fault)
    accepted = result["publish"]["accepted"]
    assert result["delivery"]["delivered"] == result["delivery"]["expected"] == 100 * accepted
    # node-0 had its share of the subscribers (least_conn); every one of them moved, before the thaw.
    assert 0 < fault["subscribers_disconnected"] < 100
    assert fault["subscribers_not_back"] == 0
    assert fault["subscribers_back_after_s"] is not None
    assert fault["subscribers_back_after_s"] < freeze_for, fault
    # What they waited is what the report says: the worst delay is the time to notice and move, seconds.
    assert 1000 <= fault["worst_delay_ms"] < 1000 * freeze_for, fault
    assert fault["longest_publish_wait_s"] < freeze_for, fault  # publishing never waited for the thaw
    assert "freeze-node at 2.0 s: froze node-0 at" in printed
    assert "worst delivery delay" in printed
    validate(result)
