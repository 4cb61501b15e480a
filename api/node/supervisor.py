"""Several processes for one node: ``HERALD_WORKERS=N`` (Redis broker only).

A node's event loop runs on one core. With ``HERALD_WORKERS=N`` and a Redis
broker, ``python -m api`` becomes a *supervisor* that serves nothing itself:
it starts N *workers*, each ``python -m api`` again with a marker in its
environment, and each worker is a whole node of its own (its own hub, its
own Redis feed, its own streams) that binds its own listening socket on
``HERALD_HOST:HERALD_PORT`` with ``SO_REUSEPORT``. The kernel then spreads
new connections over the workers' sockets by a hash of the connection's
addresses. Nothing is shared between workers but Redis, which already is
what several nodes share: an event published through one worker reaches the
subscribers of every worker, and a client resumes on any of them.

Contracts:

* Worker *i* (0-based) is named ``<HERALD_NODE_ID>-w<i>``: that is its
  ``X-Node-Id`` and its ``/stats`` ``node_id``, so every answer says which
  process served it. (The supervisor's own default id, ``<hostname>-<pid>``,
  carries the supervisor's pid.)
* SIGTERM or SIGINT to the supervisor is forwarded to every worker as
  SIGTERM: each drains its streams and exits as a single-process node does.
  The supervisor exits 0 once every worker has exited cleanly.
* Nothing is restarted. A worker that exits while the node is serving (a
  crash, a kill, a failed start) takes the node down: the supervisor stops
  the other workers the same way and exits 1. A node is then either whole or
  gone, never quietly serving on fewer cores; whatever restarts nodes
  (systemd, Docker, ``ops.cluster``) restarts it, and its clients resume on
  other nodes meanwhile.
* Workers that have not exited ``stop_timeout`` seconds after the stop was
  asked for are killed (SIGKILL) and the supervisor exits 1.
* A worker gets SIGTERM when its supervisor dies, however it dies (Linux
  ``PR_SET_PDEATHSIG``): no worker outlives its node holding the port.
* The embedded broker lives in one process's memory, so with it the node
  runs as one process whatever ``HERALD_WORKERS`` says, and logs that.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from types import FrameType

from uvicorn.config import STARTUP_FAILURE
from uvicorn.logging import DefaultFormatter

from api.settings import Settings

WORKER_INDEX_ENV = "HERALD_WORKER_INDEX"
"""Set by the supervisor in a worker's environment: the worker's index (the marker that makes it a worker)."""
WORKER_PARENT_ENV = "HERALD_WORKER_PARENT"
"""Set by the supervisor in a worker's environment: the supervisor's pid."""

FAILED = 1
"""The supervisor's exit status when a worker failed or had to be killed."""

log = logging.getLogger("herald.workers")


def _configure_logging() -> None:
    """Give this module's logger uvicorn's look (``INFO:     ...``) on stderr, and nothing else.

    Only this logger: the supervisor never creates a uvicorn Config (which is
    what configures uvicorn's logging), and Herald's other loggers keep
    whatever output they had.
    """
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def shares_broker(settings: Settings) -> bool:
    """Whether the broker is Redis (``broker.factory.create_broker``'s rule), so that processes can share it."""
    return settings.redis_url is not None or bool(settings.redis_sentinels)


@dataclass(frozen=True)
class WorkerSlot:
    """What a worker process knows about itself: its index and its supervisor's pid."""

    index: int
    parent: int


def worker_slot() -> WorkerSlot | None:
    """This process's slot when a supervisor started it as a worker, else None."""
    index = os.environ.get(WORKER_INDEX_ENV)
    parent = os.environ.get(WORKER_PARENT_ENV)
    if index is None or parent is None:
        return None
    return WorkerSlot(int(index), int(parent))


def become_worker(slot: WorkerSlot) -> None:
    """Tie this process's life to its supervisor's; call first thing in a worker.

    Asks the kernel for SIGTERM when the supervisor dies (a worker drains and
    exits on SIGTERM), then checks the supervisor is still our parent: it may
    have died before the request was made, and then nothing would come.
    """
    _configure_logging()
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("worker w%d: could not ask to be stopped with its supervisor", slot.index)
    if os.getppid() != slot.parent:
        log.error("worker w%d: supervisor %d is gone; not starting", slot.index, slot.parent)
        sys.exit(FAILED)


