"""Fault injection on a local cluster, at set times during a load run.

Only a cluster this machine started (``make cluster``, or a test's) can be
hurt: the faults act through its run directory's ``cluster.json`` and pid
files (:class:`ops.cluster.Cluster`), and a pid is only signalled while it
still runs the program its file was written for.

* ``kill-node``: SIGKILL a node mid-run, no goodbye to its clients, and
  optionally start it again ``restart_after`` seconds later.
* ``restart-nodes``: a rolling restart, as a deploy does it: one node at a
  time, SIGTERM (a graceful shutdown), wait until it is gone, start it, wait
  for its ``/readyz``, then the next node.
* ``stop-all-nodes``: SIGKILL every node at once (a whole-site outage, no
  graceful shutdown), then ``restart_after`` seconds later start them all
  again (in parallel, each waited for until ready).
* ``restart-redis``: stop redis-server (SIGTERM: with AOF, nothing
  acknowledged is lost) and start it again at once on the same port.
* ``failover-redis``: SIGKILL the Redis primary of a Sentinel cluster
  (``make cluster SENTINEL=1``), for Sentinel to promote a replica.
* ``freeze-node``: a gray failure: SIGSTOP a node (and its workers) for
  ``restart_after`` seconds, then SIGCONT it. The node hangs holding its
  sockets: nothing is refused or closed, nothing is answered, so its
  clients see silence, not an error, and must notice it themselves (the
  front's read timeout, a subscriber's silence limit, a publisher's
  request timeout).
* ``freeze-redis``: the same gray failure of redis-server.

Each fault records what it did and when (:attr:`Fault.done`, seconds since
publishing started); the blocking cluster calls run in a thread
(:func:`asyncio.to_thread`), so the run goes on measuring meanwhile. A
fault that cannot be carried out records why in :attr:`Fault.error`, and
the run fails. The run's result then says how many subscribers each fault
cut off and how long until every one of them was back, and publishing too.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    # Imported by load_cluster when a run injects faults: ops.cluster (Redis, httpx) is half a second of
    # imports every other run of the tool (and every test that runs it) would pay for nothing.
    from ops.cluster import Cluster

KINDS = (
    "kill-node",
    "restart-nodes",
    "stop-all-nodes",
    "restart-redis",
    "failover-redis",
    "freeze-node",
    "freeze-redis",
)

LASTING = ("restart-nodes", "stop-all-nodes")
"""Faults that last until their last step: nobody is "back" before the last node is up again.

