"""A Herald cluster on this machine, without Docker: redis-server, N API nodes, nginx.

``python -m ops.cluster start [--nodes 3] [--front 8080] [--sentinel]`` starts
everything on loopback, writes ``cluster.json``, pid files and logs under
``.run/cluster/`` and prints what runs where. Every other command acts on
that cluster through those files, from any process::

    python -m ops.cluster status [--json]          what runs, and whether it is ready
    python -m ops.cluster restart                  rolling restart of the nodes, one at a time
    python -m ops.cluster stop-node node-1 [--kill]
    python -m ops.cluster start-node node-1
    python -m ops.cluster stop-redis [NAME]        SIGTERM (default: the process named "redis")
    python -m ops.cluster start-redis [NAME]
    python -m ops.cluster failover                 --sentinel clusters: SIGKILL the current primary
    python -m ops.cluster token [--publish SEL]... --auth clusters: print an access token
    python -m ops.cluster stop                     stops exactly the processes named in the pid files
    python -m ops.cluster prometheus-config [--compose]   print ops/prometheus.yml (or ops/prometheus-compose.yml)

With ``--auth`` (``make cluster AUTH=1``) access control is on: ``start``
generates a random ``HERALD_JWT_SECRET``, keeps it in ``jwt-secret`` (mode
0600) in the run directory and gives it to every node, at start and at every
restart; ``python -m ops.cluster token [--publish SEL] [--subscribe SEL]
[--admin] [--sub ID] [--ttl S]`` prints a token signed with it (with no rights
given, a development token that may do everything). ``stop`` deletes the
secret: the next cluster gets a new one.

With ``--observe`` (``make cluster OBSERVE=1``) Debian's ``prometheus`` runs
beside the cluster on a loopback port (9090 when free), scraping every
node's ``/metrics`` with the alert rules of ``ops/prometheus-rules.yml``; its
config is ``prometheus.yml`` and its data ``prometheus/`` in the run
directory. With ``--auth`` too, it scrapes with an admin token minted from
the cluster's secret, kept in ``prometheus-token`` (mode 0600) and named in
its config by ``authorization: credentials_file:``. ``ops/prometheus.yml`` is
that config for the default layout (three nodes from port 8001, no access
control), as ``prometheus-config`` renders it; a test checks they agree.

With ``--sentinel`` Redis runs as a primary (``redis``), a replica
(``redis-1``) and three sentinels (``sentinel-0..2``) watching master name
``herald``; the nodes get ``REDIS_SENTINELS``/``REDIS_SENTINEL_MASTER``
instead of ``REDIS_URL``. The tests drive the same :class:`Cluster` on free
ports, so what they check is what ``make cluster`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from api.token import mint
from ops import launch
from ops.launch import NGINX, REDIS_SERVER, ROOT, SENTINEL_MASTER
from ops.nginx import FrontPolicy, render_local

# Re-exported: tests/test_loadtest.py and older callers import them from here.
from ops.probe import free_port, port_is_free, probe_get, wait_until

__all__ = [
    "NGINX",
    "PROMETHEUS",
    "PROMTOOL",
    "REDIS_SERVER",
    "ROOT",
    "SENTINEL_MASTER",
    "Cluster",
    "free_port",
    "main",
    "wait_until",
]

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
"""Debian's ``prometheus`` (the ``prometheus`` package, installed by ops/install-system-deps.sh)."""
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS_CONF = ROOT / "ops" / "prometheus.yml"
"""The committed config: ``prometheus-config`` for the default cluster (see :func:`render_prometheus`)."""
PROMETHEUS_COMPOSE_CONF = ROOT / "ops" / "prometheus-compose.yml"
"""The committed config compose.yaml mounts: ``prometheus-config --compose``."""
PROMETHEUS_RULES = ROOT / "ops" / "prometheus-rules.yml"
PROMETHEUS_DEFAULT_PORT = 9090
SCRAPE_JOB = "herald"
SCRAPE_TOKEN_TTL = 365 * 24 * 3600
"""Seconds the scrape token of an ``--auth --observe`` cluster is valid: it dies with the cluster's secret anyway."""
COMPOSE_TOKEN_FILE = "/run/herald/prometheus-token"
"""Where compose.yaml's ``prometheus-token`` service leaves the scrape token for the ``prometheus`` service."""
DEFAULT_FIRST_NODE_PORT = 8001
DEFAULT_NODES = 3

