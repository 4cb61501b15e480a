"""Renders ops/nginx.conf.template: for compose.yaml, and for a loopback cluster.

``python -m ops.nginx > ops/nginx.conf`` writes the compose rendering
(upstream ``api:8000``, port 8080, paths under /tmp), which compose.yaml
mounts as is; a test fails when the committed file differs from it.
:func:`render_local` is what ``ops.cluster`` writes into a cluster's run
directory.

Only ``${name}`` is a placeholder (nginx's own ``$host`` and the like are
left alone), and every placeholder must be given a value: a reworded or
misspelled one is an error, not a config that quietly keeps the wrong path.
"""

from __future__ import annotations

import math
import re
import resource
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "ops" / "nginx.conf.template"
COMPOSE_CONF = ROOT / "ops" / "nginx.conf"
MAX_OPEN_FILES = 65536
GENERATED_HEADER = (
    "# GENERATED from ops/nginx.conf.template by `python -m ops.nginx > ops/nginx.conf`:\n"
    "# edit the template, then regenerate (tests/ops/test_ops_cluster.py checks they agree).\n"
)


_PLACEHOLDER = r"""
    \$\{(?P<braced>[a-z_][a-z0-9_]*)\}   # ${name}: ours
    | (?P<escaped>(?!))                  # no escape needed: a bare $ is never ours
    | (?P<named>(?!))
    | (?P<invalid>(?!))
"""


class NginxTemplate(string.Template):
    """``${name}`` placeholders only: a bare ``$name`` is an nginx variable and stays."""

    # string.Template compiles a str pattern when the subclass is created
    # (typeshed only knows the compiled attribute).
    pattern = _PLACEHOLDER  # type: ignore[assignment]


def upstream_lines(servers: Sequence[str], fail_timeout: int) -> str:
    """One ``server`` line per ``host:port``, marked failed for ``fail_timeout`` s by one failed attempt."""
    return "\n".join(f"        server {s} max_fails=1 fail_timeout={fail_timeout}s;" for s in servers)


def stream_read_timeout(heartbeat: float) -> int:
    """Seconds the front waits on a silent stream: the nodes' heartbeat and a margin for a busy node's lag.

    A node writes an idle stream at most ``heartbeat`` seconds apart
    (api.core.hub ticks at half of it), so silence past this means it hangs.
    The margin (a third of the heartbeat, 1-5 s) keeps a node whose loop
    lags a little from losing its streams; with the default heartbeat
    (15 s) a stream on a hung node ends 20 s after its last byte at most,
    and its client is back on another node, resumed, well within twice the
    heartbeat (docs/operations.md, "Gray failures").
    """
    return max(2, math.ceil(heartbeat + min(5.0, max(1.0, heartbeat / 3))))


@dataclass(frozen=True)
class FrontPolicy:
    """What the front lets the outside do: its limits, who reads the operators' pages, its CORS, its TLS.

    Every default is documented in docs (operations, "The front"); the
    renderings for compose and for ``make cluster`` start from them.
    """

    heartbeat: float = 15.0
    """The nodes' HERALD_HEARTBEAT: a stream silent for longer (and a margin) is on a node that hangs."""
    request_timeout: int = 6
    """Seconds a request other than a stream (a publish) waits for a node's answer; then 503 and the node is
    marked failed. A node answers its own 503 sooner (its Redis commands time out in 2 s)."""
    probe_timeout: int = 2
    """Seconds a node has to answer the probe a stream makes before it opens; then it is marked failed."""
    fail_timeout: int = 2
    """Seconds a node marked failed gets no new request; then one goes there, and an answered one clears it.
    Short: a node back from a restart takes requests again within it (a rolling restart waits for that at
    each node); a hung node costs one request per mark (a probe's 2 s, or a publish's 6 s)."""
    header_timeout: int = 10
    """Seconds a client has to send its request head (as the nodes' HERALD_HEADER_TIMEOUT)."""
    admin_allow: tuple[str, ...] = ("127.0.0.1", "::1")
    """Addresses (or CIDR ranges) that may read /metrics, /stats, /cluster, /dashboard, /docs through the front."""
    unlimited: tuple[str, ...] = ("127.0.0.1", "::1")
    """Addresses (or CIDR ranges) the per-address limits do not count: producers and load tools of this machine."""
    streams_per_address: int = 512
    """Open streams one client address may hold (a NAT'd office holds many); past it: come back later."""
    publish_rate: int = 200
    """Publish requests per second one client address may make, on average ..."""
    publish_burst: int = 400
    """... and at once, beyond the rate."""
    cors_origins: tuple[str, ...] = ()
    """HERALD_CORS_ORIGINS: the origins nginx's own answers name back, with credentials."""
    tls: tuple[str, str] | None = None
    """A certificate and its key (PEM paths): HTTPS and HTTP/2 on the front's port."""


