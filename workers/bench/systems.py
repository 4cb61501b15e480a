"""The systems ``make bench`` measures, each started pinned to one core and stopped by pid.

* **herald**: one node (``python -m api``), embedded broker; ``herald-redis``
  the same node on the Redis broker, redis-server on the other core;
  ``herald-nometrics`` the same node with its metrics off (``HERALD_METRICS=0``);
  ``herald-auth`` the same node with access control on (a random
  ``HERALD_JWT_SECRET``), its clients carrying tokens signed with it.
* **herald-mercure**: one node with its Mercure hub on, driven through
  ``/.well-known/mercure`` (``herald-mercure-native``: the same node through
  Herald's own API), for the Mercure vs native comparison.
* **nchan**: nginx with the nchan module (Debian's ``libnginx-mod-nchan``),
  one worker process.
* **sse-starlette**: sse-starlette + broadcaster (memory backend) on uvicorn,
  from its own venv (``ops/bench/peer-requirements.txt``).

Every server runs under ``taskset -c SERVER_CORE``; the load client runs on
the other core.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from api.token import mint
from ops import launch
from ops.cluster import Cluster
from ops.launch import NGINX
from ops.probe import free_port, wait_until
from workers.bench.cpu import descendants, pin
from workers.loadtest.config import mint_mercure

ROOT = Path(__file__).resolve().parent.parent.parent
BENCH_OPS = ROOT / "ops" / "bench"
RUN_DIR = ROOT / ".run" / "bench"
PEER_VENV = RUN_DIR / "peer-venv"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
LISTEN_BACKLOG = 16384
"""Every system gets this accept queue (the kernel caps it at net.core.somaxconn): Herald's own."""
SERVER_CORE = 0
CLIENT_CORE = 1


def pinned(core: int | str, args: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(core), *args] if taskset else args


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes and all their descendants."""
    total = 0
    for pid in descendants(pids):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


@dataclass
class System:
    """A server under test: how to start it on a port, and how clients talk to it."""

    name: str
    loadtest_system: str  # the load tool's --system
    port: int = 0
    protocol: str = "native"  # the load tool's --protocol: Herald's own API, or its Mercure hub ("mercure")
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    source: Path | None = None
    """Where the server's code is (None: this checkout); a Herald of another commit (``--baseline``)."""

    @property
    def address(self) -> str:
        """``host:port``, as the load client's subscribers take it."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def token(self, *, subscribe: list[str] | None = None, publish: list[str] | None = None) -> str | None:
        """An access token with these rights, for a system with access control on; None for the others."""
        return None

    def client_env(self) -> dict[str, str]:
        """What the load tool's environment adds for this system (``HERALD_JWT_SECRET``, to mint its token)."""
        return {}

    def start(self) -> None:
        self.port = free_port()
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        args, env = self.command()
        log = RUN_DIR / f"{self.name}.log"
        self.processes.append(
            launch.spawn(pinned(self.server_cores(), args), log, {**launch.clean_environ(), **env}, cwd=self.source)
        )
        wait_until(lambda: httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200, self.name, 30)

    def server_cores(self) -> str:
        """The cores the server runs on (``taskset -c``)."""
        return str(SERVER_CORE)

    def server_pids(self) -> list[int]:
        return [p.pid for p in self.processes[-1:]]

    def components(self) -> dict[str, list[int]]:
        """The processes whose CPU is sampled, by component (descendants are included)."""
        return {self.name: self.server_pids()}

    def core_components(self) -> list[str]:
        """The components pinned to the server core (they share one core's time)."""
        return list(self.components())

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()

    @contextlib.contextmanager
    def running(self) -> Iterator[System]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


class Herald(System):
    """One node; ``redis``: on the Redis broker; ``auth``: access control on, with a secret of its own."""

    def __init__(self, redis: bool = False, auth: bool = False, metrics: bool = True) -> None:
        name = "herald-redis" if redis else "herald"
        name = f"{name}-auth" if auth else name
        super().__init__(name if metrics else f"{name}-nometrics", "herald")
        self.redis = redis
        self.metrics = metrics
        self.redis_port = 0
        self.secret = secrets.token_urlsafe(48) if auth else None

    def token(self, *, subscribe: list[str] | None = None, publish: list[str] | None = None) -> str | None:
        if self.secret is None:
            return None
        return mint(self.secret, subscribe=subscribe or [], publish=publish or [], sub="bench", ttl=3600)

    def client_env(self) -> dict[str, str]:
        return {} if self.secret is None else {"HERALD_JWT_SECRET": self.secret}

    def start(self) -> None:
        if self.redis:
            self.redis_port = free_port()
            # Redis on the client's core: the node keeps its core to itself.
            self.processes.append(launch.spawn(pinned(CLIENT_CORE, launch.redis_args(self.redis_port))))
        super().start()

    def components(self) -> dict[str, list[int]]:
        if not self.redis:
            return super().components()
        return {"node": self.server_pids(), "redis": [self.processes[0].pid]}

    def core_components(self) -> list[str]:
        return ["node"] if self.redis else super().core_components()

    def command(self) -> tuple[list[str], dict[str, str]]:
        broker = {"REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0"} if self.redis else {}
        metrics = {} if self.metrics else {"HERALD_METRICS": "0"}
        return launch.node_command(), launch.node_env(self.port, self.name, {**broker, **metrics, **self.client_env()})


