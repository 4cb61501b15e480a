"""Real servers for tests: a Herald node as its own process on a free loopback port.

Tests talk to it over real sockets, exactly as clients do, and stop it by
pid. ``run_server`` is a context manager; the node's output is kept in a log
file that is printed if the node fails to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from ops.cluster import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Node:
    """A running node: where it listens and how to stop it."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 10) -> int:
        """SIGTERM, then wait for the exit code (SIGKILL if it hangs past ``timeout``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_node(env: dict[str, str] | None = None, port: int | None = None, timeout: float = 15) -> Node:
    """Start ``python -m api`` and wait until it answers /healthz."""
    port = port or free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="herald-node-", suffix=".log", delete=False)  # noqa: SIM115
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_") and k != "REDIS_URL"}
    full_env.update({"HERALD_HOST": "127.0.0.1", "HERALD_PORT": str(port), "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    process = subprocess.Popen(
        [sys.executable, "-m", "api"], cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT
    )
    node = Node(process, port, Path(log_file.name))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with {process.returncode}:\n{node.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{node.url}/healthz", timeout=1).status_code == 200:
                return node
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"node did not answer within {timeout}s:\n{node.log()}")


@contextlib.contextmanager
def run_server(env: dict[str, str] | None = None, port: int | None = None) -> Iterator[Node]:
    """A node for the duration of the block; stopped by pid afterwards, whatever happens."""
    node = start_node(env, port)
    try:
        yield node
    finally:
        if node.process.poll() is None:
            node.process.kill()
            node.process.wait()
        node.log_path.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def serve_app(app: FastAPI) -> AsyncIterator[str]:
    """Serve an ASGI app with a real uvicorn on this event loop; yields its base URL.

    For tests that need to reach inside the node (a broker that fails on
    demand); everything else uses a node process from :func:`run_server`.
    """
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning", loop="asyncio")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
