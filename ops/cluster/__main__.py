"""``python -m ops.cluster``: the commands of :mod:`ops.cluster`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import ops.cluster
from ops.cluster.cluster import Cluster
from ops.cluster.processes import alive, is_ours
from ops.launch import ROOT
from ops.probe import free_port, port_is_free
from ops.prometheus import (
    DEFAULT_FIRST_NODE_PORT,
    DEFAULT_NODES,
    PROMETHEUS_DEFAULT_PORT,
    render_prometheus_compose,
    render_prometheus_default,
)

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
            if alive(pid) and is_ours(pid, pid_file.stem):
                names.append(pid_file.stem)
    return names


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run-dir", type=Path, default=ROOT / ".run" / "cluster", help="pid files, logs, state")
    parser = argparse.ArgumentParser(
        prog="python -m ops.cluster",
        description=ops.cluster.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", parents=[common], help="start redis, the nodes and nginx")
    start.add_argument("--nodes", type=int, default=int(os.environ.get("NODES", "3")))
    start.add_argument("--front", type=int, default=8080, help="nginx port")
    start.add_argument("--first-node-port", type=int, default=8001, help="node i listens on this + i")
    start.add_argument("--redis-port", type=int, default=6380)
    start.add_argument("--no-appendonly", action="store_true", help="run Redis without AOF")
    start.add_argument("--sentinel", action="store_true", help="a replica and three sentinels too")
    start.add_argument(
        "--redis-cluster",
        action="store_true",
        help="Redis is a Redis Cluster: 3 primaries with a replica each, on --redis-port and the 5 ports after it",
    )
    start.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="HERALD_REDIS_PARTITIONS of every node: the topics spread over that many partitions (with"
        " --redis-cluster, over the shards)",
    )
    start.add_argument(
        "--read-replicas", action="store_true", help="HERALD_REDIS_READ_REPLICAS=1 for every node (--redis-cluster)"
    )
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
    for verb, what in (("freeze", "SIGSTOP: it hangs, holding its sockets (a drill)"), ("thaw", "SIGCONT")):
        node_command = commands.add_parser(f"{verb}-node", parents=[common], help=f"{what}: one node")
        node_command.add_argument("name", help="node-0, node-1, ...")
        redis_command = commands.add_parser(f"{verb}-redis", parents=[common], help=f"{what}: a redis-server")
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
        taken = taken_ports(args)
        if taken:
            sys.exit("can't start the cluster:\n  " + "\n  ".join(taken))
        cluster = Cluster(
            run_dir,
            front_port=args.front,
            redis_port=args.redis_port,
            node_ports=[args.first_node_port + i for i in range(args.nodes)],
            appendonly=not args.no_appendonly,
            sentinel=args.sentinel,
            replica_ports=(
                [args.redis_port + i for i in range(1, 6)]
                if args.redis_cluster
                else [args.replica_port or args.redis_port + 1]
                if args.sentinel
                else []
            ),
            redis_cluster=args.redis_cluster,
            env=redis_env(args.partitions, args.read_replicas),
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
    elif args.command in ("freeze-node", "thaw-node"):
        index = _node_index(cluster, args.name)
        try:
            pid = cluster.freeze_node(index) if args.command == "freeze-node" else cluster.thaw_node(index)
        except RuntimeError as error:
            sys.exit(str(error))
        print(f"{'froze' if args.command == 'freeze-node' else 'thawed'} {args.name} (pid {pid})")
    elif args.command in ("freeze-redis", "thaw-redis"):
        if args.name not in cluster.redis_names:
            sys.exit(f"no redis process {args.name!r} (this cluster has: {', '.join(cluster.redis_names)})")
        try:
            pid = cluster.freeze_redis(args.name) if args.command == "freeze-redis" else cluster.thaw_redis(args.name)
        except RuntimeError as error:
            sys.exit(str(error))
        print(f"{'froze' if args.command == 'freeze-redis' else 'thawed'} {args.name} (pid {pid})")
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


def taken_ports(args: argparse.Namespace) -> list[str]:
    """One line per port ``start`` would listen on that something else holds: what it is for, and the setting
    (of ``make cluster``, and of this command) that moves it. A second cluster on the machine otherwise collides
    with the first one's fixed ports."""

    def moved_by(make: str, option: str) -> str:
        return f"{make}=<port> (make cluster) or {option} <port>" if make else f"{option} <port>"

    wanted = [(args.front, "the front (nginx)", moved_by("FRONT_PORT", "--front"))]
    node_setting = moved_by("NODE_PORT", "--first-node-port") + " (node i listens on it + i)"
    wanted += [(args.first_node_port + i, f"node-{i}", node_setting) for i in range(args.nodes)]
    redis_setting = moved_by("REDIS_PORT", "--redis-port") + " (replicas: the ports after it)"
    redis_ports = 6 if args.redis_cluster else 1 + bool(args.sentinel and not args.replica_port)
    wanted += [(args.redis_port + i, "redis" if i == 0 else f"redis-{i}", redis_setting) for i in range(redis_ports)]
    if args.sentinel:
        if args.replica_port:
            wanted.append((args.replica_port, "redis-1 (the replica)", moved_by("", "--replica-port")))
        sentinel_setting = moved_by("SENTINEL_PORT", "--first-sentinel-port")
        wanted += [(args.first_sentinel_port + i, f"sentinel-{i}", sentinel_setting) for i in range(3)]
    if args.observe and args.prometheus_port:
        wanted.append((args.prometheus_port, "prometheus", moved_by("", "--prometheus-port")))
    return [
        f"port {port} is taken (wanted for {what}): free it, or move it with {setting}"
        for port, what, setting in wanted
        if not port_is_free(port)
    ]


def redis_env(partitions: int, read_replicas: bool) -> dict[str, str]:
    """The nodes' Redis settings ``start`` was asked for (kept with the cluster: a restarted node gets them too)."""
    env = {"HERALD_REDIS_PARTITIONS": str(partitions)} if partitions > 1 else {}
    if read_replicas:
        env["HERALD_REDIS_READ_REPLICAS"] = "1"
    return env


if __name__ == "__main__":
    main()