def bind_sockets(host: str, port: int, *, reuse_port: bool) -> list[socket.socket]:
    """Bound (not listening) TCP sockets for ``host:port``, one per address it names.

    The same addresses asyncio's ``create_server(host=..., port=...)`` binds
    for a single-process node (every address ``getaddrinfo`` gives; an
    empty host means every interface; IPv6 sockets are v6-only), so a node
    listens on the same addresses with workers as without. ``reuse_port``
    sets ``SO_REUSEPORT``, which every socket sharing the port must set.
    Raises OSError when an address can't be bound (the sockets bound so far
    are closed).
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def worker_sockets(settings: Settings, slot: WorkerSlot) -> list[socket.socket]:
    """This worker's own sockets on the node's port (``SO_REUSEPORT``); exits with uvicorn's status if it can't."""
    try:
        sockets = bind_sockets(settings.host, settings.port, reuse_port=True)
    except OSError as exc:
        log.error("worker w%d: %s", slot.index, exc)
        sys.exit(STARTUP_FAILURE)
    log.info(
        "worker w%d (pid %d) is node id %s, on %s:%d (SO_REUSEPORT)",
        slot.index,
        os.getpid(),
        settings.node_id,
        settings.host,
        settings.port,
    )
    return sockets


def warn_single_process(settings: Settings) -> None:
    """Say that ``HERALD_WORKERS`` > 1 is not honoured with the embedded broker (the node runs one process)."""
    _configure_logging()
    log.warning(
        "HERALD_WORKERS=%d, but the embedded broker lives in one process: running 1 worker, not %d"
        " (set REDIS_URL or REDIS_SENTINELS for several)",
        settings.workers,
        settings.workers,
    )


class Supervisor:
    """Starts a node's workers, forwards stop signals to them, waits for them; serves nothing itself."""

    def __init__(self, settings: Settings, stop_timeout: float) -> None:
        self.settings = settings
        self.stop_timeout = stop_timeout
        self.live: dict[int, int] = {}
        """pid -> index of every worker started and not yet reaped (only those may be signalled)."""
        self.stopping = False
        self.failed = False

    def run(self) -> int:
        """Start the workers and wait for all of them; the exit status for the supervisor (0 or 1, or 3).

        3 (uvicorn's start-up failure) when the port is taken, as a
        single-process node exits then.
        """
        settings = self.settings
        if settings.port == 0:
            # Each worker would bind a port of its own: there'd be no one port to share.
            log.error("HERALD_WORKERS=%d needs a fixed HERALD_PORT, not 0", settings.workers)
            return STARTUP_FAILURE
        try:
            # Without SO_REUSEPORT, so that anything already listening there makes this fail, a Herald
            # node with workers included: workers would otherwise join its port and share its connections.
            for sock in bind_sockets(settings.host, settings.port, reuse_port=False):
                sock.close()
        except OSError as exc:
            log.error("%s:%d: %s", settings.host, settings.port, exc)
            return STARTUP_FAILURE
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGALRM, self._on_stop_timeout)
        log.info(
            "node %s: starting %d workers on %s:%d (SO_REUSEPORT, Redis broker); this process (pid %d) serves nothing",
            settings.node_id,
            settings.workers,
            settings.host,
            settings.port,
            os.getpid(),
        )
        for index in range(settings.workers):
            if self.stopping:
                break
            try:
                self._spawn(index)
            except OSError as exc:
                log.error("could not start worker w%d: %s", index, exc)
                self.failed = True
                self._stop()
        self._wait()
        signal.alarm(0)
        if self.failed:
            log.error("node %s: stopped after a worker failure", settings.node_id)
            return FAILED
        log.info("node %s: every worker stopped cleanly", settings.node_id)
        return 0

    def _spawn(self, index: int) -> None:
        env = {
            **os.environ,
            WORKER_INDEX_ENV: str(index),
            WORKER_PARENT_ENV: str(os.getpid()),
            "HERALD_NODE_ID": f"{self.settings.node_id}-w{index}",
            # A worker must never start workers of its own, marker or not.
            "HERALD_WORKERS": "1",
        }
        # The same command that started this process (cwd and interpreter inherited).
        pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "api"], env)
        self.live[pid] = index
        if self.stopping:
            # A stop signal may have come between the spawn and the line above, and missed this one.
            self._signal_workers(signal.SIGTERM)

    def _wait(self) -> None:
        while self.live:
            # Signal handlers run while this blocks (the call is retried after them: PEP 475).
            pid, status = os.waitpid(-1, 0)
            index = self.live.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                # A worker stopped before it set up its handlers dies of the SIGTERM itself: also a clean stop.
                clean = code in (0, -signal.SIGTERM, -signal.SIGINT)
                level = logging.INFO if clean else logging.ERROR
                log.log(level, "worker w%d (pid %d) exited (%s)", index, pid, _describe(code))
                self.failed |= not clean
            else:
                log.error(
                    "worker w%d (pid %d) exited (%s) while the node was serving: stopping the node",
                    index,
                    pid,
                    _describe(code),
                )
                self.failed = True
                self._stop()

    def _stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping %d workers (SIGTERM)", len(self.live))
        self._signal_workers(signal.SIGTERM)
        signal.alarm(max(1, round(self.stop_timeout)))

    def _signal_workers(self, sig: signal.Signals) -> None:
        for pid in list(self.live):
            # Every pid here is an unreaped child: it can't have been reused by another process.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _on_stop_signal(self, sig: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("got %s", signal.Signals(sig).name)
        self._stop()

    def _on_stop_timeout(self, sig: int, frame: FrameType | None) -> None:
        log.error("workers still running %ss after the stop: killing them", self.stop_timeout)
        self.failed = True
        self._signal_workers(signal.SIGKILL)


def _describe(code: int) -> str:
    if code >= 0:
        return f"status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def supervise(settings: Settings, stop_timeout: float) -> int:
    """Run the node as ``settings.workers`` worker processes; the supervisor's exit status (see the module)."""
    _configure_logging()
    return Supervisor(settings, stop_timeout).run()
