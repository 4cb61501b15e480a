"""What operators plug in, checked for real: Prometheus configs, alert rules and the Grafana dashboard of ops/.

Debian's ``prometheus`` scrapes a real 2-node cluster (two ``python -m api``
nodes on one redis-server, nginx in front), started by :class:`ops.cluster.Cluster`
exactly as ``make cluster OBSERVE=1`` does but scraping and evaluating rules
every second; the tests ask it through its HTTP API. ``promtool`` checks the
configs, the rules and a node's exposition. Every process runs on a free
loopback port and is stopped by pid. Run with ``-s`` for the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml

from ops import prometheus as ops_prometheus
from ops.cluster import Cluster
from ops.launch import NGINX
from ops.probe import free_port, free_port_range
from ops.prometheus import (
    PROMETHEUS,
    PROMETHEUS_COMPOSE_CONF,
    PROMETHEUS_CONF,
    PROMETHEUS_RULES,
    PROMTOOL,
    SCRAPE_JOB,
    SCRAPE_TOKEN_TTL,
)
from tests import redis_server
from tests.ops.test_ops_cluster import cli
from tests.sse_client import EventStream, publish

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "ops" / "grafana"
DASHBOARD = GRAFANA / "herald-dashboard.json"

has_prometheus = Path(PROMETHEUS).exists() and Path(PROMTOOL).exists()
needs_promtool = pytest.mark.skipif(
    not Path(PROMTOOL).exists(), reason="promtool is not installed (Debian: prometheus)"
)
needs_cluster = pytest.mark.skipif(
    not (has_prometheus and redis_server.available() and Path(NGINX).exists()),
    reason="needs prometheus, promtool, redis-server and nginx (ops/install-system-deps.sh)",
)

CONTRACT_METRICS = {
    "herald_node_info",
    "herald_connections",
    "herald_draining",
    "herald_connects_total",
    "herald_events_published_total",
    "herald_publish_errors_total",
    "herald_publish_duration_seconds_bucket",
    "herald_publish_duration_seconds_sum",
    "herald_publish_duration_seconds_count",
    "herald_events_received_total",
    "herald_deliveries_total",
    "herald_replayed_events_total",
    "herald_bytes_sent_total",
    "herald_slow_client_cutoffs_total",
    "herald_expired_streams_total",
    "herald_resets_total",
    "herald_delivery_latency_seconds_bucket",
    "herald_delivery_latency_seconds_sum",
    "herald_delivery_latency_seconds_count",
    "herald_topics",
    "herald_broker_up",
    "herald_broker_feed_reconnects_total",
    "herald_broker_backfilled_events_total",
    "herald_broker_replay_reads_total",
    "herald_broker_pool_in_use",
    "herald_broker_pool_size",
    "herald_auth_tokens_verified_total",
    "herald_auth_tokens_rejected_total",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "up",
}
"""Every series name a dashboard panel or an alert may use: the metrics contract of GET /metrics, and Prometheus' up."""

RATE_INTERVAL = "1m"
"""What Grafana's ``$__rate_interval`` stands for when the tests evaluate the dashboard (scrapes are 1 s apart)."""

PROMQL_WORDS = {
    "sum", "by", "on", "group_left", "max", "min", "rate", "histogram_quantile", "count", "without", "le",
    "increase", "avg", "ignoring", "group_right", "bool", "and", "or", "unless", "offset",
}  # fmt: skip


