"""compose.yaml, ops/nginx.conf and the Dockerfile agree with each other and with the settings.

No Docker engine runs here, so compose is checked as far as it can be without
one: parsed, and cross-checked against the nginx config it mounts (the
rendering of ops/nginx.conf.template; tests/ops/test_ops_cluster.py checks it is
up to date). Both renderings are syntax-checked by the real nginx, and served
through by the cluster tests.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml

from api.settings import Settings
from api.token import mint
from ops import launch
from ops.launch import NGINX
from ops.nginx import FrontPolicy, render_compose, render_local
from ops.probe import free_port, probe_get, wait_until
from tests.server import run_server

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
NGINX_CONF = (ROOT / "ops" / "nginx.conf").read_text()


def directives(name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;\n]*);", NGINX_CONF, flags=re.M)


def test_compose_has_the_services_and_their_order() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"redis", "api", "nginx", "demo", "prometheus-token", "prometheus"}
    assert "healthcheck" in services["redis"]
    assert services["api"]["deploy"]["replicas"] == 3
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["nginx"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert "nginx" in services["demo"]["depends_on"]
    assert services["demo"]["command"][:3] == ["python", "-m", "workers.demo"]
    assert services["prometheus"]["depends_on"]["prometheus-token"]["condition"] == "service_completed_successfully"
    assert "api" in services["prometheus"]["depends_on"]


# -- Prometheus in compose ----------------------------------------------------------------

PROMETHEUS_COMPOSE_CONF = yaml.safe_load((ROOT / "ops" / "prometheus-compose.yml").read_text())


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path: host path or volume name, for ``source:target[:ro]`` volume entries."""
    return {entry.split(":")[1]: entry.split(":")[0] for entry in service["volumes"]}


def test_compose_prometheus_scrapes_the_api_replicas_with_the_token_of_its_own_service() -> None:
    services = COMPOSE["services"]
    prometheus, token = services["prometheus"], services["prometheus-token"]
    assert prometheus["image"].startswith("prom/prometheus:v2.")  # the config and rules are checked by promtool 2
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_path = config_flag.removeprefix("--config.file=")
    volumes = mounts(prometheus)
    assert volumes[config_path] == "./ops/prometheus-compose.yml"
    # The rules are mounted where the config names them (relative to the config's directory).
    config_dir = config_path.rsplit("/", 1)[0]
    for rule_file in PROMETHEUS_COMPOSE_CONF["rule_files"]:
        assert volumes[f"{config_dir}/{rule_file}"] == "./ops/prometheus-rules.yml"
    (job,) = PROMETHEUS_COMPOSE_CONF["scrape_configs"]
    (dns,) = job["dns_sd_configs"]
    assert dns["names"] == ["api"]
    assert str(dns["port"]) == services["api"]["environment"]["HERALD_PORT"]
    token_file = job["authorization"]["credentials_file"]
    token_dir, token_name = token_file.rsplit("/", 1)
    assert mounts(token)[token_dir] == mounts(prometheus)[token_dir]  # one volume, shared
    assert f"{token_dir}:ro" in " ".join(prometheus["volumes"])
    assert f"> {token_dir}/{token_name}.new" in token["command"][2]
    assert f"mv {token_dir}/{token_name}.new {token_file}" in token["command"][2]
    assert token["environment"]["HERALD_JWT_SECRET"] == services["api"]["environment"]["HERALD_JWT_SECRET"]
    # Prometheus has no access control: its port is published on the loopback only.
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"]
    assert set(COMPOSE["volumes"]) >= {volumes["/prometheus"], mounts(token)[token_dir]}


