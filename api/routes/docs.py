"""``GET /docs``: the API's Swagger UI, served from the package (no CDN: it works offline).

FastAPI's own ``/docs`` loads Swagger UI's script and style sheet from a CDN
(and its favicon from FastAPI's site), so on a machine without internet
access it is a blank page. Here the page, Swagger UI's two files (vendored
from the npm package ``swagger-ui-dist`` into ``api/static/swagger/``, see
the README there) and the OpenAPI document all come from the node itself:
the page names no other host.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import HTMLResponse

SWAGGER_UI_VERSION = "5.35.0"
"""The vendored ``swagger-ui-dist`` (api/static/swagger/README.md); in the assets' URLs, so browsers may cache them."""

ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}
"""The files of Swagger UI the page loads, by name, with their content types."""

ASSET_CACHE = "public, max-age=31536000, immutable"  # a new version is a new URL (?v=...)

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class Asset:
    """One vendored file, as read from the package once: its bytes, gzipped and not."""

    body: bytes
    gzipped: bytes
    media_type: str


@functools.cache
def asset(name: str) -> Asset:
    """The vendored file ``name`` (one of :data:`ASSET_TYPES`), read from the package on first use."""
    body = resources.files("api").joinpath("static/swagger", name).read_bytes()
    return Asset(body, gzip.compress(body, compresslevel=6, mtime=0), ASSET_TYPES[name])


def docs_page(title: str, openapi_url: str, assets_url: str) -> str:
    """The Swagger UI page: the vendored style sheet and script, then the UI on ``openapi_url``.

    ``validatorUrl: null`` keeps Swagger UI from showing a badge fetched from
    its online validator; the empty ``data:`` icon keeps the browser from
    asking for a favicon.
    """
    css = html.escape(f"{assets_url}/swagger-ui.css?v={SWAGGER_UI_VERSION}")
    js = html.escape(f"{assets_url}/swagger-ui-bundle.js?v={SWAGGER_UI_VERSION}")
    config = {
        "url": openapi_url,
        "dom_id": "#swagger-ui",
        "layout": "BaseLayout",
        "deepLinking": True,
        "showExtensions": True,
        "showCommonExtensions": True,
        "validatorUrl": None,
    }
    # In a <script>, "</" could end the element early: JSON allows escaping the slash.
    options = json.dumps(config).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{css}">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{js}"></script>
<script>
const options = {options};
options.presets = [SwaggerUIBundle.presets.apis];
window.ui = SwaggerUIBundle(options);
</script>
</body>
</html>
"""


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    openapi_url = request.app.openapi_url
    if openapi_url is None:
        raise HTTPException(404, "this app publishes no OpenAPI document")
    page = docs_page(f"{request.app.title} - API", root + openapi_url, f"{root}/docs")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


@router.get("/docs/{name}")
async def docs_asset(name: str, request: Request) -> Response:
    """One of Swagger UI's files, gzipped when the client takes it (it is 1.7 MB as is, 0.5 MB gzipped)."""
    if name not in ASSET_TYPES:
        raise HTTPException(404, "Not Found")
    file = asset(name)
    headers = {"Cache-Control": ASSET_CACHE, "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", "").lower():
        headers["Content-Encoding"] = "gzip"
        return Response(file.gzipped, media_type=file.media_type, headers=headers)
    return Response(file.body, media_type=file.media_type, headers=headers)
