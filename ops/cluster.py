"""A Herald cluster on this machine, without Docker: redis-server, N API nodes, nginx.

``python -m ops.cluster start [--nodes 3] [--front 8080]`` starts everything
on loopback, writes pid files and logs under ``.run/cluster/`` and prints
what runs where; ``python -m ops.cluster stop`` stops exactly the processes
named in those pid files. The tests drive the same :class:`Cluster` on free
ports, so what they check is what ``make cluster`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = ROOT / "ops" / "nginx.conf"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def render_nginx(template: str, front_port: int, node_ports: list[int], run_dir: Path) -> str:
    """ops/nginx.conf with loopback upstreams, listen address and paths under ``run_dir``."""
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in node_ports)
    text = re.sub(r"^\s*server api:8000[^\n]*$", servers, template, flags=re.M)
    text = re.sub(r"^(\s*)listen 8080( [^;]*)?;", rf"\1listen 127.0.0.1:{front_port}\2;", text, flags=re.M)
    # Workers may not raise their limit past this machine's hard limit.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        text = re.sub(r"worker_rlimit_nofile \d+;", f"worker_rlimit_nofile {min(65536, hard)};", text)
    text = text.replace("error_log /dev/stderr warn;", f"error_log {run_dir}/logs/nginx-error.log warn;")
    text = text.replace("pid /tmp/herald-nginx.pid;", f"pid {run_dir}/nginx.own-pid;")
    text = text.replace("/tmp/herald-nginx-body", f"{run_dir}/nginx-body")
    return text.replace("/tmp/herald-nginx-proxy", f"{run_dir}/nginx-proxy")


def wait_until(check: Callable[[], object], what: str, timeout: float = 15) -> None:
    """Poll ``check`` (errors count as "not yet") until it is true; RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout}s")


