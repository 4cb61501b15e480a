"""The load tool's options: the command line, its defaults, and the checks made before anything connects."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import resource
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from urllib.parse import quote, urlsplit

import jwt

from api.auth.keys import HMAC_ALGORITHMS, MIN_SECRET_BYTES
from api.token import mint_from_environment

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_TARGET = "http://127.0.0.1:8080"
SYSTEMS = {
    "herald": "POST /publish (JSON batches), GET /events?topic=...",
    "nchan": "POST /pub/<topic> (one event per request), GET /sub/<topic>",
    "sse-starlette": "POST /publish?topic=<topic> (one event per request), GET /events?topic=<topic>",
}
"""Systems the tool can drive, and how it publishes and subscribes on each."""

PROTOCOLS = {
    "native": "Herald's own API: POST /publish, GET /events?topic=...",
    "mercure": "the Mercure hub of every node: POST /.well-known/mercure (a form, one update per request), "
    "GET /.well-known/mercure?match=...",
}
"""The APIs of a Herald node the tool can drive (``--protocol``)."""
MERCURE_PATH = "/.well-known/mercure"

FAULT_OPTIONS = {
    "kill_node_at": "--kill-node-at",
    "restart_nodes_at": "--restart-nodes-at",
    "stop_all_nodes_at": "--stop-all-nodes-at",
    "restart_redis_at": "--restart-redis-at",
    "failover_redis_at": "--failover-redis-at",
    "freeze_node_at": "--freeze-node-at",
    "freeze_redis_at": "--freeze-redis-at",
}
"""The faults a run can inject (config field: option), each at a time in seconds after publishing started."""

FAULT_SHORTHANDS = {"freeze": "freeze_node_at", "freeze-redis": "freeze_redis_at"}
"""``--fault KIND``: a fault by name, at :data:`DEFAULT_FAULT_AT` unless its own ``--...-at`` option says when."""
DEFAULT_FAULT_AT = 5.0
"""When a fault named by ``--fault`` alone happens: seconds after publishing started, past the first
second's warm-up, so the run has a steady state before it to compare with."""
DEFAULT_FREEZE_SECONDS = 40.0
"""How long a freeze lasts by default (``--freeze-for``): longer than the front's read timeout on a silent
stream (20 s with the default heartbeat) and than a subscriber's silence limit (:data:`SILENCE_HEARTBEATS`
heartbeats, 30 s by default), so both give up on the frozen node before it thaws."""

DEFAULT_HEARTBEAT = 15.0
"""The nodes' ``HERALD_HEARTBEAT`` when the environment does not say: the longest they leave an idle stream silent."""
SILENCE_HEARTBEATS = 2.0
"""A stream silent for this many heartbeats is dead (a hung node, a half-open connection): the default of
``--silence-timeout``, which allows for one heartbeat lost to a busy node's lag."""

AUTH_SOURCES = {
    "none": "no token (access control off)",
    "given": "a token given with --token",
    "minted": "a token minted from HERALD_JWT_SECRET for this run's topics",
}
"""Where a run's access token came from (``config.auth`` in the result; the token itself is never kept)."""
TOKEN_MARGIN = 3600.0
"""Seconds a minted token outlives the longest the run can take: it never expires mid-run."""

NODE_FAULTS = ("kill_node_at", "restart_nodes_at", "stop_all_nodes_at", "freeze_node_at")
REDIS_FAULTS = ("restart_redis_at", "failover_redis_at", "freeze_redis_at")
"""Faults acting on the same processes: at most one of each group per run, so they never overlap."""


