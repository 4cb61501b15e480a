"""Fault injection on a local cluster, at set times during a load run.

Only a cluster this machine started (``make cluster``, or a test's) can be
hurt: the faults act through its run directory's ``cluster.json`` and pid
files (:class:`ops.cluster.Cluster`), and a pid is only signalled while it
still runs the program its file was written for.

* ``kill-node``: SIGKILL a node mid-run, no goodbye to its clients, and
  optionally start it again ``restart_after`` seconds later.
* ``restart-redis``: stop redis-server (SIGTERM: with AOF, nothing
  acknowledged is lost) and start it again at once on the same port.

Each fault is reported with when it happened; the run's result then says
how many subscribers it disconnected and how long they, and publishing,
took to recover.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from ops.cluster import Cluster


@dataclass
class Fault:
    kind: str  # "kill-node" or "restart-redis"
    at: float  # seconds after publishing started
    node: int = 0
    restart_after: float | None = None
    began: float | None = None  # seconds into the run when the fault started
    done: list[tuple[str, float]] = field(default_factory=list)  # (what, seconds into the run)


def load_cluster(run_dir: Path) -> Cluster:
    """The local cluster to hurt; a clear error when there is none."""
    try:
        return Cluster.load(run_dir)
    except FileNotFoundError:
        raise SystemExit(
            f"fault injection needs a local cluster: no {run_dir / Cluster.STATE_FILE} "
            "(start one with `make cluster`, or pass --cluster-dir)"
        ) from None


async def inject(cluster: Cluster, fault: Fault, t0: float) -> None:
    """Carry out ``fault`` at its time (``t0`` is time.monotonic() when publishing started)."""
    await asyncio.sleep(max(0.0, t0 + fault.at - time.monotonic()))
    fault.began = round(time.monotonic() - t0, 3)

    def mark(what: str) -> None:
        fault.done.append((what, round(time.monotonic() - t0, 3)))

    if fault.kind == "kill-node":
        name = f"node-{fault.node}"
        await asyncio.to_thread(cluster.kill_node, fault.node)
        mark(f"killed {name}")
        if fault.restart_after is not None:
            await asyncio.sleep(fault.restart_after)
            await asyncio.to_thread(cluster.start_node, fault.node)
            mark(f"restarted {name}")
    elif fault.kind == "restart-redis":
        await asyncio.to_thread(cluster.stop_redis)
        mark("stopped redis")
        await asyncio.to_thread(cluster.start_redis)
        mark("started redis")
    else:  # pragma: no cover - the command line only makes the two kinds
        raise ValueError(f"unknown fault {fault.kind!r}")
    # The restarted processes belong to the cluster, not to this run:
    # `make cluster-down` stops them by their pid files.
    cluster.processes.clear()
