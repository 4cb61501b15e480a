"""Small helpers every launcher needs: a free loopback port, and polling until something holds.

They live here, not in :mod:`ops.cluster`, because the tests, the benchmarks
and the load tool use them without wanting a cluster.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx  # imported by probe_get: the command-line tools that import this module start 0.2 s sooner


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    The port is released before returning, so another process may take it
    before the caller binds it; on a test machine that is rare enough.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:``port`` can be bound now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_range(count: int, attempts: int = 50) -> int:
    """The first of ``count`` consecutive free ports (for tools that take a first port and count up).

    Raises RuntimeError when no such run was found in ``attempts`` tries.
    """
    for _ in range(attempts):
        first = free_port()
        if first + count <= 65536 and all(port_is_free(first + i) for i in range(count)):
            return first
    raise RuntimeError(f"found no {count} consecutive free ports")


def wait_until(
    check: Callable[[], object], what: str, timeout: float = 15, fatal: tuple[type[BaseException], ...] = ()
) -> None:
    """Poll ``check`` (errors count as "not yet") until it is true; RuntimeError after ``timeout``.

    An exception of a ``fatal`` type from ``check`` ends the wait at once (it
    propagates): for a check that can tell "never", such as a process that exited.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except fatal:
            raise
        except Exception:
            pass  # not yet
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout}s")


def probe_get(url: str, timeout: float = 1, headers: Mapping[str, str] | None = None) -> httpx.Response:
    """One GET of a readiness poll: ``httpx.get`` without loading the CA bundle.

    ``httpx.get`` builds a client and its TLS context per call: 20-50 ms of
    CPU, taken from the process being waited for, on every poll. A poll of a
    service this project started on loopback has no certificate worth
    checking.
    """
    import httpx

    return httpx.get(url, timeout=timeout, headers=headers, verify=False)
