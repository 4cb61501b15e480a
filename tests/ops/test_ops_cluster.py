"""ops.cluster (``make cluster``), its command line, and the nginx front it renders.

Everything runs for real on free loopback ports: nginx, redis-server,
sentinels and nodes, each stopped by pid.
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from ops import launch, nginx
from ops.cluster import Cluster
from ops.cluster.processes import frozen
from ops.probe import free_port, free_port_range, wait_until
from tests.redis_server import needs_redis
from tests.server import run_front, run_server

ROOT = Path(__file__).resolve().parents[2]
FORM_TYPE = "application/x-www-form-urlencoded"
needs_nginx = pytest.mark.skipif(not Path(launch.NGINX).exists(), reason="nginx is not installed")


# -- pid files ---------------------------------------------------------------------


def test_regression_stale_pid_file_never_signals_someone_elses_process(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        for name in ("node-0", "redis", "nginx", "sentinel-0", "redis-1"):
            (tmp_path / f"{name}.pid").write_text(f"{bystander.pid}\n")
        Cluster(tmp_path, node_ports=[1], redis_port=1).stop()
        assert bystander.poll() is None  # still running: it is not a node, redis or nginx
        assert not list(tmp_path.glob("*.pid"))  # and the stale pid files are gone
    finally:
        bystander.kill()
        bystander.wait()


def test_regression_a_node_restarted_by_another_program_is_stopped_too(tmp_path: Path) -> None:
    # The load tool's --restart-node-after starts a node again and writes its
    # pid file; stopping the cluster used to forget it (our own child was dead).
    dead = subprocess.Popen(["true"])
    dead.wait()
    restarted = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m", "api"])
    try:
        # Popen can return before /proc shows the new program's command line
        # (seen after other tests had run in this process): wait for it, as
        # the pid file of a real node is read long after the node started.
        wait_until(lambda: b"-m\0api" in Path(f"/proc/{restarted.pid}/cmdline").read_bytes(), "exec", 5)
        (tmp_path / "node-0.pid").write_text(f"{restarted.pid}\n")
        cluster = Cluster(tmp_path, node_ports=[1], redis_port=1)
        cluster.processes["node-0"] = dead
        cluster.stop()  # returns once the node is gone (a zombie of this test counts as gone)
        assert restarted.wait(10) == -signal.SIGTERM
        assert not (tmp_path / "node-0.pid").exists()
    finally:
        restarted.kill()
        restarted.wait()


def test_regression_a_stale_prometheus_pid_file_never_signals_someone_elses_process(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "prometheus.pid").write_text(f"{bystander.pid}\n")
        Cluster(tmp_path, node_ports=[1], redis_port=1, observe=True, prometheus_port=1).stop()
        assert bystander.poll() is None  # still running: it is no prometheus started with a config file
        assert not (tmp_path / "prometheus.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_observe_settings_survive_in_cluster_json(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, node_ports=[18001], redis_port=1, observe=True, scrape_interval="2s")
    assert cluster.prometheus_port > 0  # a free one when none is given
    cluster.save_state()
    loaded = Cluster.load(tmp_path)
    assert (loaded.observe, loaded.prometheus_port, loaded.scrape_interval) == (True, cluster.prometheus_port, "2s")
    assert loaded.prometheus_url == f"http://127.0.0.1:{cluster.prometheus_port}"
    assert "prometheus" in loaded.describe()
    assert not Cluster(tmp_path, node_ports=[18001], redis_port=1).observe  # off unless asked for
    assert "prometheus" not in Cluster(tmp_path, node_ports=[18001], redis_port=1).describe()


# -- the nginx template ------------------------------------------------------------


def test_committed_nginx_conf_is_the_rendering_of_the_template() -> None:
    committed = nginx.COMPOSE_CONF.read_text()
    assert committed == nginx.render_compose(), "ops/nginx.conf is stale: run `python -m ops.nginx > ops/nginx.conf`"


def test_rendering_leaves_no_placeholder_and_keeps_nginx_variables(tmp_path: Path) -> None:
    for text in (nginx.render_compose(), nginx.render_local(18080, [18001, 18002], tmp_path)):
        assert "${" not in text
        assert "proxy_set_header Host $host;" in text  # nginx's own variables pass through
    local = nginx.render_local(18080, [18001, 18002], tmp_path)
    assert "listen 127.0.0.1:18080 " in local
    assert local.count("server 127.0.0.1:1800") == 2
    assert "/tmp/herald-nginx" not in local  # every path is the cluster's own
    assert f"pid {tmp_path}/nginx.own-pid;" in local


def test_regression_a_reworded_template_line_fails_instead_of_keeping_the_wrong_path() -> None:
    # The old renderer replaced exact lines: a reworded one silently kept /tmp paths.
    template = nginx.TEMPLATE.read_text().replace("${pid}", "${pid_file}")
    with pytest.raises(KeyError, match="pid_file"):
        nginx.render(
            servers=["a:1"], listen="1", error_log="e", pid="p", client_body_temp_path="b", proxy_temp_path="t",
            template=template,
        )  # fmt: skip


def test_rendered_nginx_asks_for_no_more_open_files_than_this_machine_allows(tmp_path: Path) -> None:
    text = nginx.render_local(8080, [8001], tmp_path)
    match = re.search(r"worker_rlimit_nofile (\d+);", text)
    assert match is not None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert int(match.group(1)) <= (hard if hard != resource.RLIM_INFINITY else 65536)


# -- nginx in front of nodes that are down -------------------------------------------


@contextlib.contextmanager
def nginx_front(tmp_path: Path, node_ports: list[int]) -> Iterator[str]:
    """The cluster's nginx alone, in front of ``node_ports`` (up or not); yields its URL."""
    with run_front(node_ports) as front:
        yield front.url