def _listen_lines(listen: str, tls: tuple[str, str] | None) -> str:
    if tls is None:
        return f"        listen {listen} backlog=16384;"
    certificate, key = tls
    return "\n".join(
        [
            # HTTP/2: every EventSource of a page is a stream of one connection, where HTTP/1.1 gives a page
            # six connections per host, so its seventh EventSource would wait for one of them to end.
            f"        listen {listen} ssl http2 backlog=16384;",
            f"        ssl_certificate {certificate};",
            f"        ssl_certificate_key {key};",
            "        ssl_protocols TLSv1.2 TLSv1.3;",
            "        ssl_session_cache shared:herald_tls:10m;",
            "        http2_max_concurrent_streams 256;   # EventSources per page connection",
        ]
    )


def _quoted(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9.:/\-\[\]]+", value):
        raise ValueError(f"not an address or origin nginx can be given: {value!r}")
    return value


def render(
    *,
    servers: Sequence[str],
    listen: str,
    error_log: str,
    pid: str,
    client_body_temp_path: str,
    proxy_temp_path: str,
    access_log: str = "/dev/stdout",
    worker_rlimit_nofile: int = MAX_OPEN_FILES,
    policy: FrontPolicy | None = None,
    template: str | None = None,
) -> str:
    """The template with every placeholder filled in; KeyError if it has one this function doesn't know.

    ``access_log`` is a file path: the template logs to it in its own format,
    which never holds a token (no query string, no Authorization or Cookie).
    """
    if not servers:
        raise ValueError("nginx needs at least one upstream server")
    policy = policy or FrontPolicy()
    text = template if template is not None else TEMPLATE.read_text()
    admin = [f"            allow {_quoted(a)};   # may read them" for a in policy.admin_allow]
    return NginxTemplate(text).substitute(
        upstream_servers=upstream_lines(servers, policy.fail_timeout),
        listen_lines=_listen_lines(listen, policy.tls),
        error_log=error_log,
        access_log=access_log,
        pid=pid,
        client_body_temp_path=client_body_temp_path,
        proxy_temp_path=proxy_temp_path,
        worker_rlimit_nofile=str(worker_rlimit_nofile),
        stream_read_timeout=str(stream_read_timeout(policy.heartbeat)),
        request_timeout=str(policy.request_timeout),
        probe_timeout=str(policy.probe_timeout),
        header_timeout=str(policy.header_timeout),
        unlimited_lines="\n".join(f"        {_quoted(a)} 0;   # not limited" for a in policy.unlimited),
        cors_origin_lines="\n".join(f'        "{_quoted(o)}" $http_origin;   # allowed' for o in policy.cors_origins),
        admin_access_lines="\n".join([*admin, "            deny all;   # nobody else"]),
        streams_per_address=str(policy.streams_per_address),
        publish_rate=str(policy.publish_rate),
        publish_burst=str(policy.publish_burst),
    )


def render_compose() -> str:
    """ops/nginx.conf as compose.yaml mounts it: the ``api`` replicas behind port 8080, logs to stdout/stderr."""
    body = render(
        servers=["api:8000"],
        listen="8080",
        error_log="/dev/stderr",
        access_log="/dev/stdout",
        pid="/tmp/herald-nginx.pid",
        client_body_temp_path="/tmp/herald-nginx-body",
        proxy_temp_path="/tmp/herald-nginx-proxy",
    )
    return GENERATED_HEADER + body


def render_local(front_port: int, node_ports: Sequence[int], run_dir: Path, policy: FrontPolicy | None = None) -> str:
    """A loopback cluster's config: nodes on 127.0.0.1, every path under ``run_dir``.

    ``run_dir`` must hold ``logs/``, ``nginx-body/`` and ``nginx-proxy/``.
    """
    # Workers may not raise their limit past this machine's hard limit.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(MAX_OPEN_FILES, hard)
    return render(
        servers=[f"127.0.0.1:{p}" for p in node_ports],
        listen=f"127.0.0.1:{front_port}",
        error_log=f"{run_dir}/logs/nginx-error.log",
        access_log=f"{run_dir}/logs/nginx-access.log",
        pid=f"{run_dir}/nginx.own-pid",
        client_body_temp_path=f"{run_dir}/nginx-body",
        proxy_temp_path=f"{run_dir}/nginx-proxy",
        worker_rlimit_nofile=nofile,
        policy=policy,
    )


def main() -> None:
    print(render_compose(), end="")


if __name__ == "__main__":
    main()