A freeze is not one of them: the subscribers a frozen node holds are back
as soon as they have moved to another node, which they can (and should) do
long before the thaw.
"""


class FaultTarget(Protocol):
    """What the faults need of :class:`ops.cluster.Cluster` (a fake one in unit tests)."""

    node_ports: list[int]
    processes: dict[str, subprocess.Popen[bytes]]

    def kill_node(self, index: int) -> None: ...
    def stop_node(self, index: int, kill: bool = False) -> None: ...
    def start_node(self, index: int) -> None: ...
    def stop_redis(self) -> None: ...
    def start_redis(self) -> None: ...
    def restart_nodes(self, on_step: Callable[[str], None] | None = None) -> None: ...
    def failover_redis(self) -> str: ...
    def freeze_node(self, index: int) -> int: ...
    def thaw_node(self, index: int) -> int: ...
    def freeze_redis(self, name: str = "redis") -> int: ...
    def thaw_redis(self, name: str = "redis") -> int: ...


@dataclass
class Fault:
    """One fault of a run: what, when, and (once run) what was done when."""

    kind: str  # one of KINDS
    at: float  # seconds after publishing started
    node: int = 0  # kill-node, freeze-node: which node
    restart_after: float | None = None  # kill-node: start it again after; stop-all-nodes, freeze-*: down for
    began: float | None = None  # seconds into the run when the fault started
    done: list[tuple[str, float]] = field(default_factory=list)  # (what, seconds into the run)
    error: str | None = None  # why the fault could not be carried out (the run then fails)

    @property
    def ended(self) -> float | None:
        """When the fault was over: its last step for a lasting fault, its first for the others."""
        if not self.done:
            return None
        return self.done[-1][1] if self.kind in LASTING else self.done[0][1]


def load_cluster(run_dir: Path) -> Cluster:
    """The local cluster to hurt; a clear error when there is none."""
    from ops.cluster import Cluster

    try:
        return Cluster.load(run_dir)
    except FileNotFoundError:
        raise SystemExit(
            f"fault injection needs a local cluster: no {run_dir / Cluster.STATE_FILE} "
            "(start one with `make cluster`, or pass --cluster-dir)"
        ) from None


async def inject(cluster: FaultTarget, fault: Fault, t0: float) -> None:
    """Carry out ``fault`` at its time (``t0`` is time.monotonic() when publishing started).

    Never raises for a failed cluster call: the failure is kept in
    ``fault.error`` (and the steps done before it in ``fault.done``), so the
    run still ends, reports, and fails.
    """
    await asyncio.sleep(max(0.0, t0 + fault.at - time.monotonic()))
    fault.began = round(time.monotonic() - t0, 3)

    def mark(what: str) -> None:  # also called from the cluster's thread: list.append is atomic
        fault.done.append((what, round(time.monotonic() - t0, 3)))

    try:
        await _carry_out(cluster, fault, mark)
    except Exception as exc:  # any failure of the cluster call is the fault's result
        fault.error = f"{type(exc).__name__}: {exc}"
        mark(f"{fault.kind} failed")
    finally:
        # The restarted processes belong to the cluster, not to this run:
        # `make cluster-down` stops them by their pid files.
        cluster.processes.clear()


async def _carry_out(cluster: FaultTarget, fault: Fault, mark: Callable[[str], None]) -> None:
    nodes = range(len(cluster.node_ports))
    if fault.kind == "kill-node":
        name = f"node-{fault.node}"
        await asyncio.to_thread(cluster.kill_node, fault.node)
        mark(f"killed {name}")
        if fault.restart_after is not None:
            await asyncio.sleep(fault.restart_after)
            await asyncio.to_thread(cluster.start_node, fault.node)
            mark(f"restarted {name}")
    elif fault.kind == "restart-nodes":
        mark("rolling restart")
        await asyncio.to_thread(cluster.restart_nodes, mark)
        mark("rolling restart done")
    elif fault.kind == "stop-all-nodes":

        def kill_all() -> None:
            for index in nodes:
                cluster.stop_node(index, kill=True)

        await asyncio.to_thread(kill_all)
        mark(f"killed all {len(nodes)} nodes")
        await asyncio.sleep(fault.restart_after or 0.0)
        mark(f"starting all {len(nodes)} nodes")

        async def start(index: int) -> None:
            await asyncio.to_thread(cluster.start_node, index)
            mark(f"node-{index} ready")

        await asyncio.gather(*(start(i) for i in nodes))
        mark("all nodes ready")
    elif fault.kind == "restart-redis":
        await asyncio.to_thread(cluster.stop_redis)
        mark("stopped redis")
        await asyncio.to_thread(cluster.start_redis)
        mark("started redis")
    elif fault.kind == "failover-redis":
        name = await asyncio.to_thread(cluster.failover_redis)
        mark(f"killed redis primary {name}")
    elif fault.kind == "freeze-node":
        await _freeze(
            f"node-{fault.node}",
            lambda: cluster.freeze_node(fault.node),
            lambda: cluster.thaw_node(fault.node),
            fault.restart_after or 0.0,
            mark,
        )
    elif fault.kind == "freeze-redis":
        await _freeze("redis", cluster.freeze_redis, cluster.thaw_redis, fault.restart_after or 0.0, mark)
    else:
        raise ValueError(f"unknown fault {fault.kind!r}")


async def _freeze(
    name: str, freeze: Callable[[], int], thaw: Callable[[], int], seconds: float, mark: Callable[[str], None]
) -> None:
    """SIGSTOP ``name`` (``freeze``), hold it ``seconds``, SIGCONT it (``thaw``): steps "froze", "thawed".

    Whatever froze is thawed, even when the run is cancelled (a run that
    fails part-way) during the wait or while the freeze call is still under
    way: a process is never left stopped by this tool.
    """
    freezing = asyncio.ensure_future(asyncio.to_thread(freeze))
    try:
        await asyncio.shield(freezing)
        mark(f"froze {name}")
        await asyncio.sleep(seconds)
    finally:
        await asyncio.wait([freezing])  # a cancel may have come while the call was under way
        if not freezing.cancelled() and freezing.exception() is None:
            await asyncio.shield(asyncio.to_thread(thaw))
    mark(f"thawed {name}")