READY = "ready"
NOT_READY = "not-ready"
STOPPED = "stopped"


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

    def __post_init__(self) -> None:
        self.run_dir = self.run_dir.resolve()
        self.redis_port = self.redis_port or free_port()
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
        _write_private(self.secret_file, secrets.token_urlsafe(48) + "\n")

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
        try:
            for name in self.redis_names:
                self.start_redis_process(name)
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
                raise _Exited(process.returncode)
            return check()

        try:
            wait_until(started, name, timeout, fatal=(_Exited,))
        except (_Exited, RuntimeError) as error:
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
        client = _redis_client(port)
        try:
            self._wait_started(name, client.ping)
        finally:
            client.close()

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
        info = _sentinel_master(port)
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
            _write_private(self.prometheus_token_file, token + "\n")
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
                    try:
                        wait_until(lambda: not _alive(pid), name, timeout)
                    except RuntimeError:
                        os.kill(pid, signal.SIGKILL)
                        wait_until(lambda: not _alive(pid), name, timeout)
        pid_file.unlink(missing_ok=True)

    def kill_node(self, index: int) -> None:
        self.signal(f"node-{index}", signal.SIGKILL)

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
            if _alive(pid) and _is_ours(pid, name):
                return pid
        return None

    def primary(self) -> str | None:
        """The redis process the sentinels name as primary now; None without sentinels or an answer."""
        for port in self.sentinel_ports:
            try:
                address = _sentinel_command(port, "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER)
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
        else:
            try:
                state = READY if probe() else NOT_READY
            except Exception:
                state = NOT_READY
        return {"name": name, "url": url, "pid": pid, "state": state}

    def _redis_status(self, name: str, port: int) -> dict[str, object]:
        def ping() -> bool:
            client = _redis_client(port)
            try:
                return client.ping() is True
            finally:
                client.close()

        return self._process_status(name, f"redis://127.0.0.1:{port}/0", ping)

    def status(self) -> dict[str, object]:
        """What runs and whether it answers, from this or any other process (by pid file).

        ``{"front": url, "redis": {...}, "nginx": {...}, "nodes": [...]}``; each
        process entry is ``{"name", "url", "pid", "state"}``, ``pid`` None and
        ``state`` ``"stopped"`` when it does not run, else ``"ready"`` (a node's
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
        lines.append(f"redis           {self.redis_url}   logs {self.logs}/redis.log{aof}")
        for name, port in zip(self.redis_names[1:], self.replica_ports, strict=True):
            lines.append(f"{name:<15} redis://127.0.0.1:{port}/0   replica   logs {self.logs}/{name}.log")
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


def _redis_client(port: int, decode_responses: bool = False) -> redis.Redis:
    """A client for one quick question to 127.0.0.1:``port``.

    No retries: redis-py retries a refused connection with backoff by
    default, which turns every "is it up yet?" into seconds of waiting.
    """
    return redis.Redis(
        port=port,
        socket_connect_timeout=0.5,
        socket_timeout=2,
        decode_responses=decode_responses,
        retry=Retry(NoBackoff(), 0),
    )


def _write_private(path: Path, text: str) -> None:
    """``text`` in a new file at ``path``, created readable by its owner only."""
    path.unlink(missing_ok=True)  # a file left by someone else keeps its mode: start afresh
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)


def prometheus_args(config: Path, data_dir: Path, port: int, retention: str = "7d") -> list[str]:
    """Debian's ``prometheus`` with ``config``, its TSDB in ``data_dir``, listening on 127.0.0.1:``port`` only."""
    return [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir}",
        f"--storage.tsdb.retention.time={retention}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]


PROMETHEUS_HEADER = """\
# GENERATED by `python -m ops.cluster prometheus-config{options} > {path}`: edit
# render_prometheus in ops/cluster.py, then regenerate (tests/test_prometheus.py checks they agree).
"""

_LOCAL_INTRO = """\
# Prometheus for `make cluster` (three nodes on 127.0.0.1:8001-8003). `make cluster OBSERVE=1` runs
# Debian's prometheus with this config rendered for the cluster's real ports (.run/cluster/prometheus.yml).
# Run it yourself: prometheus --config.file=ops/prometheus.yml --web.listen-address=127.0.0.1:9090
"""

_COMPOSE_INTRO = """\
# Prometheus for compose.yaml: every replica of the `api` service (Docker's DNS answers one
# address per replica), scraped with the admin token the `prometheus-token` service writes.
"""


def render_prometheus(
    targets: list[str] | None = None,
    *,
    dns_name: str | None = None,
    dns_port: int = 8000,
    scrape_interval: str = "5s",
    rule_file: str = "prometheus-rules.yml",
    credentials_file: str | None = None,
    intro: str = "",
) -> str:
    """A Prometheus config scraping Herald nodes: ``targets`` (``host:port``), or every address of ``dns_name``.

    ``rule_file`` is resolved by Prometheus relative to the config's own
    directory. ``credentials_file`` holds the admin token sent as
    ``Authorization: Bearer`` (Prometheus reads it at every scrape), for
    nodes with access control on; none when metrics are public.
    """
    if (targets is None) == (dns_name is None):
        raise ValueError("give either targets or dns_name")
    lines = [
        intro.rstrip("\n"),
        "global:",
        f"  scrape_interval: {scrape_interval}",
        f"  evaluation_interval: {scrape_interval}",
        "",
        "# Alerts: a node down, slow-client cut-offs rising, publish errors, Redis feed down.",
        "rule_files:",
        f"  - {rule_file}",
        "",
        "scrape_configs:",
        f"  - job_name: {SCRAPE_JOB}",
        "    metrics_path: /metrics",
    ]
    if credentials_file is not None:
        lines += [
            "    # Nodes with access control on answer /metrics to an admin token only (or HERALD_METRICS_PUBLIC=1);",
            "    # Prometheus reads the file at every scrape. Nodes without access control ignore it.",
            "    authorization:",
            "      type: Bearer",
            f"      credentials_file: {credentials_file}",
        ]
    else:
        lines += [
            "    # Nodes with access control on answer /metrics to an admin token only (or HERALD_METRICS_PUBLIC=1):",
            "    # authorization: {type: Bearer, credentials_file: <a file holding an admin token>}",
            "    # (`make cluster AUTH=1 OBSERVE=1` writes one, minted from the cluster's secret, and names it here).",
        ]
    if targets is not None:
        lines += ["    static_configs:", "      - targets:", *(f"          - {target}" for target in targets)]
    else:
        lines += [
            "    dns_sd_configs:",
            f"      - names: [{dns_name}]",
            "        type: A",
            f"        port: {dns_port}",
            "        refresh_interval: 15s",
        ]
    return "\n".join(lines).lstrip("\n") + "\n"


def render_prometheus_default(nodes: int = DEFAULT_NODES, first_node_port: int = DEFAULT_FIRST_NODE_PORT) -> str:
    """``ops/prometheus.yml``: the nodes of ``make cluster`` (default layout), rules beside the config."""
    options = (
        ""
        if (nodes, first_node_port) == (DEFAULT_NODES, DEFAULT_FIRST_NODE_PORT)
        else (f" --nodes {nodes} --first-node-port {first_node_port}")
    )
    header = PROMETHEUS_HEADER.format(options=options, path="ops/prometheus.yml")
    targets = [f"127.0.0.1:{first_node_port + i}" for i in range(nodes)]
    return render_prometheus(targets, intro=header + _LOCAL_INTRO)


def render_prometheus_compose() -> str:
    """``ops/prometheus-compose.yml``: every replica of compose's ``api`` service, with the scrape token."""
    header = PROMETHEUS_HEADER.format(options=" --compose", path="ops/prometheus-compose.yml")
    return render_prometheus(
        dns_name="api", dns_port=8000, credentials_file=COMPOSE_TOKEN_FILE, intro=header + _COMPOSE_INTRO
    )


class _Exited(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"exited with {code}")


def _sentinel_command(port: int, *args: str) -> object:
    """``SENTINEL <args>`` sent to the sentinel on ``port``, its reply as decoded strings."""
    client = _redis_client(port, decode_responses=True)
    try:
        reply: object = client.execute_command("SENTINEL", *args)  # type: ignore[no-untyped-call]
        return reply
    finally:
        client.close()


def _sentinel_master(port: int) -> dict[str, str]:
    """``SENTINEL MASTER herald`` as a dict of strings (a flat list of names and values on the wire)."""
    reply = _sentinel_command(port, "MASTER", SENTINEL_MASTER)
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    assert isinstance(reply, list), reply
    items = [str(x) for x in reply]
    return dict(zip(items[::2], items[1::2], strict=True))


def _expected_program(name: str) -> str:
    """What the command line of process ``name`` contains (redis-server retitles itself, keeping its name)."""
    if name.startswith(("redis", "sentinel")):
        return "redis-server"
    if name == "nginx":
        return "nginx"
    if name == "prometheus":
        return "prometheus --config.file="
    return "-m api"


def _is_ours(pid: int, name: str) -> bool:
    """Whether ``pid`` runs what the pid file ``name`` was written for."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return _expected_program(name) in cmdline


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs. A zombie does not: it is dead, waiting for a parent
    (maybe another program, such as a test that started the cluster) to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# -- command line ------------------------------------------------------------------


def _node_index(cluster: Cluster, name: str) -> int:
    if name not in cluster.node_names:
        sys.exit(f"no node {name!r} in this cluster (nodes: {', '.join(cluster.node_names)})")
    return cluster.node_names.index(name)


def _print_status(cluster: Cluster, status: dict[str, object]) -> None:
    """``status`` as a table: one line per process, redis processes with their role."""
    rows: list[tuple[str, str, str, str]] = []

    def row(name: str, entry: object, note: str = "") -> None:
        assert isinstance(entry, dict)
        pid = entry["pid"]
        rows.append((name, str(entry["state"]), "-" if pid is None else str(pid), f"{entry['url']}{note}"))

    row("nginx", status["nginx"])
    if "prometheus" in status:
        row("prometheus", status["prometheus"])
    nodes = status["nodes"]
    assert isinstance(nodes, list)
    for node in nodes:
        row(node["name"], node)
    redis_status = status["redis"]
    assert isinstance(redis_status, dict)
    if not cluster.sentinel:
        row("redis", redis_status)
    else:
        primary = redis_status["primary"]
        for name in cluster.redis_names:  # the primary is not among the "replicas": list them all
            role = "primary" if name == primary else "replica"
            row(name, cluster._redis_status(name, cluster.redis_port_of(name)), f"   {role}")
        for sentinel in redis_status["sentinels"]:
            row(sentinel["name"], sentinel, f"   sentinel, master {redis_status['master_name']!r}")
    print(f"front {status['front']}")
    print(f"{'NAME':<12} {'STATE':<10} {'PID':<8} URL")
    for name, state, pid, url in rows:
        print(f"{name:<12} {state:<10} {pid:<8} {url}")
    if cluster.auth:
        print("access control on: tokens from `python -m ops.cluster token` (--help for their rights)")


def _default_prometheus_port() -> int:
    """Prometheus' own default port when nothing listens on it, else any free loopback port."""
    return PROMETHEUS_DEFAULT_PORT if port_is_free(PROMETHEUS_DEFAULT_PORT) else free_port()


def _running_names(run_dir: Path) -> list[str]:
    """Processes named by pid files in ``run_dir`` that still run what they were started as."""
    names = []
    for pid_file in sorted(run_dir.glob("*.pid")):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            if _alive(pid) and _is_ours(pid, pid_file.stem):
                names.append(pid_file.stem)
    return names


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run-dir", type=Path, default=ROOT / ".run" / "cluster", help="pid files, logs, state")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", parents=[common], help="start redis, the nodes and nginx")
    start.add_argument("--nodes", type=int, default=int(os.environ.get("NODES", "3")))
    start.add_argument("--front", type=int, default=8080, help="nginx port")
    start.add_argument("--first-node-port", type=int, default=8001, help="node i listens on this + i")
    start.add_argument("--redis-port", type=int, default=6380)
    start.add_argument("--no-appendonly", action="store_true", help="run Redis without AOF")
    start.add_argument("--sentinel", action="store_true", help="a replica and three sentinels too")
    start.add_argument(
        "--auth", action="store_true", help="access control on: a random HERALD_JWT_SECRET for every node"
    )
    start.add_argument(
        "--observe", action="store_true", help="Prometheus too, scraping every node (Debian's prometheus)"
    )
    start.add_argument(
        "--prometheus-port",
        type=int,
        default=0,
        help=f"with --observe (default: {PROMETHEUS_DEFAULT_PORT} when free, else any free port)",
    )
    start.add_argument("--scrape-interval", default="5s", help="with --observe: Prometheus' (default %(default)s)")
    start.add_argument(
        "--tls", action="store_true", help="the front serves https:// and HTTP/2, with a certificate made for it"
    )
    start.add_argument("--replica-port", type=int, default=0, help="default: the redis port + 1")
    start.add_argument("--first-sentinel-port", type=int, default=26380, help="sentinel i listens on this + i")
    commands.add_parser("stop", parents=[common], help="stop every process of the cluster")
    commands.add_parser("restart", parents=[common], help="rolling restart of the nodes")
    status = commands.add_parser("status", parents=[common], help="what runs, and whether it is ready")
    status.add_argument("--json", action="store_true")
    stop_node = commands.add_parser("stop-node", parents=[common], help="SIGTERM (or SIGKILL) one node")
    stop_node.add_argument("name", help="node-0, node-1, ...")
    stop_node.add_argument("--kill", action="store_true", help="SIGKILL: no goodbye to its clients")
    start_node = commands.add_parser("start-node", parents=[common], help="start one node again")
    start_node.add_argument("name")
    for verb in ("stop", "start"):
        redis_command = commands.add_parser(f"{verb}-redis", parents=[common], help=f"{verb} a redis-server")
        redis_command.add_argument("name", nargs="?", default="redis", help="redis (default), redis-1, ...")
    commands.add_parser("failover", parents=[common], help="--sentinel clusters: SIGKILL the current primary")
    config = commands.add_parser(
        "prometheus-config",
        help="print ops/prometheus.yml (the default cluster's), or with --compose ops/prometheus-compose.yml",
    )
    config.add_argument("--compose", action="store_true", help="compose.yaml's: every replica of the api service")
    config.add_argument("--nodes", type=int, default=DEFAULT_NODES)
    config.add_argument("--first-node-port", type=int, default=DEFAULT_FIRST_NODE_PORT)
    token = commands.add_parser(
        "token",
        parents=[common],
        help="--auth clusters: print an access token signed with the cluster's secret",
        description="Print an access token for this cluster. With no --publish, --subscribe or --admin: a "
        "development token that may publish and subscribe to every topic and read /stats.",
    )
    token.add_argument("--publish", action="append", metavar="SELECTOR", help="may publish to (repeat)")
    token.add_argument("--subscribe", action="append", metavar="SELECTOR", help="may subscribe to (repeat)")
    token.add_argument("--admin", action="store_true", help="may read /stats")
    token.add_argument("--sub", help="the subject ({sub} in selectors)")
    token.add_argument("--ttl", type=float, default=3600, help="seconds until it expires (default %(default)g)")
    args = parser.parse_args(argv)
    if args.command == "prometheus-config":
        print(render_prometheus_compose() if args.compose else render_prometheus_default(args.nodes,
              args.first_node_port), end="")  # fmt: skip
        return
    run_dir: Path = args.run_dir

    if args.command == "start":
        running = _running_names(run_dir)
        if running:
            sys.exit(f"a cluster is already running from {run_dir} ({', '.join(running)}): stop it first")
        for stale in run_dir.glob("*.pid"):
            stale.unlink()
        cluster = Cluster(
            run_dir,
            front_port=args.front,
            redis_port=args.redis_port,
            node_ports=[args.first_node_port + i for i in range(args.nodes)],
            appendonly=not args.no_appendonly,
            sentinel=args.sentinel,
            replica_ports=[args.replica_port or args.redis_port + 1] if args.sentinel else [],
            sentinel_ports=[args.first_sentinel_port + i for i in range(3)] if args.sentinel else [],
            auth=args.auth,
            observe=args.observe,
            prometheus_port=(args.prometheus_port or _default_prometheus_port()) if args.observe else 0,
            scrape_interval=args.scrape_interval,
            tls=args.tls,
        )
        cluster.start()
        # The processes outlive this command; the other commands find them by their pid files.
        cluster.processes.clear()
        print(cluster.describe())
        return
    try:
        cluster = Cluster.load(run_dir)
    except FileNotFoundError:
        if args.command != "stop":
            sys.exit(f"no cluster was started from {run_dir} (no {Cluster.STATE_FILE})")
        cluster = Cluster(run_dir, nodes=0, redis_port=1)  # stops whatever pid files name
    if args.command == "stop":
        names = _running_names(run_dir)
        cluster.stop()
        print(f"stopped: {', '.join(names) or 'nothing was running'}")
    elif args.command == "restart":
        cluster.restart_nodes(on_step=lambda text: print(text, flush=True))
    elif args.command == "status":
        state = cluster.status()
        if args.json:
            print(json.dumps(state, indent=2))
        else:
            _print_status(cluster, state)
    elif args.command == "stop-node":
        cluster.stop_node(_node_index(cluster, args.name), kill=args.kill)
        print(f"{'killed' if args.kill else 'stopped'} {args.name}")
    elif args.command == "start-node":
        cluster.start_node(_node_index(cluster, args.name))
        print(f"{args.name} ready at {cluster.node_url(_node_index(cluster, args.name))}")
    elif args.command in ("stop-redis", "start-redis"):
        if args.name not in cluster.redis_names:
            sys.exit(f"no redis process {args.name!r} (this cluster has: {', '.join(cluster.redis_names)})")
        if args.command == "stop-redis":
            cluster.stop_redis_process(args.name)
            print(f"stopped {args.name}")
        else:
            cluster.start_redis_process(args.name)
            print(f"{args.name} ready at redis://127.0.0.1:{cluster.redis_port_of(args.name)}/0")
    elif args.command == "failover":
        try:
            killed = cluster.failover_redis()
        except RuntimeError as error:
            sys.exit(str(error))
        print(f"killed the primary {killed}; the sentinels promote a replica (see `status`)")
    elif args.command == "token":
        if args.ttl <= 0:
            sys.exit("--ttl must be positive")
        if not (args.publish or args.subscribe or args.admin):
            args.publish, args.subscribe, args.admin = ["**"], ["**"], True  # the development token
        try:
            print(cluster.token(publish=args.publish, subscribe=args.subscribe, admin=args.admin, sub=args.sub,
                                ttl=args.ttl))  # fmt: skip
        except RuntimeError as error:
            sys.exit(str(error))
    cluster.processes.clear()


if __name__ == "__main__":
    main()
