"""The processes of a loopback cluster: which program a pid file is for, whether it still runs, private files."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """``text`` in a new file at ``path``, created readable by its owner only."""
    path.unlink(missing_ok=True)  # a file left by someone else keeps its mode: start afresh
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)


class Exited(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"exited with {code}")


def expected_program(name: str) -> str:
    """What the command line of process ``name`` contains (redis-server retitles itself, keeping its name)."""
    if name.startswith(("redis", "sentinel")):
        return "redis-server"
    if name == "nginx":
        return "nginx"
    if name == "prometheus":
        return "prometheus --config.file="
    return "-m api"


def is_ours(pid: int, name: str) -> bool:
    """Whether ``pid`` runs what the pid file ``name`` was written for."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return expected_program(name) in cmdline


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs. A zombie does not: it is dead, waiting for a parent
    (maybe another program, such as a test that started the cluster) to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def frozen(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP: state ``T``), as :meth:`ops.cluster.Cluster.freeze` leaves it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] in ("T", "t")