def run_token_service(tmp_path: Path, secret: str | None) -> Path:
    """compose's prometheus-token command, run here with this venv's python, writing into ``tmp_path``."""
    script = COMPOSE["services"]["prometheus-token"]["command"][2]
    script = script.replace("$$", "$").replace("/run/herald", str(tmp_path))  # what compose hands to sh
    env = launch.clean_environ() | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if secret is not None:
        env["HERALD_JWT_SECRET"] = secret
    result = subprocess.run(["sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prometheus-token"]
    return tmp_path / "prometheus-token"


@pytest.mark.skipif(os.geteuid() != 0, reason="the service chowns the token to Prometheus' user: needs root")
def test_compose_token_service_writes_a_token_only_prometheus_reads(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(48)
    (tmp_path / "on").mkdir()
    written = run_token_service(tmp_path / "on", secret)
    info = written.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (65534, 65534, 0o600)  # nobody: prom/prometheus
    claims = jwt.decode(written.read_text().strip(), secret, algorithms=["HS256"])
    assert claims["herald"] == {"admin": True}
    assert claims["exp"] - claims["iat"] >= 300 * 24 * 3600  # outlives any compose session
    # Without a secret (access control off) a placeholder, which nodes without access control ignore.
    (tmp_path / "off").mkdir()
    placeholder = run_token_service(tmp_path / "off", None).read_text().strip()
    with run_server() as node:
        answer = httpx.get(f"{node.url}/metrics", headers={"Authorization": f"Bearer {placeholder}"}, timeout=10)
        assert answer.status_code == 200
        assert "herald_connections" in answer.text


def test_compose_addresses_agree_with_nginx_and_settings() -> None:
    services = COMPOSE["services"]
    api_env = services["api"]["environment"]
    (upstream,) = [s.split()[0] for s in directives("server")]
    host, port = upstream.split(":")
    assert host == "api"
    assert port == api_env["HERALD_PORT"]
    assert f"{port}" in services["api"]["expose"]
    assert api_env["REDIS_URL"].startswith("redis://redis:6379")
    (listen_directive,) = directives("listen")
    listen = listen_directive.split()[0]  # the port, before parameters such as backlog=
    published = services["nginx"]["ports"][0].split(":")
    assert published[-1] == listen
    assert "./ops/nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]
    demo_url = services["demo"]["command"][services["demo"]["command"].index("--url") + 1]
    assert demo_url == f"http://nginx:{listen}"


def test_compose_gives_nodes_and_demo_one_secret_and_off_when_unset() -> None:
    services = COMPOSE["services"]
    secret = services["api"]["environment"]["HERALD_JWT_SECRET"]
    assert secret == services["demo"]["environment"]["HERALD_JWT_SECRET"] == "${HERALD_JWT_SECRET:-}"
    # With access control on, the demo page's topics stay readable without a token.
    demo_topics = set(re.findall(r"topic=(\w+)", (ROOT / "compose.yaml").read_text()))
    assert demo_topics == set(services["api"]["environment"]["HERALD_PUBLIC_TOPICS"].split(","))


def test_nginx_is_set_up_for_sse() -> None:
    assert re.search(r"^\s*least_conn;", NGINX_CONF, flags=re.M)
    assert directives("proxy_http_version") == ["1.1"]
    assert directives("proxy_buffering") == ["off"]
    assert directives("proxy_cache") == ["off"]
    assert 'Connection ""' in directives("proxy_set_header")
    assert int(directives("keepalive")[0]) > 0
    assert "error" in directives("proxy_next_upstream")[0]
    assert "non_idempotent" not in directives("proxy_next_upstream")[0]  # a publish is never sent twice
    # A stream silent past the heartbeat (and a margin) is on a node that hangs: nginx ends it, the client
    # resumes elsewhere within two heartbeats; any other request (a publish) waits for an answer 10 s at most.
    blocks = dict(re.findall(r"^ *location ([^{\n]+?) \{(.*?)\n *\}", NGINX_CONF, flags=re.S | re.M))
    heartbeat = Settings().heartbeat
    mercure = NGINX_CONF.split("location = /.well-known/mercure {")[1].split("location @mercure_publish")[0]
    for stream in (blocks["= /events"], mercure):
        (timeout,) = re.findall(r"proxy_read_timeout (\d+)s;", stream)
        assert heartbeat < int(timeout) <= 1.5 * heartbeat
        assert "auth_request /_herald/probe;" in stream
    assert int(directives("proxy_read_timeout")[0].rstrip("s")) < 10  # the server's: every other request
    assert "internal;" in blocks["= /_herald/probe"]
    (probe_timeout,) = re.findall(r"proxy_read_timeout (\d+)s;", blocks["= /_herald/probe"])
    assert int(probe_timeout) <= 3
    assert all("max_fails=1 fail_timeout=" in server for server in directives("server"))
    # Every directive line is explained by a comment next to it or above it.
    lines = NGINX_CONF.splitlines()
    for i, line in enumerate(lines):
        if line.strip().endswith(";") and not line.strip().startswith("#"):
            above = lines[i - 1].strip()
            assert "#" in line or above.startswith("#") or above.endswith(";"), line


def test_nginx_never_hands_its_own_failures_to_clients_as_is() -> None:
    """EventSource gives up for good on anything but 200 text/event-stream; producers need JSON and Retry-After."""
    blocks = dict(re.findall(r"^ *location ([^{\n]+?) \{(.*?)\n *\}", NGINX_CONF, flags=re.S | re.M))
    events, other = blocks["= /events"], blocks["/"]
    assert re.search(r"error_page 500 502 503 504 =200 @events_retry;", events)  # 500: no node answered its probe
    retry = blocks["@events_retry"]
    assert "default_type text/event-stream;" in retry
    assert re.search(r'return 200 "[^"]*retry: \$herald_retry_ms\\n\\n";', retry)  # 1-2.9 s, spread (the map)
    assert "add_header Cache-Control no-cache always;" in retry
    assert re.search(r"error_page 502 503 504 =503 @unavailable;", other)
    assert "add_header Retry-After 2 always;" in blocks["@unavailable"]
    assert "default_type application/json;" in blocks["@unavailable"]
    assert re.search(r"error_page 413 =413 @too_large;", other)
    # A node's own 4xx/5xx must pass through: error_page only for nginx's own answers.
    assert not directives("proxy_intercept_errors")


needs_nginx = pytest.mark.skipif(
    not shutil.which("nginx") and not Path(NGINX).exists(), reason="nginx is not installed"
)


@needs_nginx
@pytest.mark.parametrize("where", ["compose", "local"])
def test_rendered_nginx_config_passes_nginx_t(tmp_path: Path, where: str) -> None:
    for sub in ("logs", "nginx-body", "nginx-proxy"):
        (tmp_path / sub).mkdir()
    conf = tmp_path / "nginx.conf"
    if where == "local":
        conf.write_text(render_local(18080, [18001, 18002, 18003], tmp_path))
    else:
        # compose's upstream host "api" only resolves inside compose: check the rest as is.
        conf.write_text(render_compose().replace("server api:8000 ", "server 127.0.0.1:8000 "))
    result = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "logs" / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    if where == "local":
        assert conf.read_text().count("server 127.0.0.1:1800") == 3


# -- access control behind nginx: tokens never logged, CORS untouched -------------------

TOKEN_VARIABLES = re.compile(
    r"\$(request|args|arg_\w+|query_string|request_uri|request_body|http_authorization|http_cookie|cookie_\w+"
    r"|http_referer|remote_user)(?![A-Za-z0-9_])"
)
"""nginx variables that hold a token (the query string, Authorization, Cookie) or may (Referer, Basic auth)."""


def log_formats(conf: str) -> dict[str, str]:
    """Every ``log_format name '...' '...';``: its name and its whole format (the strings joined)."""
    formats = {}
    for name, body in re.findall(r"^\s*log_format\s+(\S+)\s+(.*?);", conf, flags=re.M | re.S):
        formats[name] = "".join(re.findall(r"'([^']*)'", body))
    return formats


@pytest.mark.parametrize("where", ["compose", "local"])
def test_nginx_never_logs_a_token(tmp_path: Path, where: str) -> None:
    """Tokens come in the query string (?access_token=), Authorization and Cookie: no log may hold them."""
    conf = render_compose() if where == "compose" else render_local(18080, [18001], tmp_path)
    formats = log_formats(conf)
    assert formats, "a log format of our own: nginx's default (combined) logs $request, query string and all"
    for name, text in formats.items():
        assert "$uri" in text, name
        assert not TOKEN_VARIABLES.search(text), f"log_format {name} may log a token: {text}"
    access_logs = re.findall(r"^\s*access_log\s+([^;]*);", conf, flags=re.M)
    assert access_logs
    for directive in access_logs:
        words = directive.split()
        # "access_log path;" alone would use the combined format.
        assert words == ["off"] or (len(words) >= 2 and words[1] in formats), directive
    # nginx's own per-request error lines quote the request line, query string included.
    http = conf[conf.index("http {") :]
    levels = re.findall(r"^\s*error_log\s+\S+\s+(\w+);", http, flags=re.M)
    assert levels
    assert set(levels) <= {"crit", "alert", "emerg"}, levels


def test_nginx_leaves_cors_and_credentials_to_the_nodes() -> None:
    """Preflights (OPTIONS), Origin, Authorization and Cookie reach the nodes, whose CORS answers come back."""
    conf = re.sub(r"#.*", "", NGINX_CONF)  # directives only
    # The probe before a stream is a subrequest of the front's own: it alone passes no client header on.
    probe = re.search(r"location = /_herald/probe \{.*?\}", conf, flags=re.S)
    assert probe is not None
    assert "internal;" in probe.group()
    conf = conf.replace(probe.group(), "")
    for forbidden in ("limit_except", "proxy_hide_header", "proxy_pass_request_headers", "proxy_intercept_errors"):
        assert forbidden not in conf, forbidden
    # The one test of the method: a Mercure publish goes to a location of its own (a request's timeouts, not
    # a stream's), which passes it on whole.
    assert re.findall(r"\bif\s*\(\s*\$request_method[^)]*\)", conf) == ["if ($request_method = POST)"]
    publish = re.search(r"location @mercure_publish \{(.*?)\}", conf, flags=re.S)
    assert publish is not None
    assert "proxy_pass http://herald;" in publish.group(1)
    for header in ("Origin", "Authorization", "Cookie", "Access-Control"):
        assert not re.search(rf"proxy_set_header\s+{header}", conf, flags=re.I), header
    # nginx adds CORS headers only to its own answers for streams (a node's answers carry the nodes' own), and
    # only for an allowed origin ($herald_cors_origin: HERALD_CORS_ORIGINS), never any Origin with credentials.
    own = re.findall(r"location (@events_retry|@events_busy) \{(.*?)\}", conf, flags=re.S)
    assert len(own) == 2
    rest = conf
    for _, body in own:
        assert "add_header Access-Control-Allow-Origin $herald_cors_origin always;" in body
        rest = rest.replace(body, "")
    assert not re.search(r"add_header\s+Access-Control", rest)
    assert "$http_origin always" not in conf


ORIGIN = "https://app.example.test"


@needs_nginx
def test_through_nginx_cors_and_tokens_work_and_no_log_holds_a_token(tmp_path: Path) -> None:
    """A real node with auth and CORS on, behind the real rendered nginx; then every log nginx wrote is read."""
    secret = secrets.token_urlsafe(48)
    publisher = mint(secret, publish=["orders/**"])
    subscriber = mint(secret, subscribe=["user/{sub}/**"], sub="42")
    in_query = mint(secret, subscribe=["user/{sub}/**"], sub="42", ttl=60)
    env = {"HERALD_JWT_SECRET": secret, "HERALD_CORS_ORIGINS": ORIGIN}
    for sub in ("logs", "nginx-body", "nginx-proxy"):
        (tmp_path / sub).mkdir()
    front_port = free_port()
    front = f"http://127.0.0.1:{front_port}"
    with run_server(env) as node:
        conf = tmp_path / "nginx.conf"
        conf.write_text(render_local(front_port, [node.port], tmp_path, FrontPolicy(cors_origins=(ORIGIN,))))
        args = [NGINX, "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "logs" / "nginx-error.log"),
                "-g", "daemon off;"]  # fmt: skip
        nginx = launch.spawn(args, new_session=False)
        try:
            wait_until(lambda: probe_get(f"{front}/healthz").status_code == 200, "nginx", 10)
            with httpx.Client(base_url=front, timeout=10) as client:
                # A page of the allowed origin publishes with fetch and a header: the preflight passes through.
                preflight = client.options(
                    "/publish",
                    headers={
                        "Origin": ORIGIN,
                        "Access-Control-Request-Method": "POST",
                        "Access-Control-Request-Headers": "authorization, content-type",
                    },
                )
                assert preflight.status_code == 204
                assert preflight.headers["access-control-allow-origin"] == ORIGIN
                assert preflight.headers["access-control-allow-credentials"] == "true"
                assert "Authorization" in preflight.headers["access-control-allow-headers"]
                other = client.options(
                    "/events", headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "GET"}
                )
                assert other.status_code == 403
                assert "access-control-allow-origin" not in other.headers
                published = client.post(
                    "/publish",
                    json={"topic": "orders/1", "data": {}},
                    headers={"Authorization": f"Bearer {publisher}", "Origin": ORIGIN},
                )
                assert published.status_code == 201
                assert published.headers["access-control-allow-origin"] == ORIGIN
                # A refusal keeps its RFC 6750 challenge and its CORS headers (a page can tell 401 from a fault).
                refused = client.get("/events", params={"topic": "user/42/n"}, headers={"Origin": ORIGIN})
                assert refused.status_code == 401
                assert refused.headers["www-authenticate"].startswith("Bearer ")
                assert refused.headers["access-control-allow-origin"] == ORIGIN
                for request in (
                    {"headers": {"Origin": ORIGIN, "Cookie": f"herald_token={subscriber}"}},
                    {"headers": {"Origin": ORIGIN}, "params": {"access_token": in_query}},
                    {"headers": {"Authorization": f"Bearer {subscriber}"}},
                ):
                    params = {"topic": "user/42/notifications", **request.get("params", {})}
                    with client.stream("GET", "/events", params=params, headers=request["headers"]) as stream:
                        assert stream.status_code == 200, request
                        assert stream.headers["content-type"].startswith("text/event-stream")
                        if "Origin" in request["headers"]:
                            assert stream.headers["access-control-allow-origin"] == ORIGIN
                            assert stream.headers["access-control-allow-credentials"] == "true"
        except BaseException:
            nginx.kill()
            nginx.wait()
            raise
    # No node now: nginx answers the stream itself, readable by the page's origin, so EventSource retries.
    try:
        answer = httpx.get(
            f"{front}/events",
            params={"topic": "user/42/notifications", "access_token": in_query},
            headers={"Origin": ORIGIN, "Authorization": f"Bearer {subscriber}"},
            timeout=10,
        )
        assert answer.status_code == 200
        assert re.search(r"\nretry: \d+\n\n", answer.text)
        assert answer.headers["access-control-allow-origin"] == ORIGIN
        assert answer.headers["access-control-allow-credentials"] == "true"
        assert httpx.post(f"{front}/publish?access_token={publisher}", json={}, timeout=10).status_code == 503
    finally:
        nginx.send_signal(signal.SIGQUIT)  # graceful: the log buffers are written out
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()
    logs = {path.name: path.read_text() for path in (tmp_path / "logs").iterdir()}
    access = logs["nginx-access.log"]
    assert '"GET /events HTTP/1.1" 401' in access
    assert '"POST /publish HTTP/1.1" 201' in access
    assert "upstream_status=502" in access  # what the error log no longer says, the access log does
    for name, text in logs.items():
        for token in (publisher, subscriber, in_query):
            assert token not in text, f"{name} holds a token"
        assert "access_token" not in text, name


def test_the_settings_page_names_every_setting() -> None:
    table = (ROOT / "docs" / "settings.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", table, flags=re.M))
    expected = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        expected.add(str(choices[0]) if choices else f"HERALD_{name.upper()}")
    assert documented == expected


def test_dockerfile_runs_a_node() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["python", "-m", "api"]' in dockerfile
    assert "HERALD_HOST=0.0.0.0" in dockerfile