@dataclass
class LoadConfig:
    """One run. Subscriber ``i`` takes topics ``(i*per_conn + j) % topics`` and target ``i % len(targets)``."""

    targets: list[str] = field(default_factory=lambda: [DEFAULT_TARGET])
    system: str = "herald"  # or a peer of `make bench`: "nchan", "sse-starlette"
    protocol: str = "native"  # or "mercure": Herald's Mercure hub (PROTOCOLS)
    mercure_audience: str | None = None
    """The ``aud`` of minted Mercure tokens (``--mercure-audience``, default ``HERALD_MERCURE_AUDIENCE``)."""
    subscribers: int = 1000
    topics: int = 1
    per_conn: int = 1
    rate: float = 100.0
    duration: float = 10.0
    payload: int = 100
    publish: str = "http"  # or "redis"
    redis_url: str | None = None
    publishers: int = 4
    batch: int = 100
    batch_bytes: int = 1_000_000
    read_pause_ms: float = 0.0
    publisher: str = "python"  # or "native": the compiled publisher (workers/loadtest/native_publisher.py)
    pipeline: int = 1  # requests in flight per publish connection (--publisher native)
    per_request: int = 1  # events in each publish request (--publisher native; more than 1: Herald only)
    ramp: float = 1.0
    connect_timeout: float = 30.0
    drain: float = 10.0
    retry_for: float = 30.0
    seed: int = 1
    procs: int = 1
    client: str = "python"  # or "native": the compiled worker (workers/loadtest/native.py)
    json_path: Path | None = None
    report_path: Path | None = None
    kill_node_at: float | None = None
    kill_node: int = 0
    restart_node_after: float | None = None
    restart_redis_at: float | None = None
    restart_nodes_at: float | None = None
    stop_all_nodes_at: float | None = None
    stop_all_for: float | None = None
    failover_redis_at: float | None = None
    freeze_node_at: float | None = None
    freeze_node: int = 0
    freeze_redis_at: float | None = None
    freeze_for: float = DEFAULT_FREEZE_SECONDS
    """How long a freeze (``--freeze-node-at``, ``--freeze-redis-at``) holds the process stopped."""
    heartbeat: float = DEFAULT_HEARTBEAT
    """The nodes' ``HERALD_HEARTBEAT`` (``--heartbeat``): what the default silence limit is reckoned from."""
    silence_timeout: float | None = None
    """Seconds a subscriber's open stream may deliver no byte before it counts as dead, is closed and
    resumed (``--silence-timeout``); 0: never; None: :attr:`silence_seconds` decides."""
    cluster_dir: Path = ROOT / ".run" / "cluster"
    allow_remote: bool = False
    progress: bool = True
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    token: str | None = field(default=None, repr=False)
    """Herald's access token, for subscribers and publishers alike: never printed, never in the result."""
    auth: str = "none"
    """Where :attr:`token` came from: one of :data:`AUTH_SOURCES` (what the result records instead of it)."""
    server_counts: bool = True
    """Read every node's ``/metrics`` before and after the run, and put its counts beside the tool's."""
    metrics_from: list[str] = field(default_factory=list)
    """The nodes to read (``--metrics-from``); empty: the local cluster's nodes, or the targets."""
    metrics_token: str | None = field(default=None, repr=False)
    """An admin token for ``/metrics`` (``--metrics-token``, or minted with :attr:`token`); never in the result."""
    nodes_shared: bool = False
    """Other clients may use the nodes during the run: the nodes' counts are compared as "at least"."""

    def topic_name(self, index: int) -> str:
        return f"lt-{self.run_id}-{index}"

    def subscribe_path(self, topics: list[int]) -> str:
        return subscribe_path(self.system, [self.topic_name(t) for t in topics], self.protocol)

    def topics_of(self, subscriber: int) -> list[int]:
        count = min(self.per_conn, self.topics)
        return list(dict.fromkeys((subscriber * self.per_conn + j) % self.topics for j in range(count)))

    @property
    def has_faults(self) -> bool:
        return any(getattr(self, name) is not None for name in FAULT_OPTIONS)

    @property
    def topic_selector(self) -> str:
        """The selector covering this run's topics (and the publishers' warm-up ones), and no other."""
        return f"lt-{self.run_id}-*"

    @property
    def events_per_request(self) -> int:
        """Events one publish request holds at most: ``--batch``, and no more than ``--batch-bytes`` of them."""
        per_event = self.payload + EVENT_OVERHEAD_BYTES
        return max(1, min(self.batch, self.batch_bytes // per_event))

    @property
    def silence_seconds(self) -> float:
        """The subscribers' silence limit: :attr:`silence_timeout` when given, else :data:`SILENCE_HEARTBEATS`
        heartbeats against Herald, and none (0) against a peer, which need not send heartbeats (nchan
        sends none by default: an idle stream of it is silent, not dead)."""
        if self.silence_timeout is not None:
            return self.silence_timeout
        return SILENCE_HEARTBEATS * self.heartbeat if self.system == "herald" else 0.0

    @property
    def longest_seconds(self) -> float:
        """An upper bound of the run's length: every phase at its longest."""
        faults = sum(v for v in (self.restart_node_after, self.stop_all_for) if v is not None)
        faults += sum(self.freeze_for for at in (self.freeze_node_at, self.freeze_redis_at) if at is not None)
        return self.ramp + self.connect_timeout + self.duration + self.retry_for + self.drain + faults

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        del data["token"]  # a credential: the result says only where it came from ("auth")
        del data["metrics_token"]  # likewise
        for key in ("json_path", "report_path", "cluster_dir"):
            data[key] = None if data[key] is None else str(data[key])
        return data


EVENT_OVERHEAD_BYTES = 200
"""What an event adds to its payload on the wire and as a stream frame, at most: its sequence and times, the
JSON around them, the frame's ``id:`` and ``data:`` lines."""


def subscribe_path(system: str, topics: list[str], protocol: str = "native") -> str:
    """The subscription URL path of one connection to ``topics``, in the target system's (and protocol's) shape."""
    if system == "nchan":
        return f"/sub/{topics[0]}"  # one topic per connection
    if protocol == "mercure":
        return MERCURE_PATH + "?" + "&".join(f"match={quote(t, safe='')}" for t in topics)
    return "/events?" + "&".join(f"topic={t}" for t in topics)


def mercure_claims(
    audience: str, selector: str, *, ttl: float, sub: str | None = None, issuer: str | None = None
) -> dict[str, object]:
    """The claims of a Mercure access token that may publish and subscribe to the topics ``selector``
    matches (a URL pattern, relative to the hub: ``lt-<run id>-*``)."""
    now = int(time.time())
    topics = [{"match": selector, "match_type": "urlpattern"}]
    body: dict[str, object] = {
        "aud": audience,
        "iat": now,
        "exp": now + int(ttl),
        "authorization_details": [
            {"type": "mercure", "actions": ["publish"], "topics": topics},
            {"type": "mercure", "actions": ["subscribe"], "topics": topics},
        ],
    }
    if sub is not None:
        body["sub"] = sub
    if issuer:
        body["iss"] = issuer
    return body


def mint_mercure(secret: str, audience: str, selector: str, *, ttl: float, sub: str | None = None) -> str:
    """A Mercure access token (``typ: at+jwt``) signed with ``secret``, as the nodes' hub validates it.

    The algorithm is the first of ``HERALD_JWT_ALGORITHMS`` (HS256 by
    default), the issuer the first of ``HERALD_MERCURE_ISSUERS`` when that is
    set. Raises ValueError for a secret too short or a non-HMAC algorithm.
    """
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"the secret must be at least {MIN_SECRET_BYTES} bytes")
    algorithm = (os.environ.get("HERALD_JWT_ALGORITHMS") or "HS256").split(",")[0].strip() or "HS256"
    if algorithm not in HMAC_ALGORITHMS:
        raise ValueError(f"{algorithm} is not an HMAC algorithm ({sorted(HMAC_ALGORITHMS)})")
    issuer = (os.environ.get("HERALD_MERCURE_ISSUERS") or "").split(",")[0].strip() or None
    claims = mercure_claims(audience, selector, ttl=ttl, sub=sub, issuer=issuer)
    return jwt.encode(claims, secret, algorithm=algorithm, headers={"typ": "at+jwt"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine: a loopback address, or a name resolving only to loopback."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_targets(config: LoadConfig) -> None:
    """Refuse what is not an http URL, and (unless ``allow_remote``) any host but this machine."""
    urls = list(config.targets) + list(config.metrics_from)
    if config.publish == "redis":
        if not config.redis_url:
            raise ValueError("--publish redis needs --redis-url")
        urls.append(config.redis_url)
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "redis") or not parts.hostname:
            raise ValueError(f"not a target this tool can use: {url!r} (give http://host:port)")
        if parts.scheme == "http" and parts.path not in ("", "/"):
            raise ValueError(f"give the target's base URL, without a path: {url!r}")
        if not config.allow_remote and not is_loopback(parts.hostname):
            raise ValueError(
                f"{parts.hostname} is not this machine: pass --allow-remote to load-test another host "
                "(only ever one you are allowed to)"
            )


def raise_open_files(needed: int) -> tuple[int, int]:
    """Lift this process's open-files limit toward ``needed`` (up to the hard limit); the (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if want > soft:
        with contextlib.suppress(ValueError, OSError):  # not allowed here: the caller reports the limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def check_faults(config: LoadConfig, error: Callable[[str], object]) -> None:
    """Call ``error`` with the first problem of the fault options: negative times, ``--for`` alone or
    missing, two faults on the same processes (nodes, or Redis), or any fault against a peer system."""
    for name, option in FAULT_OPTIONS.items():
        value = getattr(config, name)
        if value is not None and value < 0:
            error(f"{option} is out of range")
            return
    for name, option in (
        ("restart_node_after", "--restart-node-after"),
        ("stop_all_for", "--for"),
        ("freeze_for", "--freeze-for"),
    ):
        value = getattr(config, name)
        if value is not None and value < 0:
            error(f"{option} is out of range")
            return
    if config.stop_all_for is not None and config.stop_all_nodes_at is None:
        error("--for needs --stop-all-nodes-at")
        return
    if config.stop_all_nodes_at is not None and config.stop_all_for is None:
        error("--stop-all-nodes-at needs --for SECONDS (how long the nodes stay down)")
        return
    for group in (NODE_FAULTS, REDIS_FAULTS):
        given = [FAULT_OPTIONS[name] for name in group if getattr(config, name) is not None]
        if len(given) > 1:
            error(f"{' and '.join(given)} act on the same processes: give one of them per run")
            return
    if config.has_faults and config.system != "herald":
        error("faults act on a local Herald cluster (make cluster): not with --system " + config.system)


def check_publisher(config: LoadConfig, error: Callable[[str], object]) -> None:
    """Call ``error`` with the first option the chosen publisher cannot honour.

    The compiled publisher sends over HTTP to one target, without faults
    (its requests are not retried, so a fault's outage would only be counted
    as uncertain events); ``--pipeline`` and ``--per-request`` are its own,
    and a batch is Herald's API only.
    """
    if config.publisher == "python":
        for option, value in (("--pipeline", config.pipeline), ("--per-request", config.per_request)):
            if value != 1:
                error(f"{option} needs --publisher native")
                return
        return
    if config.publish != "http":
        error("--publisher native publishes over HTTP: not with --publish redis")
    elif len(config.targets) != 1:
        error("--publisher native publishes to one --target")
    elif config.has_faults:
        error("faults need --publisher python (it retries through an outage)")
    elif config.per_request > 1 and config.system != "herald":
        error(f"{config.system} takes one event per request: --per-request 1")
    elif config.per_request > 1 and config.protocol == "mercure":
        error("Mercure takes one update per request (it has no batches): --per-request 1")


def check_protocol(config: LoadConfig, error: Callable[[str], object]) -> None:
    """Call ``error`` with the first option ``--protocol mercure`` cannot go with."""
    if config.protocol != "mercure":
        if config.mercure_audience is not None:
            error("--mercure-audience needs --protocol mercure")
        return
    if config.mercure_audience is None:
        config.mercure_audience = os.environ.get("HERALD_MERCURE_AUDIENCE") or None
    if config.system != "herald":
        error(f"--protocol mercure is Herald's Mercure hub: not with --system {config.system}")
    elif config.publish != "http":
        error("--protocol mercure publishes over HTTP (POST /.well-known/mercure): not with --publish redis")


def resolve_token(config: LoadConfig, error: Callable[[str], object]) -> None:
    """Settle the run's access token: ``--token`` as given, else one minted from ``HERALD_JWT_SECRET``.

    A minted token may subscribe and publish to this run's topics only
    (:attr:`LoadConfig.topic_selector`), and outlives the run; beside it, an
    admin token for reading the nodes' ``/metrics`` (kept in this process,
    never given to the workers), unless ``--metrics-token`` gave one. With
    neither, the run has no token (a target with access control off). Calls
    ``error`` for a token the run cannot use.
    """
    for option, token in (("--token", config.token), ("--metrics-token", config.metrics_token)):
        if token is None:
            continue
        if config.system != "herald":
            error(f"{option} is for Herald's access control: {config.system} takes none")
            return
        if not token.strip() or any(c in token for c in "\r\n "):
            error(f"{option}: give the token itself (no spaces, no line breaks)")
            return
    if config.token is not None:
        config.auth = "given"
        return
    if config.system != "herald":
        return
    if config.protocol == "mercure":
        resolve_mercure_token(config, error)
        return
    selector = config.topic_selector
    ttl = config.longest_seconds + TOKEN_MARGIN
    try:
        config.token = mint_from_environment(
            publish=[selector], subscribe=[selector], sub=f"loadtest-{config.run_id}", ttl=ttl
        )
        if config.token is not None and config.metrics_token is None and config.server_counts:
            # Reading /metrics needs an admin token; it stays in this process (never sent to the workers).
            config.metrics_token = mint_from_environment(admin=True, sub=f"loadtest-{config.run_id}-metrics", ttl=ttl)
    except ValueError as exc:  # a secret too short, or HERALD_JWT_ALGORITHMS naming no HMAC algorithm
        error(f"cannot mint a token from HERALD_JWT_SECRET: {exc} (or pass --token)")
        return
    config.auth = "none" if config.token is None else "minted"


def resolve_mercure_token(config: LoadConfig, error: Callable[[str], object]) -> None:
    """``--protocol mercure`` without ``--token``: a Mercure token minted from ``HERALD_JWT_SECRET``.

    The hub takes no publish without a token, so a run needs one: the secret
    and the hub's resource identifier (``--mercure-audience``, default
    ``HERALD_MERCURE_AUDIENCE``) to mint it with. It may publish and
    subscribe to this run's topics only (``lt-<run id>-*``, a URL pattern).
    Reading ``/metrics`` still takes a Herald admin token, minted beside it.
    """
    secret = os.environ.get("HERALD_JWT_SECRET")
    if not secret:
        error(
            "--protocol mercure: the hub takes no publish without a token; pass --token (a Mercure token that may "
            "publish and subscribe to lt-<run id>-*), or set HERALD_JWT_SECRET to mint one"
        )
        return
    if not config.mercure_audience:
        error(
            "--protocol mercure mints its token with the hub's resource identifier: set HERALD_MERCURE_AUDIENCE "
            "(as the nodes have it) or pass --mercure-audience, or pass --token"
        )
        return
    ttl = config.longest_seconds + TOKEN_MARGIN
    try:
        config.token = mint_mercure(
            secret, config.mercure_audience, config.topic_selector, ttl=ttl, sub=f"loadtest-{config.run_id}"
        )
        if config.metrics_token is None and config.server_counts:
            config.metrics_token = mint_from_environment(admin=True, sub=f"loadtest-{config.run_id}-metrics", ttl=ttl)
    except ValueError as exc:
        error(f"cannot mint a token from HERALD_JWT_SECRET: {exc} (or pass --token)")
        return
    config.auth = "minted"


def _topics(value: str) -> str:
    if value != "each" and not (value.isdigit() and int(value) > 0):
        raise argparse.ArgumentTypeError("a positive number, or 'each' (one topic per subscriber)")
    return value


def parser() -> argparse.ArgumentParser:
    """The command line; every default is :class:`LoadConfig`'s own, so the two cannot drift apart."""
    d = LoadConfig()
    p = argparse.ArgumentParser(
        prog="python -m workers.loadtest",
        description="Load-test a Herald deployment: subscribers that check every event, a steady publisher, "
        "loss and latency per node, optional faults.",
    )
    p.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="URL",
        help=f"the nginx front, or repeat for several nodes (default {DEFAULT_TARGET})",
    )
    p.add_argument(
        "--system",
        choices=list(SYSTEMS),
        default=d.system,
        help="what the target runs: herald, or a peer measured by `make bench` (default %(default)s)",
    )
    p.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default=d.protocol,
        help="Herald's API to drive: native (POST /publish, GET /events), or mercure (its Mercure hub at "
        "/.well-known/mercure: one update per publish request, subscribers on ?match=, a token needed to "
        "publish) (default %(default)s)",
    )
    p.add_argument(
        "--mercure-audience",
        metavar="AUD",
        help="with --protocol mercure: the aud of the Mercure token minted from HERALD_JWT_SECRET, the nodes' "
        "HERALD_MERCURE_AUDIENCE (default: $HERALD_MERCURE_AUDIENCE)",
    )
    p.add_argument("--subscribers", type=int, default=d.subscribers, help="SSE connections (default %(default)s)")
    p.add_argument(
        "--topics",
        type=_topics,
        default=str(d.topics),
        help="topics in the run, or 'each' for one per subscriber (default %(default)s)",
    )
    p.add_argument(
        "--topics-per-conn",
        type=int,
        default=d.per_conn,
        dest="per_conn",
        help="topics each connection subscribes to (default %(default)s)",
    )
    p.add_argument(
        "--rate", type=float, default=d.rate, help="events published per second, all topics (default %(default)g)"
    )
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of publishing (default %(default)g)")
    p.add_argument("--payload", type=int, default=d.payload, help="bytes of data per event (default %(default)s)")
    p.add_argument(
        "--publish",
        choices=["http", "redis"],
        default=d.publish,
        help="POST /publish on the target, or straight to Redis through the broker (default %(default)s)",
    )
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="for --publish redis")
    p.add_argument(
        "--publishers",
        type=int,
        default=d.publishers,
        help="parallel publish pacers, each owning topics (default %(default)s)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=d.batch,
        help="most events per publish request of the Python publisher, which batches only what is overdue "
        "(default %(default)s)",
    )
    p.add_argument(
        "--read-pause-ms",
        type=float,
        default=d.read_pause_ms,
        help="slow consumers: each subscriber reads nothing for this long after every read, so the target's"
        " buffers fill and it cuts them off (Python client only; default %(default)s: read at full speed)",
    )
    p.add_argument(
        "--batch-bytes",
        type=int,
        default=d.batch_bytes,
        help="most bytes of events per publish request: a node refuses (413) a publish larger than its"
        " HERALD_CLIENT_BUFFER (1 MiB by default), which a subscriber must be able to take at once"
        " (default %(default)s)",
    )
    p.add_argument(
        "--publisher",
        choices=["python", "native"],
        default=d.publisher,
        help="the Python pacers, or the compiled publisher: one event per request, paced, closed loop or "
        "--pipeline, its own CPU reported; for when the publisher must not limit the server (default %(default)s)",
    )
    p.add_argument(
        "--pipeline",
        type=int,
        default=d.pipeline,
        metavar="K",
        help="with --publisher native: requests in flight per connection; 1 is a closed loop, each request "
        "waiting for the answer before it (default %(default)s)",
    )
    p.add_argument(
        "--per-request",
        type=int,
        default=d.per_request,
        metavar="N",
        help="with --publisher native: exactly N events per request, a JSON array (Herald only); "
        "default %(default)s, one event per request",
    )
    p.add_argument(
        "--ramp", type=float, default=d.ramp, help="seconds over which subscribers connect (default %(default)g)"
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=d.connect_timeout,
        help="seconds to wait for every subscriber before publishing anyway (default %(default)g)",
    )
    p.add_argument(
        "--drain",
        type=float,
        default=d.drain,
        help="seconds to wait after publishing for the last events to arrive (default %(default)g)",
    )
    p.add_argument(
        "--retry-for",
        type=float,
        default=d.retry_for,
        help="seconds a publish request is retried before its events count as uncertain (default %(default)g)",
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help="seeds the topic choice of each event (default %(default)s)"
    )
    p.add_argument("--procs", type=int, default=d.procs, help="subscriber worker processes (default %(default)s)")
    p.add_argument(
        "--client",
        choices=["python", "native"],
        default=d.client,
        help="subscriber workers in Python, or compiled from C when Python cannot out-run the server "
        "(default %(default)s)",
    )
    p.add_argument("--json", type=Path, dest="json_path", metavar="PATH", help="write the full result as JSON")
    p.add_argument("--report", type=Path, dest="report_path", metavar="PATH", help="write an HTML report")
    p.add_argument("--kill-node-at", type=float, metavar="SECONDS", help="SIGKILL a node of the local cluster")
    p.add_argument(
        "--kill-node", type=int, default=d.kill_node, metavar="INDEX", help="which node to kill (default %(default)s)"
    )
    p.add_argument("--restart-node-after", type=float, metavar="SECONDS", help="start the killed node again")
    p.add_argument(
        "--restart-nodes-at",
        type=float,
        metavar="SECONDS",
        help="rolling restart of every node: one at a time, SIGTERM, wait until gone, start, wait for /readyz",
    )
    p.add_argument(
        "--stop-all-nodes-at",
        type=float,
        metavar="SECONDS",
        help="SIGKILL every node at once (no graceful shutdown), and start them all again after --for",
    )
    p.add_argument(
        "--for",
        type=float,
        dest="stop_all_for",
        metavar="SECONDS",
        help="with --stop-all-nodes-at: how long every node stays down",
    )
    p.add_argument(
        "--restart-redis-at",
        type=float,
        metavar="SECONDS",
        help="stop the cluster's redis-server (SIGTERM) and start it again at once",
    )
    p.add_argument(
        "--failover-redis-at",
        type=float,
        metavar="SECONDS",
        help="SIGKILL the Redis primary, for Sentinel to promote a replica (a cluster started with "
        "`make cluster SENTINEL=1`)",
    )
    p.add_argument(
        "--freeze-node-at",
        type=float,
        metavar="SECONDS",
        help="a gray failure: SIGSTOP a node of the local cluster (it hangs holding its sockets), SIGCONT it "
        "--freeze-for seconds later",
    )
    p.add_argument(
        "--freeze-node",
        type=int,
        default=d.freeze_node,
        metavar="INDEX",
        help="which node to freeze (default %(default)s)",
    )
    p.add_argument(
        "--freeze-redis-at",
        type=float,
        metavar="SECONDS",
        help="a gray failure of Redis: SIGSTOP the cluster's redis-server, SIGCONT it --freeze-for seconds later",
    )
    p.add_argument(
        "--freeze-for",
        type=float,
        default=d.freeze_for,
        metavar="SECONDS",
        help="how long a freeze lasts (default %(default)g: past the front's read timeout and the subscribers' "
        "silence limit at the default heartbeat, so both give up on the frozen node first)",
    )
    p.add_argument(
        "--fault",
        action="append",
        choices=list(FAULT_SHORTHANDS),
        dest="fault_names",
        help=f"a fault by name: freeze (--freeze-node-at) or freeze-redis (--freeze-redis-at), at "
        f"{DEFAULT_FAULT_AT:g} s unless that option says when (repeat for both)",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        default=os.environ.get("HERALD_HEARTBEAT", str(d.heartbeat)),
        metavar="SECONDS",
        help="the nodes' HERALD_HEARTBEAT: the longest they leave an idle stream silent, which the default "
        f"--silence-timeout is reckoned from (default: $HERALD_HEARTBEAT, else {DEFAULT_HEARTBEAT:g})",
    )
    p.add_argument(
        "--silence-timeout",
        type=float,
        metavar="SECONDS",
        help=f"a stream that delivers no byte (not even a heartbeat) for this long is dead: the subscriber closes it "
        f"and resumes with Last-Event-ID, counted as ended 'silent'; 0: never (default: {SILENCE_HEARTBEATS:g} x "
        "--heartbeat against Herald, never against a peer)",
    )
    p.add_argument(
        "--cluster-dir",
        type=Path,
        default=d.cluster_dir,
        help="the local cluster's run directory, for faults (default .run/cluster)",
    )
    p.add_argument(
        "--token",
        help="Herald's access token, sent by every subscriber and publisher as Authorization: Bearer; it needs "
        "subscribe and publish rights on the run's topics (lt-<run id>-*, or '**'). Default: one minted from "
        "HERALD_JWT_SECRET when that is set, else none. With --protocol mercure: a Mercure token (at+jwt) that may "
        "publish and subscribe to those topics (then give --metrics-token for /metrics). Never printed nor written "
        "to the result",
    )
    p.add_argument(
        "--metrics-from",
        action="append",
        metavar="URL[,URL...]",
        help="the nodes whose /metrics to read before and after the run (repeat, or separate with commas); "
        "default: the nodes of the local cluster (--cluster-dir) when a target is its front, else the targets",
    )
    p.add_argument(
        "--metrics-token",
        help="an admin token for the nodes' /metrics when access control is on (default: --token, or one minted "
        "from HERALD_JWT_SECRET with admin rights). Never printed nor written to the result",
    )
    p.add_argument(
        "--nodes-shared",
        action="store_true",
        help="other clients use the nodes during the run: their counts are compared as at least the tool's",
    )
    p.add_argument(
        "--no-server-counts",
        action="store_false",
        dest="server_counts",
        help="do not read the nodes' /metrics",
    )
    p.add_argument("--allow-remote", action="store_true", help="allow targets that are not this machine")
    p.add_argument("--quiet", action="store_true", help="no live progress on stderr")
    return p