@dataclass
class Cluster:
    """redis-server + API nodes + nginx, each a child process tracked by pid file."""

    run_dir: Path
    nodes: int = 3
    front_port: int = 8080
    redis_port: int = 0
    node_ports: list[int] = field(default_factory=list)
    appendonly: bool = True
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = self.run_dir.resolve()
        self.redis_port = self.redis_port or free_port()
        if not self.node_ports:
            self.node_ports = [free_port() for _ in range(self.nodes)]

    @property
    def front_url(self) -> str:
        return f"http://127.0.0.1:{self.front_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def node_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.node_ports[index]}"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    STATE_FILE = "cluster.json"

    def save_state(self) -> None:
        """Write where everything listens to ``cluster.json``, for tools that act on a running cluster."""
        state = {
            "front_port": self.front_port,
            "redis_port": self.redis_port,
            "node_ports": self.node_ports,
            "appendonly": self.appendonly,
            "env": self.env,
        }
        (self.run_dir / self.STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> Cluster:
        """The cluster started from ``run_dir`` (by ``make cluster`` or a test), to act on by pid file.

        Raises FileNotFoundError when no cluster was started there.
        """
        state = json.loads((run_dir / cls.STATE_FILE).read_text())
        return cls(
            run_dir,
            front_port=state["front_port"],
            redis_port=state["redis_port"],
            node_ports=state["node_ports"],
            appendonly=state["appendonly"],
            env=state["env"],
        )

    # -- starting ----------------------------------------------------------------

    def start(self) -> None:
        for sub in ("logs", "redis", "nginx-body", "nginx-proxy"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("nginx-body", "nginx-proxy"):
            (self.run_dir / sub).chmod(0o777)  # nginx workers drop root privileges
        self.save_state()
        try:
            self.start_redis()
            for index in range(len(self.node_ports)):
                self.start_node(index)
            self.start_nginx()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.processes[name] = process
        (self.run_dir / f"{name}.pid").write_text(f"{process.pid}\n")
        return process

    def start_redis(self) -> None:
        args = [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--port", str(self.redis_port),
            "--dir", str(self.run_dir / "redis"),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
        ]  # fmt: skip
        self._spawn("redis", args)
        client = redis.Redis(port=self.redis_port, socket_connect_timeout=0.5)
        wait_until(client.ping, "redis-server")
        client.close()

    def start_node(self, index: int) -> None:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("HERALD_")},
            "HERALD_HOST": "127.0.0.1",
            "HERALD_PORT": str(self.node_ports[index]),
            "HERALD_NODE_ID": f"node-{index}",
            "REDIS_URL": self.redis_url,
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        self._spawn(f"node-{index}", [sys.executable, "-m", "api"], env)
        url = self.node_url(index)
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=1).status_code == 200, f"node-{index}")

    def start_nginx(self) -> None:
        conf = self.run_dir / "nginx.conf"
        template = NGINX_TEMPLATE.read_text()
        conf.write_text(render_nginx(template, self.front_port, self.node_ports, self.run_dir))
        args = [NGINX, "-p", str(self.run_dir), "-c", str(conf), "-e", str(self.logs / "nginx-error.log"),
                "-g", "daemon off;"]  # fmt: skip
        self._spawn("nginx", args)
        wait_until(lambda: httpx.get(f"{self.front_url}/healthz", timeout=1).status_code == 200, "nginx")

    # -- stopping ----------------------------------------------------------------

    def signal(self, name: str, sig: signal.Signals = signal.SIGTERM, timeout: float = 10) -> None:
        """Send ``sig`` to the named process (by its pid) and wait for it to exit."""
        process = self.processes.pop(name, None)
        pid_file = self.run_dir / f"{name}.pid"
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        elif pid_file.exists():
            # Started by another program (`make cluster`, or the load tool
            # restarting a node), or restarted since our own child died.
            pid = int(pid_file.read_text())
            # A pid file can outlive its process (a reboot, a crash) and the pid
            # be reused: only signal a process that is still the one we started.
            if (process is None or pid != process.pid) and _is_ours(pid, name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                    wait_until(lambda: not _alive(pid), name, timeout)
        pid_file.unlink(missing_ok=True)

    def kill_node(self, index: int) -> None:
        self.signal(f"node-{index}", signal.SIGKILL)

    def stop_redis(self) -> None:
        self.signal("redis")

    def stop(self) -> None:
        names = ["nginx", *(f"node-{i}" for i in range(len(self.node_ports))), "redis"]
        for name in names:
            with contextlib.suppress(Exception):
                self.signal(name)

    def describe(self) -> str:
        lines = [f"front (nginx)   {self.front_url}   logs {self.logs}/nginx-error.log"]
        lines += [
            f"node-{i}          {self.node_url(i)}   logs {self.logs}/node-{i}.log" for i in range(len(self.node_ports))
        ]
        lines.append(f"redis           {self.redis_url}   logs {self.logs}/redis.log  (AOF in {self.run_dir}/redis)")
        return "\n".join(lines)


_EXPECTED = {"redis": "redis-server", "nginx": "nginx"}


def _is_ours(pid: int, name: str) -> bool:
    """Whether ``pid`` runs what the pid file ``name`` was written for."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    expected = _EXPECTED.get(name, "-m api")
    return expected in cmdline


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs. A zombie does not: it is dead, waiting for a parent
    (maybe another program, such as a test that started the cluster) to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--nodes", type=int, default=int(os.environ.get("NODES", "3")))
    parser.add_argument("--front", type=int, default=8080, help="nginx port")
    parser.add_argument("--first-node-port", type=int, default=8001)
    parser.add_argument("--redis-port", type=int, default=6380)
    parser.add_argument("--run-dir", type=Path, default=ROOT / ".run" / "cluster")
    args = parser.parse_args(argv)
    ports = [args.first_node_port + i for i in range(args.nodes)]
    if args.action == "stop":
        names = sorted(p.stem for p in args.run_dir.glob("*.pid"))
        nodes = [n for n in names if n.startswith("node-")]
        cluster = Cluster(args.run_dir, node_ports=[0] * len(nodes), redis_port=1)
        cluster.stop()
        print(f"stopped: {', '.join(names) or 'nothing was running'}")
        return
    if any(args.run_dir.glob("*.pid")):
        sys.exit(f"a cluster is already running from {args.run_dir}: make cluster-down first")
    cluster = Cluster(args.run_dir, front_port=args.front, redis_port=args.redis_port, node_ports=ports)
    cluster.start()
    # The processes outlive this command; `stop` finds them by their pid files.
    cluster.processes.clear()
    print(cluster.describe())


if __name__ == "__main__":
    main()
