"""How Herald's processes are launched: one place for the command lines and environments.

The cluster runner, the test servers and the benchmarks all start the same
three programs; each used to carry its own copy of their command lines, and
the copies drifted. Everything here only *builds* arguments, except
:func:`spawn`, which starts a process the same way for everyone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SENTINEL_MASTER = "herald"
"""The name the sentinels monitor the primary under (``REDIS_SENTINEL_MASTER`` of the nodes)."""


def redis_args(
    port: int,
    *,
    data_dir: Path | None = None,
    appendonly: bool = False,
    replicaof: int | None = None,
    logfile: Path | None = None,
) -> list[str]:
    """redis-server on 127.0.0.1:``port``, in the foreground, no RDB snapshots.

    ``appendonly`` turns on the AOF, fsynced on every write (nothing a node
    acknowledged is lost when the process stops); ``data_dir`` is where it goes
    (redis-server's own working directory otherwise). ``replicaof`` makes it a
    replica of 127.0.0.1:that port. Without ``logfile`` it logs to stdout.
    """
    args = [
        REDIS_SERVER,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", "always",
        "--daemonize", "no",
    ]  # fmt: skip
    if data_dir is not None:
        args += ["--dir", str(data_dir)]
    if replicaof is not None:
        args += ["--replicaof", "127.0.0.1", str(replicaof)]
    if logfile is not None:
        args += ["--logfile", str(logfile)]
    return args


def sentinel_config(port: int, primary_port: int, data_dir: Path, quorum: int = 2) -> str:
    """The config file of one sentinel watching the primary on 127.0.0.1:``primary_port``.

    The sentinel rewrites this file as it learns (replicas, other sentinels,
    the current primary), so each sentinel needs a writable file of its own.
    A primary that misses pings for 1 s is down; the failover timeout is
    short so that a failed election is retried within seconds (loopback
    clusters are for tests and demos, where waiting minutes helps nobody).
    """
    return "\n".join(
        [
            f"port {port}",
            "bind 127.0.0.1",
            "daemonize no",
            f'dir "{data_dir}"',
            f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary_port} {quorum}",
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000",
            f"sentinel failover-timeout {SENTINEL_MASTER} 3000",
            f"sentinel parallel-syncs {SENTINEL_MASTER} 1",
            "",
        ]
    )


def sentinel_args(config: Path) -> list[str]:
    """redis-server as a sentinel (Debian's redis-server runs as one with ``--sentinel``)."""
    return [REDIS_SERVER, str(config), "--sentinel"]


def node_command() -> list[str]:
    """A Herald node: this interpreter running ``python -m api`` (cwd must be the project root)."""
    return [sys.executable, "-m", "api"]


def clean_environ() -> dict[str, str]:
    """``os.environ`` without any ``HERALD_*`` or ``REDIS_*`` variable.

    A node started for a cluster, a test or a benchmark must be configured by
    its launcher only: a ``REDIS_URL`` left in the caller's shell would
    silently point it at another Redis.
    """
    return {k: v for k, v in os.environ.items() if not k.startswith(("HERALD_", "REDIS_"))}


def node_env(port: int, node_id: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a node on 127.0.0.1:``port``: a clean copy of ours, then ``extra``."""
    env = {**clean_environ(), "HERALD_HOST": "127.0.0.1", "HERALD_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    if node_id is not None:
        env["HERALD_NODE_ID"] = node_id
    env.update(extra or {})
    return env


def spawn(
    args: list[str],
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    new_session: bool = True,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``args`` in the project root (or ``cwd``), stdout and stderr appended to ``log`` (discarded without one).

    ``new_session`` puts the process in a session of its own, so a Ctrl-C in
    the caller's terminal does not reach it: cluster processes outlive the
    command that started them and are stopped by pid.
    """
    output = log.open("ab") if log is not None else None
    try:
        return subprocess.Popen(
            args,
            cwd=cwd or ROOT,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=output if output is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
    finally:
        if output is not None:
            output.close()
