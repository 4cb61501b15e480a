"""Real servers for tests: a Herald node as its own process on a free loopback port.

Tests talk to it over real sockets, exactly as clients do, and stop it by
pid. ``run_server`` is a context manager; the node's output is kept in a log
file that is printed if the node fails to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from ops import launch
from ops.nginx import FrontPolicy
from ops.probe import free_port, probe_get


@dataclass
class Node:
    """A running node: where it listens and how to stop it."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

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


def start_node(
    env: dict[str, str] | None = None, port: int | None = None, timeout: float = 15, command: list[str] | None = None
) -> Node:
    """Start ``python -m api`` (or ``command``) and wait until it answers /healthz."""
    port = port or free_port()
    with tempfile.NamedTemporaryFile(prefix="herald-node-", suffix=".log", delete=False) as log_file:
        log_path = Path(log_file.name)
    # Same session as the test run: an interrupted run takes its nodes with it.
    environ = launch.node_env(port, extra=env)
    process = launch.spawn(command or launch.node_command(), log_path, environ, new_session=False)
    node = Node(process, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with {process.returncode}:\n{node.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if probe_get(f"{node.url}/healthz").status_code == 200:
                return node
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"node did not answer within {timeout}s:\n{node.log()}")


@contextlib.contextmanager
def run_server(
    env: dict[str, str] | None = None, port: int | None = None, command: list[str] | None = None
) -> Iterator[Node]:
    """A node for the duration of the block; stopped by pid afterwards, whatever happens."""
    node = start_node(env, port, command=command)
    try:
        yield node
    finally:
        if node.process.poll() is None:
            node.process.kill()
            node.process.wait()
        node.log_path.unlink(missing_ok=True)


def nginx_available() -> bool:
    return Path(launch.NGINX).exists()


@contextlib.contextmanager
def run_front(node_ports: list[int], timeout: float = 10, policy: FrontPolicy | None = None) -> Iterator[Node]:
    """The deployment's nginx (``ops/nginx.conf.template``) in front of ``node_ports``, up or not.

    Yields it as a :class:`Node` (its URL is the front's: ``https`` with a
    ``policy`` that has TLS); stopped by pid afterwards. Any answer to
    ``/healthz`` means it is up.
    """
    from ops import nginx

    with tempfile.TemporaryDirectory(prefix="herald-front-") as tmp:
        run_dir = Path(tmp)
        for sub in ("logs", "nginx-body", "nginx-proxy"):
            (run_dir / sub).mkdir()
        port = free_port()
        conf = run_dir / "nginx.conf"
        conf.write_text(nginx.render_local(port, node_ports, run_dir, policy))
        log_path = run_dir / "logs" / "nginx.out"
        args = [launch.NGINX, "-p", str(run_dir), "-c", str(conf), "-e", str(run_dir / "logs" / "error.log"),
                "-g", "daemon off;"]  # fmt: skip
        process = launch.spawn(args, log_path, new_session=False)
        front = Node(process, port, log_path, "https" if policy is not None and policy.tls else "http")
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"nginx exited with {process.returncode}:\n{front.log()}")
                with contextlib.suppress(httpx.HTTPError):
                    probe_get(f"{front.url}/healthz")
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not answer within {timeout}s:\n{front.log()}")
                time.sleep(0.05)
            yield front
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


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
