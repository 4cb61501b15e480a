"""Health, readiness, node statistics and the demo page."""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from api.adapter import Choice
from api.core.hub import Hub
from api.deps import AccessDep, AdminOnly, BrokerDep, HubDep, SettingsDep
from api.node.stall import StallWatch
from broker.base import BrokerUnavailable, ReportsStats

router = APIRouter()


@router.get("/healthz", summary="Liveness: 200 while the process serves")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 200 when the broker is usable, 503 otherwise",
    responses={503: {"description": "The broker is unavailable; retry after Retry-After seconds."}},
)
async def readyz(broker: BrokerDep) -> JSONResponse:
    try:
        ready = await broker.ping()
    except BrokerUnavailable:
        ready = False
    if ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "broker unavailable"}, status_code=503, headers={"Retry-After": "2"})


_PROBE_HEADERS = {"Cache-Control": "no-store"}


def probe_response(hub: Hub, watch: StallWatch, node_id: str) -> Response:
    """The answer to the front's probe: 204 when this node takes new streams, 503 when it is draining or
    resynchronising after standing still (api.node.stall). Redis being down is no reason: the node holds
    streams open until it is back. A node that hangs answers nothing, which is what the probe is for.

    204, not a 200 with a body: nginx keeps an ``auth_request`` subrequest's upstream connection alive only
    when the answer can have no body (a 200 "ok" cost every stream open a new connection to the node:
    docs/benchmarks-front.md)."""
    headers = {**_PROBE_HEADERS, "X-Node-Id": node_id}
    if hub.draining:
        return Response(b"draining\n", 503, headers, "text/plain")
    if watch.resyncing:
        return Response(b"resyncing\n", 503, headers, "text/plain")
    return Response(status_code=204, headers=headers)


@router.get(
    "/probe",
    summary="The front's probe before a stream: 204 when this node takes new streams",
    status_code=204,
    response_class=Response,
    responses={503: {"description": "Draining, or resynchronising after standing still: open streams elsewhere."}},
)
async def probe(request: Request, hub: HubDep, settings: SettingsDep) -> Response:
    # Served by HeraldApp's shortcut while the node serves; this route answers otherwise (and documents it).
    watch: StallWatch | None = getattr(request.app.state, "stall_watch", None)
    if watch is None:
        return Response(b"starting\n", 503, _PROBE_HEADERS, "text/plain")
    response = probe_response(hub, watch, settings.node_id)
    del response.headers["x-node-id"]  # the node's middleware adds it
    return response


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096
    except OSError:
        return 0


@router.get(
    "/stats",
    summary="This node's counters: connections, topics, events, memory",
    dependencies=[AdminOnly],
    responses={
        401: {"description": "Access control is on and there is no usable token."},
        403: {"description": "The token has no admin rights."},
        503: {"description": "Tokens can't be verified now (the JWKS is unreachable); retry later."},
    },
)
async def stats(
    request: Request, hub: HubDep, broker: BrokerDep, settings: SettingsDep, access: AccessDep
) -> dict[str, Any]:
    # Every task of the node's loop (an open stream costs one: uvicorn's, serving it). Counted here, on
    # request, not in Hub.stats: the node's announce reads those every second, and counting walks every task.
    figures: dict[str, int] = {**hub.stats(), "tasks": len(asyncio.all_tasks())}
    body: dict[str, Any] = {"node_id": settings.node_id, "rss_bytes": _rss_bytes(), "hub": figures}
    server: Choice | None = getattr(request.app.state, "server", None)
    if server is not None:  # what serves beyond ASGI (api.adapter)
        body["server"] = {"http": server.hooks.name, "adapter": server.adapter, "uvicorn": server.uvicorn_version}
    if access.enabled:
        body["auth"] = access.stats()
    if isinstance(broker, ReportsStats):
        body["broker"] = broker.stats()
    return body


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    page = resources.files("api").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page)
