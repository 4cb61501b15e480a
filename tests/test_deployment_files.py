"""compose.yaml, ops/nginx.conf and the Dockerfile agree with each other and with the settings.

No Docker engine runs here, so compose is checked as far as it can be without
one: parsed, and cross-checked against the nginx config it mounts (the
rendering of ops/nginx.conf.template; tests/test_ops_cluster.py checks it is
up to date). Both renderings are syntax-checked by the real nginx, and served
through by the cluster tests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.settings import Settings
from ops.launch import NGINX
from ops.nginx import render_compose, render_local

ROOT = Path(__file__).resolve().parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
NGINX_CONF = (ROOT / "ops" / "nginx.conf").read_text()


def directives(name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;\n]*);", NGINX_CONF, flags=re.M)


def test_compose_has_the_services_and_their_order() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"redis", "api", "nginx", "demo"}
    assert "healthcheck" in services["redis"]
    assert services["api"]["deploy"]["replicas"] == 3
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["nginx"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert "nginx" in services["demo"]["depends_on"]
    assert services["demo"]["command"][:3] == ["python", "-m", "workers.demo"]


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


def test_nginx_is_set_up_for_sse() -> None:
    assert re.search(r"^\s*least_conn;", NGINX_CONF, flags=re.M)
    assert directives("proxy_http_version") == ["1.1"]
    assert directives("proxy_buffering") == ["off"]
    assert directives("proxy_cache") == ["off"]
    assert 'Connection ""' in directives("proxy_set_header")
    assert int(directives("keepalive")[0]) > 0
    assert "error" in directives("proxy_next_upstream")[0]
    assert "non_idempotent" not in directives("proxy_next_upstream")[0]  # a publish is never sent twice
    read_timeout = directives("proxy_read_timeout")[0]
    assert read_timeout.endswith("h")
    assert int(read_timeout[:-1]) * 3600 > 10 * Settings().heartbeat
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
    assert re.search(r"error_page 502 503 504 =200 @events_retry;", events)
    retry = blocks["@events_retry"]
    assert "default_type text/event-stream;" in retry
    assert re.search(r'return 200 "[^"]*retry: \d+\\n\\n";', retry)
    assert "add_header Cache-Control no-cache always;" in retry
    assert re.search(r"error_page 502 503 504 =503 @unavailable;", other)
    assert "add_header Retry-After 2 always;" in blocks["@unavailable"]
    assert "default_type application/json;" in blocks["@unavailable"]
    assert re.search(r"error_page 413 =413 @too_large;", other)
    # A node's own 4xx/5xx must pass through: error_page only for nginx's own answers.
    assert not directives("proxy_intercept_errors")


@pytest.mark.skipif(not shutil.which("nginx") and not Path(NGINX).exists(), reason="nginx is not installed")
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


def test_dockerfile_runs_a_node() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["python", "-m", "api"]' in dockerfile
    assert "HERALD_HOST=0.0.0.0" in dockerfile