MERCURE_AUDIENCE = "https://bench.herald.test/.well-known/mercure"
"""The Mercure hub's resource identifier (``HERALD_MERCURE_AUDIENCE``) of :class:`HeraldMercure`."""


class HeraldMercure(Herald):
    """One node (embedded broker) with its Mercure hub on, driven through ``protocol``.

    The node is the same for both protocols (a secret of its own and
    ``HERALD_MERCURE_AUDIENCE``: access control on, the hub able to take
    tokens), so a native-vs-Mercure comparison differs in the API alone:
    ``"native"`` subscribes on ``/events?topic=`` and publishes to
    ``/publish``, ``"mercure"`` on ``/.well-known/mercure?match=`` and
    ``POST /.well-known/mercure``, one event per request both; each with
    tokens of its own kind.
    """

    def __init__(self, protocol: str = "mercure") -> None:
        super().__init__(auth=True)
        self.name = "herald-mercure" if protocol == "mercure" else "herald-mercure-native"
        self.protocol = protocol

    def token(self, *, subscribe: list[str] | None = None, publish: list[str] | None = None) -> str | None:
        if self.protocol != "mercure":
            return super().token(subscribe=subscribe, publish=publish)
        assert self.secret is not None
        topics = [*(subscribe or []), *(publish or [])]
        if len(set(topics)) != 1:
            raise ValueError("a Mercure bench token names exactly one topic")
        return mint_mercure(self.secret, MERCURE_AUDIENCE, topics[0], ttl=3600, sub="bench")

    def client_env(self) -> dict[str, str]:
        return {**super().client_env(), "HERALD_MERCURE_AUDIENCE": MERCURE_AUDIENCE}


class HeraldWorkers(Herald):
    """One node on the Redis broker with ``HERALD_WORKERS=workers``, given that many cores (0, then 1).

    With 2 workers the node shares core 1 with the load client (this
    machine has two cores): the figure says what one node gains from a
    second core, bounded by what the client leaves of it.
    """

    def __init__(self, workers: int) -> None:
        super().__init__(redis=True)
        self.name = f"herald-redis-{workers}-workers"
        self.workers = workers

    def server_cores(self) -> str:
        return ",".join(str(core) for core in range(self.workers))

    def command(self) -> tuple[list[str], dict[str, str]]:
        args, env = super().command()
        return args, {**env, "HERALD_WORKERS": str(self.workers)}


class Nchan(System):
    def __init__(self) -> None:
        super().__init__("nchan", "nchan")

    def command(self) -> tuple[list[str], dict[str, str]]:
        run_dir = RUN_DIR / "nchan"
        (run_dir / "nchan-body").mkdir(parents=True, exist_ok=True)
        conf = (BENCH_OPS / "nchan.conf").read_text()
        conf = conf.replace("RUN_DIR", str(run_dir)).replace("PORT", str(self.port))
        (run_dir / "nginx.conf").write_text(conf)
        return [NGINX, "-p", str(run_dir), "-c", str(run_dir / "nginx.conf"), "-g", "daemon off;"], {}


class SseStarlette(System):
    def __init__(self) -> None:
        super().__init__("sse-starlette", "sse-starlette")

    def command(self) -> tuple[list[str], dict[str, str]]:
        python = str(PEER_VENV / "bin" / "python")
        args = [python, "-m", "uvicorn", "peer_sse_starlette:app", "--app-dir", str(BENCH_OPS), "--host",
                "127.0.0.1", "--port", str(self.port), "--loop", "uvloop", "--http", "httptools", "--log-level",
                "warning", "--no-access-log", "--backlog", str(LISTEN_BACKLOG)]  # fmt: skip
        return args, {}


class HeraldCluster(System):
    """redis-server, ``nodes`` Herald nodes and nginx in front (``ops.cluster``), all on the server core.

    The multi-node scenario: the same load through nginx with 1 node and
    with 2, to show what adding a node buys and which component bounds it.
    """

    def __init__(self, nodes: int) -> None:
        super().__init__(f"herald-cluster-{nodes}", "herald")
        self.nodes = nodes
        self.cluster: Cluster | None = None

    def start(self) -> None:
        self.port = free_port()
        cluster = Cluster(RUN_DIR / self.name, nodes=self.nodes, front_port=self.port, appendonly=False)
        cluster.start()
        self.cluster = cluster
        pin([p.pid for p in cluster.processes.values()], SERVER_CORE)

    def components(self) -> dict[str, list[int]]:
        assert self.cluster is not None
        return {name: [p.pid] for name, p in self.cluster.processes.items()}

    def server_pids(self) -> list[int]:
        assert self.cluster is not None
        return [p.pid for p in self.cluster.processes.values()]

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


def all_systems(with_redis: bool = True) -> list[System]:
    systems: list[System] = [Herald(), Nchan(), SseStarlette()]
    if with_redis:
        systems.append(Herald(redis=True))
    return systems
