"""A real ``redis-server`` for tests: own process, free loopback port, stopped by pid.

``RedisServer`` can be stopped and started again on the same port and data
directory, with or without persistence (AOF), to test outages and data loss.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ops import launch
from ops.cluster.redis_cluster import RedisCluster
from ops.launch import REDIS_SERVER
from ops.probe import free_port


def available() -> bool:
    return Path(REDIS_SERVER).exists()


needs_redis = pytest.mark.skipif(not available(), reason="redis-server is not installed")
"""Mark a test that needs a real ``redis-server`` (``make test`` installs it)."""


class RedisServer:
    """One redis-server process (restartable) on 127.0.0.1."""

    def __init__(self, appendonly: bool = False) -> None:
        self.port = free_port()
        self.appendonly = appendonly
        self.dir = Path(tempfile.mkdtemp(prefix="herald-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> None:
        args = launch.redis_args(
            self.port, data_dir=self.dir, appendonly=self.appendonly, logfile=self.dir / "redis.log"
        )
        self.process = launch.spawn(args, new_session=False)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()}")
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    client.close()
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer")

    def stop(self) -> None:
        """SIGTERM (redis flushes its AOF on the way out) and wait for the pid."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def redis_server(appendonly: bool = False) -> Iterator[RedisServer]:
    server = RedisServer(appendonly)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


_shared: RedisServer | None = None


def shared_server() -> RedisServer:
    """One redis-server for the whole test session (stopped by ``stop_shared``)."""
    global _shared
    if _shared is None:
        _shared = RedisServer()
        _shared.start()
    return _shared


_shared_cluster: tuple[RedisCluster, Path] | None = None


def shared_cluster() -> RedisCluster:
    """One local Redis Cluster (3 primaries, a replica each) for the whole test session (``stop_shared``)."""
    global _shared_cluster
    if _shared_cluster is None:
        data = Path(tempfile.mkdtemp(prefix="herald-redis-cluster-"))
        cluster = RedisCluster([free_port() for _ in range(6)], data)
        _shared_cluster = (cluster, data)
        cluster.start()
    return _shared_cluster[0]


def stop_shared() -> None:
    global _shared, _shared_cluster
    if _shared is not None:
        _shared.cleanup()
        _shared = None
    if _shared_cluster is not None:
        cluster, data = _shared_cluster
        _shared_cluster = None
        cluster.stop()
        shutil.rmtree(data, ignore_errors=True)


def subscriber_connections(pid: int, port: int) -> int:
    """How many pub/sub (plain or sharded) connections the process ``pid`` holds to the redis-server on ``port``.

    Matched by the connections' own addresses (the process's sockets in ``/proc``, against ``CLIENT LIST``), so
    another process's connections, or one still closing from an earlier test, are never counted.
    """
    inodes = set()
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    local_ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == port:
                    local_ports.add(int(local.rsplit(":", 1)[1], 16))
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        listed = client.execute_command("CLIENT", "LIST", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
    finally:
        client.close()
    if not isinstance(listed, list):  # unparsed: one line per client, fields name=value
        listed = [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in str(listed).splitlines()]
    return sum(1 for entry in listed if int(str(entry.get("addr", ":0")).rsplit(":", 1)[1]) in local_ports)
