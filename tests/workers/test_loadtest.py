"""The load tool against real deployments: a small cluster (redis-server, 2 nodes, nginx) and a broken node.

Each test runs ``python -m workers.loadtest`` as its own process, exactly as
an operator would, and reads the ``--json`` result it wrote. The tool has to
be able to fail a deployment, not only pass one: a node made here to drop
every 10th event must be reported with exactly the events it dropped.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.app import create_app
from api.settings import Settings
from ops.cluster import Cluster
from ops.launch import ROOT
from ops.probe import probe_get, wait_until
from tests import redis_server
from tests.browser import CHROMIUM, chromium
from tests.clusters import cluster_running
from tests.server import serve_app
from workers.loadtest.results import SCHEMA_PATH

pytestmark = pytest.mark.skipif(not redis_server.available(), reason="redis-server is not installed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with cluster_running(tmp_path_factory.mktemp("lt"), nodes=2) as running:
        yield running


def loadtest_args(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "workers.loadtest", "--quiet", "--ramp", "0.3", "--drain", "15",
            "--json", str(out), *args]  # fmt: skip


def run_tool(out: Path, *args: str, timeout: float = 90) -> tuple[int, dict[str, Any], str]:
    """Run the tool to its end; its exit status, its JSON result and what it printed."""
    done = subprocess.run(loadtest_args(out, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.exists(), f"no result written:\n{done.stdout}\n{done.stderr}"
    return done.returncode, json.loads(out.read_text()), done.stdout


def fronted_nodes(cluster: Cluster) -> set[str]:
    """The nodes nginx sends requests to now (a round of requests through the front)."""
    return {probe_get(f"{cluster.front_url}/readyz", timeout=2).headers["x-node-id"] for _ in range(6)}


def validate(result: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(result)


@pytest.fixture(scope="module")
def short_run(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path]:
    """300 subscribers over 2 worker processes, 10 topics, 2 per connection, through nginx."""
    out = tmp_path_factory.mktemp("short")
    code, result, printed = run_tool(
        out / "result.json",
        "--target", cluster.front_url, "--subscribers", "300", "--topics", "10", "--topics-per-conn", "2",
        "--rate", "200", "--duration", "3", "--procs", "2", "--report", str(out / "report.html"),
    )  # fmt: skip
    print(printed)
    return code, result, out / "report.html"


@pytest.mark.timeout(120)
def test_a_short_run_reports_zero_loss_and_sane_latencies(short_run: tuple[int, dict[str, Any], Path]) -> None:
    code, result, _ = short_run
    delivery, publish = result["delivery"], result["publish"]
    assert code == 0, result["verdict"]
    assert result["verdict"] == {"pass": True, "reasons": []}
    assert publish["accepted"] == 600
    assert publish["errors"] == {}
    # Each subscriber has 2 of 10 topics: a fifth of the events, each exactly once.
    assert delivery["expected"] == 300 * 600 // 5
    assert delivery["delivered"] == delivery["expected"]
    assert (delivery["lost"], delivery["duplicated"], delivery["out_of_order"]) == (0, 0, 0)
    assert result["connections"]["connected"] == 300
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"] < 5000
    assert result["latency_ms"]["count"] == delivery["delivered"]
    # nginx spread the subscribers over both nodes, and each node's share adds up.
    nodes = {n["node"]: n for n in result["nodes"]}
    assert set(nodes) == {"node-0", "node-1"}
    assert all(n["connects"] > 50 for n in nodes.values())
    assert sum(n["deliveries"] for n in nodes.values()) == delivery["delivered"]
    assert sum(row["delivered"] for row in result["timeline"]) == delivery["delivered"]
    assert len(result["subscribers"]) == 300
    assert len(result["tool"]["worker_cpu"]) == 2


def test_the_result_matches_its_json_schema(short_run: tuple[int, dict[str, Any], Path]) -> None:
    _, result, _ = short_run
    validate(result)
    broken = {**result, "delivery": {**result["delivery"], "lost": -1}}
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate({k: v for k, v in result.items() if k != "latency_ms"})


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (ops/install-system-deps.sh installs it)")
@pytest.mark.timeout(120)
async def test_the_html_report_renders_its_plots_in_headless_chromium(
    short_run: tuple[int, dict[str, Any], Path],
) -> None:
    _, _, report = short_run
    html = report.read_text()
    assert "<script" in html
    assert "<script src=" not in html  # self-contained: plotly.js is in the page, no CDN
    async with chromium() as browser:  # the suite's one Chromium harness (tests/browser.py)
        await browser.navigate(report.as_uri(), timeout=30)
        # plotly.js marks each plot it has drawn, and draws its axes as SVG.
        plots = await browser.until("document.querySelectorAll('.js-plotly-plot').length", lambda n: n >= 5, 30)
        axes = await browser.evaluate("document.querySelectorAll('.main-svg').length")
        text = await browser.evaluate("document.body.innerText")
        shot = await browser.send("Page.captureScreenshot", {"format": "png"}, timeout=30)
    assert plots >= 5
    assert axes >= 5
    assert "PASS: every accepted event reached every subscriber" in text
    png = base64.b64decode(shot["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 20_000  # plots, not a blank page


@pytest.mark.timeout(150)
@pytest.mark.usefixtures("native_tools")
@pytest.mark.parametrize("client", ["python", "native"])
def test_a_node_killed_mid_run_loses_nothing_and_its_clients_reconnect(
    cluster: Cluster, tmp_path: Path, client: str
) -> None:
    # A node killed by an earlier test must be back behind nginx, or nobody is on it to cut off.
    wait_until(lambda: fronted_nodes(cluster) == {"node-0", "node-1"}, "both nodes behind nginx", 20)
    code, result, printed = run_tool(
        tmp_path / "result.json", "--client", client,
        "--target", cluster.front_url, "--subscribers", "200", "--rate", "100", "--duration", "5",
        "--kill-node-at", "1.5", "--kill-node", "0", "--restart-node-after", "1",
        "--cluster-dir", str(cluster.run_dir),
    )  # fmt: skip
    print(printed)
    fault = result["faults"][0]
    assert code == 0, result["verdict"]
    assert result["delivery"]["lost"] == 0
    assert result["delivery"]["delivered"] == result["delivery"]["expected"] == 200 * 500
    assert result["delivery"]["duplicated"] == 0
    assert [s["what"] for s in fault["steps"]] == ["killed node-0", "restarted node-0"]
    killed = [s for s in result["subscribers"] if s["reconnects"]]
    assert 30 < fault["subscribers_disconnected"] == len(killed) == result["connections"]["reconnects"] < 200
    assert fault["subscribers_not_back"] == 0
    assert fault["subscribers_back_after_s"] is not None
    assert fault["subscribers_back_after_s"] < 10
    assert "fault" in printed
    assert "killed node-0" in printed
    validate(result)


@pytest.mark.timeout(150)
def test_a_redis_restart_mid_run_loses_no_accepted_event(cluster: Cluster, tmp_path: Path) -> None:
    code, result, printed = run_tool(
        tmp_path / "result.json",
        "--target", cluster.front_url, "--subscribers", "100", "--rate", "100", "--duration", "4",
        "--restart-redis-at", "1", "--cluster-dir", str(cluster.run_dir),
    )  # fmt: skip
    print(printed)
    assert code == 0, result["verdict"]
    assert result["delivery"]["lost"] == 0
    assert result["publish"]["accepted"] == 400  # every publish that failed was retried until accepted
    fault = result["faults"][0]
    assert [s["what"] for s in fault["steps"]] == ["stopped redis", "started redis"]
    assert fault["publish_errors"] == sum(result["publish"]["errors"].values())


@pytest.mark.timeout(120)
def test_publishing_straight_to_redis(cluster: Cluster, tmp_path: Path) -> None:
    node_urls = [f"--target={cluster.node_url(i)}" for i in range(2)]
    code, result, _ = run_tool(
        tmp_path / "result.json", *node_urls, "--subscribers", "100", "--topics", "each", "--rate", "300",
        "--duration", "2", "--publish", "redis", "--redis-url", cluster.redis_url,
    )  # fmt: skip
    assert code == 0, result["verdict"]
    assert result["delivery"]["delivered"] == result["delivery"]["expected"] == 600
    # Subscriber i was sent to node i % 2, and its deliveries are counted there.
    assert {n["node"]: n["connects"] for n in result["nodes"]} == {"node-0": 50, "node-1": 50}


class DropEveryTenthEvent:
    """A broken node: its SSE responses leave out every 10th event of each stream, and count what they drop."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.dropped = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/events":
            await self.app(scope, receive, send)
            return
        events = 0

        async def dropping(message: Message) -> None:
            nonlocal events
            body = message.get("body", b"") if message["type"] == "http.response.body" else b""
            if body:
                kept = []
                *frames, rest = body.split(b"\n\n")  # Herald writes whole frames
                for frame in frames:
                    if b"data: " in frame:
                        events += 1
                        if events % 10 == 0:
                            self.dropped += 1
                            continue
                    kept.append(frame + b"\n\n")
                message = {**message, "body": b"".join(kept) + rest}
            await send(message)

        await self.app(scope, receive, dropping)


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("native_tools")
@pytest.mark.parametrize("client", ["python", "native"])
async def test_a_node_that_drops_every_tenth_event_fails_with_exactly_those_events_lost(
    tmp_path: Path, client: str
) -> None:
    broken = DropEveryTenthEvent(create_app(Settings(node_id="broken")))
    out = tmp_path / "result.json"
    async with serve_app(broken) as url:  # type: ignore[arg-type]
        process = await asyncio.create_subprocess_exec(
            *loadtest_args(out, "--client", client, "--target", url, "--subscribers", "30", "--topics", "3",
                           "--rate", "100", "--duration", "2", "--drain", "3"),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        printed, _ = await asyncio.wait_for(process.communicate(), 90)
    result = json.loads(out.read_text())
    delivery = result["delivery"]
    assert process.returncode == 1
    assert broken.dropped > 0
    assert delivery["lost"] == broken.dropped
    assert delivery["delivered"] == delivery["expected"] - broken.dropped
    assert (delivery["duplicated"], delivery["out_of_order"]) == (0, 0)
    assert delivery["subscribers_with_loss"] == 30
    assert result["verdict"]["pass"] is False
    assert result["verdict"]["reasons"] == [f"{broken.dropped:,} accepted events lost"]
    assert f"FAIL: {broken.dropped:,} accepted events lost" in printed.decode()
