"""The :class:`Cluster`: its state file, and starting, stopping and asking its processes (see :mod:`ops.cluster`)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import key_slot

from api.token import mint
from broker.redis.spread import partition_tags
from ops import launch
from ops.cluster.processes import Exited, alive, frozen, is_ours, write_private
from ops.cluster.redis_cluster import cluster_args, complete, shards_of
from ops.cluster.redis_cluster import create as create_redis_cluster
from ops.cluster.sentinel import redis_client, sentinel_command, sentinel_master
from ops.launch import NGINX, SENTINEL_MASTER
from ops.nginx import FrontPolicy, render_local
from ops.probe import free_port, probe_get, wait_until
from ops.prometheus import (
    PROMETHEUS_RULES,
    SCRAPE_TOKEN_TTL,
    prometheus_args,
    render_prometheus,
)

READY = "ready"
NOT_READY = "not-ready"
STOPPED = "stopped"
FROZEN = "frozen"


@dataclass
class Cluster:
    """redis-server + API nodes + nginx (+ a replica and sentinels), each a child process tracked by pid file.

    Every process has a name (``node-0``, ``redis``, ``redis-1``,
    ``sentinel-0``, ``nginx``), a log ``logs/<name>.log`` and a pid file
    ``<name>.pid`` in ``run_dir``. Methods act on a process through the
    ``Popen`` in :attr:`processes` when this object started it, and through
    its pid file otherwise (a cluster started by another program: the CLI,
    ``make cluster``), signalling a pid only while it still runs the program
    its file was written for.
    """

    run_dir: Path
    nodes: int = 3
    front_port: int = 8080
    redis_port: int = 0
    node_ports: list[int] = field(default_factory=list)
    appendonly: bool = True
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sentinel: bool = False
    replica_ports: list[int] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    auth: bool = False
    """Access control on: every node gets the cluster's ``HERALD_JWT_SECRET`` (:attr:`secret_file`)."""
    observe: bool = False
    """Prometheus too, scraping every node (:meth:`start_prometheus`)."""
    prometheus_port: int = 0
    scrape_interval: str = "5s"
    """Prometheus' scrape and rule evaluation interval (a Prometheus duration)."""
    tls: bool = False
    """The front serves HTTPS and HTTP/2, with a certificate made for this cluster (:meth:`make_certificate`)."""
    redis_cluster: bool = False
    """Redis is a Redis Cluster: ``redis`` and ``redis-1``..``redis-5``, 3 primaries with a replica each
    (:mod:`ops.cluster.redis_cluster`), the nodes' REDIS_URL naming ``redis``."""
    bus_ports: list[int] = field(default_factory=list)
    """With ``redis_cluster``: each redis process's cluster bus port, in :attr:`redis_names` order."""

    def __post_init__(self) -> None:
        self.run_dir = self.run_dir.resolve()
        self.redis_port = self.redis_port or free_port()
        if self.redis_cluster:
            if not self.replica_ports:
                self.replica_ports = [free_port() for _ in range(5)]
            if not self.bus_ports:
                self.bus_ports = [free_port() for _ in range(1 + len(self.replica_ports))]
        if not self.node_ports:
            self.node_ports = [free_port() for _ in range(self.nodes)]
        if self.sentinel:
            if not self.replica_ports:
                self.replica_ports = [free_port()]
            if not self.sentinel_ports:
                self.sentinel_ports = [free_port() for _ in range(3)]
        if self.observe and not self.prometheus_port:
            self.prometheus_port = free_port()

    # -- where things are ------------------------------------------------------

    @property
    def front_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.front_port}"

    @property
    def certificate(self) -> tuple[Path, Path]:
        """The front's certificate and key (with ``tls``), made at start: valid for localhost and 127.0.0.1."""
        return self.run_dir / "tls" / "cert.pem", self.run_dir / "tls" / "key.pem"

    def make_certificate(self) -> None:
        """A self-signed certificate for the front (Debian's ``openssl``), its key readable by its owner only."""
        certificate, key = self.certificate
        key.parent.mkdir(parents=True, exist_ok=True)
        key.unlink(missing_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
             "-keyout", str(key), "-out", str(certificate), "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
        key.chmod(0o600)

    def front_policy(self) -> FrontPolicy:
        """The front's policy: the defaults, the nodes' heartbeat and CORS origins, and this cluster's TLS."""
        certificate, key = self.certificate
        return FrontPolicy(
            heartbeat=float(self.env.get("HERALD_HEARTBEAT", "15")),
            cors_origins=tuple(o.strip() for o in self.env.get("HERALD_CORS_ORIGINS", "").split(",") if o.strip()),
            tls=(str(certificate), str(key)) if self.tls else None,
        )

    @property
    def redis_url(self) -> str:
        """The process named ``redis``: with sentinels, the primary at start (not necessarily now)."""
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def node_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.node_ports[index]}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def node_names(self) -> list[str]:
        return [f"node-{i}" for i in range(len(self.node_ports))]

    @property
    def redis_names(self) -> list[str]:
        """``redis`` (the primary at start), then ``redis-1``... (its replicas at start)."""
        return ["redis", *(f"redis-{i + 1}" for i in range(len(self.replica_ports)))]

    @property
    def sentinel_names(self) -> list[str]:
        return [f"sentinel-{i}" for i in range(len(self.sentinel_ports))]

    def redis_port_of(self, name: str) -> int:
        """The port of the redis-server process ``name``; KeyError for another name."""
        return dict(zip(self.redis_names, [self.redis_port, *self.replica_ports], strict=True))[name]

    STATE_FILE = "cluster.json"
    SECRET_FILE = "jwt-secret"
    """The cluster's HERALD_JWT_SECRET, readable by its owner only; never in ``cluster.json``."""

    PROMETHEUS_TOKEN_FILE = "prometheus-token"
    """The admin token Prometheus scrapes with (``--auth --observe``), readable by its owner only."""

    @property
    def secret_file(self) -> Path:
        return self.run_dir / self.SECRET_FILE

    @property
    def prometheus_token_file(self) -> Path:
        return self.run_dir / self.PROMETHEUS_TOKEN_FILE

    @property
    def jwt_secret(self) -> str:
        """The secret the nodes verify tokens with. RuntimeError for a cluster without access control."""
        if not self.auth:
            raise RuntimeError("this cluster runs without access control (start it with --auth, make cluster AUTH=1)")
        try:
            return self.secret_file.read_text().strip()
        except FileNotFoundError:
            raise RuntimeError(f"the cluster's secret is gone ({self.secret_file}): start the cluster again") from None

    def _new_secret(self) -> None:
        """A fresh random secret in :attr:`secret_file`, created readable by its owner only."""
        write_private(self.secret_file, secrets.token_urlsafe(48) + "\n")

    def token(
        self,
        *,
        publish: list[str] | None = None,
        subscribe: list[str] | None = None,
        admin: bool = False,
        sub: str | None = None,
        ttl: float = 3600,
    ) -> str:
        """A token signed with the cluster's secret (RuntimeError without access control)."""
        return mint(self.jwt_secret, publish=publish or [], subscribe=subscribe or [], admin=admin, sub=sub, ttl=ttl)

    def save_state(self) -> None:
        """Write where everything listens to ``cluster.json``, for tools that act on a running cluster."""
        state = {
            "front_port": self.front_port,
            "redis_port": self.redis_port,
            "node_ports": self.node_ports,
            "appendonly": self.appendonly,
            "env": self.env,
            "sentinel": self.sentinel,
            "replica_ports": self.replica_ports,
            "sentinel_ports": self.sentinel_ports,
            "auth": self.auth,
            "observe": self.observe,
            "prometheus_port": self.prometheus_port,
            "scrape_interval": self.scrape_interval,
            "tls": self.tls,
            "redis_cluster": self.redis_cluster,
            "bus_ports": self.bus_ports,
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
            sentinel=state.get("sentinel", False),
            replica_ports=state.get("replica_ports", []),
            sentinel_ports=state.get("sentinel_ports", []),
            auth=state.get("auth", False),
            observe=state.get("observe", False),
            prometheus_port=state.get("prometheus_port", 0),
            scrape_interval=state.get("scrape_interval", "5s"),
            tls=state.get("tls", False),
            redis_cluster=state.get("redis_cluster", False),
            bus_ports=state.get("bus_ports", []),
        )

    # -- starting ----------------------------------------------------------------

    def start(self) -> None:
        """Start everything and return once each part answers; on any failure, stop what started."""
        for sub in ("logs", "nginx-body", "nginx-proxy", *self.redis_names, *self.sentinel_names):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("nginx-body", "nginx-proxy"):
            (self.run_dir / sub).chmod(0o777)  # nginx workers drop root privileges
        if self.auth:
            self._new_secret()  # a new cluster, a new secret: tokens of an earlier one stop working
        else:
            self.secret_file.unlink(missing_ok=True)
        self.save_state()
        if self.redis_cluster:
            self.forget_redis_cluster()
        try:
            for name in self.redis_names:
                self.start_redis_process(name)
            if self.redis_cluster:
                self._create_redis_cluster()
            if self.sentinel:
                self._start_sentinels()
            # Nodes start side by side (each takes about a second to import):
            # the cluster is up as soon as the slowest one is.
            for index in range(len(self.node_ports)):
                self._spawn_node(index)
            for index in range(len(self.node_ports)):
                self._wait_node(index)
            self.start_nginx()
            if self.observe:
                self.start_prometheus()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        process = launch.spawn(args, self.logs / f"{name}.log", env)
        self.processes[name] = process
        (self.run_dir / f"{name}.pid").write_text(f"{process.pid}\n")
        return process

    def _wait_started(self, name: str, check: Callable[[], object], timeout: float = 15) -> None:
        """Poll ``check`` until true; fail at once (with the log's tail) if the process exits."""
        process = self.processes[name]

        def started() -> object:
            if process.poll() is not None:
                raise Exited(process.returncode)
            return check()

        try:
            wait_until(started, name, timeout, fatal=(Exited,))
        except (Exited, RuntimeError) as error:
            log = self.logs / f"{name}.log"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else ""
            raise RuntimeError(f"{name} did not start ({error}); end of {log}:\n{tail}") from None

    def _refuse_if_running(self, name: str) -> None:
        # A second process could not bind the port, but the first one would
        # answer the readiness check and the pid file would name the dead one.
        pid = self.pid_of(name)
        if pid is not None:
            raise RuntimeError(f"{name} is already running (pid {pid})")

    def start_redis(self) -> None:
        """Start the process named ``redis`` again (see :meth:`start_redis_process`)."""
        self.start_redis_process("redis")

    def start_redis_process(self, name: str) -> None:
        """Start redis-server ``name`` (``redis``, ``redis-1``...) on its port and data directory.

        Without sentinels it is a primary. With sentinels it comes back as a
        replica of whichever process the sentinels name as primary now (so a
        primary killed by :meth:`failover_redis` rejoins as a replica of its
        successor); when no sentinel answers (the cluster is starting), the
        process ``redis`` is the primary.
        """
        self._refuse_if_running(name)
        port = self.redis_port_of(name)
        if self.redis_cluster:  # a cluster node: it finds its place (and role) in nodes.conf when restarted
            args = cluster_args(port, self.bus_ports[self.redis_names.index(name)], self.run_dir / name, 2000)
        else:
            primary_port = self.redis_port
            if self.sentinel:
                primary = self.primary()
                primary_port = self.redis_port_of(primary) if primary is not None else self.redis_port
            args = launch.redis_args(
                port,
                data_dir=self.run_dir / name,
                appendonly=self.appendonly,
                replicaof=primary_port if primary_port != port else None,
            )
        (self.run_dir / name).mkdir(parents=True, exist_ok=True)
        self._spawn(name, args)
        client = redis_client(port)
        try:
            self._wait_started(name, client.ping)
        finally:
            client.close()

    def forget_redis_cluster(self) -> None:
        """Empty the data directories of the Redis Cluster's stopped processes: a start makes a new cluster.

        An earlier start's nodes.conf names cluster bus ports that are not this start's, so its nodes could never
        meet again: ``make cluster REDIS=cluster`` after ``make cluster-down`` failed to create its cluster ("Node
        ... is not empty"). A process restarted in a running cluster (``restart-node``) keeps its data; a running
        one's directory is left alone (``start`` refuses it).
        """
        for name in self.redis_names:
            if self.pid_of(name) is None:
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
                (self.run_dir / name).mkdir(parents=True)

    def _create_redis_cluster(self) -> None:
        """Join the redis processes into one cluster (3 primaries, a replica each) and wait until it serves."""
        create_redis_cluster([self.redis_port, *self.replica_ports], 1)
        wait_until(
            lambda: complete(shards_of(self.redis_port), 3, 1),
            "the Redis Cluster serving every slot, a replica for each primary",
            60,
        )

    def _start_sentinels(self) -> None:
        for name, port in zip(self.sentinel_names, self.sentinel_ports, strict=True):
            self._refuse_if_running(name)
            config = self.run_dir / f"{name}.conf"
            config.write_text(launch.sentinel_config(port, self.redis_port, self.run_dir / name))
            self._spawn(name, launch.sentinel_args(config))
        # A failover needs a quorum of sentinels that know each other and the
        # replica; they find out through the primary (INFO and hello messages,
        # within a few seconds of starting).
        for name, port in zip(self.sentinel_names, self.sentinel_ports, strict=True):
            self._wait_started(name, functools.partial(self._sentinel_knows_everyone, port), timeout=30)

    def _sentinel_knows_everyone(self, port: int) -> bool:
        info = sentinel_master(port)
        return int(info["num-other-sentinels"]) >= len(self.sentinel_ports) - 1 and int(info["num-slaves"]) >= len(
            self.replica_ports
        )

    def _node_env(self, index: int) -> dict[str, str]:
        if self.sentinel:
            broker = {
                "REDIS_SENTINELS": ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports),
                "REDIS_SENTINEL_MASTER": SENTINEL_MASTER,
            }
        else:
            broker = {"REDIS_URL": self.redis_url}
        auth = {"HERALD_JWT_SECRET": self.jwt_secret} if self.auth else {}
        return launch.node_env(self.node_ports[index], f"node-{index}", {**broker, **auth, **self.env})

    def _spawn_node(self, index: int) -> None:
        name = f"node-{index}"
        self._refuse_if_running(name)
        self._spawn(name, launch.node_command(), self._node_env(index))

    def _wait_node(self, index: int) -> None:
        url = self.node_url(index)
        self._wait_started(f"node-{index}", lambda: probe_get(f"{url}/readyz").status_code == 200)

    def start_node(self, index: int) -> None:
        """Start node ``index`` and return once its ``/readyz`` answers 200; RuntimeError if it is running."""
        self._spawn_node(index)
        self._wait_node(index)

    def start_nginx(self) -> None:
        conf = self.run_dir / "nginx.conf"
        if self.tls and not self.certificate[0].exists():
            self.make_certificate()
        conf.write_text(render_local(self.front_port, self.node_ports, self.run_dir, self.front_policy()))
        args = [NGINX, "-p", str(self.run_dir), "-c", str(conf), "-e", str(self.logs / "nginx-error.log"),
                "-g", "daemon off;"]  # fmt: skip
        self._spawn("nginx", args)
        self._wait_started("nginx", lambda: probe_get(f"{self.front_url}/healthz").status_code == 200)

    def prometheus_config(self) -> str:
        """The config :meth:`start_prometheus` writes: every node of this cluster, the repository's alert rules."""
        return render_prometheus(
            [f"127.0.0.1:{port}" for port in self.node_ports],
            scrape_interval=self.scrape_interval,
            rule_file=str(PROMETHEUS_RULES),
            credentials_file=str(self.prometheus_token_file) if self.auth else None,
        )

    def start_prometheus(self) -> None:
        """Start Prometheus on :attr:`prometheus_port`, scraping every node; return once it is ready.

        Its data goes to ``prometheus/`` in the run directory (kept from one
        start to the next: it is history). With access control on, it scrapes
        with an admin token (:attr:`prometheus_token_file`) minted from the
        cluster's secret: a new one at every start, worthless once ``stop``
        deletes the secret.
        """
        self._refuse_if_running("prometheus")
        if not self.prometheus_port:
            self.prometheus_port = free_port()
            self.save_state()
        data = self.run_dir / "prometheus"
        data.mkdir(parents=True, exist_ok=True)
        if self.auth:
            token = self.token(admin=True, sub="prometheus", ttl=SCRAPE_TOKEN_TTL)
            write_private(self.prometheus_token_file, token + "\n")
        config = self.run_dir / "prometheus.yml"
        config.write_text(self.prometheus_config())
        self._spawn("prometheus", prometheus_args(config, data, self.prometheus_port))
        url = self.prometheus_url
        self._wait_started("prometheus", lambda: probe_get(f"{url}/-/ready").status_code == 200, 30)

    # -- stopping ----------------------------------------------------------------

    def signal(self, name: str, sig: signal.Signals = signal.SIGTERM, timeout: float = 10) -> None:
        """Send ``sig`` to the named process (by its pid) and wait for it to exit (SIGKILL after ``timeout``)."""
        process = self.processes.pop(name, None)
        pid_file = self.run_dir / f"{name}.pid"
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            self._wake(process.pid)
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
            if (process is None or pid != process.pid) and is_ours(pid, name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                    self._wake(pid)
                    try:
                        wait_until(lambda: not alive(pid), name, timeout)
                    except RuntimeError:
                        os.kill(pid, signal.SIGKILL)
                        wait_until(lambda: not alive(pid), name, timeout)
        pid_file.unlink(missing_ok=True)

    @staticmethod
    def _wake(pid: int) -> None:
        """A frozen process (:meth:`freeze`) acts on the signal just sent only once it runs again."""
        if frozen(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGCONT)

    def kill_node(self, index: int) -> None:
        self.signal(f"node-{index}", signal.SIGKILL)

    # -- gray failures: a process that hangs instead of dying ----------------------

    def freeze(self, name: str) -> int:
        """SIGSTOP the named process and every process of its group; return its pid.

        A gray failure for drills (``ops.cluster freeze-node``): the process
        keeps its sockets, so nothing is refused or closed, and answers
        nothing, as a node with a stuck event loop, a paused VM or container,
        or a swap storm does. Every process of the cluster leads a process
        group of its own (``launch.spawn``), so a node's workers
        (``HERALD_WORKERS``) stop with it, as they would in a paused container.
        RuntimeError when the process does not run.
        """
        pid = self.pid_of(name)
        if pid is None:
            raise RuntimeError(f"{name} is not running")
        os.killpg(pid, signal.SIGSTOP)
        return pid

    def thaw(self, name: str) -> int:
        """SIGCONT the named process and its group (the end of :meth:`freeze`); return its pid."""
        pid = self.pid_of(name)
        if pid is None:
            raise RuntimeError(f"{name} is not running")
        os.killpg(pid, signal.SIGCONT)
        return pid

    def freeze_node(self, index: int) -> int:
        return self.freeze(f"node-{index}")

    def thaw_node(self, index: int) -> int:
        return self.thaw(f"node-{index}")

    def freeze_redis(self, name: str = "redis") -> int:
        self.redis_port_of(name)  # KeyError for a name that is no redis process
        return self.freeze(name)

    def thaw_redis(self, name: str = "redis") -> int:
        self.redis_port_of(name)
        return self.thaw(name)

    def stop_node(self, index: int, kill: bool = False) -> None:
        """SIGTERM node ``index`` (its streams end, clients resume elsewhere) and wait until it is gone.

        ``kill``: SIGKILL instead, no goodbye to anyone.
        """
        self.signal(f"node-{index}", signal.SIGKILL if kill else signal.SIGTERM)

    def stop_redis(self) -> None:
        """SIGTERM the process named ``redis`` (with sentinels: whatever its role is now)."""
        self.signal("redis")

    def stop_redis_process(self, name: str, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL) redis-server ``name`` and wait until it is gone."""
        self.redis_port_of(name)  # KeyError for a name that is no redis process
        self.signal(name, signal.SIGKILL if kill else signal.SIGTERM)

    def failover_redis(self) -> str:
        """SIGKILL the current primary (as a sentinel names it) and return its name.

        The sentinels then promote a replica (within a few seconds: the
        primary is down after 1 s of silence); :meth:`status` shows when.
        Start the killed one again with :meth:`start_redis_process`: it
        rejoins as a replica. RuntimeError without sentinels, or when no
        sentinel answers.
        """
        if not self.sentinel:
            raise RuntimeError("failover needs a cluster started with sentinels (--sentinel)")
        primary = self.primary()
        if primary is None:
            raise RuntimeError("no sentinel named a primary")
        self.signal(primary, signal.SIGKILL)
        return primary

    def restart_nodes(self, on_step: Callable[[str], None] | None = None) -> None:
        """Rolling restart: one node at a time, the others keep serving.

        For each node: SIGTERM (its streams end; clients reconnect through
        nginx to the other nodes and resume), wait until the process is gone,
        start it, wait for its ``/readyz``, then, when nginx runs, wait until
        nginx sends it requests again, so two nodes are never out at once.
        ``on_step`` gets a short text after each step.
        """
        step = on_step or (lambda _text: None)
        nginx_up = self.pid_of("nginx") is not None
        for index, name in enumerate(self.node_names):
            self.stop_node(index)
            step(f"stopped {name}")
            self.start_node(index)
            step(f"{name} ready")
            if nginx_up:
                self._wait_fronted(name)
                step(f"nginx sends to {name} again")

    def _wait_fronted(self, name: str, timeout: float = 15) -> None:
        def answered_by_node() -> bool:
            # A new connection each time: nginx picks a node per request
            # (least connections; a restarted node has none).
            response = probe_get(f"{self.front_url}/healthz", headers={"Connection": "close"})
            node: str | None = response.headers.get("x-node-id")
            return node == name

        wait_until(answered_by_node, f"nginx sending requests to {name}", timeout)

    def stop(self) -> None:
        """Stop Prometheus, nginx, the nodes, the sentinels, the replicas and redis in that order, then any pid file.

        Prometheus first, so it records no outage of a cluster being stopped;
        the front next, so no client is sent to a node on its way out; Redis
        last, so nodes shut down with their broker still there.
        """
        # Replicas before the primary: a primary stopping with a replica still
        # attached waits (up to redis' shutdown-timeout, 10 s) for it to catch up.
        primary = self.primary() if self.sentinel else None
        redis_order = [name for name in self.redis_names[::-1] if name != primary]
        redis_order += [name for name in self.redis_names if name == primary]
        names = ["prometheus", "nginx", *self.node_names, *self.sentinel_names, *redis_order]
        names += sorted(p.stem for p in self.run_dir.glob("*.pid") if p.stem not in names)
        for name in names:
            with contextlib.suppress(Exception):
                self.signal(name)
        self.secret_file.unlink(missing_ok=True)  # no node uses it any more
        self.prometheus_token_file.unlink(missing_ok=True)

    # -- looking -----------------------------------------------------------------

    def pid_of(self, name: str) -> int | None:
        """The pid of the running process ``name`` (ours, or by its pid file), None when it is not running."""
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            return process.pid
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.run_dir / f"{name}.pid").read_text())
            if alive(pid) and is_ours(pid, name):
                return pid
        return None

    def primary(self) -> str | None:
        """The redis process the sentinels name as primary now; None without sentinels or an answer."""
        for port in self.sentinel_ports:
            try:
                address = sentinel_command(port, "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER)
            except redis.RedisError:
                continue
            if isinstance(address, list | tuple) and len(address) == 2:
                by_port = dict(zip([self.redis_port, *self.replica_ports], self.redis_names, strict=True))
                return by_port.get(int(address[1]))
        return None

    def _process_status(self, name: str, url: str, probe: Callable[[], bool]) -> dict[str, object]:
        pid = self.pid_of(name)
        if pid is None:
            state = STOPPED
        elif frozen(pid):
            state = FROZEN  # asking it would only wait
        else:
            try:
                state = READY if probe() else NOT_READY
            except Exception:
                state = NOT_READY
        return {"name": name, "url": url, "pid": pid, "state": state}

    def _redis_status(self, name: str, port: int) -> dict[str, object]:
        def ping() -> bool:
            client = redis_client(port)
            try:
                return client.ping() is True
            finally:
                client.close()

        return self._process_status(name, f"redis://127.0.0.1:{port}/0", ping)

    def status(self) -> dict[str, object]:
        """What runs and whether it answers, from this or any other process (by pid file).

        ``{"front": url, "redis": {...}, "nginx": {...}, "nodes": [...]}``; each
        process entry is ``{"name", "url", "pid", "state"}``, ``pid`` None and
        ``state`` ``"stopped"`` when it does not run, ``"frozen"`` while
        :meth:`freeze` holds it, else ``"ready"`` (a node's
        ``/readyz`` is 200; redis answers PING; nginx answers HTTP at all) or
        ``"not-ready"``. ``redis`` is the process named ``redis``; with
        sentinels it also holds ``"master_name"``, ``"primary"`` (the name the
        sentinels give, or None), ``"replicas"`` (every other redis process)
        and ``"sentinels"`` (each answering PING).
        """

        def node_ready(url: str) -> Callable[[], bool]:
            return lambda: probe_get(f"{url}/readyz").status_code == 200

        nodes = [
            self._process_status(name, self.node_url(i), node_ready(self.node_url(i)))
            for i, name in enumerate(self.node_names)
        ]
        nginx = self._process_status(
            "nginx", self.front_url, lambda: probe_get(f"{self.front_url}/healthz").status_code > 0
        )
        redis_status = self._redis_status("redis", self.redis_port)
        del redis_status["name"]
        if self.sentinel:
            primary = self.primary()
            redis_status["master_name"] = SENTINEL_MASTER
            redis_status["primary"] = primary
            redis_status["replicas"] = [
                self._redis_status(name, self.redis_port_of(name)) for name in self.redis_names if name != primary
            ]
            redis_status["sentinels"] = [
                self._redis_status(name, port) | {"url": f"redis://127.0.0.1:{port}"}
                for name, port in zip(self.sentinel_names, self.sentinel_ports, strict=True)
            ]
        if self.redis_cluster:
            try:
                shards = shards_of(self.redis_port if self.pid_of("redis") else self.replica_ports[0])
            except (redis.RedisError, OSError):
                shards = []
            redis_status["shards"] = [
                {"primary": s.primary, "replicas": list(s.replicas), "slots": [list(r) for r in s.slots]}
                for s in shards
            ]
            # Where Herald's partitions live (HERALD_REDIS_PARTITIONS of the nodes): each tag's slot and its primary.
            partitions = int(self.env.get("HERALD_REDIS_PARTITIONS", "1"))
            redis_status["partitions"] = [
                {"tag": tag, "slot": slot, "primary": next((s.primary for s in shards if s.serves(slot)), None)}
                for tag, slot in ((tag, key_slot(f"{tag}:id".encode())) for tag in partition_tags(partitions))
            ]
        del nginx["name"]
        result: dict[str, object] = {"front": self.front_url, "redis": redis_status, "nginx": nginx, "nodes": nodes}
        if self.observe:
            url = self.prometheus_url
            prometheus = self._process_status("prometheus", url, lambda: probe_get(f"{url}/-/ready").status_code == 200)
            del prometheus["name"]
            result["prometheus"] = prometheus
        return result

    def describe(self) -> str:
        """Where everything runs and logs, for people."""
        lines = [f"front (nginx)   {self.front_url}   logs {self.logs}/nginx-error.log"]
        lines += [
            f"{name:<15} {self.node_url(i)}   logs {self.logs}/{name}.log" for i, name in enumerate(self.node_names)
        ]
        aof = f"  (AOF in {self.run_dir}/redis)" if self.appendonly else ""
        role = "cluster node" if self.redis_cluster else "replica"
        lines.append(f"redis           {self.redis_url}   logs {self.logs}/redis.log{aof}")
        for name, port in zip(self.redis_names[1:], self.replica_ports, strict=True):
            lines.append(f"{name:<15} redis://127.0.0.1:{port}/0   {role}   logs {self.logs}/{name}.log")
        if self.redis_cluster:
            lines.append("  a Redis Cluster: its shards in `python -m ops.cluster status --json` (redis.shards)")
        for name, port in zip(self.sentinel_names, self.sentinel_ports, strict=True):
            lines.append(f"{name:<15} 127.0.0.1:{port}   sentinel (master {SENTINEL_MASTER!r})")
        if self.observe:
            lines.append(
                f"prometheus      {self.prometheus_url}   scrapes every node's /metrics every {self.scrape_interval}"
                f"   data {self.run_dir}/prometheus   logs {self.logs}/prometheus.log"
            )
            # Debian's build serves the classic UI only (its / redirects there).
            lines.append(f"  targets       {self.prometheus_url}/classic/targets")
            lines.append(f"  alerts        {self.prometheus_url}/classic/alerts   (rules: {PROMETHEUS_RULES})")
        if self.auth:
            lines += [
                f"access control  on: HERALD_JWT_SECRET in {self.secret_file} (mode 0600), given to every node",
                "  a token:      .venv/bin/python -m ops.cluster token [--publish SEL] [--subscribe SEL] [--admin]"
                " [--sub ID] [--ttl S]",
                "                (no rights given: a development token that may publish, subscribe and read /stats)",
                f'  e.g.          curl -H "Authorization: Bearer $(.venv/bin/python -m ops.cluster token --admin)"'
                f" {self.front_url}/stats",
                "  make loadtest and make demo mint their own tokens from it while it runs",
            ]
            if self.observe:
                lines.append(f"  prometheus scrapes with an admin token in {self.prometheus_token_file} (mode 0600)")
        return "\n".join(lines)
