"""The dashboard in headless Chromium: Herald's own figures, read the way any subscribing page reads Herald.

``GET /dashboard`` is a page that subscribes (EventSource) to the reserved
topic ``_herald/nodes``, on which every node publishes its figures once a
second, and reads ``GET /cluster`` every few seconds. The browser is the
judge of what it shows: the nodes' table, the cluster totals, the charts
(uPlot, served from the package) and the test-publish form are read back
from the page's DOM through DevTools, and compared with what the test
itself holds open and publishes.

* the page and its assets are served from the package, and a page loaded
  in Chromium asks nothing of any origin but the node's (no CDN);
* with access control on, a page without a token says "admin token needed"
  and takes one (a cookie), or takes ``?access_token=`` from its address;
* on a 2-node cluster (``ops.cluster``: redis-server, two nodes, nginx) under
  load from the load tool: both nodes shown, the cluster's connection count
  the truth within one update (the first figures taken after the truth was
  established show it), the publish form's event arrives, a node killed
  (SIGKILL) turns ``gone``; a screenshot is saved as an artifact
  (``.run/artifacts/``, or ``$HERALD_ARTIFACTS``) and as ``docs/dashboard.png``
  when that file is missing or ``HERALD_DOCS_SCREENSHOT=1``;
* 20 nodes (two real, eighteen publishing made-up figures straight into
  Redis) keep the page's once-a-second redraw cheap, silent nodes turn gone,
  and no series grows past 900 points.

Every wait is bounded; the page is polled (DevTools has no event for a
page's own progress), nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.routes.dashboard import UPLOT_VERSION
from api.token import mint
from broker.base import Message
from ops.cluster import Cluster
from tests import redis_server
from tests.browser import CHROMIUM, Browser, BrowserError, chromium
from tests.clusters import cluster_running
from tests.server import Node, run_server
from tests.sse_client import EventStream
from workers.produce import publish_direct

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (ops/install-system-deps.sh installs it)"),
    pytest.mark.timeout(120),
]

ROOT = Path(__file__).resolve().parents[2]
VENDOR = ROOT / "api" / "static" / "vendor" / "uplot"
DOCS_SCREENSHOT = ROOT / "docs" / "dashboard.png"
SECRET = "dashboard-test-secret-" + "x" * 32
COOKIE = "herald_token"
WIDTH, HEIGHT = 1360, 1000

FIGURES_EVERY = 1.0  # the nodes publish their figures once a second (api.node.registry)
TICK = 1.0  # the page redraws once a second
SILENCE = 5.0  # a node silent for longer is gone on the page
ONE_UPDATE = FIGURES_EVERY + TICK + 1.0  # a figure taken, the page's next redraw, and slack for a loaded machine

# The nodes' table as the page shows it: one object per row, every cell's text by column.
ROWS = """
[...document.querySelectorAll("#nodes tbody tr")].map((tr) => ({
  id: tr.dataset.node, state: tr.dataset.state || "", time: tr.dataset.time ? Number(tr.dataset.time) : null,
  cells: Object.fromEntries([...tr.cells].map((td) => [td.dataset.col, td.textContent])),
}))
"""

TOTALS = """
Object.fromEntries([...document.querySelectorAll("#totals b")].map((b) => [b.id.replace("total-", ""), b.textContent]))
"""

# Installed before the page's own scripts: what the browser refused under the page's Content-Security-Policy.
CSP_WATCH = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push(e.violatedDirective + " " + e.blockedURI);
});
"""


