"""``python -m api``: run one Herald node with the settings from the environment.

With ``HERALD_WORKERS`` > 1 and a Redis broker this process supervises that
many worker processes sharing the node's port instead of serving (see
:mod:`api.node.supervisor`); each worker runs this same module and serves as below.

Uvicorn's graceful shutdown waits for open responses to finish, and an SSE
stream never finishes by itself. So the server tells the hub to end every
stream first (clients reconnect to another node and resume), and only then
runs uvicorn's own shutdown; ``timeout_graceful_shutdown`` is the backstop
for clients too stalled to take the end of their stream.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import os
import resource
import socket
import sys

import uvicorn
from fastapi import FastAPI

from api import adapter
from api.app import create_app
from api.auth.access import Access
from api.auth.keys import KeyConfigError
from api.node import logs
from api.node import supervisor as workers
from api.settings import Settings
from broker.base import BrokerUnavailable

SHUTDOWN_GRACE_SECONDS = 2
LISTEN_BACKLOG = 16384
"""The accept queue. uvicorn's default (2048) overflows when thousands of clients connect at
once (a node's failover, a deploy): a dropped SYN is retried only after a second, which a connect
storm then waits for (``make bench``: storm). The kernel caps it at ``net.core.somaxconn``."""


class HeraldServer(uvicorn.Server):
    """A uvicorn server that ends the node's SSE streams when asked to stop."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        hub = getattr(self._app.state, "hub", None)
        if hub is not None:
            log.info("draining: ending %d streams (clients resume on another node)", hub.stats()["connections"])
            hub.drain()
        registry = getattr(self._app.state, "registry", None)
        if registry is not None:
            with contextlib.suppress(BrokerUnavailable):
                await registry.announce()  # draining, at once: /cluster says so before the node is gone
        await super().shutdown(sockets)
        # Uvicorn re-raises the stop signal once it is done, so the process
        # would die "killed by SIGTERM". It shut down cleanly: exit 0 instead.
        adapter.exit_cleanly_after_shutdown(self)


def raise_open_files_limit() -> int:
    """Lift the soft open-files limit to the hard one; the limit now in force.

    Every SSE client holds a socket for as long as it listens, and the
    usual soft limit (1024) would cap a node at about a thousand clients
    while the hard limit allows far more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


GC_THRESHOLDS = (20_000, 50, 100)
"""Collector thresholds for a node (Python's defaults: 700, 10, 10)."""


def tune_gc() -> None:
    """Make the cyclic garbage collector run less often, over fewer objects.

    A node holds a few dozen objects per open stream, and a full collection
    walks every one of them: with thousands of streams, the defaults spent
    a fifth of a connect storm's CPU in the collector (5,000 connects at
    once: 1.28 s with the defaults, 0.95 s with these; medians of three,
    side by side). Streams make almost no reference cycles, so collecting
    rarely costs little memory. ``gc.freeze()`` moves everything loaded at
    start-up (modules, the app) out of the collector's sight for good.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


SUPERVISOR_STOP_TIMEOUT = SHUTDOWN_GRACE_SECONDS + 8
"""Seconds a supervisor gives its workers to exit after a stop before it kills them: their own
graceful shutdown (up to ``SHUTDOWN_GRACE_SECONDS``) plus closing the hub and the broker."""


log = logging.getLogger("herald.node")


def check_access(settings: Settings, *, warn: bool = True) -> None:
    """Refuse a key configuration that can't be used; warn when the node is open to a network without auth."""
    try:
        access = Access.from_settings(settings)
    except KeyConfigError as exc:
        sys.exit(f"herald: refusing to start: {exc}")
    if warn and not access.enabled and not is_loopback(settings.host):
        logging.basicConfig(format="%(levelname)s:     %(message)s")
        log.warning(
            "access control is off and the node listens on %s: anyone who can reach it may publish and"
            " subscribe to any topic. Set HERALD_JWT_SECRET (or HERALD_JWT_PUBLIC_KEY, HERALD_JWKS_URL)"
            " to require tokens (docs/access-control.md).",
            settings.host,
        )


def check_redis(settings: Settings) -> None:
    """Refuse a ``REDIS_URL`` whose server can't serve Herald (a Redis before 7.0).

    A Redis that can't be reached now is a passing fault: the node starts and its feed keeps trying (and checks
    again when it connects).
    """
    if settings.redis_url is None or settings.redis_sentinels:
        return
    from broker.redis.connection import hello_now, server_problem

    hello = hello_now(settings.redis_url)
    problem = None if hello is None else server_problem(hello, cluster=True)
    if problem is not None:
        sys.exit(f"herald: refusing to start: {problem}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main() -> None:
    """Serve the node in this process, or supervise its workers (``HERALD_WORKERS`` > 1, Redis broker)."""
    try:  # first: every log line from here on is in the format asked for
        logs.configure(os.environ.get(logs.ENV_VAR))
    except logs.LogFormatError as exc:
        sys.exit(f"herald: refusing to start: {exc}")
    settings = Settings()
    slot = workers.worker_slot()
    check_access(settings, warn=slot is None)  # a worker's supervisor has warned already
    if slot is None:
        check_redis(settings)
    if slot is not None:
        workers.become_worker(slot)
    elif settings.workers > 1:
        if workers.shares_broker(settings):
            sys.exit(workers.supervise(settings, SUPERVISOR_STOP_TIMEOUT))
        workers.warn_single_process(settings)
    serve(settings, slot)


def serve(settings: Settings, slot: workers.WorkerSlot | None = None) -> None:
    """Serve the node in this process until SIGTERM/SIGINT; as worker ``slot`` on a shared port when given."""
    raise_open_files_limit()
    app = create_app(settings)  # chooses what serves beyond ASGI (api.adapter): logged here, once
    choice: adapter.Choice = app.state.server
    warning = choice.warning()
    if warning is not None:
        log.warning("%s", warning)
    tune_gc()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=choice.hooks.http,
        lifespan="on",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        backlog=LISTEN_BACKLOG,
        access_log=False,
        log_level="info",
        log_config=logs.logging_config(settings.log_format),  # uvicorn applies it again: keep the format
    )
    server = HeraldServer(config, app)
    if slot is None:
        server.run()
    else:
        # A socket of its own on the node's port (SO_REUSEPORT): the kernel spreads connections over the
        # workers' sockets. Uvicorn makes it listen, with LISTEN_BACKLOG, once the app has started.
        server.run(sockets=workers.worker_sockets(settings, slot))


if __name__ == "__main__":
    main()