@needs_nginx
def test_regression_nginx_answered_502_to_events_when_no_node_was_up(tmp_path: Path) -> None:
    # A native EventSource that gets a 502 gives up for good: the page never
    # receives another event, even after the nodes are back.
    with nginx_front(tmp_path, [free_port(), free_port()]) as front:
        for _ in range(3):  # refused, then "no live upstreams": both are nginx's own failures
            response = httpx.get(f"{front}/events", params={"topic": "x"}, headers={"Last-Event-ID": "42"})
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert response.headers["cache-control"] == "no-cache"
            assert 1000 <= retry_ms(response.text) <= 2875  # spread over two seconds, per request


@needs_nginx
def test_regression_nginx_answered_html_502_to_publish_when_no_node_was_up(tmp_path: Path) -> None:
    with nginx_front(tmp_path, [free_port()]) as front:
        for _ in range(2):
            response = httpx.post(f"{front}/publish", json={"topic": "x", "data": 1})
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/json"
            assert response.headers["retry-after"] == "2"
            assert response.json() == {"detail": "no Herald node can take the request now; retry"}
        too_big = httpx.post(f"{front}/publish", content=b"x" * (17 * 1024 * 1024))
        assert too_big.status_code == 413
        assert too_big.headers["content-type"] == "application/json"
        assert "over the limit" in too_big.json()["detail"]


@needs_nginx
def test_mercure_hub_through_nginx_with_no_node_up_streams_retry_and_publishers_get_503(tmp_path: Path) -> None:
    """A Mercure subscriber is an EventSource too: nginx's own failure must be an answer it retries."""
    with nginx_front(tmp_path, [free_port()]) as front:
        hub = f"{front}/.well-known/mercure"
        for _ in range(2):
            stream = httpx.get(hub, params={"match": "https://example.com/a"}, headers={"Last-Event-ID": "#42"})
            assert stream.status_code == 200
            assert stream.headers["content-type"] == "text/event-stream"
            assert 1000 <= retry_ms(stream.text) <= 2875
            published = httpx.post(hub, content="topic=x&data=1", headers={"Content-Type": FORM_TYPE})
            assert published.status_code == 503
            assert published.headers["retry-after"] == "2"
            assert published.headers["content-type"] == "application/json"


def retry_ms(stream: str) -> int:
    """The reconnect delay a stream's ``retry:`` line asks for."""
    found = re.search(r"\nretry: (\d+)\n\n", stream)
    assert found, stream
    return int(found.group(1))


@needs_nginx
def test_a_nodes_own_error_on_events_passes_through_nginx_unchanged(tmp_path: Path) -> None:
    with run_server({"HERALD_NODE_ID": "own-errors"}) as node, nginx_front(tmp_path, [node.port]) as front:
        direct = httpx.get(f"{node.url}/events")
        proxied = httpx.get(f"{front}/events")  # no topic: the node's 400, not a retry hint
        assert proxied.status_code == direct.status_code == 400
        assert proxied.headers["x-node-id"] == "own-errors"
        assert proxied.json() == direct.json()
        node.terminate()
        after = httpx.get(f"{front}/events", params={"topic": "x"})
        assert after.status_code == 200
        assert 1000 <= retry_ms(after.text) <= 2875


# -- the command line --------------------------------------------------------------


