"""A Redis Cluster on loopback: redis-server processes in cluster mode, joined by ``redis-cli --cluster create``.

What a deployment that outgrew one Redis runs (hash slots spread over
primaries, each with replicas that take over when it dies), started from
Debian's ``redis-server`` and ``redis-cli`` the way an operator would:
``redis-server --cluster-enabled yes`` per process, then one
``redis-cli --cluster create … --cluster-replicas N --cluster-yes``. Each
process has its own data directory (its ``nodes.conf`` and AOF) and log;
it is stopped by the pid this object started.

``node_timeout`` is ``cluster-node-timeout``: how long a primary may miss
pings before its replicas take over. Loopback clusters are for tests and
drills, so it is short (2 s; Redis's default is 15 s).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ops import launch
from ops.cluster.sentinel import redis_client
from ops.probe import free_port, wait_until

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
SLOTS = 16384


@dataclass(frozen=True)
class Shard:
    """One primary, the slot ranges it serves and its replicas (ports), as ``CLUSTER SHARDS`` says now."""

    primary: int
    replicas: tuple[int, ...]
    slots: tuple[tuple[int, int], ...]

    @property
    def slot_count(self) -> int:
        return sum(end - start + 1 for start, end in self.slots)

    def serves(self, slot: int) -> bool:
        return any(start <= slot <= end for start, end in self.slots)


def cluster_args(port: int, bus_port: int, data_dir: Path, node_timeout_ms: int) -> list[str]:
    """redis-server in cluster mode on 127.0.0.1:``port``, its nodes.conf and AOF (fsync always) in ``data_dir``.

    ``bus_port`` is the cluster bus (``cluster-port``): named, because Redis's default (the port + 10,000)
    may be taken, and is refused for a port above 55,535.
    """
    return [
        *launch.redis_args(port, data_dir=data_dir, appendonly=True, logfile=data_dir / "redis.log"),
        "--cluster-enabled", "yes",
        "--cluster-port", str(bus_port),
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(node_timeout_ms),
    ]  # fmt: skip


def _flat(reply: object) -> dict[str, object]:
    """A RESP2 map (a flat list of names and values) or a RESP3 one, as a dict with str keys."""
    if isinstance(reply, dict):
        return {str(k): v for k, v in reply.items()}
    assert isinstance(reply, list), reply
    return {str(k): v for k, v in zip(reply[::2], reply[1::2], strict=True)}


def shards_of(port: int) -> list[Shard]:
    """The cluster's shards as the node on ``port`` sees them (``CLUSTER SHARDS``, Redis 7), primaries only
    counting when they are up (a failed primary's shard is the replica that took over)."""
    client = redis_client(port, decode_responses=True)
    try:
        reply = client.execute_command("CLUSTER SHARDS")  # type: ignore[no-untyped-call]
    finally:
        client.close()
    shards: list[Shard] = []
    for entry in reply:
        shard = _flat(entry)
        slots = [int(s) for s in shard["slots"]]  # type: ignore[attr-defined]
        nodes = [_flat(n) for n in shard["nodes"]]  # type: ignore[attr-defined]
        healthy = [n for n in nodes if n.get("health") == "online"]
        primaries = [int(str(n["port"])) for n in healthy if n.get("role") == "master"]
        if not primaries or not slots:
            continue
        replicas = tuple(sorted(int(str(n["port"])) for n in healthy if n.get("role") == "replica"))
        ranges = tuple((slots[i], slots[i + 1]) for i in range(0, len(slots), 2))
        shards.append(Shard(primaries[0], replicas, ranges))
    return sorted(shards, key=lambda s: s.slots[0][0])


def create(ports: list[int], replicas: int, timeout: float = 60.0) -> None:
    """Join the redis-servers on ``ports`` into one cluster, ``replicas`` per primary (redis-cli --cluster create)."""
    command = [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
    command += ["--cluster-replicas", str(replicas), "--cluster-yes"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")


def complete(shards: list[Shard], primaries: int, replicas: int) -> bool:
    """Whether ``shards`` are ``primaries`` serving every slot, each with ``replicas`` replicas."""
    return (
        len(shards) == primaries
        and sum(s.slot_count for s in shards) == SLOTS
        and all(len(s.replicas) == replicas for s in shards)
    )


def node_id(port: int) -> str:
    """The cluster node id of the redis-server on ``port`` (``CLUSTER MYID``)."""
    client = redis_client(port, decode_responses=True)
    try:
        return str(client.execute_command("CLUSTER MYID"))  # type: ignore[no-untyped-call]
    finally:
        client.close()


def reshard(source: int, target: int, slots: int, timeout: float = 120.0) -> None:
    """Move ``slots`` slots from the primary on ``source`` to the one on ``target`` (``redis-cli --cluster
    reshard``, as an operator does it: the source's lowest-numbered slots, their keys migrated while serving)."""
    command = [REDIS_CLI, "--cluster", "reshard", f"127.0.0.1:{source}"]
    command += ["--cluster-from", node_id(source), "--cluster-to", node_id(target)]
    command += ["--cluster-slots", str(slots), "--cluster-yes"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster reshard failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")


@dataclass
class RedisCluster:
    """``primaries`` x (1 + ``replicas``) redis-server processes on ``ports``, one cluster once :meth:`start` ends.

    ``bus_ports`` (the cluster bus of each, in the same order) are free loopback ports unless given.
    """

    ports: list[int]
    data_dir: Path
    primaries: int = 3
    replicas: int = 1
    node_timeout_ms: int = 2000
    bus_ports: list[int] = field(default_factory=list)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bus_ports = self.bus_ports or [free_port() for _ in self.ports]
        if len(self.ports) != self.primaries * (1 + self.replicas):
            raise ValueError(f"{self.primaries} primaries with {self.replicas} replica(s) each need "
                             f"{self.primaries * (1 + self.replicas)} ports, got {len(self.ports)}")  # fmt: skip

    @property
    def url(self) -> str:
        """A seed: any node of the cluster will do for a cluster-aware client."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout: float = 60.0) -> None:
        """Start every process, create the cluster, and wait until every slot is served and every replica is in."""
        for port in self.ports:
            self.start_process(port)
        for port in self.ports:
            wait_until(lambda p=port: redis_client(p).ping(), f"redis-server on {port}", timeout)  # type: ignore[misc]
        create(self.ports, self.replicas, timeout)
        wait_until(self.ready, "the Redis Cluster serving every slot, every replica in", timeout)

    def start_process(self, port: int) -> None:
        """Start (or restart, with its data) the redis-server on ``port``."""
        data = self.data_dir / f"redis-{port}"
        data.mkdir(parents=True, exist_ok=True)
        bus = self.bus_ports[self.ports.index(port)]
        self.processes[port] = launch.spawn(cluster_args(port, bus, data, self.node_timeout_ms))

    def ready(self) -> bool:
        """Every process says ``cluster_state:ok``, and the shards are the primaries, each with its replicas."""
        for port in self.running_ports():
            client = redis_client(port, decode_responses=True)
            try:
                info = client.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
            finally:
                client.close()
            state = info.get("cluster_state") if isinstance(info, dict) else None  # redis-py parses it
            if state != "ok":
                return False
        return complete(self.shards(), self.primaries, self.replicas)

    def shards(self) -> list[Shard]:
        """The shards now, as the first running process sees them."""
        return shards_of(self.running_ports()[0])

    def running_ports(self) -> list[int]:
        return [port for port, process in self.processes.items() if process.poll() is None]

    def kill(self, port: int) -> None:
        """SIGKILL the process on ``port`` (a primary's replica takes over after ``node_timeout_ms``)."""
        process = self.processes[port]
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        """SIGTERM every process this object started, and wait for each."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