def artifacts() -> Path:
    path = Path(os.environ.get("HERALD_ARTIFACTS") or ROOT / ".run" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def admin_token(**rights: Any) -> str:
    return mint(SECRET, admin=True, ttl=600, **rights)


def count(text: str) -> int | None:
    """A number as the page writes it (``1,234``); None for the page's dash."""
    text = text.strip().replace(",", "")
    return int(text) if text.isdigit() else None


@dataclass
class Row:
    id: str
    state: str
    time: float | None  # the node's clock when it took the figures shown
    cells: dict[str, str]

    @property
    def connections(self) -> int | None:
        return count(self.cells["connections"])


class Dashboard:
    """The dashboard page in a browser, and everything the browser asked for and complained about."""

    def __init__(self, browser: Browser, origin: str) -> None:
        self.browser = browser
        self.origin = origin
        self.requests: list[str] = []
        self.errors: list[str] = []

    @classmethod
    async def open(cls, browser: Browser, url: str) -> Dashboard:
        origin = "/".join(url.split("/", 3)[:3])
        page = cls(browser, origin)
        browser.on("Network.requestWillBeSent", lambda p: page.requests.append(p["request"]["url"]))
        browser.on("Runtime.exceptionThrown", page._on_exception)
        await browser.send("Network.enable")
        await browser.send("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_WATCH})
        await browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        await browser.navigate(url)
        return page

    def _on_exception(self, params: dict[str, Any]) -> None:
        details = params.get("exceptionDetails", {})
        self.errors.append(str(details.get("exception", {}).get("description") or details.get("text")))

    async def until(self, expression: str, done: Callable[[Any], bool], timeout: float) -> Any:
        """Evaluate until ``done(value)`` or ``timeout``; the last value. Survives the page reloading itself."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = await self.browser.evaluate(expression)
            except BrowserError:  # the page is between two documents (it reloaded): ask the next one
                value = None
            if done(value) or time.monotonic() > deadline:
                return value
            await asyncio.sleep(0.05)  # polling the page's own state: DevTools has nothing to await

    async def rows(self) -> dict[str, Row]:
        return {r["id"]: Row(r["id"], r["state"], r["time"], r["cells"]) for r in await self.browser.evaluate(ROWS)}

    async def rows_until(self, done: Callable[[dict[str, Row]], bool], timeout: float) -> dict[str, Row]:
        value = await self.until(ROWS, lambda v: v is not None and done(_rows(v)), timeout)
        return _rows(value or [])

    async def badge(self) -> str:
        text: str = await self.browser.evaluate("document.getElementById('stream').textContent")
        return text

    async def publish_test_event(self, topic: str, data: str, timeout: float = 10) -> dict[str, Any]:
        """Fill the test form, press its button; the page's log entry for the event once it arrived."""
        script = f"""
          document.getElementById("publish-topic").value = {json.dumps(topic)};
          document.getElementById("publish-data").value = {json.dumps(data)};
          document.getElementById("publish-button").click();
        """
        await self.browser.evaluate(script)
        entry = """
          (() => { const li = document.querySelector("#publish-log li[data-latency-ms]");
                   return {status: document.getElementById("publish-status").textContent,
                           id: li ? li.dataset.id : null, latency: li ? Number(li.dataset.latencyMs) : null,
                           text: li ? li.textContent : null}; })()
        """
        found: dict[str, Any] = await self.until(entry, lambda v: v is not None and v["id"] is not None, timeout)
        return found

    def foreign_requests(self) -> list[str]:
        return [url for url in self.requests if not url.startswith(self.origin + "/")]

    async def csp_violations(self) -> list[str]:
        found: list[str] = await self.browser.evaluate("window.__csp || []")
        return found

    async def screenshot(self) -> bytes:
        """The whole page as PNG (the viewport grown to the page's height for the shot)."""
        metrics = await self.browser.send("Page.getLayoutMetrics")
        height = math.ceil(metrics["cssContentSize"]["height"])
        viewport = {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False}
        await self.browser.send("Emulation.setDeviceMetricsOverride", viewport)
        shot = await self.browser.send("Page.captureScreenshot", {"format": "png"}, timeout=20)
        viewport["height"] = HEIGHT
        await self.browser.send("Emulation.setDeviceMetricsOverride", viewport)
        return base64.b64decode(shot["data"])


def _rows(value: list[dict[str, Any]]) -> dict[str, Row]:
    return {r["id"]: Row(r["id"], r["state"], r["time"], r["cells"]) for r in value}


def save_screenshot(png: bytes, name: str, docs: bool = False) -> Path:
    """Keep ``png`` as a test artifact; also as docs/dashboard.png when asked for and missing or when told to."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    path = artifacts() / name
    path.write_bytes(png)
    if docs and (not DOCS_SCREENSHOT.exists() or os.environ.get("HERALD_DOCS_SCREENSHOT") == "1"):
        DOCS_SCREENSHOT.write_bytes(png)
    return path


async def node_connections(client: httpx.AsyncClient, urls: list[str]) -> list[int]:
    answers = await asyncio.gather(*(client.get(f"{url}/stats") for url in urls))
    return [int(a.json()["hub"]["connections"]) for a in answers]


# --------------------------------------------------------------------------- served from the package


async def test_the_page_and_uplot_are_served_from_the_package(node: Node) -> None:
    async with httpx.AsyncClient(base_url=node.url, trust_env=False, timeout=5) as client:
        page = await client.get("/dashboard")
        script = await client.get(f"/dashboard/uplot.js?v={UPLOT_VERSION}")
        style = await client.get(f"/dashboard/uplot.css?v={UPLOT_VERSION}")
        again = await client.get("/dashboard/uplot.js", headers={"If-None-Match": script.headers["etag"]})

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    policy = page.headers["content-security-policy"]
    assert "connect-src 'self'" in policy
    assert "default-src 'none'" in policy
    nonce = re.search(r"'nonce-([^']+)'", policy)
    assert nonce is not None
    assert f'<script nonce="{nonce[1]}">' in page.text
    config = re.search(r'<script id="herald-config" type="application/json">(.*?)</script>', page.text)
    assert config is not None
    assert json.loads(config[1]) == {"topic": "_herald/nodes", "cookie": COOKIE, "auth": False, "node": "test-node"}
    # Nothing from elsewhere: every script and style is the node's own.
    assert re.findall(r'(?:src|href)="(?:https?:)?//', page.text) == []
    assert f'src="dashboard/uplot.js?v={UPLOT_VERSION}"' in page.text

    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.content == (VENDOR / "uPlot.iife.min.js").read_bytes()
    assert script.text.startswith(f"/*! https://github.com/leeoniya/uPlot (v{UPLOT_VERSION}) */")
    assert "immutable" in script.headers["cache-control"]
    assert again.status_code == 304
    assert style.status_code == 200
    assert style.headers["content-type"].startswith("text/css")
    assert style.content == (VENDOR / "uPlot.min.css").read_bytes()

    assert f"uplot {UPLOT_VERSION}" in (VENDOR / "VERSION").read_text()
    assert "MIT License" in (VENDOR / "LICENSE").read_text()


def test_the_package_data_takes_the_page_and_the_vendored_library() -> None:
    """pyproject's package-data for ``api`` must cover the page and uPlot, or an installed node serves neither."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["api"]
    base = ROOT / "api"
    shipped = {p.relative_to(base).as_posix() for pattern in patterns for p in base.glob(pattern) if p.is_file()}
    needed = {"static/dashboard.html", *(f"static/vendor/uplot/{f.name}" for f in VENDOR.iterdir())}
    assert needed <= shipped, f"not in package-data {patterns}: {sorted(needed - shipped)}"
    assert not [p for p in shipped if fnmatch.fnmatch(p, "*.py")]


# --------------------------------------------------------------------------- one node


async def test_the_page_works_offline_and_watches_its_test_event(node: Node) -> None:
    topic = f"dash-{uuid.uuid4().hex[:10]}"
    async with chromium() as browser, await EventStream.open(node.url, [topic]) as witness:
        page = await Dashboard.open(browser, f"{node.url}/dashboard")
        rows = await page.rows_until(lambda r: "test-node" in r and r["test-node"].state == "serving", 10)
        assert "test-node" in rows, f"{rows}; badge {await page.badge()}; errors {page.errors}"
        assert rows["test-node"].cells["url"] == node.url
        assert await page.badge() == "live"
        canvases = await page.browser.evaluate("document.querySelectorAll('.uplot canvas').length")
        assert canvases == 3  # uPlot (from the package) drew the three charts

        got = await page.publish_test_event(topic, '{"n": 1}')
        assert got["id"], got
        (seen,) = await witness.take(1, timeout=5)
        assert got["id"] == seen.last_event_id, got
        assert seen.data == '{"n":1}'
        assert 0 < got["latency"] < 5000, got
        assert "arrived" in got["status"], got

        violations = await page.csp_violations()
    assert page.foreign_requests() == []  # nothing asked of any other origin: no CDN, no font, no beacon
    assert any(url.startswith(f"{node.url}/dashboard/uplot.js") for url in page.requests)
    assert violations == []
    assert page.errors == []


# --------------------------------------------------------------------------- access control


@pytest.fixture(scope="module")
def auth_node() -> Iterator[Node]:
    with run_server({"HERALD_JWT_SECRET": SECRET, "HERALD_NODE_ID": "auth-node"}) as node:
        yield node


async def test_without_an_admin_token_the_route_refuses_but_serves_the_page_that_asks(auth_node: Node) -> None:
    async with httpx.AsyncClient(base_url=auth_node.url, trust_env=False, timeout=5) as client:
        bare = await client.get("/dashboard")
        not_admin = await client.get("/dashboard", params={"access_token": mint(SECRET, subscribe=["**"], ttl=60)})
        admin = await client.get("/dashboard", headers={"Authorization": f"Bearer {admin_token()}"})
        figures = await client.get("/events", params={"topic": "_herald/nodes"})
        cluster = await client.get("/cluster")
    assert bare.status_code == 401
    assert bare.headers["www-authenticate"].startswith('Bearer realm="herald"')
    assert 'id="auth-form"' in bare.text  # the page, which asks for a token
    assert not_admin.status_code == 403
    assert admin.status_code == 200
    assert '"auth":true' in admin.text
    # What the page shows is guarded where it comes from.
    assert (figures.status_code, cluster.status_code) == (401, 401)


async def test_the_page_asks_for_a_token_and_keeps_it_as_a_cookie(auth_node: Node) -> None:
    topic = f"dashboard/{uuid.uuid4().hex[:10]}"
    token = admin_token(publish=["dashboard/**"], subscribe=["dashboard/**"])
    async with chromium() as browser:
        page = await Dashboard.open(browser, f"{auth_node.url}/dashboard")
        asking = await page.until(
            "({badge: document.getElementById('stream').textContent, form: !document.getElementById('auth').hidden,"
            " main: !document.getElementById('main').hidden, why: document.getElementById('auth-why').textContent})",
            lambda v: v is not None and v["form"],
            10,
        )
        assert asking == {"badge": "admin token needed", "form": True, "main": False, "why": asking["why"]}, asking
        assert "401" in asking["why"]

        # A token that is no admin's: refused, and the page says so.
        await browser.evaluate(f"""
          document.getElementById("auth-token").value = {json.dumps(mint(SECRET, subscribe=["**"], ttl=60))};
          document.getElementById("auth-form").requestSubmit();
        """)
        refused = await page.until(
            "document.getElementById('auth-why').textContent", lambda v: isinstance(v, str) and "403" in v, 10
        )
        assert "refused" in refused, refused

        await browser.evaluate(f"""
          document.getElementById("auth-token").value = {json.dumps(token)};
          document.getElementById("auth-form").requestSubmit();
        """)
        rows = await page.rows_until(lambda r: "auth-node" in r and r["auth-node"].state == "serving", 15)
        assert "auth-node" in rows, f"badge {await page.badge()}"
        cookies = (await browser.send("Network.getCookies", {"urls": [auth_node.url]}))["cookies"]
        assert [c["value"] for c in cookies if c["name"] == COOKIE] == [token]
        # The test form publishes with the pasted token (Authorization: Bearer) and subscribes with the cookie.
        got = await page.publish_test_event(topic, "hello")
        assert got["id"], got
        assert page.foreign_requests() == []


async def test_the_page_takes_access_token_from_its_address(auth_node: Node) -> None:
    async with chromium() as browser:
        page = await Dashboard.open(browser, f"{auth_node.url}/dashboard?access_token={admin_token()}")
        rows = await page.rows_until(lambda r: "auth-node" in r and r["auth-node"].state == "serving", 10)
        assert "auth-node" in rows, f"badge {await page.badge()}"
        assert await page.badge() == "live"
        cookies = (await browser.send("Network.getCookies", {"urls": [auth_node.url]}))["cookies"]
    assert [c for c in cookies if c["name"] == COOKIE] == []  # nothing stored: the address carries it
    assert page.errors == []


# --------------------------------------------------------------------------- a cluster under load

SUBSCRIBERS = 40  # the load tool's
HELD = (3, 2)  # streams the test holds open on node-0 and node-1
# Seconds of history in the charts before the screenshot: 25 for the one in the docs, a few when none is written.
CHART_POINTS = 25 if not DOCS_SCREENSHOT.exists() or os.environ.get("HERALD_DOCS_SCREENSHOT") == "1" else 5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with cluster_running(tmp_path_factory.mktemp("dashboard"), nodes=2) as running:
        yield running


@contextlib.asynccontextmanager
async def load_tool(targets: list[str], log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m workers.loadtest`` against ``targets`` for as long as the block runs; stopped by its pid."""
    args = [sys.executable, "-m", "workers.loadtest", "--quiet", "--subscribers", str(SUBSCRIBERS),
            "--topics", "4", "--rate", "60", "--duration", "110", "--ramp", "0.3", "--drain", "1",
            "--json", str(log.with_suffix(".json"))]  # fmt: skip
    for target in targets:
        args += ["--target", target]
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(*args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await asyncio.wait_for(process.wait(), 10)


@pytest.mark.timeout(180)
async def test_a_two_node_cluster_under_load(cluster: Cluster, tmp_path: Path) -> None:
    urls = [cluster.node_url(0), cluster.node_url(1)]
    held_topic = f"held-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "loadtest.log"
    async with (
        load_tool(urls, log) as loader,
        httpx.AsyncClient(trust_env=False, timeout=5) as client,
        contextlib.AsyncExitStack() as streams,
        chromium() as browser,
    ):
        for url, held in zip(urls, HELD, strict=True):
            for _ in range(held):
                await streams.enter_async_context(await EventStream.open(url, [held_topic]))
        page = await Dashboard.open(browser, f"{urls[0]}/dashboard")
        both = await page.rows_until(
            lambda r: all(r.get(n) and r[n].state == "serving" for n in ("node-0", "node-1")), 15
        )
        assert {n: r.state for n, r in both.items()} == {"node-0": "serving", "node-1": "serving"}, page.errors

        # The truth: the load tool's subscribers, the test's streams and the page's own (the figures stream).
        own = await browser.evaluate("window.heraldDashboard.streams()")
        assert own == 1
        truth = SUBSCRIBERS + sum(HELD) + own
        deadline = time.monotonic() + 40
        while sum(counted := await node_connections(client, urls)) != truth:
            assert loader.returncode is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"the nodes hold {counted}, not {truth}:\n{log.read_text()[-3000:]}"
            await asyncio.sleep(0.1)  # the load tool connects on its own schedule: poll what the nodes count
        settled = time.time()

        # Within one update: the first redraw made of figures both nodes took after that shows the truth.
        shown = await page.until(
            f"({{rows: {ROWS}, totals: {TOTALS}}})",
            lambda v: v is not None and all((r["time"] or 0) > settled for r in v["rows"] if r["state"] == "serving"),
            ONE_UPDATE + 2,
        )
        took = time.time() - settled
        rows = _rows(shown["rows"])
        assert all((r.time or 0) > settled for r in rows.values()), f"no update in {took:.1f} s: {rows}"
        assert count(shown["totals"]["connections"]) == truth, (shown["totals"], truth, counted)
        assert sum(r.connections or 0 for r in rows.values()) == truth
        assert took <= ONE_UPDATE, f"the page showed the truth {took:.1f} s after it was established"
        for name, held in zip(("node-0", "node-1"), HELD, strict=True):
            assert (rows[name].connections or 0) >= held

        # Under load: events go out, and the load tool's topics lead the busiest.
        busy = await page.until(
            f"({{totals: {TOTALS}, top: document.querySelector('#busiest-subscribers tbody tr td')?.textContent}})",
            lambda v: v is not None and (count(v["totals"]["out"]) or 0) > 0,
            10,
        )
        assert (count(busy["totals"]["out"]) or 0) > 0, busy
        assert busy["top"], busy
        assert not busy["top"].startswith("_herald/"), busy

        # The publish form: published through node-0 (the page's), seen by the test on node-1 too.
        topic = f"dashboard/{uuid.uuid4().hex[:10]}"
        async with await EventStream.open(urls[1], [topic]) as witness:
            got = await page.publish_test_event(topic, '{"from": "the dashboard"}')
            (seen,) = await witness.take(1, timeout=5)
        assert got["id"] == seen.last_event_id, got
        assert got["latency"] is not None, got
        assert got["latency"] > 0, got

        # For the picture: charts with some history (a point a second), then the whole page.
        points = await page.until("window.heraldDashboard.points().x", lambda x: x >= CHART_POINTS, CHART_POINTS + 5)
        assert points >= CHART_POINTS
        png = await page.screenshot()
        shot = save_screenshot(png, "dashboard-cluster.png", docs=True)
        assert len(png) > 50_000, shot  # tables and charts, not a blank page

        # A node killed: it stops sending figures, and the page says it is gone (the other one serves on).
        await asyncio.to_thread(cluster.kill_node, 1)
        killed = time.monotonic()
        after = await page.rows_until(lambda r: "node-1" in r and r["node-1"].state == "gone", SILENCE + TICK + 6)
        gone_in = time.monotonic() - killed
        assert after["node-1"].state == "gone", after["node-1"]
        assert after["node-0"].state == "serving", after["node-0"]
        totals = await browser.evaluate(TOTALS)
        assert totals["nodes"] == "1", totals
        save_screenshot(await page.screenshot(), "dashboard-cluster-node-gone.png")
        foreign = page.foreign_requests()
        errors = page.errors
    assert foreign == []
    assert errors == []
    print(
        f"\ndashboard: 2 nodes, {truth} connections shown {took:.1f} s after they were established; test event "
        f"{got['latency']:.1f} ms from publish to the page; node-1 killed, gone on the page after {gone_in:.1f} s; "
        f"screenshot {shot}"
    )


# --------------------------------------------------------------------------- twenty nodes


def made_up_figures(index: int, started: float, step: int) -> dict[str, Any]:
    """What a busy node would publish: counters that grow with ``step`` (one a second)."""
    return {
        "id": f"sim-{index:02d}",
        "url": f"http://10.0.0.{index + 10}:8000",
        "version": "0.1.0",
        "started_at": started,
        "state": "serving",
        "time": time.time(),
        "connections": 500 + 37 * index,
        "topics": 20 + index,
        "events_published": 40 * step,
        "events_received": 120 * step,
        "deliveries": (3000 + 100 * index) * step,
        "bytes_sent": 400_000 * step,
        "cutoffs": index,
        "resets": 0,
        "expired": 0,
        "connects": 600,
        "broker_up": True,
        "feed_reconnects": 0,
        "publish_count": 40 * step,
        "publish_seconds_sum": 0.05 * step,
        "publish_p99_ms": 2.0,
        "latency_p99_ms": 6.0,
        "busiest": [
            {"topic": f"room/{k}", "subscribers": 90 - 7 * k, "events": (120 // (k + 1)) * step} for k in range(10)
        ],
    }


@contextlib.asynccontextmanager
async def simulated_nodes(redis_url: str, count: int) -> AsyncIterator[set[int]]:
    """``count`` made-up nodes publishing figures into Redis once a second; discard an index to silence it."""
    speaking = set(range(count))
    started = time.time() - 3600
    stop = asyncio.Event()

    async def run() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            messages = [
                Message("_herald/nodes", json.dumps(made_up_figures(i, started, step)), "node")
                for i in sorted(speaking)
            ]
            if messages:
                await publish_direct(redis_url, messages)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FIGURES_EVERY)  # the pace, or stop at once

    task = asyncio.create_task(run())
    try:
        yield speaking
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_twenty_nodes_stay_smooth_and_silent_ones_turn_gone() -> None:
    if not redis_server.available():
        pytest.skip("redis-server is not installed")
    with (
        redis_server.redis_server() as redis,
        run_server({"REDIS_URL": redis.url, "HERALD_NODE_ID": "real-a"}) as real_a,
        run_server({"REDIS_URL": redis.url, "HERALD_NODE_ID": "real-b"}),
    ):
        async with simulated_nodes(redis.url, 18) as speaking, chromium() as browser:
            page = await Dashboard.open(browser, f"{real_a.url}/dashboard")
            rows = await page.rows_until(lambda r: sum(x.state == "serving" for x in r.values()) == 20, 15)
            assert sum(r.state == "serving" for r in rows.values()) == 20, {n: r.state for n, r in rows.items()}

            # Redraws at most once a second, each of them cheap.
            first = await browser.evaluate("window.heraldDashboard.perf.ticks")
            began = time.monotonic()
            ticks = await page.until("window.heraldDashboard.perf.ticks", lambda t: t >= first + 5, 10)
            elapsed = time.monotonic() - began
            assert ticks - first <= elapsed / TICK + 1, (ticks - first, elapsed)
            render_ms: list[float] = await browser.evaluate("window.heraldDashboard.perf.renderMs")
            slowest = max(render_ms[-5:])
            assert slowest < 100, render_ms
            totals = await browser.evaluate(TOTALS)
            expected = sum(500 + 37 * i for i in range(18))  # plus the two real nodes' own
            assert (count(totals["connections"]) or 0) >= expected, totals

            # Three made-up nodes fall silent: gone on the page once quiet for longer than SILENCE.
            for index in (0, 7, 17):
                speaking.discard(index)
            quiet = {"sim-00", "sim-07", "sim-17"}
            rows = await page.rows_until(
                lambda r: all(n in r and r[n].state == "gone" for n in quiet), SILENCE + TICK + 6
            )
            states = {n: r.state for n, r in rows.items()}
            assert {n for n, s in states.items() if s == "gone"} == quiet, states
            assert (await browser.evaluate(TOTALS))["nodes"] == "17"

            # 15 minutes of points at most: the page's own redraw, run past its window.
            points = await browser.evaluate(
                "(() => { for (let i = 0; i < 950; i++) window.heraldDashboard.tick(); "
                "return window.heraldDashboard.points(); })()",
                timeout=60,
            )
            render_ms = await browser.evaluate("window.heraldDashboard.perf.renderMs")
            png = await page.screenshot()
            errors = page.errors
            foreign = page.foreign_requests()
    assert points["x"] == 900, points
    assert points["longest"] == 900, points
    assert points["series"] == [21, 21, 21], points  # the total and one per node, in each of the three charts
    assert statistics.median(render_ms) < 50, render_ms
    save_screenshot(png, "dashboard-20-nodes.png")
    assert errors == []
    assert foreign == []
    print(
        f"\ndashboard with 20 nodes: a redraw (table, totals, 3 charts x 21 series x 900 points) takes "
        f"{statistics.median(render_ms):.1f} ms median, {max(render_ms):.1f} ms at most"
    )