def from_args(argv: list[str] | None = None) -> LoadConfig:
    """A checked :class:`LoadConfig` from the command line; exits with status 2 and a message on bad input."""
    p = parser()
    args = vars(p.parse_args(argv))
    names = {f.name for f in fields(LoadConfig)}
    given = {k: v for k, v in args.items() if k in names and k not in ("targets", "topics", "metrics_from")}
    for name in args["fault_names"] or []:
        if given.get(FAULT_SHORTHANDS[name]) is None:
            given[FAULT_SHORTHANDS[name]] = DEFAULT_FAULT_AT
    config = LoadConfig(**given)
    config.targets = [t.rstrip("/") for t in (args["targets"] or [DEFAULT_TARGET])]
    config.metrics_from = [u.strip().rstrip("/") for v in args["metrics_from"] or [] for u in v.split(",") if u.strip()]
    if config.metrics_from and not config.server_counts:
        p.error("--metrics-from and --no-server-counts contradict each other")
    if config.read_pause_ms and config.client != "python":
        p.error("--read-pause-ms is the Python client's (--client python)")
    config.topics = config.subscribers if args["topics"] == "each" else int(args["topics"])
    config.progress = not args["quiet"]
    problems = [
        ("--subscribers", config.subscribers >= 0),
        ("--topics-per-conn", 1 <= config.per_conn <= 64),
        ("--rate", config.rate > 0),
        ("--duration", 0 < config.duration <= 24 * 3600),
        ("--payload", 0 <= config.payload <= 1_000_000),
        ("--publishers", config.publishers >= 1),
        ("--batch", 1 <= config.batch <= 1000),
        ("--batch-bytes", config.batch_bytes >= 1024),
        ("--read-pause-ms", 0 <= config.read_pause_ms <= 60_000),
        ("--pipeline", 1 <= config.pipeline <= 256),
        ("--per-request", 1 <= config.per_request <= 1000),
        ("--procs", 1 <= config.procs <= 64),
        ("--ramp", config.ramp >= 0),
        ("--drain", config.drain >= 0),
        ("--retry-for", config.retry_for >= 0),
        ("--connect-timeout", config.connect_timeout > 0),
        ("--heartbeat", 0 < config.heartbeat <= 3600),
        ("--silence-timeout", config.silence_timeout is None or config.silence_timeout >= 0),
    ]
    for option, ok in problems:
        if not ok:
            p.error(f"{option} is out of range")
    if config.system != "herald":
        if config.per_conn != 1:
            p.error(f"{config.system} takes one topic per connection: --topics-per-conn 1")
        if config.publish != "http":
            p.error(f"{config.system} is published to over HTTP only")
        config.batch = 1  # one event per request: neither peer takes batches
    check_protocol(config, p.error)
    if config.protocol == "mercure":
        config.batch = 1  # one update per request: Mercure has no batches
    check_publisher(config, p.error)
    if config.restart_node_after is not None and config.kill_node_at is None:
        p.error("--restart-node-after needs --kill-node-at")
    check_faults(config, p.error)
    config.silence_timeout = config.silence_seconds  # the result records the limit the run had
    resolve_token(config, p.error)
    try:
        check_targets(config)
    except ValueError as exc:
        p.error(str(exc))
    return config