# -- what the files say ----------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, those inside rows included (rows themselves left out)."""
    found: list[dict[str, Any]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            if panel.get("type") != "row":
                found.append(panel)
            walk(panel.get("panels", []))

    walk(dashboard()["panels"])
    return found


def dashboard_expressions() -> list[tuple[str, str]]:
    """``(panel title and legend, PromQL)`` for every query of the dashboard, Grafana variables replaced."""
    expressions = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
            assert "$" not in expr, f"a Grafana variable the tests do not know: {expr}"
            expressions.append((f"{panel['title']} / {target.get('legendFormat', target['refId'])}", expr))
    return expressions


def alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = yaml.safe_load(PROMETHEUS_RULES.read_text())["groups"][0]["rules"]
    return rules


def split_threshold(expr: str) -> tuple[str, str, float]:
    """``"<query> <comparison> <threshold>"`` as its three parts (every rule is written so)."""
    match = re.fullmatch(r"(.*\S)\s*(==|!=|>=|<=|>|<)\s*([0-9.]+)", expr.strip(), flags=re.S)
    assert match is not None, f"not '<query> <comparison> <number>': {expr}"
    return match.group(1), match.group(2), float(match.group(3))


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (identifiers that are no function, keyword or label)."""
    text = re.sub(r'"[^"]*"', '""', expr)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    return set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*", text)) - PROMQL_WORDS


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    assert match is not None, text
    return int(match.group(1)) * units[match.group(2)]


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_committed_prometheus_configs_are_the_renderings() -> None:
    assert PROMETHEUS_CONF.read_text() == ops_prometheus.render_prometheus_default(), (
        "ops/prometheus.yml is stale: run `python -m ops.cluster prometheus-config > ops/prometheus.yml`"
    )
    assert PROMETHEUS_COMPOSE_CONF.read_text() == ops_prometheus.render_prometheus_compose(), (
        "ops/prometheus-compose.yml is stale: run "
        "`python -m ops.cluster prometheus-config --compose > ops/prometheus-compose.yml`"
    )


def test_committed_prometheus_config_scrapes_the_default_cluster() -> None:
    config = yaml.safe_load(PROMETHEUS_CONF.read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == SCRAPE_JOB
    assert job["metrics_path"] == "/metrics"
    (static,) = job["static_configs"]
    # `make cluster`: three nodes from 8001 (ops.cluster's defaults, the Makefile's NODES ?= 3).
    assert static["targets"] == ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"]
    assert config["rule_files"] == ["prometheus-rules.yml"]  # beside the config
    assert "authorization" not in job  # make cluster without AUTH=1
    compose = yaml.safe_load(PROMETHEUS_COMPOSE_CONF.read_text())
    (compose_job,) = compose["scrape_configs"]
    assert compose_job["job_name"] == SCRAPE_JOB
    assert compose_job["dns_sd_configs"] == [{"names": ["api"], "type": "A", "port": 8000, "refresh_interval": "15s"}]
    assert compose_job["authorization"]["credentials_file"] == ops_prometheus.COMPOSE_TOKEN_FILE


def test_prometheus_config_command_prints_the_committed_files() -> None:
    for args, path in (([], PROMETHEUS_CONF), (["--compose"], PROMETHEUS_COMPOSE_CONF)):
        printed = subprocess.run(
            [sys.executable, "-m", "ops.cluster", "prometheus-config", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert printed == path.read_text()
    five = ops_prometheus.render_prometheus_default(nodes=5, first_node_port=9001)
    assert yaml.safe_load(five)["scrape_configs"][0]["static_configs"][0]["targets"][-1] == "127.0.0.1:9005"


@needs_promtool
def test_promtool_check_config_passes_for_every_config(tmp_path: Path) -> None:
    # The committed one, as is (its rules beside it).
    result = promtool("check", "config", str(PROMETHEUS_CONF))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout
    # compose's: promtool wants the token file to exist; the container has it at /run/herald.
    token = tmp_path / "prometheus-token"
    token.write_text("t\n")
    compose = tmp_path / "compose" / "prometheus.yml"
    compose.parent.mkdir()
    compose.write_text(PROMETHEUS_COMPOSE_CONF.read_text().replace(ops_prometheus.COMPOSE_TOKEN_FILE, str(token)))
    shutil.copy(PROMETHEUS_RULES, compose.parent / "prometheus-rules.yml")  # compose mounts it beside the config
    result = promtool("check", "config", str(compose))
    assert result.returncode == 0, result.stdout + result.stderr
    # What ops.cluster writes for an --auth --observe cluster (and one without access control).
    for auth in (False, True):
        cluster = Cluster(tmp_path / f"run-{auth}", node_ports=[18001, 18002], redis_port=1, auth=auth)
        cluster.run_dir.mkdir()
        cluster.prometheus_token_file.write_text("t\n")
        rendered = cluster.run_dir / "prometheus.yml"
        rendered.write_text(cluster.prometheus_config())
        result = promtool("check", "config", str(rendered))
        assert result.returncode == 0, result.stdout + result.stderr
        job = yaml.safe_load(rendered.read_text())["scrape_configs"][0]
        assert job["static_configs"][0]["targets"] == ["127.0.0.1:18001", "127.0.0.1:18002"]
        if auth:
            assert job["authorization"] == {"type": "Bearer", "credentials_file": str(cluster.prometheus_token_file)}
        else:
            assert "authorization" not in job


@needs_promtool
def test_promtool_check_rules_passes() -> None:
    result = promtool("check", "rules", str(PROMETHEUS_RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_alert_rules_cover_what_operators_act_on() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) == {
        "HeraldNodeDown",
        "HeraldSlowClientCutoffsRising",
        "HeraldPublishErrors",
        "HeraldRedisFeedDown",
    }
    parts = {name: split_threshold(rule["expr"]) for name, rule in rules.items()}
    assert parts["HeraldNodeDown"] == ('up{job="herald"}', "==", 0)
    assert duration_seconds(rules["HeraldNodeDown"]["for"]) >= 30
    query, comparison, threshold = parts["HeraldSlowClientCutoffsRising"]
    assert "rate(herald_slow_client_cutoffs_total" in query
    assert (comparison, threshold > 0) == (">", True)
    query, comparison, threshold = parts["HeraldPublishErrors"]
    assert "rate(herald_publish_errors_total" in query
    assert 'status="5xx"' in query
    assert (comparison, threshold) == (">", 0)
    assert parts["HeraldRedisFeedDown"] == ('herald_broker_up{job="herald"}', "==", 0)
    assert duration_seconds(rules["HeraldRedisFeedDown"]["for"]) >= 10
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert "{{ $labels.instance }}" in rule["annotations"]["summary"], name
        assert series_names(rule["expr"]) <= CONTRACT_METRICS, name


def test_grafana_dashboard_has_the_panels_operators_need() -> None:
    board = dashboard()
    assert board["uid"] == "herald-overview"
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
    assert board["templating"]["list"][0]["type"] == "datasource"
    assert board["templating"]["list"][0]["query"] == "prometheus"
    panels = dashboard_panels()
    rows = [p for p in board["panels"] if p["type"] == "row"]
    ids = [p["id"] for p in rows + panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
    expressions = dashboard_expressions()
    text = "\n".join(expr for _, expr in expressions)
    used = set().union(*(series_names(expr) for _, expr in expressions))
    assert used <= CONTRACT_METRICS, used - CONTRACT_METRICS
    titles = {p["title"] for p in panels}
    assert {"Connections per node", "Connections", "Deliveries/s", "Events in/s", "Publish latency",
            "Delivery latency p99", "Slow-client cut-offs/s", "Resets/s", "Redis feed up", "Memory (resident)",
            "CPU"} <= titles  # fmt: skip
    for needed in (
        "sum(herald_connections)",
        "herald_connections * on (job, instance) group_left (node_id)",
        "rate(herald_deliveries_total[",
        "rate(herald_events_published_total[",
        "rate(herald_events_received_total[",
        "histogram_quantile(0.5, sum by (le) (rate(herald_publish_duration_seconds_bucket[",
        "histogram_quantile(0.99, sum by (le) (rate(herald_publish_duration_seconds_bucket[",
        "histogram_quantile(0.99, sum by (le) (rate(herald_delivery_latency_seconds_bucket[",
        "rate(herald_slow_client_cutoffs_total[",
        "rate(herald_resets_total[",
        "herald_broker_up",
        'process_resident_memory_bytes{job="herald"}',
        'rate(process_cpu_seconds_total{job="herald"}[',
    ):
        assert needed in text, needed


def test_grafana_provisioning_loads_the_dashboard_from_prometheus() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "herald-prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"  # compose's service
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert "prometheus" in compose["services"]
    assert "127.0.0.1:9090:9090" in compose["services"]["prometheus"]["ports"]
    assert (
        source["jsonData"]["timeInterval"] == yaml.safe_load(PROMETHEUS_CONF.read_text())["global"]["scrape_interval"]
    )
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "herald.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    readme = (GRAFANA / "README.md").read_text()
    # The README's mounts put the dashboard where the provider reads, and the provisioning where Grafana does.
    assert f"./ops/grafana/herald-dashboard.json:{path}/herald-dashboard.json:ro" in readme
    assert "./ops/grafana/provisioning:/etc/grafana/provisioning:ro" in readme


# -- Prometheus scraping a real cluster ----------------------------------------------------


class PrometheusAPI:
    """Prometheus' HTTP API: instant queries that must succeed (an invalid expression fails the test)."""

    def __init__(self, url: str) -> None:
        self.url = url

    @staticmethod
    def _result(response: httpx.Response, expr: str) -> list[dict[str, Any]]:
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        return self._result(response, expr)

    async def aquery(self, client: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
        response = await client.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        return self._result(response, expr)

    def wait_for(
        self, expr: str, check: Callable[[list[dict[str, Any]]], bool], what: str, timeout: float = 30
    ) -> list[dict[str, Any]]:
        """Poll ``expr`` until ``check(result)``; AssertionError with the last result after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            result: list[dict[str, Any]] = []
            with contextlib.suppress(httpx.HTTPError):  # not listening yet
                result = self.query(expr)
            if check(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout}s; last {expr} = {result}")
            time.sleep(0.2)  # the next scrape is at most a second away

    async def await_for(
        self,
        client: httpx.AsyncClient,
        expr: str,
        check: Callable[[list[dict[str, Any]]], bool],
        what: str,
        timeout: float = 30,
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            result = await self.aquery(client, expr)
            if check(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout}s; last {expr} = {result}")
            await asyncio.sleep(0.2)

    def alerts(self) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/api/v1/alerts", timeout=10).json()
        assert body["status"] == "success", body
        alerts: list[dict[str, Any]] = body["data"]["alerts"]
        return alerts


def by_instance(result: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"]["instance"]: float(r["value"][1]) for r in result}


def instances(cluster: Cluster) -> dict[str, str]:
    """Node name by Prometheus instance label."""
    return {f"127.0.0.1:{port}": name for port, name in zip(cluster.node_ports, cluster.node_names, strict=True)}


def wait_scraped(cluster: Cluster, api: PrometheusAPI, timeout: float = 40) -> float:
    """Wait until Prometheus scraped every node successfully; the seconds that took."""
    began = time.monotonic()
    expected = dict.fromkeys(instances(cluster), 1.0)
    try:
        api.wait_for(f'up{{job="{SCRAPE_JOB}"}}', lambda r: by_instance(r) == expected, "every node scraped", timeout)
    except AssertionError as error:
        answer = httpx.get(f"{cluster.node_url(0)}/metrics", timeout=5)
        targets = httpx.get(f"{api.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        errors = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
        raise AssertionError(f"{error}\nnode-0 GET /metrics: {answer.status_code}\ntargets: {errors}") from None
    return time.monotonic() - began


def observed_cluster(run_dir: Path, **options: Any) -> Cluster:
    """A 2-node cluster with Prometheus beside it, scraping and evaluating every second (not started)."""
    return Cluster(run_dir, nodes=2, front_port=free_port(), observe=True, scrape_interval="1s", **options)


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, PrometheusAPI]]:
    cluster = observed_cluster(tmp_path_factory.mktemp("observed") / "cluster")
    cluster.start()
    try:
        api = PrometheusAPI(cluster.prometheus_url)
        took = wait_scraped(cluster, api)
        print(f"\nprometheus: both nodes scraped (up == 1) {took:.1f} s after it was ready")
        yield cluster, api
    finally:
        cluster.stop()


async def wait_connections(
    client: httpx.AsyncClient, api: PrometheusAPI, cluster: Cluster, per_node: list[int], what: str
) -> float:
    """Wait until Prometheus has ``sum(herald_connections)`` and each node's value as given; the seconds taken."""
    began = time.monotonic()
    expected = {address: float(n) for address, n in zip(instances(cluster), per_node, strict=True)}
    await api.await_for(client, "herald_connections", lambda r: by_instance(r) == expected, what, 20)
    total = await api.aquery(client, "sum(herald_connections)")
    assert [float(r["value"][1]) for r in total] == [float(sum(per_node))]
    return time.monotonic() - began


@needs_cluster
@pytest.mark.timeout(120)
async def test_prometheus_sum_of_connections_is_the_clients_held_open(observed: tuple[Cluster, PrometheusAPI]) -> None:
    cluster, api = observed
    topic = f"prom-{os.urandom(4).hex()}"
    async with httpx.AsyncClient() as client:
        await wait_connections(client, api, cluster, [0, 0], "no stream open before the test's")
        streams = [await EventStream.open(cluster.node_url(0), [topic]) for _ in range(3)]
        streams += [await EventStream.open(cluster.node_url(1), [topic, f"{topic}-b"]) for _ in range(2)]
        try:
            assert all(s.response.status_code == 200 for s in streams)
            opened = await wait_connections(client, api, cluster, [3, 2], "5 streams open")
            for stream in streams[:2]:
                await stream.close()
            closed = await wait_connections(client, api, cluster, [1, 2], "3 streams open after 2 closed")
        finally:
            for stream in streams:
                await stream.close()
        await wait_connections(client, api, cluster, [0, 0], "every stream closed")
    print(
        f"\nprometheus: sum(herald_connections) = 5 (node-0 3, node-1 2) {opened:.1f} s after the streams opened; "
        f"= 3 {closed:.1f} s after 2 closed; scrape interval 1 s"
    )


def answers(expr: str, result: list[dict[str, Any]]) -> bool:
    """Whether a dashboard query's ``result`` shows what its panel is for.

    Data, and a number (a quantile is NaN until a rate window holds two
    scrapes with traffic); a per-node query names both nodes (its join with
    ``herald_node_info`` works).
    """
    if not any(not math.isnan(float(series["value"][1])) for series in result):
        return False
    if "group_left (node_id)" in expr:
        return {series["metric"].get("node_id") for series in result} == {"node-0", "node-1"}
    return True


@needs_cluster
@pytest.mark.timeout(120)
async def test_every_dashboard_and_alert_expression_evaluates_and_returns_data(
    observed: tuple[Cluster, PrometheusAPI],
) -> None:
    cluster, api = observed
    topic = f"prom-{os.urandom(4).hex()}"
    expressions = dashboard_expressions()
    rules = {rule["alert"]: split_threshold(rule["expr"]) for rule in alert_rules()}
    async with httpx.AsyncClient(timeout=10) as client:
        # Traffic for every panel: a subscriber on each node, publishes at both, a reset, refused publishes.
        streams = [await EventStream.open(cluster.node_url(i), [topic]) for i in range(2)]
        reset = await EventStream.open(cluster.node_url(0), [topic], last_event_id="not-an-id")
        try:
            assert (await reset.next_event()).type == "reset"
            refused = [
                (await publish(cluster.node_url(0), {"topic": "_herald/nodes", "data": 1}, client)).status_code,
                (await publish(cluster.node_url(1), {"topic": "bad topic", "data": 1}, client)).status_code,
            ]
            assert all(400 <= status < 500 for status in refused), refused
            pending = dict(expressions)
            answered: dict[str, list[dict[str, Any]]] = {}
            deadline = time.monotonic() + 45
            published = 0
            while pending and time.monotonic() < deadline:
                for i in range(2):
                    response = await publish(cluster.node_url(i), {"topic": topic, "data": published}, client)
                    assert response.status_code == 201, response.text
                    published += 1
                for title, expr in list(pending.items()):
                    result = await api.aquery(client, expr)  # an invalid expression fails here at once
                    if answers(expr, result):
                        answered[title] = result
                        del pending[title]
                await asyncio.sleep(0.25)  # a producer's pace; Prometheus scrapes every second
            assert not pending, f"dashboard queries without data (or only NaN) after 45 s: {pending}"
            for stream in streams:
                assert len(await stream.take(2)) == 2  # events did reach the subscribers
            # The alert rules: every whole expression is valid; the query without its threshold returns data,
            # or (a label value that only trouble creates, such as status="5xx") its series exist.
            fallbacks = []
            for name, (query, comparison, threshold) in rules.items():
                await api.aquery(client, f"{query} {comparison} {threshold:g}")
                if await api.aquery(client, query):
                    continue
                for series in series_names(query):
                    found = await api.aquery(client, f'count({series}{{job="{SCRAPE_JOB}"}})')
                    assert found, f"{name}: no series {series}"
                fallbacks.append(name)
        finally:
            for stream in [*streams, reset]:
                await stream.close()

    def ms(title: str) -> str:
        return f"{float(answered[title][0]['value'][1]) * 1000:.1f} ms"

    print(
        f"\nprometheus: {len(expressions)} dashboard queries all returned numbers after {published} publishes"
        f" (publish latency p50 {ms('Publish latency / p50')}, p99 {ms('Publish latency / p99')};"
        f" delivery latency p99 {ms('Delivery latency p99 / p99 all nodes')});"
        f" {len(rules)} alert queries valid, "
        + (f"{', '.join(fallbacks)} with their series present only" if fallbacks else "each returning data")
    )


@needs_cluster
def test_promtool_check_metrics_reports_nothing_on_a_nodes_exposition(observed: tuple[Cluster, PrometheusAPI]) -> None:
    cluster, _ = observed
    response = httpx.get(f"{cluster.node_url(0)}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    result = promtool("check", "metrics", stdin=response.content)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == result.stderr == ""


def alert_states(api: PrometheusAPI, name: str) -> dict[str, str]:
    """The state (pending, firing) of alert ``name`` by instance."""
    return {a["labels"]["instance"]: a["state"] for a in api.alerts() if a["labels"]["alertname"] == name}


@needs_cluster
@pytest.mark.timeout(150)
def test_alerts_fire_when_redis_stops_and_a_node_dies(tmp_path: Path) -> None:
    cluster = observed_cluster(tmp_path / "cluster")
    cluster.start()
    try:
        api = PrometheusAPI(cluster.prometheus_url)
        wait_scraped(cluster, api)
        assert api.alerts() == []
        node0, node1 = instances(cluster)
        began = time.monotonic()
        cluster.stop_redis()
        api.wait_for(
            f'herald_broker_up{{job="{SCRAPE_JOB}"}}',
            lambda r: by_instance(r) == {node0: 0.0, node1: 0.0},
            "both nodes reporting their Redis feed down",
            20,
        )
        feed_down = time.monotonic() - began
        refused = httpx.post(f"{cluster.node_url(0)}/publish", json={"topic": "t", "data": 1}, timeout=10)
        assert refused.status_code == 503
        api.wait_for(
            'herald_publish_errors_total{status="5xx"}',
            lambda r: by_instance(r).get(node0) == 1.0,
            "the failed publish counted",
            20,
        )
        # HeraldRedisFeedDown waits 10 s before it fires; HeraldPublishErrors a minute (pending is enough).
        deadline = time.monotonic() + 40
        while alert_states(api, "HeraldRedisFeedDown") != {node0: "firing", node1: "firing"}:
            assert time.monotonic() < deadline, api.alerts()
            time.sleep(0.5)
        fired = time.monotonic() - began
        assert alert_states(api, "HeraldPublishErrors") in ({node0: "pending"}, {node0: "firing"})
        cluster.kill_node(1)
        deadline = time.monotonic() + 20
        while alert_states(api, "HeraldNodeDown") != {node1: "pending"}:
            assert time.monotonic() < deadline, api.alerts()
            time.sleep(0.5)
        assert "HeraldSlowClientCutoffsRising" not in {a["labels"]["alertname"] for a in api.alerts()}
    finally:
        cluster.stop()
    print(
        f"\nalerts: Redis stopped -> herald_broker_up 0 in Prometheus after {feed_down:.1f} s, "
        f"HeraldRedisFeedDown firing after {fired:.1f} s (for: 10s); HeraldPublishErrors pending after one 503; "
        "HeraldNodeDown pending for the killed node"
    )


# -- make cluster OBSERVE=1 ---------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@needs_cluster
@pytest.mark.timeout(150)
def test_cli_start_observe_runs_prometheus_scraping_every_node_and_stop_ends_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "cluster"
    front, first_node, redis_port, prometheus_port = free_port(), free_port_range(2), free_port(), free_port()
    ports = ["--front", str(front), "--first-node-port", str(first_node), "--redis-port", str(redis_port)]
    url = f"http://127.0.0.1:{prometheus_port}"
    pid = None
    try:
        started = cli(run_dir, "start", "--nodes", "2", *ports, "--observe", "--prometheus-port",
                      str(prometheus_port), "--scrape-interval", "1s")  # fmt: skip
        assert f"prometheus      {url}" in started
        state = json.loads(cli(run_dir, "status", "--json"))
        assert state["prometheus"]["url"] == url
        assert state["prometheus"]["state"] == "ready"
        pid = state["prometheus"]["pid"]
        assert isinstance(pid, int)
        assert re.search(rf"^prometheus\s+ready\s+{pid}\s+{re.escape(url)}$", cli(run_dir, "status"), flags=re.M)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert f"--web.listen-address=127.0.0.1:{prometheus_port}".encode() in cmdline  # loopback only
        assert f"--storage.tsdb.path={run_dir.resolve() / 'prometheus'}".encode() in cmdline
        config = yaml.safe_load((run_dir / "prometheus.yml").read_text())
        assert config["scrape_configs"][0]["static_configs"][0]["targets"] == [
            f"127.0.0.1:{first_node}",
            f"127.0.0.1:{first_node + 1}",
        ]
        loaded = Cluster.load(run_dir)
        api = PrometheusAPI(url)
        took = wait_scraped(loaded, api)
        assert (run_dir / "prometheus" / "wal").is_dir()
        rules = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} == {rule["alert"] for rule in alert_rules()}
    finally:
        stopped = cli(run_dir, "stop")
    assert "prometheus" in stopped.removeprefix("stopped: ").strip().split(", ")
    assert pid is not None
    assert not alive(pid)
    assert not list(run_dir.glob("*.pid"))
    assert json.loads(cli(run_dir, "status", "--json"))["prometheus"] == {"url": url, "pid": None, "state": "stopped"}
    print(f"\nmake cluster OBSERVE=1: prometheus scraped both nodes (up == 1) {took:.1f} s after start returned")


@needs_cluster
@pytest.mark.timeout(150)
def test_auth_cluster_prometheus_scrapes_with_an_admin_token_from_a_private_file(tmp_path: Path) -> None:
    cluster = observed_cluster(tmp_path / "cluster", auth=True)
    cluster.start()
    try:
        token_file = cluster.prometheus_token_file
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        claims = jwt.decode(token, cluster.jwt_secret, algorithms=["HS256"])
        assert claims["herald"] == {"admin": True}
        assert claims["exp"] - claims["iat"] == SCRAPE_TOKEN_TTL
        job = yaml.safe_load((cluster.run_dir / "prometheus.yml").read_text())["scrape_configs"][0]
        assert job["authorization"]["credentials_file"] == str(token_file)
        assert token not in (cluster.run_dir / "prometheus.yml").read_text()
        assert token not in (cluster.run_dir / Cluster.STATE_FILE).read_text()
        assert httpx.get(f"{cluster.node_url(0)}/metrics", timeout=10).status_code == 401
        with_token = httpx.get(f"{cluster.node_url(0)}/metrics", headers={"Authorization": f"Bearer {token}"})
        assert with_token.status_code == 200
        wait_scraped(cluster, PrometheusAPI(cluster.prometheus_url))
    finally:
        cluster.stop()
    assert not cluster.prometheus_token_file.exists()  # a stopped cluster leaves no token behind
