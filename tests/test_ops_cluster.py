"""ops.cluster (behind ``make cluster-down``) stops only what it started."""

from __future__ import annotations

import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

from ops.cluster import NGINX_TEMPLATE, Cluster, render_nginx


def test_regression_stale_pid_file_never_signals_someone_elses_process(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        for name in ("node-0", "redis", "nginx"):
            (tmp_path / f"{name}.pid").write_text(f"{bystander.pid}\n")
        Cluster(tmp_path, node_ports=[1], redis_port=1).stop()
        assert bystander.poll() is None  # still running: it is not a node, redis or nginx
        assert not list(tmp_path.glob("*.pid"))  # and the stale pid files are gone
    finally:
        bystander.kill()
        bystander.wait()


def test_regression_a_node_restarted_by_another_program_is_stopped_too(tmp_path: Path) -> None:
    # The load tool's --restart-node-after starts a node again and writes its
    # pid file; stopping the cluster used to forget it (our own child was dead).
    dead = subprocess.Popen(["true"])
    dead.wait()
    restarted = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m", "api"])
    try:
        (tmp_path / "node-0.pid").write_text(f"{restarted.pid}\n")
        cluster = Cluster(tmp_path, node_ports=[1], redis_port=1)
        cluster.processes["node-0"] = dead
        cluster.stop()  # returns once the node is gone (a zombie of this test counts as gone)
        assert restarted.wait(10) == -signal.SIGTERM
        assert not (tmp_path / "node-0.pid").exists()
    finally:
        restarted.kill()
        restarted.wait()


def test_rendered_nginx_asks_for_no_more_open_files_than_this_machine_allows(tmp_path: Path) -> None:
    text = render_nginx(NGINX_TEMPLATE.read_text(), 8080, [8001], tmp_path)
    match = re.search(r"worker_rlimit_nofile (\d+);", text)
    assert match is not None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert int(match.group(1)) <= (hard if hard != resource.RLIM_INFINITY else 65536)
