"""ops.cluster (behind ``make cluster-down``) stops only what it started."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ops.cluster import Cluster


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
