"""Health, readiness, node statistics and the demo page."""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse

from api.adapter import Choice
from api.deps import AccessDep, AdminOnly, BrokerDep, HubDep, SettingsDep
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