def cli(run_dir: Path, *args: str, timeout: float = 90) -> str:
    """``python -m ops.cluster ARGS --run-dir RUN_DIR``, which must succeed; its output."""
    result = subprocess.run(
        [sys.executable, "-m", "ops.cluster", *args, "--run-dir", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def status(run_dir: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(cli(run_dir, "status", "--json"))
    return state


def node_states(state: dict[str, Any]) -> dict[str, str]:
    return {n["name"]: n["state"] for n in state["nodes"]}


@needs_nginx
@needs_redis
@pytest.mark.timeout(120)
def test_cli_starts_acts_on_and_stops_a_cluster_by_its_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "cluster"
    front, first_node, redis_port = free_port(), free_port_range(2), free_port()
    ports = ["--front", str(front), "--first-node-port", str(first_node), "--redis-port", str(redis_port)]
    try:
        started = cli(run_dir, "start", "--nodes", "2", *ports)
        assert f"http://127.0.0.1:{front}" in started
        state = status(run_dir)
        assert set(state) == {"front", "redis", "nginx", "nodes"}
        assert state["front"] == f"http://127.0.0.1:{front}"
        assert [(n["name"], n["url"], n["state"]) for n in state["nodes"]] == [
            ("node-0", f"http://127.0.0.1:{first_node}", "ready"),
            ("node-1", f"http://127.0.0.1:{first_node + 1}", "ready"),
        ]
        assert all(isinstance(n["pid"], int) for n in state["nodes"])
        assert state["redis"] == {"url": f"redis://127.0.0.1:{redis_port}/0", "pid": state["redis"]["pid"],
                                  "state": "ready"}  # fmt: skip
        assert state["nginx"]["state"] == "ready"

        cli(run_dir, "stop-node", "node-1")
        state = status(run_dir)
        assert node_states(state) == {"node-0": "ready", "node-1": "stopped"}
        assert state["nodes"][1]["pid"] is None
        cli(run_dir, "start-node", "node-1")
        assert node_states(status(run_dir)) == {"node-0": "ready", "node-1": "ready"}

        # Gray failures for drills: a frozen process holds its sockets and answers nothing.
        assert cli(run_dir, "freeze-node", "node-1").startswith("froze node-1 (pid ")
        assert node_states(status(run_dir)) == {"node-0": "ready", "node-1": "frozen"}
        redis_pid = int(cli(run_dir, "freeze-redis").removeprefix("froze redis (pid ").rstrip(")\n"))
        assert frozen(redis_pid)
        cli(run_dir, "thaw-redis")
        assert not frozen(redis_pid)
        cli(run_dir, "thaw-node", "node-1")

        cli(run_dir, "stop-redis")
        state = status(run_dir)
        assert state["redis"]["state"] == "stopped"
        assert "stopped" in cli(run_dir, "status")  # the readable table
        cli(run_dir, "start-redis")
        wait_until(lambda: set(node_states(status(run_dir)).values()) == {"ready"}, "nodes ready again", 20)

        steps = cli(run_dir, "restart").splitlines()
        assert steps[:3] == ["stopped node-0", "node-0 ready", "nginx sends to node-0 again"]
        assert steps[3:] == ["stopped node-1", "node-1 ready", "nginx sends to node-1 again"]
        pids = [n["pid"] for n in status(run_dir)["nodes"]]
        assert None not in pids
        cli(run_dir, "freeze-node", "node-0")  # a stop wakes it, so that it acts on its SIGTERM
    finally:
        stopped = cli(run_dir, "stop")
    assert stopped.startswith("stopped: ")
    assert set(stopped.removeprefix("stopped: ").strip().split(", ")) == {"nginx", "node-0", "node-1", "redis"}
    state = status(run_dir)
    assert {n["state"] for n in state["nodes"]} == {"stopped"}
    assert state["redis"]["state"] == state["nginx"]["state"] == "stopped"
    assert not list(run_dir.glob("*.pid"))


# -- sentinel ----------------------------------------------------------------------


def redis_part(cluster: Cluster) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(json.dumps(cluster.status()))  # as the CLI's --json prints it
    redis_state: dict[str, Any] = state["redis"]
    return redis_state


def role(port: int) -> str:
    client = redis.Redis(port=port, socket_connect_timeout=0.5, decode_responses=True)
    try:
        return str(client.info("replication")["role"])
    finally:
        client.close()


@needs_nginx
@needs_redis
@pytest.mark.timeout(120)
def test_sentinel_cluster_fails_over_to_the_replica_and_the_old_primary_rejoins(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "cluster", nodes=1, front_port=free_port(), sentinel=True)
    try:
        cluster.start()
        redis_state = redis_part(cluster)
        assert redis_state["master_name"] == "herald"
        assert redis_state["primary"] == "redis"
        assert [r["name"] for r in redis_state["replicas"]] == ["redis-1"]
        assert [s["state"] for s in redis_state["sentinels"]] == ["ready"] * 3
        assert role(cluster.redis_port_of("redis-1")) == "slave"
        saved = json.loads((cluster.run_dir / Cluster.STATE_FILE).read_text())
        assert saved["sentinel"] is True
        assert saved["sentinel_ports"] == cluster.sentinel_ports
        node_pid = cluster.pid_of("node-0")
        assert node_pid is not None
        environ = dict(
            item.split("=", 1) for item in Path(f"/proc/{node_pid}/environ").read_text().split("\0") if "=" in item
        )
        sentinels = ",".join(f"127.0.0.1:{p}" for p in cluster.sentinel_ports)
        assert (environ["REDIS_SENTINELS"], environ["REDIS_SENTINEL_MASTER"]) == (sentinels, "herald")
        assert "REDIS_URL" not in environ  # the node finds the primary through the sentinels

        killed = cluster.failover_redis()
        assert killed == "redis"
        began = time.monotonic()
        wait_until(lambda: cluster.primary() == "redis-1", "the sentinels promoting redis-1", 15)
        took = time.monotonic() - began
        assert role(cluster.redis_port_of("redis-1")) == "master"

        cluster.start_redis_process("redis")  # comes back as a replica of its successor
        assert role(cluster.redis_port) == "slave"
        replicas = redis_part(cluster)["replicas"]
        assert [(r["name"], r["state"]) for r in replicas] == [("redis", "ready")]
        print(f"\nsentinel failover: the sentinels named redis-1 primary {took:.1f} s after the primary was killed")
    finally:
        cluster.stop()
    assert not list(cluster.run_dir.glob("*.pid"))


def test_failover_needs_sentinels(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="sentinel"):
        Cluster(tmp_path, node_ports=[1], redis_port=1).failover_redis()


# -- access control (make cluster AUTH=1) ------------------------------------------------------


def node_environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_text().split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


@needs_nginx
@needs_redis
@pytest.mark.timeout(120)
def test_cli_auth_cluster_gives_every_node_its_secret_and_prints_tokens(tmp_path: Path) -> None:
    run_dir = tmp_path / "cluster"
    front, first_node, redis_port = free_port(), free_port_range(2), free_port()
    ports = ["--front", str(front), "--first-node-port", str(first_node), "--redis-port", str(redis_port)]
    front_url = f"http://127.0.0.1:{front}"
    try:
        started = cli(run_dir, "start", "--nodes", "2", "--auth", *ports)
        secret_file = run_dir / "jwt-secret"
        secret = secret_file.read_text().strip()
        assert len(secret) >= 32
        assert secret_file.stat().st_mode & 0o777 == 0o600
        assert "access control" in started
        assert "ops.cluster token" in started
        assert secret not in started
        saved = (run_dir / Cluster.STATE_FILE).read_text()
        assert json.loads(saved)["auth"] is True
        assert secret not in saved  # only in the 0600 file
        for node in status(run_dir)["nodes"]:
            assert node["state"] == "ready"
            assert node_environ(node["pid"])["HERALD_JWT_SECRET"] == secret
        assert "access control on" in cli(run_dir, "status")

        def stats(url: str, token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return httpx.get(f"{url}/stats", headers=headers, timeout=5).status_code

        admin = cli(run_dir, "token", "--admin").strip()
        reader = cli(run_dir, "token", "--subscribe", "news/*").strip()
        assert (stats(front_url, None), stats(front_url, admin), stats(front_url, reader)) == (401, 200, 403)
        development = cli(run_dir, "token").strip()  # no rights given: may do everything
        published = httpx.post(f"{front_url}/publish", json={"topic": "any/topic", "data": 1},
                               headers={"Authorization": f"Bearer {development}"}, timeout=5)  # fmt: skip
        assert published.status_code == 201
        assert stats(front_url, development) == 200

        # A node started again gets the same secret: the tokens handed out still work on it.
        cli(run_dir, "stop-node", "node-1")
        cli(run_dir, "start-node", "node-1")
        node_1 = f"http://127.0.0.1:{first_node + 1}"
        assert (stats(node_1, None), stats(node_1, admin)) == (401, 200)
    finally:
        cli(run_dir, "stop")
    assert not (run_dir / "jwt-secret").exists()  # the next cluster gets a new secret


def test_a_cluster_without_access_control_has_no_tokens(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, node_ports=[1], redis_port=1)
    cluster.save_state()
    with pytest.raises(RuntimeError, match="without access control"):
        cluster.token(admin=True)
    done = subprocess.run(
        [sys.executable, "-m", "ops.cluster", "token", "--run-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1
    assert "AUTH=1" in done.stderr
    assert done.stdout == ""


def test_start_names_a_taken_port_and_the_setting_that_moves_it(tmp_path: Path) -> None:
    """Regression: `make cluster` used fixed ports unchecked, so a second cluster on the machine collided silently."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "ops.cluster", "start", "--run-dir", str(tmp_path), "--nodes", "1",
             "--front", str(port), "--first-node-port", str(free_port()), "--redis-port", str(free_port())],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip
    assert done.returncode == 1
    assert f"port {port} is taken (wanted for the front (nginx))" in done.stderr
    assert "FRONT_PORT=<port> (make cluster) or --front <port>" in done.stderr
    assert not list(tmp_path.glob("*.pid"))  # nothing was started
