"""``GET /dashboard``: the live cluster page; itself a Herald client.

The page (``api/static/dashboard.html``) is an EventSource client of the
reserved topic ``_herald/nodes`` (:data:`api.node.registry.NODES_TOPIC`), on
which every node publishes its figures once a second, and reads
``GET /cluster`` every few seconds for the nodes that stopped publishing
(gone, draining). Everything it shows comes from
those two, which are admin-only when access control is on; the page itself
holds no data. So ``GET /dashboard`` answers the page to anyone, with the
status an admin route would have (401/403 and the challenge when the
request carries no admin token): a browser shows the page, which asks for a
token, and a script or monitor sees the refusal.

Its charting library, uPlot (MIT, vendored unchanged from npm under
``api/static/vendor/uplot/``), is served by this module too
(``/dashboard/uplot.js``, ``/dashboard/uplot.css``): no CDN, the page works
on a machine without internet. Those URLs carry the library's version, so
browsers may keep them for a year.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from api.auth.access import Denied
from api.deps import AccessDep, SettingsDep, require_admin
from api.node.registry import NODES_TOPIC

router = APIRouter(include_in_schema=False)

UPLOT_VERSION = "1.6.32"
"""The vendored uPlot (see ``api/static/vendor/uplot/VERSION``)."""

VENDOR = "static/vendor/uplot"

# The page and uPlot only ever talk to the node that served them: anything else is refused by the browser.
# Inline styles stay allowed (uPlot sizes its elements with them); scripts need the page's nonce or this origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Asset:
    """A vendored file as served: its bytes, type and entity tag."""

    body: bytes
    media_type: str
    etag: str


@functools.cache
def _asset(name: str, media_type: str) -> Asset:
    body = resources.files("api").joinpath(f"{VENDOR}/{name}").read_bytes()
    return Asset(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


@functools.cache
def _template() -> str:
    return resources.files("api").joinpath("static/dashboard.html").read_text(encoding="utf-8")


def render(config: dict[str, object], nonce: str) -> str:
    """The page with its settings (JSON, safe inside ``<script>``) and the script nonce filled in."""
    data = json.dumps(config, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")
    return (
        _template().replace("{{config}}", data).replace("{{nonce}}", nonce).replace("{{uplot_version}}", UPLOT_VERSION)
    )


@router.get("/dashboard")
async def dashboard(request: Request, settings: SettingsDep, access: AccessDep) -> HTMLResponse:
    status, headers = 200, {}
    try:
        await require_admin(request)
    except Denied as refusal:  # the page asks for a token; no data is in it
        status, headers = refusal.status_code, {"WWW-Authenticate": refusal.challenge}
    nonce = secrets.token_urlsafe(16)
    config = {
        "topic": NODES_TOPIC,
        "cookie": settings.jwt_cookie,
        "auth": access.enabled,
        "node": settings.node_id,
    }
    headers["Cache-Control"] = "no-store"
    headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY.format(nonce=nonce)
    headers["Referrer-Policy"] = "no-referrer"  # a token may be in the page's URL
    return HTMLResponse(render(config, nonce), status_code=status, headers=headers)


def _serve(request: Request, asset: Asset) -> Response:
    headers = {"Cache-Control": "public, max-age=31536000, immutable", "ETag": asset.etag}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/dashboard/uplot.js")
async def uplot_js(request: Request) -> Response:
    return _serve(request, _asset("uPlot.iife.min.js", "text/javascript; charset=utf-8"))


@router.get("/dashboard/uplot.css")
async def uplot_css(request: Request) -> Response:
    return _serve(request, _asset("uPlot.min.css", "text/css; charset=utf-8"))
