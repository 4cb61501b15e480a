"""The one way tests run a whole deployment (Redis, nodes, nginx: :class:`ops.cluster.Cluster`) as real processes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.cluster import Cluster
from ops.probe import free_port
from tests import redis_server


@contextlib.contextmanager
def cluster_running(run_dir: Path, **options: Any) -> Iterator[Cluster]:
    """A started cluster in ``run_dir`` (its front on a free port unless ``front_port`` is given), stopped by pid after.

    Skips the test when ``redis-server`` is not installed (``make test`` installs it).
    """
    if not redis_server.available():
        pytest.skip("redis-server is not installed")
    options.setdefault("front_port", free_port())
    cluster = Cluster(run_dir / "cluster", **options)
    try:
        cluster.start()  # inside: what a failed start left running is stopped too
        yield cluster
    finally:
        cluster.stop()
