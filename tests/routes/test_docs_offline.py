"""``/docs`` works without internet: Swagger UI comes from the node itself, and renders in headless Chromium.

FastAPI's own page loads Swagger UI from a CDN, so on a machine without
internet access it was blank. The node now serves the vendored files
(``api/static/swagger/``). Checked over HTTP (the page names no other host,
and every file it refers to answers with the right type) and in Chromium:
the operations render, and no request the page makes leaves the node.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from importlib import resources
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from api.routes.docs import SWAGGER_UI_VERSION
from tests.browser import CHROMIUM, chromium
from tests.server import Node, run_server

URL = re.compile(r"\b(?:https?:)?//[^\s\"'<>)]+", re.IGNORECASE)
EXPECTED_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",)}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def docs_node() -> Iterator[Node]:
    with run_server() as node:
        yield node


class References(HTMLParser):
    """Every URL a page refers to in ``src`` and ``href`` attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls.extend(value for name, value in attrs if name in ("src", "href") and value)


def operations(spec: dict[str, Any]) -> int:
    return sum(1 for item in spec["paths"].values() for method in item if method in HTTP_METHODS)


def test_docs_page_names_no_other_host_and_every_file_it_uses_is_served(docs_node: Node) -> None:
    page = httpx.get(f"{docs_node.url}/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    foreign = [url for url in URL.findall(page.text) if not url.startswith(docs_node.url)]
    assert foreign == [], f"the page names other hosts: {foreign}"
    assert "tiangolo" not in page.text
    assert "cdn" not in page.text.lower()

    parser = References()
    parser.feed(page.text)
    assets = [url for url in parser.urls if not url.startswith("data:")]
    assert {urlsplit(url).path.rsplit("/", 1)[-1] for url in assets} == {"swagger-ui-bundle.js", "swagger-ui.css"}
    for url in assets:
        absolute = urljoin(str(page.url), url)
        assert absolute.startswith(docs_node.url + "/")
        answer = httpx.get(absolute)
        assert answer.status_code == 200, absolute
        name = urlsplit(absolute).path.rsplit("/", 1)[-1]
        media_type = answer.headers["content-type"].split(";")[0].strip()
        assert media_type in EXPECTED_TYPES[name[name.rindex(".") :]], (absolute, media_type)
        assert answer.headers["content-encoding"] == "gzip"  # httpx asks for it, and unpacks it
        assert SWAGGER_UI_VERSION in absolute  # a new version is a new URL: caching for long is safe
        assert answer.content == resources.files("api").joinpath("static/swagger", name).read_bytes()
        plain = httpx.get(absolute, headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers
        assert plain.content == answer.content

    openapi = re.search(r'"url": "([^"]+)"', page.text)
    assert openapi is not None
    assert openapi.group(1) == "/openapi.json"
    spec = httpx.get(urljoin(docs_node.url, openapi.group(1)))
    assert spec.status_code == 200
    assert spec.headers["content-type"] == "application/json"


def test_only_the_vendored_files_are_served(docs_node: Node) -> None:
    for name in ("README.md", "LICENSE", "index.html", "..%2Fdocs.py", "swagger-ui-bundle.js.map"):
        assert httpx.get(f"{docs_node.url}/docs/{name}").status_code == 404, name
    root = resources.files("api").joinpath("static/swagger")
    for name in ("LICENSE", "NOTICE", "swagger-ui-bundle.js.LICENSE.txt"):
        assert root.joinpath(name).read_text(encoding="utf-8").strip(), f"the licence file {name} ships"
    assert f"**{SWAGGER_UI_VERSION}**" in root.joinpath("README.md").read_text(encoding="utf-8")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (ops/install-system-deps.sh installs it)")
@pytest.mark.timeout(60)
async def test_swagger_ui_renders_every_operation_in_chromium_without_leaving_the_node(docs_node: Node) -> None:
    async with httpx.AsyncClient() as client:
        expected = operations((await client.get(f"{docs_node.url}/openapi.json")).json())
    assert expected >= 5
    requests: list[str] = []
    failures: list[str] = []
    async with chromium() as browser:
        await browser.send("Network.enable")
        browser.on("Network.requestWillBeSent", lambda params: requests.append(params["request"]["url"]))
        browser.on(
            "Network.loadingFailed",
            lambda params: failures.append(f"{params.get('type')}: {params.get('errorText')}"),
        )
        await browser.navigate(f"{docs_node.url}/docs")
        rendered = await browser.until(
            "document.querySelectorAll('#swagger-ui .opblock').length", lambda n: n >= expected, timeout=30
        )
        assert rendered == expected, (
            f"Swagger UI rendered {rendered} of {expected} operations:\n{browser.log()[-2000:]}"
        )
        paths = await browser.evaluate(
            "[...document.querySelectorAll('.opblock-summary-path')].map(e => e.textContent.replace(/\\u200b/g, ''))"
        )
        assert {"/publish", "/events"} <= set(paths)
        title = await browser.evaluate("document.querySelector('.info .title')?.textContent ?? ''")
        assert "Herald" in title
        # Open one operation: its details render from the same document, with nothing fetched from elsewhere.
        await browser.evaluate("document.querySelector('.opblock-summary-control, .opblock-summary').click()")
        await browser.until("document.querySelectorAll('.opblock-body').length", timeout=10)

    fetched = [url for url in requests if not url.startswith(("data:", "blob:"))]
    assert any(url.startswith(f"{docs_node.url}/docs/swagger-ui-bundle.js") for url in fetched)
    assert any(url.startswith(f"{docs_node.url}/openapi.json") for url in fetched)
    elsewhere = [url for url in fetched if not url.startswith(docs_node.url + "/")]
    assert elsewhere == [], f"the page asked other hosts: {elsewhere}"
    assert failures == [], f"requests failed: {failures}"
